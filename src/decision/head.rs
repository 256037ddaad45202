//! The request facts the gateway needs from the request headers, and what a
//! forwarded request loses of them (the client's credentials, in headers or
//! in the query).

/// Headers through which a client could hand a provider its own key. The
/// processor reads them (a gateway key may be among them) and removes them
/// from every forwarded request: only the gateway's key leaves.
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
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

/// Prefix of every gateway-internal header; clients may not send these.
pub const INTERNAL_HEADER_PREFIX: &str = "x-ai-eg-";

/// The request facts the gateway needs from the header map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// The query string, without its `?`, if there was one.
    pub query: Option<String>,
    pub request_id: String,
    pub content_length: Option<u64>,
    /// The request has no body (its headers ended the stream).
    pub bodiless: bool,
    /// Client headers to remove before forwarding: credentials and any
    /// gateway-internal header the client tried to set.
    pub to_remove: Vec<String>,
    /// The key the client presented (`Authorization: Bearer`, else
    /// `x-api-key`), for the gateway's own access control.
    pub credential: Option<Vec<u8>>,
}

impl RequestHead {
    /// Takes one header (name lower-cased, as Envoy hands them over).
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b":method" => self.method = String::from_utf8_lossy(value).into_owned(),
            b":path" => {
                let mut parts = value.splitn(2, |&b| b == b'?');
                let path = parts.next().unwrap_or_default();
                self.path = String::from_utf8_lossy(path).into_owned();
                self.query = parts
                    .next()
                    .map(|q| String::from_utf8_lossy(q).into_owned());
            }
            b"x-request-id" => self.request_id = String::from_utf8_lossy(value).into_owned(),
            b"authorization" => {
                let bearer = value
                    .get(..7)
                    .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
                    .map(|_| value[7..].trim_ascii());
                if let Some(token) = bearer {
                    self.credential = Some(token.to_vec());
                }
            }
            b"x-api-key" if self.credential.is_none() => {
                self.credential = Some(value.trim_ascii().to_vec())
            }
            b"content-length" => {
                self.content_length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
            }
            _ => {}
        }
        let forbidden = CREDENTIAL_HEADERS.iter().any(|c| c.as_bytes() == name)
            || name.starts_with(INTERNAL_HEADER_PREFIX.as_bytes());
        if forbidden && !self.to_remove.iter().any(|k| k.as_bytes() == name) {
            // Names are UTF-8 (envoy-types' rule, which the decoder keeps).
            self.to_remove
                .push(String::from_utf8_lossy(name).into_owned());
        }
    }

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

/// What a forwarded request loses on its way to a provider.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hygiene {
    /// Client headers to remove.
    pub remove: Vec<String>,
    /// The path to send instead (credential query parameters removed).
    pub path: Option<String>,
}

impl Hygiene {
    pub fn of(head: &RequestHead) -> Self {
        Self {
            remove: head.to_remove.clone(),
            path: head.path_without_credentials(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn head(pairs: &[(&str, &str)]) -> RequestHead {
        let mut h = RequestHead::default();
        for (k, v) in pairs {
            h.add(k.as_bytes(), v.as_bytes());
        }
        h
    }

    #[test]
    fn reads_head_and_lists_client_credentials() {
        let head = head(&[
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
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/v1/chat/completions");
        assert_eq!(head.query.as_deref(), Some("x=1"));
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

    #[test]
    fn credential_query_parameters_are_dropped() {
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
            let h = head(&[(":path", path)]);
            assert_eq!(h.path_without_credentials().as_deref(), want, "{path}");
        }
    }
}
