//! The gateway's configuration file: its model, loading and validation.
//!
//! The file is YAML (JSON is valid YAML, so JSON works too). Loading has two
//! steps. serde reads the shape, rejecting unknown fields so that a typo never
//! passes silently, and `serde_path_to_error` names the field that failed
//! (`backends[0].url`). Then [`Config::validate`] checks what types cannot:
//! URLs, names, references from models to backends, duplicates. Every problem
//! found is reported at once, each with its field path, so an operator fixes
//! a file in one pass.
//!
//! The same [`Config`] feeds the data path (through `RouteTable`), the key
//! watcher and the Envoy bootstrap renderer: one source of truth.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Largest request body a client may send by default: 16 MiB. Coding agents
/// send long contexts and base64 images; Envoy buffers the whole body once.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// The system CA bundle on Debian, Ubuntu, Alpine and the Envoy image.
pub const DEFAULT_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Upper bound for `limits.max_request_body_bytes`. Envoy's buffer limits are
/// 32-bit, and buffering more than this per request is a memory hazard.
const MAX_REQUEST_BODY_BYTES_CEILING: u64 = 1024 * 1024 * 1024;

/// Names used by the Envoy bootstrap itself; a backend must not take them.
pub const RESERVED_CLUSTER_NAMES: &[&str] = &["ai-gateway-extproc"];

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
}

/// One OpenAI-compatible provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Also the Envoy cluster's name.
    pub name: String,
    /// `scheme://host[:port][/prefix]`; the client's `/v1/...` path is
    /// appended to the prefix.
    pub url: String,
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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: u64,
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

/// A listen address: TCP `host:port`, or `unix:/path` for a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
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
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
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
fn default_max_request_body_bytes() -> u64 {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "`unix:` needs a socket path, e.g. unix:/run/ai-gateway/extproc.sock".into(),
                );
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        parse_socket_addr(s).map(ListenAddr::Tcp)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses `ip:port`, `[v6]:port` or `localhost:port`. Host names other than
/// `localhost` are refused: a listen address must not depend on DNS.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("invalid port in {s:?}"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an address of the form 127.0.0.1:1064 or [::1]:1064"))
}

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s).map_err(serde::de::Error::custom)
}

/// An octal file mode such as `"0660"` (a string, so YAML does not read it
/// as decimal). Only read and write bits for user and group make sense for
/// a socket; "other" must stay 0.
fn de_socket_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let s = String::deserialize(d)?;
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| {
        serde::de::Error::custom(format!("{s:?} is not an octal mode like \"0660\""))
    })?;
    if mode & !0o660 != 0 {
        return Err(serde::de::Error::custom(format!(
            "{s:?} gives more than read and write to user and group; use 0600 or 0660"
        )));
    }
    Ok(mode)
}

fn de_opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_socket_addr(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// A backend URL, checked and split into what Envoy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash; empty for none.
    pub path_prefix: String,
}

impl BackendUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(format!(
                    "scheme {other:?} is not supported; use https or http"
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials do not belong in the URL; use api_key_file".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("the URL must not have a query or fragment".into());
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(format!("{s:?} has no host")),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("{s:?} has no port"))?;
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

    /// Every problem serde cannot see, each with its field path.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |field: String, message: String| problems.push(Problem { field, message });

        if self.backends.is_empty() {
            report("backends".into(), "at least one backend is required".into());
        }
        let mut backend_names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let at = |f: &str| format!("backends[{i}].{f}");
            if let Err(m) = check_backend_name(&b.name) {
                report(at("name"), m);
            } else if !backend_names.insert(b.name.as_str()) {
                report(at("name"), format!("duplicate backend name {:?}", b.name));
            }
            if let Err(m) = BackendUrl::parse(&b.url) {
                report(at("url"), m);
            }
            if b.api_key_file.as_os_str().is_empty() {
                report(
                    at("api_key_file"),
                    "must name the file holding the key".into(),
                );
            }
            if b.connect_timeout.is_zero() {
                report(at("connect_timeout"), "must be more than 0".into());
            }
        }

        if self.models.is_empty() {
            report(
                "models".into(),
                "at least one model rule is required".into(),
            );
        }
        let mut model_names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = |f: &str| format!("models[{i}].{f}");
            if let Err(msg) = check_model_name(&m.name) {
                report(at("name"), msg);
            } else if !model_names.insert(m.name.as_str()) {
                report(
                    at("name"),
                    format!(
                        "duplicate model rule {:?}: only the first would ever match",
                        m.name
                    ),
                );
            }
            if !self.backends.iter().any(|b| b.name == m.backend) {
                report(
                    at("backend"),
                    format!("no backend named {:?} in `backends`", m.backend),
                );
            }
            if let Some(up) = &m.upstream_model {
                if let Err(msg) = check_model_name(up) {
                    report(at("upstream_model"), msg);
                } else if up.contains('*') {
                    report(
                        at("upstream_model"),
                        "must be a model name, not a glob".into(),
                    );
                }
            }
        }

        let body = self.limits.max_request_body_bytes;
        if !(1024..=MAX_REQUEST_BODY_BYTES_CEILING).contains(&body) {
            report(
                "limits.max_request_body_bytes".into(),
                format!("{body} is outside 1024..={MAX_REQUEST_BODY_BYTES_CEILING}"),
            );
        }
        if self.extproc.message_timeout.is_some_and(|t| t.is_zero()) {
            report(
                "extproc.message_timeout".into(),
                "must be more than 0".into(),
            );
        }
        if let Some(ck) = &self.client_keys {
            if ck.file.as_os_str().is_empty() {
                report(
                    "client_keys.file".into(),
                    "must name the client keys file".into(),
                );
            }
        }
        if self.watch.poll_interval < Duration::from_millis(50) {
            report("watch.poll_interval".into(), "must be at least 50ms".into());
        }
        if let ListenAddr::Tcp(a) = &self.extproc.listen {
            if a.port() != 0
                && a.port() == self.admin.listen.port()
                && a.ip() == self.admin.listen.ip()
            {
                report(
                    "admin.listen".into(),
                    "must differ from extproc.listen".into(),
                );
            }
            if self.extproc.secret_file.is_none() && self.extproc.tls.is_none() {
                report(
                    "extproc.listen".into(),
                    format!(
                        "TCP ({a}) lets anyone who reaches the port ask for the provider keys: \
                         set extproc.secret_file (a shared secret Envoy presents on every stream) \
                         or extproc.tls (mutual TLS), or listen on a Unix socket (unix:/path)"
                    ),
                );
            }
        } else if self.extproc.tls.is_some() {
            report(
                "extproc.tls".into(),
                "TLS applies to TCP only; a Unix socket is guarded by its file mode".into(),
            );
        }
        if let Some(tls) = &self.extproc.tls {
            if let Err(m) = check_dns_name(&tls.server_name) {
                report("extproc.tls.server_name".into(), m);
            }
        }
        problems
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

/// Backend names become Envoy cluster names and a header value: keep them to
/// a safe alphabet.
fn check_backend_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "{name:?} may only use letters, digits, '-', '_' and '.'"
        ));
    }
    if RESERVED_CLUSTER_NAMES.contains(&name) {
        return Err(format!(
            "{name:?} is reserved for the gateway's own Envoy cluster"
        ));
    }
    Ok(())
}

/// A DNS name for SNI and the certificate check.
fn check_dns_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a DNS name"))
    }
}

/// The longest model name accepted, in the config and from clients.
pub const MAX_MODEL_NAME_LEN: usize = 256;

/// A model name must be able to travel in a header: no control characters
/// (which also rules out CR/LF header injection), bounded length.
pub fn check_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_MODEL_NAME_LEN {
        return Err(format!("is longer than {MAX_MODEL_NAME_LEN} bytes"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    if name.trim() != name {
        return Err("must not start or end with white space".into());
    }
    Ok(())
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
  - {name: tars, url: "ftp://x", api_key_file: k}
  - {name: tars, url: "https://h", api_key_file: ""}
  - {name: "bad name", url: "https://u:p@h", api_key_file: k}
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
            "backends[0].url",
            "backends[1].name",
            "backends[1].api_key_file",
            "backends[2].name",
            "backends[2].url",
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
    fn backend_url_parts() {
        let u = BackendUrl::parse("https://api.router.tetrate.ai").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path_prefix.as_str()),
            (true, "api.router.tetrate.ai", 443, "")
        );
        assert_eq!(u.authority(), "api.router.tetrate.ai");
        let u = BackendUrl::parse("http://127.0.0.1:8080/openai/").unwrap();
        assert_eq!(
            (u.tls, u.port, u.path_prefix.as_str()),
            (false, 8080, "/openai")
        );
        assert_eq!(u.authority(), "127.0.0.1:8080");
        let u = BackendUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!(u.authority(), "[::1]:9000");
        assert!(BackendUrl::parse("https://h/?q=1").is_err());
        assert!(BackendUrl::parse("api.router.tetrate.ai").is_err());
    }

    #[test]
    fn model_names_must_be_header_safe() {
        assert!(check_model_name("xai/grok-4.5").is_ok());
        assert!(check_model_name("vertex/gemini-2.5-pro:latest").is_ok());
        assert!(check_model_name("").is_err());
        assert!(check_model_name("a\r\nx-evil: 1").is_err());
        assert!(check_model_name("tab\there").is_err());
        assert!(check_model_name(&"m".repeat(MAX_MODEL_NAME_LEN + 1)).is_err());
        assert!(check_model_name(" padded").is_err());
    }

    /// TCP without a way to tell Envoy from anyone else is refused.
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

    #[test]
    fn listen_addr_forms() {
        assert_eq!(
            "localhost:9".parse::<ListenAddr>().unwrap().to_string(),
            "127.0.0.1:9"
        );
        assert_eq!(
            "[::1]:9".parse::<ListenAddr>().unwrap().to_string(),
            "[::1]:9"
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("example.com:9".parse::<ListenAddr>().is_err());
    }
}
