//! The rendering, checked on the JSON it produces.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::extproc::report::METADATA_NAMESPACE;
use crate::extproc::{ATTEMPT_PASS, BACKEND_ATTRIBUTE, PASS_HEADER};

fn config(yaml: &str) -> Config {
    Config::from_text(yaml, Path::new("t.yaml")).unwrap()
}

/// The rendered `forward_rules` let through exactly the headers the
/// processor's own rule says it reads.
#[test]
fn forwarded_headers_match_what_the_processor_reads() {
    let c = config(
        "backends: [{name: b, url: 'http://127.0.0.1:1', api_key_file: k}]\nmodels: [{name: '*', backend: b}]\n",
    );
    let v: Value = serde_yaml_ng::from_str(&render_static(&c).unwrap()).unwrap();
    let filters = &v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"];
    let patterns = filters[0]["typed_config"]["forward_rules"]["allowed_headers"]["patterns"]
        .as_array()
        .unwrap()
        .clone();
    let rendered_allows = |name: &str| {
        patterns.iter().any(|p| {
            p["exact"].as_str() == Some(name)
                || p["prefix"]
                    .as_str()
                    .is_some_and(|pre| name.starts_with(pre))
        })
    };
    for name in [
        ":method",
        ":path",
        ":authority",
        ":status",
        "x-request-id",
        "content-length",
        "content-type",
        "content-encoding",
        "retry-after",
        "user-agent",
        "authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "proxy-authorization",
        "x-ai-eg-backend",
        "x-ai-eg-model",
        "cookie",
        "accept",
    ] {
        assert_eq!(
            rendered_allows(name),
            crate::extproc::headers::is_forwarded(name),
            "{name}"
        );
    }
    assert!(!rendered_allows("user-agent"), "the rules must filter");
}

#[test]
fn tls_backend_gets_sni_and_system_cas() {
    let c = config(
        "backends: [{name: tars, url: 'https://api.router.tetrate.ai', api_key_file: k}]\nmodels: [{name: '*', backend: tars}]\n",
    );
    let v: Value = serde_yaml_ng::from_str(&render_static(&c).unwrap()).unwrap();
    let clusters = v["static_resources"]["clusters"].as_array().unwrap();
    let tars = clusters.iter().find(|c| c["name"] == "tars").unwrap();
    let tls = &tars["transport_socket"]["typed_config"];
    assert_eq!(tls["sni"], "api.router.tetrate.ai");
    // HTTP/2 when the provider offers it by ALPN, HTTP/1.1 otherwise.
    let protocol = &tars["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert!(protocol["auto_config"]["http2_protocol_options"].is_object());
    assert!(protocol["auto_config"]["http_protocol_options"].is_object());
    assert_eq!(
        tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"],
        "/etc/ssl/certs/ca-certificates.crt"
    );
    assert_eq!(
        tars["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"]["port_value"],
        443
    );
    let routes = &v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"];
    assert_eq!(
        routes[0]["route"]["host_rewrite_literal"],
        "api.router.tetrate.ai"
    );
    assert_eq!(
        routes[0]["match"]["headers"][0]["string_match"]["exact"],
        "tars"
    );
    assert_eq!(routes[1]["direct_response"]["status"], 404);
}

#[test]
fn unix_socket_and_wildcard_listen() {
    let c = config(
        "extproc: {listen: 'unix:/run/x.sock'}\nbackends: [{name: a, url: 'http://10.0.0.1:8080/openai', api_key_file: k}]\nmodels: [{name: m, backend: a}]\n",
    );
    let yaml = render_static(&c).unwrap();
    assert!(yaml.contains("path: /run/x.sock"), "{yaml}");
    assert!(yaml.contains("prefix_rewrite: /openai/"), "{yaml}");
    assert!(!yaml.contains("transport_socket"), "{yaml}");
    assert_eq!(
        dialable("0.0.0.0:1063".parse().unwrap()).to_string(),
        "127.0.0.1:1063"
    );
}

/// A chain renders as an aggregate cluster with the attempt pass in
/// its upstream filters, and a route whose retries walk the chain once.
#[test]
fn a_chain_gets_its_cluster_route_and_attempt_pass() {
    let c = config(
        "extproc: {listen: '127.0.0.1:1063', secret_file: /dev/null}\nbackends:\n  - {name: a, url: 'http://10.0.0.1:1', api_key_file: k, request_timeout: 10s}\n  - {name: b, url: 'https://b.example/v1', api_key_file: k, request_timeout: 20s}\n  - {name: c, url: 'http://10.0.0.3', api_key_file: k}\nmodels:\n  - {name: m, backend: a, fallbacks: [{backend: b}]}\n  - {name: n, backend: a, fallbacks: [{backend: b}]}\n  - {name: o, backend: c}\nretry: {retry_on: [429, 503, connect-failure], max_attempts: 5}\n",
    );
    // The secret file cannot be read as a secret: render the parts.
    let chains = chains(&c);
    assert_eq!(chains.len(), 1, "two models, one chain");
    let route = routes::chain(&c, &chains[0]);
    assert_eq!(route["route"]["cluster"], "chain~a~b");
    assert_eq!(
        route["match"]["headers"][0]["string_match"]["exact"],
        "chain~a~b"
    );
    let retry = &route["route"]["retry_policy"];
    assert_eq!(
        retry["retry_on"],
        "retriable-status-codes,connect-failure,refused-stream"
    );
    assert_eq!(retry["retriable_status_codes"], json!([429, 503]));
    assert_eq!(retry["num_retries"], 1, "capped by the chain's length");
    assert_eq!(route["route"]["timeout"], "30s");
    assert_eq!(route["route"]["auto_host_rewrite"], true);

    let open = config(
        "backends:\n  - {name: a, url: 'http://10.0.0.1:1', api_key_file: k}\n  - {name: b, url: 'https://b.example/v1', api_key_file: k}\n  - {name: c, url: 'http://10.0.0.3', api_key_file: k}\nmodels:\n  - {name: m, backend: a, fallbacks: [{backend: b}]}\n  - {name: o, backend: c}\n",
    );
    let v: Value = serde_yaml_ng::from_str(&render_static(&open).unwrap()).unwrap();
    let clusters = v["static_resources"]["clusters"].as_array().unwrap();
    let cluster = |name: &str| clusters.iter().find(|c| c["name"] == name).unwrap();
    let chain = cluster("chain~a~b");
    assert_eq!(
        chain["cluster_type"]["typed_config"]["clusters"],
        json!(["a", "b"])
    );
    let filters = &chain["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"];
    let attempt = &filters[0]["typed_config"];
    assert_eq!(
        attempt["grpc_service"]["initial_metadata"],
        json!([{"key": PASS_HEADER, "value": ATTEMPT_PASS}])
    );
    assert_eq!(attempt["request_attributes"], json!([BACKEND_ATTRIBUTE]));
    assert_eq!(filters[2]["name"], "envoy.filters.http.upstream_codec");
    // Room for more than Envoy's default 1,024 requests at once, and
    // twice that through the processor (a chain's attempt stream).
    let breakers = |name: &str| cluster(name)["circuit_breakers"]["thresholds"][0].clone();
    assert_eq!(breakers("a")["max_requests"], 10_000);
    assert_eq!(breakers("chain~a~b")["max_retries"], 10_000);
    assert_eq!(breakers(EXTPROC_CLUSTER)["max_requests"], 20_000);
    assert_eq!(
        routes_of(&v)[0]["route"]["retry_policy"]["retry_on"],
        "refused-stream"
    );
    // Outlier detection only where a chain can take over.
    assert_eq!(cluster("a")["outlier_detection"]["consecutive_5xx"], 3);
    assert!(cluster("c").get("outlier_detection").is_none());
    let endpoint = &cluster("b")["load_assignment"]["endpoints"][0]["lb_endpoints"][0];
    assert_eq!(endpoint["endpoint"]["hostname"], "b.example");
    assert_eq!(
        endpoint["metadata"]["filter_metadata"][METADATA_NAMESPACE]["backend"],
        "b"
    );
}

fn routes_of(v: &Value) -> &Vec<Value> {
    v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap()
}

#[test]
fn durations() {
    assert_eq!(duration(Duration::from_secs(300)), "300s");
    assert_eq!(duration(Duration::from_millis(200)), "0.2s");
    assert_eq!(duration(Duration::ZERO), "0s");
}

/// The access log's optional fields: the attempts only with chains, the
/// processor's report only with `envoy.usage_metadata`.
#[test]
fn access_log_fields_follow_the_config() {
    let backends = "backends:\n  - {name: a, url: 'http://127.0.0.1:1', api_key_file: k}\n  - {name: b, url: 'http://127.0.0.1:2', api_key_file: k}\n";
    for (extra, attempts, report) in [
        ("models: [{name: '*', backend: a}]\n", false, false),
        ("models: [{name: '*', backend: a, fallbacks: [{backend: b}]}]\n", true, false),
        ("models: [{name: '*', backend: a}]\nenvoy: {usage_metadata: true}\n", false, true),
        ("models: [{name: '*', backend: a, fallbacks: [{backend: b}]}]\nenvoy: {usage_metadata: true}\n", true, true),
    ] {
        let c = config(&format!("{backends}{extra}"));
        let v: Value = serde_yaml_ng::from_str(&render_static(&c).unwrap()).unwrap();
        let fields = &v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"];
        assert!(fields["request_id"].is_string(), "{extra}: {fields}");
        assert_eq!(fields["upstream_attempts"].is_string(), attempts, "{extra}");
        assert_eq!(
            fields["ai_gateway"].as_str(),
            report.then_some("%DYNAMIC_METADATA(io.envoy.ai_gateway)%"),
            "{extra}"
        );
    }
}
