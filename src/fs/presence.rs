//! Presence in the mount: whether each catalog is online and at which revision, from
//! heartbeats (the global service re-broadcasts an owner's heartbeat to the accounts the
//! catalog is shared with, on `natster.global-events.heartbeat|offline`; own catalogs announce
//! themselves on `natster.local-events.heartbeat|offline`) and from `my.shares` at mount and
//! at every listing TTL. Shown as xattrs on each catalog folder (`user.natster.online`,
//! `user.natster.revision`), and a heartbeat with a new revision refreshes the listing at once.
//!
//! Invariants and tricky cases:
//! - A heartbeat is matched to a folder by (owner account, catalog name), never by name alone:
//!   two owners' `movies` are two folders. Own catalogs match local heartbeats only.
//! - The revision to compare is our `revision_id` (the listing digest) when the heartbeat
//!   carries one; an original peer's heartbeat has only the int revision (its
//!   `last_modified`), compared with the last int seen.

use std::time::Duration;

use crate::global::wire::{self, Heartbeat, Share};

/// What the mount knows of a catalog's presence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum State {
    /// Nothing heard yet (no global service, or no heartbeat yet).
    #[default]
    Unknown,
    Online,
    Offline,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Online => "online",
            State::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    pub state: State,
    /// The int revision of the last heartbeat (the owner's `last_modified`).
    pub revision: i64,
    pub revision_id: Option<String>,
}

/// A heartbeat or offline notice, parsed from one of the four subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub heartbeat: Heartbeat,
    pub online: bool,
    /// From the account's own catalog servers (local events), not the global service.
    pub local: bool,
}

/// Subjects a mount subscribes to (the global ones through its `natster.global-events.*` import).
pub const SUBJECTS: [&str; 2] = ["natster.global-events.*", "natster.local-events.*"];

/// Parses a message on [`SUBJECTS`]; None for other events or malformed bodies.
pub fn parse(subject: &str, payload: &[u8]) -> Option<Beat> {
    let (online, local) = match subject {
        wire::EVENTS_HEARTBEAT => (true, false),
        wire::EVENTS_OFFLINE => (false, false),
        wire::LOCAL_HEARTBEAT => (true, true),
        wire::LOCAL_OFFLINE => (false, true),
        _ => return None,
    };
    if payload.len() > 4096 {
        return None;
    }
    let heartbeat: Heartbeat = serde_json::from_slice(payload).ok()?;
    Some(Beat { heartbeat, online, local })
}

impl Beat {
    /// Whether this beat is about the catalog `name` of `owner` in a mount of account `me`.
    pub fn is_about(&self, name: &str, owner: &str, me: &str) -> bool {
        if self.heartbeat.catalog != name {
            return false;
        }
        if self.local {
            owner == me
        } else {
            owner == self.heartbeat.account_key && owner != me
        }
    }

    /// The presence this beat says.
    pub fn presence(&self) -> Presence {
        Presence {
            state: if self.online { State::Online } else { State::Offline },
            revision: self.heartbeat.revision,
            revision_id: self.heartbeat.revision_id.clone(),
        }
    }

    /// Whether the listing shown (`shown`, a revision id) is stale after this beat, given the
    /// presence known before it.
    pub fn needs_refresh(&self, shown: &str, before: &Presence) -> bool {
        if !self.online {
            return false;
        }
        match &self.heartbeat.revision_id {
            Some(id) => id != shown,
            // An original peer: only its int revision moves.
            None => before.revision != self.heartbeat.revision || shown.is_empty(),
        }
    }
}

/// The presence `my.shares` reports for catalog `name` of `owner`, if it lists it.
pub fn from_shares(shares: &[Share], name: &str, owner: &str) -> Option<Presence> {
    shares.iter().find(|s| s.catalog == name && s.from_account == owner).map(|s| Presence {
        state: if s.catalog_online { State::Online } else { State::Offline },
        revision: s.revision,
        revision_id: s.revision_id.clone(),
    })
}

/// What a catalog server's `$SRV.PING` reply says: its catalog and revision (None for
/// anything else, or a reply over 16 KiB).
pub fn from_service_ping(payload: &[u8]) -> Option<(String, Option<String>)> {
    if payload.len() > 16 * 1024 {
        return None;
    }
    let reply: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if reply.get("name")?.as_str()? != crate::server::SERVICE_NAME {
        return None;
    }
    let metadata = reply.get("metadata")?;
    let catalog = metadata.get("catalog")?.as_str()?.to_string();
    let revision = metadata.get("revision").and_then(|r| r.as_str()).map(str::to_string);
    Some((catalog, revision))
}

/// Longest a mount collects answers to its `$SRV.PING` of the account's catalog servers.
pub const PING_WAIT: Duration = Duration::from_millis(500);

/// Bound on asking the global service for presence.
pub const SHARES_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_pings_name_their_catalog_and_revision() {
        let ping = br#"{"type":"io.nats.micro.v1.ping_response","name":"natster-catalog","id":"x","version":"0.1.0","metadata":{"catalog":"media","revision":"ab12","protocol":"4"}}"#;
        assert_eq!(from_service_ping(ping), Some(("media".into(), Some("ab12".into()))));
        let other = br#"{"name":"natster-global","metadata":{"catalog":"media"}}"#;
        assert_eq!(from_service_ping(other), None, "another service");
        assert_eq!(from_service_ping(b"not json"), None);
        assert_eq!(from_service_ping(&vec![b' '; 20_000]), None, "oversized");
    }

    #[test]
    fn beats_match_owner_and_name() {
        let body = br#"{"catalog":"movies","account_key":"AOWNER","revision":5,"revision_id":"ab"}"#;
        let beat = parse(wire::EVENTS_HEARTBEAT, body).expect("beat");
        assert!(beat.is_about("movies", "AOWNER", "AME"));
        assert!(!beat.is_about("movies", "AOTHER", "AME"), "another owner's movies");
        assert!(!beat.is_about("films", "AOWNER", "AME"));
        assert!(beat.needs_refresh("aa", &Presence::default()));
        assert!(!beat.needs_refresh("ab", &Presence::default()));
        let local = parse(wire::LOCAL_HEARTBEAT, body).expect("beat");
        assert!(local.is_about("movies", "AME", "AME") && !local.is_about("movies", "AOWNER", "AME"));
        let original = parse(wire::EVENTS_HEARTBEAT, br#"{"catalog":"movies","account_key":"AOWNER","revision":6}"#)
            .expect("original beat");
        assert!(original.needs_refresh("ab", &Presence { revision: 5, ..Presence::default() }));
        assert!(!original.needs_refresh("ab", &Presence { revision: 6, ..Presence::default() }));
        assert!(parse(wire::EVENTS_SHARED, body).is_none());
        assert!(parse(wire::EVENTS_HEARTBEAT, br#"{"catalog":"m","revision":"hex"}"#).is_none(), "string revision");
    }
}
