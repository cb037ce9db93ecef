//! The mounted filesystem's logic, independent of FUSE.
//!
//! - `tree`: the inode tree built from catalog listings.
//! - `source`: where bytes come from ([`ChunkSource`]: the network's [`RemoteSource`], a fake
//!   in unit tests).
//! - `read`: the read path: chunk cache, deadlines and retries, read-ahead.
//! - `readahead`: sequential-access detection.
//! - `fuse`: the thin fuser adapter; `mount`: the lifecycle (mount, refresh, unmount).
//!
//! Invariants: every read has one deadline (`read_timeout`) and ends by it, with data or EIO;
//! memory for file data stays under the cache budget however many files are open; a catalog
//! that cannot be reached keeps its last listing and its cached chunks.

pub mod fuse;
pub mod mount;
pub mod presence;
mod read;
pub mod readahead;
pub mod source;
pub mod tree;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Semaphore};

use crate::cache::ChunkCache;
use crate::listing::Listing;
use crate::protocol::{CatalogEntry, CatalogSummary};
use read::{Health, OpenFile};
pub use read::{PendingRead, ReadNow};
pub use readahead::ReadAhead;
pub use source::{ChunkSource, RemoteSource};
use tree::Tree;
pub use tree::{Attr, Invalidations, ROOT_INO};

/// Errors a filesystem operation can end in; mapped to errno in one place (`errno`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or folder")]
    NotFound,
    #[error("not a folder")]
    NotDir,
    #[error("is a folder")]
    IsDir,
    #[error("bad file handle")]
    BadHandle,
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error("catalog did not answer within {0:?}")]
    Timeout(Duration),
    /// The peer or the network is down, restarting or slow: a retry may succeed.
    #[error("{0}")]
    Unreachable(String),
    #[error("access refused by the catalog owner: {0}")]
    Forbidden(String),
    #[error("catalog server speaks only v1, and this file is larger than half the cache; use `natster-mount catalog download`")]
    V1TooLarge,
    #[error("{0}")]
    Remote(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::BadHandle => libc::EBADF,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Forbidden(_) => libc::EACCES,
            FsError::Timeout(_) | FsError::Unreachable(_) | FsError::Remote(_) | FsError::V1TooLarge => libc::EIO,
        }
    }

    /// True if retrying within the read's deadline may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, FsError::Unreachable(_))
    }
}

#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Byte budget of the chunk cache (the mount's memory bound for file data).
    pub cache_bytes: usize,
    /// A read that cannot be served within this fails with EIO.
    pub read_timeout: Duration,
    /// Largest read-ahead window per open file, in bytes.
    pub max_readahead: u64,
    /// Bytes of read-ahead in flight for the whole mount, shared by every open file.
    pub readahead_budget: u64,
    pub uid: u32,
    pub gid: u32,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            cache_bytes: 256 * 1024 * 1024,
            read_timeout: Duration::from_secs(10),
            max_readahead: 16 * 1024 * 1024,
            readahead_budget: 64 * 1024 * 1024,
            uid: 0,
            gid: 0,
        }
    }
}

/// One catalog folder of the mount.
pub struct MountedCatalog {
    /// Name of its folder in the mount root.
    pub dir_name: String,
    /// The catalog's name as its owner serves it.
    pub name: String,
    /// Owner's account key, or "self" for a context without one.
    pub owner: String,
    pub source: Arc<dyn ChunkSource>,
    revision: Mutex<String>,
    /// Whether the catalog answers; shared by every read of it (see `read.rs`).
    health: Mutex<Health>,
    /// Set while a listing refresh runs, so refreshes of one catalog never pile up.
    pub refreshing: AtomicBool,
    /// Online or offline, from heartbeats (`presence`).
    presence: Mutex<presence::Presence>,
}

impl MountedCatalog {
    pub fn new(dir_name: String, name: String, owner: String, source: Arc<dyn ChunkSource>) -> Self {
        MountedCatalog {
            dir_name,
            name,
            owner,
            source,
            revision: Mutex::new(String::new()),
            health: Mutex::new(Health::default()),
            refreshing: AtomicBool::new(false),
            presence: Mutex::new(presence::Presence::default()),
        }
    }

    pub fn presence(&self) -> presence::Presence {
        self.presence.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_presence(&self, presence: presence::Presence) {
        *self.presence.lock().unwrap_or_else(|p| p.into_inner()) = presence;
    }

    /// Revision of the listing the mount shows (empty before any, and from original peers).
    pub fn revision(&self) -> String {
        self.revision.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The filesystem state shared by all FUSE threads.
pub struct NatsterFs {
    tree: RwLock<Tree>,
    /// Catalog slots, by index; a removed catalog leaves `None` (indices are never reused, so
    /// an open file of a removed catalog can never read another one's bytes).
    catalogs: RwLock<Vec<Option<Arc<MountedCatalog>>>>,
    pub cache: Arc<ChunkCache<FsError>>,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// Open folders and the snapshot each one reads.
    dirs: Mutex<HashMap<u64, Arc<DirSnapshot>>>,
    next_handle: AtomicU64,
    readahead_budget: Arc<Semaphore>,
    pub options: FsOptions,
    started: SystemTime,
    /// Bumped by every applied listing, for watchers outside the kernel (the web UI).
    listings: watch::Sender<u64>,
    /// FUSE requests answered, by kind (`user.natster.calls` on the root).
    pub calls: Calls,
}

/// Counts of FUSE requests by kind: what tells that the kernel's caches answer a second
/// `ls -lR` (tests read them through `user.natster.calls`).
#[derive(Debug, Default)]
pub struct Calls {
    pub lookup: AtomicU64,
    pub getattr: AtomicU64,
    pub opendir: AtomicU64,
    pub readdir: AtomicU64,
    pub readdirplus: AtomicU64,
    pub releasedir: AtomicU64,
    pub open: AtomicU64,
    pub read: AtomicU64,
    pub xattr: AtomicU64,
    pub other: AtomicU64,
}

impl Calls {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Display for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        write!(
            f,
            "lookup={} getattr={} opendir={} readdir={} readdirplus={} releasedir={} open={} read={} xattr={} other={}",
            n(&self.lookup),
            n(&self.getattr),
            n(&self.opendir),
            n(&self.readdir),
            n(&self.readdirplus),
            n(&self.releasedir),
            n(&self.open),
            n(&self.read),
            n(&self.xattr),
            n(&self.other)
        )
    }
}

impl NatsterFs {
    pub fn new(catalogs: Vec<Arc<MountedCatalog>>, mut options: FsOptions) -> Self {
        // Read-ahead larger than a quarter of the cache would evict itself before it is read.
        options.max_readahead = options.max_readahead.min(options.cache_bytes as u64 / 4).max(256 * 1024);
        let now = SystemTime::now();
        let names: Vec<&str> = catalogs.iter().map(|c| c.dir_name.as_str()).collect();
        let tree = Tree::new(&names, now);
        let permits = (options.readahead_budget / (1 << 20)).clamp(1, u64::from(u32::MAX >> 4)) as usize;
        NatsterFs {
            tree: RwLock::new(tree),
            catalogs: RwLock::new(catalogs.into_iter().map(Some).collect()),
            cache: Arc::new(ChunkCache::new(options.cache_bytes)),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            readahead_budget: Arc::new(Semaphore::new(permits)),
            options,
            started: now,
            listings: watch::Sender::new(0),
            calls: Calls::default(),
        }
    }

    /// Changes every time a listing is applied (then read each catalog's `revision`).
    pub fn listing_changes(&self) -> watch::Receiver<u64> {
        self.listings.subscribe()
    }

    /// Catalog `i`'s files as the tree holds them: (path in the catalog, entry), by path.
    pub fn catalog_files(&self, i: usize) -> Vec<(String, CatalogEntry)> {
        let Some(tree) = self.tree().catalog(i) else { return Vec::new() };
        tree.files().into_iter().map(|(path, _, entry)| (path, entry)).collect()
    }

    /// The inode and entry of the file at `path` (as [`NatsterFs::catalog_files`] spells it)
    /// in catalog `i`; None for a folder or a path the listing does not name.
    pub fn catalog_file(&self, i: usize, path: &str) -> Option<(u64, CatalogEntry)> {
        self.tree().catalog(i)?.file_at_path(path)
    }

    fn tree(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    fn tree_mut(&self) -> std::sync::RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Catalog `i`, unless it was removed.
    pub fn catalog(&self, i: usize) -> Option<Arc<MountedCatalog>> {
        self.catalogs.read().unwrap_or_else(|p| p.into_inner()).get(i).cloned().flatten()
    }

    /// The mounted catalogs with their indices.
    pub fn catalogs(&self) -> Vec<(usize, Arc<MountedCatalog>)> {
        let slots = self.catalogs.read().unwrap_or_else(|p| p.into_inner());
        slots.iter().enumerate().filter_map(|(i, c)| Some((i, c.clone()?))).collect()
    }

    /// Adds a catalog folder to the root (empty until a listing is applied); returns its
    /// index and what the kernel must forget. A folder name already in use is refused.
    pub fn add_catalog(&self, catalog: Arc<MountedCatalog>) -> Option<(usize, Invalidations)> {
        let mut slots = self.catalogs.write().unwrap_or_else(|p| p.into_inner());
        let i = slots.len();
        let inv = self.tree_mut().add_catalog(i, &catalog.dir_name, SystemTime::now())?;
        slots.push(Some(catalog));
        Some((i, inv))
    }

    /// Removes catalog `i`'s folder and everything under it; returns what the kernel must
    /// forget.
    pub fn remove_catalog(&self, i: usize) -> Invalidations {
        let mut slots = self.catalogs.write().unwrap_or_else(|p| p.into_inner());
        match slots.get_mut(i) {
            Some(slot @ Some(_)) => *slot = None,
            _ => return Invalidations::default(),
        }
        self.tree_mut().remove_catalog(i)
    }

    /// Replaces catalog `i`'s folder with `listing`; returns what the kernel must forget.
    pub fn apply_listing(&self, i: usize, listing: &CatalogSummary) -> Invalidations {
        self.apply(i, Listing::from_summary(listing))
    }

    /// Replaces catalog `i`'s folder with `listing` (the tree is built without holding the
    /// tree's lock; readers see the old one until the swap); returns what the kernel must
    /// forget.
    pub fn apply(&self, i: usize, listing: Listing) -> Invalidations {
        let Some(catalog) = self.catalog(i) else { return Invalidations::default() };
        catalog.source.listing_applied(&listing);
        let revision = listing.revision.clone();
        let Some(old) = self.tree().catalog(i) else { return Invalidations::default() };
        let (new, inv) = tree::CatalogTree::build(listing, old.base(), Some(&old), self.started);
        if !self.tree_mut().swap(i, &old, new) {
            return Invalidations::default();
        }
        drop(old);
        *catalog.revision.lock().unwrap_or_else(|p| p.into_inner()) = revision;
        self.listings.send_modify(|n| *n = n.wrapping_add(1));
        inv
    }

    /// Catalog `i`'s tree as shown now.
    pub fn catalog_tree(&self, i: usize) -> Option<Arc<tree::CatalogTree>> {
        self.tree().catalog(i)
    }

    /// Files catalog `i`'s folder shows.
    pub fn entry_count(&self, i: usize) -> usize {
        self.tree().catalog(i).map_or(0, |t| t.file_count())
    }

    pub fn attr(&self, ino: u64) -> Result<Attr, FsError> {
        let (uid, gid) = (self.options.uid, self.options.gid);
        let tree = self.tree();
        if ino == ROOT_INO {
            return Ok(self.root_attr(&tree));
        }
        tree.tree_of(ino).and_then(|t| t.attr(ino, uid, gid)).ok_or(FsError::NotFound)
    }

    fn root_attr(&self, tree: &Tree) -> Attr {
        Attr {
            ino: ROOT_INO,
            size: 0,
            is_dir: true,
            mtime: self.started,
            perm: 0o555,
            nlink: 2 + tree.root_entries().count() as u32,
            uid: self.options.uid,
            gid: self.options.gid,
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let (uid, gid) = (self.options.uid, self.options.gid);
        let tree = self.tree();
        if parent == ROOT_INO {
            let i = tree.root_child(name).ok_or(FsError::NotFound)?;
            let t = tree.catalog(i).ok_or(FsError::NotFound)?;
            return t.attr(t.base(), uid, gid).ok_or(FsError::NotFound);
        }
        let t = tree.tree_of(parent).ok_or(FsError::NotFound)?;
        t.lookup(parent, name, uid, gid).map_err(|is_file| if is_file { FsError::NotDir } else { FsError::NotFound })
    }

    /// What folder `ino` holds now, `.` and `..` first: what an open folder reads from, so that
    /// a listing applied while a program reads the folder neither skips nor repeats entries.
    pub fn snapshot(&self, ino: u64) -> Result<DirSnapshot, FsError> {
        let tree = self.tree();
        if ino == ROOT_INO {
            let folders =
                tree.root_entries().filter_map(|(name, i)| Some((name.to_string(), tree.catalog(i)?))).collect();
            return Ok(DirSnapshot::Root { folders, generation: tree.root_generation });
        }
        let t = tree.tree_of(ino).ok_or(FsError::NotFound)?;
        if t.is_file(ino).ok_or(FsError::NotFound)? {
            return Err(FsError::NotDir);
        }
        let parent = t.parent_of(ino).ok_or(FsError::NotFound)?;
        Ok(DirSnapshot::Catalog { tree: t.clone(), dir: ino, parent })
    }

    /// Opens folder `ino`: its entries are read from a snapshot taken now (see
    /// [`NatsterFs::snapshot`]) until [`NatsterFs::releasedir`].
    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let snapshot = Arc::new(self.snapshot(ino)?);
        let fh = self.next_handle.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, snapshot);
        Ok(fh)
    }

    /// The snapshot of open folder `fh`, or a fresh one of `ino` for a handle we never gave.
    pub fn open_dir(&self, fh: u64, ino: u64) -> Result<Arc<DirSnapshot>, FsError> {
        if let Some(s) = self.dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&fh) {
            return Ok(s.clone());
        }
        Ok(Arc::new(self.snapshot(ino)?))
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh);
    }

    /// Entries of a folder, `.` and `..` first.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, FsError> {
        let snapshot = self.snapshot(ino)?;
        Ok((0..snapshot.len())
            .filter_map(|k| snapshot.entry(k))
            .map(|c| (c.ino, c.is_dir, c.name.to_string()))
            .collect())
    }

    /// Catalog index and listing entry of file `ino`.
    pub fn file_entry(&self, ino: u64) -> Result<(usize, CatalogEntry), FsError> {
        let tree = self.tree();
        let t = tree.tree_of(ino).ok_or(FsError::NotFound)?;
        match t.is_file(ino) {
            Some(true) => {}
            Some(false) => return Err(FsError::IsDir),
            None => return Err(FsError::NotFound),
        }
        let entry = t.entry(ino).ok_or(FsError::NotFound)?;
        Ok((tree::catalog_of(ino).ok_or(FsError::NotFound)?, entry))
    }

    /// The user.natster.* attributes of a file, a catalog's folder, or the root (which
    /// tells what the mount was asked: `user.natster.calls`, FUSE requests by kind).
    pub fn xattrs(&self, ino: u64) -> Result<Vec<(&'static str, String)>, FsError> {
        if ino == ROOT_INO {
            return Ok(vec![("user.natster.calls", self.calls.to_string())]);
        }
        // Taken before the tree: `add_catalog` locks catalogs, then the tree; never the reverse.
        let catalogs = self.catalogs();
        let by_index = |i: usize| catalogs.iter().find(|(j, _)| *j == i).map(|(_, c)| c.clone());
        let i = tree::catalog_of(ino).ok_or(FsError::NotFound)?;
        let t = self.tree().tree_of(ino).cloned().ok_or(FsError::NotFound)?;
        match t.is_file(ino) {
            None => Err(FsError::NotFound),
            Some(true) => {
                let entry = t.entry(ino).ok_or(FsError::NotFound)?;
                Ok(vec![
                    ("user.natster.hash", entry.hash),
                    ("user.natster.mime_type", entry.mime_type),
                    ("user.natster.description", entry.description),
                    ("user.natster.owner", by_index(i).map(|c| c.owner.clone()).unwrap_or_default()),
                    (
                        "user.natster.verified",
                        by_index(i).map(|c| c.source.verification().to_string()).unwrap_or_default(),
                    ),
                ])
            }
            // A catalog's folder: who owns it, whether it is online, the revision shown.
            Some(false) if ino == t.base() => {
                let Some(catalog) = by_index(i) else { return Ok(Vec::new()) };
                Ok(vec![
                    ("user.natster.owner", catalog.owner.clone()),
                    ("user.natster.online", catalog.presence().state.as_str().to_string()),
                    ("user.natster.revision", catalog.revision()),
                ])
            }
            Some(false) => Ok(Vec::new()),
        }
    }
}

/// What an open folder reads: the root's catalog folders, or one folder of one catalog tree
/// at the revision it was opened on. Entry `k`: 0 is `.`, 1 is `..`, then the entries by name.
///
/// The offset after entry `k` is `generation << 32 | (k + 1)`: the kernel's readdir cache of a
/// folder (FOPEN_CACHE_DIR) is shared by every open of it and looks an open's position up by
/// offset, so offsets of two versions must differ, or a program still reading the old version
/// would go on in the new one at the same position, skipping or repeating entries. With
/// distinct offsets the kernel finds no match and asks us, and the open's snapshot answers.
pub enum DirSnapshot {
    Root { folders: Vec<(String, Arc<tree::CatalogTree>)>, generation: u32 },
    Catalog { tree: Arc<tree::CatalogTree>, dir: u64, parent: u64 },
}

impl DirSnapshot {
    fn generation(&self) -> u32 {
        match self {
            DirSnapshot::Root { generation, .. } => *generation,
            DirSnapshot::Catalog { tree, .. } => tree.generation,
        }
    }

    /// The readdir offset just after entry `k`.
    pub fn offset_after(&self, k: usize) -> u64 {
        (u64::from(self.generation()) << 32) | (k as u64 + 1)
    }

    /// The entry a readdir at `offset` starts from.
    pub fn index_at(offset: u64) -> usize {
        (offset & 0xffff_ffff) as usize
    }

    /// Entries, `.` and `..` included.
    pub fn len(&self) -> usize {
        2 + match self {
            DirSnapshot::Root { folders, .. } => folders.len(),
            DirSnapshot::Catalog { tree, dir, .. } => tree.child_count(*dir).unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Entry `k` (None past the end), with its attributes except for `.` and `..`.
    pub fn entry(&self, k: usize) -> Option<tree::Child<'_>> {
        self.entry_with(k, 0, 0).map(|(c, _)| c)
    }

    /// Entry `k` with its attributes (None for `.` and `..`, which the kernel does not take).
    pub fn entry_with(&self, k: usize, uid: u32, gid: u32) -> Option<(tree::Child<'_>, Option<Attr>)> {
        let (this, parent) = match self {
            DirSnapshot::Root { .. } => (ROOT_INO, ROOT_INO),
            DirSnapshot::Catalog { dir, parent, .. } => (*dir, *parent),
        };
        match k {
            0 => return Some((tree::Child { ino: this, is_dir: true, name: "." }, None)),
            1 => return Some((tree::Child { ino: parent, is_dir: true, name: ".." }, None)),
            _ => {}
        }
        match self {
            DirSnapshot::Root { folders, .. } => {
                let (name, t) = folders.get(k - 2)?;
                let attr = t.attr(t.base(), uid, gid)?;
                Some((tree::Child { ino: t.base(), is_dir: true, name }, Some(attr)))
            }
            DirSnapshot::Catalog { tree, dir, .. } => {
                let (child, attr) = tree.child_attr_at(*dir, k - 2, uid, gid)?;
                Some((child, Some(attr)))
            }
        }
    }
}
