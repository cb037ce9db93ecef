//! What changed, for the pages' live updates (`/api/events`): a catalog's revision (a new
//! listing applied by whoever refreshes the engine), an own catalog's share list (changed here
//! or by `catalog share` in a terminal), a catalog's reachability as reads find it, and
//! whatever the global service reports.
//!
//! One watcher compares snapshots: at once when the engine applies a listing or the presence
//! plug says something changed, and every [`WATCH_INTERVAL`] otherwise (share lists are files:
//! one `stat` each, off the async workers). Pages re-read the API on an event, so a missed
//! event (a slow page lagging the channel) costs at most one interval.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::shares::ShareList;

pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `catalogs` (one came or went), `revision`, `shares`, `reachability` or `presence`.
    pub kind: &'static str,
    /// The catalog's id (its folder name), when the event is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
}

pub(crate) struct Events {
    tx: broadcast::Sender<Event>,
}

impl Events {
    pub fn new() -> Events {
        Events { tx: broadcast::channel(64).0 }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn send(&self, event: Event) {
        // No page listening is fine.
        let _ = self.tx.send(event);
    }
}

type FileIdentity = Option<(SystemTime, u64, u64)>;

#[derive(PartialEq)]
struct Snapshot {
    /// Per catalog index (catalogs come and go while the UI runs).
    catalogs: BTreeMap<usize, CatalogSnapshot>,
}

#[derive(PartialEq)]
struct CatalogSnapshot {
    dir_name: String,
    revision: String,
    down: bool,
    /// Its share list file's identity (own catalogs only).
    shares: FileIdentity,
}

async fn snapshot(state: &super::State) -> Snapshot {
    let catalogs = state.fs.catalogs();
    let paths: Vec<Option<std::path::PathBuf>> = catalogs
        .iter()
        .map(|(_, c)| super::api::is_own(state, c).then(|| ShareList::path(&state.ctx.home, &c.name)))
        .collect();
    let n = paths.len();
    let shares: Vec<FileIdentity> = tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|p| {
                // Every save is a rename: the inode changes even within one mtime tick.
                let m = std::fs::metadata(p?).ok()?;
                Some((m.modified().ok()?, m.ino(), m.len()))
            })
            .collect()
    })
    .await
    .unwrap_or_else(|_| vec![None; n]);
    let catalogs = catalogs
        .into_iter()
        .zip(shares)
        .map(|((i, c), shares)| {
            (i, CatalogSnapshot { dir_name: c.dir_name.clone(), revision: c.revision(), down: c.known_down(), shares })
        })
        .collect();
    Snapshot { catalogs }
}

fn differences(old: &Snapshot, new: &Snapshot) -> Vec<Event> {
    let mut events = Vec::new();
    for (i, now) in &new.catalogs {
        let id = || Some(now.dir_name.clone());
        let Some(was) = old.catalogs.get(i) else {
            events.push(Event { kind: "catalogs", catalog: id() });
            continue;
        };
        if was.revision != now.revision {
            events.push(Event { kind: "revision", catalog: id() });
        }
        if was.shares != now.shares {
            events.push(Event { kind: "shares", catalog: id() });
        }
        if was.down != now.down {
            events.push(Event { kind: "reachability", catalog: id() });
        }
    }
    for (i, was) in &old.catalogs {
        if !new.catalogs.contains_key(i) {
            events.push(Event { kind: "catalogs", catalog: Some(was.dir_name.clone()) });
        }
    }
    events
}

/// Runs until aborted, sending an [`Event`] for every difference it sees.
pub(crate) async fn watch(state: super::State) {
    let mut listings = Some(state.fs.listing_changes());
    let mut presence = state.presence.changes();
    let mut last = snapshot(&state).await;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut presence_changed = false;
        tokio::select! {
            _ = tick.tick() => {}
            changed = async {
                match listings.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if !changed {
                    listings = None;
                }
            }
            changed = async {
                match presence.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if changed { presence_changed = true } else { presence = None }
            }
        }
        let now = snapshot(&state).await;
        if presence_changed {
            state.events.send(Event { kind: "presence", catalog: None });
        }
        if now != last {
            for event in differences(&last, &now) {
                state.events.send(event);
            }
            last = now;
        }
    }
}
