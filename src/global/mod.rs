//! The Natster global service (`natster-mount global serve`, run in the global account;
//! `operator up` starts one): discovery, presence and history for the accounts of a Natster
//! network. It is never needed to read a catalog: the owner's share list stays the authority
//! (a catalog server never asks the global service anything), so when it is down sharing and
//! reading keep working and only the inbox and presence are missing.
//!
//! Parts: [`wire`] (subjects and JSON, the original's), [`events`] (the event log stream),
//! [`projections`] (KV views built from the log by durable consumers), [`presence`]
//! (heartbeats, online/offline), [`otc`] (one-time codes), [`outbox`] (callers' events kept
//! while the service is down), [`service`] (the request endpoints, a NATS micro service),
//! [`client`] (the callers' side, for the CLI and mounts).
//!
//! Invariants and tricky cases:
//! - Identity is subject token 0 only: the global account exports `*.natster.global.>` with
//!   account token position 1, so nats-server writes the importer's key there and refuses an
//!   import that names another. Fields such as `account_key` in a body are checked against it,
//!   never trusted. Users of the global account itself are the service's own and are trusted.
//! - The event log is the only truth; every projection can be dropped and is rebuilt from it
//!   (a fresh bucket starts a new consumer generation that replays the whole stream).
//!   Projections apply one event at a time (`max_ack_pending` 1 across all instances) and
//!   record the stream sequence in every value they write, so a redelivered event is skipped,
//!   never applied twice; redelivery is bounded (`max_deliver`).
//! - Presence is keyed by (owner account, catalog), and a heartbeat is re-broadcast only to the
//!   accounts that this catalog is shared with (the original keyed by name alone and told every
//!   recipient of the owner's other catalogs).
//! - Several instances serve at once: requests in one queue group (`globalservice`), one
//!   durable consumer per projection shared by all, compare-and-set on every KV write.
//! - Bad input (malformed JSON, oversized bodies, wrong subjects) gets the original's 4xx
//!   envelope with a one-line message; nothing a caller sends can stop the service.

pub mod client;
pub mod events;
pub mod otc;
pub mod outbox;
pub mod presence;
pub mod projections;
pub mod service;
pub mod wire;

use std::time::Duration;

pub use service::{run, GlobalOptions};

/// Queue group of every instance (the original's).
pub const QUEUE_GROUP: &str = "globalservice";
/// Name it registers under as a NATS micro service (`nats micro ls`).
pub const SERVICE_NAME: &str = "natster-global";
/// How long presence lasts without a heartbeat (three missed 30 s heartbeats).
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(90);

/// What went wrong in the global service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// JetStream (the log or a bucket) did not answer in time; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A JetStream call failed for good.
    #[error("{0}")]
    Store(String),
    /// Connecting or subscribing failed.
    #[error("{0}")]
    Nats(String),
}

/// A request refused with an envelope code (400, 403, 404, 409, 413, 500, 503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable(m) => Refusal::new(503, m),
            Error::Store(m) | Error::Nats(m) => Refusal::new(500, m),
        }
    }
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
