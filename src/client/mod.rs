//! Catalog client: list a catalog, open a file session, read chunk ranges, verify and decrypt.
//!
//! - `listing`: `get`, paged and validated.
//! - `session`: v2 ranged reads (`open`, `read`, `close`) with flow control.
//! - `v1`: the original's whole-file `download`, to read original peers.
//! - `download`: `catalog download` to a file, verified before it appears.
//!
//! Requests and media travel on the subjects of the catalog's [`protocol::Route`]: `natster.catalog.<C>.*`
//! for own catalogs and per-catalog imports, `natster.from.<owner>.catalog.<C>.*` through the
//! owner's per-owner imports (so two owners' catalogs of one name are two clients apart).
//! One NATS subscription per catalog (the route's media wildcard) receives every chunk; a
//! dispatcher routes each to the file session (or v1 download) named by the subject's last
//! token. Every request is bounded by `request_timeout`; a read re-requests chunks that do not
//! arrive within `chunk_timeout`, reopens a session the server forgot, and gives up after
//! `retries` rounds without progress: it never waits forever.
//!
//! Invariants: which protocol a catalog speaks comes only from its listing (`protocol`), never
//! from an outage (`no responders` is [`ClientError::NoResponders`], a transient error like a
//! timeout); every error says whether a retry may help ([`ClientError::is_transient`]).

mod download;
mod listing;
mod session;
mod v1;

pub use download::{download_to_file, Verified};
pub use listing::{MAX_ENTRIES, MAX_LISTING_BYTES};
pub use session::RemoteFile;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::crypto::{CryptoError, SessionKey};
use crate::identity::{Identity, IdentityError, PinStore, Proof, Purpose, Trust};
use crate::protocol::{self, Envelope, Operation};
use session::FileShared;

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
        "the catalog's server sent transcoded bytes for {0}, not the listed file (an original Natster server does \
         this for mp4 files not tagged as fragmented); they cannot be verified, so nothing was kept"
    )]
    Transcoded(String),
    #[error("invalid reply from catalog server: {0}")]
    Protocol(String),
    #[error("catalog '{0}': {1}")]
    Untrusted(String, IdentityError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("NATS error: {0}")]
    Nats(String),
    #[error("downloaded bytes do not match the catalog's sha256 {0}; nothing was kept")]
    HashMismatch(String),
    #[error("chunk {index} of file {hash} failed the check against the catalog's signed chunk tree ({why}); nothing of it was used")]
    ChunkTree { hash: String, index: u64, why: crate::chunk_tree::TreeError },
    #[error("file {0} has no chunk tree in the catalog's signed listing, so its chunks cannot be checked; ask the owner to re-index the catalog")]
    NoTree(String),
    #[error("the catalog's listing has no file with hash {0}")]
    NotListed(String),
    #[error("{0}")]
    Io(String),
}

impl ClientError {
    /// True when the server said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Refused { code: 404, .. } | ClientError::NotListed(_))
    }

    /// True when the same request may succeed later: the server is down, restarting, busy or
    /// unreachable, or the connection is being re-established. Refusals, malformed replies and
    /// failed checks are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout(_)
                | ClientError::NoResponders(_)
                | ClientError::Nats(_)
                | ClientError::Refused { code: 503, .. }
        )
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// A chunk as it arrived, before decryption.
struct Delivery {
    /// The record's unit, as its header names it (None: the session's chunk size).
    unit: Option<u32>,
    index: u64,
    payload: Bytes,
}

impl Delivery {
    /// The v2 record `msg` carries, if its headers name one. Not trusted: index and unit are
    /// bound into the record's AEAD.
    fn of(msg: &async_nats::Message) -> Option<Delivery> {
        let index = header_u64(msg, protocol::HEADER_CHUNK_INDEX).ok()?;
        let unit = match msg.headers.as_ref().and_then(|h| h.get(protocol::HEADER_UNIT)) {
            None => None,
            Some(v) => Some(v.as_str().parse::<u32>().ok()?),
        };
        Some(Delivery { unit, index, payload: msg.payload.clone() })
    }
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
    /// Which local subjects reach the catalog.
    route: protocol::Route,
    options: ClientOptions,
    routes: Mutex<HashMap<String, Route>>,
    dispatcher: tokio::sync::OnceCell<tokio::task::JoinHandle<()>>,
    /// Protocol generation the catalog's latest listing advertised (ours until one is seen).
    protocol: AtomicU32,
    /// Signs this client's requests.
    identity: Arc<Identity>,
    /// Decides whose replies are accepted.
    trust: Trust,
    /// Set when the catalog answered unsigned (an original peer).
    unverified: AtomicBool,
    /// What the latest listing fetched by this client says of each file (by hash), for
    /// [`CatalogClient::open`]: the size and the signed chunk tree root.
    listed: Mutex<HashMap<String, Listed>>,
}

/// One file as the latest listing has it.
#[derive(Debug, Clone)]
struct Listed {
    byte_size: u64,
    tree: Option<String>,
}

/// A success reply: `data` exactly as sent, and the proof over it if any.
struct Reply {
    data: Box<serde_json::value::RawValue>,
    proof: Option<Proof>,
}

impl Reply {
    fn parse<T: DeserializeOwned>(&self, op: Operation) -> Result<T> {
        serde_json::from_str(self.data.get())
            .map_err(|e| ClientError::Protocol(format!("{} reply has unexpected data: {e}", op.as_str())))
    }

    fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(self.data.get().as_bytes()).into()
    }
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
    /// A client that signs with a fresh key and pins the first server key it meets (in
    /// memory): for tests and one-off use. Programs use [`CatalogClient::trusting`].
    pub fn new(nats: async_nats::Client, catalog: &str, options: ClientOptions) -> Result<Self> {
        let trust = Trust::pin(catalog, PinStore::in_memory());
        Self::trusting(nats, catalog, options, Arc::new(Identity::ephemeral()), trust)
    }

    /// The client a context reads `catalog` with: it signs as the context's identity and
    /// accepts only the catalog's owner (the account it is imported from, or our own account;
    /// without accounts, the server key pinned in the home at first contact).
    pub fn for_context(
        nats: async_nats::Client,
        home: &crate::context::Home,
        context: &crate::context::Context,
        catalog: &str,
        options: ClientOptions,
    ) -> anyhow::Result<Self> {
        let identity = Arc::new(Identity::load(home, context)?);
        let own = crate::index::catalog_names(home);
        let pins = PinStore::in_home(home);
        match context.find_import(&own, catalog) {
            Some(import) => Ok(Self::for_import(nats, import, options, identity, pins)?),
            None => {
                let owner = context.account_public_key.as_deref();
                Ok(Self::for_owner(nats, catalog, owner, options, identity, pins)?)
            }
        }
    }

    /// A client for an imported catalog: on its import's route, trusting only its owner.
    pub fn for_import(
        nats: async_nats::Client,
        import: &crate::context::ImportedCatalog,
        options: ClientOptions,
        identity: Arc<Identity>,
        pins: Arc<PinStore>,
    ) -> Result<Self> {
        pins.trust_own_operator(&identity);
        let trust = Trust::account(&import.owner, &import.catalog, pins);
        Self::trusting_via(nats, &import.catalog, import.route(), options, identity, trust)
    }

    /// A client for `catalog` of account `owner` (None: no accounts, pin the server key).
    pub fn for_owner(
        nats: async_nats::Client,
        catalog: &str,
        owner: Option<&str>,
        options: ClientOptions,
        identity: Arc<Identity>,
        pins: Arc<PinStore>,
    ) -> Result<Self> {
        pins.trust_own_operator(&identity);
        let trust = match owner {
            Some(owner) => Trust::account(owner, catalog, pins),
            None => Trust::pin(catalog, pins),
        };
        Self::trusting(nats, catalog, options, identity, trust)
    }

    /// A client that signs its requests as `identity` and accepts only servers `trust` vouches
    /// for, on the subjects without an owner ([`protocol::Route::Direct`]).
    pub fn trusting(
        nats: async_nats::Client,
        catalog: &str,
        options: ClientOptions,
        identity: Arc<Identity>,
        trust: Trust,
    ) -> Result<Self> {
        Self::trusting_via(nats, catalog, protocol::Route::Direct, options, identity, trust)
    }

    /// Like [`CatalogClient::trusting`], on the subjects of `route`.
    pub fn trusting_via(
        nats: async_nats::Client,
        catalog: &str,
        route: protocol::Route,
        options: ClientOptions,
        identity: Arc<Identity>,
        trust: Trust,
    ) -> Result<Self> {
        protocol::validate_catalog_name(catalog).map_err(ClientError::Io)?;
        if let protocol::Route::Owner(owner) = &route {
            if !protocol::is_account_key(owner) {
                return Err(ClientError::Io(format!("'{owner}' is not an account public key")));
            }
        }
        Ok(CatalogClient {
            inner: Arc::new(ClientInner {
                nats,
                catalog: catalog.to_string(),
                route,
                options,
                routes: Mutex::new(HashMap::new()),
                dispatcher: tokio::sync::OnceCell::new(),
                protocol: AtomicU32::new(protocol::PROTOCOL_VERSION),
                identity,
                trust,
                unverified: AtomicBool::new(false),
                listed: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// True if the catalog answered unsigned (an original, v1-only peer): its listing is not
    /// vouched for by its owner; its files are still checked against their sha256.
    pub fn unverified(&self) -> bool {
        self.inner.unverified.load(Ordering::Relaxed)
    }

    pub fn catalog(&self) -> &str {
        &self.inner.catalog
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// True if the catalog's latest listing says its server answers v2 (`open`/`read`);
    /// false for an original, v1-only peer.
    pub fn speaks_v2(&self) -> bool {
        self.inner.protocol.load(Ordering::Relaxed) >= 2
    }

    /// Records the protocol a listing obtained elsewhere (e.g. a saved one) advertises.
    pub fn note_protocol(&self, protocol: u32) {
        self.inner.note_protocol(protocol);
    }
}

fn header_u64(msg: &async_nats::Message, name: &str) -> Result<u64> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .and_then(|v| v.as_str().parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("chunk without a valid {name} header")))
}

impl ClientInner {
    fn note_protocol(&self, protocol: u32) {
        self.protocol.store(protocol, Ordering::Relaxed);
    }

    fn lock_routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn request<Req: Serialize, Resp: DeserializeOwned>(&self, op: Operation, body: &Req) -> Result<Resp> {
        let reply = self.request_reply(op, body).await?;
        reply.parse(op)
    }

    /// One request/reply exchange; a success reply keeps its `data` as the exact bytes sent,
    /// for the signature check.
    async fn request_reply<Req: Serialize>(&self, op: Operation, body: &Req) -> Result<Reply> {
        let msg = self.request_message(op, body).await?;
        parse_reply(op, &msg)
    }

    /// One request/reply exchange, the reply as it came.
    async fn request_message<Req: Serialize>(&self, op: Operation, body: &Req) -> Result<async_nats::Message> {
        let subject = self.route.request_subject(&self.catalog, op);
        let payload = serde_json::to_vec(body).map_err(|e| ClientError::Io(e.to_string()))?;
        // Bounded here, so async-nats is told not to arm a second timer of its own for it.
        let request = self.nats.send_request(subject, async_nats::Request::new().payload(payload.into()).timeout(None));
        match tokio::time::timeout(self.options.request_timeout, request).await {
            Err(_) => Err(ClientError::Timeout(self.catalog.clone())),
            Ok(Err(e)) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => ClientError::NoResponders(self.catalog.clone()),
                async_nats::RequestErrorKind::TimedOut => ClientError::Timeout(self.catalog.clone()),
                _ => ClientError::Nats(e.to_string()),
            }),
            Ok(Ok(msg)) => Ok(msg),
        }
    }
}

/// A reply's envelope: the data of a success, as sent, or the refusal.
fn parse_reply(op: Operation, msg: &async_nats::Message) -> Result<Reply> {
    let envelope: Envelope<Box<serde_json::value::RawValue>> = serde_json::from_slice(&msg.payload)
        .map_err(|e| ClientError::Protocol(format!("{} reply is not a valid envelope: {e}", op.as_str())))?;
    match (envelope.code, envelope.data) {
        (200, Some(data)) => Ok(Reply { data, proof: envelope.proof }),
        (200, None) => Err(ClientError::Protocol(format!("{} reply has no data", op.as_str()))),
        (code, _) => {
            Err(ClientError::Refused { code, message: envelope.error.unwrap_or_else(|| "no reason given".into()) })
        }
    }
}

impl ClientInner {
    /// Checks a signed reply's proof over `parts` followed by the sha256 of its data.
    fn check_signed(&self, reply: &Reply, purpose: Purpose, parts: &[&[u8]]) -> Result<()> {
        let digest = reply.digest();
        let mut all: Vec<&[u8]> = parts.to_vec();
        all.push(&digest);
        self.trust
            .check(reply.proof.as_ref(), purpose, &all)
            .map_err(|e| ClientError::Untrusted(self.catalog.clone(), e))
    }

    /// Subscribes once to the catalog's media subject and routes chunks by last token.
    async fn ensure_dispatcher(self: &Arc<Self>) -> Result<()> {
        let weak = Arc::downgrade(self);
        self.dispatcher
            .get_or_try_init(|| async {
                let subject = self.route.media_wildcard(&self.catalog);
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
        let Some(delivery) = Delivery::of(&msg) else { return };
        if let Some(file) = session.upgrade() {
            file.deliver(token, delivery);
        }
    }
}
