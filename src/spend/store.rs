//! Where the counters live: in this process, or in Redis, shared by every
//! replica. Either way one admission is one atomic step (all its checks
//! pass and are charged, or none is charged), and so is one settlement.

use std::sync::Arc;

use super::limits::Check;
use super::memory::MemoryStore;
use super::redis::RedisStore;
use crate::config::{SpendConfig, StoreConfig};
use crate::regular_file;

/// The windows a reservation was charged in, so that its settlement
/// corrects the same ones even after the clock moved on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowIds {
    pub minute: u64,
    pub day: u64,
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

/// One counter correction of a settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    pub check: Check,
    pub delta: i64,
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
    pub fn new(config: &SpendConfig) -> Result<Arc<Self>, StoreError> {
        let password = match (&config.store, &config.password_file) {
            (StoreConfig::Memory, _) | (_, None) => None,
            (_, Some(path)) => Some(read_password(path)?),
        };
        let namespace = &config.namespace;
        Ok(Arc::new(match &config.store {
            StoreConfig::Memory => Self::Memory(MemoryStore::default()),
            StoreConfig::Redis(url) => {
                Self::Redis(Box::new(RedisStore::single(url, namespace, password)?))
            }
            StoreConfig::RedisCluster(nodes) => {
                Self::Redis(Box::new(RedisStore::cluster(nodes, namespace, password)?))
            }
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
            Self::Redis(r) => r.reserve(checks, timeout).await,
        }
    }

    /// Applies `corrections` to the windows of a reservation, all at once.
    pub async fn settle(
        &self,
        windows: WindowIds,
        corrections: &[Correction],
        timeout: std::time::Duration,
    ) -> Result<(), StoreError> {
        match self {
            Self::Memory(m) => {
                m.settle(windows, corrections);
                Ok(())
            }
            Self::Redis(r) => r.settle(windows, corrections, timeout).await,
        }
    }

    /// Whether settling needs a round trip (worth a task of its own).
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Redis(_))
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
