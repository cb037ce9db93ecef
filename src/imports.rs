//! What an account imports, changed as one transaction: the context's list of imported
//! catalogs and, when the local operator manages the account, the imports in its account JWT
//! on disk and on the running nats-server. `catalog import` and `catalog unimport` are thin
//! wrappers over [`add`] and [`remove`]; a caller with many imports at once (an inbox's
//! "import all") passes them to one [`add`].
//!
//! Invariants and tricky cases:
//! - Cost per owner, not per catalog: the first catalog of an owner adds the owner's two
//!   imports to the JWT (one push); every further catalog of that owner changes the context
//!   only. The owner's share list still decides, per catalog, who may read it.
//! - Server first: a changed JWT is pushed, and only once nats-server has taken it are the
//!   local JWT and then the context written. A refused or failed push leaves the context, the
//!   local JWT and the server as they were. With no server running the JWT is stored and the
//!   server loads it at `operator up` (its resolver preload).
//! - The JWT as found is used: imports it already holds (left by a run that stopped between
//!   the JWT and the context, or added by hand) count as present, so a retry never meets
//!   "already imports" and nothing can be stuck half-imported.
//! - Removing an owner's last imported catalog removes the owner's two imports as well.
//! - Per-catalog imports (the original's, see `accounts::imports`) keep the original's rule:
//!   their unaliased subjects admit one catalog of a name, and none of an own catalog's name.
//! - File work (context, catalog names, the JWT file) runs through [`blocking`], so these may be
//!   awaited on a runtime worker; the context is rewritten whole (and synced) per call, so many
//!   imports at once belong in one [`add`].

use anyhow::{anyhow, bail, Result};

use crate::accounts::jwt::{AccountNats, Claims, Import};
use crate::accounts::{self, catalog_imports, imported_catalog, imported_owner, owner_imports, Applied, Operator};
use crate::context::{Context, Home, ImportRoute, ImportedCatalog};
use crate::index::Catalog;
use crate::protocol::{is_account_key, validate_catalog_name};
use crate::store::blocking;

/// One catalog to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRequest {
    pub catalog: String,
    /// The owner's account public key.
    pub owner: String,
    /// The owner's account name, if known (a label for telling same-named catalogs apart).
    pub owner_name: Option<String>,
    pub route: ImportRoute,
}

impl ImportRequest {
    /// Catalog `catalog` of `owner`, through the owner's per-owner imports.
    pub fn new(catalog: &str, owner: &str) -> Self {
        ImportRequest {
            catalog: catalog.to_string(),
            owner: owner.to_string(),
            owner_name: None,
            route: ImportRoute::Owner,
        }
    }

    fn record(&self) -> ImportedCatalog {
        ImportedCatalog {
            catalog: self.catalog.clone(),
            owner: self.owner.clone(),
            route: self.route,
            owner_name: self.owner_name.clone(),
        }
    }
}

/// What [`add`] did.
#[derive(Debug)]
pub struct Added {
    /// The new records, in the order asked for.
    pub imports: Vec<ImportedCatalog>,
    /// Where the account JWT change took effect.
    pub applied: Applied,
    /// The context as saved.
    pub context: Context,
}

/// What [`remove`] did.
#[derive(Debug)]
pub struct Removed {
    pub import: ImportedCatalog,
    pub applied: Applied,
    /// The context as saved.
    pub context: Context,
}

/// Who makes the account side of an import.
pub enum AccountSide<'a> {
    /// The local operator manages the account (named `account` in it): its JWT is changed,
    /// pushed and stored here.
    Managed { operator: &'a mut Operator, account: &'a str },
    /// Someone else does (`nsc`, Synadia Cloud): only the context records it.
    External,
}

/// The account key of a context: recorded by `operator add-account` or `init --creds`, else
/// read from its creds.
pub fn context_account(context: &Context, context_name: &str) -> Result<String> {
    if let Some(key) = &context.account_public_key {
        return Ok(key.clone());
    }
    match &context.creds {
        Some(creds) => accounts::creds_account(creds),
        None => bail!(
            "context '{context_name}' names no account; create one with `natster-mount operator add-account NAME`, \
             or bring your creds with `natster-mount init --server URL --creds FILE`"
        ),
    }
}

/// Imports `requests` into context `context_name` of `home`, all or none: the JWT change they
/// need (if any) is made server first, then the context is saved.
pub async fn add(home: &Home, context_name: &str, side: AccountSide<'_>, requests: &[ImportRequest]) -> Result<Added> {
    let (mut context, me) = blocking(|| {
        let context = Context::load(home, context_name)?;
        let me = context_account(&context, context_name)?;
        anyhow::Ok((context, me))
    })?;
    let recorded = |r: &ImportRequest| context.imports.iter().any(|i| i.catalog == r.catalog && i.owner == r.owner);
    let (repairs, fresh): (Vec<ImportRequest>, Vec<ImportRequest>) = requests.iter().cloned().partition(recorded);
    let applied = match side {
        AccountSide::Managed { operator, account } => {
            let mut claims = managed_claims(operator, account, &me)?;
            // A catalog the context records but whose imports the JWT lacks (an unshare removed
            // its per-catalog imports) is repaired; one that lacks nothing is already imported.
            for request in &repairs {
                if !add_to_jwt(&mut claims, &me, request)? {
                    blocking(|| check_requests(home, &context, &me, std::slice::from_ref(request)))?;
                }
            }
            blocking(|| check_requests(home, &context, &me, &fresh))?;
            let mut changed = !repairs.is_empty();
            for request in &fresh {
                changed |= add_to_jwt(&mut claims, &me, request)?;
            }
            apply(operator, account, &context.server, claims, changed).await?
        }
        AccountSide::External => {
            blocking(|| check_requests(home, &context, &me, requests))?;
            Applied::Unchanged
        }
    };
    let records: Vec<ImportedCatalog> = requests.iter().map(ImportRequest::record).collect();
    if context.account_public_key.is_none() {
        context.account_public_key = Some(me);
    }
    // Repairs are recorded already; only the fresh ones are new to the context.
    context.imports.extend(fresh.iter().map(ImportRequest::record));
    blocking(|| context.save(home, context_name))?;
    Ok(Added { imports: records, applied, context })
}

/// Undoes the import shown as `name` (see [`crate::context::shown_names`]): the JWT change
/// first (the per-catalog imports, or the owner's imports once no other catalog of that owner
/// is imported), then the context.
pub async fn remove(home: &Home, context_name: &str, side: AccountSide<'_>, name: &str) -> Result<Removed> {
    let (mut context, own) =
        blocking(|| anyhow::Ok((Context::load(home, context_name)?, crate::index::catalog_names(home))))?;
    let Some(import) = context.find_import(&own, name).cloned() else {
        bail!(
            "context '{context_name}' does not import a catalog '{name}'; `natster-mount catalog ls` lists its imports"
        );
    };
    let applied = match side {
        AccountSide::Managed { operator, account } => {
            let me = context_account(&context, context_name)?;
            let mut claims = managed_claims(operator, account, &me)?;
            let before = claims.nats.imports.len();
            let others_from_owner = context
                .imports
                .iter()
                .filter(|i| **i != import && i.owner == import.owner && i.route == ImportRoute::Owner)
                .count();
            claims.nats.imports.retain(|i| match import.route {
                ImportRoute::Owner => others_from_owner > 0 || imported_owner(i, &me) != Some(import.owner.as_str()),
                ImportRoute::Catalog => {
                    !(i.account == import.owner && imported_catalog(i, &me) == Some(import.catalog.as_str()))
                }
            });
            let changed = claims.nats.imports.len() != before;
            apply(operator, account, &context.server, claims, changed).await?
        }
        AccountSide::External => Applied::Unchanged,
    };
    context.imports.retain(|i| *i != import);
    blocking(|| context.save(home, context_name))?;
    Ok(Removed { import, applied, context })
}

/// After `owner` unshares `catalog` with `importer` (an account the local operator manages):
/// removes the importer's per-catalog imports of it (the original's two imports, which cost
/// JWT space per catalog and would otherwise stay forever), server first. The per-owner
/// imports stay: they carry every other catalog of the owner, cost nothing per catalog, and
/// let the importer's mount hear the refusal (403: the folder empties) and a later re-share.
/// The importer's context keeps its record; its mount shows the folder empty.
pub async fn revoke_per_catalog(
    operator: &mut Operator,
    url: &str,
    importer: &str,
    owner: &str,
    catalog: &str,
) -> Result<Applied> {
    let Some(record) = operator.account_by_key(importer) else { return Ok(Applied::Unchanged) };
    let mut claims = managed_claims(operator, &record.name, importer)?;
    let before = claims.nats.imports.len();
    claims.nats.imports.retain(|i| !(i.account == owner && imported_catalog(i, importer) == Some(catalog)));
    let changed = claims.nats.imports.len() != before;
    apply(operator, &record.name, url, claims, changed).await
}

/// Refuses, before anything changes, what cannot be imported.
fn check_requests(home: &Home, context: &Context, me: &str, requests: &[ImportRequest]) -> Result<()> {
    for (n, request) in requests.iter().enumerate() {
        let catalog = request.catalog.as_str();
        validate_catalog_name(catalog).map_err(|e| anyhow!(e))?;
        if !is_account_key(&request.owner) {
            bail!("'{}' is not an account public key (56 characters starting with 'A', valid checksum)", request.owner);
        }
        let owner = owner_text(request);
        if request.owner == me {
            bail!("{} is your own account: your catalogs need no import (catalog ls lists them)", request.owner);
        }
        let same = |i: &ImportedCatalog| i.catalog == catalog && i.owner == request.owner;
        if context.imports.iter().any(same) || requests[..n].iter().any(|r| same(&r.record())) {
            bail!("catalog '{catalog}' of {owner} is already imported");
        }
        if request.route == ImportRoute::Catalog {
            let direct = |i: &ImportedCatalog| i.catalog == catalog && i.route == ImportRoute::Catalog;
            if context.imports.iter().any(direct)
                || requests[..n].iter().any(|r| direct(&r.record()))
                || Catalog::file_path(home, catalog).exists()
            {
                bail!(
                    "you already have a catalog named '{catalog}' (own or imported per catalog); a per-catalog import \
                     of it would clash: import it without --per-catalog"
                );
            }
        }
    }
    Ok(())
}

fn owner_text(request: &ImportRequest) -> String {
    match &request.owner_name {
        Some(name) => format!("{} ({name})", request.owner),
        None => request.owner.clone(),
    }
}

/// The current claims of the managed account, checked to be the context's account.
fn managed_claims(operator: &Operator, account: &str, me: &str) -> Result<Claims<AccountNats>> {
    let claims = operator.account_claims(account)?;
    if claims.sub != me {
        bail!("the local operator's account '{account}' is {}, not this context's account {me}", claims.sub);
    }
    Ok(claims)
}

/// Adds to `claims` the imports `request` needs that they lack; true if any was added.
fn add_to_jwt(claims: &mut Claims<AccountNats>, me: &str, request: &ImportRequest) -> Result<bool> {
    let imports = &mut claims.nats.imports;
    let needed = match request.route {
        ImportRoute::Owner => owner_imports(me, &request.owner)?,
        ImportRoute::Catalog => catalog_imports(me, &request.catalog, &request.owner)?,
    };
    let mut added = false;
    for import in needed {
        let present = |i: &Import| {
            i.kind == import.kind
                && i.account == request.owner
                && match request.route {
                    ImportRoute::Owner => imported_owner(i, me).is_some(),
                    ImportRoute::Catalog => imported_catalog(i, me) == Some(request.catalog.as_str()),
                }
        };
        if imports.iter().any(present) {
            continue;
        }
        if request.route == ImportRoute::Catalog {
            check_per_catalog_clash(imports, me, &import, request)?;
        }
        imports.push(import);
        added = true;
    }
    Ok(added)
}

/// A per-catalog import uses the unaliased local subjects: nothing else may hold them.
fn check_per_catalog_clash(imports: &[Import], me: &str, new: &Import, request: &ImportRequest) -> Result<()> {
    for existing in imports {
        if existing.kind == new.kind && imported_catalog(existing, me) == Some(request.catalog.as_str()) {
            bail!(
                "your account already imports a catalog '{}' per catalog from {}; both would use the subjects of \
                 '{}': import this one without --per-catalog",
                request.catalog,
                existing.account,
                request.catalog
            );
        }
        let local = existing.local_subject.as_ref().or(existing.to.as_ref()).unwrap_or(&existing.subject);
        if Some(local) == new.local_subject.as_ref() {
            bail!(
                "your account already has import '{}' on local subject {local}; import without --per-catalog",
                existing.name
            );
        }
    }
    Ok(())
}

/// Signs and applies (server first) `claims` if `changed`.
async fn apply(
    operator: &mut Operator,
    account: &str,
    url: &str,
    claims: Claims<AccountNats>,
    changed: bool,
) -> Result<Applied> {
    if !changed {
        return Ok(Applied::Unchanged);
    }
    let pending = operator.prepare_account(account, claims)?;
    operator.apply_account(url, pending).await
}
