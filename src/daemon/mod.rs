//! The long-running side: `up` (serve the catalogs marked for it and mount every readable
//! catalog, one process for a person's day), `mount` (the same without serving, also what the
//! fstab helper runs) and the parts `catalog serve` shares with them. Each follows the home:
//! new catalogs, imports, shares and unshares take effect without a restart.
//!
//! - `link`: the NATS connection, made in the background and kept.
//! - `watch`: debounced file watching (`notify`).
//! - `served`: one served catalog: server, folder watch and re-index, notices (`notice`).
//! - `at_login`: which catalogs `up` serves.
//! - `kept_events`: sends the events a command kept while the global service was down.
//! - `status`: the control socket `natster-mount status` asks.
//! - `ready`: sd_notify and the readiness pipe of a daemonizing parent.
//!
//! The fstab helper and the systemd unit are commands (`cli::helper`, `cli::service`).
//!
//! Invariants and tricky cases:
//! - Starts whether or not NATS is reachable: the mount shows what is known (indexes, saved
//!   listings) and fills in when NATS answers; servers subscribe when it connects. Why it is
//!   not connected is logged once per outage.
//! - The home is watched with inotify (immediate, and no work at all while nothing changes;
//!   polling the context, catalog names and marks every second would cost little but delay
//!   every change by up to that second), with a re-read every [`SAFETY_RESCAN`] in case an
//!   event was lost (a home on a network filesystem sends none).
//!   Only file names and the small files (context, marks, serve records) are read then;
//!   catalog indexes are loaded only for catalogs that appear.
//! - A catalog already served by another live process on this machine (a `catalog serve`) is
//!   left to it; `up` takes over when that process ends.
//! - SIGINT/SIGTERM stop everything within 2 s whether or not NATS is reachable: servers get
//!   their stop at once (each bounded at about 0.5 s), the mount is unmounted (lazily, with a
//!   warning, if busy), and the runtime is given 300 ms to wind down.
//! - The control loop runs on the main thread (`block_on`), not on a runtime worker, so the
//!   small reads of a reconcile never stall request handling.

pub mod at_login;
mod kept_events;
pub mod link;
mod notice;
pub mod ready;
pub mod served;
pub mod status;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::context::{Context, Home};
use crate::fs::mount::{self, LiveMount, MountOptions, Target};
use crate::server::ServerOptions;
use crate::serving::ServeRecord;
use at_login::AtLogin;
use kept_events::KeptEvents;
use ready::ReadyPipe;
use served::ServedCatalog;

/// Re-read of the home even without a file event.
pub const SAFETY_RESCAN: Duration = Duration::from_secs(30);
/// Bound on servers stopping after a signal.
const SERVERS_STOP: Duration = Duration::from_millis(700);
/// The home's files change rarely and in pairs (temporary file, rename).
const HOME_DEBOUNCE: watch::Debounce =
    watch::Debounce { quiet: Duration::from_millis(100), max_delay: Duration::from_millis(500) };

/// SIGINT and SIGTERM handlers installed at once, so that from creation on neither signal kills
/// the process before it can clean up.
pub struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Inside a runtime.
    pub fn new() -> Result<Shutdown> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
        let int = signal(SignalKind::interrupt()).context("cannot install a SIGINT handler")?;
        Ok(Shutdown { term, int })
    }

    /// Resolves with the signal's name and number.
    pub async fn recv(&mut self) -> (&'static str, i32) {
        tokio::select! {
            _ = self.term.recv() => ("SIGTERM", libc::SIGTERM),
            _ = self.int.recv() => ("SIGINT", libc::SIGINT),
        }
    }

    /// Resolves on the first SIGINT or SIGTERM: the future a command's stop waits on.
    pub async fn signalled(mut self) {
        self.recv().await;
    }
}

/// Which command runs the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `up`: serves the marked catalogs too.
    Up,
    /// `mount` (and the fstab helper): mounts only.
    Mount,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Up => "up",
            Role::Mount => "mount",
        }
    }
}

/// Where and how to mount. `up` clears a stale mount of ours on its folder first.
pub struct MountPlan {
    pub target: MountTarget,
    pub options: MountOptions,
}

pub enum MountTarget {
    /// A folder, checked before mounting.
    Dir(PathBuf),
    /// `/dev/fd/N` from mount.fuse3: already mounted, only to be served.
    Fd(std::os::fd::OwnedFd),
}

pub struct DaemonConfig {
    pub role: Role,
    pub context: String,
    pub connect_timeout: Duration,
    /// None: serve only (`up --no-mount`).
    pub mount: Option<MountPlan>,
    /// Options for every catalog `up` serves (its identity is filled in per catalog).
    pub server: ServerOptions,
    /// Told once the mount is up (or why it is not), when a parent daemonized us.
    pub ready_pipe: Option<ReadyPipe>,
}

/// Runs until SIGINT/SIGTERM (or, with a mount, until it is unmounted from outside).
pub fn run(home: Home, mut config: DaemonConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let pipe = config.ready_pipe.take();
    let result = run_in(&runtime, home, config, pipe);
    // A file read stuck on a dead disk must not hold up exit (the 2 s stop promise).
    runtime.shutdown_timeout(Duration::from_millis(300));
    result
}

fn run_in(runtime: &tokio::runtime::Runtime, home: Home, config: DaemonConfig, pipe: Option<ReadyPipe>) -> Result<()> {
    let mut pipe = pipe;
    let _entered = runtime.enter();
    // From here on neither signal kills the process before it can clean up.
    let mut shutdown = Shutdown::new()?;
    let started = start(runtime, &home, config);
    let (daemon, mut live) = match started {
        Ok(s) => s,
        Err(e) => {
            if let Some(p) = pipe.take() {
                p.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    let report = {
        let daemon = daemon.clone();
        let view = live.as_ref().map(|m| m.view());
        Arc::new(move || daemon.report(view.as_ref())) as Arc<dyn Fn() -> status::ProcessStatus + Send + Sync>
    };
    let _socket = match status::serve(&home, report) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("{e:#}");
            None
        }
    };
    runtime.block_on(daemon.reconcile(live.as_ref()));
    let summary = match &live {
        Some(m) => format!(
            "mounted {} catalog(s) on {}",
            m.catalog_count(),
            m.mountpoint().map(|p| p.display().to_string()).unwrap_or_else(|| "the descriptor given".into())
        ),
        None => "not mounting".to_string(),
    };
    let serving = daemon.serving_names();
    let summary = if daemon.role == Role::Up {
        format!("{summary}; serving {}", if serving.is_empty() { "nothing".into() } else { serving.join(", ") })
    } else {
        summary
    };
    eprintln!("{summary}; Ctrl-C to stop");
    ready::notify_ready(&summary);
    if let Some(p) = pipe.take() {
        p.ready(&summary);
    }

    let home_dir = watch::resolved(home.path());
    let home_watch = match watch::Watch::new(&[(&home_dir, false)], |e| {
        watch::file_names(e).any(|f| home_file_matters(&f))
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("cannot watch {} ({e}); changes are picked up within {SAFETY_RESCAN:?}", home_dir.display());
            None
        }
    };
    let mut rescan = tokio::time::interval_at(tokio::time::Instant::now() + SAFETY_RESCAN, SAFETY_RESCAN);
    runtime.block_on(async {
        loop {
            tokio::select! {
                (name, _) = shutdown.recv() => {
                    tracing::info!("{name} received; stopping");
                    break;
                }
                _ = ended(live.as_mut()) => {
                    tracing::info!("unmounted from outside (`natster-mount umount` or fusermount3 -u); stopping");
                    break;
                }
                _ = served::batch(home_watch.as_ref(), HOME_DEBOUNCE) => daemon.reconcile(live.as_ref()).await,
                _ = rescan.tick() => daemon.reconcile(live.as_ref()).await,
            }
        }
    });
    ready::notify_stopping();
    let stopping = daemon.stop_servers();
    if let Some(m) = live {
        let mountpoint = m.mountpoint().map(|p| p.display().to_string());
        m.stop();
        if let Some(mp) = mountpoint {
            eprintln!("unmounted {mp}");
        }
    }
    runtime.block_on(async {
        if tokio::time::timeout(SERVERS_STOP, futures::future::join_all(stopping)).await.is_err() {
            tracing::warn!("a server did not stop in time; exiting anyway");
        }
    });
    Ok(())
}

/// Waits for the mount to go away from outside; never without a mount.
async fn ended(live: Option<&mut LiveMount>) {
    match live {
        Some(m) => m.ended().await,
        None => std::future::pending().await,
    }
}

/// Files of the home whose change may change what is served or mounted.
fn home_file_matters(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".context") || name.ends_with(".json"))
}

/// The connection and settings, then the mount (if any).
fn start(
    runtime: &tokio::runtime::Runtime,
    home: &Home,
    config: DaemonConfig,
) -> Result<(Arc<Daemon>, Option<LiveMount>)> {
    let context = Context::load(home, &config.context)?;
    let target = match config.mount.as_ref().map(|p| &p.target) {
        // `up` restarted after a crash must come back by itself; `mount` says what is wrong.
        Some(MountTarget::Dir(dir)) if config.role == Role::Up => {
            Some(Target::Path(mount::check_mountpoint_clearing_stale(dir)?))
        }
        Some(MountTarget::Dir(dir)) => Some(Target::Path(mount::check_mountpoint(dir)?)),
        _ => None,
    };
    let link = runtime.block_on(link::connect(&context, config.connect_timeout))?;
    let kept_events = KeptEvents::start(home, &config.context, &context, link.nats.clone(), link.connected.clone());
    let (plan_target, mount_options) = match config.mount {
        Some(plan) => (Some(plan.target), Some(plan.options)),
        None => (None, None),
    };
    let daemon = Arc::new(Daemon {
        home: home.clone(),
        role: config.role,
        context_name: config.context,
        server_url: context.server_shown(),
        link,
        kept_events,
        mount_options,
        server_options: config.server,
        served: Mutex::new(BTreeMap::new()),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    // Servers first, so the mount's first listings of our own catalogs find them answering.
    runtime.block_on(async {
        daemon.reconcile(None).await;
        if *daemon.link.connected.borrow() {
            let serving: Vec<Arc<ServedCatalog>> = daemon.served().values().map(|t| t.catalog.clone()).collect();
            let all = futures::future::join_all(serving.iter().map(|c| c.serving()));
            let _ = tokio::time::timeout(mount::FIRST_LISTING_WAIT, all).await;
        }
    });
    let (Some(plan_target), Some(options)) = (plan_target, daemon.mount_options.as_ref()) else {
        return Ok((daemon, None));
    };
    let target = match (target, plan_target) {
        (Some(t), _) => t,
        (None, MountTarget::Fd(fd)) => Target::Fd(fd),
        (None, MountTarget::Dir(dir)) => Target::Path(dir),
    };
    let gathered = mount::gather_catalogs(home, &context, &daemon.link.nats, options)?;
    let live = LiveMount::start(
        runtime.handle(),
        daemon.link.nats.clone(),
        daemon.link.connected.clone(),
        target,
        options,
        gathered,
        context.account_public_key.clone().unwrap_or_else(|| "self".into()),
    )?;
    Ok((daemon, Some(live)))
}

/// A catalog `up` serves.
struct ServeTask {
    catalog: Arc<ServedCatalog>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// Failed starts in a row before this one.
    failures: u32,
    /// Set when the server stopped with an error: not started again before then. A failing
    /// server adds and removes its serve record, each a home change, so without it every
    /// failure would start the next at once.
    retry_at: Arc<Mutex<Option<std::time::Instant>>>,
}

/// Wait before starting a failed server again, doubling with each failure in a row.
const FIRST_SERVE_RETRY: Duration = Duration::from_secs(5);
const MAX_SERVE_RETRY: Duration = Duration::from_secs(60);

impl ServeTask {
    /// None while it runs or must wait; else how many failures in a row preceded its end.
    fn may_restart(&self, now: std::time::Instant) -> Option<u32> {
        if !self.task.is_finished() {
            return None;
        }
        match *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(at) if now < at => None,
            Some(_) => Some(self.failures + 1),
            None => Some(0),
        }
    }
}

struct Daemon {
    home: Home,
    role: Role,
    context_name: String,
    server_url: String,
    link: link::Link,
    kept_events: Option<KeptEvents>,
    mount_options: Option<MountOptions>,
    server_options: ServerOptions,
    served: Mutex<BTreeMap<String, ServeTask>>,
    started: u64,
}

/// What a reconcile reads from the home (on the blocking pool).
struct HomeState {
    context: Option<Context>,
    own: Vec<String>,
    marks: AtLogin,
    /// Own catalogs a live process other than this one serves.
    served_elsewhere: Vec<String>,
}

impl Daemon {
    fn served(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ServeTask>> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serving_names(&self) -> Vec<String> {
        self.served().keys().cloned().collect()
    }

    async fn read_home(&self) -> HomeState {
        let (home, name) = (self.home.clone(), self.context_name.clone());
        let read = tokio::task::spawn_blocking(move || {
            let context = match Context::load(&home, &name) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("{e:#}; keeping what is mounted");
                    None
                }
            };
            let own = crate::index::catalog_names(&home);
            let marks = AtLogin::load(&home).unwrap_or_else(|e| {
                tracing::warn!("{e:#}; serving nothing until it is fixed");
                AtLogin::default()
            });
            let me = std::process::id();
            let served_elsewhere = own
                .iter()
                .filter(|c| marks.serves(c))
                .filter(|c| ServeRecord::load_live(&home, c).is_some_and(|r| r.pid != me))
                .cloned()
                .collect();
            HomeState { context, own, marks, served_elsewhere }
        });
        read.await.unwrap_or(HomeState {
            context: None,
            own: Vec::new(),
            marks: AtLogin::default(),
            served_elsewhere: Vec::new(),
        })
    }

    /// Brings the mount and the servers in line with the home.
    async fn reconcile(&self, live: Option<&LiveMount>) {
        if let Some(k) = &self.kept_events {
            k.wake();
        }
        let state = self.read_home().await;
        if let (Some(live), Some(options), Some(context)) = (live, &self.mount_options, &state.context) {
            let planned = mount::plan_catalogs(&self.home, context);
            live.sync(&planned, |new| {
                mount::gather(&self.home, context, &self.link.nats, options, new).unwrap_or_else(|e| {
                    tracing::warn!("cannot mount the new catalogs: {e:#}");
                    Vec::new()
                })
            });
        }
        if self.role != Role::Up {
            return;
        }
        let wanted: Vec<&String> =
            state.own.iter().filter(|c| state.marks.serves(c) && !state.served_elsewhere.contains(c)).collect();
        let mut served = self.served();
        let gone: Vec<String> = served.keys().filter(|c| !wanted.contains(c)).cloned().collect();
        for name in gone {
            if let Some(mut task) = served.remove(&name) {
                if state.served_elsewhere.contains(&name) {
                    tracing::info!(catalog = %name, "served by another process now; leaving it to that one");
                } else {
                    tracing::info!(catalog = %name, "no longer marked for serving (or gone); stopping its server");
                }
                if let Some(stop) = task.stop.take() {
                    let _ = stop.send(());
                }
            }
        }
        let now = std::time::Instant::now();
        for name in wanted {
            let failures = match served.get(name).map(|t| t.may_restart(now)) {
                Some(None) => continue,
                Some(Some(failures)) => failures,
                None => 0,
            };
            match self.start_server(name, state.context.as_ref(), failures) {
                Ok(task) => {
                    served.insert(name.clone(), task);
                }
                Err(e) => tracing::warn!(catalog = %name, "cannot serve: {e:#}"),
            }
        }
    }

    fn start_server(&self, name: &str, context: Option<&Context>, failures: u32) -> Result<ServeTask> {
        let context = context.context("no context to serve with")?;
        let identity = crate::identity::Identity::load(&self.home, context)?;
        let options = ServerOptions { identity: Some(Arc::new(identity)), ..self.server_options.clone() };
        let record = ServeRecord::current(name, options.allow_all).save(&self.home)?;
        let catalog = ServedCatalog::new(name);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = catalog.clone().run(
            self.link.nats.clone(),
            self.link.connected.clone(),
            self.home.clone(),
            options,
            true,
            async {
                let _ = stopped.await;
            },
        );
        let name = name.to_string();
        let retry_at = Arc::new(Mutex::new(None));
        let failed = retry_at.clone();
        let task = tokio::spawn(async move {
            let _record = record;
            if let Err(e) = run.await {
                let wait = FIRST_SERVE_RETRY.saturating_mul(1 << failures.min(8)).min(MAX_SERVE_RETRY);
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now() + wait);
                tracing::warn!(catalog = %name, "stopped serving: {e:#}; trying again in {wait:?} or later");
            }
        });
        Ok(ServeTask { catalog, stop: Some(stop), task, failures, retry_at })
    }

    /// Tells every server to stop; returns their tasks to wait for.
    fn stop_servers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut served = self.served();
        std::mem::take(&mut *served)
            .into_values()
            .map(|mut t| {
                if let Some(stop) = t.stop.take() {
                    let _ = stop.send(());
                }
                t.task
            })
            .collect()
    }

    fn report(&self, view: Option<&mount::MountView>) -> status::ProcessStatus {
        status::ProcessStatus {
            pid: std::process::id(),
            role: self.role.name().to_string(),
            context: self.context_name.clone(),
            server: self.server_url.clone(),
            connected: *self.link.connected.borrow(),
            started: self.started,
            serving: self.served().values().map(|t| t.catalog.status()).collect(),
            mount: view.map(|v| {
                let (used, budget) = v.cache_use();
                status::MountStatus {
                    mountpoint: v.mountpoint().unwrap_or_default(),
                    cache_used: used as u64,
                    cache_budget: budget as u64,
                    catalogs: v.status(),
                }
            }),
        }
    }
}
