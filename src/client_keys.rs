//! Who may spend the provider key: optional gateway keys that clients must
//! present (`Authorization: Bearer <key>` or `x-api-key`), each with the
//! models it may use.
//!
//! The keys file (`client_keys.file` in the config) is YAML:
//!
//! ```yaml
//! keys:
//!   - name: ci                     # shown in logs
//!     sha256: 5e884898da28...      # hex SHA-256 of the key (preferred)
//!     models: ["gpt-4o-mini", "claude-*"]   # globs; absent: every model
//!   - name: alice
//!     key: gw-alice-secret         # or the key itself; hashed at load
//! ```
//!
//! Only digests are kept in memory. A presented key is hashed and compared
//! with every stored digest in constant time, so neither the comparison nor
//! its timing tells anything about a stored key. The file is watched like
//! the config: a valid new file applies to new requests, an invalid one is
//! refused and the old keys stay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::routes::glob_match;
use crate::watch::{TextChange, TextFile};

/// One client key, as kept in memory.
#[derive(Debug)]
pub struct ClientKey {
    pub name: String,
    digest: [u8; 32],
    /// Model globs this key may use; empty: all.
    models: Vec<String>,
}

impl ClientKey {
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| glob_match(m, model))
    }
}

/// A loaded keys file.
#[derive(Debug, Default)]
pub struct ClientKeys {
    keys: Vec<Arc<ClientKey>>,
}

/// Why a keys file cannot be used. Never contains a key.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read client keys file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("client keys file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    keys: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    models: Vec<String>,
}

impl ClientKeys {
    pub fn load(path: &Path) -> Result<Self, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| AccessError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses a keys file; errors name the entry, never echo a key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: FileFormat = serde_yaml_ng::from_str(text).map_err(|e| {
            // serde's messages can quote the offending value: keep the place only.
            match e.location() {
                Some(l) => format!(
                    "not a valid keys file (line {}, column {})",
                    l.line(),
                    l.column()
                ),
                None => "not a valid keys file".to_string(),
            }
        })?;
        let mut keys = Vec::with_capacity(file.keys.len());
        for (i, e) in file.keys.into_iter().enumerate() {
            let at = format!("keys[{i}] ({:?})", e.name);
            let digest = match (e.sha256, e.key) {
                (Some(hex), None) => {
                    parse_hex_digest(&hex).ok_or(format!("{at}: sha256 must be 64 hex digits"))?
                }
                (None, Some(key)) if !key.trim().is_empty() => {
                    Sha256::digest(key.trim().as_bytes()).into()
                }
                _ => return Err(format!("{at}: give exactly one of `sha256` or `key`")),
            };
            keys.push(Arc::new(ClientKey {
                name: e.name,
                digest,
                models: e.models,
            }));
        }
        Ok(Self { keys })
    }

    /// The key whose digest matches `presented`, compared in constant time
    /// against every stored key.
    pub fn authorize(&self, presented: &[u8]) -> Option<Arc<ClientKey>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(Arc::clone(k));
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// The keys in force; `None` inside when the config has no `client_keys`.
#[derive(Default)]
pub struct AccessControl {
    current: ArcSwap<Option<ClientKeys>>,
}

impl AccessControl {
    /// The keys in force, or `None` when access is open.
    pub fn keys(&self) -> arc_swap::Guard<Arc<Option<ClientKeys>>> {
        self.current.load()
    }

    pub fn replace(&self, keys: Option<ClientKeys>) {
        self.current.store(Arc::new(keys));
    }
}

/// Watches the keys file and swaps in each valid new version.
pub struct AccessWatcher {
    file: TextFile,
    access: Arc<AccessControl>,
}

impl AccessWatcher {
    pub fn new(path: PathBuf, access: Arc<AccessControl>, poll_interval: Duration) -> Self {
        Self {
            file: TextFile::new(path, poll_interval),
            access,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                change = self.file.next_change() => self.apply(change).await,
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn apply(&mut self, change: TextChange) {
        let file = self.file.path().display().to_string();
        let text = match change {
            TextChange::Changed(text) => text,
            TextChange::Unreadable(e) => {
                tracing::error!(file, error = %e, "cannot read the client keys file; keeping the keys in force");
                return;
            }
        };
        let mut parsed = ClientKeys::parse(&text);
        if parsed.is_err() {
            if let Some(again) = self.file.settle(&text).await {
                parsed = ClientKeys::parse(&again);
            }
        }
        match parsed {
            Ok(keys) => {
                tracing::info!(file, keys = keys.len(), "client keys reloaded");
                self.access.replace(Some(keys));
            }
            Err(message) => tracing::error!(
                file,
                "client keys reload refused, the keys in force stay: {message}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
keys:
  - name: ci
    sha256: "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
    models: ["gpt-4o-mini", "claude-*"]
  - name: alice
    key: " gw-alice "
"#;

    #[test]
    fn authorizes_by_digest_and_plain_key() {
        let keys = ClientKeys::parse(FILE).unwrap();
        // sha256("secret")
        let ci = keys.authorize(b"secret").unwrap();
        assert_eq!(ci.name, "ci");
        assert!(ci.allows("gpt-4o-mini") && ci.allows("claude-sonnet-4") && !ci.allows("gpt-5"));
        let alice = keys.authorize(b"gw-alice").unwrap();
        assert!(alice.allows("anything"));
        assert!(keys.authorize(b"wrong").is_none());
        assert!(keys.authorize(b"").is_none());
    }

    #[test]
    fn bad_files_name_the_entry_but_never_a_key() {
        let err =
            ClientKeys::parse("keys:\n  - {name: x, key: sk-secret-1, sha256: abc}\n").unwrap_err();
        assert!(
            err.contains("keys[0]") && !err.contains("sk-secret-1"),
            "{err}"
        );
        let err = ClientKeys::parse("keys:\n  - {name: x, sha256: nothex}\n").unwrap_err();
        assert!(err.contains("64 hex"), "{err}");
        let err = ClientKeys::parse("keys: [{name: x, key: sk-secret-2, extra: sk-secret-3}]")
            .unwrap_err();
        assert!(!err.contains("sk-secret"), "{err}");
    }
}
