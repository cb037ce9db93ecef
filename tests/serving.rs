//! The catalog server in the network's normal weather: original Natster clients downloading
//! at once (queued, never refused below the bound), indexes written by the original (no
//! `mtime_ns`: verified once, then served), stopping within 2 s while nats-server is down,
//! serving again after nats-server restarts, and still known to its readers after a restart
//! of its own when they first met it while the home's key was being created.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::operator::*;
use common::*;
use futures::StreamExt;
use natster_mount::client::ClientError;
use natster_mount::context::Home;
use natster_mount::crypto::EphemeralKey;
use natster_mount::server::{CatalogServer, ServerOptions};
use serde_json::json;

const CATALOG: &str = "media";
const MIB: usize = 1024 * 1024;
/// Bound on the next v1 chunk arriving (a queued transfer waits for those ahead of it).
const CHUNK_WAIT: Duration = Duration::from_secs(30);
/// The promise is 2 s; the assertion leaves slack for a loaded machine.
const STOP_BOUND: Duration = Duration::from_secs(3);

/// Indexes `tree` as [`CATALOG`] through the CLI.
async fn index(home: &TestHome, tree: &Path) {
    home.run_async(["catalog", "new", CATALOG, tree.to_str().expect("utf-8 tree")]).await.assert_success("catalog new");
}

/// One v1 download exactly as the original Go client makes it, on its own connection:
/// subscribe to the hash's media subject, request with a fresh curve key, open each chunk with
/// the sender key from the header. Header names are spelled literally, as on the wire.
async fn original_v1_download(url: String, hash: String) -> Vec<u8> {
    let nats = connect(&url).await;
    let target = nkeys::XKey::new();
    let mut sub = nats.subscribe(format!("natster.media.{CATALOG}.{hash}")).await.expect("subscribe");
    nats.flush().await.expect("flush");
    let body = json!({"hash": hash, "transcode": false, "target_xkey": target.public_key()}).to_string();
    // The original client waits 1 s for this reply.
    let msg = tokio::time::timeout(
        Duration::from_secs(1),
        nats.request(format!("natster.catalog.{CATALOG}.download"), body.into()),
    )
    .await
    .expect("download acknowledged within the original client's 1 s")
    .expect("download request");
    let reply: serde_json::Value = serde_json::from_slice(&msg.payload).expect("JSON reply");
    assert_eq!(code(&reply), 200, "{reply}");
    let total = reply["data"]["total_chunks"].as_u64().expect("total_chunks");
    let sender_xkey = reply["data"]["sender_xkey"].as_str().expect("sender_xkey").to_string();
    receive_v1(&mut sub, &target, &sender_xkey, total, CHUNK_WAIT).await
}

/// A raw v1 `download` request of `hash`; the reply envelope.
async fn download_reply(nats: &async_nats::Client, hash: &str) -> serde_json::Value {
    let body = json!({"hash": hash, "transcode": false, "target_xkey": nkeys::XKey::new().public_key()});
    raw_request(nats, &format!("natster.catalog.{CATALOG}.download"), body.to_string()).await
}

/// v1 `download` is unsigned and names the key a file is sealed to, so a server answers it only
/// when asked to (`--v1`); otherwise an original client learns why, and what its owner can do,
/// in one line, and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_download_is_refused_unless_served_with_v1() {
    let server = NatsServer::start();
    let bytes = b"only for v2 readers".to_vec();
    let (home, _tree) = home_with_catalog(&server, &[("a.txt", bytes.clone())]).await;
    let _served = Served::start(&home, &server, CATALOG).await;
    let nats = connect(&server.url()).await;
    let mut media = nats.subscribe(format!("natster.media.{CATALOG}.>")).await.expect("subscribe");
    nats.flush().await.expect("flush");
    let reply = download_reply(&nats, &sha256_hex(&bytes)).await;
    assert_eq!(code(&reply), 403, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("catalog serve {CATALOG} --v1")) && !error.contains('\n'), "{reply}");
    // Absence of media can only be checked by waiting a bounded moment.
    let stray = tokio::time::timeout(Duration::from_millis(300), media.next()).await;
    assert!(stray.is_err(), "a chunk was published for a refused v1 download");
}

/// 1. Five original clients download 16 MiB files at once (more than the server streams at
/// once): every download is acknowledged within the original's 1 s and completes
/// byte-identical, the extra one by waiting its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_original_clients_download_at_once() {
    let server = NatsServer::start();
    let home = TestHome::new();
    home.init(&server.url()).await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    let files: Vec<Vec<u8>> = (0..5).map(|i| pseudo_random_bytes(500 + i, 16 * MIB + 17 * i as usize)).collect();
    for (i, bytes) in files.iter().enumerate() {
        write_file(tree.path(), &format!("/f{i}.bin"), bytes);
    }
    index(&home, tree.path()).await;
    let served = Served::start_with(&home, &server, CATALOG, &["--v1"]).await;

    let downloads: Vec<_> =
        files.iter().map(|bytes| tokio::spawn(original_v1_download(server.url(), sha256_hex(bytes)))).collect();
    for (i, download) in downloads.into_iter().enumerate() {
        let got = within("an original client's v1 download", download).await.expect("download task");
        assert!(got == files[i], "download {i} differs ({} vs {} bytes)", got.len(), files[i].len());
    }
    drop(served);
}

/// Serves `home`'s catalog in this process with `options`; stops when the sender drops.
fn serve_in_process(
    nats: async_nats::Client,
    home: Home,
    options: ServerOptions,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let server = CatalogServer::new(nats, home, CATALOG, options).expect("catalog server");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// Modification time of `path` in nanoseconds, as an index records it.
fn mtime_ns(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("stat");
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

/// 2. The v1 queue is bounded: with one transfer streaming and one waiting, the next download
/// is refused with 503 and a message that says what to do; the queued one was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_queue_refuses_only_past_its_bound() {
    let server = NatsServer::start();
    let home_dir = TestHome::new();
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    // A sparse 2 GiB file: its transfer streams for far longer than this test runs. Indexed
    // by hand (size and mtime, a made-up hash), so nothing hashes 2 GiB.
    let big = tree.path().join("big.bin");
    std::fs::File::create(&big).and_then(|f| f.set_len(2 << 30)).expect("sparse file");
    let hash = sha256_hex(b"stands for the sparse file");
    let catalog = json!({
        "name": CATALOG, "root_dir": tree.path().canonicalize().unwrap(), "description": "", "last_modified": 0,
        "entries": [{"path": "/big.bin", "description": "", "mime_type": "application/octet-stream",
                     "hash": hash, "byte_size": 2u64 << 30, "mtime_ns": mtime_ns(&big)}],
    });
    std::fs::write(home_dir.path().join(format!("{CATALOG}.json")), catalog.to_string()).expect("catalog file");
    let nats = connect(&server.url()).await;
    let options =
        ServerOptions { max_v1_transfers: 1, max_v1_waiting: 1, v1_readers: true, ..ServerOptions::default() };
    let (stop, task) = serve_in_process(nats.clone(), home_dir.home(), options);
    // Ready once it answers `get`.
    wait_for("in-process server", Duration::from_secs(10), || {
        let nats = nats.clone();
        async move {
            let reply = nats.request(format!("natster.catalog.{CATALOG}.get"), "".into()).await.ok()?;
            serde_json::from_slice::<serde_json::Value>(&reply.payload).ok().filter(|v| code(v) == 200)
        }
    })
    .await;

    let streaming = download_reply(&nats, &hash).await;
    assert_eq!(code(&streaming), 200, "{streaming}");
    let queued = download_reply(&nats, &hash).await;
    assert_eq!(code(&queued), 200, "a download within the queue bound was refused: {queued}");
    let refused = download_reply(&nats, &hash).await;
    assert_eq!(code(&refused), 503, "{refused}");
    let message = refused["error"].as_str().expect("error message");
    assert!(message.contains("waiting") && message.contains("try again"), "{message}");

    drop(stop);
    let stopped = tokio::time::timeout(STOP_BOUND, task).await.expect("server stops promptly");
    stopped.expect("server task").expect("server run");
}

/// Writes `files` into `tree` and an index of them in the original Natster's format (no
/// `mtime_ns`, the original's fields only) into `home`.
fn write_original_index(home: &Path, tree: &Path, files: &[(&str, Vec<u8>)]) {
    for (path, bytes) in files {
        write_file(tree, path, bytes);
    }
    let entries: Vec<_> = files
        .iter()
        .map(|(path, bytes)| {
            json!({"path": path, "description": "", "mime_type": "application/octet-stream",
                   "hash": sha256_hex(bytes), "byte_size": bytes.len()})
        })
        .collect();
    let catalog = json!({
        "name": CATALOG,
        "root_dir": tree.canonicalize().expect("tree").to_str().expect("utf-8"),
        "description": "written by the original",
        "last_modified": 1_700_000_000,
        "entries": entries,
    });
    std::fs::write(home.join(format!("{CATALOG}.json")), serde_json::to_vec_pretty(&catalog).unwrap()).unwrap();
}

/// 3. A catalog file in the original's format (no `mtime_ns`, no `tree`) is verified by hashing
/// once and then served through v1 (as an original client); a file that does not match its
/// hash, or is modified afterwards, is refused with 409. Its files have no chunk tree, so v2
/// readers are refused them with the reason (until the owner re-indexes), by the reader and by
/// the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_index_is_verified_once_then_served() {
    let server = NatsServer::start();
    let home = TestHome::new();
    home.init(&server.url()).await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    let files = vec![
        ("/film.bin", pseudo_random_bytes(71, 3 * MIB + 123)),
        ("/sub dir/notes.txt", b"original natster notes\n".to_vec()),
        ("/empty", Vec::new()),
        ("/later-changed.bin", pseudo_random_bytes(72, 300_000)),
    ];
    // Tampered before serving: same size, other bytes. Never served under the indexed hash.
    let tampered = ("/tampered.bin", pseudo_random_bytes(73, 5000));
    write_original_index(home.path(), tree.path(), &[files.clone(), vec![tampered.clone()]].concat());
    std::fs::write(tree.path().join("tampered.bin"), pseudo_random_bytes(74, 5000)).unwrap();

    // The index as the original wrote it, changes and all: no folder watch re-indexing it.
    let served = Served::start_with(&home, &server, CATALOG, &["--no-watch", "--v1"]).await;
    let nats = connect(&server.url()).await;
    let client = catalog_client(&nats, CATALOG);

    for (path, bytes) in &files {
        let hash = sha256_hex(bytes);
        match within("open", client.open(&hash, Some(bytes.len() as u64))).await {
            Err(e @ ClientError::NoTree(_)) => assert!(e.to_string().contains("re-index"), "{e}"),
            Err(e) => panic!("{path} of an original index: expected no tree, got {e}"),
            Ok(_) => panic!("{path} of an original index opened through v2 without a chunk tree"),
        }
        let body = json!({"hash": hash, "client_xkey": EphemeralKey::generate().public_xkey()}).to_string();
        let reply = raw_request(&nats, &format!("natster.catalog.{CATALOG}.open"), body).await;
        assert_eq!(code(&reply), 409, "{path}: {reply}");
        assert!(reply["error"].as_str().unwrap_or_default().contains("no chunk tree"), "{path}: {reply}");
        let via_v1 = within("v1 download", original_v1_download(server.url(), hash)).await;
        assert!(&via_v1 == bytes, "{path} differs through v1");
    }
    let tampered_hash = sha256_hex(&tampered.1);
    let reply = download_reply(&nats, &tampered_hash).await;
    assert_eq!(code(&reply), 409, "{reply}");
    assert!(reply["error"].as_str().unwrap_or_default().contains("changed"), "{reply}");

    // Modified after it was verified and served: refused from then on.
    let changed = tree.path().join("later-changed.bin");
    let later = std::fs::metadata(&changed).unwrap().modified().unwrap() + Duration::from_secs(5);
    std::fs::write(&changed, pseudo_random_bytes(75, 300_000)).unwrap();
    std::fs::File::options().write(true).open(&changed).and_then(|f| f.set_modified(later)).unwrap();
    let changed_hash = sha256_hex(&files[3].1);
    assert_eq!(code(&download_reply(&nats, &changed_hash).await), 409);
    // The others are still served.
    let film = sha256_hex(&files[0].1);
    let via_v1 = within("v1 download after a change", original_v1_download(server.url(), film)).await;
    assert!(via_v1 == files[0].1, "unchanged file still served");

    // One verification pass at start, and it says so.
    let log = served.log();
    assert_eq!(log.matches("verifying each file's sha256 once").count(), 1, "{log}");
    wait_for("the verification pass to finish", Duration::from_secs(20), || {
        let log = served.log();
        async move { log.contains("verification pass done").then_some(()) }
    })
    .await;
}

/// Sends `signal` to a child process.
fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on our own child, which is not reaped yet.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0, "kill({}, {signal})", child.id());
}

/// Waits (bounded) for `child` to exit after a stop signal; how long it took, and its status.
fn time_exit(child: &mut Child, since: Instant) -> (Duration, std::process::ExitStatus) {
    let until = since + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (since.elapsed(), status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running 15 s after the stop signal");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `catalog serve` child of `home`; killed on drop.
struct ServeChild {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl ServeChild {
    fn start(home: &TestHome) -> ServeChild {
        let log = tempfile::NamedTempFile::new().expect("log");
        let child = home
            .command(["catalog", "serve", CATALOG])
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("catalog serve");
        ServeChild { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- catalog serve log ---\n{}", tail(&self.log(), 30));
        }
    }
}

/// Polls `get` on `url` until the catalog answers.
async fn wait_answering(url: &str, what: &str) {
    let nats = connect(url).await;
    let client = catalog_client(&nats, CATALOG);
    wait_for(what, Duration::from_secs(20), || {
        let client = client.clone();
        async move { client.get().await.ok().map(|_| ()) }
    })
    .await;
}

/// 4. `catalog serve` survives a nats-server restart (answers again on the same process), and
/// with nats-server stopped it exits within 2 s of SIGTERM, and of SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_survives_restarts_and_stops_while_nats_is_down() {
    let home = TestHome::new();
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    write_file(tree.path(), "/a.bin", &pseudo_random_bytes(81, 100_000));
    let mut nats = NatsServer::start();
    home.init(&nats.url()).await;
    index(&home, tree.path()).await;

    for stop_signal in [libc::SIGTERM, libc::SIGINT] {
        let mut serve = ServeChild::start(&home);
        wait_answering(&nats.url(), "catalog serve").await;

        // nats-server restarts: the same serve process answers again once it is back.
        nats.restart();
        wait_answering(&nats.url(), "catalog serve after a nats-server restart").await;
        assert!(serve.child.try_wait().expect("wait").is_none(), "serve exited:\n{}", serve.log());

        // nats-server gone. The outage lasts a few heartbeats before the stop signal (a
        // duration of the scenario, not a synchronisation), so publishes have piled up.
        nats.stop();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let sent = Instant::now();
        signal(&serve.child, stop_signal);
        let (took, status) = time_exit(&mut serve.child, sent);
        assert!(took < STOP_BOUND, "signal {stop_signal}: catalog serve took {took:?} to stop:\n{}", serve.log());
        assert!(status.success(), "signal {stop_signal}: catalog serve exited with {status}:\n{}", serve.log());
        nats.restart();
    }
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie is as good as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// 5. `operator up` stops its nats-server and exits within 2 s of SIGTERM; with its
/// nats-server killed beforehand it still exits within 2 s (saying the server died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_up_stops_within_two_seconds() {
    let dir = operator_dir();
    operator_init(dir.path(), free_port());

    let mut up = OperatorUp::start(dir.path());
    let nats_pid = up.nats_server_pid();
    let sent = Instant::now();
    signal(&up.child, libc::SIGTERM);
    let (took, status) = time_exit(&mut up.child, sent);
    assert!(took < STOP_BOUND, "operator up took {took:?} to stop:\n{}", up.output());
    assert!(status.success(), "operator up exited with {status}:\n{}", up.output());
    assert!(!alive(nats_pid), "nats-server {nats_pid} still running after operator up stopped");
    assert!(up.output().contains("nats-server stopped"), "{}", up.output());

    // nats-server killed under it, then SIGTERM.
    let mut up = OperatorUp::start(dir.path());
    let nats_pid = up.nats_server_pid();
    // SAFETY: kill(2) on the nats-server operator up started for this test.
    unsafe { libc::kill(nats_pid as i32, libc::SIGKILL) };
    let sent = Instant::now();
    // It may already have noticed; a signal to an exited (unreaped) child is harmless.
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(up.child.id() as i32, libc::SIGTERM) };
    let (took, _status) = time_exit(&mut up.child, sent);
    assert!(took < STOP_BOUND, "operator up took {took:?} to stop after its nats-server died:\n{}", up.output());

    // operator up killed outright (no chance to clean up): its nats-server goes with it.
    let mut up = OperatorUp::start(dir.path());
    let nats_pid = up.nats_server_pid();
    let sent = Instant::now();
    signal(&up.child, libc::SIGKILL);
    let _ = time_exit(&mut up.child, sent);
    let until = Instant::now() + STOP_BOUND;
    while alive(nats_pid) {
        assert!(Instant::now() < until, "nats-server {nats_pid} outlived a killed operator up");
        std::thread::sleep(POLL);
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, as a re-index does.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The `data` of a whole-listing `get`.
async fn listing(nats: &async_nats::Client) -> serde_json::Value {
    let reply = raw_request(nats, &format!("natster.catalog.{CATALOG}.get"), "").await;
    assert_eq!(code(&reply), 200, "{reply}");
    reply["data"].clone()
}

/// 6. Housekeeping never holds up requests: while its catalog re-load is stuck (the catalog
/// file swapped for a FIFO that the test holds open, so the read blocks for as long as the
/// test likes), `get`, `open` and v1 `download` are answered from the current listing; once
/// the re-load completes, the new listing is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_while_a_reload_is_stuck() {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;

    let server = NatsServer::start();
    let home = TestHome::new();
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    let bytes = pseudo_random_bytes(61, 300_000);
    write_file(tree.path(), "/a.bin", &bytes);
    index(&home, tree.path()).await;
    let catalog_path = home.path().join(format!("{CATALOG}.json"));
    let mut reindexed: serde_json::Value = serde_json::from_slice(&std::fs::read(&catalog_path).unwrap()).unwrap();
    reindexed["description"] = json!("after the re-load");
    let reindexed = serde_json::to_vec(&reindexed).unwrap();

    let nats = connect(&server.url()).await;
    let options = ServerOptions { heartbeat: Duration::from_millis(50), v1_readers: true, ..ServerOptions::default() };
    let (stop, task) = serve_in_process(nats.clone(), home.home(), options);
    wait_for("in-process server", Duration::from_secs(10), || {
        let nats = nats.clone();
        async move {
            let reply = nats.request(format!("natster.catalog.{CATALOG}.get"), "".into()).await.ok()?;
            serde_json::from_slice::<serde_json::Value>(&reply.payload).ok().filter(|v| code(v) == 200)
        }
    })
    .await;

    // Swap a FIFO in; the next housekeeping tick sees a new file and starts reading it.
    let fifo = home.path().join("swap.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    std::fs::rename(&fifo, &catalog_path).expect("rename fifo");
    // A non-blocking open for writing succeeds only once a reader has the FIFO open: then the
    // re-load is blocked in read(2) for as long as we keep this writer open.
    let mut writer = wait_for("housekeeping to start reading the catalog", Duration::from_secs(10), || {
        let path = catalog_path.clone();
        async move { std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&path).ok() }
    })
    .await;

    let before = listing(&nats).await;
    assert_eq!(before["entries"].as_array().map(|e| e.len()), Some(1), "{before}");
    let client = catalog_client(&nats, CATALOG);
    let file = within("open while a re-load is stuck", client.open(&sha256_hex(&bytes), None))
        .await
        .expect("open while a re-load is stuck");
    assert_eq!(file.byte_size(), bytes.len() as u64);
    let reply = download_reply(&nats, &sha256_hex(&bytes)).await;
    assert_eq!(code(&reply), 200, "{reply}");

    // Let the re-load finish: the new listing is served.
    writer.write_all(&reindexed).expect("write into the fifo");
    drop(writer);
    wait_for("the re-loaded listing", Duration::from_secs(10), || {
        let nats = nats.clone();
        async move { (listing(&nats).await["description"] == json!("after the re-load")).then_some(()) }
    })
    .await;
    // A regular file again, so no later tick reads a FIFO.
    replace_file(&catalog_path, &reindexed);

    drop(stop);
    let stopped = tokio::time::timeout(STOP_BOUND, task).await.expect("server stops promptly");
    stopped.expect("server task").expect("server run");
}

/// A catalog server is a NATS micro service: `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` (what
/// `nats micro ls/info/stats` send) answer with its catalog, its endpoints, and per endpoint
/// the requests served and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_server_answers_the_micro_service_discovery_subjects() {
    let server = NatsServer::start();
    let (home, _tree) = home_with_catalog(&server, &[("a.txt", b"abc".to_vec())]).await;
    let _served = Served::start(&home, &server, CATALOG).await;
    let nats = connect(&server.url()).await;

    let ping = raw_request(&nats, "$SRV.PING.natster-catalog", "").await;
    assert_eq!(ping["name"], "natster-catalog", "{ping}");
    assert_eq!(ping["metadata"]["catalog"], CATALOG, "{ping}");
    let info = raw_request(&nats, "$SRV.INFO.natster-catalog", "").await;
    let endpoints: Vec<&str> =
        info["endpoints"].as_array().expect("endpoints").iter().filter_map(|e| e["name"].as_str()).collect();
    for name in ["get", "get-own", "download", "open", "read", "close"] {
        assert!(endpoints.contains(&name), "endpoint {name} in {endpoints:?}");
    }

    // Two listings and one malformed open, on the owner's own subjects.
    for _ in 0..2 {
        listing(&nats).await;
    }
    let bad = raw_request(&nats, &format!("natster.catalog.{CATALOG}.open"), "not json").await;
    assert_eq!(code(&bad), 400, "{bad}");
    let stats = raw_request(&nats, "$SRV.STATS.natster-catalog", "").await;
    let endpoint = |name: &str| {
        stats["endpoints"].as_array().expect("endpoints").iter().find(|e| e["name"] == name).cloned().expect(name)
    };
    assert!(endpoint("get-own")["num_requests"].as_u64() >= Some(2), "{stats}");
    assert_eq!(endpoint("open-own")["data"]["refused"], 1, "{stats}");
    assert_eq!(endpoint("get-own")["data"]["refused"], 0, "{stats}");
}

/// Runs `catalog contents` until it succeeds (bounded); fails at once if the reader refuses
/// the server's key, which only another server key pinned before makes it do.
async fn contents_until_answered(home: &TestHome, serve: &mut ServeChild, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = home.run_async(["catalog", "contents", CATALOG, "--timeout", "2"]).await;
        if out.status.success() {
            return;
        }
        assert!(!out.stderr.contains("answered before"), "{what}: its reader refuses its key: {}", out.stderr);
        assert!(serve.child.try_wait().expect("wait").is_none(), "{what} exited:\n{}", serve.log());
        assert!(Instant::now() < deadline, "{what} not listed within 20 s; last: {}", out.stderr);
        tokio::time::sleep(POLL).await;
    }
}

/// 7. A fresh home's first `catalog serve` and its first readers start at the same moment (a
/// script that polls `catalog contents` as soon as it starts the server, as bench.sh does; a
/// mount at login): all of them create the home's key at once, and must end up with the one
/// kept on disk. A server that signed with a key of its own that lost that race would be
/// pinned by its readers, and, restarted with the key on disk, refused by them for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_met_a_fresh_home_s_server_still_know_it_after_its_restart() {
    let nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("/a.bin", pseudo_random_bytes(83, 10_000))]).await;
    assert!(!home.path().join("identity.nk").exists(), "the home has a key before its first serve");
    let mut serve = ServeChild::start(&home);
    // Whether these are answered does not matter (the server may not be subscribed yet): each
    // loads the home's key, as the server does, at the same time.
    let readers: Vec<_> = (0..4).map(|_| home.run_async(["catalog", "contents", CATALOG, "--timeout", "2"])).collect();
    futures::future::join_all(readers).await;
    contents_until_answered(&home, &mut serve, "the first catalog serve").await;

    signal(&serve.child, libc::SIGTERM);
    let (_, status) = time_exit(&mut serve.child, Instant::now());
    assert!(status.success(), "catalog serve exited with {status}:\n{}", serve.log());
    let mut serve = ServeChild::start(&home);
    contents_until_answered(&home, &mut serve, "the restarted catalog serve").await;
}
