//! File access beneath the catalog root: opening an indexed file without escaping the root,
//! the identity (size, mtime) that says a file still matches its index entry, and the one-time
//! sha256 verification of entries that carry no mtime (indexes written by the original
//! Natster).
//!
//! Invariants:
//! - Everything here that touches the disk runs on the blocking pool, never on an async
//!   worker; callers await it.
//! - A file is served only while its identity equals the indexed one, or (entries without
//!   `mtime_ns`) the identity under which its content was hashed and found equal to the
//!   entry's hash. A verdict is remembered per (path, hash) and identity, so each file is
//!   hashed once per change, by the background pass or by the first open, never by both at
//!   once (a per-entry async lock).
//! - A file that changes while it is hashed gets no verdict: it is refused this time and
//!   hashed again at the next open.
//!
//! Tricky case: `mtime_ns == 0` is what an original index deserializes to; a file we indexed
//! whose mtime really is the epoch takes the same (slower, still correct) hashing path.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use sha2::{Digest, Sha256};

use crate::index::IndexEntry;

/// What must not change for a file to still match its index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileIdentity {
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            size: meta.len(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
        }
    }

    /// The identity of an open file, from its descriptor.
    pub fn of_file(file: &File) -> std::io::Result<Self> {
        file.metadata().map(|m| Self::of(&m))
    }
}

/// Tells the kernel bytes `offset .. offset+len` of `file` will be read soon
/// (`POSIX_FADV_WILLNEED`): it starts reading them into the page cache without waiting.
/// Only a hint: a failure changes nothing but speed. Blocking (it may queue disk I/O).
pub fn will_need(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else { return };
    // SAFETY: fadvise reads nothing but its arguments; the descriptor is open for `file`'s life.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
}

/// Opens `rel` (a catalog path) for reading only if it resolves to a regular file inside
/// `root`. Checked twice: before opening (no `..`, canonical path under the root) and after,
/// on the open descriptor itself, so a symlink swapped in between cannot escape.
///
/// Blocking: call it from the blocking pool.
pub fn open_beneath(root: &Path, rel: &str) -> Result<File> {
    let rel = rel.trim_start_matches('/');
    let rel_path = Path::new(rel);
    if rel.is_empty() || rel.contains('\0') || rel_path.components().any(|c| !matches!(c, Component::Normal(_))) {
        anyhow::bail!("path {rel:?} is not a plain relative path");
    }
    let resolved = std::fs::canonicalize(root.join(rel_path))?;
    if !resolved.starts_with(root) {
        anyhow::bail!("{rel:?} resolves outside the catalog root");
    }
    if !std::fs::metadata(&resolved)?.is_file() {
        anyhow::bail!("{rel:?} is not a regular file");
    }
    // Non-blocking, so a FIFO swapped in after the check cannot hang a worker on open.
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW).open(&resolved)?;
    let actual = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)))?;
    if !actual.starts_with(root) {
        anyhow::bail!("{rel:?} was swapped for a path outside the catalog root");
    }
    if !file.metadata()?.is_file() {
        anyhow::bail!("{rel:?} is not a regular file");
    }
    Ok(file)
}

/// Opens `entry` beneath `root` and reads its identity, on the blocking pool.
pub(super) async fn open_entry(root: PathBuf, entry: &IndexEntry) -> Result<(File, FileIdentity)> {
    let rel = entry.path.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let file = open_beneath(&root, &rel)?;
        let identity = FileIdentity::of_file(&file)?;
        Ok::<_, anyhow::Error>((file, identity))
    })
    .await;
    match opened {
        Ok(result) => result,
        Err(e) => Err(anyhow::anyhow!("file access task failed: {e}")),
    }
}

/// The identity of an open file, read on the blocking pool.
pub(super) async fn identity_of(file: Arc<File>) -> std::io::Result<FileIdentity> {
    match tokio::task::spawn_blocking(move || FileIdentity::of_file(&file)).await {
        Ok(result) => result,
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

/// What hashing a file under one identity found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Matches(FileIdentity),
    Differs(FileIdentity),
}

/// The outcome of [`Verifier::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Checked {
    /// The content hashes to the entry's hash: serve it under this identity.
    Matches,
    /// The content is not what was indexed.
    Differs,
    /// The file changed while it was hashed; nothing is remembered.
    Changing,
    /// It could not be read, or the server is stopping.
    Failed(String),
}

type Slot = Arc<tokio::sync::Mutex<Option<Verdict>>>;

/// Remembers, per indexed (path, hash), whether the file's content was found to match, and
/// under which identity.
#[derive(Default)]
pub(super) struct Verifier {
    slots: Mutex<HashMap<(String, String), Slot>>,
    /// Set when the server stops: hashing in progress gives up at its next block.
    cancel: Arc<AtomicBool>,
}

impl Verifier {
    /// Whether `file` (open, with identity `now`) holds the content `entry` indexes. Hashes it
    /// on the blocking pool unless a verdict for this very identity is remembered; concurrent
    /// checks of one entry wait for the one hash.
    pub async fn check(&self, entry: &IndexEntry, file: Arc<File>, now: FileIdentity) -> Checked {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry((entry.path.clone(), entry.hash.clone())).or_default().clone()
        };
        let mut verdict = slot.lock().await;
        match *verdict {
            Some(Verdict::Matches(id)) if id == now => return Checked::Matches,
            Some(Verdict::Differs(id)) if id == now => return Checked::Differs,
            _ => {}
        }
        if now.size != entry.byte_size {
            *verdict = Some(Verdict::Differs(now));
            return Checked::Differs;
        }
        let cancel = self.cancel.clone();
        let hashed = tokio::task::spawn_blocking(move || hash_open_file(&file, now, &cancel)).await;
        match hashed {
            Ok(Ok(Some(digest))) => {
                let found = if digest == entry.hash { Verdict::Matches(now) } else { Verdict::Differs(now) };
                *verdict = Some(found);
                if matches!(found, Verdict::Matches(_)) {
                    Checked::Matches
                } else {
                    Checked::Differs
                }
            }
            Ok(Ok(None)) => Checked::Changing,
            Ok(Err(e)) => Checked::Failed(e.to_string()),
            Err(e) => Checked::Failed(format!("hashing task failed: {e}")),
        }
    }

    /// Forgets verdicts for entries no longer in the catalog.
    pub fn retain(&self, entries: &[IndexEntry]) {
        let keep: std::collections::HashSet<(&str, &str)> =
            entries.iter().map(|e| (e.path.as_str(), e.hash.as_str())).collect();
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(path, hash), _| keep.contains(&(path.as_str(), hash.as_str())));
    }

    /// Makes every hash in progress give up (the server is stopping).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// sha256 of an open file in lowercase hex, or None when its identity changed meanwhile.
fn hash_open_file(file: &File, before: FileIdentity, cancel: &AtomicBool) -> std::io::Result<Option<String>> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("the server is stopping"));
        }
        let n = match file.read_at(&mut buf, offset) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    if offset != before.size || FileIdentity::of_file(file)? != before {
        return Ok(None);
    }
    Ok(Some(hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_for(path: &str, bytes: &[u8]) -> IndexEntry {
        IndexEntry {
            path: path.into(),
            description: String::new(),
            mime_type: String::new(),
            hash: hex::encode(Sha256::digest(bytes)),
            byte_size: bytes.len() as u64,
            mtime_ns: 0,
            ino: 0,
            tree: None,
        }
    }

    #[tokio::test]
    async fn verdicts_are_remembered_per_identity() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(root.join("a"), b"hello").unwrap();
        let entry = entry_for("/a", b"hello");
        let verifier = Verifier::default();
        let (file, id) = open_entry(root.clone(), &entry).await.unwrap();
        let file = Arc::new(file);
        assert_eq!(verifier.check(&entry, file.clone(), id).await, Checked::Matches);
        // Same identity: remembered, even if the bytes were (invisibly) swapped.
        assert_eq!(verifier.check(&entry, file, id).await, Checked::Matches);

        std::fs::write(root.join("a"), b"HELLO").unwrap();
        let f = File::options().write(true).open(root.join("a")).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(12345)).unwrap();
        let (file, id2) = open_entry(root.clone(), &entry).await.unwrap();
        assert_ne!(id, id2);
        assert_eq!(verifier.check(&entry, Arc::new(file), id2).await, Checked::Differs);

        let short = entry_for("/a", b"hell");
        let (file, id3) = open_entry(root, &short).await.unwrap();
        assert_eq!(verifier.check(&short, Arc::new(file), id3).await, Checked::Differs);
    }

    #[test]
    fn paths_must_stay_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(root.join("in"), b"x").unwrap();
        assert!(open_beneath(&root, "/in").is_ok());
        for bad in ["", "/", "../in", "/a/../in", "a\0b"] {
            assert!(open_beneath(&root, bad).is_err(), "{bad:?} opened");
        }
    }
}
