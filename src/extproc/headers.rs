//! Reading Envoy's header maps.

use envoy_types::pb::envoy::config::core::v3::HeaderMap;

use super::INTERNAL_HEADER_PREFIX;

/// Headers through which a client could hand a provider its own key. They
/// are removed from every forwarded request: only the gateway's key leaves.
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
];

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

/// Query parameters through which a client could hand a provider its own
/// key (`?key=` is Google's form, `?api-key=` some proxies'); removed from
/// the path the provider gets. Compared without case, after decoding.
pub const CREDENTIAL_PARAMS: &[&str] = &[
    "key",
    "api-key",
    "api_key",
    "apikey",
    "access_token",
    "token",
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

/// The request facts the gateway needs from the header map.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// The query string, without its `?`, if there was one.
    pub query: Option<String>,
    pub request_id: String,
    pub content_length: Option<u64>,
    /// Client headers to remove before forwarding: credentials and any
    /// gateway-internal header the client tried to set.
    pub to_remove: Vec<String>,
    /// The key the client presented (`Authorization: Bearer`, else
    /// `x-api-key`), for the gateway's own access control.
    pub credential: Option<Vec<u8>>,
}

/// A header's value: Envoy sends `raw_value` (bytes) in current versions and
/// `value` in older ones.
fn value_of(h: &envoy_types::pb::envoy::config::core::v3::HeaderValue) -> &[u8] {
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

impl RequestHead {
    pub fn from_headers(map: Option<&HeaderMap>) -> Self {
        let mut head = RequestHead::default();
        let Some(map) = map else {
            return head;
        };
        for h in &map.headers {
            // Envoy hands header names over lower-cased.
            let key = h.key.as_str();
            let value = value_of(h);
            match key {
                ":method" => head.method = String::from_utf8_lossy(value).into_owned(),
                ":path" => {
                    let mut parts = value.splitn(2, |&b| b == b'?');
                    let path = parts.next().unwrap_or_default();
                    head.path = String::from_utf8_lossy(path).into_owned();
                    head.query = parts
                        .next()
                        .map(|q| String::from_utf8_lossy(q).into_owned());
                }
                "x-request-id" => head.request_id = String::from_utf8_lossy(value).into_owned(),
                "authorization" => {
                    let bearer = value
                        .get(..7)
                        .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
                        .map(|_| value[7..].trim_ascii());
                    if let Some(token) = bearer {
                        head.credential = Some(token.to_vec());
                    }
                }
                "x-api-key" if head.credential.is_none() => {
                    head.credential = Some(value.trim_ascii().to_vec())
                }
                "content-length" => {
                    head.content_length = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                }
                _ => {}
            }
            let forbidden =
                CREDENTIAL_HEADERS.contains(&key) || key.starts_with(INTERNAL_HEADER_PREFIX);
            if forbidden && !head.to_remove.iter().any(|k| k == key) {
                head.to_remove.push(key.to_string());
            }
        }
        head
    }
}

impl RequestHead {
    /// The `:path` to forward instead, when the query carries a credential
    /// parameter (the provider must get only the gateway's key).
    pub fn path_without_credentials(&self) -> Option<String> {
        let query = self.query.as_deref()?;
        let is_credential = |pair: &str| {
            url::form_urlencoded::parse(pair.as_bytes())
                .next()
                .is_some_and(|(name, _)| {
                    CREDENTIAL_PARAMS
                        .iter()
                        .any(|c| c.eq_ignore_ascii_case(name.trim()))
                })
        };
        let pairs: Vec<&str> = query.split('&').collect();
        if !pairs.iter().any(|p| is_credential(p)) {
            return None;
        }
        let kept: Vec<&str> = pairs.into_iter().filter(|p| !is_credential(p)).collect();
        Some(if kept.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, kept.join("&"))
        })
    }
}

/// The `:status` of a response header map, and a header by name.
pub fn response_status(map: Option<&HeaderMap>) -> Option<u16> {
    header(map, ":status").and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

pub fn header<'a>(map: Option<&'a HeaderMap>, name: &str) -> Option<&'a [u8]> {
    map?.headers.iter().find(|h| h.key == name).map(value_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue;

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

    #[test]
    fn reads_head_and_lists_client_credentials() {
        let m = map(&[
            (":method", "POST"),
            (":path", "/v1/chat/completions?x=1"),
            ("x-request-id", "abc"),
            ("content-length", "42"),
            ("authorization", "Bearer client"),
            ("x-api-key", "client"),
            ("x-ai-eg-backend", "evil"),
            ("x-ai-eg-anything", "1"),
            ("user-agent", "kilo"),
        ]);
        let head = RequestHead::from_headers(Some(&m));
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/v1/chat/completions");
        assert_eq!(head.request_id, "abc");
        assert_eq!(head.content_length, Some(42));
        assert_eq!(head.credential.as_deref(), Some(&b"client"[..]));
        assert_eq!(
            head.to_remove,
            [
                "authorization",
                "x-api-key",
                "x-ai-eg-backend",
                "x-ai-eg-anything"
            ]
        );
    }

    /// Envoy forwards only some headers (`forward_rules`): what the
    /// processor makes of a full header map must not change when the
    /// others are left out.
    #[test]
    fn every_header_read_is_forwarded() {
        let all = [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
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
        ];
        let full = RequestHead::from_headers(Some(&map(&all)));
        let forwarded: Vec<_> = all.into_iter().filter(|(k, _)| is_forwarded(k)).collect();
        assert!(forwarded.len() < all.len(), "the test must leave some out");
        let seen = RequestHead::from_headers(Some(&map(&forwarded)));
        assert_eq!(format!("{full:?}"), format!("{seen:?}"));
        for name in [":status", "content-type", "content-encoding", "retry-after"] {
            assert!(is_forwarded(name), "{name} is read from responses");
        }
    }

    #[test]
    fn credential_query_parameters_are_dropped() {
        let head = |path: &str| RequestHead::from_headers(Some(&map(&[(":path", path)])));
        for (path, want) in [
            ("/v1/chat/completions", None),
            ("/v1/chat/completions?a=1", None),
            (
                "/v1/chat/completions?key=sk-1",
                Some("/v1/chat/completions"),
            ),
            (
                "/v1/chat/completions?api-key=sk-1&a=1",
                Some("/v1/chat/completions?a=1"),
            ),
            (
                "/v1/models?a=1&API_KEY=sk-1&b=2",
                Some("/v1/models?a=1&b=2"),
            ),
            ("/v1/models?%6Bey=sk-1", Some("/v1/models")),
            ("/v1/models?access_token=sk&token=sk", Some("/v1/models")),
        ] {
            assert_eq!(
                head(path).path_without_credentials().as_deref(),
                want,
                "{path}"
            );
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
