//! v2 ranged reads: `open` starts a session on one file (a fresh key agreed with the reader's
//! xkey, bound to session, catalog and hash), `read` publishes a run of sealed chunks on the
//! session's media subject (or, `inline`, answers with its one record), `close` ends it.
//!
//! A `read` may name its records' `unit` (a multiple of the 16 KiB leaf up to
//! [`super::MAX_CHUNK_SIZE`], offered in the `open` reply): small random reads then move a
//! leaf, not a chunk, and large sequential ones may use larger messages. Such records carry
//! their unit in a header and in the AEAD's associated data.
//!
//! Invariants:
//! - A session belongs to the caller that opened it; any other caller naming it gets the same
//!   answer as for a missing one.
//! - Every read re-checks the open file's identity (one `fstat`, together with reading and
//!   sealing its first record, before anything is acknowledged); a file changed since it was
//!   verified ends the session with 409.
//! - File reads and sealing run on the blocking pool, at most two chunks ahead of the
//!   publisher; at most `MAX_CONCURRENT_READS` reads stream at once. The one exception: a first
//!   record of at most four leaves that the page cache holds whole is read and sealed on the
//!   async worker ([`cached`]: reads that cannot block), which saves a small random read two
//!   thread wake-ups; whatever that path cannot finish is done again on the blocking pool.
//! - Every chunk's plaintext carries its proof under the file's indexed tree root
//!   ([`chunk_tree`]), and every chunk's leaves are checked against that tree as they are read:
//!   bytes that differ from the indexed ones (a file changed without a re-index, its mtime put
//!   back) are never sent. The session ends, the file is refused (409) until it is re-indexed,
//!   and its tree file is removed so that the re-index hashes it again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;

use super::cached::{self, Cached};
use super::files::{self, FileIdentity};
use super::{parse, refuse, Refusal, Shared};
use crate::chunk_tree::{self, Tree};
use crate::crypto::{self, EphemeralKey, SessionBinding, SessionKey};
use crate::identity::Purpose;
use crate::index::TreeFileError;
use crate::protocol::{self, Caller, CloseRequest, Envelope, OpenRequest, OpenResponse, ReadRequest, ReadResponse};
use sha2::Digest as _;

pub(super) struct Session {
    caller: Caller,
    hash: String,
    path: String,
    tree: Arc<Tree>,
    tree_file: PathBuf,
    byte_size: u64,
    file: Arc<File>,
    indexed: FileIdentity,
    key: Arc<SessionKey>,
    pub(super) last_used: Mutex<Instant>,
}

impl Shared {
    pub(super) async fn open(&self, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let req: OpenRequest = parse(payload)?;
        self.check_reader(caller, &req)?;
        // Before opening (an original's index makes that a whole-file hash): a file without a
        // chunk tree is refused whatever its bytes.
        if let Some(entry) = self.loaded().entry(&req.hash).filter(|e| e.tree.is_none()) {
            tracing::warn!(path = %entry.path, "refusing to serve: {}; re-index with `natster-mount catalog new`", TreeFileError::NotIndexed);
            return Err(no_tree(&entry.hash, &TreeFileError::NotIndexed));
        }
        let (entry, file, indexed) = self.open_indexed(&req.hash).await?;
        if self.trees.is_changed(&entry.hash, indexed) {
            return Err(changed(&entry.hash));
        }
        let tree = self.trees.get(&self.home, &entry).await.map_err(|e| {
            tracing::warn!(path = %entry.path, "refusing to serve: {e}; re-index with `natster-mount catalog new`");
            no_tree(&entry.hash, &e)
        })?;
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
            max_unit: Some(super::MAX_CHUNK_SIZE),
        };
        let state = Session {
            caller: caller.clone(),
            tree_file: crate::index::tree_path(&self.home, &entry.hash),
            hash: entry.hash,
            path: entry.path,
            tree,
            byte_size: entry.byte_size,
            file,
            indexed,
            key: Arc::new(key),
            last_used: Mutex::new(Instant::now()),
        };
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).put(session, Arc::new(state));
        // Signed and bound to the reader's fresh xkey: nobody can pass off this session as
        // their own, nor another server's session as ours.
        let data = serde_json::to_vec(&reply).map_err(|_| refuse(500, "cannot encode the reply"))?;
        let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
        Ok(self.signed_reply(Purpose::Session, &[req.hash.as_bytes(), req.client_xkey.as_bytes()], &data, digest))
    }

    /// The reader's signed identity must belong to the account the request came from (the
    /// subject's first token, which nats-server guarantees), or to ours for our own account.
    /// Without accounts there is nothing to check it against.
    fn check_reader(&self, caller: &Caller, req: &OpenRequest) -> Result<(), Refusal> {
        // Without accounts of our own we are not in operator mode: no account token is
        // guaranteed, so there is nothing to check a reader's account against.
        let expected = match (caller, self.identity.account()) {
            (_, None) => None,
            (Caller::Account(account), Some(_)) => Some(account.as_str()),
            (Caller::Owner, Some(own)) => Some(own),
        };
        let Some(proof) = &req.reader else {
            return match expected {
                None => Ok(()),
                Some(_) => Err(refuse(403, "the reader did not sign its open request; upgrade natster-mount")),
            };
        };
        let parts: [&[u8]; 3] = [self.name.as_bytes(), req.hash.as_bytes(), req.client_xkey.as_bytes()];
        let vouched =
            proof.verify(Purpose::Reader, &parts).map_err(|e| refuse(403, format!("reader identity refused: {e}")))?;
        if let Some(operator) = &vouched.operator {
            self.pins.check_operator(operator).map_err(|e| refuse(403, format!("reader identity refused: {e}")))?;
        }
        match (expected, vouched.account.as_deref()) {
            (None, _) => Ok(()),
            (Some(expected), Some(found)) if expected == found => Ok(()),
            (Some(expected), Some(found)) => Err(refuse(
                403,
                format!("the reader's signed identity belongs to account {found}, but the request came from account {expected}"),
            )),
            (Some(expected), None) => {
                Err(refuse(403, format!("the reader signed without a JWT, but the request came from account {expected}")))
            }
        }
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

    pub(super) async fn read(
        &self,
        caller: &Caller,
        payload: &[u8],
        reply: async_nats::Subject,
    ) -> Result<Vec<u8>, Refusal> {
        let req: ReadRequest = parse(payload)?;
        let session = self.session(caller, &req.session)?;
        if let Some(unit) = req.unit {
            if !protocol::valid_unit(unit, super::MAX_CHUNK_SIZE) {
                return Err(refuse(
                    400,
                    format!(
                        "unit {unit} is not a multiple of {} up to {}",
                        chunk_tree::LEAF_SIZE,
                        super::MAX_CHUNK_SIZE
                    ),
                ));
            }
        }
        let chunk_size = u64::from(req.unit.unwrap_or(self.options.chunk_size));
        let total = protocol::chunk_count(session.byte_size, chunk_size);
        if req.count == 0 || req.count > protocol::MAX_CHUNKS_PER_READ {
            return Err(refuse(400, format!("count must be 1..={}", protocol::MAX_CHUNKS_PER_READ)));
        }
        if req.inline && req.count != 1 {
            return Err(refuse(400, "an inline read names one record (count 1)"));
        }
        if req.first_chunk >= total {
            return Err(refuse(
                416,
                format!("first_chunk {} is past the last chunk ({total} chunks)", req.first_chunk),
            ));
        }
        let count = (total - req.first_chunk).min(u64::from(req.count)) as u32;
        let Ok(_permit) = self.reads.clone().acquire_owned().await else {
            return Err(refuse(503, "server is shutting down"));
        };
        let first = req.first_chunk;
        let unit = req.unit;
        // A small first record the page cache holds is read and sealed right here; otherwise
        // the file's identity check and the first record share one trip to the blocking pool,
        // so a small random read pays for one thread hand-off, not two.
        let cached = if record_len(&session, first, chunk_size) <= CACHED_SEAL_MAX {
            seal_cached(&session, first, chunk_size, unit)
        } else {
            Cached::No
        };
        let checked = if let Cached::Yes((now, record)) = cached {
            Ok(Ok((now, Some(Ok(record)))))
        } else {
            let session = session.clone();
            tokio::task::spawn_blocking(move || {
                if count > 1 {
                    // The records after the first are read by other blocking tasks, a few at
                    // a time and out of order; asking the kernel for the whole run now lets a
                    // cold disk read it ahead in large requests meanwhile.
                    files::will_need(&session.file, (first + 1) * chunk_size, u64::from(count - 1) * chunk_size);
                }
                let now = FileIdentity::of_file(&session.file)?;
                let sealed =
                    if now == session.indexed { Some(seal_chunk(&session, first, chunk_size, unit)) } else { None };
                Ok::<_, std::io::Error>((now, sealed))
            })
            .await
        };
        let first_record = match checked {
            Ok(Ok((now, Some(sealed)))) if !self.trees.is_changed(&session.hash, now) => sealed,
            Ok(Ok(_)) => {
                self.sessions.lock().unwrap_or_else(|p| p.into_inner()).pop(&req.session);
                return Err(changed(&session.hash));
            }
            Ok(Err(_)) | Err(_) => return Err(refuse(500, "cannot stat file")),
        };
        let first_record = match first_record {
            Ok(record) => record,
            Err(e) => {
                self.chunk_failed(&session, &req.session, &e);
                return Err(match e {
                    ChunkError::Changed(_) => changed(&session.hash),
                    _ => refuse(500, format!("cannot read file {}", session.hash)),
                });
            }
        };
        if req.inline {
            // The record is the reply: no acknowledgement, no media message.
            let (index, body) = first_record;
            if let Err(e) = self.nats.publish_with_headers(reply, record_headers(index, unit), body).await {
                tracing::debug!("inline record not sent: {e}");
            }
            return Ok(Vec::new());
        }
        // Acknowledge first, so the reader knows records are coming, then stream them.
        let ack = Envelope::ok(ReadResponse { first_chunk: first, count });
        let _ = self.nats.publish(reply, ack.into()).await;

        let subject = protocol::media_subject(caller, &self.name, &req.session);
        // The rest are read and sealed on the blocking pool, two ahead of the publisher.
        let rest = futures::stream::iter(first + 1..first + u64::from(count))
            .map(|index| {
                let session = session.clone();
                async move {
                    match tokio::task::spawn_blocking(move || seal_chunk(&session, index, chunk_size, unit)).await {
                        Ok(sealed) => sealed,
                        Err(e) => Err(ChunkError::Io(std::io::Error::other(e.to_string()))),
                    }
                }
            })
            .buffered(2);
        let mut sealed = std::pin::pin!(futures::stream::once(std::future::ready(Ok(first_record))).chain(rest));
        while let Some(done) = sealed.next().await {
            match done {
                Ok((index, body)) => {
                    if self.nats.publish_with_headers(subject.clone(), record_headers(index, unit), body).await.is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    self.chunk_failed(&session, &req.session, &e);
                    break;
                }
            }
        }
        Ok(Vec::new())
    }

    /// Logs a record that could not be sent; bytes that differ from the indexed tree refuse
    /// the file until it is re-indexed and end the session.
    fn chunk_failed(&self, session: &Session, id: &str, e: &ChunkError) {
        if let ChunkError::Changed(index) = e {
            tracing::warn!(path = %session.path, chunk = index,
                "file changed on disk since it was indexed (its bytes do not match the indexed chunk tree); \
                 refusing it until `natster-mount catalog new` re-indexes");
            self.trees.mark_changed(&session.hash, session.indexed);
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).pop(id);
        } else {
            tracing::warn!("read of {} failed: {e}", session.hash);
        }
    }

    pub(super) fn close(&self, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let req: CloseRequest = parse(payload)?;
        self.session(caller, &req.session)?;
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).pop(&req.session);
        Ok(Envelope::ok(()))
    }

    /// Drops the sessions of files a re-index took out of the listing (or whose bytes it
    /// found changed): what the owner removed is no longer served, even to a reader that
    /// opened it before. A file still listed keeps its sessions.
    pub(super) fn retain_sessions(&self, entries: &[crate::index::IndexEntry]) {
        let listed: std::collections::HashSet<(&str, &str)> =
            entries.iter().filter_map(|e| Some((e.hash.as_str(), e.tree.as_deref()?))).collect();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = sessions
            .iter()
            .filter(|(_, s)| !listed.contains(&(s.hash.as_str(), hex::encode(s.tree.root()).as_str())))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            sessions.pop(&k);
        }
    }

    /// Drops sessions unused for longer than the idle limit.
    pub(super) fn expire_sessions(&self) {
        let idle = self.options.session_idle;
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
}

/// A sealed record's headers: its index, and its unit when the read named one.
fn record_headers(index: u64, unit: Option<u32>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(protocol::HEADER_CHUNK_INDEX, index.to_string().as_str());
    if let Some(unit) = unit {
        headers.insert(protocol::HEADER_UNIT, unit.to_string().as_str());
    }
    headers
}

/// The refusal of a file whose chunk tree cannot be had.
fn no_tree(hash: &str, e: &TreeFileError) -> Refusal {
    let why = match e {
        TreeFileError::NotIndexed => "was indexed before protocol 4 and has no chunk tree",
        TreeFileError::Missing(_) | TreeFileError::Damaged(_) => "has a missing or damaged chunk tree",
    };
    refuse(409, format!("file {hash} {why}; ask the owner to re-index the catalog"))
}

fn changed(hash: &str) -> Refusal {
    refuse(409, format!("file {hash} changed since it was indexed; ask the owner to re-index"))
}

#[derive(Debug, thiserror::Error)]
enum ChunkError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("chunk {0} does not match the indexed chunk tree")]
    Changed(u64),
    #[error("no proof for chunk {0}: {1}")]
    Proof(u64, chunk_tree::TreeError),
}

/// Largest first record read and sealed on an async worker when the page cache holds it: four
/// leaves, tens of microseconds of hashing and sealing. Larger ones go to the blocking pool.
const CACHED_SEAL_MAX: u64 = 4 * chunk_tree::LEAF_SIZE as u64;

fn record_len(session: &Session, index: u64, chunk_size: u64) -> u64 {
    protocol::chunk_len(session.byte_size, chunk_size, index)
}

/// [`seal_chunk`] without blocking: only if the file is unchanged and the record's bytes are
/// all in the page cache. Anything else (not cached, changed, a leaf that does not match) is
/// [`Cached::No`], and the blocking path does the read again and deals with what it finds.
fn seal_cached(
    session: &Session,
    index: u64,
    chunk_size: u64,
    unit: Option<u32>,
) -> Cached<(FileIdentity, (u64, Bytes))> {
    let Cached::Yes(now) = cached::identity(&session.file) else { return Cached::No };
    if now != session.indexed {
        return Cached::No;
    }
    let fill = |file: &File, buf: &mut [u8], at: u64| match cached::read_exact_at(file, buf, at) {
        Cached::Yes(()) => Ok(()),
        Cached::No => Err(std::io::ErrorKind::WouldBlock.into()),
    };
    match seal_with(session, index, chunk_size, unit, fill) {
        Ok(record) => Cached::Yes((now, record)),
        Err(_) => Cached::No,
    }
}

/// Reads chunk `index`, checks its leaves against the tree, and seals it with its proof:
/// nonce ‖ AEAD([proof][data]). `unit`: the size the reader named (bound into the AEAD), or
/// None for the session's chunk size. Blocking: run it on the blocking pool.
fn seal_chunk(session: &Session, index: u64, chunk_size: u64, unit: Option<u32>) -> Result<(u64, Bytes), ChunkError> {
    let sealed = seal_with(session, index, chunk_size, unit, |file, buf, at| file.read_exact_at(buf, at));
    if let Err(ChunkError::Changed(_)) = sealed {
        // The next `catalog new` must hash this file again, though its size and mtime match.
        let _ = std::fs::remove_file(&session.tree_file);
    }
    sealed
}

/// [`seal_chunk`]'s work, with the record's bytes read by `fill(file, buf, offset)`.
fn seal_with(
    session: &Session,
    index: u64,
    chunk_size: u64,
    unit: Option<u32>,
    fill: impl FnOnce(&File, &mut [u8], u64) -> std::io::Result<()>,
) -> Result<(u64, Bytes), ChunkError> {
    let len = record_len(session, index, chunk_size) as usize;
    let (first_leaf, leaves) = chunk_tree::chunk_leaves(session.byte_size, chunk_size, index);
    let proof = session.tree.prove(first_leaf, leaves).map_err(|e| ChunkError::Proof(index, e))?;
    let data_at = crypto::NONCE_LEN + chunk_tree::frame_overhead(proof.len());
    let mut buf = Vec::with_capacity(data_at + len + crypto::TAG_LEN);
    buf.resize(crypto::NONCE_LEN, 0);
    chunk_tree::frame(&mut buf, &proof).map_err(|e| ChunkError::Proof(index, e))?;
    buf.resize(data_at + len, 0);
    fill(&session.file, &mut buf[data_at..], index * chunk_size)?;
    let indexed = session.tree.leaves().get(first_leaf as usize..).unwrap_or_default();
    let fresh = buf[data_at..].chunks(chunk_tree::LEAF_SIZE).map(chunk_tree::leaf_hash);
    if fresh.zip(indexed).any(|(now, then)| now != *then) {
        return Err(ChunkError::Changed(index));
    }
    session.key.seal_record_in_place(index, unit, &mut buf);
    Ok((index, Bytes::from(buf)))
}
