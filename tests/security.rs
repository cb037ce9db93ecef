//! Who may speak for a catalog: impostors (a second program answering on the catalog's
//! subjects with its own key, offline and racing), a man in the middle that swaps the reader's
//! key, and a v1 reader sending a low-order key. Real nats-servers, real `catalog serve`, real
//! FUSE mount; every interaction with the mount bounded.

mod common;

use std::path::Path;
use std::time::Duration;

use common::mounted::{bounded, fuse_available_for, Mounted, MOUNT_IO_DEADLINE};
use common::*;
use futures::StreamExt;
use natster_mount::client::ClientError;
use natster_mount::identity::{Identity, IdentityError, Purpose};

const SIZE: usize = 3 * 256 * 1024 + 5;

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
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 2 * 256 * 1024).map(|_| buf)
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
            if let Ok(answer) = b.request(msg.subject.to_string(), payload.into()).await {
                let _ = f.publish(reply, answer.payload).await;
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
    let _served = Served::start(&home, &nats, "media").await;
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
