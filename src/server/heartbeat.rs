//! The catalog server's presence: the original's heartbeat `{catalog, account_key, revision}`
//! (`revision` the catalog's `last_modified`, an int64; our revision digest in the additive
//! `revision_id`) on `natster.global.heartbeats.put` (the global service, through the
//! account's import) and `natster.local-events.heartbeat` (the account's own mounts), at start,
//! every [`super::ServerOptions::heartbeat_interval`] and at once after a re-index; on a clean
//! stop an offline notice on `natster.global.heartbeats.offline` and `natster.local-events.offline`.
//!
//! Invariants: a heartbeat never waits on the network for long (bounded publishes; a beat that
//! cannot leave while NATS is down is skipped, the next one says the same); it never decides
//! who may read (the share list does).

use std::time::Duration;

use crate::global::wire::{self, Heartbeat};
use crate::index::Catalog;

/// Builds the heartbeat of `catalog` as served by `account` ("" without accounts).
pub fn heartbeat(catalog: &Catalog, account: &str) -> Heartbeat {
    Heartbeat {
        catalog: catalog.name.clone(),
        account_key: account.to_string(),
        revision: catalog.last_modified,
        revision_id: Some(catalog.revision()),
    }
}

/// Publishes `beat` (or, with `online` false, the offline notice) to the global service and
/// to the account's own mounts, each publish bounded by `bound`.
pub async fn announce(nats: &async_nats::Client, beat: &Heartbeat, online: bool, bound: Duration) {
    let Ok(body) = serde_json::to_vec(beat) else { return };
    let (global, local) = if online {
        (wire::HEARTBEATS_PUT, wire::LOCAL_HEARTBEAT)
    } else {
        (wire::HEARTBEATS_OFFLINE, wire::LOCAL_OFFLINE)
    };
    for subject in [global, local] {
        // While NATS is down the publish queue may be full: skip this beat, not wait.
        let _ = tokio::time::timeout(bound, nats.publish(subject, body.clone().into())).await;
    }
}
