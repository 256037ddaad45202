//! The two bootstraps `envoy-config` prints: dynamic (the processor serves
//! the rest over xDS) and static (everything inline, no xDS).

use serde_json::{json, Value};

use super::{
    clusters, processor_grpc_service, socket_address, stream_secret, EnvoyResources, RenderError,
    RouteSource, EXTPROC_CLUSTER, XDS_CLUSTER,
};
use crate::config::Config;

const HEADER: &str =
    "# Envoy bootstrap for ai-gateway-extproc, rendered by `ai-gateway-extproc envoy-config`.\n\
                      # Do not edit: change the gateway config and render again.\n";

/// The bootstrap for a processor that serves Envoy's resources over xDS:
/// only the two ways to reach the processor are static. Envoy asks for the
/// rest on one aggregated stream (ADS), so clusters arrive before the
/// routes that use them.
pub fn render_dynamic(config: &Config) -> Result<String, RenderError> {
    let secret = stream_secret(config)?;
    let mut ads = processor_grpc_service(XDS_CLUSTER, secret.as_deref());
    // Envoy started before the processor retries the stream this often
    // (its default backs off to 30 s): serving within a second of the
    // processor being up, and again within a second of its restart.
    ads["envoy_grpc"]["retry_policy"] = json!({
        "retry_back_off": {"base_interval": "0.1s", "max_interval": "0.5s"},
    });
    let from_ads = json!({"ads": {}, "resource_api_version": "V3"});
    let mut bootstrap = json!({
        "node": node(),
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [ads],
            },
            "cds_config": from_ads,
            "lds_config": from_ads,
        },
        "static_resources": {
            "clusters": [
                clusters::processor(config, EXTPROC_CLUSTER),
                clusters::processor(config, XDS_CLUSTER),
            ],
        },
    });
    with_admin(&mut bootstrap, config);
    Ok(format!("{HEADER}{}", serde_yaml_ng::to_string(&bootstrap)?))
}

/// The bootstrap with every resource inline: no xDS; a change to Envoy's
/// half of the config needs a new render and an Envoy restart.
pub fn render_static(config: &Config) -> Result<String, RenderError> {
    let secret = stream_secret(config)?;
    let resources = EnvoyResources::new(config, secret.as_deref(), RouteSource::Inline);
    let mut clusters = vec![clusters::processor(config, EXTPROC_CLUSTER)];
    clusters.extend(resources.clusters);
    let mut bootstrap = json!({
        "node": node(),
        "static_resources": {
            "listeners": [resources.listener],
            "clusters": clusters,
        },
    });
    with_admin(&mut bootstrap, config);
    Ok(format!("{HEADER}{}", serde_yaml_ng::to_string(&bootstrap)?))
}

fn node() -> Value {
    json!({"id": "ai-gateway", "cluster": "ai-gateway"})
}

fn with_admin(bootstrap: &mut Value, config: &Config) {
    if let Some(admin) = config.envoy.admin_listen {
        bootstrap["admin"] = json!({"address": socket_address(admin)});
    }
}
