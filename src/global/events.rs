//! The event log: JetStream stream `NATSTER_EVENTS`, subjects
//! `natster.events.<origin>.<target|none>.<catalog|none>.<type>`, the only source of truth of
//! the global service (projections are rebuilt from it).
//!
//! Invariants and tricky cases:
//! - Every append is an acknowledged JetStream publish (the original used core publishes and
//!   answered 200 without knowing the event was stored). An unavailable stream (no responders,
//!   JetStream restarting) is retried with backoff within a bound, under one `Nats-Msg-Id`, so
//!   a retry whose first attempt did land is dropped by the stream's duplicate window rather
//!   than logged twice.
//! - `origin` is always the caller's account from subject token 0, never a field of the
//!   request; a user can never log `context_bound` (only `otc.claim` does).
//! - Names and keys become subject tokens: catalogs are checked against the catalog-name rules
//!   (a superset of the original's `^[A-Za-z0-9]+$`), accounts must be valid account keys.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;

use super::wire::{self, EventPut, Initialized, NONE};
use super::{Error, Refusal};
use crate::protocol::{is_account_key, validate_catalog_name};

/// The stream's name.
pub const STREAM: &str = "NATSTER_EVENTS";
/// What the stream captures.
pub const STREAM_SUBJECTS: &str = "natster.events.*.*.*.*";
/// The original's bound on the log.
const MAX_BYTES: i64 = 1 << 30;
/// Largest event payload accepted from a user.
pub const MAX_EVENT_DATA: usize = 8 * 1024;
/// Bound on one append, retries included: longer than a JetStream cluster takes to elect a
/// new leader for the log after its leader's node dies (4 to 9 s in nats-server's Raft).
pub const APPEND_DEADLINE: Duration = Duration::from_secs(12);

/// The five event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Initialized,
    Shared,
    Unshared,
    Imported,
    ContextBound,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Initialized => wire::NATSTER_INITIALIZED,
            EventType::Shared => wire::CATALOG_SHARED,
            EventType::Unshared => wire::CATALOG_UNSHARED,
            EventType::Imported => wire::CATALOG_IMPORTED,
            EventType::ContextBound => wire::CONTEXT_BOUND,
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        Some(match s {
            wire::NATSTER_INITIALIZED => EventType::Initialized,
            wire::CATALOG_SHARED => EventType::Shared,
            wire::CATALOG_UNSHARED => EventType::Unshared,
            wire::CATALOG_IMPORTED => EventType::Imported,
            wire::CONTEXT_BOUND => EventType::ContextBound,
            _ => return None,
        })
    }
}

/// An event ready to be logged.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub origin: String,
    /// An account key, or `none`.
    pub target: String,
    /// A catalog name, or `none`.
    pub catalog: String,
    pub kind: EventType,
    pub payload: Bytes,
}

impl NewEvent {
    pub fn subject(&self) -> String {
        wire::event_subject(&self.origin, &self.target, &self.catalog, self.kind.as_str())
    }
}

/// An event read back from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Stream sequence: what projections record to stay idempotent.
    pub seq: u64,
    /// When the stream stored it, Unix seconds.
    pub time: i64,
    pub origin: String,
    pub target: Option<String>,
    pub catalog: Option<String>,
    pub kind: EventType,
    pub payload: Bytes,
}

impl Event {
    /// Parses a stored event; None for a subject that is not an event's (logged by hand).
    pub fn parse(subject: &str, payload: Bytes, seq: u64, time: i64) -> Option<Event> {
        let tokens: Vec<&str> = subject.split('.').collect();
        let ["natster", "events", origin, target, catalog, kind] = tokens.as_slice() else { return None };
        let optional = |t: &str| (t != NONE).then(|| t.to_string());
        Some(Event {
            seq,
            time,
            origin: origin.to_string(),
            target: optional(target),
            catalog: optional(catalog),
            kind: EventType::parse(kind)?,
            payload,
        })
    }
}

/// Checks an `events.put` from `caller` the way the original does, and more: the caller is
/// the origin; `context_bound` is the service's own; targets and catalogs fit their event.
pub fn validate(caller: &str, put: &EventPut) -> Result<NewEvent, Refusal> {
    if put.catalog.is_empty() || put.target.is_empty() || put.event_type.is_empty() {
        return Err(Refusal::new(400, "catalog, target and event_type are all required (use \"none\" for none)"));
    }
    let kind = EventType::parse(&put.event_type).ok_or_else(|| {
        Refusal::new(
            400,
            format!(
                "unknown event_type '{}'; use natster_initialized, catalog_shared, catalog_unshared or catalog_imported",
                put.event_type.chars().take(64).collect::<String>()
            ),
        )
    })?;
    if kind == EventType::ContextBound {
        return Err(Refusal::new(403, "context_bound events are logged only by the global service (otc.claim)"));
    }
    let payload = match &put.data {
        None => Bytes::from_static(b"null"),
        Some(data) => Bytes::from(serde_json::to_vec(data).map_err(|_| Refusal::new(400, "data is not JSON"))?),
    };
    if payload.len() > MAX_EVENT_DATA {
        return Err(Refusal::new(413, format!("event data is larger than {MAX_EVENT_DATA} bytes")));
    }
    match kind {
        EventType::Initialized => {
            if put.catalog != NONE || put.target != NONE {
                return Err(Refusal::new(400, "natster_initialized takes catalog \"none\" and target \"none\""));
            }
            if let Some(data) = &put.data {
                let init: Initialized = serde_json::from_value(data.clone()).map_err(|_| {
                    Refusal::new(400, "natster_initialized data must be {account_id,account_name,account_key}")
                })?;
                if !init.account_key.is_empty() && init.account_key != caller {
                    return Err(Refusal::new(403, "natster_initialized names another account than the caller's"));
                }
            }
        }
        EventType::Shared | EventType::Unshared | EventType::Imported => {
            validate_catalog_name(&put.catalog).map_err(|e| Refusal::new(400, e))?;
            if !is_account_key(&put.target) {
                return Err(Refusal::new(400, format!("target '{}' is not an account public key", short(&put.target))));
            }
            if put.target == caller {
                return Err(Refusal::new(400, "target is the caller's own account"));
            }
        }
        EventType::ContextBound => {}
    }
    Ok(NewEvent { origin: caller.to_string(), target: put.target.clone(), catalog: put.catalog.clone(), kind, payload })
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The stream, created if missing (file storage, 1 GiB, no age limit: the original's), on
/// `replicas` servers of a cluster (the original's R1 on one server).
pub async fn ensure_stream(js: &jetstream::Context, replicas: usize) -> Result<jetstream::stream::Stream, Error> {
    let config = jetstream::stream::Config {
        name: STREAM.to_string(),
        subjects: vec![STREAM_SUBJECTS.to_string()],
        max_bytes: MAX_BYTES,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| Error::Store(format!("cannot open stream {STREAM}: {e}")))
}

/// Whether a publish error is JetStream saying it cannot answer now (a 503: no leader, the
/// cluster not ready), which a retry outlives.
fn is_unavailable(error: &jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    let api = error.source().and_then(|s| s.downcast_ref::<jetstream::Error>());
    match api {
        Some(api) => api.code() == 503,
        None => error.to_string().contains("503") || error.to_string().contains("temporarily unavailable"),
    }
}

/// Appends events with acknowledged publishes.
#[derive(Clone)]
pub struct EventLog {
    js: jetstream::Context,
}

impl EventLog {
    pub fn new(js: jetstream::Context) -> Self {
        EventLog { js }
    }

    /// Logs `event` and returns its stream sequence once the stream has stored it. Retries
    /// what a restarting or briefly missing stream answers, with backoff, within a bound.
    pub async fn append(&self, event: &NewEvent) -> Result<u64, Error> {
        let id = format!("{:032x}", rand::random::<u128>());
        let subject = event.subject();
        let deadline = tokio::time::Instant::now() + APPEND_DEADLINE;
        let mut delay = Duration::from_millis(50);
        loop {
            let message = jetstream::message::PublishMessage::build().payload(event.payload.clone()).message_id(&id);
            let attempt = async {
                let ack = self.js.send_publish(subject.clone(), message).await?;
                ack.await
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let outcome = tokio::time::timeout(left, attempt).await;
            let error = match outcome {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "the event log did not acknowledge within {APPEND_DEADLINE:?}"
                    )))
                }
            };
            use jetstream::context::PublishErrorKind as K;
            // A cluster electing a stream leader answers "no responders" (StreamNotFound here)
            // or a JetStream 503; both pass within seconds, as the Go client's retries assume.
            let transient = matches!(error.kind(), K::StreamNotFound | K::TimedOut | K::BrokenPipe | K::MaxAckPending)
                || (error.kind() == K::Other && is_unavailable(&error));
            if !transient || tokio::time::Instant::now() + delay >= deadline {
                return Err(Error::Unavailable(format!("cannot log the event: {error}")));
            }
            tracing::debug!("event log busy ({error}); retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(800));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(catalog: &str, target: &str, kind: &str) -> EventPut {
        EventPut { catalog: catalog.into(), target: target.into(), event_type: kind.into(), data: None }
    }

    #[test]
    fn validation() {
        let me = nkeys::KeyPair::new_account().public_key();
        let you = nkeys::KeyPair::new_account().public_key();
        let ok = validate(&me, &put("movies", &you, "catalog_shared")).expect("valid share");
        assert_eq!(ok.subject(), format!("natster.events.{me}.{you}.movies.catalog_shared"));
        assert_eq!(&ok.payload[..], b"null");
        let code = |p: EventPut| validate(&me, &p).unwrap_err().code;
        assert_eq!(code(put("", &you, "catalog_shared")), 400);
        assert_eq!(code(put("movies", &you, "nope")), 400);
        assert_eq!(code(put("a.b", &you, "catalog_shared")), 400);
        assert_eq!(code(put("movies", "ANOTAKEY", "catalog_shared")), 400);
        assert_eq!(code(put("movies", &me, "catalog_shared")), 400);
        assert_eq!(code(put("none", "none", "context_bound")), 403);
        assert_eq!(code(put("movies", "none", "natster_initialized")), 400);
        let mut forged = put("none", "none", "natster_initialized");
        forged.data = Some(serde_json::json!({"account_key": you}));
        assert_eq!(code(forged), 403);
        let mut big = put("movies", &you, "catalog_shared");
        big.data = Some(serde_json::Value::String("x".repeat(MAX_EVENT_DATA)));
        assert_eq!(code(big), 413);
    }

    #[test]
    fn parse_round_trip() {
        let e = Event::parse("natster.events.A.none.none.natster_initialized", Bytes::new(), 3, 9).expect("event");
        assert_eq!((e.target, e.catalog, e.kind), (None, None, EventType::Initialized));
        assert!(Event::parse("natster.events.A.none.none.bogus", Bytes::new(), 1, 1).is_none());
        assert!(Event::parse("natster.other.A.none.none.catalog_shared", Bytes::new(), 1, 1).is_none());
    }
}
