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
use crate::provider_keys::KeySource;
use crate::state::{GatewayState, Snapshot};
use crate::watch::{TextChange, TextFile};

/// The task that watches the config file.
pub struct ConfigWatcher {
    file: TextFile,
    overrides: Overrides,
    state: Arc<GatewayState>,
    key_sources: watch::Sender<Vec<KeySource>>,
}

impl ConfigWatcher {
    pub fn new(
        path: PathBuf,
        overrides: Overrides,
        state: Arc<GatewayState>,
        key_sources: watch::Sender<Vec<KeySource>>,
        poll_interval: Duration,
    ) -> Self {
        Self {
            file: TextFile::new(path, poll_interval),
            overrides,
            state,
            key_sources,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                change = self.file.next_change() => self.apply(change).await,
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn apply(&mut self, change: TextChange) {
        let text = match change {
            TextChange::Changed(text) => text,
            TextChange::Unreadable(e) => {
                tracing::error!(file = %self.file.path().display(), error = %e, "cannot read the config file; keeping the running configuration");
                self.count("failure");
                return;
            }
        };
        let path = self.file.path().to_path_buf();
        let mut parsed = Config::from_text(&text, &path);
        if parsed.is_err() {
            if let Some(again) = self.file.settle(&text).await {
                parsed = Config::from_text(&again, &path);
            }
        }
        let mut config = match parsed {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "configuration reload refused, the running configuration stays: {e}"
                );
                self.count("failure");
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
        self.count("success");
        tracing::info!(file = %path.display(), backends, models, "configuration reloaded");
    }

    fn count(&self, result: &str) {
        self.state
            .metrics
            .config_reloads
            .with_label_values(&[result])
            .inc();
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
