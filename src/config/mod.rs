//! The gateway's configuration file: its model, loading and validation.
//!
//! The file is YAML (JSON is valid YAML, so JSON works too). Loading has two
//! steps. serde reads the shape, rejecting unknown fields so that a typo never
//! passes silently, parsing values into their types (a backend's URL, a
//! listen address), and `serde_path_to_error` names the field that failed
//! (`backends[0].url`, with its line). Then [`Config::validate`]
//! (`validate.rs`) checks what types cannot: names, references from models
//! to backends, duplicates, rules between fields, every problem at once.
//!
//! The same [`Config`] feeds the data path (through `RouteTable`), the key
//! watcher and the Envoy bootstrap renderer: one source of truth.

mod backend_url;
mod listen;
mod names;
mod retry;
mod spend;
mod validate;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use backend_url::{BackendUrl, UrlError};
use listen::{de_opt_socket_addr, de_socket_addr, de_socket_mode};
pub use listen::{parse_socket_addr, AddrError, ListenAddr};
pub use names::{
    check_backend_name, check_model_name, NameError, MAX_MODEL_NAME_LEN, RESERVED_CLUSTER_NAMES,
};
pub use retry::{FallbackConfig, RetryConfig, RetryOn};
pub use spend::{Limits, OnStoreError, PriceRule, SpendConfig, StoreConfig};

/// Largest request body a client may send by default: 16 MiB. Coding agents
/// send long contexts and base64 images; Envoy buffers the whole body once.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// The system CA bundle on Debian, Ubuntu, Alpine and the Envoy image.
pub const DEFAULT_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Upper bound for `limits.max_request_body_bytes`. Envoy's buffer limits are
/// 32-bit, and buffering more than this per request is a memory hazard.
const MAX_REQUEST_BODY_BYTES_CEILING: u64 = 1024 * 1024 * 1024;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub extproc: ExtprocConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub envoy: EnvoyConfig,
    pub backends: Vec<BackendConfig>,
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub watch: WatchConfig,
    /// Gateway keys clients must present; none: anyone who reaches the
    /// gateway may use it.
    #[serde(default)]
    pub client_keys: Option<ClientKeysConfig>,
    /// Budgets and rate limits, and where their counters live.
    #[serde(default)]
    pub spend: SpendConfig,
    /// When a model's fallback chain moves on to its next backend.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// Where the gateway's client keys are (see `access`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeysConfig {
    /// A YAML file listing the keys; watched and reloaded like the config.
    pub file: PathBuf,
}

/// Where the external processor serves Envoy, and who may talk to it.
///
/// Whoever can open a stream on this endpoint can have a request routed and
/// read the `Authorization` header the processor sets: it is as sensitive
/// as the provider keys. So it listens on a Unix socket only Envoy's user
/// may open, unless the file asks for TCP, and then every stream must prove
/// it comes from Envoy, with a shared secret or a client certificate.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtprocConfig {
    #[serde(default = "default_extproc_listen")]
    pub listen: ListenAddr,
    /// File mode of the Unix socket; connecting needs write permission.
    /// 0600: only the processor's user (run Envoy as the same user); 0660:
    /// also the socket's group (a group the two share, e.g. `fsGroup`).
    #[serde(default = "default_socket_mode", deserialize_with = "de_socket_mode")]
    pub socket_mode: u32,
    /// A shared secret every stream must present (TCP): Envoy sends it as
    /// gRPC metadata, rendered into its bootstrap by `envoy-config`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Mutual TLS between Envoy and the processor (TCP).
    #[serde(default)]
    pub tls: Option<ExtprocTls>,
    /// How long Envoy waits for the processor's answer to one message before
    /// failing the request (closed, OpenAI-shaped 504). The clock runs while
    /// Envoy sends the message, so it must fit the largest body, also when
    /// many arrive at once: by default 2 s plus 0.5 s per MiB of
    /// `limits.max_request_body_bytes` (10 s for the default 16 MiB). See
    /// [`Config::message_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub message_timeout: Option<Duration>,
}

/// Mutual TLS on the ext_proc endpoint: one CA signs both sides'
/// certificates, and each side accepts only certificates it signed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtprocTls {
    /// The CA both certificates are signed by.
    pub ca_file: PathBuf,
    /// The processor's certificate (PEM, with its chain) and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The certificate and key the rendered Envoy bootstrap presents.
    pub envoy_cert_file: PathBuf,
    pub envoy_key_file: PathBuf,
    /// The DNS name in the processor's certificate, which Envoy sends as
    /// SNI and checks.
    pub server_name: String,
}

/// The admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen", deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
}

/// What the rendered Envoy bootstrap listens on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyConfig {
    /// Where Envoy serves clients.
    #[serde(default = "default_envoy_listen", deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// Envoy's own admin interface; none when absent (it is powerful, so it
    /// is opt-in and should stay on localhost).
    #[serde(default, deserialize_with = "de_opt_socket_addr")]
    pub admin_listen: Option<SocketAddr>,
    /// The processor hands each exchange's backend, models and token counts
    /// to Envoy as dynamic metadata (`io.envoy.ai_gateway`), and Envoy's
    /// access log shows them (field `ai_gateway`). Off by default: it costs
    /// Envoy's worker about 7 % more instructions per request (the write,
    /// then formatting it in every access log line; `bench/RESULTS.md`
    /// entry 25), and the processor's own request line has all of it.
    #[serde(default)]
    pub usage_metadata: bool,
}

/// One OpenAI-compatible provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Also the Envoy cluster's name.
    pub name: String,
    /// `scheme://host[:port][/prefix]`; the client's `/v1/...` path is
    /// appended to the prefix. Parsed when the file is read.
    pub url: BackendUrl,
    /// File holding the provider key (a mounted Kubernetes Secret).
    pub api_key_file: PathBuf,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A stream with no bytes in either direction for this long is cut.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Cap on a whole exchange, response stream included; 0 means none, since
    /// long generations are legitimate and `idle_timeout` catches stalls.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Duration,
    /// CA bundle Envoy verifies an `https` backend against, as a path Envoy
    /// can read. Default: the system bundle of Debian, Ubuntu, Alpine and the
    /// official Envoy image.
    #[serde(default = "default_ca_file")]
    pub ca_file: PathBuf,
}

/// One model rule: which backend serves a model name, or a glob of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub backend: String,
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Backends tried in order after `backend` when it throttles or fails
    /// (`retry.retry_on`); empty: one attempt.
    #[serde(default)]
    pub fallbacks: Vec<FallbackConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: u64,
    /// Requests one Envoy serves at once, per backend and through the
    /// processor. Envoy's own default is 1,024 per cluster: past it, a
    /// gateway answered 500 (the processor's cluster) or 503 (a backend's),
    /// which long LLM streams reach quickly.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: u32,
}

/// How files (keys, this config) are watched.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Re-read interval used on top of filesystem events, for where those are
    /// unavailable or missed (some network and overlay filesystems).
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for ExtprocConfig {
    fn default() -> Self {
        Self {
            listen: default_extproc_listen(),
            socket_mode: default_socket_mode(),
            secret_file: None,
            tls: None,
            message_timeout: None,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        Self {
            listen: default_envoy_listen(),
            admin_listen: None,
            usage_metadata: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            max_concurrent_requests: default_max_concurrent_requests(),
        }
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            poll_interval: default_poll_interval(),
        }
    }
}

/// The default ext_proc socket: on a volume only Envoy and the processor
/// share (an `emptyDir` in Kubernetes, a named volume in compose).
pub const DEFAULT_EXTPROC_SOCKET: &str = "/run/ai-gateway/extproc.sock";

fn default_extproc_listen() -> ListenAddr {
    ListenAddr::Unix(PathBuf::from(DEFAULT_EXTPROC_SOCKET))
}
fn default_socket_mode() -> u32 {
    0o600
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1064)
}
fn default_envoy_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1975)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_ca_file() -> PathBuf {
    PathBuf::from(DEFAULT_CA_FILE)
}
fn default_max_concurrent_requests() -> u32 {
    10_000
}

fn default_max_request_body_bytes() -> u64 {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

/// Settings given on the command line; they win over the file, also after
/// a reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub extproc_listen: Option<ListenAddr>,
    pub admin_listen: Option<SocketAddr>,
}

impl Overrides {
    /// Applies the overrides and validates the result again (a TCP
    /// `--listen` needs a secret or TLS like one in the file).
    pub fn apply(&self, mut config: Config, path: &Path) -> Result<Config, ConfigError> {
        if let Some(l) = &self.extproc_listen {
            config.extproc.listen = l.clone();
        }
        if let Some(a) = self.admin_listen {
            config.admin.listen = a;
        }
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: crate::regular_file::ReadError,
    },
    #[error("config file {path}: {field}: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("config file {path} is invalid: {}", format_problems(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One validation finding: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        // One line: it also goes into logs, where a line is a record.
        .join("; ")
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::watched_file::read(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(&text, path)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn from_text(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Parse {
                path: path.to_path_buf(),
                field: if field == "." {
                    "(top level)".into()
                } else {
                    field
                },
                message: e.into_inner().to_string(),
            }
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Envoy's wait for each processor answer: `extproc.message_timeout`, or
    /// 2 s plus 0.5 s per MiB of the body limit. (Measured: 48 bodies of
    /// 15 MB sent at once all reach the processor and are answered within
    /// about 5 s on two cores; docs/reliability.md.)
    pub fn message_timeout(&self) -> Duration {
        self.extproc.message_timeout.unwrap_or_else(|| {
            let mib = self.limits.max_request_body_bytes as f64 / (1024.0 * 1024.0);
            Duration::from_secs(2) + Duration::from_secs_f64(0.5 * mib)
        })
    }

    /// Largest accepted request body, in bytes, for the data path.
    pub fn max_request_body_bytes(&self) -> usize {
        usize::try_from(self.limits.max_request_body_bytes).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text, Path::new("test.yaml"))
    }

    const MINIMAL: &str = r#"
backends:
  - name: tars
    url: https://api.router.tetrate.ai
    api_key_file: /etc/ai-gateway/secrets/tars/apiKey
models:
  - name: gpt-4o-mini
    backend: tars
"#;

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.extproc.listen.to_string(),
            "unix:/run/ai-gateway/extproc.sock"
        );
        assert_eq!(c.extproc.socket_mode, 0o600);
        assert_eq!(c.message_timeout(), Duration::from_secs(10));
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:1064");
        assert_eq!(c.envoy.listen.to_string(), "127.0.0.1:1975");
        assert_eq!(c.limits.max_request_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.backends[0].idle_timeout, Duration::from_secs(300));
        assert_eq!(c.backends[0].request_timeout, Duration::ZERO);
        assert_eq!(c.models[0].upstream_model, None);
    }

    #[test]
    fn json_is_accepted() {
        let c = parse(
            r#"{"backends":[{"name":"a","url":"http://127.0.0.1:8080","api_key_file":"k"}],
                "models":[{"name":"*","backend":"a"}],
                "extproc":{"listen":"unix:/tmp/x.sock"}}"#,
        )
        .unwrap();
        assert_eq!(c.extproc.listen, ListenAddr::Unix("/tmp/x.sock".into()));
    }

    #[test]
    fn parse_error_names_field_and_line() {
        let err = parse(
            "backends:\n  - name: a\n    url: http://h\n    api_key_file: k\n    timeout_typo: 3\nmodels: []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("backends[0]"), "{err}");
        assert!(err.contains("timeout_typo"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn bad_listen_address_names_field() {
        let err = parse(&format!("{MINIMAL}admin: {{listen: 'nowhere'}}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.listen"), "{err}");
    }

    #[test]
    fn validation_reports_every_problem_with_its_path() {
        let err = parse(
            r#"
backends:
  - {name: tars, url: "https://h", api_key_file: k}
  - {name: tars, url: "https://h", api_key_file: ""}
  - {name: "bad name", url: "https://h", api_key_file: k}
models:
  - {name: m, backend: nope}
  - {name: m, backend: tars}
  - {name: "a\nb", backend: tars, upstream_model: "x*"}
limits: {max_request_body_bytes: 10}
"#,
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}");
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        for expected in [
            "backends[1].name",
            "backends[1].api_key_file",
            "backends[2].name",
            "models[0].backend",
            "models[1].name",
            "models[2].name",
            "models[2].upstream_model",
            "limits.max_request_body_bytes",
        ] {
            assert!(
                fields.contains(&expected),
                "{expected} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn fallback_chains_and_retry_are_checked() {
        let err = parse(
            r#"
backends:
  - {name: a, url: "http://h", api_key_file: k}
  - {name: b, url: "http://h", api_key_file: k}
models:
  - {name: m, backend: a, fallbacks: [{backend: b}, {backend: a}, {backend: nope}, {backend: b, upstream_model: "x*"}]}
retry: {retry_on: [429, 400], max_attempts: 0, eject_after: 0, ejection_time: 0s}
"#,
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}");
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "models[0].fallbacks[3].upstream_model",
                "models[0].fallbacks[1].backend",
                "models[0].fallbacks[2].backend",
                "models[0].fallbacks[3].backend",
                "retry.max_attempts",
                "retry.eject_after",
                "retry.ejection_time",
                "retry.retry_on[1]",
            ]
        );
        let good = parse(
            "backends:\n  - {name: a, url: 'http://h', api_key_file: k}\n  - {name: b, url: 'http://h', api_key_file: k}\nmodels: [{name: m, backend: a, fallbacks: [{backend: b, upstream_model: m2}]}]\n",
        )
        .unwrap();
        assert_eq!(good.retry, RetryConfig::default());
        assert_eq!(
            good.models[0].fallbacks[0].upstream_model.as_deref(),
            Some("m2")
        );
    }

    /// A value of the wrong form (a URL, an address) stops the parse at
    /// its field, with the line.
    #[test]
    fn a_bad_url_names_its_field_and_line() {
        let err = parse("backends:\n  - {name: t, url: 'ftp://x', api_key_file: k}\nmodels: [{name: m, backend: t}]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("backends[0].url") && err.contains("ftp") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn reserved_and_missing_sections_are_refused() {
        assert!(parse("models: []\n").is_err());
        let err = parse(
            "backends: [{name: ai-gateway-extproc, url: 'http://h', api_key_file: k}]\nmodels: [{name: m, backend: ai-gateway-extproc}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("reserved"), "{err}");
    }

    #[test]
    fn tcp_extproc_needs_a_secret_or_tls() {
        let tcp = |extra: &str| {
            parse(&format!(
                "{MINIMAL}extproc: {{listen: '127.0.0.1:1063'{extra}}}\n"
            ))
        };
        let err = tcp("").unwrap_err().to_string();
        assert!(
            err.contains("extproc.listen") && err.contains("secret_file"),
            "{err}"
        );
        assert!(tcp(", secret_file: /s").is_ok());
        let tls = ", tls: {ca_file: ca, cert_file: c, key_file: k, envoy_cert_file: ec, envoy_key_file: ek, server_name: extproc.local}";
        assert!(tcp(tls).is_ok());
        let err = parse(&format!("{MINIMAL}extproc: {{listen: 'unix:/s'{tls}}}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("extproc.tls"), "{err}");
        for (mode, ok) in [
            ("'0660'", true),
            ("'0600'", true),
            ("'0666'", false),
            ("'0777'", false),
            ("'x'", false),
        ] {
            let r = parse(&format!("{MINIMAL}extproc: {{socket_mode: {mode}}}\n"));
            assert_eq!(r.is_ok(), ok, "{mode}: {r:?}");
        }
        // An override to TCP is validated too.
        let c = parse(MINIMAL).unwrap();
        let over = Overrides {
            extproc_listen: Some("127.0.0.1:9".parse().unwrap()),
            admin_listen: None,
        };
        assert!(over.apply(c, Path::new("t.yaml")).is_err());
    }
}
