//! Catalog server: answers `natster.catalog.<name>.<op>` (the owner's own account) and
//! `<ACCOUNT>.natster.catalog.<name>.<op>` (other accounts, through their imports), and
//! publishes encrypted chunks on the media subjects.
//!
//! Layout: this module holds the public face, dispatch, the listing and housekeeping;
//! [`v1`] the original's whole-file `download` (queued, bounded), [`v2`] ranged-read sessions,
//! [`files`] file access beneath the root and the identity checks, [`trees`] the chunk trees
//! v2 sessions prove chunks with, [`service`] the NATS micro service it registers as.
//!
//! Invariants:
//! - Every request is handled on its own task, so one slow reader does not stall the others;
//!   the accept loop does nothing but dispatch.
//! - No file I/O on async workers: opens, stats, reads and hashing run on the blocking pool.
//!   Housekeeping (catalog re-load, session expiry, heartbeat) runs in a task of its own.
//! - Files are served only by hash, only when indexed, only from inside the root, and only
//!   while they still match the index (size and mtime, or for entries without an mtime, a
//!   one-time sha256 check), and every v2 chunk's leaves match the indexed tree: a changed
//!   file is refused, never served under a stale hash. Files without a tree in the index are
//!   refused to v2 readers (a tree computed now would vouch for whatever is on disk now).
//! - Stopping never waits on the network for more than a moment: the last flush is bounded,
//!   so a dead NATS connection cannot hold up exit. While NATS is down the client reconnects
//!   by itself and re-subscribes; requests resume when it is back.

mod cached;
mod files;
pub mod heartbeat;
mod service;
pub use service::SERVICE_NAME;
mod trees;
mod v1;
mod v2;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::context::Home;
use crate::identity::{Identity, PinStore, Purpose};
use crate::index::{Catalog, IndexEntry};
use crate::protocol::{self, error_reply, Caller, Envelope, Operation};
use crate::shares::LiveShareList;
use sha2::Digest as _;

pub use files::open_beneath;
use files::{Checked, FileIdentity, Verifier};

/// Subject the server announces its catalog's revision on, for mounts of the same account.
pub const HEARTBEAT_SUBJECT: &str = crate::global::wire::LOCAL_HEARTBEAT;

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
    /// How often the catalog file is checked for a re-index (a re-index is announced at once).
    pub heartbeat: Duration,
    /// How often a heartbeat says the catalog is online (the original's 30 s).
    pub heartbeat_interval: Duration,
    /// Most v1 whole-file transfers streaming at once.
    pub max_v1_transfers: usize,
    /// Most v1 downloads waiting for their turn; past it a download is refused (503).
    pub max_v1_waiting: usize,
    /// Answer only what an original Natster server answers (`get`, v1 `download`).
    pub v1_only: bool,
    /// Also answer original Natster readers' v1 `download`. Off by default: v1 seals a whole
    /// file to whatever key the request names, and a v1 request carries no signature, so
    /// anyone able to send requests in a reader's name (a NATS server in between) could read
    /// media that v2 keeps from it.
    pub v1_readers: bool,
    /// Signs `get` and `open` replies; a fresh key (no JWT) if none is given.
    pub identity: Option<Arc<Identity>>,
}

pub const DEFAULT_CHUNK_SIZE: u32 = 512 * 1024;

/// A chunk size a server can use: a multiple of the chunk tree's leaf, up to what fits a NATS
/// message. Checked when a command starts, before anything else, and by every server.
pub fn check_chunk_size(chunk_size: u32) -> Result<()> {
    // The rule a reader's `unit` is held to as well.
    if protocol::valid_unit(chunk_size, MAX_CHUNK_SIZE) {
        return Ok(());
    }
    let leaf = crate::chunk_tree::LEAF_SIZE;
    let range =
        format!("use a multiple of {leaf} in {}..={MAX_CHUNK_SIZE} bytes (e.g. 512K)", protocol::MIN_CHUNK_SIZE);
    if (protocol::MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        anyhow::bail!("chunk size {chunk_size} is not a multiple of {leaf}; {range}");
    }
    anyhow::bail!("chunk size {chunk_size} is out of range; {range}")
}
/// Reads streamed at once (each holds at most two sealed chunks).
const MAX_CONCURRENT_READS: usize = 64;
/// Stamps `key` now in a map of callers bounded by [`MAX_READERS_KEPT`]: when it is full,
/// entries older than [`READER_WINDOW`] go first, and a new caller past the bound is not kept.
fn remember_caller(map: &mut HashMap<String, std::time::Instant>, key: String) {
    if map.len() >= MAX_READERS_KEPT {
        map.retain(|_, at| at.elapsed() < READER_WINDOW);
    }
    if map.len() < MAX_READERS_KEPT || map.contains_key(&key) {
        map.insert(key, std::time::Instant::now());
    }
}

/// Requests handled at once, of every kind: a flood (even of refused ones, from an account the
/// catalog is not shared with) costs a bounded number of tasks and blocking-pool jobs.
const MAX_REQUESTS_IN_FLIGHT: usize = 512;
/// NATS' default max_payload is 1 MiB; a chunk plus its proof (≤ 128 hashes, 4 KiB), nonce,
/// tag and headers must fit. A multiple of the chunk tree's leaf.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024 - 16 * 1024;
/// Bound on the last flush when stopping: replies in flight get this long to leave.
const STOP_FLUSH: Duration = Duration::from_millis(500);

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_sessions: 512,
            session_idle: Duration::from_secs(600),
            allow_all: false,
            heartbeat: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(30),
            max_v1_transfers: 4,
            max_v1_waiting: 64,
            v1_only: false,
            v1_readers: false,
            identity: None,
        }
    }
}

/// The catalog as the server holds it: the index plus a hash lookup and the real root.
struct Loaded {
    catalog: Catalog,
    /// The `get` reply, built once per load; pages are slices of its entries.
    summary: protocol::CatalogSummary,
    /// The whole-listing reply of a v1-only server (unsigned, as an original's), serialized once.
    whole: Bytes,
    /// The whole listing's `data` as signed replies carry it, and its sha256.
    whole_data: Bytes,
    whole_digest: [u8; 32],
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

    /// Entries that carry no mtime (written by the original Natster): verified by hashing.
    fn unverified(&self) -> impl Iterator<Item = &IndexEntry> {
        self.catalog.entries.iter().filter(|e| e.mtime_ns == 0)
    }
}

struct Shared {
    nats: async_nats::Client,
    home: Home,
    name: String,
    options: ServerOptions,
    loaded: RwLock<Arc<Loaded>>,
    shares: Mutex<LiveShareList>,
    sessions: Mutex<lru::LruCache<String, Arc<v2::Session>>>,
    v1: v1::Queue,
    /// Reads streaming at once; more wait their turn, so memory stays bounded however many
    /// requests arrive.
    reads: Arc<Semaphore>,
    verifier: Verifier,
    /// Chunk trees of the files sessions read, and files found not to match theirs.
    trees: trees::Trees,
    /// The key replies are signed with (the serving user's, from its creds).
    identity: Arc<Identity>,
    /// Operators a reader's signing-key chain may end at.
    pins: Arc<PinStore>,
    /// True once the subscriptions are in place (see [`ServerHandle::serving`]).
    serving: tokio::sync::watch::Sender<bool>,
    /// Callers answered recently, for `status` (bounded: see [`Shared::note_reader`]).
    readers: Mutex<HashMap<String, std::time::Instant>>,
    /// When each caller's last refusal was logged (bounded like `readers`).
    refusals_logged: Mutex<HashMap<String, std::time::Instant>>,
    /// What `$SRV.STATS` shows beside the service library's own counts.
    counters: Arc<service::Counters>,
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
    /// Loads the catalog (blocking: call it before serving, not from a request path).
    pub fn new(nats: async_nats::Client, home: Home, name: &str, options: ServerOptions) -> Result<Self> {
        check_chunk_size(options.chunk_size)?;
        let loaded = load(&home, name, options.v1_only)?;
        let max = std::num::NonZeroUsize::new(options.max_sessions.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        if options.allow_all {
            tracing::warn!(
                catalog = name,
                "--allow-all: EVERY account that imports this catalog can read it, share list ignored"
            );
        }
        let identity = options.identity.clone().unwrap_or_else(|| Arc::new(Identity::ephemeral()));
        let pins = PinStore::in_home(&home);
        pins.trust_own_operator(&identity);
        Ok(CatalogServer {
            shared: Arc::new(Shared {
                shares: Mutex::new(LiveShareList::new(home.clone(), name)),
                nats,
                home,
                name: name.to_string(),
                v1: v1::Queue::new(options.max_v1_transfers, options.max_v1_waiting),
                reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
                identity,
                pins,
                options,
                loaded: RwLock::new(Arc::new(loaded)),
                sessions: Mutex::new(lru::LruCache::new(max)),
                verifier: Verifier::default(),
                trees: trees::Trees::default(),
                serving: tokio::sync::watch::channel(false).0,
                readers: Mutex::new(HashMap::new()),
                refusals_logged: Mutex::new(HashMap::new()),
                counters: Arc::default(),
            }),
        })
    }

    /// Serves until `shutdown` resolves; returns within about half a second of it, whether or
    /// not NATS is reachable.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let s = &self.shared;
        tokio::pin!(shutdown);
        let revision = s.loaded().catalog.revision();
        let description = service::Description {
            catalog: &s.name,
            revision: &revision,
            protocol: if s.options.v1_only { 1 } else { protocol::PROTOCOL_VERSION },
            v1_only: s.options.v1_only,
        };
        let service::Registered { service, mut requests } = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            registered = service::register(&s.nats, description, s.counters.clone()) => registered?,
        };
        // Make sure the server has our subscriptions before we say we are serving (bounded by
        // the stop signal: a flush waits for a connection that may be down).
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            flushed = s.nats.flush() => flushed.context("NATS connection lost while subscribing")?,
        }
        tracing::info!(catalog = %s.name, %revision, entries = s.loaded().catalog.entries.len(), "serving");
        let without_tree = s.loaded().catalog.entries.iter().filter(|e| e.tree.is_none()).count();
        if without_tree > 0 {
            tracing::warn!(catalog = %s.name, files = without_tree,
                "files without a chunk tree (indexed by the original Natster or before protocol 4): mounts are refused \
                 them until you re-index with `natster-mount catalog new`");
        }
        s.serving.send_replace(true);

        let housekeeping = tokio::spawn(self.shared.clone().housekeeping());
        let verification = tokio::spawn(self.shared.clone().verify_unverified(s.loaded()));
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
        let outcome = loop {
            // Past the bound, requests wait in the subscription (NATS drops what overflows
            // it, as for any slow consumer) instead of each becoming a task here.
            let permit = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                permit = in_flight.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break Ok(()),
                },
            };
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                next = requests.next() => match next {
                    Some((op, request)) => {
                        let shared = self.shared.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            shared.handle(op, request).await
                        });
                    }
                    // async-nats re-subscribes after every reconnect; the stream ends only
                    // when the client itself is closed, which nothing here can repair.
                    None => break Err(anyhow::anyhow!(
                        "the NATS connection was closed; restart `catalog serve` once NATS is reachable"
                    )),
                },
            }
        };
        s.serving.send_replace(false);
        drop(requests);
        if tokio::time::timeout(STOP_FLUSH, service.stop()).await.is_err() {
            tracing::debug!("NATS unreachable while unregistering the service");
        }
        housekeeping.abort();
        verification.abort();
        let beat = heartbeat::heartbeat(&s.loaded().catalog, s.identity.account().unwrap_or_default());
        heartbeat::announce(&s.nats, &beat, false, STOP_FLUSH).await;
        s.verifier.cancel();
        // A flush waits for a reconnect that may never come: only when connected, and bounded.
        let connected = s.nats.connection_state() == async_nats::connection::State::Connected;
        if !connected || tokio::time::timeout(STOP_FLUSH, s.nats.flush()).await.is_err() {
            tracing::warn!("NATS unreachable while stopping; whatever was not sent yet is dropped");
        }
        outcome
    }
}

impl CatalogServer {
    /// A handle for whoever drives this server (a folder watcher, `status`).
    pub fn handle(&self) -> ServerHandle {
        ServerHandle(self.shared.clone())
    }
}

/// How long a caller counts as a reader in [`ServerHandle::readers_last_minute`].
const READER_WINDOW: Duration = Duration::from_secs(60);
/// Callers remembered at most; past it, those older than the window are forgotten.
const MAX_READERS_KEPT: usize = 4096;

/// A running server, as its driver sees it.
#[derive(Clone)]
pub struct ServerHandle(Arc<Shared>);

impl ServerHandle {
    /// Picks up a re-indexed catalog file now rather than at the next heartbeat. True if the
    /// listing served changed.
    pub async fn reload(&self) -> bool {
        let this = self.0.clone();
        let fresh = tokio::task::spawn_blocking(move || this.reload_if_changed()).await.ok().flatten();
        match fresh {
            Some(fresh) => {
                tokio::spawn(self.0.clone().verify_unverified(fresh));
                true
            }
            None => false,
        }
    }

    /// Revision of the listing being served.
    pub fn revision(&self) -> String {
        self.0.loaded().catalog.revision()
    }

    /// Files in the listing being served.
    pub fn entries(&self) -> usize {
        self.0.loaded().catalog.entries.len()
    }

    /// The catalog's folder, resolved.
    pub fn root(&self) -> PathBuf {
        self.0.loaded().root.clone()
    }

    /// True while the server's subscriptions are in place (from its first flush to its stop).
    pub fn serving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.serving.subscribe()
    }

    /// Accounts (and the owner) answered in the last minute.
    pub fn readers_last_minute(&self) -> usize {
        let readers = self.0.readers.lock().unwrap_or_else(|p| p.into_inner());
        readers.values().filter(|seen| seen.elapsed() < READER_WINDOW).count()
    }
}

/// Loads the catalog and resolves its root (blocking). `v1_only`: the whole-listing reply is
/// the original's.
fn load(home: &Home, name: &str, v1_only: bool) -> Result<Loaded> {
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
    let whole_data = Bytes::from(serde_json::to_vec(&summary).context("cannot encode the listing")?);
    let whole_digest: [u8; 32] = sha2::Sha256::digest(&whole_data).into();
    let whole = if v1_only {
        // As an original server: no `protocol` field (which readers take as v1), no revision.
        let mut original = serde_json::to_value(&summary).context("cannot encode the listing")?;
        if let Some(fields) = original.as_object_mut() {
            fields.remove("protocol");
            fields.remove("revision");
        }
        Bytes::from(Envelope::ok(original))
    } else {
        Bytes::new()
    };
    Ok(Loaded { catalog, summary, whole, whole_data, whole_digest, entry_sizes, by_hash, root, file_identity })
}

/// What changes whenever the catalog file is saved (saves are renames: the inode changes even
/// within one mtime tick).
fn catalog_file_identity(home: &Home, name: &str) -> Option<(SystemTime, u64, u64)> {
    let meta = std::fs::metadata(Catalog::file_path(home, name)).ok()?;
    Some((meta.modified().ok()?, meta.ino(), meta.len()))
}

impl Shared {
    fn loaded(&self) -> Arc<Loaded> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every `heartbeat`: picks up a re-index, drops idle sessions; announces the revision at
    /// start, after a re-index and every `heartbeat_interval`. A task of its own, so a slow
    /// re-load or a publish waiting for a reconnect never delays request dispatch.
    async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.options.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            let this = self.clone();
            let reloaded = tokio::task::spawn_blocking(move || this.reload_if_changed()).await.ok().flatten();
            let changed = reloaded.is_some();
            if let Some(fresh) = reloaded {
                tokio::spawn(self.clone().verify_unverified(fresh));
            }
            self.expire_sessions();
            if changed || last_beat.is_none_or(|t| t.elapsed() >= self.options.heartbeat_interval) {
                last_beat = Some(tokio::time::Instant::now());
                let beat = heartbeat::heartbeat(&self.loaded().catalog, self.identity.account().unwrap_or_default());
                heartbeat::announce(&self.nats, &beat, true, self.options.heartbeat).await;
            }
        }
    }

    /// Re-loads the catalog when its file changed (blocking); returns the new listing.
    fn reload_if_changed(&self) -> Option<Arc<Loaded>> {
        let current = self.loaded();
        if catalog_file_identity(&self.home, &self.name) == current.file_identity {
            return None;
        }
        match load(&self.home, &self.name, self.options.v1_only) {
            Ok(fresh) => {
                tracing::info!(catalog = %self.name, revision = %fresh.catalog.revision(), "catalog re-indexed; serving the new listing");
                self.verifier.retain(&fresh.catalog.entries);
                self.trees.retain(&fresh.catalog.entries);
                self.retain_sessions(&fresh.catalog.entries);
                let fresh = Arc::new(fresh);
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                Some(fresh)
            }
            Err(e) => {
                tracing::error!("{e:#}; still serving the previous listing");
                None
            }
        }
    }

    /// Hashes, one file at a time, every entry of `loaded` that carries no mtime, so that
    /// opens find a verdict waiting. Stops early when a newer listing replaces this one.
    async fn verify_unverified(self: Arc<Self>, loaded: Arc<Loaded>) {
        let pending: Vec<IndexEntry> = loaded.unverified().cloned().collect();
        if pending.is_empty() {
            return;
        }
        tracing::info!(
            catalog = %self.name,
            files = pending.len(),
            "index has no modification times (written by the original Natster); verifying each file's sha256 once"
        );
        let (mut good, mut bad) = (0usize, 0usize);
        for entry in &pending {
            if !Arc::ptr_eq(&self.loaded(), &loaded) {
                return;
            }
            match self.check_content(&loaded, entry).await {
                Ok(_) => good += 1,
                // check_content logged why.
                Err(_) => bad += 1,
            }
        }
        tracing::info!(catalog = %self.name, verified = good, refused = bad, "verification pass done");
    }

    /// Opens `entry` and checks it still holds what was indexed.
    async fn check_content(
        &self,
        loaded: &Loaded,
        entry: &IndexEntry,
    ) -> Result<(Arc<std::fs::File>, FileIdentity), Refusal> {
        let hash = &entry.hash;
        let (file, identity) = files::open_entry(loaded.root.clone(), entry).await.map_err(|e| {
            tracing::warn!(path = %entry.path, "refusing to serve: {e:#}");
            refuse(404, format!("file {hash} is indexed but cannot be served; the owner should re-index"))
        })?;
        let changed =
            || refuse(409, format!("file {hash} changed since it was indexed; ask the owner to re-index the catalog"));
        if entry.mtime_ns != 0 {
            let indexed = FileIdentity { size: entry.byte_size, mtime_ns: entry.mtime_ns };
            if identity != indexed {
                tracing::warn!(path = %entry.path, "file changed since it was indexed; refusing it until `catalog new` re-indexes");
                return Err(changed());
            }
            return Ok((Arc::new(file), identity));
        }
        let file = Arc::new(file);
        match self.verifier.check(entry, file.clone(), identity).await {
            Checked::Matches => {}
            Checked::Differs => {
                tracing::warn!(path = %entry.path, "file does not match its indexed sha256; refusing it until `catalog new` re-indexes");
                return Err(changed());
            }
            Checked::Changing => return Err(changed()),
            Checked::Failed(e) => {
                tracing::warn!(path = %entry.path, "cannot verify: {e}");
                return Err(refuse(500, format!("file {hash} cannot be read; try again later")));
            }
        }
        Ok((file, identity))
    }

    /// Opens an indexed file by hash, inside the root, still matching the index.
    async fn open_indexed(&self, hash: &str) -> Result<(IndexEntry, Arc<std::fs::File>, FileIdentity), Refusal> {
        if !protocol::is_sha256_hex(hash) {
            return Err(refuse(400, "hash must be 64 lowercase hex characters (sha256)"));
        }
        let loaded = self.loaded();
        let entry = loaded
            .entry(hash)
            .ok_or_else(|| refuse(404, format!("no file with hash {hash} in catalog '{}'", self.name)))?
            .clone();
        let (file, identity) = self.check_content(&loaded, &entry).await?;
        Ok((entry, file, identity))
    }

    async fn handle(self: Arc<Self>, op: Operation, request: async_nats::service::Request) {
        let msg = &request.message;
        let Some(reply) = msg.reply.clone() else {
            tracing::debug!(subject = %msg.subject, "request without reply subject ignored");
            return;
        };
        let caller = match protocol::parse_request_subject(&msg.subject, &self.name) {
            Some((caller, parsed)) if parsed == op => caller,
            _ => {
                self.counters.refused(op);
                let _ = request.respond(Ok(error_reply(400, "malformed subject").into())).await;
                return;
            }
        };
        let result = match self.authorize(&caller).await {
            Err(r) => Err(r),
            Ok(()) => {
                self.note_reader(&caller);
                match op {
                    Operation::Get => self.get(&msg.payload),
                    Operation::Open => self.open(&caller, &msg.payload).await.map(Bytes::from),
                    Operation::Read => self.read(&caller, &msg.payload, reply.clone()).await.map(Bytes::from),
                    Operation::Close => self.close(&caller, &msg.payload).map(Bytes::from),
                    Operation::Download if !(self.options.v1_only || self.options.v1_readers) => Err(refuse(
                        403,
                        format!(
                            "catalog '{}' is served to natster-mount readers only (v2); its owner serves original \
                             Natster readers too with `natster-mount catalog serve {} --v1`",
                            self.name, self.name
                        ),
                    )),
                    Operation::Download => self.download(&caller, &msg.payload, reply.clone()).await.map(Bytes::from),
                }
            }
        };
        let body = match result {
            Ok(body) => body,
            Err(Refusal(code, message)) => {
                if self.first_refusal_in_a_while(&caller) {
                    tracing::info!(caller = %caller, op = op.as_str(), code, "{message} (more from this caller within a minute are logged at debug)");
                } else {
                    tracing::debug!(caller = %caller, op = op.as_str(), code, "{message}");
                }
                self.counters.refused(op);
                error_reply(code, &message).into()
            }
        };
        if body.is_empty() {
            // Answered on the reply subject by the operation itself (chunks).
            self.counters.streamed(op);
            return;
        }
        let len = body.len();
        if let Err(e) = request.respond(Ok(body)).await {
            tracing::warn!(op = op.as_str(), bytes = len, "reply not sent: {e}");
        }
    }

    /// True at most once per [`READER_WINDOW`] per caller: a flood of refused requests logs
    /// one line a minute, not one each.
    fn first_refusal_in_a_while(&self, caller: &Caller) -> bool {
        let mut logged = self.refusals_logged.lock().unwrap_or_else(|p| p.into_inner());
        let key = caller.to_string();
        let due = logged.get(&key).is_none_or(|at| at.elapsed() >= READER_WINDOW);
        if due {
            remember_caller(&mut logged, key);
        }
        due
    }

    /// Remembers that `caller` was answered, for [`ServerHandle::readers_last_minute`].
    fn note_reader(&self, caller: &Caller) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        remember_caller(&mut readers, caller.to_string());
    }

    async fn authorize(self: &Arc<Self>, caller: &Caller) -> Result<(), Refusal> {
        match caller {
            Caller::Owner => Ok(()),
            Caller::Account(_) if self.options.allow_all => Ok(()),
            Caller::Account(account) => {
                // The live share list stats its file on every check: off the async workers.
                let (this, who) = (self.clone(), account.clone());
                let allowed = tokio::task::spawn_blocking(move || {
                    this.shares.lock().unwrap_or_else(|p| p.into_inner()).allows(&who)
                })
                .await
                .unwrap_or(false);
                if allowed {
                    Ok(())
                } else {
                    Err(refuse(403, format!("catalog '{}' is not shared with account {account}", self.name)))
                }
            }
        }
    }

    /// The listing: whole for an empty request (the original's), else one page from `from`
    /// that fits in a NATS message.
    fn get(&self, payload: &[u8]) -> Result<Bytes, Refusal> {
        let loaded = self.loaded();
        let req: protocol::GetRequest =
            if payload.iter().all(|b| b.is_ascii_whitespace()) { Default::default() } else { parse(payload)? };
        // An original server ignores `from` and always sends the whole listing, unsigned.
        if self.options.v1_only {
            return Ok(loaded.whole.clone());
        }
        let nonce = req.nonce.unwrap_or_default();
        if nonce.len() > 128 {
            return Err(refuse(400, "nonce is longer than 128 characters"));
        }
        let Some(from) = req.from else {
            return Ok(self
                .signed_reply(Purpose::Listing, &[nonce.as_bytes()], &loaded.whole_data, loaded.whole_digest)
                .into());
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
        let data = serde_json::to_vec(&page).map_err(|_| refuse(500, "cannot encode the listing"))?;
        let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
        Ok(self.signed_reply(Purpose::Listing, &[nonce.as_bytes()], &data, digest).into())
    }

    /// A success reply carrying `data`, signed for `purpose` over the catalog's name, `parts`
    /// and `digest` (the sha256 of `data`).
    fn signed_reply(&self, purpose: Purpose, parts: &[&[u8]], data: &[u8], digest: [u8; 32]) -> Vec<u8> {
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 2);
        all.push(self.name.as_bytes());
        all.extend_from_slice(parts);
        all.push(&digest);
        protocol::signed_ok(data, &self.identity.prove(purpose, &all))
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(payload).map_err(|e| refuse(400, format!("malformed request: {e}")))
}
