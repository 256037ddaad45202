//! Renders the Envoy bootstrap for a gateway configuration, so Envoy and the
//! processor can never disagree: adding a backend is one edit of the gateway
//! config, and `ai-gateway-extproc envoy-config` re-renders Envoy's side.
//!
//! What the bootstrap does, and why:
//! - one listener whose buffer limit is the gateway's body limit: in
//!   BUFFERED mode Envoy holds the whole request body, and answers 413 past
//!   the limit;
//! - the ext_proc filter, failing closed (`failure_mode_allow: false`): if
//!   the processor is down, requests get a 500 and nothing reaches a
//!   provider unrouted or without its key; it forwards only the headers
//!   the processor reads, and sends the response body without waiting for
//!   the answer to the response headers (both measured: less work on
//!   Envoy's worker, one wait less before the first byte);
//! - one route per backend, matching the routing header the processor sets
//!   (and re-matched thanks to `clear_route_cache`), with the backend's Host;
//!   a last route answers 404 for anything the processor did not route;
//! - local reply mappers, so Envoy's own errors are OpenAI-shaped JSON too;
//! - one cluster per backend (TLS with SNI, the system CA bundle and a
//!   name check for `https`, and HTTP/2 when the provider offers it by
//!   ALPN: one connection instead of one per concurrent request)
//!   and one for the processor (HTTP/2, TCP or Unix socket);
//! - per fallback chain, an aggregate cluster over its backends' clusters
//!   (one priority each, in order) whose upstream filters run the attempt
//!   pass once per attempt, and a route whose retries skip the priorities
//!   already tried, so each backend is tried at most once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{BackendConfig, BackendUrl, Config, ListenAddr, RetryConfig, RetryOn};
use crate::decision::head::CREDENTIAL_HEADERS;
use crate::extproc::chains::REQUEST_ID_HEADER;
use crate::extproc::headers::{CLIENT_HEADERS_NOT_FORWARDED, READ_HEADERS};
use crate::extproc::report::METADATA_NAMESPACE;
use crate::extproc::stream_auth::{read_secret, SecretError, SECRET_HEADER};
use crate::extproc::{
    ATTEMPT_PASS, BACKEND_ATTRIBUTE, BACKEND_HEADER, CONTENT_LENGTH_FIELD, INTERNAL_HEADER_PREFIX,
    MODEL_HEADER, PASS_HEADER,
};
use crate::openai::error::{error_json, too_large_message};
use crate::routes::chain_name;

/// The Envoy cluster of the processor.
pub const EXTPROC_CLUSTER: &str = "ai-gateway-extproc";

/// Why a configuration cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot serialize the bootstrap: {0}")]
    Serialize(#[from] serde_yaml_ng::Error),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The bootstrap YAML for `config`.
pub fn render(config: &Config) -> Result<String, RenderError> {
    let mut clusters = vec![extproc_cluster(config)];
    let mut routes = Vec::new();
    let chains = chains(config);
    for backend in &config.backends {
        let chained = chains
            .iter()
            .any(|c| c.iter().any(|b| b.name == backend.name));
        clusters.push(backend_cluster(
            backend,
            &backend.url,
            chained.then_some(&config.retry),
            config.limits.max_concurrent_requests,
        ));
        routes.push(backend_route(backend, &backend.url));
    }
    for chain in &chains {
        clusters.push(chain_cluster(config, chain)?);
        routes.push(chain_route(config, chain));
    }
    routes.push(json!({
        "name": "unrouted",
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {"inline_string": String::from_utf8_lossy(&error_json(
                "The gateway did not route this request.",
                "invalid_request_error",
                "unrouted",
            ))},
        },
    }));

    let mut bootstrap = json!({
        "node": {"id": "ai-gateway", "cluster": "ai-gateway"},
        "static_resources": {
            "listeners": [listener(config, routes)?],
            "clusters": clusters,
        },
    });
    if let Some(admin) = config.envoy.admin_listen {
        bootstrap["admin"] = json!({"address": socket_address(admin)});
    }
    let yaml = serde_yaml_ng::to_string(&bootstrap)?;
    Ok(format!(
        "# Envoy bootstrap for ai-gateway-extproc, rendered by `ai-gateway-extproc envoy-config`.\n\
         # Do not edit: change the gateway config and render again.\n{yaml}"
    ))
}

fn listener(config: &Config, routes: Vec<Value>) -> Result<Value, RenderError> {
    let limit = config.limits.max_request_body_bytes;
    Ok(json!({
        "name": "ai-gateway",
        "address": socket_address(config.envoy.listen),
        "per_connection_buffer_limit_bytes": limit,
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "ai_gateway",
                    "codec_type": "AUTO",
                    // The processor sees the path Envoy routes on: normalized.
                    "normalize_path": true,
                    "merge_slashes": true,
                    "access_log": [access_log(!chains(config).is_empty())],
                    "local_reply_config": local_replies(config),
                    "route_config": {
                        "name": "ai-gateway",
                        "virtual_hosts": [{
                            "name": "ai-gateway",
                            "domains": ["*"],
                            "routes": routes,
                        }],
                    },
                    "http_filters": [ext_proc_filter(config)?, {
                        "name": "envoy.filters.http.router",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                        },
                    }],
                },
            }],
        }],
    }))
}

/// How Envoy reaches the processor: its cluster, and on TCP with a shared
/// secret, the secret as metadata on every stream.
fn extproc_grpc_service(config: &Config) -> Result<Value, RenderError> {
    let mut service = json!({"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}});
    if let (ListenAddr::Tcp(_), Some(file)) = (&config.extproc.listen, &config.extproc.secret_file)
    {
        service["initial_metadata"] = json!([{"key": SECRET_HEADER, "value": read_secret(file)?}]);
    }
    Ok(service)
}

fn ext_proc_filter(config: &Config) -> Result<Value, RenderError> {
    Ok(json!({
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": extproc_grpc_service(config)?,
            "failure_mode_allow": false,
            "message_timeout": duration(config.message_timeout()),
            // Two messages carry the request (headers, then the whole body:
            // the model is in it); the response body is read chunk by chunk
            // as it passes, for the token counts.
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SEND",
                "response_body_mode": "STREAMED",
                "response_trailer_mode": "SKIP",
            },
            // The first response body chunk goes out with the response
            // headers instead of one round trip later: one wait less before
            // the client's first byte (measured in bench/RESULTS.md).
            "send_body_without_waiting_for_header_response": true,
            // Only the headers the processor reads (measured: less work on
            // Envoy's worker per message).
            "forward_rules": {"allowed_headers": {"patterns": forwarded_header_patterns()}},
            // Route and token counts come back as dynamic metadata; Envoy
            // only accepts it in namespaces listed here.
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        },
    }))
}

fn forwarded_header_patterns() -> Vec<Value> {
    READ_HEADERS
        .iter()
        .chain(CREDENTIAL_HEADERS)
        .map(|name| json!({"exact": name}))
        .chain([json!({"prefix": INTERNAL_HEADER_PREFIX})])
        .collect()
}

/// Envoy's own error answers, made OpenAI-shaped. The processor's immediate
/// responses are local replies too, so each mapper either gives the same
/// body the processor would (413) or matches only what the processor never
/// sends (500, 502, 504, 408, 431, upstream and protocol failure flags).
/// The first matching mapper wins: flags before statuses.
fn local_replies(config: &Config) -> Value {
    let limit = usize::try_from(config.limits.max_request_body_bytes).unwrap_or(usize::MAX);
    json!({
        "mappers": [
            {
                // Connection failures, timeouts and resets on the way to a
                // provider; the processor's own replies carry no such flag.
                "filter": {"response_flag_filter": {"flags": ["UF", "UH", "UO", "URX", "UC", "UT", "UR", "DC", "UPE", "NC", "UMSDR"]}},
                "body_format_override": {"json_format": {"error": {
                    // The details name the cause: a refused connection, a
                    // timeout, or a TLS failure with the certificate's names.
                    "message": "The backend could not be reached or did not answer in time: %LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)",
                    "type": "server_error",
                    "code": "upstream_unavailable",
                }}},
            },
            {
                // Malformed HTTP from the client, caught by Envoy's codec.
                "filter": {"response_flag_filter": {"flags": ["DPE"]}},
                "body_format_override": {"json_format": {"error": {
                    "message": "The request is not valid HTTP: %LOCAL_REPLY_BODY%",
                    "type": "invalid_request_error",
                    "code": "invalid_request",
                }}},
            },
            status_mapper(413, &too_large_message(limit), "invalid_request_error", "request_too_large"),
            status_mapper(
                500,
                "The AI gateway could not process this request (its external processor failed or is unreachable).",
                "server_error",
                "gateway_processor_failure",
            ),
            status_mapper(
                504,
                "The AI gateway's external processor did not answer in time (extproc.message_timeout); try again, or send a smaller body.",
                "server_error",
                "gateway_processor_timeout",
            ),
            status_mapper(
                502,
                "The backend's answer could not be read.",
                "server_error",
                "upstream_unavailable",
            ),
            status_mapper(
                408,
                "The request was not received in time.",
                "invalid_request_error",
                "request_timeout",
            ),
            status_mapper(
                431,
                "The request headers are too large.",
                "invalid_request_error",
                "headers_too_large",
            ),
        ],
    })
}

fn status_mapper(status: u16, message: &str, kind: &str, code: &str) -> Value {
    json!({
        "filter": {"status_code_filter": {"comparison": {
            "op": "EQ",
            "value": {"default_value": status, "runtime_key": format!("ai_gateway.local_reply.{status}")},
        }}},
        "body_format_override": {"json_format": {"error": {
            "message": message,
            "type": kind,
            "code": code,
        }}},
    })
}

/// Envoy's access log. With fallback chains it also counts each request's
/// attempts, refused connections included (the processor only sees the
/// attempts that connected); without, that field is left out (measured:
/// 0.5 % of Envoy's instructions per request).
fn access_log(chains: bool) -> Value {
    let mut log = json!({
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": {
                "start_time": "%START_TIME%",
                "request_id": "%REQ(X-REQUEST-ID)%",
                "method": "%REQ(:METHOD)%",
                // Without the query: a client may put a key there.
                "path": "%REQ_WITHOUT_QUERY(:PATH)%",
                // The routing headers are gone by now (removed on the way
                // upstream): the cluster is the backend (on a fallback
                // chain, the chain's; the metadata and the processor's log
                // line name the backend that answered: reading it here
                // measured +1.3 % of Envoy's instructions per request), and
                // the processor's one metadata write names the model.
                "model": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:model)%"),
                "backend": "%UPSTREAM_CLUSTER%",
                "response_model": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:response_model)%"),
                "input_tokens": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:input_tokens)%"),
                "output_tokens": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:output_tokens)%"),
                "total_tokens": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:total_tokens)%"),
                "cached_input_tokens": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:cached_input_tokens)%"),
                "reasoning_tokens": format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:reasoning_tokens)%"),
                "status": "%RESPONSE_CODE%",
                "details": "%RESPONSE_CODE_DETAILS%",
                "flags": "%RESPONSE_FLAGS%",
                "upstream_host": "%UPSTREAM_HOST%",
                "bytes_received": "%BYTES_RECEIVED%",
                "bytes_sent": "%BYTES_SENT%",
                "duration_ms": "%DURATION%",
                "user_agent": "%REQ(USER-AGENT)%",
            },
                // REQ_WITHOUT_QUERY is an extension formatter.
                "formatters": [{
                    "name": "envoy.formatter.req_without_query",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"},
                }],
            },
        },
    });
    if chains {
        log["typed_config"]["log_format"]["json_format"]["upstream_attempts"] =
            json!("%UPSTREAM_REQUEST_ATTEMPT_COUNT%");
    }
    log
}

/// An HTTP/2 provider that refuses a stream (REFUSED_STREAM: more streams
/// than it takes at once, typically in a burst before its settings
/// arrived) has not processed the request (RFC 9113, 8.7), so sending it
/// again is always safe; measured: 424 of a burst of 1,100 got 503 without
/// it. The only retry of a backend without fallbacks.
fn refused_stream_retry() -> Value {
    json!({"retry_on": "refused-stream", "num_retries": 3})
}

/// What no provider gets: the routing headers once they have routed, and
/// the client headers listed in `CLIENT_HEADERS_NOT_FORWARDED`.
fn removed_request_headers() -> Vec<&'static str> {
    [BACKEND_HEADER, MODEL_HEADER]
        .into_iter()
        .chain(CLIENT_HEADERS_NOT_FORWARDED.iter().copied())
        .collect()
}

fn backend_route(backend: &BackendConfig, url: &BackendUrl) -> Value {
    let mut route = json!({
        "cluster": backend.name,
        "host_rewrite_literal": url.authority(),
        "timeout": duration(backend.request_timeout),
        "idle_timeout": duration(backend.idle_timeout),
        "retry_policy": refused_stream_retry(),
    });
    // What no provider gets: the routing headers once they have routed, and
    // the client headers listed in `CLIENT_HEADERS_NOT_FORWARDED`.
    let remove = removed_request_headers();
    if !url.path_prefix.is_empty() {
        route["prefix_rewrite"] = json!(format!("{}/", url.path_prefix));
    }
    json!({
        "name": format!("backend-{}", backend.name),
        "match": {
            "prefix": "/",
            "headers": [{"name": BACKEND_HEADER, "string_match": {"exact": backend.name}}],
        },
        "route": route,
        "request_headers_to_remove": remove,
    })
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

/// A chain's cluster: Envoy's aggregate cluster over its backends' own
/// clusters, each backend one priority level, so a retry that skips the
/// priorities already tried goes to the next backend in order, and a
/// backend whose host was ejected is passed over at once. Its upstream
/// filters run once per attempt: the attempt pass sets the key, path and
/// body of the attempt's backend, then `content-length` is set from what
/// it measured, then the codec sends it.
fn chain_cluster(config: &Config, chain: &[&BackendConfig]) -> Result<Value, RenderError> {
    let name = chain_name(names(chain));
    let mut service = extproc_grpc_service(config)?;
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
    Ok(json!({
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
    }))
}

/// A chain's route: like a backend's, with the retry policy that moves
/// along the chain. Envoy never retries once the response has begun
/// reaching the client, so no response byte is sent twice.
fn chain_route(config: &Config, chain: &[&BackendConfig]) -> Value {
    let name = chain_name(names(chain));
    let retry = &config.retry;
    let statuses: Vec<u16> = retry
        .retry_on
        .iter()
        .filter_map(|on| match on {
            RetryOn::Status(s) => Some(*s),
            _ => None,
        })
        .collect();
    let mut conditions = Vec::new();
    if !statuses.is_empty() {
        conditions.push("retriable-status-codes");
    }
    if retry.retry_on.contains(&RetryOn::ConnectFailure) {
        conditions.push("connect-failure");
    }
    if retry.retry_on.contains(&RetryOn::Reset) {
        conditions.push("reset");
    }
    // Never processed: always safe to send elsewhere (see
    // `refused_stream_retry`).
    conditions.push("refused-stream");
    let attempts = usize::try_from(retry.max_attempts)
        .unwrap_or(usize::MAX)
        .min(chain.len());
    // A timeout of 0 is none; otherwise each attempt may use its own.
    let timeout = if chain.iter().any(|b| b.request_timeout.is_zero()) {
        Duration::ZERO
    } else {
        chain.iter().map(|b| b.request_timeout).sum()
    };
    let idle = chain
        .iter()
        .map(|b| b.idle_timeout)
        .max()
        .unwrap_or_default();
    json!({
        "name": format!("backend-{name}"),
        "match": {
            "prefix": "/",
            "headers": [{"name": BACKEND_HEADER, "string_match": {"exact": name}}],
        },
        "route": {
            "cluster": name,
            // Each endpoint carries its backend's host name.
            "auto_host_rewrite": true,
            "timeout": duration(timeout),
            "idle_timeout": duration(idle),
            "retry_policy": {
                "retry_on": conditions.join(","),
                "retriable_status_codes": statuses,
                "num_retries": attempts.saturating_sub(1),
                "retry_priority": {
                    "name": "envoy.retry_priorities.previous_priorities",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                        "update_frequency": 1,
                    },
                },
                // The next backend is another provider: no reason to wait
                // (Envoy's shortest back-off).
                "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.001s"},
            },
        },
        "request_headers_to_remove": removed_request_headers(),
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

fn backend_cluster(
    backend: &BackendConfig,
    url: &BackendUrl,
    chained: Option<&RetryConfig>,
    max_concurrent: u32,
) -> Value {
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

fn extproc_cluster(config: &Config) -> Value {
    let address = match &config.extproc.listen {
        ListenAddr::Unix(path) => json!({"pipe": {"path": path.display().to_string()}}),
        ListenAddr::Tcp(addr) => socket_address(dialable(*addr)),
    };
    let mut cluster = json!({
        "name": EXTPROC_CLUSTER,
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
            "cluster_name": EXTPROC_CLUSTER,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
        let v: Value = serde_yaml_ng::from_str(&render(&c).unwrap()).unwrap();
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
        let v: Value = serde_yaml_ng::from_str(&render(&c).unwrap()).unwrap();
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
        let yaml = render(&c).unwrap();
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
        let route = chain_route(&c, &chains[0]);
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
        let v: Value = serde_yaml_ng::from_str(&render(&open).unwrap()).unwrap();
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
}
