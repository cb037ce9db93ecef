//! `catalog download`: one file, verified (every chunk against the signed chunk tree; from an
//! original v1 peer, the whole file against its sha256), to a path or to standard output.
//!
//! Invariants and tricky cases:
//! - Nothing is left behind on any exit path: the temporary file (`.natster-download-*.partial`
//!   beside OUT) is deleted when its owner drops, and SIGINT/SIGTERM drop the whole download
//!   future before the process exits (signals would otherwise kill it without unwinding).
//! - OUT `-` downloads and verifies into a temporary file in `$TMPDIR`, unlinks it, then copies
//!   it out: a reader never gets a byte that failed verification.
//! - The file gets 0666 less the umask, like any file a program creates.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::{bar, human_size, Globals, Shutdown};
use crate::client::{self, CatalogClient, ClientOptions};
use crate::protocol::{self, CatalogEntry};

/// Picks the entry a user named by hash or by path (with or without the leading `/`).
fn find_entry<'a>(entries: &'a [CatalogEntry], what: &str) -> Option<&'a CatalogEntry> {
    if protocol::is_sha256_hex(what) {
        return entries.iter().find(|e| e.hash == what);
    }
    let wanted = format!("/{}", what.trim_start_matches('/'));
    entries.iter().find(|e| e.path == wanted)
}

/// `catalog download`. A signal drops the download future, whose temporary file is deleted
/// on drop; nothing is left behind on any exit path. With OUT `-` the file is downloaded and
/// verified into an unlinked temporary file first and only then copied to standard output, so a
/// reader never receives a byte that failed verification (the price: the file's size in
/// `$TMPDIR`, and no output before the download ends).
pub async fn catalog_download(
    g: &Globals,
    name: &str,
    what: &str,
    out: &Path,
    force: bool,
    options: ClientOptions,
) -> Result<()> {
    let mut shutdown = Shutdown::new()?;
    let outcome = {
        let download = download(g, name, what, out, force, options);
        tokio::pin!(download);
        tokio::select! {
            done = &mut download => Ok(done),
            signal = shutdown.recv() => Err(signal),
        }
        // The download future, and with it every temporary file, is dropped here.
    };
    match outcome {
        Ok(done) => done,
        Err((name, number)) => {
            eprintln!("error: download interrupted by {name}; nothing was kept");
            // Exit at once, with the shell's code for a signal: a copy to standard output may
            // still block a runtime thread, and the runtime would wait for it.
            std::process::exit(128 + number)
        }
    }
}

async fn download(g: &Globals, name: &str, what: &str, out: &Path, force: bool, options: ClientOptions) -> Result<()> {
    if options.window == 0 || options.batch == 0 || options.batch > protocol::MAX_CHUNKS_PER_READ {
        bail!("--window must be at least 1 and --batch 1..={}", protocol::MAX_CHUNKS_PER_READ);
    }
    let to_stdout = out.as_os_str() == "-";
    let nats = g.connect().await?;
    let client = CatalogClient::for_context(nats, &g.home, &g.load_context()?, name, options)?;
    let summary = client.get().await.map_err(|e| crate::cli::explain_get(g, name, e))?;
    let entry = find_entry(&summary.entries, what).with_context(|| {
        format!("catalog '{name}' has no file with hash or path '{what}'; list it with `natster-mount catalog contents {name}`")
    })?;
    let base = entry.path.rsplit('/').next().filter(|b| !b.is_empty()).unwrap_or("download");
    // Held until the copy to stdout starts; removed with everything in it when dropped.
    let mut staging = None;
    let out: PathBuf = if to_stdout {
        let dir = tempfile::Builder::new()
            .prefix(".natster-download-")
            .tempdir()
            .context("cannot create a temporary folder for the download; set TMPDIR to a writable folder")?;
        let path = dir.path().join(base);
        staging = Some(dir);
        path
    } else if out.is_dir() {
        out.join(base)
    } else {
        out.to_path_buf()
    };
    if let (Ok(meta), false) = (std::fs::symlink_metadata(&out), to_stdout) {
        if !meta.is_file() {
            bail!("{} exists and is not a regular file; give a new file name or a folder", out.display());
        }
        if !force {
            bail!("{} already exists; remove it or pass --force to replace it", out.display());
        }
    }
    let started = Instant::now();
    let progress = bar(entry.byte_size, "downloading");
    let written =
        client::download_to_file(&client, &entry.hash, entry.byte_size, &out, |n| progress.set_position(n)).await;
    progress.finish_and_clear();
    let (written, verified) = written?;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    let summary = |to: &str| {
        format!(
            "{} ({}) → {to} in {:.2}s, {}/s, {verified}",
            entry.path,
            human_size(written),
            secs,
            human_size((written as f64 / secs) as u64)
        )
    };
    if let Some(staging) = staging {
        let mut file = std::fs::File::open(&out).with_context(|| format!("cannot read {}", out.display()))?;
        // Unlinked before the copy: even a reader closing the pipe (SIGPIPE) leaves nothing.
        drop(staging);
        let copied = tokio::task::spawn_blocking(move || {
            let mut stdout = std::io::stdout().lock();
            std::io::copy(&mut file, &mut stdout).and_then(|_| std::io::Write::flush(&mut stdout))
        })
        .await
        .context("the copy to standard output failed")?;
        match copied {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()), // the reader went away
            other => other.context("cannot write to standard output")?,
        };
        eprintln!("{}", summary("standard output"));
        return Ok(());
    }
    // Like any file a program creates: 0666 less the umask (the temporary file was 0600).
    crate::context::set_mode(&out, 0o666 & !umask())?;
    outln!("{}", summary(&out.display().to_string()));
    Ok(())
}

/// This process's umask, from /proc (reading it with umask(2) would briefly change it for
/// every thread); 022 if unknown.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Umask:"))?.to_string();
            u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()
        })
        .unwrap_or(0o022)
}
