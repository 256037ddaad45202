//! The routes: one per backend and one per fallback chain, each matching
//! the routing header the processor sets, and a last one for anything the
//! processor did not route.

use std::time::Duration;

use serde_json::{json, Value};

use super::{duration, names};
use crate::config::{BackendConfig, Config, RetryOn};
use crate::extproc::headers::CLIENT_HEADERS_NOT_FORWARDED;
use crate::extproc::{BACKEND_HEADER, MODEL_HEADER};
use crate::openai::error::error_json;
use crate::routes::chain_name;

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

/// A backend's route.
pub(super) fn backend(backend: &BackendConfig) -> Value {
    let url = &backend.url;
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

/// A chain's route: like a backend's, with the retry policy that moves
/// along the chain. Envoy never retries once the response has begun
/// reaching the client, so no response byte is sent twice.
pub(super) fn chain(config: &Config, chain: &[&BackendConfig]) -> Value {
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

/// The last route: what the processor did not route gets a 404 from Envoy
/// (the processor answers unknown models itself; this is for a request
/// that reached the router without a routing header at all).
pub(super) fn unrouted() -> Value {
    json!({
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
    })
}
