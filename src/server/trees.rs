//! Chunk trees for v2 sessions: each file's tree, built from the index's side file
//! ([`crate::index::load_tree`]) off the async workers, kept in a cache bounded in bytes and
//! shared by every session on that file; and the files whose bytes were found, while being
//! read, not to match their tree.
//!
//! Invariants:
//! - A tree is served only if its side file gives the root the index holds: a side file that
//!   is missing or damaged refuses the file (never a tree computed from the bytes on disk,
//!   which would vouch for whatever is there now).
//! - A file found to differ from its tree stays refused while its identity (size, mtime) is
//!   the one it was found under, and its side file is removed (by the reader of the chunk), so
//!   the next `catalog new` hashes it again even though its size and mtime look unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::files::FileIdentity;
use crate::chunk_tree::Tree;
use crate::context::Home;
use crate::index::{IndexEntry, TreeFileError};

/// Bytes of trees kept for files no session holds (each 16 KiB leaf costs about 64 bytes).
const CACHE_BYTES: usize = 128 * 1024 * 1024;

pub(super) struct Trees {
    /// (sha256, root) → tree, least recently used first out.
    cache: Mutex<Cache>,
    /// sha256 → the identity under which the file's bytes did not match its tree.
    changed: Mutex<HashMap<String, FileIdentity>>,
}

struct Cache {
    trees: lru::LruCache<(String, String), Arc<Tree>>,
    bytes: usize,
}

impl Default for Trees {
    fn default() -> Self {
        Trees {
            cache: Mutex::new(Cache { trees: lru::LruCache::unbounded(), bytes: 0 }),
            changed: Mutex::new(HashMap::new()),
        }
    }
}

impl Trees {
    /// The tree of `entry`, from the cache or its side file (read on the blocking pool).
    pub async fn get(&self, home: &Home, entry: &IndexEntry) -> Result<Arc<Tree>, TreeFileError> {
        let root = entry.tree.clone().ok_or(TreeFileError::NotIndexed)?;
        let key = (entry.hash.clone(), root);
        if let Some(tree) = self.lock().trees.get(&key) {
            return Ok(tree.clone());
        }
        let (home, owned) = (home.clone(), entry.clone());
        let loaded = tokio::task::spawn_blocking(move || crate::index::load_tree(&home, &owned)).await;
        let tree = match loaded {
            Ok(result) => Arc::new(result?),
            Err(_) => return Err(TreeFileError::Missing("(the loading task failed)".into())),
        };
        let mut cache = self.lock();
        cache.bytes += tree.memory_bytes();
        if let Some((_, old)) = cache.trees.push(key, tree.clone()) {
            cache.bytes = cache.bytes.saturating_sub(old.memory_bytes());
        }
        while cache.bytes > CACHE_BYTES && cache.trees.len() > 1 {
            match cache.trees.pop_lru() {
                Some((_, old)) => cache.bytes = cache.bytes.saturating_sub(old.memory_bytes()),
                None => break,
            }
        }
        Ok(tree)
    }

    /// Remembers that `hash`, under `identity`, holds bytes other than its tree's.
    pub fn mark_changed(&self, hash: &str, identity: FileIdentity) {
        self.changed.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.to_string(), identity);
    }

    /// True if `hash` was found to differ from its tree under this very identity.
    pub fn is_changed(&self, hash: &str, identity: FileIdentity) -> bool {
        self.changed.lock().unwrap_or_else(|p| p.into_inner()).get(hash) == Some(&identity)
    }

    /// Forgets what no longer applies after a re-load: trees and findings of files that are
    /// not in the new listing, or not with the same root.
    pub fn retain(&self, entries: &[IndexEntry]) {
        let keep: std::collections::HashSet<(&str, &str)> =
            entries.iter().filter_map(|e| Some((e.hash.as_str(), e.tree.as_deref()?))).collect();
        let mut cache = self.lock();
        let stale: Vec<(String, String)> = cache
            .trees
            .iter()
            .filter(|((h, r), _)| !keep.contains(&(h.as_str(), r.as_str())))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(old) = cache.trees.pop(&key) {
                cache.bytes = cache.bytes.saturating_sub(old.memory_bytes());
            }
        }
        drop(cache);
        let hashes: std::collections::HashSet<&str> = keep.iter().map(|(h, _)| *h).collect();
        self.changed.lock().unwrap_or_else(|p| p.into_inner()).retain(|h, _| hashes.contains(h.as_str()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
