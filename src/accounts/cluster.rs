//! The local operator's deployment: one nats-server, or a cluster of N on loopback
//! (`operator up --cluster N`), and the ports each listens on, chosen once and kept in
//! `operator/local-server.json` so every context written earlier still points at them.
//!
//! A cluster is NATS' own: routes between every node, the full resolver on every node (an
//! account JWT pushed to one reaches all: each resolver answers the push, and a node that was
//! down catches up through the resolvers' sync), JetStream clustered (Raft, so streams of
//! replicas 3 keep their data and a leader with one node down), and a leaf node port on each
//! node for machines that join as leaf nodes (`operator up --leaf-of`).
//!
//! Invariants and tricky cases:
//! - Node 1 listens on the port chosen at `operator init` (4222 if free): a context made for
//!   one server keeps working when the deployment is a cluster.
//! - Cluster nodes have stable server names: JetStream's Raft knows a peer by its name, so a
//!   node restarted under another name would leave its streams one replica short.
//! - The size is chosen once; another `--cluster` is refused, since a JetStream store cannot
//!   move between standalone and clustered mode.
//! - A node that restarts after a crash starts from its config as it was ([`LocalCluster::restart_node`]):
//!   accounts added meanwhile reach it through resolver sync, as on any real cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{LocalServer, LocalServerOptions, Operator};

/// The cluster's name in every node's `cluster` block.
pub const CLUSTER_NAME: &str = "natster";
/// How often a full resolver compares its JWTs with another node's and fetches what it lacks.
/// Short, so a node back from an outage has the accounts added meanwhile within seconds.
pub const RESOLVER_SYNC_INTERVAL: &str = "5s";
/// Bound on a fresh cluster electing its JetStream meta leader.
pub const JETSTREAM_READY_TIMEOUT: Duration = Duration::from_secs(30);
const SETTINGS_FILE: &str = "local-server.json";

/// The ports of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePorts {
    /// Where clients connect.
    pub client: u16,
    /// Where the other nodes' routes connect.
    pub route: u16,
    /// Where leaf nodes connect.
    pub leaf: u16,
}

/// The local deployment as stored: node 1's client port (`port`, the only field of files
/// written before clusters) and, for a cluster, every node's ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDeployment {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodePorts>,
}

impl LocalDeployment {
    /// One server on `port`.
    pub fn single(port: u16) -> LocalDeployment {
        LocalDeployment { port, nodes: Vec::new() }
    }

    /// `size` nodes, node 1's clients on `port`, every other port free now.
    pub fn cluster(port: u16, size: usize) -> Result<LocalDeployment> {
        if size <= 1 {
            return Ok(Self::single(port));
        }
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let client = if i == 0 { port } else { super::stable_free_port()? };
            nodes.push(NodePorts { client, route: super::stable_free_port()?, leaf: super::stable_free_port()? });
        }
        Ok(LocalDeployment { port, nodes })
    }

    pub fn path(operator_dir: &Path) -> PathBuf {
        operator_dir.join(SETTINGS_FILE)
    }

    /// The stored deployment, if any (unreadable counts as none).
    pub fn load(operator_dir: &Path) -> Option<LocalDeployment> {
        let bytes = std::fs::read(Self::path(operator_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save(&self, operator_dir: &Path) -> Result<()> {
        crate::store::write_atomic(&Self::path(operator_dir), &serde_json::to_vec(self)?, 0o644)
    }

    /// How many nats-servers (and so full resolvers) it runs.
    pub fn size(&self) -> usize {
        self.nodes.len().max(1)
    }

    /// Every node's client URL, comma separated (what contexts hold: clients fail over).
    pub fn urls(&self) -> String {
        match self.nodes.is_empty() {
            true => node_url(self.port),
            false => self.nodes.iter().map(|n| node_url(n.client)).collect::<Vec<_>>().join(","),
        }
    }

    /// Every node's leaf node URL, comma separated (what `operator up --leaf-of` takes).
    pub fn leaf_urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats-leaf://127.0.0.1:{}", n.leaf)).collect::<Vec<_>>().join(",")
    }

    /// The `cluster` and `leafnodes` blocks of node `i` (empty for a single server).
    fn node_config(&self, i: usize) -> String {
        let Some(me) = self.nodes.get(i) else { return String::new() };
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("    \"nats-route://127.0.0.1:{}\"", n.route))
            .collect();
        format!(
            "cluster: {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{}\"\n  routes: [\n{}\n  ]\n}}\n\
             leafnodes: {{\n  listen: \"127.0.0.1:{}\"\n}}\n",
            me.route,
            routes.join("\n"),
            me.leaf
        )
    }

    /// The store folder of node `i`: `operator/server` for the first (as for one server),
    /// `operator/server-<n>` for the others.
    pub fn store_dir(operator_dir: &Path, i: usize) -> PathBuf {
        match i {
            0 => operator_dir.join("server"),
            i => operator_dir.join(format!("server-{}", i + 1)),
        }
    }
}

/// `nats://127.0.0.1:<port>`.
pub fn node_url(port: u16) -> String {
    format!("nats://127.0.0.1:{port}")
}

/// How to run a [`LocalCluster`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// The nats-server binary; default [`super::nats_server_binary`].
    pub binary: Option<PathBuf>,
    /// Run every node with `-DV`.
    pub trace: bool,
}

/// The nats-servers of a [`LocalDeployment`], as child processes (killed when dropped).
#[derive(Debug)]
pub struct LocalCluster {
    deployment: LocalDeployment,
    operator_dir: PathBuf,
    system_creds: PathBuf,
    names: Vec<String>,
    options: ClusterOptions,
    nodes: Vec<Option<LocalServer>>,
}

impl LocalCluster {
    /// Starts every node (regenerating their configs from the operator's JWTs) and waits,
    /// bounded, until each accepts connections and, for a cluster, JetStream has a leader.
    pub async fn start(
        operator: &Operator,
        deployment: LocalDeployment,
        options: ClusterOptions,
    ) -> Result<LocalCluster> {
        let key = operator.public_key();
        let names = (0..deployment.size())
            .map(|i| match deployment.nodes.is_empty() {
                true => None,
                false => Some(format!("natster-{}-n{}", key[1..9].to_ascii_lowercase(), i + 1)),
            })
            .map(|n| n.unwrap_or_default())
            .collect();
        let mut cluster = LocalCluster {
            deployment,
            operator_dir: operator.dir().to_path_buf(),
            system_creds: operator.system_creds(),
            names,
            options,
            nodes: Vec::new(),
        };
        let starts = (0..cluster.deployment.size()).map(|i| {
            let options = cluster.node_options(i, false);
            async move { LocalServer::start(operator, options).await }
        });
        let mut failed = None;
        for (i, started) in futures::future::join_all(starts).await.into_iter().enumerate() {
            match started {
                Ok(server) => cluster.nodes.push(Some(server)),
                Err(e) => {
                    cluster.nodes.push(None);
                    failed.get_or_insert(e.context(format!("nats-server node {} did not start", i + 1)));
                }
            }
        }
        if let Some(e) = failed {
            cluster.shutdown(Duration::from_millis(500)).await;
            return Err(e);
        }
        if cluster.deployment.size() > 1 {
            if let Err(e) = cluster.wait_jetstream(JETSTREAM_READY_TIMEOUT).await {
                cluster.shutdown(Duration::from_millis(500)).await;
                return Err(e);
            }
        }
        Ok(cluster)
    }

    fn node_options(&self, i: usize, keep_config: bool) -> LocalServerOptions {
        let mut options = LocalServerOptions::new(LocalDeployment::store_dir(&self.operator_dir, i));
        options.port = self.deployment.nodes.get(i).map(|n| n.client).unwrap_or(self.deployment.port);
        options.binary = self.options.binary.clone();
        options.trace = self.options.trace;
        options.server_name = self.names.get(i).filter(|n| !n.is_empty()).cloned();
        options.extra_config = self.deployment.node_config(i);
        options.keep_config = keep_config;
        options
    }

    /// Waits until some node knows a JetStream meta leader (asked as the system user).
    pub async fn wait_jetstream(&self, timeout: Duration) -> Result<()> {
        #[derive(Deserialize)]
        struct Jsz {
            data: Option<JszData>,
        }
        #[derive(Deserialize)]
        struct JszData {
            meta_cluster: Option<Meta>,
        }
        #[derive(Deserialize)]
        struct Meta {
            #[serde(default)]
            leader: String,
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no answer");
        loop {
            let url = self.urls();
            if let Ok(sys) = super::connect(&url, &self.system_creds, Duration::from_secs(2)).await {
                let asked = tokio::time::timeout(
                    Duration::from_secs(2),
                    sys.request("$SYS.REQ.SERVER.PING.JSZ", bytes::Bytes::new()),
                )
                .await;
                match asked {
                    Ok(Ok(reply)) => match serde_json::from_slice::<Jsz>(&reply.payload) {
                        Ok(Jsz { data: Some(JszData { meta_cluster: Some(m) }) }) if !m.leader.is_empty() => {
                            return Ok(())
                        }
                        _ => last = "no JetStream meta leader yet".into(),
                    },
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "timed out".into(),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the cluster's JetStream has no leader after {timeout:?} ({last}); see the nodes' logs in {}",
                    self.operator_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn deployment(&self) -> &LocalDeployment {
        &self.deployment
    }

    /// How many nodes it has (running or not).
    pub fn size(&self) -> usize {
        self.deployment.size()
    }

    /// Every node's client URL, comma separated.
    pub fn urls(&self) -> String {
        self.deployment.urls()
    }

    /// Node `i`'s client URL.
    pub fn node_url(&self, i: usize) -> String {
        node_url(self.deployment.nodes.get(i).map(|n| n.client).unwrap_or(self.deployment.port))
    }

    /// Node `i`'s server, while it runs.
    pub fn node(&self, i: usize) -> Option<&LocalServer> {
        self.nodes.get(i).and_then(Option::as_ref)
    }

    /// Kills node `i` (SIGKILL: a crash, no goodbye to its peers).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(server) = self.nodes.get_mut(i).and_then(Option::take) {
            server.stop();
        }
    }

    /// Starts node `i` again from the config it had (see the module's invariants).
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        if self.node(i).is_some() {
            return Ok(());
        }
        let options = self.node_options(i, true);
        if !options.store_dir.join("nats-server.conf").is_file() {
            bail!(
                "node {} has no config in {} to restart from; restart `operator up`",
                i + 1,
                options.store_dir.display()
            );
        }
        let server = LocalServer::start_with(options, |_, _, _| String::new())
            .await
            .with_context(|| format!("nats-server node {} did not restart", i + 1))?;
        if let Some(slot) = self.nodes.get_mut(i) {
            *slot = Some(server);
        }
        Ok(())
    }

    /// The first node that is not running (killed, or not restarted yet).
    pub fn missing(&self) -> Option<usize> {
        self.nodes.iter().position(Option::is_none)
    }

    /// The first node found to have exited, and how.
    pub fn try_exited(&mut self) -> Option<(usize, std::process::ExitStatus)> {
        self.nodes.iter_mut().enumerate().find_map(|(i, n)| n.as_mut().and_then(|s| s.try_exited()).map(|st| (i, st)))
    }

    /// The log of node `i`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        LocalDeployment::store_dir(&self.operator_dir, i).join("nats-server.log")
    }

    /// SIGTERM to every node, SIGKILL to those still running after `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let stops = self.nodes.into_iter().flatten().map(|s| s.shutdown(grace));
        futures::future::join_all(stops).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_routes_to_every_other_node_and_keeps_node_1_on_the_operator_port() {
        let d = LocalDeployment::cluster(14222, 3).expect("ports");
        assert_eq!(d.size(), 3);
        assert_eq!(d.nodes[0].client, 14222);
        assert_eq!(d.urls().split(',').count(), 3);
        assert!(d.urls().starts_with("nats://127.0.0.1:14222,"));
        let conf = d.node_config(1);
        assert!(conf.contains(&format!("listen: \"127.0.0.1:{}\"", d.nodes[1].route)), "{conf}");
        for (j, n) in d.nodes.iter().enumerate() {
            let route = format!("nats-route://127.0.0.1:{}", n.route);
            assert_eq!(conf.contains(&route), j != 1, "node 2 routes to the others only: {conf}");
        }
        assert!(conf.contains(&format!("127.0.0.1:{}", d.nodes[1].leaf)), "{conf}");
        let one = LocalDeployment::cluster(4222, 1).expect("one");
        assert_eq!((one.size(), one.urls(), one.node_config(0)), (1, "nats://127.0.0.1:4222".into(), String::new()));
        // Files written before clusters hold only the port.
        let old: LocalDeployment = serde_json::from_str(r#"{"port":4222}"#).expect("old file");
        assert_eq!(old, one);
        assert_eq!(serde_json::to_string(&one).expect("json"), r#"{"port":4222}"#);
    }
}
