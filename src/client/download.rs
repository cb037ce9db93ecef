//! `catalog download`: one file to disk, verified before it takes the target's name, so a
//! failed or forged download leaves nothing behind.
//!
//! Through v2 every chunk is checked against the signed listing's chunk tree as it arrives
//! (the listing this client fetched last), before a byte of it is written. That proves the
//! whole file: the tree root binds every leaf and the file's length, and the owner's index
//! computed the root and the sha256 in one read pass, so a second, whole-file sha256 would
//! only re-prove what the tree did, at the cost of a core's worth of hashing (measured: a
//! quarter of the client's CPU on a 1 GiB download). Through v1 (original peers, unsigned)
//! the sha256 is all there is, and the whole file is checked against it.
//!
//! Through v2 the network side (decrypt, tree check) and the disk side (write, fsync) run on
//! different threads, joined by a queue of [`WRITE_QUEUE_CHUNKS`] chunks: a slow disk slows
//! the download down instead of filling memory, and no file I/O runs on a runtime worker.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{CatalogClient, ClientError, Result};

/// Decrypted chunks waiting for the writer thread (8 MiB at the default chunk size).
const WRITE_QUEUE_CHUNKS: usize = 16;

/// How a downloaded file was proven to be the listed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Every chunk against the signed listing's chunk tree (v2).
    ChunkTree,
    /// The whole file against the listing's sha256 (v1, an original peer).
    Sha256,
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verified::ChunkTree => "verified against the signed chunk tree",
            Verified::Sha256 => "sha256 verified",
        })
    }
}

/// Downloads `hash` into `out` through v2 (or v1 for an original peer): written to a
/// temporary file beside `out`, verified, then renamed; nothing is left on failure. Gives the
/// bytes written and how they were verified.
pub async fn download_to_file(
    client: &CatalogClient,
    hash: &str,
    byte_size: u64,
    out: &Path,
    progress: impl Fn(u64),
) -> std::result::Result<(u64, Verified), anyhow::Error> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new().prefix(".natster-download-").suffix(".partial").tempfile_in(dir).map_err(
        |e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!(
                    "folder {} does not exist; create it (mkdir -p {0}) or give another path",
                    dir.display()
                )
            }
            // The temporary file's name is ours, not the user's: say only where and why.
            _ => anyhow::anyhow!(
                "cannot create a file in {}: {}; check that it is a folder you may write to",
                dir.display(),
                std::io::Error::from(e.kind())
            ),
        },
    )?;
    let out_err = |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", out.display());
    let file = tmp.as_file().try_clone().map_err(out_err)?;
    let mut written = 0u64;
    // A peer sending more than the listing promised is cut off before it fills the disk.
    let mut count = |len: usize| -> Result<()> {
        if written + len as u64 > byte_size {
            return Err(ClientError::Protocol(format!("server sent more than the listed {byte_size} bytes")));
        }
        written += len as u64;
        progress(written);
        Ok(())
    };
    // The protocol is what the catalog's listing said; an outage never means v1.
    let verified = if client.speaks_v2() {
        download_v2(client, hash, byte_size, file, &mut count).await.map_err(|e| match e {
            Failure::Fetch(e) => anyhow::Error::from(e),
            Failure::Write(e) => out_err(e),
        })?;
        Verified::ChunkTree
    } else {
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        client
            .download_v1(hash, |chunk| {
                count(chunk.len())?;
                hasher.update(chunk);
                writer.write_all(chunk).map_err(|e| ClientError::Io(format!("cannot write {}: {e}", out.display())))
            })
            .await?;
        writer.flush().map_err(out_err)?;
        writer.get_ref().sync_all().map_err(out_err)?;
        if hex::encode(hasher.finalize()) != hash {
            return Err(ClientError::HashMismatch(hash.to_string()).into());
        }
        Verified::Sha256
    };
    tmp.persist(out).map_err(|e| anyhow::anyhow!("cannot write {}: {}", out.display(), e.error))?;
    Ok((written, verified))
}

/// Tells the writer to stop when dropped armed.
struct AbandonOnDrop {
    flag: Arc<AtomicBool>,
    armed: bool,
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Why a v2 download stopped: the remote side, or the local disk.
enum Failure {
    Fetch(ClientError),
    Write(std::io::Error),
}

/// The whole file through v2 into `file` (each chunk proven by the fetch, then written and
/// the file synced on a blocking thread).
async fn download_v2(
    client: &CatalogClient,
    hash: &str,
    byte_size: u64,
    file: std::fs::File,
    count: &mut impl FnMut(usize) -> Result<()>,
) -> std::result::Result<(), Failure> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE_CHUNKS);
    let abandoned = Arc::new(AtomicBool::new(false));
    let writer = tokio::task::spawn_blocking({
        let abandoned = abandoned.clone();
        move || -> std::io::Result<()> {
            let mut file = file;
            while let Some(chunk) = rx.blocking_recv() {
                if abandoned.load(Ordering::Relaxed) {
                    break;
                }
                file.write_all(&chunk)?;
            }
            // A failed download's file is deleted: not worth an fsync.
            if !abandoned.load(Ordering::Relaxed) {
                file.sync_all()?;
            }
            Ok(())
        }
    });
    // Also raised if this future is dropped mid-way (SIGINT): the writer then stops at its next
    // chunk instead of writing out and syncing a file that is about to be deleted.
    let mut on_drop = AbandonOnDrop { flag: abandoned.clone(), armed: true };
    let fetched = async {
        let remote = client.open(hash, Some(byte_size)).await?;
        remote
            .fetch(0, remote.chunk_count(), |_, chunk| {
                let counted = count(chunk.len());
                let tx = tx.clone();
                async move {
                    counted?;
                    // Closed only when the writer failed: its error is the one reported.
                    tx.send(chunk).await.map_err(|_| ClientError::Io("the writer stopped".into()))
                }
            })
            .await
    }
    .await;
    // The writer finishes what is queued and syncs, or (on a fetch error) stops early.
    on_drop.armed = fetched.is_err();
    drop(on_drop);
    drop(tx);
    let wrote = writer.await.map_err(|e| Failure::Write(std::io::Error::other(e)))?;
    match (fetched, wrote) {
        (Ok(()), Ok(())) => Ok(()),
        (_, Err(e)) => Err(Failure::Write(e)),
        (Err(e), Ok(_)) => Err(Failure::Fetch(e)),
    }
}
