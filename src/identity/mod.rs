//! Who speaks: the nkey a catalog server signs its replies with and a reader signs its
//! requests with, and the checks each side makes of the other, offline, with no central
//! service.
//!
//! A process's [`Identity`] is its NATS user nkey and the user JWT that vouches for it (from
//! the context's creds file), or, on a server without accounts, an nkey kept in
//! `$NATSTER_HOME/identity.nk` (0600) with no JWT. A [`Proof`] is a signature by that nkey over
//! a domain-separated message, plus the JWT.
//!
//! Verifying a proof ([`Proof::verify`]) checks the signature and, when a JWT is present, that
//! the JWT is a well-formed user JWT whose signature verifies against its issuer, that it names
//! the signing key as its subject, that it has not expired, and which account vouches for it:
//! the issuer, or for a JWT issued by one of an account's signing keys (`nsc`, Synadia Cloud),
//! the account named in it, proven by the account JWT (and operator JWT) the proof carries
//! ([`chain`]); such a chain ends at an operator that the verifier's [`PinStore`] must trust.
//! Whether that account is the right one is the caller's [`Trust`] decision:
//! - `Trust::Account(A)`: the catalog's owner is account A (the key it was imported from, or
//!   our own account): a reply must carry a JWT of A.
//! - `Trust::Pin`: no accounts (a server without auth): the first key that answers for a
//!   catalog is remembered (in a file, as ssh remembers host keys), and a different key later
//!   is refused loudly.
//!
//! Invariants: the seed never leaves this module (no accessor, no Debug); signed messages are
//! domain-separated and length-prefixed, so no signature for one purpose verifies for another.

mod chain;
mod pins;

use std::path::Path;

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};

use crate::accounts::jwt::{self, UserNats};
use crate::context::{Context, Home};
pub use pins::{PinStore, Trust, PINS_FILE};

/// What a signature is for; part of every signed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A catalog server's `get` reply: catalog, request nonce, sha256 of the reply's data.
    Listing,
    /// A catalog server's `open` reply: catalog, hash, client xkey, sha256 of the reply's data.
    Session,
    /// A reader's `open` request: catalog, hash, client xkey.
    Reader,
}

impl Purpose {
    fn domain(self) -> &'static [u8] {
        match self {
            Purpose::Listing => b"natster-mount v3 listing",
            Purpose::Session => b"natster-mount v3 session",
            Purpose::Reader => b"natster-mount v3 reader",
        }
    }
}

/// The exact bytes signed for `purpose` over `parts`.
fn message(purpose: Purpose, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + parts.iter().map(|p| p.len() + 8).sum::<usize>());
    out.extend_from_slice(purpose.domain());
    out.push(0);
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("reply is not signed by the catalog's server (an older natster-mount, or an impostor)")]
    Unsigned,
    #[error("signature does not verify: {0}")]
    BadSignature(String),
    #[error("the JWT vouching for the signer is invalid: {0}")]
    BadJwt(String),
    #[error("signed by account {found}, but the catalog's owner is {expected}: refusing an impostor")]
    WrongAccount { expected: String, found: String },
    #[error("signed by a key without a JWT, but the catalog's owner is account {0}: refusing an impostor")]
    NoJwt(String),
    #[error(
        "catalog '{catalog}' answered with server key {found}, but {pinned} answered before; refusing it. \
         If its owner really changed keys, remove the line for '{catalog}' from {file}"
    )]
    PinMismatch { catalog: String, pinned: String, found: String, file: String },
    #[error("catalog '{0}' answered unsigned, as an original Natster peer would, but it signed its answers before: refusing a downgrade")]
    Downgrade(String),
    #[error(
        "signed under operator {found}, which this machine does not trust (it trusts {trusted}); if that operator \
         is really yours, add its key to the \"@operators\" line of {file}"
    )]
    UntrustedOperator { found: String, trusted: String, file: String },
}

/// A signature by a user nkey over a message, with the JWT that vouches for the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// The signer's public user nkey (`U…`).
    pub key: String,
    /// The signer's user JWT; absent on a server without accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    /// base64url of the ed25519 signature.
    pub sig: String,
    /// When a signing key issued `jwt`: the account's JWT and, if an operator signing key
    /// issued that, the operator's JWT (see [`chain`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
}

/// Who a verified proof speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vouched {
    pub key: String,
    /// The account whose JWT vouches for the key (None without a JWT).
    pub account: Option<String>,
    /// The operator a signing-key chain ends at (None when the account key itself issued the
    /// JWT: then the account key is all there is to check).
    pub operator: Option<String>,
}

/// Longest JWT accepted in a proof: bounds what a peer makes us parse.
const MAX_JWT: usize = 16 * 1024;

impl Proof {
    /// Checks the signature over `parts` for `purpose`, and the JWT if any.
    pub fn verify(&self, purpose: Purpose, parts: &[&[u8]]) -> Result<Vouched, IdentityError> {
        if !(self.key.len() == 56 && self.key.starts_with('U')) {
            return Err(IdentityError::BadSignature(format!("{:?} is not a user nkey", self.key)));
        }
        let key = KeyPair::from_public_key(&self.key).map_err(|e| IdentityError::BadSignature(e.to_string()))?;
        let sig = BASE64URL_NOPAD
            .decode(self.sig.as_bytes())
            .map_err(|_| IdentityError::BadSignature("signature is not base64url".into()))?;
        key.verify(&message(purpose, parts), &sig)
            .map_err(|_| IdentityError::BadSignature("wrong signature".into()))?;
        let Some(token) = &self.jwt else {
            return Ok(Vouched { key: self.key.clone(), account: None, operator: None });
        };
        if token.len() > MAX_JWT {
            return Err(IdentityError::BadJwt(format!("longer than {MAX_JWT} bytes")));
        }
        let claims = jwt::decode::<UserNats>(token).map_err(|e| IdentityError::BadJwt(format!("{e:#}")))?;
        if claims.nats.claim_type != jwt::USER {
            return Err(IdentityError::BadJwt(format!("a {} JWT, not a user JWT", claims.nats.claim_type)));
        }
        if claims.sub != self.key {
            return Err(IdentityError::BadJwt(format!("it names {}, not the signing key", claims.sub)));
        }
        if claims.exp.is_some_and(|exp| exp <= jwt::now()) {
            return Err(IdentityError::BadJwt("it has expired".into()));
        }
        if !crate::protocol::is_account_key(&claims.iss) {
            return Err(IdentityError::BadJwt(format!("its issuer {} is not an account key", claims.iss)));
        }
        match claims.nats.issuer_account.as_deref().filter(|a| *a != claims.iss) {
            Some(account) => {
                if !crate::protocol::is_account_key(account) {
                    return Err(IdentityError::BadJwt(format!("its issuer_account {account:?} is not an account key")));
                }
                let operator = chain::verify(&claims.iss, account, &self.chain)?;
                Ok(Vouched { key: self.key.clone(), account: Some(account.to_string()), operator: Some(operator) })
            }
            None => Ok(Vouched { key: self.key.clone(), account: Some(claims.iss), operator: None }),
        }
    }
}

/// A process's signing identity. Holds a seed: never logged, never sent.
pub struct Identity {
    key: KeyPair,
    jwt: Option<String>,
    account: Option<String>,
    /// Sent beside `jwt` when a signing key issued it.
    chain: Vec<String>,
    /// The operator `chain` ends at, when it verifies.
    operator: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("key", &self.key.public_key()).field("account", &self.account).finish()
    }
}

/// Seed-only file of a home's own identity on servers without accounts.
const IDENTITY_FILE: &str = "identity.nk";

impl Identity {
    /// A fresh identity with no JWT (for tests and in-process servers).
    pub fn ephemeral() -> Identity {
        Identity { key: KeyPair::new_user(), jwt: None, account: None, chain: Vec::new(), operator: None }
    }

    /// The identity of a context: its creds' user nkey and JWT, or else the home's own key.
    pub fn load(home: &Home, context: &Context) -> anyhow::Result<Identity> {
        match &context.creds {
            Some(creds) => Self::from_creds_file(home, creds),
            None => Self::home_key(home),
        }
    }

    /// The identity of a creds file; a user JWT issued by a signing key gets its chain from
    /// `home` or the nsc store ([`chain::find`]), else a warning: readers will refuse it.
    pub fn from_creds_file(home: &Home, path: &Path) -> anyhow::Result<Identity> {
        use anyhow::Context as _;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read creds file {}", path.display()))?;
        let jwt = crate::accounts::creds_jwt(&text)
            .with_context(|| format!("{} has no user JWT; give a NATS creds file", path.display()))?
            .to_string();
        let seed = creds_seed(&text)
            .with_context(|| format!("{} has no user seed; give a NATS creds file", path.display()))?;
        let key = KeyPair::from_seed(seed)
            .map_err(|_| anyhow::anyhow!("{} holds an invalid user seed; re-download the creds", path.display()))?;
        let claims =
            jwt::decode::<UserNats>(&jwt).with_context(|| format!("{} holds an invalid user JWT", path.display()))?;
        if claims.sub != key.public_key() {
            anyhow::bail!("{}: its JWT and its seed are for different users; re-download the creds", path.display());
        }
        let (mut chain, mut operator) = (Vec::new(), None);
        let account = match claims.nats.issuer_account.clone().filter(|a| *a != claims.iss) {
            Some(account) => {
                chain = chain::find(home.path(), &account);
                match chain::verify(&claims.iss, &account, &chain) {
                    Ok(found) => {
                        tracing::debug!(%account, operator = %found, "user JWT issued by a signing key; chain found");
                        operator = Some(found);
                    }
                    Err(e) => tracing::warn!(
                        "{}: the user JWT is issued by signing key {} of account {account}, and readers will refuse \
                         this identity: {e}. Put the account's JWT (`nsc describe account --raw`) in {}",
                        path.display(),
                        claims.iss,
                        home.path().join("chain").join(format!("{account}.jwt")).display()
                    ),
                }
                account
            }
            None => claims.iss,
        };
        Ok(Identity { key, jwt: Some(jwt), account: Some(account), chain, operator })
    }

    /// `$NATSTER_HOME/identity.nk`, created (0600) on first use. Processes of one home that
    /// start at once (`catalog serve` and the first `catalog contents`, a mount) all end up with
    /// the one key that was created first: a key that lost the race and lived on in memory
    /// would be pinned by readers, and the next start, with the key on disk, refused by them.
    fn home_key(home: &Home) -> anyhow::Result<Identity> {
        use anyhow::Context as _;
        let path = home.path().join(IDENTITY_FILE);
        let invalid = || anyhow::anyhow!("{} is not a user seed; remove it to make a new identity", path.display());
        // Twice at most: a lost race means the winner's file is there, whole, to be read.
        for _ in 0..2 {
            match std::fs::read_to_string(&path) {
                Ok(seed) => {
                    let key = KeyPair::from_seed(seed.trim()).map_err(|_| invalid())?;
                    return Ok(Identity { key, jwt: None, account: None, chain: Vec::new(), operator: None });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    home.ensure()?;
                    let key = KeyPair::new_user();
                    let seed = key.seed().map_err(|e| anyhow::anyhow!("new key has no seed: {e}"))?;
                    if crate::store::write_new(&path, seed.as_bytes(), 0o600)? {
                        return Ok(Identity { key, jwt: None, account: None, chain: Vec::new(), operator: None });
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            }
        }
        anyhow::bail!("{} keeps disappearing while it is created; is another program removing it?", path.display())
    }

    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// The account that vouches for this identity (None without accounts).
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// The operator this identity's signing-key chain ends at (None for a JWT issued by the
    /// account key, or without accounts): one a machine using this identity trusts.
    pub fn operator(&self) -> Option<&str> {
        self.operator.as_deref()
    }

    /// Signs `parts` for `purpose`.
    pub fn prove(&self, purpose: Purpose, parts: &[&[u8]]) -> Proof {
        // Signing with a key made from a seed cannot fail; an empty signature would only be refused.
        let sig = self.key.sign(&message(purpose, parts)).unwrap_or_default();
        Proof {
            key: self.key.public_key(),
            jwt: self.jwt.clone(),
            sig: BASE64URL_NOPAD.encode(&sig),
            chain: self.chain.clone(),
        }
    }
}

/// The seed in a creds file's text.
fn creds_seed(creds: &str) -> Option<&str> {
    let start = creds.find("-----BEGIN USER NKEY SEED-----")?;
    let body = creds[start..].lines().nth(1)?.trim();
    (body.starts_with('S') && !body.starts_with("---")).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::jwt::Claims;

    fn user_of(account: &KeyPair) -> Identity {
        let user = KeyPair::new_user();
        let mut claims = Claims::new("u", &user.public_key(), UserNats::unlimited());
        let token = jwt::encode(&mut claims, account).unwrap();
        Identity { key: user, jwt: Some(token), account: Some(account.public_key()), chain: Vec::new(), operator: None }
    }

    #[test]
    fn proofs_verify_only_for_their_purpose_and_parts() {
        let id = Identity::ephemeral();
        let proof = id.prove(Purpose::Listing, &[b"c", b"n"]);
        assert!(proof.verify(Purpose::Listing, &[b"c", b"n"]).is_ok());
        assert!(proof.verify(Purpose::Session, &[b"c", b"n"]).is_err(), "other purpose");
        assert!(proof.verify(Purpose::Listing, &[b"cn"]).is_err(), "parts are length-prefixed");
        assert!(proof.verify(Purpose::Listing, &[b"c", b"m"]).is_err());
    }

    #[test]
    fn trust_by_account_refuses_other_accounts_and_keyless_signers() {
        let alice = KeyPair::new_account();
        let eve = KeyPair::new_account();
        let trust = Trust::account(&alice.public_key(), "media", PinStore::in_memory());
        let parts: &[&[u8]] = &[b"x"];
        let good = user_of(&alice).prove(Purpose::Session, parts);
        assert_eq!(trust.check(Some(&good), Purpose::Session, parts), Ok(()));
        let impostor = user_of(&eve).prove(Purpose::Session, parts);
        assert!(matches!(
            trust.check(Some(&impostor), Purpose::Session, parts),
            Err(IdentityError::WrongAccount { .. })
        ));
        let bare = Identity::ephemeral().prove(Purpose::Session, parts);
        assert!(matches!(trust.check(Some(&bare), Purpose::Session, parts), Err(IdentityError::NoJwt(_))));
        assert_eq!(trust.check(None, Purpose::Session, parts), Err(IdentityError::Unsigned));
        // A JWT lifted from alice's server and re-used with eve's key does not name eve's key.
        let mut stolen = impostor.clone();
        stolen.jwt = good.jwt.clone();
        assert!(matches!(trust.check(Some(&stolen), Purpose::Session, parts), Err(IdentityError::BadJwt(_))));
    }

    #[test]
    fn pins_accept_the_first_key_and_refuse_a_change() {
        let trust = Trust::pin("media", PinStore::in_memory());
        let first = Identity::ephemeral();
        let parts: &[&[u8]] = &[b"x"];
        assert!(trust.check(Some(&first.prove(Purpose::Listing, parts)), Purpose::Listing, parts).is_ok());
        assert!(trust.check(Some(&first.prove(Purpose::Listing, parts)), Purpose::Listing, parts).is_ok());
        let other = Identity::ephemeral().prove(Purpose::Listing, parts);
        assert!(matches!(trust.check(Some(&other), Purpose::Listing, parts), Err(IdentityError::PinMismatch { .. })));
        assert_eq!(trust.allow_unsigned(), Err(IdentityError::Downgrade("media".into())), "no downgrade");
        assert_eq!(Trust::pin("fresh", PinStore::in_memory()).allow_unsigned(), Ok(()));
    }

    #[test]
    fn the_home_key_is_kept_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let a = Identity::home_key(&home).unwrap();
        let b = Identity::home_key(&home).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Not "SU" (a seed's prefix), which a public key's base32 holds now and then.
        let seed = a.key.seed().unwrap();
        assert!(!format!("{a:?}").contains(&seed[2..]), "Debug shows no seed");
    }

    /// Processes of a fresh home that load its key at the same moment all get the same one,
    /// the one left on disk.
    #[test]
    fn a_home_key_created_by_several_at_once_is_one_key() {
        const AT_ONCE: usize = 8;
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let home = Home::at(dir.path());
            let start = std::sync::Barrier::new(AT_ONCE);
            let keys: Vec<String> = std::thread::scope(|s| {
                let loaders: Vec<_> = (0..AT_ONCE)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            Identity::home_key(&home).unwrap().public_key()
                        })
                    })
                    .collect();
                loaders.into_iter().map(|l| l.join().unwrap()).collect()
            });
            let on_disk = Identity::home_key(&home).unwrap().public_key();
            assert!(keys.iter().all(|k| *k == on_disk), "keys {keys:?}, on disk {on_disk}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        }
    }
}
