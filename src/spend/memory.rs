//! The counters in this process: the embedded default, exact for one
//! replica. One lock, held only for the few map operations of one
//! admission or settlement (never across an await).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::limits::{Check, Window};
use super::store::{Correction, Verdict, WindowIds};

/// Counters by window: the current and the previous one of each kind (a
/// settlement may land just after its window ended).
#[derive(Default)]
pub struct MemoryStore {
    windows: Mutex<HashMap<(WindowKey, u64), HashMap<String, i64>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum WindowKey {
    Minute,
    Day,
}

fn key_of(w: Window) -> WindowKey {
    match w {
        Window::Minute => WindowKey::Minute,
        Window::Day => WindowKey::Day,
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
        let id_of = |w: Window| match w {
            Window::Minute => ids.minute,
            Window::Day => ids.day,
        };
        // A poisoned lock only means another thread panicked mid-update of
        // plain integers: the counters are still usable.
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows.retain(|(kind, id), _| match kind {
            WindowKey::Minute => *id + 1 >= ids.minute,
            WindowKey::Day => *id + 1 >= ids.day,
        });
        let fields: Vec<String> = checks.iter().map(Check::field).collect();
        let current: Vec<i64> = checks
            .iter()
            .zip(&fields)
            .map(|(check, field)| {
                let window = check.kind.window();
                windows
                    .get(&(key_of(window), id_of(window)))
                    .and_then(|w| w.get(field))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
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
        let mut after = Vec::with_capacity(checks.len());
        for (check, field) in checks.iter().zip(fields) {
            let window = check.kind.window();
            let counter = windows
                .entry((key_of(window), id_of(window)))
                .or_default()
                .entry(field)
                .or_insert(0);
            *counter = counter.saturating_add(check.amount);
            after.push(*counter);
        }
        Verdict::Admitted {
            windows: ids,
            after,
        }
    }

    pub fn settle(&self, ids: WindowIds, corrections: &[Correction]) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        for c in corrections {
            let window = c.check.kind.window();
            let id = match window {
                Window::Minute => ids.minute,
                Window::Day => ids.day,
            };
            // A window gone is a window over: nothing left to correct.
            if let Some(counter) = windows
                .get_mut(&(key_of(window), id))
                .and_then(|w| w.get_mut(&c.check.field()))
            {
                *counter = counter.saturating_add(c.delta).max(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn admits_up_to_the_limit_and_refuses_without_charging() {
        let store = MemoryStore::default();
        let limits = Limits {
            requests_per_minute: Some(2),
            tokens_per_minute: Some(100),
            ..Limits::default()
        };
        let c = checks(Some(("t", &limits)), &Limits::default(), &charge(40));
        assert!(matches!(
            store.reserve_at(&c, NOW),
            Verdict::Admitted { .. }
        ));
        assert!(matches!(
            store.reserve_at(&c, NOW),
            Verdict::Admitted { .. }
        ));
        // The third request passes no limit: refused on requests, and the
        // token counter (80) stays untouched (all or nothing).
        let Verdict::Refused { index, current, .. } = store.reserve_at(&c, NOW) else {
            panic!("admitted over the limit");
        };
        assert_eq!(
            (c[index].kind.label(), current[index], current[1]),
            ("requests_per_minute", 2, 80)
        );
        let big = checks(Some(("t", &limits)), &Limits::default(), &charge(30));
        // A new minute: counters start again.
        let Verdict::Admitted { after, .. } = store.reserve_at(&big, NOW + 60) else {
            panic!("refused in a new minute");
        };
        assert_eq!((after[0], after[1]), (1, 30));
    }

    #[test]
    fn settlement_corrects_the_reserved_window_only() {
        let store = MemoryStore::default();
        let limits = Limits {
            tokens_per_minute: Some(100),
            ..Limits::default()
        };
        let c = checks(Some(("t", &limits)), &Limits::default(), &charge(90));
        let Verdict::Admitted { windows, .. } = store.reserve_at(&c, NOW) else {
            panic!()
        };
        assert!(matches!(store.reserve_at(&c, NOW), Verdict::Refused { .. }));
        // The request used 10 of its 90: 80 come back.
        store.settle(
            windows,
            &[Correction {
                check: c[1].clone(),
                delta: -80,
            }],
        );
        let Verdict::Admitted { after, .. } = store.reserve_at(&c, NOW) else {
            panic!("the refund did not free the window")
        };
        assert_eq!(after[1], 100);
    }
}
