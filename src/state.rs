//! The state the data path reads: an immutable [`Snapshot`] of the active
//! configuration, swapped whole on reload, and the key store.
//!
//! A request loads the snapshot once, at its first message, and keeps it to
//! the end, so a reload in the middle of a request never mixes two configs.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::client_keys::ClientKeys;
use crate::config::Config;
use crate::extproc::chains::ChainRequests;
use crate::metrics::Metrics;
use crate::openai::models;
use crate::provider_keys::{sources_of, KeySource, ProviderKeys};
use crate::routes::RouteTable;
use crate::spend::Spend;

/// Everything derived from one configuration that requests need.
pub struct Snapshot {
    pub config: Config,
    pub routes: RouteTable,
    pub max_request_body_bytes: usize,
    /// The gateway's own `GET /v1/models` answer, rendered once.
    pub model_list_json: Vec<u8>,
}

impl Snapshot {
    pub fn new(config: Config) -> Self {
        let routes = RouteTable::new(&config);
        let model_list_json = models::list_json(routes.listed_models());
        Self {
            max_request_body_bytes: config.max_request_body_bytes(),
            routes,
            model_list_json,
            config,
        }
    }

    /// The key files of this configuration's backends.
    pub fn key_sources(&self) -> Vec<KeySource> {
        sources_of(
            self.config
                .backends
                .iter()
                .map(|b| (b.name.as_str(), b.api_key_file.as_path())),
        )
    }
}

/// Shared by the ext_proc service, the admin server and the watchers.
pub struct GatewayState {
    snapshot: ArcSwap<Snapshot>,
    pub provider_keys: Arc<ProviderKeys>,
    pub metrics: Arc<Metrics>,
    /// Gateway keys clients must present, when the config asks for them.
    pub client_keys: Arc<ClientKeys>,
    /// Budgets and rate limits.
    pub spend: Spend,
    /// Requests in flight on fallback chains, for their attempts.
    pub chains: ChainRequests,
}

impl GatewayState {
    pub fn new(
        snapshot: Snapshot,
        provider_keys: Arc<ProviderKeys>,
        metrics: Arc<Metrics>,
        client_keys: Arc<ClientKeys>,
        spend: Spend,
    ) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            provider_keys,
            metrics,
            client_keys,
            spend,
            chains: ChainRequests::default(),
        }
    }

    /// The configuration in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Puts a new configuration in force for new requests.
    pub fn replace(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Backends of the active configuration that have no key loaded.
    pub fn backends_without_key(&self) -> Vec<String> {
        let snapshot = self.snapshot.load();
        snapshot
            .routes
            .backends()
            .iter()
            .filter(|b| !self.provider_keys.has(&b.name))
            .map(|b| b.name.to_string())
            .collect()
    }
}

/// A gateway's state from a config's text and its backends' keys, for the
/// tests of the parts that serve requests.
#[cfg(test)]
pub fn for_tests(config: &str, keys: &[(&str, &str)]) -> Arc<GatewayState> {
    let config = Config::from_text(config, std::path::Path::new("t.yaml")).unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let spend = Spend::new(&config.spend, Arc::clone(&metrics)).unwrap();
    Arc::new(GatewayState::new(
        Snapshot::new(config),
        Arc::new(ProviderKeys::from_keys(keys.iter().copied())),
        metrics,
        Arc::new(ClientKeys::default()),
        spend,
    ))
}
