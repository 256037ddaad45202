//! Reading Envoy's header maps, and which headers Envoy sends at all.
//!
//! A header map arrives as a [`HeaderList`]: each name and value is a view
//! of the gRPC receive buffer (see `inbound`), not a `String` and a `Vec`
//! of its own as envoy-types' `HeaderValue` would make them (two
//! allocations and a copy per header; decoding a streamed chat's four
//! messages took 16.4 k instructions with them, 12.9 k with views:
//! bench/RESULTS.md entry 46).

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderMap;

use crate::decision::head::{CREDENTIAL_HEADERS, INTERNAL_HEADER_PREFIX};
use crate::decision::RequestHead;

/// The headers of one headers message, in Envoy's order. Names are
/// lower-case and valid UTF-8 (prost's rule for a `string` field, which
/// the decoder keeps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderList {
    fields: Vec<HeaderField>,
}

/// `envoy.config.core.v3.HeaderValue` with its fields as views.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderField {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    /// Older Envoys send the value here.
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    /// Current Envoys send it here.
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

impl HeaderList {
    pub(super) fn new(fields: Vec<HeaderField>) -> Self {
        Self { fields }
    }

    /// Each header's name and value.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|f| (&f.key[..], f.value_bytes()))
    }

    /// A header's value by (lower-case) name: the first of that name.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The `:status` of a response header map.
    pub fn status(&self) -> Option<u16> {
        std::str::from_utf8(self.get(":status")?).ok()?.parse().ok()
    }
}

impl HeaderField {
    /// Envoy sends `raw_value` (bytes) in current versions and `value` in
    /// older ones.
    fn value_bytes(&self) -> &[u8] {
        if self.raw_value.is_empty() {
            &self.value
        } else {
            &self.raw_value
        }
    }
}

impl From<HeaderMap> for HeaderList {
    /// A map prost decoded (a message in an unusual shape, or a test's):
    /// its strings become the views, without a copy.
    fn from(map: HeaderMap) -> Self {
        let fields = map
            .headers
            .into_iter()
            .map(|h| HeaderField {
                key: Bytes::from(h.key.into_bytes()),
                value: Bytes::from(h.value.into_bytes()),
                raw_value: Bytes::from(h.raw_value),
            })
            .collect();
        Self { fields }
    }
}

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
pub fn request_head(headers: &HeaderList, end_of_stream: bool) -> RequestHead {
    let mut head = RequestHead {
        bodiless: end_of_stream,
        ..RequestHead::default()
    };
    for (name, value) in headers.iter() {
        // Envoy hands header names over lower-cased.
        head.add(name, value);
    }
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    use envoy_types::pb::envoy::config::core::v3::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderList {
        HeaderList::from(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        })
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
        let full = request_head(&map(&all), false);
        let forwarded: Vec<_> = all.into_iter().filter(|(k, _)| is_forwarded(k)).collect();
        assert!(forwarded.len() < all.len(), "the test must leave some out");
        let seen = request_head(&map(&forwarded), false);
        assert_eq!(full, seen);
        for name in [":status", "content-type", "content-encoding", "retry-after"] {
            assert!(is_forwarded(name), "{name} is read from responses");
        }
    }

    #[test]
    fn old_envoy_value_field_is_read() {
        let m = HeaderList::from(HeaderMap {
            headers: vec![HeaderValue {
                key: ":status".into(),
                value: "429".into(),
                ..Default::default()
            }],
        });
        assert_eq!(m.status(), Some(429));
    }

    #[test]
    fn lookups() {
        let m = map(&[
            (":status", "200"),
            ("retry-after", "3"),
            ("retry-after", "9"),
        ]);
        assert_eq!(m.get("retry-after"), Some(&b"3"[..]), "the first of a name");
        assert_eq!(m.get("content-type"), None);
        assert_eq!(m.status(), Some(200));
        assert_eq!(map(&[(":status", "2x")]).status(), None);
        assert_eq!(HeaderList::default().status(), None);
    }
}
