//! The mount in the network's normal weather: catalog server and nats-server restarts during
//! a read, a frozen catalog server, a mount started before its catalog is served, a catalog
//! that never answers its listing, and stops while NATS is down. Real nats-server, real
//! catalog server, real FUSE mount; every interaction with the mount is bounded.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mounted::{bounded, fuse_available, Mounted, MOUNT_IO_DEADLINE};
use common::*;
use natster_mount::fs::mount::is_mounted;
use sha2::{Digest, Sha256};

const BIG: usize = 200 * 1024 * 1024;

struct Env {
    nats: NatsServer,
    home: TestHome,
    _tree: tempfile::TempDir,
}

/// A home with catalog `media` indexing `files`, not yet served.
async fn env_with(files: &[(&str, Vec<u8>)]) -> Env {
    let nats = NatsServer::start();
    let (home, tree) = home_with_catalog(&nats, files).await;
    Env { nats, home, _tree: tree }
}

/// Reads `path` whole on a thread in 1 MiB blocks, counting progress; returns its sha256.
fn spawn_reader(path: PathBuf, progress: Arc<AtomicU64>) -> std::sync::mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let mut file = std::fs::File::open(&path)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    return Ok(hex::encode(hasher.finalize()));
                }
                hasher.update(&buf[..n]);
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
        })();
        let _ = tx.send(result);
    });
    rx
}

/// Waits (bounded) until the reader has read at least `bytes`.
fn wait_progress(progress: &AtomicU64, bytes: u64, m: &Mounted) {
    let until = Instant::now() + MOUNT_IO_DEADLINE;
    while progress.load(Ordering::Relaxed) < bytes {
        assert!(Instant::now() < until, "read made no progress past {bytes} bytes:\n{}", tail(&m.log(), 30));
        std::thread::sleep(POLL);
    }
}

fn finish(rx: std::sync::mpsc::Receiver<std::io::Result<String>>, m: &Mounted) -> String {
    match rx.recv_timeout(MOUNT_IO_DEADLINE) {
        Ok(Ok(sum)) => sum,
        Ok(Err(e)) => panic!("read through the mount failed: {e}\n{}", tail(&m.log(), 40)),
        Err(_) => panic!("read through the mount hung\n{}", tail(&m.log(), 40)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_catalog_server_and_nats_server_restarts() {
    if !fuse_available() {
        return;
    }
    let one = pseudo_random_bytes(11, BIG);
    let two = pseudo_random_bytes(12, BIG);
    let three = pseudo_random_bytes(13, 64 * 1024 * 1024);
    let (sum_one, sum_two, sum_three) = (sha256_hex(&one), sha256_hex(&two), sha256_hex(&three));
    let mut env = env_with(&[("one.bin", one), ("two.bin", two), ("three.bin", three)]).await;
    let mut served = Some(Served::start(&env.home, &env.nats, "media").await);
    // Small cache: the big files cannot be fetched whole through a v1 fallback.
    let m = Mounted::start(&env.home, &["--cache-size", "32M", "--read-timeout", "20"]);

    // 1. The catalog server is killed mid-read and back 3 s later.
    let progress = Arc::new(AtomicU64::new(0));
    let reader = spawn_reader(m.path().join("media/one.bin"), progress.clone());
    wait_progress(&progress, 20 << 20, &m);
    drop(served.take());
    let killed_at = progress.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    served = Some(Served::start(&env.home, &env.nats, "media").await);
    assert_eq!(finish(reader, &m), sum_one, "bytes read across a catalog server restart differ");
    assert!(killed_at < BIG as u64, "the restart happened mid-read");
    eprintln!("catalog server killed after {} MiB of {} MiB read", killed_at >> 20, BIG >> 20);

    // 2. nats-server restarts mid-read (same port; every client reconnects).
    let progress = Arc::new(AtomicU64::new(0));
    let reader = spawn_reader(m.path().join("media/two.bin"), progress.clone());
    wait_progress(&progress, 20 << 20, &m);
    env.nats.restart();
    assert_eq!(finish(reader, &m), sum_two, "bytes read across a nats-server restart differ");
    if let Some(s) = served.as_mut() {
        s.assert_running();
    }

    // 3. No v1 latch: another large file, on the same mount, reads through v2.
    let path = m.path().join("media/three.bin");
    let sum = bounded("sha256 of three.bin", MOUNT_IO_DEADLINE, move || {
        std::fs::read(&path).map(|b| sha256_hex(&b)).map_err(|e| e.to_string())
    });
    assert_eq!(sum.as_deref(), Ok(sum_three.as_str()), "{}", tail(&m.log(), 20));
    assert!(!m.log().contains("v1"), "the mount never fell back to v1:\n{}", m.log());
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_started_before_serving_reads_once_serving_starts() {
    if !fuse_available() {
        return;
    }
    let big = pseudo_random_bytes(21, 24 * 1024 * 1024);
    let want = sha256_hex(&big);
    let env = env_with(&[("big.bin", big)]).await;
    // 16 MiB cache: the file is larger than half of it, so only v2 can read it.
    let m = Mounted::start(&env.home, &["--cache-size", "16M", "--read-timeout", "5"]);
    let path = m.path().join("media/big.bin");
    let listed = path.clone();
    assert!(bounded("stat", MOUNT_IO_DEADLINE, move || listed.exists()), "own catalog listed from its index");

    let _served = Served::start(&env.home, &env.nats, "media").await;
    let sum = bounded("read of big.bin", MOUNT_IO_DEADLINE, move || {
        std::fs::read(&path).map(|b| sha256_hex(&b)).map_err(|e| e.to_string())
    });
    assert_eq!(sum.as_deref(), Ok(want.as_str()), "{}", tail(&m.log(), 20));
    m.stop();
}

/// pread of `len` bytes at `offset`, timed.
fn timed_pread(path: &Path, offset: u64, len: usize) -> (std::io::Result<Vec<u8>>, Duration) {
    let path = path.to_path_buf();
    bounded("pread", MOUNT_IO_DEADLINE, move || {
        let started = Instant::now();
        let result = std::fs::File::open(&path).and_then(|f| {
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, offset)?;
            buf.truncate(n);
            Ok(buf)
        });
        (result, started.elapsed())
    })
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a child process of this test.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
}

/// Resumes a stopped process when dropped, so a failing test leaves nothing frozen.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child process of this test.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_gives_eio_by_the_read_timeout_and_reads_after_it_thaws() {
    if !fuse_available() {
        return;
    }
    let data = pseudo_random_bytes(31, 8 * 1024 * 1024);
    let env = env_with(&[("clip.bin", data.clone())]).await;
    let served = Served::start(&env.home, &env.nats, "media").await;
    let m = Mounted::start(&env.home, &["--read-timeout", "3"]);
    let path = m.path().join("media/clip.bin");
    // A first read opens the file's session while the server answers.
    let (first, _) = timed_pread(&path, 0, 4096);
    assert_eq!(first.expect("read before the freeze"), &data[..4096]);

    signal(served.pid(), libc::SIGSTOP);
    let thaw = Thaw(served.pid());
    let offset = 6 * 1024 * 1024;
    let (frozen, took) = timed_pread(&path, offset, 4096);
    eprintln!("frozen server: EIO after {took:?} (read timeout 3 s)");
    let err = frozen.expect_err("a read from a frozen server returned data");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(4),
        "EIO after {took:?}, promised 3 s:\n{}",
        tail(&m.log(), 20)
    );
    assert!(m.log().contains("unreachable"), "a log line says what was unreachable:\n{}", m.log());

    drop(thaw);
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (again, _) = timed_pread(&path, offset, 4096);
        match again {
            Ok(bytes) => {
                assert_eq!(bytes, &data[offset as usize..offset as usize + 4096]);
                break;
            }
            Err(e) => assert!(Instant::now() < until, "still failing after SIGCONT: {e}\n{}", tail(&m.log(), 20)),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_whose_listing_never_answers_does_not_hold_up_the_mount() {
    if !fuse_available() {
        return;
    }
    let data = pseudo_random_bytes(41, 300_000);
    let env = env_with(&[("ok.bin", data.clone())]).await;
    let _served = Served::start(&env.home, &env.nats, "media").await;
    // A second own catalog whose "server" takes every request and never answers.
    let silent_tree = tempfile::tempdir().expect("tree");
    write_file(silent_tree.path(), "never.bin", b"never");
    let root = silent_tree.path().to_str().expect("utf-8").to_string();
    env.home.run_async(["catalog", "new", "silent", root.as_str()]).await.assert_success("catalog new silent");
    let black_hole = connect(&env.nats.url()).await;
    let _sink = black_hole.subscribe("natster.catalog.silent.>").await.expect("subscribe");
    black_hole.flush().await.expect("flush");

    let started = Instant::now();
    let m = Mounted::start(&env.home, &[]);
    let up = started.elapsed();
    eprintln!("mount with a silent catalog up after {up:?}");
    assert!(up < Duration::from_secs(3), "mount took {up:?} to appear (promised 2 s, plus process start)");
    let path = m.path().join("media/ok.bin");
    let got = bounded("read of the answering catalog", MOUNT_IO_DEADLINE, move || std::fs::read(path));
    assert_eq!(got.expect("read"), data);
    let listed = m.path().join("silent/never.bin");
    assert!(bounded("stat", MOUNT_IO_DEADLINE, move || listed.exists()), "the silent catalog shows its index");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_stops_within_two_seconds_while_nats_is_down() {
    if !fuse_available() {
        return;
    }
    let mut env = env_with(&[("a.bin", pseudo_random_bytes(51, 1000))]).await;
    let _served = Served::start(&env.home, &env.nats, "media").await;
    let m = Mounted::start(&env.home, &[]);
    let path = m.path().to_path_buf();
    env.nats.stop();
    let started = Instant::now();
    m.stop();
    let took = started.elapsed();
    eprintln!("mount stopped {took:?} after SIGTERM with NATS down");
    assert!(took < Duration::from_millis(2500), "mount took {took:?} to stop after SIGTERM");
    assert!(!is_mounted(&path), "stale mount left behind");
}
