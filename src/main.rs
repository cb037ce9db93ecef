//! Command-line entry point: parses arguments and dispatches to `natster_mount::cli`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use natster_mount::cli::{self, Globals};
use natster_mount::context::{Home, DEFAULT_CONTEXT};
use natster_mount::server::{ServerOptions, DEFAULT_CHUNK_SIZE};
use natster_mount::sharing;

#[derive(Parser)]
#[command(
    name = "natster-mount",
    version,
    about = "Share media folders over NATS and mount the catalogs shared with you"
)]
struct Args {
    /// Context to use (a file $NATSTER_HOME/<context>.context).
    #[arg(long, global = true, default_value = DEFAULT_CONTEXT, env = "NATSTER_CONTEXT")]
    context: String,
    /// Seconds to wait for any single request before giving up (at most 3600).
    #[arg(long, global = true, default_value = "5", value_parser = cli::parse_seconds::<3600>)]
    timeout: Duration,
    /// Log filter (error, warn, info, debug, or a tracing filter).
    #[arg(long, global = true, env = "NATSTER_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a context: which NATS server to use and with which credentials.
    Init {
        /// NATS server URL, e.g. nats://127.0.0.1:4222; several (a cluster) as a comma list or
        /// by repeating it. Default: the --nats-context's, else $NATS_URL.
        #[arg(long)]
        server: Vec<String>,
        /// Credentials file (JWT and seed) for that server. Default: the --nats-context's,
        /// else $NATS_CREDS.
        #[arg(long)]
        creds: Option<PathBuf>,
        /// Take the server list and creds from this `nats` CLI context
        /// (~/.config/nats/context/NAME.json).
        #[arg(long)]
        nats_context: Option<String>,
    },
    /// Create, serve and read catalogs.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Mount every catalog this context can read as a read-only folder.
    Mount {
        /// An empty folder to mount on (made if missing).
        mountpoint: PathBuf,
        /// Memory for decrypted chunks (e.g. 256M, 1G).
        #[arg(long, default_value = "256M", value_parser = cli::parse_size)]
        cache_size: u64,
        /// Seconds before a read that the network cannot serve fails with EIO.
        #[arg(long, default_value = "10", value_parser = cli::parse_seconds::<86400>)]
        read_timeout: Duration,
        /// Seconds between listing refreshes (heartbeats refresh sooner).
        #[arg(long, default_value = "30", value_parser = cli::parse_seconds::<86400>)]
        listing_ttl: Duration,
        /// Stay in the foreground (logs to stderr) instead of detaching.
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Let other users read the mount (a media server running as its own user); needs
        /// `user_allow_other` in /etc/fuse.conf unless run as root.
        #[arg(long)]
        allow_other: bool,
        /// Owner (numeric uid) every file and folder shows; default: you.
        #[arg(long)]
        uid: Option<u32>,
        /// Group (numeric gid) every file and folder shows; default: yours.
        #[arg(long)]
        gid: Option<u32>,
    },
    /// Serve the catalogs marked for it and mount every catalog you can read, following
    /// changes, until stopped (what the systemd user unit runs).
    Up {
        /// Where to mount (default ~/Natster, made if missing).
        #[arg(long)]
        mountpoint: Option<PathBuf>,
        /// Serve only; mount nothing.
        #[arg(long, conflicts_with = "mountpoint")]
        no_mount: bool,
        /// Memory for decrypted chunks (e.g. 256M, 1G).
        #[arg(long, default_value = "256M", value_parser = cli::parse_size)]
        cache_size: u64,
        /// Seconds before a read that the network cannot serve fails with EIO.
        #[arg(long, default_value = "10", value_parser = cli::parse_seconds::<86400>)]
        read_timeout: Duration,
        /// Seconds between listing refreshes (change notices refresh sooner).
        #[arg(long, default_value = "30", value_parser = cli::parse_seconds::<86400>)]
        listing_ttl: Duration,
        /// Bytes per encrypted chunk of the catalogs served (e.g. 512K).
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = cli::parse_chunk_size)]
        chunk_size: u32,
    },
    /// What this machine serves and mounts (from this NATSTER_HOME).
    Status {
        /// Print the reports as JSON, one per process.
        #[arg(long)]
        json: bool,
    },
    /// Run `up` at login as a systemd user service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Unmount a natster-mount folder.
    Umount {
        /// The folder natster-mount is mounted on.
        mountpoint: PathBuf,
    },
    /// A NATS operator of your own: accounts, JWTs and an operator-mode nats-server.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Show this context's account, server and credentials.
    Whoami,
    /// Browse, play and share catalogs in a web browser (prints a one-time login link).
    Web {
        /// Address to listen on; anything but loopback needs --tls-cert/--tls-key or --insecure-http.
        #[arg(long, default_value = "127.0.0.1:8642", value_parser = cli::parse_listen)]
        listen: std::net::SocketAddr,
        /// Open the login link in the desktop's browser.
        #[arg(long)]
        open: bool,
        /// TLS certificate chain (PEM) to serve HTTPS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Allow plain HTTP on a non-loopback address (cookie and media unencrypted).
        #[arg(long)]
        insecure_http: bool,
        /// Memory for decrypted chunks (e.g. 256M, 1G).
        #[arg(long, default_value = "256M", value_parser = cli::parse_size)]
        cache_size: u64,
        /// Seconds before a read that the network cannot serve fails.
        #[arg(long, default_value = "10", value_parser = cli::parse_seconds::<86400>)]
        read_timeout: Duration,
        /// Seconds between listing refreshes (heartbeats refresh sooner).
        #[arg(long, default_value = "30", value_parser = cli::parse_seconds::<86400>)]
        listing_ttl: Duration,
    },
    /// The Natster global service: events, shares, presence (in the global account).
    #[command(subcommand)]
    Global(GlobalCommand),
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write the user unit, and enable and start it if a user systemd runs.
    Install {
        /// Where `up` mounts (default ~/Natster).
        #[arg(long)]
        mountpoint: Option<PathBuf>,
    },
    /// Stop, disable and remove the user unit.
    Uninstall,
    /// Whether the unit is installed and running.
    Status,
}

#[derive(Subcommand)]
enum GlobalCommand {
    /// Run one instance of the global service until Ctrl-C (several may run at once).
    Serve {
        /// NATS server URL (default: the local operator's server).
        #[arg(long)]
        server: Option<String>,
        /// Creds of a user of the global account (default: the local operator's).
        #[arg(long)]
        creds: Option<PathBuf>,
        /// Seconds without a heartbeat after which a catalog counts as offline.
        #[arg(long, default_value = "90", value_parser = cli::parse_seconds::<86400>)]
        presence_ttl: Duration,
        /// The account allowed to claim one-time codes (none: every claim is refused).
        #[arg(long)]
        site_account: Option<String>,
        /// Servers keeping the event log and buckets when they are created (3 on a cluster).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=5))]
        replicas: u16,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Create the operator and its system account (once; again does nothing).
    Init {
        /// Loopback port for the local nats-server (default 4222 if free); chosen once.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Run a cluster of N nats-servers instead of one (chosen once; 3 keeps the global
        /// service's data on three nodes).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=9))]
        cluster: Option<u16>,
    },
    /// Run nats-server in operator mode (full resolver, JetStream) until Ctrl-C.
    Up {
        /// Loopback port, only if `operator init` did not choose one yet (contexts point there).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Run a cluster of N nats-servers on loopback (routes, a full resolver on each,
        /// JetStream clustered), only if `operator init` did not choose the size yet.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=9))]
        cluster: Option<u16>,
        /// Instead: run a leaf node joining the hub at URL (nats-leaf://HOST:PORT, a comma
        /// list for a cluster), as the user of --creds; no operator here.
        #[arg(long, conflicts_with_all = ["cluster", "no_global", "no_hub", "hub_dir"])]
        leaf_of: Option<String>,
        /// With --leaf-of: creds of your user on the hub (default: the context's).
        #[arg(long, requires = "leaf_of")]
        creds: Option<PathBuf>,
        /// Log every protocol message (for audits: no seed ever appears).
        #[arg(long, hide = true)]
        trace: bool,
        /// Do not run the global service (presence and the inbox are then unavailable).
        #[arg(long)]
        no_global: bool,
        /// Do not serve the hub catalog.
        #[arg(long)]
        no_hub: bool,
        /// Folder the hub catalog serves (default examples/media if here, else a small sample).
        #[arg(long)]
        hub_dir: Option<PathBuf>,
        /// Seconds without a heartbeat after which a catalog counts as offline.
        #[arg(long, default_value = "90", value_parser = cli::parse_seconds::<86400>)]
        presence_ttl: Duration,
        /// Seconds between the hub server's heartbeats.
        #[arg(long, hide = true, default_value = "30", value_parser = cli::parse_seconds::<3600>)]
        heartbeat_interval: Duration,
    },
    /// Create an account with the Natster exports and write its context and creds.
    AddAccount { name: String },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Index a folder as catalog NAME (again: re-index only what changed).
    New {
        /// Catalog name: ASCII letters, digits, `_` and `-`.
        name: String,
        /// The folder to share.
        dir: PathBuf,
        /// A line shown beside the catalog's name (kept by later re-indexes).
        #[arg(long)]
        description: Option<String>,
        /// Re-root an existing catalog at DIR (its files under the old folder are dropped).
        #[arg(long)]
        force: bool,
        /// Also serve it whenever `natster-mount up` runs (see `catalog serve --at-login`).
        #[arg(long)]
        serve: bool,
    },
    /// Serve catalog NAME to its owner and to the accounts it is shared with.
    Serve {
        /// A catalog made with `catalog new`.
        name: String,
        /// Bytes per encrypted chunk, the unit of authentication (e.g. 512K).
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = cli::parse_chunk_size)]
        chunk_size: u32,
        /// Serve EVERY account that imports the catalog, ignoring the share list.
        #[arg(long)]
        allow_all: bool,
        /// Behave as an original Natster server: `get` and v1 `download` only (for testing).
        #[arg(long, hide = true)]
        v1_only: bool,
        /// Also serve original (Go) Natster readers: whole-file v1 downloads, which carry no
        /// signature, so a NATS server in between could read what they send.
        #[arg(long)]
        v1: bool,
        /// Serve even if another server already serves this catalog.
        #[arg(long)]
        force: bool,
        /// Do not watch the folder: serve the index as it is until `catalog new` re-indexes it.
        #[arg(long)]
        no_watch: bool,
        /// Do not serve now: mark it to be served whenever `natster-mount up` runs.
        #[arg(long, conflicts_with = "not_at_login")]
        at_login: bool,
        /// Do not serve now: stop `up` serving it.
        #[arg(long)]
        not_at_login: bool,
        /// Seconds between heartbeats (presence, and the original's 30 s).
        #[arg(long, hide = true, default_value = "30", value_parser = cli::parse_seconds::<3600>)]
        heartbeat_interval: Duration,
    },
    /// Share catalog NAME with an account (public key, or a local operator account's name).
    Share {
        /// One of your catalogs.
        name: String,
        /// The account's public key (A…, 56 characters) or its name in the local operator.
        account: String,
    },
    /// Stop sharing catalog NAME with an account.
    Unshare {
        /// One of your catalogs.
        name: String,
        /// The account's public key or its name in the local operator.
        account: String,
    },
    /// Import catalog NAME from its owner's account, so this account can read it.
    Import {
        /// The catalog's name in its owner's account.
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// The owner's account public key (A…) or its name in the local operator.
        #[arg(required_unless_present = "all")]
        owner: Option<String>,
        /// Import every catalog shared with you that you have not imported (see `catalog inbox`).
        #[arg(long, conflicts_with_all = ["name", "owner"])]
        all: bool,
        /// Only record it: the imports were added outside this operator (nsc, Synadia Cloud).
        #[arg(long)]
        external: bool,
        /// The original's two imports for this catalog alone, instead of the owner's two for all
        /// its catalogs (for an owner that exports only named catalogs, or for the original
        /// Natster CLI in the same account).
        #[arg(long)]
        per_catalog: bool,
    },
    /// Undo `catalog import NAME`: remove the imports from your account and this context.
    Unimport {
        /// The name `catalog ls` shows (e.g. `movies`, or `movies@alice` beside another `movies`).
        name: String,
    },
    /// List catalogs shared by me and imported by me.
    Ls,
    /// List catalogs shared with me that I have not imported, with the command that imports each.
    Inbox,
    /// List the files of catalog NAME.
    Contents {
        /// The name `catalog ls` shows.
        name: String,
        /// Print the listing as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download one file of catalog NAME, by hash or path, verified before it takes its name.
    Download {
        /// The name `catalog ls` shows.
        name: String,
        /// The file's sha256 or its path in the catalog.
        file: String,
        /// Where to write it (a folder keeps the file's name; `-` is standard output).
        out: PathBuf,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Chunks in flight (flow-control window).
        #[arg(long, default_value_t = natster_mount::client::ClientOptions::default().window)]
        window: u32,
        /// Chunks asked for per read request.
        #[arg(long, default_value_t = natster_mount::client::ClientOptions::default().batch)]
        batch: u32,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    cli::capture_ready_pipe();
    // mount.fuse3 runs `natster-mount SOURCE MOUNTPOINT -o OPTIONS` for an fstab line.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let commands: Vec<String> = Args::command().get_subcommands().map(|c| c.get_name().to_string()).collect();
    if let Some(call) = cli::helper::detect(&argv, &commands) {
        cli::set_quiet_exit_on_closed_stdout(true);
        init_logging(None, false);
        return match call.and_then(|c| cli::helper::mount_helper(&c)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("natster-mount: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = Args::parse();
    let daemon = matches!(
        &args.command,
        Command::Catalog(CatalogCommand::Serve { at_login: false, not_at_login: false, .. })
            | Command::Mount { .. }
            | Command::Up { .. }
            | Command::Operator(OperatorCommand::Up { .. })
            | Command::Web { .. }
            | Command::Global(GlobalCommand::Serve { .. })
    );
    // A one-shot command whose reader went away (`catalog ls | head -1`) ends quietly with
    // status 0 at its next line of output; a long-running one keeps running.
    cli::set_quiet_exit_on_closed_stdout(!daemon);
    init_logging(args.log.clone(), daemon);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: Option<String>, daemon: bool) {
    // One-shot commands return every connection failure as their one-line error, so
    // async-nats' own ERROR lines would only repeat it.
    // fuser's session warns when its own unmount at exit finds the mount gone already, which
    // is how every `natster-mount umount` ends: noise, not news.
    let default_level = if daemon { "natster_mount=info,fuser::session=error,warn" } else { "warn,async_nats=off" };
    let env_filter = match filter.as_deref().map(tracing_subscriber::EnvFilter::try_new) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!(
                "warning: --log '{}' is not a log filter ({e}); using the default ({default_level})",
                filter.as_deref().unwrap_or_default()
            );
            tracing_subscriber::EnvFilter::new(default_level)
        }
        None => tracing_subscriber::EnvFilter::new(default_level),
    };
    tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// The data path's buffers are 256 KiB to 1 MiB (NATS read buffers, sealed records) and come
/// and go at network speed. Above glibc's default 128 KiB mmap threshold each one was a fresh
/// mapping: an mmap, a page fault and a zeroed page per 4 KiB, then a munmap (measured: 2.6
/// faults per 4 KiB read through the mount, a third of its CPU). A fixed 4 MiB threshold,
/// above any message NATS carries, serves them from the heap, where freed ones are reused;
/// a 16 MiB trim threshold keeps the heap's free top for the next burst instead of handing it
/// back and faulting it in again. One arena, not eight per core: freed buffers are reused by
/// whichever thread allocates next, so the heap stays as small as the buffers in flight.
/// Decrypted chunks, which live for minutes in the mount's cache, are kept off this heap
/// (chunk_memory) so they cannot pin it. The mount's peak memory stays within its cache budget
/// plus the overhead tests/mount.rs allows.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called first in main, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let globals = Globals { home: Home::from_env()?, context: args.context, timeout: args.timeout };
    let runtime = tokio::runtime::Runtime::new()?;
    match args.command {
        Command::Init { server, creds, nats_context } => {
            let server = (!server.is_empty()).then(|| server.join(","));
            cli::init(&globals, server.as_deref(), creds.as_deref(), nats_context.as_deref())
        }
        Command::Mount { mountpoint, cache_size, read_timeout, listing_ttl, foreground, allow_other, uid, gid } => {
            let args =
                cli::MountArgs { mountpoint, cache_size, read_timeout, listing_ttl, foreground, allow_other, uid, gid };
            drop(runtime);
            cli::mount(&globals, args)
        }
        Command::Up { mountpoint, no_mount, cache_size, read_timeout, listing_ttl, chunk_size } => {
            natster_mount::server::check_chunk_size(chunk_size)?;
            let mount = cli::MountArgs {
                mountpoint: PathBuf::new(),
                cache_size,
                read_timeout,
                listing_ttl,
                foreground: true,
                allow_other: false,
                uid: None,
                gid: None,
            };
            drop(runtime);
            cli::up(&globals, cli::UpArgs { mountpoint, no_mount, mount, chunk_size })
        }
        Command::Status { json } => cli::status(&globals, json),
        Command::Service(s) => match s {
            ServiceCommand::Install { mountpoint } => cli::service::install(&globals, mountpoint),
            ServiceCommand::Uninstall => cli::service::uninstall(&globals),
            ServiceCommand::Status => cli::service::status(&globals),
        },
        Command::Umount { mountpoint } => cli::umount(&mountpoint),
        Command::Whoami => runtime.block_on(sharing::whoami(&globals)),
        Command::Web { listen, open, tls_cert, tls_key, insecure_http, cache_size, read_timeout, listing_ttl } => {
            let args =
                cli::WebArgs { listen, open, tls_cert, tls_key, insecure_http, cache_size, read_timeout, listing_ttl };
            let served = runtime.block_on(cli::web(&globals, args));
            // A read stuck on an unreachable catalog must not hold up exit (the 2 s stop promise).
            runtime.shutdown_timeout(Duration::from_millis(500));
            served
        }
        Command::Global(GlobalCommand::Serve { server, creds, presence_ttl, site_account, replicas }) => {
            let options = natster_mount::global::GlobalOptions {
                presence_ttl,
                site_account,
                replicas: usize::from(replicas),
                ..natster_mount::global::GlobalOptions::default()
            };
            let args = cli::network::GlobalServeArgs { options, server, creds };
            runtime.block_on(cli::network::global_serve(&globals, args))
        }
        Command::Operator(o) => match o {
            OperatorCommand::Init { port, cluster } => sharing::operator_init(&globals, port, cluster.map(usize::from)),
            OperatorCommand::Up { port, leaf_of: Some(hub), creds, trace, .. } => {
                let args = cli::cluster::LeafArgs { hub, creds, port, trace };
                runtime.block_on(cli::cluster::leaf_up(&globals, args))
            }
            OperatorCommand::Up {
                port,
                cluster,
                trace,
                no_global,
                no_hub,
                hub_dir,
                presence_ttl,
                heartbeat_interval,
                ..
            } => {
                let network = cli::network::UpOptions {
                    global: !no_global,
                    hub: !no_hub,
                    hub_dir,
                    presence_ttl,
                    heartbeat_interval,
                };
                runtime.block_on(sharing::operator_up(&globals, port, cluster.map(usize::from), trace, network))
            }
            OperatorCommand::AddAccount { name } => runtime.block_on(sharing::operator_add_account(&globals, &name)),
        },
        Command::Catalog(c) => match c {
            CatalogCommand::New { name, dir, description, force, serve } => {
                cli::catalog_new(&globals, &name, &dir, description.as_deref(), force)?;
                if serve {
                    cli::at_login(&globals, &name, true)?;
                }
                Ok(())
            }
            CatalogCommand::Serve { name, at_login, not_at_login, .. } if at_login || not_at_login => {
                cli::at_login(&globals, &name, at_login)
            }
            CatalogCommand::Serve {
                name,
                chunk_size,
                allow_all,
                v1_only,
                v1,
                force,
                no_watch,
                heartbeat_interval,
                ..
            } => {
                natster_mount::server::check_chunk_size(chunk_size)?;
                let options = ServerOptions {
                    chunk_size,
                    allow_all,
                    v1_only,
                    v1_readers: v1,
                    heartbeat_interval,
                    ..ServerOptions::default()
                };
                let served = runtime.block_on(cli::catalog_serve(&globals, &name, options, force, !no_watch));
                // A file read stuck on a dead disk must not hold up exit (the 2 s stop promise).
                runtime.shutdown_timeout(Duration::from_millis(500));
                served
            }
            CatalogCommand::Share { name, account } => {
                runtime.block_on(sharing::catalog_share(&globals, &name, &account, true))
            }
            CatalogCommand::Unshare { name, account } => {
                runtime.block_on(sharing::catalog_share(&globals, &name, &account, false))
            }
            CatalogCommand::Import { name, owner, all, external, per_catalog } => match (name, owner) {
                (Some(name), Some(owner)) if !all => {
                    runtime.block_on(sharing::catalog_import(&globals, &name, &owner, external, per_catalog))
                }
                _ => runtime.block_on(cli::inbox::import_all(&globals, external)),
            },
            CatalogCommand::Unimport { name } => runtime.block_on(sharing::catalog_unimport(&globals, &name)),
            CatalogCommand::Ls => runtime.block_on(cli::inbox::catalog_ls(&globals)),
            CatalogCommand::Inbox => runtime.block_on(cli::inbox::catalog_inbox(&globals)),
            CatalogCommand::Contents { name, json } => runtime.block_on(cli::catalog_contents(&globals, &name, json)),
            CatalogCommand::Download { name, file, out, force, window, batch } => {
                let options = cli::client_options(&globals);
                let options = natster_mount::client::ClientOptions { window, batch, ..options };
                runtime.block_on(cli::catalog_download(&globals, &name, &file, &out, force, options))
            }
        },
    }
}
