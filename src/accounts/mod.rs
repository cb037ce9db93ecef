//! A self-hosted NATS operator: the operator, system account and per-person accounts with
//! their nkeys, JWTs and creds files, kept under `$NATSTER_HOME/operator/`; the Natster
//! exports and the per-owner and per-catalog imports in account JWTs; a `nats-server` configuration for operator
//! mode with a full resolver; pushing updated account JWTs to a running server; and a local
//! `nats-server` child process.
//!
//! Layout on disk (every file holding a seed is 0600, folders 0700):
//! ```text
//! operator/operator.nk          operator seed
//! operator/operator.jwt         self-signed operator JWT (system_account set)
//! operator/system/account.nk    system account seed ("SYS")
//! operator/system/account.jwt
//! operator/system/user.creds    system user creds (JWT + seed)
//! operator/global/…            the Natster global service's account (same three files)
//! operator/hub/…               the hub account; its catalog's state in operator/hub/home/
//! operator/accounts/<name>/…    same three files per account
//! ```
//! The account JWT on disk is the source of truth for an account's imports.
//!
//! Parts: `jwt` (claims, signing, verifying), `operator` (the operator and its accounts on
//! disk, pushing JWTs server first), `imports` (the Natster imports, per owner and per
//! catalog, and their `nsc` lines), `local_server` (the nats-server child), `cluster` (the
//! local deployment: one server or a cluster of N, its ports, and the nodes as children), `ports`
//! (choosing ports that stay usable across restarts); here: the Natster
//! exports, creds files and the private-file helpers they share.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use nkeys::{KeyPair, KeyPairType};
use serde::Deserialize;

use crate::context::{set_mode, Home, ImportedCatalog};
use crate::protocol::{is_account_key, validate_catalog_name};

use self::jwt::{AccountLimits, AccountNats, Claims, Export, ExportType, OperatorNats, UserNats};

/// Name of the service export every Natster account carries.
pub const CATALOG_EXPORT_NAME: &str = "natster_catalog";
/// Subject of the catalog service export; token 1 is the caller's account.
pub const CATALOG_EXPORT_SUBJECT: &str = "*.natster.catalog.>";
/// Name of the stream export every Natster account carries.
pub const MEDIA_EXPORT_NAME: &str = "natster_media";
/// Subject of the media stream export; token 1 is the reader's account.
pub const MEDIA_EXPORT_SUBJECT: &str = "*.natster.media.*.*";
/// Name of the system account.
pub const SYSTEM_ACCOUNT_NAME: &str = "SYS";
/// Subject a full-resolver nats-server answers account JWT updates on (system account only).
pub const CLAIMS_UPDATE_SUBJECT: &str = "$SYS.REQ.CLAIMS.UPDATE";
/// Bound on one account JWT push.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on a local nats-server becoming reachable.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);

const OPERATOR_DIR: &str = "operator";
const OPERATOR_SEED: &str = "operator.nk";
const OPERATOR_JWT: &str = "operator.jwt";
const SYSTEM_DIR: &str = "system";
const ACCOUNTS_DIR: &str = "accounts";
const ACCOUNT_SEED: &str = "account.nk";
const ACCOUNT_JWT: &str = "account.jwt";
const USER_CREDS: &str = "user.creds";
const OPERATOR_NAME: &str = "natster";

mod cluster;
mod imports;
pub mod jwt;
mod local_server;
mod network;

mod operator;
mod ports;

pub use cluster::{
    node_url, ClusterOptions, LocalCluster, LocalDeployment, NodePorts, CLUSTER_NAME, RESOLVER_SYNC_INTERVAL,
};
pub use imports::{
    catalog_imports, imported_catalog, imported_owner, nsc_import_commands, nsc_owner_import_commands, owner_imports,
};
pub use local_server::{
    cached_nats_server, nats_server_binary, nats_server_version, LocalServer, LocalServerOptions, ServerVersion,
};
pub use network::{
    global_exports, global_imports, GLOBAL_ACCOUNT_NAME, GLOBAL_EVENTS_EXPORT_SUBJECT, GLOBAL_EXPORT_SUBJECT,
    HUB_ACCOUNT_NAME, HUB_CATALOG,
};
use operator::check_account_key;
pub use operator::{
    connect, lookup_account_jwt, push_account_jwt, push_account_jwt_to, validate_account_name, AccountRecord, Applied,
    Operator, PendingAccount,
};
pub use ports::{loopback_port_is_free, preferred_or_stable_port, stable_free_port};

/// The two exports every Natster account carries.
pub fn natster_exports() -> Vec<Export> {
    vec![
        Export {
            name: CATALOG_EXPORT_NAME.into(),
            subject: CATALOG_EXPORT_SUBJECT.into(),
            kind: ExportType::Service,
            account_token_position: Some(1),
        },
        Export {
            name: MEDIA_EXPORT_NAME.into(),
            subject: MEDIA_EXPORT_SUBJECT.into(),
            kind: ExportType::Stream,
            account_token_position: Some(1),
        },
    ]
}

pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn conf_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Standard NATS creds file text (user JWT and user seed blocks).
pub fn format_creds(user_jwt: &str, user_seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The user JWT in a creds file's text.
pub fn creds_jwt(creds: &str) -> Option<&str> {
    let start = creds.find("-----BEGIN NATS USER JWT-----")?;
    let rest = &creds[start..];
    let body = rest.lines().nth(1)?.trim();
    (!body.is_empty() && !body.starts_with("---")).then_some(body)
}

/// The account whose user a creds file holds: its user JWT's `issuer_account` when an account
/// signing key issued it (nsc, Synadia Cloud), else the JWT's issuer `iss`.
pub fn creds_account(path: &Path) -> Result<String> {
    let text = read_text(path)?;
    let token = creds_jwt(&text).ok_or_else(|| {
        anyhow!(
            "{} is not a NATS creds file (no user JWT block); give the .creds file of your NATS user",
            path.display()
        )
    })?;
    let claims: Claims<UserNats> = jwt::decode(token)
        .with_context(|| format!("{} holds no valid user JWT; get a fresh creds file", path.display()))?;
    if claims.nats.claim_type != jwt::USER {
        bail!("{} holds a {} JWT, not a user JWT; give a user's creds file", path.display(), claims.nats.claim_type);
    }
    let account = claims.nats.issuer_account.filter(|a| !a.is_empty()).unwrap_or(claims.iss);
    check_account_key(&account, &format!("the account of the user in {}", path.display()))?;
    Ok(account)
}

fn create_private_dir(path: &Path) -> Result<()> {
    fs::create_dir(path).with_context(|| format!("cannot create {}", path.display()))?;
    set_mode(path, 0o700)
}

/// Atomic write, mode 0600, fsynced: for anything holding a seed.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::store::write_atomic(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::store::write_atomic(path, bytes, 0o644)
}

fn write_seed(path: &Path, key: &KeyPair) -> Result<()> {
    let seed = key.seed().map_err(|e| anyhow!("key has no seed: {e}"))?;
    write_private(path, format!("{seed}\n").as_bytes())
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_seed(path: &Path, kind: KeyPairType) -> Result<KeyPair> {
    let text = read_text(path)?;
    // The error of from_seed never contains the seed; ours names only the file.
    let key =
        KeyPair::from_seed(text.trim()).map_err(|_| anyhow!("{} does not hold a valid nkey seed", path.display()))?;
    if key.key_pair_type() != kind {
        bail!("{} holds a {:?} seed, expected {kind:?}", path.display(), key.key_pair_type());
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::jwt::*;
    use super::*;

    #[test]
    fn jwt_round_trip_and_tamper() {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let mut claims = Claims::new(
            "a",
            &account.public_key(),
            AccountNats {
                imports: Vec::new(),
                exports: natster_exports(),
                limits: AccountLimits::unlimited(true),
                signing_keys: Vec::new(),
                claim_type: ACCOUNT.into(),
                version: VERSION,
            },
        );
        let token = encode(&mut claims, &operator).expect("encode");
        let back: Claims<AccountNats> = decode(&token).expect("decode");
        assert_eq!(back, claims);
        assert_eq!(back.iss, operator.public_key());
        assert_eq!(back.jti.len(), 52);
        // jti is the hash of the claims without jti.
        let mut unhashed = back.clone();
        unhashed.jti.clear();
        let digest = sha2::Sha512_256::digest(serde_json::to_vec(&unhashed).expect("json"));
        use sha2::Digest as _;
        assert_eq!(back.jti, data_encoding::BASE32_NOPAD.encode(&digest));

        let parts: Vec<&str> = token.split('.').collect();
        let mut json: serde_json::Value =
            serde_json::from_slice(&data_encoding::BASE64URL_NOPAD.decode(parts[1].as_bytes()).expect("b64"))
                .expect("json");
        json["name"] = "b".into();
        let forged_payload = data_encoding::BASE64URL_NOPAD.encode(&serde_json::to_vec(&json).expect("json"));
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert!(decode::<AccountNats>(&forged).is_err());
        assert!(decode::<AccountNats>("a.b").is_err());
    }

    #[test]
    fn creds_format() {
        let text = format_creds("eyJhbGc.x.y", "SUAAAA");
        assert_eq!(creds_jwt(&text), Some("eyJhbGc.x.y"));
        assert!(text.contains("-----BEGIN USER NKEY SEED-----\nSUAAAA\n------END USER NKEY SEED------"));
    }

    #[test]
    fn creds_account_prefers_issuer_account() {
        let dir = tempfile::tempdir().expect("dir");
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let user = KeyPair::new_user();
        let write = |issuer: &KeyPair, issuer_account: Option<String>| {
            let mut nats = UserNats::unlimited();
            nats.issuer_account = issuer_account;
            let token = encode(&mut Claims::new("u", &user.public_key(), nats), issuer).expect("encode");
            let path = dir.path().join("u.creds");
            fs::write(&path, format_creds(&token, &user.seed().expect("seed"))).expect("write");
            path
        };
        // Issued by the account key itself: the account is `iss`.
        assert_eq!(creds_account(&write(&account, None)).expect("account"), account.public_key());
        // Issued by a signing key (nsc, Synadia Cloud): the account is `issuer_account`.
        let by_signing_key = write(&signing, Some(account.public_key()));
        assert_eq!(creds_account(&by_signing_key).expect("account"), account.public_key());
        let not_creds = dir.path().join("x.creds");
        fs::write(&not_creds, "hello").expect("write");
        assert!(creds_account(&not_creds).is_err());
    }

    #[test]
    fn config_quoting() {
        assert_eq!(conf_quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
