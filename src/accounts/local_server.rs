//! A local `nats-server` in operator mode with a full resolver, run as a child process: its
//! configuration, start (bounded wait until it answers), log, and stop (SIGTERM, then SIGKILL).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::*;

/// How to run a [`LocalServer`].
#[derive(Debug, Clone)]
pub struct LocalServerOptions {
    /// Loopback port; 0 picks a free one.
    pub port: u16,
    /// Folder for the config, the log, the resolver's JWTs and JetStream.
    pub store_dir: PathBuf,
    /// The nats-server binary; default [`nats_server_binary`].
    pub binary: Option<PathBuf>,
    /// Run with `-DV` (debug and protocol trace).
    pub trace: bool,
    /// Log file; default `<store_dir>/nats-server.log`.
    pub log_file: Option<PathBuf>,
    /// Bound on the server becoming reachable.
    pub ready_timeout: Duration,
    /// A stable `server_name` (a cluster node's: JetStream's Raft knows a peer by it); default
    /// a fresh unique name per start.
    pub server_name: Option<String>,
    /// Configuration appended to the operator's (a `cluster` block, `leafnodes`).
    pub extra_config: String,
    /// Start from the config file already in the store folder, as a node restarting after a
    /// crash does: accounts added meanwhile reach it through its resolver's sync, not preload.
    pub keep_config: bool,
}

impl LocalServerOptions {
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        LocalServerOptions {
            port: 0,
            store_dir: store_dir.into(),
            binary: None,
            trace: false,
            log_file: None,
            ready_timeout: SERVER_READY_TIMEOUT,
            server_name: None,
            extra_config: String::new(),
            keep_config: false,
        }
    }
}

/// Where `scripts/setup.sh` installs a current nats-server when the system's is too old:
/// `${XDG_CACHE_HOME:-~/.cache}/natster-mount/bin/nats-server`.
pub fn cached_nats_server() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("natster-mount").join("bin").join("nats-server"))
}

/// The nats-server binary, the one place its lookup order is spelled: `$NATSTER_NATS_SERVER`
/// (or the older `$NATS_SERVER_BIN`), else the one `scripts/setup.sh` installed in the cache
/// ([`cached_nats_server`], present only when the system's was older than 2.10), else the
/// Debian package's path, else `nats-server` from `PATH`.
pub fn nats_server_binary() -> PathBuf {
    for var in ["NATSTER_NATS_SERVER", "NATS_SERVER_BIN"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return p.into();
        }
    }
    if let Some(cached) = cached_nats_server().filter(|p| p.exists()) {
        return cached;
    }
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "nats-server".into()
}

/// A nats-server release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32, pub u32, pub u32);

impl ServerVersion {
    /// The first `X.Y.Z` in `text` (`nats-server: v2.9.10`, or an INFO `version`).
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let start = text.find(|c: char| c.is_ascii_digit())?;
        let mut parts = text[start..].split(|c: char| !c.is_ascii_digit()).take(3).map(|p| p.parse().ok());
        Some(ServerVersion(parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What `binary --version` says (bounded: a binary that hangs is not a nats-server).
pub async fn nats_server_version(binary: &Path) -> Result<ServerVersion> {
    let run = tokio::process::Command::new(binary).arg("--version").kill_on_drop(true).output();
    let out = match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => bail!(
            "cannot run {}: {e}; run scripts/setup.sh (or install nats-server 2.10+) or set NATSTER_NATS_SERVER",
            binary.display()
        ),
        Err(_) => bail!("{} --version did not answer within 5 s; is it a nats-server?", binary.display()),
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    match ServerVersion::parse(&text) {
        Some(v) if text.contains("nats-server") => Ok(v),
        _ => {
            bail!("{} does not say it is a nats-server ({:?}); set NATSTER_NATS_SERVER", binary.display(), text.trim())
        }
    }
}

#[derive(Debug, Deserialize)]
struct ServerInfo {
    #[serde(default)]
    server_name: String,
}

/// Connects to `addr` and reads the server's first protocol line, `INFO {…}`.
async fn read_info(addr: SocketAddr) -> Option<ServerInfo> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut line = String::new();
    tokio::io::BufReader::new(stream).take(64 * 1024).read_line(&mut line).await.ok()?;
    serde_json::from_str(line.trim().strip_prefix("INFO")?.trim()).ok()
}

/// A `nats-server -c <config>` child process for an operator, on loopback. Killed and reaped
/// when dropped.
#[derive(Debug)]
pub struct LocalServer {
    child: Child,
    port: u16,
    name: String,
    config: PathBuf,
    log: PathBuf,
}

impl LocalServer {
    /// Writes the config into the store folder (regenerated from the operator's current
    /// JWTs unless [`LocalServerOptions::keep_config`]), starts nats-server and waits, bounded,
    /// until it accepts connections and its INFO carries the server name it was given.
    pub async fn start(operator: &Operator, options: LocalServerOptions) -> Result<LocalServer> {
        Self::start_with(options, |port, store, name| operator.server_config_named(port, store, name)).await
    }

    /// Like [`LocalServer::start`] with a config of the caller's (`config(port, store, name)`,
    /// to which [`LocalServerOptions::extra_config`] is appended): a leaf node without operator.
    pub async fn start_with(
        options: LocalServerOptions,
        config: impl FnOnce(u16, &Path, &str) -> String,
    ) -> Result<LocalServer> {
        let store = &options.store_dir;
        if store.to_str().is_none() {
            bail!("the store folder {} is not valid UTF-8; nats-server cannot be configured with it", store.display());
        }
        fs::create_dir_all(store).with_context(|| format!("cannot create {}", store.display()))?;
        set_mode(store, 0o700)?;
        let port = match options.port {
            0 => super::stable_free_port()?,
            p => p,
        };
        // A name of its own, checked in the server's INFO: readiness is never mistaken for
        // another server that happens to hold the port.
        let name =
            options.server_name.clone().unwrap_or_else(|| format!("natster-{port}-{:016x}", rand::random::<u64>()));
        let config_path = store.join("nats-server.conf");
        if !(options.keep_config && config_path.is_file()) {
            let mut text = config(port, store, &name);
            text.push_str(&options.extra_config);
            write_private(&config_path, text.as_bytes())?;
        }
        let config = config_path;
        let log = options.log_file.clone().unwrap_or_else(|| store.join("nats-server.log"));
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open log file {}", log.display()))?;
        let log_err = log_file.try_clone().with_context(|| format!("cannot open log file {}", log.display()))?;
        let binary = options.binary.clone().unwrap_or_else(nats_server_binary);
        let mut command = Command::new(&binary);
        command.arg("-c").arg(&config);
        if options.trace {
            command.arg("-DV");
        }
        command.stdin(Stdio::null()).stdout(Stdio::from(log_file)).stderr(Stdio::from(log_err));
        // If we die without stopping it (SIGKILL), the server goes too instead of holding the
        // port as an orphan. The signal follows the spawning *thread*: `start` runs on the
        // caller's task, never on the blocking pool, whose threads come and go.
        // SAFETY: prctl is async-signal-safe and only sets this child's death signal.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn().with_context(|| {
            format!("cannot run {}; run scripts/setup.sh or set NATSTER_NATS_SERVER", binary.display())
        })?;
        let mut server = LocalServer { child, port, name, config, log };
        server.wait_ready(options.ready_timeout).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                if self.log_tail(20).contains("address already in use") {
                    bail!(
                        "port {} is already in use by another program; stop it (or is `operator up` already running?) \
                         and try again",
                        self.port
                    );
                }
                bail!("nats-server exited ({status}) before accepting connections:\n{}", self.log_tail(20));
            }
            match tokio::time::timeout(Duration::from_millis(500), read_info(addr)).await {
                Ok(Some(info)) if info.server_name == self.name => return Ok(()),
                Ok(Some(info)) => {
                    bail!(
                        "another nats-server ({}) already answers on {addr}; stop it (is `operator up` already \
                         running?) and try again",
                        info.server_name
                    )
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                bail!("nats-server did not accept connections on {addr} within {timeout:?}:\n{}", self.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The unique `server_name` this server was configured with.
    pub fn server_name(&self) -> &str {
        &self.name
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the server log (empty if unreadable).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the server and waits for it to exit.
    pub fn stop(mut self) {
        self.kill();
    }

    /// The server's exit status if it has exited (does not wait).
    pub fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the server to stop (SIGTERM, so JetStream closes its files cleanly) and kills it
    /// if it is still running after `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        if self.try_exited().is_none() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) on our own, not yet reaped, child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + grace;
            while self.try_exited().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::ServerVersion;

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(ServerVersion::parse("nats-server: v2.9.10\n"), Some(ServerVersion(2, 9, 10)));
        assert_eq!(ServerVersion::parse("2.15.1-RC.2"), Some(ServerVersion(2, 15, 1)));
        assert_eq!(ServerVersion::parse("v2.11"), Some(ServerVersion(2, 11, 0)));
        assert_eq!(ServerVersion::parse("nothing"), None);
        assert!(ServerVersion(2, 9, 10) < ServerVersion(2, 10, 0));
        assert_eq!(ServerVersion(2, 15, 1).to_string(), "2.15.1");
    }
}
