//! Configuration hot reload: a valid new config file is put in force
//! atomically for new requests, in the processor and, over xDS, in Envoy;
//! an invalid one is refused with a clear log line and the running
//! configuration stays (see `watched_file`).
//!
//! Order matters for "no failed request": the key files of the new
//! configuration are read first, Envoy's resources are rendered and
//! encoded (a config they cannot be made from is refused whole), and only
//! then is the new snapshot swapped in and the new resources served.
//!
//! Some settings cannot change in a running process (listen addresses, the
//! stream secret, the gateway keys file's path): a reload says so in the
//! log rather than pretending to apply them.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigError, Overrides};
use crate::provider_keys::KeySourcesHandle;
use crate::state::{GatewayState, Snapshot};
use crate::watched_file::Reload;
use crate::xds::{EncodeError, ResourceSet, ServedResources};

/// Puts new versions of the config file in force.
pub struct ConfigReload {
    pub overrides: Overrides,
    pub state: Arc<GatewayState>,
    pub key_sources: KeySourcesHandle,
    pub envoy: Arc<ServedResources>,
}

/// Why a new version of the config file is refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot make Envoy's resources from it (a defect: please report it): {0}")]
    Envoy(#[from] EncodeError),
}

/// A new config and Envoy's resources for it.
pub struct NewConfig {
    config: Config,
    envoy: ResourceSet,
}

impl fmt::Debug for NewConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewConfig")
    }
}

impl Reload for ConfigReload {
    const WHAT: &'static str = "configuration";
    type Parsed = NewConfig;
    type Error = ReloadError;

    fn parse(&self, path: &Path, text: &str) -> Result<NewConfig, ReloadError> {
        let config = self.overrides.apply(Config::from_text(text, path)?, path)?;
        let envoy = self.envoy.render(&config)?;
        Ok(NewConfig { config, envoy })
    }

    async fn apply(&mut self, new: NewConfig) {
        let NewConfig { config, envoy } = new;
        let old = self.state.snapshot();
        warn_about_restart_needs(&old.config, &config);
        let snapshot = Snapshot::new(config);
        let (models, backends) = (snapshot.config.models.len(), snapshot.config.backends.len());
        self.key_sources.update(snapshot.key_sources()).await;
        self.state.spend.reconfigure(&snapshot.config.spend);
        self.state.replace(snapshot);
        self.state.metrics.config_reloaded(true);
        match self.envoy.publish(envoy) {
            Some(version) => {
                let followers = self.envoy.followers();
                tracing::info!(
                    backends,
                    models,
                    xds_version = version,
                    envoys = followers,
                    "configuration reloaded; Envoy's part served as version {version}"
                );
                if followers == 0 {
                    tracing::warn!(
                        "the new configuration changes Envoy's part, and no Envoy follows over xDS now: \
                         an Envoy on a static bootstrap (`envoy-config --static`) needs it rendered again and a restart"
                    );
                }
            }
            None => tracing::info!(
                backends,
                models,
                "configuration reloaded; Envoy's part unchanged"
            ),
        }
    }

    fn refused(&mut self) {
        self.state.metrics.config_reloaded(false);
    }
}

fn warn_about_restart_needs(old: &Config, new: &Config) {
    let (was, is) = (&old.extproc, &new.extproc);
    if was.listen != is.listen || old.admin.listen != new.admin.listen {
        tracing::warn!(
            "listen addresses changed in the config file; they apply at the next restart"
        );
    }
    if was.secret_file != is.secret_file || was.tls != is.tls || was.socket_mode != is.socket_mode {
        tracing::warn!("extproc's secret_file, tls or socket_mode changed in the config file; they apply at the next restart of the processor (and of Envoy, whose bootstrap carries them)");
    }
    if old.envoy.admin_listen != new.envoy.admin_listen {
        tracing::warn!("envoy.admin_listen changed in the config file; it lives in Envoy's bootstrap: render it again (`envoy-config`) and restart Envoy");
    }
    if old.client_keys != new.client_keys {
        tracing::warn!("client_keys changed in the config file; it applies at the next restart (the keys file itself reloads live)");
    }
}
