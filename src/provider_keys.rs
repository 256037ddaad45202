//! Provider keys: the keys the gateway sends to providers, one per backend,
//! read from files (mounted Kubernetes Secrets), watched, swapped atomically.
//!
//! The data path reads [`ProviderKeys`] (one atomic load, no lock); the
//! [`ProviderKeyWatcher`] task re-reads the key files when they may have
//! changed and publishes a new set only when a key really changed.
//!
//! A key in force is never replaced by nothing:
//! - a file that turns empty, unreadable or malformed keeps the last good
//!   key (a half-written rotation must not take the gateway down);
//! - a config reload that points a backend at another file keeps the key
//!   from the old file until the new one can be read (a typo in
//!   `api_key_file` must not drop a working key).
//!
//! - a backend a config reload removes keeps its key for
//!   [`RETIRED_KEY_GRACE`]: a request routed to it by the old config just
//!   before the reload still gets it.
//!
//! Either way the key in force may be stale, so it is made visible: the
//! error is logged when it starts and again every [`STALE_LOG_INTERVAL`]
//! while it lasts, and the metrics carry each backend's key age, failed
//! reads and whether its file is failing now.
//!
//! The key itself is never logged, formatted or put in an error: [`ApiKey`]'s
//! `Debug` is redacted and it has no `Display`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;
use crate::regular_file::{self, ReadError};
use crate::watch::{FileWatcher, TRANSIENT_RECHECK};

/// Key files are a few dozen bytes; anything this large is a wrong path.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// How long a backend removed from the config keeps its key. A request
/// picks its snapshot at its headers and its key at its body: longer than
/// any request waits between the two.
pub const RETIRED_KEY_GRACE: Duration = Duration::from_secs(30);

/// While a key file cannot be read, its error is logged again this often.
pub const STALE_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
    #[error("cannot read the key file: {message}")]
    Unreadable {
        /// A fixed name for the metric label.
        reason: &'static str,
        message: String,
    },
    #[error("the key file is empty")]
    Empty,
    #[error("the key contains characters that cannot go into an HTTP header (white space, control or non-ASCII characters)")]
    Malformed,
}

impl KeyFileError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Unreadable { reason, .. } => reason,
            Self::Empty => "empty",
            Self::Malformed => "malformed",
        }
    }
}

impl From<ReadError> for KeyFileError {
    fn from(e: ReadError) -> Self {
        Self::Unreadable {
            reason: e.reason(),
            message: e.to_string(),
        }
    }
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

/// The keys in force, by backend name.
#[derive(Default)]
pub struct ProviderKeys {
    current: ArcSwap<HashMap<Box<str>, ApiKey>>,
}

impl ProviderKeys {
    /// The key in force for `backend`, if one was ever loaded.
    pub fn get(&self, backend: &str) -> Option<ApiKey> {
        self.current.load().get(backend).cloned()
    }

    /// Whether a key is in force for `backend`.
    pub fn has(&self, backend: &str) -> bool {
        self.current.load().contains_key(backend)
    }

    /// A fixed set of keys, by backend (tests, fuzzing).
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let store = Self::default();
        store.publish(
            keys.into_iter()
                .filter_map(|(backend, key)| {
                    Some((backend.into(), parse_key(key.as_bytes()).ok()?))
                })
                .collect(),
        );
        store
    }

    fn publish(&self, keys: HashMap<Box<str>, ApiKey>) {
        self.current.store(Arc::new(keys));
    }
}

/// Where one backend's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    pub backend: String,
    pub file: PathBuf,
}

/// A new set of key files, from a config reload; answered once every file
/// of the set has been read, so a new backend has its key before the
/// configuration that names it is put in force.
struct SourcesUpdate {
    sources: Vec<KeySource>,
    done: oneshot::Sender<()>,
}

/// Hands new key sources to the watcher.
#[derive(Clone)]
pub struct KeySourcesHandle {
    tx: mpsc::Sender<SourcesUpdate>,
}

impl KeySourcesHandle {
    /// Watches `sources` from now on; returns once they have been read.
    pub async fn update(&self, sources: Vec<KeySource>) {
        let (done, read) = oneshot::channel();
        if self.tx.send(SourcesUpdate { sources, done }).await.is_ok() {
            let _ = read.await;
        }
    }
}

/// What the watcher remembers of one backend's key.
struct BackendKey {
    /// The file the key in force was read from.
    file: PathBuf,
    key: Option<ApiKey>,
    loaded: Option<SystemTime>,
    generation: i64,
    failure: Option<Failure>,
}

/// A key file that cannot be read (or parsed) now.
struct Failure {
    file: PathBuf,
    error: KeyFileError,
    since: Instant,
    logged: Instant,
}

impl Failure {
    /// Whether the failure is due to be logged again at `now` (it was last
    /// logged `interval` ago or more); if so, `now` counts as logged.
    fn due(&mut self, now: Instant, interval: Duration) -> bool {
        let due = now.duration_since(self.logged) >= interval;
        if due {
            self.logged = now;
        }
        due
    }
}

/// The task that keeps [`ProviderKeys`] in step with the key files.
pub struct ProviderKeyWatcher {
    keys: Arc<ProviderKeys>,
    sources: Vec<KeySource>,
    updates: mpsc::Receiver<SourcesUpdate>,
    poll_interval: Duration,
    metrics: Arc<Metrics>,
    backends: HashMap<String, BackendKey>,
    /// Backends the config no longer has, whose keys stay until then.
    retiring: HashMap<String, Instant>,
}

impl ProviderKeyWatcher {
    pub fn new(
        keys: Arc<ProviderKeys>,
        sources: Vec<KeySource>,
        poll_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> (Self, KeySourcesHandle) {
        let (tx, updates) = mpsc::channel(4);
        let watcher = Self {
            keys,
            sources,
            updates,
            poll_interval,
            metrics,
            backends: HashMap::new(),
            retiring: HashMap::new(),
        };
        (watcher, KeySourcesHandle { tx })
    }

    /// Loads every key once, so the gateway starts with its keys in place.
    pub async fn load_now(&mut self) {
        self.reload().await;
    }

    /// Watches until `shutdown` fires.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let mut files = FileWatcher::new(
                self.sources.iter().map(|s| s.file.as_path()),
                self.poll_interval,
            );
            loop {
                let retire_at = self.retiring.values().min().copied();
                tokio::select! {
                    _ = files.changed() => self.reload().await,
                    update = self.updates.recv() => {
                        let Some(update) = update else { return };
                        self.retire_missing(&update.sources);
                        self.sources = update.sources;
                        self.reload().await;
                        let _ = update.done.send(());
                        break;
                    }
                    _ = sleep_until_some(retire_at) => self.reload().await,
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// Backends with a key that `sources` no longer lists start their
    /// grace; listed ones end it.
    fn retire_missing(&mut self, sources: &[KeySource]) {
        let until = Instant::now() + RETIRED_KEY_GRACE;
        for backend in self.backends.keys() {
            if !sources.iter().any(|s| &s.backend == backend) {
                self.retiring.entry(backend.clone()).or_insert(until);
            }
        }
        self.retiring
            .retain(|backend, _| !sources.iter().any(|s| &s.backend == backend));
    }

    /// Re-reads every file (all at once: a slow file delays no other) and
    /// publishes a new set if any key changed or a backend left.
    async fn reload(&mut self) {
        let mut files: Vec<PathBuf> = self.sources.iter().map(|s| s.file.clone()).collect();
        files.sort();
        files.dedup();
        let results =
            futures_util::future::join_all(files.iter().cloned().map(read_key_file)).await;
        let read: HashMap<PathBuf, Result<ApiKey, KeyFileError>> =
            files.into_iter().zip(results).collect();

        let before = self.backends.len();
        let now = Instant::now();
        self.retiring.retain(|_, until| *until > now);
        let (sources, retiring) = (&self.sources, &self.retiring);
        self.backends.retain(|backend, _| {
            sources.iter().any(|s| &s.backend == backend) || retiring.contains_key(backend)
        });
        let mut changed = self.backends.len() != before;
        let sources = std::mem::take(&mut self.sources);
        for source in &sources {
            if let Some(result) = read.get(&source.file) {
                changed |= self.apply(source, result);
            }
        }
        self.sources = sources;
        if changed {
            self.keys.publish(
                self.backends
                    .iter()
                    .filter_map(|(b, s)| Some((b.as_str().into(), s.key.clone()?)))
                    .collect(),
            );
        }
        let now = SystemTime::now();
        for (backend, state) in &self.backends {
            if let Some(loaded) = state.loaded {
                let age = now.duration_since(loaded).unwrap_or_default();
                self.metrics.key_age(backend, age);
            }
        }
    }

    /// Applies one read to one backend; true if its key changed.
    fn apply(&mut self, source: &KeySource, result: &Result<ApiKey, KeyFileError>) -> bool {
        let backend = source.backend.as_str();
        let state = self
            .backends
            .entry(source.backend.clone())
            .or_insert_with(|| BackendKey {
                file: source.file.clone(),
                key: None,
                loaded: None,
                generation: 0,
                failure: None,
            });
        let file = source.file.display();
        match result {
            Ok(key) => {
                if let Some(f) = state.failure.take() {
                    tracing::info!(backend, file = %file, failed_for_s = f.since.elapsed().as_secs(), "key file readable again");
                }
                self.metrics.key_read_ok(backend);
                let moved = state.file != source.file;
                state.file = source.file.clone();
                if state.key.as_ref() == Some(key) {
                    if moved {
                        tracing::info!(backend, file = %file, "key file moved; same key");
                    }
                    return false;
                }
                state.key = Some(key.clone());
                state.loaded = Some(SystemTime::now());
                state.generation += 1;
                tracing::info!(backend, file = %file, generation = state.generation, "API key loaded");
                self.metrics.key_loaded(backend, state.generation);
                true
            }
            Err(error) => {
                self.metrics.key_read_failed(backend, error.reason());
                let kept = match &state.key {
                    Some(_) if state.file != source.file => format!(
                        "keeping the key read from {} until this file can be read",
                        state.file.display()
                    ),
                    Some(_) => "keeping the last good key".to_string(),
                    None => "no key loaded: requests to this backend get 503".to_string(),
                };
                let now = Instant::now();
                match &mut state.failure {
                    Some(f) if f.error == *error && f.file == source.file => {
                        if f.due(now, STALE_LOG_INTERVAL) {
                            tracing::error!(
                                backend, file = %file, %error,
                                failing_for_s = now.duration_since(f.since).as_secs(),
                                "API key file still failing; {kept}"
                            );
                        }
                    }
                    _ => {
                        tracing::error!(backend, file = %file, %error, "API key not (re)loaded; {kept}");
                        self.metrics.key_failure_started(backend);
                        state.failure = Some(Failure {
                            file: source.file.clone(),
                            error: error.clone(),
                            since: now,
                            logged: now,
                        });
                    }
                }
                false
            }
        }
    }
}

/// Resolves at `at`, or never.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads and parses one key file; a file caught mid-write (truncated, not
/// yet there) is looked at once more a moment later before it counts.
async fn read_key_file(path: PathBuf) -> Result<ApiKey, KeyFileError> {
    let once = || async {
        let content = regular_file::read_async(path.clone(), MAX_KEY_FILE_BYTES).await?;
        parse_key(&content)
    };
    match once().await {
        Ok(key) => Ok(key),
        Err(_) => {
            tokio::time::sleep(TRANSIENT_RECHECK).await;
            once().await
        }
    }
}

/// The key sources of a set of backends.
pub fn sources_of<'a>(
    backends: impl IntoIterator<Item = (&'a str, &'a std::path::Path)>,
) -> Vec<KeySource> {
    backends
        .into_iter()
        .map(|(backend, file)| KeySource {
            backend: backend.to_string(),
            file: file.to_path_buf(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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

    fn watcher(sources: Vec<KeySource>) -> (ProviderKeyWatcher, Arc<ProviderKeys>) {
        let keys = Arc::new(ProviderKeys::default());
        let metrics = Arc::new(Metrics::new().unwrap());
        let (w, _) =
            ProviderKeyWatcher::new(keys.clone(), sources, Duration::from_secs(1), metrics);
        (w, keys)
    }

    #[test]
    fn a_lasting_failure_is_logged_again_each_interval() {
        let start = Instant::now();
        let mut f = Failure {
            file: PathBuf::from("k"),
            error: KeyFileError::Empty,
            since: start,
            logged: start,
        };
        let minute = Duration::from_secs(60);
        assert!(!f.due(start + Duration::from_secs(59), minute));
        assert!(f.due(start + minute, minute));
        assert!(!f.due(start + minute + Duration::from_secs(1), minute));
        assert!(f.due(start + 2 * minute, minute));
    }

    #[tokio::test]
    async fn keeps_last_good_key_when_file_empties_or_vanishes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apiKey");
        std::fs::write(&file, "sk-one\n").unwrap();
        let (mut w, keys) = watcher(sources_of([("tars", file.as_path())]));
        w.load_now().await;
        assert_eq!(keys.get("tars").unwrap().authorization(), "Bearer sk-one");

        std::fs::write(&file, "").unwrap();
        w.load_now().await;
        assert_eq!(keys.get("tars").unwrap().authorization(), "Bearer sk-one");

        std::fs::remove_file(&file).unwrap();
        w.load_now().await;
        assert_eq!(keys.get("tars").unwrap().authorization(), "Bearer sk-one");

        std::fs::write(&file, "sk-two").unwrap();
        w.load_now().await;
        assert_eq!(keys.get("tars").unwrap().authorization(), "Bearer sk-two");
    }

    #[tokio::test]
    async fn a_new_file_that_cannot_be_read_keeps_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("apiKey");
        std::fs::write(&good, "sk-one\n").unwrap();
        let (mut w, keys) = watcher(sources_of([("tars", good.as_path())]));
        w.load_now().await;
        // A config reload with a typo in api_key_file.
        let typo = dir.path().join("apiKye");
        w.sources = sources_of([("tars", typo.as_path())]);
        w.reload().await;
        assert_eq!(keys.get("tars").unwrap().authorization(), "Bearer sk-one");
        // The file appears: its key takes over.
        std::fs::write(&typo, "sk-two\n").unwrap();
        w.reload().await;
        assert_eq!(keys.get("tars").unwrap().authorization(), "Bearer sk-two");
        // A backend that leaves the config loses its key.
        w.sources = Vec::new();
        w.reload().await;
        assert!(!keys.has("tars"));
    }

    /// A config reload that drops a backend: its key stays for the
    /// requests the old config routed there, then goes; a backend added
    /// back in the meantime keeps it for good.
    #[tokio::test]
    async fn a_removed_backend_keeps_its_key_for_a_grace() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apiKey");
        std::fs::write(&file, "sk-one\n").unwrap();
        let sources = sources_of([("tars", file.as_path())]);
        let (mut w, keys) = watcher(sources.clone());
        w.load_now().await;

        w.retire_missing(&[]);
        w.sources = Vec::new();
        w.reload().await;
        assert!(keys.has("tars"), "dropped at once");
        let until = w.retiring["tars"];
        assert!(until > Instant::now() + RETIRED_KEY_GRACE - Duration::from_secs(1));

        // Back in the config before the grace ended: no longer retiring.
        w.retire_missing(&sources);
        w.sources = sources;
        w.reload().await;
        assert!(w.retiring.is_empty() && keys.has("tars"));

        // Dropped again, and the grace over.
        w.retire_missing(&[]);
        w.sources = Vec::new();
        w.retiring.insert("tars".into(), Instant::now());
        w.reload().await;
        assert!(!keys.has("tars"));
        assert!(w.retiring.is_empty());
    }

    #[tokio::test]
    async fn missing_file_means_no_key_and_fifos_do_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "sk-ok").unwrap();
        let (mut w, keys) = watcher(sources_of([
            ("gone", Path::new("/nonexistent/key")),
            ("fifo", fifo.as_path()),
            ("ok", ok.as_path()),
        ]));
        tokio::time::timeout(Duration::from_secs(5), w.load_now())
            .await
            .expect("a FIFO stalled the key watcher");
        assert!(!keys.has("gone") && !keys.has("fifo"));
        assert!(keys.has("ok"));
    }
}
