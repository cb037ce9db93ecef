//! The people side of the product: the local operator's commands (`operator init|up|add-account`),
//! sharing (`catalog share|unshare`), importing (`catalog import`), `whoami` and `catalog ls`.
//! The security itself is NATS': account JWTs, token-position exports and imports.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::accounts::{self, Applied, LocalCluster, LocalDeployment, Operator};
use crate::cli::{outln, Globals};
use crate::client::ClientError;
use crate::context::{Context, Home, ImportRoute, ImportedCatalog};
use crate::imports::{self, AccountSide, ImportRequest};
use crate::index::Catalog;
use crate::protocol;
use crate::serving::ServeRecord;
use crate::shares::ShareList;

/// Where the local operator keeps its state: `$NATSTER_OPERATOR_HOME`, else `$NATSTER_HOME`.
pub fn operator_home(g: &Globals) -> Home {
    Home::operator_from_env().unwrap_or_else(|| g.home.clone())
}

/// The local deployment (node 1's port, chosen once: 4222 if free, else a free port below the
/// ephemeral range, which no outgoing connection can take while the server is down; and
/// with a cluster every node's ports), stored and kept, so contexts written before
/// `operator up` point at the right place. `wanted_port` and `wanted_size` only when none is
/// stored yet (then it is stored); a different one is refused.
fn local_deployment(op: &Home, wanted_port: Option<u16>, wanted_size: Option<usize>) -> Result<LocalDeployment> {
    let dir = Operator::dir_in(op);
    let stored = LocalDeployment::load(&dir);
    if let Some(s) = &stored {
        if let Some(p) = wanted_port.filter(|p| *p != s.port) {
            bail!(
                "the operator is already initialised on port {} (its contexts point there), not {p}; leave out \
                 --port, or use another NATSTER_OPERATOR_HOME for a second operator",
                s.port
            );
        }
        if let Some(n) = wanted_size.filter(|n| *n != s.size()) {
            // One server that never ran (no JetStream store yet) may still become a cluster.
            let ran = LocalDeployment::store_dir(&dir, 0).join("jetstream").exists();
            if s.size() == 1 && !ran {
                let grown = LocalDeployment::cluster(s.port, n)?;
                grown.save(&dir)?;
                return Ok(grown);
            }
            bail!(
                "the operator's deployment was chosen with {} nats-server(s), not {n} (a JetStream store cannot \
                 move between sizes here); leave out --cluster, or use another NATSTER_OPERATOR_HOME",
                s.size()
            );
        }
        return Ok(s.clone());
    }
    let port = match wanted_port {
        Some(p) => p,
        None => accounts::preferred_or_stable_port(4222)?,
    };
    let deployment = LocalDeployment::cluster(port, wanted_size.unwrap_or(1))?;
    if dir.is_dir() {
        deployment.save(&dir)?;
    }
    Ok(deployment)
}

/// Checks `wanted_port` and `wanted_size` against the stored deployment before anything is
/// created.
fn check_deployment(op: &Home, wanted_port: Option<u16>, wanted_size: Option<usize>) -> Result<()> {
    if LocalDeployment::load(&Operator::dir_in(op)).is_some() {
        local_deployment(op, wanted_port, wanted_size)?;
    }
    Ok(())
}

/// The URL(s) of the local operator's server(s), comma separated (its deployment chosen at
/// `operator init`).
pub fn local_server_url(op: &Home) -> Result<String> {
    Ok(local_deployment(op, None, None)?.urls())
}

pub fn operator_init(g: &Globals, port: Option<u16>, cluster: Option<usize>) -> Result<()> {
    let op_home = operator_home(g);
    check_deployment(&op_home, port, cluster)?;
    op_home.ensure()?;
    let operator = Operator::init(&op_home)?;
    let deployment = local_deployment(&op_home, port, cluster)?;
    outln!("operator {} in {}", operator.public_key(), operator.dir().display());
    outln!("system account {}", operator.system_account_key());
    for line in crate::cli::network::network_lines(&operator) {
        outln!("{line}");
    }
    match deployment.size() {
        1 => outln!("local server will listen on {}", deployment.urls()),
        n => outln!("local cluster of {n} nats-servers will listen on {}", deployment.urls()),
    }
    Ok(())
}

pub async fn operator_up(
    g: &Globals,
    port: Option<u16>,
    cluster: Option<usize>,
    trace: bool,
    network: crate::cli::network::UpOptions,
) -> Result<()> {
    let op_home = operator_home(g);
    check_deployment(&op_home, port, cluster)?;
    op_home.ensure()?;
    let operator = Operator::init(&op_home)?;
    let deployment = local_deployment(&op_home, port, cluster)?;
    let size = deployment.size();
    let binary = crate::cli::network::checked_nats_server(network.global).await?;
    let options = accounts::ClusterOptions { binary: Some(binary), trace };
    let mut servers = LocalCluster::start(&operator, deployment, options).await?;
    let url = servers.urls();
    let started = crate::cli::network::Network::start(&operator, &url, &network).await;
    let network = match started {
        Ok(n) => n,
        Err(e) => {
            servers.shutdown(Duration::from_millis(1500)).await;
            return Err(e);
        }
    };
    let what = match size {
        1 => "nats-server (operator mode, full resolver, JetStream)".to_string(),
        n => format!(
            "cluster '{}' of {n} nats-servers (operator mode, full resolver on each, JetStream clustered; leaf \
             nodes join at {})",
            accounts::CLUSTER_NAME,
            servers.deployment().leaf_urls()
        ),
    };
    // Installed before "Ctrl-C to stop": a signal from then on stops the servers cleanly.
    let shutdown = crate::cli::Shutdown::new()?;
    outln!(
        "{what} on {url} with {} account(s); log {}; Ctrl-C to stop",
        operator.accounts().len(),
        servers.log_path(0).display()
    );
    let died = crate::cli::cluster::supervise(&mut servers, shutdown.signalled()).await;
    network.stop().await;
    if let Some((node, status)) = died {
        let log = servers.log_path(node).display().to_string();
        servers.shutdown(Duration::from_millis(500)).await;
        bail!("nats-server exited unexpectedly ({status}); see its log {log}");
    }
    // Stops within the 2 s promise: 1.5 s for a clean exit, then it is killed.
    servers.shutdown(Duration::from_millis(1500)).await;
    outln!("nats-server{} stopped", if size > 1 { "s" } else { "" });
    Ok(())
}

/// Connects as the system user to push claims; None when the server is not running.
async fn system_connection(operator: &Operator, url: &str) -> Option<async_nats::Client> {
    accounts::connect(url, &operator.system_creds(), Duration::from_secs(2)).await.ok()
}

pub async fn operator_add_account(g: &Globals, name: &str) -> Result<()> {
    let op_home = operator_home(g);
    op_home.ensure()?;
    let mut operator = Operator::init(&op_home)?;
    let url = local_deployment(&op_home, None, None)?.urls();
    if Context::load(&g.home, &g.context).is_ok_and(|c| c.account_public_key.is_some()) {
        bail!(
            "context '{}' in {} already belongs to an account; use another --context or NATSTER_HOME",
            g.context,
            g.home.path().display()
        );
    }
    let record = operator.add_account(name)?;
    let hub = crate::cli::network::add_hub(&mut operator, name, &record.public_key)?;
    let sys = system_connection(&operator, &url).await;
    match &sys {
        Some(sys) => {
            operator.push_network(sys).await?;
            operator.push_account(sys, name).await?
        }
        None => eprintln!("note: the local server is not running; it loads account '{name}' at `operator up`"),
    }
    let context = Context {
        server: url,
        creds: Some(record.creds.clone()),
        account_public_key: Some(record.public_key.clone()),
        account_name: Some(name.to_string()),
        imports: hub.into_iter().collect(),
    };
    let path = context.save(&g.home, &g.context)?;
    outln!("account '{name}' {}", record.public_key);
    outln!("creds {} (mode 0600)", record.creds.display());
    outln!("context '{}' written to {}", g.context, path.display());
    crate::cli::network::account_added(g, &operator, &context, name, sys.is_none()).await;
    Ok(())
}

/// An account named by public key, or by name among the local operator's accounts.
fn resolve_account(g: &Globals, who: &str) -> Result<String> {
    resolve_in(Operator::load(&operator_home(g)).ok().as_ref(), who)
}

/// [`resolve_account`] with the local operator already loaded (if there is one).
fn resolve_in(operator: Option<&Operator>, who: &str) -> Result<String> {
    if let Some(kind) = key_kind_not_account(who) {
        // A seed is never echoed: the message may end up in a terminal log or a bug report.
        bail!("{kind}; give the account's public key (56 characters starting with A) or its name");
    }
    if who.len() == 56 && who.starts_with('A') {
        if protocol::is_account_key(who) {
            return Ok(who.to_string());
        }
        bail!("'{who}' is not a valid account public key (bad checksum); copy it again");
    }
    match operator.and_then(|op| op.account_by_name(who)) {
        Some(record) => Ok(record.public_key),
        None => bail!(
            "'{who}' is neither an account public key (56 characters starting with A) nor an account of the local operator"
        ),
    }
}

/// What an nkey that is not an account public key is, when `who` looks like one.
fn key_kind_not_account(who: &str) -> Option<&'static str> {
    let nkey_like = |len: usize| who.len() == len && who.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if who.starts_with('S') && nkey_like(58) {
        return Some("that is a secret seed (it starts with S), not a public key: never paste it anywhere");
    }
    if !nkey_like(56) {
        return None;
    }
    match who.as_bytes()[0] {
        b'U' => Some("that is a user public key (it starts with U), not an account's"),
        b'O' => Some("that is an operator public key (it starts with O), not an account's"),
        b'N' => Some("that is a server public key (it starts with N), not an account's"),
        b'X' => Some("that is a curve (xkey) public key (it starts with X), not an account's"),
        _ => None,
    }
}

pub(crate) fn account_label(g: &Globals, key: &str) -> String {
    label_in(Operator::load(&operator_home(g)).ok().as_ref(), key)
}

/// `KEY (name)` when the local operator knows the account (the hub included), else `KEY`.
fn label_in(operator: Option<&Operator>, key: &str) -> String {
    let hub = operator.and_then(|op| op.hub_account()).filter(|h| h.public_key == key);
    match operator.and_then(|op| op.account_by_key(key)).or(hub) {
        Some(r) => format!("{key} ({})", r.name),
        None => key.to_string(),
    }
}

pub async fn catalog_share(g: &Globals, catalog: &str, who: &str, share: bool) -> Result<()> {
    Catalog::load(&g.home, catalog)?;
    let key = resolve_account(g, who)?;
    let context = g.load_context().ok();
    let no_accounts = context.as_ref().is_some_and(|c| c.account_public_key.is_none() && c.creds.is_none());
    if share && no_accounts {
        eprintln!(
            "note: context '{}' has no account: on a server without accounts every client can read every catalog \
             served, so this share list guards nothing; share under an operator (`natster-mount operator init`)",
            g.context
        );
    }
    if context.as_ref().and_then(|c| c.account_public_key.as_deref()) == Some(key.as_str()) {
        bail!("{who} is your own account: it can always read your catalogs");
    }
    let mut list = ShareList::load(&g.home, catalog)?;
    if share {
        if list.allows(&key) {
            outln!("catalog '{catalog}' is already shared with {}", account_label(g, &key));
            return Ok(());
        }
        list.accounts.push(key.clone());
        list.save(&g.home)?;
        outln!("catalog '{catalog}' shared with {}", account_label(g, &key));
        if !no_accounts {
            outln!("they import it with: natster-mount catalog import {catalog} {}", own_key_hint(context.as_ref()));
        }
        crate::cli::network::shared(g, catalog, &key, true).await;
    } else {
        if !list.allows(&key) {
            bail!("catalog '{catalog}' is not shared with {}; nothing to undo", account_label(g, &key));
        }
        list.accounts.retain(|a| a != &key);
        list.save(&g.home)?;
        outln!("catalog '{catalog}' no longer shared with {}", account_label(g, &key));
        crate::cli::network::shared(g, catalog, &key, false).await;
        revoke_imports(g, context.as_ref(), catalog, &key).await;
    }
    Ok(())
}

/// After an unshare, the importer's per-catalog imports of the catalog go too when this
/// machine's operator manages its account ([`imports::revoke_per_catalog`]). The share list
/// already refuses the importer; a failure here only leaves an import that reads nothing.
async fn revoke_imports(g: &Globals, context: Option<&Context>, catalog: &str, importer: &str) {
    let Some(owner) = context.and_then(|c| c.account_public_key.clone()) else { return };
    let Ok(mut operator) = Operator::load(&operator_home(g)) else { return };
    let url = match context.map(|c| c.server.clone()) {
        Some(url) => url,
        None => return,
    };
    match imports::revoke_per_catalog(&mut operator, &url, importer, &owner, catalog).await {
        Ok(Applied::Unchanged) => {}
        Ok(_) => outln!("removed {}'s per-catalog import of '{catalog}' from its account", account_label(g, importer)),
        Err(e) => eprintln!(
            "note: {}'s per-catalog import of '{catalog}' stays in its account ({e:#}); it reads nothing, as the share \
             list refuses it",
            account_label(g, importer)
        ),
    }
}

fn own_key_hint(context: Option<&Context>) -> String {
    context.and_then(|c| c.account_public_key.clone()).unwrap_or_else(|| "<your account key>".into())
}

/// The local operator and the name of `key` in it, if it manages that account.
fn managing(operator: Option<Operator>, key: &str) -> Option<(Operator, String)> {
    let operator = operator?;
    let name = operator.account_by_key(key)?.name;
    Some((operator, name))
}

/// `catalog import`: through the owner's per-owner imports (added to the account JWT with
/// the owner's first catalog), or with `per_catalog` the original's two imports per catalog.
/// The account side is made server first (see [`crate::imports`]); `external` only records
/// imports made outside this operator.
pub async fn catalog_import(g: &Globals, catalog: &str, owner: &str, external: bool, per_catalog: bool) -> Result<()> {
    protocol::validate_catalog_name(catalog).map_err(anyhow::Error::msg)?;
    // Loaded once: with thousands of imports, every load and parse counts.
    let operator = Operator::load(&operator_home(g)).ok();
    let owner_key = resolve_in(operator.as_ref(), owner)?;
    let label = label_in(operator.as_ref(), &owner_key);
    let owner_name = operator.as_ref().and_then(|op| op.account_by_key(&owner_key)).map(|r| r.name);
    let context = g.load_context()?;
    let my_key = imports::context_account(&context, &g.context)?;
    let route = if per_catalog { ImportRoute::Catalog } else { ImportRoute::Owner };
    let request = ImportRequest { owner_name, route, ..ImportRequest::new(catalog, &owner_key) };
    let mut managed = if external { None } else { managing(operator, &my_key) };
    let side = match managed.as_mut() {
        Some((operator, name)) => AccountSide::Managed { operator, account: name.as_str() },
        None if external => AccountSide::External,
        None => {
            let name = context.account_name.clone().unwrap_or_else(|| my_key.clone());
            let lines = match route {
                ImportRoute::Owner => accounts::nsc_owner_import_commands(&name, &my_key, &owner_key)?,
                ImportRoute::Catalog => accounts::nsc_import_commands(&name, &my_key, catalog, &owner_key)?,
            };
            for line in lines {
                outln!("{line}");
            }
            let once = if per_catalog { "" } else { " (once per owner: skip them if you import from it already)" };
            let flag = if per_catalog { " --per-catalog" } else { "" };
            bail!(
                "account {my_key} is not managed by this machine's operator: add the two imports above{once} with \
                 nsc (or in Synadia Cloud), then run `natster-mount catalog import {catalog} {owner_key}{flag} --external`"
            );
        }
    };
    let added = imports::add(&g.home, &g.context, side, std::slice::from_ref(&request)).await?;
    let import = &added.imports[0];
    match shown_name(g, &added.context, import) {
        name if name == catalog => outln!("imported catalog '{catalog}' from {label}"),
        name => outln!("imported catalog '{catalog}' from {label} as '{name}' (another catalog has that name)"),
    }
    match (added.applied, route) {
        (Applied::Pushed, ImportRoute::Owner) => {
            outln!("your account now imports from {label}: two imports for all of its catalogs")
        }
        (Applied::AtNextStart, _) => {
            eprintln!("note: the local server is not running; the import takes effect at `operator up`")
        }
        _ => {}
    }
    report_owner_answer(g, &added.context, import, &label, &my_key).await;
    crate::cli::network::imported(g, catalog, &owner_key).await;
    Ok(())
}

/// The name the context shows `import` under.
fn shown_name(g: &Globals, context: &Context, import: &ImportedCatalog) -> String {
    let own = crate::index::catalog_names(&g.home);
    let names = crate::context::shown_names(&own, &context.imports);
    context.imports.iter().position(|i| i == import).and_then(|i| names.get(i).cloned()).unwrap_or_default()
}

/// Asks the owner's server for the catalog once, and says what it answered: the import is
/// kept either way (the owner may share or come online later).
async fn report_owner_answer(g: &Globals, context: &Context, import: &ImportedCatalog, owner: &str, me: &str) {
    let catalog = import.catalog.as_str();
    let timeout = g.timeout.min(Duration::from_secs(2));
    let nats = match context.connect(timeout).await {
        Ok(n) => n,
        Err(e) => return eprintln!("note: cannot check the catalog now: {e:#}"),
    };
    let options = crate::client::ClientOptions { request_timeout: timeout, ..crate::cli::client_options(g) };
    let identity = std::sync::Arc::new(crate::identity::Identity::ephemeral());
    let pins = crate::identity::PinStore::in_memory();
    let answer = match crate::client::CatalogClient::for_import(nats, import, options, identity, pins) {
        Ok(client) => client.get().await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(summary) => outln!("the owner's server answered: {} files", summary.entries.len()),
        Err(ClientError::Refused { code: 403, .. }) => eprintln!(
            "note: the owner's server answered 403: not shared with you yet; ask the owner to run \
             `natster-mount catalog share {catalog} {me}`"
        ),
        Err(ClientError::Refused { code: 404, .. }) => {
            eprintln!(
                "note: the owner's server answered 404: it has no catalog '{catalog}'; check the name with the owner"
            )
        }
        // Across accounts nats-server 2.9 turns "no responders" into silence: both mean the same.
        Err(ClientError::NoResponders(_) | ClientError::Timeout(_)) => eprintln!(
            "note: no server answers for catalog '{catalog}' of {owner}: it is offline or has no catalog of that name \
             (or the imports are not in your account yet); the import is kept"
        ),
        Err(e) => eprintln!("note: the owner's server answered: {e}"),
    }
}

/// `catalog unimport NAME`: the account side first (server first; the owner's imports go
/// with its last catalog), then the context.
pub async fn catalog_unimport(g: &Globals, name: &str) -> Result<()> {
    let context = g.load_context()?;
    let own = crate::index::catalog_names(&g.home);
    let Some(owner) = context.find_import(&own, name).map(|i| i.owner.clone()) else {
        bail!(
            "context '{}' does not import a catalog '{name}'; `natster-mount catalog ls` lists its imports",
            g.context
        );
    };
    let my_key = imports::context_account(&context, &g.context)?;
    let operator = Operator::load(&operator_home(g)).ok();
    let label = label_in(operator.as_ref(), &owner);
    let mut managed = managing(operator, &my_key);
    let side = match managed.as_mut() {
        Some((operator, account)) => AccountSide::Managed { operator, account: account.as_str() },
        None => AccountSide::External,
    };
    let external = matches!(side, AccountSide::External);
    let removed = imports::remove(&g.home, &g.context, side, name)
        .await
        .map_err(|e| e.context("the import is kept; try again when the server runs"))?;
    let import = &removed.import;
    let last_of_owner = !removed.context.imports.iter().any(|i| i.owner == import.owner && i.route == import.route);
    if external && (import.route == ImportRoute::Catalog || last_of_owner) {
        let [service, stream] = match import.route {
            ImportRoute::Owner => accounts::owner_imports(&my_key, &import.owner)?,
            ImportRoute::Catalog => accounts::catalog_imports(&my_key, &import.catalog, &import.owner)?,
        };
        let account = context.account_name.clone().unwrap_or_else(|| my_key.clone());
        outln!(
            "remove the imports from account {account} with nsc (or in Synadia Cloud): `nsc delete import \
             --account {account} --subject '{}'` and the same for '{}'",
            service.subject,
            stream.subject
        );
    }
    if removed.applied == Applied::AtNextStart {
        eprintln!("note: the local server is not running; the removal takes effect at `operator up`");
    }
    outln!("catalog '{}' of {label} is no longer imported", import.catalog);
    if removed.applied == Applied::Pushed && import.route == ImportRoute::Owner {
        outln!("your account no longer imports from {label} (that was its last catalog you imported)");
    }
    Ok(())
}

pub async fn whoami(g: &Globals) -> Result<()> {
    let context = g.load_context()?;
    outln!("context:  {} ({})", g.context, g.home.context_path(&g.context).display());
    outln!("server:   {}", context.server_shown());
    match (&context.account_name, &context.account_public_key) {
        (Some(name), Some(key)) => outln!("account:  {name} {key}"),
        (None, Some(key)) => outln!("account:  {key}"),
        _ => outln!("account:  (none recorded; the server's default account)"),
    }
    outln!("creds:    {}", context.creds.as_ref().map(|c| c.display().to_string()).unwrap_or_else(|| "(none)".into()));
    let status = match context.connect(g.timeout.min(Duration::from_secs(3))).await {
        Ok(_) => "connected".to_string(),
        Err(e) => match e.downcast_ref::<crate::context::CredentialsRefused>() {
            Some(refused) => refused.to_string(),
            // The reason as the connection found it: a missing creds file, TLS, no server.
            None => format!("not connected: {e:#}"),
        },
    };
    outln!("status:   {status}");
    crate::cli::network::whoami_lines(g, &context).await;
    Ok(())
}

pub fn catalog_ls(g: &Globals) -> Result<()> {
    let context = g.load_context()?;
    // One operator load for every label (thousands of imports).
    let names: std::collections::HashMap<String, String> = Operator::load(&operator_home(g))
        .map(|op| op.accounts().into_iter().map(|r| (r.public_key, r.name)).collect())
        .unwrap_or_default();
    let label = |key: &str| match names.get(key) {
        Some(name) => format!("{key} ({name})"),
        None => key.to_string(),
    };
    outln!("shared by me:");
    let own = crate::index::catalog_names(&g.home);
    if own.is_empty() {
        outln!("  (no catalogs; create one with `natster-mount catalog new NAME DIR`)");
    }
    for catalog in &own {
        if let Some(serving) = ServeRecord::load_live(&g.home, catalog).filter(|r| r.allow_all) {
            outln!("  {catalog}: every importer (--allow-all, served by {})", serving.whereabouts());
            continue;
        }
        let list = ShareList::load(&g.home, catalog)?;
        if list.accounts.is_empty() {
            outln!("  {catalog}: only you");
        }
        for key in &list.accounts {
            outln!("  {catalog}: {}", label(key));
        }
    }
    outln!("imported (shared with me):");
    if context.imports.is_empty() {
        outln!("  (none; import one with `natster-mount catalog import NAME OWNER`)");
    }
    let shown = crate::context::shown_names(&own, &context.imports);
    for (import, name) in context.imports.iter().zip(&shown) {
        let per_catalog = if import.route == ImportRoute::Catalog { " (per-catalog import)" } else { "" };
        outln!("  {name} from {}{per_catalog}", label(&import.owner));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_or_another_kind_of_key_is_named_and_never_echoed() {
        let seed = nkeys::KeyPair::new_account().seed().unwrap();
        let err = format!("{:#}", resolve_in(None, &seed).unwrap_err());
        assert!(err.contains("secret seed") && !err.contains(&seed[2..]), "{err}");
        let user = nkeys::KeyPair::new_user().public_key();
        let err = format!("{:#}", resolve_in(None, &user).unwrap_err());
        assert!(err.contains("user public key"), "{err}");
        let account = nkeys::KeyPair::new_account().public_key();
        assert_eq!(resolve_in(None, &account).unwrap(), account);
        let err = format!("{:#}", resolve_in(None, "bob").unwrap_err());
        assert!(err.contains("'bob' is neither"), "{err}");
    }
}
