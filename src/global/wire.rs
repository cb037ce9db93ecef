//! The global service on the wire, as the original Natster spells it (ORIGINAL.md §1): the
//! request subjects (a caller's view, through its `natster.global.>` import), the `ApiResult`
//! envelope, and every request, reply, event and heartbeat body. Fields the original does not
//! have are additive and skipped when empty, so an original peer parses ours and we parse its.
//!
//! Shared by the service (`super::service`), its callers (`super::client`), catalog servers
//! (heartbeats) and mounts (heartbeat events). Nothing here does I/O.

use serde::{Deserialize, Serialize};

/// A caller's subjects (its import maps them onto `<caller>.natster.global.<fn>`).
pub const EVENTS_PUT: &str = "natster.global.events.put";
pub const HEARTBEATS_PUT: &str = "natster.global.heartbeats.put";
/// Ours: a clean stop's offline notice (the original only said so in the server's own
/// account). An original global service has no subscriber for it, so it costs nothing there.
pub const HEARTBEATS_OFFLINE: &str = "natster.global.heartbeats.offline";
pub const MY_SHARES: &str = "natster.global.my.shares";
pub const WHOAMI: &str = "natster.global.whoami";
pub const VALIDATE_NAME: &str = "natster.global.catalogs.validatename";
pub const STATS: &str = "natster.global.stats";
pub const OTC_GENERATE: &str = "natster.global.otc.generate";
pub const OTC_CLAIM: &str = "natster.global.otc.claim";
pub const CONTEXT_GET: &str = "natster.global.context.get";

/// What an importer receives through its `natster.global-events.*` import.
pub const EVENTS_HEARTBEAT: &str = "natster.global-events.heartbeat";
/// Ours: a catalog shared with this account went offline (clean stop or presence expiry).
pub const EVENTS_OFFLINE: &str = "natster.global-events.offline";
/// Ours: a catalog was shared with this account (body: one [`Share`]).
pub const EVENTS_SHARED: &str = "natster.global-events.shared";

/// The catalog server's heartbeat in its own account (the original's, not exported).
pub const LOCAL_HEARTBEAT: &str = "natster.local-events.heartbeat";
/// The catalog server's offline notice in its own account (the original's).
pub const LOCAL_OFFLINE: &str = "natster.local-events.offline";

/// The five event types of the original's log.
pub const NATSTER_INITIALIZED: &str = "natster_initialized";
pub const CATALOG_SHARED: &str = "catalog_shared";
pub const CATALOG_UNSHARED: &str = "catalog_unshared";
pub const CATALOG_IMPORTED: &str = "catalog_imported";
pub const CONTEXT_BOUND: &str = "context_bound";
/// `none` in a subject token: no target account, or no catalog.
pub const NONE: &str = "none";

/// The original's reply envelope `{"error"?:string,"code":int,"data":any}`; a failure sets
/// `error` and `data: null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiResult<T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub code: u16,
    #[serde(default = "none")]
    pub data: Option<T>,
}

fn none<T>() -> Option<T> {
    None
}

/// `{"code":200,"data":…}`.
pub fn ok<T: Serialize>(data: T) -> Vec<u8> {
    serde_json::to_vec(&ApiResult { error: None, code: 200, data: Some(data) }).unwrap_or_default()
}

/// `{"error":"…","code":4xx,"data":null}`.
pub fn err(code: u16, message: &str) -> Vec<u8> {
    serde_json::to_vec(&ApiResult::<()> { error: Some(message.to_string()), code, data: None }).unwrap_or_default()
}

/// `events.put` request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventPut {
    #[serde(default)]
    pub catalog: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// `heartbeats.put` body (the original's `models.Heartbeat`, `revision` an int64: the
/// catalog's `last_modified`), plus our own revision id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub catalog: String,
    #[serde(default)]
    pub account_key: String,
    #[serde(default)]
    pub revision: i64,
    /// Ours: the digest that changes exactly when the listing does (`get`'s `revision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_id: Option<String>,
}

/// `stats` reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub total_initialized: u64,
    pub running_catalogs: u64,
    pub share_count: u64,
}

/// One entry of `my.shares`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub from_account: String,
    pub to_account: String,
    pub catalog: String,
    #[serde(default)]
    pub catalog_online: bool,
    #[serde(default)]
    pub revision: i64,
    /// Ours: the catalog's revision id from its last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_id: Option<String>,
}

/// `whoami` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    pub account_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_id: Option<String>,
    /// Unix seconds (when the `natster_initialized` event was logged).
    pub initialized: i64,
}

/// `catalogs.validatename` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidName {
    pub valid: bool,
    #[serde(default)]
    pub message: String,
}

/// The original's `NatsterContext` (what `otc.generate` takes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatsterContext {
    #[serde(default)]
    pub team_id: String,
    #[serde(default)]
    pub system_id: String,
    #[serde(default)]
    pub account_id: String,
    #[serde(default)]
    pub account_name: String,
    #[serde(default)]
    pub account_public_key: String,
    /// The original kept the Synadia Cloud token here, stored it and handed it out on claim;
    /// ours never stores it (always empty after `otc.generate`).
    #[serde(default)]
    pub access_token: String,
    #[serde(default)]
    pub user_id: String,
    /// Never stored either: a claim must not hand out credentials.
    #[serde(default)]
    pub creds: String,
}

/// `otc.generate` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtcGenerated {
    pub code: String,
    pub valid_minutes: u32,
    pub claim_url: String,
}

/// `otc.claim` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtcClaim {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub oauth_id: String,
}

/// Payload of `natster_initialized`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Initialized {
    #[serde(default)]
    pub account_id: String,
    #[serde(default)]
    pub account_name: String,
    #[serde(default)]
    pub account_key: String,
}

/// Payload of `context_bound`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextBound {
    pub oauth_id: String,
    pub bound_context: NatsterContext,
}

/// The event log's subject: `natster.events.<origin>.<target|none>.<catalog|none>.<type>`.
pub fn event_subject(origin: &str, target: &str, catalog: &str, event_type: &str) -> String {
    format!("natster.events.{origin}.{target}.{catalog}.{event_type}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_the_originals() {
        assert_eq!(String::from_utf8(ok("")).unwrap(), r#"{"code":200,"data":""}"#);
        assert_eq!(String::from_utf8(err(403, "no")).unwrap(), r#"{"error":"no","code":403,"data":null}"#);
        let beat = Heartbeat { catalog: "c".into(), account_key: "A".into(), revision: 7, revision_id: None };
        assert_eq!(serde_json::to_string(&beat).unwrap(), r#"{"catalog":"c","account_key":"A","revision":7}"#);
    }
}
