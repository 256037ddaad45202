//! The clusters: one per backend, named after it, and one per fallback
//! chain; and the processor's own, in the bootstrap.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::{dialable, duration, names, processor_grpc_service, socket_address, EXTPROC_CLUSTER};
use crate::config::{BackendConfig, Config, ListenAddr, RetryConfig};
use crate::extproc::chains::REQUEST_ID_HEADER;
use crate::extproc::report::METADATA_NAMESPACE;
use crate::extproc::{ATTEMPT_PASS, BACKEND_ATTRIBUTE, CONTENT_LENGTH_FIELD, PASS_HEADER};
use crate::routes::chain_name;

/// A chain's cluster: Envoy's aggregate cluster over its backends' own
/// clusters, each backend one priority level, so a retry that skips the
/// priorities already tried goes to the next backend in order, and a
/// backend whose host was ejected is passed over at once. Its upstream
/// filters run once per attempt: the attempt pass sets the key, path and
/// body of the attempt's backend, then `content-length` is set from what
/// it measured, then the codec sends it.
pub(super) fn chain(config: &Config, chain: &[&BackendConfig], secret: Option<&str>) -> Value {
    let name = chain_name(names(chain));
    let mut service = processor_grpc_service(EXTPROC_CLUSTER, secret);
    let metadata = service
        .as_object_mut()
        .map(|s| s.entry("initial_metadata").or_insert_with(|| json!([])));
    if let Some(Value::Array(entries)) = metadata {
        entries.push(json!({"key": PASS_HEADER, "value": ATTEMPT_PASS}));
    }
    let attempt_filter = json!({
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": service,
            "failure_mode_allow": false,
            "message_timeout": duration(config.message_timeout()),
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SEND",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            "request_attributes": [BACKEND_ATTRIBUTE],
            "forward_rules": {"allowed_headers": {"patterns": [
                {"exact": REQUEST_ID_HEADER},
                {"exact": ":status"},
            ]}},
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        },
    });
    let content_length = json!({
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"append": {
                "header": {
                    "key": "content-length",
                    "value": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:{CONTENT_LENGTH_FIELD})%"),
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }}]},
        },
    });
    let codec = json!({
        "name": "envoy.filters.http.upstream_codec",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
    });
    let mut options = http_protocol_options(explicit(json!({"http_protocol_options": {}})));
    options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"] =
        json!([attempt_filter, content_length, codec]);
    json!({
        "name": name,
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": names(chain),
            },
        },
        "typed_extension_protocol_options": options,
        // Envoy allows 3 retries in flight per cluster by default: past
        // that, a throttled request is not retried and its 429 reaches the
        // client (measured: most requests of a burst of 64). A retry budget
        // does not help here: it is a share of the requests active on this
        // cluster, and an aggregate cluster's requests are counted on its
        // backends' clusters. A chain's retries are bounded per request
        // already (each backend once), so retries get as much room as
        // requests.
        "circuit_breakers": concurrency(config.limits.max_concurrent_requests),
    })
}

/// Envoy's circuit breakers, opened to `n` requests at once (its default,
/// 1,024 per cluster, answered past it with 500 or 503; measured with
/// 5,000 streams: 1,024 served, the rest refused).
fn concurrency(n: u32) -> Value {
    json!({"thresholds": [{
        "max_connections": n,
        "max_pending_requests": n,
        "max_requests": n,
        "max_retries": n,
    }]})
}

/// A backend's cluster.
pub(super) fn backend(
    backend: &BackendConfig,
    chained: Option<&RetryConfig>,
    max_concurrent: u32,
) -> Value {
    let url = &backend.url;
    let ip = url.host.parse::<IpAddr>().ok();
    let mut cluster = json!({
        "name": backend.name,
        // A provider's API host resolves to many changing addresses: Envoy
        // should use what DNS says at connect time, not balance over all.
        "type": if ip.is_some() { "STATIC" } else { "LOGICAL_DNS" },
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": duration(backend.connect_timeout),
        "load_assignment": {
            "cluster_name": backend.name,
            "endpoints": [{"lb_endpoints": [{
                "endpoint": {
                    "address": {"socket_address": {"address": url.host, "port_value": url.port}},
                    // The Host of a chain's attempts (`auto_host_rewrite`).
                    "hostname": url.authority(),
                },
                // Tells the attempt pass which backend an attempt went to.
                "metadata": {"filter_metadata": {METADATA_NAMESPACE: {"backend": backend.name}}},
            }]}],
        },
        // Over TLS, HTTP/2 when the provider offers it by ALPN, else
        // HTTP/1.1; in the clear, HTTP/1.1 (no ALPN to ask with).
        "circuit_breakers": concurrency(max_concurrent),
        "typed_extension_protocol_options": http_protocol_options(if url.tls {
            json!({"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}})
        } else {
            explicit(json!({"http_protocol_options": {}}))
        }),
    });
    if let Some(retry) = chained {
        // A backend that keeps failing is left out of its chains for a
        // while (longer each time), then tried again; its one host may be
        // ejected (the next backend takes over).
        cluster["outlier_detection"] = json!({
            "consecutive_5xx": retry.eject_after,
            "consecutive_gateway_failure": retry.eject_after,
            "base_ejection_time": duration(retry.ejection_time),
            "max_ejection_time": "300s",
            "max_ejection_percent": 100,
            "interval": "1s",
        });
    }
    if url.tls {
        // Envoy refuses to check names without an explicit trust store, so
        // the CA bundle is named as a file rather than `system_root_certs`.
        let mut validation =
            json!({"trusted_ca": {"filename": backend.ca_file.display().to_string()}});
        let mut tls = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        });
        match ip {
            Some(_) => {
                validation["match_typed_subject_alt_names"] =
                    json!([{"san_type": "IP_ADDRESS", "matcher": {"exact": url.host}}]);
            }
            None => {
                tls["sni"] = json!(url.host);
                validation["match_typed_subject_alt_names"] =
                    json!([{"san_type": "DNS", "matcher": {"exact": url.host}}]);
            }
        }
        tls["common_tls_context"] = json!({"validation_context": validation});
        cluster["transport_socket"] =
            json!({"name": "envoy.transport_sockets.tls", "typed_config": tls});
    }
    cluster
}

/// A cluster reaching the processor (ext_proc or xDS): its socket, HTTP/2,
/// mutual TLS when configured.
pub(super) fn processor(config: &Config, name: &str) -> Value {
    let address = match &config.extproc.listen {
        ListenAddr::Unix(path) => json!({"pipe": {"path": path.display().to_string()}}),
        ListenAddr::Tcp(addr) => socket_address(dialable(*addr)),
    };
    let mut cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        // A buffered request body travels to the processor in one gRPC
        // message: the connection must be allowed to hold it.
        "per_connection_buffer_limit_bytes": config.limits.max_request_body_bytes + 64 * 1024,
        // Each request holds one stream to the processor, and on a chain
        // one more for the attempt under way.
        "circuit_breakers": concurrency(config.limits.max_concurrent_requests.saturating_mul(2)),
        "typed_extension_protocol_options": http_protocol_options(explicit(json!({"http2_protocol_options": {}}))),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    });
    if let Some(tls) = &config.extproc.tls {
        // Mutual TLS: Envoy presents its certificate and accepts only the
        // processor's, both signed by the one CA.
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls.server_name,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{
                        "certificate_chain": {"filename": tls.envoy_cert_file.display().to_string()},
                        "private_key": {"filename": tls.envoy_key_file.display().to_string()},
                    }],
                    "validation_context": {
                        "trusted_ca": {"filename": tls.ca_file.display().to_string()},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls.server_name}}],
                    },
                },
            },
        });
    }
    cluster
}

/// Upstream HTTP options; `protocol` is how the protocol is chosen:
/// `explicit_http_config` or `auto_config`.
fn http_protocol_options(protocol: Value) -> Value {
    let mut options = json!({
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    });
    if let (Some(options), Value::Object(protocol)) = (options.as_object_mut(), protocol) {
        options.extend(protocol);
    }
    json!({ "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options })
}

/// One HTTP version, chosen here.
fn explicit(version: Value) -> Value {
    json!({ "explicit_http_config": version })
}
