//! The catalog server as a NATS micro service (async-nats' service API), so the standard
//! tools see it: `nats micro ls` lists every running catalog server of an account (service
//! `natster-catalog`, metadata `catalog`, `revision`, `protocol`), `nats micro info` its
//! endpoints, and `nats micro stats` requests, processing time and errors per endpoint.
//!
//! Endpoints are one per operation and caller kind: `get` answers other accounts (through
//! their imports, `<ACCOUNT>.natster.catalog.<name>.get`), `get-own` the owner's own account
//! (`natster.catalog.<name>.get`), and so on for `download`, `open`, `read`, `close`. All share
//! one queue group per catalog, so several servers of one catalog split its readers.
//!
//! Tricky cases:
//! - A refusal is sent as the original's JSON error envelope (an original client parses
//!   nothing else), so the library counts it as a request, not an error (its error replies
//!   carry only headers). Refusals are counted here instead and shown in each endpoint's
//!   `data` (`refused`), as are replies streamed outside the reply subject (`streamed`:
//!   v1 `download`, v2 `read`), which the library cannot time.
//! - A v1-only server registers `get` and `download` alone, as an original server answers:
//!   a v2 request then finds no responder, exactly as against an original peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use async_nats::service::{Service, ServiceExt as _};
use futures::stream::{BoxStream, SelectAll};
use futures::StreamExt as _;

use crate::protocol::Operation;

/// The service name every catalog server registers under.
pub const SERVICE_NAME: &str = "natster-catalog";

const ALL_OPERATIONS: [Operation; 5] =
    [Operation::Get, Operation::Download, Operation::Open, Operation::Read, Operation::Close];
const V1_OPERATIONS: [Operation; 2] = [Operation::Get, Operation::Download];

/// Suffix of the endpoints answering the owner's own account.
const OWN_SUFFIX: &str = "-own";

/// Per-operation counts the library does not keep (see the module doc).
#[derive(Default)]
pub struct Counters {
    refused: [AtomicU64; ALL_OPERATIONS.len()],
    streamed: [AtomicU64; ALL_OPERATIONS.len()],
}

fn slot(op: Operation) -> usize {
    ALL_OPERATIONS.iter().position(|o| *o == op).unwrap_or(0)
}

impl Counters {
    pub fn refused(&self, op: Operation) {
        self.refused[slot(op)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn streamed(&self, op: Operation) {
        self.streamed[slot(op)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `data` of endpoint `endpoint` in `$SRV.STATS`.
    fn data(&self, endpoint: &str) -> serde_json::Value {
        let op = Operation::parse(endpoint.strip_suffix(OWN_SUFFIX).unwrap_or(endpoint));
        match op {
            Some(op) => serde_json::json!({
                "refused": self.refused[slot(op)].load(Ordering::Relaxed),
                "streamed": self.streamed[slot(op)].load(Ordering::Relaxed),
            }),
            None => serde_json::Value::Null,
        }
    }
}

/// A registered catalog service and its requests, each tagged with its operation.
pub struct Registered {
    pub service: Service,
    pub requests: SelectAll<BoxStream<'static, (Operation, async_nats::service::Request)>>,
}

/// What the service tells `nats micro info` about the catalog.
pub struct Description<'a> {
    pub catalog: &'a str,
    pub revision: &'a str,
    pub protocol: u32,
    pub v1_only: bool,
}

/// Registers the service and its endpoints; the caller flushes before saying it serves.
pub async fn register(
    nats: &async_nats::Client,
    description: Description<'_>,
    counters: Arc<Counters>,
) -> Result<Registered> {
    let catalog = description.catalog;
    let metadata = HashMap::from([
        ("catalog".to_string(), catalog.to_string()),
        ("revision".to_string(), description.revision.to_string()),
        ("protocol".to_string(), description.protocol.to_string()),
    ]);
    let service = nats
        .service_builder()
        .description(format!("natster-mount catalog server for '{catalog}'"))
        .metadata(metadata)
        .queue_group(format!("natster-catalog-{catalog}"))
        .stats_handler(move |endpoint, _| counters.data(&endpoint))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot register catalog '{catalog}' as a NATS service: {e}"))?;
    let operations: &[Operation] = if description.v1_only { &V1_OPERATIONS } else { &ALL_OPERATIONS };
    let mut requests = SelectAll::new();
    for &op in operations {
        for (name, subject) in [
            (op.as_str().to_string(), format!("*.natster.catalog.{catalog}.{}", op.as_str())),
            (format!("{}{OWN_SUFFIX}", op.as_str()), format!("natster.catalog.{catalog}.{}", op.as_str())),
        ] {
            let endpoint = service
                .endpoint_builder()
                .name(&name)
                .add(subject.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| {
                    format!("cannot subscribe to {subject}; check that your user may subscribe to natster.catalog.>")
                })?;
            requests.push(endpoint.map(move |request| (op, request)).boxed());
        }
    }
    Ok(Registered { service, requests })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_reported_per_operation_for_both_endpoint_kinds() {
        let counters = Counters::default();
        counters.refused(Operation::Open);
        counters.refused(Operation::Open);
        counters.streamed(Operation::Read);
        assert_eq!(counters.data("open")["refused"], 2);
        assert_eq!(counters.data("open-own")["refused"], 2);
        assert_eq!(counters.data("read")["streamed"], 1);
        assert_eq!(counters.data("get")["refused"], 0);
        assert!(counters.data("bogus").is_null());
    }
}
