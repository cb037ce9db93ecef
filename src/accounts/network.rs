//! The Natster network's two accounts of the local operator, and what every account needs to
//! reach them:
//! - the **global** account runs the global service (`natster-mount global serve`, in
//!   `crate::global`). It exports service `*.natster.global.>` and stream
//!   `*.natster.global-events.*`, both with account token position 1, so token 0 of every
//!   request it gets is the caller's real account; JetStream is enabled for its event log and
//!   projections.
//! - the **hub** account serves the hub catalog that every account imports (the original's
//!   `synadiahub`); it is an ordinary Natster account with the catalog exports.
//! - every account (people's and the hub) imports `natster.global.>` and
//!   `natster.global-events.*` from the global account, its own key in token position 1.
//!
//! Layout: `operator/global/` and `operator/hub/`, each like an account folder (seed, JWT,
//! creds). Operators made before these existed get them at the next `operator init|up|
//! add-account` ([`Operator::ensure_network`]), and their accounts get the global imports.
//!
//! Invariants: the two accounts are not people's accounts ([`Operator::accounts`] leaves them
//! out); creating one is atomic (a staging folder renamed into place; a concurrent creator's
//! folder wins).

use super::jwt::Import;
use super::operator::{load_account_dir, write_account_dir, AccountState};
use super::*;

/// Name of the global account (its JWT `name`).
pub const GLOBAL_ACCOUNT_NAME: &str = "natster_global";
/// Name of the hub account.
pub const HUB_ACCOUNT_NAME: &str = "natster_hub";
/// The catalog the hub serves and every account imports.
pub const HUB_CATALOG: &str = "hub";
/// Service export of the global account: `<caller>.natster.global.<fn>`.
pub const GLOBAL_EXPORT_SUBJECT: &str = "*.natster.global.>";
/// Stream export of the global account: `<target>.natster.global-events.<type>`.
pub const GLOBAL_EVENTS_EXPORT_SUBJECT: &str = "*.natster.global-events.*";

pub(super) const GLOBAL_DIR: &str = "global";
pub(super) const HUB_DIR: &str = "hub";

/// The global account's exports.
pub fn global_exports() -> Vec<Export> {
    vec![
        Export {
            name: "natster_global".into(),
            subject: GLOBAL_EXPORT_SUBJECT.into(),
            kind: ExportType::Service,
            account_token_position: Some(1),
        },
        Export {
            name: "natster_global_events".into(),
            subject: GLOBAL_EVENTS_EXPORT_SUBJECT.into(),
            kind: ExportType::Stream,
            account_token_position: Some(1),
        },
    ]
}

/// The two imports of the global account that account `me` needs (the original's
/// `natster_global` and `natster_global_events`).
pub fn global_imports(me: &str, global_key: &str) -> [Import; 2] {
    [
        Import {
            name: "natster_global".into(),
            subject: format!("{me}.natster.global.>"),
            account: global_key.to_string(),
            local_subject: Some("natster.global.>".into()),
            to: None,
            kind: ExportType::Service,
        },
        Import {
            name: "natster_global_events".into(),
            subject: format!("{me}.natster.global-events.*"),
            account: global_key.to_string(),
            local_subject: Some("natster.global-events.*".into()),
            to: None,
            kind: ExportType::Stream,
        },
    ]
}

/// `claims` with the global imports added (those already there are kept); true if it changed.
fn add_global_imports(claims: &mut Claims<AccountNats>, global_key: &str) -> bool {
    let mut changed = false;
    for import in global_imports(&claims.sub, global_key) {
        if !claims.nats.imports.iter().any(|i| i.account == import.account && i.subject == import.subject) {
            claims.nats.imports.push(import);
            changed = true;
        }
    }
    changed
}

/// The claims a new account of this operator starts with: the Natster exports, and the
/// global imports when the operator has a global account.
pub(super) fn person_claims(name: &str, key: &str, global_key: Option<&str>) -> Claims<AccountNats> {
    let mut claims = Claims::new(
        name,
        key,
        AccountNats {
            imports: Vec::new(),
            exports: natster_exports(),
            limits: AccountLimits::unlimited(true),
            signing_keys: Vec::new(),
            claim_type: jwt::ACCOUNT.into(),
            version: jwt::VERSION,
        },
    );
    if let Some(global) = global_key {
        add_global_imports(&mut claims, global);
    }
    claims
}

impl Operator {
    /// Creates the global and hub accounts if this operator has none yet, and adds the global
    /// imports to every account that lacks them. Idempotent; changes only what is missing.
    pub fn ensure_network(&mut self) -> Result<()> {
        if self.global.is_none() {
            let key = KeyPair::new_account();
            let claims = Claims::new(
                GLOBAL_ACCOUNT_NAME,
                &key.public_key(),
                AccountNats {
                    imports: Vec::new(),
                    exports: global_exports(),
                    limits: AccountLimits::unlimited(true),
                    signing_keys: Vec::new(),
                    claim_type: jwt::ACCOUNT.into(),
                    version: jwt::VERSION,
                },
            );
            self.global = Some(self.create_special(GLOBAL_DIR, GLOBAL_ACCOUNT_NAME, &key, claims, "global")?);
        }
        let global_key = self.global_account_key().unwrap_or_default();
        if self.hub.is_none() {
            let key = KeyPair::new_account();
            let claims = person_claims(HUB_ACCOUNT_NAME, &key.public_key(), Some(&global_key));
            self.hub = Some(self.create_special(HUB_DIR, HUB_ACCOUNT_NAME, &key, claims, "hub")?);
        }
        // Accounts made before the network existed: give them the global imports.
        let mut stale = Vec::new();
        for (name, account) in &self.accounts {
            let mut claims = account.claims.clone();
            if add_global_imports(&mut claims, &global_key) {
                stale.push((name.clone(), claims));
            }
        }
        for (name, claims) in stale {
            self.store_account_claims(&name, claims)?;
            tracing::info!("account {name}: added the imports of the global service");
        }
        if let Some(hub) = &self.hub {
            let mut claims = hub.claims.clone();
            if add_global_imports(&mut claims, &global_key) {
                let token = self.sign_account(&mut claims)?;
                let hub = self.hub.as_mut().ok_or_else(|| anyhow!("no hub account"))?;
                write_public(&hub.dir.join(ACCOUNT_JWT), token.as_bytes())?;
                hub.claims = claims;
                hub.jwt = token;
            }
        }
        Ok(())
    }

    /// Writes a special account's folder through a staging folder; if another process made it
    /// meanwhile, loads theirs.
    fn create_special(
        &self,
        dir_name: &str,
        name: &str,
        key: &KeyPair,
        claims: Claims<AccountNats>,
        user: &str,
    ) -> Result<AccountState> {
        let target = self.dir.join(dir_name);
        if !target.exists() {
            let staging = tempfile::Builder::new()
                .prefix(&format!(".{dir_name}-new-"))
                .tempdir_in(&self.dir)
                .with_context(|| format!("cannot create a staging folder in {}", self.dir.display()))?;
            write_account_dir(staging.path(), &self.key, key, claims, user)?;
            let staged = staging.keep();
            if let Err(e) = fs::rename(&staged, &target) {
                let _ = fs::remove_dir_all(&staged);
                if !target.join(ACCOUNT_JWT).exists() {
                    return Err(e).with_context(|| format!("cannot create {}", target.display()));
                }
            } else {
                tracing::info!(account = %key.public_key(), "created the {name} account");
            }
        }
        load_account_dir(&target, name, &self.key.public_key())
    }

    /// The global account's public key (None for an operator not yet given one).
    pub fn global_account_key(&self) -> Option<String> {
        self.global.as_ref().map(|a| a.key.public_key())
    }

    /// The global account's user creds: the identity `global serve` runs as.
    pub fn global_creds(&self) -> Option<PathBuf> {
        self.global.as_ref().map(|a| a.dir.join(USER_CREDS))
    }

    /// The hub account (name, key, creds).
    pub fn hub_account(&self) -> Option<AccountRecord> {
        self.hub.as_ref().map(AccountState::record)
    }

    /// The folder the hub catalog's state lives in (its index, share list, context).
    pub fn hub_home(&self) -> Option<Home> {
        self.hub.as_ref().map(|h| Home::at(h.dir.join("home")))
    }

    /// Adds to `importer`'s JWT the imports of the hub catalog (as any catalog import) and
    /// returns the re-signed JWT; None when this operator has no hub or it is imported already.
    pub fn add_hub_import(&mut self, importer: &str) -> Result<Option<String>> {
        let Some(hub) = self.hub_account() else { return Ok(None) };
        if self.catalog_imports(importer)?.iter().any(|i| i.catalog == HUB_CATALOG && i.owner == hub.public_key) {
            return Ok(None);
        }
        self.add_catalog_import(importer, HUB_CATALOG, &hub.public_key).map(Some)
    }

    /// The special accounts' JWTs (for the server's preload).
    pub(super) fn network_jwts(&self) -> Vec<(String, &str)> {
        [&self.global, &self.hub].into_iter().flatten().map(|a| (a.key.public_key(), a.jwt.as_str())).collect()
    }

    /// Pushes the global and hub accounts' JWTs to a running server.
    pub async fn push_network(&self, sys: &async_nats::Client) -> Result<()> {
        for (_, jwt) in self.network_jwts() {
            super::operator::push_account_jwt_to(sys, jwt, self.resolvers()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_imports_carry_own_key_in_token_zero() {
        let me = KeyPair::new_account().public_key();
        let global = KeyPair::new_account().public_key();
        let [service, stream] = global_imports(&me, &global);
        assert_eq!(service.subject, format!("{me}.natster.global.>"));
        assert_eq!(service.local_subject.as_deref(), Some("natster.global.>"));
        assert_eq!(stream.subject, format!("{me}.natster.global-events.*"));
        assert_eq!(stream.kind, ExportType::Stream);
        let mut claims = person_claims("a", &me, Some(&global));
        assert!(!add_global_imports(&mut claims, &global), "already there");
        assert_eq!(claims.nats.imports.len(), 2);
    }
}
