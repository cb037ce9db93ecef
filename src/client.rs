//! Catalog client: list a catalog, open a file session, read chunk ranges, verify and decrypt.
//!
//! One NATS subscription per catalog (`natster.media.<catalog>.*`) receives every chunk; a
//! dispatcher routes each to the file session named by the subject's last token. A read keeps
//! a bounded window of chunks in flight, re-requests what does not arrive within
//! `chunk_timeout`, reopens a session the server forgot, and gives up after `retries` rounds
//! without progress: it never waits forever.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::crypto::{CryptoError, EphemeralKey, SessionBinding, SessionKey};
use crate::protocol::{
    self, CatalogEntry, CatalogSummary, CloseRequest, DownloadRequest, DownloadResponse, Envelope, GetRequest,
    OpenRequest, OpenResponse, Operation, ReadRequest, ReadResponse,
};

/// Most entries a listing may have; bounds what a peer can make us hold.
pub const MAX_ENTRIES: usize = 5_000_000;
/// Most bytes of entry text a listing may have, for the same reason.
pub const MAX_LISTING_BYTES: usize = 256 * 1024 * 1024;

fn listing_bytes(entries: &[CatalogEntry]) -> usize {
    entries.iter().map(|e| e.path.len() + e.description.len() + e.mime_type.len() + 128).sum()
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on every request/reply exchange.
    pub request_timeout: Duration,
    /// How long a read waits without receiving any chunk before asking again.
    pub chunk_timeout: Duration,
    /// Rounds without progress before a read fails.
    pub retries: u32,
    /// Chunks in flight per read.
    pub window: u32,
    /// Chunks asked for per `read` request.
    pub batch: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            chunk_timeout: Duration::from_secs(2),
            retries: 3,
            window: 64,
            batch: 16,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("catalog '{0}' did not answer in time; check that its server is running and reachable")]
    Timeout(String),
    #[error("no server answers for catalog '{0}'; it is offline, misspelled, or not imported")]
    NoResponders(String),
    #[error("catalog server refused: {message} ({code})")]
    Refused { code: u16, message: String },
    #[error(
        "catalog server speaks only the original v1 protocol (no ranged reads); use `natster-mount catalog download`"
    )]
    V1Only,
    #[error("invalid reply from catalog server: {0}")]
    Protocol(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("NATS error: {0}")]
    Nats(String),
    #[error("downloaded bytes do not match the catalog's sha256 {0}; nothing was kept")]
    HashMismatch(String),
    #[error("{0}")]
    Io(String),
}

impl ClientError {
    /// True when the server said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Refused { code: 404, .. })
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// A chunk as it arrived, before decryption.
struct Delivery {
    index: u64,
    payload: Bytes,
}

/// Where the dispatcher hands a chunk for one read: with the key of the session it came on.
type ChunkSender = mpsc::UnboundedSender<(Arc<SessionKey>, Delivery)>;

enum Route {
    Session(Weak<FileShared>),
    /// v1 chunks travel on the file's hash: every download of it on this client gets every
    /// chunk and keeps those from its own sender.
    V1(Vec<mpsc::UnboundedSender<async_nats::Message>>),
}

struct ClientInner {
    nats: async_nats::Client,
    catalog: String,
    options: ClientOptions,
    routes: Mutex<HashMap<String, Route>>,
    dispatcher: tokio::sync::OnceCell<tokio::task::JoinHandle<()>>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        if let Some(task) = self.dispatcher.get() {
            task.abort();
        }
    }
}

/// Reads one catalog, the owner's own or an imported one (the subjects are the same).
#[derive(Clone)]
pub struct CatalogClient {
    inner: Arc<ClientInner>,
}

impl CatalogClient {
    pub fn new(nats: async_nats::Client, catalog: &str, options: ClientOptions) -> Result<Self> {
        protocol::validate_catalog_name(catalog).map_err(ClientError::Io)?;
        Ok(CatalogClient {
            inner: Arc::new(ClientInner {
                nats,
                catalog: catalog.to_string(),
                options,
                routes: Mutex::new(HashMap::new()),
                dispatcher: tokio::sync::OnceCell::new(),
            }),
        })
    }

    pub fn catalog(&self) -> &str {
        &self.inner.catalog
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The whole listing, fetched page by page; restarts if it changes mid-way.
    pub async fn get(&self) -> Result<CatalogSummary> {
        'listing: for _ in 0..3 {
            let mut summary: CatalogSummary = self.inner.request(Operation::Get, &GetRequest { from: Some(0) }).await?;
            let Some(total) = summary.total_entries else {
                // An original peer ignores `from` and sends everything at once.
                drop_invalid_entries(&self.inner.catalog, &mut summary.entries);
                return Ok(summary);
            };
            let total = usize::try_from(total).unwrap_or(usize::MAX);
            if total > MAX_ENTRIES {
                return Err(ClientError::Protocol(format!("listing has {total} entries, more than {MAX_ENTRIES}")));
            }
            while summary.entries.len() < total {
                let from = summary.entries.len() as u64;
                let page: CatalogSummary = self.inner.request(Operation::Get, &GetRequest { from: Some(from) }).await?;
                if page.revision != summary.revision {
                    continue 'listing;
                }
                if page.entries.is_empty() {
                    return Err(ClientError::Protocol("listing page was empty before the end".into()));
                }
                summary.entries.extend(page.entries);
                if listing_bytes(&summary.entries) > MAX_LISTING_BYTES {
                    return Err(ClientError::Protocol(format!("listing is larger than {MAX_LISTING_BYTES} bytes")));
                }
            }
            summary.entries.truncate(total);
            drop_invalid_entries(&self.inner.catalog, &mut summary.entries);
            return Ok(summary);
        }
        Err(ClientError::Protocol("listing kept changing while it was read; try again".into()))
    }

    /// Opens a v2 ranged-read session on the file with `hash`.
    pub async fn open(&self, hash: &str, byte_size_hint: Option<u64>) -> Result<RemoteFile> {
        if !protocol::is_sha256_hex(hash) {
            return Err(ClientError::Io(format!("'{hash}' is not a sha256 hash")));
        }
        self.inner.ensure_dispatcher().await?;
        let (state, reply) = self.inner.open_session(hash).await?;
        if let Some(expected) = byte_size_hint {
            if expected != reply.byte_size {
                return Err(ClientError::Protocol(format!(
                    "server says {hash} has {} bytes, the listing says {expected}",
                    reply.byte_size
                )));
            }
        }
        let shared = Arc::new(FileShared {
            client: self.inner.clone(),
            hash: hash.to_string(),
            byte_size: reply.byte_size,
            chunk_size: u64::from(reply.chunk_size),
            state: Mutex::new(state),
            pending: Mutex::new(HashMap::new()),
        });
        self.inner.route(&shared);
        Ok(RemoteFile { shared })
    }

    /// v1 whole-file download (the original's protocol), into `sink` in order.
    pub async fn download_v1(&self, hash: &str, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        let inner = &self.inner;
        inner.ensure_dispatcher().await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        match inner.lock_routes().entry(hash.to_string()).or_insert_with(|| Route::V1(Vec::new())) {
            Route::V1(receivers) => receivers.push(tx.clone()),
            Route::Session(_) => return Err(ClientError::Protocol("hash collides with a session id".into())),
        }
        let _unroute = Unroute { inner, token: hash.to_string(), tx };
        let key = nkeys::XKey::new();
        let reply: DownloadResponse = inner
            .request(
                Operation::Download,
                &DownloadRequest { hash: hash.to_string(), transcode: false, target_xkey: key.public_key() },
            )
            .await?;
        let sender = nkeys::XKey::from_public_key(&reply.sender_xkey)
            .map_err(|_| ClientError::Protocol("sender_xkey is not an xkey".into()))?;
        if reply.chunk_size == 0 || reply.total_chunks != protocol::chunk_count(reply.total_bytes, reply.chunk_size) {
            return Err(ClientError::Protocol("inconsistent chunk_size / total_chunks / total_bytes".into()));
        }
        let mut next = 0u64;
        let mut early: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut written = 0u64;
        while next < reply.total_chunks {
            let wait = inner.options.chunk_timeout * (inner.options.retries + 1);
            let msg = match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(m)) => m,
                _ => return Err(ClientError::Timeout(inner.catalog.clone())),
            };
            let from_our_sender = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(protocol::HEADER_SENDER_XKEY))
                .is_some_and(|v| v.as_str() == reply.sender_xkey);
            if !from_our_sender {
                continue; // another download of the same file
            }
            let index = header_u64(&msg, protocol::HEADER_CHUNK_INDEX)?;
            if index >= reply.total_chunks || index < next || (index != next && early.len() > 4096) {
                continue;
            }
            let plain = key.open(&msg.payload, &sender).map_err(|_| CryptoError::Authentication(index))?;
            if plain.len() as u64 != protocol::chunk_len(reply.total_bytes, reply.chunk_size, index) {
                return Err(CryptoError::Authentication(index).into());
            }
            early.insert(index, plain);
            while let Some(chunk) = early.remove(&next) {
                sink(&chunk)?;
                written += chunk.len() as u64;
                next += 1;
            }
        }
        Ok(written)
    }
}

/// Removes a v1 download's receiver when it ends, however it ends.
struct Unroute<'a> {
    inner: &'a ClientInner,
    token: String,
    tx: mpsc::UnboundedSender<async_nats::Message>,
}

impl Drop for Unroute<'_> {
    fn drop(&mut self) {
        let mut routes = self.inner.lock_routes();
        if let Some(Route::V1(receivers)) = routes.get_mut(&self.token) {
            receivers.retain(|r| !r.same_channel(&self.tx));
            if receivers.is_empty() {
                routes.remove(&self.token);
            }
        }
    }
}

fn header_u64(msg: &async_nats::Message, name: &str) -> Result<u64> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .and_then(|v| v.as_str().parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("chunk without a valid {name} header")))
}

/// Why an entry could confuse a filesystem built from the listing, if it could.
fn invalid_entry(e: &CatalogEntry) -> Option<&'static str> {
    if !protocol::is_sha256_hex(&e.hash) {
        return Some("invalid hash");
    }
    if e.path.len() > 4096 || e.description.len() > 64 * 1024 || e.mime_type.len() > 255 {
        return Some("oversized field");
    }
    let rel = e.path.strip_prefix('/').unwrap_or(&e.path);
    if rel.is_empty() || rel.split('/').any(|p| p.is_empty() || p == "." || p == ".." || p.contains('\0')) {
        return Some("path is not a clean relative path");
    }
    None
}

/// Drops (and logs) entries a peer should never have sent; one bad entry must not hide the
/// rest of the catalog.
fn drop_invalid_entries(catalog: &str, entries: &mut Vec<CatalogEntry>) {
    entries.retain(|e| match invalid_entry(e) {
        None => true,
        Some(why) => {
            tracing::warn!(catalog, path = ?e.path, "ignoring listing entry: {why}");
            false
        }
    });
}

impl ClientInner {
    fn lock_routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn request<Req: Serialize, Resp: DeserializeOwned>(&self, op: Operation, body: &Req) -> Result<Resp> {
        let subject = protocol::catalog_subject(&self.catalog, op);
        let payload = serde_json::to_vec(body).map_err(|e| ClientError::Io(e.to_string()))?;
        let request = self.nats.request(subject, payload.into());
        let msg = match tokio::time::timeout(self.options.request_timeout, request).await {
            Err(_) => return Err(ClientError::Timeout(self.catalog.clone())),
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => ClientError::NoResponders(self.catalog.clone()),
                    async_nats::RequestErrorKind::TimedOut => ClientError::Timeout(self.catalog.clone()),
                    _ => ClientError::Nats(e.to_string()),
                })
            }
            Ok(Ok(msg)) => msg,
        };
        let envelope: Envelope<Resp> = serde_json::from_slice(&msg.payload)
            .map_err(|e| ClientError::Protocol(format!("{} reply is not a valid envelope: {e}", op.as_str())))?;
        match (envelope.code, envelope.data) {
            (200, Some(data)) => Ok(data),
            (200, None) => Err(ClientError::Protocol(format!("{} reply has no data", op.as_str()))),
            (code, _) => {
                Err(ClientError::Refused { code, message: envelope.error.unwrap_or_else(|| "no reason given".into()) })
            }
        }
    }

    /// Subscribes once to the catalog's media subject and routes chunks by last token.
    async fn ensure_dispatcher(self: &Arc<Self>) -> Result<()> {
        let weak = Arc::downgrade(self);
        self.dispatcher
            .get_or_try_init(|| async {
                let subject = protocol::media_wildcard(&self.catalog);
                let mut sub = self.nats.subscribe(subject).await.map_err(|e| ClientError::Nats(e.to_string()))?;
                Ok(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        let Some(inner) = weak.upgrade() else { break };
                        inner.dispatch(msg);
                    }
                }))
            })
            .await
            .map(|_| ())
    }

    fn dispatch(&self, msg: async_nats::Message) {
        let Some(token) = msg.subject.rsplit('.').next() else { return };
        // The routes lock is released before upgrading: dropping the last reference to a
        // file session takes that lock again (FileShared::drop).
        let session = {
            let routes = self.lock_routes();
            match routes.get(token) {
                Some(Route::V1(receivers)) => {
                    for tx in receivers {
                        let _ = tx.send(msg.clone());
                    }
                    return;
                }
                Some(Route::Session(file)) => file.clone(),
                None => return,
            }
        };
        let Ok(index) = header_u64(&msg, protocol::HEADER_CHUNK_INDEX) else { return };
        if let Some(file) = session.upgrade() {
            file.deliver(token, Delivery { index, payload: msg.payload });
        }
    }

    fn route(&self, file: &Arc<FileShared>) {
        let id = file.state.lock().unwrap_or_else(|p| p.into_inner()).id.clone();
        self.lock_routes().insert(id, Route::Session(Arc::downgrade(file)));
    }

    async fn open_session(&self, hash: &str) -> Result<(SessionState, OpenResponse)> {
        let ephemeral = EphemeralKey::generate();
        let reply: OpenResponse = match self
            .request(
                Operation::Open,
                &OpenRequest { hash: hash.to_string(), client_xkey: ephemeral.public_xkey().to_string() },
            )
            .await
        {
            Err(ClientError::NoResponders(_)) => return Err(ClientError::V1Only),
            other => other?,
        };
        if !protocol::is_session_id(&reply.session) {
            return Err(ClientError::Protocol("open reply has a malformed session id".into()));
        }
        if reply.chunk_size < protocol::MIN_CHUNK_SIZE || reply.chunk_size > 16 * 1024 * 1024 {
            return Err(ClientError::Protocol(format!("chunk_size {} is out of range", reply.chunk_size)));
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

struct FileShared {
    client: Arc<ClientInner>,
    hash: String,
    byte_size: u64,
    chunk_size: u64,
    state: Mutex<SessionState>,
    /// Chunk index → the reads waiting for it.
    pending: Mutex<HashMap<u64, Vec<ChunkSender>>>,
}

impl FileShared {
    fn deliver(&self, session: &str, delivery: Delivery) {
        let key = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.id != session {
                return;
            }
            state.key.clone()
        };
        let waiters = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&delivery.index);
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send((key.clone(), Delivery { index: delivery.index, payload: delivery.payload.clone() }));
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

    /// Bytes `offset .. offset+len`, clipped at end of file.
    pub async fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(self.byte_size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (end - 1) / cs;
        let mut out = Vec::with_capacity((end - offset) as usize);
        self.fetch(first, last - first + 1, |index, chunk| {
            let chunk_start = index * cs;
            let from = offset.saturating_sub(chunk_start) as usize;
            let to = ((end - chunk_start) as usize).min(chunk.len());
            out.extend_from_slice(&chunk[from..to]);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Decrypted chunks `first .. first+count`, in order.
    pub async fn read_chunks(&self, first: u64, count: u64) -> Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(count as usize);
        self.fetch(first, count, |_, chunk| {
            out.push(chunk);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// The whole file into `sink`, in order, verified against the catalog's sha256 before
    /// returning Ok (so the caller keeps nothing unless it matches).
    pub async fn read_all(&self, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut hasher = Sha256::new();
        self.fetch(0, self.chunk_count(), |_, chunk| {
            hasher.update(&chunk);
            sink(&chunk)
        })
        .await?;
        if hex::encode(hasher.finalize()) != self.shared.hash {
            return Err(ClientError::HashMismatch(self.shared.hash.clone()));
        }
        Ok(())
    }

    /// Core of every read: asks for chunks `first .. first+count` with at most `window` in
    /// flight, and hands each to `sink` in order as soon as all before it have arrived.
    pub async fn fetch(&self, first: u64, count: u64, mut sink: impl FnMut(u64, Bytes) -> Result<()>) -> Result<()> {
        let end = first.saturating_add(count).min(self.chunk_count());
        if first >= end {
            return Ok(());
        }
        let shared = &self.shared;
        let options = &shared.client.options;
        let window = u64::from(options.window.max(1));
        let batch = u64::from(options.batch.clamp(1, protocol::MAX_CHUNKS_PER_READ));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let registration = Registration { file: shared, first, end, tx };
        let tx = &registration.tx;

        let mut next_request = first;
        let mut next_deliver = first;
        let mut in_flight: BTreeSet<u64> = BTreeSet::new();
        let mut arrived: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut acks = FuturesUnordered::new();
        let mut stalls = 0u32;
        let mut reopens = 0u32;
        // Moves only when a new chunk arrives: duplicates and acks cannot keep a read alive.
        let mut deadline = tokio::time::Instant::now() + options.chunk_timeout;

        while next_deliver < end {
            // Keep the window full: chunks asked for but not yet handed to the sink.
            while next_request < end && next_request - next_deliver < window {
                let n = batch.min(end - next_request).min(window - (next_request - next_deliver));
                self.register(next_request, n, tx);
                in_flight.extend(next_request..next_request + n);
                acks.push(self.request_read(next_request, n));
                next_request += n;
            }
            tokio::select! {
                Some((key, delivery)) = rx.recv() => {
                    let index = delivery.index;
                    if !in_flight.remove(&index) {
                        continue;
                    }
                    let chunk = key.open_in_place(index, delivery.payload)?;
                    if chunk.len() as u64 != protocol::chunk_len(shared.byte_size, shared.chunk_size, index) {
                        return Err(CryptoError::Authentication(index).into());
                    }
                    arrived.insert(index, chunk);
                    while let Some(chunk) = arrived.remove(&next_deliver) {
                        sink(next_deliver, chunk)?;
                        next_deliver += 1;
                    }
                    stalls = 0;
                    deadline = tokio::time::Instant::now() + options.chunk_timeout;
                }
                Some(ack) = acks.next() => match ack {
                    Ok(()) => {}
                    // The server forgot the session (restart, idle expiry): open a new one and
                    // ask again for everything still missing.
                    Err(ClientError::Refused { code: 404, .. }) if reopens < options.retries => {
                        reopens += 1;
                        self.reopen().await?;
                        acks.clear();
                        for (from, n) in runs(&in_flight, batch) {
                            self.register(from, n, tx);
                            acks.push(self.request_read(from, n));
                        }
                    }
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
                        self.register(from, n, tx);
                        acks.push(self.request_read(from, n));
                    }
                }
            }
        }
        Ok(())
    }

    fn register(&self, from: u64, n: u64, tx: &ChunkSender) {
        let mut pending = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        for i in from..from + n {
            let waiters = pending.entry(i).or_default();
            if !waiters.iter().any(|w| w.same_channel(tx)) {
                waiters.push(tx.clone());
            }
        }
    }

    fn request_read(&self, first_chunk: u64, count: u64) -> impl std::future::Future<Output = Result<()>> + use<> {
        let shared = self.shared.clone();
        async move {
            let session = shared.state.lock().unwrap_or_else(|p| p.into_inner()).id.clone();
            let req = ReadRequest { session, first_chunk, count: count as u32 };
            let _: ReadResponse = shared.client.request(Operation::Read, &req).await?;
            Ok(())
        }
    }

    async fn reopen(&self) -> Result<()> {
        let shared = &self.shared;
        let (state, reply) = shared.client.open_session(&shared.hash).await?;
        if reply.byte_size != shared.byte_size || u64::from(reply.chunk_size) != shared.chunk_size {
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

/// Forgets a read's waiters when it ends, however it ends.
struct Registration<'a> {
    file: &'a FileShared,
    first: u64,
    end: u64,
    tx: ChunkSender,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut pending = self.file.pending.lock().unwrap_or_else(|p| p.into_inner());
        for i in self.first..self.end {
            if let Some(waiters) = pending.get_mut(&i) {
                waiters.retain(|w| !w.same_channel(&self.tx));
                if waiters.is_empty() {
                    pending.remove(&i);
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

/// Downloads `hash` into `out` through v2 (or v1 for an original peer): written to a
/// temporary file beside `out`, verified, then renamed; nothing is left on failure.
pub async fn download_to_file(
    client: &CatalogClient,
    hash: &str,
    byte_size: u64,
    out: &Path,
    progress: impl Fn(u64),
) -> std::result::Result<u64, anyhow::Error> {
    use std::io::Write;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".natster-download-")
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| anyhow::anyhow!("cannot create a file in {}: {e}", dir.display()))?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file().try_clone()?);
    let mut written = 0u64;
    let mut write = |chunk: &[u8]| -> Result<()> {
        // A peer sending more than the listing promised is cut off before it fills the disk.
        if written + chunk.len() as u64 > byte_size {
            return Err(ClientError::Protocol(format!("server sent more than the listed {byte_size} bytes")));
        }
        writer.write_all(chunk).map_err(|e| ClientError::Io(format!("cannot write {}: {e}", out.display())))?;
        written += chunk.len() as u64;
        progress(written);
        Ok(())
    };
    match client.open(hash, Some(byte_size)).await {
        Ok(file) => file.read_all(&mut write).await?,
        Err(ClientError::V1Only) => {
            let mut hasher = Sha256::new();
            client
                .download_v1(hash, |chunk| {
                    hasher.update(chunk);
                    write(chunk)
                })
                .await?;
            if hex::encode(hasher.finalize()) != hash {
                return Err(ClientError::HashMismatch(hash.to_string()).into());
            }
        }
        Err(e) => return Err(e.into()),
    }
    let out_err = |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", out.display());
    writer.flush().map_err(out_err)?;
    drop(writer);
    tmp.as_file().sync_all().map_err(out_err)?;
    tmp.persist(out).map_err(|e| anyhow::anyhow!("cannot write {}: {}", out.display(), e.error))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_contiguous_indices() {
        let set: BTreeSet<u64> = [1, 2, 3, 7, 8, 20].into_iter().collect();
        assert_eq!(runs(&set, 2), vec![(1, 2), (3, 1), (7, 2), (20, 1)]);
    }

    #[test]
    fn listings_drop_escaping_paths() {
        let entry = |path: &str| CatalogEntry {
            path: path.into(),
            description: String::new(),
            mime_type: String::new(),
            hash: "a".repeat(64),
            byte_size: 1,
            mtime: 0,
        };
        assert!(invalid_entry(&entry("/a/b.mp4")).is_none());
        for bad in ["/../etc/passwd", "/a//b", "/", "/a/./b", "/a/.."] {
            assert!(invalid_entry(&entry(bad)).is_some(), "{bad} accepted");
        }
        let mut listing = vec![entry("/ok.mp4"), entry("/../escape")];
        drop_invalid_entries("c", &mut listing);
        assert_eq!(listing.len(), 1);
    }
}
