//! Catalog server: answers `natster.catalog.<name>.<op>` (the owner's own account) and
//! `<ACCOUNT>.natster.catalog.<name>.<op>` (other accounts, through their imports), and
//! publishes encrypted chunks on the media subjects.
//!
//! Every request is handled on its own task, so one slow reader does not stall the others.
//! Files are served only by hash, only when indexed, only from inside the root, and only while
//! they still match the index (size and mtime): a changed file is refused, never served under a
//! stale hash.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::context::Home;
use crate::crypto::{self, EphemeralKey, SessionBinding, SessionKey};
use crate::index::{Catalog, IndexEntry};
use crate::protocol::{
    self, error_reply, Caller, CloseRequest, DownloadRequest, DownloadResponse, Envelope, OpenRequest, OpenResponse,
    Operation, ReadRequest, ReadResponse,
};
use crate::shares::LiveShareList;

/// Subject the server announces its catalog's revision on, for mounts of the same account.
pub const HEARTBEAT_SUBJECT: &str = "natster.local-events.heartbeat";

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// v2 chunk size in bytes (the unit of authentication).
    pub chunk_size: u32,
    /// Most v2 sessions held at once; the least recently used is dropped beyond it.
    pub max_sessions: usize,
    /// A session unused this long is dropped.
    pub session_idle: Duration,
    /// Serve every account, ignoring the share list (the original's `--allowall`).
    pub allow_all: bool,
    /// How often the catalog file is checked for a re-index and a heartbeat is sent.
    pub heartbeat: Duration,
    /// Most v1 whole-file transfers at once.
    pub max_v1_transfers: usize,
    /// Answer only what an original Natster server answers (`get`, v1 `download`).
    pub v1_only: bool,
}

pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Reads streamed at once (each holds at most two sealed chunks).
const MAX_CONCURRENT_READS: usize = 64;
/// NATS' default max_payload is 1 MiB; a chunk plus nonce, tag and headers must fit.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024 - 4096;

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_sessions: 512,
            session_idle: Duration::from_secs(600),
            allow_all: false,
            heartbeat: Duration::from_secs(2),
            max_v1_transfers: 4,
            v1_only: false,
        }
    }
}

/// The catalog as the server holds it: the index plus a hash lookup and the real root.
struct Loaded {
    catalog: Catalog,
    /// The `get` reply, built once per load; pages are slices of its entries.
    summary: protocol::CatalogSummary,
    /// Serialized size of each summary entry, to cut pages under the NATS payload limit.
    entry_sizes: Vec<usize>,
    by_hash: HashMap<String, usize>,
    root: PathBuf,
    file_identity: Option<(SystemTime, u64, u64)>,
}

impl Loaded {
    fn entry(&self, hash: &str) -> Option<&IndexEntry> {
        self.by_hash.get(hash).and_then(|&i| self.catalog.entries.get(i))
    }
}

struct Session {
    caller: Caller,
    hash: String,
    byte_size: u64,
    file: Arc<File>,
    indexed: FileIdentity,
    key: Arc<SessionKey>,
    last_used: Mutex<Instant>,
}

/// What must not change for a file to still match its index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    size: u64,
    mtime_ns: i64,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            size: meta.len(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
        }
    }
}

struct Shared {
    nats: async_nats::Client,
    home: Home,
    name: String,
    options: ServerOptions,
    loaded: RwLock<Arc<Loaded>>,
    shares: Mutex<LiveShareList>,
    sessions: Mutex<lru::LruCache<String, Arc<Session>>>,
    v1_transfers: Arc<Semaphore>,
    /// Reads streaming at once; more wait their turn, so memory stays bounded however many
    /// requests arrive.
    reads: Arc<Semaphore>,
}

/// A request refused with an envelope error code.
struct Refusal(u16, String);

fn refuse(code: u16, msg: impl Into<String>) -> Refusal {
    Refusal(code, msg.into())
}

pub struct CatalogServer {
    shared: Arc<Shared>,
}

impl CatalogServer {
    pub fn new(nats: async_nats::Client, home: Home, name: &str, options: ServerOptions) -> Result<Self> {
        if options.chunk_size < protocol::MIN_CHUNK_SIZE || options.chunk_size > MAX_CHUNK_SIZE {
            anyhow::bail!(
                "chunk size {} is out of range; use {}..={MAX_CHUNK_SIZE} bytes",
                options.chunk_size,
                protocol::MIN_CHUNK_SIZE
            );
        }
        let loaded = load(&home, name)?;
        let max = std::num::NonZeroUsize::new(options.max_sessions.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        if options.allow_all {
            tracing::warn!(
                catalog = name,
                "--allow-all: EVERY account that imports this catalog can read it, share list ignored"
            );
        }
        Ok(CatalogServer {
            shared: Arc::new(Shared {
                shares: Mutex::new(LiveShareList::new(home.clone(), name)),
                nats,
                home,
                name: name.to_string(),
                v1_transfers: Arc::new(Semaphore::new(options.max_v1_transfers.max(1))),
                reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
                options,
                loaded: RwLock::new(Arc::new(loaded)),
                sessions: Mutex::new(lru::LruCache::new(max)),
            }),
        })
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let s = &self.shared;
        let queue = format!("natster-catalog-{}", s.name);
        // An original Natster server subscribes to `get` and `download` only; v1-only mode does
        // the same, so v2 requests find no responder, exactly as against an original peer.
        let ops: &[&str] = if s.options.v1_only { &["get", "download"] } else { &["*"] };
        let mut subjects = Vec::new();
        for op in ops {
            subjects.push(format!("natster.catalog.{}.{op}", s.name));
            subjects.push(format!("*.natster.catalog.{}.{op}", s.name));
        }
        let mut subscriptions = Vec::new();
        for subject in subjects {
            let sub = s.nats.queue_subscribe(subject.clone(), queue.clone()).await.with_context(|| {
                format!("cannot subscribe to {subject}; check that your user may subscribe to natster.catalog.>")
            })?;
            subscriptions.push(sub);
        }
        // Make sure the server has our subscriptions before we say we are serving.
        s.nats.flush().await.context("NATS connection lost while subscribing")?;
        let revision = s.loaded().catalog.revision();
        tracing::info!(catalog = %s.name, %revision, entries = s.loaded().catalog.entries.len(), "serving");

        let mut requests = futures::stream::select_all(subscriptions);
        let mut tick = tokio::time::interval(s.options.heartbeat);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                msg = requests.next() => match msg {
                    Some(msg) => {
                        let shared = self.shared.clone();
                        tokio::spawn(async move { shared.handle(msg).await });
                    }
                    None => anyhow::bail!("NATS subscription closed; the connection was lost"),
                },
                _ = tick.tick() => self.shared.housekeeping().await,
            }
        }
        let _ = s.nats.flush().await;
        Ok(())
    }
}

/// Loads the catalog and resolves its root.
fn load(home: &Home, name: &str) -> Result<Loaded> {
    let catalog = Catalog::load(home, name)?;
    let file_identity = catalog_file_identity(home, name);
    let root = std::fs::canonicalize(&catalog.root_dir).with_context(|| {
        format!(
            "catalog '{name}' serves {}, which cannot be opened; restore it or re-create the catalog",
            catalog.root_dir
        )
    })?;
    let by_hash = catalog.entries.iter().enumerate().map(|(i, e)| (e.hash.clone(), i)).collect();
    let summary = catalog.summary();
    let entry_sizes = summary.entries.iter().map(|e| serde_json::to_vec(e).map(|v| v.len() + 1).unwrap_or(0)).collect();
    Ok(Loaded { catalog, summary, entry_sizes, by_hash, root, file_identity })
}

/// What changes whenever the catalog file is saved (saves are renames: the inode changes even
/// within one mtime tick).
fn catalog_file_identity(home: &Home, name: &str) -> Option<(SystemTime, u64, u64)> {
    let meta = std::fs::metadata(Catalog::file_path(home, name)).ok()?;
    Some((meta.modified().ok()?, meta.ino(), meta.len()))
}

#[derive(Serialize)]
struct Heartbeat<'a> {
    catalog: &'a str,
    revision: String,
    entries: usize,
}

impl Shared {
    fn loaded(&self) -> Arc<Loaded> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Picks up a re-index, drops idle sessions, and announces the revision.
    async fn housekeeping(&self) {
        let current = self.loaded();
        if catalog_file_identity(&self.home, &self.name) != current.file_identity {
            match load(&self.home, &self.name) {
                Ok(fresh) => {
                    tracing::info!(catalog = %self.name, revision = %fresh.catalog.revision(), "catalog re-indexed; serving the new listing");
                    *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
                }
                Err(e) => tracing::error!("{e:#}; still serving the previous listing"),
            }
        }
        let idle = self.options.session_idle;
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let stale: Vec<String> = sessions
                .iter()
                .filter(|(_, s)| s.last_used.lock().map(|t| t.elapsed() > idle).unwrap_or(true))
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                sessions.pop(&k);
            }
        }
        let loaded = self.loaded();
        let beat = Heartbeat {
            catalog: &self.name,
            revision: loaded.catalog.revision(),
            entries: loaded.catalog.entries.len(),
        };
        if let Ok(body) = serde_json::to_vec(&beat) {
            let _ = self.nats.publish(HEARTBEAT_SUBJECT, body.into()).await;
        }
    }

    async fn handle(self: Arc<Self>, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else {
            tracing::debug!(subject = %msg.subject, "request without reply subject ignored");
            return;
        };
        let Some((caller, op)) = protocol::parse_request_subject(&msg.subject, &self.name) else {
            let _ = self.nats.publish(reply, error_reply(400, "unknown operation or malformed subject").into()).await;
            return;
        };
        let result = match self.authorize(&caller) {
            Err(r) => Err(r),
            Ok(()) => match op {
                Operation::Get => self.get(&msg.payload),
                Operation::Open => self.open(&caller, &msg.payload),
                Operation::Read => self.read(&caller, &msg.payload, reply.clone()).await,
                Operation::Close => self.close(&caller, &msg.payload),
                Operation::Download => self.clone().download(&caller, &msg.payload),
            },
        };
        let body = match result {
            Ok(body) => body,
            Err(Refusal(code, message)) => {
                tracing::info!(caller = %caller, op = op.as_str(), code, "{message}");
                error_reply(code, &message)
            }
        };
        if !body.is_empty() {
            let len = body.len();
            if let Err(e) = self.nats.publish(reply, body.into()).await {
                tracing::warn!(op = op.as_str(), bytes = len, "reply not sent: {e}");
            }
        }
    }

    fn authorize(&self, caller: &Caller) -> Result<(), Refusal> {
        match caller {
            Caller::Owner => Ok(()),
            Caller::Account(_) if self.options.allow_all => Ok(()),
            Caller::Account(account) => {
                if self.shares.lock().unwrap_or_else(|p| p.into_inner()).allows(account) {
                    Ok(())
                } else {
                    Err(refuse(403, format!("catalog '{}' is not shared with account {account}", self.name)))
                }
            }
        }
    }

    /// The listing: whole for an empty request (the original's), else one page from `from`
    /// that fits in a NATS message.
    fn get(&self, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let loaded = self.loaded();
        let req: protocol::GetRequest =
            if payload.iter().all(|b| b.is_ascii_whitespace()) { Default::default() } else { parse(payload)? };
        // An original server ignores `from` and always sends the whole listing.
        let from = if self.options.v1_only { None } else { req.from };
        let Some(from) = from else {
            if self.options.v1_only {
                // As an original server: no `protocol` field, which readers take as v1.
                let mut original = serde_json::to_value(&loaded.summary).map_err(|_| refuse(500, "cannot encode"))?;
                if let Some(fields) = original.as_object_mut() {
                    fields.remove("protocol");
                    fields.remove("revision");
                }
                return Ok(Envelope::ok(original));
            }
            return Ok(Envelope::ok(&loaded.summary));
        };
        let total = loaded.summary.entries.len();
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(total);
        let max_payload = self.nats.server_info().max_payload.max(64 * 1024);
        let budget = max_payload - max_payload / 8 - loaded.summary.description.len().min(max_payload / 4);
        let mut end = start;
        let mut used = 0;
        while end < total && (end == start || used + loaded.entry_sizes[end] <= budget) {
            used += loaded.entry_sizes[end];
            end += 1;
        }
        let whole = &loaded.summary;
        let page = protocol::CatalogSummary {
            name: whole.name.clone(),
            description: whole.description.clone(),
            image: whole.image.clone(),
            entries: whole.entries[start..end].to_vec(),
            revision: whole.revision.clone(),
            protocol: whole.protocol,
            total_entries: Some(total as u64),
        };
        Ok(Envelope::ok(page))
    }

    /// Opens an indexed file by hash, inside the root, still matching the index.
    fn open_indexed(&self, hash: &str) -> Result<(IndexEntry, File, FileIdentity), Refusal> {
        if !protocol::is_sha256_hex(hash) {
            return Err(refuse(400, "hash must be 64 lowercase hex characters (sha256)"));
        }
        let loaded = self.loaded();
        let entry = loaded
            .entry(hash)
            .ok_or_else(|| refuse(404, format!("no file with hash {hash} in catalog '{}'", self.name)))?
            .clone();
        let file = open_beneath(&loaded.root, &entry.path).map_err(|e| {
            tracing::warn!(path = %entry.path, "refusing to serve: {e:#}");
            refuse(404, format!("file {hash} is indexed but cannot be served; the owner should re-index"))
        })?;
        let identity = file.metadata().map(|m| FileIdentity::of(&m)).map_err(|_| refuse(500, "cannot stat file"))?;
        let indexed = FileIdentity { size: entry.byte_size, mtime_ns: entry.mtime_ns };
        if identity != indexed {
            tracing::warn!(path = %entry.path, "file changed since it was indexed; refusing it until `catalog new` re-indexes");
            return Err(refuse(
                409,
                format!("file {hash} changed since it was indexed; ask the owner to re-index the catalog"),
            ));
        }
        Ok((entry, file, identity))
    }

    fn open(&self, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let req: OpenRequest = parse(payload)?;
        let (entry, file, indexed) = self.open_indexed(&req.hash)?;
        let session = crypto::new_session_id();
        let ephemeral = EphemeralKey::generate();
        let binding = SessionBinding {
            session: &session,
            catalog: &self.name,
            hash: &entry.hash,
            client_xkey: &req.client_xkey,
            server_xkey: ephemeral.public_xkey(),
        };
        let key = ephemeral.agree(&req.client_xkey, &binding).map_err(|e| refuse(400, format!("client_xkey: {e}")))?;
        let reply = OpenResponse {
            session: session.clone(),
            server_xkey: ephemeral.public_xkey().to_string(),
            byte_size: entry.byte_size,
            chunk_size: self.options.chunk_size,
        };
        let state = Session {
            caller: caller.clone(),
            hash: entry.hash,
            byte_size: entry.byte_size,
            file: Arc::new(file),
            indexed,
            key: Arc::new(key),
            last_used: Mutex::new(Instant::now()),
        };
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).put(session, Arc::new(state));
        Ok(Envelope::ok(reply))
    }

    fn session(&self, caller: &Caller, id: &str) -> Result<Arc<Session>, Refusal> {
        let gone = || refuse(404, "unknown or expired session; open the file again");
        if !protocol::is_session_id(id) {
            return Err(refuse(400, "session must be 32 lowercase hex characters"));
        }
        let session = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().ok_or_else(gone)?;
        // Another account naming this session learns nothing: same answer as a missing one.
        if &session.caller != caller {
            return Err(gone());
        }
        if let Ok(mut t) = session.last_used.lock() {
            *t = Instant::now();
        }
        Ok(session)
    }

    async fn read(&self, caller: &Caller, payload: &[u8], reply: async_nats::Subject) -> Result<Vec<u8>, Refusal> {
        let req: ReadRequest = parse(payload)?;
        let session = self.session(caller, &req.session)?;
        let chunk_size = u64::from(self.options.chunk_size);
        let total = protocol::chunk_count(session.byte_size, chunk_size);
        if req.count == 0 || req.count > protocol::MAX_CHUNKS_PER_READ {
            return Err(refuse(400, format!("count must be 1..={}", protocol::MAX_CHUNKS_PER_READ)));
        }
        if req.first_chunk >= total {
            return Err(refuse(
                416,
                format!("first_chunk {} is past the last chunk ({total} chunks)", req.first_chunk),
            ));
        }
        let count = (total - req.first_chunk).min(u64::from(req.count)) as u32;
        let now = session.file.metadata().map(|m| FileIdentity::of(&m)).map_err(|_| refuse(500, "cannot stat file"))?;
        if now != session.indexed {
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).pop(&req.session);
            return Err(refuse(
                409,
                format!("file {} changed since it was indexed; ask the owner to re-index", session.hash),
            ));
        }
        let Ok(_permit) = self.reads.clone().acquire_owned().await else {
            return Err(refuse(503, "server is shutting down"));
        };
        // Acknowledge first, so the reader knows chunks are coming, then stream them.
        let ack = Envelope::ok(ReadResponse { first_chunk: req.first_chunk, count });
        let _ = self.nats.publish(reply, ack.into()).await;

        let subject = protocol::media_subject(caller, &self.name, &req.session);
        let first = req.first_chunk;
        // Read and seal on the blocking pool, two chunks ahead of the publisher.
        let mut sealed = futures::stream::iter(first..first + u64::from(count))
            .map(|index| {
                let session = session.clone();
                tokio::task::spawn_blocking(move || seal_chunk(&session, index, chunk_size))
            })
            .buffered(2);
        while let Some(done) = sealed.next().await {
            match done {
                Ok(Ok((index, body))) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(protocol::HEADER_CHUNK_INDEX, index.to_string().as_str());
                    if self.nats.publish_with_headers(subject.clone(), headers, body).await.is_err() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!("read of {} failed: {e}", session.hash);
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(Vec::new())
    }

    fn close(&self, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let req: CloseRequest = parse(payload)?;
        self.session(caller, &req.session)?;
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).pop(&req.session);
        Ok(Envelope::ok(()))
    }

    /// v1: the whole file in 4096-byte chunks sealed with the original's xkey box.
    fn download(self: Arc<Self>, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let req: DownloadRequest = parse(payload)?;
        let target = nkeys::XKey::from_public_key(&req.target_xkey)
            .map_err(|_| refuse(400, "target_xkey is not a valid xkey public key"))?;
        let (entry, file, _) = self.open_indexed(&req.hash)?;
        let permit = self
            .v1_transfers
            .clone()
            .try_acquire_owned()
            .map_err(|_| refuse(503, "too many v1 downloads in progress; try again shortly"))?;
        let sender = nkeys::XKey::new();
        let total_chunks = protocol::chunk_count(entry.byte_size, protocol::V1_CHUNK_SIZE as u64);
        let reply = DownloadResponse {
            acknowledged: true,
            chunk_size: protocol::V1_CHUNK_SIZE as u64,
            total_chunks,
            sender_xkey: sender.public_key(),
            total_bytes: entry.byte_size,
        };
        let subject = protocol::media_subject(caller, &self.name, &entry.hash);
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            this.transmit_v1(file, entry, sender, target, subject, total_chunks).await;
        });
        Ok(Envelope::ok(reply))
    }

    async fn transmit_v1(
        &self,
        file: File,
        entry: IndexEntry,
        sender: nkeys::XKey,
        target: nkeys::XKey,
        subject: String,
        total_chunks: u64,
    ) {
        let mut buf = vec![0u8; protocol::V1_CHUNK_SIZE];
        for index in 0..total_chunks {
            let offset = index * protocol::V1_CHUNK_SIZE as u64;
            let len = protocol::chunk_len(entry.byte_size, protocol::V1_CHUNK_SIZE as u64, index) as usize;
            if let Err(e) = file.read_exact_at(&mut buf[..len], offset) {
                tracing::warn!(path = %entry.path, "v1 download stopped: {e}");
                return;
            }
            let Ok(sealed) = sender.seal(&buf[..len], &target) else { return };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(protocol::HEADER_CHUNK_INDEX, index.to_string().as_str());
            headers.insert(protocol::HEADER_SENDER_XKEY, sender.public_key().as_str());
            headers.insert(protocol::HEADER_TOTAL_CHUNKS, total_chunks.to_string().as_str());
            if self.nats.publish_with_headers(subject.clone(), headers, sealed.into()).await.is_err() {
                return;
            }
            // v1 has no flow control; flushing now and then keeps us from racing far ahead.
            if index % 256 == 255 {
                let _ = self.nats.flush().await;
            }
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(payload).map_err(|e| refuse(400, format!("malformed request: {e}")))
}

fn seal_chunk(session: &Session, index: u64, chunk_size: u64) -> std::io::Result<(u64, Bytes)> {
    let len = protocol::chunk_len(session.byte_size, chunk_size, index) as usize;
    let mut buf = Vec::with_capacity(crypto::NONCE_LEN + len + crypto::TAG_LEN);
    buf.resize(crypto::NONCE_LEN + len, 0);
    session.file.read_exact_at(&mut buf[crypto::NONCE_LEN..], index * chunk_size)?;
    session.key.seal_in_place(index, &mut buf);
    Ok((index, Bytes::from(buf)))
}

/// Opens `rel` (a catalog path) for reading only if it resolves to a regular file inside
/// `root`. Checked twice: before opening (no `..`, canonical path under the root) and after,
/// on the open descriptor itself, so a symlink swapped in between cannot escape.
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
