//! What the web UI learns from the Natster global service, behind one trait so the service
//! plugs in when it exists: whether a catalog's server is online (its heartbeats) and the
//! inbox of shares made to this account but not imported yet. `network` implements it over
//! the global service; without one, [`NoGlobalService`] answers "unknown", and the pages show
//! what the read engine knows.

use serde::Serialize;
use tokio::sync::watch;

/// A share made to this account that it has not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingShare {
    pub catalog: String,
    /// The owner's account key.
    pub owner: String,
}

pub trait Presence: Send + Sync {
    /// Whether `owner`'s catalog `catalog` is online; None when not known.
    fn online(&self, owner: &str, catalog: &str) -> Option<bool>;
    /// The revision the catalog last announced, if known.
    fn revision(&self, _owner: &str, _catalog: &str) -> Option<String> {
        None
    }
    /// Shares waiting for an import; None when there is no global service to ask.
    fn inbox(&self) -> Option<Vec<PendingShare>>;
    /// Changes whenever any answer above may have changed (pushed to open pages).
    fn changes(&self) -> Option<watch::Receiver<u64>>;
    /// Told after the page imported a catalog: the inbox is asked again.
    fn imported(&self) {}
}

/// No global service: nothing is known about presence or pending shares.
pub struct NoGlobalService;

impl Presence for NoGlobalService {
    fn online(&self, _owner: &str, _catalog: &str) -> Option<bool> {
        None
    }

    fn inbox(&self) -> Option<Vec<PendingShare>> {
        None
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}
