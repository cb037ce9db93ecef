//! A running `up` or `mount` sends the events its context kept while the global service did
//! not answer ([`crate::global::outbox`]) as soon as it answers again, so a share made during
//! an outage reaches the inbox without waiting for the person's next command.
//!
//! - Woken by every reconcile (the home watch sees a command write the outbox file; the safety
//!   rescan comes every [`super::SAFETY_RESCAN`]) and by every (re)connection to NATS. A wake
//!   while nothing is kept costs one `stat`.
//! - While events wait and the service does not answer, it tries again after [`FIRST_RETRY`],
//!   doubling to [`MAX_RETRY`]; each try is one request, answered at once ("no responders")
//!   while no service runs. Logged at debug: the command that kept the event said it already.
//! - Only for contexts with an account: without one there is no global service.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::context::{Context, Home};
use crate::global::client::{GlobalClient, EVENT_TIMEOUT};
use crate::global::outbox::Outbox;

pub const FIRST_RETRY: Duration = Duration::from_secs(2);
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// The sending task's doorbell; the task ends with the runtime.
pub struct KeptEvents {
    wake: Arc<Notify>,
}

impl KeptEvents {
    /// Starts the task (inside the runtime); None for a context without an account.
    pub fn start(
        home: &Home,
        context_name: &str,
        context: &Context,
        nats: async_nats::Client,
        mut connected: watch::Receiver<bool>,
    ) -> Option<KeptEvents> {
        if context.account_public_key.is_none() && context.creds.is_none() {
            return None;
        }
        let outbox = Outbox::of(home, context_name);
        let client = GlobalClient::new(nats, EVENT_TIMEOUT);
        let wake = Arc::new(Notify::new());
        let bell = wake.clone();
        tokio::spawn(async move {
            let mut retry: Option<Duration> = None;
            loop {
                let wait_retry = async {
                    match retry {
                        Some(after) => tokio::time::sleep(after).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = bell.notified() => {}
                    changed = connected.changed() => if changed.is_err() { return },
                    _ = wait_retry => {}
                }
                if !*connected.borrow() || !outbox.has_events() {
                    retry = None;
                    continue;
                }
                match outbox.deliver(&client, None).await {
                    Ok(sent) => {
                        retry = None;
                        if sent > 0 {
                            tracing::info!("sent {sent} event(s) kept while the global service did not answer");
                        }
                    }
                    Err(e) => {
                        tracing::debug!("kept events not sent yet: {e}");
                        retry = Some(retry.map_or(FIRST_RETRY, |r| (r * 2).min(MAX_RETRY)));
                    }
                }
            }
        });
        Some(KeptEvents { wake })
    }

    /// Looks at the outbox now (a coalescing wake: several before the task runs make one).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}
