//! Configuration hot reload: when the config file changes, a valid new file
//! is put in force atomically for new requests; an invalid one is refused
//! with a clear log line and the running configuration stays.
//!
//! Some settings cannot change in a running process (listen addresses), and
//! some live in Envoy's bootstrap (backends' clusters, the body limit): a
//! reload says so in the log rather than pretending to apply them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, Overrides};
use crate::envoy_config;
use crate::secret::KeySource;
use crate::state::{GatewayState, Snapshot};
use crate::watch::FileWatcher;

/// The task that watches the config file.
pub struct ConfigWatcher {
    path: PathBuf,
    overrides: Overrides,
    state: Arc<GatewayState>,
    key_sources: watch::Sender<Vec<KeySource>>,
    poll_interval: Duration,
    /// The file's content when last read, to skip re-parsing an unchanged file.
    last_text: Option<String>,
}

impl ConfigWatcher {
    pub fn new(
        path: PathBuf,
        overrides: Overrides,
        state: Arc<GatewayState>,
        key_sources: watch::Sender<Vec<KeySource>>,
        poll_interval: Duration,
    ) -> Self {
        let last_text = std::fs::read_to_string(&path).ok();
        Self {
            path,
            overrides,
            state,
            key_sources,
            poll_interval,
            last_text,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut watcher = FileWatcher::new([self.path.as_path()], self.poll_interval);
        loop {
            tokio::select! {
                _ = watcher.changed() => self.reload().await,
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn reload(&mut self) {
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                if self.last_text.take().is_some() {
                    tracing::error!(file = %self.path.display(), error = %e, "cannot read the config file; keeping the running configuration");
                    self.state
                        .metrics
                        .config_reloads
                        .with_label_values(&["failure"])
                        .inc();
                }
                return;
            }
        };
        if self.last_text.as_deref() == Some(text.as_str()) {
            return;
        }
        self.last_text = Some(text.clone());
        let mut parsed = Config::from_text(&text, &self.path);
        if parsed.is_err() {
            // An editor or `cp` writing in place shows a truncated file for
            // a moment: look again before calling the file invalid.
            tokio::time::sleep(crate::watch::TRANSIENT_RECHECK).await;
            if let Ok(again) = tokio::fs::read_to_string(&self.path).await {
                if again != text {
                    parsed = Config::from_text(&again, &self.path);
                    self.last_text = Some(again);
                }
            }
        }
        let mut config = match parsed {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "configuration reload refused, the running configuration stays: {e}"
                );
                self.state
                    .metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                return;
            }
        };
        self.overrides.apply(&mut config);

        let old = self.state.snapshot();
        warn_about_restart_needs(&old.config, &config);
        let snapshot = Snapshot::new(config);
        let sources = snapshot.key_sources();
        let models = snapshot.config.models.len();
        let backends = snapshot.config.backends.len();
        self.state.replace(snapshot);
        self.key_sources.send_replace(sources);
        self.state
            .metrics
            .config_reloads
            .with_label_values(&["success"])
            .inc();
        tracing::info!(file = %self.path.display(), backends, models, "configuration reloaded");
    }
}

fn warn_about_restart_needs(old: &Config, new: &Config) {
    if old.extproc.listen != new.extproc.listen || old.admin.listen != new.admin.listen {
        tracing::warn!(
            "listen addresses changed in the config file; they apply at the next restart"
        );
    }
    if old.client_keys != new.client_keys {
        tracing::warn!("client_keys changed in the config file; it applies at the next restart (the keys file itself reloads live)");
    }
    let rendered = |c: &Config| envoy_config::render(c).ok();
    if rendered(old) != rendered(new) {
        tracing::warn!(
            "the new configuration changes Envoy's bootstrap (backends, timeouts, limits or listeners): \
             render it with `ai-gateway-extproc envoy-config` and restart Envoy for those parts to apply"
        );
    }
}
