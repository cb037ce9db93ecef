//! Files natster-mount writes for itself: written whole or not at all (a temporary file in the
//! same folder, synced, then renamed), with the mode given, so a crash or a concurrent reader
//! never sees half a file and nothing private is ever world-readable, even for a moment.

use std::io::Write;
use std::path::Path;

use anyhow::{Context as _, Result};

/// Writes `bytes` to `path` atomically with permissions `mode`, creating its folder (0700).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = synced_temporary(path, bytes, mode)?;
    tmp.persist(path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Like [`write_atomic`], but only if `path` does not exist yet: false (and nothing written)
/// if it does. Of several processes creating the same file at once, exactly one succeeds and
/// the others find its whole file in place (the name appears only once the bytes are synced).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    let tmp = synced_temporary(path, bytes, mode)?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(true),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.error).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// A temporary file beside `path` (its folder created, 0700) holding `bytes`, synced, with
/// permissions `mode`.
fn synced_temporary(path: &Path, bytes: &[u8], mode: u32) -> Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions in {}", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(tmp)
}

/// Runs file work `f` from async code without stalling the runtime: on a multi-threaded
/// runtime the worker hands its other tasks off first (`block_in_place`); elsewhere (no runtime,
/// or a current-thread one, where nothing else could run meanwhile) it simply runs. For work
/// that borrows from the caller, where `spawn_blocking` cannot be used.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// An exclusive `flock` on a lock file of its own (created 0600 if missing), released when
/// dropped: how processes sharing a home take turns at a read-modify-write of one of its
/// files. The file being updated is replaced by rename, so it cannot carry the lock itself.
#[derive(Debug)]
pub struct FileLock(#[allow(dead_code)] std::fs::File);

impl FileLock {
    /// Waits for the lock. Blocking: call it through [`blocking`] from async code.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_EX)?.with_context(|| format!("cannot lock {}", path.display()))
    }

    /// The lock if no other process holds it, else `Ok(None)`; never waits.
    pub fn try_acquire(path: &Path) -> Result<Option<FileLock>> {
        Self::lock(path, libc::LOCK_EX | libc::LOCK_NB)
    }

    /// A shared hold, which many may have at once and which keeps [`FileLock::try_acquire`]
    /// out. Waits for an exclusive holder. Blocking.
    pub fn acquire_shared(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_SH)?.with_context(|| format!("cannot lock {}", path.display()))
    }

    fn lock(path: &Path, operation: libc::c_int) -> Result<Option<FileLock>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        loop {
            // SAFETY: flock(2) on a descriptor we own; it reads nothing else.
            if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
                return Ok(Some(FileLock(file)));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(None),
                _ => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
            }
        }
    }
}

/// Reads and parses a JSON file; `Ok(None)` if it does not exist.
pub fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_whole_files_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.json");
        write_atomic(&path, b"[1,2]", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_json::<Vec<u32>>(&path).unwrap(), Some(vec![1, 2]));
        assert_eq!(load_json::<Vec<u32>>(&dir.path().join("none")).unwrap(), None);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn a_file_lock_is_held_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".x.lock");
        let held = FileLock::acquire(&path).unwrap();
        // flock locks belong to the open file, so a second open in this process contends too.
        assert!(FileLock::try_acquire(&path).unwrap().is_none(), "taken while held");
        drop(held);
        assert!(FileLock::try_acquire(&path).unwrap().is_some(), "free once dropped");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn write_new_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        assert!(write_new(&path, b"first", 0o600).unwrap());
        assert!(!write_new(&path, b"second", 0o600).unwrap(), "an existing file is kept");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }
}
