//! The listener: Envoy's HTTP connection manager with the ext_proc filter,
//! Envoy's own errors made OpenAI-shaped, and the access log.

use serde_json::{json, Value};

use super::{
    chains, duration, processor_grpc_service, socket_address, RouteSource, EXTPROC_CLUSTER,
    LISTENER_NAME, ROUTE_CONFIG_NAME,
};
use crate::config::Config;
use crate::decision::head::CREDENTIAL_HEADERS;
use crate::extproc::headers::READ_HEADERS;
use crate::extproc::report::METADATA_NAMESPACE;
use crate::extproc::INTERNAL_HEADER_PREFIX;
use crate::openai::error::too_large_message;

/// The listener, its routes inline or from RDS.
pub(super) fn listener(
    config: &Config,
    secret: Option<&str>,
    route_config: &Value,
    routes_from: RouteSource,
) -> Value {
    let limit = config.limits.max_request_body_bytes;
    let mut manager = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ai_gateway",
        "codec_type": "AUTO",
        // The processor sees the path Envoy routes on: normalized.
        "normalize_path": true,
        "merge_slashes": true,
        "access_log": [access_log(!chains(config).is_empty(), config.envoy.usage_metadata)],
        "local_reply_config": local_replies(config),
        "http_filters": [ext_proc_filter(config, secret), {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            },
        }],
    });
    match routes_from {
        RouteSource::Inline => manager["route_config"] = route_config.clone(),
        RouteSource::Xds => {
            manager["rds"] = json!({
                "route_config_name": ROUTE_CONFIG_NAME,
                "config_source": {"ads": {}, "resource_api_version": "V3"},
            });
        }
    }
    json!({
        "name": LISTENER_NAME,
        "address": socket_address(config.envoy.listen),
        "per_connection_buffer_limit_bytes": limit,
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": manager,
            }],
        }],
    })
}

fn ext_proc_filter(config: &Config, secret: Option<&str>) -> Value {
    json!({
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": processor_grpc_service(EXTPROC_CLUSTER, secret),
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
    })
}

pub(super) fn forwarded_header_patterns() -> Vec<Value> {
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
/// 0.5 % of Envoy's instructions per request). With `usage_metadata`, it
/// shows what the processor reported.
fn access_log(chains: bool, usage_metadata: bool) -> Value {
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
                // chain, the chain's).
                "backend": "%UPSTREAM_CLUSTER%",
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
    let fields = &mut log["typed_config"]["log_format"]["json_format"];
    if chains {
        fields["upstream_attempts"] = json!("%UPSTREAM_REQUEST_ATTEMPT_COUNT%");
    }
    if usage_metadata {
        // What the processor reported, in its one metadata write: the
        // backend that answered, the model asked for and the one that
        // answered, the token counts. One field for the whole namespace:
        // as eight fields, formatting them cost Envoy about 23 k
        // instructions per request more (4 %, `bench/RESULTS.md` entry 23).
        fields["ai_gateway"] = json!(format!("%DYNAMIC_METADATA({METADATA_NAMESPACE})%"));
    }
    log
}
