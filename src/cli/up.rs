//! The long-running commands and their companions: `mount`, `up`, `status`, `service`, and
//! the fstab helper (`natster-mount SOURCE MOUNTPOINT -o OPTIONS`). The work is in `daemon`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::Globals;
use crate::client::ClientOptions;
use crate::daemon::ready::{self, ReadyPipe};
use crate::daemon::{self, DaemonConfig, MountPlan, MountTarget, Role};
use crate::server::ServerOptions;

/// The readiness pipe a daemonizing parent gave this process, taken before any thread starts.
static READY_PIPE: Mutex<Option<ReadyPipe>> = Mutex::new(None);

/// Takes the readiness pipe from the environment; call first thing in `main`.
pub fn capture_ready_pipe() {
    *READY_PIPE.lock().unwrap_or_else(|p| p.into_inner()) = ReadyPipe::from_env();
}

fn take_ready_pipe() -> Option<ReadyPipe> {
    READY_PIPE.lock().unwrap_or_else(|p| p.into_inner()).take()
}

pub struct MountArgs {
    pub mountpoint: PathBuf,
    pub cache_size: u64,
    pub read_timeout: Duration,
    pub listing_ttl: Duration,
    pub foreground: bool,
    pub allow_other: bool,
    /// Owner shown for every file and folder (default: the mounting user).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// What a mount (or the web UI, on the same read engine) runs with; checks `--cache-size`.
pub(super) fn mount_options(g: &Globals, args: &MountArgs) -> Result<crate::fs::mount::MountOptions> {
    if args.cache_size < 4 * 1024 * 1024 {
        bail!("--cache-size must be at least 4M (one chunk per open file needs room)");
    }
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Ok(crate::fs::mount::MountOptions {
        fs: crate::fs::FsOptions {
            cache_bytes: usize::try_from(args.cache_size).unwrap_or(usize::MAX),
            read_timeout: args.read_timeout,
            uid: args.uid.unwrap_or(uid),
            gid: args.gid.unwrap_or(gid),
            ..crate::fs::FsOptions::default()
        },
        listing_ttl: args.listing_ttl,
        client: ClientOptions {
            request_timeout: g.timeout.min(args.read_timeout),
            chunk_timeout: (args.read_timeout / 4).max(Duration::from_millis(200)),
            retries: 2,
            ..ClientOptions::default()
        },
        allow_other: args.allow_other,
    })
}

/// `/dev/fd/N` (mount.fuse3 with `drop_privileges` mounted already and passes the device).
fn fd_mountpoint(path: &Path) -> Option<i32> {
    path.to_str()?.strip_prefix("/dev/fd/")?.parse().ok().filter(|fd| *fd > 2)
}

pub fn mount(g: &Globals, args: MountArgs) -> Result<()> {
    let options = mount_options(g, &args)?;
    g.load_context()?;
    if !args.foreground {
        return mount_in_background(g, &args);
    }
    let target = match fd_mountpoint(&args.mountpoint) {
        Some(fd) => {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                bail!(
                    "{} is not an open descriptor; mount.fuse3 passes one with drop_privileges",
                    args.mountpoint.display()
                );
            }
            // SAFETY: the descriptor was handed to this process to serve (checked open above);
            // nothing else in it uses that number.
            MountTarget::Fd(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
        }
        None => MountTarget::Dir(args.mountpoint.clone()),
    };
    daemon::run(
        g.home.clone(),
        DaemonConfig {
            role: Role::Mount,
            context: g.context.clone(),
            connect_timeout: g.timeout,
            mount: Some(MountPlan { target, options }),
            server: ServerOptions::default(),
            ready_pipe: take_ready_pipe(),
        },
    )
}

/// Re-runs this command with --foreground as a detached process, and returns once it says
/// through the readiness pipe that the mount is up (or fails with its error).
fn mount_in_background(g: &Globals, args: &MountArgs) -> Result<()> {
    let mountpoint = match fd_mountpoint(&args.mountpoint) {
        Some(_) => args.mountpoint.clone(),
        None => crate::fs::mount::check_mountpoint(&args.mountpoint)?,
    };
    g.home.ensure()?;
    let log_path = g.home.path().join("mount.log");
    let mut child: Vec<OsString> = vec![
        "--context".into(),
        g.context.clone().into(),
        "--timeout".into(),
        g.timeout.as_secs_f64().to_string().into(),
        "mount".into(),
        mountpoint.clone().into(),
        "--cache-size".into(),
        args.cache_size.to_string().into(),
        "--read-timeout".into(),
        args.read_timeout.as_secs_f64().to_string().into(),
        "--listing-ttl".into(),
        args.listing_ttl.as_secs_f64().to_string().into(),
        "--foreground".into(),
    ];
    if args.allow_other {
        child.push("--allow-other".into());
    }
    for (flag, id) in [("--uid", args.uid), ("--gid", args.gid)] {
        if let Some(id) = id {
            child.extend([flag.into(), id.to_string().into()]);
        }
    }
    // The first listings take at most a second; connecting never blocks the mount.
    let deadline = g.timeout * 2 + Duration::from_secs(10);
    let (pid, _) = ready::spawn_detached(&child, &[("NATSTER_HOME", g.home.path().into())], &log_path, deadline)?;
    outln!(
        "mounted on {} (pid {pid}, log {}); unmount with `natster-mount umount {}`",
        mountpoint.display(),
        log_path.display(),
        mountpoint.display()
    );
    Ok(())
}

pub fn umount(mountpoint: &Path) -> Result<()> {
    crate::fs::mount::umount(mountpoint)?;
    outln!("unmounted {}", mountpoint.display());
    Ok(())
}

pub struct UpArgs {
    pub mountpoint: Option<PathBuf>,
    pub no_mount: bool,
    pub mount: MountArgs,
    pub chunk_size: u32,
}

/// `~/Natster`.
pub fn default_mountpoint() -> Result<PathBuf> {
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join("Natster")),
        None => bail!("HOME is not set; give the mountpoint with --mountpoint DIR"),
    }
}

/// `up`: serve what is marked, mount everything readable, follow the home, until signalled.
pub fn up(g: &Globals, args: UpArgs) -> Result<()> {
    let options = mount_options(g, &args.mount)?;
    g.load_context()?;
    let mount = if args.no_mount {
        None
    } else {
        let dir = match args.mountpoint {
            Some(dir) => dir,
            None => default_mountpoint()?,
        };
        // A missing default folder is made; a stale mount of ours there is cleared at start.
        if !dir.exists() && std::fs::symlink_metadata(&dir).is_err() {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create mountpoint {}", dir.display()))?;
        }
        Some(MountPlan { target: MountTarget::Dir(dir), options })
    };
    daemon::run(
        g.home.clone(),
        DaemonConfig {
            role: Role::Up,
            context: g.context.clone(),
            connect_timeout: g.timeout,
            mount,
            server: ServerOptions { chunk_size: args.chunk_size, ..ServerOptions::default() },
            ready_pipe: take_ready_pipe(),
        },
    )
}

/// `catalog new --serve`, `catalog serve --at-login|--not-at-login`.
pub fn at_login(g: &Globals, name: &str, serve: bool) -> Result<()> {
    crate::index::Catalog::load(&g.home, name)?;
    let changed = crate::daemon::at_login::AtLogin::mark(&g.home, name, serve)?;
    match (serve, changed) {
        (true, true) => outln!("catalog '{name}' will be served by `natster-mount up` (a running one starts now)"),
        (true, false) => outln!("catalog '{name}' is already served by `natster-mount up`"),
        (false, true) => outln!("catalog '{name}' is no longer served by `natster-mount up` (a running one stops now)"),
        (false, false) => outln!("catalog '{name}' was not served by `natster-mount up`; nothing to undo"),
    }
    Ok(())
}

/// `status`: what every `up`, `mount` and `catalog serve` of this home reports.
pub fn status(g: &Globals, json: bool) -> Result<()> {
    use crate::daemon::status;
    let found = status::gather(&g.home);
    if json {
        for report in &found {
            outln!("{}", serde_json::to_string(report)?);
        }
        return Ok(());
    }
    if found.is_empty() {
        outln!(
            "nothing is served or mounted from {} on this machine; start with `natster-mount up`",
            g.home.path().display()
        );
        return Ok(());
    }
    let yes_no = |b: Option<bool>| match b {
        Some(true) => "online",
        Some(false) => "offline",
        None => "unknown",
    };
    for (n, p) in found.iter().enumerate() {
        if n > 0 {
            outln!("");
        }
        let nats = if p.connected { "connected" } else { "NOT connected (retrying)" };
        outln!("{} (pid {}), context {}, NATS {} {nats}", p.role, p.pid, p.context, p.server);
        if !p.serving.is_empty() {
            outln!("  serving:");
            let rows: Vec<[String; 6]> = p
                .serving
                .iter()
                .map(|s| {
                    [
                        format!("    {}", s.catalog),
                        yes_no(Some(s.online)).to_string(),
                        format!("{} files", s.entries),
                        format!("{} reader(s) in the last minute", s.readers_last_minute),
                        format!("{} re-index(es)", s.reindexes),
                        s.problem.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            super::print_rows(&rows);
        }
        if let Some(m) = &p.mount {
            outln!(
                "  mounted on {} (cache {} of {}):",
                m.mountpoint,
                super::human_size(m.cache_used),
                super::human_size(m.cache_budget)
            );
            if m.catalogs.is_empty() {
                outln!("    (no catalogs yet)");
            }
            let rows: Vec<[String; 5]> = m
                .catalogs
                .iter()
                .map(|c| {
                    let whose = if c.own { "own".to_string() } else { format!("from {}", short(&c.owner)) };
                    [
                        format!("    {}", c.dir),
                        whose,
                        yes_no(c.online).to_string(),
                        format!("{} files", c.entries),
                        c.problem.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            super::print_rows(&rows);
        }
    }
    Ok(())
}

/// An account key shortened for a table.
fn short(key: &str) -> String {
    if key.len() > 12 {
        format!("{}…", &key[..12])
    } else {
        key.to_string()
    }
}
