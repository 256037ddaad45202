//! The counters in this process: the embedded default, exact for one
//! replica. One lock, held only for the few array updates of one admission
//! or settlement (never across an await).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::limits::{Check, LimitKind, Scope, Window};
use super::store::{Delta, Verdict, WindowIds};

/// Every scope's counters. One map lookup per scope and step: an admission
/// of a key under gateway limits touches two entries, whatever the number
/// of limits.
#[derive(Default)]
pub struct MemoryStore {
    scopes: Mutex<HashMap<Scope, ScopeCounters>>,
}

/// One scope's counters, per window kind.
#[derive(Default)]
struct ScopeCounters {
    minute: Windows,
    day: Windows,
}

/// The current window and the one before (a settlement may land just after
/// its window ended); older ones are over and forgotten.
#[derive(Default)]
struct Windows {
    current: Counts,
    previous: Counts,
}

/// One window's counters, by [`LimitKind`] (each window kind uses its own
/// two).
#[derive(Default, Clone, Copy)]
struct Counts {
    id: u64,
    values: [i64; LimitKind::ALL.len()],
}

impl ScopeCounters {
    fn windows(&mut self, window: Window) -> &mut Windows {
        match window {
            Window::Minute => &mut self.minute,
            Window::Day => &mut self.day,
        }
    }
}

impl Windows {
    /// Window `id`'s counters, moving on when it is newer than the current
    /// one.
    fn at(&mut self, id: u64) -> &mut [i64; LimitKind::ALL.len()] {
        if id > self.current.id {
            self.previous = if id == self.current.id + 1 {
                self.current
            } else {
                Counts::default()
            };
            self.current = Counts {
                id,
                ..Counts::default()
            };
        }
        &mut self.current.values
    }

    /// Window `id`'s counters, if it is still kept.
    fn kept(&mut self, id: u64) -> Option<&mut [i64; LimitKind::ALL.len()]> {
        if id == self.current.id {
            Some(&mut self.current.values)
        } else if id == self.previous.id {
            Some(&mut self.previous.values)
        } else {
            None
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl MemoryStore {
    pub fn reserve(&self, checks: &[Check]) -> Verdict {
        self.reserve_at(checks, now())
    }

    fn reserve_at(&self, checks: &[Check], now: u64) -> Verdict {
        let ids = WindowIds {
            minute: Window::Minute.id(now),
            day: Window::Day.id(now),
        };
        // A poisoned lock only means another thread panicked mid-update of
        // plain integers: the counters are still usable.
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        // Checks come grouped by scope (`limits::checks`).
        let mut current = Vec::with_capacity(checks.len());
        for group in checks.chunk_by(|a, b| a.scope == b.scope) {
            let counters = scopes.entry(group[0].scope.clone()).or_default();
            for check in group {
                let window = check.kind.window();
                current.push(counters.windows(window).at(ids.of(window))[check.kind.index()]);
            }
        }
        let refusing = checks.iter().zip(&current).position(|(check, now_at)| {
            check
                .limit
                .is_some_and(|limit| now_at.saturating_add(check.amount) > limit)
        });
        if let Some(index) = refusing {
            return Verdict::Refused {
                index,
                current,
                now,
            };
        }
        let mut after = current;
        let mut at = 0;
        for group in checks.chunk_by(|a, b| a.scope == b.scope) {
            let counters = scopes.entry(group[0].scope.clone()).or_default();
            for check in group {
                let window = check.kind.window();
                let counter = &mut counters.windows(window).at(ids.of(window))[check.kind.index()];
                *counter = counter.saturating_add(check.amount);
                after[at] = *counter;
                at += 1;
            }
        }
        Verdict::Admitted {
            windows: ids,
            after,
        }
    }

    pub fn settle(&self, ids: WindowIds, checks: &[Check], delta: Delta) {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        for group in checks.chunk_by(|a, b| a.scope == b.scope) {
            let Some(counters) = scopes.get_mut(&group[0].scope) else {
                continue;
            };
            for check in group {
                let window = check.kind.window();
                // A window gone is a window over: nothing left to correct.
                if let Some(values) = counters.windows(window).kept(ids.of(window)) {
                    let counter = &mut values[check.kind.index()];
                    *counter = counter.saturating_add(delta.of(check.kind)).max(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::limits::{checks, Charge};
    use super::*;
    use crate::config::Limits;

    const NOW: u64 = 1_800_000_030;

    fn charge(tokens: i64) -> Charge {
        Charge {
            requests: 1,
            tokens,
            nano_usd: 0,
        }
    }

    fn key_checks(limits: &Limits, tokens: i64) -> Vec<Check> {
        checks(
            Some((&Arc::from("t"), limits)),
            &Limits::default(),
            &charge(tokens),
        )
    }

    #[test]
    fn admits_up_to_the_limit_and_refuses_without_charging() {
        let store = MemoryStore::default();
        let limits = Limits {
            requests_per_minute: Some(2),
            tokens_per_minute: Some(100),
            ..Limits::default()
        };
        let c = key_checks(&limits, 40);
        for _ in 0..2 {
            assert!(matches!(
                store.reserve_at(&c, NOW),
                Verdict::Admitted { .. }
            ));
        }
        // The third request passes no limit: refused on requests, and the
        // token counter (80) stays untouched (all or nothing).
        let Verdict::Refused { index, current, .. } = store.reserve_at(&c, NOW) else {
            panic!("admitted over the limit");
        };
        assert_eq!(
            (c[index].kind.label(), current[index], current[1]),
            ("requests_per_minute", 2, 80)
        );
        // A new minute: the minute's counters start again, the day's go on.
        let Verdict::Admitted { after, .. } = store.reserve_at(&key_checks(&limits, 30), NOW + 60)
        else {
            panic!("refused in a new minute");
        };
        assert_eq!((after[0], after[1], after[2]), (1, 30, 110));
    }

    #[test]
    fn a_key_and_the_gateway_are_charged_together_or_not_at_all() {
        let store = MemoryStore::default();
        let key = Limits {
            tokens_per_minute: Some(1000),
            ..Limits::default()
        };
        let gateway = Limits {
            tokens_per_day: Some(150),
            ..Limits::default()
        };
        let c = checks(Some((&Arc::from("t"), &key)), &gateway, &charge(100));
        assert!(matches!(
            store.reserve_at(&c, NOW),
            Verdict::Admitted { .. }
        ));
        // The gateway's day refuses: the key's minute is not charged.
        let Verdict::Refused { index, current, .. } = store.reserve_at(&c, NOW) else {
            panic!("admitted over the gateway's limit");
        };
        assert_eq!((c[index].kind, current[1]), (LimitKind::TokensPerDay, 100));
        assert_eq!(c[index].scope, Scope::Gateway);
    }

    #[test]
    fn settlement_corrects_the_reserved_window_only() {
        let store = MemoryStore::default();
        let limits = Limits {
            tokens_per_minute: Some(100),
            ..Limits::default()
        };
        let c = key_checks(&limits, 90);
        let Verdict::Admitted { windows, .. } = store.reserve_at(&c, NOW) else {
            panic!()
        };
        assert!(matches!(store.reserve_at(&c, NOW), Verdict::Refused { .. }));
        // The request used 10 of its 90: 80 come back (and never below 0).
        store.settle(
            windows,
            &c,
            Delta {
                tokens: -80,
                nano_usd: 0,
            },
        );
        let Verdict::Admitted { after, .. } = store.reserve_at(&c, NOW) else {
            panic!("the refund did not free the window")
        };
        assert_eq!((after[0], after[1]), (2, 100), "requests never move");
        // A settlement for the minute before still lands there; one for a
        // window long gone changes nothing.
        let Verdict::Admitted { after, .. } = store.reserve_at(&c, NOW + 60) else {
            panic!()
        };
        assert_eq!(after[1], 90);
        let refund = Delta {
            tokens: -1000,
            nano_usd: 0,
        };
        store.settle(windows, &c, refund);
        let old = WindowIds {
            minute: windows.minute - 5,
            day: windows.day,
        };
        store.settle(old, &c, refund);
        let Verdict::Refused { current, .. } = store.reserve_at(&c, NOW + 60) else {
            panic!("a refund for another window freed this one");
        };
        assert_eq!(current[1], 90);
    }
}
