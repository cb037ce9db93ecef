//! A catalog server's notices to its readers ([`protocol::Notice`]): published on each
//! reader's media stream (`<ACCOUNT>.natster.media.<catalog>.notice`, and the owner's own
//! `natster.media.<catalog>.notice`), which their import already delivers, so a reader in
//! another account refreshes its listing at once instead of at its TTL.
//!
//! Sent when the served revision changes, when the share list changes (to the accounts added
//! and removed: a removed one refreshes, is refused and empties its folder), and when the
//! server comes online or NATS reconnects. Readers of an `--allow-all` catalog that are not
//! on the share list rely on their TTL.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use crate::context::Home;
use crate::protocol::{self, Caller, Notice};
use crate::shares::ShareList;

/// Bound on one publish (a full client buffer while NATS is down must not hold anyone up).
const PUBLISH_BOUND: Duration = Duration::from_millis(500);

pub struct Announcer {
    nats: async_nats::Client,
    home: Home,
    catalog: String,
    /// Accounts the last notice went to: a later notice also reaches those since removed.
    notified: Mutex<Option<BTreeSet<String>>>,
}

impl Announcer {
    pub fn new(nats: async_nats::Client, home: Home, catalog: &str) -> Announcer {
        Announcer { nats, home, catalog: catalog.to_string(), notified: Mutex::new(None) }
    }

    /// The share list now (blocking pool); empty if unreadable.
    async fn shared_with(&self) -> BTreeSet<String> {
        let (home, catalog) = (self.home.clone(), self.catalog.clone());
        match tokio::task::spawn_blocking(move || ShareList::load(&home, &catalog)).await {
            Ok(Ok(list)) => list.accounts.into_iter().filter(|a| protocol::is_account_key(a)).collect(),
            _ => BTreeSet::new(),
        }
    }

    /// True if the share list differs from the one the last notice went to.
    pub async fn shares_changed(&self) -> bool {
        let now = self.shared_with().await;
        self.notified.lock().unwrap_or_else(|p| p.into_inner()).as_ref() != Some(&now)
    }

    /// Tells the owner and every account shared with (now or at the last notice) that the
    /// catalog serves `revision`; `access`: who may read changed.
    pub async fn announce(&self, revision: &str, access: bool) {
        let now = self.shared_with().await;
        let targets: BTreeSet<String> = {
            let mut notified = self.notified.lock().unwrap_or_else(|p| p.into_inner());
            let mut targets = now.clone();
            targets.extend(notified.take().unwrap_or_default());
            *notified = Some(now);
            targets
        };
        let notice = Notice { catalog: self.catalog.clone(), revision: revision.to_string(), access };
        let Ok(body) = serde_json::to_vec(&notice) else { return };
        let body = bytes::Bytes::from(body);
        let callers = std::iter::once(Caller::Owner).chain(targets.into_iter().map(Caller::Account));
        for caller in callers {
            let subject = protocol::media_subject(&caller, &self.catalog, protocol::NOTICE_TOKEN);
            let publish = self.nats.publish(subject, body.clone());
            if !matches!(tokio::time::timeout(PUBLISH_BOUND, publish).await, Ok(Ok(()))) {
                tracing::debug!(catalog = %self.catalog, "notice to {caller} not sent (NATS unreachable)");
            }
        }
        tracing::debug!(catalog = %self.catalog, %revision, access, "readers notified");
    }
}
