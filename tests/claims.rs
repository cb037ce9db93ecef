//! One test per README claim that had none: xattrs (`description`, `owner`, `listxattr`, the
//! size-0 length query, ERANGE, ENODATA), `<catalog>@<owner8>` folders, 0444/0555 and
//! uid/gid, SIGINT unmounting, the `--chunk-size` and `--cache-size` limits, the progress bar
//! on a terminal, a stale mount reported and cleared by `umount`, the client re-asking for
//! late chunks and reopening a session the server forgot (also through a freeze longer than
//! one request timeout), and a signal with a file open detaching lazily. Read-path claims measured on the wire are in claims_mount.rs. Real
//! nats-server, real `catalog serve`, real FUSE mounts (recorded as skipped without FUSE,
//! failing under `CI=true`); every touch of a mount bounded.

mod common;

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use natster_mount::client::RemoteFile;
use natster_mount::fs::mount::is_mounted;

use common::mounted::{bounded, Mounted, MOUNT_IO_DEADLINE};
use common::*;

/// A home with catalog `media` indexed from `files` (not served: own catalogs mount from
/// their index), against a fresh nats-server.
async fn home_with(files: &[(&str, Vec<u8>)]) -> (NatsServer, TestHome, tempfile::TempDir) {
    let nats = NatsServer::start();
    let (home, tree) = home_with_catalog(&nats, files).await;
    (nats, home, tree)
}

/// getxattr(2) with a buffer of `size` bytes (0: ask for the length): Ok(length or bytes).
fn getxattr(path: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let (p, n) = (CString::new(path.as_os_str().as_encoded_bytes()).unwrap(), CString::new(name).unwrap());
    bounded(&format!("getxattr {name}"), MOUNT_IO_DEADLINE, move || {
        let mut buf = vec![0u8; size];
        let ptr = if size == 0 { std::ptr::null_mut() } else { buf.as_mut_ptr().cast() };
        // SAFETY: valid C strings; `ptr` is null with size 0 or a buffer of `size` bytes.
        let n = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), ptr, size) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        if size == 0 {
            return Ok((n as u64).to_le_bytes().to_vec());
        }
        buf.truncate(n as usize);
        Ok(buf)
    })
}

/// listxattr(2): the names, and the length a size-0 query reports.
fn listxattr(path: &Path) -> (Vec<String>, usize) {
    let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    bounded("listxattr", MOUNT_IO_DEADLINE, move || {
        // SAFETY: a valid C string; null buffer with size 0 asks for the length.
        let len = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(len >= 0, "listxattr length: {}", std::io::Error::last_os_error());
        let mut buf = vec![0u8; len as usize];
        // SAFETY: a buffer of `len` bytes.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
        buf.truncate(n as usize);
        let names = buf.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned());
        (names.collect(), len as usize)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xattrs_carry_description_and_owner_and_follow_the_xattr_protocol() {
    require_fuse!();
    let (_nats, home, _tree) = home_with(&[("clip.mp4", b"not really a video".to_vec())]).await;
    // Give the entry a description in the index, as a hand-edited or original catalog has.
    let catalog_file = home.path().join("media.json");
    let mut catalog: serde_json::Value = serde_json::from_slice(&std::fs::read(&catalog_file).unwrap()).unwrap();
    catalog["entries"][0]["description"] = "the opening scene".into();
    std::fs::write(&catalog_file, serde_json::to_vec_pretty(&catalog).unwrap()).unwrap();
    let m = Mounted::start(&home, &[]);
    let clip = m.path().join("media/clip.mp4");

    assert_eq!(getxattr(&clip, "user.natster.description", 256).unwrap(), b"the opening scene");
    // Own catalogs are owned by this context's account ("self" for a context without one).
    let context = natster_mount::context::Context::load(&home.home(), "default").expect("context");
    let me = context.account_public_key.unwrap_or_else(|| "self".into());
    assert_eq!(getxattr(&clip, "user.natster.owner", 256).unwrap(), me.as_bytes());

    let (mut names, len) = listxattr(&clip);
    names.sort();
    assert_eq!(
        names,
        [
            "user.natster.description",
            "user.natster.hash",
            "user.natster.mime_type",
            "user.natster.owner",
            "user.natster.verified"
        ]
    );
    let verified = getxattr(&clip, "user.natster.verified", 256).unwrap();
    assert!(verified.starts_with(b"signed"), "{}", String::from_utf8_lossy(&verified));
    assert_eq!(len, names.iter().map(|n| n.len() + 1).sum::<usize>(), "size-0 listxattr reports the length");

    // Size 0 asks for the length; a too-small buffer is ERANGE; an unknown name is ENODATA.
    let hash = sha256_hex(b"not really a video");
    let reported = getxattr(&clip, "user.natster.hash", 0).unwrap();
    assert_eq!(u64::from_le_bytes(reported.try_into().unwrap()), hash.len() as u64);
    assert_eq!(getxattr(&clip, "user.natster.hash", 10), Err(libc::ERANGE));
    assert_eq!(getxattr(&clip, "user.natster.nope", 256), Err(libc::ENODATA));
    // Folders carry none.
    assert_eq!(getxattr(&m.path().join("media"), "user.natster.hash", 256), Err(libc::ENODATA));
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_0444_folders_0555_owned_by_the_user() {
    require_fuse!();
    let (_nats, home, _tree) = home_with(&[("a/b/file.bin", vec![1, 2, 3])]).await;
    let m = Mounted::start(&home, &[]);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let stat = |p: PathBuf| {
        bounded(&format!("stat {}", p.display()), MOUNT_IO_DEADLINE, move || std::fs::metadata(p)).expect("stat")
    };
    for dir in [m.path().to_path_buf(), m.path().join("media"), m.path().join("media/a"), m.path().join("media/a/b")] {
        let meta = stat(dir.clone());
        assert!(meta.is_dir(), "{}", dir.display());
        assert_eq!(meta.mode() & 0o7777, 0o555, "{} mode {:o}", dir.display(), meta.mode());
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{}", dir.display());
    }
    let meta = stat(m.path().join("media/a/b/file.bin"));
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o444, "file mode {:o}", meta.mode());
    assert_eq!((meta.uid(), meta.gid(), meta.len()), (uid, gid, 3));
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_two_owners_use_becomes_catalog_at_owner8() {
    require_fuse!();
    let (nats, home, _tree) = home_with(&[("mine.txt", b"mine".to_vec())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let other = nkeys::KeyPair::new_account().public_key();
    // Recorded as `catalog import --external` records an import (that command needs an
    // account, which a plain `init --server` context has not; the folder naming is the point).
    let context_file = home.home().context_path("default");
    let mut context: serde_json::Value = serde_json::from_slice(&std::fs::read(&context_file).unwrap()).unwrap();
    context["imports"] = serde_json::json!([{"catalog": "media", "owner": other}]);
    std::fs::write(&context_file, serde_json::to_vec_pretty(&context).unwrap()).unwrap();
    let m = Mounted::start(&home, &[]);
    let root = m.path().to_path_buf();
    let names = bounded("listing of the root", MOUNT_IO_DEADLINE, move || file_names(&root));
    assert_eq!(names, ["media".to_string(), format!("media@{}", &other[..8])], "root folders");
    // The unsuffixed folder is your own catalog.
    let mine = m.path().join("media/mine.txt");
    assert_eq!(bounded("read", MOUNT_IO_DEADLINE, move || std::fs::read(mine)).unwrap(), b"mine");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_unmounts_cleanly() {
    require_fuse!();
    let (nats, home, _tree) = home_with(&[("x.txt", b"x".to_vec())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let m = Mounted::start(&home, &[]);
    let x = m.path().join("media/x.txt");
    assert_eq!(bounded("read", MOUNT_IO_DEADLINE, move || std::fs::read(x)).unwrap(), b"x");
    m.stop_with(libc::SIGINT); // exits 0 within the unmount deadline, mount gone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_with_a_file_open_detaches_lazily_and_exits() {
    require_fuse!();
    let (nats, home, _tree) = home_with(&[("x.txt", b"x".to_vec())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let m = Mounted::start(&home, &[]);
    let mnt = m.path().to_path_buf();
    let x = m.path().join("media/x.txt");
    let open = bounded("open", MOUNT_IO_DEADLINE, move || std::fs::File::open(x)).expect("open");
    let started = std::time::Instant::now();
    m.stop(); // SIGTERM with a file open: exits 0, not mounted, within the 2 s promise
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "stopping with a file open took {took:?}");
    // The open file reads as gone, and nothing hangs.
    let read = bounded("read of a detached file", MOUNT_IO_DEADLINE, move || {
        let mut buf = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&open, &mut buf, 0)
    });
    assert!(read.is_err(), "a file of a stopped mount still read: {read:?}");
    assert!(!natster_mount::fs::mount::is_mounted(&mnt), "left mounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_size_limits_are_enforced_with_a_clear_message() {
    let (nats, home, _tree) = home_with(&[("f.bin", pseudo_random_bytes(9, 20_000))]).await;
    const MAX: u32 = 1024 * 1024 - 16 * 1024; // README: 16 KiB to 1 MiB − 16 KiB, in 16 KiB steps
    for bad in [4096, 16383, MAX + 16384, 256 * 1024 + 4096] {
        let out = home.run_async(["catalog", "serve", "media", "--chunk-size", &bad.to_string()]).await;
        out.assert_failure(&format!("serve --chunk-size {bad}"));
        assert!(
            (out.stderr.contains("out of range") || out.stderr.contains("is not a multiple of 16384"))
                && out.stderr.contains("multiple of 16384 in 16384..=1032192"),
            "{}",
            out.stderr
        );
        assert_eq!(out.stderr_lines().len(), 1, "one line: {}", out.stderr);
    }
    // Both ends of the range serve, and the session says which size it uses.
    for good in [16384u32, MAX] {
        let served = Served::start_with(&home, &nats, "media", &["--chunk-size", &good.to_string()]).await;
        let client = catalog_client(&connect(&nats.url()).await, "media");
        let bytes = pseudo_random_bytes(9, 20_000);
        let file = within("open", client.open(&sha256_hex(&bytes), None)).await.expect("open");
        assert_eq!(file.chunk_size(), u64::from(good));
        assert_eq!(within("read", file.read_range(0, 20_000)).await.unwrap(), bytes);
        drop(served);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_size_limits_are_enforced_and_a_4m_cache_reads_a_larger_file() {
    let big = pseudo_random_bytes(10, 9 * 1024 * 1024 + 7);
    let (nats, home, _tree) = home_with(&[("big.bin", big.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    let small = home.run_async(["mount", mnt, "--foreground", "--cache-size", "3M"]).await;
    small.assert_failure("mount --cache-size 3M");
    assert!(small.stderr.contains("--cache-size must be at least 4M"), "{}", small.stderr);
    let unit = home.run_async(["mount", mnt, "--foreground", "--cache-size", "12Q"]).await;
    unit.assert_failure("mount --cache-size 12Q");
    assert!(unit.stderr.contains("unknown size unit"), "{}", unit.stderr);
    if !common::mounted::fuse_available_for("claims::cache_size_limits (its 4M mount part)") {
        return;
    }
    let _served = Served::start(&home, &nats, "media").await;
    let m = Mounted::start(&home, &["--cache-size", "4M"]);
    let path = m.path().join("media/big.bin");
    let got = bounded("read through a 4M cache", MOUNT_IO_DEADLINE, move || std::fs::read(path)).expect("read");
    assert!(got == big, "a file larger than the cache reads wrong through it");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_new_shows_a_progress_bar_on_a_terminal_only() {
    let home = TestHome::new();
    let tree = tempfile::tempdir().unwrap();
    write_file(tree.path(), "big.bin", &pseudo_random_bytes(12, 256 * 1024 * 1024));
    // A pty through script(1): stderr is a terminal there.
    let command = format!("'{}' catalog new media '{}'", bin(), tree.path().display());
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &command, "/dev/null"]).env("NATSTER_HOME", home.path()).env_remove("NATSTER_LOG");
    let out = run_with_timeout(script, Duration::from_secs(120));
    assert!(out.status.success(), "catalog new on a pty: {}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("hashing [") && out.stdout.contains("MiB"),
        "no progress bar on the pty:\n{}",
        out.stdout
    );
    // Not on a pipe: the same command's stderr has no bar.
    std::fs::remove_file(home.path().join("media.json")).unwrap();
    let plain = home.run_async(["catalog", "new", "media", tree.path().to_str().unwrap()]).await;
    plain.assert_success("catalog new");
    assert!(!plain.stderr.contains("hashing"), "a progress bar on a pipe: {}", plain.stderr);
}

/// Detaches its folder lazily if it is still mounted or stale when dropped, so a failing
/// test leaves no stale mount behind.
struct LazyUnmount(PathBuf);

impl Drop for LazyUnmount {
    fn drop(&mut self) {
        let stale = matches!(std::fs::metadata(&self.0), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
        if stale || is_mounted(&self.0) {
            let _ = std::process::Command::new("fusermount3").arg("-uz").arg(&self.0).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_mount_is_reported_stale_and_umount_clears_it() {
    require_fuse!();
    let (nats, home, _tree) = home_with(&[("x.txt", b"x".to_vec())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let dir = tempfile::Builder::new().prefix("natster-mnt-").tempdir().unwrap();
    let _detach = LazyUnmount(dir.path().to_path_buf());
    let read_x = |dir: &Path| {
        let x = dir.join("media/x.txt");
        bounded("read", MOUNT_IO_DEADLINE, move || std::fs::read(x))
    };
    let crashed = Mounted::start_at(&home, dir.path(), &[]);
    assert_eq!(read_x(dir.path()).unwrap(), b"x");

    // SAFETY: kill(2) on our own child. A killed FUSE process leaves its mount behind.
    assert_eq!(unsafe { libc::kill(crashed.pid() as i32, libc::SIGKILL) }, 0);
    let p = dir.path().to_path_buf();
    wait_for("the mount to go stale (ENOTCONN)", Duration::from_secs(10), || {
        let p = p.clone();
        async move {
            let stat = bounded("stat", MOUNT_IO_DEADLINE, move || std::fs::metadata(p));
            matches!(stat, Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)).then_some(())
        }
    })
    .await;

    let mnt = dir.path().to_str().unwrap();
    let again = home.run_async(["mount", mnt, "--foreground"]).await;
    again.assert_failure("mount on a stale mount");
    assert_eq!(
        again.stderr_lines(),
        [format!(
            "error: {mnt} is a stale mount (Transport endpoint is not connected); run `natster-mount umount {mnt}` first"
        )],
        "{}",
        again.stderr
    );
    let umount = home.run_async(["umount", mnt]).await;
    umount.assert_success("umount of a stale mount");
    assert!(!is_mounted(dir.path()), "still mounted after umount");
    assert!(std::fs::metadata(dir.path()).unwrap().is_dir(), "the folder is usable again");

    let fresh = Mounted::start_at(&home, dir.path(), &[]);
    assert_eq!(read_x(dir.path()).unwrap(), b"x", "a new mount on the cleared folder reads");
    fresh.stop();
    drop(crashed);
}

const CHUNK: usize = natster_mount::server::DEFAULT_CHUNK_SIZE as usize; // `catalog serve`'s default chunk size

/// `f.bin` (`bytes`) served in `media`, the catalog's `subject` requests recorded from
/// before the file is opened through a library client. Destructure it binding every field
/// (`_x`, never `_` or `..`: those drop the tree or nats-server at once).
struct Opened {
    file: RemoteFile,
    recorded: Requests,
    served: Served,
    _tree: tempfile::TempDir,
    home: TestHome,
    nats: NatsServer,
}

async fn opened(bytes: &[u8], subject: &str) -> Opened {
    let (nats, home, tree) = home_with(&[("f.bin", bytes.to_vec())]).await;
    let served = Served::start(&home, &nats, "media").await;
    let recorded = Requests::record(&nats.url(), &format!("natster.catalog.media.{subject}")).await;
    let client = catalog_client(&connect(&nats.url()).await, "media");
    let file = within("open", client.open(&sha256_hex(bytes), None)).await.expect("open");
    Opened { file, recorded, served, _tree: tree, home, nats }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_chunks_are_asked_for_again_and_the_read_completes() {
    let bytes = pseudo_random_bytes(21, 3 * CHUNK + 11);
    let Opened { nats: _nats, home: _home, _tree, served, recorded: reads, file } = opened(&bytes, "read").await;

    // The server freezes with the request unanswered: the client must ask again after
    // chunk_timeout (1 s in test_options), and take the chunks once the server thaws.
    let frozen = Frozen::new(served.pid());
    let len = bytes.len();
    let read = tokio::spawn(async move { file.read_range(0, len).await });
    wait_for("the first chunks to be asked for again", Duration::from_secs(10), || {
        let asked = reads.reads().iter().filter(|r| r.first_chunk == 0).count();
        async move { (asked >= 2).then_some(()) }
    })
    .await;
    drop(frozen);
    let got = within("the read after the server thawed", read).await.expect("read task").expect("read");
    assert!(got == bytes, "wrong bytes after re-asking ({} bytes)", got.len());
    println!("read requests: {:?}", reads.reads().iter().map(|r| (r.first_chunk, r.count)).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_server_forgot_is_reopened() {
    let bytes = pseudo_random_bytes(22, 3 * CHUNK + 11);
    let Opened { nats, home, _tree, served, recorded: opens, file } = opened(&bytes, "open").await;
    assert_eq!(within("first read", file.read_range(0, 1000)).await.expect("read"), &bytes[..1000]);
    assert_eq!(opens.settled().await, 1);

    // A restarted server knows no sessions: the next read gets 404 and must reopen.
    drop(served);
    let _served = Served::start(&home, &nats, "media").await;
    let rest = within("read after the restart", file.read_range(CHUNK as u64, bytes.len() - CHUNK)).await;
    assert!(rest.as_ref().is_ok_and(|r| r[..] == bytes[CHUNK..]), "read after restart: {:?}", rest.map(|r| r.len()));
    assert_eq!(opens.settled().await, 2, "one new session opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_outlasts_a_freeze_longer_than_request_timeout_within_its_retries() {
    let bytes = pseudo_random_bytes(23, 3 * CHUNK + 11);
    let Opened { nats: _nats, home: _home, _tree, served, recorded: reads, file } = opened(&bytes, "read").await;
    let frozen = Frozen::new(served.pid());
    let len = bytes.len();
    let read = tokio::spawn(async move { file.read_range(0, len).await });
    // The 4th ask comes after 1+2+3 s, past request_timeout, and within retries (3 rounds);
    // a read that gave up before it fails below with its error.
    wait_for("the 4th ask for the first chunks, or the read's end", Duration::from_secs(15), || {
        let asked = reads.reads().iter().filter(|r| r.first_chunk == 0).count();
        let ended = read.is_finished();
        async move { (asked >= 4 || ended).then_some(()) }
    })
    .await;
    drop(frozen);
    let got = within("the read after the server thawed", read).await.expect("read task");
    assert!(got.as_ref().is_ok_and(|g| *g == bytes), "read after a 6 s freeze: {:?}", got.map(|g| g.len()));
}
