//! The callers' side of the global service, over an account's `natster.global.>` import: what
//! the CLI and mounts ask (events, shares, whoami, stats, names).
//!
//! Every call is bounded; "no one answered" (no responders, or the silence that nats-server
//! 2.9 gives across accounts) is [`CallError::Unavailable`], which callers report as one line
//! and carry on: nothing the global service says is needed to share or read.

use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::wire::{self, ApiResult, EventPut, Heartbeat, Share, Stats, ValidName, Whoami};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the global service did not answer ({0})")]
    Unavailable(String),
    #[error("the global service refused ({code}): {message}")]
    Refused { code: u16, message: String },
    #[error("the global service answered something unexpected: {0}")]
    Malformed(String),
}

impl CallError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CallError::Unavailable(_))
    }
}

/// The one line a command prints when the global service is down or refuses.
pub fn unavailable_line(e: &CallError) -> String {
    format!("note: presence and the inbox are unavailable: {e}; sharing and reading work without them")
}

/// Longest a caller waits for the global service to log an event: past its append's own
/// bound ([`crate::global::events::APPEND_DEADLINE`]). Giving up sooner would keep the event
/// for a resend while the service's own retry may still log it, logging it twice.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(14);

#[derive(Clone)]
pub struct GlobalClient {
    nats: async_nats::Client,
    timeout: Duration,
}

impl GlobalClient {
    pub fn new(nats: async_nats::Client, timeout: Duration) -> Self {
        GlobalClient { nats, timeout }
    }

    async fn call<T: DeserializeOwned>(&self, subject: &str, body: Bytes) -> Result<T, CallError> {
        // The request's own bound: the connection's may be shorter (an event's append may
        // ride out a JetStream leader election).
        let request = async_nats::Request::new().payload(body).timeout(Some(self.timeout));
        let request = self.nats.send_request(subject.to_string(), request);
        let reply = match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(CallError::Unavailable("no responders".into()))
            }
            Ok(Err(e)) => return Err(CallError::Unavailable(e.to_string())),
            Err(_) => return Err(CallError::Unavailable(format!("no answer within {:?}", self.timeout))),
        };
        let parsed: ApiResult<T> =
            serde_json::from_slice(&reply.payload).map_err(|e| CallError::Malformed(format!("{subject}: {e}")))?;
        match (parsed.code, parsed.data) {
            (200, Some(data)) => Ok(data),
            (code, _) => Err(CallError::Refused {
                code,
                message: parsed.error.unwrap_or_else(|| "no message".into()).chars().take(300).collect(),
            }),
        }
    }

    /// Logs an event (`events.put`); returns once the event log has stored it.
    pub async fn put_event(&self, event_type: &str, target: &str, catalog: &str) -> Result<(), CallError> {
        let put = EventPut {
            catalog: catalog.to_string(),
            target: target.to_string(),
            event_type: event_type.to_string(),
            data: None,
        };
        self.put(&put).await
    }

    pub async fn put(&self, put: &EventPut) -> Result<(), CallError> {
        let body = serde_json::to_vec(put).map_err(|e| CallError::Malformed(e.to_string()))?;
        self.call::<serde_json::Value>(wire::EVENTS_PUT, body.into()).await.map(|_| ())
    }

    /// Shares out of and into this account, with presence.
    pub async fn my_shares(&self) -> Result<Vec<Share>, CallError> {
        self.call(wire::MY_SHARES, Bytes::new()).await
    }

    /// None when the account is not initialized (the original's 404).
    pub async fn whoami(&self) -> Result<Option<Whoami>, CallError> {
        match self.call(wire::WHOAMI, Bytes::new()).await {
            Ok(w) => Ok(Some(w)),
            Err(CallError::Refused { code: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn stats(&self) -> Result<Stats, CallError> {
        self.call(wire::STATS, Bytes::new()).await
    }

    pub async fn validate_name(&self, name: &str) -> Result<ValidName, CallError> {
        self.call(wire::VALIDATE_NAME, Bytes::copy_from_slice(name.as_bytes())).await
    }

    /// Publishes a heartbeat (or an offline notice) to the global service; no reply.
    pub async fn heartbeat(&self, beat: &Heartbeat, online: bool) -> Result<(), CallError> {
        let subject = if online { wire::HEARTBEATS_PUT } else { wire::HEARTBEATS_OFFLINE };
        let body = serde_json::to_vec(beat).map_err(|e| CallError::Malformed(e.to_string()))?;
        match tokio::time::timeout(self.timeout, self.nats.publish(subject, body.into())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CallError::Unavailable(e.to_string())),
            Err(_) => Err(CallError::Unavailable("publish queue full".into())),
        }
    }
}
