//! natster-mount on NATS' own clustering: a 3-node cluster on loopback (routes, a full
//! resolver on every node, JetStream clustered) with nodes killed and restarted under a read
//! through the mount and under the global service; an account added while a node is down;
//! a catalog served behind a leaf node; `operator up --cluster 3` itself; and `init` from
//! the NATS conventions (NATS_URL, NATS_CREDS, a `nats` CLI context).
//!
//! The cluster runs in-process ([`LocalCluster`], what `operator up --cluster` runs), so the
//! tests kill and restart nodes exactly when they mean to; everything else is the real CLI
//! (accounts, catalog servers, mounts). Guards kill every node and child on failure too.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mounted::{Mounted, MOUNT_IO_DEADLINE};
use common::operator::*;
use common::*;
use futures::StreamExt as _;
use natster_mount::accounts::{self, ClusterOptions, LocalCluster, LocalDeployment, Operator};
use natster_mount::context::Home;
use sha2::{Digest, Sha256};

const BIG: usize = 200 * 1024 * 1024;

/// A 3-node cluster of a fresh operator (chosen with `operator init --cluster 3`), and
/// optionally a global service (replicas 3) connected to every node.
struct World {
    servers: LocalCluster,
    op: PathBuf,
    _dir: tempfile::TempDir,
    global: Option<tokio::sync::watch::Sender<bool>>,
}

impl World {
    async fn start(global: bool) -> World {
        let dir = operator_dir();
        let op = dir.path().to_path_buf();
        let port = free_port().to_string();
        run_operator(&op, &["operator", "init", "--port", &port, "--cluster", "3"]).assert_success("operator init");
        let operator = Operator::load(&Home::at(&op)).expect("operator");
        let deployment = LocalDeployment::load(operator.dir()).expect("the deployment was stored");
        assert_eq!(deployment.size(), 3);
        let servers =
            LocalCluster::start(&operator, deployment, ClusterOptions::default()).await.expect("the cluster starts");
        let mut world = World { servers, op, _dir: dir, global: None };
        if global {
            let creds = operator.global_creds().expect("global creds");
            let nats = accounts::connect(&world.servers.urls(), &creds, Duration::from_secs(5)).await.expect("global");
            let (stop, mut rx) = tokio::sync::watch::channel(false);
            let options = natster_mount::global::GlobalOptions { replicas: 3, ..Default::default() };
            tokio::spawn(async move {
                let stopped = async move {
                    while !*rx.borrow() {
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                };
                if let Err(e) = natster_mount::global::run(nats, options, stopped).await {
                    eprintln!("global service stopped: {e}");
                }
            });
            world.global = Some(stop);
        }
        world
    }

    fn node_url(&self, i: usize) -> String {
        self.servers.node_url(i)
    }

    /// A JetStream context as a user of the global account.
    async fn global_js(&self) -> async_nats::jetstream::Context {
        let creds = self.op.join("operator/global/user.creds");
        let nats = accounts::connect(&self.servers.urls(), &creds, Duration::from_secs(5)).await.expect("connect");
        async_nats::jetstream::new(nats)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(stop) = &self.global {
            let _ = stop.send(true);
        }
        if std::thread::panicking() {
            for i in 0..self.servers.size() {
                let log = std::fs::read_to_string(self.servers.log_path(i)).unwrap_or_default();
                // Route retries to a killed node drown everything else.
                let log: Vec<&str> = log.lines().filter(|l| !l.contains("connect to route")).collect();
                eprintln!("--- node {} log (last lines) ---\n{}", i + 1, tail(&log.join("\n"), 25));
            }
        }
    }
}

/// Points `person`'s context at `server` (keeping creds and imports).
async fn pin(person: &Person, server: &str) {
    person.run(&["init", "--server", server]).await.assert_success("init --server");
}

/// A catalog `media` of `person` indexing `files`.
async fn catalog(person: &Person, files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    for (rel, bytes) in files {
        write_file(tree.path(), rel, bytes);
    }
    let root = tree.path().to_str().expect("utf-8").to_string();
    person.run(&["catalog", "new", "media", &root]).await.assert_success("catalog new");
    tree
}

/// `owner` shares `media` with `reader`, serves it, and `reader` imports it and sees it answer.
async fn share_serve_import(owner: &Person, reader: &Person) -> Serve {
    owner.run(&["catalog", "share", "media", &reader.key()]).await.assert_success("share");
    let serve = Serve::start(owner, "media");
    let own = owner.client("media").await;
    wait_for("the owner's catalog server", SERVE_READY_DEADLINE, || {
        let own = own.clone();
        async move { own.get().await.ok().map(|_| ()) }
    })
    .await;
    reader.run(&["catalog", "import", "media", &owner.key()]).await.assert_success("import");
    let theirs = reader.client("media").await;
    wait_for("the reader's view of the catalog", SERVE_READY_DEADLINE, || {
        let theirs = theirs.clone();
        async move { theirs.get().await.ok().map(|_| ()) }
    })
    .await;
    serve
}

/// Reads `path` whole on a thread in 1 MiB blocks; returns its sha256 and when each block
/// arrived.
fn spawn_reader(
    path: PathBuf,
    progress: Arc<AtomicU64>,
) -> std::sync::mpsc::Receiver<std::io::Result<(String, Vec<Instant>)>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let mut file = std::fs::File::open(&path)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut times = Vec::new();
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    return Ok((hex::encode(hasher.finalize()), times));
                }
                hasher.update(&buf[..n]);
                times.push(Instant::now());
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
        })();
        let _ = tx.send(result);
    });
    rx
}

fn wait_progress(progress: &AtomicU64, bytes: u64, m: &Mounted) {
    let until = Instant::now() + MOUNT_IO_DEADLINE;
    while progress.load(Ordering::Relaxed) < bytes {
        assert!(Instant::now() < until, "read made no progress past {bytes} bytes:\n{}", tail(&m.log(), 30));
        std::thread::sleep(POLL);
    }
}

/// The longest gap between two blocks (or `from` and the first block) in `[from, to)`.
fn stall(times: &[Instant], from: Instant, to: Option<Instant>) -> Duration {
    let mut last = from;
    let mut worst = Duration::ZERO;
    for t in times.iter().copied().filter(|t| *t >= from && to.is_none_or(|to| *t < to)) {
        worst = worst.max(t - last);
        last = t;
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_through_the_mount_survives_nodes_killed_and_restarted() {
    require_fuse!();
    let world = World::start(false).await;
    let mut world = world;
    let alice = Person::with_account(&world.op, "alice").await;
    let bob = Person::with_account(&world.op, "bob").await;
    assert_eq!(alice.context().server.split(',').count(), 3, "contexts get every node: {}", alice.context().server);
    // Alice's catalog server on node 1, bob's mount on node 3: each knows one URL and finds
    // the others from the cluster (INFO connect_urls), as a client given one seed does.
    pin(&alice, &world.node_url(0)).await;
    pin(&bob, &world.node_url(2)).await;
    let data = pseudo_random_bytes(61, BIG);
    let want = sha256_hex(&data);
    let _tree = catalog(&alice, &[("big.bin", &data)]).await;
    drop(data);
    let serve = share_serve_import(&alice, &bob).await;
    let m = Mounted::start(&bob.home, &["--cache-size", "32M", "--read-timeout", "20"]);

    let progress = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let reader = spawn_reader(m.path().join("media/big.bin"), progress.clone());
    wait_progress(&progress, 20 << 20, &m);
    world.servers.kill_node(1);
    let node2_killed = Instant::now();
    let at_kill2 = progress.load(Ordering::Relaxed);
    wait_progress(&progress, at_kill2 + (40 << 20), &m);
    world.servers.kill_node(0);
    let node1_killed = Instant::now();
    let at_kill1 = progress.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    world.servers.restart_node(0).await.expect("node 1 restarts");
    let (sum, times) = match reader.recv_timeout(MOUNT_IO_DEADLINE) {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => panic!("read through the mount failed: {e}\n{}", tail(&m.log(), 40)),
        Err(_) => panic!("read through the mount hung\n{}", tail(&m.log(), 40)),
    };
    assert_eq!(sum, want, "bytes read across node kills differ");
    assert!(at_kill1 < BIG as u64, "node 1 died mid-read ({} MiB read)", at_kill1 >> 20);
    assert!(alice_serving(&serve), "alice's catalog server rode out its node's death:\n{}", serve.log());
    let with_node2_down = stall(&times, node2_killed, Some(node1_killed));
    let with_node1_down = stall(&times, node1_killed, None);
    eprintln!(
        "200 MiB read in {:?}; node 2 killed at {} MiB: longest stall {with_node2_down:?}; node 1 (alice's server's) \
         killed at {} MiB and restarted 2 s later: longest stall {with_node1_down:?}",
        started.elapsed(),
        at_kill2 >> 20,
        at_kill1 >> 20
    );
    m.stop();
}

fn alice_serving(serve: &Serve) -> bool {
    alive(serve.pid())
}

/// Whether process `pid` runs (not exited, not a zombie).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string));
    matches!(state.as_deref(), Some(s) if s != "Z" && s != "X")
}

/// Index of the node whose server name is `name` (`…-n<i+1>`).
fn node_named(name: &str) -> usize {
    let n: usize = name.rsplit("-n").next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("node name {name}"));
    n - 1
}

/// Subjects of every event in the log.
async fn logged_subjects(js: &async_nats::jetstream::Context) -> Vec<String> {
    let stream = js.get_stream("NATSTER_EVENTS").await.expect("event log");
    // Right after a node died the stream may still be electing a leader, and JetStream's API
    // times out meanwhile (4 to 9 s): ask again, within a bound.
    let asked = std::time::Instant::now();
    let consumer = loop {
        match stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await {
            Ok(consumer) => break consumer,
            Err(e) if asked.elapsed() < Duration::from_secs(20) => {
                eprintln!("ordered consumer not made yet ({e}); asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("ordered consumer: {e}"),
        }
    };
    let total = stream.get_info().await.map(|i| i.state.messages).unwrap_or(0);
    let mut subjects = Vec::new();
    let mut messages = consumer.messages().await.expect("messages");
    while (subjects.len() as u64) < total {
        match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(m))) => subjects.push(m.subject.to_string()),
            _ => break,
        }
    }
    subjects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_service_answers_with_a_node_down_and_loses_no_event() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("natster_mount=debug"))
        .with_test_writer()
        .try_init();
    let mut world = World::start(true).await;
    let alice = Person::with_account(&world.op, "alice").await;
    let bob = Person::with_account(&world.op, "bob").await;
    let global = natster_mount::global::client::GlobalClient::new(alice.nats().await, Duration::from_secs(2));
    wait_for("the global service", Duration::from_secs(30), || async { global.stats().await.ok().map(|_| ()) }).await;
    let _tree = catalog(&alice, &[("a.txt", b"a")]).await;
    let shared = alice.run(&["catalog", "share", "media", &bob.key()]).await;
    shared.assert_success("share media");
    eprintln!("share: {}{}", shared.stdout, shared.stderr);
    let inbox_shows = |what: &'static str| {
        let bob = &bob;
        async move {
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                let out = bob.run(&["catalog", "inbox"]).await;
                if out.status.success() && out.stdout.contains(&format!("{what} from")) {
                    return out;
                }
                assert!(
                    Instant::now() < until,
                    "bob's inbox does not show {what}:\nstdout:\n{}\nstderr:\n{}",
                    out.stdout,
                    out.stderr
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    inbox_shows("media").await;

    let js = world.global_js().await;
    let info = js.get_stream("NATSTER_EVENTS").await.expect("log").get_info().await.expect("info");
    assert_eq!(info.config.num_replicas, 3, "the event log lives on 3 nodes");
    for bucket in ["KV_PROJ_ACCOUNT", "KV_PROJ_CATALOG"] {
        let b = js.get_stream(bucket).await.expect("bucket").get_info().await.expect("info");
        assert_eq!(b.config.num_replicas, 3, "{bucket} lives on 3 nodes");
    }
    let leader = info.cluster.and_then(|c| c.leader).expect("the log has a leader");
    let down = node_named(&leader);
    let before = info.state.messages;
    // The hardest node to lose: the one leading the log.
    world.servers.kill_node(down);
    let killed = Instant::now();

    // While it is down: a new catalog shared (an event appended through the election) and
    // the inbox answered.
    let tree2 = tempfile::tempdir().expect("tree");
    write_file(tree2.path(), "b.txt", b"b");
    alice.run(&["catalog", "new", "music", tree2.path().to_str().unwrap()]).await.assert_success("catalog new");
    let share = alice.run(&["catalog", "share", "music", &bob.key()]).await;
    share.assert_success("share music with a node down");
    eprintln!("share music: {}{}", share.stdout, share.stderr);
    assert!(!share.stderr.contains("unavailable"), "the event was logged, not kept for later:\n{}", share.stderr);
    inbox_shows("music").await;
    eprintln!(
        "with the log's leader (node {}) down, the share reached bob's inbox after {:?}",
        down + 1,
        killed.elapsed()
    );

    world.servers.restart_node(down).await.expect("restart");
    let subjects = logged_subjects(&js).await;
    assert!(subjects.len() as u64 > before, "the log grew: {subjects:?}");
    for catalog in ["media", "music"] {
        let shared = format!("{}.{}.{catalog}.catalog_shared", alice.key(), bob.key());
        assert_eq!(subjects.iter().filter(|s| s.ends_with(&shared)).count(), 1, "{catalog} logged once: {subjects:?}");
    }
    // The node that came back holds the log again (all three replicas current).
    wait_for("the restarted node to catch up on the log", Duration::from_secs(30), || async {
        let info = js.get_stream("NATSTER_EVENTS").await.ok()?.get_info().await.ok()?;
        let cluster = info.cluster?;
        (cluster.replicas.len() == 2 && cluster.replicas.iter().all(|r| r.current)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_added_while_a_node_is_down_reaches_it_and_can_be_imported_from() {
    let mut world = World::start(false).await;
    let bob = Person::with_account(&world.op, "bob").await;
    world.servers.kill_node(1);
    let carol = Person::new(&world.op);
    let out = carol.run(&["operator", "add-account", "carol"]).await;
    out.assert_success("add-account with node 2 down");
    assert!(out.stderr.contains("2 of 3 nats-servers took the JWT"), "the push counted the resolvers:\n{}", out.stderr);
    let added = Instant::now();
    let key = carol.key();
    world.servers.restart_node(1).await.expect("node 2 restarts");
    // Its config predates carol: only the resolvers' sync can bring her JWT to it.
    let config = std::fs::read_to_string(world.op.join("operator/server-2/nats-server.conf")).expect("config");
    assert!(!config.contains(&key), "node 2's preload has no carol");
    let stored = world.op.join(format!("operator/server-2/jwt/{key}.jwt"));
    wait_for("carol's JWT on node 2", Duration::from_secs(30), || async { stored.exists().then_some(()) }).await;
    eprintln!("carol's account reached node 2 {:?} after it was added (node down), by resolver sync", added.elapsed());

    pin(&carol, &world.node_url(1)).await;
    pin(&bob, &world.node_url(2)).await;
    let data = pseudo_random_bytes(71, 3 * 1024 * 1024 + 17);
    let _tree = catalog(&carol, &[("clip.bin", &data)]).await;
    let _serve = share_serve_import(&carol, &bob).await;
    let out = tempfile::tempdir().expect("out");
    let target = out.path().join("clip.bin");
    bob.run(&["catalog", "download", "media", "clip.bin", target.to_str().unwrap()])
        .await
        .assert_success("bob downloads carol's file");
    assert_eq!(std::fs::read(&target).expect("downloaded"), data);
}

/// `operator up --leaf-of …` in a person's own home (no operator there); stopped when dropped.
struct Leaf {
    child: Child,
    out: tempfile::NamedTempFile,
}

impl Leaf {
    fn start(person: &Person, args: &[&str]) -> Leaf {
        let out = tempfile::NamedTempFile::new().expect("log");
        let append = || std::fs::OpenOptions::new().append(true).open(out.path()).expect("log");
        let mut full = vec!["operator", "up"];
        full.extend_from_slice(args);
        let child = person.command(&full).stdout(append()).stderr(append()).spawn().expect("spawn leaf");
        let mut leaf = Leaf { child, out };
        let until = Instant::now() + UP_DEADLINE;
        while !leaf.output().contains("Ctrl-C to stop") {
            if let Ok(Some(status)) = leaf.child.try_wait() {
                panic!("operator up --leaf-of exited with {status}:\n{}", leaf.output());
            }
            assert!(Instant::now() < until, "leaf node not up:\n{}", leaf.output());
            std::thread::sleep(POLL);
        }
        leaf
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.out.path()).unwrap_or_default()
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        for pid in children_of(self.child.id()) {
            // SAFETY: kill(2) on the leaf's nats-server, which this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- leaf output ---\n{}", tail(&self.output(), 30));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_served_behind_a_leaf_node_reads_byte_identical_from_the_hub() {
    let world = World::start(false).await;
    let bob = Person::with_account(&world.op, "bob").await;
    let signed_up = Person::with_account(&world.op, "alice").await;
    // Alice's machine has no operator, only her creds, as if the hub's operator sent them.
    let alice = Person::new(tempfile::tempdir().expect("no operator").path());
    let creds = alice.home.path().join("alice.creds");
    std::fs::copy(signed_up.context().creds.expect("creds"), &creds).expect("copy creds");
    let leaf_port = free_port();
    let leaf_urls = world.servers.deployment().leaf_urls();
    let leaf = Leaf::start(
        &alice,
        &["--leaf-of", &leaf_urls, "--creds", creds.to_str().unwrap(), "--port", &leaf_port.to_string()],
    );
    assert!(leaf.output().contains("leaf node on"), "{}", leaf.output());
    assert!(!leaf.output().contains("warning"), "the leaf reached the hub:\n{}", leaf.output());
    let leaf_url = format!("nats://127.0.0.1:{leaf_port}");
    alice.run(&["init", "--server", &leaf_url, "--creds", creds.to_str().unwrap()]).await.assert_success("init");
    assert_eq!(alice.key(), signed_up.key());

    let data = pseudo_random_bytes(81, 5 * 1024 * 1024 + 3);
    let _tree = catalog(&alice, &[("films/clip.bin", &data)]).await;
    let _serve = share_serve_import(&alice, &bob).await;
    let out = tempfile::tempdir().expect("out");
    let target = out.path().join("clip.bin");
    bob.run(&["catalog", "download", "media", "films/clip.bin", target.to_str().unwrap()])
        .await
        .assert_success("bob downloads from behind the leaf");
    assert_eq!(std::fs::read(&target).expect("downloaded"), data, "byte-identical across the leaf node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_up_runs_a_cluster_and_restarts_a_node_that_dies() {
    let dir = operator_dir();
    let op = dir.path();
    operator_init(op, free_port());
    let mut args = vec!["--cluster", "3", "--no-hub"];
    if !nats_server_has_global() {
        args.push("--no-global");
    }
    let up = OperatorUp::start_with(op, &args);
    assert!(up.output().contains("cluster 'natster' of 3 nats-servers"), "{}", up.output());
    let nodes = children_of(up.child.id());
    assert_eq!(nodes.len(), 3, "three nats-servers: {nodes:?}");
    let alice = Person::with_account(op, "alice").await;
    let server = alice.context().server;
    assert_eq!(server.split(',').count(), 3, "{server}");
    if nats_server_has_global() {
        let creds = op.join("operator/global/user.creds");
        let nats = accounts::connect(&server, &creds, Duration::from_secs(5)).await.expect("connect");
        let js = async_nats::jetstream::new(nats);
        let info = js.get_stream("NATSTER_EVENTS").await.expect("log").get_info().await.expect("info");
        assert_eq!(info.config.num_replicas, 3);
    }
    // SAFETY: kill(2) on a nats-server this test started through operator up.
    unsafe { libc::kill(nodes[1] as i32, libc::SIGKILL) };
    let back = wait_for("operator up to restart the node", Duration::from_secs(20), || async {
        up.output().contains("is back on").then_some(())
    });
    back.await;
    alice.run(&["whoami"]).await.assert_success("whoami").stdout.contains("connected");
    // The size is chosen once.
    let again = run_operator(op, &["operator", "init", "--cluster", "1"]);
    again.assert_failure("another size");
    assert!(again.stderr.contains("3 nats-server(s), not 1"), "{}", again.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_takes_the_server_list_and_creds_from_nats_conventions() {
    let dir = operator_dir();
    let alice = Person::with_account(dir.path(), "alice").await;
    let creds = alice.context().creds.expect("creds");
    let key = alice.key();
    let urls = "nats://127.0.0.1:1,nats://127.0.0.1:2,nats://127.0.0.1:3";

    let env_home = TestHome::new();
    let out = run_with_timeout(
        {
            let mut c = env_home.command(["init"]);
            c.env("NATS_URL", urls).env("NATS_CREDS", &creds);
            c
        },
        COMMAND_TIMEOUT,
    );
    out.assert_success("init from NATS_URL and NATS_CREDS");
    let context = natster_mount::context::Context::load(&env_home.home(), "default").expect("context");
    assert_eq!((context.server.as_str(), context.account_public_key.as_deref()), (urls, Some(key.as_str())));

    let config = tempfile::tempdir().expect("config");
    let contexts = config.path().join("nats/context");
    std::fs::create_dir_all(&contexts).expect("dir");
    let json = serde_json::json!({"description": "hub", "url": urls, "creds": creds, "color_scheme": ""});
    std::fs::write(contexts.join("hub.json"), json.to_string()).expect("write");
    std::fs::write(contexts.join("tok.json"), r#"{"url":"nats://127.0.0.1:1","token":"s3cret"}"#).expect("write");
    let ctx_home = TestHome::new();
    let run = |args: &[&str]| {
        let mut c = ctx_home.command(args);
        c.env("XDG_CONFIG_HOME", config.path()).env_remove("NATS_URL").env_remove("NATS_CREDS");
        run_with_timeout(c, COMMAND_TIMEOUT)
    };
    run(&["init", "--nats-context", "hub"]).assert_success("init --nats-context");
    let context = natster_mount::context::Context::load(&ctx_home.home(), "default").expect("context");
    assert_eq!(context.server, urls);
    assert_eq!(context.account_public_key.as_deref(), Some(key.as_str()));
    let refused = run(&["init", "--nats-context", "tok"]);
    refused.assert_failure("a token context");
    assert_eq!(refused.stderr_lines().len(), 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("a token") && !refused.stderr.contains("s3cret"), "{}", refused.stderr);
    // Several --server flags are one list.
    let flags = run(&["init", "--server", "nats://127.0.0.1:1", "--server", "nats://127.0.0.1:2,nats://127.0.0.1:3"]);
    flags.assert_success("init --server --server");
    let context = natster_mount::context::Context::load(&ctx_home.home(), "default").expect("context");
    assert_eq!(context.server, urls);
    let missing = run(&["init"]);
    missing.assert_failure("no server anywhere");
    assert!(missing.stderr.contains("NATS_URL"), "{}", missing.stderr);
}
