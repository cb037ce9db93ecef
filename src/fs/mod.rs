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
use crate::protocol::{CatalogEntry, CatalogSummary};
use read::{Health, OpenFile};
pub use readahead::ReadAhead;
pub use source::{ChunkSource, RemoteSource};
use tree::Tree;
pub use tree::{Attr, Invalidations, Node, NodeKind, ROOT_INO};

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
    next_handle: AtomicU64,
    readahead_budget: Arc<Semaphore>,
    pub options: FsOptions,
    started: SystemTime,
    /// Bumped by every applied listing, for watchers outside the kernel (the web UI).
    listings: watch::Sender<u64>,
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
            next_handle: AtomicU64::new(1),
            readahead_budget: Arc::new(Semaphore::new(permits)),
            options,
            started: now,
            listings: watch::Sender::new(0),
        }
    }

    /// Changes every time a listing is applied (then read each catalog's `revision`).
    pub fn listing_changes(&self) -> watch::Receiver<u64> {
        self.listings.subscribe()
    }

    /// Catalog `i`'s files as the tree holds them: (path in the catalog, entry), by path.
    pub fn catalog_files(&self, i: usize) -> Vec<(String, CatalogEntry)> {
        let tree = self.tree();
        let mut files: Vec<(String, CatalogEntry)> = tree
            .inos
            .iter()
            .filter(|((c, _), _)| *c == i)
            .filter_map(|((_, path), ino)| match tree.nodes.get(ino).map(|n| &n.kind) {
                Some(NodeKind::File { entry, .. }) => Some((path.clone(), entry.clone())),
                _ => None,
            })
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    }

    /// The inode and entry of the file at `path` (as [`NatsterFs::catalog_files`] spells it)
    /// in catalog `i`; None for a folder or a path the listing does not name.
    pub fn catalog_file(&self, i: usize, path: &str) -> Option<(u64, CatalogEntry)> {
        let tree = self.tree();
        let ino = *tree.inos.get(&(i, path.to_string()))?;
        match &tree.nodes.get(&ino)?.kind {
            NodeKind::File { entry, .. } => Some((ino, entry.clone())),
            NodeKind::Dir { .. } => None,
        }
    }

    fn tree(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
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
        let inv = self.tree.write().unwrap_or_else(|p| p.into_inner()).add_catalog(
            i,
            &catalog.dir_name,
            SystemTime::now(),
        )?;
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
        self.tree.write().unwrap_or_else(|p| p.into_inner()).remove_catalog(i)
    }

    /// Replaces catalog `i`'s folder with `listing`; returns what the kernel must forget.
    pub fn apply_listing(&self, i: usize, listing: &CatalogSummary) -> Invalidations {
        let Some(catalog) = self.catalog(i) else { return Invalidations::default() };
        catalog.source.listing_applied(listing);
        let mut inv = self.tree.write().unwrap_or_else(|p| p.into_inner()).apply_listing(i, listing, self.started);
        *catalog.revision.lock().unwrap_or_else(|p| p.into_inner()) = listing.revision.clone();
        self.listings.send_modify(|n| *n = n.wrapping_add(1));
        if !inv.is_empty() {
            // The catalog folder's own attributes (link count) changed too.
            if let Some(top) = self.tree().catalog_ino(i) {
                inv.inodes.push(top);
            }
        }
        inv
    }

    /// Files catalog `i`'s folder shows.
    pub fn entry_count(&self, i: usize) -> usize {
        self.tree()
            .nodes
            .values()
            .filter(|n| matches!(&n.kind, NodeKind::File { catalog, .. } if *catalog == i))
            .count()
    }

    pub fn attr(&self, ino: u64) -> Result<Attr, FsError> {
        let tree = self.tree();
        let node = tree.nodes.get(&ino).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(node))
    }

    fn attr_of(&self, node: &Node) -> Attr {
        let (size, is_dir, perm, nlink) = match &node.kind {
            NodeKind::Dir { children } => (0, true, 0o555, 2 + children.len() as u32),
            NodeKind::File { entry, .. } => (entry.byte_size, false, 0o444, 1),
        };
        Attr {
            ino: node.ino,
            size,
            is_dir,
            mtime: node.mtime,
            perm,
            nlink,
            uid: self.options.uid,
            gid: self.options.gid,
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let tree = self.tree();
        match &tree.nodes.get(&parent).ok_or(FsError::NotFound)?.kind {
            NodeKind::Dir { children } => {
                let ino = children.get(name).ok_or(FsError::NotFound)?;
                let node = tree.nodes.get(ino).ok_or(FsError::NotFound)?;
                Ok(self.attr_of(node))
            }
            NodeKind::File { .. } => Err(FsError::NotDir),
        }
    }

    /// Entries of a folder, `.` and `..` first.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, FsError> {
        let tree = self.tree();
        let node = tree.nodes.get(&ino).ok_or(FsError::NotFound)?;
        let NodeKind::Dir { children } = &node.kind else { return Err(FsError::NotDir) };
        let mut out = vec![(ino, true, ".".to_string()), (node.parent, true, "..".to_string())];
        for (name, child) in children {
            let is_dir = matches!(tree.nodes.get(child).map(|n| &n.kind), Some(NodeKind::Dir { .. }));
            out.push((*child, is_dir, name.clone()));
        }
        Ok(out)
    }

    /// The user.natster.* attributes of a file.
    pub fn xattrs(&self, ino: u64) -> Result<Vec<(&'static str, String)>, FsError> {
        // Taken before the tree: `add_catalog` locks catalogs, then the tree; never the reverse.
        let catalogs = self.catalogs();
        let by_index = |i: usize| catalogs.iter().find(|(j, _)| *j == i).map(|(_, c)| c.clone());
        let tree = self.tree();
        let node = tree.nodes.get(&ino).ok_or(FsError::NotFound)?;
        match &node.kind {
            NodeKind::File { catalog, entry } => Ok(vec![
                ("user.natster.hash", entry.hash.clone()),
                ("user.natster.mime_type", entry.mime_type.clone()),
                ("user.natster.description", entry.description.clone()),
                ("user.natster.owner", by_index(*catalog).map(|c| c.owner.clone()).unwrap_or_default()),
                (
                    "user.natster.verified",
                    by_index(*catalog).map(|c| c.source.verification().to_string()).unwrap_or_default(),
                ),
            ]),
            // A catalog's folder: who owns it, whether it is online, the revision shown.
            NodeKind::Dir { .. } => {
                let Some((_, catalog)) = catalogs.iter().find(|(i, _)| tree.catalog_ino(*i) == Some(ino)) else {
                    return Ok(Vec::new());
                };
                Ok(vec![
                    ("user.natster.owner", catalog.owner.clone()),
                    ("user.natster.online", catalog.presence().state.as_str().to_string()),
                    ("user.natster.revision", catalog.revision()),
                ])
            }
        }
    }
}
