//! `catalog download`: one file to disk, verified before it takes the target's name, so a
//! failed or forged download leaves nothing behind: through v2 each chunk against the signed
//! listing's chunk tree as it arrives (the listing this client fetched last; the tree's root
//! binds the file's length too, so no whole-file hash is needed on top); through v1 (original
//! peers) the whole file against the listing's sha256.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{CatalogClient, ClientError, Result};

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
    // The protocol is what the catalog's listing said; an outage never means v1.
    if client.speaks_v2() {
        client.open(hash, Some(byte_size)).await?.read_all(&mut write).await?;
    } else {
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
    let out_err = |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", out.display());
    writer.flush().map_err(out_err)?;
    drop(writer);
    tmp.as_file().sync_all().map_err(out_err)?;
    tmp.persist(out).map_err(|e| anyhow::anyhow!("cannot write {}: {}", out.display(), e.error))?;
    Ok(written)
}
