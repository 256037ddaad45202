//! Client keys: the gateway keys clients must present (`Authorization:
//! Bearer <key>` or `x-api-key`) when `client_keys.file` is configured, each
//! with the models it may use.
//!
//! The keys file is YAML:
//!
//! ```yaml
//! keys:
//!   - name: ci                     # shown in logs
//!     sha256: 3f1b9c...            # hex SHA-256 of the key (preferred)
//!     models: ["gpt-4o-mini", "claude-*"]   # globs; absent: every model
//!   - name: alice
//!     key: gw-alice-3c1f0b2e9d5a   # or the key itself; hashed at load
//!     limits: {requests_per_minute: 60, usd_per_day: 20}   # see `spend`
//! ```
//!
//! Only digests are kept in memory. A presented key is hashed and compared
//! with every stored digest in constant time, so neither the comparison nor
//! its timing tells anything about a stored key.
//!
//! A file that would let a request in without a real key is refused at
//! load, naming the entry: the digest of the empty string (what
//! `printf %s "$KEY" | sha256sum` prints when `$KEY` is unset) and keys
//! shorter than [`MIN_KEY_LEN`]. A request without a credential never
//! matches an entry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{check_backend_name, Limits, NameError};
use crate::regular_file::ReadError;
use crate::routes::glob_match;
use crate::watched_file::{self, Reload};

/// Shortest key accepted in the `key:` form: a gateway key must not be
/// guessable.
pub const MIN_KEY_LEN: usize = 16;

/// SHA-256 of the empty string: never a key.
const EMPTY_DIGEST: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// One client key, as kept in memory.
#[derive(Debug)]
pub struct ClientKey {
    /// Shown in logs and metrics, and the key's name in the spend store
    /// (never the key or its digest).
    pub name: Arc<str>,
    digest: [u8; 32],
    /// Model globs this key may use; empty: all.
    models: Vec<String>,
    /// Its budgets and rate limits; empty: none.
    pub limits: Limits,
}

impl ClientKey {
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| glob_match(m, model))
    }
}

/// The keys of one version of the keys file.
#[derive(Debug, Default)]
pub struct ClientKeySet {
    keys: Vec<Arc<ClientKey>>,
}

/// What is wrong with one entry of the keys file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error("give exactly one of `sha256` or `key`")]
    NotOneOf,
    #[error("sha256 must be 64 hex digits")]
    BadDigest,
    #[error("sha256 is the digest of the empty string (was the key's variable unset when it was hashed?)")]
    EmptyDigest,
    #[error("the key is shorter than {MIN_KEY_LEN} characters")]
    TooShort,
    #[error("the name {0}")]
    Name(NameError),
    #[error("limits.{0}: {1}")]
    Limit(&'static str, String),
    #[error("the name is used by an earlier entry")]
    DuplicateName,
}

/// Why a keys file cannot be used. Never contains a key.
#[derive(Debug, thiserror::Error)]
pub enum ClientKeysError {
    #[error("cannot read client keys file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: ReadError,
    },
    /// serde's messages can quote the offending value: only the place is kept.
    #[error("client keys file {path}: not a valid keys file{}", at(*.line))]
    Syntax {
        path: PathBuf,
        line: Option<(usize, usize)>,
    },
    #[error("client keys file {path}: keys[{index}] ({name:?}): {problem}")]
    Entry {
        path: PathBuf,
        index: usize,
        name: String,
        problem: EntryProblem,
    },
}

fn at(line: Option<(usize, usize)>) -> String {
    line.map(|(l, c)| format!(" (line {l}, column {c})"))
        .unwrap_or_default()
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
    #[serde(default)]
    limits: Limits,
}

impl ClientKeySet {
    /// Reads and parses the keys file at `path`.
    pub fn load(path: &Path) -> Result<Self, ClientKeysError> {
        let text = watched_file::read(path).map_err(|source| ClientKeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses a keys file; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ClientKeysError> {
        let file: FileFormat =
            serde_yaml_ng::from_str(text).map_err(|e| ClientKeysError::Syntax {
                path: path.to_path_buf(),
                line: e.location().map(|l| (l.line(), l.column())),
            })?;
        let mut keys: Vec<Arc<ClientKey>> = Vec::with_capacity(file.keys.len());
        for (index, e) in file.keys.into_iter().enumerate() {
            let refuse = |problem| ClientKeysError::Entry {
                path: path.to_path_buf(),
                index,
                name: e.name.clone(),
                problem,
            };
            // Names go into logs, metric labels and Redis keys.
            check_backend_name(&e.name).map_err(|n| refuse(EntryProblem::Name(n)))?;
            if keys.iter().any(|k| *k.name == *e.name) {
                return Err(refuse(EntryProblem::DuplicateName));
            }
            if let Some((field, message)) = e.limits.problems().into_iter().next() {
                return Err(refuse(EntryProblem::Limit(field, message)));
            }
            let digest = entry_digest(&e).map_err(refuse)?;
            keys.push(Arc::new(ClientKey {
                name: e.name.as_str().into(),
                digest,
                models: e.models,
                limits: e.limits,
            }));
        }
        Ok(Self { keys })
    }

    /// The key whose digest matches `presented`, compared in constant time
    /// against every stored key. An empty credential matches nothing.
    pub fn authorize(&self, presented: &[u8]) -> Option<Arc<ClientKey>> {
        if presented.is_empty() {
            return None;
        }
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

    /// Every key of the file.
    pub fn keys(&self) -> impl Iterator<Item = &ClientKey> {
        self.keys.iter().map(|k| &**k)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn entry_digest(e: &Entry) -> Result<[u8; 32], EntryProblem> {
    let digest = match (&e.sha256, &e.key) {
        (Some(hex), None) => parse_hex_digest(hex).ok_or(EntryProblem::BadDigest)?,
        (None, Some(key)) => {
            let key = key.trim();
            if key.chars().count() < MIN_KEY_LEN {
                return Err(EntryProblem::TooShort);
            }
            Sha256::digest(key.as_bytes()).into()
        }
        _ => return Err(EntryProblem::NotOneOf),
    };
    if digest == EMPTY_DIGEST {
        return Err(EntryProblem::EmptyDigest);
    }
    Ok(digest)
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

/// The client keys in force; `None` inside when the config has no
/// `client_keys` (anyone who reaches the gateway may use it).
#[derive(Default)]
pub struct ClientKeys {
    current: ArcSwap<Option<ClientKeySet>>,
}

impl ClientKeys {
    /// The keys in force, or `None` when access is open.
    pub fn current(&self) -> arc_swap::Guard<Arc<Option<ClientKeySet>>> {
        self.current.load()
    }

    pub fn replace(&self, keys: Option<ClientKeySet>) {
        self.current.store(Arc::new(keys));
    }
}

/// Reloads the keys file into [`ClientKeys`] (see `watched_file`).
pub struct ClientKeysReload {
    pub keys: Arc<ClientKeys>,
}

impl Reload for ClientKeysReload {
    const WHAT: &'static str = "client keys";
    type Parsed = ClientKeySet;
    type Error = ClientKeysError;

    fn parse(&self, path: &Path, text: &str) -> Result<ClientKeySet, ClientKeysError> {
        ClientKeySet::parse(path, text)
    }

    async fn apply(&mut self, keys: ClientKeySet) {
        tracing::info!(keys = keys.len(), "client keys reloaded");
        self.keys.replace(Some(keys));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClientKeySet, ClientKeysError> {
        ClientKeySet::parse(Path::new("keys.yaml"), text)
    }

    const FILE: &str = r#"
keys:
  - name: ci
    sha256: "DIGEST"
    models: ["gpt-4o-mini", "claude-*"]
  - name: alice
    key: " gw-alice-0123456789 "
"#;

    fn hex(digest: &[u8]) -> String {
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn authorizes_by_digest_and_plain_key() {
        let file = FILE.replace("DIGEST", &hex(&Sha256::digest(b"ci-3f1b9c2d7e4a8b6f")));
        let keys = parse(&file).unwrap();
        let ci = keys.authorize(b"ci-3f1b9c2d7e4a8b6f").unwrap();
        assert_eq!(&*ci.name, "ci");
        assert!(ci.allows("gpt-4o-mini") && ci.allows("claude-sonnet-4") && !ci.allows("gpt-5"));
        let alice = keys.authorize(b"gw-alice-0123456789").unwrap();
        assert!(alice.allows("anything"));
        assert!(keys.authorize(b"wrong").is_none());
        assert!(keys.authorize(b"").is_none());
    }

    /// Table: every way a file could let a request in without a real key.
    #[test]
    fn entries_that_would_open_the_gateway_are_refused() {
        let empty = hex(&Sha256::digest(b""));
        let cases: &[(&str, EntryProblem)] = &[
            ("{name: x, sha256: EMPTY}", EntryProblem::EmptyDigest),
            ("{name: x, key: short}", EntryProblem::TooShort),
            ("{name: x, key: '   '}", EntryProblem::TooShort),
            ("{name: x, key: '123456789012345'}", EntryProblem::TooShort),
            ("{name: x, sha256: nothex}", EntryProblem::BadDigest),
            (
                "{name: x, key: gw-0123456789abcdef, limits: {requests_per_minute: 0}}",
                EntryProblem::Limit(
                    "requests_per_minute",
                    "must be more than 0 (leave it out for no limit)".into(),
                ),
            ),
            ("{name: x}", EntryProblem::NotOneOf),
            (
                "{name: x, key: sk-secret-1234567890, sha256: abc}",
                EntryProblem::NotOneOf,
            ),
        ];
        for (entry, want) in cases {
            let text = format!("keys:\n  - {}\n", entry.replace("EMPTY", &empty));
            match parse(&text) {
                Err(ClientKeysError::Entry {
                    index,
                    name,
                    problem,
                    ..
                }) => {
                    assert_eq!((index, name.as_str(), &problem), (0, "x", want), "{entry}");
                }
                other => panic!("{entry}: expected {want:?}, got {other:?}"),
            }
        }
        assert!(parse("keys:\n  - {name: x, key: '1234567890123456'}\n").is_ok());
        // Names must be safe as labels and store keys, and unique.
        for text in [
            "keys:\n  - {name: 'a b', key: gw-0123456789abcdef}\n",
            "keys:\n  - {name: '*', key: gw-0123456789abcdef}\n",
            "keys:\n  - {name: a, key: gw-0123456789abcdef}\n  - {name: a, key: gw-fedcba9876543210}\n",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
        let limited = parse("keys:\n  - {name: t, key: gw-0123456789abcdef, limits: {requests_per_minute: 60, usd_per_day: 2.5}}\n").unwrap();
        let t = limited.authorize(b"gw-0123456789abcdef").unwrap();
        assert_eq!(t.limits.requests_per_minute, Some(60));
        assert_eq!(t.limits.usd_per_day, Some(2.5));
    }

    #[test]
    fn errors_never_echo_a_key() {
        for text in [
            "keys:\n  - {name: x, key: sk-secret-1, sha256: abc}\n",
            "keys: [{name: x, key: sk-secret-2, extra: sk-secret-3}]",
            "keys: [{name: x, key: sk-secret-4",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.contains("sk-secret"), "{err}");
            assert!(err.contains("keys.yaml"), "{err}");
        }
    }
}
