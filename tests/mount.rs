//! The mount on a real FUSE filesystem, over a real nats-server and catalog server, read with
//! real programs (`ls`, `sha256sum`, `dd`, `cat`, `ffprobe`, `touch`, `mkdir`, `rm`, `mv`).
//! Without /dev/fuse or fusermount3 each test is recorded as skipped (see `require_fuse!`),
//! and fails under `CI=true`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mounted::{Mounted, UNMOUNT_DEADLINE};
use common::*;
use futures::StreamExt;
use natster_mount::fs::mount::is_mounted;

/// Runs a program with a bound; returns (success, stdout, stderr).
fn sh(program: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    (out.status.success(), out.stdout.clone(), out.stderr.clone())
}

/// A catalog served from a fresh tree, with a home initialised against a fresh nats-server.
struct Env {
    nats: NatsServer,
    home: TestHome,
    tree: tempfile::TempDir,
    served: Option<Served>,
}

async fn env_with(files: &[(&str, Vec<u8>)]) -> Env {
    let nats = NatsServer::start();
    let home = TestHome::new();
    home.init(&nats.url()).await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    for (rel, bytes) in files {
        write_file(tree.path(), rel, bytes);
    }
    let root = tree.path().to_str().expect("utf-8").to_string();
    home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("catalog new");
    let served = Served::start(&home, &nats, "media").await;
    Env { nats, home, tree, served: Some(served) }
}

/// Every file and folder below `root`, as (relative path, is_dir, size).
fn walk(root: &Path) -> Vec<(String, bool, u64)> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.expect("walk");
        let meta = e.metadata().expect("stat");
        let rel = e.path().strip_prefix(root).expect("prefix").to_string_lossy().into_owned();
        out.push((rel, meta.is_dir(), if meta.is_dir() { 0 } else { meta.len() }));
    }
    out
}

fn sample_tree() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty.bin", Vec::new()),
        ("one.bin", vec![7]),
        ("vidéos/été 2024/clip ☃.bin", pseudo_random_bytes(1, 300_000)),
        ("vidéos/large.bin", pseudo_random_bytes(2, 9 * 1024 * 1024 + 123)),
        ("docs/a/b/c/deep.txt", b"deep\n".to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_content_and_random_reads_match_the_source() {
    require_fuse!();
    let env = env_with(&sample_tree()).await;
    let m = Mounted::start(&env.home, &[]);
    let catalog = m.path().join("media");

    // ls -lR: same names, kinds and sizes as the source tree.
    assert_eq!(walk(&catalog), walk(env.tree.path()));
    let (ok, listing, err) = sh("ls", &["-lR", catalog.to_str().unwrap()]);
    assert!(ok, "ls -lR failed: {err}");
    assert!(listing.contains("clip ☃.bin") && listing.contains("-r--r--r--"), "{listing}");

    // sha256sum of every file equals the source's.
    for (rel, is_dir, _) in walk(env.tree.path()) {
        if is_dir {
            continue;
        }
        let (ok, out, err) = sh("sha256sum", &[catalog.join(&rel).to_str().unwrap()]);
        assert!(ok, "sha256sum {rel}: {err}");
        let want = sha256_hex(&std::fs::read(env.tree.path().join(&rel)).unwrap());
        assert!(out.starts_with(&want), "{rel}: {out} != {want}");
    }

    // xattrs carry the catalog's metadata.
    let clip = catalog.join("vidéos/été 2024/clip ☃.bin");
    let hash = xattr(&clip, "user.natster.hash");
    assert_eq!(hash, sha256_hex(&pseudo_random_bytes(1, 300_000)));
    assert_eq!(xattr(&clip, "user.natster.mime_type"), "application/octet-stream");

    m.stop();
}

fn xattr(path: &Path, name: &str) -> String {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let c_name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "getxattr {name} on {}: {}", path.display(), std::io::Error::last_os_error());
    buf.truncate(n as usize);
    String::from_utf8(buf).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dd_at_random_offsets_and_parallel_cats_are_exact() {
    require_fuse!();
    let big = pseudo_random_bytes(3, 64 * 1024 * 1024);
    let env = env_with(&[("big.bin", big.clone())]).await;
    let m = Mounted::start(&env.home, &[]);
    let file = m.path().join("media/big.bin");
    let file_arg = format!("if={}", file.display());

    // dd bs=4k skip=N count=M at 50 pseudo-random offsets.
    let blocks = (big.len() / 4096) as u64;
    let mut state = 42u64;
    for _ in 0..50 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let skip = (state >> 33) % blocks;
        let count = 1 + (state >> 20) % 9;
        let out = Command::new("dd")
            .args([file_arg.as_str(), "bs=4k", &format!("skip={skip}"), &format!("count={count}"), "status=none"])
            .output()
            .expect("dd");
        assert!(out.status.success(), "dd failed: {}", String::from_utf8_lossy(&out.stderr));
        let from = (skip * 4096) as usize;
        let to = (from + (count * 4096) as usize).min(big.len());
        assert!(out.stdout == big[from..to], "dd skip={skip} count={count} differs");
    }

    // 4 parallel cats of the 64 MiB file.
    let want = sha256_hex(&big);
    let cats: Vec<_> = (0..4)
        .map(|_| {
            let path = file.clone();
            std::thread::spawn(move || {
                let out = Command::new("cat").arg(&path).output().expect("cat");
                assert!(out.status.success());
                sha256_hex(&out.stdout)
            })
        })
        .collect();
    for cat in cats {
        assert_eq!(cat.join().expect("cat thread"), want);
    }
    m.stop();
}

/// Counts the `read` requests the catalog server receives (a plain subscription sees every
/// request beside the server's queue group).
async fn count_reads(nats: &NatsServer) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let client = connect(&nats.url()).await;
    let mut sub = client.subscribe("natster.catalog.media.read").await.expect("subscribe");
    client.flush().await.expect("flush");
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while sub.next().await.is_some() {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    (count, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_read_sends_no_chunk_request_and_writes_fail_with_erofs() {
    require_fuse!();
    let bytes = pseudo_random_bytes(4, 3 * 1024 * 1024);
    // The same bytes under two names: one hash, so the second file is served from the
    // chunk cache though the kernel has never seen its pages.
    let env = env_with(&[("a/first.bin", bytes.clone()), ("b/second.bin", bytes.clone())]).await;
    let (reads, task) = count_reads(&env.nats).await;
    let m = Mounted::start(&env.home, &[]);
    let first = m.path().join("media/a/first.bin");
    let second = m.path().join("media/b/second.bin");

    assert_eq!(std::fs::read(&first).unwrap(), bytes);
    let after_first = reads.load(Ordering::SeqCst);
    assert!(after_first > 0, "the first read must fetch chunks");
    assert_eq!(std::fs::read(&first).unwrap(), bytes);
    assert_eq!(std::fs::read(&second).unwrap(), bytes);
    // Let any stray request reach the counter before comparing (bounded, and absence is
    // what is being checked, so a short settle is the only way).
    let client = connect(&env.nats.url()).await;
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reads.load(Ordering::SeqCst), after_first, "re-reading sent chunk requests");
    task.abort();

    // Every kind of write is refused with EROFS.
    let dir = m.path().join("media/a");
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("touch", vec![dir.join("new").display().to_string()]),
        ("touch", vec![first.display().to_string()]),
        ("mkdir", vec![dir.join("d").display().to_string()]),
        ("rm", vec!["-f".into(), first.display().to_string()]),
        ("mv", vec![first.display().to_string(), dir.join("moved").display().to_string()]),
        ("sh", vec!["-c".into(), format!("echo x >> '{}'", first.display())]),
    ];
    for (program, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = sh(program, &args);
        assert!(!ok, "{program} {args:?} succeeded on a read-only mount");
        assert!(err.contains("Read-only file system"), "{program} {args:?}: {err}");
    }
    assert_eq!(std::fs::read(&first).unwrap(), bytes, "nothing changed");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffprobe_reads_the_sample_video_duration() {
    require_fuse!();
    let mp4 = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/media/trailers/natster-demo.mp4"))
        .expect("examples/media sample mp4");
    let env = env_with(&[("trailers/natster-demo.mp4", mp4)]).await;
    let m = Mounted::start(&env.home, &[]);
    let video = m.path().join("media/trailers/natster-demo.mp4");
    let (ok, out, err) =
        sh("ffprobe", &["-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", video.to_str().unwrap()]);
    assert!(ok, "ffprobe failed: {err}");
    let duration: f64 = out.trim().parse().unwrap_or_else(|_| panic!("ffprobe printed {out:?}"));
    assert!((duration - 3.0).abs() < 0.2, "duration {duration}");
    assert_eq!(xattr(&video, "user.natster.mime_type"), "video/mp4");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_catalog_gives_eio_in_time_while_cached_data_reads() {
    require_fuse!();
    let cached = pseudo_random_bytes(5, 1024 * 1024);
    let uncached = pseudo_random_bytes(6, 1024 * 1024);
    let mut env = env_with(&[("cached.bin", cached.clone()), ("uncached.bin", uncached)]).await;
    let m = Mounted::start(&env.home, &["--read-timeout", "3"]);
    let cached_path = m.path().join("media/cached.bin");
    assert_eq!(std::fs::read(&cached_path).unwrap(), cached);
    assert!(m.path().join("media/uncached.bin").exists(), "listed before going offline");

    drop(env.served.take()); // the catalog server stops

    let started = Instant::now();
    let (ok, _, err) = sh("cat", &[m.path().join("media/uncached.bin").to_str().unwrap()]);
    assert!(!ok, "reading uncached data of an offline catalog succeeded");
    assert!(err.contains("Input/output error"), "expected EIO, got: {err}");
    // Bounded, not fast: the read must give up rather than hang (30 s is the hang guard).
    assert!(started.elapsed() < Duration::from_secs(30), "EIO took {:?}", started.elapsed());
    assert!(m.log().contains("read failed"), "a log line names the failure:\n{}", m.log());

    // Cached data still reads, and the listing is still there.
    assert_eq!(std::fs::read(&cached_path).unwrap(), cached);
    assert_eq!(walk(&m.path().join("media")).len(), 2);
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_changes_appear_in_the_mount() {
    require_fuse!();
    let env =
        env_with(&[("keep.txt", b"keep".to_vec()), ("gone.txt", b"gone".to_vec()), ("grow.txt", b"1".to_vec())]).await;
    let m = Mounted::start(&env.home, &["--listing-ttl", "60"]);
    let dir = m.path().join("media");
    assert_eq!(file_names(&dir), ["gone.txt", "grow.txt", "keep.txt"]);
    assert_eq!(std::fs::metadata(dir.join("grow.txt")).unwrap().len(), 1);
    assert_eq!(std::fs::read(dir.join("grow.txt")).unwrap(), b"1");

    std::fs::remove_file(env.tree.path().join("gone.txt")).unwrap();
    std::fs::write(env.tree.path().join("grow.txt"), b"grown").unwrap();
    std::fs::write(env.tree.path().join("new.txt"), b"new").unwrap();
    let root = env.tree.path().to_str().unwrap().to_string();
    env.home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("re-index");

    // The server picks up the re-index and heartbeats; the mount refreshes well before its
    // 60 s TTL and tells the kernel.
    let d = dir.clone();
    wait_for("the new listing in the mount", Duration::from_secs(20), || {
        let d = d.clone();
        async move { (file_names(&d) == ["grow.txt", "keep.txt", "new.txt"]).then_some(()) }
    })
    .await;
    assert_eq!(std::fs::metadata(dir.join("grow.txt")).unwrap().len(), 5);
    assert_eq!(std::fs::read(dir.join("grow.txt")).unwrap(), b"grown");
    assert!(!dir.join("gone.txt").exists());
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mountpoints_get_one_line_explanations() {
    require_fuse!();
    let env = env_with(&[("x.txt", b"x".to_vec())]).await;
    let missing = env.home.run_async(["mount", "/does/not/exist"]).await;
    missing.assert_failure("mount on a missing folder");
    assert!(missing.stderr.contains("does not exist") && missing.stderr.contains("mkdir"), "{}", missing.stderr);

    let full = tempfile::tempdir().unwrap();
    std::fs::write(full.path().join("file"), b"x").unwrap();
    let out = env.home.run_async(["mount", full.path().to_str().unwrap()]).await;
    out.assert_failure("mount on a non-empty folder");
    assert!(out.stderr.contains("not empty"), "{}", out.stderr);
    assert_eq!(out.stderr_lines().len(), 1, "one line: {}", out.stderr);

    // Background mount, then umount through the CLI.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    env.home.run_async(["mount", mnt]).await.assert_success("background mount");
    assert!(is_mounted(dir.path()));
    let again = env.home.run_async(["mount", mnt]).await;
    again.assert_failure("mounting twice");
    assert!(again.stderr.contains("already mounted"), "{}", again.stderr);
    env.home.run_async(["umount", mnt]).await.assert_success("umount");
    wait_for("the background mount to go", UNMOUNT_DEADLINE, || async { (!is_mounted(dir.path())).then_some(()) })
        .await;
    let not = env.home.run_async(["umount", mnt]).await;
    not.assert_failure("umount of a folder that is not mounted");
    assert!(not.stderr.contains("not mounted"), "{}", not.stderr);
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// Fixed overhead we allow on top of the cache budget: runtime, FUSE buffers, NATS client
/// buffers, listings and the mount-wide read-ahead in flight (64 MiB).
const RSS_OVERHEAD: u64 = 96 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_under_the_cache_budget_plus_fixed_overhead() {
    require_fuse!();
    let nats = NatsServer::start();
    let home = TestHome::new();
    home.init(&nats.url()).await;
    let tree = tempfile::tempdir().unwrap();
    // Sparse files: 2 GiB to stream, 64 × 8 MiB to read at once. Their bytes are zeros, but
    // every chunk is a distinct cache entry, which is what the budget is about.
    let big = std::fs::File::create(tree.path().join("two-gib.bin")).unwrap();
    big.set_len(2 << 30).unwrap();
    for i in 0..64 {
        let f = std::fs::File::create(tree.path().join(format!("many/{i:02}.bin"))).or_else(|_| {
            std::fs::create_dir_all(tree.path().join("many"))?;
            std::fs::File::create(tree.path().join(format!("many/{i:02}.bin")))
        });
        f.unwrap().set_len(8 << 20).unwrap();
    }
    let root = tree.path().to_str().unwrap().to_string();
    home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("catalog new");
    let _served = Served::start(&home, &nats, "media").await;
    let budget: u64 = 64 << 20;
    let m = Mounted::start(&home, &["--cache-size", "64M"]);

    let path = m.path().join("media/two-gib.bin");
    let mut dd = Command::new("dd");
    dd.args([&format!("if={}", path.display()), "of=/dev/null", "bs=1M", "status=none"]);
    // A generous hang guard: a debug build on a loaded 2-core machine streams slowly.
    let out = run_with_timeout(dd, Duration::from_secs(600));
    assert!(out.status.success(), "reading 2 GiB failed: {}", out.stderr);
    let after_stream = peak_rss(m.pid());

    let readers: Vec<_> = (0..64)
        .map(|i| {
            let p = m.path().join(format!("media/many/{i:02}.bin"));
            std::thread::spawn(move || Command::new("cat").arg(&p).stdout(Stdio::null()).status().map(|s| s.success()))
        })
        .collect();
    for r in readers {
        assert!(matches!(r.join(), Ok(Ok(true))), "a parallel read failed");
    }
    let after_parallel = peak_rss(m.pid());
    eprintln!(
        "peak RSS: {} MiB after 2 GiB, {} MiB after 64 parallel files (budget {} MiB + overhead {} MiB)",
        after_stream >> 20,
        after_parallel >> 20,
        budget >> 20,
        RSS_OVERHEAD >> 20
    );
    assert!(after_stream < budget + RSS_OVERHEAD, "peak RSS {after_stream} after streaming 2 GiB");
    assert!(after_parallel < budget + RSS_OVERHEAD, "peak RSS {after_parallel} with 64 files open");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_only_peer_is_read_through_the_mount_and_the_cli() {
    require_fuse!();
    let small = pseudo_random_bytes(7, 700_000);
    let nats = NatsServer::start();
    let home = TestHome::new();
    home.init(&nats.url()).await;
    let tree = tempfile::tempdir().unwrap();
    write_file(tree.path(), "old/peer.bin", &small);
    let root = tree.path().to_str().unwrap().to_string();
    home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("catalog new");
    // Answers only `get` and v1 `download`, as an original Natster catalog server does.
    let _served = Served::start_with(&home, &nats, "media", &["--v1-only"]).await;

    let out = home.path().join("peer.bin");
    home.run_async(["catalog", "download", "media", "/old/peer.bin", out.to_str().unwrap()])
        .await
        .assert_success("download from a v1 peer");
    assert_eq!(std::fs::read(&out).unwrap(), small);

    let m = Mounted::start(&home, &[]);
    let mounted = m.path().join("media/old/peer.bin");
    assert_eq!(std::fs::read(&mounted).unwrap(), small);
    // A ranged read on a fresh descriptor is served from the chunks the v1 download cached.
    let mut part = vec![0u8; 3 * 4096];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&mounted).unwrap(), &mut part, 100 * 4096).unwrap();
    assert_eq!(part, small[100 * 4096..103 * 4096]);
    m.stop();
}
