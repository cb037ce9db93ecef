//! What a home remembers of the peers it met, as ssh remembers host keys
//! (`known_servers.json`): per catalog, the server key that answered first (no accounts) or
//! that the catalog answered signed by its account; and the operators that signing-key chains
//! may end at (the `@operators` entry: no catalog name starts with `@`).
//!
//! Operators are trusted when this machine knows them (its own identity's chain, the local
//! operator) or, while it knows none, at the first chain it meets, which is pinned: a chain
//! under another operator is then refused loudly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{IdentityError, Proof, Purpose};
use crate::context::Home;

/// The entry holding trusted operator keys, space separated.
const OPERATORS: &str = "@operators";

/// The file in the home that [`PinStore::in_home`] keeps (not a catalog, though `.json`).
pub const PINS_FILE: &str = "known_servers.json";

/// Server keys pinned at first contact, per catalog (`known_servers.json` in the home).
pub struct PinStore {
    file: Option<PathBuf>,
    pins: Mutex<BTreeMap<String, String>>,
}

impl PinStore {
    /// Pins kept in memory only (tests, one-shot library use).
    pub fn in_memory() -> Arc<PinStore> {
        Arc::new(PinStore { file: None, pins: Mutex::new(BTreeMap::new()) })
    }

    /// Pins kept in `$NATSTER_HOME/known_servers.json`.
    pub fn in_home(home: &Home) -> Arc<PinStore> {
        let file = home.path().join(PINS_FILE);
        let pins = match crate::store::load_json::<BTreeMap<String, String>>(&file) {
            Ok(pins) => pins.unwrap_or_default(),
            Err(e) => {
                tracing::warn!("ignoring {}: {e:#}", file.display());
                BTreeMap::new()
            }
        };
        Arc::new(PinStore { file: Some(file), pins: Mutex::new(pins) })
    }

    fn get(&self, name: &str) -> Option<String> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Records `value` for `name` (logging `what` when it is new), and saves the file if there is one.
    fn set(&self, name: &str, value: &str, what: &str) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if pins.get(name).is_some_and(|v| v == value) {
            return;
        }
        pins.insert(name.to_string(), value.to_string());
        if let Some(file) = self.file.clone() {
            tracing::info!(entry = name, "{what}");
            let Ok(bytes) = serde_json::to_vec_pretty(&*pins) else { return };
            let save = move || {
                if let Err(e) = crate::store::write_atomic(&file, &bytes, 0o600) {
                    tracing::warn!("cannot save {}: {e:#}", file.display());
                }
            };
            // Off the async workers when called from one (a reply being checked). Two first
            // contacts at the same instant could save out of order, leaving one pin in memory
            // only: it is then made again at the next start, which is harmless.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(save)),
                Err(_) => save(),
            }
        }
    }

    fn operators(&self) -> Vec<String> {
        self.get(OPERATORS).map(|list| list.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
    }

    /// Trusts `operator` for signing-key chains (this machine's own operator).
    pub fn trust_operator(&self, operator: &str) {
        let mut operators = self.operators();
        if !operators.iter().any(|o| o == operator) {
            operators.push(operator.to_string());
            self.set(OPERATORS, &operators.join(" "), "trusting an operator this machine uses");
        }
    }

    /// Trusts the operator `identity`'s own chain ends at, if any: the one this machine uses.
    pub fn trust_own_operator(&self, identity: &super::Identity) {
        if let Some(operator) = identity.operator() {
            self.trust_operator(operator);
        }
    }

    /// Whether a signing-key chain ending at `operator` is accepted: a trusted operator, or,
    /// while none is known, the first one met (then pinned).
    pub fn check_operator(&self, operator: &str) -> Result<(), IdentityError> {
        let operators = self.operators();
        if operators.iter().any(|o| o == operator) {
            return Ok(());
        }
        if operators.is_empty() {
            tracing::warn!(%operator, "trusting operator {operator} at first contact (pinned in {})", self.file_name());
            self.set(OPERATORS, operator, "pinned an operator at first contact");
            return Ok(());
        }
        Err(IdentityError::UntrustedOperator {
            found: operator.to_string(),
            trusted: operators.join(", "),
            file: self.file_name(),
        })
    }

    fn file_name(&self) -> String {
        self.file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "memory".into())
    }
}

/// What remembered entry a catalog read with `Trust::account` gets (not a key: the account is
/// checked on every reply; the entry only says it signed before).
const SIGNED_BY_ACCOUNT: &str = "signed by its account";

/// Whom a reader accepts as a catalog's server.
#[derive(Clone)]
pub struct Trust {
    /// The owner's account, when known: replies must carry its JWT. None: pin the first key.
    owner: Option<String>,
    store: Arc<PinStore>,
    /// The catalog as the store knows it (`<catalog>@<owner>`).
    name: String,
}

impl Trust {
    /// Replies for `catalog` must be signed by a user of account `owner`.
    pub fn account(owner: &str, catalog: &str, store: Arc<PinStore>) -> Trust {
        Trust { owner: Some(owner.to_string()), store, name: format!("{catalog}@{owner}") }
    }

    /// No accounts: the first server key that answers for `catalog` is pinned.
    pub fn pin(catalog: &str, store: Arc<PinStore>) -> Trust {
        Trust { owner: None, store, name: catalog.to_string() }
    }

    /// Checks a reply's proof for `purpose` over `parts`, and remembers the catalog as signed.
    pub fn check(&self, proof: Option<&Proof>, purpose: Purpose, parts: &[&[u8]]) -> Result<(), IdentityError> {
        let proof = proof.ok_or(IdentityError::Unsigned)?;
        let vouched = proof.verify(purpose, parts)?;
        match &self.owner {
            Some(owner) => match vouched.account {
                Some(account) if &account == owner => {
                    if let Some(operator) = &vouched.operator {
                        self.store.check_operator(operator)?;
                    }
                    self.store.set(&self.name, SIGNED_BY_ACCOUNT, "the catalog answered signed by its account");
                    Ok(())
                }
                Some(found) => Err(IdentityError::WrongAccount { expected: owner.clone(), found }),
                None => Err(IdentityError::NoJwt(owner.clone())),
            },
            None => match self.store.get(&self.name) {
                Some(pinned) if pinned == vouched.key => Ok(()),
                Some(pinned) => Err(IdentityError::PinMismatch {
                    catalog: self.name.clone(),
                    pinned,
                    found: vouched.key,
                    file: self.store.file_name(),
                }),
                None => {
                    self.store.set(
                        &self.name,
                        &vouched.key,
                        "remembered the catalog server's identity (first contact)",
                    );
                    Ok(())
                }
            },
        }
    }

    /// Whether an unsigned answer (an original, v1-only peer) may be taken: only for a catalog
    /// that never answered signed, so an impostor cannot downgrade a signed catalog.
    pub fn allow_unsigned(&self) -> Result<(), IdentityError> {
        match self.store.get(&self.name) {
            None => Ok(()),
            Some(_) => Err(IdentityError::Downgrade(self.name.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_operator_is_pinned_and_another_is_refused() {
        let pins = PinStore::in_memory();
        let (first, second) =
            (nkeys::KeyPair::new_operator().public_key(), nkeys::KeyPair::new_operator().public_key());
        assert_eq!(pins.check_operator(&first), Ok(()), "trusted at first contact");
        assert_eq!(pins.check_operator(&first), Ok(()));
        assert!(matches!(pins.check_operator(&second), Err(IdentityError::UntrustedOperator { .. })));
        pins.trust_operator(&second);
        assert_eq!(pins.check_operator(&second), Ok(()), "trusted explicitly");
        assert_eq!(pins.check_operator(&first), Ok(()), "still trusted");
    }
}
