//! Where natster-mount keeps its state (`$NATSTER_HOME`, default `~/.natster`) and the named
//! contexts in it: which NATS server to use, with which credentials, as which account.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::protocol::Route;

/// The state folder.
#[derive(Debug, Clone)]
pub struct Home(PathBuf);

impl Home {
    /// `$NATSTER_HOME`, else `~/.natster`.
    pub fn from_env() -> Result<Home> {
        if let Some(h) = std::env::var_os("NATSTER_HOME").filter(|h| !h.is_empty()) {
            return Ok(Home(PathBuf::from(h)));
        }
        match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(home) => Ok(Home(PathBuf::from(home).join(".natster"))),
            None => {
                bail!("neither NATSTER_HOME nor HOME is set; set NATSTER_HOME to a folder for natster-mount's state")
            }
        }
    }

    pub fn at(path: impl Into<PathBuf>) -> Home {
        Home(path.into())
    }

    /// The local operator's own home, `$NATSTER_OPERATOR_HOME`, when one is set (else the
    /// operator lives in `$NATSTER_HOME`).
    pub fn operator_from_env() -> Option<Home> {
        std::env::var_os("NATSTER_OPERATOR_HOME").filter(|h| !h.is_empty()).map(|h| Home(PathBuf::from(h)))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Creates the folder (0700: it holds credentials) if missing.
    pub fn ensure(&self) -> Result<()> {
        if !self.0.is_dir() {
            fs::create_dir_all(&self.0).with_context(|| format!("cannot create {}", self.0.display()))?;
            set_mode(&self.0, 0o700)?;
        }
        Ok(())
    }

    pub fn context_path(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.context"))
    }
}

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions of {}", path.display()))
}

/// The server answered, but refused the context's credentials.
#[derive(Debug, thiserror::Error)]
#[error("the server at {server} refused these credentials (authorization violation); check --creds (`natster-mount init --server URL --creds FILE`)")]
pub struct CredentialsRefused {
    pub server: String,
}

/// A catalog this context has imported from another account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedCatalog {
    pub catalog: String,
    pub owner: String,
    /// Which imports of the account reach it. Contexts written before per-owner imports have
    /// no such field: theirs are the original's per-catalog imports.
    #[serde(default)]
    pub route: ImportRoute,
    /// The owner's account name, when the local operator knew it at import time: a label for
    /// telling two owners' catalogs of one name apart (`movies@alice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_name: Option<String>,
}

/// How an account's imports reach an imported catalog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportRoute {
    /// The original's two imports per catalog, on the local subjects `natster.catalog.<C>.>`
    /// and `natster.media.<C>.*`: one catalog of a name per account.
    #[default]
    Catalog,
    /// Two imports per owner (all of the owner's catalogs, each still gated by the owner's
    /// share list), on local subjects under `natster.from.<owner>`.
    Owner,
}

impl ImportedCatalog {
    /// An import through the owner's per-owner imports (what `catalog import` makes).
    pub fn via_owner(catalog: &str, owner: &str) -> Self {
        ImportedCatalog {
            catalog: catalog.to_string(),
            owner: owner.to_string(),
            route: ImportRoute::Owner,
            owner_name: None,
        }
    }

    /// An import through the original's per-catalog imports.
    pub fn per_catalog(catalog: &str, owner: &str) -> Self {
        ImportedCatalog { route: ImportRoute::Catalog, ..Self::via_owner(catalog, owner) }
    }

    /// The local subjects this import is read through.
    pub fn route(&self) -> Route {
        match self.route {
            ImportRoute::Catalog => Route::Direct,
            ImportRoute::Owner => Route::Owner(self.owner.clone()),
        }
    }

    /// The short label of the owner in a folder name: its account name if known, else the
    /// first 8 characters of its key.
    fn owner_label(&self) -> String {
        match self.owner_name.as_deref() {
            // A label shaped like an account key could pass for another owner's full key.
            Some(name) if crate::protocol::validate_catalog_name(name).is_ok() && name.len() != 56 => name.to_string(),
            _ => self.owner.chars().take(8).collect(),
        }
    }
}

/// The names a context shows its imports under, in the order of `imports` (mount folders,
/// `catalog ls`, and the NAME that `contents`, `download` and `unimport` take). An import keeps
/// its catalog's name unless one of `own` catalogs or an earlier import already uses it; then it
/// becomes `<catalog>@<owner label>` (the owner's account name, else the first 8 characters of
/// its key), then `<catalog>@<first 8 of the key>`, then `<catalog>@<owner key>`, whichever is
/// free first. So the first catalog of a name
/// keeps its name when a second one arrives, and no two names are ever the same: catalog
/// names hold no `@`, a label is never shaped like a key, and (catalog, owner) is unique.
pub fn shown_names(own: &[String], imports: &[ImportedCatalog]) -> Vec<String> {
    let mut taken: std::collections::HashSet<String> = own.iter().cloned().collect();
    let mut names = Vec::with_capacity(imports.len());
    for import in imports {
        let candidates = [
            import.catalog.clone(),
            format!("{}@{}", import.catalog, import.owner_label()),
            format!("{}@{}", import.catalog, import.owner.chars().take(8).collect::<String>()),
            format!("{}@{}", import.catalog, import.owner),
        ];
        let name = candidates.iter().find(|c| !taken.contains(*c)).unwrap_or(&candidates[3]).clone();
        taken.insert(name.clone());
        names.push(name);
    }
    names
}

/// One named context, stored as `$NATSTER_HOME/<name>.context` (JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Context {
    /// NATS server URL(s), comma separated.
    pub server: String,
    /// Path of the creds file (JWT + seed), if the server wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_name: Option<String>,
    #[serde(default)]
    pub imports: Vec<ImportedCatalog>,
}

pub const DEFAULT_CONTEXT: &str = "default";

pub fn validate_context_name(name: &str) -> Result<()> {
    crate::protocol::validate_catalog_name(name)
        .map_err(|e| anyhow::anyhow!("{}", e.replace("catalog name", "context name")))
}

impl Context {
    pub fn load(home: &Home, name: &str) -> Result<Context> {
        validate_context_name(name)?;
        let path = home.context_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no context '{name}' in {}; create it with `natster-mount init --server nats://HOST:PORT --context {name}`",
                home.path().display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a valid context; re-create it with `natster-mount init`", path.display())
        })
    }

    /// Writes the context atomically and durably, mode 0600.
    pub fn save(&self, home: &Home, name: &str) -> Result<PathBuf> {
        validate_context_name(name)?;
        home.ensure()?;
        let path = home.context_path(name);
        crate::store::write_atomic(&path, &serde_json::to_vec_pretty(self)?, 0o600)?;
        Ok(path)
    }

    /// The import shown as `name` next to the `own` catalogs (see [`shown_names`]), or written
    /// `<catalog>@<owner key>`. None for an own catalog or a name this context does not read.
    pub fn find_import(&self, own: &[String], name: &str) -> Option<&ImportedCatalog> {
        if own.iter().any(|o| o == name) {
            return None;
        }
        let shown = shown_names(own, &self.imports);
        if let Some(i) = shown.iter().position(|s| s == name) {
            return self.imports.get(i);
        }
        let (catalog, owner) = name.split_once('@')?;
        self.imports.iter().find(|i| i.catalog == catalog && i.owner == owner)
    }

    /// Connects to NATS with this context's server and credentials.
    pub async fn connect(&self, timeout: Duration) -> Result<async_nats::Client> {
        let options = self.connect_options(timeout).await?;
        let servers = self.server_list();
        let connect = async_nats::connect_with_options(servers.as_slice(), options);
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation => {
                Err(CredentialsRefused { server: self.server_shown() }.into())
            }
            Ok(Err(e)) => Err(anyhow::anyhow!("{e}")).with_context(|| self.unreachable()),
            Err(_) => Err(anyhow::anyhow!("timed out after {timeout:?}")).with_context(|| self.unreachable()),
        }
    }

    /// Like [`Context::connect`], but returns at once and connects in the background (then
    /// reconnects after any loss, with the same backoff), for daemons that must start while
    /// NATS is down. `events` sees every connection event. Fails only on unusable creds.
    pub async fn connect_in_background(
        &self,
        timeout: Duration,
        events: impl Fn(async_nats::Event) + Send + Sync + 'static,
    ) -> Result<async_nats::Client> {
        let events = std::sync::Arc::new(events);
        let options = self.connect_options(timeout).await?.retry_on_initial_connect().event_callback(move |event| {
            let events = events.clone();
            async move { events(event) }
        });
        let servers = self.server_list();
        async_nats::connect_with_options(servers.as_slice(), options)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| self.unreachable())
    }

    /// A comma-separated list is several servers to try (async-nats parses a string as one).
    fn server_list(&self) -> Vec<&str> {
        self.server.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
    }

    async fn connect_options(&self, timeout: Duration) -> Result<async_nats::ConnectOptions> {
        let options = match &self.creds {
            Some(creds) => {
                async_nats::ConnectOptions::with_credentials_file(creds.clone()).await.with_context(|| {
                    format!("cannot use creds file {}; check the path in your context", creds.display())
                })?
            }
            None => async_nats::ConnectOptions::new(),
        };
        Ok(options
            .name("natster-mount")
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            // Reconnect quickly after a server restart or a network blip (the default backoff
            // grows to seconds): at once, then 0.1, 0.2, 0.4 … at most 2 s between attempts.
            // async-nats asks this for the very first connection too (attempt 1): it must not
            // wait there, or every command pays for it.
            .reconnect_delay_callback(|attempts| match attempts {
                0 | 1 => Duration::ZERO,
                n => Duration::from_millis((100u64 << (n - 2).min(5)).min(2000)),
            })
            // Chunks are published in bursts; a deep client buffer keeps bursts off the
            // slow-consumer path.
            .subscription_capacity(64 * 1024))
    }

    fn unreachable(&self) -> String {
        format!(
            "cannot connect to NATS at {}; check that the server runs and that the context's server and creds are right",
            self.server_shown()
        )
    }

    /// The server list as shown to people and logs: any password or token in a URL
    /// (`nats://user:pass@host`) as `***`.
    pub fn server_shown(&self) -> String {
        redact_server_urls(&self.server)
    }
}

/// `server` (a comma-separated URL list) with the secret of every URL's user info replaced:
/// `user:pass@` → `user:***@`, `token@` → `***@`.
pub fn redact_server_urls(server: &str) -> String {
    let one = |url: &str| -> String {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (format!("{s}://"), r),
            None => (String::new(), url),
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
        let shown = match rest[..at].split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None => "***".to_string(),
        };
        format!("{scheme}{shown}{}", &rest[at..])
    };
    server.split(',').map(|u| one(u.trim())).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_in_server_urls_are_never_shown() {
        assert_eq!(redact_server_urls("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_server_urls("nats://u:s3cret@h:4222/x"), "nats://u:***@h:4222/x");
        assert_eq!(redact_server_urls("tok3n@h:4222, tls://a:b@[::1]:1"), "***@h:4222,tls://a:***@[::1]:1");
    }

    #[test]
    fn the_first_catalog_of_a_name_keeps_it_and_names_never_repeat() {
        let (a, b, c) = (
            nkeys::KeyPair::new_account().public_key(),
            nkeys::KeyPair::new_account().public_key(),
            nkeys::KeyPair::new_account().public_key(),
        );
        let named = |catalog: &str, owner: &str, name: Option<&str>| ImportedCatalog {
            owner_name: name.map(str::to_string),
            ..ImportedCatalog::via_owner(catalog, owner)
        };
        let imports = vec![
            named("movies", &a, Some("alice")),
            named("movies", &b, Some("bob")),
            named("music", &a, Some("alice")),
            // Same label twice (two operators' "carol"), and one without a name.
            named("movies", &c, Some("bob")),
            named("photos", &b, None),
            named("photos", &c, None),
        ];
        let names = shown_names(&["photos".to_string()], &imports);
        assert_eq!(
            names,
            vec![
                "movies".to_string(),
                "movies@bob".into(),
                "music".into(),
                format!("movies@{}", &c[..8]),
                format!("photos@{}", &b[..8]),
                format!("photos@{}", &c[..8]),
            ]
        );
        let context = Context { imports: imports.clone(), ..Context::default() };
        let own = ["photos".to_string()];
        assert_eq!(context.find_import(&own, "movies@bob"), Some(&imports[1]));
        assert_eq!(context.find_import(&own, &format!("movies@{c}")), Some(&imports[3]));
        assert_eq!(context.find_import(&own, "photos"), None, "own catalog");
        assert_eq!(context.find_import(&own, "nope"), None);
        // A key-shaped label falls back to owner8, so a full-key name stays unique.
        let sneaky = vec![named("m", &a, None), named("m", &b, Some(&a))];
        assert_eq!(shown_names(&[], &sneaky), vec!["m".to_string(), format!("m@{}", &b[..8])]);
    }

    #[test]
    fn contexts_without_a_route_read_per_catalog() {
        let json = r#"{"server":"nats://h:1","imports":[{"catalog":"c","owner":"AOWNER"}]}"#;
        let context: Context = serde_json::from_str(json).unwrap();
        assert_eq!(context.imports[0].route, ImportRoute::Catalog);
        assert_eq!(context.imports[0].route(), Route::Direct);
        let written = serde_json::to_string(&ImportedCatalog::via_owner("c", "AOWNER")).unwrap();
        assert_eq!(written, r#"{"catalog":"c","owner":"AOWNER","route":"owner"}"#);
    }
}
