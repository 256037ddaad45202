//! Who may open an ext_proc stream.
//!
//! A stream can ask the processor to route a request and get back the
//! `Authorization` header with a provider key, so only Envoy may open one:
//! - on a Unix socket, the socket's file mode decides (see `listener`);
//! - on TCP with mutual TLS, the TLS handshake decides;
//! - on TCP with a shared secret, every stream must carry it as gRPC
//!   metadata ([`SECRET_HEADER`]), which Envoy sends from its bootstrap
//!   (`initial_metadata`, rendered by `envoy-config`). It is compared in
//!   constant time, as digests, so neither its content nor its length leaks.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::codegen::http::HeaderMap;
use tonic::Status;

use crate::regular_file::{self, ReadError};

/// The gRPC metadata entry carrying the shared secret.
pub const SECRET_HEADER: &str = "x-ai-gateway-secret";

/// Shortest secret accepted: `head -c 32 /dev/urandom | base64` gives 44.
pub const MIN_SECRET_LEN: usize = 32;

/// Refused streams are logged at most this often (an attacker must not be
/// able to flood the log).
const REFUSAL_LOG_INTERVAL_S: u64 = 60;

/// Why the secret file cannot be used. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read extproc.secret_file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: ReadError,
    },
    #[error("extproc.secret_file {path}: the secret must be at least {MIN_SECRET_LEN} printable ASCII characters without spaces (e.g. `head -c 32 /dev/urandom | base64`)")]
    Weak { path: String },
}

/// Reads the shared secret: trimmed, printable ASCII (it travels as a
/// header value), at least [`MIN_SECRET_LEN`] long.
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let shown = path.display().to_string();
    let content = regular_file::read(path, 4096).map_err(|source| SecretError::Read {
        path: shown.clone(),
        source,
    })?;
    let secret = content.trim_ascii();
    if secret.len() < MIN_SECRET_LEN || !secret.iter().all(u8::is_ascii_graphic) {
        return Err(SecretError::Weak { path: shown });
    }
    // Printable ASCII is UTF-8.
    Ok(String::from_utf8_lossy(secret).into_owned())
}

/// The check every ext_proc stream passes before its first message.
#[derive(Default)]
pub struct StreamAuth {
    /// SHA-256 of the shared secret, when streams must present one.
    secret: Option<[u8; 32]>,
    last_refusal_log: AtomicU64,
}

impl StreamAuth {
    /// Streams are let in by the transport (Unix socket mode, mutual TLS).
    pub fn transport() -> Self {
        Self::default()
    }

    /// Streams must present `secret`.
    pub fn shared_secret(secret: &str) -> Self {
        Self {
            secret: Some(Sha256::digest(secret.as_bytes()).into()),
            last_refusal_log: AtomicU64::new(0),
        }
    }

    /// Lets the stream in, or says why not (without saying what was expected).
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Status> {
        let Some(expected) = &self.secret else {
            return Ok(());
        };
        let presented = headers
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(presented).into();
        if bool::from(digest.ct_eq(expected)) && !presented.is_empty() {
            return Ok(());
        }
        self.log_refusal(presented.is_empty());
        Err(Status::unauthenticated(
            "this ext_proc endpoint serves only its Envoy",
        ))
    }

    fn log_refusal(&self, missing: bool) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_refusal_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= REFUSAL_LOG_INTERVAL_S
            && self
                .last_refusal_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let what = if missing { "without" } else { "with a wrong" };
            tracing::warn!(
                "refused an ext_proc stream {what} secret: something other than Envoy is talking to the processor (logged at most once a minute)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(secret: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(s) = secret {
            h.insert(SECRET_HEADER, s.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_secret_opens_a_stream() {
        let secret = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t";
        let auth = StreamAuth::shared_secret(secret);
        assert!(auth.check(&headers(Some(secret))).is_ok());
        for wrong in [None, Some(""), Some("s3cr3t"), Some(&format!("{secret}x"))] {
            let err = auth.check(&headers(wrong)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong:?}");
            assert!(!err.message().contains(secret));
        }
        assert!(StreamAuth::transport().check(&headers(None)).is_ok());
    }

    #[test]
    fn weak_or_odd_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        for (content, ok) in [
            ("short", false),
            ("with spaces with spaces with spaces x", false),
            ("0123456789abcdef0123456789abcdef\n", true),
        ] {
            std::fs::write(&file, content).unwrap();
            let r = read_secret(&file);
            assert_eq!(r.is_ok(), ok, "{content:?}");
            if let Err(e) = r {
                assert!(!e.to_string().contains(content.trim()), "{e}");
            }
        }
    }
}
