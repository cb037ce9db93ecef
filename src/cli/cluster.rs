//! `operator up` beyond one server: watching a cluster's nodes (a node that dies is
//! restarted from its own config, as a service manager would, while the others carry on), and
//! `operator up --leaf-of URL`: a local leaf node joining a hub cluster with a creds file,
//! the way a home machine joins a shared NATS system (or Synadia Cloud).
//!
//! Invariants and tricky cases:
//! - One server alone that dies ends `operator up` with its log's path (nothing else can serve).
//! - A leaf node has no operator and no auth of its own: it listens on loopback only, and every
//!   local client acts on the hub as the user of the creds it was given (the NATS pattern for
//!   leaf nodes of a JWT system). Local clients still present their own creds, which the
//!   catalog server's signatures chain to; the leaf does not check them.
//! - A leaf runs no JetStream: the hub's answers JetStream calls (the global service's log).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::Globals;
use crate::accounts::{LocalCluster, LocalServer, LocalServerOptions};

/// Waits for `shutdown`; a cluster node that exits meanwhile is restarted after a second
/// (then with backoff while it keeps failing). Returns the node and status of a single
/// server that exited (which ends `operator up`), None on shutdown.
pub async fn supervise(
    servers: &mut LocalCluster,
    shutdown: impl Future<Output = ()>,
) -> Option<(usize, std::process::ExitStatus)> {
    tokio::pin!(shutdown);
    let mut delay = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = &mut shutdown => return None,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let node = match servers.try_exited() {
            Some((node, status)) if servers.size() == 1 => return Some((node, status)),
            Some((node, status)) => {
                servers.kill_node(node);
                eprintln!(
                    "warning: nats-server node {} exited ({status}); the others carry on, restarting it in {delay:?} \
                     (log {})",
                    node + 1,
                    servers.log_path(node).display()
                );
                node
            }
            // A node whose restart failed: tried again after the backoff.
            None => match servers.missing() {
                Some(node) => node,
                None => continue,
            },
        };
        tokio::select! {
            _ = &mut shutdown => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        match servers.restart_node(node).await {
            Ok(()) => {
                eprintln!("nats-server node {} is back on {}", node + 1, servers.node_url(node));
                delay = Duration::from_secs(1);
            }
            Err(e) => {
                eprintln!("warning: {e:#}; trying again");
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// `operator up --leaf-of URL`.
pub struct LeafArgs {
    /// The hub's leaf node URL(s), comma separated (`nats-leaf://host:7422`).
    pub hub: String,
    /// Creds of the hub account's user every local client acts as.
    pub creds: Option<std::path::PathBuf>,
    /// Loopback port local clients connect to.
    pub port: Option<u16>,
    pub trace: bool,
}

/// The leaf node's config: loopback clients, one remote to the hub bound with `creds`.
fn leaf_config(port: u16, name: &str, hub: &[String], creds: &Path) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let urls: Vec<String> = hub.iter().map(|u| quote(u)).collect();
    format!(
        "# Written by natster-mount (operator up --leaf-of); regenerated on every start.\n\
         listen: \"127.0.0.1:{port}\"\nserver_name: {}\n\
         leafnodes: {{\n  remotes: [\n    {{ urls: [{}], credentials: {} }}\n  ]\n}}\n",
        quote(name),
        urls.join(", "),
        quote(&creds.to_string_lossy())
    )
}

/// Hub URLs: `nats-leaf://` (or `tls://`) URLs as given; a `nats://` one is refused with the
/// hint that leaf nodes connect to the hub's leaf node port.
fn hub_urls(hub: &str) -> Result<Vec<String>> {
    let urls: Vec<String> = hub.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect();
    if urls.is_empty() {
        bail!("--leaf-of needs the hub's leaf node URL, e.g. nats-leaf://hub.example:7422");
    }
    for url in &urls {
        if !(url.starts_with("nats-leaf://") || url.starts_with("tls://") || url.starts_with("ws://")) {
            bail!(
                "--leaf-of {url}: a leaf node connects to the hub's leaf node port, written nats-leaf://HOST:PORT \
                 (`operator up --cluster N` prints its leaf node URLs)"
            );
        }
    }
    Ok(urls)
}

/// Runs a leaf node of the hub until Ctrl-C.
pub async fn leaf_up(g: &Globals, args: LeafArgs) -> Result<()> {
    let hub = hub_urls(&args.hub)?;
    let creds = match args.creds.or_else(|| g.load_context().ok().and_then(|c| c.creds)) {
        Some(c) => c,
        None => bail!(
            "--leaf-of needs the creds of a user of your account on the hub: give --creds FILE (or run `natster-mount \
             init --creds FILE` first)"
        ),
    };
    let creds = std::fs::canonicalize(&creds)
        .with_context(|| format!("creds file {} not found; give the path of your .creds file", creds.display()))?;
    let account = crate::accounts::creds_account(&creds)?;
    let port = match args.port {
        Some(p) => p,
        None => crate::accounts::preferred_or_stable_port(4222)?,
    };
    g.home.ensure()?;
    let mut options = LocalServerOptions::new(g.home.path().join("leaf"));
    options.port = port;
    options.trace = args.trace;
    options.binary = Some(super::network::checked_nats_server(false).await?);
    let server = LocalServer::start_with(options, |port, _, name| leaf_config(port, name, &hub, &creds)).await?;
    let joined = wait_joined(&server, Duration::from_secs(10)).await;
    // Installed before "Ctrl-C to stop": a signal from then on stops the leaf node cleanly.
    let shutdown = super::Shutdown::new()?;
    outln!("point your context at it: natster-mount init --server {} --creds {}", server.url(), creds.display());
    outln!(
        "leaf node on {} for account {account}, joining {}; log {}; Ctrl-C to stop",
        server.url(),
        hub.join(","),
        server.log_path().display()
    );
    if !joined {
        eprintln!(
            "warning: the leaf node has not reached the hub yet (it keeps trying); see {}",
            server.log_path().display()
        );
    }
    let mut server = server;
    let died = async {
        loop {
            if let Some(status) = server.try_exited() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = shutdown.signalled() => {}
        status = died => bail!("the leaf node exited unexpectedly ({status}); see its log {}", server.log_path().display()),
    }
    server.shutdown(Duration::from_millis(1500)).await;
    outln!("leaf node stopped");
    Ok(())
}

/// Whether the leaf's log says its connection to the hub is up, within `timeout`.
async fn wait_joined(server: &LocalServer, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
        if log.contains("Leafnode connection created") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_urls_want_the_leaf_port() {
        assert_eq!(hub_urls("nats-leaf://a:1, nats-leaf://b:2").unwrap(), vec!["nats-leaf://a:1", "nats-leaf://b:2"]);
        assert!(hub_urls("nats://a:4222").unwrap_err().to_string().contains("leaf node port"));
        assert!(hub_urls(" , ").is_err());
        let conf = leaf_config(4, "n", &["nats-leaf://a:1".into()], Path::new("/c/x.creds"));
        assert!(conf.contains(r#"urls: ["nats-leaf://a:1"], credentials: "/c/x.creds""#), "{conf}");
        assert!(!conf.contains("jetstream"));
    }
}
