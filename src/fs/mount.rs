//! Mount lifecycle: check the mountpoint, gather the catalogs this context can read, mount,
//! keep listings fresh (TTL poll, and heartbeats: the account's own catalog servers', and the
//! global service's re-broadcast of its imports' owners'), unmount cleanly on
//! SIGINT/SIGTERM, and `umount`.
//!
//! Invariants:
//! - The mount appears within [`FIRST_LISTING_WAIT`] whatever its catalogs do. Each catalog
//!   starts from its last known listing (its index for an own catalog, the listing saved on
//!   disk by an earlier mount for an import), and every first listing is fetched at once, each
//!   in its own task with its own deadline; one that answers late fills its folder in then.
//! - Refreshes run concurrently (at most [`MAX_CONCURRENT_REFRESHES`]), one at a time per
//!   catalog, so one slow or offline catalog never delays another.
//! - Kernel invalidations are sent from a blocking thread, never from a FUSE callback.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore};

use super::fuse::FuseAdapter;
use super::presence;
use super::{FsOptions, Invalidations, MountedCatalog, NatsterFs, RemoteSource};
use crate::client::{CatalogClient, ClientOptions};
use crate::context::{Context, Home};
use crate::global::client::GlobalClient;
use crate::identity::{Identity, PinStore};
use crate::index::Catalog;
use crate::protocol::CatalogSummary;

/// Longest the mount waits for first listings before it appears.
pub const FIRST_LISTING_WAIT: Duration = Duration::from_millis(1000);
/// Bound on fetching one whole listing (all its pages).
pub const LISTING_DEADLINE: Duration = Duration::from_secs(60);
/// Listings fetched at once.
pub const MAX_CONCURRENT_REFRESHES: usize = 8;

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

/// A catalog to mount, with the listing it starts from.
pub struct Gathered {
    pub catalog: MountedCatalog,
    /// Own catalogs: their index. Imports: the listing an earlier mount saved, if any.
    pub seed: Option<CatalogSummary>,
    /// Where this catalog's listing is saved for the next mount (imports only).
    pub saved_at: Option<PathBuf>,
}

/// Where the last listing of catalog `name` of `owner` is kept between mounts.
fn saved_listing_path(home: &Home, owner: &str, name: &str) -> PathBuf {
    home.path().join("listings").join(owner).join(format!("{name}.json"))
}

/// The catalogs this context can read: its own (every catalog file in the home) and its
/// imports. A name used by two owners becomes `<catalog>@<owner8>` for the imported ones.
pub fn gather_catalogs(
    home: &Home,
    context: &Context,
    nats: &async_nats::Client,
    options: &MountOptions,
) -> Result<Vec<Gathered>> {
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
    let v1_max = options.fs.cache_bytes as u64 / 2;
    let identity = Arc::new(Identity::load(home, context)?);
    let pins = PinStore::in_home(home);
    // Own catalogs are ours (our account, or the key pinned at first contact without
    // accounts); imports are their owner's.
    let source = |name: &str, owner: Option<&str>| -> Result<Arc<RemoteSource>> {
        let client = CatalogClient::for_owner(
            nats.clone(),
            name,
            owner,
            options.client.clone(),
            identity.clone(),
            pins.clone(),
        )?;
        Ok(Arc::new(RemoteSource::new(client, v1_max)))
    };
    let mut gathered = Vec::new();
    for catalog in &own {
        let mounted = MountedCatalog::new(
            catalog.name.clone(),
            catalog.name.clone(),
            me.clone(),
            source(&catalog.name, context.account_public_key.as_deref())?,
        );
        gathered.push(Gathered { catalog: mounted, seed: Some(catalog.summary()), saved_at: None });
    }
    for import in &context.imports {
        let dir_name = if counts.get(import.catalog.as_str()).copied().unwrap_or(0) > 1 {
            format!("{}@{}", import.catalog, import.owner.chars().take(8).collect::<String>())
        } else {
            import.catalog.clone()
        };
        let saved_at = saved_listing_path(home, &import.owner, &import.catalog);
        let seed = match crate::store::load_json::<CatalogSummary>(&saved_at) {
            Ok(seed) => seed,
            Err(e) => {
                tracing::warn!(catalog = %dir_name, "ignoring the saved listing: {e:#}");
                None
            }
        };
        let mounted = MountedCatalog::new(
            dir_name,
            import.catalog.clone(),
            import.owner.clone(),
            source(&import.catalog, Some(&import.owner))?,
        );
        gathered.push(Gathered { catalog: mounted, seed, saved_at: Some(saved_at) });
    }
    Ok(gathered)
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
    let gathered = gather_catalogs(home, context, &nats, &options)?;
    let mut catalogs = Vec::new();
    let mut seeds = Vec::new();
    let mut saved_at = Vec::new();
    for g in gathered {
        catalogs.push(Arc::new(g.catalog));
        seeds.push(g.seed);
        saved_at.push(g.saved_at);
    }
    let fs = Arc::new(NatsterFs::new(catalogs, options.fs.clone()));
    for (i, seed) in seeds.iter().enumerate() {
        if let Some(seed) = seed {
            fs.apply_listing(i, seed);
        }
    }
    let (invalidations, invalidated) = mpsc::unbounded_channel();
    let refresher = Arc::new(Refresher {
        fs: fs.clone(),
        saved_at,
        invalidations,
        permits: Semaphore::new(MAX_CONCURRENT_REFRESHES),
    });

    // First listings, all at once; the mount appears when they are in or the wait is over,
    // whichever comes first. Late ones fill their folders in when they arrive.
    let first: Vec<_> = (0..fs.catalogs.len()).map(|i| runtime.spawn(refresher.clone().refresh(i))).collect();
    runtime.block_on(async {
        if tokio::time::timeout(FIRST_LISTING_WAIT, futures::future::join_all(first)).await.is_err() {
            tracing::info!("mounting before every first listing arrived; the rest fill in as they answer");
        }
    });

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
    let (result_tx, result_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("fuse".into()).spawn(move || {
        let result = session.run();
        let _ = ended_tx.send(());
        let _ = result_tx.send(result);
    })?;
    eprintln!("mounted {} catalog(s) on {}", fs.catalogs.len(), mountpoint.display());

    let invalidator = runtime.spawn(forward_invalidations(invalidated, notifier));
    let me = context.account_public_key.clone().unwrap_or_else(|| "self".into());
    let fresh = runtime.spawn(keep_fresh(refresher, nats.clone(), options.listing_ttl, me));
    let signalled = runtime.block_on(async {
        tokio::select! {
            _ = crate::cli::shutdown_signal() => { tracing::info!("signal received; unmounting"); true }
            _ = ended_rx => { tracing::info!("unmounted externally"); false }
        }
    });
    fresh.abort();
    invalidator.abort();
    if signalled {
        if let Err(e) = unmounter.unmount() {
            if e.raw_os_error() == Some(libc::EBUSY) || e.to_string().contains("busy") {
                // Never left mounted or stale: detached now, gone for good once files close.
                tracing::warn!(
                    "{} is busy (a program still has files open in it): detached it lazily, those files now fail to read; close them before unmounting next time",
                    mountpoint.display()
                );
                detach_lazily(&mountpoint);
            } else {
                tracing::warn!("unmount of {} failed: {e}", mountpoint.display());
            }
        }
    }
    // After a lazy detach the session lasts until the last open file closes; exiting ends it
    // (the kernel aborts the connection), so wait only briefly.
    match result_rx.recv_timeout(Duration::from_secs(1)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("FUSE session ended with: {e}"),
        Err(_) => tracing::info!("files still open in the detached mount; exiting ends their session"),
    }
    runtime.shutdown_timeout(Duration::from_millis(500));
    eprintln!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Tells the kernel what changed, off the runtime's workers (a notification is a write to
/// /dev/fuse that may wait on the kernel).
async fn forward_invalidations(mut invalidated: mpsc::UnboundedReceiver<Invalidations>, notifier: fuser::Notifier) {
    let notifier = Arc::new(notifier);
    while let Some(inv) = invalidated.recv().await {
        let notifier = notifier.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (parent, name) in &inv.entries {
                let _ = notifier.inval_entry(fuser::INodeNo(*parent), std::ffi::OsStr::new(name));
            }
            for ino in &inv.inodes {
                let _ = notifier.inval_inode(fuser::INodeNo(*ino), 0, -1);
            }
        })
        .await;
    }
}

/// Fetches listings and applies them; shared by the first fetch, the TTL poll and heartbeats.
struct Refresher {
    fs: Arc<NatsterFs>,
    /// Per catalog: where its listing is saved between mounts (imports only).
    saved_at: Vec<Option<PathBuf>>,
    invalidations: mpsc::UnboundedSender<Invalidations>,
    permits: Semaphore,
}

/// Clears a catalog's `refreshing` flag however the refresh ends.
struct RefreshGuard<'a>(&'a MountedCatalog);

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

impl Refresher {
    /// Fetches catalog `i`'s listing and applies it if it changed. Does nothing if a refresh
    /// of that catalog is already running.
    async fn refresh(self: Arc<Self>, i: usize) {
        let Some(catalog) = self.fs.catalogs.get(i).cloned() else { return };
        if catalog.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let _guard = RefreshGuard(&catalog);
        let Ok(_permit) = self.permits.acquire().await else { return };
        let listing = match tokio::time::timeout(LISTING_DEADLINE, catalog.source.listing()).await {
            Ok(Ok(listing)) => listing,
            Ok(Err(e)) => {
                let own = self.saved_at.get(i).is_some_and(|s| s.is_none());
                if own && e.is_transient() {
                    tracing::warn!(catalog = %catalog.dir_name, "not being served ({e}); listing it from its index, reads fail until `natster-mount catalog serve {}` runs", catalog.name);
                } else {
                    tracing::warn!(catalog = %catalog.dir_name, "cannot refresh listing ({e}); showing the last one known");
                }
                return;
            }
            Err(_) => {
                tracing::warn!(catalog = %catalog.dir_name, "listing did not arrive within {LISTING_DEADLINE:?}; showing the last one known");
                return;
            }
        };
        if !listing.revision.is_empty() && listing.revision == catalog.revision() {
            return;
        }
        tracing::info!(catalog = %catalog.dir_name, revision = %listing.revision, entries = listing.entries.len(), "listing updated");
        let inv = self.fs.apply_listing(i, &listing);
        if !inv.is_empty() {
            let _ = self.invalidations.send(inv);
        }
        if let Some(Some(path)) = self.saved_at.get(i).cloned() {
            let saved = tokio::task::spawn_blocking(move || {
                let bytes = serde_json::to_vec(&listing)?;
                crate::store::write_atomic(&path, &bytes, 0o600)
            })
            .await;
            if let Ok(Err(e)) = saved {
                tracing::warn!(catalog = %catalog.dir_name, "cannot save the listing for the next mount: {e:#}");
            }
        }
    }

    /// Starts a refresh of catalog `i` in its own task.
    fn spawn_refresh(self: &Arc<Self>, i: usize) {
        tokio::spawn(self.clone().refresh(i));
    }
}

/// Polls every TTL, reacts at once to a heartbeat announcing a new revision, and keeps each
/// catalog's presence (see `super::presence`).
async fn keep_fresh(refresher: Arc<Refresher>, nats: async_nats::Client, ttl: Duration, me: String) {
    let fs = refresher.fs.clone();
    let mut subscriptions = Vec::new();
    for subject in presence::SUBJECTS {
        match nats.subscribe(subject).await {
            Ok(s) => subscriptions.push(s),
            Err(e) => tracing::warn!("no heartbeats on {subject} ({e}); relying on the {ttl:?} poll"),
        }
    }
    let mut beats = futures::stream::select_all(subscriptions);
    let global = GlobalClient::new(nats.clone(), presence::SHARES_TIMEOUT);
    tokio::spawn(presence_from_shares(fs.clone(), global.clone()));
    let mut tick = tokio::time::interval(ttl);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for i in 0..fs.catalogs.len() {
                    refresher.spawn_refresh(i);
                }
                tokio::spawn(presence_from_shares(fs.clone(), global.clone()));
            }
            Some(msg) = beats.next() => {
                let Some(beat) = presence::parse(msg.subject.as_str(), &msg.payload) else { continue };
                for (i, catalog) in fs.catalogs.iter().enumerate() {
                    if !beat.is_about(&catalog.name, &catalog.owner, &me) {
                        continue;
                    }
                    let before = catalog.presence();
                    catalog.set_presence(beat.presence());
                    if beat.needs_refresh(&catalog.revision(), &before) {
                        refresher.spawn_refresh(i);
                    }
                }
            }
        }
    }
}

/// Presence of every catalog from the global service's `my.shares` (nothing changes when it
/// does not answer).
async fn presence_from_shares(fs: Arc<NatsterFs>, global: GlobalClient) {
    match global.my_shares().await {
        Ok(shares) => {
            for catalog in &fs.catalogs {
                if let Some(p) = presence::from_shares(&shares, &catalog.name, &catalog.owner) {
                    catalog.set_presence(p);
                }
            }
        }
        Err(e) => tracing::debug!("no presence from the global service: {e}"),
    }
}

/// Detaches the mount at `path` lazily (`fusermount3 -uz`): it leaves the namespace now.
fn detach_lazily(path: &Path) {
    match std::process::Command::new("fusermount3").arg("-uz").arg(path).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            tracing::warn!("lazy unmount of {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim())
        }
        Err(e) => tracing::warn!("cannot run fusermount3 to detach {}: {e}", path.display()),
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
