//! v2 file sessions: `open` agrees a session key with the server (ephemeral X25519, HKDF bound
//! to session, catalog and hash); `read` asks for chunk ranges that arrive on the catalog's
//! media subject. A read keeps at most `window` chunks in flight, hands chunks to its sink in
//! order, re-asks for late ones, and reopens a session the server forgot (404). A read of a
//! few records asks for each alone, `inline`: the record is the reply itself, so a random read
//! costs one request and one reply (a server that does not know `inline` acknowledges and
//! publishes on the media subject; both are accepted).
//!
//! Every chunk is checked against the file's chunk tree root from the catalog's signed listing
//! (never one the `open` reply or the chunk brings) before anyone sees it: its proof comes
//! inside the AEAD, and a chunk that fails is a refusal of the read, not retried. A file the
//! listing gives no root is not opened.
//!
//! Tricky cases: several reads of one file may wait for the same chunk (each registered
//! waiter gets a copy); a reopened session gets a new id, so chunks of the old one still in
//! flight are ignored; dropping a read at any await unregisters its waiters.
//!
//! Units: a server whose signed `open` reply offers `max_unit` sends records of any size the
//! read names (a multiple of the 16 KiB leaf), counted in that size; [`RemoteFile::fetch_in`]
//! asks for them. Records are told apart by (unit, index), never by index alone, and each is
//! opened with the unit it was asked in (the AEAD binds it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{ready, Future};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::CatalogClient;
use super::{ChunkSender, ClientError, ClientInner, Delivery, Result, Route};
use crate::chunk_tree;
use crate::crypto::{EphemeralKey, SessionBinding, SessionKey};
use crate::identity::Purpose;
use crate::protocol::{
    self, CatalogEntry, CloseRequest, OpenRequest, OpenResponse, Operation, ReadRequest, ReadResponse,
};

impl CatalogClient {
    /// Opens a v2 ranged-read session on the file with `hash`, as the latest listing this
    /// client fetched has it (fetched now if it does not list `hash`). `byte_size_hint`: what
    /// the caller expects; a listing that disagrees is an error.
    pub async fn open(&self, hash: &str, byte_size_hint: Option<u64>) -> Result<RemoteFile> {
        if !protocol::is_sha256_hex(hash) {
            return Err(ClientError::Io(format!("'{hash}' is not a sha256 hash")));
        }
        let mut listed = self.inner.listed(hash);
        if listed.is_none() {
            self.get().await?;
            listed = self.inner.listed(hash);
        }
        let Some(listed) = listed else {
            // The server's word for a file it does not have is the clearer one (404).
            self.inner.ensure_dispatcher().await?;
            self.inner.open_session(hash).await?;
            return Err(ClientError::NotListed(hash.to_string()));
        };
        if let Some(expected) = byte_size_hint {
            if expected != listed.byte_size {
                return Err(ClientError::Protocol(format!(
                    "the listing says {hash} has {} bytes, not {expected}",
                    listed.byte_size
                )));
            }
        }
        self.open_listed(hash, listed.byte_size, listed.tree.as_deref()).await
    }

    /// Opens a v2 session on `entry`, an entry of a signed listing: its chunks are checked
    /// against the entry's `tree` root.
    pub async fn open_entry(&self, entry: &CatalogEntry) -> Result<RemoteFile> {
        self.open_listed(&entry.hash, entry.byte_size, entry.tree.as_deref()).await
    }

    async fn open_listed(&self, hash: &str, byte_size: u64, tree: Option<&str>) -> Result<RemoteFile> {
        let root = parse_root(hash, tree)?;
        self.inner.ensure_dispatcher().await?;
        let (state, reply) = self.inner.open_session(hash).await?;
        if reply.byte_size != byte_size {
            return Err(ClientError::Protocol(format!(
                "server says {hash} has {} bytes, the listing says {byte_size}",
                reply.byte_size
            )));
        }
        let shared = Arc::new(FileShared {
            client: self.inner.clone(),
            hash: hash.to_string(),
            byte_size,
            chunk_size: u64::from(reply.chunk_size),
            max_unit: reply.max_unit,
            root,
            state: Mutex::new(state),
            pending: Mutex::new(HashMap::new()),
        });
        self.inner.route(&shared);
        Ok(RemoteFile { shared })
    }
}

/// The signed root a listing gives a file.
fn parse_root(hash: &str, tree: Option<&str>) -> Result<chunk_tree::Hash> {
    let tree = tree.ok_or_else(|| ClientError::NoTree(hash.to_string()))?;
    let mut root = [0u8; 32];
    hex::decode_to_slice(tree, &mut root)
        .map_err(|_| ClientError::Protocol(format!("the listing's chunk tree root for {hash} is not 64 hex digits")))?;
    Ok(root)
}

impl ClientInner {
    fn listed(&self, hash: &str) -> Option<super::Listed> {
        self.listed.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }

    fn route(&self, file: &Arc<FileShared>) {
        let id = file.state.lock().unwrap_or_else(|p| p.into_inner()).id.clone();
        self.lock_routes().insert(id, Route::Session(Arc::downgrade(file)));
    }

    async fn open_session(&self, hash: &str) -> Result<(SessionState, OpenResponse)> {
        let ephemeral = EphemeralKey::generate();
        let client_xkey = ephemeral.public_xkey();
        let reader =
            self.identity.prove(Purpose::Reader, &[self.catalog.as_bytes(), hash.as_bytes(), client_xkey.as_bytes()]);
        let request =
            OpenRequest { hash: hash.to_string(), client_xkey: client_xkey.to_string(), reader: Some(reader) };
        let signed = self.request_reply(Operation::Open, &request).await?;
        // The reply is bound to our fresh xkey: a reply made for anyone else does not verify.
        self.check_signed(
            &signed,
            Purpose::Session,
            &[self.catalog.as_bytes(), hash.as_bytes(), client_xkey.as_bytes()],
        )?;
        let reply: OpenResponse = signed.parse(Operation::Open)?;
        if !protocol::is_session_id(&reply.session) {
            return Err(ClientError::Protocol("open reply has a malformed session id".into()));
        }
        if reply.chunk_size < protocol::MIN_CHUNK_SIZE
            || reply.chunk_size > 16 * 1024 * 1024
            || !(reply.chunk_size as usize).is_multiple_of(chunk_tree::LEAF_SIZE)
        {
            return Err(ClientError::Protocol(format!(
                "chunk_size {} is out of range or not a multiple of {}",
                reply.chunk_size,
                chunk_tree::LEAF_SIZE
            )));
        }
        let binding = SessionBinding {
            session: &reply.session,
            catalog: &self.catalog,
            hash,
            client_xkey: ephemeral.public_xkey(),
            server_xkey: &reply.server_xkey,
        };
        let key = ephemeral.agree(&reply.server_xkey, &binding)?;
        Ok((SessionState { id: reply.session.clone(), key: Arc::new(key) }, reply))
    }
}

struct SessionState {
    id: String,
    key: Arc<SessionKey>,
}

pub(super) struct FileShared {
    client: Arc<ClientInner>,
    hash: String,
    byte_size: u64,
    chunk_size: u64,
    /// Largest unit a read may name, from the signed `open` reply (None: chunks only).
    max_unit: Option<u32>,
    /// The file's chunk tree root, from the signed listing.
    root: chunk_tree::Hash,
    state: Mutex<SessionState>,
    /// (unit, record index) → the reads waiting for it.
    pending: Mutex<HashMap<RecordId, Vec<ChunkSender>>>,
}

/// A record's identity within a session: its unit (None: the session's chunk size) and index.
type RecordId = (Option<u32>, u64);

impl FileShared {
    /// Bytes per record of `unit`.
    fn unit_bytes(&self, unit: Option<u32>) -> u64 {
        unit.map_or(self.chunk_size, u64::from)
    }

    /// The data of decrypted record `index` of `unit` once it is proven to be the indexed bytes.
    fn verify(&self, unit: Option<u32>, index: u64, plain: Bytes) -> Result<Bytes> {
        let refuse = |why| ClientError::ChunkTree { hash: self.hash.clone(), index, why };
        let (proof, at) = chunk_tree::unframe(&plain).map_err(refuse)?;
        let data = plain.slice(at..);
        let size = self.unit_bytes(unit);
        let want = protocol::chunk_len(self.byte_size, size, index);
        if data.len() as u64 != want {
            return Err(refuse(chunk_tree::TreeError::Range(format!("{} bytes, expected {want}", data.len()))));
        }
        let (first_leaf, _) = chunk_tree::chunk_leaves(self.byte_size, size, index);
        chunk_tree::verify_range(&self.root, self.byte_size, first_leaf, &data, &proof).map_err(refuse)?;
        Ok(data)
    }

    pub(super) fn deliver(&self, session: &str, delivery: Delivery) {
        let key = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.id != session {
                return;
            }
            state.key.clone()
        };
        let id = (delivery.unit, delivery.index);
        let waiters = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        for tx in waiters.into_iter().flatten() {
            let copy = Delivery { unit: delivery.unit, index: delivery.index, payload: delivery.payload.clone() };
            let _ = tx.send((key.clone(), copy));
        }
    }
}

impl Drop for FileShared {
    fn drop(&mut self) {
        let id = self.state.get_mut().map(|s| s.id.clone()).unwrap_or_default();
        self.client.lock_routes().remove(&id);
        // Tell the server it can free the session; best effort, without waiting.
        let client = self.client.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.request::<_, serde_json::Value>(Operation::Close, &CloseRequest { session: id }).await;
            });
        }
    }
}

/// An open file of a remote catalog; cheap to clone, safe to read from many tasks at once.
#[derive(Clone)]
pub struct RemoteFile {
    shared: Arc<FileShared>,
}

impl RemoteFile {
    /// True if both handles are the same open session.
    pub fn same_session(&self, other: &RemoteFile) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub fn byte_size(&self) -> u64 {
        self.shared.byte_size
    }

    pub fn chunk_size(&self) -> u64 {
        self.shared.chunk_size
    }

    pub fn hash(&self) -> &str {
        &self.shared.hash
    }

    pub fn chunk_count(&self) -> u64 {
        protocol::chunk_count(self.shared.byte_size, self.shared.chunk_size)
    }

    /// True if reads may name `unit` bytes per record (the server offered it when opening).
    pub fn offers_unit(&self, unit: u64) -> bool {
        let Ok(unit) = u32::try_from(unit) else { return false };
        self.shared.max_unit.is_some_and(|max| protocol::valid_unit(unit, max))
    }

    /// Bytes `offset .. offset+len`, clipped at end of file. A range of at most a quarter of
    /// a chunk is fetched as its 16 KiB leaves when the server offers units.
    pub async fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(self.byte_size());
        if offset >= end {
            return Ok(Vec::new());
        }
        // A range much smaller than a chunk moves only its leaves, where the server offers it.
        let leaf = chunk_tree::LEAF_SIZE as u64;
        let cs = if end - offset <= self.chunk_size() / 4 && self.offers_unit(leaf) { leaf } else { self.chunk_size() };
        let first = offset / cs;
        let last = (end - 1) / cs;
        let mut out = Vec::with_capacity((end - offset) as usize);
        self.fetch_in(cs, first, last - first + 1, |index, chunk| {
            let chunk_start = index * cs;
            let from = offset.saturating_sub(chunk_start) as usize;
            let to = ((end - chunk_start) as usize).min(chunk.len());
            out.extend_from_slice(&chunk[from..to]);
            ready(Ok(()))
        })
        .await?;
        Ok(out)
    }

    /// Decrypted chunks `first .. first+count`, in order.
    pub async fn read_chunks(&self, first: u64, count: u64) -> Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(count as usize);
        self.fetch(first, count, |_, chunk| {
            out.push(chunk);
            ready(Ok(()))
        })
        .await?;
        Ok(out)
    }

    /// Core of every read: asks for chunks `first .. first+count` with at most `window` in
    /// flight, and hands each to `sink` in order as soon as all before it have arrived.
    /// The sink's future may wait (a full queue to a writer); nothing more is asked for meanwhile.
    pub async fn fetch<F: Future<Output = Result<()>>>(
        &self,
        first: u64,
        count: u64,
        sink: impl FnMut(u64, Bytes) -> F,
    ) -> Result<()> {
        self.fetch_records(None, first, count, sink).await
    }

    /// [`RemoteFile::fetch`] in records of `unit` bytes (indices count in it): a multiple of
    /// the chunk tree's leaf the server offered ([`RemoteFile::offers_unit`]).
    pub async fn fetch_in<F: Future<Output = Result<()>>>(
        &self,
        unit: u64,
        first: u64,
        count: u64,
        sink: impl FnMut(u64, Bytes) -> F,
    ) -> Result<()> {
        if unit == self.chunk_size() {
            return self.fetch(first, count, sink).await;
        }
        if !self.offers_unit(unit) {
            return Err(ClientError::Protocol(format!("the catalog server does not send records of {unit} bytes")));
        }
        self.fetch_records(Some(unit as u32), first, count, sink).await
    }

    async fn fetch_records<F: Future<Output = Result<()>>>(
        &self,
        unit: Option<u32>,
        first: u64,
        count: u64,
        mut sink: impl FnMut(u64, Bytes) -> F,
    ) -> Result<()> {
        let shared = &self.shared;
        let records = protocol::chunk_count(shared.byte_size, shared.unit_bytes(unit));
        let end = first.saturating_add(count).min(records);
        if first >= end {
            return Ok(());
        }
        let options = &shared.client.options;
        let window = u64::from(options.window.max(1));
        // A small read asks for each record on its own, so each comes inline (as the reply).
        let batch = if end - first <= INLINE_READ_RECORDS {
            1
        } else {
            u64::from(options.batch.clamp(1, protocol::MAX_CHUNKS_PER_READ))
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let registration = Registration { file: shared, unit, first, end, tx };
        let tx = &registration.tx;

        let mut next_request = first;
        let mut next_deliver = first;
        let mut in_flight: BTreeSet<u64> = BTreeSet::new();
        let mut arrived: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut acks = FuturesUnordered::new();
        let mut stalls = 0u32;
        let mut reopens = 0u32;
        let mut forged = 0u32;
        // Moves only when a new chunk arrives: duplicates and acks cannot keep a read alive.
        let mut deadline = tokio::time::Instant::now() + options.chunk_timeout;

        while next_deliver < end {
            // Keep the window full: chunks asked for but not yet handed to the sink.
            while next_request < end && next_request - next_deliver < window {
                let n = batch.min(end - next_request).min(window - (next_request - next_deliver));
                self.register(unit, next_request, n, tx);
                in_flight.extend(next_request..next_request + n);
                acks.push(self.request_read(unit, next_request, n));
                next_request += n;
            }
            tokio::select! {
                Some((key, delivery)) = rx.recv() => {
                    let index = delivery.index;
                    if delivery.unit != unit || !in_flight.remove(&index) {
                        continue;
                    }
                    let plain = match key.open_record_in_place(index, unit, delivery.payload) {
                        Ok(plain) => plain,
                        // Only the session key's holders can seal a record that opens, so one
                        // that does not is a stranger's (anyone who may publish on the media
                        // subject): dropped, the chunk still awaited. Past a bound, the read
                        // fails with what was found.
                        Err(e) if forged < MAX_FORGED_PER_READ => {
                            forged += 1;
                            tracing::debug!(index, "a record that fails authentication was dropped: {e}");
                            in_flight.insert(index);
                            self.register(unit, index, 1, tx);
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    arrived.insert(index, shared.verify(unit, index, plain)?);
                    while let Some(chunk) = arrived.remove(&next_deliver) {
                        sink(next_deliver, chunk).await?;
                        next_deliver += 1;
                    }
                    stalls = 0;
                    deadline = tokio::time::Instant::now() + options.chunk_timeout;
                }
                Some(ack) = acks.next() => match ack {
                    // Handed to every read waiting for it, this one included (the branch above).
                    Ok(Some((session, record))) => shared.deliver(&session, record),
                    Ok(None) => {}
                    // The server forgot the session (restart, idle expiry): open a new one and
                    // ask again for everything still missing.
                    Err(ClientError::Refused { code: 404, .. }) if reopens < options.retries => {
                        reopens += 1;
                        self.reopen().await?;
                        acks.clear();
                        for (from, n) in runs(&in_flight, batch) {
                            self.register(unit, from, n, tx);
                            acks.push(self.request_read(unit, from, n));
                        }
                    }
                    // An acknowledgement that does not come in time is a stall like any other:
                    // the rounds below ask again, and give up after `retries` without progress.
                    Err(ClientError::Timeout(_)) => {}
                    Err(e) => return Err(e),
                },
                // Each round without progress waits longer before asking again, so a loaded
                // machine is not flooded with duplicate chunks.
                _ = tokio::time::sleep_until(deadline) => {
                    stalls += 1;
                    if stalls > options.retries {
                        return Err(ClientError::Timeout(shared.client.catalog.clone()));
                    }
                    deadline = tokio::time::Instant::now() + options.chunk_timeout * (stalls + 1);
                    tracing::debug!(hash = %shared.hash, missing = in_flight.len(), "chunks late; asking again");
                    for (from, n) in runs(&in_flight, batch) {
                        self.register(unit, from, n, tx);
                        acks.push(self.request_read(unit, from, n));
                    }
                }
            }
        }
        Ok(())
    }

    fn register(&self, unit: Option<u32>, from: u64, n: u64, tx: &ChunkSender) {
        let mut pending = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        for i in from..from + n {
            let waiters = pending.entry((unit, i)).or_default();
            if !waiters.iter().any(|w| w.same_channel(tx)) {
                waiters.push(tx.clone());
            }
        }
    }

    /// Asks for records `first_chunk .. first_chunk+count`. One record is asked for inline:
    /// the answer is the record itself (with the session it was asked on), or, from a server
    /// that does not send records inline, an acknowledgement like any other read's.
    fn request_read(
        &self,
        unit: Option<u32>,
        first_chunk: u64,
        count: u64,
    ) -> impl std::future::Future<Output = Result<Option<(String, Delivery)>>> + use<> {
        let shared = self.shared.clone();
        async move {
            let session = shared.state.lock().unwrap_or_else(|p| p.into_inner()).id.clone();
            let inline = count == 1;
            let req = ReadRequest { session, first_chunk, count: count as u32, unit, inline };
            let msg = shared.client.request_message(Operation::Read, &req).await?;
            if inline {
                if let Some(record) = Delivery::of(&msg) {
                    return Ok(Some((req.session, record)));
                }
            }
            let _: ReadResponse = super::parse_reply(Operation::Read, &msg)?.parse(Operation::Read)?;
            Ok(None)
        }
    }

    async fn reopen(&self) -> Result<()> {
        let shared = &self.shared;
        let (state, reply) = shared.client.open_session(&shared.hash).await?;
        if reply.byte_size != shared.byte_size
            || u64::from(reply.chunk_size) != shared.chunk_size
            || reply.max_unit != shared.max_unit
        {
            return Err(ClientError::Protocol("file changed size or chunking while it was read".into()));
        }
        let old = {
            let mut current = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *current, state)
        };
        let mut routes = shared.client.lock_routes();
        routes.remove(&old.id);
        let id = shared.state.lock().unwrap_or_else(|p| p.into_inner()).id.clone();
        routes.insert(id, Route::Session(Arc::downgrade(shared)));
        Ok(())
    }
}

/// Reads of at most this many records ask for each on its own, inline: a random read is
/// one request and one reply, not a request, an acknowledgement and a media message.
/// Records failing authentication dropped in one read before it fails (see the read loop).
const MAX_FORGED_PER_READ: u32 = 64;
const INLINE_READ_RECORDS: u64 = 4;

/// Forgets a read's waiters when it ends, however it ends.
struct Registration<'a> {
    file: &'a FileShared,
    unit: Option<u32>,
    first: u64,
    end: u64,
    tx: ChunkSender,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut pending = self.file.pending.lock().unwrap_or_else(|p| p.into_inner());
        for i in self.first..self.end {
            let id = (self.unit, i);
            if let Some(waiters) = pending.get_mut(&id) {
                waiters.retain(|w| !w.same_channel(&self.tx));
                if waiters.is_empty() {
                    pending.remove(&id);
                }
            }
        }
    }
}

/// Splits a set of chunk indices into contiguous runs of at most `batch`.
fn runs(indices: &BTreeSet<u64>, batch: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in indices {
        match out.last_mut() {
            Some((from, n)) if *from + *n == i && *n < batch => *n += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_contiguous_indices() {
        let set: BTreeSet<u64> = [1, 2, 3, 7, 8, 20].into_iter().collect();
        assert_eq!(runs(&set, 2), vec![(1, 2), (3, 1), (7, 2), (20, 1)]);
    }
}
