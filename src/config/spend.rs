//! The `spend:` section (budgets and rate limits for the whole gateway, the
//! counter store, prices) and the limits a gateway key may carry.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Budgets and rate limits. Every field may be left out: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Input + output tokens.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub usd_per_day: Option<f64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Problems with the values, as `(field, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (field, value) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_day", self.tokens_per_day),
        ] {
            if value == Some(0) {
                out.push((
                    field,
                    "must be more than 0 (leave it out for no limit)".into(),
                ));
            }
        }
        if let Some(usd) = self.usd_per_day {
            if !(usd.is_finite() && usd > 0.0 && usd <= 1e9) {
                out.push(("usd_per_day", format!("{usd} is not a budget in (0, 1e9]")));
            }
        }
        out
    }
}

/// Where the counters live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process: exact for one replica.
    #[default]
    Memory,
    /// One Redis (or Valkey), shared by every replica: `redis://` or
    /// `rediss://` (TLS).
    Redis(String),
    /// A Redis Cluster: its seed nodes (`redis+cluster://h1:p1,h2:p2`).
    RedisCluster(Vec<String>),
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password: only the scheme and hosts.
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(url) => f.write_str(&redact(url)),
            Self::RedisCluster(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(|n| redact(n)).collect();
                write!(f, "redis cluster {}", nodes.join(","))
            }
        }
    }
}

/// A Redis URL without its credentials, for logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "redis".into(),
    }
}

impl<'de> Deserialize<'de> for StoreConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_store(&s).map_err(serde::de::Error::custom)
    }
}

fn parse_store(s: &str) -> Result<StoreConfig, String> {
    if s == "memory" {
        return Ok(StoreConfig::Memory);
    }
    for (cluster, node_scheme) in [
        ("redis+cluster://", "redis"),
        ("rediss+cluster://", "rediss"),
    ] {
        if let Some(nodes) = s.strip_prefix(cluster) {
            let nodes: Vec<String> = nodes
                .split(',')
                .filter(|n| !n.trim().is_empty())
                .map(|n| format!("{node_scheme}://{}", n.trim()))
                .collect();
            if nodes.is_empty() {
                return Err(
                    "a cluster needs at least one node: redis+cluster://HOST:PORT,...".into(),
                );
            }
            for n in &nodes {
                url::Url::parse(n).map_err(|e| format!("cluster node {}: {e}", redact(n)))?;
            }
            return Ok(StoreConfig::RedisCluster(nodes));
        }
    }
    let url = url::Url::parse(s).map_err(|e| format!("{}: {e}", redact(s)))?;
    match url.scheme() {
        "redis" | "rediss" if url.host_str().is_some() => Ok(StoreConfig::Redis(s.to_string())),
        _ => Err(format!(
            "{} is not a store: use memory, redis://HOST:PORT/DB, rediss://... or redis+cluster://HOST:PORT,...",
            redact(s)
        )),
    }
}

/// What admission does while the store cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Refuse with 503: no request is served unmetered.
    #[default]
    Reject,
    /// Serve, unmetered, and log.
    Admit,
}

/// A price, in USD per million tokens, for the models a glob names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRule {
    pub model: String,
    pub input: f64,
    pub output: f64,
    /// Input tokens read from the provider's cache; default: `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Input tokens written to the provider's cache; default: `input`.
    #[serde(default)]
    pub cache_write: Option<f64>,
}

/// The `spend:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendConfig {
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// The output reservation of a request that names no output cap.
    #[serde(default = "default_max_output_tokens")]
    pub default_max_output_tokens: u64,
    /// Limits on all clients together.
    #[serde(default)]
    pub limits: Limits,
    /// Prices that fill in or override the backends' own lists.
    #[serde(default)]
    pub prices: Vec<PriceRule>,
    /// How often backends' model lists (and their prices) are fetched.
    #[serde(default = "default_price_refresh", with = "humantime_serde")]
    pub price_refresh: Duration,
    /// The longest a store call may take before it counts as an error.
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub store_timeout: Duration,
    /// Prefix of every Redis key, so that several gateways can share a
    /// Redis; it is also the hash tag that keeps a gateway's counters in
    /// one Redis Cluster slot.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// A file holding Redis's password (a mounted Secret), so that it need
    /// not be written in the store URL.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
}

impl Default for SpendConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            on_store_error: OnStoreError::default(),
            default_max_output_tokens: default_max_output_tokens(),
            limits: Limits::default(),
            prices: Vec::new(),
            price_refresh: default_price_refresh(),
            store_timeout: default_store_timeout(),
            namespace: default_namespace(),
            password_file: None,
        }
    }
}

fn default_max_output_tokens() -> u64 {
    4096
}
fn default_price_refresh() -> Duration {
    Duration::from_secs(600)
}
fn default_store_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_namespace() -> String {
    "ai-gateway".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_forms() {
        assert_eq!(parse_store("memory"), Ok(StoreConfig::Memory));
        assert_eq!(
            parse_store("redis://127.0.0.1:6379/0"),
            Ok(StoreConfig::Redis("redis://127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            parse_store("redis+cluster://a:7000, b:7001"),
            Ok(StoreConfig::RedisCluster(vec![
                "redis://a:7000".into(),
                "redis://b:7001".into()
            ]))
        );
        assert!(parse_store("postgres://x").is_err());
        assert!(parse_store("redis+cluster://").is_err());
        // Shown without the password.
        let shown = StoreConfig::Redis("redis://user:hunter2@h:6379/0".into()).to_string();
        assert_eq!(shown, "redis://h:6379");
        let err = parse_store("mysql://user:hunter2@h").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn limit_values() {
        let l = Limits {
            requests_per_minute: Some(0),
            usd_per_day: Some(-1.0),
            ..Limits::default()
        };
        let fields: Vec<&str> = l.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["requests_per_minute", "usd_per_day"]);
        assert!(Limits::default().is_empty());
    }
}
