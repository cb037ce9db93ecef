//! The operator itself: its keys and JWTs on disk, the accounts it manages (create, load,
//! re-sign with imports), the nats-server configuration for them, and pushing an account JWT
//! to a running server's full resolver.
//!
//! Account changes that must agree with a running server go server first:
//! [`Operator::prepare_account`] signs, the push must succeed, and only then
//! [`Operator::commit_account`] writes the JWT ([`Operator::apply_account`] does all three).

use super::*;

/// One account this operator manages, as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub name: String,
    pub public_key: String,
    /// Creds file of the account's user (JWT + seed, mode 0600).
    pub creds: PathBuf,
}

pub(super) struct AccountState {
    pub(super) name: String,
    pub(super) key: KeyPair,
    pub(super) claims: Claims<AccountNats>,
    pub(super) jwt: String,
    pub(super) dir: PathBuf,
}

impl AccountState {
    pub(super) fn record(&self) -> AccountRecord {
        AccountRecord { name: self.name.clone(), public_key: self.key.public_key(), creds: self.dir.join(USER_CREDS) }
    }
}

/// A signed account JWT not stored yet (see [`Operator::prepare_account`]).
#[derive(Debug, Clone)]
pub struct PendingAccount {
    name: String,
    claims: Claims<AccountNats>,
    jwt: String,
}

impl PendingAccount {
    pub fn jwt(&self) -> &str {
        &self.jwt
    }

    pub fn claims(&self) -> &Claims<AccountNats> {
        &self.claims
    }
}

/// Where an account change took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing needed to change.
    Unchanged,
    /// The running server took it, then it was stored.
    Pushed,
    /// No server was running: stored, and loaded at `operator up`.
    AtNextStart,
}

/// The operator and every account it manages. Holds seeds: its `Debug` shows public keys only.
pub struct Operator {
    pub(super) dir: PathBuf,
    pub(super) key: KeyPair,
    jwt: String,
    system: AccountState,
    /// The Natster global and hub accounts (`network`); None in an operator made before them
    /// until [`Operator::ensure_network`] runs.
    pub(super) global: Option<AccountState>,
    pub(super) hub: Option<AccountState>,
    pub(super) accounts: BTreeMap<String, AccountState>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("dir", &self.dir)
            .field("public_key", &self.key.public_key())
            .field("system_account", &self.system.key.public_key())
            .field("accounts", &self.accounts.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Account names: letters, digits, `_` and `-`, 1..=64 characters (they become folder names).
pub fn validate_account_name(name: &str) -> Result<()> {
    validate_catalog_name(name).map_err(|e| anyhow!("{}", e.replace("catalog name", "account name")))
}

pub(super) fn check_account_key(key: &str, what: &str) -> Result<()> {
    if !is_account_key(key) {
        bail!("{what} '{key}' is not an account public key (56 characters starting with 'A', valid checksum)");
    }
    Ok(())
}

impl Operator {
    /// `$NATSTER_HOME/operator`.
    pub fn dir_in(home: &Home) -> PathBuf {
        home.path().join(OPERATOR_DIR)
    }

    /// Loads the operator in `home`, creating it first (operator key and self-signed JWT,
    /// system account "SYS" and its user) if there is none, and its global and hub accounts
    /// if it has none yet ([`Operator::ensure_network`]). Creation is atomic: a staging
    /// folder is renamed into place, so an interrupted run leaves nothing half-made.
    pub fn init(home: &Home) -> Result<Operator> {
        let mut operator = Self::create(home)?;
        operator.ensure_network()?;
        Ok(operator)
    }

    fn create(home: &Home) -> Result<Operator> {
        let dir = Self::dir_in(home);
        if dir.join(OPERATOR_JWT).exists() {
            return Self::load(home);
        }
        if dir.exists() {
            bail!(
                "{} exists but holds no {OPERATOR_JWT}; move it away and run again to create a new operator",
                dir.display()
            );
        }
        home.ensure()?;
        let staging = tempfile::Builder::new()
            .prefix(".operator-new-")
            .tempdir_in(home.path())
            .with_context(|| format!("cannot create a staging folder in {}", home.path().display()))?;
        set_mode(staging.path(), 0o700)?;

        let operator = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let mut claims = Claims::new(
            OPERATOR_NAME,
            &operator.public_key(),
            OperatorNats {
                system_account: Some(system.public_key()),
                claim_type: jwt::OPERATOR.into(),
                version: jwt::VERSION,
            },
        );
        let operator_jwt = jwt::encode(&mut claims, &operator)?;
        write_seed(&staging.path().join(OPERATOR_SEED), &operator)?;
        write_public(&staging.path().join(OPERATOR_JWT), operator_jwt.as_bytes())?;
        let system_claims = Claims::new(
            SYSTEM_ACCOUNT_NAME,
            &system.public_key(),
            AccountNats {
                imports: Vec::new(),
                exports: Vec::new(),
                limits: AccountLimits::unlimited(false),
                signing_keys: Vec::new(),
                claim_type: jwt::ACCOUNT.into(),
                version: jwt::VERSION,
            },
        );
        write_account_dir(&staging.path().join(SYSTEM_DIR), &operator, &system, system_claims, "sys")?;
        create_private_dir(&staging.path().join(ACCOUNTS_DIR))?;

        let staged = staging.keep();
        if let Err(e) = fs::rename(&staged, &dir) {
            let _ = fs::remove_dir_all(&staged);
            if dir.join(OPERATOR_JWT).exists() {
                // Someone else created it at the same moment: use theirs.
                return Self::load(home);
            }
            return Err(e).with_context(|| format!("cannot create {}", dir.display()));
        }
        tracing::info!(operator = %operator.public_key(), "created NATS operator in {}", dir.display());
        Self::load(home)
    }

    /// Loads an existing operator and all its accounts, checking every JWT's signature and
    /// issuer and that every seed matches its JWT.
    pub fn load(home: &Home) -> Result<Operator> {
        let dir = Self::dir_in(home);
        let jwt_path = dir.join(OPERATOR_JWT);
        if !jwt_path.exists() {
            bail!("no operator in {}; run `natster-mount operator up` first", dir.display());
        }
        let key = read_seed(&dir.join(OPERATOR_SEED), KeyPairType::Operator)?;
        let operator_jwt = read_text(&jwt_path)?.trim().to_string();
        let claims: Claims<OperatorNats> =
            jwt::decode(&operator_jwt).with_context(|| format!("{} is not a valid JWT", jwt_path.display()))?;
        if claims.nats.claim_type != jwt::OPERATOR || claims.sub != key.public_key() || claims.iss != claims.sub {
            bail!("{} is not the self-signed operator JWT of the key in {OPERATOR_SEED}", jwt_path.display());
        }
        let system = load_account_dir(&dir.join(SYSTEM_DIR), SYSTEM_ACCOUNT_NAME, &key.public_key())?;
        if claims.nats.system_account.as_deref() != Some(system.key.public_key().as_str()) {
            bail!("the operator JWT's system_account is not the account in {}", dir.join(SYSTEM_DIR).display());
        }
        let special = |sub: &str, name: &str| -> Result<Option<AccountState>> {
            let path = dir.join(sub);
            if !path.join(ACCOUNT_JWT).exists() {
                return Ok(None);
            }
            load_account_dir(&path, name, &key.public_key()).map(Some)
        };
        let global = special(super::network::GLOBAL_DIR, super::network::GLOBAL_ACCOUNT_NAME)?;
        let hub = special(super::network::HUB_DIR, super::network::HUB_ACCOUNT_NAME)?;
        let mut accounts = BTreeMap::new();
        let accounts_dir = dir.join(ACCOUNTS_DIR);
        let entries = fs::read_dir(&accounts_dir).with_context(|| format!("cannot read {}", accounts_dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", accounts_dir.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if name.starts_with('.') || !entry.path().is_dir() {
                continue; // staging leftovers of an interrupted add_account
            }
            validate_account_name(&name).with_context(|| format!("unexpected folder in {}", accounts_dir.display()))?;
            let account = load_account_dir(&entry.path(), &name, &key.public_key())?;
            accounts.insert(name, account);
        }
        Ok(Operator { dir, key, jwt: operator_jwt, system, global, hub, accounts })
    }

    /// The operator public key.
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// The self-signed operator JWT.
    pub fn jwt(&self) -> &str {
        &self.jwt
    }

    /// Path of the operator JWT file (what a nats-server config's `operator:` names).
    pub fn jwt_path(&self) -> PathBuf {
        self.dir.join(OPERATOR_JWT)
    }

    /// The operator's folder (`$NATSTER_HOME/operator`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn system_account_key(&self) -> String {
        self.system.key.public_key()
    }

    pub fn system_account_jwt(&self) -> &str {
        &self.system.jwt
    }

    /// Creds file of the system user: the identity `push_account_jwt` needs.
    pub fn system_creds(&self) -> PathBuf {
        self.system.dir.join(USER_CREDS)
    }

    /// Every account this operator manages (not the system account), by name.
    pub fn accounts(&self) -> Vec<AccountRecord> {
        self.accounts.values().map(AccountState::record).collect()
    }

    pub fn account_by_name(&self, name: &str) -> Option<AccountRecord> {
        self.accounts.get(name).map(AccountState::record)
    }

    pub fn account_by_key(&self, public_key: &str) -> Option<AccountRecord> {
        self.accounts.values().find(|a| a.key.public_key() == public_key).map(AccountState::record)
    }

    fn account(&self, name: &str) -> Result<&AccountState> {
        self.accounts.get(name).ok_or_else(|| self.unknown_account(name))
    }

    fn unknown_account(&self, name: &str) -> anyhow::Error {
        let known: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
        if known.is_empty() {
            anyhow!("no account '{name}' in this operator (it has none yet; add one with `operator add-account`)")
        } else {
            anyhow!("no account '{name}' in this operator; known accounts: {}", known.join(", "))
        }
    }

    /// The current JWT of a managed account.
    pub fn account_jwt(&self, name: &str) -> Result<String> {
        Ok(self.account(name)?.jwt.clone())
    }

    /// The current claims of a managed account (for inspection or hand-made variants; sign
    /// them with [`Operator::sign_account`]).
    pub fn account_claims(&self, name: &str) -> Result<Claims<AccountNats>> {
        Ok(self.account(name)?.claims.clone())
    }

    /// Signs account claims with the operator key without storing them.
    pub fn sign_account(&self, claims: &mut Claims<AccountNats>) -> Result<String> {
        check_account_key(&claims.sub, "account JWT subject")?;
        claims.nats.claim_type = jwt::ACCOUNT.into();
        claims.nats.version = jwt::VERSION;
        jwt::encode(claims, &self.key)
    }

    /// Decodes an account JWT and checks that this operator signed it.
    pub fn verify_account_jwt(&self, token: &str) -> Result<Claims<AccountNats>> {
        let claims: Claims<AccountNats> = jwt::decode(token)?;
        if claims.nats.claim_type != jwt::ACCOUNT || !is_account_key(&claims.sub) {
            bail!("not an account JWT (type {:?})", claims.nats.claim_type);
        }
        if claims.iss != self.key.public_key() {
            bail!(
                "account JWT for {} is signed by {}, not by this operator {}",
                claims.sub,
                claims.iss,
                self.public_key()
            );
        }
        Ok(claims)
    }

    /// How many full resolvers the local deployment runs (its cluster size; 1 without one):
    /// what a push waits to hear from.
    pub fn resolvers(&self) -> usize {
        super::cluster::LocalDeployment::load(&self.dir).map(|d| d.size()).unwrap_or(1)
    }

    /// Pushes the stored JWT of account `name` to a running server (see [`push_account_jwt`]).
    pub async fn push_account(&self, sys: &async_nats::Client, name: &str) -> Result<()> {
        let token = self.account_jwt(name)?;
        push_account_jwt_to(sys, &token, self.resolvers())
            .await
            .map(|_| ())
            .with_context(|| format!("cannot update account '{name}' on the server"))
    }

    /// Creates account `name` with the two Natster exports, its user and creds file (0600).
    pub fn add_account(&mut self, name: &str) -> Result<AccountRecord> {
        validate_account_name(name)?;
        if name.eq_ignore_ascii_case(SYSTEM_ACCOUNT_NAME) || name.eq_ignore_ascii_case("system") {
            bail!("account name '{name}' is reserved for the system account; choose another name");
        }
        // The network's own accounts are found by name (`catalog import hub natster_hub`,
        // labels in the inbox): a person's account of such a name would pass for them.
        if name.to_ascii_lowercase().starts_with("natster_") {
            bail!(
                "account name '{name}' is reserved: names starting with natster_ are the network's own ({}, {}); \
                 choose another name",
                super::network::HUB_ACCOUNT_NAME,
                super::network::GLOBAL_ACCOUNT_NAME
            );
        }
        let accounts_dir = self.dir.join(ACCOUNTS_DIR);
        let target = accounts_dir.join(name);
        if let Some(existing) = self.accounts.get(name) {
            bail!("account '{name}' already exists (key {}); choose another name", existing.key.public_key());
        }
        if target.exists() {
            bail!("account '{name}' already exists in {}; choose another name", accounts_dir.display());
        }
        let staging = tempfile::Builder::new()
            .prefix(&format!(".new-{name}-"))
            .tempdir_in(&accounts_dir)
            .with_context(|| format!("cannot create a staging folder in {}", accounts_dir.display()))?;
        let account = KeyPair::new_account();
        let global = self.global_account_key();
        let claims = super::network::person_claims(name, &account.public_key(), global.as_deref());
        write_account_dir(staging.path(), &self.key, &account, claims, name)?;
        let staged = staging.keep();
        if let Err(e) = fs::rename(&staged, &target) {
            let _ = fs::remove_dir_all(&staged);
            return Err(e).with_context(|| format!("cannot create account folder {}", target.display()));
        }
        let state = load_account_dir(&target, name, &self.key.public_key())?;
        let record = state.record();
        self.accounts.insert(name.to_string(), state);
        tracing::info!(account = %record.public_key, "added account {name}");
        Ok(record)
    }

    /// Catalogs account `name` imports, from its JWT.
    pub fn catalog_imports(&self, name: &str) -> Result<Vec<ImportedCatalog>> {
        let account = self.account(name)?;
        let me = account.key.public_key();
        Ok(account
            .claims
            .nats
            .imports
            .iter()
            .filter(|i| i.kind == ExportType::Service)
            .filter_map(|i| imported_catalog(i, &me).map(|c| ImportedCatalog::per_catalog(c, &i.account)))
            .collect())
    }

    /// Adds to `importer`'s account JWT the two imports of catalog `catalog` from account
    /// `owner_key`, stores the re-signed JWT and returns it (push it with
    /// [`Operator::push_account`]). Nothing changes on error.
    pub fn add_catalog_import(&mut self, importer: &str, catalog: &str, owner_key: &str) -> Result<String> {
        validate_catalog_name(catalog).map_err(|e| anyhow!(e))?;
        let account = self.account(importer)?;
        check_account_key(owner_key, "owner account key")?;
        let me = account.key.public_key();
        if owner_key == me {
            bail!("account '{importer}' owns {owner_key}: an account reads its own catalogs without an import");
        }
        let [service, stream] = catalog_imports(&me, catalog, owner_key)?;
        for existing in &account.claims.nats.imports {
            if imported_catalog(existing, &me) == Some(catalog) {
                if existing.account == owner_key {
                    bail!("account '{importer}' already imports catalog '{catalog}' from {owner_key}");
                }
                bail!(
                    "account '{importer}' already imports a catalog '{catalog}' from {}, and both imports would \
                     use the local subjects of '{catalog}'; remove that one first",
                    existing.account
                );
            }
            let local = existing.local_subject.as_ref().or(existing.to.as_ref()).unwrap_or(&existing.subject);
            if Some(local) == service.local_subject.as_ref() || Some(local) == stream.local_subject.as_ref() {
                bail!(
                    "account '{importer}' already has import '{}' on local subject {local}; remove it first",
                    existing.name
                );
            }
        }
        let mut claims = account.claims.clone();
        claims.nats.imports.push(service);
        claims.nats.imports.push(stream);
        self.store_account_claims(importer, claims)
    }

    /// Adds to `importer`'s account JWT the two per-owner imports of `owner_key` (see
    /// `accounts::imports`), stores and returns the re-signed JWT without pushing it (as `nsc`
    /// would; [`Operator::apply_account`] is the server-first way). Nothing changes on error.
    pub fn add_owner_import(&mut self, importer: &str, owner_key: &str) -> Result<String> {
        let account = self.account(importer)?;
        let me = account.key.public_key();
        let mut claims = account.claims.clone();
        for import in owner_imports(&me, owner_key)? {
            if claims.nats.imports.iter().any(|i| i.kind == import.kind && imported_owner(i, &me) == Some(owner_key)) {
                bail!("account '{importer}' already imports from {owner_key}");
            }
            claims.nats.imports.push(import);
        }
        self.store_account_claims(importer, claims)
    }

    /// Removes the two imports of catalog `catalog` from `owner_key` from `importer`'s account
    /// JWT, stores and returns the re-signed JWT. Nothing changes on error.
    pub fn remove_catalog_import(&mut self, importer: &str, catalog: &str, owner_key: &str) -> Result<String> {
        validate_catalog_name(catalog).map_err(|e| anyhow!(e))?;
        let account = self.account(importer)?;
        check_account_key(owner_key, "owner account key")?;
        let me = account.key.public_key();
        let mut claims = account.claims.clone();
        let before = claims.nats.imports.len();
        claims.nats.imports.retain(|i| !(i.account == owner_key && imported_catalog(i, &me) == Some(catalog)));
        if claims.nats.imports.len() == before {
            bail!("account '{importer}' does not import catalog '{catalog}' from {owner_key}");
        }
        self.store_account_claims(importer, claims)
    }

    pub(super) fn store_account_claims(&mut self, name: &str, claims: Claims<AccountNats>) -> Result<String> {
        let pending = self.prepare_account(name, claims)?;
        self.commit_account(pending)
    }

    /// Owners whose per-owner imports (both of them) account `name`'s JWT holds.
    pub fn owner_imports(&self, name: &str) -> Result<Vec<String>> {
        let account = self.account(name)?;
        let me = account.key.public_key();
        let imports = &account.claims.nats.imports;
        let has = |owner: &str, kind: ExportType| {
            imports.iter().any(|i| i.kind == kind && imported_owner(i, &me) == Some(owner))
        };
        let mut owners: Vec<String> = Vec::new();
        for owner in imports.iter().filter(|i| i.kind == ExportType::Service).filter_map(|i| imported_owner(i, &me)) {
            if has(owner, ExportType::Stream) && !owners.iter().any(|o| o == owner) {
                owners.push(owner.to_string());
            }
        }
        Ok(owners)
    }

    /// Signs new claims for account `name` without storing them: push the result, then
    /// [`Operator::commit_account`] it (or let [`Operator::apply_account`] do both).
    pub fn prepare_account(&self, name: &str, mut claims: Claims<AccountNats>) -> Result<PendingAccount> {
        let account = self.account(name)?;
        if claims.sub != account.key.public_key() {
            bail!("these claims are for account {}, not for '{name}' ({})", claims.sub, account.key.public_key());
        }
        let jwt = self.sign_account(&mut claims)?;
        Ok(PendingAccount { name: name.to_string(), claims, jwt })
    }

    /// Stores a prepared account JWT as the account's current one, and returns it.
    pub fn commit_account(&mut self, pending: PendingAccount) -> Result<String> {
        let PendingAccount { name, claims, jwt } = pending;
        let account = self.accounts.get_mut(&name).ok_or_else(|| anyhow!("no account '{name}'"))?;
        write_public(&account.dir.join(ACCOUNT_JWT), jwt.as_bytes())?;
        account.claims = claims;
        account.jwt = jwt.clone();
        Ok(jwt)
    }

    /// Makes a prepared change, server first: pushes it to the server at `url` and stores it
    /// only once the server has taken it, so a refused or failed push changes nothing. A
    /// server that is not running (no connection) cannot disagree: the change is stored and
    /// the server loads it at its next start (its resolver preload).
    pub async fn apply_account(&mut self, url: &str, pending: PendingAccount) -> Result<Applied> {
        let sys = connect(url, &self.system_creds(), Duration::from_secs(2)).await.ok();
        let applied = match sys {
            Some(sys) => {
                if let Err(e) = push_account_jwt_to(&sys, &pending.jwt, self.resolvers()).await {
                    // A push whose answer was lost (a timeout) may still have been taken: the
                    // server's resolver says which JWT it holds.
                    let held = lookup_account_jwt(&sys, &pending.claims.sub).await.ok();
                    if held.as_deref() != Some(pending.jwt.as_str()) {
                        let current = &self.account(&pending.name)?.jwt;
                        let unsure = if held.as_ref() == Some(current) {
                            ""
                        } else {
                            " here (the server did not say which JWT it holds: should it apply this one late, the \
                             same command again brings them back in agreement)"
                        };
                        return Err(e.context(format!(
                            "cannot update account '{}' on the server at {url}; nothing was changed{unsure}",
                            pending.name
                        )));
                    }
                    tracing::info!(account = %pending.name, "the push was not answered, but the server holds the new JWT");
                }
                Applied::Pushed
            }
            None => Applied::AtNextStart,
        };
        crate::store::blocking(|| self.commit_account(pending))?;
        Ok(applied)
    }

    /// A nats-server configuration for this operator: loopback `port`, operator mode, full
    /// resolver under `<store_dir>/jwt` preloaded with every account JWT (a JWT the resolver
    /// already holds in a newer version is kept), JetStream under `store_dir`.
    pub fn server_config(&self, port: u16, store_dir: &Path) -> String {
        self.server_config_named(port, store_dir, &format!("natster-{port}"))
    }

    pub(super) fn server_config_named(&self, port: u16, store_dir: &Path, server_name: &str) -> String {
        let mut conf = String::new();
        conf.push_str("# Written by natster-mount; regenerated on every start.\n");
        conf.push_str(&format!("listen: \"127.0.0.1:{port}\"\n"));
        conf.push_str(&format!("server_name: {}\n", conf_quote(server_name)));
        conf.push_str(&format!("operator: {}\n", conf_quote(&self.jwt_path().to_string_lossy())));
        conf.push_str(&format!("system_account: {}\n", self.system_account_key()));
        conf.push_str("resolver: {\n  type: full\n");
        conf.push_str(&format!("  dir: {}\n", conf_quote(&store_dir.join("jwt").to_string_lossy())));
        // The sync interval only matters in a cluster: a node back from an outage fetches the
        // JWTs pushed meanwhile from another node's resolver within it.
        conf.push_str(&format!(
            "  allow_delete: false\n  interval: \"{}\"\n}}\n",
            super::cluster::RESOLVER_SYNC_INTERVAL
        ));
        conf.push_str("resolver_preload: {\n");
        conf.push_str(&format!("  {}: {}\n", self.system_account_key(), conf_quote(&self.system.jwt)));
        for (key, jwt) in self.network_jwts() {
            conf.push_str(&format!("  {key}: {}\n", conf_quote(jwt)));
        }
        for account in self.accounts.values() {
            conf.push_str(&format!("  {}: {}\n", account.key.public_key(), conf_quote(&account.jwt)));
        }
        conf.push_str("}\n");
        conf.push_str(&format!("jetstream: {{\n  store_dir: {}\n}}\n", conf_quote(&store_dir.to_string_lossy())));
        conf
    }
}

/// Writes `account.nk`, `account.jwt` (signed by `operator`) and `user.creds` into `dir`
/// (created if missing, 0700).
pub(super) fn write_account_dir(
    dir: &Path,
    operator: &KeyPair,
    account: &KeyPair,
    mut claims: Claims<AccountNats>,
    user_name: &str,
) -> Result<()> {
    if !dir.exists() {
        create_private_dir(dir)?;
    }
    set_mode(dir, 0o700)?;
    let account_jwt = jwt::encode(&mut claims, operator)?;
    let user = KeyPair::new_user();
    let mut user_claims = Claims::new(user_name, &user.public_key(), UserNats::unlimited());
    let user_jwt = jwt::encode(&mut user_claims, account)?;
    let user_seed = user.seed().map_err(|e| anyhow!("user key has no seed: {e}"))?;
    write_seed(&dir.join(ACCOUNT_SEED), account)?;
    write_public(&dir.join(ACCOUNT_JWT), account_jwt.as_bytes())?;
    write_private(&dir.join(USER_CREDS), format_creds(&user_jwt, &user_seed).as_bytes())?;
    Ok(())
}

pub(super) fn load_account_dir(dir: &Path, name: &str, operator_key: &str) -> Result<AccountState> {
    let key = read_seed(&dir.join(ACCOUNT_SEED), KeyPairType::Account)?;
    let jwt_path = dir.join(ACCOUNT_JWT);
    let token = read_text(&jwt_path)?.trim().to_string();
    let claims: Claims<AccountNats> =
        jwt::decode(&token).with_context(|| format!("{} is not a valid account JWT", jwt_path.display()))?;
    if claims.nats.claim_type != jwt::ACCOUNT || claims.sub != key.public_key() {
        bail!("{} is not the account JWT of the key in {ACCOUNT_SEED}", jwt_path.display());
    }
    if claims.iss != operator_key {
        bail!("{} is signed by {}, not by this operator", jwt_path.display(), claims.iss);
    }
    let creds = dir.join(USER_CREDS);
    if !creds.is_file() {
        bail!("account '{name}' has no creds file {}", creds.display());
    }
    Ok(AccountState { name: name.to_string(), key, claims, jwt: token, dir: dir.to_path_buf() })
}

/// Connects to `url` as the user of `creds`, bounded by `timeout`.
pub async fn connect(url: &str, creds: &Path, timeout: Duration) -> Result<async_nats::Client> {
    let options = async_nats::ConnectOptions::with_credentials_file(creds.to_path_buf())
        .await
        .with_context(|| format!("cannot use creds file {}", creds.display()))?
        .name("natster-mount")
        .connection_timeout(timeout)
        .request_timeout(Some(timeout));
    // A comma-separated list is several servers (a cluster): async-nats reads a string as one.
    let servers: Vec<&str> = url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    match tokio::time::timeout(timeout, async_nats::connect_with_options(servers.as_slice(), options)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(anyhow!("cannot connect to {url} with {}: {e}", creds.display())),
        Err(_) => Err(anyhow!("cannot connect to {url} with {}: timed out after {timeout:?}", creds.display())),
    }
}

/// The account JWT a full-resolver nats-server holds for `account_key`
/// (`$SYS.REQ.ACCOUNT.<key>.CLAIMS.LOOKUP`, answered by its resolver), over a system user's
/// connection, within [`PUSH_TIMEOUT`].
pub async fn lookup_account_jwt(sys: &async_nats::Client, account_key: &str) -> Result<String> {
    check_account_key(account_key, "account key")?;
    let subject = format!("$SYS.REQ.ACCOUNT.{account_key}.CLAIMS.LOOKUP");
    let request = async_nats::Request::new().timeout(Some(PUSH_TIMEOUT));
    let reply = match tokio::time::timeout(PUSH_TIMEOUT, sys.send_request(subject, request)).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => bail!("looking up account {account_key} on the server failed: {e}"),
        Err(_) => bail!("looking up account {account_key} on the server timed out after {PUSH_TIMEOUT:?}"),
    };
    let text = String::from_utf8_lossy(&reply.payload).trim().to_string();
    if text.is_empty() {
        bail!("the server holds no JWT for account {account_key}");
    }
    Ok(text)
}

#[derive(Debug, Deserialize)]
struct ClaimsUpdateReply {
    #[serde(default)]
    data: Option<ClaimsUpdateData>,
    #[serde(default)]
    error: Option<ClaimsUpdateError>,
}

#[derive(Debug, Deserialize)]
struct ClaimsUpdateData {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct ClaimsUpdateError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    description: String,
}

/// Sends an updated account JWT to `$SYS.REQ.CLAIMS.UPDATE` over `sys` (a connection of the
/// system user) and checks the server's answer, within [`PUSH_TIMEOUT`]. A full-resolver
/// nats-server stores the JWT and applies it to connected clients without a restart.
///
/// The JWT is first checked locally (a signed account JWT), but not for its issuer: this
/// function does not know the operator. nats-server 2.9.10 does not check it either: it stores
/// and acknowledges an account JWT signed by an untrusted key, after which the account's new
/// connections are refused until a trusted JWT is pushed. Prefer [`Operator::push_account`],
/// or check with [`Operator::verify_account_jwt`] first.
pub async fn push_account_jwt(sys: &async_nats::Client, jwt: &str) -> Result<()> {
    push_account_jwt_to(sys, jwt, 1).await.map(|_| ())
}

/// After the first full resolver's answer, how long the others of a cluster get to answer.
pub const OTHER_RESOLVERS_WAIT: Duration = Duration::from_secs(2);

/// [`push_account_jwt`] to a cluster of `resolvers` full resolvers: every resolver answers
/// the push, and this waits for all of them (at most [`OTHER_RESOLVERS_WAIT`] after the
/// first), not only the first. Any refusal fails the push. Returns how many took it: fewer
/// than `resolvers` means some node is down, and it gets the JWT from the others' resolver
/// sync when it returns (said in a warning).
pub async fn push_account_jwt_to(sys: &async_nats::Client, jwt: &str, resolvers: usize) -> Result<usize> {
    use futures::StreamExt as _;
    let claims: Claims<AccountNats> = jwt::decode(jwt).context("refusing to push an invalid account JWT")?;
    if claims.nats.claim_type != jwt::ACCOUNT || !is_account_key(&claims.sub) {
        bail!("refusing to push a JWT that is not an account JWT (type {:?})", claims.nats.claim_type);
    }
    let resolvers = resolvers.max(1);
    let inbox = sys.new_inbox();
    let mut replies = sys.subscribe(inbox.clone()).await.context("pushing the account JWT failed")?;
    sys.publish_with_reply(CLAIMS_UPDATE_SUBJECT, inbox, jwt.trim().to_string().into())
        .await
        .context("pushing the account JWT failed")?;
    let deadline = tokio::time::Instant::now() + PUSH_TIMEOUT;
    let mut took = 0usize;
    while took < resolvers {
        let bound = match took {
            0 => deadline,
            _ => deadline.min(tokio::time::Instant::now() + OTHER_RESOLVERS_WAIT),
        };
        let reply = match tokio::time::timeout_at(bound, replies.next()).await {
            Ok(Some(reply)) => reply,
            Ok(None) => break,
            Err(_) if took == 0 => bail!("pushing the account JWT timed out after {PUSH_TIMEOUT:?}"),
            Err(_) => break,
        };
        if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            bail!(
                "no nats-server answered {CLAIMS_UPDATE_SUBJECT}; the connection must be the system user's and \
                 the server must run in operator mode with a full resolver"
            );
        }
        check_claims_update_reply(&reply.payload)?;
        took += 1;
    }
    if took < resolvers {
        tracing::warn!(
            "{took} of {resolvers} nats-servers took the JWT of account {}; the others get it from their resolver's \
             sync when they are back",
            claims.sub
        );
    }
    Ok(took)
}

fn check_claims_update_reply(payload: &[u8]) -> Result<()> {
    let parsed: ClaimsUpdateReply = serde_json::from_slice(payload).with_context(|| {
        format!("unexpected reply to {CLAIMS_UPDATE_SUBJECT}: {}", String::from_utf8_lossy(payload))
    })?;
    match (parsed.data, parsed.error) {
        (_, Some(error)) => bail!("nats-server refused the account JWT ({}): {}", error.code, error.description),
        (Some(data), None) if data.code == 200 => Ok(()),
        (Some(data), None) => bail!("nats-server did not take the account JWT ({}): {}", data.code, data.message),
        (None, None) => {
            bail!("unexpected reply to {CLAIMS_UPDATE_SUBJECT}: {}", String::from_utf8_lossy(payload))
        }
    }
}
