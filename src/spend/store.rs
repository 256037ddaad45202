//! Where the counters live: in this process, or in Redis, shared by every
//! replica. Either way one admission is one atomic step (all its checks
//! pass and are charged, or none is charged), and so is one settlement.

use std::sync::Arc;

use super::limits::{Check, LimitKind, Measure, Window};
use super::memory::MemoryStore;
use super::redis::RedisStore;
use crate::config::{SpendConfig, StoreConfig};
use crate::metrics::Metrics;
use crate::regular_file;

/// The windows a reservation was charged in, so that its settlement
/// corrects the same ones even after the clock moved on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowIds {
    pub minute: u64,
    pub day: u64,
}

impl WindowIds {
    /// The id of the window of kind `window`.
    pub fn of(self, window: Window) -> u64 {
        match window {
            Window::Minute => self.minute,
            Window::Day => self.day,
        }
    }
}

/// A store's answer to a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Charged; `after[i]` is check `i`'s counter after the charge.
    Admitted { windows: WindowIds, after: Vec<i64> },
    /// Nothing charged: check `index` would pass its limit. `current[i]`
    /// is check `i`'s counter; `now` is the store's Unix time.
    Refused {
        index: usize,
        current: Vec<i64>,
        now: u64,
    },
}

/// What a settlement moves each of a reservation's counters by: its
/// measure's difference between what was used and what was reserved.
/// Request counters never move: a request that ran counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub tokens: i64,
    pub nano_usd: i64,
}

impl Delta {
    pub fn of(self, kind: LimitKind) -> i64 {
        match kind.measure() {
            Measure::Requests => 0,
            Measure::Tokens => self.tokens,
            Measure::NanoUsd => self.nano_usd,
        }
    }

    pub fn is_zero(self) -> bool {
        self.tokens == 0 && self.nano_usd == 0
    }
}

/// Why the store could not answer. Never contains a password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the spend store did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the spend store failed: {0}")]
    Redis(String),
    #[error("cannot read spend.password_file {path}: {reason}")]
    Password { path: String, reason: String },
}

/// The counter store in force.
pub enum SpendStore {
    Memory(MemoryStore),
    /// Boxed: built once, and much larger than the memory store.
    Redis(Box<RedisStore>),
}

impl SpendStore {
    /// Builds the store `config` names. Redis connects lazily: a Redis that
    /// is down at start is an outage like any other, not a failed start.
    pub fn new(config: &SpendConfig, metrics: &Arc<Metrics>) -> Result<Arc<Self>, StoreError> {
        let password = match (&config.store, &config.password_file) {
            (StoreConfig::Memory, _) | (_, None) => None,
            (_, Some(path)) => Some(read_password(path)?),
        };
        let namespace = &config.namespace;
        Ok(Arc::new(match &config.store {
            StoreConfig::Memory => Self::Memory(MemoryStore::default()),
            StoreConfig::Redis(url) => Self::Redis(Box::new(RedisStore::single(
                url,
                namespace,
                password,
                Arc::clone(metrics),
            )?)),
            StoreConfig::RedisCluster(nodes) => Self::Redis(Box::new(RedisStore::cluster(
                nodes,
                namespace,
                password,
                Arc::clone(metrics),
            )?)),
        }))
    }

    /// Checks every counter against its limit and charges them all, or none.
    pub async fn reserve(
        &self,
        checks: &[Check],
        timeout: std::time::Duration,
    ) -> Result<Verdict, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.reserve(checks)),
            // Boxed: the Redis call's future is kilobytes, and unboxed it
            // would sit inside every request's message future, moved on
            // every message, memory store or not (bench/RESULTS.md entry 45).
            Self::Redis(r) => Box::pin(r.reserve(checks, timeout)).await,
        }
    }

    /// Moves a reservation's counters by `delta`, all at once:
    /// here and now in memory; with the next admission (or within a few
    /// milliseconds) in Redis. Never waits.
    pub fn settle(&self, windows: WindowIds, checks: &[Check], delta: Delta) {
        if delta.is_zero() {
            return;
        }
        match self {
            Self::Memory(m) => m.settle(windows, checks, delta),
            Self::Redis(r) => r.settle(windows, checks, delta),
        }
    }
}

/// Reads Redis's password: the file's content, trimmed.
fn read_password(path: &std::path::Path) -> Result<String, StoreError> {
    let error = |reason: String| StoreError::Password {
        path: path.display().to_string(),
        reason,
    };
    let content = regular_file::read(path, 4096).map_err(|e| error(e.to_string()))?;
    let password = String::from_utf8(content).map_err(|_| error("not UTF-8".into()))?;
    let password = password.trim();
    if password.is_empty() {
        return Err(error("the file is empty".into()));
    }
    Ok(password.to_string())
}
