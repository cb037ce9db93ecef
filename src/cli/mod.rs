//! The commands' bodies: what each subcommand does and prints. `main.rs` parses arguments and
//! calls these; the work itself lives in the concept modules. `download` holds `catalog
//! download`, `parse` the value parsers and checks of what users type.
//!
//! Invariants and tricky cases:
//! - Standard output goes through `outln!` ([`write_line`]): a one-shot command whose reader went away
//!   (`| head -1`) exits 0 at its next line, so every command prints only after its state is
//!   saved; daemons (serve, mount, operator up) drop such lines and keep running.
//! - `init` run again keeps the context's creds, account and imports unless new creds name
//!   another account.
//! - `catalog serve` leaves a [`ServeRecord`] while it runs, and refuses (unless `--force`) a
//!   catalog that a live record or another answering server already serves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{self, CatalogClient, ClientOptions};
use crate::context::{Context, Home};
use crate::index::{self, Catalog, ProgressEvent};
use crate::protocol;
use crate::server::{CatalogServer, ServerOptions};
use crate::serving::ServeRecord;

/// Whether a closed standard output ends the process (one-shot commands) or is ignored
/// (servers and mounts, which must outlive whatever reads their output).
static QUIET_EXIT_ON_CLOSED_STDOUT: AtomicBool = AtomicBool::new(false);

pub fn set_quiet_exit_on_closed_stdout(quiet: bool) {
    QUIET_EXIT_ON_CLOSED_STDOUT.store(quiet, Ordering::Relaxed);
}

/// Writes one line to standard output. `println!` panics when the reader has gone away
/// (`natster-mount catalog ls | head -1`). Resetting SIGPIPE to its default would end the
/// process quietly too, but async-nats writes its socket with writev(2), which raises SIGPIPE
/// when a server drops the connection: that would kill a download before it can remove its
/// temporary file. So SIGPIPE stays ignored and a closed stdout is handled here: a one-shot
/// command exits 0 at once (every command prints only after its state is saved), a daemon
/// drops the line.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
    if let Err(e) = written {
        if QUIET_EXIT_ON_CLOSED_STDOUT.load(Ordering::Relaxed) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}

/// `println!` through [`write_line`].
macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::write_line(format_args!($($arg)*)) };
}
pub(crate) use outln;

mod download;
pub mod inbox;
pub mod network;
mod outbox;
mod parse;

pub use download::catalog_download;
pub use parse::{parse_seconds, parse_size, validate_server_urls};

/// What every command needs: where state lives and which context to use.
pub struct Globals {
    pub home: Home,
    pub context: String,
    pub timeout: Duration,
}

impl Globals {
    pub fn load_context(&self) -> Result<Context> {
        Context::load(&self.home, &self.context)
    }

    pub async fn connect(&self) -> Result<async_nats::Client> {
        self.load_context()?.connect(self.timeout).await
    }
}

/// `init`: writes the context. A context run through `init` again keeps what it had (creds,
/// account, imports) unless new creds name another account.
pub fn init(g: &Globals, server: &str, creds: Option<&Path>) -> Result<()> {
    validate_server_urls(server)?;
    let mut context = Context::load(&g.home, &g.context).unwrap_or_default();
    context.server = server.trim().to_string();
    if let Some(c) = creds {
        let c = std::fs::canonicalize(c)
            .with_context(|| format!("creds file {} not found; give the path of your .creds file", c.display()))?;
        let account = crate::accounts::creds_account(&c)?;
        if context.account_public_key.as_deref() != Some(account.as_str()) {
            if !context.imports.is_empty() {
                eprintln!(
                    "note: these creds belong to another account ({account}); the {} import(s) of the previous \
                     account were dropped",
                    context.imports.len()
                );
            }
            context.imports.clear();
            let operator = crate::accounts::Operator::load(&crate::sharing::operator_home(g)).ok();
            context.account_name = operator.and_then(|op| op.account_by_key(&account)).map(|r| r.name);
            context.account_public_key = Some(account);
        }
        context.creds = Some(c);
    }
    let path = context.save(&g.home, &g.context)?;
    if let (None, Some(kept)) = (creds, &context.creds) {
        outln!("keeping creds {} (give --creds FILE to change them)", kept.display());
    }
    outln!("context '{}' written to {}", g.context, path.display());
    if let Some(account) = &context.account_public_key {
        outln!("account {account}");
    }
    Ok(())
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

pub fn catalog_new(g: &Globals, name: &str, dir: &Path, description: Option<&str>, force: bool) -> Result<()> {
    protocol::validate_catalog_name(name).map_err(anyhow::Error::msg)?;
    // A name means one catalog: an imported one keeps its name (its subjects would clash).
    if let Some(import) = g.load_context().ok().and_then(|c| c.imports.into_iter().find(|i| i.catalog == name)) {
        bail!(
            "catalog {name} is already imported from {}; pick another name or `natster-mount catalog unimport {name}` first",
            import.owner
        );
    }
    if Catalog::file_path(&g.home, name).exists() && !force {
        let old = Catalog::load(&g.home, name)?;
        let new_root = std::fs::canonicalize(dir).ok();
        if let Some(new_root) = new_root.filter(|r| Path::new(&old.root_dir) != r.as_path()) {
            bail!(
                "catalog {name} indexes {}; pass --force to re-root it at {} (its {} files would be dropped)",
                old.root_dir,
                new_root.display(),
                old.entries.len()
            );
        }
    }
    let started = Instant::now();
    let progress = bar(0, "hashing");
    let (catalog, report) = index::index_folder(&g.home, name, dir, description, &|event| match event {
        ProgressEvent::Start { bytes } => progress.set_length(bytes),
        ProgressEvent::Hashed(n) => progress.inc(n),
        ProgressEvent::Done => progress.finish_and_clear(),
    })?;
    for skipped in &report.skipped {
        eprintln!("skipped {skipped}");
    }
    outln!(
        "catalog '{}': {} files ({} hashed, {} unchanged, {} removed) from {} in {:.2}s",
        catalog.name,
        report.files,
        report.hashed,
        report.reused,
        report.removed,
        catalog.root_dir,
        started.elapsed().as_secs_f64()
    );
    outln!("written to {}", Catalog::file_path(&g.home, name).display());
    Ok(())
}

pub async fn catalog_serve(g: &Globals, name: &str, options: ServerOptions, force: bool) -> Result<()> {
    protocol::validate_catalog_name(name).map_err(anyhow::Error::msg)?;
    let other = ServeRecord::load_live(&g.home, name);
    if let Some(other) = other.as_ref().filter(|_| !force) {
        bail!(
            "catalog '{name}' is already served by {}; stop that one, or pass --force to serve it twice",
            other.whereabouts()
        );
    }
    let nats = g.connect().await?;
    if !force {
        // A server from another home or machine of this account leaves no record here; ask.
        let probe = ClientOptions { request_timeout: g.timeout.min(Duration::from_secs(2)), ..client_options(g) };
        match CatalogClient::new(nats.clone(), name, probe)?.get().await {
            Ok(_) | Err(client::ClientError::Refused { .. }) | Err(client::ClientError::Untrusted(..)) => bail!(
                "another server already answers for catalog '{name}' (not started from {}); stop it, or pass --force to serve it twice",
                g.home.path().display()
            ),
            Err(_) => {}
        }
    }
    let allow_all = options.allow_all;
    // Replies are signed as the serving user (creds), or the home's own key without accounts.
    let identity = crate::identity::Identity::load(&g.home, &g.load_context()?)?;
    let options = ServerOptions { identity: Some(std::sync::Arc::new(identity)), ..options };
    let server = CatalogServer::new(nats, g.home.clone(), name, options)?;
    // A forced second server leaves the first one's record in place.
    let _record = match other {
        None => Some(ServeRecord::current(name, allow_all).save(&g.home)?),
        Some(_) => None,
    };
    eprintln!("serving catalog '{name}'; Ctrl-C to stop");
    server.run(shutdown_signal()).await
}

/// SIGINT and SIGTERM handlers installed at once, so that from creation on neither signal kills
/// the process before it can clean up.
pub struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
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
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub fn client_options(g: &Globals) -> ClientOptions {
    ClientOptions { request_timeout: g.timeout, ..ClientOptions::default() }
}

pub async fn catalog_contents(g: &Globals, name: &str, json: bool) -> Result<()> {
    let nats = g.connect().await?;
    let client = CatalogClient::for_context(nats, &g.home, &g.load_context()?, name, client_options(g))?;
    let summary = client.get().await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let rows: Vec<[String; 4]> = summary
        .entries
        .iter()
        .map(|e| [e.path.clone(), human_size(e.byte_size), e.mime_type.clone(), e.hash.clone()])
        .collect();
    print_table(["PATH", "SIZE", "MIME TYPE", "HASH"], &rows);
    let bytes: u64 = summary.entries.iter().map(|e| e.byte_size).sum();
    outln!(
        "{} files, {} — catalog '{}' revision {}",
        summary.entries.len(),
        human_size(bytes),
        summary.name,
        summary.revision
    );
    Ok(())
}

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let parts: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", parts.join("  ").trim_end());
    };
    line(header);
    for row in rows {
        line(std::array::from_fn(|i| row[i].as_str()));
    }
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub struct MountArgs {
    pub mountpoint: PathBuf,
    pub cache_size: u64,
    pub read_timeout: Duration,
    pub listing_ttl: Duration,
    pub foreground: bool,
}

pub fn mount(g: &Globals, args: MountArgs) -> Result<()> {
    if args.cache_size < 4 * 1024 * 1024 {
        bail!("--cache-size must be at least 4M (one chunk per open file needs room)");
    }
    let context = g.load_context()?;
    if !args.foreground {
        return mount_in_background(g, &args);
    }
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    limit_allocator_retention();
    let options = crate::fs::mount::MountOptions {
        fs: crate::fs::FsOptions {
            cache_bytes: usize::try_from(args.cache_size).unwrap_or(usize::MAX),
            read_timeout: args.read_timeout,
            uid,
            gid,
            ..crate::fs::FsOptions::default()
        },
        listing_ttl: args.listing_ttl,
        client: ClientOptions {
            request_timeout: g.timeout.min(args.read_timeout),
            chunk_timeout: (args.read_timeout / 4).max(Duration::from_millis(200)),
            retries: 2,
            ..ClientOptions::default()
        },
    };
    crate::fs::mount::run(&g.home, &context, &args.mountpoint, options, g.timeout)
}

/// Chunks are 256 KiB buffers that come and go at network speed. glibc's default raises its
/// mmap threshold after such buffers are freed and then keeps them in per-thread arenas, so
/// the process would hold far more than the cache budget. A fixed threshold gives every chunk
/// its own mapping, returned to the system as soon as it is dropped.
fn limit_allocator_retention() {
    // SAFETY: mallopt only tunes the allocator; called before the runtime starts threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Re-runs this command with --foreground as a detached process, and returns once the mount
/// is up (or says why it is not).
fn mount_in_background(g: &Globals, args: &MountArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mountpoint = crate::fs::mount::check_mountpoint(&args.mountpoint)?;
    g.home.ensure()?;
    let log_path = g.home.path().join("mount.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let start_len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--context", &g.context, "--timeout", &g.timeout.as_secs_f64().to_string(), "mount"])
        .arg(&mountpoint)
        .args(["--cache-size", &args.cache_size.to_string()])
        .args(["--read-timeout", &args.read_timeout.as_secs_f64().to_string()])
        .args(["--listing-ttl", &args.listing_ttl.as_secs_f64().to_string()])
        .arg("--foreground")
        .env("NATSTER_HOME", g.home.path())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the mount process")?;
    let deadline = Instant::now() + g.timeout * 3 + Duration::from_secs(5);
    loop {
        if crate::fs::mount::is_mounted(&mountpoint) {
            outln!(
                "mounted on {} (pid {}, log {}); unmount with `natster-mount umount {}`",
                mountpoint.display(),
                child.id(),
                log_path.display(),
                mountpoint.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read(&log_path).unwrap_or_default();
            let tail = String::from_utf8_lossy(&text[(start_len as usize).min(text.len())..]).to_string();
            let reason = tail.lines().rev().find(|l| l.starts_with("error:")).unwrap_or("see the log").to_string();
            bail!("mount process exited ({status}): {}", reason.trim_start_matches("error: "));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("mount did not come up in time; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn umount(mountpoint: &Path) -> Result<()> {
    crate::fs::mount::umount(mountpoint)?;
    outln!("unmounted {}", mountpoint.display());
    Ok(())
}
