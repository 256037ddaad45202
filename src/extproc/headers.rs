//! Reading Envoy's header maps, and which headers Envoy sends at all.

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

use crate::decision::head::{CREDENTIAL_HEADERS, INTERNAL_HEADER_PREFIX};
use crate::decision::RequestHead;

/// Client headers no provider gets, whatever the route, removed by Envoy's
/// routes (`request_headers_to_remove`) so the processor need not see them:
/// - `cookie`: the gateway's own clients' cookies are nobody else's business;
/// - `openai-organization`, `openai-project`: they pick which organization
///   or project of the *gateway's* key is billed; the operator chooses that,
///   not a client;
/// - `x-auth-token`, `anthropic-api-key`, `ocp-apim-subscription-key`: other
///   ways of handing a provider (or an API manager in front of one) a key.
///
/// Left alone on purpose: `user-agent`, `http-referer`, `x-title` (clients
/// such as Kilo Code identify themselves; providers use them for analytics),
/// `anthropic-version` and `anthropic-beta` (they select the API version the
/// body is written for).
pub const CLIENT_HEADERS_NOT_FORWARDED: &[&str] = &[
    "cookie",
    "openai-organization",
    "openai-project",
    "x-auth-token",
    "anthropic-api-key",
    "ocp-apim-subscription-key",
];

/// The other headers the processor reads, request and response. Envoy sends
/// the processor only these, the credential headers and the internal prefix
/// (`forward_rules` in the rendered bootstrap): every header left out is
/// work saved on Envoy's worker. A header read here must be listed, or it
/// never arrives.
pub const READ_HEADERS: &[&str] = &[
    ":method",
    ":path",
    "x-request-id",
    "content-length",
    ":status",
    "content-type",
    "content-encoding",
    "retry-after",
];

/// Whether Envoy forwards header `name` (lower-case) to the processor.
pub fn is_forwarded(name: &str) -> bool {
    READ_HEADERS.contains(&name)
        || CREDENTIAL_HEADERS.contains(&name)
        || name.starts_with(INTERNAL_HEADER_PREFIX)
}

/// The request facts of a request-headers message.
pub fn request_head(map: Option<&HeaderMap>, end_of_stream: bool) -> RequestHead {
    let mut head = RequestHead {
        bodiless: end_of_stream,
        ..RequestHead::default()
    };
    for h in map.map(|m| m.headers.as_slice()).unwrap_or_default() {
        // Envoy hands header names over lower-cased.
        head.add(&h.key, value_of(h));
    }
    head
}

/// A header's value: Envoy sends `raw_value` (bytes) in current versions and
/// `value` in older ones.
fn value_of(h: &HeaderValue) -> &[u8] {
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

/// The `:status` of a response header map.
pub fn response_status(map: Option<&HeaderMap>) -> Option<u16> {
    header(map, ":status").and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// A header's value by (lower-case) name.
pub fn header<'a>(map: Option<&'a HeaderMap>, name: &str) -> Option<&'a [u8]> {
    map?.headers.iter().find(|h| h.key == name).map(value_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// Envoy forwards only some headers (`forward_rules`): what the
    /// processor makes of a full header map must not change when the
    /// others are left out.
    #[test]
    fn every_header_read_is_forwarded() {
        let all = [
            (":method", "POST"),
            (":path", "/v1/chat/completions?key=k"),
            (":authority", "gw"),
            ("x-request-id", "abc"),
            ("content-length", "42"),
            ("content-type", "application/json"),
            ("user-agent", "kilo"),
            ("authorization", "Bearer client"),
            ("x-api-key", "k"),
            ("api-key", "k"),
            ("x-goog-api-key", "k"),
            ("proxy-authorization", "Basic k"),
            ("x-ai-eg-backend", "evil"),
            ("cookie", "c"),
        ];
        let full = request_head(Some(&map(&all)), false);
        let forwarded: Vec<_> = all.into_iter().filter(|(k, _)| is_forwarded(k)).collect();
        assert!(forwarded.len() < all.len(), "the test must leave some out");
        let seen = request_head(Some(&map(&forwarded)), false);
        assert_eq!(full, seen);
        for name in [":status", "content-type", "content-encoding", "retry-after"] {
            assert!(is_forwarded(name), "{name} is read from responses");
        }
    }

    #[test]
    fn old_envoy_value_field_is_read() {
        let m = HeaderMap {
            headers: vec![HeaderValue {
                key: ":status".into(),
                value: "429".into(),
                ..Default::default()
            }],
        };
        assert_eq!(response_status(Some(&m)), Some(429));
    }
}
