//! README claims about the mount's read path, measured where they show: on the wire. A plain
//! subscription to `natster.catalog.media.read` records every chunk request the mount sends
//! (beside the catalog server's queue group), and reads use O_DIRECT so that each `pread`
//! reaches the mount as one FUSE read, with no kernel read-ahead or page cache in between.
//! Claims: concurrent readers of one missing chunk make one request, read-ahead runs ahead
//! of sequential reads and resets on a seek, prefetching stays within the mount-wide budget,
//! and a file unshared while mounted reads as EACCES. Real nats-server, `catalog serve` and
//! FUSE mounts (recorded as skipped without FUSE); every touch of a mount bounded.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::mounted::{bounded, Mounted, MOUNT_IO_DEADLINE};
use common::operator::*;
use common::*;

const CHUNK: u64 = natster_mount::server::DEFAULT_CHUNK_SIZE as u64; // `catalog serve`'s default chunk size
const MIB: u64 = 1024 * 1024;

/// A home serving catalog `media` indexed from `files`, against a fresh nats-server.
async fn served_home(files: &[(&str, &[u8])]) -> (NatsServer, TestHome, Served, tempfile::TempDir) {
    let nats = NatsServer::start();
    let (home, tree) = home_with_catalog(&nats, files).await;
    let served = Served::start(&home, &nats, "media").await;
    (nats, home, served, tree)
}

/// Opens a file on the mount with O_DIRECT (bounded).
fn open_direct(path: &Path) -> Arc<File> {
    let p = path.to_path_buf();
    let f = bounded(&format!("open of {}", path.display()), MOUNT_IO_DEADLINE, move || {
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(p)
    });
    Arc::new(f.unwrap_or_else(|e| panic!("O_DIRECT open of {}: {e}", path.display())))
}

/// pread(2) of `len` bytes at `offset` into a page-aligned buffer (O_DIRECT needs one),
/// on the calling thread: Err(errno).
fn pread_now(file: &File, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len + 4096];
    let skip = buf.as_ptr().align_offset(4096);
    // SAFETY: the buffer has `len` bytes from `skip`.
    let n = unsafe { libc::pread(file.as_raw_fd(), buf[skip..].as_mut_ptr().cast(), len, offset as libc::off_t) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(buf[skip..skip + n as usize].to_vec())
}

/// [`pread_now`] bounded.
fn pread(file: &Arc<File>, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    let f = file.clone();
    bounded(&format!("pread at {offset}"), MOUNT_IO_DEADLINE, move || pread_now(&f, offset, len))
}

/// Chunk indices the recorded requests from the `from`-th on asked for, with repeats.
fn chunks_asked(reads: &Requests, from: usize) -> Vec<(String, u64)> {
    reads.reads()[from..]
        .iter()
        .flat_map(|r| (r.first_chunk..r.first_chunk + u64::from(r.count)).map(move |i| (r.session.clone(), i)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_missing_chunk_make_one_request() {
    require_fuse!();
    let bytes = pseudo_random_bytes(31, (16 * CHUNK) as usize);
    let (nats, home, _served, _tree) = served_home(&[("f.bin", &bytes)]).await;
    let reads = Requests::record(&nats.url(), "natster.catalog.media.read").await;
    let m = Mounted::start(&home, &[]);
    let path = m.path().join("media/f.bin");
    // One read first, so the session is open and the readers race only for the chunk.
    assert_eq!(pread(&open_direct(&path), 0, 4096).unwrap(), &bytes[..4096]);
    let before = reads.settled().await;

    // Chunk 10 (not read ahead: the warm-up ran ahead by one chunk at most), by 6 readers on
    // their own descriptors released at once; a fresh descriptor reading far from 0 has no
    // read-ahead of its own.
    const READERS: usize = 6;
    let start = Arc::new(Barrier::new(READERS));
    let files: Vec<Arc<File>> = (0..READERS).map(|_| open_direct(&path)).collect();
    let got = bounded("concurrent preads", MOUNT_IO_DEADLINE, move || {
        let threads: Vec<_> = files
            .into_iter()
            .map(|f| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    pread_now(&f, 10 * CHUNK, CHUNK as usize)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("reader thread")).collect::<Vec<_>>()
    });
    for g in got {
        assert!(g.as_ref().is_ok_and(|g| g[..] == bytes[10 * CHUNK as usize..11 * CHUNK as usize]), "{:?}", g.err());
    }
    reads.settled().await;
    let asked = chunks_asked(&reads, before);
    let tens = asked.iter().filter(|(_, i)| *i == 10).count();
    assert_eq!(tens, 1, "chunk 10 asked for {tens} times by {READERS} readers (all asked: {asked:?})");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_runs_ahead_of_sequential_reads_and_a_seek_resets_it() {
    require_fuse!();
    let bytes = pseudo_random_bytes(32, (40 * MIB) as usize);
    let (nats, home, _served, _tree) = served_home(&[("f.bin", &bytes)]).await;
    let reads = Requests::record(&nats.url(), "natster.catalog.media.read").await;
    let m = Mounted::start(&home, &[]);
    let file = open_direct(&m.path().join("media/f.bin"));

    // Sequential: 16 reads of 128 KiB (2 MiB, chunks 0..8) grow the window to its maximum.
    const STEP: u64 = 128 * 1024;
    for k in 0..16 {
        let at = k * STEP;
        assert!(pread(&file, at, STEP as usize).unwrap() == bytes[at as usize..(at + STEP) as usize]);
    }
    let after_sequential = reads.settled().await;
    let furthest = chunks_asked(&reads, 0).iter().map(|(_, i)| *i).max().unwrap();
    println!("sequential reads of chunks 0..8 asked up to chunk {furthest}");
    assert!(furthest >= 8 + (8 * MIB / CHUNK), "read-ahead ran only to chunk {furthest}");

    // A seek far past everything read ahead: the next small read asks for its 16 KiB leaf
    // only (a record of one leaf, counted in leaves), not for its chunk or anything after it.
    let far = 32 * MIB;
    assert!(pread(&file, far, 4096).unwrap() == bytes[far as usize..far as usize + 4096]);
    reads.settled().await;
    let leaf = natster_mount::chunk_tree::LEAF_SIZE as u64;
    let after: Vec<_> = reads.reads()[after_sequential..].to_vec();
    assert!(after.iter().all(|r| r.unit == Some(leaf as u32)), "leaf records only: {after:?}");
    let asked: BTreeSet<u64> = chunks_asked(&reads, after_sequential).into_iter().map(|(_, i)| i).collect();
    assert_eq!(asked, BTreeSet::from([far / leaf]), "after the seek");
    drop(file); // an open file keeps the mount busy
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_of_many_files_stays_within_the_mount_wide_budget() {
    require_fuse!();
    // 12 files whose read-ahead would each put 8+ MiB in flight at once: about 100 MiB
    // without the 64 MiB budget. One byte differs, so no two share a chunk.
    const FILES: usize = 12;
    const BUDGET: u64 = 64 * MIB;
    const WINDOW: u64 = 16 * MIB;
    let base = pseudo_random_bytes(33, (18 * MIB) as usize);
    let contents: Vec<Vec<u8>> = (0..FILES)
        .map(|i| {
            let mut b = base.clone();
            b[0] = i as u8;
            b
        })
        .collect();
    let names: Vec<String> = (0..FILES).map(|i| format!("f{i:02}.bin")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(String::as_str).zip(contents.iter().map(|c| &c[..])).collect();
    let (nats, home, served, _tree) = served_home(&files).await;
    let reads = Requests::record(&nats.url(), "natster.catalog.media.read").await;
    let m = Mounted::start(&home, &["--cache-size", "1G"]);

    // Each file: sequential reads of 128 KiB grow its window from one chunk (the first read)
    // by doubling to 8 MiB, and prefetch up to about 8.75 MiB. One file at a time, each
    // prefetch done before the next, so none is skipped.
    const STEP: u64 = 128 * 1024;
    let warm_up = u64::from((8 * MIB / CHUNK).trailing_zeros()) + 1;
    let handles: Vec<Arc<File>> = names.iter().map(|n| open_direct(&m.path().join("media").join(n))).collect();
    for (f, bytes) in handles.iter().zip(&contents) {
        for k in 0..warm_up {
            let at = k * STEP;
            assert!(pread(f, at, STEP as usize).unwrap() == bytes[at as usize..(at + STEP) as usize]);
        }
        reads.settled().await;
    }

    // The server stops answering: whatever is asked for now stays in flight. One more read
    // per file is served from the cache and doubles its window to 16 MiB: each file wants
    // about 8 MiB more at once.
    let frozen = Frozen::new(served.pid());
    let before = reads.len();
    for (f, bytes) in handles.iter().zip(&contents) {
        let at = warm_up * STEP;
        assert!(pread(f, at, STEP as usize).unwrap() == bytes[at as usize..(at + STEP) as usize]);
    }
    reads.settled().await;
    let in_flight: BTreeSet<(String, u64)> = chunks_asked(&reads, before).into_iter().collect();
    let bytes_in_flight = in_flight.len() as u64 * CHUNK;
    let files_asked: BTreeSet<&String> = in_flight.iter().map(|(s, _)| s).collect();
    println!(
        "in flight with the server frozen: {} MiB over {} of {FILES} files",
        bytes_in_flight / MIB,
        files_asked.len()
    );
    assert!(bytes_in_flight > WINDOW, "read-ahead did not run ({bytes_in_flight} bytes)");
    assert!(
        bytes_in_flight <= BUDGET + WINDOW,
        "{} MiB of read-ahead in flight, over the {} MiB budget",
        bytes_in_flight / MIB,
        BUDGET / MIB
    );
    drop(frozen);
    drop(handles); // open files keep the mount busy
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_unshared_while_mounted_reads_as_eacces() {
    require_fuse!();
    // The operator world of tests/sharing.rs: operator-mode nats-server, alice and bob.
    let op_dir = operator_dir();
    let op = op_dir.path();
    operator_init(op, free_port());
    let _up = OperatorUp::start(op);
    let alice = Person::with_account(op, "alice").await;
    let bob = Person::with_account(op, "bob").await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    let clip = pseudo_random_bytes(34, (3 * MIB) as usize);
    write_file(tree.path(), "clip.bin", &clip);
    write_file(tree.path(), "later.txt", b"read only after the unshare\n");
    let big = pseudo_random_bytes(35, (4 * MIB) as usize);
    write_file(tree.path(), "big.bin", &big);
    alice.run(&["catalog", "new", "media", tree.path().to_str().unwrap()]).await.assert_success("new");
    alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    let _serve = Serve::start(&alice, "media");
    let bob_contents = || bob.run(&["catalog", "contents", "media"]);
    wait_for("alice's catalog to answer bob", std::time::Duration::from_secs(20), || async {
        bob_contents().await.status.success().then_some(())
    })
    .await;

    let m = Mounted::start(&bob.home, &[]);
    let read = |p: std::path::PathBuf| {
        bounded(&format!("read of {}", p.display()), MOUNT_IO_DEADLINE, move || std::fs::read(p))
    };
    assert!(read(m.path().join("media/clip.bin")).unwrap() == clip, "bob reads alice's file");
    // A file bob has open with a session, read only at its start.
    let open_big = open_direct(&m.path().join("media/big.bin"));
    assert!(pread(&open_big, 0, 4096).unwrap() == big[..4096]);

    alice.run(&["catalog", "unshare", "media", "bob"]).await.assert_success("unshare");
    // A file bob never read: its open is refused, and the mount says EACCES, not EIO.
    let later = read(m.path().join("media/later.txt"));
    assert_eq!(later.as_ref().map_err(|e| e.raw_os_error()).err(), Some(Some(libc::EACCES)), "{later:?}");
    // The server checks every request: an uncached range of a file with an open session too.
    assert_eq!(pread(&open_big, 3 * MIB, 4096).map(|b| b.len()), Err(libc::EACCES));
    drop(open_big); // an open file keeps the mount busy
                    // What bob already read stays readable from the mount's chunk cache (the kernel's page
                    // cache dropped first, so the re-read reaches the mount; the server would refuse it).
    let clip_path = m.path().join("media/clip.bin");
    let p = clip_path.clone();
    bounded("dropping the page cache", MOUNT_IO_DEADLINE, move || {
        let f = File::open(p).expect("open");
        // SAFETY: fadvise on an open descriptor.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    });
    let again = read(clip_path);
    println!("re-read of the cached file after the unshare: {:?}", again.as_ref().map(Vec::len));
    assert!(again.is_ok_and(|b| b == clip), "cached data no longer reads");
    m.stop();
}
