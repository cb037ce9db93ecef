//! The read path over a fake chunk source: no NATS, no FUSE. Time is tokio's paused clock, so
//! deadlines are exact and the tests take no wall-clock time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::time::Instant;

use super::super::{ChunkSource, FsError, FsOptions, MountedCatalog, NatsterFs, ReadAhead, ReadNow, ROOT_INO};
use super::OpenFile;
use crate::protocol::{CatalogEntry, CatalogSummary};

/// How the fake behaves on `fetch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    /// Never answers (a SIGSTOPped server).
    Frozen,
    /// Fails at once with a transient error (no responders).
    Down,
    /// Refuses (403).
    Forbidden,
}

/// A chunk source holding whole files in memory, recording every fetch.
struct FakeSource {
    chunk_size: u64,
    files: HashMap<String, Vec<u8>>,
    mode: Mutex<Mode>,
    /// Transient failures still to give before serving.
    fail_first: AtomicU32,
    /// (first, count) of every fetch attempt.
    fetches: Mutex<Vec<(u64, u64)>>,
    /// The record size of every fetch attempt.
    units: Mutex<Vec<u64>>,
    /// What [`ChunkSource::small_unit`] answers.
    small: Mutex<Option<u64>>,
}

impl FakeSource {
    fn new(chunk_size: u64, files: &[(&str, Vec<u8>)]) -> Arc<Self> {
        Arc::new(FakeSource {
            chunk_size,
            files: files.iter().map(|(p, b)| (hash_of(p), b.clone())).collect(),
            mode: Mutex::new(Mode::Serve),
            fail_first: AtomicU32::new(0),
            fetches: Mutex::new(Vec::new()),
            units: Mutex::new(Vec::new()),
            small: Mutex::new(None),
        })
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn fetches(&self) -> Vec<(u64, u64)> {
        self.fetches.lock().unwrap().clone()
    }
}

/// A distinct fake sha256 per path.
fn hash_of(path: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(path.as_bytes()))
}

impl ChunkSource for FakeSource {
    fn listing<'a>(&'a self, _shown: &'a str) -> BoxFuture<'a, Result<Option<crate::listing::Listing>, FsError>> {
        async move { Err(FsError::Remote("not used".into())) }.boxed()
    }

    fn listing_applied(&self, _listing: &crate::listing::Listing) {}

    fn chunk_size<'a>(&'a self, _entry: &'a CatalogEntry) -> BoxFuture<'a, Result<u64, FsError>> {
        let cs = self.chunk_size;
        async move { Ok(cs) }.boxed()
    }

    fn chunk_size_now(&self, _entry: &CatalogEntry) -> Option<u64> {
        Some(self.chunk_size)
    }

    fn whole_file(&self, _entry: &CatalogEntry) -> bool {
        false
    }

    fn small_unit(&self, _entry: &CatalogEntry) -> Option<u64> {
        *self.small.lock().unwrap()
    }

    fn fetch<'a>(
        &'a self,
        entry: &'a CatalogEntry,
        chunk_size: u64,
        first: u64,
        count: u64,
        sink: super::super::source::ChunkSink<'a>,
    ) -> BoxFuture<'a, Result<(), FsError>> {
        async move {
            self.fetches.lock().unwrap().push((first, count));
            self.units.lock().unwrap().push(chunk_size);
            let mode = *self.mode.lock().unwrap();
            if self.fail_first.load(Ordering::SeqCst) > 0 {
                self.fail_first.fetch_sub(1, Ordering::SeqCst);
                return Err(FsError::Unreachable("no responders".into()));
            }
            match mode {
                Mode::Frozen => std::future::pending().await,
                Mode::Down => Err(FsError::Unreachable("no responders".into())),
                Mode::Forbidden => Err(FsError::Forbidden("not shared".into())),
                Mode::Serve => {
                    let bytes = self.files.get(&entry.hash).ok_or(FsError::Remote("unknown hash".into()))?;
                    for i in first..first + count {
                        let from = (i * chunk_size) as usize;
                        let to = (from + chunk_size as usize).min(bytes.len());
                        if from < to {
                            sink(i, Bytes::copy_from_slice(&bytes[from..to]));
                        }
                    }
                    Ok(())
                }
            }
        }
        .boxed()
    }

    fn verification(&self) -> &'static str {
        "fake"
    }
}

fn entry(path: &str, size: u64) -> CatalogEntry {
    CatalogEntry {
        path: path.into(),
        description: String::new(),
        mime_type: "video/mp4".into(),
        hash: hash_of(path),
        byte_size: size,
        mtime: 1_700_000_000,
        tree: None,
    }
}

fn summary(entries: Vec<CatalogEntry>, revision: &str) -> CatalogSummary {
    CatalogSummary {
        name: "c".into(),
        description: String::new(),
        image: None,
        entries,
        revision: revision.into(),
        protocol: 2,
        total_entries: None,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

const CS: u64 = 64 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A filesystem with one catalog "c" over a fake holding `/big.mp4` (16 MiB).
fn fake_fs() -> (Arc<NatsterFs>, Arc<FakeSource>, Vec<u8>) {
    let big = pattern(16 << 20, 7);
    let source = FakeSource::new(CS, &[("/big.mp4", big.clone())]);
    let catalog = Arc::new(MountedCatalog::new("c".into(), "c".into(), "AOWNER".into(), source.clone()));
    let options = FsOptions { read_timeout: READ_TIMEOUT, cache_bytes: 64 << 20, ..FsOptions::default() };
    let fs = Arc::new(NatsterFs::new(vec![catalog], options));
    fs.apply_listing(0, &summary(vec![entry("/big.mp4", big.len() as u64)], "r1"));
    (fs, source, big)
}

/// [`fake_fs`] whose source also offers one chunk tree leaf as its small unit (v2 with a
/// session); the leaf size comes last.
fn fake_fs_with_leaves() -> (Arc<NatsterFs>, Arc<FakeSource>, Vec<u8>, u64) {
    let (fs, source, big) = fake_fs();
    let leaf = crate::chunk_tree::LEAF_SIZE as u64;
    *source.small.lock().unwrap() = Some(leaf);
    (fs, source, big, leaf)
}

fn open_big(fs: &NatsterFs) -> u64 {
    let c = fs.lookup(ROOT_INO, "c").unwrap();
    let f = fs.lookup(c.ino, "big.mp4").unwrap();
    fs.open(f.ino).unwrap()
}

/// Lets spawned prefetches run to completion (the paused clock advances only when idle).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn sequential_reads_prefetch_ahead_and_a_seek_resets() {
    let (fs, source, big) = fake_fs();
    let fh = open_big(&fs);
    let step = 128 * 1024u64;
    for k in 0..4u64 {
        let got = fs.read(fh, k * step, step as u32).await.unwrap();
        assert_eq!(&got[..], &big[(k * step) as usize..((k + 1) * step) as usize]);
        settle().await;
    }
    let fetched_to = source.fetches().iter().map(|(f, n)| f + n).max().unwrap();
    assert!(fetched_to * CS > 4 * step + 2 * step, "read-ahead fetched past what was read: {:?}", source.fetches());
    // Growth: each prefetch asks for more than the one before.
    let sizes: Vec<u64> = source.fetches().iter().skip(1).map(|(_, n)| *n).collect();
    assert!(sizes.windows(2).any(|w| w[1] > w[0]), "window grows on sequential reads: {sizes:?}");
    // What was prefetched is served from the cache.
    let before = source.fetches().len();
    fs.read(fh, 4 * step, step as u32).await.unwrap();
    assert_eq!(source.fetches().len(), before, "prefetched data read without a fetch");
    settle().await;

    // A seek far away reads just what it needs and prefetches nothing.
    let before = source.fetches().len();
    let far = 12 << 20;
    let got = fs.read(fh, far, 4096).await.unwrap();
    assert_eq!(&got[..], &big[far as usize..far as usize + 4096]);
    settle().await;
    let after = source.fetches();
    assert_eq!(after.len(), before + 1, "a seek fetches one run: {after:?}");
    assert_eq!(after[before], (far / CS, 1));
}

#[tokio::test(start_paused = true)]
async fn a_frozen_source_fails_by_the_deadline_and_reads_again_when_it_thaws() {
    let (fs, source, big) = fake_fs();
    let fh = open_big(&fs);
    source.set(Mode::Frozen);
    let started = Instant::now();
    let err = fs.read(fh, 0, 4096).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(took >= READ_TIMEOUT && took <= READ_TIMEOUT + Duration::from_millis(100), "failed after {took:?}");
    // The kernel re-issues a failed read at once: it must not wait a whole timeout again.
    let again = Instant::now();
    assert!(fs.read(fh, 0, 4096).await.is_err());
    assert!(again.elapsed() <= super::GRACE + Duration::from_millis(50), "second read took {:?}", again.elapsed());
    // Thawed: the same open file reads.
    source.set(Mode::Serve);
    let got = fs.read(fh, 0, 4096).await.unwrap();
    assert_eq!(&got[..], &big[..4096]);
    // And the outage is over: a later failure gets a whole timeout again.
    source.set(Mode::Frozen);
    let later = Instant::now();
    assert!(fs.read(fh, 1 << 20, 4096).await.is_err());
    assert!(later.elapsed() >= READ_TIMEOUT, "a new outage gets the whole timeout");
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_within_the_deadline() {
    let (fs, source, big) = fake_fs();
    let fh = open_big(&fs);
    source.fail_first.store(3, Ordering::SeqCst);
    let started = Instant::now();
    let got = fs.read(fh, 100_000, 50_000).await.unwrap();
    assert_eq!(&got[..], &big[100_000..150_000]);
    assert_eq!(source.fetches().len(), 4, "three failures, then success");
    assert!(started.elapsed() < READ_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_source_that_is_down_then_recovers_reads_on_the_same_mount() {
    let (fs, source, big) = fake_fs();
    let fh = open_big(&fs);
    source.set(Mode::Down);
    let started = Instant::now();
    let err = fs.read(fh, 0, 4096).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let took = started.elapsed();
    assert!(took >= READ_TIMEOUT && took <= READ_TIMEOUT + Duration::from_millis(100), "failed after {took:?}");
    assert!(source.fetches().len() > 3, "retried with backoff: {} attempts", source.fetches().len());
    assert!(source.fetches().len() < 40, "backoff bounds the attempts: {}", source.fetches().len());

    // Back within a read's deadline: that read succeeds.
    let fs2 = fs.clone();
    let reader = tokio::spawn(async move { fs2.read(fh, 8192, 4096).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    source.set(Mode::Serve);
    let got = reader.await.unwrap().unwrap();
    assert_eq!(&got[..], &big[8192..12288]);
}

#[tokio::test(start_paused = true)]
async fn refusals_are_not_retried() {
    let (fs, source, _) = fake_fs();
    let fh = open_big(&fs);
    source.set(Mode::Forbidden);
    let err = fs.read(fh, 0, 4096).await.unwrap_err();
    assert_eq!(err.errno(), libc::EACCES);
    assert_eq!(source.fetches().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_readers_of_a_missing_chunk_share_one_fetch() {
    let (fs, source, big) = fake_fs();
    source.set(Mode::Frozen);
    let fhs: Vec<u64> = (0..4).map(|_| open_big(&fs)).collect();
    let readers: Vec<_> = fhs
        .iter()
        .map(|&fh| {
            let fs = fs.clone();
            tokio::spawn(async move { fs.read(fh, 1 << 20, 1000).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(source.fetches().len(), 1, "one fetch for four readers");
    source.set(Mode::Serve);
    // The frozen attempt never returns; the readers fail at the deadline, then one new fetch
    // serves every reader.
    for r in readers {
        assert!(r.await.unwrap().is_err());
    }
    let got = fs.read(fhs[0], 1 << 20, 1000).await.unwrap();
    assert_eq!(&got[..], &big[1 << 20..(1 << 20) + 1000]);
}

#[tokio::test]
async fn chunks_are_shared_only_between_catalogs_of_one_owner() {
    let source = FakeSource::new(CS, &[]);
    let catalog =
        |dir: &str, owner: &str| Arc::new(MountedCatalog::new(dir.into(), dir.into(), owner.into(), source.clone()));
    let fs = NatsterFs::new(
        vec![catalog("a", "AOWNER1"), catalog("b", "AOWNER1"), catalog("c", "AOWNER2")],
        FsOptions::default(),
    );
    let open = |catalog| OpenFile { catalog, entry: entry("/x.mp4", 10), readahead: Mutex::new(ReadAhead::new(1, 2)) };
    assert_eq!(fs.key(&open(0), 4096, 0), fs.key(&open(1), 4096, 0), "same owner: cached once");
    assert_ne!(fs.key(&open(0), 4096, 0), fs.key(&open(2), 4096, 0), "another owner cannot plant chunks");
}

#[tokio::test]
async fn listing_builds_folders_and_diffs_on_refresh() {
    let (fs, _, _) = fake_fs();
    fs.apply_listing(0, &summary(vec![entry("/a/b/one.mp4", 10), entry("/two.mp4", 20)], "r1"));
    let c = fs.lookup(ROOT_INO, "c").unwrap();
    assert!(c.is_dir);
    let a = fs.lookup(c.ino, "a").unwrap();
    let b = fs.lookup(a.ino, "b").unwrap();
    let one = fs.lookup(b.ino, "one.mp4").unwrap();
    assert_eq!((one.size, one.perm, one.is_dir), (10, 0o444, false));
    assert_eq!(fs.xattrs(one.ino).unwrap()[0].1, hash_of("/a/b/one.mp4"));

    // one.mp4 removed (its folders with it), two.mp4 changed, three.mp4 added.
    let mut two = entry("/two.mp4", 30);
    two.hash = hash_of("/two-v2.mp4");
    let inv = fs.apply_listing(0, &summary(vec![two, entry("/three.mp4", 5)], "r2"));
    assert!(matches!(fs.lookup(c.ino, "a"), Err(FsError::NotFound)));
    let two = fs.lookup(c.ino, "two.mp4").unwrap();
    assert_eq!(two.size, 30);
    assert!(fs.lookup(c.ino, "three.mp4").is_ok());
    assert!(inv.entries.contains(&(c.ino, "a".to_string())));
    assert!(inv.entries.contains(&(c.ino, "two.mp4".to_string())), "changed file: new inode, old entry forgotten");
    assert!(inv.inodes.contains(&c.ino), "the catalog folder's attributes changed");
    let names: Vec<String> = fs.readdir(c.ino).unwrap().into_iter().map(|(_, _, n)| n).collect();
    assert_eq!(names, [".", "..", "three.mp4", "two.mp4"]);
    assert_eq!(fs.catalog(0).unwrap().revision(), "r2");
}

#[tokio::test(start_paused = true)]
async fn random_small_reads_fetch_one_leaf_and_sequential_ones_whole_chunks() {
    let (fs, source, big, leaf) = fake_fs_with_leaves();
    let fh = open_big(&fs);
    // A random 4 KiB read: one leaf, not a chunk.
    let far = (12 << 20) + 5000;
    let got = fs.read(fh, far, 4096).await.unwrap();
    assert_eq!(&got[..], &big[far as usize..far as usize + 4096]);
    assert_eq!(source.fetches().last(), Some(&(far / leaf, 1)));
    assert_eq!(source.units.lock().unwrap().last(), Some(&leaf));
    // Crossing a leaf boundary at random: two leaves, still far less than a chunk.
    let edge = (5 << 20) + leaf - 100;
    let got = fs.read(fh, edge, 4096).await.unwrap();
    assert_eq!(&got[..], &big[edge as usize..edge as usize + 4096]);
    assert_eq!(source.fetches().last(), Some(&(edge / leaf, 2)));
    // A read from the start is sequential: whole chunks.
    let before = source.fetches().len();
    fs.read(fh, 0, 4096).await.unwrap();
    assert_eq!(source.units.lock().unwrap()[before], CS);
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn a_read_the_cache_holds_is_answered_at_once_and_a_miss_claims_nothing() {
    let (fs, source, big, leaf) = fake_fs_with_leaves();
    let fh = open_big(&fs);
    let far = (12 << 20) + 5000;
    let slice = |at: u64, len: usize| &big[at as usize..at as usize + len];

    // A miss goes to the network path and has claimed nothing: the source is not asked yet,
    // and a second reader of the same range is sent to the network path too.
    let ReadNow::Fetch(first) = fs.read_now(fh, far, 4096) else { panic!("an empty cache answered a read") };
    let other = open_big(&fs);
    let ReadNow::Fetch(second) = fs.read_now(other, far, 4096) else { panic!("an empty cache answered a read") };
    assert!(source.fetches().is_empty(), "read_now fetched: {:?}", source.fetches());
    let (a, b) = tokio::join!(fs.read_pending(first), fs.read_pending(second));
    assert_eq!(&a.unwrap()[..], slice(far, 4096));
    assert_eq!(&b.unwrap()[..], slice(far, 4096));
    assert_eq!(source.fetches(), vec![(far / leaf, 1)], "two readers of one leaf share one fetch");

    // Inside the fetched leaf: answered at once, without the source.
    let ReadNow::Done(Ok(hit)) = fs.read_now(fh, far + 4096, 4096) else { panic!("a cached leaf went to the network") };
    assert_eq!(&hit[..], slice(far + 4096, 4096));
    // Past it: the network path, which fetches just the next leaf.
    let beyond = (far / leaf + 1) * leaf + 100;
    assert!(matches!(fs.read_now(fh, beyond, 4096), ReadNow::Fetch(_)), "an uncached leaf was answered");

    // Whole chunks read sequentially: the ones read ahead are answered at once, across a
    // chunk boundary too, and the read-ahead still sees each read once (it keeps growing).
    let step = 128 * 1024u64;
    let mut answered_at_once = 0;
    for k in 0..8u64 {
        let got = match fs.read_now(fh, k * step, step as u32) {
            ReadNow::Done(result) => {
                answered_at_once += 1;
                result.unwrap()
            }
            ReadNow::Fetch(pending) => fs.read_pending(pending).await.unwrap(),
        };
        assert_eq!(&got[..], slice(k * step, step as usize));
        settle().await;
    }
    assert!(answered_at_once >= 6, "read-ahead chunks were answered at once only {answered_at_once} of 8 times");
    let odd = CS - 100;
    let ReadNow::Done(Ok(across)) = fs.read_now(fh, odd, 4096) else { panic!("two cached chunks went to the network") };
    assert_eq!(&across[..], slice(odd, 4096));
}
