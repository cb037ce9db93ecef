//! Where `init` takes its server list and creds from when `--server`/`--creds` are not given:
//! a `nats` CLI context (`--nats-context NAME`: `$XDG_CONFIG_HOME/nats/context/NAME.json`,
//! default `~/.config/nats/context/`, the CLI's own format), else the NATS conventions'
//! environment variables `NATS_URL` and `NATS_CREDS`.
//!
//! Invariants and tricky cases:
//! - Order: the flag, then the named `nats` context, then the environment.
//! - natster-mount authenticates with creds files (JWT) only: a context that logs in with a
//!   token, user/password, an nkey or `nsc://` lookup is refused with what to give instead,
//!   never half used.
//! - `~/` in the context's paths means `$HOME`, as the `nats` CLI reads it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// The fields of a `nats` CLI context natster-mount uses or must refuse (others are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct NatsCliContext {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub creds: String,
    #[serde(default)]
    pub nkey: String,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub nsc: String,
}

/// The folder of the `nats` CLI's contexts.
pub fn contexts_dir() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".config")))?;
    Some(config.join("nats").join("context"))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), home()) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(path),
    }
}

impl NatsCliContext {
    /// Reads context `name` from [`contexts_dir`].
    pub fn load(name: &str) -> Result<NatsCliContext> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("'{name}' is not a nats context name (`nats context ls` lists them)");
        }
        let Some(dir) = contexts_dir() else {
            bail!("neither XDG_CONFIG_HOME nor HOME is set, so there is no nats context folder; give --server and --creds")
        };
        Self::load_from(&dir.join(format!("{name}.json")), name)
    }

    fn load_from(path: &Path, name: &str) -> Result<NatsCliContext> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("no nats context '{name}' ({} is missing); `nats context ls` lists them", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let context: NatsCliContext = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a nats context (JSON with url, creds, …)", path.display()))?;
        let refuse = |how: &str| {
            anyhow::anyhow!(
                "nats context '{name}' logs in with {how}; natster-mount needs a creds file (JWT): give --creds FILE \
                 (its server list is still taken from the context)"
            )
        };
        if !context.creds.is_empty() {
            return Ok(context);
        }
        if !context.nsc.is_empty() {
            return Err(refuse("an nsc:// lookup"));
        }
        if !context.nkey.is_empty() {
            return Err(refuse("an nkey"));
        }
        if !context.token.is_empty() {
            return Err(refuse("a token"));
        }
        if !context.user.is_empty() {
            return Err(refuse("a user and password"));
        }
        Ok(context)
    }

    /// Its creds file (with `~/` expanded), if it names one.
    pub fn creds_path(&self) -> Option<PathBuf> {
        (!self.creds.is_empty()).then(|| expand_home(&self.creds))
    }
}

/// The server list and creds `init` writes: `--server`/`--creds`, else the named `nats`
/// context's, else `NATS_URL`/`NATS_CREDS`.
pub fn resolve(
    server: Option<&str>,
    creds: Option<&Path>,
    nats_context: Option<&str>,
) -> Result<(String, Option<PathBuf>)> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let (context_url, context_creds, refused) = match nats_context {
        Some(name) => match NatsCliContext::load(name) {
            Ok(c) => (Some(c.url.clone()).filter(|u| !u.is_empty()), c.creds_path(), None),
            // A refusal about its login still lends its server list when --creds is given.
            Err(e) if creds.is_some() => {
                let path = contexts_dir().map(|d| d.join(format!("{name}.json")));
                let raw = path.and_then(|p| std::fs::read(p).ok());
                let url = raw.and_then(|b| serde_json::from_slice::<NatsCliContext>(&b).ok()).map(|c| c.url);
                (url.filter(|u| !u.is_empty()), None, Some(e))
            }
            Err(e) => return Err(e),
        },
        None => (None, None, None),
    };
    let server = match server.map(str::to_string).or(context_url).or_else(|| env("NATS_URL")) {
        Some(s) => s,
        None => match refused {
            Some(e) => return Err(e),
            None => bail!(
                "which NATS server? give --server nats://HOST:PORT (several: a comma list), --nats-context NAME, or set NATS_URL"
            ),
        },
    };
    let creds = creds.map(Path::to_path_buf).or(context_creds).or_else(|| env("NATS_CREDS").map(|c| expand_home(&c)));
    Ok((server, creds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_with_other_logins_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let write = |name: &str, json: &str| {
            let path = dir.path().join(format!("{name}.json"));
            std::fs::write(&path, json).expect("write");
            path
        };
        let ok =
            write("ok", r#"{"description":"x","url":"nats://a:1,nats://b:2","creds":"/c/u.creds","color_scheme":""}"#);
        let c = NatsCliContext::load_from(&ok, "ok").expect("context");
        assert_eq!(c.url, "nats://a:1,nats://b:2");
        assert_eq!(c.creds_path(), Some(PathBuf::from("/c/u.creds")));
        let token = write("token", r#"{"url":"nats://a:1","token":"s3cret"}"#);
        let e = NatsCliContext::load_from(&token, "token").unwrap_err().to_string();
        assert!(e.contains("a token") && !e.contains("s3cret"), "{e}");
        let nkey = write("nkey", r#"{"url":"nats://a:1","nkey":"/k.nk"}"#);
        assert!(NatsCliContext::load_from(&nkey, "nkey").unwrap_err().to_string().contains("an nkey"));
        let plain = write("plain", r#"{"url":"nats://a:1"}"#);
        assert_eq!(NatsCliContext::load_from(&plain, "plain").expect("no auth").creds_path(), None);
        assert!(NatsCliContext::load_from(&dir.path().join("none.json"), "none").is_err());
        assert!(NatsCliContext::load("../x").is_err());
    }
}
