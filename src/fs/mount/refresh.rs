//! Listings: fetched and applied per catalog (at most [`super::MAX_CONCURRENT_REFRESHES`] at once,
//! one at a time per catalog), on the TTL poll, heartbeats, notices and reconnects.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};

use super::{Gathered, MountedStatus, Planned, FIRST_RETRY, LISTING_DEADLINE};
use crate::fs::{presence, FsError, Invalidations, MountedCatalog, NatsterFs};
use crate::global::client::GlobalClient;
use crate::listing::Listing;
use crate::protocol;

/// What the refresher keeps per catalog slot.
pub(super) struct CatalogState {
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
pub(super) struct Refresher {
    pub(super) fs: Arc<NatsterFs>,
    pub(super) state: Mutex<HashMap<usize, CatalogState>>,
    pub(super) invalidations: mpsc::UnboundedSender<Invalidations>,
    pub(super) permits: Semaphore,
    pub(super) ttl: Duration,
    /// This context's account key ("self" without one): own catalogs' owner.
    pub(super) me: String,
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
    Listed(Box<Listing>),
    /// The first page said the revision shown is still current.
    Unchanged,
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
    pub(super) fn sync(
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
            if let Some(seed) = g.seed {
                let inv = self.fs.apply(i, seed);
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

    pub(super) fn status(&self) -> Vec<MountedStatus> {
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
                let shown = catalog.revision();
                let outcome = match tokio::time::timeout(LISTING_DEADLINE, catalog.source.listing(&shown)).await {
                    Ok(Ok(Some(listing))) => Outcome::Listed(Box::new(listing)),
                    Ok(Ok(None)) => Outcome::Unchanged,
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
            Outcome::Unchanged => {
                if let Some(s) = self.state().get_mut(&i) {
                    (s.online, s.problem, s.retry_delay) = (Some(true), None, FIRST_RETRY);
                }
                if was_online == Some(false) {
                    tracing::info!(catalog = %catalog.dir_name, "answers again");
                }
                return;
            }
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
                let empty = Listing::empty(&catalog.name, protocol::PROTOCOL_VERSION);
                let inv = self.fs.apply(i, empty);
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
        tracing::info!(catalog = %catalog.dir_name, revision = %listing.revision, entries = listing.len(), "listing updated");
        // Building the tree of a large listing takes a while: off the async workers.
        let fs = self.fs.clone();
        let Ok(inv) = tokio::task::spawn_blocking(move || fs.apply(i, *listing)).await else { return };
        self.send(inv);
        if let Some(path) = saved_at {
            let Some(tree) = self.fs.catalog_tree(i) else { return };
            let saved = tokio::task::spawn_blocking(move || save_listing(&path, tree.listing())).await;
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
pub(super) async fn keep_fresh(
    refresher: Arc<Refresher>,
    nats: async_nats::Client,
    mut connected: watch::Receiver<bool>,
) {
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
    tokio::spawn(presence_from_own_servers(fs.clone(), nats.clone(), me.clone()));
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

/// Own catalogs whose presence is still unknown, from the account's running catalog servers:
/// each answers `$SRV.PING.natster-catalog` (it is a NATS micro service) with its catalog, so
/// one served by another process shows online at once instead of at its next heartbeat.
/// Collects answers for [`presence::PING_WAIT`], at most one per catalog.
async fn presence_from_own_servers(fs: Arc<NatsterFs>, nats: async_nats::Client, me: String) {
    let inbox = nats.new_inbox();
    let Ok(mut answers) = nats.subscribe(inbox.clone()).await else { return };
    let subject = format!("$SRV.PING.{}", crate::server::SERVICE_NAME);
    if nats.publish_with_reply(subject, inbox, bytes::Bytes::new()).await.is_err() {
        return;
    }
    let own = fs.catalogs().into_iter().filter(|(_, c)| c.owner == me).count();
    let mut seen: HashMap<String, Option<String>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + presence::PING_WAIT;
    while seen.len() < own {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await else { break };
        if let Some((catalog, revision)) = presence::from_service_ping(&msg.payload) {
            seen.entry(catalog).or_insert(revision);
        }
    }
    for (_, catalog) in fs.catalogs() {
        let Some(revision) = seen.get(&catalog.name) else { continue };
        if catalog.owner == me && catalog.presence().state == presence::State::Unknown {
            catalog.set_presence(presence::Presence {
                state: presence::State::Online,
                revision_id: revision.clone(),
                ..Default::default()
            });
        }
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

/// Writes `listing` to `path` (0600) as JSON in the `get` shape, streamed: never a second copy
/// of a large listing in memory. Whole or not at all (temporary file, synced, renamed).
fn save_listing(path: &std::path::Path, listing: &Listing) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp);
    serde_json::to_writer(&mut out, listing)?;
    out.flush()?;
    let tmp = out.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}
