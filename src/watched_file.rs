//! A text file the gateway reloads whole when it changes: its configuration
//! and the client keys file. Each new version is read, parsed, and put in
//! force, or refused with one log line while the version in force stays.
//!
//! What differs between the files (how to parse, what "in force" means) is
//! a [`Reload`]; the watching, the re-read of a half-written file and the
//! log lines are here, once.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::offload;
use crate::regular_file::{self, ReadError};
use crate::watch::{FileWatcher, TRANSIENT_RECHECK};

/// Largest config or keys file accepted: far above any real one, far below
/// what would hurt.
pub const MAX_TEXT_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// What one kind of reloaded file does with a new version.
pub trait Reload: Send {
    /// What the file holds, for log lines: "configuration", "client keys".
    const WHAT: &'static str;
    type Parsed: Send;
    type Error: fmt::Display + Send;

    /// Parses and validates a version; an error names what is wrong and
    /// never echoes a secret.
    fn parse(&self, path: &Path, text: &str) -> Result<Self::Parsed, Self::Error>;

    /// Puts a parsed version in force.
    fn apply(&mut self, parsed: Self::Parsed) -> impl Future<Output = ()> + Send;

    /// A version was refused (unreadable or invalid); the one in force stays.
    fn refused(&mut self) {}
}

/// Reads `path` as text, the way every reloaded file is read.
pub fn read(path: &Path) -> Result<String, ReadError> {
    regular_file::read_to_string(path, MAX_TEXT_FILE_BYTES)
}

/// A watched file whose content is handed out only when it changed.
pub struct WatchedFile {
    path: PathBuf,
    last: Option<String>,
    watcher: FileWatcher,
}

/// What a watched file did.
enum Change {
    Changed(String),
    /// It cannot be read; reported once until it can be read again.
    Unreadable(ReadError),
}

impl WatchedFile {
    /// Watches `path`; its content now is the baseline, not a change.
    pub fn new(path: PathBuf, poll_interval: Duration) -> Self {
        let last = read(&path).ok();
        let watcher = FileWatcher::new([path.as_path()], poll_interval);
        Self {
            path,
            last,
            watcher,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts each new version in force through `target` until `shutdown`.
    pub async fn run<R: Reload>(mut self, mut target: R, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                change = self.next_change() => self.handle(change, &mut target).await,
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn handle<R: Reload>(&mut self, change: Change, target: &mut R) {
        let file = self.path.display().to_string();
        let text = match change {
            Change::Changed(text) => text,
            Change::Unreadable(e) => {
                tracing::error!(file, error = %e, "cannot read the {} file; keeping the {} in force", R::WHAT, R::WHAT);
                target.refused();
                return;
            }
        };
        // Parsing may render Envoy's resources (milliseconds of work).
        let mut parsed = offload::heavy(|| target.parse(&self.path, &text));
        if parsed.is_err() {
            // An editor or `cp` writing in place shows a truncated file for
            // a moment: look again before calling it invalid.
            if let Some(again) = self.settle(&text).await {
                parsed = offload::heavy(|| target.parse(&self.path, &again));
            }
        }
        match parsed {
            Ok(p) => target.apply(p).await,
            Err(e) => {
                tracing::error!(
                    file,
                    "{} reload refused, the {} in force stays: {e}",
                    R::WHAT,
                    R::WHAT
                );
                target.refused();
            }
        }
    }

    async fn next_change(&mut self) -> Change {
        loop {
            self.watcher.changed().await;
            match self.read_now().await {
                Ok(text) if self.last.as_deref() == Some(text.as_str()) => {}
                Ok(text) => {
                    self.last = Some(text.clone());
                    return Change::Changed(text);
                }
                Err(e) => {
                    if self.last.take().is_some() {
                        return Change::Unreadable(e);
                    }
                }
            }
        }
    }

    async fn read_now(&self) -> Result<String, ReadError> {
        regular_file::read_to_string_async(self.path.clone(), MAX_TEXT_FILE_BYTES).await
    }

    /// Reads again a little later; the new content if it changed meanwhile.
    async fn settle(&mut self, text: &str) -> Option<String> {
        tokio::time::sleep(TRANSIENT_RECHECK).await;
        let again = self.read_now().await.ok()?;
        if again == text {
            return None;
        }
        self.last = Some(again.clone());
        Some(again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Numbers, one per line; anything else is refused.
    struct Numbers {
        applied: Arc<Mutex<Vec<u32>>>,
        refusals: Arc<Mutex<u32>>,
    }

    impl Reload for Numbers {
        const WHAT: &'static str = "numbers";
        type Parsed = u32;
        type Error = String;
        fn parse(&self, _: &Path, text: &str) -> Result<u32, String> {
            text.trim()
                .parse()
                .map_err(|_| format!("not a number: {text:?}"))
        }
        async fn apply(&mut self, n: u32) {
            self.applied.lock().unwrap().push(n);
        }
        fn refused(&mut self) {
            *self.refusals.lock().unwrap() += 1;
        }
    }

    async fn wait_for(check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn applies_valid_versions_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let applied = Arc::new(Mutex::new(Vec::new()));
        let refusals = Arc::new(Mutex::new(0));
        let target = Numbers {
            applied: applied.clone(),
            refusals: refusals.clone(),
        };
        let (stop, stopped) = watch::channel(false);
        let file = WatchedFile::new(path.clone(), Duration::from_millis(50));
        let task = tokio::spawn(file.run(target, stopped));
        std::fs::write(&path, "2").unwrap();
        wait_for(|| applied.lock().unwrap().as_slice() == [2]).await;
        std::fs::write(&path, "two").unwrap();
        wait_for(|| *refusals.lock().unwrap() == 1).await;
        std::fs::remove_file(&path).unwrap();
        wait_for(|| *refusals.lock().unwrap() == 2).await;
        std::fs::write(&path, "3").unwrap();
        wait_for(|| applied.lock().unwrap().as_slice() == [2, 3]).await;
        let _ = stop.send(true);
        task.await.unwrap();
    }
}
