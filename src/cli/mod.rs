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
//!   catalog that a live record or another answering server already serves. It watches and
//!   re-indexes its folder unless `--no-watch` (`daemon::served`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{self, CatalogClient, ClientOptions};
use crate::context::{Context, Home};
use crate::daemon::served::ServedCatalog;
use crate::index::{self, Catalog, ProgressEvent};
use crate::protocol;
use crate::server::ServerOptions;
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

pub mod cluster;
mod download;
pub mod helper;
pub mod inbox;
pub mod nats_context;
pub mod network;
mod parse;
pub mod service;
mod up;
mod web;

pub use download::catalog_download;
pub use parse::{parse_chunk_size, parse_listen, parse_seconds, parse_size, validate_server_urls};
pub use up::{at_login, capture_ready_pipe, default_mountpoint, mount, status, umount, up, MountArgs, UpArgs};
pub use web::{web, WebArgs};

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
/// account, imports) unless new creds name another account. The server list and creds come
/// from the flags, else a `nats` CLI context, else `NATS_URL`/`NATS_CREDS` ([`nats_context`]).
pub fn init(g: &Globals, server: Option<&str>, creds: Option<&Path>, nats_context: Option<&str>) -> Result<()> {
    let (server, creds) = nats_context::resolve(server, creds, nats_context)?;
    let (server, creds) = (server.as_str(), creds.as_deref());
    validate_server_urls(server)?;
    let mut context = Context::load(&g.home, &g.context).unwrap_or_default();
    context.server = server.trim().to_string();
    if let Some(c) = creds {
        let c = std::fs::canonicalize(c)
            .with_context(|| format!("creds file {} not found; give the path of your .creds file", c.display()))?;
        let account = crate::accounts::creds_account(&c)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The file holds the user's seed: anyone who can read it can be that user.
            if let Ok(m) = std::fs::metadata(&c) {
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    eprintln!(
                        "warning: creds file {} is readable by others (mode {mode:04o}); run `chmod 600 {0}`",
                        c.display()
                    );
                }
            }
        }
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
    if crate::index::NOT_CATALOGS.contains(&name) {
        bail!("'{name}' is the name of one of natster-mount's own files in the home; pick another catalog name");
    }
    // A per-catalog import uses the unaliased subjects an own catalog of that name would
    // answer on; imports through their owner (`natster.from.<owner>…`) never clash.
    let per_catalog =
        |i: &crate::context::ImportedCatalog| i.catalog == name && i.route == crate::context::ImportRoute::Catalog;
    if let Some(import) = g.load_context().ok().and_then(|c| c.imports.into_iter().find(per_catalog)) {
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
    if report.trees_removed > 0 {
        outln!("removed {} tree file(s) no catalog lists any more", report.trees_removed);
    }
    let file = Catalog::file_path(&g.home, name);
    if report.written {
        outln!("written to {}", file.display());
    } else {
        outln!("unchanged: {}", file.display());
    }
    Ok(())
}

pub async fn catalog_serve(g: &Globals, name: &str, options: ServerOptions, force: bool, watch: bool) -> Result<()> {
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
    // A forced second server leaves the first one's record in place.
    let _record = match other {
        None => Some(ServeRecord::current(name, allow_all).save(&g.home)?),
        Some(_) => None,
    };
    let catalog = ServedCatalog::new(name);
    let report = {
        let (catalog, context, server) = (catalog.clone(), g.context.clone(), g.load_context()?.server);
        let (nats, started) = (nats.clone(), std::time::SystemTime::now());
        std::sync::Arc::new(move || crate::daemon::status::ProcessStatus {
            pid: std::process::id(),
            role: "catalog serve".into(),
            context: context.clone(),
            server: server.clone(),
            connected: nats.connection_state() == async_nats::connection::State::Connected,
            started: started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            serving: vec![catalog.status()],
            mount: None,
        }) as std::sync::Arc<dyn Fn() -> crate::daemon::status::ProcessStatus + Send + Sync>
    };
    let _socket = crate::daemon::status::serve(&g.home, report).map_err(|e| tracing::warn!("{e:#}")).ok();
    let mut shutdown = Shutdown::new()?;
    let connected = crate::daemon::link::watch_state(&nats);
    let run = catalog.clone().run(nats, connected, g.home.clone(), options, watch, async move {
        shutdown.recv().await;
    });
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => return result,
        // Said once it serves: a catalog that cannot be served fails with its one line alone.
        _ = catalog.serving() => {
            eprintln!("serving catalog '{name}'; Ctrl-C to stop");
            crate::daemon::ready::notify_ready(&format!("serving catalog '{name}'"));
        }
    }
    let result = run.await;
    crate::daemon::ready::notify_stopping();
    result
}

pub use crate::daemon::Shutdown;

pub fn client_options(g: &Globals) -> ClientOptions {
    ClientOptions { request_timeout: g.timeout, ..ClientOptions::default() }
}

pub async fn catalog_contents(g: &Globals, name: &str, json: bool) -> Result<()> {
    let nats = g.connect().await?;
    let client = CatalogClient::for_context(nats, &g.home, &g.load_context()?, name, client_options(g))?;
    let summary = client.get().await.map_err(|e| explain_get(g, name, e))?;
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
        printable(&summary.name),
        printable(&summary.revision)
    );
    Ok(())
}

/// A catalog's `get` failure, said for this machine: nobody answering for one of our own
/// catalogs means it is not served here (rather than offline, misspelled or not imported).
pub(crate) fn explain_get(g: &Globals, name: &str, e: crate::client::ClientError) -> anyhow::Error {
    let own = matches!(e, crate::client::ClientError::NoResponders(_)) && {
        let own = index::catalog_names(&g.home);
        own.iter().any(|c| c == name) && g.load_context().is_ok_and(|c| c.find_import(&own, name).is_none())
    };
    if own {
        anyhow::anyhow!(
            "catalog '{name}' is yours and nothing serves it; run `natster-mount catalog serve {name}` \
             (or mark it with `catalog serve {name} --at-login` for `up`)"
        )
    } else {
        e.into()
    }
}

/// A peer's string with its control characters shown as `?`, so that it cannot drive the
/// terminal it is printed to.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars().map(|c| if c.is_control() { '?' } else { c }).collect::<String>().into()
    } else {
        s.into()
    }
}

/// Rows in aligned columns, without a header.
fn print_rows<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let parts: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", parts.join("  ").trim_end());
    }
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
