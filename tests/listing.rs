//! Listings through a real mount (real nats-server, catalog server and FUSE): what the kernel's
//! caches answer on their own, what an open folder reads while its listing changes, and that a
//! changed file is never read stale. Nothing here is timed: requests are counted (the root's
//! `user.natster.calls`) and bytes compared.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::mounted::{bounded, fuse_calls as calls, getxattr, Mounted, MOUNT_IO_DEADLINE};
use common::*;

/// Bound on a listing change reaching the mount (server reload, heartbeat, refresh).
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);

/// A catalog `media` of `files`, served, over a fresh nats-server.
struct Env {
    _nats: NatsServer,
    home: TestHome,
    tree: tempfile::TempDir,
    _served: Served,
}

async fn env_with(files: &[(String, Vec<u8>)]) -> Env {
    let nats = NatsServer::start();
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), b.as_slice())).collect();
    let (home, tree) = home_with_catalog(&nats, &files).await;
    let served = Served::start(&home, &nats, "media").await;
    Env { _nats: nats, home, tree, _served: served }
}

impl Env {
    async fn reindex(&self) {
        let root = self.tree.path().to_str().unwrap().to_string();
        self.home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("re-index");
    }
}

fn ls_lr(dir: &Path) -> String {
    let mut cmd = Command::new("ls");
    cmd.arg("-lR").arg(dir);
    let out = run_with_timeout(cmd, MOUNT_IO_DEADLINE);
    assert!(out.status.success(), "ls -lR failed: {}", out.stderr);
    out.stdout.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ls_lr_is_answered_by_the_kernel_caches() {
    require_fuse!();
    let (folders, per_folder) = (12, 40);
    let files: Vec<(String, Vec<u8>)> = (0..folders * per_folder)
        .map(|i| (format!("d{:02}/sub/f{i:04}.txt", i % folders), format!("{i}\n").into_bytes()))
        .collect();
    let env = env_with(&files).await;
    let m = Mounted::start(&env.home, &["--listing-ttl", "600"]);
    let dir = m.path().join("media");
    let first = ls_lr(&dir);
    assert_eq!(first.lines().filter(|l| l.starts_with('-')).count(), files.len(), "{first}");
    let before = calls(m.path());
    let second = ls_lr(&dir);
    let after = calls(m.path());
    assert_eq!(second, first, "the second listing differs");
    let delta = |k: &str| after[k] - before[k];
    for kind in ["lookup", "readdir", "readdirplus", "open", "read"] {
        assert_eq!(delta(kind), 0, "a second ls -lR sent {kind} requests: before {before:?}, after {after:?}");
    }
    // The mount root's attributes are kept 1 s only (a dead mount must be seen stale at once):
    // the path walks of ls and of this test's read of the counts may each ask for them.
    assert!(delta("getattr") <= 2, "a second ls -lR sent getattr requests: {before:?} -> {after:?}");
    // What is left is opening and closing each folder (the kernel always asks): the catalog's
    // folder, 12 folders and their 12 `sub` folders.
    let folders_listed = 1 + 2 * folders as u64;
    assert!(delta("opendir") <= folders_listed, "{before:?} -> {after:?}");
    assert!(delta("releasedir") <= folders_listed, "{before:?} -> {after:?}");
    // `xattr`: FUSE has no xattr cache, and `ls -l` asks each file's security label and ACL
    // unless told once that the filesystem has none (ENOTSUP): that one label, that one ACL
    // query, and this test's own read of the counts.
    assert!(delta("xattr") <= 3, "ls -l's label or ACL queries reached the mount: {before:?} -> {after:?}");
    eprintln!("second ls -lR: {before:?} -> {after:?}");
    m.stop();
}

/// Reads the next entries of an open folder with getdents64 and a small buffer (several
/// calls per folder, as a program reading a large folder makes).
fn getdents(fd: i32) -> Vec<String> {
    let mut buf = vec![0u8; 1024];
    // SAFETY: getdents64 into a buffer of the given length on a descriptor we own.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let mut names = Vec::new();
    let mut at = 0usize;
    while at < n as usize {
        let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
        let name = &buf[at + 19..at + reclen];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        names.push(String::from_utf8_lossy(&name[..end]).into_owned());
        at += reclen;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_folder_reads_one_revision_whatever_changes_meanwhile() {
    require_fuse!();
    let n = 600;
    let files: Vec<(String, Vec<u8>)> = (0..n).map(|i| (format!("big/f{i:04}.txt"), vec![b'x'; 3])).collect();
    let env = env_with(&files).await;
    let m = Mounted::start(&env.home, &["--listing-ttl", "600"]);
    let big = m.path().join("media/big");
    let old: Vec<String> = (0..n).map(|i| format!("f{i:04}.txt")).collect();

    let path = std::ffi::CString::new(big.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: open(2) of a folder with a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    assert!(fd >= 0, "open {}: {}", big.display(), std::io::Error::last_os_error());
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < n / 2 {
        let batch = bounded("getdents", MOUNT_IO_DEADLINE, move || getdents(fd));
        assert!(!batch.is_empty(), "folder ended early");
        seen.extend(batch);
    }

    // Entries before and after the read position go, others come: a listing by positions
    // would now skip or repeat.
    for i in (0..n).step_by(3) {
        std::fs::remove_file(env.tree.path().join(format!("big/f{i:04}.txt"))).unwrap();
    }
    for i in 0..100 {
        write_file(env.tree.path(), &format!("big/a{i:03}.txt"), b"new");
    }
    env.reindex().await;
    let new_count = n - n.div_ceil(3) + 100;
    let b = big.clone();
    wait_for("the new listing in a new open of the folder", CHANGE_DEADLINE, || {
        let b = b.clone();
        async move { (file_names_bounded(&b).len() == new_count).then_some(()) }
    })
    .await;

    loop {
        let batch = bounded("getdents", MOUNT_IO_DEADLINE, move || getdents(fd));
        if batch.is_empty() {
            break;
        }
        seen.extend(batch);
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    let listed: Vec<String> = seen.into_iter().filter(|s| s != "." && s != "..").collect();
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "an entry was repeated");
    assert_eq!(listed, old, "the open folder did not read exactly the revision it was opened on");
    m.stop();
}

fn file_names_bounded(dir: &Path) -> Vec<String> {
    let d = dir.to_path_buf();
    bounded("listing", MOUNT_IO_DEADLINE, move || file_names(&d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_never_read_stale_through_an_old_or_a_new_open() {
    require_fuse!();
    let size = 700_000;
    let (old, new) = (pseudo_random_bytes(1, size), pseudo_random_bytes(2, size));
    let env = env_with(&[("v.bin".to_string(), old.clone())]).await;
    let m = Mounted::start(&env.home, &["--listing-ttl", "600"]);
    let path = m.path().join("media/v.bin");

    // An open handle whose pages are all in the kernel's cache.
    let p = path.clone();
    let (held, held_ino, first) = bounded("open and read", MOUNT_IO_DEADLINE, move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&p).expect("open");
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).expect("read");
        let ino = f.metadata().expect("fstat").ino();
        (f, ino, bytes)
    });
    assert!(first == old, "first read is not the file");

    // Same size, other bytes: nothing but the content tells them apart.
    std::fs::write(env.tree.path().join("v.bin"), &new).unwrap();
    env.reindex().await;
    let want = sha256_hex(&new);
    let p = path.clone();
    wait_for("the new hash in the mount", CHANGE_DEADLINE, || {
        let p = p.clone();
        let want = want.clone();
        async move { (getxattr(&p, "user.natster.hash").ok()? == want).then_some(()) }
    })
    .await;

    let p = path.clone();
    let (fresh, fresh_ino) = bounded("read through a new open", MOUNT_IO_DEADLINE, move || {
        let bytes = std::fs::read(&p).expect("read");
        (bytes, std::fs::metadata(&p).expect("stat").ino())
    });
    assert!(fresh == new, "a new open read stale bytes");
    assert_ne!(fresh_ino, held_ino, "new content must come with a new inode");

    // The old handle reads the file it opened (from the kernel's pages, or fails): never the
    // new bytes, never a mix.
    let again = bounded("read through the old open", MOUNT_IO_DEADLINE, move || {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; size];
        held.read_exact_at(&mut bytes, 0).map(|_| bytes)
    });
    if let Ok(bytes) = again {
        assert!(bytes == old, "the old open read bytes of another content");
    }
    m.stop();
}
