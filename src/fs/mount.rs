//! Mount lifecycle: check the mountpoint, mount, follow the catalogs this context can read
//! (folders come and go as imports and own catalogs do), keep listings fresh (TTL poll,
//! notices, and heartbeats: the account's own catalog servers', and the global service's
//! re-broadcast of its imports' owners'), unmount cleanly, and `umount`. [`LiveMount`] is the
//! running mount; `daemon` drives it (`mount`, `up`, the fstab helper).
//!
//! Invariants:
//! - The mount appears within [`FIRST_LISTING_WAIT`] whatever its catalogs do. Each catalog
//!   starts from its last known listing (its index for an own catalog, the listing saved on
//!   disk by an earlier mount for an import), and every first listing is fetched at once, each
//!   in its own task with its own deadline; one that answers late fills its folder in then.
//! - Refreshes run concurrently (at most [`MAX_CONCURRENT_REFRESHES`]), one at a time per
//!   catalog, so one slow or offline catalog never delays another. A refresh asked for while
//!   one runs is not lost: it runs again right after (a notice can arrive mid-fetch).
//! - Listings are refreshed on the TTL, on a heartbeat or notice naming a new revision or a
//!   change of access, whenever NATS (re)connects, and, after a transient failure, again with
//!   backoff ([`FIRST_RETRY`] doubling up to the TTL) until the catalog answers.
//! - A catalog whose owner refuses us (403: unshared) shows an empty folder and forgets its
//!   saved listing; a share later fills it in again.
//! - Kernel invalidations are sent from a blocking thread, never from a FUSE callback.
//! - The mountpoint is refused when it is missing, not a folder, not empty or already mounted,
//!   except for an autofs trigger (`x-systemd.automount`): we mount over it with mount(2)
//!   ourselves (root), never stat-ing (std's statx), opening or listing it, since each would
//!   trigger the automount and wait for the very mount we are making.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};

use super::fuse::FuseAdapter;
use super::presence;
use super::{FsError, FsOptions, Invalidations, MountedCatalog, NatsterFs, RemoteSource};
use crate::client::{CatalogClient, ClientOptions};
use crate::context::{Context, Home};
use crate::global::client::GlobalClient;
use crate::identity::{Identity, PinStore};
use crate::index::Catalog;
use crate::protocol::{self, CatalogSummary};

/// Longest the mount waits for first listings before it appears.
pub const FIRST_LISTING_WAIT: Duration = Duration::from_millis(1000);
/// Bound on fetching one whole listing (all its pages).
pub const LISTING_DEADLINE: Duration = Duration::from_secs(60);
/// Listings fetched at once.
pub const MAX_CONCURRENT_REFRESHES: usize = 8;
/// First retry of a listing that failed for a transient reason.
pub const FIRST_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub fs: FsOptions,
    /// How often every listing is polled for a new revision.
    pub listing_ttl: Duration,
    pub client: ClientOptions,
    /// Let other users read the mount (`allow_other`; a media server running as its own user).
    pub allow_other: bool,
}

/// Where to mount: a checked folder, or a /dev/fuse descriptor someone else already mounted
/// (mount.fuse3 with `drop_privileges` passes `/dev/fd/N`).
pub enum Target {
    Path(PathBuf),
    Fd(OwnedFd),
}

/// Refuses a mountpoint that is missing, not a folder, not empty, already mounted or stale,
/// with what to do about it. An autofs trigger (`x-systemd.automount`) is accepted as is: the
/// mount goes on top of it, and listing it would wait for that very mount.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    // Before anything touches the folder itself: statx(2), which std uses, and open(2) would
    // trigger an autofs mount and wait for it (that is, for us).
    if let Some(abs) = absolute_unfollowed(path).filter(|abs| is_autofs(abs)) {
        return Ok(abs);
    }
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
    if top_mount(&path).is_some() {
        bail!("{} is already mounted; run `natster-mount umount {}` first", path.display(), path.display());
    }
    let mut entries = std::fs::read_dir(&path).with_context(|| format!("cannot list mountpoint {}", path.display()))?;
    if entries.next().is_some() {
        bail!("mountpoint {} is not empty; mount on an empty folder so nothing in it is hidden", path.display());
    }
    Ok(path)
}

/// `path` made absolute with its folder resolved but its last component left alone.
fn absolute_unfollowed(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    let parent = std::fs::canonicalize(absolute.parent()?).ok()?;
    Some(parent.join(absolute.file_name()?))
}

/// True if the topmost mount on `abs` is an autofs trigger.
fn is_autofs(abs: &Path) -> bool {
    top_mount(abs).is_some_and(|(kind, _)| kind == "autofs")
}

/// Mounts FUSE on `path` with mount(2) itself (root only), never opening or stat-ing the
/// folder, which on an autofs trigger would wait for this very mount: what libfuse does.
fn mount_directly(path: &Path, options: &MountOptions) -> Result<OwnedFd> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{} is an automount trigger; only root can mount over one (mount it from /etc/fstab)", path.display());
    }
    let dev = CString::new("/dev/fuse").unwrap_or_default();
    // SAFETY: open(2) of a constant path; the descriptor is owned below.
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot open /dev/fuse; is the fuse module loaded?");
    }
    // SAFETY: fd was just opened and is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={},rootmode=40000,user_id={uid},group_id={gid}", fd.as_raw_fd());
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| anyhow::anyhow!("{} holds a NUL byte", path.display()));
    let (source, target, kind, data) =
        (cstr(b"natster")?, cstr(path.as_os_str().as_bytes())?, cstr(b"fuse.natster-mount")?, cstr(data.as_bytes())?);
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot mount on {}", path.display()));
    }
    Ok(fd)
}

/// Unmounts what [`mount_directly`] mounted; lazily, with a warning, if busy.
fn unmount_directly(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(target) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return };
    // SAFETY: umount2(2) with a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return;
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        tracing::warn!(
            "{} is busy (a program still has files open in it): detached it lazily, those files now fail to read; close them before unmounting next time",
            path.display()
        );
        // SAFETY: as above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    } else {
        tracing::warn!("unmount of {} failed: {e}", path.display());
    }
}

/// Like [`check_mountpoint`], but first detaches a stale natster-mount left at `path` by a
/// process that died (a daemon restarted after a crash must not need a hand to come back).
pub fn check_mountpoint_clearing_stale(path: &Path) -> Result<PathBuf> {
    if absolute_unfollowed(path).is_some_and(|abs| is_autofs(&abs)) {
        return check_mountpoint(path);
    }
    let stale = matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if stale {
        tracing::warn!("{} is a stale mount left by a process that died; detaching it", path.display());
        umount(path)?;
    }
    check_mountpoint(path)
}

/// True if `path` is a mountpoint (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    top_mount(path).is_some()
}

/// Type and source of the topmost mount on the absolute path `abs`, if any (the two fields
/// after ` - ` in /proc/self/mountinfo).
pub fn top_mount(abs: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    top_mount_in(&info, abs)
}

fn top_mount_in(info: &str, abs: &Path) -> Option<(String, String)> {
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

/// A catalog to mount, with the listing it starts from.
pub struct Gathered {
    pub catalog: MountedCatalog,
    /// Own catalogs: their index. Imports: the listing an earlier mount saved, if any.
    pub seed: Option<CatalogSummary>,
    /// Where this catalog's listing is saved for the next mount (imports only).
    pub saved_at: Option<PathBuf>,
}

impl Gathered {
    /// What this catalog was planned as (its folder, name and owner).
    pub fn planned(&self) -> Planned {
        let c = &self.catalog;
        Planned {
            dir_name: c.dir_name.clone(),
            name: c.name.clone(),
            owner: c.owner.clone(),
            own: self.saved_at.is_none(),
        }
    }
}

/// Where the last listing of catalog `name` of `owner` is kept between mounts.
fn saved_listing_path(home: &Home, owner: &str, name: &str) -> PathBuf {
    home.path().join("listings").join(owner).join(format!("{name}.json"))
}

/// A catalog this context can read, known from names alone (nothing loaded yet).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Planned {
    /// Its folder in the mount root.
    pub dir_name: String,
    pub name: String,
    /// The owner's account key ("self" for a context without one).
    pub owner: String,
    pub own: bool,
}

/// The catalogs this context can read: its own (every catalog file in the home) and its
/// imports, each under the name [`crate::context::shown_names`] gives it (a name already
/// taken becomes `<catalog>@<owner label>`; the first catalog of a name keeps it).
/// Reads only the home's file names: cheap enough to run at every change of the home.
pub fn plan_catalogs(home: &Home, context: &Context) -> Vec<Planned> {
    let own = crate::index::catalog_names(home);
    let shown = crate::context::shown_names(&own, &context.imports);
    let me = context.account_public_key.clone().unwrap_or_else(|| "self".into());
    let mut planned: Vec<Planned> = own
        .iter()
        .map(|name| Planned { dir_name: name.clone(), name: name.clone(), owner: me.clone(), own: true })
        .collect();
    for (import, dir_name) in context.imports.iter().zip(shown) {
        planned.push(Planned { dir_name, name: import.catalog.clone(), owner: import.owner.clone(), own: false });
    }
    planned
}

/// [`plan_catalogs`], gathered.
pub fn gather_catalogs(
    home: &Home,
    context: &Context,
    nats: &async_nats::Client,
    options: &MountOptions,
) -> Result<Vec<Gathered>> {
    gather(home, context, nats, options, plan_catalogs(home, context))
}

/// Loads what `planned` catalogs start from (own: their index; imports: the listing saved by
/// an earlier mount) and makes their sources. An own catalog whose index cannot be read is
/// skipped, with a warning. Blocking (reads files).
pub fn gather(
    home: &Home,
    context: &Context,
    nats: &async_nats::Client,
    options: &MountOptions,
    planned: Vec<Planned>,
) -> Result<Vec<Gathered>> {
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
    for p in planned {
        if p.own {
            let catalog = match Catalog::load(home, &p.name) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("skipping catalog {}: {e:#}", p.name);
                    continue;
                }
            };
            let mounted = MountedCatalog::new(
                p.dir_name,
                p.name.clone(),
                p.owner,
                source(&p.name, context.account_public_key.as_deref())?,
            );
            gathered.push(Gathered { catalog: mounted, seed: Some(catalog.summary()), saved_at: None });
        } else {
            let saved_at = saved_listing_path(home, &p.owner, &p.name);
            let seed = match crate::store::load_json::<CatalogSummary>(&saved_at) {
                Ok(seed) => seed,
                Err(e) => {
                    tracing::warn!(catalog = %p.dir_name, "ignoring the saved listing: {e:#}");
                    None
                }
            };
            let Some(import) = context.imports.iter().find(|i| i.catalog == p.name && i.owner == p.owner) else {
                continue;
            };
            let client = CatalogClient::for_import(
                nats.clone(),
                import,
                options.client.clone(),
                identity.clone(),
                pins.clone(),
            )?;
            let src: Arc<dyn super::ChunkSource> = Arc::new(RemoteSource::new(client, v1_max));
            let mounted = MountedCatalog::new(p.dir_name, p.name, p.owner, src);
            gathered.push(Gathered { catalog: mounted, seed, saved_at: Some(saved_at) });
        }
    }
    Ok(gathered)
}

/// A mounted filesystem that follows its catalogs: see the module docs.
pub struct LiveMount {
    fs: Arc<NatsterFs>,
    refresher: Arc<Refresher>,
    /// None for a descriptor mounted by someone else: they unmount it.
    mountpoint: Option<PathBuf>,
    /// Mounted with mount(2) by us (over an autofs trigger): unmounted with umount2(2).
    direct: bool,
    unmounter: fuser::SessionUnmounter,
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
    result: std::sync::mpsc::Receiver<std::io::Result<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One mounted catalog as `status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountedStatus {
    pub dir: String,
    pub catalog: String,
    pub owner: String,
    pub own: bool,
    /// None until the first answer or failure.
    pub online: Option<bool>,
    pub entries: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl LiveMount {
    /// Mounts `catalogs` on `target` and starts keeping them fresh. Blocking (the mount and the
    /// kernel's handshake): call it off the runtime's workers, with the runtime's handle.
    /// `connected` says whether NATS is connected; every reconnect refreshes every listing.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        nats: async_nats::Client,
        connected: watch::Receiver<bool>,
        target: Target,
        options: &MountOptions,
        catalogs: Vec<Gathered>,
        me: String,
    ) -> Result<LiveMount> {
        let fs = Arc::new(NatsterFs::new(Vec::new(), options.fs.clone()));
        let (invalidations, invalidated) = mpsc::unbounded_channel();
        let refresher = Arc::new(Refresher {
            fs: fs.clone(),
            state: Mutex::new(HashMap::new()),
            invalidations,
            permits: Semaphore::new(MAX_CONCURRENT_REFRESHES),
            ttl: options.listing_ttl,
            me,
        });
        let first = {
            let _entered = runtime.enter();
            let planned: Vec<Planned> = catalogs.iter().map(|g| g.planned()).collect();
            refresher.sync(&planned, |_| catalogs)
        };
        // First listings, all at once; the mount appears when they are in or the wait is over,
        // whichever comes first. Late ones fill their folders in when they arrive.
        runtime.block_on(async {
            if tokio::time::timeout(FIRST_LISTING_WAIT, futures::future::join_all(first)).await.is_err() {
                tracing::info!("mounting before every first listing arrived; the rest fill in as they answer");
            }
        });
        // What the kernel must forget before it has seen anything is nothing.
        let mut invalidated = invalidated;
        while invalidated.try_recv().is_ok() {}

        let adapter = FuseAdapter { fs: fs.clone(), runtime: runtime.clone() };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("natster".into()),
            fuser::MountOption::Subtype("natster-mount".into()),
            fuser::MountOption::NoAtime,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
        ];
        if options.allow_other {
            // fuser adds `allow_other` for this ACL.
            config.acl = fuser::SessionACL::All;
        }
        config.n_threads = Some(2);
        let direct = matches!(&target, Target::Path(path) if is_autofs(path));
        let (mut session, mountpoint) = match target {
            Target::Path(path) if direct => {
                let fd = mount_directly(&path, options)?;
                let acl = config.acl;
                match fuser::Session::from_fd(adapter, fd, acl, config) {
                    Ok(session) => (session, Some(path)),
                    Err(e) => {
                        unmount_directly(&path);
                        return Err(anyhow::anyhow!("cannot serve the mount on {}: {e}", path.display()));
                    }
                }
            }
            Target::Path(path) => {
                let session = fuser::Session::new(adapter, &path, &config).map_err(|e| {
                    let hint = if options.allow_other && e.to_string().contains("allow_other") {
                        "allow_other needs `user_allow_other` in /etc/fuse.conf for users other than root"
                    } else {
                        "is /dev/fuse available and fusermount3 installed?"
                    };
                    anyhow::anyhow!("cannot mount on {}: {e}; {hint}", path.display())
                })?;
                (session, Some(path))
            }
            Target::Fd(fd) => {
                let acl = config.acl;
                let session = fuser::Session::from_fd(adapter, fd, acl, config)
                    .context("cannot serve the /dev/fuse descriptor passed as the mountpoint")?;
                (session, None)
            }
        };
        let notifier = session.notifier();
        let unmounter = session.unmount_callable();
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        let (result_tx, result_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("fuse".into()).spawn(move || {
            let result = session.run();
            let _ = ended_tx.send(());
            let _ = result_tx.send(result);
        })?;
        let tasks = vec![
            runtime.spawn(forward_invalidations(invalidated, notifier)),
            runtime.spawn(keep_fresh(refresher.clone(), nats, connected)),
        ];
        Ok(LiveMount { fs, refresher, mountpoint, direct, unmounter, ended: Some(ended_rx), result: result_rx, tasks })
    }

    /// Makes the mount show exactly the `planned` catalogs: folders of catalogs no longer
    /// readable go, and `make` builds the new ones, which appear and are listed at once.
    /// Call it inside the runtime.
    pub fn sync(&self, planned: &[Planned], make: impl FnOnce(Vec<Planned>) -> Vec<Gathered>) {
        drop(self.refresher.sync(planned, make));
    }

    /// A view of the mount for `status`, usable from any task.
    pub fn view(&self) -> MountView {
        MountView { fs: self.fs.clone(), refresher: self.refresher.clone(), mountpoint: self.mountpoint.clone() }
    }

    /// Number of catalog folders.
    pub fn catalog_count(&self) -> usize {
        self.fs.catalogs().len()
    }

    /// What each catalog folder shows and whether its catalog answers.
    pub fn status(&self) -> Vec<MountedStatus> {
        self.refresher.status()
    }

    /// Bytes of decrypted chunks cached, and the budget.
    pub fn cache_use(&self) -> (usize, usize) {
        (self.fs.cache.cached_bytes(), self.fs.cache.budget())
    }

    pub fn mountpoint(&self) -> Option<&Path> {
        self.mountpoint.as_deref()
    }

    /// Resolves when the filesystem was unmounted from outside (`umount`, `fusermount3 -u`).
    pub async fn ended(&mut self) {
        match self.ended.as_mut() {
            Some(ended) => {
                let _ = ended.await;
                self.ended = None;
            }
            None => std::future::pending().await,
        }
    }

    /// Unmounts (lazily, with a one-line warning, if files are still open) and waits about a
    /// second for the session to end. Blocking; bounded whether or not NATS is reachable.
    pub fn stop(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let still_mounted = self.ended.as_mut().is_some_and(|e| e.try_recv().is_err());
        if let (true, true, Some(path)) = (still_mounted, self.direct, &self.mountpoint) {
            unmount_directly(path);
        } else if let (true, Some(path)) = (still_mounted, &self.mountpoint) {
            if let Err(e) = self.unmounter.unmount() {
                if e.raw_os_error() == Some(libc::EBUSY) || e.to_string().contains("busy") {
                    // Never left mounted or stale: detached now, gone for good once files close.
                    tracing::warn!(
                        "{} is busy (a program still has files open in it): detached it lazily, those files now fail to read; close them before unmounting next time",
                        path.display()
                    );
                    detach_lazily(path);
                } else {
                    tracing::warn!("unmount of {} failed: {e}", path.display());
                }
            }
        }
        // After a lazy detach the session lasts until the last open file closes; exiting ends it
        // (the kernel aborts the connection), so wait only briefly.
        match self.result.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("FUSE session ended with: {e}"),
            Err(_) if self.mountpoint.is_none() => {
                tracing::info!("the mount was made by mount(8); it stays until `umount` removes it")
            }
            Err(_) => tracing::info!("files still open in the detached mount; exiting ends their session"),
        }
    }
}

/// What `status` reads of a running mount.
#[derive(Clone)]
pub struct MountView {
    fs: Arc<NatsterFs>,
    refresher: Arc<Refresher>,
    mountpoint: Option<PathBuf>,
}

impl MountView {
    pub fn status(&self) -> Vec<MountedStatus> {
        self.refresher.status()
    }

    /// Bytes of decrypted chunks cached, and the budget.
    pub fn cache_use(&self) -> (usize, usize) {
        (self.fs.cache.cached_bytes(), self.fs.cache.budget())
    }

    pub fn mountpoint(&self) -> Option<String> {
        self.mountpoint.as_ref().map(|p| p.display().to_string())
    }
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

/// What the refresher keeps per catalog slot.
struct CatalogState {
    /// Where its listing is saved between mounts (imports only).
    saved_at: Option<PathBuf>,
    /// Asked for again while a refresh ran.
    again: bool,
    /// A retry after a transient failure is scheduled.
    retry_pending: bool,
    retry_delay: Duration,
    online: Option<bool>,
    problem: Option<String>,
}

/// Fetches listings and applies them; shared by the first fetch, the TTL poll, heartbeats,
/// notices and reconnects.
struct Refresher {
    fs: Arc<NatsterFs>,
    state: Mutex<HashMap<usize, CatalogState>>,
    invalidations: mpsc::UnboundedSender<Invalidations>,
    permits: Semaphore,
    ttl: Duration,
    /// This context's account key ("self" without one): own catalogs' owner.
    me: String,
}

/// Clears a catalog's `refreshing` flag however the refresh ends.
struct RefreshGuard<'a>(&'a MountedCatalog);

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

/// How one fetch ended.
enum Outcome {
    Listed(CatalogSummary),
    Refused(String),
    Transient(String),
    Failed(String),
}

impl Refresher {
    fn state(&self) -> std::sync::MutexGuard<'_, HashMap<usize, CatalogState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, inv: Invalidations) {
        if !inv.is_empty() {
            let _ = self.invalidations.send(inv);
        }
    }

    /// Adds and removes catalog folders to match `planned` (`make` builds the new ones);
    /// returns the first refreshes of the new ones (already spawned). A catalog is the same
    /// while its name, owner and folder are.
    fn sync(
        self: &Arc<Self>,
        planned: &[Planned],
        make: impl FnOnce(Vec<Planned>) -> Vec<Gathered>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let key = |c: &MountedCatalog| (c.name.clone(), c.owner.clone(), c.dir_name.clone());
        let current: HashMap<_, usize> = self.fs.catalogs().into_iter().map(|(i, c)| (key(&c), i)).collect();
        let wanted: std::collections::HashSet<_> =
            planned.iter().map(|p| (p.name.clone(), p.owner.clone(), p.dir_name.clone())).collect();
        // Removals first: a folder name may pass to another catalog (`C` becoming `C@owner8`).
        for (k, i) in &current {
            if !wanted.contains(k) {
                tracing::info!(catalog = %k.2, "no longer readable here; its folder is removed");
                let inv = self.fs.remove_catalog(*i);
                self.state().remove(i);
                self.send(inv);
            }
        }
        let new: Vec<Planned> = planned
            .iter()
            .filter(|p| !current.contains_key(&(p.name.clone(), p.owner.clone(), p.dir_name.clone())))
            .cloned()
            .collect();
        if new.is_empty() {
            return Vec::new();
        }
        let mut first = Vec::new();
        for g in make(new) {
            if current.contains_key(&key(&g.catalog)) {
                continue;
            }
            let dir = g.catalog.dir_name.clone();
            let Some((i, inv)) = self.fs.add_catalog(Arc::new(g.catalog)) else {
                tracing::warn!(catalog = %dir, "a folder of that name is already mounted; skipped");
                continue;
            };
            self.send(inv);
            if let Some(seed) = &g.seed {
                let inv = self.fs.apply_listing(i, seed);
                self.send(inv);
            }
            let state = CatalogState {
                saved_at: g.saved_at,
                again: false,
                retry_pending: false,
                retry_delay: FIRST_RETRY,
                online: None,
                problem: None,
            };
            self.state().insert(i, state);
            if !current.is_empty() {
                tracing::info!(catalog = %dir, "now readable; folder added");
            }
            first.push(tokio::spawn(self.clone().refresh(i)));
        }
        first
    }

    fn status(&self) -> Vec<MountedStatus> {
        let state = self.state();
        self.fs
            .catalogs()
            .into_iter()
            .map(|(i, c)| {
                let s = state.get(&i);
                MountedStatus {
                    dir: c.dir_name.clone(),
                    catalog: c.name.clone(),
                    owner: c.owner.clone(),
                    own: s.is_some_and(|s| s.saved_at.is_none()),
                    online: s.and_then(|s| s.online),
                    entries: self.fs.entry_count(i),
                    problem: s.and_then(|s| s.problem.clone()),
                }
            })
            .collect()
    }

    /// Fetches catalog `i`'s listing and applies it if it changed. If a refresh of that catalog
    /// is already running, it runs once more when that one ends.
    /// (Boxed: a retry spawns a refresh from inside one.)
    fn refresh(self: Arc<Self>, i: usize) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let Some(catalog) = self.fs.catalog(i) else { return };
            if catalog.refreshing.swap(true, Ordering::AcqRel) {
                if let Some(s) = self.state().get_mut(&i) {
                    s.again = true;
                }
                return;
            }
            let _guard = RefreshGuard(&catalog);
            loop {
                if let Some(s) = self.state().get_mut(&i) {
                    s.again = false;
                }
                let Ok(permit) = self.permits.acquire().await else { return };
                let outcome = match tokio::time::timeout(LISTING_DEADLINE, catalog.source.listing()).await {
                    Ok(Ok(listing)) => Outcome::Listed(listing),
                    Ok(Err(FsError::Forbidden(why))) => Outcome::Refused(why),
                    Ok(Err(e)) if e.is_transient() => Outcome::Transient(e.to_string()),
                    Ok(Err(e)) => Outcome::Failed(e.to_string()),
                    Err(_) => Outcome::Transient(format!("listing did not arrive within {LISTING_DEADLINE:?}")),
                };
                drop(permit);
                self.apply(i, &catalog, outcome).await;
                let again = self.state().get(&i).is_some_and(|s| s.again);
                if !again {
                    return;
                }
            }
        })
    }

    async fn apply(self: &Arc<Self>, i: usize, catalog: &MountedCatalog, outcome: Outcome) {
        let (saved_at, was_online) = match self.state().get(&i) {
            Some(s) => (s.saved_at.clone(), s.online),
            None => return,
        };
        let own = saved_at.is_none();
        let listing = match outcome {
            Outcome::Listed(listing) => {
                if let Some(s) = self.state().get_mut(&i) {
                    (s.online, s.problem, s.retry_delay) = (Some(true), None, FIRST_RETRY);
                }
                if was_online == Some(false) {
                    tracing::info!(catalog = %catalog.dir_name, "answers again");
                }
                listing
            }
            Outcome::Refused(why) => {
                if was_online != Some(true) || catalog.revision() != "" || self.fs.entry_count(i) > 0 {
                    tracing::warn!(catalog = %catalog.dir_name, "the owner refuses this account ({why}); showing it empty until it is shared again");
                }
                if let Some(s) = self.state().get_mut(&i) {
                    (s.online, s.problem) = (Some(true), Some(format!("refused: {why}")));
                }
                let empty = CatalogSummary {
                    name: catalog.name.clone(),
                    description: String::new(),
                    image: None,
                    entries: Vec::new(),
                    revision: String::new(),
                    protocol: protocol::PROTOCOL_VERSION,
                    total_entries: None,
                };
                let inv = self.fs.apply_listing(i, &empty);
                self.send(inv);
                if let Some(path) = saved_at {
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
                }
                return;
            }
            Outcome::Transient(why) => {
                if was_online != Some(false) {
                    if own {
                        tracing::warn!(catalog = %catalog.dir_name, "not being served ({why}); listing it from its index, reads fail until it is served");
                    } else {
                        tracing::warn!(catalog = %catalog.dir_name, "cannot refresh listing ({why}); showing the last one known, retrying");
                    }
                }
                let mut state = self.state();
                let Some(s) = state.get_mut(&i) else { return };
                (s.online, s.problem) = (Some(false), Some(why));
                if !s.retry_pending {
                    s.retry_pending = true;
                    let delay = s.retry_delay;
                    s.retry_delay = (delay * 2).min(self.ttl.max(FIRST_RETRY));
                    let this = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if let Some(s) = this.state().get_mut(&i) {
                            s.retry_pending = false;
                        }
                        this.refresh(i).await;
                    });
                }
                return;
            }
            Outcome::Failed(why) => {
                tracing::warn!(catalog = %catalog.dir_name, "cannot refresh listing ({why}); showing the last one known");
                if let Some(s) = self.state().get_mut(&i) {
                    s.problem = Some(why);
                }
                return;
            }
        };
        if !listing.revision.is_empty() && listing.revision == catalog.revision() {
            return;
        }
        tracing::info!(catalog = %catalog.dir_name, revision = %listing.revision, entries = listing.entries.len(), "listing updated");
        let inv = self.fs.apply_listing(i, &listing);
        self.send(inv);
        if let Some(path) = saved_at {
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

/// Catalogs named `name` (of `owner`, when known) whose shown revision is not `revision`
/// (all of them if `force`).
fn due(fs: &NatsterFs, name: &str, owner: Option<&str>, revision: &str, force: bool) -> Vec<usize> {
    fs.catalogs()
        .into_iter()
        .filter(|(_, c)| c.name == name && owner.is_none_or(|o| c.owner == o) && (force || c.revision() != revision))
        .map(|(i, _)| i)
        .collect()
}

async fn subscribe_or_warn(
    nats: &async_nats::Client,
    subject: String,
    ttl: Duration,
) -> Option<async_nats::Subscriber> {
    match nats.subscribe(subject.clone()).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("no messages on {subject} ({e}); relying on the {ttl:?} poll");
            None
        }
    }
}

/// Polls every TTL, reacts at once to a heartbeat (own servers', or the global service's
/// re-broadcast of an owner's) or a notice (any owner) announcing a new revision or access,
/// keeps each catalog's presence (see `super::presence`), and refreshes everything when NATS
/// (re)connects.
async fn keep_fresh(refresher: Arc<Refresher>, nats: async_nats::Client, mut connected: watch::Receiver<bool>) {
    let fs = refresher.fs.clone();
    let ttl = refresher.ttl;
    let me = refresher.me.clone();
    let mut subscriptions = Vec::new();
    for subject in presence::SUBJECTS {
        subscriptions.extend(subscribe_or_warn(&nats, subject.to_string(), ttl).await);
    }
    let mut beats = futures::stream::select_all(subscriptions);
    let mut notices = subscribe_or_warn(&nats, protocol::notice_wildcard(), ttl).await;
    // Notices of catalogs imported per owner arrive as `natster.from.<owner>.media.<C>.notice`.
    let mut owner_notices = subscribe_or_warn(&nats, protocol::owner_notice_wildcard(), ttl).await;
    let global = GlobalClient::new(nats.clone(), presence::SHARES_TIMEOUT);
    tokio::spawn(presence_from_shares(fs.clone(), global.clone()));
    let mut tick = tokio::time::interval(ttl);
    tick.tick().await;
    let mut was_connected = *connected.borrow_and_update();
    loop {
        let due: Vec<usize> = tokio::select! {
            _ = tick.tick() => {
                tokio::spawn(presence_from_shares(fs.clone(), global.clone()));
                fs.catalogs().into_iter().map(|(i, _)| i).collect()
            }
            changed = connected.changed() => {
                if changed.is_err() {
                    // The connection's owner is gone: only the TTL is left.
                    connected = watch::channel(false).1;
                    continue;
                }
                let now = *connected.borrow_and_update();
                let reconnected = now && !was_connected;
                was_connected = now;
                if reconnected { fs.catalogs().into_iter().map(|(i, _)| i).collect() } else { Vec::new() }
            }
            Some(msg) = beats.next() => {
                let Some(beat) = presence::parse(msg.subject.as_str(), &msg.payload) else { continue };
                let mut due = Vec::new();
                for (i, catalog) in fs.catalogs() {
                    if !beat.is_about(&catalog.name, &catalog.owner, &me) {
                        continue;
                    }
                    let before = catalog.presence();
                    catalog.set_presence(beat.presence());
                    if beat.needs_refresh(&catalog.revision(), &before) {
                        due.push(i);
                    }
                }
                due
            }
            Some(msg) = next_message(&mut notices) => {
                let notice = parse_notice(&msg);
                // The subject's catalog token is what the import routes: the body must agree.
                let named = msg.subject.split('.').nth(2);
                match notice {
                    Some(n) if named == Some(n.catalog.as_str()) => due(&fs, &n.catalog, None, &n.revision, n.access),
                    _ => Vec::new(),
                }
            }
            Some(msg) = next_message(&mut owner_notices) => {
                let notice = parse_notice(&msg);
                // The owner and catalog tokens are what the per-owner import routes.
                let tokens: Vec<&str> = msg.subject.split('.').collect();
                match (notice, tokens.get(2), tokens.get(4)) {
                    (Some(n), Some(owner), Some(named)) if *named == n.catalog => {
                        due(&fs, &n.catalog, Some(owner), &n.revision, n.access)
                    }
                    _ => Vec::new(),
                }
            }
        };
        for i in due {
            refresher.spawn_refresh(i);
        }
    }
}

/// Presence of every catalog from the global service's `my.shares` (nothing changes when it
/// does not answer).
async fn presence_from_shares(fs: Arc<NatsterFs>, global: GlobalClient) {
    match global.my_shares().await {
        Ok(shares) => {
            for (_, catalog) in fs.catalogs() {
                if let Some(p) = presence::from_shares(&shares, &catalog.name, &catalog.owner) {
                    catalog.set_presence(p);
                }
            }
        }
        Err(e) => tracing::debug!("no presence from the global service: {e}"),
    }
}

/// A catalog server's notice, bounded; None for anything else.
fn parse_notice(msg: &async_nats::Message) -> Option<protocol::Notice> {
    if msg.payload.len() > protocol::MAX_NOTICE_BYTES {
        return None;
    }
    serde_json::from_slice(&msg.payload).ok()
}

async fn next_message(sub: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match sub.as_mut() {
        Some(s) => s.next().await,
        None => std::future::pending().await,
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
    let stale = matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    // A stale mount cannot be resolved itself (stat fails): resolve its parent instead.
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        match (absolute.parent().and_then(|p| std::fs::canonicalize(p).ok()), absolute.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            _ => absolute,
        }
    });
    match top_mount(&abs) {
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

/// Keeps `fs`'s listings fresh where no kernel needs telling (the web UI on its own): adds
/// `catalogs` to `fs` with their seeds, starts every first listing, then follows the TTL poll,
/// heartbeats, notices and reconnects, until [`ListingRefresh::stop`].
pub fn spawn_listing_refresh(
    fs: Arc<NatsterFs>,
    nats: async_nats::Client,
    connected: watch::Receiver<bool>,
    ttl: Duration,
    catalogs: Vec<Gathered>,
    me: String,
) -> ListingRefresh {
    // Nobody receives invalidations: sends to the closed channel are ignored.
    let (invalidations, _) = mpsc::unbounded_channel();
    let refresher = Arc::new(Refresher {
        fs,
        state: Mutex::new(HashMap::new()),
        invalidations,
        permits: Semaphore::new(MAX_CONCURRENT_REFRESHES),
        ttl,
        me,
    });
    let planned: Vec<Planned> = catalogs.iter().map(|g| g.planned()).collect();
    drop(refresher.sync(&planned, |_| catalogs));
    let task = tokio::spawn(keep_fresh(refresher.clone(), nats, connected));
    ListingRefresh { refresher, task }
}

/// The running [`spawn_listing_refresh`].
pub struct ListingRefresh {
    refresher: Arc<Refresher>,
    task: tokio::task::JoinHandle<()>,
}

impl ListingRefresh {
    /// Makes the engine hold exactly the `planned` catalogs, as [`LiveMount::sync`] does.
    pub fn sync(&self, planned: &[Planned], make: impl FnOnce(Vec<Planned>) -> Vec<Gathered>) {
        drop(self.refresher.sync(planned, make));
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topmost_mount_names_autofs_under_a_fuse_mount() {
        let info = "25 1 0:22 / /mnt/n rw,relatime shared:1 - autofs systemd-1 rw,fd=45,direct\n\
                    26 25 0:50 / /mnt/n rw,nosuid - fuse.natster-mount natster rw,user_id=0\n\
                    27 1 0:23 / /mnt/my\\040media rw - autofs systemd-1 rw,direct\n";
        assert_eq!(top_mount_in(info, Path::new("/mnt/n")), Some(("fuse.natster-mount".into(), "natster".into())));
        assert_eq!(top_mount_in(info, Path::new("/mnt/my media")), Some(("autofs".into(), "systemd-1".into())));
        assert_eq!(top_mount_in(info, Path::new("/mnt")), None);
    }
}
