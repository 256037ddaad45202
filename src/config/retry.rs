//! Fallback: a model's chain of backends (`models[].fallbacks`) and the
//! gateway-wide `retry:` section that says when Envoy moves on to the next
//! one.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};

/// One backend tried after a model's own, in order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    pub backend: String,
    /// The name sent to this backend; absent: the client's model name.
    #[serde(default)]
    pub upstream_model: Option<String>,
}

/// What makes Envoy try the next backend of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// The backend answered this status.
    Status(u16),
    /// No connection could be made.
    ConnectFailure,
    /// The connection was reset before a response began.
    Reset,
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(s) => write!(f, "{s}"),
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::Reset => f.write_str("reset"),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RetryOn;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status code (429, 500, ...), connect-failure or reset")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RetryOn, E> {
                u16::try_from(v)
                    .ok()
                    .filter(|s| (400..=599).contains(s))
                    .map(RetryOn::Status)
                    .ok_or_else(|| E::custom(format!("{v} is not an error status (400..=599)")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RetryOn, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a status")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RetryOn, E> {
                match v {
                    "connect-failure" => Ok(RetryOn::ConnectFailure),
                    "reset" => Ok(RetryOn::Reset),
                    other => other
                        .parse::<u64>()
                        .map_err(|_| {
                            E::custom(format!(
                                "{other:?} is not a status code, connect-failure or reset"
                            ))
                        })
                        .and_then(|n| self.visit_u64(n)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The `retry:` section: when a chain moves on, how many attempts at most,
/// and how long a failing backend is left out.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Attempts in all, the first included; capped by the chain's length.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Consecutive failures (5xx, connect failures) after which a backend
    /// is left out of chains for a while.
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// How long the first time; each further ejection lasts longer (Envoy
    /// multiplies by how many times the backend was ejected, up to 5 min).
    #[serde(default = "default_ejection_time", with = "humantime_serde")]
    pub ejection_time: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            retry_on: default_retry_on(),
            max_attempts: default_max_attempts(),
            eject_after: default_eject_after(),
            ejection_time: default_ejection_time(),
        }
    }
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::Status(429),
        RetryOn::Status(500),
        RetryOn::Status(502),
        RetryOn::Status(503),
        RetryOn::Status(504),
        RetryOn::ConnectFailure,
        RetryOn::Reset,
    ]
}
fn default_max_attempts() -> u32 {
    3
}
fn default_eject_after() -> u32 {
    3
}
fn default_ejection_time() -> Duration {
    Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_forms() {
        let v: Vec<RetryOn> =
            serde_yaml_ng::from_str("[429, '503', connect-failure, reset]").unwrap();
        assert_eq!(
            v,
            [
                RetryOn::Status(429),
                RetryOn::Status(503),
                RetryOn::ConnectFailure,
                RetryOn::Reset
            ]
        );
        for bad in ["[200]", "[600]", "[sometimes]", "[-1]"] {
            assert!(
                serde_yaml_ng::from_str::<Vec<RetryOn>>(bad).is_err(),
                "{bad}"
            );
        }
        assert_eq!(RetryConfig::default().retry_on.len(), 7);
    }
}
