//! Mount lifecycle: check the mountpoint, gather the catalogs this context can read, mount,
//! keep listings fresh (TTL poll and the catalog servers' heartbeats), unmount cleanly on
//! SIGINT/SIGTERM, and `umount`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;

use super::fuse::FuseAdapter;
use super::{FsOptions, Invalidations, NatsterFs, Source};
use crate::client::{CatalogClient, ClientOptions};
use crate::context::{Context, Home};
use crate::index::Catalog;
use crate::server::HEARTBEAT_SUBJECT;

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub fs: FsOptions,
    /// How often every listing is polled for a new revision.
    pub listing_ttl: Duration,
    pub client: ClientOptions,
}

/// Refuses a mountpoint that is missing, not a folder, not empty, already mounted or stale,
/// with what to do about it.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{} is a stale mount (Transport endpoint is not connected); run `natster-mount umount {}` first",
            path.display(),
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {} does not exist; create it with `mkdir -p {}`", path.display(), path.display())
        }
        Err(e) => bail!("cannot use mountpoint {}: {e}", path.display()),
        Ok(m) if !m.is_dir() => bail!("mountpoint {} is not a folder; give an empty folder", path.display()),
        Ok(_) => {}
    }
    let path = std::fs::canonicalize(path).with_context(|| format!("cannot use mountpoint {}", path.display()))?;
    if is_mounted(&path) {
        bail!("{} is already mounted; run `natster-mount umount {}` first", path.display(), path.display());
    }
    let mut entries = std::fs::read_dir(&path).with_context(|| format!("cannot list mountpoint {}", path.display()))?;
    if entries.next().is_some() {
        bail!("mountpoint {} is not empty; mount on an empty folder so nothing in it is hidden", path.display());
    }
    Ok(path)
}

/// True if `path` is a mountpoint (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

/// The catalogs this context can read: its own (every catalog file in the home) and its
/// imports. A name used by two owners becomes `<catalog>@<owner8>` for the imported ones.
pub fn gather_sources(
    home: &Home,
    context: &Context,
    nats: &async_nats::Client,
    options: &ClientOptions,
) -> Result<Vec<(Source, Option<Catalog>)>> {
    let mut own = Vec::new();
    for name in crate::index::catalog_names(home) {
        match Catalog::load(home, &name) {
            Ok(c) => own.push(c),
            Err(e) => tracing::warn!("skipping catalog {name}: {e:#}"),
        }
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for name in own.iter().map(|c| c.name.as_str()).chain(context.imports.iter().map(|i| i.catalog.as_str())) {
        *counts.entry(name).or_default() += 1;
    }
    let me = context.account_public_key.clone().unwrap_or_else(|| "self".into());
    let mut sources = Vec::new();
    for catalog in &own {
        let client = CatalogClient::new(nats.clone(), &catalog.name, options.clone())?;
        sources.push((Source::new(catalog.name.clone(), me.clone(), client), Some(catalog.clone())));
    }
    for import in &context.imports {
        let dir_name = if counts.get(import.catalog.as_str()).copied().unwrap_or(0) > 1 {
            format!("{}@{}", import.catalog, import.owner.chars().take(8).collect::<String>())
        } else {
            import.catalog.clone()
        };
        let client = CatalogClient::new(nats.clone(), &import.catalog, options.clone())?;
        sources.push((Source::new(dir_name, import.owner.clone(), client), None));
    }
    Ok(sources)
}

/// Mounts and serves until unmounted or signalled. Blocks.
pub fn run(
    home: &Home,
    context: &Context,
    mountpoint: &Path,
    options: MountOptions,
    connect_timeout: Duration,
) -> Result<()> {
    let mountpoint = check_mountpoint(mountpoint)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let nats = runtime.block_on(context.connect(connect_timeout))?;
    let gathered = gather_sources(home, context, &nats, &options.client)?;
    let mut local_listings = Vec::new();
    let mut sources = Vec::new();
    for (source, local) in gathered {
        sources.push(Arc::new(source));
        local_listings.push(local);
    }
    let fs = Arc::new(NatsterFs::new(sources, options.fs.clone()));

    // First listings before the mount appears, so `ls` right after mounting sees them.
    runtime.block_on(async {
        let all = (0..fs.sources.len()).map(|i| refresh(&fs, i, true));
        futures::future::join_all(all).await;
    });
    for (i, local) in local_listings.iter().enumerate() {
        if let (Some(local), true) = (local, fs.sources[i].revision().is_empty()) {
            // Our own catalog, not being served right now: list it from its index file so it
            // still shows; reads fail with EIO until `catalog serve` runs.
            tracing::warn!(catalog = %local.name, "not being served; listing it from its index, reads will fail until `natster-mount catalog serve {}` runs", local.name);
            fs.apply_listing(i, &local.summary());
        }
    }

    let adapter = FuseAdapter { fs: fs.clone(), runtime: runtime.handle().clone() };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("natster".into()),
        fuser::MountOption::Subtype("natster-mount".into()),
        fuser::MountOption::NoAtime,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    config.n_threads = Some(2);
    let mut session = fuser::Session::new(adapter, &mountpoint, &config).with_context(|| {
        format!("cannot mount on {}; is /dev/fuse available and fusermount3 installed?", mountpoint.display())
    })?;
    let notifier = session.notifier();
    let mut unmounter = session.unmount_callable();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    let fuse_thread = std::thread::Builder::new().name("fuse".into()).spawn(move || {
        let result = session.run();
        let _ = ended_tx.send(());
        result
    })?;
    eprintln!("mounted {} catalog(s) on {}", fs.sources.len(), mountpoint.display());

    let refresher = runtime.spawn(keep_fresh(fs.clone(), nats.clone(), notifier, options.listing_ttl));
    let signalled = runtime.block_on(async {
        tokio::select! {
            _ = crate::cli::shutdown_signal() => { tracing::info!("signal received; unmounting"); true }
            _ = ended_rx => { tracing::info!("unmounted externally"); false }
        }
    });
    refresher.abort();
    if signalled {
        if let Err(e) = unmounter.unmount() {
            tracing::warn!("unmount of {} failed: {e}", mountpoint.display());
        }
    }
    match fuse_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("FUSE session ended with: {e}"),
        Err(_) => tracing::error!("FUSE thread panicked"),
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    eprintln!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Fetches catalog `i`'s listing and applies it if its revision changed.
async fn refresh(fs: &Arc<NatsterFs>, i: usize, first: bool) -> Option<Invalidations> {
    let source = &fs.sources[i];
    match source.client.get().await {
        Ok(listing) => {
            if !first && listing.revision == source.revision() && !listing.revision.is_empty() {
                return None;
            }
            tracing::info!(catalog = %source.dir_name, revision = %listing.revision, entries = listing.entries.len(), "listing updated");
            Some(fs.apply_listing(i, &listing))
        }
        Err(e) => {
            // Offline catalogs keep their last listing.
            tracing::warn!(catalog = %source.dir_name, "cannot refresh listing: {e}");
            None
        }
    }
}

#[derive(serde::Deserialize)]
struct HeartbeatBody {
    catalog: String,
    revision: String,
}

/// Polls every TTL and reacts at once to a heartbeat announcing a new revision.
async fn keep_fresh(fs: Arc<NatsterFs>, nats: async_nats::Client, notifier: fuser::Notifier, ttl: Duration) {
    let mut beats = match nats.subscribe(HEARTBEAT_SUBJECT).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("no heartbeats ({e}); relying on the {ttl:?} poll");
            None
        }
    };
    let mut tick = tokio::time::interval(ttl);
    tick.tick().await;
    loop {
        let due: Vec<usize> = tokio::select! {
            _ = tick.tick() => (0..fs.sources.len()).collect(),
            Some(msg) = async { match beats.as_mut() { Some(b) => b.next().await, None => std::future::pending().await } } => {
                match serde_json::from_slice::<HeartbeatBody>(&msg.payload) {
                    Ok(beat) => fs.sources.iter().enumerate()
                        .filter(|(_, s)| s.client.catalog() == beat.catalog && s.revision() != beat.revision)
                        .map(|(i, _)| i).collect(),
                    Err(_) => Vec::new(),
                }
            }
        };
        for i in due {
            if let Some(inv) = refresh(&fs, i, false).await {
                for (parent, name) in &inv.entries {
                    let _ = notifier.inval_entry(fuser::INodeNo(*parent), std::ffi::OsStr::new(name));
                }
                for ino in &inv.inodes {
                    let _ = notifier.inval_inode(fuser::INodeNo(*ino), 0, -1);
                }
            }
        }
    }
}

/// Unmounts `path` if it is a natster-mount FUSE mount; refuses anything else, naming what is
/// mounted there. Ours shows in /proc/self/mountinfo as type `fuse.natster-mount` (mounted
/// through fusermount3, which passes the subtype) or as type `fuse` with source `natster` (fuser
/// mounting directly as root, where the kernel gets no subtype). A stale mount (ENOTCONN) is
/// detached lazily.
pub fn umount(path: &Path) -> Result<()> {
    /// Type and source of the topmost mount on `abs`, if any: the two fields after ` - `.
    fn mount_type(abs: &Path) -> Option<(String, String)> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let wanted = abs.to_string_lossy().replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011");
        // The last line for a mountpoint is the topmost of mounts stacked on it.
        info.lines()
            .rev()
            .filter(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
            .filter_map(|l| {
                let mut fields = l.split_once(" - ")?.1.split(' ');
                Some((fields.next()?.to_string(), fields.next().unwrap_or_default().to_string()))
            })
            .next()
    }
    let stale = matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    // A stale mount cannot be resolved itself (stat fails): resolve its parent instead.
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        match (absolute.parent().and_then(|p| std::fs::canonicalize(p).ok()), absolute.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            _ => absolute,
        }
    });
    match mount_type(&abs) {
        None => bail!("{} is not mounted", path.display()),
        Some((kind, source)) if kind == "fuse.natster-mount" || (kind == "fuse" && source == "natster") => {}
        Some((kind, _)) => bail!("{} is a {kind} mount, not natster-mount; use umount(8)", path.display()),
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if stale {
        cmd.arg("-z");
    }
    let out = cmd.arg(&abs).output().context("cannot run fusermount3; install the fuse3 package")?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("busy") {
            bail!("{} is busy: a program still has files open in it; close them and try again", path.display());
        }
        bail!("cannot unmount {}: {msg}", path.display());
    }
    Ok(())
}
