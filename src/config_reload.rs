//! Configuration hot reload: a valid new config file is put in force
//! atomically for new requests, in the processor and, over xDS, in Envoy;
//! an invalid one is refused with a clear log line and the running
//! configuration stays (see `watched_file`).
//!
//! Order matters for "no failed request": Envoy's resources are rendered
//! and encoded first (a config they cannot be made from is refused whole),
//! the key files of the new configuration are read, the new resources are
//! served and Envoy's answer awaited (briefly), and only then is the new
//! snapshot swapped in: a backend added by the edit has its key, its
//! cluster and its route from its first request.
//!
//! Some settings cannot change in a running process (listen addresses, the
//! stream secret, the gateway keys file's path): a reload says so in the
//! log rather than pretending to apply them.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError, Overrides};
use crate::provider_keys::KeySourcesHandle;
use crate::state::{GatewayState, Snapshot};
use crate::watched_file::Reload;
use crate::xds::{EncodeError, ResourceSet, ServedResources};

/// How long a reload waits for Envoy to answer a new version before the
/// processor applies its own part anyway (Envoy answers in milliseconds;
/// one that does not is stuck or gone, and the processor's half must not
/// wait on it).
const ENVOY_PATIENCE: Duration = Duration::from_secs(2);

/// How long Envoy's workers are given to take up a version its main
/// thread accepted.
const ENVOY_WORKERS_CATCH_UP: Duration = Duration::from_millis(100);

/// How long Envoy keeps what the new config drops after the processor
/// stopped routing there.
const REMOVAL_GRACE: Duration = Duration::from_millis(500);

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
    /// Envoy's resources while the change is under way: the new ones, and
    /// those of the old config's backends and chains the new one drops.
    bridge: ResourceSet,
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
        // Rendered again only when the old config has something the new
        // one drops (each render builds a descriptor pool).
        let bridging = bridge(&self.state.snapshot().config, &config);
        let bridge = if bridging == config {
            envoy.clone()
        } else {
            self.envoy.render(&bridging)?
        };
        Ok(NewConfig {
            config,
            envoy,
            bridge,
        })
    }

    async fn apply(&mut self, new: NewConfig) {
        let NewConfig {
            config,
            envoy,
            bridge,
        } = new;
        let old = self.state.snapshot();
        warn_about_restart_needs(&old.config, &config);
        let snapshot = Snapshot::new(config);
        let (models, backends) = (snapshot.config.models.len(), snapshot.config.backends.len());
        // The new config's keys are read before any request is routed by
        // it; a backend it drops keeps its key a while for the requests
        // routed by the old one (`provider_keys::RETIRED_KEY_GRACE`).
        self.key_sources.update(snapshot.key_sources()).await;
        // Make before break. Envoy first gets what both configs route to
        // (the bridge), so whichever config a request is routed by, its
        // cluster and route are there; then the processor routes by the
        // new config; then Envoy drops what only the old one used.
        let bridge_version = self.envoy.publish(bridge);
        let confirmed = match bridge_version {
            Some(version) if self.envoy.followers() > 0 => {
                let answered = self.envoy.answered(version, ENVOY_PATIENCE).await;
                // Envoy answers from its main thread; its workers pick the
                // new routes and clusters up a moment later (measured: a
                // request or two of a steady stream still met the old
                // routes without this pause).
                tokio::time::sleep(ENVOY_WORKERS_CATCH_UP).await;
                answered
            }
            _ => true,
        };
        self.state.spend.reconfigure(&snapshot.config.spend);
        self.state.replace(snapshot);
        self.state.metrics.config_reloaded(true);
        if envoy != self.envoy.latest().resources {
            // Something is removed: requests the old config routed there a
            // moment ago (their route is decided at their body) get there.
            tokio::time::sleep(REMOVAL_GRACE).await;
        }
        let final_version = self.envoy.publish(envoy);
        let followers = self.envoy.followers();
        match final_version.or(bridge_version) {
            Some(version) => {
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
                } else if !confirmed {
                    tracing::warn!(
                        xds_version = version,
                        "Envoy did not answer version {version} within {ENVOY_PATIENCE:?}; the processor applies its part anyway"
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

/// The config Envoy's resources are rendered from while a change is under
/// way: the new one, plus the old one's backends it drops (their clusters
/// and routes) and the old models with fallbacks it does not have (their
/// chains). Only backends and the chains models make reach Envoy's
/// resources, so the new models suffice otherwise; with nothing dropped,
/// the bridge is the new config itself.
fn bridge(old: &Config, new: &Config) -> Config {
    let mut bridge = new.clone();
    for backend in &old.backends {
        if !new.backends.iter().any(|b| b.name == backend.name) {
            bridge.backends.push(backend.clone());
        }
    }
    bridge.models.extend(
        old.models
            .iter()
            .filter(|m| !m.fallbacks.is_empty() && !new.models.contains(m))
            .cloned(),
    );
    bridge
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_text(yaml, Path::new("t.yaml")).unwrap()
    }

    fn names(c: &Config) -> (Vec<&str>, usize) {
        let backends = c.backends.iter().map(|b| b.name.as_str()).collect();
        let chains = c.models.iter().filter(|m| !m.fallbacks.is_empty()).count();
        (backends, chains)
    }

    /// While a change is under way Envoy keeps what the old config routes
    /// to: its backends and its chains, with the new config's.
    #[test]
    fn the_bridge_keeps_what_the_old_config_routes_to() {
        let old = config(
            "backends:\n  - {name: a, url: 'http://10.0.0.1', api_key_file: k}\n  - {name: b, url: 'http://10.0.0.2', api_key_file: k}\nmodels:\n  - {name: m, backend: a, fallbacks: [{backend: b}]}\n",
        );
        let new = config(
            "backends:\n  - {name: a, url: 'http://10.0.0.9', api_key_file: k}\n  - {name: c, url: 'http://10.0.0.3', api_key_file: k}\nmodels:\n  - {name: m, backend: c}\n",
        );
        let cases = [
            // (old, new, backends, chains)
            (&old, &new, vec!["a", "c", "b"], 1),
            (&new, &old, vec!["a", "b", "c"], 1),
            (&old, &old, vec!["a", "b"], 1),
            (&new, &new, vec!["a", "c"], 0),
        ];
        for (i, (from, to, backends, chains)) in cases.into_iter().enumerate() {
            assert_eq!(names(&bridge(from, to)), (backends, chains), "case {i}");
        }
        // A changed backend is the new one; an unchanged config bridges to
        // itself (its resources are not rendered twice).
        assert_eq!(bridge(&old, &new).backends[0].url, new.backends[0].url);
        assert!(bridge(&old, &old) == old && bridge(&new, &new) == new);
    }
}
