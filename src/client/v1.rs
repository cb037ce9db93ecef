//! v1, the original Natster's `download`: the whole file in 4096-byte chunks, each sealed
//! with nkeys xkeys for a one-off key of ours, published on the file's hash. Kept to read
//! original peers. Tricky cases: several downloads of one hash share its subject (each keeps
//! the chunks of its own sender), chunks arrive out of order (bounded reordering), and an
//! original server may transcode an mp4 on the fly, so its bytes are not the listed file's.

use std::collections::BTreeMap;

use tokio::sync::mpsc;

use super::{header_u64, CatalogClient, ClientError, ClientInner, Result, Route};
use crate::crypto::CryptoError;
use crate::protocol::{self, DownloadRequest, DownloadResponse, Operation};

/// How long the first chunk of a v1 download may take (the download may wait its turn).
const V1_FIRST_CHUNK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Largest v1 chunk believed (the original sends 4 KiB; NATS' default payload bound is 1 MiB).
const MAX_V1_CHUNK: u64 = 1024 * 1024;
/// Chunks held ahead of the next one to write, and their bytes at most.
const MAX_EARLY_CHUNKS: usize = 4096;
const MAX_EARLY_BYTES: usize = 32 * 1024 * 1024;
/// Chunks failing authentication dropped in one download before it fails.
const MAX_FORGED: u32 = 64;

/// Set by an original server on chunks it transcoded instead of sending the file as listed.
const HEADER_TRANSCODING: &str = "x-natster-transcoding";

fn is_transcoded(msg: &async_nats::Message) -> bool {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(HEADER_TRANSCODING))
        .is_some_and(|v| matches!(v.as_str().trim(), "true" | "1" | "yes"))
}

impl CatalogClient {
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
        if reply.chunk_size > MAX_V1_CHUNK {
            return Err(ClientError::Protocol(format!(
                "chunk_size {} is larger than any Natster sends ({MAX_V1_CHUNK})",
                reply.chunk_size
            )));
        }
        let mut next = 0u64;
        let mut early: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut early_bytes = 0usize;
        let mut forged = 0u32;
        let mut written = 0u64;
        while next < reply.total_chunks {
            // Our server queues v1 downloads fairly and acknowledges at once, so the first
            // chunk may come only when our turn does; after that they stream.
            let mut wait = inner.options.chunk_timeout * (inner.options.retries + 1);
            if next == 0 && early.is_empty() {
                wait = wait.max(V1_FIRST_CHUNK_WAIT);
            }
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
            if is_transcoded(&msg) {
                return Err(ClientError::Transcoded(hash.to_string()));
            }
            let index = header_u64(&msg, protocol::HEADER_CHUNK_INDEX)?;
            // Chunks ahead of the next one are held, up to a bound in bytes: a peer that never
            // sends chunk `next` cannot make us hold the file.
            let held_too_much = early.len() >= MAX_EARLY_CHUNKS || early_bytes >= MAX_EARLY_BYTES;
            if index >= reply.total_chunks || index < next || (index != next && held_too_much) {
                continue;
            }
            let plain = match key.open(&msg.payload, &sender) {
                Ok(plain) => plain,
                // Not sealed by our sender for our key: a stranger's on the subject, dropped
                // (a bounded number of them; then the download fails with what was found).
                Err(_) if forged < MAX_FORGED => {
                    forged += 1;
                    continue;
                }
                Err(_) => return Err(CryptoError::Authentication(index).into()),
            };
            if plain.len() as u64 != protocol::chunk_len(reply.total_bytes, reply.chunk_size, index) {
                // Sealed correctly for us but of the wrong length: not the listed file's bytes.
                return Err(ClientError::Transcoded(hash.to_string()));
            }
            early_bytes += plain.len();
            if let Some(replaced) = early.insert(index, plain) {
                early_bytes -= replaced.len();
            }
            while let Some(chunk) = early.remove(&next) {
                early_bytes -= chunk.len();
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
