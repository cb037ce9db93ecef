//! The read path: open files, reads served from the chunk cache, misses fetched through the
//! catalog's [`ChunkSource`](super::ChunkSource) within one deadline, and read-ahead.
//!
//! Invariants and tricky cases:
//! - Every read has one deadline, `read_timeout` after it starts. Inside it, transient errors
//!   (no responders, timeouts, a reconnect) are retried with backoff; each chunk is cached as
//!   it arrives, so a retry asks only for what is still missing. At the deadline: EIO.
//! - A catalog that stopped answering is remembered as down ([`Health`]). The kernel re-issues
//!   a failed read-ahead as a synchronous read, and splits one `read(2)` into several FUSE
//!   reads; if each waited a full `read_timeout`, a program would wait a multiple of it. So a
//!   read that starts during an outage gets only what is left of the outage's first deadline,
//!   and at least [`GRACE`], enough for a catalog that came back to answer. Any chunk that
//!   arrives ends the outage.
//! - Concurrent readers of one missing chunk share one fetch (the cache's claims). A claim is
//!   always completed or abandoned, on every path, so no waiter hangs; waiters are bounded by
//!   their own deadline too.
//! - A source that can only fetch whole files (v1) has every chunk of the file claimed at once.
//! - A small read that is not part of a sequential run, and whose chunk is neither cached nor
//!   being fetched, is fetched in the source's small unit (one 16 KiB leaf, cached under its
//!   own key) instead of a whole chunk: a random 4 KiB read moves 16 KiB, not 256.
//! - A read inside one cached record is answered with a slice of it, without a copy.
//! - A read the cache holds whole is answered by [`NatsterFs::read_now`] without awaiting (the
//!   FUSE thread replies itself); it never claims a chunk, so a miss costs nothing and the
//!   network path does the full lookup. Either way the read-ahead sees each read once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{FsError, MountedCatalog, NatsterFs, ReadAhead};
use crate::cache::{ChunkKey, Lookup, Shared};
use crate::protocol::{self, CatalogEntry};

/// Least time a read gets while its catalog is known to be down.
pub const GRACE: Duration = Duration::from_millis(250);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

type Claim = watch::Sender<Shared<FsError>>;

pub struct OpenFile {
    catalog: usize,
    entry: CatalogEntry,
    readahead: Mutex<ReadAhead>,
}

/// Whether a catalog answers, as its reads have found.
#[derive(Debug, Default)]
pub struct Health {
    /// Since when it has not answered (first transient failure after the last success).
    down_since: Option<Instant>,
    /// Whether this outage has been logged (once per outage, not once per read).
    logged: bool,
}

impl MountedCatalog {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deadline of a read starting `now`.
    fn read_deadline(&self, now: Instant, read_timeout: Duration) -> Instant {
        let own = now + read_timeout;
        match self.health().down_since {
            Some(since) => own.min((since + read_timeout).max(now + GRACE)),
            None => own,
        }
    }

    /// Records a failed attempt that started at `attempt_start` (a frozen peer is noticed
    /// only when the attempt times out; the outage began when it was sent).
    fn note_failure(&self, attempt_start: Instant) {
        let mut health = self.health();
        if health.down_since.is_none() {
            health.down_since = Some(attempt_start);
        }
    }

    /// True while reads find the catalog not answering (until a chunk arrives again).
    pub fn known_down(&self) -> bool {
        self.health().down_since.is_some()
    }

    fn note_success(&self) {
        let mut health = self.health();
        if health.down_since.take().is_some() && health.logged {
            tracing::info!(catalog = %self.dir_name, "catalog answers again");
        }
        health.logged = false;
    }

    /// Logs a read that failed: an outage once, anything else every time.
    fn log_failure(&self, path: &str, offset: u64, e: &FsError) {
        if matches!(e, FsError::Timeout(_)) || e.is_transient() {
            let first = {
                let mut health = self.health();
                !std::mem::replace(&mut health.logged, true)
            };
            if first {
                tracing::warn!(catalog = %self.dir_name, %path, offset,
                    "catalog unreachable ({e}); reads of data not in the cache fail with EIO until it answers");
            } else {
                tracing::debug!(catalog = %self.dir_name, %path, offset, "read failed: {e}");
            }
        } else {
            tracing::warn!(catalog = %self.dir_name, %path, offset, "read failed: {e}");
        }
    }
}

/// Waits before the next attempt, or gives `last` back if the deadline comes first.
async fn backoff(delay: &mut Duration, deadline: Instant, last: FsError) -> Result<(), FsError> {
    let wake = (Instant::now() + *delay).min(deadline);
    tokio::time::sleep_until(wake).await;
    *delay = (*delay * 2).min(MAX_BACKOFF);
    if Instant::now() >= deadline {
        Err(last)
    } else {
        Ok(())
    }
}

impl NatsterFs {
    pub fn open(&self, ino: u64) -> Result<u64, FsError> {
        let (catalog, entry) = self.file_entry(ino)?;
        let fh = self.next_handle.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let chunk_hint = u64::from(crate::server::DEFAULT_CHUNK_SIZE);
        let file =
            OpenFile { catalog, entry, readahead: Mutex::new(ReadAhead::new(chunk_hint, self.options.max_readahead)) };
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(file));
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh);
    }

    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn catalog_of(&self, file: &OpenFile) -> Result<Arc<MountedCatalog>, FsError> {
        self.catalog(file.catalog).ok_or(FsError::BadHandle)
    }

    /// Reads `size` bytes at `offset` of open file `fh`, by the read's deadline.
    pub async fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        match self.read_now(fh, offset, size) {
            ReadNow::Done(result) => result,
            ReadNow::Fetch(pending) => self.read_pending(pending).await,
        }
    }

    /// Starts a read and answers it if the chunk cache holds every byte, without awaiting
    /// anything, so the FUSE thread can reply at once (no hand-off to the runtime, no timer);
    /// otherwise gives back what [`NatsterFs::read_pending`] needs. Call within the runtime
    /// (a hit may start read-ahead). Each read is counted once by the read-ahead, on this path.
    pub fn read_now(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> ReadNow {
        let file = match self.handles.lock().unwrap_or_else(|p| p.into_inner()).get(&fh).cloned() {
            Some(file) => file,
            None => return ReadNow::Done(Err(FsError::BadHandle)),
        };
        let end = offset.saturating_add(u64::from(size)).min(file.entry.byte_size);
        if offset >= end {
            return ReadNow::Done(Ok(Bytes::new()));
        }
        let catalog = match self.catalog_of(&file) {
            Ok(catalog) => catalog,
            Err(e) => return ReadNow::Done(Err(e)),
        };
        let window = file.readahead.lock().unwrap_or_else(|p| p.into_inner()).on_read(offset, end - offset);
        if let Some(bytes) = self.cached_range(&catalog, &file, offset, end) {
            if window > 0 {
                self.prefetch(file, end, window);
            }
            return ReadNow::Done(Ok(bytes));
        }
        ReadNow::Fetch(PendingRead { file, catalog, offset, end, window })
    }

    /// Finishes a read [`NatsterFs::read_now`] could not answer from the cache.
    pub async fn read_pending(self: &Arc<Self>, read: PendingRead) -> Result<Bytes, FsError> {
        let PendingRead { file, catalog, offset, end, window } = read;
        let deadline = catalog.read_deadline(Instant::now(), self.options.read_timeout);
        // The inner steps end by the deadline themselves; this bound only catches a bug.
        let result =
            match tokio::time::timeout_at(deadline + GRACE, self.read_range(&file, offset, end, window == 0, deadline))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(FsError::Timeout(self.options.read_timeout)),
            };
        match &result {
            Ok(_) if window > 0 => self.prefetch(file.clone(), end, window),
            Ok(_) => {}
            Err(e) => catalog.log_failure(&file.entry.path, offset, e),
        }
        result
    }

    /// `offset .. end` if every byte is cached: in whole chunks, or for a small read in the
    /// source's small unit (leaves a random read fetched). None sends the read to the network.
    fn cached_range(&self, catalog: &MountedCatalog, file: &OpenFile, offset: u64, end: u64) -> Option<Bytes> {
        let cs = catalog.source.chunk_size_now(&file.entry).filter(|&cs| cs > 0)?;
        let in_units = |unit: u64| {
            let (first, last) = (offset / unit, (end - 1) / unit);
            let keys: Vec<ChunkKey> = (first..=last).map(|i| self.key(file, unit, i)).collect();
            let chunks = self.cache.get_all(&keys)?;
            Some(assemble(&chunks, unit, first, offset, end))
        };
        in_units(cs).or_else(|| match catalog.source.small_unit(&file.entry) {
            Some(unit) if end - offset <= cs / 4 => in_units(unit),
            _ => None,
        })
    }

    /// Bytes `offset .. end` of `file`; `random`: the read is not part of a sequential run.
    async fn read_range(
        &self,
        file: &OpenFile,
        offset: u64,
        end: u64,
        random: bool,
        deadline: Instant,
    ) -> Result<Bytes, FsError> {
        let chunk_size = self.chunk_size(file, deadline).await?;
        let cs = match self.catalog_of(file)?.source.small_unit(&file.entry) {
            Some(unit) if random && end - offset <= chunk_size / 4 && !self.covered(file, chunk_size, offset, end) => {
                unit
            }
            _ => chunk_size,
        };
        let first = offset / cs;
        let last = (end - 1) / cs;
        let chunks = self.chunks(file, cs, first, last - first + 1, deadline).await?;
        Ok(assemble(&chunks, cs, first, offset, end))
    }

    /// True if every chunk of `offset .. end` is cached or being fetched.
    fn covered(&self, file: &OpenFile, cs: u64, offset: u64, end: u64) -> bool {
        (offset / cs..=(end - 1) / cs).all(|i| self.cache.has_or_pending(&self.key(file, cs, i)))
    }

    /// The file's chunk size, asking the source (retried within the deadline) if needed.
    async fn chunk_size(&self, file: &OpenFile, deadline: Instant) -> Result<u64, FsError> {
        let catalog = self.catalog_of(file)?;
        let mut delay = FIRST_BACKOFF;
        loop {
            let attempt_start = Instant::now();
            match tokio::time::timeout_at(deadline, catalog.source.chunk_size(&file.entry)).await {
                Ok(Ok(cs)) if cs > 0 => return Ok(cs),
                Ok(Ok(_)) => return Err(FsError::Remote("catalog server announced a chunk size of 0".into())),
                Ok(Err(e)) if e.is_transient() => {
                    catalog.note_failure(attempt_start);
                    backoff(&mut delay, deadline, e).await?;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    catalog.note_failure(attempt_start);
                    return Err(FsError::Timeout(self.options.read_timeout));
                }
            }
        }
    }

    fn key(&self, file: &OpenFile, cs: u64, index: u64) -> ChunkKey {
        let scope = self.catalog(file.catalog).map(|c| c.owner.clone()).unwrap_or_default();
        ChunkKey { scope: Arc::from(scope.as_str()), hash: Arc::from(file.entry.hash.as_str()), chunk_size: cs, index }
    }

    /// Chunks `first .. first+count` of a file: cached ones at once, missing ones fetched in
    /// contiguous runs (one fetch per run), ones another reader is fetching awaited.
    async fn chunks(
        &self,
        file: &OpenFile,
        cs: u64,
        first: u64,
        count: u64,
        deadline: Instant,
    ) -> Result<Vec<Bytes>, FsError> {
        let catalog = self.catalog_of(file)?;
        let whole = catalog.source.whole_file(&file.entry);
        let (claim_from, claim_end) =
            if whole { (0, protocol::chunk_count(file.entry.byte_size, cs)) } else { (first, first + count) };
        let wanted = first..first + count;
        let mut slots: Vec<Option<Bytes>> = vec![None; count as usize];
        let mut waits = Vec::new();
        let mut claims: Vec<(u64, Claim)> = Vec::new();
        for i in claim_from..claim_end.max(first + count) {
            let key = self.key(file, cs, i);
            match self.cache.lookup(&key) {
                Lookup::Hit(b) if wanted.contains(&i) => slots[(i - first) as usize] = Some(b),
                Lookup::Wait(rx) if wanted.contains(&i) => waits.push((i, rx)),
                Lookup::Claimed(tx) => claims.push((i, tx)),
                Lookup::Hit(_) | Lookup::Wait(_) => {}
            }
        }
        // Contiguous runs; a whole-file source gets all its claims in one run.
        let mut runs: Vec<Vec<(u64, Claim)>> = Vec::new();
        for claim in claims {
            match runs.last_mut() {
                Some(run) if whole || run.last().is_some_and(|(i, _)| *i + 1 == claim.0) => run.push(claim),
                _ => runs.push(vec![claim]),
            }
        }
        let fetches = runs.into_iter().map(|run| self.fetch_run(file, cs, run, deadline));
        for result in futures::future::join_all(fetches).await {
            for (index, chunk) in result? {
                if wanted.contains(&index) {
                    slots[(index - first) as usize] = Some(chunk);
                }
            }
        }
        for (i, mut rx) in waits {
            let shared = match tokio::time::timeout_at(deadline, rx.wait_for(|v| v.is_some())).await {
                Ok(shared) => shared.map(|v| v.clone()),
                Err(_) => return Err(FsError::Timeout(self.options.read_timeout)),
            };
            match shared {
                Ok(Some(Ok(bytes))) => slots[(i - first) as usize] = Some(bytes),
                Ok(Some(Err(e))) => return Err(e),
                // The fetcher was cancelled: fetch it ourselves.
                _ => {
                    let again = Box::pin(self.chunks(file, cs, i, 1, deadline)).await?;
                    slots[(i - first) as usize] = again.into_iter().next();
                }
            }
        }
        slots.into_iter().map(|s| s.ok_or_else(|| FsError::Remote("chunk missing after fetch".into()))).collect()
    }

    /// Fetches one run of claimed chunks, retrying transient failures until the deadline, and
    /// completes every claim, on success or failure. Returns the chunks it fetched.
    async fn fetch_run(
        &self,
        file: &OpenFile,
        cs: u64,
        run: Vec<(u64, Claim)>,
        deadline: Instant,
    ) -> Result<Vec<(u64, Bytes)>, FsError> {
        let catalog = self.catalog_of(file)?;
        // Abandons what is still claimed if this future is dropped: waiters must not hang.
        let mut guard = ClaimGuard { fs: self, file, cs, pending: run.into_iter().collect() };
        let mut got = Vec::new();
        let mut delay = FIRST_BACKOFF;
        loop {
            let (Some(&lo), Some(&hi)) = (guard.pending.keys().next(), guard.pending.keys().next_back()) else {
                return Ok(got);
            };
            let mut progressed = false;
            let attempt_start = Instant::now();
            let attempt = {
                let pending = &mut guard.pending;
                let got = &mut got;
                let progressed = &mut progressed;
                let mut sink = |index: u64, bytes: Bytes| {
                    let key = self.key(file, cs, index);
                    match pending.remove(&index) {
                        Some(claim) => {
                            self.cache.complete(&key, claim, Ok(bytes.clone()));
                            got.push((index, bytes));
                        }
                        None => self.cache.insert(key, bytes),
                    }
                    *progressed = true;
                };
                tokio::time::timeout_at(deadline, catalog.source.fetch(&file.entry, cs, lo, hi - lo + 1, &mut sink))
                    .await
            };
            if progressed {
                catalog.note_success();
                delay = FIRST_BACKOFF;
            }
            let error = match attempt {
                Ok(Ok(())) if guard.pending.is_empty() => return Ok(got),
                Ok(Ok(())) => FsError::Remote("the catalog server sent fewer chunks than asked".into()),
                Ok(Err(e)) if e.is_transient() => {
                    catalog.note_failure(attempt_start);
                    match backoff(&mut delay, deadline, e).await {
                        Ok(()) => continue,
                        Err(e) => e,
                    }
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    catalog.note_failure(attempt_start);
                    FsError::Timeout(self.options.read_timeout)
                }
            };
            for (index, claim) in std::mem::take(&mut guard.pending) {
                self.cache.complete(&self.key(file, cs, index), claim, Err(error.clone()));
            }
            return Err(error);
        }
    }

    /// Starts fetching `window` bytes past `from` in the background, within the mount-wide
    /// read-ahead budget; skipped when the budget is used up.
    fn prefetch(self: &Arc<Self>, file: Arc<OpenFile>, from: u64, window: u64) {
        let Ok(catalog) = self.catalog_of(&file) else { return };
        // Only files whose chunk size is known: a prefetch never opens a session by itself.
        let Some(cs) = catalog.source.chunk_size_now(&file.entry) else { return };
        let end = from.saturating_add(window).min(file.entry.byte_size);
        if from >= end || cs == 0 {
            return;
        }
        let first = from / cs;
        let last = (end - 1) / cs;
        let missing: Vec<u64> =
            (first..=last).filter(|&i| !self.cache.has_or_pending(&self.key(&file, cs, i))).collect();
        let (Some(&lo), Some(&hi)) = (missing.first(), missing.last()) else { return };
        let mb = (((hi - lo + 1) * cs) >> 20).max(1) as u32;
        let Ok(permit) = self.readahead_budget.clone().try_acquire_many_owned(mb) else { return };
        let deadline = catalog.read_deadline(Instant::now(), self.options.read_timeout);
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = this.chunks(&file, cs, lo, hi - lo + 1, deadline).await;
        });
    }
}

/// What a read returns at once: its answer, or the read to finish on the runtime.
pub enum ReadNow {
    Done(Result<Bytes, FsError>),
    Fetch(PendingRead),
}

/// A read started by [`NatsterFs::read_now`] that needs the network.
pub struct PendingRead {
    file: Arc<OpenFile>,
    catalog: Arc<MountedCatalog>,
    offset: u64,
    end: u64,
    /// The read-ahead's answer for this read (0: not part of a sequential run).
    window: u64,
}

/// Bytes `offset .. end` out of consecutive chunks of `cs` bytes starting at chunk `first`; a
/// range inside one chunk is a slice of it, without a copy.
fn assemble(chunks: &[Bytes], cs: u64, first: u64, offset: u64, end: u64) -> Bytes {
    if let [chunk] = chunks {
        let from = (offset - first * cs) as usize;
        let to = ((end - first * cs) as usize).min(chunk.len());
        return chunk.slice(from.min(to)..to);
    }
    let mut out = BytesMut::with_capacity((end - offset) as usize);
    for (i, chunk) in chunks.iter().enumerate() {
        let chunk_start = (first + i as u64) * cs;
        let from = offset.saturating_sub(chunk_start) as usize;
        let to = ((end - chunk_start) as usize).min(chunk.len());
        if from < to {
            out.extend_from_slice(&chunk[from..to]);
        }
    }
    out.freeze()
}

struct ClaimGuard<'a> {
    fs: &'a NatsterFs,
    file: &'a OpenFile,
    cs: u64,
    pending: BTreeMap<u64, Claim>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        for index in std::mem::take(&mut self.pending).into_keys() {
            self.fs.cache.abandon(&self.fs.key(self.file, self.cs, index));
        }
    }
}

#[cfg(test)]
mod tests;
