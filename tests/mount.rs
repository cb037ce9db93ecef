//! The mount on a real FUSE filesystem, over a real nats-server and catalog server, read with
//! real programs (`ls`, `sha256sum`, `dd`, `cat`, `ffprobe`, `touch`, `mkdir`, `rm`, `mv`).
//! Without /dev/fuse or fusermount3 each test is recorded as skipped (see `require_fuse!`),
//! and fails under `CI=true`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mounted::{bounded, Mounted, MOUNT_IO_DEADLINE, UNMOUNT_DEADLINE};
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
    let (home, tree) = home_with_catalog(&nats, files).await;
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

// Bounded touches of the mount: a hung FUSE call fails the test naming what hung, instead
// of stalling the suite (the mount's guard then detaches the mount).

/// Reads a whole file on the mount (bounded).
fn try_read(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    bounded(&format!("read of {}", path.display()), MOUNT_IO_DEADLINE, move || std::fs::read(p))
}

/// [`try_read`], failing the test on an error.
fn read(path: &Path) -> Vec<u8> {
    try_read(path).unwrap_or_else(|e| panic!("read of {}: {e}", path.display()))
}

/// [`walk`] of a folder on the mount (bounded).
fn walk_mount(root: &Path) -> Vec<(String, bool, u64)> {
    let r = root.to_path_buf();
    bounded(&format!("walk of {}", root.display()), MOUNT_IO_DEADLINE, move || walk(&r))
}

/// [`file_names`] of a folder on the mount (bounded).
fn names(dir: &Path) -> Vec<String> {
    let d = dir.to_path_buf();
    bounded(&format!("listing of {}", dir.display()), MOUNT_IO_DEADLINE, move || file_names(&d))
}

/// Size of a file on the mount (bounded stat).
fn len_of(path: &Path) -> u64 {
    let p = path.to_path_buf();
    bounded(&format!("stat of {}", path.display()), MOUNT_IO_DEADLINE, move || std::fs::metadata(p))
        .unwrap_or_else(|e| panic!("stat of {}: {e}", path.display()))
        .len()
}

/// Whether a path on the mount exists (bounded stat).
fn exists(path: &Path) -> bool {
    let p = path.to_path_buf();
    bounded(&format!("stat of {}", path.display()), MOUNT_IO_DEADLINE, move || p.exists())
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
async fn listing_content_and_xattrs_match_the_source() {
    require_fuse!();
    let env = env_with(&sample_tree()).await;
    let m = Mounted::start(&env.home, &[]);
    let catalog = m.path().join("media");

    // ls -lR: same names, kinds and sizes as the source tree.
    assert_eq!(walk_mount(&catalog), walk(env.tree.path()));
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

/// A user.* extended attribute of a file on the mount, as text (bounded).
fn xattr(path: &Path, name: &str) -> String {
    let (p, n) = (path.to_path_buf(), name.to_string());
    bounded(&format!("getxattr {name} of {}", path.display()), MOUNT_IO_DEADLINE, move || xattr_unbounded(&p, &n))
}

fn xattr_unbounded(path: &Path, name: &str) -> String {
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
    let piece = tempfile::NamedTempFile::new().unwrap();
    let of_arg = format!("of={}", piece.path().display());

    // dd bs=4k skip=N count=M at 50 pseudo-random offsets.
    let blocks = (big.len() / 4096) as u64;
    let mut state = 42u64;
    for _ in 0..50 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let skip = (state >> 33) % blocks;
        let count = 1 + (state >> 20) % 9;
        let mut dd = Command::new("dd");
        dd.args([
            file_arg.as_str(),
            &of_arg,
            "bs=4k",
            &format!("skip={skip}"),
            &format!("count={count}"),
            "status=none",
        ]);
        let out = run_with_timeout(dd, Duration::from_secs(120));
        assert!(out.status.success(), "dd failed: {}", out.stderr);
        let from = (skip * 4096) as usize;
        let to = (from + (count * 4096) as usize).min(big.len());
        assert!(std::fs::read(piece.path()).unwrap() == big[from..to], "dd skip={skip} count={count} differs");
    }

    // 4 parallel cats of the 64 MiB file.
    let want = sha256_hex(&big);
    let cats: Vec<_> = (0..4)
        .map(|_| {
            let path = file.clone();
            std::thread::spawn(move || {
                let (ok, out, err) = sh("sha256sum", &[path.to_str().unwrap()]);
                assert!(ok, "sha256sum (a parallel cat) failed: {err}");
                out.split_whitespace().next().unwrap_or_default().to_string()
            })
        })
        .collect();
    for cat in cats {
        assert_eq!(cat.join().expect("cat thread"), want);
    }
    m.stop();
}

/// Pages of `path` the kernel holds in its page cache (mincore over a read-only mapping).
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    let len = f.metadata().expect("stat").len() as usize;
    if len == 0 {
        return 0;
    }
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below; mincore
    // writes one byte per page into `vec`, which has one byte per page of `len`.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert!(addr != libc::MAP_FAILED, "mmap {}: {}", path.display(), std::io::Error::last_os_error());
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    }
    vec.iter().filter(|b| **b & 1 == 1).count()
}

/// Drops `path`'s pages from the kernel's page cache (posix_fadvise DONTNEED, which works
/// on a FUSE file, unlike the global drop_caches which needs a privileged host and would
/// slow every other process) and checks with mincore that none is left, so that the next
/// read reaches the mount process. Bounded, as every touch of the mount.
fn drop_page_cache(path: &Path) {
    let p = path.to_path_buf();
    bounded(&format!("dropping the page cache of {}", path.display()), MOUNT_IO_DEADLINE, move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&p).expect("open");
        // SAFETY: fadvise on an open descriptor.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise DONTNEED on {}", p.display());
        assert_eq!(resident_pages(&p), 0, "{} still has pages in the page cache", p.display());
    });
}

/// The counter's value once it has stopped moving: requests already sent travel through
/// nats-server to the counter in milliseconds, so a value unchanged for 500 ms is final.
/// Bounded: a counter still moving after 20 s fails the test.
async fn settled(count: &AtomicU64) -> u64 {
    let until = Instant::now() + Duration::from_secs(20);
    let mut last = count.load(Ordering::SeqCst);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let now = count.load(Ordering::SeqCst);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(500) {
            return now;
        }
        assert!(Instant::now() < until, "chunk requests still arriving after 20 s ({now})");
    }
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

    assert_eq!(read(&first), bytes);
    let after_first = settled(&reads).await;
    assert!(after_first > 0, "the first read must fetch chunks");
    // The kernel kept the pages (FOPEN_KEEP_CACHE); drop them, or the re-read would never
    // reach the mount and prove nothing about its chunk cache.
    let first_path = first.clone();
    assert!(bounded("mincore", MOUNT_IO_DEADLINE, move || resident_pages(&first_path)) > 0, "pages cached");
    drop_page_cache(&first);
    assert_eq!(read(&first), bytes);
    assert_eq!(read(&second), bytes);
    assert_eq!(settled(&reads).await, after_first, "re-reading sent chunk requests");
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
    assert_eq!(read(&first), bytes, "nothing changed");
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
    let timeout = Duration::from_secs(3);
    let m = Mounted::start(&env.home, &["--read-timeout", "3"]);
    let cached_path = m.path().join("media/cached.bin");
    assert_eq!(read(&cached_path), cached);
    assert!(exists(&m.path().join("media/uncached.bin")), "listed before going offline");

    drop(env.served.take()); // the catalog server stops: every request gets "no responders"

    // The mount retries inside the read's one deadline, so EIO comes at about --read-timeout:
    // not at once (the timeout would be untested) and not a multiple of it.
    let uncached_path = m.path().join("media/uncached.bin");
    let started = Instant::now();
    let got = try_read(&uncached_path);
    let took = started.elapsed();
    let err = got.expect_err("reading uncached data of an offline catalog succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "expected EIO, got {err}");
    assert!(took >= timeout - Duration::from_millis(200), "EIO after {took:?}, before the {timeout:?} read timeout");
    assert!(
        took < timeout + Duration::from_millis(1500),
        "EIO after {took:?}, long after the {timeout:?} read timeout"
    );
    assert!(m.log().contains("read failed"), "a log line names the failure:\n{}", m.log());

    // Cached data still reads, and the listing is still there.
    assert_eq!(read(&cached_path), cached);
    assert_eq!(walk_mount(&m.path().join("media")).len(), 2);
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_changes_appear_in_the_mount() {
    require_fuse!();
    let env =
        env_with(&[("keep.txt", b"keep".to_vec()), ("gone.txt", b"gone".to_vec()), ("grow.txt", b"1".to_vec())]).await;
    let m = Mounted::start(&env.home, &["--listing-ttl", "60"]);
    let dir = m.path().join("media");
    assert_eq!(names(&dir), ["gone.txt", "grow.txt", "keep.txt"]);
    assert_eq!(len_of(&dir.join("grow.txt")), 1);
    assert_eq!(read(&dir.join("grow.txt")), b"1");

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
        async move { (names(&d) == ["grow.txt", "keep.txt", "new.txt"]).then_some(()) }
    })
    .await;
    assert_eq!(len_of(&dir.join("grow.txt")), 5);
    assert_eq!(read(&dir.join("grow.txt")), b"grown");
    assert!(!exists(&dir.join("gone.txt")));
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
    let out = env.home.run_async(["mount", mnt]).await;
    out.assert_success("background mount");
    let _guard = BackgroundMount::from_output(&out.stdout, dir.path());
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

/// A detached mount started by `natster-mount mount` (no --foreground): Drop detaches the
/// mount and kills the process it printed, so a failing test leaves neither behind.
struct BackgroundMount {
    pid: i32,
    dir: std::path::PathBuf,
}

impl BackgroundMount {
    /// From the line `mounted on DIR (pid N, log ...)`.
    fn from_output(stdout: &str, dir: &Path) -> BackgroundMount {
        let pid = stdout
            .split("(pid ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {stdout:?}"));
        BackgroundMount { pid, dir: dir.to_path_buf() }
    }
}

impl Drop for BackgroundMount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
        }
        // Only our mount process: the pid is checked against its command line first.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("natster-mount") {
            // SAFETY: kill(2) on the mount process this test started.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
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

/// What the mount may hold beyond its chunk cache: the mount-wide read-ahead budget in
/// flight (64 MiB, README); one chunk of slack for each of the 64 reads the kernel may have
/// in flight (src/fs/fuse.rs MAX_BACKGROUND: a read that straddles a chunk boundary fetches
/// the whole chunk past its last byte); plus 48 MiB for the rest: the binary and runtime
/// (8 MiB resident before any read, measured), FUSE request buffers and the NATS client's
/// buffers (a few MiB), spare chunk mappings (8 MiB, src/chunk_memory.rs), listings and
/// allocator slack. Without a cache budget the 2 GiB stream alone would pass this bound many
/// times over.
const RSS_OVERHEAD: u64 = (64 + 48) * 1024 * 1024 + 64 * natster_mount::server::DEFAULT_CHUNK_SIZE as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_under_the_cache_budget_plus_fixed_overhead() {
    require_fuse!();
    let nats = NatsServer::start();
    let home = TestHome::new();
    home.init(&nats.url()).await;
    let tree = tempfile::tempdir().unwrap();
    // A sparse 2 GiB file to stream (every chunk index is its own cache entry), and 64
    // distinct pseudo-random 8 MiB files read at once: 64 hashes, 512 MiB of distinct
    // chunks, eight times the cache.
    let big = std::fs::File::create(tree.path().join("two-gib.bin")).unwrap();
    big.set_len(2 << 30).unwrap();
    for i in 0..64u64 {
        write_file(tree.path(), &format!("many/{i:02}.bin"), &pseudo_random_bytes(1000 + i, 8 << 20));
    }
    let root = tree.path().to_str().unwrap().to_string();
    home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("catalog new");
    let _served = Served::start(&home, &nats, "media").await;
    let budget: u64 = 64 << 20;
    let m = Mounted::start(&home, &["--cache-size", "64M"]);
    let before = peak_rss(m.pid());

    let path = m.path().join("media/two-gib.bin");
    let mut dd = Command::new("dd");
    dd.args([&format!("if={}", path.display()), "of=/dev/null", "bs=1M", "status=none"]);
    // A generous hang guard: a debug build on a loaded 2-core machine streams slowly.
    let out = run_with_timeout(dd, Duration::from_secs(600));
    assert!(out.status.success(), "reading 2 GiB failed: {}", out.stderr);
    let after_stream = peak_rss(m.pid());

    let readers: Vec<_> = (0..64u64)
        .map(|i| {
            let p = m.path().join(format!("media/many/{i:02}.bin"));
            std::thread::spawn(move || {
                let (ok, out, err) = sh("sha256sum", &[p.to_str().unwrap()]);
                assert!(ok, "parallel read of {}: {err}", p.display());
                assert!(
                    out.starts_with(&sha256_hex(&pseudo_random_bytes(1000 + i, 8 << 20))),
                    "{}: {out}",
                    p.display()
                );
            })
        })
        .collect();
    for r in readers {
        assert!(r.join().is_ok(), "a parallel read failed");
    }
    let after_parallel = peak_rss(m.pid());
    eprintln!(
        "peak RSS: {} MiB at start, {} MiB after 2 GiB, {} MiB after 64 parallel files (cache {} MiB + overhead {} MiB)",
        before >> 20,
        after_stream >> 20,
        after_parallel >> 20,
        budget >> 20,
        RSS_OVERHEAD >> 20
    );
    assert!(after_stream < budget + RSS_OVERHEAD, "peak RSS {} MiB after streaming 2 GiB", after_stream >> 20);
    assert!(after_parallel < budget + RSS_OVERHEAD, "peak RSS {} MiB with 64 files read at once", after_parallel >> 20);
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
    assert_eq!(read(&mounted), small);
    assert!(
        xattr(&mounted, "user.natster.verified").starts_with("unverified"),
        "an original peer is shown as unverified"
    );
    assert!(m.log().contains("answers unsigned"), "a log line says the catalog is unverified:\n{}", m.log());
    // A ranged read on a fresh descriptor, with the kernel's pages dropped, is served by the
    // mount from the chunks the v1 download cached.
    drop_page_cache(&mounted);
    let part = bounded("ranged read", MOUNT_IO_DEADLINE, move || {
        let mut part = vec![0u8; 3 * 4096];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&mounted)?, &mut part, 100 * 4096)?;
        std::io::Result::Ok(part)
    })
    .expect("ranged read");
    assert_eq!(part, small[100 * 4096..103 * 4096]);
    m.stop();
}
