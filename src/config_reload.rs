//! Configuration hot reload: a valid new config file is put in force
//! atomically for new requests; an invalid one is refused with a clear log
//! line and the running configuration stays (see `watched_file`).
//!
//! Order matters for "no failed request": the key files of the new
//! configuration are read first, and only then is the new snapshot swapped
//! in, so a backend added by the edit has its key from its first request.
//!
//! Some settings cannot change in a running process (listen addresses), and
//! some live in Envoy's bootstrap (backends' clusters, the body limit): a
//! reload says so in the log rather than pretending to apply them.

use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigError, Overrides};
use crate::envoy_config;
use crate::provider_keys::KeySourcesHandle;
use crate::state::{GatewayState, Snapshot};
use crate::watched_file::Reload;

/// Puts new versions of the config file in force.
pub struct ConfigReload {
    pub overrides: Overrides,
    pub state: Arc<GatewayState>,
    pub key_sources: KeySourcesHandle,
}

impl Reload for ConfigReload {
    const WHAT: &'static str = "configuration";
    type Parsed = Config;
    type Error = ConfigError;

    fn parse(&self, path: &Path, text: &str) -> Result<Config, ConfigError> {
        self.overrides.apply(Config::from_text(text, path)?, path)
    }

    async fn apply(&mut self, config: Config) {
        let old = self.state.snapshot();
        warn_about_restart_needs(&old.config, &config);
        let snapshot = Snapshot::new(config);
        let (models, backends) = (snapshot.config.models.len(), snapshot.config.backends.len());
        self.key_sources.update(snapshot.key_sources()).await;
        self.state.spend.reconfigure(&snapshot.config.spend);
        self.state.replace(snapshot);
        self.state.metrics.config_reloaded(true);
        tracing::info!(backends, models, "configuration reloaded");
    }

    fn refused(&mut self) {
        self.state.metrics.config_reloaded(false);
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
            "the new configuration changes Envoy's bootstrap (backends, fallback chains, retries, timeouts, limits or listeners): \
             render it with `ai-gateway-extproc envoy-config` and restart Envoy for those parts to apply"
        );
    }
}
