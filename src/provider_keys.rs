//! Provider keys: read from files, watched, swapped atomically.
//!
//! The data path reads a [`KeyStore`] snapshot (one atomic load, no lock);
//! the [`SecretWatcher`] task re-reads the key files when they may have
//! changed and publishes a new snapshot only when a key really changed.
//!
//! A key file that turns empty, unreadable or malformed keeps the last good
//! key in force: a half-written rotation must not take the gateway down. The
//! key itself is never logged, formatted or put in an error: [`ApiKey`]'s
//! `Debug` is redacted and it has no `Display`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::watch::FileWatcher;

/// Key files are a few dozen bytes; anything this large is a wrong path.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// A provider key, held as the ready-made `Authorization` header value.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    authorization: Arc<str>,
}

impl ApiKey {
    /// The `Authorization` header value: `Bearer <key>`.
    pub fn authorization(&self) -> &str {
        &self.authorization
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why a key file gave no usable key. Never contains the file's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the key file: {0}")]
    Unreadable(String),
    #[error("the key file is empty")]
    Empty,
    #[error("the key file is larger than {MAX_KEY_FILE_BYTES} bytes; is it the right file?")]
    TooLarge,
    #[error("the key contains characters that cannot go into an HTTP header (white space, control or non-ASCII characters)")]
    Malformed,
}

/// Parses a key file's content: surrounding white space is trimmed, and the
/// key must be a single printable ASCII token.
pub fn parse_key(content: &[u8]) -> Result<ApiKey, KeyFileError> {
    let key = content.trim_ascii();
    if key.is_empty() {
        return Err(KeyFileError::Empty);
    }
    if !key.iter().all(|b| b.is_ascii_graphic()) {
        return Err(KeyFileError::Malformed);
    }
    // All bytes are ASCII, so this is valid UTF-8.
    let key = std::str::from_utf8(key).map_err(|_| KeyFileError::Malformed)?;
    Ok(ApiKey {
        authorization: format!("Bearer {key}").into(),
    })
}

/// The keys in force, by key file.
#[derive(Default)]
pub struct KeyStore {
    current: ArcSwap<HashMap<PathBuf, ApiKey>>,
}

impl KeyStore {
    /// The key currently loaded from `file`, if any.
    pub fn get(&self, file: &Path) -> Option<ApiKey> {
        self.current.load().get(file).cloned()
    }

    /// Whether a key is loaded from `file`.
    pub fn has(&self, file: &Path) -> bool {
        self.current.load().contains_key(file)
    }

    fn publish(&self, keys: HashMap<PathBuf, ApiKey>) {
        self.current.store(Arc::new(keys));
    }
}

/// A key file and the backends that use it (for logs and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    pub file: PathBuf,
    pub backends: Vec<String>,
}

/// What the watcher remembers of one file between reads.
#[derive(Default)]
struct FileState {
    key: Option<ApiKey>,
    generation: i64,
    /// The last error logged, so a persisting problem is logged once.
    last_error: Option<KeyFileError>,
}

/// The task that keeps a [`KeyStore`] in step with the key files.
pub struct SecretWatcher {
    store: Arc<KeyStore>,
    sources: watch::Receiver<Vec<KeySource>>,
    poll_interval: Duration,
    metrics: Arc<Metrics>,
    files: HashMap<PathBuf, FileState>,
}

impl SecretWatcher {
    /// `sources` carries the files to watch; a config reload sends a new set.
    pub fn new(
        store: Arc<KeyStore>,
        sources: watch::Receiver<Vec<KeySource>>,
        poll_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            sources,
            poll_interval,
            metrics,
            files: HashMap::new(),
        }
    }

    /// Loads every key once, synchronously with the caller, so the gateway
    /// starts with its keys in place.
    pub async fn load_now(&mut self) {
        let sources = self.sources.borrow_and_update().clone();
        self.reload(&sources).await;
    }

    /// Watches until `shutdown` fires.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let sources = self.sources.borrow_and_update().clone();
            let mut watcher =
                FileWatcher::new(sources.iter().map(|s| s.file.as_path()), self.poll_interval);
            loop {
                tokio::select! {
                    _ = watcher.changed() => self.reload(&sources).await,
                    changed = self.sources.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// Re-reads every file and publishes a new snapshot if any key changed
    /// or a file left the set.
    async fn reload(&mut self, sources: &[KeySource]) {
        let mut changed = false;
        let before = self.files.len();
        self.files
            .retain(|file, _| sources.iter().any(|s| &s.file == file));
        changed |= self.files.len() != before;

        for source in sources {
            let mut result = read_key_file(&source.file).await;
            if result.is_err() {
                // Possibly caught mid-write (truncated, not yet written):
                // look again before keeping the old key and logging.
                tokio::time::sleep(crate::watch::TRANSIENT_RECHECK).await;
                result = read_key_file(&source.file).await;
            }
            let state = self.files.entry(source.file.clone()).or_default();
            let backends = source.backends.join(",");
            match result {
                Ok(key) => {
                    if state.key.as_ref() != Some(&key) {
                        state.key = Some(key);
                        state.generation += 1;
                        changed = true;
                        tracing::info!(
                            backends = %backends,
                            file = %source.file.display(),
                            generation = state.generation,
                            "API key loaded"
                        );
                        for b in &source.backends {
                            self.metrics
                                .key_reloads
                                .with_label_values(&[b.as_str(), "success"])
                                .inc();
                            self.metrics
                                .key_generation
                                .with_label_values(&[b.as_str()])
                                .set(state.generation);
                            self.metrics
                                .key_last_success
                                .with_label_values(&[b.as_str()])
                                .set(unix_now());
                        }
                    }
                    state.last_error = None;
                }
                Err(e) => {
                    if state.last_error.as_ref() != Some(&e) {
                        let kept = if state.key.is_some() {
                            "keeping the last good key"
                        } else {
                            "no key loaded: requests to these backends get 503"
                        };
                        tracing::error!(
                            backends = %backends,
                            file = %source.file.display(),
                            error = %e,
                            "API key not (re)loaded; {kept}"
                        );
                        for b in &source.backends {
                            self.metrics
                                .key_reloads
                                .with_label_values(&[b.as_str(), "failure"])
                                .inc();
                        }
                        state.last_error = Some(e);
                    }
                }
            }
        }

        if changed {
            let snapshot = self
                .files
                .iter()
                .filter_map(|(file, s)| Some((file.clone(), s.key.clone()?)))
                .collect();
            self.store.publish(snapshot);
        }
    }
}

async fn read_key_file(path: &Path) -> Result<ApiKey, KeyFileError> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| KeyFileError::Unreadable(e.to_string()))?;
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::TooLarge);
    }
    let content = tokio::fs::read(path)
        .await
        .map_err(|e| KeyFileError::Unreadable(e.to_string()))?;
    parse_key(&content)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The key sources of a set of backends, grouped by file.
pub fn sources_of<'a>(backends: impl IntoIterator<Item = (&'a str, &'a Path)>) -> Vec<KeySource> {
    let mut out: Vec<KeySource> = Vec::new();
    for (name, file) in backends {
        match out.iter_mut().find(|s| s.file == file) {
            Some(s) => s.backends.push(name.to_string()),
            None => out.push(KeySource {
                file: file.to_path_buf(),
                backends: vec![name.to_string()],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_trims_and_formats() {
        let k = parse_key(b"  sk-abc123\n").unwrap();
        assert_eq!(k.authorization(), "Bearer sk-abc123");
    }

    #[test]
    fn parse_rejects_bad_content() {
        assert_eq!(parse_key(b"").unwrap_err(), KeyFileError::Empty);
        assert_eq!(parse_key(b" \n\t").unwrap_err(), KeyFileError::Empty);
        assert_eq!(
            parse_key(b"sk-a\r\nx-evil: 1").unwrap_err(),
            KeyFileError::Malformed
        );
        assert_eq!(
            parse_key(b"two words").unwrap_err(),
            KeyFileError::Malformed
        );
        assert_eq!(
            parse_key("sk-é".as_bytes()).unwrap_err(),
            KeyFileError::Malformed
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = parse_key(b"sk-secret-value").unwrap();
        let shown = format!("{k:?} {:?}", Some(&k));
        assert!(!shown.contains("sk-secret-value"), "{shown}");
    }

    #[test]
    fn sources_group_backends_by_file() {
        let s = sources_of([
            ("a", Path::new("/k1")),
            ("b", Path::new("/k2")),
            ("c", Path::new("/k1")),
        ]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].backends, ["a", "c"]);
    }

    #[tokio::test]
    async fn keeps_last_good_key_when_file_empties_or_vanishes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apiKey");
        std::fs::write(&file, "sk-one\n").unwrap();
        let store = Arc::new(KeyStore::default());
        let (_tx, rx) = watch::channel(sources_of([("tars", file.as_path())]));
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut w = SecretWatcher::new(store.clone(), rx, Duration::from_secs(1), metrics);
        w.load_now().await;
        assert_eq!(store.get(&file).unwrap().authorization(), "Bearer sk-one");

        std::fs::write(&file, "").unwrap();
        w.load_now().await;
        assert_eq!(store.get(&file).unwrap().authorization(), "Bearer sk-one");

        std::fs::remove_file(&file).unwrap();
        w.load_now().await;
        assert_eq!(store.get(&file).unwrap().authorization(), "Bearer sk-one");

        std::fs::write(&file, "sk-two").unwrap();
        w.load_now().await;
        assert_eq!(store.get(&file).unwrap().authorization(), "Bearer sk-two");
    }

    #[tokio::test]
    async fn missing_file_means_no_key() {
        let store = Arc::new(KeyStore::default());
        let (_tx, rx) = watch::channel(sources_of([("tars", Path::new("/nonexistent/key"))]));
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut w = SecretWatcher::new(store.clone(), rx, Duration::from_secs(1), metrics);
        w.load_now().await;
        assert!(!store.has(Path::new("/nonexistent/key")));
    }
}
