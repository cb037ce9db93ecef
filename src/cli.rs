//! The commands' bodies: what each subcommand does and prints. `main.rs` parses arguments and
//! calls these; the work itself lives in the concept modules.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{self, CatalogClient, ClientOptions};
use crate::context::{Context, Home};
use crate::index::{self, ProgressEvent};
use crate::protocol::{self, CatalogEntry};
use crate::server::{CatalogServer, ServerOptions};

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

pub fn init(g: &Globals, server: &str, creds: Option<&Path>) -> Result<()> {
    if !(server.starts_with("nats://")
        || server.starts_with("tls://")
        || server.starts_with("ws://")
        || server.starts_with("wss://"))
        && server.contains("://")
    {
        bail!("server URL '{server}' has an unknown scheme; use nats://HOST:PORT");
    }
    let creds = match creds {
        Some(c) => {
            let c = std::fs::canonicalize(c)
                .with_context(|| format!("creds file {} not found; give the path of your .creds file", c.display()))?;
            Some(c)
        }
        None => None,
    };
    let mut context = Context::load(&g.home, &g.context).unwrap_or_default();
    context.server = server.to_string();
    context.creds = creds;
    let path = context.save(&g.home, &g.context)?;
    println!("context '{}' written to {}", g.context, path.display());
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

pub fn catalog_new(g: &Globals, name: &str, dir: &Path, description: Option<&str>) -> Result<()> {
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
    println!(
        "catalog '{}': {} files ({} hashed, {} unchanged, {} removed) from {} in {:.2}s",
        catalog.name,
        report.files,
        report.hashed,
        report.reused,
        report.removed,
        catalog.root_dir,
        started.elapsed().as_secs_f64()
    );
    println!("written to {}", index::Catalog::file_path(&g.home, name).display());
    Ok(())
}

pub async fn catalog_serve(g: &Globals, name: &str, options: ServerOptions) -> Result<()> {
    protocol::validate_catalog_name(name).map_err(anyhow::Error::msg)?;
    let nats = g.connect().await?;
    let server = CatalogServer::new(nats, g.home.clone(), name, options)?;
    eprintln!("serving catalog '{name}'; Ctrl-C to stop");
    server.run(shutdown_signal()).await
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
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let rows: Vec<[String; 4]> = summary
        .entries
        .iter()
        .map(|e| [e.path.clone(), human_size(e.byte_size), e.mime_type.clone(), e.hash.clone()])
        .collect();
    print_table(["PATH", "SIZE", "MIME TYPE", "HASH"], &rows);
    let bytes: u64 = summary.entries.iter().map(|e| e.byte_size).sum();
    println!(
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
        println!("{}", parts.join("  ").trim_end());
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

pub async fn catalog_download(
    g: &Globals,
    name: &str,
    what: &str,
    out: &Path,
    force: bool,
    options: ClientOptions,
) -> Result<()> {
    if options.window == 0 || options.batch == 0 || options.batch > protocol::MAX_CHUNKS_PER_READ {
        bail!("--window must be at least 1 and --batch 1..={}", protocol::MAX_CHUNKS_PER_READ);
    }
    let nats = g.connect().await?;
    let client = CatalogClient::new(nats, name, options)?;
    let summary = client.get().await?;
    let entry = find_entry(&summary.entries, what).with_context(|| {
        format!("catalog '{name}' has no file with hash or path '{what}'; list it with `natster-mount catalog contents {name}`")
    })?;
    let out: PathBuf = if out.is_dir() {
        let base = entry.path.rsplit('/').next().unwrap_or("download");
        out.join(base)
    } else {
        out.to_path_buf()
    };
    if let Ok(meta) = std::fs::symlink_metadata(&out) {
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
    println!(
        "{} ({}) → {} in {:.2}s, {}/s, sha256 verified",
        entry.path,
        human_size(written),
        out.display(),
        secs,
        human_size((written as f64 / secs) as u64)
    );
    Ok(())
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
            println!(
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
    println!("unmounted {}", mountpoint.display());
    Ok(())
}
