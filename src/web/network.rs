//! The web UI on the Natster network: online dots and revisions (the presence the read engine
//! keeps from heartbeats, see `fs::presence`), the inbox of shares offered to this account and
//! not imported yet (the global service's `my.shares`), and the engine following the
//! context's catalogs, so an import (from the page or the CLI) shows up without a restart.
//!
//! Invariants and tricky cases:
//! - Nothing here decides access: a lying or absent global service can only hide or invent
//!   inbox entries; an import of a share that does not exist reads nothing (the owner's share
//!   list decides).
//! - The inbox is re-read on a `shared` event (the global service tells the target at once),
//!   after an import from the page, and every [`INBOX_POLL`]; it is `None` while the global
//!   service does not answer, which the page shows as "unavailable".
//! - The context and the home's catalog names are re-read every [`FOLLOW_POLL`] off the async
//!   workers; the engine changes only when the planned catalogs do.
//! - Every change that a page shows bumps one counter, which the event watcher turns into
//!   a `presence` event.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{watch, Notify};

use super::presence::{PendingShare, Presence};
use crate::context::{Context, Home};
use crate::fs::mount::{self, ListingRefresh, MountOptions, Planned};
use crate::fs::presence::State;
use crate::fs::NatsterFs;
use crate::global::client::GlobalClient;
use crate::global::wire;

/// How often the context is re-read for imports made elsewhere, and presence compared.
pub const FOLLOW_POLL: Duration = Duration::from_secs(2);
/// How often the inbox is asked for without an event.
pub const INBOX_POLL: Duration = Duration::from_secs(30);
/// Bound on one `my.shares` call.
const SHARES_TIMEOUT: Duration = Duration::from_secs(3);

/// What the engine follows: the context in the home, on its NATS connection.
pub struct Follow {
    pub home: Home,
    pub context: String,
    pub nats: async_nats::Client,
    pub options: MountOptions,
    pub refresh: Arc<ListingRefresh>,
    /// The catalogs the engine started with.
    pub planned: Vec<Planned>,
}

/// [`Presence`] from the read engine and the global service.
pub struct NetworkPresence {
    fs: Arc<NatsterFs>,
    inbox: Mutex<Option<Vec<PendingShare>>>,
    changes: watch::Sender<u64>,
    kick: Notify,
}

impl NetworkPresence {
    /// Starts following; the task ends with the returned handle's abort.
    pub fn spawn(fs: Arc<NatsterFs>, follow: Follow) -> (Arc<NetworkPresence>, tokio::task::JoinHandle<()>) {
        let presence = Arc::new(NetworkPresence {
            fs,
            inbox: Mutex::new(None),
            changes: watch::channel(0).0,
            kick: Notify::new(),
        });
        let task = tokio::spawn(presence.clone().run(follow));
        (presence, task)
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set_inbox(&self, inbox: Option<Vec<PendingShare>>) {
        let mut current = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if *current != inbox {
            *current = inbox;
            drop(current);
            self.bump();
        }
    }

    fn presence_snapshot(&self) -> Vec<(String, State, Option<String>)> {
        self.fs
            .catalogs()
            .into_iter()
            .map(|(_, c)| {
                let p = c.presence();
                (c.dir_name.clone(), p.state, p.revision_id)
            })
            .collect()
    }

    async fn run(self: Arc<Self>, mut follow: Follow) {
        let mut planned = std::mem::take(&mut follow.planned);
        let follow = Arc::new(follow);
        let global = GlobalClient::new(follow.nats.clone(), SHARES_TIMEOUT);
        let mut shared = match follow.nats.subscribe(wire::EVENTS_SHARED).await {
            Ok(sub) => Some(sub),
            Err(e) => {
                tracing::debug!("no share events ({e}); polling the inbox");
                None
            }
        };
        let mut presence = self.presence_snapshot();
        let mut follow_tick = tokio::time::interval(FOLLOW_POLL);
        let mut inbox_tick = tokio::time::interval(INBOX_POLL);
        loop {
            let ask_inbox = tokio::select! {
                _ = follow_tick.tick() => false,
                _ = inbox_tick.tick() => true,
                _ = self.kick.notified() => true,
                msg = async { shared.as_mut()?.next().await }, if shared.is_some() => {
                    if msg.is_none() {
                        shared = None;
                    }
                    true
                }
            };
            let context = follow_context(&follow, &mut planned).await;
            if ask_inbox {
                let inbox = match (&context, global.my_shares().await) {
                    (Some(context), Ok(shares)) => Some(pending(context, shares)),
                    (None, _) => None,
                    (_, Err(e)) => {
                        tracing::debug!("inbox unavailable: {e}");
                        None
                    }
                };
                self.set_inbox(inbox);
            }
            let now = self.presence_snapshot();
            if now != presence {
                presence = now;
                self.bump();
            }
        }
    }
}

/// Re-reads the context and makes the engine hold the catalogs it plans (off the workers).
async fn follow_context(follow: &Arc<Follow>, planned: &mut Vec<Planned>) -> Option<Context> {
    let f = follow.clone();
    let read = tokio::task::spawn_blocking(move || {
        let context = Context::load(&f.home, &f.context)?;
        let planned = mount::plan_catalogs(&f.home, &context);
        anyhow::Ok((context, planned))
    });
    let (context, now) = match read.await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            tracing::debug!("cannot re-read the context: {e:#}");
            return None;
        }
        Err(_) => return None,
    };
    if now != *planned {
        let (f, plan, ctx) = (follow.clone(), now.clone(), context.clone());
        // `gather` reads indexes and saved listings: a blocking thread, inside the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            f.refresh.sync(&plan, |new| {
                mount::gather(&f.home, &ctx, &f.nats, &f.options, new).unwrap_or_else(|e| {
                    tracing::warn!("cannot add the new catalogs: {e:#}");
                    Vec::new()
                })
            })
        })
        .await;
    }
    *planned = now;
    Some(context)
}

/// The shares offered to `context`'s account that it does not import.
fn pending(context: &Context, shares: Vec<wire::Share>) -> Vec<PendingShare> {
    let mut out: Vec<PendingShare> = shares
        .into_iter()
        .filter(|s| crate::cli::inbox::is_offer(context, s))
        .map(|s| PendingShare { catalog: s.catalog, owner: s.from_account })
        .collect();
    out.sort_by(|a, b| (&a.catalog, &a.owner).cmp(&(&b.catalog, &b.owner)));
    out.dedup();
    out
}

impl Presence for NetworkPresence {
    fn online(&self, owner: &str, catalog: &str) -> Option<bool> {
        let found = self.fs.catalogs().into_iter().find(|(_, c)| c.name == catalog && c.owner == owner)?;
        match found.1.presence().state {
            State::Online => Some(true),
            State::Offline => Some(false),
            State::Unknown => None,
        }
    }

    fn revision(&self, owner: &str, catalog: &str) -> Option<String> {
        let found = self.fs.catalogs().into_iter().find(|(_, c)| c.name == catalog && c.owner == owner)?;
        found.1.presence().revision_id
    }

    fn inbox(&self) -> Option<Vec<PendingShare>> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    fn imported(&self) {
        self.kick.notify_one();
    }
}
