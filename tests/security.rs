//! Who may speak for a catalog: impostors (a second program answering on the catalog's
//! subjects with its own key, offline and racing), a man in the middle that swaps the reader's
//! key, and a v1 reader sending a low-order key. And what even the owner's key cannot make a
//! reader take: bytes other than the indexed ones, whether the file changed on disk without a
//! re-index (the server refuses) or a server holding the owner's identity lies (the reader's
//! per-chunk check refuses). Real nats-servers, real `catalog serve`, real FUSE mount; every
//! interaction with the mount bounded.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::mounted::{bounded, fuse_available_for, Mounted, MOUNT_IO_DEADLINE};
use common::*;
use futures::StreamExt;
use natster_mount::chunk_tree::{self, Tree};
use natster_mount::client::ClientError;
use natster_mount::context::Context;
use natster_mount::crypto::{self, EphemeralKey, SessionBinding, SessionKey};
use natster_mount::identity::{Identity, IdentityError, Purpose};
use natster_mount::index::Catalog;
use natster_mount::protocol::{self, Envelope, GetRequest, OpenRequest, OpenResponse, ReadRequest, ReadResponse};
use sha2::Digest as _;

const SIZE: usize = 3 * CHUNK + 5;

/// Writes a home whose catalog `media` claims `hash` for `forged` bytes: what an impostor
/// serving someone else's listing with other bytes would run.
async fn impostor_home(nats: &NatsServer, hash: &str, forged: &[u8]) -> (TestHome, tempfile::TempDir) {
    let home = TestHome::new();
    home.init(&nats.url()).await;
    let tree = tempfile::tempdir().expect("tree");
    write_file(tree.path(), "movie.bin", forged);
    let root = tree.path().to_str().expect("utf-8").to_string();
    home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("impostor catalog new");
    let index = home.path().join("media.json");
    let text = std::fs::read_to_string(&index).expect("impostor index");
    let forged_hash = sha256_hex(forged);
    std::fs::write(&index, text.replace(&forged_hash, hash)).expect("rewrite impostor index");
    // Its chunk tree goes with the hash it claims, so that it serves (its own root, not the owner's).
    let trees = home.path().join("trees");
    std::fs::rename(trees.join(format!("{forged_hash}.leaves")), trees.join(format!("{hash}.leaves")))
        .expect("move the impostor's tree file");
    (home, tree)
}

fn forged_bytes() -> Vec<u8> {
    b"!FORGED!".iter().copied().cycle().take(SIZE).collect()
}

/// The real catalog: a home serving `media` with one file.
async fn real_home(nats: &NatsServer) -> (TestHome, tempfile::TempDir, Vec<u8>) {
    let real = pseudo_random_bytes(77, SIZE);
    let (home, tree) = home_with_catalog(nats, &[("movie.bin", &real)]).await;
    (home, tree, real)
}

fn no_partials(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).expect("list").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a refused download left {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_never_gets_a_byte_through_the_mount_or_download() {
    if !fuse_available_for("an_impostor_never_gets_a_byte_through_the_mount_or_download") {
        return;
    }
    let nats = NatsServer::start();
    let (home, _tree, real) = real_home(&nats).await;
    let hash = sha256_hex(&real);
    let served = Served::start(&home, &nats, "media").await;
    // First contact with the real server: the mount pins its key.
    let m = Mounted::start(&home, &["--read-timeout", "3", "--cache-size", "4M"]);
    let path = m.path().join("media/movie.bin");
    let p = path.clone();
    let head = bounded("read of the real file", MOUNT_IO_DEADLINE, move || {
        std::fs::File::open(&p).and_then(|f| {
            let mut buf = vec![0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).map(|_| buf)
        })
    });
    assert_eq!(head.expect("real read"), &real[..4096]);
    drop(served);

    // The owner is offline; an impostor answers on the catalog's subjects with forged bytes.
    let forged = forged_bytes();
    let (fake_home, _fake_tree) = impostor_home(&nats, &hash, &forged).await;
    let impostor = Served::start(&fake_home, &nats, "media").await;
    let p = path.clone();
    let tail_read = bounded("read from the impostor", MOUNT_IO_DEADLINE, move || {
        std::fs::File::open(&p).and_then(|f| {
            let mut buf = vec![0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 2 * CHUNK as u64).map(|_| buf)
        })
    });
    let err = tail_read.expect_err("the mount returned bytes from an impostor");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(m.log().contains("answered with server key"), "the log names the failed check:\n{}", tail(&m.log(), 20));

    // `catalog download` refuses it too, and leaves nothing behind.
    let out_dir = tempfile::tempdir().expect("out");
    let out = home
        .run_async(["catalog", "download", "media", "/movie.bin", out_dir.path().join("x").to_str().unwrap()])
        .await;
    out.assert_failure("download from an impostor");
    assert!(out.stderr.contains("answered with server key"), "{}", out.stderr);
    assert_eq!(out.stderr_lines().len(), 1, "one line: {}", out.stderr);
    no_partials(out_dir.path());
    drop(impostor);
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_racing_the_owner_never_supplies_data() {
    let nats = NatsServer::start();
    let (home, _tree, real) = real_home(&nats).await;
    let hash = sha256_hex(&real);
    let _served = Served::start(&home, &nats, "media").await;
    let client = catalog_client(&connect(&nats.url()).await, "media");
    // First contact while only the owner answers pins its key.
    within("get", client.get()).await.expect("listing from the owner");
    let forged = forged_bytes();
    let (fake_home, _fake_tree) = impostor_home(&nats, &hash, &forged).await;
    let impostor = Served::start_with(&fake_home, &nats, "media", &["--force"]).await;
    // Its readiness check may have been answered by the owner: wait for its own word.
    wait_for("the impostor to serve", SERVE_READY_DEADLINE, || {
        let log = impostor.log();
        async move { log.contains("\"serving\"").then_some(()).or_else(|| log.contains(" serving").then_some(())) }
    })
    .await;
    // Both answer now (one queue group: requests alternate between them).
    let (mut good, mut refused) = (0, 0);
    for _ in 0..40 {
        match within("open and read", async { client.open(&hash, None).await?.read_range(0, SIZE).await }).await {
            Ok(bytes) => {
                assert!(bytes == real, "bytes that are not the owner's were returned as file data");
                good += 1;
            }
            Err(ClientError::Untrusted(_, IdentityError::PinMismatch { .. })) => refused += 1,
            // The owner's session, asked for by the impostor: it knows none (404), and the
            // read ends refused after its reopens. No data either way.
            Err(ClientError::Refused { code: 404, .. }) => refused += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(good > 0 && refused > 0, "both answered: {good} good, {refused} refused\n{}", impostor.log());
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Swap {
    /// Relay faithfully.
    Nothing,
    /// Replace the reader's xkey in `open` with our own, to learn the session key.
    Key,
    /// The same, and sign the request as a reader of our own.
    KeyAndSignature,
}

/// Relays between the reader's NATS (`front`) and the owner's (`back`), as a NATS server in
/// the path could.
async fn man_in_the_middle(
    front: async_nats::Client,
    back: async_nats::Client,
    swap: Swap,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut requests = front.subscribe("natster.catalog.media.*").await.expect("subscribe front");
    let (f, b) = (front.clone(), back.clone());
    tasks.push(tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply.clone() else { continue };
            let mut payload = msg.payload.to_vec();
            if swap != Swap::Nothing && msg.subject.ends_with(".open") {
                let mut req: serde_json::Value = serde_json::from_slice(&payload).expect("open request");
                let ours = nkeys::XKey::new().public_key();
                req["client_xkey"] = ours.clone().into();
                if swap == Swap::KeyAndSignature {
                    let hash = req["hash"].as_str().unwrap_or_default().to_string();
                    let parts: [&[u8]; 3] = [b"media", hash.as_bytes(), ours.as_bytes()];
                    let proof = Identity::ephemeral().prove(Purpose::Reader, &parts);
                    req["reader"] = serde_json::to_value(proof).expect("proof");
                }
                payload = serde_json::to_vec(&req).expect("json");
            }
            // Headers too: an inline read's reply is a record, named by them.
            if let Ok(answer) = b.request(msg.subject.to_string(), payload.into()).await {
                let headers = answer.headers.unwrap_or_default();
                let _ = f.publish_with_headers(reply, headers, answer.payload).await;
            }
        }
    }));
    let mut media = back.subscribe("natster.media.media.*").await.expect("subscribe back");
    tasks.push(tokio::spawn(async move {
        while let Some(msg) = media.next().await {
            let headers = msg.headers.clone().unwrap_or_default();
            let _ = front.publish_with_headers(msg.subject.to_string(), headers, msg.payload).await;
        }
    }));
    back.flush().await.expect("flush");
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_swapping_the_readers_key_is_refused() {
    let back = NatsServer::start();
    let front = NatsServer::start();
    let (home, _tree, real) = real_home(&back).await;
    let hash = sha256_hex(&real);
    let _served = Served::start(&home, &back, "media").await;
    let (front_client, back_client) = (connect(&front.url()).await, connect(&back.url()).await);

    // A faithful relay works: the session key is agreed end to end through it.
    let relay = man_in_the_middle(front_client.clone(), back_client.clone(), Swap::Nothing).await;
    let client = catalog_client(&front_client, "media");
    let file = within("open through the relay", client.open(&hash, None)).await.expect("open through a relay");
    assert_eq!(within("read", file.read_range(0, SIZE)).await.expect("read"), real);
    relay.iter().for_each(|t| t.abort());

    // A relay that swaps the reader's xkey for its own: the server sees that the reader's
    // signature does not cover that key (403)...
    let mitm = man_in_the_middle(front_client.clone(), back_client.clone(), Swap::Key).await;
    let err = within("open through the mitm", client.open(&hash, None)).await.err().expect("mitm session accepted");
    assert!(matches!(err, ClientError::Refused { code: 403, .. }), "expected the server to refuse, got: {err}");
    mitm.iter().for_each(|t| t.abort());
    // ...and one that also signs as a reader of its own gets a session signed for its key,
    // which the reader refuses.
    let _mitm = man_in_the_middle(front_client.clone(), back_client, Swap::KeyAndSignature).await;
    let err = within("open through the mitm", client.open(&hash, None)).await.err().expect("mitm session accepted");
    assert!(
        matches!(err, ClientError::Untrusted(_, IdentityError::BadSignature(_))),
        "expected a signature failure, got: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_refuses_low_order_target_keys_and_publishes_nothing() {
    let nats = NatsServer::start();
    let (home, _tree, real) = real_home(&nats).await;
    let hash = sha256_hex(&real);
    let _served = Served::start_with(&home, &nats, "media", &["--v1"]).await;
    let raw = connect(&nats.url()).await;
    let mut media = raw.subscribe("natster.media.media.>").await.expect("subscribe");
    raw.flush().await.expect("flush");
    let mut one = [0u8; 32];
    one[0] = 1;
    for point in [[0u8; 32], one] {
        let key = natster_mount::crypto::xkey_from_raw_public(point);
        let reply = raw_request(
            &raw,
            "natster.catalog.media.download",
            format!(r#"{{"hash":"{hash}","transcode":false,"target_xkey":"{key}"}}"#),
        )
        .await;
        assert_eq!(code(&reply), 400, "{reply}");
        assert!(reply["error"].as_str().unwrap_or_default().contains("low-order"), "{reply}");
    }
    // Absence of chunks can only be checked by waiting a bounded moment.
    let stray = tokio::time::timeout(Duration::from_millis(500), media.next()).await;
    assert!(stray.is_err(), "a chunk was published for a low-order key");
}

/// `pread` of `len` bytes at `offset` of `path` through the mount, bounded.
fn pread(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    bounded("a read through the mount", MOUNT_IO_DEADLINE, move || {
        std::fs::File::open(&p).and_then(|f| {
            let mut buf = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset).map(|_| buf)
        })
    })
}

const CHUNK: usize = natster_mount::server::DEFAULT_CHUNK_SIZE as usize; // `catalog serve`'s default

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_without_reindex_is_never_served_on_a_ranged_read() {
    if !fuse_available_for("a_file_changed_without_reindex_is_never_served_on_a_ranged_read") {
        return;
    }
    let nats = NatsServer::start();
    let (home, tree, real) = real_home(&nats).await;
    // Without the folder watch: it would re-index the change away, and this is about a change
    // the index has not seen.
    let served = Served::start_with(&home, &nats, "media", &["--no-watch"]).await;
    // Other bytes from chunk 2 on, same size, the old mtime put back: size and mtime cannot
    // tell, only the chunk's leaves against the indexed tree.
    let file = tree.path().join("movie.bin");
    let before = std::fs::metadata(&file).expect("stat");
    let mut changed = real.clone();
    changed[2 * CHUNK..].iter_mut().for_each(|b| *b = !*b);
    std::fs::write(&file, &changed).expect("change the file");
    std::fs::File::options().write(true).open(&file).and_then(|f| f.set_modified(before.modified()?)).expect("mtime");
    let after = std::fs::metadata(&file).expect("stat");
    assert_eq!((after.len(), after.modified().ok()), (before.len(), before.modified().ok()));

    let m = Mounted::start(&home, &["--read-timeout", "3", "--cache-size", "4M"]);
    let path = m.path().join("media/movie.bin");
    let err = pread(&path, 2 * CHUNK as u64, 4096).expect_err("a changed chunk was returned");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        served.log().contains("file changed on disk since it was indexed"),
        "the server names its check:\n{}",
        tail(&served.log(), 20)
    );
    assert!(m.log().contains("changed since it was indexed"), "the mount logs the refusal:\n{}", tail(&m.log(), 20));
    // The file stays refused, also for `catalog download`.
    let out_dir = tempfile::tempdir().expect("out");
    let out = home
        .run_async(["catalog", "download", "media", "/movie.bin", out_dir.path().join("x").to_str().unwrap()])
        .await;
    out.assert_failure("download of a changed file");
    assert!(out.stderr.contains("changed since it was indexed"), "{}", out.stderr);
    no_partials(out_dir.path());
    m.stop();
}

/// A catalog server that holds the owner's identity and serves the owner's own signed
/// listing, but other bytes, each chunk with a proof that is right for those bytes: what a
/// compromised owner's server could do. Nothing but the reader's per-chunk check against the
/// listing's tree root stands between it and the reader. Stops when dropped.
struct Liar {
    task: tokio::task::JoinHandle<()>,
    chunks_sent: Arc<AtomicUsize>,
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Liar {
    async fn start(nats: &NatsServer, owner: &TestHome, forged: Vec<u8>) -> Liar {
        let home = owner.home();
        let context = Context::load(&home, "default").expect("owner context");
        let identity = Identity::load(&home, &context).expect("the owner's identity");
        let listing = serde_json::to_vec(&Catalog::load(&home, "media").expect("owner index").summary()).unwrap();
        let tree = Tree::of(&forged);
        let client = connect(&nats.url()).await;
        let mut requests = client.subscribe("natster.catalog.media.*").await.expect("subscribe");
        client.flush().await.expect("flush");
        let chunks_sent = Arc::new(AtomicUsize::new(0));
        let sent = chunks_sent.clone();
        let task = tokio::spawn(async move {
            let mut sessions: HashMap<String, SessionKey> = HashMap::new();
            let sign = |purpose, parts: &[&[u8]], data: &[u8]| {
                let digest: [u8; 32] = sha2::Sha256::digest(data).into();
                let mut all: Vec<&[u8]> = vec![b"media"];
                all.extend_from_slice(parts);
                all.push(&digest);
                protocol::signed_ok(data, &identity.prove(purpose, &all))
            };
            while let Some(msg) = requests.next().await {
                let Some(reply) = msg.reply.clone() else { continue };
                let body = match msg.subject.rsplit('.').next().unwrap_or_default() {
                    "get" => {
                        let req: GetRequest = serde_json::from_slice(&msg.payload).unwrap_or_default();
                        sign(Purpose::Listing, &[req.nonce.unwrap_or_default().as_bytes()], &listing)
                    }
                    "open" => {
                        let req: OpenRequest = serde_json::from_slice(&msg.payload).expect("open request");
                        let (session, ours) = (crypto::new_session_id(), EphemeralKey::generate());
                        let binding = SessionBinding {
                            session: &session,
                            catalog: "media",
                            hash: &req.hash,
                            client_xkey: &req.client_xkey,
                            server_xkey: ours.public_xkey(),
                        };
                        sessions.insert(session.clone(), ours.agree(&req.client_xkey, &binding).expect("agree"));
                        let data = serde_json::to_vec(&OpenResponse {
                            session,
                            server_xkey: ours.public_xkey().to_string(),
                            byte_size: forged.len() as u64,
                            chunk_size: CHUNK as u32,
                            max_unit: None,
                        })
                        .unwrap();
                        sign(Purpose::Session, &[req.hash.as_bytes(), req.client_xkey.as_bytes()], &data)
                    }
                    "read" => {
                        let req: ReadRequest = serde_json::from_slice(&msg.payload).expect("read request");
                        // A session of the owner's server: unknown here, as to any restarted server.
                        let Some(key) = sessions.get(&req.session) else {
                            let gone = protocol::error_reply(404, "unknown or expired session; open the file again");
                            let _ = client.publish(reply, gone.into()).await;
                            continue;
                        };
                        let total = protocol::chunk_count(forged.len() as u64, CHUNK as u64);
                        let end = (req.first_chunk + u64::from(req.count)).min(total);
                        let ack = ReadResponse { first_chunk: req.first_chunk, count: (end - req.first_chunk) as u32 };
                        let _ = client.publish(reply, Envelope::ok(ack).into()).await;
                        for index in req.first_chunk..end {
                            let (first_leaf, leaves) =
                                chunk_tree::chunk_leaves(forged.len() as u64, CHUNK as u64, index);
                            let mut buf = vec![0u8; crypto::NONCE_LEN];
                            chunk_tree::frame(&mut buf, &tree.prove(first_leaf, leaves).unwrap()).unwrap();
                            let start = index as usize * CHUNK;
                            buf.extend_from_slice(&forged[start..(start + CHUNK).min(forged.len())]);
                            key.seal_in_place(index, &mut buf);
                            let mut headers = async_nats::HeaderMap::new();
                            headers.insert(protocol::HEADER_CHUNK_INDEX, index.to_string().as_str());
                            let subject = format!("natster.media.media.{}", req.session);
                            let _ = client.publish_with_headers(subject, headers, buf.into()).await;
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    _ => Envelope::ok(()),
                };
                let _ = client.publish(reply, body.into()).await;
            }
        });
        Liar { task, chunks_sent }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_the_owners_identity_serving_other_bytes_is_caught_chunk_by_chunk() {
    if !fuse_available_for("a_server_with_the_owners_identity_serving_other_bytes_is_caught_chunk_by_chunk") {
        return;
    }
    let nats = NatsServer::start();
    let (home, _tree, real) = real_home(&nats).await;
    let served = Served::start(&home, &nats, "media").await;
    let m = Mounted::start(&home, &["--read-timeout", "3", "--cache-size", "4M"]);
    let path = m.path().join("media/movie.bin");
    assert_eq!(pread(&path, 0, 4096).expect("real read"), &real[..4096]);
    drop(served);

    // The owner's server is gone; in its place one with the owner's key (the reader's pin
    // matches, its signatures verify) sends forged bytes with proofs for them.
    let liar = Liar::start(&nats, &home, forged_bytes()).await;
    let err = pread(&path, 2 * CHUNK as u64, 4096).expect_err("the mount returned forged bytes");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(liar.chunks_sent.load(Ordering::Relaxed) > 0, "the liar was never asked: nothing was tested");
    let log = m.log();
    assert!(
        log.contains("chunk 2 of file") && log.contains("failed the check against the catalog's signed chunk tree"),
        "the log names the failed check, file and chunk:\n{}",
        tail(&log, 20)
    );
    assert!(log.contains("/movie.bin"), "the log names the file:\n{}", tail(&log, 20));

    // `catalog download` refuses it too, in one line, and leaves nothing behind.
    let out_dir = tempfile::tempdir().expect("out");
    let out = home
        .run_async(["catalog", "download", "media", "/movie.bin", out_dir.path().join("x").to_str().unwrap()])
        .await;
    out.assert_failure("download from a lying server");
    assert!(out.stderr.contains("signed chunk tree"), "{}", out.stderr);
    assert_eq!(out.stderr_lines().len(), 1, "one line: {}", out.stderr);
    no_partials(out_dir.path());
    drop(liar);
    m.stop();
}
