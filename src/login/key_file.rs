//! Writing a key file the way the gateway's watcher wants it replaced:
//! a temporary file in the same directory, mode 0600, synced, then renamed
//! over the old one. Readers see the old key or the new one, never half.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::pkce::random_unreserved;

/// Replaces `path`'s content with `key` (and a newline), atomically.
pub fn write_atomically(path: &Path, key: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".into());
    let suffix = random_unreserved(8).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", suffix.replace(['.', '~'], "_")));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(key.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_with_mode_0600_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apiKey");
        fs::write(&path, "old").unwrap();
        write_atomically(&path, "sk-new").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "sk-new\n");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
