//! Wire protocol: subjects, the original Natster reply envelope, request and response bodies
//! for v1 (`get`, `download`) and v2 (`open`, `read`, `close`), and validation of every name
//! and key that arrives from the network.

use serde::{Deserialize, Serialize};

/// Protocol generation advertised in `get` replies; readers use it to pick v2 over v1.
/// 3: `get` and `open` replies are signed by the catalog server ([`Envelope::proof`]) and
/// `open` requests by the reader. 4: listing entries carry their chunk tree root (`tree`) and
/// every v2 chunk its proof under it ([`crate::chunk_tree`]). 2 and 3 are no longer spoken.
/// Within 4, additively: an `open` reply may offer [`OpenResponse::max_unit`], and a reader
/// then may name the `unit` of its `read` ([`ReadRequest::unit`]): a 4 KiB random read moves
/// one 16 KiB leaf instead of a whole chunk. Readers that do not know it never see it.
/// Also additively: a `read` of one record may ask for it `inline` ([`ReadRequest::inline`]),
/// as the reply itself; a server that does not know the field acknowledges and publishes on
/// the media subject as before, and readers accept either answer.
pub const PROTOCOL_VERSION: u32 = 4;

/// v1 chunk size, fixed by the original Natster.
pub const V1_CHUNK_SIZE: usize = 4096;

/// Chunk headers. The first three are the original's; the v2 ones are additive.
pub const HEADER_CHUNK_INDEX: &str = "x-natster-chunk-idx";
pub const HEADER_SENDER_XKEY: &str = "x-natster-sender-xkey";
pub const HEADER_TOTAL_CHUNKS: &str = "x-natster-total-chunks";
/// The unit (bytes) of a v2 record sent for a `read` that named one; absent for records in
/// the session's chunk size. The AEAD binds it, so a changed header fails authentication.
pub const HEADER_UNIT: &str = "x-natster-unit";

/// Smallest v2 chunk either side accepts: one chunk tree leaf. Chunks are whole leaves.
pub const MIN_CHUNK_SIZE: u32 = crate::chunk_tree::LEAF_SIZE as u32;

/// Longest catalog name we accept; names become subject tokens and file names.
pub const MAX_CATALOG_NAME: usize = 64;

/// Largest number of chunks one v2 `read` may ask for: bounds the work a single request can
/// cause on the server.
pub const MAX_CHUNKS_PER_READ: u32 = 256;

/// Catalog service operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Get,
    Download,
    Open,
    Read,
    Close,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Download => "download",
            Operation::Open => "open",
            Operation::Read => "read",
            Operation::Close => "close",
        }
    }

    pub fn parse(token: &str) -> Option<Self> {
        Some(match token {
            "get" => Operation::Get,
            "download" => Operation::Download,
            "open" => Operation::Open,
            "read" => Operation::Read,
            "close" => Operation::Close,
            _ => return None,
        })
    }
}

/// Subject a reader sends a catalog request to (its own view: no account token; an import
/// maps it onto the owner's `<reader>.natster.catalog...`).
pub fn catalog_subject(catalog: &str, op: Operation) -> String {
    format!("natster.catalog.{catalog}.{}", op.as_str())
}

/// Subject a reader subscribes to for every chunk of a catalog (v1 hashes and v2 sessions).
pub fn media_wildcard(catalog: &str) -> String {
    format!("natster.media.{catalog}.*")
}

/// Last subject token of a catalog server's notice to its readers, on the media stream they
/// already receive through their import: its listing changed, or who may read it did.
/// Session ids and hashes are hex, so it never names a read.
pub const NOTICE_TOKEN: &str = "notice";
/// Largest notice a reader accepts.
pub const MAX_NOTICE_BYTES: usize = 1024;

/// Every catalog's notices, as a reader subscribes to them (own and imported catalogs alike).
pub fn notice_wildcard() -> String {
    format!("natster.media.*.{NOTICE_TOKEN}")
}

/// Every notice of catalogs imported per owner ([`Route::Owner`]).
pub fn owner_notice_wildcard() -> String {
    format!("natster.from.*.media.*.{NOTICE_TOKEN}")
}

/// A catalog server's notice. It only makes a reader fetch the (signed) listing sooner, so
/// nothing in it is trusted beyond that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub catalog: String,
    pub revision: String,
    /// Who may read changed (a share or an unshare): refresh even if the revision did not.
    #[serde(default)]
    pub access: bool,
}

/// How a reader's account reaches a catalog: which local subjects its requests and media use.
/// The owner's side is the same either way (`<reader>.natster.catalog.<C>.<op>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// The subjects without an owner: the owner's own account, and the original's per-catalog
    /// imports (`natster.catalog.<C>.<op>`, media `natster.media.<C>.*`). One catalog name
    /// can be reached this way only once per account.
    Direct,
    /// Through the per-owner imports of owner account `O`: `natster.from.<O>.catalog.<C>.<op>`,
    /// media `natster.from.<O>.media.<C>.*`. Each owner has a namespace of its own, so two
    /// owners' catalogs of one name never meet.
    Owner(String),
}

impl Route {
    /// Subject of operation `op` on `catalog`.
    pub fn request_subject(&self, catalog: &str, op: Operation) -> String {
        match self {
            Route::Direct => catalog_subject(catalog, op),
            Route::Owner(owner) => format!("{}.catalog.{catalog}.{}", owner_prefix(owner), op.as_str()),
        }
    }

    /// Subject that receives every chunk of `catalog`.
    pub fn media_wildcard(&self, catalog: &str) -> String {
        match self {
            Route::Direct => media_wildcard(catalog),
            Route::Owner(owner) => format!("{}.media.{catalog}.*", owner_prefix(owner)),
        }
    }
}

/// First tokens of every local subject the per-owner imports of `owner` map to.
pub fn owner_prefix(owner: &str) -> String {
    format!("natster.from.{owner}")
}

/// Subject the server publishes a chunk on: prefixed by the caller's account when the
/// request came through an import, so the stream export routes it to that account only.
pub fn media_subject(caller: &Caller, catalog: &str, stream_token: &str) -> String {
    match caller {
        Caller::Owner => format!("natster.media.{catalog}.{stream_token}"),
        Caller::Account(account) => format!("{account}.natster.media.{catalog}.{stream_token}"),
    }
}

/// Who sent a request, as the subject proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The catalog owner's own account (subject without an account token).
    Owner,
    /// Another account, named by the first token that nats-server's token-position import
    /// check guarantees.
    Account(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Owner => f.write_str("owner"),
            Caller::Account(a) => f.write_str(a),
        }
    }
}

/// Splits an incoming catalog request subject into caller and operation, for `catalog`.
/// Returns None for anything that is not exactly one of the two shapes we subscribe to.
pub fn parse_request_subject(subject: &str, catalog: &str) -> Option<(Caller, Operation)> {
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["natster", "catalog", c, op] if *c == catalog => Some((Caller::Owner, Operation::parse(op)?)),
        [acct, "natster", "catalog", c, op] if *c == catalog && is_account_key(acct) => {
            Some((Caller::Account((*acct).to_string()), Operation::parse(op)?))
        }
        _ => None,
    }
}

/// Catalog names: letters, digits, `_` and `-`, 1..=64 characters. They are subject tokens
/// and file names, so nothing else is safe.
pub fn validate_catalog_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("catalog name is empty; use letters, digits, '_' and '-'".into());
    }
    if name.len() > MAX_CATALOG_NAME {
        return Err(format!(
            "catalog name '{name}' is longer than {MAX_CATALOG_NAME} characters; choose a shorter one"
        ));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("catalog name '{name}' contains '{bad}'; use only ASCII letters, digits, '_' and '-'"));
    }
    Ok(())
}

/// A sha256 in lowercase hex, as catalogs carry it.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An account public key: 56 base32 characters starting with 'A' and a valid checksum.
pub fn is_account_key(s: &str) -> bool {
    s.len() == 56 && s.starts_with('A') && nkeys::KeyPair::from_public_key(s).is_ok()
}

/// A v2 session id: 32 lowercase hex characters (128 random bits).
pub fn is_session_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The original reply envelope: `{"code":200,"data":…}` or `{"code":4xx,"error":"…"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    /// The catalog server's signature over `data` (protocol 3; additive, original peers
    /// ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<crate::identity::Proof>,
}

fn none<T>() -> Option<T> {
    None
}

impl<T: Serialize> Envelope<T> {
    pub fn ok(data: T) -> Vec<u8> {
        encode(&Envelope { code: 200, error: None, data: Some(data), proof: None })
    }
}

/// A success reply whose `data` is `data_json` exactly as given (the bytes the proof signs).
pub fn signed_ok(data_json: &[u8], proof: &crate::identity::Proof) -> Vec<u8> {
    let proof = serde_json::to_vec(proof).unwrap_or_default();
    let mut out = Vec::with_capacity(data_json.len() + proof.len() + 32);
    out.extend_from_slice(br#"{"code":200,"data":"#);
    out.extend_from_slice(data_json);
    out.extend_from_slice(br#","proof":"#);
    out.extend_from_slice(&proof);
    out.push(b'}');
    out
}

/// An error reply; `code` follows HTTP (400, 403, 404, 409, 500, 503).
pub fn error_reply(code: u16, message: &str) -> Vec<u8> {
    encode(&Envelope::<()> { code, error: Some(message.to_string()), data: None, proof: None })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain structs cannot fail; an empty body would be caught by the peer.
    serde_json::to_vec(value).unwrap_or_default()
}

/// One file of a catalog as `get` lists it (the original's `CatalogEntry`, plus `mtime`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub path: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub mime_type: String,
    pub hash: String,
    pub byte_size: u64,
    /// Modification time, seconds since the epoch (additive; 0 when the peer has none).
    #[serde(default)]
    pub mtime: i64,
    /// Root of the file's chunk tree, hex (protocol 4; additive). Every v2 chunk is checked
    /// against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<String>,
}

/// Reply to `get` (the original's `CatalogSummary`, plus `revision` and `protocol`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogSummary {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub entries: Vec<CatalogEntry>,
    /// Changes whenever the listing changes; empty from original peers.
    #[serde(default)]
    pub revision: String,
    /// 1 for original peers (field absent), 2 for peers that answer `open`/`read`.
    #[serde(default = "v1")]
    pub protocol: u32,
    /// In a paged reply: how many entries the whole listing has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_entries: Option<u64>,
}

fn v1() -> u32 {
    1
}

/// `get` request. The original sends an empty body and gets the whole listing; v2 readers ask
/// for pages (`from` = first entry index) so that catalogs larger than one NATS message list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GetRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// Random, echoed into the reply's signature so an old signed listing cannot be replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// v1 `download` request (the original's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadRequest {
    pub hash: String,
    #[serde(default)]
    pub transcode: bool,
    pub target_xkey: String,
}

/// v1 `download` reply (the original's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadResponse {
    pub acknowledged: bool,
    pub chunk_size: u64,
    pub total_chunks: u64,
    pub sender_xkey: String,
    pub total_bytes: u64,
}

/// v2 `open`: start a ranged-read session on one file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenRequest {
    pub hash: String,
    pub client_xkey: String,
    /// The reader's signature over catalog, hash and `client_xkey`, with its user JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader: Option<crate::identity::Proof>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenResponse {
    pub session: String,
    pub server_xkey: String,
    pub byte_size: u64,
    pub chunk_size: u32,
    /// Largest `unit` a `read` may name (any multiple of the 16 KiB leaf up to it); absent:
    /// this server sends chunks of `chunk_size` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unit: Option<u32>,
}

/// v2 `read`: publish chunks `first_chunk .. first_chunk+count` on the session's media subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadRequest {
    pub session: String,
    pub first_chunk: u64,
    pub count: u32,
    /// The records' size in bytes, when not the session's `chunk_size`: a multiple of the
    /// chunk tree's leaf up to the `open` reply's `max_unit`. Chunk indices count in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<u32>,
    /// Answer with the record itself (its headers as on the media subject) instead of an
    /// acknowledgement: saves a message and a hop for a small random read. Only with
    /// `count` 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inline: bool,
}

/// True if `unit` may be named in a `read` of a session offering `max_unit`.
pub fn valid_unit(unit: u32, max_unit: u32) -> bool {
    unit >= MIN_CHUNK_SIZE && unit <= max_unit && (unit as usize).is_multiple_of(crate::chunk_tree::LEAF_SIZE)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadResponse {
    pub first_chunk: u64,
    /// How many chunks will be published (clipped at end of file).
    pub count: u32,
}

/// v2 `close`: the reader is done with a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloseRequest {
    pub session: String,
}

/// Number of chunks of `chunk_size` that hold `byte_size` bytes.
pub fn chunk_count(byte_size: u64, chunk_size: u64) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    byte_size.div_ceil(chunk_size)
}

/// Exact plaintext length of chunk `index`; lets a reader reject a truncated chunk.
pub fn chunk_len(byte_size: u64, chunk_size: u64, index: u64) -> u64 {
    let start = index.saturating_mul(chunk_size);
    byte_size.saturating_sub(start).min(chunk_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names() {
        assert!(validate_catalog_name("movies_2024-hd").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", "ünï", &"x".repeat(65)] {
            assert!(validate_catalog_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn subjects_parse_only_known_shapes() {
        let acct = nkeys::KeyPair::new_account().public_key();
        assert_eq!(parse_request_subject("natster.catalog.c.get", "c"), Some((Caller::Owner, Operation::Get)));
        assert_eq!(
            parse_request_subject(&format!("{acct}.natster.catalog.c.read"), "c"),
            Some((Caller::Account(acct.clone()), Operation::Read))
        );
        assert_eq!(parse_request_subject("natster.catalog.other.get", "c"), None);
        assert_eq!(parse_request_subject("natster.catalog.c.rm", "c"), None);
        assert_eq!(parse_request_subject("NOTAKEY.natster.catalog.c.get", "c"), None);
    }

    #[test]
    fn routes_spell_their_subjects() {
        let owner = nkeys::KeyPair::new_account().public_key();
        assert_eq!(Route::Direct.request_subject("c", Operation::Get), "natster.catalog.c.get");
        assert_eq!(Route::Direct.media_wildcard("c"), "natster.media.c.*");
        let via = Route::Owner(owner.clone());
        assert_eq!(via.request_subject("c", Operation::Read), format!("natster.from.{owner}.catalog.c.read"));
        assert_eq!(via.media_wildcard("c"), format!("natster.from.{owner}.media.c.*"));
    }

    #[test]
    fn chunk_arithmetic() {
        assert_eq!(chunk_count(0, 10), 0);
        assert_eq!(chunk_count(10, 10), 1);
        assert_eq!(chunk_count(11, 10), 2);
        assert_eq!(chunk_len(11, 10, 1), 1);
        assert_eq!(chunk_len(11, 10, 2), 0);
    }

    #[test]
    fn units_are_whole_leaves_within_the_offer() {
        let leaf = crate::chunk_tree::LEAF_SIZE as u32;
        assert!(valid_unit(leaf, 1 << 20));
        assert!(valid_unit(64 * leaf, 64 * leaf));
        for bad in [0, 4096, leaf + 1, 65 * leaf] {
            assert!(!valid_unit(bad, 64 * leaf), "{bad}");
        }
        // Absent in an old peer's request and reply: chunks of the session's size.
        let old: ReadRequest = serde_json::from_str(r#"{"session":"s","first_chunk":1,"count":2}"#).unwrap();
        assert_eq!((old.unit, old.inline), (None, false));
        let plain = ReadRequest { session: "s".into(), first_chunk: 1, count: 2, unit: None, inline: false };
        let sent = serde_json::to_string(&plain).unwrap();
        assert!(!sent.contains("unit") && !sent.contains("inline"), "an old server never sees the fields: {sent}");
        let inline = serde_json::to_string(&ReadRequest { count: 1, inline: true, ..plain }).unwrap();
        assert!(inline.contains(r#""inline":true"#), "{inline}");
    }

    #[test]
    fn envelope_shapes_match_the_original() {
        let ok = String::from_utf8(Envelope::ok(5)).unwrap();
        assert_eq!(ok, r#"{"code":200,"data":5}"#);
        let err = String::from_utf8(error_reply(404, "nope")).unwrap();
        assert_eq!(err, r#"{"code":404,"error":"nope"}"#);
    }
}
