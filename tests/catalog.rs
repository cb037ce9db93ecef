//! Serve a folder as a catalog and read it over a real nats-server: the CLI (`catalog new`,
//! `serve`, `contents`, `download`), the library client (v2 ranged reads, v1 downloads), and
//! the raw wire protocol as an original Natster peer or an attacker would use it.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use natster_mount::client::{self, CatalogClient, ClientError};
use natster_mount::crypto::{CryptoError, EphemeralKey, SessionBinding, SessionKey, NONCE_LEN};
use natster_mount::protocol;
use natster_mount::server::DEFAULT_CHUNK_SIZE;
use natster_mount::shares::ShareList;
use rand::{Rng, SeedableRng};
use serde_json::json;

const CATALOG: &str = "media";
const CHUNK: usize = DEFAULT_CHUNK_SIZE as usize;
/// The big file: over 20 MiB, not a whole number of chunks.
const BIG: usize = 20 * 1024 * 1024 + 12_345;
/// Bound on one chunk arriving on a raw media subscription.
const CHUNK_WAIT: Duration = Duration::from_secs(10);

/// One source file of a test tree.
struct Source {
    /// Catalog path, with the leading `/`.
    path: String,
    bytes: Vec<u8>,
}

impl Source {
    fn hash(&self) -> String {
        sha256_hex(&self.bytes)
    }
}

/// A served catalog over a private nats-server. Fields drop in order: the serve process
/// first, the nats-server last.
struct Fixture {
    served: Served,
    nats: async_nats::Client,
    client: CatalogClient,
    sources: Vec<Source>,
    tree: tempfile::TempDir,
    home: TestHome,
    server: NatsServer,
}

impl Fixture {
    /// Writes `files` into a fresh tree, indexes it with `catalog new`, serves it, and
    /// connects a library client.
    async fn new(files: Vec<(&str, Vec<u8>)>) -> Fixture {
        let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
        Self::with_tree(tree, files, |_| {}).await
    }

    /// Like [`Fixture::new`], with a chance to add things (symlinks...) before indexing.
    async fn with_tree(tree: tempfile::TempDir, files: Vec<(&str, Vec<u8>)>, prepare: impl FnOnce(&Path)) -> Fixture {
        let server = NatsServer::start();
        let home = TestHome::new();
        home.init(&server.url()).await;
        let sources: Vec<Source> =
            files.into_iter().map(|(path, bytes)| Source { path: path.to_string(), bytes }).collect();
        for s in &sources {
            write_file(tree.path(), &s.path, &s.bytes);
        }
        prepare(tree.path());
        let tree_arg = tree.path().to_path_buf();
        home.run_async([os("catalog"), os("new"), os(CATALOG), tree_arg.as_os_str()])
            .await
            .assert_success("catalog new");
        // These tests check how the server treats its index as given (changed files refused,
        // paths outside the root...): no folder watch re-indexing behind their back.
        let served = Served::start_with(&home, &server, CATALOG, &["--no-watch", "--v1"]).await;
        let nats = connect(&server.url()).await;
        let client = catalog_client(&nats, CATALOG);
        Fixture { served, nats, client, sources, tree, home, server }
    }

    fn source(&self, path: &str) -> &Source {
        self.sources.iter().find(|s| s.path == path).unwrap_or_else(|| panic!("no source {path}"))
    }

    fn subject(&self, op: &str) -> String {
        format!("natster.catalog.{CATALOG}.{op}")
    }

    /// Runs the CLI against this fixture's home.
    async fn cli(&self, args: &[&std::ffi::OsStr]) -> RunOutput {
        self.home.run_async(args).await
    }

    /// A raw v2 `open` of `hash` with a fresh key, as any reader could send it.
    async fn open_reply(&self, hash: &str) -> serde_json::Value {
        let body = json!({"hash": hash, "client_xkey": EphemeralKey::generate().public_xkey()});
        raw_request(&self.nats, &self.subject("open"), body.to_string()).await
    }

    /// A raw v1 `download` of `hash` for a fresh xkey (nobody listens to the chunks).
    async fn download_reply(&self, hash: &str) -> serde_json::Value {
        let body = json!({"hash": hash, "target_xkey": nkeys::XKey::new().public_key()});
        raw_request(&self.nats, &self.subject("download"), body.to_string()).await
    }

    fn catalog_file(&self) -> PathBuf {
        self.home.path().join(format!("{CATALOG}.json"))
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// Every file of `dir` whose name marks an unfinished download.
fn partials(dir: &Path) -> Vec<String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial") || n.starts_with(".natster-download-"))
        .collect()
}

/// A hash no catalog has.
fn unknown_hash() -> String {
    sha256_hex(b"this content is in no catalog")
}

/// 1. Every file, from empty to 20 MiB, with nested and non-ASCII names, comes back byte for
/// byte through the CLI, by path and by hash; `contents` lists every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_downloads_every_file_byte_identical() {
    let fx = Fixture::new(vec![
        ("/empty.txt", Vec::new()),
        ("/one.bin", vec![0x5a]),
        ("/chunks/minus-one.bin", pseudo_random_bytes(1, CHUNK - 1)),
        ("/chunks/exact.bin", pseudo_random_bytes(2, CHUNK)),
        ("/chunks/plus-one.bin", pseudo_random_bytes(3, CHUNK + 1)),
        ("/vidéos/été 2024/clip ☃.bin", pseudo_random_bytes(4, 2 * CHUNK + 17)),
        ("/a/b/c/d/deep note.mp4", pseudo_random_bytes(5, 1000)),
        ("/big/movie.mkv", pseudo_random_bytes(6, BIG)),
    ])
    .await;

    // `contents` lists every path, its size and hash.
    let out = fx.cli(&[os("catalog"), os("contents"), os(CATALOG)]).await;
    out.assert_success("catalog contents");
    for s in &fx.sources {
        assert!(out.stdout.contains(&s.path), "contents does not list {}:\n{}", s.path, out.stdout);
        assert!(out.stdout.contains(&s.hash()), "contents does not show the hash of {}:\n{}", s.path, out.stdout);
    }
    assert!(out.stdout.contains(&format!("{} files", fx.sources.len())), "{}", out.stdout);

    // `contents --json` carries exact sizes and hashes.
    let out = fx.cli(&[os("catalog"), os("contents"), os(CATALOG), os("--json")]).await;
    out.assert_success("catalog contents --json");
    let listing: protocol::CatalogSummary = serde_json::from_str(&out.stdout).expect("contents --json is a summary");
    assert_eq!(listing.entries.len(), fx.sources.len());
    for s in &fx.sources {
        let e = listing.entries.iter().find(|e| e.path == s.path).unwrap_or_else(|| panic!("{} not listed", s.path));
        assert_eq!((e.byte_size, e.hash.as_str()), (s.bytes.len() as u64, s.hash().as_str()), "{}", s.path);
    }

    // Download each: alternately by path (with and without the leading '/') and by hash.
    let downloads = tempfile::tempdir().unwrap();
    for (i, s) in fx.sources.iter().enumerate() {
        let what = match i % 3 {
            0 => s.path.clone(),
            1 => s.hash(),
            _ => s.path.trim_start_matches('/').to_string(),
        };
        let target = downloads.path().join(format!("file-{i}"));
        let out = fx.cli(&[os("catalog"), os("download"), os(CATALOG), os(&what), target.as_os_str()]).await;
        out.assert_success(&format!("catalog download {what}"));
        let got = std::fs::read(&target).unwrap_or_else(|e| panic!("{} not written: {e}", target.display()));
        assert!(got == s.bytes, "{} ({} bytes) came back different ({} bytes)", s.path, s.bytes.len(), got.len());
    }

    // Into a folder: the file keeps its (non-ASCII) name.
    let into = tempfile::tempdir().unwrap();
    let clip = fx.source("/vidéos/été 2024/clip ☃.bin");
    let out = fx.cli(&[os("catalog"), os("download"), os(CATALOG), os(&clip.path), into.path().as_os_str()]).await;
    out.assert_success("catalog download into a folder");
    assert_eq!(std::fs::read(into.path().join("clip ☃.bin")).expect("kept its name"), clip.bytes);

    // An existing file is not replaced without --force, and is with it.
    let exists = into.path().join("clip ☃.bin");
    let one = fx.source("/one.bin");
    let out = fx.cli(&[os("catalog"), os("download"), os(CATALOG), os(&one.path), exists.as_os_str()]).await;
    out.assert_failure("download over an existing file");
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    assert_eq!(std::fs::read(&exists).unwrap(), clip.bytes, "the existing file was touched");
    fx.cli(&[os("catalog"), os("download"), os(CATALOG), os(&one.path), exists.as_os_str(), os("--force")])
        .await
        .assert_success("download --force");
    assert_eq!(std::fs::read(&exists).unwrap(), one.bytes);

    assert_eq!(partials(downloads.path()), Vec::<String>::new());
    assert_eq!(partials(into.path()), Vec::<String>::new());
}

/// 2. Ranged reads return exactly the requested bytes, clipped at end of file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_reads_return_exact_bytes() {
    let size = 5 * CHUNK + 777;
    let fx = Fixture::new(vec![("/ranged.bin", pseudo_random_bytes(21, size)), ("/small.txt", b"tiny".to_vec())]).await;
    let src = &fx.source("/ranged.bin").bytes;
    let file = fx.client.open(&sha256_hex(src), Some(size as u64)).await.expect("open");
    assert_eq!(file.byte_size(), size as u64);
    assert_eq!(file.chunk_size(), CHUNK as u64);
    assert_eq!(file.chunk_count(), 6);

    let expected = |offset: u64, len: usize| -> &[u8] {
        let start = (offset.min(size as u64)) as usize;
        let end = (offset.saturating_add(len as u64).min(size as u64)) as usize;
        &src[start..end]
    };
    let c = CHUNK as u64;
    let s = size as u64;
    let mut cases: Vec<(u64, usize)> = vec![
        (0, 0),
        (c + 5, 0),
        (0, 1),
        (1, 1),
        (c - 1, 1),
        (c - 1, 2),
        (c, 1),
        (c, CHUNK),
        (c - 1, CHUNK + 2),
        (3, 4 * CHUNK),
        (s - 1, 1),
        (s - 1, 10),
        (s - 5, 5),
        (s - 3, CHUNK * 3),
        (s, 1),
        (s, 0),
        (s + 1000, 5),
        (u64::MAX - 3, 10),
        (0, size),
        (0, usize::MAX),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x006e_6174_7374_6572);
    for _ in 0..40 {
        let offset = rng.gen_range(0..s + 64);
        let len = if rng.gen_bool(0.5) { rng.gen_range(0..=4096) } else { rng.gen_range(1..=2 * CHUNK + 3) };
        cases.push((offset, len));
    }
    for (offset, len) in cases {
        let got = within("read_range", file.read_range(offset, len))
            .await
            .unwrap_or_else(|e| panic!("read_range({offset}, {len}): {e}"));
        let want = expected(offset, len);
        assert!(got == want, "read_range({offset}, {len}) gave {} bytes, expected {}", got.len(), want.len());
    }

    // Whole chunks, as the mount asks for them.
    let chunks = within("read_chunks", file.read_chunks(4, 10)).await.expect("read_chunks");
    assert_eq!(chunks.len(), 2, "chunks past the end are clipped");
    assert_eq!(&chunks[0][..], &src[4 * CHUNK..5 * CHUNK]);
    assert_eq!(&chunks[1][..], &src[5 * CHUNK..]);

    // The same file read by several tasks at once through one session.
    let reads: Vec<_> = (0..6u64)
        .map(|i| {
            let f = file.clone();
            tokio::spawn(async move { f.read_range(i * c + 100, CHUNK).await })
        })
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        let got = within("concurrent read_range", r).await.expect("task").expect("concurrent read_range");
        assert!(got == expected(i as u64 * c + 100, CHUNK), "concurrent read {i} differs");
    }

    // A size hint that disagrees with the server is an error, not a silently wrong file.
    let small = fx.source("/small.txt");
    let err = fx.client.open(&small.hash(), Some(5)).await.err().expect("wrong size hint accepted");
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    let tiny = fx.client.open(&small.hash(), Some(4)).await.expect("open small");
    assert_eq!(tiny.read_range(1, 100).await.unwrap(), b"iny");
}

/// 3. Eight concurrent whole-file downloads of the big file are all byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_downloads_of_the_big_file() {
    let fx = Fixture::new(vec![("/big.bin", pseudo_random_bytes(31, BIG))]).await;
    let big = fx.source("/big.bin");
    let hash = big.hash();
    // Two connections, four downloads each, sharing one client per connection.
    let second = catalog_client(&connect(&fx.server.url()).await, CATALOG);
    let out = tempfile::tempdir().unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let client = if i % 2 == 0 { fx.client.clone() } else { second.clone() };
            let hash = hash.clone();
            let target = out.path().join(format!("copy-{i}"));
            tokio::spawn(async move {
                let written = client::download_to_file(&client, &hash, BIG as u64, &target, |_| {}).await;
                (target, written.map_err(|e| format!("{e:#}")))
            })
        })
        .collect();
    for task in tasks {
        let (target, written) = within("a concurrent download", task).await.expect("download task");
        assert_eq!(written, Ok((BIG as u64, client::Verified::ChunkTree)), "{}", target.display());
        let got = std::fs::read(&target).expect("downloaded file");
        assert!(got == big.bytes, "{} differs from the source", target.display());
    }
    assert_eq!(partials(out.path()), Vec::<String>::new());
    assert_eq!(file_names(out.path()).len(), 8);
}

/// 4. A v1 `download` reassembles byte-identical, by hand as an original Natster client would,
/// and through `CatalogClient::download_v1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_download_reassembles_byte_identical() {
    let size = 256 * protocol::V1_CHUNK_SIZE + 1234;
    let fx = Fixture::new(vec![("/v1.bin", pseudo_random_bytes(41, size)), ("/empty", Vec::new())]).await;
    let src = fx.source("/v1.bin");
    let hash = src.hash();

    let target = nkeys::XKey::new();
    let mut sub = fx.nats.subscribe(format!("natster.media.{CATALOG}.{hash}")).await.expect("subscribe");
    fx.nats.flush().await.expect("flush");
    let body = json!({"hash": hash, "target_xkey": target.public_key()}).to_string();
    let reply = raw_request(&fx.nats, &fx.subject("download"), body).await;
    assert_eq!(code(&reply), 200, "{reply}");
    let data = &reply["data"];
    let total = data["total_chunks"].as_u64().expect("total_chunks");
    assert_eq!(data["acknowledged"], json!(true));
    assert_eq!(data["chunk_size"].as_u64(), Some(protocol::V1_CHUNK_SIZE as u64));
    assert_eq!(data["total_bytes"].as_u64(), Some(size as u64));
    assert_eq!(total, size.div_ceil(protocol::V1_CHUNK_SIZE) as u64);
    let sender_xkey = data["sender_xkey"].as_str().expect("sender_xkey").to_string();

    let got = receive_v1(&mut sub, &target, &sender_xkey, total, CHUNK_WAIT).await;
    drop(sub);
    assert!(got == src.bytes, "v1 reassembly differs ({} vs {} bytes)", got.len(), size);

    // Sealed for our key only: another key cannot open a chunk, and it is not plaintext.
    let mut sub2 = fx.nats.subscribe(format!("natster.media.{CATALOG}.{hash}")).await.expect("subscribe");
    fx.nats.flush().await.expect("flush");
    let body = json!({"hash": hash, "target_xkey": target.public_key()}).to_string();
    let reply = raw_request(&fx.nats, &fx.subject("download"), body).await;
    assert_eq!(code(&reply), 200, "{reply}");
    let first = tokio::time::timeout(CHUNK_WAIT, sub2.next()).await.expect("a chunk").expect("subscription");
    let sender = nkeys::XKey::from_public_key(reply["data"]["sender_xkey"].as_str().unwrap()).unwrap();
    assert!(nkeys::XKey::new().open(&first.payload, &sender).is_err(), "a stranger's key opened a chunk");
    assert!(!first.payload.windows(64).any(|w| w == &src.bytes[..64]), "chunk carries plaintext");
    // Let that transfer finish before the next one on the same subject.
    for received in 1..total {
        tokio::time::timeout(CHUNK_WAIT, sub2.next())
            .await
            .unwrap_or_else(|_| panic!("second transfer stalled after {received} chunks"))
            .expect("subscription");
    }
    drop(sub2);

    // The library's v1 path.
    let via_lib = within("download_v1", collect_v1(fx.client.clone(), hash.clone())).await.expect("download_v1");
    assert!(via_lib == src.bytes, "download_v1 differs ({} vs {size} bytes)", via_lib.len());

    // An empty file is zero chunks, and comes back empty.
    let empty = fx.source("/empty").hash();
    let written = within("empty v1", fx.client.download_v1(&empty, |_| panic!("data for an empty file")))
        .await
        .expect("empty v1");
    assert_eq!(written, 0);
}

/// A v1 download of `hash` through `client`, collected in memory.
async fn collect_v1(client: CatalogClient, hash: String) -> Result<Vec<u8>, ClientError> {
    let mut bytes = Vec::new();
    client
        .download_v1(&hash, |chunk| {
            bytes.extend_from_slice(chunk);
            Ok(())
        })
        .await
        .map(|_| bytes)
}

/// A file of 1025 v1 chunks, served.
async fn v1_fixture() -> Fixture {
    Fixture::new(vec![("/shared-v1.bin", pseudo_random_bytes(42, 1024 * protocol::V1_CHUNK_SIZE + 99))]).await
}

/// 4b. v1 chunks travel on a subject named by the file's hash, so when two readers of one
/// account download the same file at once, each receives both transfers' chunks. Each must
/// keep only its own (the `x-natster-sender-xkey` header tells them apart), not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_v1_downloads_by_two_readers() {
    let fx = v1_fixture().await;
    let src = fx.source("/shared-v1.bin");
    let other = catalog_client(&connect(&fx.server.url()).await, CATALOG);
    let (a, b) = within("two v1 downloads", async {
        tokio::join!(collect_v1(fx.client.clone(), src.hash()), collect_v1(other, src.hash()))
    })
    .await;
    let a = a.unwrap_or_else(|e| panic!("first of two overlapping v1 downloads failed: {e}"));
    let b = b.unwrap_or_else(|e| panic!("second of two overlapping v1 downloads failed: {e}"));
    assert!(a == src.bytes && b == src.bytes, "overlapping v1 downloads differ");
}

/// 4c. Two v1 downloads of the same file through one client both complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_v1_downloads_on_one_client() {
    let fx = v1_fixture().await;
    let src = fx.source("/shared-v1.bin");
    let (a, b) = within("two v1 downloads", async {
        tokio::join!(collect_v1(fx.client.clone(), src.hash()), collect_v1(fx.client.clone(), src.hash()))
    })
    .await;
    let a = a.unwrap_or_else(|e| panic!("first of two v1 downloads on one client failed: {e}"));
    let b = b.unwrap_or_else(|e| panic!("second of two v1 downloads on one client failed: {e}"));
    assert!(a == src.bytes && b == src.bytes, "v1 downloads on one client differ");
}

/// 5. An unknown hash is a clear 404 everywhere, and the CLI leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hash_is_not_found() {
    let fx = Fixture::new(vec![("/known.txt", b"known".to_vec())]).await;
    let unknown = unknown_hash();

    let err = fx.client.open(&unknown, None).await.err().expect("unknown hash opened");
    assert!(err.is_not_found(), "expected 404, got {err}");
    assert!(err.to_string().contains(&unknown), "message does not name the hash: {err}");

    let reply = fx.open_reply(&unknown).await;
    assert_eq!(code(&reply), 404, "{reply}");
    let reply = fx.download_reply(&unknown).await;
    assert_eq!(code(&reply), 404, "{reply}");
    assert!(reply["error"].as_str().unwrap_or_default().contains(&unknown), "{reply}");

    let err = fx.client.download_v1(&unknown, |_| Ok(())).await.expect_err("v1 of unknown hash");
    assert!(err.is_not_found(), "{err}");

    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("never.bin");
    for what in [unknown.as_str(), "/no/such/file.mp4"] {
        for dest in [target.as_path(), out.path()] {
            let run = fx.cli(&[os("catalog"), os("download"), os(CATALOG), os(what), dest.as_os_str()]).await;
            run.assert_failure("download of an unknown file");
            let lines = run.stderr_lines();
            assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{}", run.stderr);
            assert!(lines[0].contains(what), "error does not name {what}: {}", lines[0]);
            assert_eq!(file_names(out.path()), Vec::<String>::new(), "download of {what} left files");
        }
    }
    assert_eq!(partials(fx.tree.path()), Vec::<String>::new());
    assert_eq!(partials(out.path()), Vec::<String>::new());
}

/// 6. Malformed requests get a 400 and the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_serving_goes_on() {
    let mut fx = Fixture::new(vec![("/f.bin", pseudo_random_bytes(61, CHUNK + 10))]).await;
    let hash = fx.source("/f.bin").hash();
    let garbage: &[u8] = b"\xff\xfe{not json at all\x00";
    for op in ["open", "read", "close", "download", "get"] {
        let reply = raw_request(&fx.nats, &fx.subject(op), garbage.to_vec()).await;
        assert_eq!(code(&reply), 400, "{op}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{op}: no message: {reply}");
    }
    let xkey = EphemeralKey::generate();
    let bad_requests = [
        ("open", json!({"hash": 5, "client_xkey": xkey.public_xkey()})),
        ("open", json!({"hash": "ABC", "client_xkey": xkey.public_xkey()})),
        ("open", json!({"hash": hash, "client_xkey": "not-an-xkey"})),
        ("open", json!({"hash": hash, "client_xkey": nkeys::KeyPair::new_account().public_key()})),
        ("download", json!({"hash": hash, "target_xkey": "nope"})),
        ("read", json!({"session": "../../etc", "first_chunk": 0, "count": 1})),
        ("read", json!({"session": "0123456789abcdef0123456789abcdef", "first_chunk": -1, "count": 1})),
    ];
    for (op, body) in bad_requests {
        let reply = raw_request(&fx.nats, &fx.subject(op), body.to_string()).await;
        assert_eq!(code(&reply), 400, "{op} {body}: {reply}");
    }
    // An operation that does not exist has no endpoint: no responders, as for any NATS
    // service (and as a v2 request meets at an original, v1-only server).
    let unknown = within("request of an unknown operation", fx.nats.request(fx.subject("rm"), "{}".into())).await;
    let kind = unknown.as_ref().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(kind, Err(async_nats::RequestErrorKind::NoResponders), "{unknown:?}");

    // Out-of-range reads on a real session.
    let reply = raw_request(
        &fx.nats,
        &fx.subject("open"),
        json!({"hash": hash, "client_xkey": xkey.public_xkey()}).to_string(),
    )
    .await;
    assert_eq!(code(&reply), 200, "{reply}");
    let session = reply["data"]["session"].as_str().unwrap().to_string();
    for (first, count, want) in
        [(0, 0, 400), (0, protocol::MAX_CHUNKS_PER_READ + 1, 400), (2, 1, 416), (u64::MAX, 1, 416)]
    {
        let body = json!({"session": session, "first_chunk": first, "count": count}).to_string();
        let reply = raw_request(&fx.nats, &fx.subject("read"), body).await;
        assert_eq!(code(&reply), want, "read {first}+{count}: {reply}");
    }
    // Units that are not whole chunk tree leaves within the offer are refused.
    assert!(reply["data"]["max_unit"].as_u64().is_some(), "the open reply offers units: {reply}");
    for unit in [0u64, 4096, 16385, 2 << 20, u64::from(u32::MAX) + 1] {
        let body = json!({"session": session, "first_chunk": 0, "count": 1, "unit": unit}).to_string();
        let reply = raw_request(&fx.nats, &fx.subject("read"), body).await;
        assert_eq!(code(&reply), 400, "read in units of {unit}: {reply}");
    }

    fx.served.assert_running();
    let listing = fx.client.get().await.expect("get after malformed requests");
    assert_eq!(listing.entries.len(), 1);
    let file = fx.client.open(&hash, Some(CHUNK as u64 + 10)).await.expect("open after malformed requests");
    let read = file.read_chunks(0, file.chunk_count());
    let all = within("read_chunks", read).await.expect("read after malformed requests").concat();
    assert!(all == fx.source("/f.bin").bytes);
}

/// True for a subject that carries media: `natster.media.>` or `<ACCT>.natster.media.>`.
fn is_media_subject(subject: &str) -> bool {
    let tokens: Vec<&str> = subject.split('.').collect();
    matches!(tokens.as_slice(), ["natster", "media", ..] | [_, "natster", "media", ..])
}

/// Collects every message `sub` receives until `until`.
async fn drain_until(sub: &mut async_nats::Subscriber, until: Instant) -> Vec<async_nats::Message> {
    let mut seen = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout_at(until.into(), sub.next()).await {
        seen.push(msg);
    }
    seen
}

/// 7. An account not on the share list is refused (403) and gets no media; once the owner
/// shares with it, the running server serves it without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshared_account_is_refused_until_shared() {
    let fx = Fixture::new(vec![("/shared.bin", pseudo_random_bytes(71, CHUNK + 99))]).await;
    let src = fx.source("/shared.bin");
    let hash = src.hash();
    let account = nkeys::KeyPair::new_account().public_key();
    let other = nkeys::KeyPair::new_account().public_key();
    let as_account = |acct: &str, op: &str| format!("{acct}.natster.catalog.{CATALOG}.{op}");

    // A session the owner opened, which the stranger will try to use.
    let owner_key = EphemeralKey::generate();
    let reply = raw_request(
        &fx.nats,
        &fx.subject("open"),
        json!({"hash": hash, "client_xkey": owner_key.public_xkey()}).to_string(),
    )
    .await;
    assert_eq!(code(&reply), 200, "{reply}");
    let owner_session = reply["data"]["session"].as_str().unwrap().to_string();

    let mut everything = fx.nats.subscribe(">").await.expect("subscribe >");
    fx.nats.flush().await.expect("flush");
    let client_key = EphemeralKey::generate();
    let requests = [
        ("get", String::new()),
        ("get", json!({"from": 0}).to_string()),
        ("open", json!({"hash": hash, "client_xkey": client_key.public_xkey()}).to_string()),
        ("download", json!({"hash": hash, "target_xkey": nkeys::XKey::new().public_key()}).to_string()),
        ("read", json!({"session": owner_session, "first_chunk": 0, "count": 1}).to_string()),
        ("close", json!({"session": owner_session}).to_string()),
    ];
    for (op, body) in &requests {
        let reply = raw_request(&fx.nats, &as_account(&account, op), body.clone()).await;
        assert_eq!(code(&reply), 403, "{op}: {reply}");
        assert!(reply["error"].as_str().unwrap_or_default().contains(&account), "{op}: {reply}");
    }
    // Waiting for an absence: chunks would follow the replies within milliseconds, so a
    // bounded 500 ms of silence on every media subject is the evidence that none was sent.
    let seen = drain_until(&mut everything, Instant::now() + Duration::from_millis(500)).await;
    let media: Vec<&str> = seen.iter().map(|m| m.subject.as_str()).filter(|s| is_media_subject(s)).collect();
    assert!(media.is_empty(), "media published for a refused account: {media:?}");
    assert!(seen.iter().any(|m| m.subject.as_str() == as_account(&account, "open")), "the watcher saw nothing");

    // The owner's session survived the stranger's `close`.
    let reply = raw_request(
        &fx.nats,
        &fx.subject("read"),
        json!({"session": owner_session, "first_chunk": 0, "count": 1}).to_string(),
    )
    .await;
    assert_eq!(code(&reply), 200, "owner session was closed by a refused account: {reply}");

    // Share with the account: the running server picks it up.
    ShareList { catalog: CATALOG.to_string(), accounts: vec![account.clone()] }
        .save(&fx.home.home())
        .expect("save shares");
    let reply = raw_request(&fx.nats, &as_account(&account, "get"), "").await;
    assert_eq!(code(&reply), 200, "get after sharing: {reply}");
    assert_eq!(reply["data"]["entries"][0]["hash"].as_str(), Some(hash.as_str()));
    let reply = raw_request(&fx.nats, &as_account(&other, "get"), "").await;
    assert_eq!(code(&reply), 403, "an account not on the list: {reply}");

    // The shared account reads, and its chunks go to its own media subject only.
    let reply = raw_request(
        &fx.nats,
        &as_account(&account, "open"),
        json!({"hash": hash, "client_xkey": client_key.public_xkey()}).to_string(),
    )
    .await;
    assert_eq!(code(&reply), 200, "open after sharing: {reply}");
    let session = reply["data"]["session"].as_str().unwrap().to_string();
    let server_xkey = reply["data"]["server_xkey"].as_str().unwrap().to_string();
    let media_subject = format!("{account}.natster.media.{CATALOG}.{session}");
    let mut media = fx.nats.subscribe(media_subject.clone()).await.expect("subscribe media");
    fx.nats.flush().await.expect("flush");
    let reply = raw_request(
        &fx.nats,
        &as_account(&account, "read"),
        json!({"session": session, "first_chunk": 1, "count": 1}).to_string(),
    )
    .await;
    assert_eq!(code(&reply), 200, "{reply}");
    let chunk = tokio::time::timeout(CHUNK_WAIT, media.next()).await.expect("chunk for the shared account").unwrap();
    let binding = SessionBinding {
        session: &session,
        catalog: CATALOG,
        hash: &hash,
        client_xkey: client_key.public_xkey(),
        server_xkey: &server_xkey,
    };
    let key = client_key.agree(&server_xkey, &binding).expect("agree");
    assert_eq!(proven_data(&key.open(1, &chunk.payload).expect("chunk opens")), &src.bytes[CHUNK..]);

    // The owner's session is not the shared account's: same answer as a missing session.
    let reply = raw_request(
        &fx.nats,
        &as_account(&account, "read"),
        json!({"session": owner_session, "first_chunk": 0, "count": 1}).to_string(),
    )
    .await;
    assert_eq!(code(&reply), 404, "an account used the owner's session: {reply}");

    // Unsharing takes effect at once, for new requests and for the session already open.
    ShareList { catalog: CATALOG.to_string(), accounts: Vec::new() }.save(&fx.home.home()).expect("save shares");
    let reply = raw_request(&fx.nats, &as_account(&account, "get"), "").await;
    assert_eq!(code(&reply), 403, "get after unsharing: {reply}");
    let reply = raw_request(
        &fx.nats,
        &as_account(&account, "read"),
        json!({"session": session, "first_chunk": 0, "count": 1}).to_string(),
    )
    .await;
    assert_eq!(code(&reply), 403, "read on an open session after unsharing: {reply}");
}

/// A stranger who may publish on a session's media subject (another user of the reader's
/// own account, say) cannot break a read: records that fail authentication are dropped and the
/// genuine ones still make the read, byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_on_the_media_subject_are_dropped_and_the_read_completes() {
    let size = 6 * CHUNK + 321;
    let fx = Fixture::new(vec![("/film.bin", pseudo_random_bytes(95, size))]).await;
    let src = fx.source("/film.bin");
    // The stranger answers every read request first, with garbage for each chunk it names.
    let stranger = connect(&fx.server.url()).await;
    let mut reads = stranger.subscribe(fx.subject("read")).await.expect("subscribe");
    stranger.flush().await.expect("flush");
    let forger = tokio::spawn(async move {
        let mut forged = 0u32;
        while let Some(msg) = reads.next().await {
            let Ok(req) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
            let (Some(session), Some(first), Some(count)) =
                (req["session"].as_str(), req["first_chunk"].as_u64(), req["count"].as_u64())
            else {
                continue;
            };
            for index in first..first + count {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(protocol::HEADER_CHUNK_INDEX, index.to_string().as_str());
                let subject = format!("natster.media.{CATALOG}.{session}");
                let garbage = vec![0x5a; CHUNK + 100];
                let _ = stranger.publish_with_headers(subject, headers, garbage.into()).await;
                forged += 1;
            }
            let _ = stranger.flush().await;
        }
        forged
    });
    let file = fx.client.open(&src.hash(), Some(size as u64)).await.expect("open");
    let got = within("read_range past forged records", file.read_range(0, size)).await.expect("read");
    assert!(got == src.bytes, "the read differs from the file");
    forger.abort();
}

/// A flood of refused requests from an account the catalog is not shared with is answered
/// (each a 403), logged once rather than once per request, and leaves the server answering
/// its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_requests_logs_one_line_and_the_owner_is_still_served() {
    let fx = Fixture::new(vec![("/a.bin", pseudo_random_bytes(93, 1000))]).await;
    let stranger = nkeys::KeyPair::new_account().public_key();
    let subject = format!("{stranger}.natster.catalog.{CATALOG}.get");
    let flood = (0..300).map(|_| {
        let (nats, subject) = (fx.nats.clone(), subject.clone());
        async move { code(&raw_request(&nats, &subject, String::new()).await) }
    });
    let codes = futures::future::join_all(flood).await;
    assert!(codes.iter().all(|c| *c == 403), "every stranger's request refused: {codes:?}");
    let logged = fx.served.log().lines().filter(|l| l.contains(&stranger) && l.contains("INFO")).count();
    assert_eq!(logged, 1, "refusals logged once a minute per caller:\n{}", tail(&fx.served.log(), 10));
    assert_eq!(code(&raw_request(&fx.nats, &fx.subject("get"), String::new()).await), 200);
}

/// A file the owner removed and re-indexed away is no longer served through a session opened
/// before (404 once the server has the new listing); a file still listed keeps its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_file_is_not_served_through_a_session_opened_before() {
    let fx =
        Fixture::new(vec![("/keep.bin", pseudo_random_bytes(91, 5000)), ("/gone.bin", pseudo_random_bytes(92, 5000))])
            .await;
    let (keep, gone) = (fx.source("/keep.bin").hash(), fx.source("/gone.bin").hash());
    let key = EphemeralKey::generate();
    let (keep_session, _) = raw_open(&fx, &key, &keep).await;
    let (gone_session, _) = raw_open(&fx, &EphemeralKey::generate(), &gone).await;
    assert_eq!(raw_read(&fx, &gone_session, 0, 1).await.len(), 1, "served while listed");

    std::fs::remove_file(fx.tree.path().join("gone.bin")).unwrap();
    fx.cli(&[os("catalog"), os("new"), os(CATALOG), fx.tree.path().as_os_str()]).await.assert_success("re-index");
    let (nats, subject) = (fx.nats.clone(), fx.subject("read"));
    let body = json!({"session": gone_session, "first_chunk": 0, "count": 1}).to_string();
    wait_for("the server to drop the removed file's session", Duration::from_secs(10), || {
        let (nats, subject, body) = (nats.clone(), subject.clone(), body.clone());
        async move { (code(&raw_request(&nats, &subject, body).await) == 404).then_some(()) }
    })
    .await;
    assert_eq!(raw_read(&fx, &keep_session, 0, 1).await.len(), 1, "a listed file's session survives the re-index");
}

/// Opens a raw v2 session with `key` and derives its session key.
async fn raw_open(fx: &Fixture, key: &EphemeralKey, hash: &str) -> (String, SessionKey) {
    let reply =
        raw_request(&fx.nats, &fx.subject("open"), json!({"hash": hash, "client_xkey": key.public_xkey()}).to_string())
            .await;
    assert_eq!(code(&reply), 200, "{reply}");
    let session = reply["data"]["session"].as_str().expect("session").to_string();
    let server_xkey = reply["data"]["server_xkey"].as_str().expect("server_xkey").to_string();
    assert_eq!(reply["data"]["chunk_size"].as_u64(), Some(CHUNK as u64));
    let binding = SessionBinding {
        session: &session,
        catalog: CATALOG,
        hash,
        client_xkey: key.public_xkey(),
        server_xkey: &server_xkey,
    };
    let session_key = key.agree(&server_xkey, &binding).expect("agree");
    (session, session_key)
}

/// The header `name` of a record.
fn header(msg: &async_nats::Message, name: &str) -> Option<String> {
    msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string())
}

/// Asks a raw session for chunks `first..first+count` and returns them by index.
async fn raw_read(fx: &Fixture, session: &str, first: u64, count: u32) -> BTreeMap<u64, Vec<u8>> {
    let mut sub = fx.nats.subscribe(format!("natster.media.{CATALOG}.{session}")).await.expect("subscribe");
    fx.nats.flush().await.expect("flush");
    let body = json!({"session": session, "first_chunk": first, "count": count}).to_string();
    let reply = raw_request(&fx.nats, &fx.subject("read"), body).await;
    assert_eq!(code(&reply), 200, "{reply}");
    let n = reply["data"]["count"].as_u64().expect("count");
    let mut chunks = BTreeMap::new();
    while (chunks.len() as u64) < n {
        let msg = tokio::time::timeout(CHUNK_WAIT, sub.next()).await.expect("chunk in time").expect("subscription");
        let index: u64 = header(&msg, protocol::HEADER_CHUNK_INDEX).expect("index header").parse().unwrap();
        chunks.insert(index, msg.payload.to_vec());
    }
    chunks
}

/// 8. A chunk that was tampered with, truncated, moved to another index or replayed into
/// another session fails authentication; the untouched one opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_chunks_fail_authentication() {
    let fx = Fixture::new(vec![("/secret.bin", pseudo_random_bytes(81, CHUNK + 1000))]).await;
    let src = &fx.source("/secret.bin").bytes;
    let hash = sha256_hex(src);
    let me = EphemeralKey::generate();
    let (session, key) = raw_open(&fx, &me, &hash).await;
    let chunks = raw_read(&fx, &session, 0, 2).await;
    let (c0, c1) = (&chunks[&0], &chunks[&1]);

    assert_eq!(proven_data(&key.open(0, c0).expect("chunk 0 opens")), &src[..CHUNK]);
    assert_eq!(proven_data(&key.open(1, c1).expect("chunk 1 opens")), &src[CHUNK..]);
    assert!(!c0.windows(64).any(|w| w == &src[..64]), "chunk 0 carries plaintext");

    for (what, pos) in [("nonce", 3), ("ciphertext", NONCE_LEN + 1234), ("tag", c0.len() - 1)] {
        let mut bad = c0.clone();
        bad[pos] ^= 0x01;
        assert_eq!(key.open(0, &bad), Err(CryptoError::Authentication(0)), "flipped {what} byte accepted");
    }
    assert_eq!(key.open(0, &c0[..c0.len() - 1]), Err(CryptoError::Authentication(0)), "truncated chunk accepted");
    assert_eq!(key.open(0, &c0[..NONCE_LEN]), Err(CryptoError::Authentication(0)), "nonce-only chunk accepted");
    assert_eq!(key.open(1, c0), Err(CryptoError::Authentication(1)), "chunk 0 accepted as chunk 1");
    assert_eq!(key.open(0, c1), Err(CryptoError::Authentication(0)), "chunk 1 accepted as chunk 0");

    // Replay into another session of the same file: its key refuses this session's chunks.
    let (other_session, other_key) = raw_open(&fx, &EphemeralKey::generate(), &hash).await;
    assert_ne!(other_session, session);
    assert_eq!(other_key.open(0, c0), Err(CryptoError::Authentication(0)), "a chunk opened in another session");

    // A key bound to anything else (here: another catalog name) does not open it either.
    let reply =
        raw_request(&fx.nats, &fx.subject("open"), json!({"hash": hash, "client_xkey": me.public_xkey()}).to_string())
            .await;
    let s3 = reply["data"]["session"].as_str().unwrap().to_string();
    let server_xkey = reply["data"]["server_xkey"].as_str().unwrap().to_string();
    let mut wrong = SessionBinding {
        session: &s3,
        catalog: "other",
        hash: &hash,
        client_xkey: me.public_xkey(),
        server_xkey: &server_xkey,
    };
    let wrong_catalog = me.agree(&server_xkey, &wrong).unwrap();
    wrong.catalog = CATALOG;
    let right = me.agree(&server_xkey, &wrong).unwrap();
    let c = raw_read(&fx, &s3, 0, 1).await;
    assert!(right.open(0, &c[&0]).is_ok());
    assert_eq!(
        wrong_catalog.open(0, &c[&0]),
        Err(CryptoError::Authentication(0)),
        "key bound to another catalog opened a chunk"
    );
}

/// A raw `read` request, its reply as it came (an inline read's reply is a record).
async fn raw_read_reply(fx: &Fixture, body: serde_json::Value) -> async_nats::Message {
    let request = fx.nats.request(fx.subject("read"), body.to_string().into());
    tokio::time::timeout(REQUEST_TIMEOUT, request).await.expect("read reply in time").expect("read reply")
}

/// 8b. An inline read of one record is answered with the sealed record itself (its headers as
/// on the media subject), and nothing is published on the media subject; it opens with the
/// session key, in chunks and in leaf units. An inline read of several records is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_read_is_answered_with_the_record_itself() {
    let fx = Fixture::new(vec![("/inline.bin", pseudo_random_bytes(82, CHUNK + 40_000))]).await;
    let src = fx.source("/inline.bin").bytes.clone();
    let hash = sha256_hex(&src);
    let (session, key) = raw_open(&fx, &EphemeralKey::generate(), &hash).await;
    let mut media = fx.nats.subscribe(format!("natster.media.{CATALOG}.{session}")).await.expect("subscribe");
    fx.nats.flush().await.expect("flush");

    let reply = raw_read_reply(&fx, json!({"session": session, "first_chunk": 1, "count": 1, "inline": true})).await;
    assert_eq!(header(&reply, protocol::HEADER_CHUNK_INDEX).as_deref(), Some("1"), "{:?}", reply.headers);
    assert_eq!(header(&reply, protocol::HEADER_UNIT), None);
    assert_eq!(proven_data(&key.open(1, &reply.payload).expect("inline chunk opens")), &src[CHUNK..]);

    let leaf = natster_mount::chunk_tree::LEAF_SIZE;
    let body = json!({"session": session, "first_chunk": 2, "count": 1, "unit": leaf, "inline": true});
    let reply = raw_read_reply(&fx, body).await;
    assert_eq!(header(&reply, protocol::HEADER_CHUNK_INDEX).as_deref(), Some("2"));
    assert_eq!(header(&reply, protocol::HEADER_UNIT), Some(leaf.to_string()));
    let plain = key.open_record_in_place(2, Some(leaf as u32), reply.payload.clone()).expect("inline leaf opens");
    assert_eq!(proven_data(&plain), &src[2 * leaf..3 * leaf]);
    // The unit is bound: the same record does not open as a chunk.
    assert_eq!(key.open(2, &reply.payload), Err(CryptoError::Authentication(2)));

    let reply = raw_read_reply(&fx, json!({"session": session, "first_chunk": 0, "count": 2, "inline": true})).await;
    assert_eq!(header(&reply, protocol::HEADER_CHUNK_INDEX), None, "a refusal is not a record");
    let refusal: serde_json::Value = serde_json::from_slice(&reply.payload).expect("envelope");
    assert_eq!(code(&refusal), 400, "{refusal}");
    let unknown = "0".repeat(32);
    let reply = raw_read_reply(&fx, json!({"session": unknown, "first_chunk": 0, "count": 1, "inline": true})).await;
    let refusal: serde_json::Value = serde_json::from_slice(&reply.payload).expect("envelope");
    assert_eq!(code(&refusal), 404, "{refusal}");

    // Waiting for an absence: a published record would arrive within milliseconds.
    let seen = drain_until(&mut media, Instant::now() + Duration::from_millis(500)).await;
    assert!(seen.is_empty(), "an inline read also published {} media message(s)", seen.len());
}

/// Sets the modification time of `path`.
fn set_mtime(path: &Path, mtime: std::time::SystemTime) {
    std::fs::File::options().write(true).open(path).and_then(|f| f.set_modified(mtime)).expect("set mtime");
}

/// 9. A file changed since it was indexed is refused with 409, not served under its old hash;
/// a change its size and mtime do not show is caught by the server's per-chunk tree check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_are_refused() {
    let fx = Fixture::new(vec![
        ("/stable.bin", pseudo_random_bytes(91, 5000)),
        ("/same-size.bin", pseudo_random_bytes(92, 5000)),
        ("/grown.bin", pseudo_random_bytes(93, 5000)),
        ("/open-then-change.bin", pseudo_random_bytes(94, 2 * CHUNK)),
        ("/sneaky.bin", pseudo_random_bytes(95, CHUNK + 7)),
    ])
    .await;
    let root = fx.tree.path();
    let hash_of = |p: &str| fx.source(p).hash();

    // Before any change, everything opens.
    for s in &fx.sources {
        fx.client.open(&s.hash(), Some(s.bytes.len() as u64)).await.unwrap_or_else(|e| panic!("{}: {e}", s.path));
    }
    let open_early = fx.client.open(&hash_of("/open-then-change.bin"), None).await.expect("open");
    assert_eq!(
        open_early.read_range(0, 10).await.expect("read before change"),
        &fx.source("/open-then-change.bin").bytes[..10]
    );

    // Same size, new content, later mtime.
    let later = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap() + Duration::from_secs(5);
    for rel in ["same-size.bin", "open-then-change.bin"] {
        let path = root.join(rel);
        let when = later(&path);
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        std::fs::write(&path, pseudo_random_bytes(999, len)).unwrap();
        set_mtime(&path, when);
    }
    // Different size.
    let grown = root.join("grown.bin");
    let mut bytes = std::fs::read(&grown).unwrap();
    bytes.extend_from_slice(b"appended");
    std::fs::write(&grown, bytes).unwrap();
    // Same size and the old mtime put back: invisible to a size+mtime check.
    let sneaky = root.join("sneaky.bin");
    let old_mtime = std::fs::metadata(&sneaky).unwrap().modified().unwrap();
    std::fs::write(&sneaky, pseudo_random_bytes(998, CHUNK + 7)).unwrap();
    set_mtime(&sneaky, old_mtime);

    for p in ["/same-size.bin", "/grown.bin", "/open-then-change.bin"] {
        match fx.client.open(&hash_of(p), None).await {
            Err(ClientError::Refused { code: 409, message }) => {
                assert!(message.contains("changed since it was indexed"), "{p}: {message}")
            }
            Err(e) => panic!("{p}: expected 409, got {e}"),
            Ok(_) => panic!("{p}: changed file served under its old hash"),
        }
        let reply = fx.download_reply(&hash_of(p)).await;
        assert_eq!(code(&reply), 409, "v1 download of {p}: {reply}");
    }
    // A session opened before the change stops serving.
    match within("read after change", open_early.read_range(CHUNK as u64, 10)).await {
        Err(ClientError::Refused { code: 409, .. }) => {}
        other => panic!("read on a session whose file changed: {:?}", other.map(|b| b.len())),
    }
    // The CLI fails and keeps nothing.
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("x.bin");
    let run = fx.cli(&[os("catalog"), os("download"), os(CATALOG), os("/same-size.bin"), target.as_os_str()]).await;
    run.assert_failure("download of a changed file");
    assert!(run.stderr.contains("409") || run.stderr.contains("changed"), "{}", run.stderr);
    assert_eq!(file_names(out.path()), Vec::<String>::new());

    // Size and mtime match, so it opens; its first chunk's leaves do not match the indexed
    // tree, so the server sends none of it and refuses the file from then on.
    let sneaky_src = fx.source("/sneaky.bin");
    let file = fx.client.open(&sneaky_src.hash(), None).await.expect("size and mtime match");
    let err = within("read_chunks", file.read_chunks(0, file.chunk_count()))
        .await
        .expect_err("modified bytes verified as the indexed hash");
    assert!(matches!(err, ClientError::Refused { code: 409, .. }), "{err}");
    assert!(!fx.home.path().join("trees").join(format!("{}.leaves", sneaky_src.hash())).exists(), "tree file kept");
    let sneaky_target = out.path().join("sneaky.bin");
    let (sneaky_hash, sneaky_len) = (sneaky_src.hash(), sneaky_src.bytes.len() as u64);
    let download = client::download_to_file(&fx.client, &sneaky_hash, sneaky_len, &sneaky_target, |_| {});
    let result = within("sneaky download", download).await;
    let err = result.expect_err("sneaky download accepted");
    assert!(format!("{err:#}").contains("changed since it was indexed"), "{err:#}");
    assert_eq!(file_names(out.path()), Vec::<String>::new(), "a failed download left files");

    // The unchanged file is still served.
    let stable = fx.source("/stable.bin");
    let file = fx.client.open(&stable.hash(), None).await.expect("stable");
    assert_eq!(file.read_range(0, 5000).await.unwrap(), stable.bytes);
}

fn mtime_ns(path: &Path) -> i64 {
    let m = std::fs::metadata(path).expect("stat");
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

/// 10. A hand-edited catalog naming files outside the root (`..`, absolute paths, symlinks)
/// is not served, and `catalog new` does not index symlinks that leave the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_root_are_not_served() {
    // parent/outside/ holds secrets; the catalog root is parent/tree/<tmp>/.
    let parent = tempfile::tempdir().unwrap();
    let outside = parent.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secrets: Vec<(PathBuf, Vec<u8>)> = (1..=5)
        .map(|i| {
            let bytes = format!("secret number {i} outside the catalog").into_bytes();
            (write_file(parent.path(), &format!("outside/outside-{i}.txt"), &bytes), bytes)
        })
        .collect();
    let tree_dir = parent.path().join("tree");
    std::fs::create_dir(&tree_dir).unwrap();
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir_in(&tree_dir).unwrap();
    let root = tree.path().to_path_buf();
    let (outside_c, tree_c) = (outside.clone(), root.clone());
    let fx = Fixture::with_tree(
        tree,
        vec![("/inside.txt", b"inside".to_vec()), ("/swapped.txt", b"will become a symlink".to_vec())],
        move |r| {
            std::os::unix::fs::symlink(outside_c.join("outside-3.txt"), r.join("escape.txt")).unwrap();
            std::os::unix::fs::symlink(&outside_c, r.join("escape-dir")).unwrap();
            std::os::unix::fs::symlink(tree_c.join("inside.txt"), r.join("alias.txt")).unwrap();
        },
    )
    .await;
    // "/../outside-1.txt" seen from the root is a real file: put the first secret there.
    let beside_root = root.parent().unwrap().join("outside-1.txt");
    std::fs::copy(&secrets[0].0, &beside_root).unwrap();

    // Symlinks leaving the root were not indexed; the one inside was.
    let listing = fx.client.get().await.expect("get");
    let paths: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/alias.txt", "/inside.txt", "/swapped.txt"], "indexed paths");
    let secret_hashes: Vec<String> = secrets.iter().map(|(_, b)| sha256_hex(b)).collect();
    assert!(listing.entries.iter().all(|e| !secret_hashes.contains(&e.hash)), "a secret was indexed");

    // Hand-edit the catalog: entries that point outside, with the real hash, size, mtime and
    // chunk tree.
    let mut catalog: serde_json::Value = serde_json::from_slice(&std::fs::read(fx.catalog_file()).unwrap()).unwrap();
    let absolute = format!("/{}", secrets[3].0.display());
    let evil = [
        ("/../outside-1.txt".to_string(), &beside_root, 0),
        ("/escape-dir/outside-2.txt".to_string(), &secrets[1].0, 1),
        ("/escape.txt".to_string(), &secrets[2].0, 2),
        (absolute, &secrets[3].0, 3),
    ];
    let entries = catalog["entries"].as_array_mut().unwrap();
    for (path, file, i) in &evil {
        entries.push(json!({
            "path": path,
            "description": "",
            "mime_type": "text/plain",
            "hash": secret_hashes[*i],
            "byte_size": secrets[*i].1.len(),
            "mtime_ns": mtime_ns(file),
            "tree": hex::encode(natster_mount::chunk_tree::Tree::of(&secrets[*i].1).root()),
        }));
    }
    let tmp = fx.home.path().join("edit.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&catalog).unwrap()).unwrap();
    std::fs::rename(&tmp, fx.catalog_file()).unwrap();

    // Swap an indexed file for a symlink to a secret.
    let swapped = root.join("swapped.txt");
    let swapped_hash = sha256_hex(b"will become a symlink");
    std::fs::remove_file(&swapped).unwrap();
    std::os::unix::fs::symlink(&secrets[4].0, &swapped).unwrap();

    // The server re-reads the catalog file on its heartbeat; wait until it lists the edit.
    let (fxr, want) = (&fx, 3 + evil.len());
    wait_for("the server to reload the edited catalog", Duration::from_secs(15), || async move {
        let reply = raw_request(&fxr.nats, &fxr.subject("get"), "").await;
        let listed = reply["data"]["entries"].as_array().map(|e| e.len()).unwrap_or(0);
        (listed == want).then_some(())
    })
    .await;

    for (path, _, i) in &evil {
        let h = &secret_hashes[*i];
        let reply = fx.open_reply(h).await;
        assert_eq!(code(&reply), 404, "{path} opened: {reply}");
        // Refused for where it points, not for an unknown hash.
        assert!(reply["error"].as_str().unwrap_or_default().contains("cannot be served"), "{path}: {reply}");
        let reply = fx.download_reply(h).await;
        assert_eq!(code(&reply), 404, "{path} v1 download: {reply}");
        let err = fx.client.open(h, None).await.err().unwrap_or_else(|| panic!("{path} opened through the client"));
        assert!(err.is_not_found(), "{path}: {err}");
    }
    let reply = fx.open_reply(&swapped_hash).await;
    assert_eq!(code(&reply), 404, "a file swapped for an escaping symlink was served: {reply}");
    assert!(reply["error"].as_str().unwrap_or_default().contains("cannot be served"), "{reply}");
    let log = fx.served.log();
    assert!(log.contains("refusing to serve"), "the server did not log its refusals:\n{}", tail(&log, 20));

    // The client never hands an escaping path to its caller.
    // It drops such entries (one bad entry must not hide the rest) and keeps the clean ones.
    let listing = fx.client.get().await.expect("the edited listing still loads");
    let paths: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.iter().all(|p| !p.split('/').any(|c| c == "..")), "client accepted an escaping path: {paths:?}");
    assert!(paths.contains(&"/inside.txt") && !paths.contains(&"/../outside-1.txt"), "{paths:?}");
    // What is inside is still served.
    let f = fx.client.open(&sha256_hex(b"inside"), None).await.expect("inside.txt after the edit");
    assert_eq!(f.read_range(0, 100).await.unwrap(), b"inside");
}

/// 11. Bad input on the command line gets a clear one-line error and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cli_input_gets_clear_errors() {
    let home = TestHome::new();
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "a.txt", b"a");
    let json_files = |home: &TestHome| -> Vec<String> {
        if !home.path().exists() {
            return Vec::new();
        }
        file_names(home.path()).into_iter().filter(|n| n.ends_with(".json")).collect()
    };

    let run = home.run_async([os("catalog"), os("new"), os("bad name"), dir.path().as_os_str()]).await;
    run.assert_failure("catalog new 'bad name'");
    assert_eq!(run.stderr_lines().len(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("letters") && run.stderr.contains("digits"), "{}", run.stderr);
    for bad in ["a.b", "a*", "", "ünï"] {
        let run = home.run_async([os("catalog"), os("new"), os(bad), dir.path().as_os_str()]).await;
        run.assert_failure(&format!("catalog new {bad:?}"));
        assert_eq!(run.stderr_lines().len(), 1, "{}", run.stderr);
    }
    assert_eq!(json_files(&home), Vec::<String>::new());

    let run = home.run_async(["catalog", "new", "ok", "/does/not/exist"]).await;
    run.assert_failure("catalog new of a missing folder");
    assert_eq!(run.stderr_lines().len(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("/does/not/exist"), "{}", run.stderr);
    let run = home.run_async([os("catalog"), os("new"), os("ok"), dir.path().join("a.txt").as_os_str()]).await;
    run.assert_failure("catalog new of a file");
    assert!(run.stderr.contains("not a folder"), "{}", run.stderr);
    assert_eq!(json_files(&home), Vec::<String>::new());

    // No context yet: the error says how to make one.
    let run = home.run_async(["catalog", "contents", "ok", "--timeout", "2"]).await;
    run.assert_failure("contents without a context");
    assert!(run.stderr.contains("init"), "{}", run.stderr);

    // A context whose server is not running: a clear error, well within the bound.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    home.init(&dead).await;
    let started = Instant::now();
    let run = home.run_async(["catalog", "contents", "ok", "--timeout", "2"]).await;
    run.assert_failure("contents with no server");
    assert_eq!(run.stderr_lines().len(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("cannot connect to NATS") && run.stderr.contains(&dead), "{}", run.stderr);
    // A hang guard, not a speed test: the command was told to give up after 2 s.
    assert!(started.elapsed() < Duration::from_secs(30), "contents took {:?}", started.elapsed());

    // A server that runs, but nobody serves the catalog.
    let server = NatsServer::start();
    home.init(&server.url()).await;
    let run = home.run_async(["catalog", "contents", "nobody", "--timeout", "2"]).await;
    run.assert_failure("contents of an unserved catalog");
    assert_eq!(run.stderr_lines().len(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("nobody"), "{}", run.stderr);
    let out = dir.path().join("out.bin");
    let run = home
        .run_async([
            os("catalog"),
            os("download"),
            os("nobody"),
            os("a.txt"),
            out.as_os_str(),
            os("--timeout"),
            os("2"),
        ])
        .await;
    run.assert_failure("download from an unserved catalog");
    assert!(!out.exists());
    assert_eq!(partials(dir.path()), Vec::<String>::new());
}
