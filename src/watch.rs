//! Tells when watched files may have changed: filesystem events, with a poll
//! as a safety net.
//!
//! The parent directory is watched, never the file: Kubernetes replaces a
//! mounted Secret by swapping the `..data` symlink in its directory, and
//! `mv new key` replaces the inode, so a watch on the file itself would go
//! deaf after the first rotation. Editors and `cp` write in place, which the
//! directory watch sees as well.
//!
//! Events only say "look again": the consumer re-reads and compares, so a
//! spurious wake-up costs one small read and a missed event costs at most
//! one poll interval.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};

/// After an event, wait this long for the rest of its burst (a kubelet swap
/// or an in-place write is several events) before re-reading.
const SETTLE: Duration = Duration::from_millis(20);

/// How long to wait before reading a file again when it looked broken: a
/// file rewritten in place is empty or half-written for a moment.
pub const TRANSIENT_RECHECK: Duration = Duration::from_millis(100);

/// Wakes its owner when any of a set of files may have changed.
pub struct FileWatcher {
    events: mpsc::Receiver<()>,
    poll: Interval,
    watcher: Option<RecommendedWatcher>,
    /// Directories that could not be watched yet (missing, or no inotify);
    /// retried on every poll tick.
    unwatched: Vec<PathBuf>,
}

impl FileWatcher {
    pub fn new<'a>(files: impl IntoIterator<Item = &'a Path>, poll_interval: Duration) -> Self {
        let files: Vec<PathBuf> = files.into_iter().map(Path::to_path_buf).collect();
        let dirs: BTreeSet<PathBuf> = files.iter().map(|f| parent_dir(f)).collect();
        let names: Vec<OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(OsString::from))
            .collect();
        // Capacity 1: a pending wake-up already covers every later event.
        let (tx, events) = mpsc::channel(1);
        let watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) if is_change(&event.kind) && concerns(&event.paths, &names) => {
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "file watch error; relying on polling"),
            });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "filesystem events unavailable; polling only");
                None
            }
        };
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut this = Self {
            events,
            poll,
            watcher,
            unwatched: dirs.into_iter().collect(),
        };
        this.watch_pending();
        this
    }

    /// Resolves when the files may have changed. The first call returns at
    /// once (the poll's first tick), which doubles as the initial load.
    pub async fn changed(&mut self) {
        tokio::select! {
            Some(()) = self.events.recv() => {
                tokio::time::sleep(SETTLE).await;
                while self.events.try_recv().is_ok() {}
            }
            _ = self.poll.tick() => self.watch_pending(),
        }
    }

    fn watch_pending(&mut self) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        self.unwatched.retain(|dir| match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(dir = %dir.display(), "watching directory");
                false
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory yet; polling it");
                true
            }
        });
    }
}

/// Opening or reading a file is not a change; without this filter our own
/// re-read would wake us again, forever.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Whether an event touches a watched file, or the kubelet's `..data`
/// machinery (`..data`, `..data_tmp`, `..2026_11_21_...`). Other files in the
/// same directory (a log file beside the config, say) must not wake us: a
/// log line about waking would wake us again.
fn concerns(paths: &[PathBuf], names: &[OsString]) -> bool {
    paths.iter().any(|p| match p.file_name() {
        Some(name) => names.iter().any(|n| n == name) || name.as_encoded_bytes().starts_with(b".."),
        // An event without a name is about the directory itself.
        None => true,
    })
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_bare_file_is_cwd() {
        assert_eq!(parent_dir(Path::new("apiKey")), PathBuf::from("."));
        assert_eq!(
            parent_dir(Path::new("/etc/s/apiKey")),
            PathBuf::from("/etc/s")
        );
    }

    #[test]
    fn only_watched_names_and_kubelet_entries_count() {
        let names = [OsString::from("apiKey")];
        let p = |s: &str| vec![PathBuf::from(s)];
        assert!(concerns(&p("/s/apiKey"), &names));
        assert!(concerns(&p("/s/..data"), &names));
        assert!(concerns(&p("/s/..2026_11_21_22_00_00.1"), &names));
        assert!(!concerns(&p("/s/extproc.log"), &names));
        assert!(!concerns(&p("/s/apiKey.tmp"), &names));
    }

    #[tokio::test]
    async fn ignores_other_files_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "a").unwrap();
        let mut w = FileWatcher::new([file.as_path()], Duration::from_secs(3600));
        w.changed().await;
        std::fs::write(dir.path().join("other.log"), "noise").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.changed())
                .await
                .is_err(),
            "woke up for an unrelated file"
        );
    }

    #[tokio::test]
    async fn wakes_on_kubelet_data_swap() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(d.join("..v1/apiKey"), "a").unwrap();
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/apiKey", d.join("apiKey")).unwrap();
        let file = d.join("apiKey");
        let mut w = FileWatcher::new([file.as_path()], Duration::from_secs(3600));
        w.changed().await;
        // What the kubelet does: new version dir, `..data_tmp`, rename.
        std::fs::create_dir(d.join("..v2")).unwrap();
        std::fs::write(d.join("..v2/apiKey"), "b").unwrap();
        symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after the ..data swap");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "b");
    }

    #[tokio::test]
    async fn wakes_on_rename_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "a").unwrap();
        // A long poll interval, so only a filesystem event can wake us.
        let mut w = FileWatcher::new([file.as_path()], Duration::from_secs(3600));
        w.changed().await; // the immediate first tick
        let tmp = dir.path().join(".key.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after rename");
    }
}
