//! Which catalogs a context can read (own and imported), and what each starts from: its index
//! for an own catalog, the listing an earlier mount saved for an import.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use super::MountOptions;
use crate::client::CatalogClient;
use crate::context::{Context, Home};
use crate::fs::{MountedCatalog, RemoteSource};
use crate::identity::{Identity, PinStore};
use crate::listing::Listing;

/// A catalog to mount, with the listing it starts from.
pub struct Gathered {
    pub catalog: MountedCatalog,
    /// Own catalogs: their index. Imports: the listing an earlier mount saved, if any.
    pub seed: Option<Listing>,
    /// Where this catalog's listing is saved for the next mount (imports only).
    pub saved_at: Option<PathBuf>,
}

impl Gathered {
    /// What this catalog was planned as (its folder, name and owner).
    pub fn planned(&self) -> Planned {
        let c = &self.catalog;
        Planned {
            dir_name: c.dir_name.clone(),
            name: c.name.clone(),
            owner: c.owner.clone(),
            own: self.saved_at.is_none(),
        }
    }
}

/// Where the last listing of catalog `name` of `owner` is kept between mounts.
fn saved_listing_path(home: &Home, owner: &str, name: &str) -> PathBuf {
    home.path().join("listings").join(owner).join(format!("{name}.json"))
}

/// A catalog this context can read, known from names alone (nothing loaded yet).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Planned {
    /// Its folder in the mount root.
    pub dir_name: String,
    pub name: String,
    /// The owner's account key ("self" for a context without one).
    pub owner: String,
    pub own: bool,
}

/// The catalogs this context can read: its own (every catalog file in the home) and its
/// imports, each under the name [`crate::context::shown_names`] gives it (a name already
/// taken becomes `<catalog>@<owner label>`; the first catalog of a name keeps it).
/// Reads only the home's file names: cheap enough to run at every change of the home.
pub fn plan_catalogs(home: &Home, context: &Context) -> Vec<Planned> {
    let own = crate::index::catalog_names(home);
    let shown = crate::context::shown_names(&own, &context.imports);
    let me = context.account_public_key.clone().unwrap_or_else(|| "self".into());
    let mut planned: Vec<Planned> = own
        .iter()
        .map(|name| Planned { dir_name: name.clone(), name: name.clone(), owner: me.clone(), own: true })
        .collect();
    for (import, dir_name) in context.imports.iter().zip(shown) {
        planned.push(Planned { dir_name, name: import.catalog.clone(), owner: import.owner.clone(), own: false });
    }
    planned
}

/// [`plan_catalogs`], gathered.
pub fn gather_catalogs(
    home: &Home,
    context: &Context,
    nats: &async_nats::Client,
    options: &MountOptions,
) -> Result<Vec<Gathered>> {
    gather(home, context, nats, options, plan_catalogs(home, context))
}

/// Loads what `planned` catalogs start from (own: their index; imports: the listing saved by
/// an earlier mount) and makes their sources. An own catalog whose index cannot be read is
/// skipped, with a warning. Blocking (reads files).
pub fn gather(
    home: &Home,
    context: &Context,
    nats: &async_nats::Client,
    options: &MountOptions,
    planned: Vec<Planned>,
) -> Result<Vec<Gathered>> {
    let v1_max = options.fs.cache_bytes as u64 / 2;
    let identity = Arc::new(Identity::load(home, context)?);
    let pins = PinStore::in_home(home);
    // Own catalogs are ours (our account, or the key pinned at first contact without
    // accounts); imports are their owner's.
    let source = |name: &str, owner: Option<&str>| -> Result<Arc<RemoteSource>> {
        let client = CatalogClient::for_owner(
            nats.clone(),
            name,
            owner,
            options.client.clone(),
            identity.clone(),
            pins.clone(),
        )?;
        Ok(Arc::new(RemoteSource::new(client, v1_max)))
    };
    let mut gathered = Vec::new();
    for p in planned {
        if p.own {
            let seed = match crate::index::load_listing(home, &p.name) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("skipping catalog {}: {e:#}", p.name);
                    continue;
                }
            };
            let mounted = MountedCatalog::new(
                p.dir_name,
                p.name.clone(),
                p.owner,
                source(&p.name, context.account_public_key.as_deref())?,
            );
            gathered.push(Gathered { catalog: mounted, seed: Some(seed), saved_at: None });
        } else {
            let saved_at = saved_listing_path(home, &p.owner, &p.name);
            let seed = match crate::listing::load(&saved_at) {
                Ok(seed) => seed,
                Err(e) => {
                    tracing::warn!(catalog = %p.dir_name, "ignoring the saved listing: {e:#}");
                    None
                }
            };
            let Some(import) = context.imports.iter().find(|i| i.catalog == p.name && i.owner == p.owner) else {
                continue;
            };
            let client = CatalogClient::for_import(
                nats.clone(),
                import,
                options.client.clone(),
                identity.clone(),
                pins.clone(),
            )?;
            let src: Arc<dyn crate::fs::ChunkSource> = Arc::new(RemoteSource::new(client, v1_max));
            let mounted = MountedCatalog::new(p.dir_name, p.name, p.owner, src);
            gathered.push(Gathered { catalog: mounted, seed, saved_at: Some(saved_at) });
        }
    }
    Ok(gathered)
}
