//! v1 `download`, as the original Natster serves it: the whole file in 4096-byte chunks, each
//! sealed with the original's xkey box for the reader's `target_xkey`, published on
//! `natster.media.<catalog>.<hash>` with the original's three headers.
//!
//! Bounded, and fair: at most `max_v1_transfers` files stream at once; further downloads wait
//! in a FIFO queue of at most `max_v1_waiting` (tokio's semaphore hands out permits in request
//! order) and start the moment a transfer ends. Only past that bound is a download refused
//! (503).
//!
//! Why the reply comes at once, even for a queued download: the original client sends
//! `download` with a 1 s request timeout, then waits for chunks with no deadline at all. A
//! reply held back until the transfer starts would fail it after 1 s of queueing; an
//! immediate acknowledgement followed by chunks when its turn comes always works. Our own
//! client does the same, with a per-chunk wait; a transfer starts as soon as a slot is free,
//! so that wait is exceeded only when the queue ahead of it holds more than a wait's worth
//! of bytes.
//!
//! Invariants: the reply is published before the first chunk; file reads and sealing run on
//! the blocking pool, a batch of chunks ahead of the publisher; a file changed while queued
//! is not served (its identity is checked again when the transfer starts).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::files::{self, FileIdentity};
use super::{parse, refuse, Refusal, Shared};
use crate::index::IndexEntry;
use crate::protocol::{self, Caller, DownloadRequest, DownloadResponse, Envelope};

/// Chunks read and sealed per blocking task (256 KiB of file).
const BATCH: u64 = 64;
/// v1 has no flow control; a flush every this many chunks (1 MiB) keeps a transfer from
/// racing far ahead of what the NATS server has taken.
const FLUSH_EVERY: u64 = 256;

/// Admission and turns for v1 transfers.
pub(super) struct Queue {
    /// One permit per transfer streaming or waiting: `max_transfers + max_waiting`.
    admitted: Arc<Semaphore>,
    /// One permit per transfer streaming.
    streaming: Arc<Semaphore>,
    max_waiting: usize,
}

impl Queue {
    pub fn new(max_transfers: usize, max_waiting: usize) -> Queue {
        let max_transfers = max_transfers.max(1);
        Queue {
            admitted: Arc::new(Semaphore::new(max_transfers + max_waiting)),
            streaming: Arc::new(Semaphore::new(max_transfers)),
            max_waiting,
        }
    }

    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.admitted.clone().try_acquire_owned().ok()
    }
}

/// One admitted transfer.
struct Transfer {
    file: Arc<File>,
    identity: FileIdentity,
    entry: IndexEntry,
    sender: Arc<nkeys::XKey>,
    target: Arc<nkeys::XKey>,
    subject: String,
    total_chunks: u64,
}

impl Shared {
    /// Answers a v1 `download` (publishing the reply itself) and queues the transfer.
    pub(super) async fn download(
        self: &Arc<Self>,
        caller: &Caller,
        payload: &[u8],
        reply: async_nats::Subject,
    ) -> Result<Vec<u8>, Refusal> {
        let req: DownloadRequest = parse(payload)?;
        let target = nkeys::XKey::from_public_key(&req.target_xkey)
            .map_err(|_| refuse(400, "target_xkey is not a valid xkey public key"))?;
        if crate::crypto::is_low_order_xkey(&req.target_xkey) {
            return Err(refuse(400, "target_xkey is a low-order key: anyone could open what is sealed to it"));
        }
        let (entry, file, identity) = self.open_indexed(&req.hash).await?;
        let admitted = self.v1.admit().ok_or_else(|| {
            refuse(
                503,
                format!(
                    "catalog '{}' has {} v1 downloads waiting already; try again in a minute",
                    self.name, self.v1.max_waiting
                ),
            )
        })?;
        let sender = nkeys::XKey::new();
        let total_chunks = protocol::chunk_count(entry.byte_size, protocol::V1_CHUNK_SIZE as u64);
        let body = Envelope::ok(DownloadResponse {
            acknowledged: true,
            chunk_size: protocol::V1_CHUNK_SIZE as u64,
            total_chunks,
            sender_xkey: sender.public_key(),
            total_bytes: entry.byte_size,
        });
        if let Err(e) = self.nats.publish(reply, body.into()).await {
            tracing::warn!(op = "download", "reply not sent: {e}");
            return Ok(Vec::new());
        }
        let transfer = Transfer {
            file,
            identity,
            subject: protocol::media_subject(caller, &self.name, &entry.hash),
            entry,
            sender: Arc::new(sender),
            target: Arc::new(target),
            total_chunks,
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            // Fair: permits are granted in the order they were asked for.
            let Ok(_streaming) = this.v1.streaming.clone().acquire_owned().await else { return };
            this.transmit_v1(transfer).await;
        });
        Ok(Vec::new())
    }

    async fn transmit_v1(&self, t: Transfer) {
        match files::identity_of(t.file.clone()).await {
            Ok(now) if now == t.identity => {}
            _ => {
                tracing::warn!(path = %t.entry.path, "file changed while its v1 download waited; not sent");
                return;
            }
        }
        let byte_size = t.entry.byte_size;
        let batches = (0..t.total_chunks).step_by(BATCH as usize).map(|first| {
            let (file, sender, target) = (t.file.clone(), t.sender.clone(), t.target.clone());
            let last = (first + BATCH).min(t.total_chunks);
            tokio::task::spawn_blocking(move || seal_batch(&file, &sender, &target, byte_size, first..last))
        });
        let mut sealed = futures::stream::iter(batches).buffered(2);
        let sender_key = t.sender.public_key();
        let total = t.total_chunks.to_string();
        while let Some(batch) = sealed.next().await {
            let batch = match batch {
                Ok(Ok(batch)) => batch,
                Ok(Err(e)) => {
                    tracing::warn!(path = %t.entry.path, "v1 download stopped: {e}");
                    return;
                }
                Err(_) => return,
            };
            for (index, body) in batch {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(protocol::HEADER_CHUNK_INDEX, index.to_string().as_str());
                headers.insert(protocol::HEADER_SENDER_XKEY, sender_key.as_str());
                headers.insert(protocol::HEADER_TOTAL_CHUNKS, total.as_str());
                if self.nats.publish_with_headers(t.subject.clone(), headers, body).await.is_err() {
                    return;
                }
                if index % FLUSH_EVERY == FLUSH_EVERY - 1 {
                    let _ = self.nats.flush().await;
                }
            }
        }
    }
}

/// Reads and seals chunks `range` of a v1 transfer (blocking).
fn seal_batch(
    file: &File,
    sender: &nkeys::XKey,
    target: &nkeys::XKey,
    byte_size: u64,
    range: std::ops::Range<u64>,
) -> std::io::Result<Vec<(u64, Bytes)>> {
    let chunk = protocol::V1_CHUNK_SIZE as u64;
    let mut buf = vec![0u8; protocol::V1_CHUNK_SIZE];
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    for index in range {
        let len = protocol::chunk_len(byte_size, chunk, index) as usize;
        file.read_exact_at(&mut buf[..len], index * chunk)?;
        let sealed = sender.seal(&buf[..len], target).map_err(|e| std::io::Error::other(e.to_string()))?;
        out.push((index, Bytes::from(sealed)));
    }
    Ok(out)
}
