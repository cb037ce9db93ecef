//! Chunk cache: decrypted chunks under one byte budget for the whole mount, keyed by
//! (file sha256, chunk size, chunk index), so the same file in two catalogs is cached once.
//! Also deduplicates fetches: concurrent readers of the same missing chunk share one request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

/// A chunk's identity. `scope` is the owner who vouched for it: a peer could list the hash of
/// someone else's file and serve other bytes under it, and ranged reads are not checked against
/// the whole file's sha256, so chunks are shared only between catalogs of the same owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub scope: Arc<str>,
    pub hash: Arc<str>,
    pub chunk_size: u64,
    pub index: u64,
}

/// Outcome of a shared fetch, as its waiters see it.
pub type Shared<E> = Option<Result<Bytes, E>>;

struct Inner<E> {
    lru: lru::LruCache<ChunkKey, Bytes>,
    bytes: usize,
    in_flight: HashMap<ChunkKey, watch::Receiver<Shared<E>>>,
}

/// What a caller should do about one chunk.
pub enum Lookup<E> {
    /// Cached: here are the bytes.
    Hit(Bytes),
    /// Someone else is fetching it: wait on this.
    Wait(watch::Receiver<Shared<E>>),
    /// Nobody has it: the caller must fetch it and `complete` the claim.
    Claimed(watch::Sender<Shared<E>>),
}

pub struct ChunkCache<E: Clone> {
    inner: Mutex<Inner<E>>,
    budget: usize,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl<E: Clone> ChunkCache<E> {
    pub fn new(budget: usize) -> Self {
        ChunkCache {
            inner: Mutex::new(Inner { lru: lru::LruCache::unbounded(), bytes: 0, in_flight: HashMap::new() }),
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<E>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// True if the chunk is cached or being fetched (for read-ahead: nothing to do).
    pub fn has_or_pending(&self, key: &ChunkKey) -> bool {
        let inner = self.lock();
        inner.lru.contains(key) || inner.in_flight.contains_key(key)
    }

    pub fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        let hit = self.lock().lru.get(key).cloned();
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// All of `keys`' chunks if every one is cached (one lock, no claim, counted as hits only
    /// then): a read answered at once, or None and the caller does the full lookup.
    pub fn get_all(&self, keys: &[ChunkKey]) -> Option<Vec<Bytes>> {
        let mut inner = self.lock();
        if !keys.iter().all(|k| inner.lru.contains(k)) {
            return None;
        }
        let all = keys.iter().map(|k| inner.lru.get(k).cloned()).collect::<Option<Vec<Bytes>>>()?;
        self.hits.fetch_add(keys.len() as u64, Ordering::Relaxed);
        Some(all)
    }

    /// Looks a chunk up, and claims it for fetching if nobody has it.
    pub fn lookup(&self, key: &ChunkKey) -> Lookup<E> {
        let mut inner = self.lock();
        if let Some(bytes) = inner.lru.get(key).cloned() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Hit(bytes);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(rx) = inner.in_flight.get(key) {
            return Lookup::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inner.in_flight.insert(key.clone(), rx);
        Lookup::Claimed(tx)
    }

    /// Ends a claim: caches the chunk on success and wakes every waiter either way.
    pub fn complete(&self, key: &ChunkKey, claim: watch::Sender<Shared<E>>, result: Result<Bytes, E>) {
        {
            let mut inner = self.lock();
            inner.in_flight.remove(key);
            if let Ok(bytes) = &result {
                self.insert_locked(&mut inner, key.clone(), bytes.clone());
            }
        }
        let _ = claim.send(Some(result));
    }

    /// Gives up a claim without a result (the fetch was cancelled); waiters retry.
    pub fn abandon(&self, key: &ChunkKey) {
        self.lock().in_flight.remove(key);
    }

    pub fn insert(&self, key: ChunkKey, bytes: Bytes) {
        let mut inner = self.lock();
        self.insert_locked(&mut inner, key, bytes);
    }

    fn insert_locked(&self, inner: &mut Inner<E>, key: ChunkKey, bytes: Bytes) {
        if bytes.len() > self.budget {
            return;
        }
        inner.bytes += bytes.len();
        if let Some(old) = inner.lru.put(key, bytes) {
            inner.bytes -= old.len();
        }
        while inner.bytes > self.budget {
            match inner.lru.pop_lru() {
                Some((_, evicted)) => inner.bytes -= evicted.len(),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> ChunkKey {
        ChunkKey { scope: Arc::from("owner"), hash: Arc::from("h"), chunk_size: 4, index: i }
    }

    #[test]
    fn stays_under_budget_evicting_least_recent() {
        let cache: ChunkCache<()> = ChunkCache::new(10);
        cache.insert(key(0), Bytes::from_static(b"aaaa"));
        cache.insert(key(1), Bytes::from_static(b"bbbb"));
        assert!(cache.get(&key(0)).is_some());
        cache.insert(key(2), Bytes::from_static(b"cccc"));
        assert!(cache.cached_bytes() <= 10);
        assert!(cache.get(&key(1)).is_none(), "least recently used is evicted");
        assert!(cache.get(&key(0)).is_some());
        assert!(cache.get(&key(2)).is_some());
    }

    #[test]
    fn one_fetch_per_missing_chunk() {
        let cache: ChunkCache<String> = ChunkCache::new(100);
        let Lookup::Claimed(tx) = cache.lookup(&key(5)) else { panic!("first lookup must claim") };
        let Lookup::Wait(mut rx) = cache.lookup(&key(5)) else { panic!("second lookup must wait") };
        cache.complete(&key(5), tx, Ok(Bytes::from_static(b"data")));
        assert_eq!(rx.borrow_and_update().clone().unwrap().unwrap(), Bytes::from_static(b"data"));
        assert!(matches!(cache.lookup(&key(5)), Lookup::Hit(_)));
    }

    #[test]
    fn failures_reach_waiters_and_are_not_cached() {
        let cache: ChunkCache<String> = ChunkCache::new(100);
        let Lookup::Claimed(tx) = cache.lookup(&key(1)) else { panic!() };
        let Lookup::Wait(rx) = cache.lookup(&key(1)) else { panic!() };
        cache.complete(&key(1), tx, Err("offline".into()));
        assert_eq!(rx.borrow().clone().unwrap().unwrap_err(), "offline");
        assert!(matches!(cache.lookup(&key(1)), Lookup::Claimed(_)));
    }
}
