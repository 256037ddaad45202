//! Envoy's half of the gateway configuration, rendered from the same file
//! the processor reads, so Envoy and the processor can never disagree.
//!
//! Two ways to hand it to Envoy (`bootstrap`):
//! - dynamic (the default): a small bootstrap with the processor's two
//!   clusters (ext_proc and xDS, both its socket), and everything else
//!   served live over xDS by the processor (`crate::xds`) from the watched
//!   config: an edit applies to both halves at once;
//! - static (`envoy-config --static`): everything in the bootstrap; an edit
//!   to Envoy's half needs a new render and an Envoy restart.
//!
//! Either way the resources are the same JSON (Envoy's proto3 JSON form),
//! built here once; what they do, and why:
//! - one listener (`listener`) whose buffer limit is the gateway's body
//!   limit: in BUFFERED mode Envoy holds the whole request body, and
//!   answers 413 past the limit; the ext_proc filter fails closed; local
//!   reply mappers make Envoy's own errors OpenAI-shaped JSON;
//! - one route per backend (`routes`), matching the routing header the
//!   processor sets (re-matched thanks to `clear_route_cache`), with the
//!   backend's Host; a last route answers 404 for anything the processor
//!   did not route;
//! - one cluster per backend (`clusters`), named after it (TLS with SNI and
//!   a name check for `https`, HTTP/2 when the provider offers it by ALPN),
//!   one for the processor, and per fallback chain an aggregate cluster
//!   over its backends' clusters whose upstream filters run the attempt
//!   pass once per attempt, with a route whose retries skip the priorities
//!   already tried, so each backend is tried at most once.

mod bootstrap;
mod clusters;
mod listener;
mod routes;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{BackendConfig, Config, ListenAddr};
use crate::extproc::stream_auth::{read_secret, SecretError};

pub use bootstrap::{render_dynamic, render_static};

/// The Envoy cluster of the processor's ext_proc service.
pub const EXTPROC_CLUSTER: &str = "ai-gateway-extproc";

/// The Envoy cluster of the processor's xDS service: the same socket as
/// [`EXTPROC_CLUSTER`], its own cluster so the one long-lived xDS stream
/// neither shares circuit breakers nor statistics with the requests.
pub const XDS_CLUSTER: &str = "ai-gateway-xds";

/// The one listener's name, and its route configuration's.
pub const LISTENER_NAME: &str = "ai-gateway";
pub const ROUTE_CONFIG_NAME: &str = "ai-gateway";

/// Why a configuration cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot serialize the bootstrap: {0}")]
    Serialize(#[from] serde_yaml_ng::Error),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Envoy's resources for one configuration, in Envoy's JSON form.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyResources {
    /// The listener; its HTTP connection manager takes its routes from
    /// `route_config`, inline (static) or over RDS (dynamic).
    pub listener: Value,
    pub route_config: Value,
    /// Every backend's cluster, then every chain's.
    pub clusters: Vec<Value>,
}

/// Where the listener finds its routes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RouteSource {
    /// In the listener itself (the static bootstrap).
    Inline,
    /// Over RDS, from the processor (the dynamic bootstrap).
    Xds,
}

impl EnvoyResources {
    /// The resources for `config`. `secret` is what Envoy presents on the
    /// processor's streams when it listens on TCP with a shared secret:
    /// the one the running processor checks, not the file's current
    /// content (a changed secret file applies at the next restart).
    pub fn new(config: &Config, secret: Option<&str>, routes_from: RouteSource) -> Self {
        let chains = chains(config);
        let mut clusters = Vec::with_capacity(config.backends.len() + chains.len());
        let mut route_list = Vec::with_capacity(config.backends.len() + chains.len() + 1);
        for backend in &config.backends {
            let chained = chains
                .iter()
                .any(|c| c.iter().any(|b| b.name == backend.name));
            clusters.push(clusters::backend(
                backend,
                chained.then_some(&config.retry),
                config.limits.max_concurrent_requests,
            ));
            route_list.push(routes::backend(backend));
        }
        for chain in &chains {
            clusters.push(clusters::chain(config, chain, secret));
            route_list.push(routes::chain(config, chain));
        }
        // In name order, whatever the config's order: the same backends
        // render the same resources, so a reload that only reorders (or
        // a change that keeps a removed backend a moment longer) is no
        // change to Envoy. The routes match distinct header values, so
        // their order means nothing but the catch-all's, last.
        clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        route_list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        route_list.push(routes::unrouted());
        let route_config = json!({
            "name": ROUTE_CONFIG_NAME,
            "virtual_hosts": [{
                "name": ROUTE_CONFIG_NAME,
                "domains": ["*"],
                "routes": route_list,
            }],
        });
        let listener = listener::listener(config, secret, &route_config, routes_from);
        Self {
            listener,
            route_config,
            clusters,
        }
    }
}

/// The secret Envoy must present on the processor's streams, read from
/// `extproc.secret_file` when the processor listens on TCP with one.
pub fn stream_secret(config: &Config) -> Result<Option<String>, SecretError> {
    match (&config.extproc.listen, &config.extproc.secret_file) {
        (ListenAddr::Tcp(_), Some(file)) => read_secret(file).map(Some),
        _ => Ok(None),
    }
}

/// How Envoy reaches the processor: a cluster, and on TCP with a shared
/// secret, the secret as metadata on every stream.
fn processor_grpc_service(cluster: &str, secret: Option<&str>) -> Value {
    let mut service = json!({"envoy_grpc": {"cluster_name": cluster}});
    if let Some(secret) = secret {
        service["initial_metadata"] = json!([{
            "key": crate::extproc::stream_auth::SECRET_HEADER,
            "value": secret,
        }]);
    }
    service
}

/// Every distinct fallback chain of the configuration: a model's backend,
/// then its fallbacks.
fn chains(config: &Config) -> Vec<Vec<&BackendConfig>> {
    let by_name = |name: &str| config.backends.iter().find(|b| b.name == name);
    let mut chains: Vec<Vec<&BackendConfig>> = Vec::new();
    for model in config.models.iter().filter(|m| !m.fallbacks.is_empty()) {
        let chain: Option<Vec<&BackendConfig>> = std::iter::once(model.backend.as_str())
            .chain(model.fallbacks.iter().map(|f| f.backend.as_str()))
            .map(by_name)
            .collect();
        if let Some(chain) = chain {
            if !chains.iter().any(|c| names(c) == names(&chain)) {
                chains.push(chain);
            }
        }
    }
    chains
}

fn names<'a>(chain: &[&'a BackendConfig]) -> Vec<&'a str> {
    chain.iter().map(|b| b.name.as_str()).collect()
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

/// The processor may listen on the wildcard address; Envoy must dial a
/// concrete one, and it runs beside the processor.
fn dialable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// A protobuf Duration in its JSON form: `"2s"`, `"0.2s"`.
fn duration(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}
