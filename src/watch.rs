//! Tells when watched files may have changed: filesystem events, with a poll
//! as a safety net.
//!
//! The parent directory is watched, never the file: Kubernetes replaces a
//! mounted Secret by swapping the `..data` symlink in its directory, and
//! `mv new key` replaces the inode, so a watch on the file itself would go
//! deaf after the first rotation. Editors and `cp` write in place, which the
//! directory watch sees as well.
//!
//! A file that is a symlink into another directory (Vault Agent, CSI secret
//! stores, hand-made layouts) is written where its target lives, so the
//! target's directory is watched too; where a link points is looked up
//! again after every wake-up, so a link moved elsewhere is followed.
//!
//! Events only say "look again": the consumer re-reads and compares, so a
//! spurious wake-up costs one small read and a missed event costs at most
//! one poll interval.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
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
    /// Directories watched (or waiting to be).
    known: BTreeSet<PathBuf>,
    files: Vec<PathBuf>,
    /// The file names that matter in the watched directories: the files'
    /// own, and their symlink targets'. Read by the watcher's thread.
    names: Arc<RwLock<Vec<OsString>>>,
}

impl FileWatcher {
    pub fn new<'a>(files: impl IntoIterator<Item = &'a Path>, poll_interval: Duration) -> Self {
        let files: Vec<PathBuf> = files.into_iter().map(Path::to_path_buf).collect();
        let names = Arc::new(RwLock::new(Vec::new()));
        let seen = Arc::clone(&names);
        // Capacity 1: a pending wake-up already covers every later event.
        let (tx, events) = mpsc::channel(1);
        let watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event)
                    if is_change(&event.kind)
                        && concerns(
                            &event.paths,
                            &seen.read().unwrap_or_else(|e| e.into_inner()),
                        ) =>
                {
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
            unwatched: Vec::new(),
            known: BTreeSet::new(),
            files,
            names,
        };
        this.follow_links();
        this.watch_pending();
        this
    }

    /// Watches the directories of where each file's symlinks point now
    /// (the file's own directory and name always count), and stops
    /// watching where they no longer point: a kubelet swap leaves a new
    /// versioned directory each time.
    fn follow_links(&mut self) {
        let mut names = Vec::new();
        let mut current = BTreeSet::new();
        for file in &self.files {
            let mut places = vec![file.clone()];
            // The whole chain resolved: where the bytes are written.
            if let Ok(target) = std::fs::canonicalize(file) {
                if target != *file {
                    places.push(target);
                }
            }
            for place in places {
                names.extend(place.file_name().map(OsString::from));
                current.insert(parent_dir(&place));
            }
        }
        for gone in self.known.difference(&current) {
            if let Some(w) = self.watcher.as_mut() {
                let _ = w.unwatch(gone);
            }
        }
        self.unwatched.retain(|d| current.contains(d));
        for dir in current.difference(&self.known) {
            self.unwatched.push(dir.clone());
        }
        self.known = current;
        *self.names.write().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// Resolves when the files may have changed. The first call returns at
    /// once (the poll's first tick), which doubles as the initial load.
    pub async fn changed(&mut self) {
        tokio::select! {
            Some(()) = self.events.recv() => {
                tokio::time::sleep(SETTLE).await;
                while self.events.try_recv().is_ok() {}
            }
            _ = self.poll.tick() => {}
        }
        self.follow_links();
        self.watch_pending();
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

    /// A key file that is a symlink into another directory: a write to
    /// the target, in place or by rename, wakes the watcher at once.
    #[tokio::test]
    async fn wakes_on_writes_to_a_symlink_target_elsewhere() {
        use std::os::unix::fs::symlink;
        let mounted = tempfile::tempdir().unwrap();
        let agent = tempfile::tempdir().unwrap();
        let target = agent.path().join("tars-key");
        std::fs::write(&target, "a").unwrap();
        let file = mounted.path().join("apiKey");
        symlink(&target, &file).unwrap();
        let mut w = FileWatcher::new([file.as_path()], Duration::from_secs(3600));
        w.changed().await;
        std::fs::write(&target, "b").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after an in-place write to the target");
        let tmp = agent.path().join(".tars-key.tmp");
        std::fs::write(&tmp, "c").unwrap();
        std::fs::rename(&tmp, &target).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after a rename onto the target");
        // The link moved to a third directory: followed after a wake-up.
        let elsewhere = tempfile::tempdir().unwrap();
        let moved = elsewhere.path().join("key");
        std::fs::write(&moved, "d").unwrap();
        let link_tmp = mounted.path().join("apiKey.new");
        symlink(&moved, &link_tmp).unwrap();
        std::fs::rename(&link_tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after the link moved");
        std::fs::write(&moved, "e").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after a write to the new target");
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
