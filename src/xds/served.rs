//! What the processor serves Envoy over xDS: the newest version of the
//! resources, and what Envoy made of it.
//!
//! One writer (the config reloader) publishes; every ADS stream follows the
//! newest version through a watch channel and reports back what its Envoy
//! accepted or rejected. A version Envoy rejected is not handed to an Envoy
//! that connects later (it would start with nothing): that one gets the
//! last version an Envoy accepted, until a newer config comes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use super::encode::EncodeError;
use super::resources::{ResourceSet, ResourceType, Snapshot};
use crate::config::Config;
use crate::metrics::Metrics;

/// Envoy's error messages quote the rejected resource; at most this much
/// of one is logged.
const MAX_REASON_CHARS: usize = 2000;

/// The resources served to Envoy, shared by the reloader and the streams.
pub struct ServedResources {
    latest: watch::Sender<Arc<Snapshot>>,
    /// The newest version an Envoy accepted whole.
    accepted: ArcSwap<Snapshot>,
    /// The newest version an Envoy rejected (0: none).
    rejected: AtomicU64,
    /// The secret Envoy presents to the processor, which the listener
    /// carries; kept to render with, and to keep it out of log lines.
    secret: Option<String>,
    metrics: Arc<Metrics>,
    /// The newest version each following Envoy has answered (accepted or
    /// rejected), by stream; a short lock, never held across an await.
    answered: Mutex<HashMap<u64, u64>>,
    answers: Notify,
    next_stream: AtomicU64,
}

/// A stream's place among the followers; leaving it (the stream ended, or
/// its task was dropped) takes the stream out.
pub(super) struct Following {
    served: Arc<ServedResources>,
    id: u64,
}

impl Following {
    /// This Envoy answered everything it was sent of `version`.
    pub(super) fn answered(&self, version: u64) {
        self.served.answered_by(self.id, version);
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.served.metrics.xds_stream(-1);
        self.served
            .answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.served.answers.notify_waiters();
    }
}

impl ServedResources {
    /// Serves `config`'s resources as version 1.
    pub fn new(
        config: &Config,
        secret: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EncodeError> {
        let first = Arc::new(Snapshot {
            version: 1,
            resources: ResourceSet::render(config, secret.as_deref())?,
        });
        metrics.xds_served(1);
        Ok(Self {
            latest: watch::Sender::new(Arc::clone(&first)),
            accepted: ArcSwap::new(first),
            rejected: AtomicU64::new(0),
            secret,
            metrics,
            answered: Mutex::new(HashMap::new()),
            answers: Notify::new(),
            next_stream: AtomicU64::new(1),
        })
    }

    /// Renders `config`'s resources, without serving them yet: a config
    /// whose resources cannot be rendered is refused whole.
    pub fn render(&self, config: &Config) -> Result<ResourceSet, EncodeError> {
        ResourceSet::render(config, self.secret.as_deref())
    }

    /// Serves `resources` as a new version, unless they are what is
    /// served already (a change that only concerns the processor). Returns
    /// the new version.
    pub fn publish(&self, resources: ResourceSet) -> Option<u64> {
        let mut published = None;
        self.latest.send_if_modified(|current| {
            if current.resources == resources {
                return false;
            }
            let version = current.version + 1;
            *current = Arc::new(Snapshot { version, resources });
            published = Some(version);
            true
        });
        if let Some(version) = published {
            self.metrics.xds_served(version);
        }
        published
    }

    /// The newest version served.
    pub fn latest(&self) -> Arc<Snapshot> {
        Arc::clone(&self.latest.borrow())
    }

    /// Envoys following now.
    pub fn followers(&self) -> usize {
        self.answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Waits until every following Envoy answered `version` (accepted or
    /// rejected it), at most `patience`; false if one did not. A config
    /// change reaches Envoy before the processor routes by it, so a model
    /// moved to a new backend never meets an Envoy without its cluster.
    pub async fn answered(&self, version: u64, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.answers.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let all = self
                .answered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .all(|v| *v >= version);
            if all {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// A stream starts following.
    pub(super) fn follower(self: &Arc<Self>) -> Following {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, 0);
        self.metrics.xds_stream(1);
        Following {
            served: Arc::clone(self),
            id,
        }
    }

    fn answered_by(&self, stream: u64, version: u64) {
        let mut answered = self.answered.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = answered.get_mut(&stream) {
            if *v < version {
                *v = version;
                drop(answered);
                self.answers.notify_waiters();
            }
        }
    }

    /// What a stream starting now serves first, and the channel of the
    /// versions that follow.
    pub(super) fn follow(&self) -> (Arc<Snapshot>, watch::Receiver<Arc<Snapshot>>) {
        let updates = self.latest.subscribe();
        let latest = Arc::clone(&updates.borrow());
        let first = if latest.version == self.rejected.load(Ordering::Relaxed) {
            self.accepted.load_full()
        } else {
            latest
        };
        (first, updates)
    }

    /// An Envoy accepted every resource of `snapshot`.
    pub(super) fn accepted(&self, snapshot: &Arc<Snapshot>, node: &str) {
        let newer = self.accepted.load().version < snapshot.version;
        if newer {
            self.accepted.store(Arc::clone(snapshot));
        }
        self.metrics.xds_acked(snapshot.version);
        tracing::info!(
            node,
            version = snapshot.version,
            clusters = %snapshot.resources.names(ResourceType::Cluster).collect::<Vec<_>>().join(","),
            "Envoy applied the configuration"
        );
    }

    /// An Envoy rejected the `ty` resources of `version`, saying `reason`.
    pub(super) fn rejected(&self, version: u64, ty: ResourceType, node: &str, reason: &str) {
        self.rejected.fetch_max(version, Ordering::Relaxed);
        self.metrics.xds_nacked();
        tracing::warn!(
            node,
            version,
            resources = ty.plural(),
            reason = %self.redacted(reason),
            "Envoy rejected the new configuration and keeps the last one it accepted; fix the config file"
        );
    }

    /// Envoy's reason, without the stream secret (Envoy may quote the
    /// listener it rejected), and bounded.
    fn redacted(&self, reason: &str) -> String {
        let mut text = match &self.secret {
            Some(secret) => reason.replace(secret.as_str(), "[redacted]"),
            None => reason.to_string(),
        };
        if let Some((cut, _)) = text.char_indices().nth(MAX_REASON_CHARS) {
            text.truncate(cut);
            text.push_str("...");
        }
        text
    }

    #[cfg(test)]
    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
