//! The data path's traffic through a real mount (real nats-server, catalog server and FUSE):
//! what one read costs on the wire, counted by a plain NATS subscriber on the media subjects
//! and the reply inboxes, which sees every record the catalog server sends the mount. Not timed.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mounted::{bounded, fuse_calls, Mounted, MOUNT_IO_DEADLINE};
use common::*;
use futures::StreamExt;
use natster_mount::protocol;

/// What the catalog server sent the mount: records, their payload bytes, and how many of
/// them came inline (as replies, on the mount's inboxes, rather than on the media subject).
#[derive(Default)]
struct Records {
    count: AtomicU64,
    bytes: AtomicU64,
    inline: AtomicU64,
}

/// Counts every record, on the media subjects and the reply inboxes (plain subscriptions
/// beside the mount's; a record is a message with a chunk index header).
async fn count_records(nats: &NatsServer) -> (Arc<Records>, tokio::task::JoinHandle<()>) {
    let client = connect(&nats.url()).await;
    let media = client.subscribe("natster.media.media.*").await.expect("subscribe media");
    let replies = client.subscribe("_INBOX.>").await.expect("subscribe inboxes");
    client.flush().await.expect("flush");
    let records = Arc::new(Records::default());
    let r = records.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        let mut both = futures::stream::select(media, replies);
        while let Some(msg) = both.next().await {
            let is_record = msg.headers.as_ref().is_some_and(|h| h.get(protocol::HEADER_CHUNK_INDEX).is_some());
            if !is_record {
                continue;
            }
            r.count.fetch_add(1, Ordering::SeqCst);
            r.bytes.fetch_add(msg.payload.len() as u64, Ordering::SeqCst);
            if msg.subject.starts_with("_INBOX.") {
                r.inline.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (records, task)
}

/// The byte count once it has stopped moving for 500 ms (chunks already published reach the
/// counter in milliseconds); bounded to 20 s.
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
        assert!(Instant::now() < until, "media still arriving after 20 s ({now} bytes)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_4k_read_moves_one_leaf_not_a_chunk() {
    require_fuse!();
    let bytes = pseudo_random_bytes(16, 8 << 20);
    let nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("big.bin", bytes.clone())]).await;
    // The default chunk size (512 KiB): a whole chunk per small read would be 128 times 4 KiB.
    let _served = Served::start(&home, &nats, "media").await;
    let (records, task) = count_records(&nats).await;
    let m = Mounted::start(&home, &[]);
    let path = m.path().join("media/big.bin");

    // Far apart, none at the start (a read at 0 starts a sequential run and reads ahead).
    let offsets = [3 * 1024 * 1024 + 8192u64, 6 * 1024 * 1024 + 100 * 4096, 1024 * 1024 + 40 * 4096, 7 << 20];
    let mut before = settled(&records.bytes).await;
    for offset in offsets {
        let p = path.clone();
        let got = bounded("a 4 KiB pread", MOUNT_IO_DEADLINE, move || {
            let f = std::fs::File::open(&p).expect("open");
            // The kernel's own read-ahead off: what reaches the mount is the program's read.
            // SAFETY: fadvise on an open descriptor.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
            assert_eq!(rc, 0, "posix_fadvise RANDOM");
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, offset).expect("pread");
            buf
        });
        assert_eq!(got, bytes[offset as usize..offset as usize + 4096], "bytes at {offset}");
        let now = settled(&records.bytes).await;
        let moved = now - before;
        eprintln!("a random 4 KiB read at {offset}: {moved} bytes over NATS");
        // One 16 KiB leaf, its proof (a few hundred bytes), nonce and tag; a whole chunk
        // would be 512 KiB.
        assert!(moved > 4096, "the read at {offset} moved {moved} bytes: it must reach the catalog server");
        assert!(moved <= 8 * 4096, "a random 4 KiB read at {offset} moved {moved} bytes over NATS");
        before = now;
    }
    let fetched = records.count.load(Ordering::SeqCst);
    assert!(fetched <= 2 * offsets.len() as u64, "{fetched} records fetched for {} reads", offsets.len());
    // Each came as the reply to its own request: no acknowledgement, no media message.
    assert_eq!(records.inline.load(Ordering::SeqCst), fetched, "records that did not come inline");
    task.abort();
    m.stop();
}

/// A sequential read reaches the mount in requests of up to a MiB, not the 128 KiB a FUSE
/// device's default read-ahead would cut it into (the mount raises the device's
/// `read_ahead_kb`, which needs root: without it the kernel sends eight times as many).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_read_arrives_in_large_requests() {
    require_fuse!();
    const SIZE: usize = 16 << 20;
    let bytes = pseudo_random_bytes(17, SIZE);
    let nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("big.bin", bytes.clone())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let m = Mounted::start(&home, &[]);
    let path = m.path().join("media/big.bin");
    let before = fuse_calls(m.path()).get("read").copied().unwrap_or(0);
    let got = bounded("a sequential read", MOUNT_IO_DEADLINE, move || std::fs::read(&path).expect("read"));
    assert!(got == bytes, "the file read through the mount differs from the source");
    let reads = fuse_calls(m.path()).get("read").copied().unwrap_or(0) - before;
    eprintln!("16 MiB read sequentially in {reads} FUSE reads");
    if running_as_root() {
        // 16 at a MiB each; a few more where the kernel's read-ahead window ramps up.
        assert!(reads <= 40, "{reads} FUSE reads for 16 MiB: the kernel's read-ahead was not raised");
    }
    m.stop();
}
