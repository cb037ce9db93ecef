//! The request side: a NATS micro service (`natster-global`: `$SRV.PING|INFO|STATS` with
//! per-endpoint request counts and latency) whose endpoints are the original's functions on
//! `*.natster.global.<fn>`, in queue group `globalservice`, plus the background tasks
//! (projection consumers, presence sweeper).
//!
//! Invariants and tricky cases:
//! - The caller is subject token 0, and must be an account key; nothing else identifies it.
//! - Every request is handled on its own task (at most [`MAX_IN_FLIGHT`] at once), bounded by
//!   [`HANDLER_DEADLINE`]; bodies over [`MAX_REQUEST`] are refused before parsing.
//! - `heartbeats.*` are publishes (no reply, as the original's); a spoofed or malformed one is
//!   dropped with a debug line.
//! - Replies are the original's envelopes, errors included; the micro service's own error
//!   headers are not used, since an original client reads only the body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::service::ServiceExt as _;
use futures::StreamExt;
use tokio::sync::Semaphore;

use super::events::{self, EventLog, EventType, NewEvent};
use super::otc::{self, Codes};
use super::presence::{Presence, PresenceEntry};
use super::projections::{self, AccountEntry, CatalogEntry, Projection, StatsEntry};
use super::wire::{self, EventPut, Heartbeat, NatsterContext, OtcClaim, Share, ValidName, Whoami, NONE};
use super::{Error, Refusal, QUEUE_GROUP, SERVICE_NAME};
use crate::protocol::{is_account_key, validate_catalog_name};

/// Largest request body accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Requests handled at once; more wait.
const MAX_IN_FLIGHT: usize = 256;
/// Bound on handling one request (an event's append may ride out a leader election).
const HANDLER_DEADLINE: Duration = Duration::from_secs(13);
/// Bound on the event log becoming available at start.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// How to run the service.
#[derive(Debug, Clone)]
pub struct GlobalOptions {
    /// A catalog is offline when its last heartbeat is older than this.
    pub presence_ttl: Duration,
    /// The only account allowed to claim one-time codes (the original's natster.io site
    /// account). None: every claim is refused.
    pub site_account: Option<String>,
    /// Where a one-time code is claimed: `<base>/#/<code>`.
    pub claim_url_base: String,
    /// Servers that keep a copy of the event log and of every bucket (3 on a cluster of 3 or
    /// more: one node down loses nothing and JetStream still answers). Used when they are
    /// created.
    pub replicas: usize,
}

impl Default for GlobalOptions {
    fn default() -> Self {
        GlobalOptions {
            presence_ttl: super::DEFAULT_PRESENCE_TTL,
            site_account: None,
            claim_url_base: "https://natster.io".into(),
            replicas: 1,
        }
    }
}

/// The functions, by endpoint name and subject suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Function {
    EventsPut,
    HeartbeatsPut,
    HeartbeatsOffline,
    MyShares,
    Whoami,
    ValidateName,
    Stats,
    OtcGenerate,
    OtcClaim,
    ContextGet,
}

const FUNCTIONS: [(Function, &str, &str); 10] = [
    (Function::EventsPut, "events-put", "events.put"),
    (Function::HeartbeatsPut, "heartbeats-put", "heartbeats.put"),
    (Function::HeartbeatsOffline, "heartbeats-offline", "heartbeats.offline"),
    (Function::MyShares, "my-shares", "my.shares"),
    (Function::Whoami, "whoami", "whoami"),
    (Function::ValidateName, "catalogs-validatename", "catalogs.validatename"),
    (Function::Stats, "stats", "stats"),
    (Function::OtcGenerate, "otc-generate", "otc.generate"),
    (Function::OtcClaim, "otc-claim", "otc.claim"),
    (Function::ContextGet, "context-get", "context.get"),
];

struct State {
    nats: async_nats::Client,
    log: EventLog,
    accounts: jetstream::kv::Store,
    catalogs: jetstream::kv::Store,
    presence: Presence,
    codes: Codes,
    options: GlobalOptions,
    /// The last heartbeat taken per (owner, catalog), to drop repeats (see [`BEAT_REPEAT`]).
    beats: std::sync::Mutex<HashMap<(String, String), LastBeat>>,
}

/// When a heartbeat was taken, whether it said online, and the heartbeat.
type LastBeat = (std::time::Instant, bool, Heartbeat);

/// A heartbeat identical to the last one from its owner for its catalog (same online state
/// and revision) within this long is dropped: each costs a KV write and a message to every
/// account the catalog is shared with, so a flood of them must not multiply. A changed one
/// always goes through.
const BEAT_REPEAT: Duration = Duration::from_millis(500);
/// Heartbeats remembered for that; past it the old ones are forgotten.
const MAX_BEATS_KEPT: usize = 100_000;

/// Aborts the background tasks when the service stops.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Runs one instance of the global service over `nats` (a user of the global account) until
/// `shutdown` resolves. Several instances may run at once, on one NATS system.
pub async fn run(
    nats: async_nats::Client,
    options: GlobalOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let js = jetstream::new(nats.clone());
    let opened = tokio::select! {
        _ = &mut shutdown => return Ok(()),
        opened = open_stores(&js, &options) => opened?,
    };
    let (log, accounts, catalogs, presence, codes) = opened;
    let replicas = options.replicas;
    let beats = std::sync::Mutex::new(HashMap::new());
    let state = Arc::new(State { nats: nats.clone(), log, accounts, catalogs, presence, codes, options, beats });
    let _tasks = Tasks(vec![
        tokio::spawn(projections::run(js.clone(), Projection::Accounts, replicas)),
        tokio::spawn(projections::run(js.clone(), Projection::Catalogs, replicas)),
        tokio::spawn(sweep(state.clone())),
    ]);

    let service = nats
        .service_builder()
        .description("Natster global service: events, projections, presence")
        .queue_group(QUEUE_GROUP)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| Error::Nats(format!("cannot register the global service: {e}")))?;
    let mut endpoints = Vec::new();
    for (function, name, suffix) in FUNCTIONS {
        let endpoint = service
            .endpoint_builder()
            .name(name)
            .add(format!("*.natster.global.{suffix}"))
            .await
            .map_err(|e| Error::Nats(format!("cannot subscribe to *.natster.global.{suffix}: {e}")))?;
        endpoints.push(endpoint.map(move |request| (function, request)).boxed());
    }
    let mut requests = futures::stream::select_all(endpoints);
    // Make sure the server has every subscription before anyone is told the service runs.
    let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
    tracing::info!("global service running (queue group {QUEUE_GROUP})");
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let outcome = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            next = requests.next() => match next {
                Some((function, request)) => {
                    let Ok(permit) = permits.clone().acquire_owned().await else { break Ok(()) };
                    let state = state.clone();
                    tokio::spawn(async move {
                        state.handle(function, request).await;
                        drop(permit);
                    });
                }
                None => break Err(Error::Nats("the NATS connection was closed".into())),
            },
        }
    };
    drop(requests);
    let _ = tokio::time::timeout(Duration::from_millis(500), service.stop()).await;
    outcome
}

type Stores = (EventLog, jetstream::kv::Store, jetstream::kv::Store, Presence, Codes);

/// The log and the buckets, waiting (bounded) for JetStream, which may still be starting.
async fn open_stores(js: &jetstream::Context, options: &GlobalOptions) -> Result<Stores, Error> {
    let deadline = tokio::time::Instant::now() + START_DEADLINE;
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            let replicas = options.replicas;
            events::ensure_stream(js, replicas).await?;
            let accounts = projections::bucket(js, projections::ACCOUNTS_BUCKET, Duration::ZERO, replicas).await?;
            let catalogs = projections::bucket(js, projections::CATALOGS_BUCKET, Duration::ZERO, replicas).await?;
            let presence = Presence::open(js, options.presence_ttl, replicas).await?;
            let codes = Codes::open(js, replicas).await?;
            Ok::<_, Error>((EventLog::new(js.clone()), accounts, catalogs, presence, codes))
        };
        match attempt.await {
            Ok(stores) => return Ok(stores),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::debug!("JetStream not ready ({e}); retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "{e}; the global account needs JetStream (nats-server 2.10 or newer, jetstream enabled)"
                )))
            }
        }
    }
}

/// The caller's account from a request subject `<caller>.natster.global.<fn>`.
fn caller_of(subject: &str) -> Option<&str> {
    let (caller, rest) = subject.split_once('.')?;
    (rest.starts_with("natster.global.") && is_account_key(caller)).then_some(caller)
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(payload).map_err(|e| Refusal::new(400, format!("malformed request: {e}")))
}

impl State {
    async fn handle(&self, function: Function, request: async_nats::service::Request) {
        let message = &request.message;
        let Some(caller) = caller_of(message.subject.as_str()) else {
            tracing::debug!(subject = %message.subject, "request without a caller account; refused");
            if message.reply.is_some() {
                let _ = request.respond(Ok(wire::err(400, "no caller account in the subject").into())).await;
            }
            return;
        };
        if message.payload.len() > MAX_REQUEST {
            if message.reply.is_some() {
                let body = wire::err(413, &format!("request is larger than {MAX_REQUEST} bytes"));
                let _ = request.respond(Ok(body.into())).await;
            }
            return;
        }
        let payload = &message.payload;
        let work = async {
            match function {
                Function::EventsPut => self.events_put(caller, payload).await,
                Function::HeartbeatsPut => self.heartbeat(caller, payload, true).await,
                Function::HeartbeatsOffline => self.heartbeat(caller, payload, false).await,
                Function::MyShares => self.my_shares(caller).await.map(wire::ok),
                Function::Whoami => self.whoami(caller).await.map(wire::ok),
                Function::ValidateName => self.validate_name(caller, payload).await.map(wire::ok),
                Function::Stats => self.stats().await.map(wire::ok),
                Function::OtcGenerate => self.otc_generate(caller, payload).await.map(wire::ok),
                Function::OtcClaim => self.otc_claim(caller, payload).await.map(wire::ok),
                Function::ContextGet => self.context_get(caller),
            }
        };
        let body = match tokio::time::timeout(HANDLER_DEADLINE, work).await {
            Ok(Ok(body)) => body,
            Ok(Err(refusal)) => {
                tracing::debug!(%caller, ?function, code = refusal.code, "{}", refusal.message);
                wire::err(refusal.code, &refusal.message)
            }
            Err(_) => wire::err(503, "the global service is busy; try again"),
        };
        if message.reply.is_some() {
            if let Err(e) = request.respond(Ok(body.into())).await {
                tracing::debug!("reply not sent: {e}");
            }
        }
    }

    async fn account(&self, key: &str) -> Result<AccountEntry, Refusal> {
        Ok(projections::read::<AccountEntry>(&self.accounts, key).await?.unwrap_or_default())
    }

    async fn events_put(&self, caller: &str, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let put: EventPut = parse(payload)?;
        let event = events::validate(caller, &put)?;
        if event.kind == EventType::Initialized {
            let entry = self.account(caller).await?;
            if entry.initialized_at > 0 {
                return Err(Refusal::new(409, format!("account {caller} is initialized already")));
            }
        }
        if event.kind == EventType::Shared {
            self.check_share_room(caller, &event.target, &event.catalog).await?;
        }
        self.log.append(&event).await?;
        if event.kind == EventType::Shared {
            // Tell the target at once (its inbox, a running mount); the projection follows.
            let online = self.presence.get(caller, &event.catalog).await.ok().flatten();
            let share = share_row(caller, &event.target, &event.catalog, online.as_ref(), self.presence.ttl);
            if let Ok(body) = serde_json::to_vec(&share) {
                let subject = format!("{}.{}", event.target, wire::EVENTS_SHARED);
                let _ = self.nats.publish(subject, body.into()).await;
            }
        }
        Ok(wire::ok(""))
    }

    /// True for a heartbeat the same as the last one taken for its catalog within
    /// [`BEAT_REPEAT`]; otherwise it is remembered as the last.
    fn is_repeat(&self, beat: &Heartbeat, online: bool) -> bool {
        let now = std::time::Instant::now();
        let mut beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        let key = (beat.account_key.clone(), beat.catalog.clone());
        if let Some((at, was_online, last)) = beats.get(&key) {
            if now.duration_since(*at) < BEAT_REPEAT && *was_online == online && last == beat {
                return true;
            }
        }
        if beats.len() >= MAX_BEATS_KEPT {
            beats.retain(|_, (at, _, _)| now.duration_since(*at) < BEAT_REPEAT);
        }
        if beats.len() < MAX_BEATS_KEPT {
            beats.insert(key, (now, online, beat.clone()));
        }
        false
    }

    /// Refuses a new share past [`projections::MAX_OUT_SHARES`] of the owner's or
    /// [`projections::MAX_IN_SHARES`] of the target's (an existing one may be logged again).
    async fn check_share_room(&self, owner: &str, target: &str, catalog: &str) -> Result<(), Refusal> {
        let known = |list: &[projections::ShareRef], account: &str| {
            list.iter().any(|s| s.catalog == catalog && s.account == account)
        };
        // Best effort: while the views cannot be read (a leader election), the event is still
        // logged, and the projection's own bound holds.
        let Ok(from) = self.account(owner).await else { return Ok(()) };
        if from.out_shares.len() >= projections::MAX_OUT_SHARES && !known(&from.out_shares, target) {
            return Err(Refusal::new(
                429,
                format!(
                    "account {owner} has {} shares, the most the global service records; unshare some first",
                    from.out_shares.len()
                ),
            ));
        }
        let Ok(to) = self.account(target).await else { return Ok(()) };
        if to.in_shares.len() >= projections::MAX_IN_SHARES && !known(&to.in_shares, owner) {
            return Err(Refusal::new(
                429,
                format!(
                    "account {target} is offered {} shares already, the most the global service records",
                    to.in_shares.len()
                ),
            ));
        }
        Ok(())
    }

    /// Records a heartbeat or an offline notice and tells the accounts the catalog is shared
    /// with. Never replies (as the original).
    async fn heartbeat(&self, caller: &str, payload: &[u8], online: bool) -> Result<Vec<u8>, Refusal> {
        let mut beat: Heartbeat = parse(payload)?;
        validate_catalog_name(&beat.catalog).map_err(|e| Refusal::new(400, e))?;
        if !beat.account_key.is_empty() && beat.account_key != caller {
            return Err(Refusal::new(403, "heartbeat names another account than its sender; dropped"));
        }
        if beat.revision_id.as_ref().is_some_and(|r| r.len() > 128) {
            return Err(Refusal::new(400, "revision_id is longer than 128 characters"));
        }
        beat.account_key = caller.to_string();
        if self.is_repeat(&beat, online) {
            return Ok(Vec::new());
        }
        let entry = self.presence.record(caller, &beat, online).await?;
        self.announce(&entry).await;
        Ok(Vec::new())
    }

    /// Sends `entry`'s heartbeat (or offline notice) to every account its catalog is shared
    /// with, and only to those.
    async fn announce(&self, entry: &PresenceEntry) {
        let Ok(owner) = self.account(&entry.account_key).await else { return };
        let Ok(body) = serde_json::to_vec(&entry.heartbeat()) else { return };
        let kind = if entry.online { wire::EVENTS_HEARTBEAT } else { wire::EVENTS_OFFLINE };
        for share in owner.out_shares.iter().filter(|s| s.catalog == entry.catalog) {
            let _ = self.nats.publish(format!("{}.{kind}", share.account), body.clone().into()).await;
        }
    }

    async fn my_shares(&self, caller: &str) -> Result<Vec<Share>, Refusal> {
        let entry = self.account(caller).await?;
        let pairs = entry
            .out_shares
            .iter()
            .map(|s| (caller.to_string(), s.account.clone(), s.catalog.clone()))
            .chain(entry.in_shares.iter().map(|s| (s.account.clone(), caller.to_string(), s.catalog.clone())));
        let mut shares = Vec::new();
        for (from, to, catalog) in pairs {
            let online = self.presence.get(&from, &catalog).await.ok().flatten();
            shares.push(share_row(&from, &to, &catalog, online.as_ref(), self.presence.ttl));
        }
        Ok(shares)
    }

    async fn whoami(&self, caller: &str) -> Result<Whoami, Refusal> {
        let entry = self.account(caller).await?;
        if entry.initialized_at == 0 {
            return Err(Refusal::new(404, format!("account {caller} is not initialized with this global service")));
        }
        Ok(Whoami { account_key: caller.to_string(), oauth_id: entry.oauth_id, initialized: entry.initialized_at })
    }

    async fn validate_name(&self, caller: &str, payload: &[u8]) -> Result<ValidName, Refusal> {
        let raw = String::from_utf8_lossy(payload);
        // The original sends the bare name; a JSON string is accepted too.
        let name = serde_json::from_str::<String>(&raw).unwrap_or_else(|_| raw.trim().to_string());
        if let Err(message) = validate_catalog_name(&name) {
            return Ok(ValidName { valid: false, message });
        }
        let entry = projections::read::<CatalogEntry>(&self.catalogs, &name).await?;
        match entry {
            Some(c) if !c.owner.is_empty() && c.owner != caller => Ok(ValidName {
                valid: false,
                message: format!("catalog name '{name}' is already in use by account {}", c.owner),
            }),
            _ => Ok(ValidName { valid: true, message: String::new() }),
        }
    }

    async fn stats(&self) -> Result<wire::Stats, Refusal> {
        let mut keys =
            self.accounts.keys().await.map_err(|e| Refusal::new(503, format!("cannot count accounts: {e}")))?;
        let mut initialized = 0;
        while let Some(Ok(key)) = keys.next().await {
            if key.starts_with('_') {
                continue;
            }
            if projections::read::<AccountEntry>(&self.accounts, &key).await?.is_some_and(|a| a.initialized_at > 0) {
                initialized += 1;
            }
        }
        let shares = projections::read::<StatsEntry>(&self.accounts, projections::STATS_KEY).await?.unwrap_or_default();
        Ok(wire::Stats {
            total_initialized: initialized,
            running_catalogs: self.presence.online_count().await?,
            share_count: shares.share_count,
        })
    }

    async fn otc_generate(&self, caller: &str, payload: &[u8]) -> Result<wire::OtcGenerated, Refusal> {
        let context: NatsterContext = parse(payload)?;
        if context.account_public_key != caller {
            return Err(Refusal::new(403, "the context's account_public_key is not the caller's account"));
        }
        let code = self.codes.generate(context).await?;
        let base = self.options.claim_url_base.trim_end_matches('/');
        Ok(wire::OtcGenerated { claim_url: format!("{base}/#/{code}"), code, valid_minutes: otc::VALID_MINUTES })
    }

    fn site_only(&self, caller: &str) -> Result<(), Refusal> {
        match &self.options.site_account {
            Some(site) if site == caller => Ok(()),
            _ => Err(Refusal::new(403, "only the site account may bind contexts")),
        }
    }

    async fn otc_claim(&self, caller: &str, payload: &[u8]) -> Result<NatsterContext, Refusal> {
        self.site_only(caller)?;
        let claim: OtcClaim = parse(payload)?;
        if claim.oauth_id.is_empty() || claim.oauth_id.len() > 256 {
            return Err(Refusal::new(400, "oauth_id is required (at most 256 characters)"));
        }
        let context = self
            .codes
            .claim(&claim.code)
            .await?
            .ok_or_else(|| Refusal::new(404, "code unknown, expired or used already"))?;
        if !is_account_key(&context.account_public_key) {
            return Err(Refusal::new(500, "the stored context names no account"));
        }
        let bound = wire::ContextBound { oauth_id: claim.oauth_id, bound_context: context.clone() };
        let payload = serde_json::to_vec(&bound).map_err(|e| Refusal::new(500, e.to_string()))?;
        let event = NewEvent {
            origin: context.account_public_key.clone(),
            target: NONE.into(),
            catalog: NONE.into(),
            kind: EventType::ContextBound,
            payload: payload.into(),
        };
        self.log.append(&event).await?;
        Ok(context)
    }

    fn context_get(&self, caller: &str) -> Result<Vec<u8>, Refusal> {
        self.site_only(caller)?;
        Err(Refusal::new(501, "context.get is not offered: this global service hands out no credentials"))
    }
}

fn share_row(from: &str, to: &str, catalog: &str, presence: Option<&PresenceEntry>, ttl: Duration) -> Share {
    Share {
        from_account: from.to_string(),
        to_account: to.to_string(),
        catalog: catalog.to_string(),
        catalog_online: presence.is_some_and(|p| p.is_online(ttl)),
        revision: presence.map(|p| p.revision).unwrap_or(0),
        revision_id: presence.and_then(|p| p.revision_id.clone()),
    }
}

/// Every quarter TTL: catalogs whose heartbeats stopped (a killed server) go offline, and the
/// accounts they are shared with are told.
async fn sweep(state: Arc<State>) {
    let period = (state.presence.ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.presence.sweep().await {
            Ok(expired) => {
                for entry in expired {
                    tracing::info!(owner = %entry.account_key, catalog = %entry.catalog, "no heartbeat within the presence TTL: offline");
                    state.announce(&entry).await;
                }
            }
            Err(e) => tracing::debug!("presence sweep skipped: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_is_token_zero_and_an_account() {
        let me = nkeys::KeyPair::new_account().public_key();
        assert_eq!(caller_of(&format!("{me}.natster.global.whoami")), Some(me.as_str()));
        assert_eq!(caller_of("natster.global.whoami"), None);
        assert_eq!(caller_of("UABC.natster.global.whoami"), None);
        assert_eq!(caller_of(&format!("{me}.natster.other.whoami")), None);
    }
}
