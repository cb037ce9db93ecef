//! Mount lifecycle: check the mountpoint, mount, follow the catalogs this context can read
//! (folders come and go as imports and own catalogs do), keep listings fresh (TTL poll,
//! notices, and heartbeats: the account's own catalog servers', and the global service's
//! re-broadcast of its imports' owners'), unmount cleanly, and `umount`. [`LiveMount`] is the
//! running mount; `daemon` drives it (`mount`, `up`, the fstab helper).
//!
//! - `mountpoint`: checking, mounting over autofs, `umount`, mountinfo.
//! - `catalogs`: which catalogs a context can read and what each starts from.
//! - `refresh`: fetching and applying listings, the TTL poll, heartbeats and notices.
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

mod catalogs;
mod mountpoint;
mod refresh;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, watch, Semaphore};

use super::fuse::{FuseAdapter, KERNEL_READAHEAD};
use super::{FsOptions, Invalidations, NatsterFs};
use crate::client::ClientOptions;
pub use catalogs::{gather, gather_catalogs, plan_catalogs, Gathered, Planned};
pub use mountpoint::{check_mountpoint, check_mountpoint_clearing_stale, is_mounted, top_mount, umount};
use mountpoint::{detach_lazily, is_autofs, mount_directly, unmount_directly, widen_readahead};
use refresh::{keep_fresh, Refresher};

/// Longest the mount waits for first listings before it appears.
pub const FIRST_LISTING_WAIT: Duration = Duration::from_millis(1000);
/// Bound on fetching one whole listing (all its pages).
pub const LISTING_DEADLINE: Duration = Duration::from_secs(60);
/// Listings fetched at once.
pub const MAX_CONCURRENT_REFRESHES: usize = 8;
/// Threads answering the kernel.
pub const FUSE_THREADS: usize = 4;
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
        // Several FUSE threads, each reading its own clone of /dev/fuse: a lookup or readdir
        // never waits behind another request (reads already run on the runtime).
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
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
        if let Some(path) = &mountpoint {
            widen_readahead(path, KERNEL_READAHEAD / 1024);
        }
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
