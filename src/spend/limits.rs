//! What a limit counts, over which window, and the counters one admission
//! touches. Pure: the stores apply these.
//!
//! Windows are fixed: the UTC minute and the UTC day. A fixed window is one
//! counter per limit, checked and charged in one atomic step, and the same
//! on every replica (the Redis store reads Redis's clock). Its price is the
//! boundary: a key may use its minute's limit at 12:00:59 and again at
//! 12:01:00.

use std::sync::Arc;

use crate::config::Limits;

/// One limit field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    UsdPerDay,
}

/// The window a limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Day,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Requests,
    Tokens,
    /// Billionths of a US dollar: integers, so stores add them exactly.
    NanoUsd,
}

impl LimitKind {
    pub const ALL: [LimitKind; 4] = [
        Self::RequestsPerMinute,
        Self::TokensPerMinute,
        Self::TokensPerDay,
        Self::UsdPerDay,
    ];

    /// The config field's name, also the metric label and in messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::TokensPerDay => "tokens_per_day",
            Self::UsdPerDay => "usd_per_day",
        }
    }

    /// Its place in [`LimitKind::ALL`], for counters kept in arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short name, for store fields.
    pub fn short(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "rpm",
            Self::TokensPerMinute => "tpm",
            Self::TokensPerDay => "tpd",
            Self::UsdPerDay => "usd",
        }
    }

    pub fn window(self) -> Window {
        match self {
            Self::RequestsPerMinute | Self::TokensPerMinute => Window::Minute,
            Self::TokensPerDay | Self::UsdPerDay => Window::Day,
        }
    }

    pub fn measure(self) -> Measure {
        match self {
            Self::RequestsPerMinute => Measure::Requests,
            Self::TokensPerMinute | Self::TokensPerDay => Measure::Tokens,
            Self::UsdPerDay => Measure::NanoUsd,
        }
    }

    /// The limit `limits` sets for this kind, in the measure's unit.
    pub fn limit_in(self, limits: &Limits) -> Option<i64> {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        match self {
            Self::RequestsPerMinute => limits.requests_per_minute.map(clamp),
            Self::TokensPerMinute => limits.tokens_per_minute.map(clamp),
            Self::TokensPerDay => limits.tokens_per_day.map(clamp),
            Self::UsdPerDay => limits.usd_per_day.map(usd_to_nano),
        }
    }
}

impl Window {
    /// Seconds in the window.
    pub fn seconds(self) -> u64 {
        match self {
            Self::Minute => 60,
            Self::Day => 86_400,
        }
    }

    /// The window's number at Unix time `now` (UTC minutes or days).
    pub fn id(self, now: u64) -> u64 {
        now / self.seconds()
    }

    /// Seconds from `now` until the window ends.
    pub fn seconds_left(self, now: u64) -> u64 {
        self.seconds() - now % self.seconds()
    }
}

/// US dollars as billionths, rounded up (a charge is never rounded away).
pub fn usd_to_nano(usd: f64) -> i64 {
    let nano = (usd * 1e9).ceil();
    if nano.is_finite() && nano > 0.0 {
        nano.min(i64::MAX as f64) as i64
    } else {
        0
    }
}

pub fn nano_to_usd(nano: i64) -> f64 {
    nano as f64 / 1e9
}

/// Whose counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A gateway key, by name (never the key or its digest); shared with
    /// the key itself, so that the checks of an admission allocate no
    /// names.
    Key(Arc<str>),
    /// All clients together.
    Gateway,
}

impl Scope {
    /// The label value in metrics: the key's name, or `*` for the gateway
    /// (key names cannot contain `*`).
    pub fn label(&self) -> &str {
        match self {
            Self::Key(name) => name,
            Self::Gateway => "*",
        }
    }
}

/// What one request reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub requests: i64,
    pub tokens: i64,
    pub nano_usd: i64,
}

impl Charge {
    pub fn amount(&self, measure: Measure) -> i64 {
        match measure {
            Measure::Requests => self.requests,
            Measure::Tokens => self.tokens,
            Measure::NanoUsd => self.nano_usd,
        }
    }
}

/// One counter an admission checks and charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub scope: Scope,
    pub kind: LimitKind,
    pub amount: i64,
    /// `None`: counted, not limited (so that a limit added later finds the
    /// window's use so far).
    pub limit: Option<i64>,
}

impl Check {
    /// The counter's field name in a window: `k:<name>:rpm`, `g:usd`.
    pub fn field(&self) -> String {
        match &self.scope {
            Scope::Key(name) => format!("k:{name}:{}", self.kind.short()),
            Scope::Gateway => format!("g:{}", self.kind.short()),
        }
    }
}

/// The checks of one admission: every counter of each scope that has a
/// limit (a scope without any limit is not counted at all).
pub fn checks(key: Option<(&Arc<str>, &Limits)>, gateway: &Limits, charge: &Charge) -> Vec<Check> {
    let mut out = Vec::with_capacity(2 * LimitKind::ALL.len());
    let scopes = key
        .map(|(name, limits)| (Scope::Key(Arc::clone(name)), limits))
        .into_iter()
        .chain([(Scope::Gateway, gateway)]);
    for (scope, limits) in scopes {
        if limits.is_empty() {
            continue;
        }
        for kind in LimitKind::ALL {
            out.push(Check {
                scope: scope.clone(),
                kind,
                amount: charge.amount(kind.measure()),
                limit: kind.limit_in(limits),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        // 30 s into a minute (1_800_000_000 is a multiple of 60).
        let now = 1_800_000_030;
        assert_eq!(Window::Minute.seconds_left(now), 30);
        assert_eq!(Window::Day.seconds_left(now), 86_400 - now % 86_400);
        assert_eq!(Window::Minute.id(now + 30), Window::Minute.id(now) + 1);
    }

    #[test]
    fn money_rounds_up() {
        assert_eq!(usd_to_nano(20.0), 20_000_000_000);
        assert_eq!(usd_to_nano(0.000_000_000_1), 1);
        assert_eq!(usd_to_nano(-1.0), 0);
        assert_eq!(nano_to_usd(1_500_000_000), 1.5);
    }

    #[test]
    fn only_limited_scopes_are_counted() {
        let charge = Charge {
            requests: 1,
            tokens: 100,
            nano_usd: 5,
        };
        let key = Limits {
            requests_per_minute: Some(60),
            ..Limits::default()
        };
        let none = Limits::default();
        let c = checks(Some((&Arc::from("team-a"), &key)), &none, &charge);
        assert_eq!(c.len(), 4, "every counter of the key's scope");
        assert_eq!(c[0].field(), "k:team-a:rpm");
        assert_eq!((c[0].amount, c[0].limit), (1, Some(60)));
        assert_eq!((c[1].amount, c[1].limit), (100, None));
        assert_eq!(c[3].amount, 5);
        assert!(checks(Some((&Arc::from("team-a"), &none)), &none, &charge).is_empty());
        let gateway = Limits {
            usd_per_day: Some(500.0),
            ..Limits::default()
        };
        let c = checks(None, &gateway, &charge);
        assert_eq!(c[3].field(), "g:usd");
        assert_eq!(c[3].limit, Some(500_000_000_000));
        assert_eq!(
            checks(Some((&Arc::from("t"), &key)), &gateway, &charge).len(),
            8
        );
    }
}
