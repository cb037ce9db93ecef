//! Presence: which catalogs are online, from their servers' heartbeats, in KV bucket
//! `NATSTER_PRESENCE` keyed `<owner account>.<catalog>`.
//!
//! Invariants and tricky cases:
//! - The owner is the heartbeat's sender (subject token 0); a body naming another account is
//!   a spoof and is dropped. Two owners' catalogs of one name are two entries.
//! - A catalog is online while its last heartbeat is younger than the TTL. A clean stop says
//!   offline at once; a killed server goes offline when the sweeper finds its entry expired.
//!   The sweeper's change is compare-and-set, so of several instances exactly one announces it.
//! - Entries are values with a time, not bucket TTLs: instances may run with different TTLs
//!   and old entries still say when the catalog was last seen. The bucket drops entries not
//!   refreshed for a week.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::wire::Heartbeat;
use super::{now_ms, Error};

pub const PRESENCE_BUCKET: &str = "NATSTER_PRESENCE";
/// Entries nobody refreshed for this long leave the bucket.
const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// One catalog's presence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub catalog: String,
    pub account_key: String,
    pub revision: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_id: Option<String>,
    pub online: bool,
    /// Unix milliseconds of the last heartbeat (or offline notice).
    pub last_seen_ms: i64,
}

impl PresenceEntry {
    /// Online now: said so, and heard from within `ttl`.
    pub fn is_online(&self, ttl: Duration) -> bool {
        self.online && now_ms().saturating_sub(self.last_seen_ms) < ttl.as_millis() as i64
    }

    /// The heartbeat body that announces this entry.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            catalog: self.catalog.clone(),
            account_key: self.account_key.clone(),
            revision: self.revision,
            revision_id: self.revision_id.clone(),
        }
    }
}

pub fn key(owner: &str, catalog: &str) -> String {
    format!("{owner}.{catalog}")
}

#[derive(Clone)]
pub struct Presence {
    kv: kv::Store,
    pub ttl: Duration,
}

impl Presence {
    pub async fn open(js: &jetstream::Context, ttl: Duration, replicas: usize) -> Result<Presence, Error> {
        Ok(Presence { kv: super::projections::bucket(js, PRESENCE_BUCKET, KEEP, replicas).await?, ttl })
    }

    /// Records a heartbeat (`online`) or an offline notice from `owner`.
    pub async fn record(&self, owner: &str, beat: &Heartbeat, online: bool) -> Result<PresenceEntry, Error> {
        let entry = PresenceEntry {
            catalog: beat.catalog.clone(),
            account_key: owner.to_string(),
            revision: beat.revision,
            revision_id: beat.revision_id.clone(),
            online,
            last_seen_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(|e| Error::Store(e.to_string()))?;
        self.kv
            .put(key(owner, &beat.catalog), bytes.into())
            .await
            .map_err(|e| Error::Unavailable(format!("cannot record presence: {e}")))?;
        Ok(entry)
    }

    pub async fn get(&self, owner: &str, catalog: &str) -> Result<Option<PresenceEntry>, Error> {
        super::projections::read(&self.kv, &key(owner, catalog)).await
    }

    async fn entries(&self) -> Result<Vec<(PresenceEntry, u64)>, Error> {
        let mut keys = self.kv.keys().await.map_err(|e| Error::Unavailable(format!("cannot list presence: {e}")))?;
        let mut out = Vec::new();
        while let Some(Ok(k)) = keys.next().await {
            if let Ok(Some(e)) = self.kv.entry(&k).await {
                if let Ok(p) = serde_json::from_slice::<PresenceEntry>(&e.value) {
                    out.push((p, e.revision));
                }
            }
        }
        Ok(out)
    }

    /// How many catalogs are online now.
    pub async fn online_count(&self) -> Result<u64, Error> {
        Ok(self.entries().await?.iter().filter(|(p, _)| p.is_online(self.ttl)).count() as u64)
    }

    /// Marks offline every entry whose heartbeats stopped; returns those this instance changed
    /// (compare-and-set: exactly one instance wins each), for announcing.
    pub async fn sweep(&self) -> Result<Vec<PresenceEntry>, Error> {
        let mut expired = Vec::new();
        for (mut entry, revision) in self.entries().await? {
            if !entry.online || entry.is_online(self.ttl) {
                continue;
            }
            entry.online = false;
            let Ok(bytes) = serde_json::to_vec(&entry) else { continue };
            if self.kv.update(key(&entry.account_key, &entry.catalog), bytes.into(), revision).await.is_ok() {
                expired.push(entry);
            }
        }
        Ok(expired)
    }
}
