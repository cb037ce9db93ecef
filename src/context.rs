//! Where natster-mount keeps its state (`$NATSTER_HOME`, default `~/.natster`) and the named
//! contexts in it: which NATS server to use, with which credentials, as which account.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

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

    /// Writes the context atomically, mode 0600.
    pub fn save(&self, home: &Home, name: &str) -> Result<PathBuf> {
        validate_context_name(name)?;
        home.ensure()?;
        let path = home.context_path(name);
        let mut tmp = tempfile::NamedTempFile::new_in(home.path())?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        set_mode(tmp.path(), 0o600)?;
        tmp.persist(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Connects to NATS with this context's server and credentials.
    pub async fn connect(&self, timeout: Duration) -> Result<async_nats::Client> {
        let options = self.connect_options(timeout).await?;
        let servers = self.server_list();
        let connect = async_nats::connect_with_options(servers.as_slice(), options);
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation => {
                Err(CredentialsRefused { server: self.server.clone() }.into())
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
            // grows to seconds): 0.1, 0.2, 0.4 … at most 2 s between attempts.
            .reconnect_delay_callback(|attempts| Duration::from_millis((100u64 << attempts.min(5)).min(2000)))
            // Chunks are published in bursts; a deep client buffer keeps bursts off the
            // slow-consumer path.
            .subscription_capacity(64 * 1024))
    }

    fn unreachable(&self) -> String {
        format!(
            "cannot connect to NATS at {}; check that the server runs and that the context's server and creds are right",
            self.server
        )
    }
}
