//! A daemon's NATS connection: made in the background so a daemon starts while NATS is down,
//! reconnecting after any loss (0.1 s doubling to 2 s between attempts, forever), with every
//! change of state logged once and published on a watch channel for the parts that must
//! react (mount listings refresh, servers announce themselves).

use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;

use crate::context::Context;

/// The connection and whether it is up.
pub struct Link {
    pub nats: async_nats::Client,
    pub connected: watch::Receiver<bool>,
}

/// Connects in the background; fails only when the context's creds are unusable. If NATS is
/// not reachable within `timeout`, says why once (and again at every later loss).
pub async fn connect(context: &Context, timeout: Duration) -> Result<Link> {
    let (tx, connected) = watch::channel(false);
    let server = context.server_shown();
    let nats = context
        .connect_in_background(timeout, move |event| match event {
            async_nats::Event::Connected => {
                tracing::info!("connected to NATS at {server}");
                tx.send_replace(true);
            }
            async_nats::Event::Disconnected => {
                tracing::warn!("lost NATS at {server}; reconnecting (at most 2 s between attempts)");
                tx.send_replace(false);
            }
            async_nats::Event::ServerError(e) => tracing::warn!("NATS server at {server}: {e}"),
            // Every failed reconnect attempt reports one: the outage itself is logged above.
            async_nats::Event::ClientError(e) => tracing::debug!("NATS client: {e}"),
            other => tracing::debug!("NATS: {other}"),
        })
        .await?;
    // The background connect reports no reason: one ordinary attempt finds it for the log.
    let context = context.clone();
    let mut first = connected.clone();
    tokio::spawn(async move {
        let wait = timeout.min(Duration::from_secs(1));
        if tokio::time::timeout(wait, first.wait_for(|up| *up)).await.is_ok() {
            return;
        }
        if let Err(e) = context.connect(timeout).await {
            tracing::warn!("{e:#}; showing what is known and retrying in the background");
        }
    });
    Ok(Link { nats, connected })
}

/// Whether an already made connection is up, by looking at it twice a second: for
/// `catalog serve`, which connects in the ordinary way so that a dead server is one clear
/// error at start.
pub fn watch_state(nats: &async_nats::Client) -> watch::Receiver<bool> {
    let connected = |n: &async_nats::Client| n.connection_state() == async_nats::connection::State::Connected;
    let (tx, rx) = watch::channel(connected(nats));
    let nats = nats.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        while !tx.is_closed() {
            tick.tick().await;
            tx.send_if_modified(|up| std::mem::replace(up, connected(&nats)) != *up);
        }
    });
    rx
}
