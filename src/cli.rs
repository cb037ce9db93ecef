//! The commands' bodies: what each subcommand does and prints. `main.rs` parses arguments and
//! calls these; the work itself lives in the concept modules.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{self, CatalogClient, ClientOptions};
use crate::context::{Context, Home};
use crate::index::{self, Catalog, ProgressEvent};
use crate::protocol::{self, CatalogEntry};
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

/// Checks a server URL list as `init` takes it: comma-separated `[scheme://][user[:pass]@]host[:port]`,
/// scheme nats, tls, ws or wss, a port required when no scheme is given.
pub fn validate_server_urls(server: &str) -> Result<()> {
    let help = "write nats://HOST:PORT (e.g. nats://127.0.0.1:4222; several separated by commas)";
    if server.trim().is_empty() {
        bail!("--server is empty; {help}");
    }
    for url in server.split(',').map(str::trim) {
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, url),
        };
        if let Some(scheme) = scheme {
            if !["nats", "tls", "ws", "wss"].contains(&scheme.to_ascii_lowercase().as_str()) {
                bail!("server URL '{url}' has an unknown scheme '{scheme}'; {help}");
            }
        }
        let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, tail)) => (h, tail.strip_prefix(':')),
                None => bail!("server URL '{url}' has an unclosed IPv6 address; {help}"),
            }
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (host_port, None),
            }
        };
        let host_ok =
            !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !host_ok {
            bail!("server URL '{url}' has no valid host; {help}");
        }
        match port {
            Some(p) if p.parse::<u16>().is_ok_and(|p| p > 0) => {}
            Some(p) => bail!("server URL '{url}' has an invalid port '{p}'; {help}"),
            None if scheme.is_none() => bail!("'{url}' is not a NATS server URL; {help}"),
            None => {}
        }
    }
    Ok(())
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
                        "note: these creds belong to another account ({account}); the {} import(s) of the previous account were dropped",
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

/// A clap value parser: seconds, greater than 0 and at most `MAX`.
pub fn parse_seconds<const MAX: u64>(s: &str) -> std::result::Result<Duration, String> {
    let range = format!("must be greater than 0 and at most {MAX} seconds");
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds; it {range}"))?;
    if v.is_finite() && v > 0.0 && v <= MAX as f64 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(range)
    }
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
            Ok(_) | Err(client::ClientError::Refused { .. }) => bail!(
                "another server already answers for catalog '{name}' (not started from {}); stop it, or pass --force to serve it twice",
                g.home.path().display()
            ),
            Err(_) => {}
        }
    }
    let allow_all = options.allow_all;
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
    let client = CatalogClient::new(nats, name, client_options(g))?;
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
/// reader never receives a byte that failed the sha256 check (the price: the file's size in
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
    let client = CatalogClient::new(nats, name, options)?;
    let summary = client.get().await?;
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
    let written = written?;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    let summary = |to: &str| {
        format!(
            "{} ({}) → {to} in {:.2}s, {}/s, sha256 verified",
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

/// Parses a byte count: a plain number, or one with a K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 0),
        Some((i, _)) => {
            let shift = match t[i..].trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 0,
                "K" => 10,
                "M" => 20,
                "G" => 30,
                "T" => 40,
                other => return Err(format!("unknown size unit '{other}'; use K, M, G or T")),
            };
            (&t[..i], shift)
        }
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size; write e.g. 268435456, 256M or 1G"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{s}' is too large"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        for good in [
            "nats://127.0.0.1:4222",
            "tls://h.example:4443",
            "wss://h.example",
            "127.0.0.1:4222",
            "nats://u:p@h:1,nats://[::1]:4222",
        ] {
            assert!(validate_server_urls(good).is_ok(), "{good}");
        }
        for bad in ["notaurl", "", "http://h:1", "nats://:4222", "nats://h:0", "nats://h:x", "nats://h:1,", "[::1:4222"]
        {
            assert!(validate_server_urls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds::<10>("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "11", "nan", "inf", "x"] {
            assert!(parse_seconds::<10>(bad).unwrap_err().contains("greater than 0 and at most 10 seconds"), "{bad}");
        }
    }
}
