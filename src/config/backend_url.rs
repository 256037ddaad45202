//! A backend's URL, parsed once when the config is read into what Envoy
//! and the processor need: TLS or not, host, port, path prefix.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A backend URL, checked and split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash; empty for none.
    pub path_prefix: String,
}

/// Why a backend URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{url:?} is not a URL: {reason}")]
    Syntax { url: String, reason: String },
    #[error("scheme {0:?} is not supported; use https or http")]
    Scheme(String),
    #[error("credentials do not belong in the URL; use api_key_file")]
    Credentials,
    #[error("the URL must not have a query or fragment")]
    QueryOrFragment,
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} has no port")]
    NoPort(String),
}

impl BackendUrl {
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let url = url::Url::parse(s).map_err(|e| UrlError::Syntax {
            url: s.to_string(),
            reason: e.to_string(),
        })?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(UrlError::Scheme(other.to_string())),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlError::Credentials);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(UrlError::QueryOrFragment);
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(UrlError::NoHost(s.to_string())),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| UrlError::NoPort(s.to_string()))?;
        let path_prefix = url.path().trim_end_matches('/').to_string();
        Ok(Self {
            tls,
            host,
            port,
            path_prefix,
        })
    }

    /// The Host header value the provider expects: the port only when it is
    /// not the scheme's default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path_prefix)
    }
}

impl<'de> Deserialize<'de> for BackendUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BackendUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_url_parts() {
        let u = BackendUrl::parse("https://api.router.tetrate.ai").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path_prefix.as_str()),
            (true, "api.router.tetrate.ai", 443, "")
        );
        assert_eq!(u.authority(), "api.router.tetrate.ai");
        assert_eq!(u.to_string(), "https://api.router.tetrate.ai");
        let u = BackendUrl::parse("http://127.0.0.1:8080/openai/").unwrap();
        assert_eq!(
            (u.tls, u.port, u.path_prefix.as_str()),
            (false, 8080, "/openai")
        );
        assert_eq!(u.authority(), "127.0.0.1:8080");
        assert_eq!(u.to_string(), "http://127.0.0.1:8080/openai");
        let u = BackendUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!(u.authority(), "[::1]:9000");
        assert_eq!(
            BackendUrl::parse("https://h/?q=1"),
            Err(UrlError::QueryOrFragment)
        );
        assert_eq!(
            BackendUrl::parse("ftp://h"),
            Err(UrlError::Scheme("ftp".into()))
        );
        assert_eq!(
            BackendUrl::parse("https://u:p@h"),
            Err(UrlError::Credentials)
        );
        assert!(BackendUrl::parse("api.router.tetrate.ai").is_err());
    }
}
