//! Listen addresses: TCP `host:port` (no DNS) or `unix:/path`, and the
//! mode of a Unix socket.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// A listen address: TCP `host:port`, or `unix:/path` for a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Why a listen address cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("`unix:` needs a socket path, e.g. unix:/run/ai-gateway/extproc.sock")]
    EmptySocketPath,
    #[error("invalid port in {0:?}")]
    Port(String),
    #[error("{0:?} is not an address of the form 127.0.0.1:1064 or [::1]:1064")]
    NotAnAddress(String),
}

impl FromStr for ListenAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrError::EmptySocketPath);
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
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, AddrError> {
    if let Some(port) = s.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| AddrError::Port(s.to_string()))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| AddrError::NotAnAddress(s.to_string()))
}

pub(super) fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s).map_err(serde::de::Error::custom)
}

pub(super) fn de_opt_socket_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_socket_addr(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// An octal file mode such as `"0660"` (a string, so YAML does not read it
/// as decimal). Only read and write bits for user and group make sense for
/// a socket; "other" must stay 0.
pub(super) fn de_socket_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            "unix:".parse::<ListenAddr>(),
            Err(AddrError::EmptySocketPath)
        );
        assert!("example.com:9".parse::<ListenAddr>().is_err());
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
    }
}
