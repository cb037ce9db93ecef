//! Events the global service did not take yet: kept in `$NATSTER_HOME/<context>.outbox.json`
//! and sent, oldest first, before the next event or inbox call of that context that reaches
//! it, and by that context's running `up` or `mount` as soon as the service answers again. So
//! a share made while the global service is down still reaches the inbox later, and an
//! account added before `operator up` is initialized at its first command after.
//!
//! Invariants and tricky cases:
//! - At most [`MAX_KEPT`] events (the oldest go first beyond it); an event the service refuses
//!   (a 4xx: initialized already, say) is dropped, not retried forever.
//! - Several processes of one context share the file (a CLI command and a running `up`).
//!   Every read-modify-write holds `.<context>.outbox.lock` (an exclusive `flock`, for the few
//!   milliseconds of the file's update, never across the network). Each kept event has an id,
//!   and a delivery removes exactly the ids it sent: an event another process keeps meanwhile
//!   is never lost.
//! - One process at a time sends kept events (`.<context>.outbox.sending`, taken without
//!   waiting and held across the sends), so two of them never send one event twice; the other
//!   sends only its own new event, and keeps it if that fails.
//! - The file is written atomically (0600) and removed when empty. All file work runs through
//!   [`store::blocking`]; a file that does not parse is moved aside (`….json.unreadable-PID`),
//!   with a warning, and new events are kept in a fresh one rather than over it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::context::Home;
use crate::global::client::{CallError, GlobalClient};
use crate::global::wire::EventPut;
use crate::store::{self, FileLock};

/// Most events kept for later.
pub const MAX_KEPT: usize = 256;

/// A kept event and the id deliveries remove it by (0 in files written before ids: given one
/// at the next delivery).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Kept {
    #[serde(default)]
    id: u64,
    #[serde(flatten)]
    event: EventPut,
}

pub struct Outbox {
    path: PathBuf,
    lock: PathBuf,
    sending: PathBuf,
}

impl Outbox {
    pub fn of(home: &Home, context: &str) -> Outbox {
        Outbox {
            path: home.path().join(format!("{context}.outbox.json")),
            lock: home.path().join(format!(".{context}.outbox.lock")),
            sending: home.path().join(format!(".{context}.outbox.sending")),
        }
    }

    /// True if events wait to be sent (a cheap check: the file exists only then).
    pub fn has_events(&self) -> bool {
        store::blocking(|| self.path.exists())
    }

    /// Runs `update` on the kept events under the file's lock and saves what it leaves.
    fn update<T>(&self, update: impl FnOnce(&mut Vec<Kept>) -> T) -> Option<T> {
        store::blocking(|| {
            let _lock = match FileLock::acquire(&self.lock) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("cannot keep unsent events: {e:#}");
                    return None;
                }
            };
            let mut events = match store::load_json::<Vec<Kept>>(&self.path) {
                Ok(events) => events.unwrap_or_default(),
                Err(e) => {
                    self.set_aside(&e);
                    Vec::new()
                }
            };
            let before = events.clone();
            let out = update(&mut events);
            if events != before {
                self.save(&events);
            }
            Some(out)
        })
    }

    /// A file that does not parse is renamed, so that neither this process nor the next
    /// overwrites what it held.
    fn set_aside(&self, e: &anyhow::Error) {
        let aside = self.path.with_extension(format!("json.unreadable-{}", std::process::id()));
        match std::fs::rename(&self.path, &aside) {
            Ok(()) => tracing::warn!("{e:#}; moved aside to {} and starting a new one", aside.display()),
            Err(r) => tracing::warn!("{e:#}, and it cannot be moved aside ({r}); unsent events may be lost"),
        }
    }

    fn save(&self, events: &[Kept]) {
        let kept = &events[events.len().saturating_sub(MAX_KEPT)..];
        let written = if kept.is_empty() {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        } else {
            serde_json::to_vec(kept)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| store::write_atomic(&self.path, &bytes, 0o600))
        };
        if let Err(e) = written {
            tracing::warn!("cannot keep unsent events in {}: {e:#}", self.path.display());
        }
    }

    /// Keeps `events` for later (the global service or NATS itself was unreachable).
    pub fn keep(&self, events: impl IntoIterator<Item = EventPut>) {
        let fresh: Vec<Kept> = events.into_iter().map(|event| Kept { id: new_id(), event }).collect();
        if !fresh.is_empty() {
            self.update(|kept| kept.extend(fresh));
        }
    }

    /// Sends what is kept (unless another process is sending it right now), then `event` if
    /// any; keeps what could not be sent. Says how many kept events went, or errs with the
    /// first "unavailable" it met.
    pub async fn deliver(&self, client: &GlobalClient, event: Option<EventPut>) -> Result<usize, CallError> {
        let sending = store::blocking(|| FileLock::try_acquire(&self.sending)).unwrap_or_else(|e| {
            tracing::debug!("kept events left to the next delivery: {e:#}");
            None
        });
        let mut failure = None;
        let mut sent = 0;
        if sending.is_some() && self.has_events() {
            let kept = self
                .update(|kept| {
                    for k in kept.iter_mut().filter(|k| k.id == 0) {
                        k.id = new_id();
                    }
                    kept.clone()
                })
                .unwrap_or_default();
            let mut done = Vec::new();
            for k in &kept {
                match send(client, &k.event).await {
                    Ok(()) => done.push(k.id),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if !done.is_empty() {
                self.update(|kept| kept.retain(|k| !done.contains(&k.id)));
                sent = done.len();
            }
        }
        drop(sending);
        if let Some(event) = event {
            // After a failure the service is known not to answer: keep it without asking.
            let sent = match &failure {
                None => send(client, &event).await,
                Some(_) => Err(CallError::Unavailable(String::new())),
            };
            if let Err(e) = sent {
                self.keep([event]);
                failure.get_or_insert(e);
            }
        }
        failure.map_or(Ok(sent), Err)
    }
}

/// Sends one event; a refusal (4xx) counts as done, the event dropped.
async fn send(client: &GlobalClient, event: &EventPut) -> Result<(), CallError> {
    match client.put(event).await {
        Err(CallError::Refused { code, message }) if code < 500 => {
            tracing::debug!("event {} refused ({code}: {message}); dropped", event.event_type);
            Ok(())
        }
        other => other,
    }
}

fn new_id() -> u64 {
    // Never 0, which marks an event kept before ids.
    rand::random::<u64>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(target: &str) -> EventPut {
        EventPut { catalog: "media".into(), target: target.into(), event_type: "catalog_shared".into(), data: None }
    }

    fn outbox() -> (tempfile::TempDir, Outbox) {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::of(&Home::at(dir.path()), "a");
        (dir, outbox)
    }

    fn targets(o: &Outbox) -> Vec<String> {
        o.update(|k| k.iter().map(|k| k.event.target.clone()).collect()).unwrap()
    }

    #[test]
    fn events_are_kept_in_order_and_bounded() {
        let (_dir, o) = outbox();
        assert!(!o.has_events());
        o.keep((0..MAX_KEPT + 2).map(|i| event(&i.to_string())));
        let kept = targets(&o);
        assert_eq!(kept.len(), MAX_KEPT);
        assert_eq!(kept.first().map(String::as_str), Some("2"), "the oldest went first");
        assert!(o.has_events());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&o.path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn removing_what_was_sent_keeps_what_another_process_kept_meanwhile() {
        let (_dir, o) = outbox();
        o.keep([event("bob")]);
        // What a delivery read before its sends...
        let read = o.update(|k| k.clone()).unwrap();
        // ...another process keeps an event during them...
        o.keep([event("eve")]);
        // ...and the delivery removes only the ids it sent.
        o.update(|k| k.retain(|k| !read.iter().any(|r| r.id == k.id)));
        assert_eq!(targets(&o), ["eve"]);
        o.update(Vec::clear);
        assert!(!o.path.exists(), "removed when empty");
    }

    #[test]
    fn a_file_from_before_ids_still_loads() {
        let (_dir, o) = outbox();
        std::fs::write(&o.path, br#"[{"catalog":"media","target":"bob","event_type":"catalog_shared"}]"#).unwrap();
        assert_eq!(targets(&o), ["bob"]);
    }

    #[test]
    fn an_unreadable_file_is_moved_aside_not_overwritten() {
        let (dir, o) = outbox();
        std::fs::write(&o.path, b"{not json").unwrap();
        o.keep([event("bob")]);
        assert_eq!(targets(&o), ["bob"]);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("unreadable"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), b"{not json");
    }
}
