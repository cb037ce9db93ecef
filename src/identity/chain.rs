//! Signing-key chains: a user JWT issued by one of an account's signing keys (as `nsc` and
//! Synadia Cloud issue them) speaks for the account only if the account's own JWT lists that
//! key, and that account JWT is worth only as much as the operator that signed it.
//!
//! A signer whose user JWT is issued that way sends, beside it, the account's JWT and (when
//! an operator signing key issued the account JWT) the operator's JWT: the *chain*. The
//! verifier checks, offline:
//! - the account JWT: a valid account JWT, signature by its issuer, subject = the account the
//!   user JWT names (`issuer_account`), not expired, listing the user JWT's issuer among its
//!   `signing_keys` (plain keys or scoped ones, `{"key": …}`);
//! - the operator: the account JWT's issuer is an operator key, or an operator signing key
//!   listed by the operator JWT that came with it (self-signed, not expired);
//! - and returns that operator's key: whether it is trusted is the caller's decision
//!   ([`super::PinStore::check_operator`]), as any key can make an operator.
//!
//! Where a signer finds its chain ([`find`]): `$NATSTER_HOME/chain/<ACCOUNT>.jwt` (the
//! account JWT, optionally followed by the operator JWT, whitespace separated), else the
//! `nsc` store (`$NSC_HOME/stores` or `~/.local/share/nats/nsc/stores`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::IdentityError;
use crate::accounts::jwt;

/// Most JWTs a chain may hold (account, operator).
pub const MAX_CHAIN: usize = 2;
/// Longest chain JWT accepted: bounds what a peer makes us parse.
const MAX_CHAIN_JWT: usize = 64 * 1024;
/// Most signing keys looked at in one JWT.
const MAX_SIGNING_KEYS: usize = 256;

/// The part of an account or operator JWT's `nats` a chain needs.
#[derive(Deserialize)]
struct ChainNats {
    #[serde(rename = "type")]
    claim_type: String,
    #[serde(default)]
    signing_keys: Vec<serde_json::Value>,
}

fn signing_keys(nats: &ChainNats) -> impl Iterator<Item = &str> {
    nats.signing_keys.iter().take(MAX_SIGNING_KEYS).filter_map(|k| match k {
        serde_json::Value::String(key) => Some(key.as_str()),
        serde_json::Value::Object(scoped) => scoped.get("key").and_then(|k| k.as_str()),
        _ => None,
    })
}

fn is_operator_key(key: &str) -> bool {
    key.len() == 56 && key.starts_with('O') && nkeys::KeyPair::from_public_key(key).is_ok()
}

fn decode(token: &str, what: &str, kind: &str) -> Result<jwt::Claims<ChainNats>, IdentityError> {
    if token.len() > MAX_CHAIN_JWT {
        return Err(IdentityError::BadJwt(format!("the {what} JWT is longer than {MAX_CHAIN_JWT} bytes")));
    }
    let claims =
        jwt::decode::<ChainNats>(token).map_err(|e| IdentityError::BadJwt(format!("the {what} JWT: {e:#}")))?;
    if claims.nats.claim_type != kind {
        return Err(IdentityError::BadJwt(format!("the {what} JWT is a {} JWT", claims.nats.claim_type)));
    }
    if claims.exp.is_some_and(|exp| exp <= jwt::now()) {
        return Err(IdentityError::BadJwt(format!("the {what} JWT has expired")));
    }
    Ok(claims)
}

/// Checks that signing key `signer` speaks for `account` through `chain`; returns the
/// operator key the chain ends at.
pub fn verify(signer: &str, account: &str, chain: &[String]) -> Result<String, IdentityError> {
    let Some(account_jwt) = chain.first() else {
        return Err(IdentityError::BadJwt(format!(
            "it is issued by signing key {signer} of account {account}, but no account JWT came with it to show that \
             the account owns that key (its owner puts the account JWT in $NATSTER_HOME/chain/{account}.jwt)"
        )));
    };
    if chain.len() > MAX_CHAIN {
        return Err(IdentityError::BadJwt(format!("a chain of {} JWTs (at most {MAX_CHAIN})", chain.len())));
    }
    let claims = decode(account_jwt, "account", jwt::ACCOUNT)?;
    if claims.sub != account {
        return Err(IdentityError::BadJwt(format!("the account JWT is for {}, not {account}", claims.sub)));
    }
    if !signing_keys(&claims.nats).any(|k| k == signer) {
        return Err(IdentityError::BadJwt(format!(
            "account {account}'s JWT does not list signing key {signer} (revoked, or never its own)"
        )));
    }
    match chain.get(1) {
        None if is_operator_key(&claims.iss) => Ok(claims.iss),
        None => Err(IdentityError::BadJwt(format!(
            "the account JWT is issued by {}, which is no operator key (an operator signing key needs the operator JWT \
             in the chain)",
            claims.iss
        ))),
        Some(operator_jwt) => {
            let operator = decode(operator_jwt, "operator", jwt::OPERATOR)?;
            if operator.iss != operator.sub || !is_operator_key(&operator.sub) {
                return Err(IdentityError::BadJwt("the operator JWT is not self-signed by an operator key".into()));
            }
            if claims.iss != operator.sub && !signing_keys(&operator.nats).any(|k| k == claims.iss) {
                return Err(IdentityError::BadJwt(format!(
                    "the account JWT is issued by {}, which operator {} does not list",
                    claims.iss, operator.sub
                )));
            }
            Ok(operator.sub)
        }
    }
}

/// The chain a signer of `account` sends (see the module doc); empty when none is found.
/// Blocking (reads files): call it while loading an identity.
pub fn find(home: &Path, account: &str) -> Vec<String> {
    find_in(home, account, &nsc_stores())
}

fn find_in(home: &Path, account: &str, stores: &[PathBuf]) -> Vec<String> {
    let own = home.join("chain").join(format!("{account}.jwt"));
    if let Ok(text) = std::fs::read_to_string(&own) {
        return text.split_whitespace().take(MAX_CHAIN).map(str::to_string).collect();
    }
    stores.iter().find_map(|stores| in_nsc_store(stores, account)).unwrap_or_default()
}

fn nsc_stores() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(nsc) = std::env::var_os("NSC_HOME").filter(|v| !v.is_empty()) {
        roots.push(PathBuf::from(nsc).join("stores"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        roots.push(PathBuf::from(home).join(".local/share/nats/nsc/stores"));
    }
    roots
}

/// nsc keeps `stores/<operator>/<operator>.jwt` and `stores/<operator>/accounts/<name>/<name>.jwt`.
fn in_nsc_store(stores: &Path, account: &str) -> Option<Vec<String>> {
    for operator in std::fs::read_dir(stores).ok()?.flatten() {
        let dir = operator.path();
        let Ok(accounts) = std::fs::read_dir(dir.join("accounts")) else { continue };
        for entry in accounts.flatten() {
            let name = entry.file_name();
            let Ok(text) = std::fs::read_to_string(entry.path().join(Path::new(&name).with_extension("jwt"))) else {
                continue;
            };
            let token = text.trim().to_string();
            if jwt::decode::<ChainNats>(&token).is_ok_and(|c| c.sub == account) {
                let mut chain = vec![token];
                let operator_file = dir.join(Path::new(&operator.file_name()).with_extension("jwt"));
                if let Ok(op) = std::fs::read_to_string(operator_file) {
                    chain.push(op.trim().to_string());
                }
                return Some(chain);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::jwt::Claims;
    use nkeys::KeyPair;

    #[derive(serde::Serialize)]
    struct Nats {
        #[serde(rename = "type")]
        claim_type: &'static str,
        signing_keys: Vec<serde_json::Value>,
    }

    fn signed(kind: &'static str, sub: &str, keys: Vec<serde_json::Value>, by: &KeyPair) -> String {
        let mut claims = Claims::new("x", sub, Nats { claim_type: kind, signing_keys: keys });
        jwt::encode(&mut claims, by).unwrap()
    }

    struct World {
        operator: KeyPair,
        account: KeyPair,
        signer: KeyPair,
    }

    fn world() -> World {
        World { operator: KeyPair::new_operator(), account: KeyPair::new_account(), signer: KeyPair::new_account() }
    }

    fn account_jwt(w: &World, by: &KeyPair) -> String {
        signed(jwt::ACCOUNT, &w.account.public_key(), vec![w.signer.public_key().into()], by)
    }

    #[test]
    fn a_listed_signing_key_speaks_for_its_account_up_to_the_operator() {
        let w = world();
        let chain = [account_jwt(&w, &w.operator)];
        assert_eq!(verify(&w.signer.public_key(), &w.account.public_key(), &chain), Ok(w.operator.public_key()));
        // Scoped signing keys are objects.
        let scoped = signed(
            jwt::ACCOUNT,
            &w.account.public_key(),
            vec![serde_json::json!({"kind": "user_scope", "key": w.signer.public_key()})],
            &w.operator,
        );
        assert!(verify(&w.signer.public_key(), &w.account.public_key(), &[scoped]).is_ok());
    }

    #[test]
    fn an_operator_signing_key_needs_the_operator_jwt() {
        let w = world();
        let op_signer = KeyPair::new_operator();
        let account = account_jwt(&w, &op_signer);
        let operator =
            signed(jwt::OPERATOR, &w.operator.public_key(), vec![op_signer.public_key().into()], &w.operator);
        let (signer, acc) = (w.signer.public_key(), w.account.public_key());
        assert_eq!(verify(&signer, &acc, &[account.clone(), operator]), Ok(w.operator.public_key()));
        // Without the operator JWT the issuer is just some operator key: reported as such,
        // and the caller's trust in operators decides.
        assert_eq!(verify(&signer, &acc, std::slice::from_ref(&account)), Ok(op_signer.public_key()));
        // An operator JWT that does not list the signing key.
        let other = signed(jwt::OPERATOR, &w.operator.public_key(), vec![], &w.operator);
        assert!(verify(&signer, &acc, &[account, other]).is_err());
    }

    #[test]
    fn unlisted_keys_wrong_accounts_and_garbage_are_refused() {
        let w = world();
        let (signer, acc) = (w.signer.public_key(), w.account.public_key());
        assert!(verify(&signer, &acc, &[]).is_err(), "no chain");
        let unlisted = signed(jwt::ACCOUNT, &acc, vec![], &w.operator);
        assert!(verify(&signer, &acc, &[unlisted]).is_err());
        let other_account = KeyPair::new_account().public_key();
        assert!(verify(&signer, &other_account, &[account_jwt(&w, &w.operator)]).is_err());
        // An account JWT signed by a non-operator key (e.g. the account itself).
        assert!(verify(&signer, &acc, &[account_jwt(&w, &w.account)]).is_err());
        let user_kind = signed(jwt::USER, &acc, vec![signer.clone().into()], &w.operator);
        assert!(verify(&signer, &acc, &[user_kind]).is_err());
        for junk in ["", "a.b.c", &"x".repeat(MAX_CHAIN_JWT + 1)] {
            assert!(verify(&signer, &acc, &[junk.to_string()]).is_err());
        }
        let three = vec![account_jwt(&w, &w.operator); 3];
        assert!(verify(&signer, &acc, &three).is_err());
    }

    #[test]
    fn the_chain_is_found_in_the_home_then_in_an_nsc_store() {
        let w = world();
        let home = tempfile::tempdir().unwrap();
        assert!(find_in(home.path(), &w.account.public_key(), &[]).is_empty());
        let dir = home.path().join("chain");
        std::fs::create_dir_all(&dir).unwrap();
        let token = account_jwt(&w, &w.operator);
        std::fs::write(dir.join(format!("{}.jwt", w.account.public_key())), format!("{token}\n")).unwrap();
        assert_eq!(find_in(home.path(), &w.account.public_key(), &[]), vec![token.clone()]);

        let stores = tempfile::tempdir().unwrap();
        let op_dir = stores.path().join("acme");
        std::fs::create_dir_all(op_dir.join("accounts/alice")).unwrap();
        std::fs::write(op_dir.join("accounts/alice/alice.jwt"), &token).unwrap();
        let operator = signed(jwt::OPERATOR, &w.operator.public_key(), vec![], &w.operator);
        std::fs::write(op_dir.join("acme.jwt"), &operator).unwrap();
        assert_eq!(in_nsc_store(stores.path(), &w.account.public_key()), Some(vec![token, operator]));
        assert_eq!(in_nsc_store(stores.path(), &KeyPair::new_account().public_key()), None);
    }
}
