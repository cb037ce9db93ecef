//! Events the global service did not take yet: kept in `$NATSTER_HOME/<context>.outbox.json`
//! and sent, oldest first, before the next event or inbox call of that context that reaches
//! it. So a share made while the global service is down still reaches the inbox later, and an
//! account added before `operator up` is initialized at its first command after.
//!
//! Invariants: at most [`MAX_KEPT`] events (the oldest go first beyond it); an event the
//! service refuses (a 4xx: initialized already, say) is dropped, not retried forever; the file
//! is written atomically (0600) and removed when empty.

use std::path::PathBuf;

use crate::context::Home;
use crate::global::client::{CallError, GlobalClient};
use crate::global::wire::EventPut;

/// Most events kept for later.
pub const MAX_KEPT: usize = 256;

pub struct Outbox {
    path: PathBuf,
}

impl Outbox {
    pub fn of(home: &Home, context: &str) -> Outbox {
        Outbox { path: home.path().join(format!("{context}.outbox.json")) }
    }

    fn load(&self) -> Vec<EventPut> {
        std::fs::read(&self.path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save(&self, events: &[EventPut]) {
        let kept = &events[events.len().saturating_sub(MAX_KEPT)..];
        let written = if kept.is_empty() {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        } else {
            serde_json::to_vec(kept)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| crate::store::write_atomic(&self.path, &bytes, 0o600))
        };
        if let Err(e) = written {
            tracing::warn!("cannot keep unsent events in {}: {e:#}", self.path.display());
        }
    }

    /// Keeps `event` for later (NATS itself was unreachable).
    pub fn keep(&self, event: EventPut) {
        let mut events = self.load();
        events.push(event);
        self.save(&events);
    }

    /// Sends what is kept, then `event` if any; keeps what could not be sent. Errs with the
    /// first "unavailable" it met.
    pub async fn deliver(&self, client: &GlobalClient, event: Option<EventPut>) -> Result<(), CallError> {
        let mut events = self.load();
        let kept = events.len();
        events.extend(event);
        let mut sent = 0;
        let mut failure = None;
        for event in &events {
            match client.put(event).await {
                Ok(()) => sent += 1,
                Err(CallError::Refused { code, message }) if code < 500 => {
                    tracing::debug!("event {} refused ({code}: {message}); dropped", event.event_type);
                    sent += 1;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if sent > 0 || events.len() > kept {
            self.save(&events[sent..]);
        }
        failure.map_or(Ok(()), Err)
    }
}
