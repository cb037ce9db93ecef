//! NATS JWTs (v2) as nats-server reads them: `base64url(header).base64url(claims).base64url(sig)`,
//! header `{"typ":"JWT","alg":"ed25519-nkey"}`, signature by the issuer's nkey over
//! `header.claims`. Only the fields Natster needs are modelled; unknown fields are ignored
//! on decode (and therefore dropped when re-encoding).

use anyhow::{anyhow, bail, Context as _, Result};
use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512_256};

/// The JOSE header of every v2 NATS JWT.
pub const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
/// Claims format version (`nats.version`).
pub const VERSION: u32 = 2;
pub const OPERATOR: &str = "operator";
pub const ACCOUNT: &str = "account";
pub const USER: &str = "user";

/// The standard claims plus the NATS-specific part `nats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims<N> {
    /// Content hash: base32 (no padding) of SHA-512/256 over these claims serialised
    /// with `jti` empty (the Go library hashes with SHA-512/256 too). Set by [`encode`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// Issued at, seconds since the epoch. Set by [`encode`].
    #[serde(default)]
    pub iat: i64,
    /// Issuer public key. Set by [`encode`].
    #[serde(default)]
    pub iss: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Subject public key.
    pub sub: String,
    /// Expiry, seconds since the epoch (absent: never expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    pub nats: N,
}

impl<N> Claims<N> {
    pub fn new(name: &str, subject: &str, nats: N) -> Self {
        Claims {
            jti: String::new(),
            iat: 0,
            iss: String::new(),
            name: name.to_string(),
            sub: subject.to_string(),
            exp: None,
            nats,
        }
    }
}

/// `nats` of an operator JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorNats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_account: Option<String>,
    #[serde(rename = "type")]
    pub claim_type: String,
    #[serde(default)]
    pub version: u32,
}

/// Export and import kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportType {
    Service,
    Stream,
}

/// One export of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub subject: String,
    #[serde(rename = "type")]
    pub kind: ExportType,
    /// 1-based subject token that must equal the importing account's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_token_position: Option<u32>,
}

/// One import of an account. `subject` is the exporter's (remote) subject; `local_subject`
/// is what the importer's clients use. `to` is the older, deprecated mapping field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub subject: String,
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(rename = "type")]
    pub kind: ExportType,
}

/// Account limits (the operator limits of an account JWT). -1 is unlimited; JetStream is
/// enabled when `mem_storage` or `disk_storage` is non-zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AccountLimits {
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    pub imports: i64,
    pub exports: i64,
    pub wildcards: bool,
    pub conn: i64,
    pub leaf: i64,
    pub mem_storage: i64,
    pub disk_storage: i64,
    pub streams: i64,
    pub consumer: i64,
}

impl Default for AccountLimits {
    fn default() -> Self {
        AccountLimits::unlimited(false)
    }
}

impl AccountLimits {
    /// No limits; JetStream unlimited when `jetstream`, disabled otherwise.
    pub fn unlimited(jetstream: bool) -> Self {
        let js = if jetstream { -1 } else { 0 };
        AccountLimits {
            subs: -1,
            data: -1,
            payload: -1,
            imports: -1,
            exports: -1,
            wildcards: true,
            conn: -1,
            leaf: -1,
            mem_storage: js,
            disk_storage: js,
            streams: js,
            consumer: js,
        }
    }
}

/// `nats` of an account JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountNats {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<Import>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<Export>,
    #[serde(default)]
    pub limits: AccountLimits,
    /// Keys that may issue user JWTs for the account (plain keys, or scoped ones as objects
    /// with a `key`): kept as found, so re-signing an nsc-made account keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<serde_json::Value>,
    #[serde(rename = "type")]
    pub claim_type: String,
    #[serde(default)]
    pub version: u32,
}

/// Publish or subscribe permissions of a user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// `nats` of a user JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserNats {
    #[serde(rename = "pub", default)]
    pub publish: Permission,
    #[serde(rename = "sub", default)]
    pub subscribe: Permission,
    #[serde(default)]
    pub subs: i64,
    #[serde(default)]
    pub data: i64,
    #[serde(default)]
    pub payload: i64,
    /// Set only when a signing key (not the account key itself) issues the JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_account: Option<String>,
    #[serde(rename = "type")]
    pub claim_type: String,
    #[serde(default)]
    pub version: u32,
}

impl UserNats {
    /// A user without permission restrictions or limits.
    pub fn unlimited() -> Self {
        UserNats {
            publish: Permission::default(),
            subscribe: Permission::default(),
            subs: -1,
            data: -1,
            payload: -1,
            issuer_account: None,
            claim_type: USER.into(),
            version: VERSION,
        }
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Signs `claims` with `issuer` (which must hold a seed): sets `iss`, `iat` (now, never
/// earlier than the claims' previous `iat`, so a server keeps the newer JWT) and `jti`.
pub fn encode<N: Serialize>(claims: &mut Claims<N>, issuer: &KeyPair) -> Result<String> {
    claims.iss = issuer.public_key();
    claims.iat = now().max(claims.iat);
    claims.jti.clear();
    let unhashed = serde_json::to_vec(&*claims).context("cannot serialise JWT claims")?;
    claims.jti = BASE32_NOPAD.encode(&Sha512_256::digest(&unhashed));
    let payload = serde_json::to_vec(&*claims).context("cannot serialise JWT claims")?;
    let signed = format!("{}.{}", BASE64URL_NOPAD.encode(HEADER.as_bytes()), BASE64URL_NOPAD.encode(&payload));
    let signature = issuer.sign(signed.as_bytes()).map_err(|e| anyhow!("cannot sign JWT: {e}"))?;
    Ok(format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature)))
}

/// Decodes a JWT and checks its header and its signature by the `iss` key it names.
/// Whether that issuer is trusted is for the caller to check.
pub fn decode<N: DeserializeOwned>(token: &str) -> Result<Claims<N>> {
    let token = token.trim();
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        bail!("not a JWT: expected three dot-separated parts, found {}", parts.len());
    };
    let header_json = BASE64URL_NOPAD.decode(header.as_bytes()).context("JWT header is not base64url")?;
    let header_value: serde_json::Value = serde_json::from_slice(&header_json).context("JWT header is not JSON")?;
    let alg = header_value.get("alg").and_then(|a| a.as_str()).unwrap_or_default();
    let typ = header_value.get("typ").and_then(|a| a.as_str()).unwrap_or_default();
    if alg != "ed25519-nkey" || !typ.eq_ignore_ascii_case("jwt") {
        bail!("unsupported JWT header (typ {typ:?}, alg {alg:?}); expected a v2 NATS JWT");
    }
    let payload_json = BASE64URL_NOPAD.decode(payload.as_bytes()).context("JWT claims are not base64url")?;
    let signature = BASE64URL_NOPAD.decode(signature.as_bytes()).context("JWT signature is not base64url")?;
    let claims: Claims<N> =
        serde_json::from_slice(&payload_json).context("JWT claims do not have the expected shape")?;
    let issuer = KeyPair::from_public_key(&claims.iss)
        .map_err(|e| anyhow!("JWT issuer {:?} is not a public nkey: {e}", claims.iss))?;
    let signed_len = header.len() + 1 + payload.len();
    issuer
        .verify(&token.as_bytes()[..signed_len], &signature)
        .map_err(|_| anyhow!("JWT signature does not verify against its issuer {}", claims.iss))?;
    Ok(claims)
}
