//! The Natster network as the CLI runs it on the local operator: what `operator up` starts
//! beside nats-server (a global service and the hub catalog, in-process), what `operator
//! add-account` adds (the hub shared with and imported by the new account, the
//! `natster_initialized` event), the events `catalog share|unshare|import` log, and
//! `global serve`.
//!
//! Invariants and tricky cases:
//! - The global service is never needed: every event is sent after the command's own work is
//!   done and saved, and when the service does not answer the command still succeeds and
//!   prints one line (once per process) saying presence and the inbox are unavailable.
//! - Calls to the global service are bounded by [`GLOBAL_TIMEOUT`] (or `--timeout` if less),
//!   so a network without one costs a command at most that. Sending an event waits longer
//!   ([`EVENT_TIMEOUT`]) but only while a running service retries its append through a
//!   JetStream leader election: giving up sooner would keep the event for a resend while the
//!   service's own retry may still log it, logging it twice.
//! - `operator up` says "Ctrl-C to stop" only once its global service answers through an
//!   account's import (or it gave up waiting and said so), so accounts added right after it
//!   find the service running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::accounts::{self, Operator, ServerVersion, HUB_CATALOG};
use crate::cli::Globals;
use crate::context::{Context, Home, ImportedCatalog};
use crate::global::client::{unavailable_line, CallError, GlobalClient, EVENT_TIMEOUT};
use crate::global::outbox::Outbox;
use crate::global::wire;
use crate::global::GlobalOptions;
use crate::server::{CatalogServer, ServerOptions};
use crate::shares::ShareList;

/// Longest a command waits for the global service.
pub const GLOBAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `operator up` waits for its global service to answer.
const GLOBAL_READY_WAIT: Duration = Duration::from_secs(15);
/// The hub's sample when no folder is given and there is no `examples/media` here.
const HUB_SAMPLE: &str = include_str!("hub-welcome.txt");

static WARNED: AtomicBool = AtomicBool::new(false);

/// Prints the "unavailable" line, once per process.
pub fn warn_unavailable(e: &CallError) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("{}", unavailable_line(e));
    }
}

/// The one line when NATS itself cannot be reached: then nothing on the network works, reading
/// included, and the line says so (what this command did locally stands).
fn warn_nats_unreachable(e: &anyhow::Error) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("note: NATS is unreachable ({e:#}); presence, the inbox and reading wait for it");
    }
}

pub(crate) fn global_timeout(g: &Globals) -> Duration {
    g.timeout.min(GLOBAL_TIMEOUT)
}

/// A client of the global service as this context's account (None, after the one line,
/// when NATS itself cannot be reached).
pub async fn global_client(g: &Globals, context: &Context) -> Option<GlobalClient> {
    match context.connect(global_timeout(g)).await {
        Ok(nats) => Some(GlobalClient::new(nats, global_timeout(g))),
        Err(e) => {
            warn_nats_unreachable(&e);
            None
        }
    }
}

fn event(event_type: &str, target: &str, catalog: &str) -> wire::EventPut {
    wire::EventPut { catalog: catalog.into(), target: target.into(), event_type: event_type.into(), data: None }
}

/// Logs `events` as the account of `context` (named `name` in `home`), after any it kept
/// from before; what the global service does not take is kept in the context's outbox, and
/// said in the one line (unless `quiet` and NATS itself is unreachable), never an error.
pub async fn emit_as(
    g: &Globals,
    (home, name): (&Home, &str),
    context: &Context,
    events: Vec<wire::EventPut>,
    quiet: bool,
) {
    if context.account_public_key.is_none() && context.creds.is_none() {
        return; // no accounts: no network
    }
    let outbox = Outbox::of(home, name);
    let client = match context.connect(global_timeout(g)).await {
        Ok(nats) => match too_old_for_global(&nats) {
            // No global service runs on this server, and an old one may not even say "no
            // responders" through the import: waiting for the timeout would only be slow.
            Some(version) => {
                if !quiet {
                    warn_unavailable(&CallError::Unavailable(format!(
                        "nats-server {version} is older than {MIN_GLOBAL_NATS_SERVER}, which the global service needs"
                    )));
                }
                outbox.keep(events);
                return;
            }
            None => GlobalClient::new(nats, EVENT_TIMEOUT),
        },
        Err(e) => {
            if !quiet {
                warn_nats_unreachable(&e);
            }
            outbox.keep(events);
            return;
        }
    };
    let mut events = events.into_iter();
    let first = events.next();
    let mut delivered = outbox.deliver(&client, first).await.map(drop);
    for e in events {
        delivered = match delivered {
            Ok(()) => outbox.deliver(&client, Some(e)).await.map(drop),
            Err(err) => {
                outbox.keep([e]);
                Err(err)
            }
        };
    }
    if let Err(e) = delivered {
        warn_unavailable(&e);
    }
}

/// The server's version when it is too old to carry a global service.
fn too_old_for_global(nats: &async_nats::Client) -> Option<String> {
    let version = nats.server_info().version;
    ServerVersion::parse(&version).filter(|v| *v < MIN_GLOBAL_NATS_SERVER).map(|_| version)
}

/// Sends what this context kept from an earlier outage (before an inbox call, say).
pub async fn flush(g: &Globals, client: &GlobalClient) {
    if let Err(e) = Outbox::of(&g.home, &g.context).deliver(client, None).await {
        tracing::debug!("kept events not sent yet: {e}");
    }
}

async fn emit(g: &Globals, event_type: &str, target: &str, catalog: &str) {
    let Ok(context) = g.load_context() else { return };
    emit_as(g, (&g.home, &g.context), &context, vec![event(event_type, target, catalog)], false).await;
}

/// After `catalog share|unshare`.
pub async fn shared(g: &Globals, catalog: &str, target: &str, share: bool) {
    let kind = if share { wire::CATALOG_SHARED } else { wire::CATALOG_UNSHARED };
    emit(g, kind, target, catalog).await;
}

/// After `catalog import`.
pub async fn imported(g: &Globals, catalog: &str, owner: &str) {
    emit(g, wire::CATALOG_IMPORTED, owner, catalog).await;
}

/// Oldest nats-server `operator up` runs: operator mode with a full resolver and JetStream.
pub const MIN_NATS_SERVER: ServerVersion = ServerVersion(2, 9, 0);
/// Oldest nats-server the global service runs on: async-nats' JetStream calls are built for
/// 2.10 and newer.
pub const MIN_GLOBAL_NATS_SERVER: ServerVersion = ServerVersion(2, 10, 0);

/// The nats-server `operator up` runs, after saying which it is; refused if too old for what
/// it must carry (with the global service or without).
pub async fn checked_nats_server(global: bool) -> Result<PathBuf> {
    let binary = accounts::nats_server_binary();
    let version = accounts::nats_server_version(&binary).await?;
    let (needed, what) =
        if global { (MIN_GLOBAL_NATS_SERVER, "the global service") } else { (MIN_NATS_SERVER, "operator mode") };
    if version < needed {
        let hint = if global { "; or pass --no-global" } else { "" };
        bail!(
            "nats-server {version} ({}) is too old for {what}, which needs {needed} or newer: run scripts/setup.sh \
             or set NATSTER_NATS_SERVER to a newer one{hint}",
            binary.display()
        );
    }
    outln!("nats-server v{version} ({})", binary.display());
    Ok(binary)
}

/// What `operator up` runs beside nats-server.
pub struct UpOptions {
    /// Run a global service (in-process).
    pub global: bool,
    /// Serve the hub catalog (in-process).
    pub hub: bool,
    /// The hub's folder; default `examples/media` if it exists here, else a small sample.
    pub hub_dir: Option<PathBuf>,
    pub presence_ttl: Duration,
    /// The hub server's heartbeat interval.
    pub heartbeat_interval: Duration,
}

/// The global service and hub server `operator up` runs; [`Network::stop`] ends them.
pub struct Network {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

impl Network {
    /// Starts what `options` asks for against the server at `url`, and prints a line each.
    pub async fn start(operator: &Operator, url: &str, options: &UpOptions) -> Result<Network> {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut network = Network { stop, tasks: Vec::new() };
        if options.global {
            let creds = operator.global_creds().context("the operator has no global account; run `operator init`")?;
            let nats = accounts::connect(url, &creds, Duration::from_secs(5)).await?;
            // On a cluster of 3 or more, the log and buckets live on 3 nodes: one may be down.
            let replicas = if operator.resolvers() >= 3 { 3 } else { 1 };
            let global_options =
                GlobalOptions { presence_ttl: options.presence_ttl, replicas, ..GlobalOptions::default() };
            let done = stopped(rx.clone());
            network.tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::global::run(nats, global_options, done).await {
                    tracing::error!("global service stopped: {e}");
                }
            }));
        }
        let hub = operator.hub_account().context("the operator has no hub account; run `operator init`")?;
        let hub_home = operator.hub_home().context("the operator has no hub account")?;
        let hub_context = Context {
            server: url.to_string(),
            creds: Some(hub.creds.clone()),
            account_public_key: Some(hub.public_key.clone()),
            account_name: Some(hub.name.clone()),
            imports: Vec::new(),
        };
        // The global service answers before the hub serves, so the hub's first heartbeat
        // finds it (else the hub shows offline until the next one, 30 s later).
        if options.global {
            let global = operator.global_account_key().unwrap_or_default();
            // Ready means answering through an account's import, as every caller reaches it.
            let nats = hub_context.connect(Duration::from_secs(5)).await?;
            let client = GlobalClient::new(nats, Duration::from_millis(500));
            let deadline = tokio::time::Instant::now() + GLOBAL_READY_WAIT;
            loop {
                match client.stats().await {
                    Ok(_) => {
                        outln!("global service running in account {} {global}", accounts::GLOBAL_ACCOUNT_NAME);
                        // The hub's shares with accounts added while no global service ran.
                        let outbox = Outbox::of(&hub_home, crate::context::DEFAULT_CONTEXT);
                        if let Err(e) = outbox.deliver(&client, None).await {
                            tracing::debug!("the hub's kept events wait: {e}");
                        }
                        break;
                    }
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        eprintln!(
                            "warning: the global service does not answer yet ({e}); presence and the inbox wait for it"
                        );
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        if options.hub {
            let dir = options.hub_dir.clone();
            let (home, context) = (hub_home.clone(), hub_context.clone());
            let files = tokio::task::spawn_blocking(move || prepare_hub(&home, &context, dir.as_deref()))
                .await
                .context("indexing the hub catalog failed")??;
            let nats = hub_context.connect(Duration::from_secs(5)).await?;
            let identity = crate::identity::Identity::load(&hub_home, &hub_context)?;
            let server_options = ServerOptions {
                identity: Some(std::sync::Arc::new(identity)),
                heartbeat_interval: options.heartbeat_interval,
                ..ServerOptions::default()
            };
            let server = CatalogServer::new(nats, hub_home.clone(), HUB_CATALOG, server_options)?;
            let done = stopped(rx.clone());
            network.tasks.push(tokio::spawn(async move {
                if let Err(e) = server.run(done).await {
                    tracing::error!("hub catalog server stopped: {e:#}");
                }
            }));
            outln!("hub catalog '{HUB_CATALOG}' ({files}) served by account {} {}", hub.name, hub.public_key);
        }
        Ok(network)
    }

    /// Stops the global service and the hub server (the hub says offline), within a second.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let all = futures::future::join_all(self.tasks);
        let _ = tokio::time::timeout(Duration::from_secs(1), all).await;
    }
}

/// Indexes the hub's folder into the hub home (blocking) and writes its context; returns a
/// summary like "3 files from /path".
fn prepare_hub(home: &Home, context: &Context, dir: Option<&Path>) -> Result<String> {
    home.ensure()?;
    context.save(home, crate::context::DEFAULT_CONTEXT)?;
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None if Path::new("examples/media").is_dir() => PathBuf::from("examples/media"),
        None => {
            let sample = home.path().join("sample");
            std::fs::create_dir_all(&sample).with_context(|| format!("cannot create {}", sample.display()))?;
            crate::store::write_atomic(&sample.join("welcome.txt"), HUB_SAMPLE.as_bytes(), 0o644)?;
            sample
        }
    };
    let description = "The hub: a catalog every account of this network sees";
    let (catalog, _) = crate::index::index_folder(home, HUB_CATALOG, &dir, Some(description), &|_| {})
        .with_context(|| format!("cannot index the hub folder {}; give another with --hub-dir", dir.display()))?;
    Ok(format!("{} files from {}", catalog.entries.len(), catalog.root_dir))
}

/// `operator add-account`'s part in the network, after the account exists: the hub shared
/// with it and imported by it, and its `natster_initialized` event. Returns the hub import to
/// record in the new context (None without a hub).
pub fn add_hub(operator: &mut Operator, name: &str, key: &str) -> Result<Option<ImportedCatalog>> {
    let (Some(hub), Some(hub_home)) = (operator.hub_account(), operator.hub_home()) else { return Ok(None) };
    hub_home.ensure()?;
    let mut list = ShareList::load(&hub_home, HUB_CATALOG)?;
    if !list.allows(key) {
        list.accounts.push(key.to_string());
        list.save(&hub_home)?;
    }
    operator.add_hub_import(name)?;
    // The hub is imported per catalog (the original's two imports), as original peers expect.
    Ok(Some(ImportedCatalog {
        catalog: HUB_CATALOG.to_string(),
        owner: hub.public_key,
        route: crate::context::ImportRoute::Catalog,
        owner_name: None,
    }))
}

/// The events of a new account: initialized, the hub's share (sent as the hub) and its import.
/// Kept as the hub's until `operator up` sends them. `quiet`: the server is known to be down
/// (the caller said so already).
pub async fn account_added(g: &Globals, operator: &Operator, context: &Context, name: &str, quiet: bool) {
    let Some(key) = context.account_public_key.clone() else { return };
    let mut events = vec![wire::EventPut {
        catalog: wire::NONE.into(),
        target: wire::NONE.into(),
        event_type: wire::NATSTER_INITIALIZED.into(),
        data: Some(serde_json::json!({ "account_id": key, "account_name": name, "account_key": key })),
    }];
    let hub = operator.hub_account().zip(operator.hub_home());
    if let Some((hub, _)) = &hub {
        if context.imports.iter().any(|i| i.catalog == HUB_CATALOG && i.owner == hub.public_key) {
            events.push(event(wire::CATALOG_IMPORTED, &hub.public_key, HUB_CATALOG));
        }
    }
    emit_as(g, (&g.home, &g.context), context, events, quiet).await;
    if let Some((hub, hub_home)) = hub {
        let hub_context = Context {
            server: context.server.clone(),
            creds: Some(hub.creds.clone()),
            account_public_key: Some(hub.public_key.clone()),
            ..Context::default()
        };
        let share = event(wire::CATALOG_SHARED, &key, HUB_CATALOG);
        emit_as(g, (&hub_home, crate::context::DEFAULT_CONTEXT), &hub_context, vec![share], true).await;
    }
}

/// `operator init` and `whoami`: the network's accounts of the local operator.
pub fn network_lines(operator: &Operator) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(key) = operator.global_account_key() {
        lines.push(format!("global account {} {key}", accounts::GLOBAL_ACCOUNT_NAME));
    }
    if let Some(hub) = operator.hub_account() {
        lines.push(format!("hub account {} {} (catalog '{HUB_CATALOG}')", hub.name, hub.public_key));
    }
    lines
}

/// `whoami`'s lines about the network: its accounts, and what the global service knows.
pub async fn whoami_lines(g: &Globals, context: &Context) {
    if let Ok(operator) = Operator::load(&crate::sharing::operator_home(g)) {
        if let Some(key) = operator.global_account_key() {
            outln!("global:   {} {key}", accounts::GLOBAL_ACCOUNT_NAME);
        }
        if let Some(hub) = operator.hub_account() {
            outln!("hub:      {} {}", hub.name, hub.public_key);
        }
    }
    if context.account_public_key.is_none() && context.creds.is_none() {
        return;
    }
    let Ok(nats) = context.connect(global_timeout(g)).await else { return };
    match GlobalClient::new(nats, global_timeout(g)).whoami().await {
        Ok(Some(w)) => outln!("network:  initialized {}", unix_time(w.initialized)),
        Ok(None) => outln!("network:  not initialized with the global service"),
        Err(e) => outln!("network:  unavailable ({e})"),
    }
}

/// `2024-12-01 12:00:00 UTC`.
pub fn unix_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// How `global serve` runs.
pub struct GlobalServeArgs {
    pub options: GlobalOptions,
    /// Server and creds of a global-account user; default the local operator's.
    pub server: Option<String>,
    pub creds: Option<PathBuf>,
}

/// `global serve`: one instance of the global service until Ctrl-C.
pub async fn global_serve(g: &Globals, args: GlobalServeArgs) -> Result<()> {
    let (server, creds) = match (args.server, args.creds) {
        (Some(s), Some(c)) => (s, c),
        (server, creds) => {
            let op_home = crate::sharing::operator_home(g);
            let operator = Operator::load(&op_home).context(
                "no local operator: give --server URL and --creds FILE of a user of the Natster global account",
            )?;
            let creds = match creds.or_else(|| operator.global_creds()) {
                Some(c) => c,
                None => bail!("the local operator has no global account; run `natster-mount operator init`"),
            };
            let server = match server {
                Some(s) => s,
                None => crate::sharing::local_server_url(&op_home)?,
            };
            (server, creds)
        }
    };
    let nats = accounts::connect(&server, &creds, g.timeout).await?;
    // Installed before "Ctrl-C to stop": a signal from then on stops the service cleanly.
    let shutdown = crate::cli::Shutdown::new()?;
    eprintln!("global service on {}; Ctrl-C to stop", crate::context::redact_server_urls(&server));
    crate::global::run(nats, args.options, shutdown.signalled()).await?;
    eprintln!("global service stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_time_is_utc_civil_time() {
        assert_eq!(super::unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::unix_time(1_733_097_600), "2024-12-02 00:00:00 UTC");
    }
}
