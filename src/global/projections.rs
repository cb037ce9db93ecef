//! Projections: JetStream KV views of the event log, each built by a durable pull consumer.
//! - `PROJ_ACCOUNT`, key = account key: `{out_shares, in_shares, initialized_at,
//!   bound_context?}` (the original's shape) plus `applied`; key `_stats` holds the count of
//!   `catalog_shared` events.
//! - `PROJ_CATALOG`, key = catalog name: `{catalog_name, owner, shared_with}` as the original
//!   (the first owner still sharing it), plus every owner's targets in `owners` (names no
//!   longer have to be unique, but `catalogs.validatename` answers as the original's did).
//!
//! Invariants and tricky cases:
//! - Every value records the stream sequence of the last event applied to it (`applied`); an
//!   event at or below it is skipped, so a redelivery, or an event two instances race on,
//!   changes nothing. Writes are compare-and-set on the entry's revision.
//! - One event at a time for all instances (`max_ack_pending` 1): order matters (share, then
//!   unshare) and the per-key guard only holds when sequences arrive in order.
//! - `initialized_at` is the time the stream stored the event, not when it was projected.
//! - A share to an account that has not initialized is applied at once (the original Nak'd it
//!   forever, with no bound): the entry exists with `initialized_at` 0 until it does.
//! - Each bucket names its consumer generation in key `_generation`. A fresh bucket has none:
//!   the first instance to create that key starts a new generation, whose consumer replays the
//!   stream from the start, and deletes the consumers of older generations.
//! - Redelivery is bounded (`MAX_DELIVER`, with backoff); an event that cannot be parsed is
//!   logged and acknowledged, never retried forever. A bucket deleted under a running
//!   consumer restarts it on a fresh bucket and generation (the request side of an instance
//!   keeps its old handle until restarted, and answers 503 meanwhile).
//! - A pull request lives on the consumer's leader. When that node dies the request dies with
//!   it, and async-nats keeps counting it as pending until it would have expired (30 s by
//!   default), so nothing is pulled meanwhile. Pulls here expire in `PULL_EXPIRES` with idle
//!   heartbeats every `PULL_HEARTBEAT`, and a missed heartbeat drops the pull stream and opens
//!   a new one on whichever node leads now: a leader's loss stalls the projection for seconds.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::events::{Event, EventType, STREAM};
use super::wire::{ContextBound, Initialized};
use super::Error;

pub const ACCOUNTS_BUCKET: &str = "PROJ_ACCOUNT";
pub const CATALOGS_BUCKET: &str = "PROJ_CATALOG";
pub const STATS_KEY: &str = "_stats";
const GENERATION_KEY: &str = "_generation";
/// Deliveries of one event before JetStream gives up on it.
const MAX_DELIVER: i64 = 8;
/// How long an instance may hold an event before it is redelivered to another.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// A pull request's life; a new one follows at once.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's idle heartbeat on a pull; two missed ones count as a lost pull.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// A consumer that ran this long before failing starts its retries from the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Compare-and-set attempts on one key before the event is retried later.
const CAS_ATTEMPTS: usize = 16;

/// A share as the original's projection stores it: the catalog and the other account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShareRef {
    pub catalog: String,
    pub account: String,
}

/// A `PROJ_ACCOUNT` value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountEntry {
    #[serde(default)]
    pub out_shares: Vec<ShareRef>,
    #[serde(default)]
    pub in_shares: Vec<ShareRef>,
    #[serde(default)]
    pub initialized_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_context: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_id: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub account_name: String,
    #[serde(default)]
    pub applied: u64,
}

/// The `_stats` value of `PROJ_ACCOUNT`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsEntry {
    #[serde(default)]
    pub share_count: u64,
    #[serde(default)]
    pub applied: u64,
}

/// One owner's targets of a catalog name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerShares {
    pub account: String,
    #[serde(default)]
    pub shared_with: Vec<String>,
}

/// A `PROJ_CATALOG` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    #[serde(default)]
    pub catalog_name: String,
    /// The first owner still sharing a catalog of this name ("" when none is).
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub shared_with: Vec<String>,
    #[serde(default)]
    pub owners: Vec<OwnerShares>,
    #[serde(default)]
    pub applied: u64,
}

/// Values that remember the last event applied to them.
pub trait Applied: Serialize + DeserializeOwned + Default {
    fn applied(&self) -> u64;
    fn set_applied(&mut self, seq: u64);
}

macro_rules! applied {
    ($($t:ty),*) => {$(
        impl Applied for $t {
            fn applied(&self) -> u64 { self.applied }
            fn set_applied(&mut self, seq: u64) { self.applied = seq; }
        }
    )*};
}
applied!(AccountEntry, StatsEntry, CatalogEntry);

/// Applies `change` to the value at `key` for event `seq`, compare-and-set, unless the value
/// already saw `seq`. A value that does not parse is replaced (the log rebuilds it).
pub async fn upsert<T: Applied>(kv: &kv::Store, key: &str, seq: u64, change: impl Fn(&mut T)) -> Result<(), Error> {
    for _ in 0..CAS_ATTEMPTS {
        let entry = kv.entry(key).await.map_err(|e| Error::Unavailable(format!("cannot read {key}: {e}")))?;
        let (mut value, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (serde_json::from_slice::<T>(&e.value).unwrap_or_default(), Some(e.revision))
            }
            _ => (T::default(), None),
        };
        if value.applied() >= seq {
            return Ok(());
        }
        change(&mut value);
        value.set_applied(seq);
        let bytes = serde_json::to_vec(&value).map_err(|e| Error::Store(e.to_string()))?.into();
        let written = match revision {
            Some(r) => kv
                .update(key, bytes, r)
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
            None => kv
                .create(key, bytes)
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
        };
        match written {
            Ok(()) => return Ok(()),
            Err((true, _)) => continue, // someone else wrote it first: read again
            Err((false, e)) => return Err(Error::Unavailable(format!("cannot write {key}: {e}"))),
        }
    }
    Err(Error::Unavailable(format!("{key} kept changing under us; will retry")))
}

/// Reads and parses one value; None when absent (or unparsable, which the log repairs).
pub async fn read<T: DeserializeOwned>(kv: &kv::Store, key: &str) -> Result<Option<T>, Error> {
    match kv.get(key).await {
        Ok(Some(bytes)) => Ok(serde_json::from_slice(&bytes).ok()),
        Ok(None) => Ok(None),
        Err(e) => Err(Error::Unavailable(format!("cannot read {key}: {e}"))),
    }
}

/// Opens (or creates) a bucket: file storage, history 1, the original's 1 GiB bounds, on
/// `replicas` servers of a cluster (1 on one server).
pub async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, Error> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: name.to_string(),
        history: 1,
        max_age,
        max_bytes: 1 << 30,
        max_value_size: 1 << 20,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another instance may have created it at the same moment.
        Err(created) => {
            js.get_key_value(name).await.map_err(|_| Error::Store(format!("cannot create bucket {name}: {created}")))
        }
    }
}

/// Which view a consumer builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Accounts,
    Catalogs,
}

impl Projection {
    pub fn bucket(self) -> &'static str {
        match self {
            Projection::Accounts => ACCOUNTS_BUCKET,
            Projection::Catalogs => CATALOGS_BUCKET,
        }
    }

    /// Applies one event to this view (idempotent for a given `event.seq`).
    pub async fn apply(self, kv: &kv::Store, event: &Event) -> Result<(), Error> {
        match self {
            Projection::Accounts => apply_account_event(kv, event).await,
            Projection::Catalogs => apply_catalog_event(kv, event).await,
        }
    }
}

/// Most shares one account may make, and most it may be offered: an account's entry (at most
/// 1 MiB as a KV value, about 140 bytes a share) stays well within its bound, so no account's
/// flood of shares can make the projection of another's fail. `events.put` refuses past them.
pub const MAX_OUT_SHARES: usize = 2000;
pub const MAX_IN_SHARES: usize = 3000;

/// Adds `share` unless it is there already or `list` holds `max`.
fn add(list: &mut Vec<ShareRef>, share: ShareRef, max: usize) {
    if !list.contains(&share) && list.len() < max {
        list.push(share);
    }
}

async fn apply_account_event(kv: &kv::Store, e: &Event) -> Result<(), Error> {
    let seq = e.seq;
    match (e.kind, e.target.as_deref(), e.catalog.as_deref()) {
        (EventType::Initialized, _, _) => {
            let info: Initialized = serde_json::from_slice(&e.payload).unwrap_or_default();
            upsert(kv, &e.origin, seq, |a: &mut AccountEntry| {
                if a.initialized_at == 0 {
                    a.initialized_at = e.time.max(1);
                }
                if !info.account_name.is_empty() {
                    a.account_name = info.account_name.chars().take(64).collect();
                }
            })
            .await
        }
        (EventType::Shared, Some(to), Some(catalog)) if to != e.origin => {
            upsert(kv, &e.origin, seq, |a: &mut AccountEntry| {
                add(&mut a.out_shares, ShareRef { catalog: catalog.into(), account: to.into() }, MAX_OUT_SHARES)
            })
            .await?;
            upsert(kv, to, seq, |a: &mut AccountEntry| {
                add(&mut a.in_shares, ShareRef { catalog: catalog.into(), account: e.origin.clone() }, MAX_IN_SHARES)
            })
            .await?;
            upsert(kv, STATS_KEY, seq, |s: &mut StatsEntry| s.share_count += 1).await
        }
        (EventType::Unshared, Some(to), Some(catalog)) => {
            upsert(kv, &e.origin, seq, |a: &mut AccountEntry| {
                a.out_shares.retain(|s| !(s.catalog == catalog && s.account == to))
            })
            .await?;
            upsert(kv, to, seq, |a: &mut AccountEntry| {
                a.in_shares.retain(|s| !(s.catalog == catalog && s.account == e.origin))
            })
            .await
        }
        (EventType::ContextBound, _, _) => {
            let Ok(bound) = serde_json::from_slice::<ContextBound>(&e.payload) else {
                tracing::warn!(seq, "context_bound event without a context; skipped");
                return Ok(());
            };
            let context = serde_json::to_value(&bound.bound_context).ok();
            upsert(kv, &e.origin, seq, |a: &mut AccountEntry| {
                a.bound_context = context.clone();
                a.oauth_id = Some(bound.oauth_id.clone());
            })
            .await
        }
        // Imports change no share; malformed shares (checked when logged) are skipped.
        _ => Ok(()),
    }
}

async fn apply_catalog_event(kv: &kv::Store, e: &Event) -> Result<(), Error> {
    let (Some(to), Some(name)) = (e.target.as_deref(), e.catalog.as_deref()) else { return Ok(()) };
    let share = match e.kind {
        EventType::Shared => true,
        EventType::Unshared => false,
        _ => return Ok(()),
    };
    upsert(kv, name, e.seq, |c: &mut CatalogEntry| {
        c.catalog_name = name.to_string();
        let owner = match c.owners.iter().position(|o| o.account == e.origin) {
            Some(i) => i,
            None if share => {
                c.owners.push(OwnerShares { account: e.origin.clone(), shared_with: Vec::new() });
                c.owners.len() - 1
            }
            None => return,
        };
        let targets = &mut c.owners[owner].shared_with;
        if share && !targets.iter().any(|t| t == to) {
            targets.push(to.to_string());
        } else if !share {
            targets.retain(|t| t != to);
            // The original never removed anything here; a name nobody shares is free again.
            if targets.is_empty() {
                c.owners.remove(owner);
            }
        }
        let first = c.owners.first().cloned().unwrap_or_default();
        c.owner = first.account;
        c.shared_with = first.shared_with;
    })
    .await
}

/// The consumer generation of a bucket: the one recorded in it, or a new one (replaying the
/// whole log) if the bucket is fresh. Older generations' consumers are deleted.
async fn generation(
    kv: &kv::Store,
    stream: &jetstream::stream::Stream,
    projection: Projection,
) -> Result<String, Error> {
    for _ in 0..CAS_ATTEMPTS {
        if let Some(existing) = kv.get(GENERATION_KEY).await.map_err(|e| Error::Unavailable(e.to_string()))? {
            return Ok(String::from_utf8_lossy(&existing).to_string());
        }
        let fresh = format!("{:08x}", rand::random::<u32>());
        match kv.create(GENERATION_KEY, fresh.clone().into()).await {
            Ok(_) => {
                tracing::info!(bucket = projection.bucket(), generation = %fresh, "fresh projection: rebuilding it from the event log");
                let current = consumer_name(projection, &fresh);
                let prefix = format!("{}_", projection.bucket());
                let mut names = stream.consumer_names();
                let mut stale = Vec::new();
                while let Some(Ok(name)) = names.next().await {
                    if name.starts_with(&prefix) && name != current {
                        stale.push(name);
                    }
                }
                for name in stale {
                    let _ = stream.delete_consumer(&name).await;
                }
                return Ok(fresh);
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Unavailable(format!("cannot start a projection generation: {e}"))),
        }
    }
    Err(Error::Unavailable("cannot agree on a projection generation".into()))
}

/// Whether JetStream says the bucket's stream does not exist: not merely that it did not
/// answer (a cluster electing the bucket's leader), which a retry outlives.
async fn bucket_deleted(js: &jetstream::Context, bucket: &str) -> bool {
    use jetstream::context::GetStreamErrorKind as K;
    match js.get_stream(format!("KV_{bucket}")).await {
        Ok(_) => false,
        Err(e) => match e.kind() {
            K::JetStream(api) => api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND,
            _ => false,
        },
    }
}

fn consumer_name(projection: Projection, generation: &str) -> String {
    format!("{}_{generation}", projection.bucket())
}

/// Builds `projection` from the log until the task is dropped: binds to (or creates) the
/// generation's durable consumer, shared by every instance, and applies each event in order.
pub async fn run(js: jetstream::Context, projection: Projection, replicas: usize) {
    const FIRST_DELAY: Duration = Duration::from_millis(100);
    let mut delay = FIRST_DELAY;
    loop {
        let started = tokio::time::Instant::now();
        let Err(e) = run_once(&js, projection, replicas).await;
        if started.elapsed() >= HEALTHY_RUN {
            delay = FIRST_DELAY;
        }
        tracing::warn!(bucket = projection.bucket(), "projection paused: {e}; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Runs the consumer until it fails; it never ends otherwise.
async fn run_once(
    js: &jetstream::Context,
    projection: Projection,
    replicas: usize,
) -> Result<std::convert::Infallible, Error> {
    let stream = js.get_stream(STREAM).await.map_err(|e| Error::Unavailable(format!("no event log: {e}")))?;
    let kv = bucket(js, projection.bucket(), Duration::ZERO, replicas).await?;
    let generation = generation(&kv, &stream, projection).await?;
    let name = consumer_name(projection, &generation);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        description: Some(format!("natster-mount: builds {}", projection.bucket())),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_deliver: MAX_DELIVER,
        max_ack_pending: 1,
        ..Default::default()
    };
    let consumer = stream
        .get_or_create_consumer(&name, config)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot open consumer {name}: {e}")))?;
    let mut messages = consumer
        .stream()
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot consume {name}: {e}")))?;
    while let Some(message) = messages.next().await {
        let message = match message {
            Ok(m) => m,
            // The pull died with its node (see the module doc): pull again, from the start.
            Err(e) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                return Err(Error::Unavailable(format!("consumer {name} went quiet ({e}); pulling again")));
            }
            Err(e) => {
                tracing::debug!(consumer = %name, "pull interrupted: {e}");
                continue;
            }
        };
        let Ok(info) = message.info() else { continue };
        let (seq, time, delivered) = (info.stream_sequence, info.published.unix_timestamp(), info.delivered);
        let Some(event) = Event::parse(message.subject.as_str(), message.payload.clone(), seq, time) else {
            tracing::warn!(seq, subject = %message.subject, "not an event; skipped");
            let _ = message.ack().await;
            continue;
        };
        match projection.apply(&kv, &event).await {
            Ok(()) => {
                if let Err(e) = message.double_ack().await {
                    tracing::debug!(seq, "ack not confirmed ({e}); a redelivery will be skipped");
                }
            }
            Err(e) => {
                // A bucket deleted under us: start over (a fresh bucket replays the whole log).
                if bucket_deleted(js, projection.bucket()).await {
                    let _ = message.ack_with(jetstream::AckKind::Nak(None)).await;
                    return Err(Error::Unavailable(format!("bucket {} is gone; rebuilding it", projection.bucket())));
                }
                let backoff = Duration::from_millis(200u64 << delivered.clamp(1, 6));
                if delivered >= MAX_DELIVER {
                    tracing::error!(
                        seq,
                        bucket = projection.bucket(),
                        "giving up on event after {delivered} deliveries: {e}; a rebuild (fresh bucket) applies it"
                    );
                } else {
                    tracing::warn!(
                        seq,
                        bucket = projection.bucket(),
                        "event not applied ({e}); redelivered in {backoff:?}"
                    );
                }
                let _ = message.ack_with(jetstream::AckKind::Nak(Some(backoff))).await;
            }
        }
    }
    Err(Error::Unavailable(format!("consumer {name} ended")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_list_stops_at_its_bound_and_keeps_no_duplicate() {
        let share = |i: usize| ShareRef { catalog: format!("c{i}"), account: "A".repeat(56) };
        let mut list = Vec::new();
        for i in 0..MAX_OUT_SHARES + 10 {
            add(&mut list, share(i), MAX_OUT_SHARES);
        }
        assert_eq!(list.len(), MAX_OUT_SHARES);
        add(&mut list, share(0), MAX_OUT_SHARES + 1);
        assert_eq!(list.len(), MAX_OUT_SHARES, "a share already there is not added twice");
        // The largest entry a bound allows still fits a KV value.
        let widest =
            |n: usize| ShareRef { catalog: "x".repeat(crate::protocol::MAX_CATALOG_NAME), account: format!("{n:056}") };
        let entry = AccountEntry {
            out_shares: (0..MAX_OUT_SHARES).map(widest).collect(),
            in_shares: (0..MAX_IN_SHARES).map(widest).collect(),
            ..AccountEntry::default()
        };
        assert!(serde_json::to_vec(&entry).unwrap().len() < 1024 * 1024);
    }
}
