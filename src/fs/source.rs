//! Where the filesystem's bytes come from: the [`ChunkSource`] trait, one per mounted catalog,
//! and its implementation over the network, [`RemoteSource`] (v2 ranged reads, or the v1
//! whole-file fallback for original peers). Unit tests use a fake (see `read.rs`).
//!
//! A source makes single attempts; the read path (`read.rs`) owns deadlines and retries, using
//! [`FsError::is_transient`] to tell an outage from a refusal.
//!
//! Invariants:
//! - The protocol a catalog is read with comes from what its listing says (`protocol`), never
//!   from an outage: `no responders` on `open` is a transient error, not "v1". A new listing
//!   re-decides it, so a catalog whose server changed comes right without a remount.
//! - One `open` per file at a time: the session table's lock is never held across the network;
//!   a per-file cell is, so a slow `open` of one file delays only readers of that file.
//! - Chunk sizes are remembered per hash past sessions, so cached chunks read while offline.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use sha2::Digest;
use tokio::sync::OnceCell;

use super::FsError;
use crate::client::{CatalogClient, ClientError, RemoteFile};
use crate::listing::Listing;
use crate::protocol::CatalogEntry;

/// Receives verified, decrypted chunks as they arrive: (chunk index, bytes).
pub type ChunkSink<'a> = &'a mut (dyn FnMut(u64, Bytes) + Send);

/// Chunk size the mount caches a v1 peer's files in (v1 sends whole files in 4 KiB pieces).
pub const V1_CACHE_CHUNK: u64 = 256 * 1024;

/// One catalog's bytes, as the filesystem reads them.
pub trait ChunkSource: Send + Sync {
    /// The catalog's whole listing (one attempt), compact; None if its revision is still
    /// `shown` (non-empty), found out from its first page.
    fn listing<'a>(&'a self, shown: &'a str) -> BoxFuture<'a, Result<Option<Listing>, FsError>>;

    /// Tells the source about a listing applied to the mount (fetched, or saved from an
    /// earlier run), so it reads the catalog in the protocol that listing advertises.
    fn listing_applied(&self, listing: &Listing);

    /// The chunk size `entry` is read in. May contact the peer (v2 opens a session); answers
    /// at once for a file it has seen before.
    fn chunk_size<'a>(&'a self, entry: &'a CatalogEntry) -> BoxFuture<'a, Result<u64, FsError>>;

    /// The chunk size `entry` is read in if it is known without the network (a file seen
    /// before, or a v1 catalog's fixed cache unit); None otherwise.
    fn chunk_size_now(&self, entry: &CatalogEntry) -> Option<u64>;

    /// True if this file can only be fetched whole (v1): the caller then claims every chunk,
    /// so concurrent readers share one download.
    fn whole_file(&self, entry: &CatalogEntry) -> bool;

    /// A record size smaller than the chunk size that [`ChunkSource::fetch`] also accepts for
    /// `entry` (one chunk tree leaf), if its open session offers it; answers without the
    /// network. Small random reads are fetched in it.
    fn small_unit(&self, _entry: &CatalogEntry) -> Option<u64> {
        None
    }

    /// Fetches chunks `first .. first+count` of `entry` (one attempt), handing each to `sink`
    /// once verified. May hand over chunks outside the range (a whole-file source does).
    /// `chunk_size` is the file's chunk size or its [`ChunkSource::small_unit`].
    fn fetch<'a>(
        &'a self,
        entry: &'a CatalogEntry,
        chunk_size: u64,
        first: u64,
        count: u64,
        sink: ChunkSink<'a>,
    ) -> BoxFuture<'a, Result<(), FsError>>;

    /// How this catalog's answers are checked, for the `user.natster.verified` xattr.
    fn verification(&self) -> &'static str;
}

impl From<ClientError> for FsError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused { code: 403, message } => FsError::Forbidden(message),
            e if e.is_transient() => FsError::Unreachable(e.to_string()),
            other => FsError::Remote(other.to_string()),
        }
    }
}

/// A v2 session cell: empty until an `open` succeeds; a failed `open` leaves it empty.
type SessionCell = Arc<OnceCell<RemoteFile>>;

/// A catalog read over NATS through [`CatalogClient`].
pub struct RemoteSource {
    client: CatalogClient,
    /// Open v2 sessions by file hash (bounded; dropping one closes it on the server).
    sessions: Mutex<lru::LruCache<String, SessionCell>>,
    /// Chunk size per hash, remembered past sessions.
    chunk_sizes: Mutex<HashMap<String, u64>>,
    /// Largest file read through v1 (it is held whole in memory once, then cached).
    v1_max_bytes: u64,
}

impl RemoteSource {
    pub fn new(client: CatalogClient, v1_max_bytes: u64) -> Self {
        RemoteSource {
            client,
            sessions: Mutex::new(lru::LruCache::new(NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN))),
            chunk_sizes: Mutex::new(HashMap::new()),
            v1_max_bytes,
        }
    }

    pub fn client(&self) -> &CatalogClient {
        &self.client
    }

    fn known_chunk_size(&self, hash: &str) -> Option<u64> {
        self.chunk_sizes.lock().unwrap_or_else(|p| p.into_inner()).get(hash).copied()
    }

    fn remember_chunk_size(&self, hash: &str, cs: u64) {
        self.chunk_sizes.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.to_string(), cs);
    }

    fn cell(&self, hash: &str) -> SessionCell {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.get_or_insert(hash.to_string(), || Arc::new(OnceCell::new())).clone()
    }

    /// The file's v2 session, opened if needed. Only this file's cell is held across `open`.
    async fn session(&self, entry: &CatalogEntry) -> Result<RemoteFile, FsError> {
        let cell = self.cell(&entry.hash);
        // The mount's entry is from the signed listing it applied: its chunks are checked
        // against that entry's tree root.
        let file = cell.get_or_try_init(|| self.client.open_entry(entry)).await?;
        self.remember_chunk_size(&entry.hash, file.chunk_size());
        Ok(file.clone())
    }

    /// Drops a session that failed, unless another reader already replaced it.
    fn forget_session(&self, hash: &str, failed: &RemoteFile) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.peek(hash).and_then(|c| c.get()).is_some_and(|f| f.same_session(failed)) {
            sessions.pop(hash);
        }
    }

    async fn fetch_v2(
        &self,
        entry: &CatalogEntry,
        cs: u64,
        first: u64,
        count: u64,
        sink: ChunkSink<'_>,
    ) -> Result<(), FsError> {
        let remote = self.session(entry).await?;
        if remote.chunk_size() != cs && !remote.offers_unit(cs) {
            // The server restarted with another chunk size: this read's cache keys are stale,
            // the next read uses the new size.
            return Err(FsError::Remote("the catalog server changed its chunk size; read again".into()));
        }
        let result = remote
            .fetch_in(cs, first, count, |index, chunk| {
                sink(index, chunk);
                std::future::ready(Ok(()))
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            // A session that failed for good (refused, tampered, inconsistent) is not reused;
            // one that met an outage is kept: the server may come back with it.
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                self.forget_session(&entry.hash, &remote);
                Err(e.into())
            }
        }
    }

    /// Downloads a whole file from a v1-only peer, verifies its sha256, and hands it over in
    /// [`V1_CACHE_CHUNK`] pieces.
    async fn fetch_v1(&self, entry: &CatalogEntry, sink: ChunkSink<'_>) -> Result<(), FsError> {
        if entry.byte_size > self.v1_max_bytes {
            return Err(FsError::V1TooLarge);
        }
        let limit = entry.byte_size;
        let mut whole = Vec::with_capacity(limit as usize);
        self.client
            .download_v1(&entry.hash, |chunk| {
                if whole.len() as u64 + chunk.len() as u64 > limit {
                    return Err(ClientError::Transcoded(entry.hash.clone()));
                }
                whole.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        if hex::encode(sha2::Sha256::digest(&whole)) != entry.hash {
            return Err(ClientError::HashMismatch(entry.hash.clone()).into());
        }
        // Each piece its own allocation, so evicting one frees it (the budget stays exact).
        for (i, piece) in whole.chunks(V1_CACHE_CHUNK as usize).enumerate() {
            sink(i as u64, Bytes::copy_from_slice(piece));
        }
        Ok(())
    }
}

impl ChunkSource for RemoteSource {
    fn listing<'a>(&'a self, shown: &'a str) -> BoxFuture<'a, Result<Option<Listing>, FsError>> {
        async move { Ok(self.client.get_listing(shown).await?) }.boxed()
    }

    fn listing_applied(&self, listing: &Listing) {
        let was_v2 = self.client.speaks_v2();
        self.client.note_protocol(listing.protocol);
        if was_v2 != self.client.speaks_v2() {
            tracing::info!(catalog = %self.client.catalog(), protocol = listing.protocol, "catalog changed protocol");
            self.chunk_sizes.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    fn chunk_size<'a>(&'a self, entry: &'a CatalogEntry) -> BoxFuture<'a, Result<u64, FsError>> {
        async move {
            if let Some(cs) = self.known_chunk_size(&entry.hash) {
                return Ok(cs);
            }
            if !self.client.speaks_v2() {
                return Ok(V1_CACHE_CHUNK);
            }
            Ok(self.session(entry).await?.chunk_size())
        }
        .boxed()
    }

    fn chunk_size_now(&self, entry: &CatalogEntry) -> Option<u64> {
        self.known_chunk_size(&entry.hash).or_else(|| (!self.client.speaks_v2()).then_some(V1_CACHE_CHUNK))
    }

    fn whole_file(&self, _entry: &CatalogEntry) -> bool {
        !self.client.speaks_v2()
    }

    fn small_unit(&self, entry: &CatalogEntry) -> Option<u64> {
        let leaf = crate::chunk_tree::LEAF_SIZE as u64;
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let file = sessions.peek(&entry.hash)?.get()?;
        (file.chunk_size() > leaf && file.offers_unit(leaf)).then_some(leaf)
    }

    fn fetch<'a>(
        &'a self,
        entry: &'a CatalogEntry,
        chunk_size: u64,
        first: u64,
        count: u64,
        sink: ChunkSink<'a>,
    ) -> BoxFuture<'a, Result<(), FsError>> {
        async move {
            if self.client.speaks_v2() {
                self.fetch_v2(entry, chunk_size, first, count, sink).await
            } else if chunk_size != V1_CACHE_CHUNK {
                Err(FsError::Remote("the catalog server changed protocol; read again".into()))
            } else {
                self.fetch_v1(entry, sink).await
            }
        }
        .boxed()
    }

    fn verification(&self) -> &'static str {
        if self.client.unverified() {
            "unverified: an original Natster peer (no signatures); whole files are checked against their sha256"
        } else {
            "signed: listing and sessions signed by the owner's catalog server"
        }
    }
}
