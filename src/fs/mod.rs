//! The mounted filesystem's logic, independent of FUSE: an inode tree built from catalog
//! listings, reads served from the chunk cache with misses fetched through the v2 client, and a
//! read-ahead that grows on sequential access. `fuse.rs` is a thin adapter over this.

pub mod fuse;
pub mod mount;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::sync::Semaphore;

use crate::cache::{ChunkCache, ChunkKey, Lookup};
use crate::client::{CatalogClient, ClientError, RemoteFile};
use crate::protocol::{CatalogEntry, CatalogSummary};

pub const ROOT_INO: u64 = 1;

/// Chunk size the mount caches a v1 peer's files in (v1 sends whole files in 4 KiB pieces).
const V1_CACHE_CHUNK: u64 = 256 * 1024;

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
            FsError::Timeout(_) | FsError::Remote(_) | FsError::V1TooLarge => libc::EIO,
        }
    }
}

impl From<ClientError> for FsError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused { code: 403, message } => FsError::Forbidden(message),
            other => FsError::Remote(other.to_string()),
        }
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

/// One catalog directory of the mount.
pub struct Source {
    /// Name of its folder in the mount root.
    pub dir_name: String,
    /// Owner's account key, or "self" for the context's own catalogs.
    pub owner: String,
    pub client: CatalogClient,
    /// Open v2 sessions by file hash (bounded; dropping one closes it on the server).
    sessions: tokio::sync::Mutex<lru::LruCache<String, RemoteFile>>,
    /// Chunk size per hash, remembered past sessions so cached chunks read while offline.
    chunk_sizes: Mutex<HashMap<String, u64>>,
    revision: Mutex<String>,
    /// Set once the catalog's server turned out to be an original, v1-only peer.
    v1_only: std::sync::atomic::AtomicBool,
}

impl Source {
    pub fn new(dir_name: String, owner: String, client: CatalogClient) -> Self {
        Source {
            dir_name,
            owner,
            client,
            sessions: tokio::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(64).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            chunk_sizes: Mutex::new(HashMap::new()),
            revision: Mutex::new(String::new()),
            v1_only: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn revision(&self) -> String {
        self.revision.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn remember_chunk_size(&self, hash: &str, cs: u64) {
        self.chunk_sizes.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.to_string(), cs);
    }

    fn known_chunk_size(&self, hash: &str) -> Option<u64> {
        self.chunk_sizes.lock().unwrap_or_else(|p| p.into_inner()).get(hash).copied()
    }

    fn is_v1_only(&self) -> bool {
        self.v1_only.load(Ordering::Relaxed)
    }

    async fn session(&self, entry: &CatalogEntry) -> Result<RemoteFile, FsError> {
        let mut sessions = self.sessions.lock().await;
        if let Some(file) = sessions.get(&entry.hash) {
            return Ok(file.clone());
        }
        let file = match self.client.open(&entry.hash, Some(entry.byte_size)).await {
            Err(ClientError::V1Only) => {
                self.v1_only.store(true, Ordering::Relaxed);
                return Err(ClientError::V1Only.into());
            }
            other => other?,
        };
        self.remember_chunk_size(&entry.hash, file.chunk_size());
        sessions.put(entry.hash.clone(), file.clone());
        Ok(file)
    }

    async fn forget_session(&self, hash: &str) {
        self.sessions.lock().await.pop(hash);
    }
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    Dir { children: BTreeMap<String, u64> },
    File { source: usize, entry: CatalogEntry },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: NodeKind,
    pub mtime: SystemTime,
}

/// File attributes, FUSE-independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub is_dir: bool,
    pub mtime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What the kernel must forget after a listing changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Invalidations {
    /// (parent inode, name) of entries added, removed or changed.
    pub entries: Vec<(u64, String)>,
    /// Inodes whose attributes or data changed.
    pub inodes: Vec<u64>,
}

#[derive(Default)]
struct Tree {
    nodes: HashMap<u64, Node>,
    /// (source, path) → inode, kept for the mount's life so inode numbers stay stable.
    inos: HashMap<(usize, String), u64>,
    next_ino: u64,
}

impl Tree {
    fn ino_for(&mut self, source: usize, path: &str) -> u64 {
        if let Some(&ino) = self.inos.get(&(source, path.to_string())) {
            return ino;
        }
        self.next_ino += 1;
        self.inos.insert((source, path.to_string()), self.next_ino);
        self.next_ino
    }

    fn children_mut(&mut self, ino: u64) -> Option<&mut BTreeMap<String, u64>> {
        match self.nodes.get_mut(&ino) {
            Some(Node { kind: NodeKind::Dir { children }, .. }) => Some(children),
            _ => None,
        }
    }

    /// Removes `ino` and everything under it.
    fn remove_subtree(&mut self, ino: u64) {
        if let Some(node) = self.nodes.remove(&ino) {
            if let NodeKind::Dir { children } = node.kind {
                for child in children.into_values() {
                    self.remove_subtree(child);
                }
            }
        }
    }
}

struct OpenFile {
    source: usize,
    entry: CatalogEntry,
    readahead: Mutex<ReadAhead>,
}

/// Sequential-access detector. Reads that continue where the last ones ended (within a slack
/// that absorbs the kernel's own read-ahead arriving slightly out of order) double the window;
/// anything else is a seek and resets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAhead {
    /// Highest end offset read so far in the current sequential run.
    frontier: u64,
    pub window: u64,
    max: u64,
    min: u64,
}

impl ReadAhead {
    pub fn new(min: u64, max: u64) -> Self {
        ReadAhead { frontier: 0, window: 0, max, min }
    }

    /// Records a read and returns the window of bytes to prefetch past it (0: none).
    pub fn on_read(&mut self, offset: u64, len: u64) -> u64 {
        let end = offset + len;
        let slack = (4 * len).max(1 << 20);
        let sequential = offset <= self.frontier.saturating_add(slack) && end + slack >= self.frontier;
        if sequential && (self.frontier > 0 || offset == 0) {
            self.window = if self.window == 0 { self.min } else { (self.window * 2).min(self.max) };
        } else {
            self.window = 0;
        }
        self.frontier = if sequential { self.frontier.max(end) } else { end };
        self.window
    }
}

/// The filesystem state shared by all FUSE threads.
pub struct NatsterFs {
    tree: RwLock<Tree>,
    pub sources: Vec<Arc<Source>>,
    pub cache: Arc<ChunkCache<FsError>>,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_handle: AtomicU64,
    readahead_budget: Arc<Semaphore>,
    pub options: FsOptions,
    started: SystemTime,
}

fn mtime_of(secs: i64) -> SystemTime {
    if secs > 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

impl NatsterFs {
    pub fn new(sources: Vec<Arc<Source>>, mut options: FsOptions) -> Self {
        // Read-ahead larger than a quarter of the cache would evict itself before it is read.
        options.max_readahead = options.max_readahead.min(options.cache_bytes as u64 / 4).max(256 * 1024);
        let mut tree = Tree { next_ino: ROOT_INO, ..Tree::default() };
        let now = SystemTime::now();
        let mut root_children = BTreeMap::new();
        for (i, source) in sources.iter().enumerate() {
            let ino = tree.ino_for(i, "");
            root_children.insert(source.dir_name.clone(), ino);
            tree.nodes.insert(
                ino,
                Node {
                    ino,
                    parent: ROOT_INO,
                    name: source.dir_name.clone(),
                    kind: NodeKind::Dir { children: BTreeMap::new() },
                    mtime: now,
                },
            );
        }
        tree.nodes.insert(
            ROOT_INO,
            Node {
                ino: ROOT_INO,
                parent: ROOT_INO,
                name: String::new(),
                kind: NodeKind::Dir { children: root_children },
                mtime: now,
            },
        );
        let permits = (options.readahead_budget / (1 << 20)).clamp(1, u64::from(u32::MAX >> 4)) as usize;
        NatsterFs {
            tree: RwLock::new(tree),
            sources,
            cache: Arc::new(ChunkCache::new(options.cache_bytes)),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            readahead_budget: Arc::new(Semaphore::new(permits)),
            options,
            started: now,
        }
    }

    fn tree(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces catalog `source`'s folder with `listing`; returns what the kernel must forget.
    pub fn apply_listing(&self, source: usize, listing: &CatalogSummary) -> Invalidations {
        let mut inv = Invalidations::default();
        let mut tree = self.tree.write().unwrap_or_else(|p| p.into_inner());
        let top = tree.ino_for(source, "");
        // Index the new listing by path, to diff against the current tree.
        let mut wanted: BTreeMap<String, &CatalogEntry> = BTreeMap::new();
        for e in &listing.entries {
            wanted.insert(e.path.trim_start_matches('/').to_string(), e);
        }
        let mut wanted_dirs: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for path in wanted.keys() {
            let mut at = path.as_str();
            while let Some((dir, _)) = at.rsplit_once('/') {
                if !wanted_dirs.insert(dir) {
                    break;
                }
                at = dir;
            }
        }
        // Remove files that vanished or changed, and folders that no longer hold anything.
        let mut existing: Vec<(String, u64)> = tree
            .inos
            .iter()
            .filter(|((s, p), ino)| *s == source && !p.is_empty() && tree.nodes.contains_key(ino))
            .map(|((_, p), ino)| (p.clone(), *ino))
            .collect();
        existing.sort();
        for (path, ino) in existing.iter().rev() {
            let Some(node) = tree.nodes.get(ino).cloned() else { continue };
            let keep = match &node.kind {
                NodeKind::File { entry, .. } => wanted.get(path).is_some_and(|w| *w == entry),
                NodeKind::Dir { .. } => wanted_dirs.contains(path.as_str()),
            };
            if !keep {
                if let Some(children) = tree.children_mut(node.parent) {
                    children.remove(&node.name);
                }
                tree.remove_subtree(*ino);
                inv.entries.push((node.parent, node.name.clone()));
                inv.inodes.push(*ino);
            }
        }
        // Add what is new.
        for (path, entry) in &wanted {
            let mut parent = top;
            let mut so_far = String::new();
            let parts: Vec<&str> = path.split('/').collect();
            for (depth, part) in parts.iter().enumerate() {
                if !so_far.is_empty() {
                    so_far.push('/');
                }
                so_far.push_str(part);
                let is_file = depth + 1 == parts.len();
                let ino = tree.ino_for(source, &so_far);
                if !tree.nodes.contains_key(&ino) {
                    let kind = if is_file {
                        NodeKind::File { source, entry: (*entry).clone() }
                    } else {
                        NodeKind::Dir { children: BTreeMap::new() }
                    };
                    let mtime = if is_file { mtime_of(entry.mtime) } else { self.started };
                    // A listing with a file and a folder of the same name: the first one wins.
                    match tree.children_mut(parent) {
                        Some(children) if !children.contains_key(*part) => {
                            children.insert(part.to_string(), ino);
                        }
                        _ => break,
                    }
                    tree.nodes.insert(ino, Node { ino, parent, name: part.to_string(), kind, mtime });
                    inv.entries.push((parent, part.to_string()));
                }
                if !matches!(tree.nodes.get(&ino), Some(Node { kind: NodeKind::Dir { .. }, .. })) && !is_file {
                    break;
                }
                parent = ino;
            }
        }
        // Forget inode numbers of paths that are gone, so a peer renaming files cannot grow
        // the table forever (unchanged and re-added paths kept theirs above).
        let t = &mut *tree;
        let nodes = &t.nodes;
        t.inos.retain(|(s, _), ino| *s != source || nodes.contains_key(ino));
        inv.entries.sort();
        inv.entries.dedup();
        *self.sources[source].revision.lock().unwrap_or_else(|p| p.into_inner()) = listing.revision.clone();
        inv
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
        let tree = self.tree();
        let node = tree.nodes.get(&ino).ok_or(FsError::NotFound)?;
        match &node.kind {
            NodeKind::File { source, entry } => Ok(vec![
                ("user.natster.hash", entry.hash.clone()),
                ("user.natster.mime_type", entry.mime_type.clone()),
                ("user.natster.description", entry.description.clone()),
                ("user.natster.owner", self.sources[*source].owner.clone()),
            ]),
            NodeKind::Dir { .. } => Ok(Vec::new()),
        }
    }

    pub fn open(&self, ino: u64) -> Result<u64, FsError> {
        let tree = self.tree();
        let node = tree.nodes.get(&ino).ok_or(FsError::NotFound)?;
        let NodeKind::File { source, entry } = &node.kind else { return Err(FsError::IsDir) };
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let chunk_hint = 256 * 1024;
        let file = OpenFile {
            source: *source,
            entry: entry.clone(),
            readahead: Mutex::new(ReadAhead::new(chunk_hint, self.options.max_readahead)),
        };
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(file));
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh);
    }

    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Reads `size` bytes at `offset` of open file `fh`, bounded by the read timeout.
    pub async fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let file =
            self.handles.lock().unwrap_or_else(|p| p.into_inner()).get(&fh).cloned().ok_or(FsError::BadHandle)?;
        let end = offset.saturating_add(u64::from(size)).min(file.entry.byte_size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let window = file.readahead.lock().unwrap_or_else(|p| p.into_inner()).on_read(offset, end - offset);
        let timeout = self.options.read_timeout;
        let read = self.read_range(&file, offset, end);
        let result = match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(FsError::Timeout(timeout)),
        };
        match &result {
            Ok(_) if window > 0 => self.prefetch(file.clone(), end, window),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                catalog = %self.sources[file.source].dir_name,
                path = %file.entry.path,
                offset,
                "read failed: {e}"
            ),
        }
        result
    }

    async fn read_range(&self, file: &OpenFile, offset: u64, end: u64) -> Result<Bytes, FsError> {
        let source = &self.sources[file.source];
        let cs = match source.known_chunk_size(&file.entry.hash) {
            Some(cs) => cs,
            None => match source.session(&file.entry).await {
                Ok(remote) => remote.chunk_size(),
                // An original (v1-only) peer: the whole file comes at once, cached in chunks
                // of our own size (see `fetch_run`).
                Err(FsError::Remote(_)) if source.is_v1_only() => {
                    source.remember_chunk_size(&file.entry.hash, V1_CACHE_CHUNK);
                    V1_CACHE_CHUNK
                }
                Err(e) => return Err(e),
            },
        };
        let first = offset / cs;
        let last = (end - 1) / cs;
        let chunks = self.chunks(file, cs, first, last - first + 1).await?;
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (i, chunk) in chunks.iter().enumerate() {
            let chunk_start = (first + i as u64) * cs;
            let from = offset.saturating_sub(chunk_start) as usize;
            let to = ((end - chunk_start) as usize).min(chunk.len());
            if from < to {
                out.extend_from_slice(&chunk[from..to]);
            }
        }
        Ok(out.freeze())
    }

    fn key(&self, file: &OpenFile, cs: u64, index: u64) -> ChunkKey {
        ChunkKey {
            scope: Arc::from(self.sources[file.source].owner.as_str()),
            hash: Arc::from(file.entry.hash.as_str()),
            chunk_size: cs,
            index,
        }
    }

    /// Chunks `first .. first+count` of a file: cached ones at once, missing ones fetched in
    /// contiguous runs (one request per run), ones another reader is fetching awaited.
    async fn chunks(&self, file: &OpenFile, cs: u64, first: u64, count: u64) -> Result<Vec<Bytes>, FsError> {
        let mut slots: Vec<Option<Bytes>> = vec![None; count as usize];
        let mut waits = Vec::new();
        let mut claims: Vec<(u64, tokio::sync::watch::Sender<_>)> = Vec::new();
        for i in 0..count {
            let key = self.key(file, cs, first + i);
            match self.cache.lookup(&key) {
                Lookup::Hit(b) => slots[i as usize] = Some(b),
                Lookup::Wait(rx) => waits.push((i, rx)),
                Lookup::Claimed(tx) => claims.push((first + i, tx)),
            }
        }
        // Fetch claimed chunks in contiguous runs.
        let mut runs: Vec<Vec<(u64, tokio::sync::watch::Sender<_>)>> = Vec::new();
        for claim in claims {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|(i, _)| *i + 1 == claim.0) => run.push(claim),
                _ => runs.push(vec![claim]),
            }
        }
        let fetches = runs.into_iter().map(|run| self.fetch_run(file, cs, run));
        for (run_first, result) in futures::future::join_all(fetches).await {
            let chunks = result?;
            for (k, chunk) in chunks.into_iter().enumerate() {
                slots[(run_first - first) as usize + k] = Some(chunk);
            }
        }
        for (i, mut rx) in waits {
            let shared = rx.wait_for(|v| v.is_some()).await.map(|v| v.clone());
            match shared {
                Ok(Some(Ok(bytes))) => slots[i as usize] = Some(bytes),
                Ok(Some(Err(e))) => return Err(e),
                // The fetcher was cancelled: fetch it ourselves.
                _ => {
                    let again = Box::pin(self.chunks(file, cs, first + i, 1)).await?;
                    slots[i as usize] = again.into_iter().next();
                }
            }
        }
        slots.into_iter().map(|s| s.ok_or_else(|| FsError::Remote("chunk missing after fetch".into()))).collect()
    }

    /// Fetches one run of claimed chunks and completes every claim, on success or failure.
    async fn fetch_run(
        &self,
        file: &OpenFile,
        cs: u64,
        run: Vec<(u64, tokio::sync::watch::Sender<crate::cache::Shared<FsError>>)>,
    ) -> (u64, Result<Vec<Bytes>, FsError>) {
        let run_first = run.first().map(|(i, _)| *i).unwrap_or(0);
        // Completes claims even if this future is dropped (timeout): waiters must not hang.
        let mut guard = ClaimGuard { fs: self, file, cs, run };
        let source = &self.sources[file.source];
        let result = async {
            if source.is_v1_only() {
                let n = guard.run.len();
                let all = self.load_v1(file).await?;
                return Ok(all.into_iter().skip(run_first as usize).take(n).collect());
            }
            let remote = source.session(&file.entry).await?;
            if remote.chunk_size() != cs {
                return Err(FsError::Remote("chunk size changed".into()));
            }
            let n = guard.run.len() as u64;
            match remote.read_chunks(run_first, n).await {
                Err(e) => {
                    // A refused or broken session is not reused.
                    source.forget_session(&file.entry.hash).await;
                    Err(FsError::from(e))
                }
                Ok(chunks) => Ok(chunks),
            }
        }
        .await;
        for (k, (index, tx)) in std::mem::take(&mut guard.run).into_iter().enumerate() {
            let key = self.key(file, cs, index);
            let one = match &result {
                Ok(chunks) => chunks.get(k).cloned().ok_or_else(|| FsError::Remote("short read".into())),
                Err(e) => Err(e.clone()),
            };
            self.cache.complete(&key, tx, one);
        }
        (run_first, result)
    }

    /// Downloads a whole file from a v1-only peer, verifies its sha256, and returns it in
    /// `V1_CACHE_CHUNK` pieces (also cached). Refused for files above half the cache, which
    /// could not stay cached and would be downloaded again for every read.
    async fn load_v1(&self, file: &OpenFile) -> Result<Vec<Bytes>, FsError> {
        if file.entry.byte_size > self.cache.budget() as u64 / 2 {
            return Err(FsError::V1TooLarge);
        }
        let source = &self.sources[file.source];
        let mut whole = Vec::with_capacity(file.entry.byte_size as usize);
        let limit = file.entry.byte_size;
        source
            .client
            .download_v1(&file.entry.hash, |chunk| {
                if whole.len() as u64 + chunk.len() as u64 > limit {
                    return Err(ClientError::Protocol("v1 peer sent more than the listed size".into()));
                }
                whole.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        use sha2::Digest;
        if hex::encode(sha2::Sha256::digest(&whole)) != file.entry.hash {
            return Err(ClientError::HashMismatch(file.entry.hash.clone()).into());
        }
        // Each piece its own allocation, so evicting one frees it (the budget stays exact).
        let pieces: Vec<Bytes> = whole.chunks(V1_CACHE_CHUNK as usize).map(Bytes::copy_from_slice).collect();
        for (i, piece) in pieces.iter().enumerate() {
            self.cache.insert(self.key(file, V1_CACHE_CHUNK, i as u64), piece.clone());
        }
        Ok(pieces)
    }

    /// Starts fetching `window` bytes past `from` in the background, within the mount-wide
    /// read-ahead budget; skipped when the budget is used up.
    fn prefetch(self: &Arc<Self>, file: Arc<OpenFile>, from: u64, window: u64) {
        let source = &self.sources[file.source];
        let Some(cs) = source.known_chunk_size(&file.entry.hash) else { return };
        let end = from.saturating_add(window).min(file.entry.byte_size);
        if from >= end {
            return;
        }
        let first = from / cs;
        let last = (end - 1) / cs;
        let missing: Vec<u64> =
            (first..=last).filter(|&i| !self.cache.has_or_pending(&self.key(&file, cs, i))).collect();
        let (Some(&lo), Some(&hi)) = (missing.first(), missing.last()) else { return };
        let mb = (((hi - lo + 1) * cs) >> 20).max(1) as u32;
        let Ok(permit) = self.readahead_budget.clone().try_acquire_many_owned(mb) else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let timeout = this.options.read_timeout;
            let _ = tokio::time::timeout(timeout, this.chunks(&file, cs, lo, hi - lo + 1)).await;
        });
    }
}

struct ClaimGuard<'a> {
    fs: &'a NatsterFs,
    file: &'a OpenFile,
    cs: u64,
    run: Vec<(u64, tokio::sync::watch::Sender<crate::cache::Shared<FsError>>)>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        for (index, _) in self.run.drain(..) {
            self.fs.cache.abandon(&self.fs.key(self.file, self.cs, index));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_grows_on_sequential_and_resets_on_seek() {
        let mut ra = ReadAhead::new(128 << 10, 8 << 20);
        assert_eq!(ra.on_read(0, 128 << 10), 128 << 10);
        assert_eq!(ra.on_read(128 << 10, 128 << 10), 256 << 10);
        // Kernel read-ahead arriving slightly out of order is still sequential.
        assert_eq!(ra.on_read(384 << 10, 128 << 10), 512 << 10);
        assert_eq!(ra.on_read(256 << 10, 128 << 10), 1 << 20);
        for _ in 0..10 {
            ra.on_read(ra.frontier, 128 << 10);
        }
        assert_eq!(ra.window, 8 << 20, "window is bounded");
        assert_eq!(ra.on_read(500 << 20, 4096), 0, "a seek resets the window");
        assert_eq!(ra.on_read((500 << 20) + 4096, 4096), 128 << 10);
    }

    fn entry(path: &str, hash: char, size: u64) -> CatalogEntry {
        CatalogEntry {
            path: path.into(),
            description: String::new(),
            mime_type: "video/mp4".into(),
            hash: hash.to_string().repeat(64),
            byte_size: size,
            mtime: 1_700_000_000,
        }
    }

    fn summary(entries: Vec<CatalogEntry>, revision: &str) -> CatalogSummary {
        CatalogSummary {
            name: "c".into(),
            description: String::new(),
            image: None,
            entries,
            revision: revision.into(),
            protocol: 2,
            total_entries: None,
        }
    }

    async fn test_fs() -> NatsterFs {
        // A client that is never used: the tree logic needs no network.
        let nats = async_nats::ConnectOptions::new().retry_on_initial_connect().connect("127.0.0.1:1").await.unwrap();
        let client = CatalogClient::new(nats, "c", Default::default()).unwrap();
        let source = Arc::new(Source::new("c".into(), "self".into(), client));
        NatsterFs::new(vec![source], FsOptions::default())
    }

    #[tokio::test]
    async fn chunks_are_shared_only_between_catalogs_of_one_owner() {
        let nats = async_nats::ConnectOptions::new().retry_on_initial_connect().connect("127.0.0.1:1").await.unwrap();
        let source = |dir: &str, owner: &str| {
            let client = CatalogClient::new(nats.clone(), dir, Default::default()).unwrap();
            Arc::new(Source::new(dir.into(), owner.into(), client))
        };
        let fs = NatsterFs::new(
            vec![source("a", "AOWNER1"), source("b", "AOWNER1"), source("c", "AOWNER2")],
            FsOptions::default(),
        );
        let open =
            |source| OpenFile { source, entry: entry("/x.mp4", 'a', 10), readahead: Mutex::new(ReadAhead::new(1, 2)) };
        assert_eq!(fs.key(&open(0), 4096, 0), fs.key(&open(1), 4096, 0), "same owner: cached once");
        assert_ne!(fs.key(&open(0), 4096, 0), fs.key(&open(2), 4096, 0), "another owner cannot plant chunks");
    }

    #[tokio::test]
    async fn listing_builds_folders_and_diffs_on_refresh() {
        let fs = test_fs().await;
        fs.apply_listing(0, &summary(vec![entry("/a/b/one.mp4", 'a', 10), entry("/two.mp4", 'b', 20)], "r1"));
        let c = fs.lookup(ROOT_INO, "c").unwrap();
        assert!(c.is_dir);
        let a = fs.lookup(c.ino, "a").unwrap();
        let b = fs.lookup(a.ino, "b").unwrap();
        let one = fs.lookup(b.ino, "one.mp4").unwrap();
        assert_eq!((one.size, one.perm, one.is_dir), (10, 0o444, false));
        assert_eq!(fs.xattrs(one.ino).unwrap()[0].1, "a".repeat(64));

        // one.mp4 removed (its folders with it), two.mp4 changed, three.mp4 added.
        let inv = fs.apply_listing(0, &summary(vec![entry("/two.mp4", 'c', 30), entry("/three.mp4", 'd', 5)], "r2"));
        assert!(matches!(fs.lookup(c.ino, "a"), Err(FsError::NotFound)));
        let two = fs.lookup(c.ino, "two.mp4").unwrap();
        assert_eq!(two.size, 30);
        assert!(fs.lookup(c.ino, "three.mp4").is_ok());
        assert!(inv.entries.contains(&(c.ino, "a".to_string())));
        assert!(inv.inodes.contains(&two.ino), "changed file's pages must be dropped");
        let remembered = fs.tree().inos.len();
        assert_eq!(remembered, 3, "only the folder and its two files keep inode numbers");
        let names: Vec<String> = fs.readdir(c.ino).unwrap().into_iter().map(|(_, _, n)| n).collect();
        assert_eq!(names, [".", "..", "three.mp4", "two.mp4"]);
    }
}
