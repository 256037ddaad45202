//! Reading the small files the gateway trusts: provider keys, its config,
//! the client keys file, the ext_proc secret. Only regular files are read,
//! and never more than a bound.
//!
//! A path can name something else than a file, by mistake or on purpose: a
//! FIFO blocks `open` until some writer comes (a watcher thread stuck for
//! good, and a process SIGTERM cannot end), a symlink to `/dev/zero` reports
//! size 0 and never ends (read until out of memory). So the file is opened
//! with `O_NONBLOCK` (a FIFO opens at once; a regular file ignores the flag),
//! the type is checked on the *opened* descriptor (no window between a check
//! and the open), and at most `limit + 1` bytes are read.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long an async read may take before the caller gives up on it (a hung
/// network filesystem). The blocking thread is abandoned, not the caller.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a file could not be read. Never contains the file's content.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("not a regular file (it is {0}); refusing to read it")]
    NotRegular(&'static str),
    #[error("larger than {limit} bytes; is it the right file?")]
    TooLarge { limit: u64 },
    #[error("reading took longer than {}s", READ_TIMEOUT.as_secs())]
    TimedOut,
}

impl ReadError {
    /// Whether the file is simply not there (yet).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }

    /// A short, fixed name for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io(e) if e.kind() == io::ErrorKind::NotFound => "missing",
            Self::Io(e) if e.kind() == io::ErrorKind::PermissionDenied => "permission",
            Self::Io(_) => "io",
            Self::NotRegular(_) => "not_regular",
            Self::TooLarge { .. } => "too_large",
            Self::TimedOut => "timeout",
        }
    }
}

/// Reads the regular file at `path` (symlinks followed), at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(ReadError::Io)?;
    let kind = file.metadata().map_err(ReadError::Io)?.file_type();
    if !kind.is_file() {
        return Err(ReadError::NotRegular(describe(&kind)));
    }
    let mut content = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut content)
        .map_err(ReadError::Io)?;
    if content.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    Ok(content)
}

/// [`read`] as text; invalid UTF-8 is an I/O error of kind `InvalidData`.
pub fn read_to_string(path: &Path, limit: u64) -> Result<String, ReadError> {
    String::from_utf8(read(path, limit)?).map_err(|_| {
        ReadError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is not valid UTF-8",
        ))
    })
}

/// [`read`] off the async workers, given up after [`READ_TIMEOUT`].
pub async fn read_async(path: PathBuf, limit: u64) -> Result<Vec<u8>, ReadError> {
    let work = tokio::task::spawn_blocking(move || read(&path, limit));
    match tokio::time::timeout(READ_TIMEOUT, work).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(ReadError::Io(io::Error::other(join))),
        Err(_) => Err(ReadError::TimedOut),
    }
}

/// [`read_to_string`] off the async workers, given up after [`READ_TIMEOUT`].
pub async fn read_to_string_async(path: PathBuf, limit: u64) -> Result<String, ReadError> {
    let work = tokio::task::spawn_blocking(move || read_to_string(&path, limit));
    match tokio::time::timeout(READ_TIMEOUT, work).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(ReadError::Io(io::Error::other(join))),
        Err(_) => Err(ReadError::TimedOut),
    }
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_small_regular_files_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "sk-1\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read(&link, 100).unwrap(), b"sk-1\n");
        assert_eq!(read(&file, 5).unwrap(), b"sk-1\n");
        assert!(matches!(
            read(&file, 4),
            Err(ReadError::TooLarge { limit: 4 })
        ));
        assert!(read(&dir.path().join("nope"), 10)
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn refuses_fifos_devices_and_directories_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        // No writer ever comes: a blocking open would hang this test.
        let err = read(&fifo, 100).unwrap_err();
        assert!(matches!(err, ReadError::NotRegular("a FIFO")), "{err}");

        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let err = read(&zero, 100).unwrap_err();
        assert!(
            matches!(err, ReadError::NotRegular("a character device")),
            "{err}"
        );
        assert_eq!(err.reason(), "not_regular");
        assert!(matches!(
            read(dir.path(), 100),
            Err(ReadError::NotRegular("a directory"))
        ));
    }

    #[tokio::test]
    async fn async_reads_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "a: 1\n").unwrap();
        assert_eq!(
            read_to_string_async(file.clone(), 100).await.unwrap(),
            "a: 1\n"
        );
        std::fs::write(&file, b"\xff\xfe").unwrap();
        assert!(read_to_string_async(file, 100).await.is_err());
    }
}
