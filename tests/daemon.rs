//! `up`, stops and readiness, end to end: a real nats-server (operator mode where two accounts
//! are needed), real FUSE mounts, the binary as child processes.
//!
//! - `up` started while nats-server is down shows the catalogs and reads within 5 s of it
//!   starting.
//! - `up` follows share, import and unshare done by other processes, and a file copied into
//!   (or removed from) a served folder reaches another account's mount within 2 s; a burst of
//!   1,000 files makes a bounded number of re-indexes.
//! - SIGTERM/SIGINT stop `up`, `mount` and `catalog serve` within 2 s with NATS stopped first,
//!   leaving no mount in /proc/self/mountinfo; a busy mount is detached with a warning.
//! - READY=1 reaches $NOTIFY_SOCKET.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::mounted::{bounded, MOUNT_IO_DEADLINE};
use common::operator::*;
use common::*;
use natster_mount::fs::mount::is_mounted;

/// Bound on a daemon saying it is ready.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// The stop promise, with slack for a loaded machine.
const STOP_PROMISE: Duration = Duration::from_millis(2500);
/// The promise for a folder change reaching another account's mount (2 s), with slack.
const CHANGE_PROMISE: Duration = Duration::from_secs(4);

/// A long-running natster-mount (`up`, `mount --foreground`, `catalog serve`); Drop stops it
/// (SIGTERM, then SIGKILL) and detaches its mount if one is left.
struct Daemon {
    child: Child,
    log: tempfile::NamedTempFile,
    mountpoint: Option<PathBuf>,
}

impl Daemon {
    /// Spawns `cmd` and waits until its log says it is ready ("Ctrl-C to stop").
    fn start(mut cmd: Command, mountpoint: Option<&Path>) -> Daemon {
        let log = tempfile::NamedTempFile::new().expect("log");
        let child = cmd
            .env("NATSTER_LOG", "natster_mount=debug,warn")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("spawn daemon");
        let mut d = Daemon { child, log, mountpoint: mountpoint.map(Path::to_path_buf) };
        let until = Instant::now() + READY_DEADLINE;
        while !d.log().contains("Ctrl-C to stop") {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("daemon exited with {status}:\n{}", d.log());
            }
            assert!(Instant::now() < until, "daemon not ready within {READY_DEADLINE:?}:\n{}", d.log());
            std::thread::sleep(POLL);
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` and returns how long the process took to exit, and how.
    fn stop_with(&mut self, signal: i32) -> (Duration, ExitStatus) {
        let started = Instant::now();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let until = started + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (started.elapsed(), status);
            }
            assert!(Instant::now() < until, "still running 10 s after signal {signal}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(POLL);
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(dir) = &self.mountpoint {
            if is_mounted(dir) {
                let _ = Command::new("fusermount3").arg("-uz").arg(dir).status();
            }
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log (last lines) ---\n{}", tail(&self.log(), 40));
        }
    }
}

fn mountpoint() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("natster-mnt-").tempdir().expect("mountpoint")
}

/// Reads a file in a mount, bounded.
fn read_in_mount(path: &Path) -> std::io::Result<Vec<u8>> {
    let path = path.to_path_buf();
    bounded("read in the mount", MOUNT_IO_DEADLINE, move || std::fs::read(path))
}

fn names_in(dir: &Path) -> Vec<String> {
    let dir = dir.to_path_buf();
    bounded("list the mount", MOUNT_IO_DEADLINE, move || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|it| it.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    })
}

/// Polls (bounded by `deadline`) until `check` holds; returns how long it took.
fn until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(POLL);
    }
    started.elapsed()
}

fn no_mount_left(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    assert!(!info.contains(dir.to_str().expect("utf-8")), "a mount is left on {}:\n{info}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_started_while_nats_is_down_mounts_and_reads_within_5_s_of_nats_starting() {
    require_fuse!();
    let data = pseudo_random_bytes(7, 700_000);
    let mut nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("clip.bin", data.clone())]).await;
    home.run_async(["catalog", "serve", "--at-login", "media"]).await.assert_success("serve --at-login");
    nats.stop();

    let mnt = mountpoint();
    let mut cmd = home.command(["up", "--mountpoint", mnt.path().to_str().unwrap()]);
    cmd.args(["--timeout", "2"]);
    let up = Daemon::start(cmd, Some(mnt.path()));
    // Down: the own catalog shows its index; the log says why nothing answers.
    assert_eq!(names_in(&mnt.path().join("media")), ["clip.bin"]);
    until("the log to say why NATS does not answer", Duration::from_secs(10), || {
        up.log().contains("cannot connect to NATS")
    });

    nats.restart();
    let path = mnt.path().join("media/clip.bin");
    let took = until("a read through the mount after NATS started", Duration::from_secs(5), || {
        read_in_mount(&path).ok().as_deref() == Some(&data[..])
    });
    eprintln!("read works {took:?} after nats-server started");
    drop(up);
    no_mount_left(mnt.path());
}

/// Two people on an operator-mode server: alice runs `up` serving `media`, bob runs `up`.
struct Pair {
    _up: OperatorUp,
    _op: tempfile::TempDir,
    alice: Person,
    bob: Person,
    tree: tempfile::TempDir,
    alice_up: Daemon,
    bob_up: Daemon,
    _alice_mnt: tempfile::TempDir,
    bob_mnt: tempfile::TempDir,
}

async fn pair() -> Pair {
    let op_dir = operator_dir();
    let op = op_dir.path().to_path_buf();
    operator_init(&op, free_port());
    let up = OperatorUp::start(&op);
    let alice = Person::with_account(&op, "alice").await;
    let bob = Person::with_account(&op, "bob").await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    write_file(tree.path(), "first.txt", b"first\n");
    let root = tree.path().to_str().unwrap().to_string();
    alice.run(&["catalog", "new", "media", &root, "--serve"]).await.assert_success("catalog new --serve");
    let (alice_mnt, bob_mnt) = (mountpoint(), mountpoint());
    let alice_up = Daemon::start(
        alice.command(&["up", "--mountpoint", alice_mnt.path().to_str().unwrap()]),
        Some(alice_mnt.path()),
    );
    let bob_up =
        Daemon::start(bob.command(&["up", "--mountpoint", bob_mnt.path().to_str().unwrap()]), Some(bob_mnt.path()));
    Pair { _up: up, _op: op_dir, alice, bob, tree, alice_up, bob_up, _alice_mnt: alice_mnt, bob_mnt }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_follows_shares_imports_unshares_and_the_served_folder() {
    require_fuse!();
    let p = pair().await;
    let bob_media = p.bob_mnt.path().join("media");
    // The hub, which every account of the operator imports, aside.
    assert!(names_in(p.bob_mnt.path()).iter().all(|n| n == "hub"), "bob can read nothing yet");

    // Share and import from other processes: bob's running `up` mounts it, and reads.
    p.alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    p.bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    let first = bob_media.join("first.txt");
    let took = until("alice's catalog in bob's mount", Duration::from_secs(10), || {
        read_in_mount(&first).ok().as_deref() == Some(&b"first\n"[..])
    });
    eprintln!("import shown and readable in bob's mount after {took:?}");

    // A file copied into the served folder: listed and byte-identical in bob's mount in 2 s.
    let data = pseudo_random_bytes(3, 1_500_000);
    write_file(p.tree.path(), "films/new.bin", &data);
    let new = bob_media.join("films/new.bin");
    let took =
        until("the new file in bob's mount", CHANGE_PROMISE, || read_in_mount(&new).ok().as_deref() == Some(&data[..]));
    eprintln!("added file listed and read byte-identical in bob's mount {took:?} after it was written (promised 2 s)");
    // Removed: gone from bob's mount in 2 s.
    std::fs::remove_file(p.tree.path().join("films/new.bin")).unwrap();
    let took = until("the removed file to leave bob's mount", CHANGE_PROMISE, || {
        !names_in(&bob_media).contains(&"films".to_string())
    });
    eprintln!("removed file gone from bob's mount after {took:?}");

    // A burst of 1,000 files: a bounded number of re-indexes, every file shown in the end.
    let before = reindexes(&p.alice).await;
    let burst = p.tree.path().join("burst");
    std::fs::create_dir(&burst).unwrap();
    let copied = Instant::now();
    for i in 0..1000 {
        std::fs::write(burst.join(format!("f{i:04}.txt")), format!("file {i}\n")).unwrap();
    }
    let copy_took = copied.elapsed();
    let bob_burst = bob_media.join("burst");
    let took = until("the 1,000 files in bob's mount", Duration::from_secs(30), || names_in(&bob_burst).len() == 1000);
    let count = reindexes(&p.alice).await - before;
    eprintln!("1,000 files (written in {copy_took:?}) all in bob's mount {took:?} later, after {count} re-index(es)");
    assert!(count <= 3 + copy_took.as_secs() * 2, "{count} re-indexes for one burst");
    assert_eq!(read_in_mount(&bob_burst.join("f0999.txt")).unwrap(), b"file 999\n");

    // Status: what alice's machine serves, with bob as a recent reader.
    let status = p.alice.run(&["status"]).await;
    status.assert_success("status");
    assert!(status.stdout.contains("serving:") && status.stdout.contains("media  online"), "{}", status.stdout);
    assert!(
        status.stdout.contains("1 reader(s) in the last minute") || status.stdout.contains("2 reader(s)"),
        "{}",
        status.stdout
    );

    // Unshare: bob's folder empties at once and reads are refused.
    p.alice.run(&["catalog", "unshare", "media", "bob"]).await.assert_success("unshare");
    let took =
        until("bob's folder to empty after the unshare", Duration::from_secs(10), || names_in(&bob_media).is_empty());
    eprintln!("unshare reached bob's mount after {took:?}");
    let refused = p.bob.run(&["catalog", "contents", "media"]).await;
    refused.assert_failure("contents after unshare");
    assert!(refused.stderr.contains("403"), "{}", refused.stderr);

    // A new catalog marked for serving while `up` runs: served and mounted without a restart.
    let extra = tempfile::Builder::new().prefix("natster-extra-").tempdir().unwrap();
    write_file(extra.path(), "x.txt", b"extra\n");
    p.alice
        .run(&["catalog", "new", "extra", extra.path().to_str().unwrap(), "--serve"])
        .await
        .assert_success("new --serve");
    let x = p._alice_mnt.path().join("extra/x.txt");
    let took = until("the new catalog served and mounted by alice's up", Duration::from_secs(10), || {
        read_in_mount(&x).ok().as_deref() == Some(&b"extra\n"[..])
    });
    eprintln!("a catalog created with --serve was served and readable after {took:?}");

    // Unimport: the folder goes from bob's mount.
    p.bob.run(&["catalog", "unimport", "media"]).await.assert_success("unimport");
    until("the folder to leave bob's mount", Duration::from_secs(10), || {
        !names_in(p.bob_mnt.path()).contains(&"media".to_string())
    });
    assert!(p.alice_up.log().contains("re-indexed after a change in the folder"), "{}", p.alice_up.log());
    drop(p.bob_up);
}

/// Re-indexes alice's `up` did so far, from `status --json`.
async fn reindexes(person: &Person) -> u64 {
    let out = person.run(&["status", "--json"]).await;
    out.assert_success("status --json");
    let report: serde_json::Value = serde_json::from_str(out.stdout.lines().next().expect("one report")).expect("json");
    report["serving"][0]["reindexes"].as_u64().expect("reindexes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_stop_up_mount_and_serve_within_2_s_with_nats_stopped() {
    require_fuse!();
    let mut nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("a.bin", pseudo_random_bytes(1, 100_000))]).await;
    let served = Daemon::start(home.command(["catalog", "serve", "media"]), None);
    let m1 = mountpoint();
    let mount = Daemon::start(home.command(["mount", m1.path().to_str().unwrap(), "--foreground"]), Some(m1.path()));
    // `up` serves nothing here (`catalog serve` does), and holds a file open in its mount.
    let m2 = mountpoint();
    let up = Daemon::start(home.command(["up", "--mountpoint", m2.path().to_str().unwrap()]), Some(m2.path()));
    let open = bounded("open a file", MOUNT_IO_DEADLINE, {
        let path = m2.path().join("media/a.bin");
        move || std::fs::File::open(path).expect("open in the mount")
    });
    nats.stop();
    for (mut daemon, signal, dir) in
        [(served, libc::SIGTERM, None), (mount, libc::SIGINT, Some(m1.path())), (up, libc::SIGTERM, Some(m2.path()))]
    {
        let (took, status) = daemon.stop_with(signal);
        eprintln!("pid {} stopped {took:?} after signal {signal} with NATS down", daemon.pid());
        assert!(status.success(), "exited with {status}:\n{}", daemon.log());
        assert!(took < STOP_PROMISE, "took {took:?} to stop (promised 2 s):\n{}", daemon.log());
        if let Some(dir) = dir {
            no_mount_left(dir);
        }
        if dir == Some(m2.path()) {
            assert!(daemon.log().contains("detached it lazily"), "busy mount warning:\n{}", daemon.log());
        }
    }
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_tells_systemd_it_is_ready() {
    require_fuse!();
    let nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("a.txt", b"a".to_vec())]).await;
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    socket.set_read_timeout(Some(READY_DEADLINE)).unwrap();
    let mnt = mountpoint();
    let mut cmd = home.command(["up", "--mountpoint", mnt.path().to_str().unwrap()]);
    cmd.env("NOTIFY_SOCKET", &path);
    let mut up = Daemon::start(cmd, Some(mnt.path()));
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a message on NOTIFY_SOCKET");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains("STATUS=mounted 1 catalog(s)"), "{msg}");
    assert!(is_mounted(&std::fs::canonicalize(mnt.path()).unwrap()), "READY before the mount was up");
    let (_, status) = up.stop_with(libc::SIGTERM);
    assert!(status.success());
    let n = socket.recv(&mut buf).expect("STOPPING on NOTIFY_SOCKET");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

/// A mount made by mount(8) through the helper: Drop detaches it and ends its process.
struct HelperMount {
    dir: PathBuf,
    pid: Option<i32>,
}

impl HelperMount {
    /// Whether the helper's background process still runs.
    fn alive(&self) -> bool {
        let Some(pid) = self.pid else { return false };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for whoever adopted it.
        !stat.is_empty() && !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    }
}

impl Drop for HelperMount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
        }
        if let Some(pid) = self.pid {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("natster-mount") {
                // SAFETY: kill(2) on the mount process this test started (checked by its command line).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Runs `mount -T FSTAB DIR` (util-linux, then mount.fuse3, then the helper).
fn mount_by_fstab(line: &str, dir: &Path) -> (RunOutput, tempfile::NamedTempFile) {
    let fstab = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(fstab.path(), format!("{line}\n")).unwrap();
    let mut cmd = Command::new("mount");
    cmd.arg("-T").arg(fstab.path()).arg(dir).stdin(Stdio::null());
    (run_with_timeout(cmd, COMMAND_TIMEOUT), fstab)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fstab_line_mounts_through_mount_fuse3_and_umount_removes_it() {
    require_fuse!();
    if !running_as_root() || !Path::new("/sbin/mount.fuse3").exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "mount(8) as root and mount.fuse3 are needed");
        eprintln!("SKIPPED fstab test: needs root and /sbin/mount.fuse3");
        return;
    }
    let nats = NatsServer::start();
    let data = pseudo_random_bytes(21, 2_000_000);
    let (home, _tree) = home_with_catalog(&nats, &[("films/clip.bin", data.clone())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let mnt = mountpoint();
    let dir = std::fs::canonicalize(mnt.path()).unwrap();
    // mount(8) runs helpers without PATH, so the line names the binary (`PROGRAM#SOURCE`, type
    // fuse); with natster-mount installed on the default PATH, `default DIR fuse.natster-mount`
    // runs the same helper call (`natster-mount default DIR -o …`).
    let opts = format!(
        "_netdev,allow_other,ro,nofail,uid=4321,gid=4322,cache_size=64M,home={},x-systemd.automount",
        home.path().display()
    );
    let line = format!("{}#default {} fuse {opts} 0 0", bin(), dir.display());
    let (out, _fstab) = mount_by_fstab(&line, &dir);
    let pid = out.stdout.split("(pid ").nth(1).and_then(|r| r.split(',').next()).and_then(|n| n.trim().parse().ok());
    let guard = HelperMount { dir: dir.clone(), pid };
    out.assert_success("mount -T fstab");
    // It returned once the mount was up: no waiting here.
    assert!(is_mounted(&dir), "mount(8) returned before the mount was up: {out:?}");
    let file = dir.join("media/films/clip.bin");
    let meta = bounded("stat", MOUNT_IO_DEADLINE, {
        let file = file.clone();
        move || std::fs::metadata(file).expect("stat in the mount")
    });
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid(), meta.len()), (4321, 4322, data.len() as u64), "uid=/gid= applied");
    assert_eq!(read_in_mount(&file).expect("read"), data, "byte-identical through the fstab mount");

    let mut umount = Command::new("umount");
    umount.arg(&dir).stdin(Stdio::null());
    run_with_timeout(umount, COMMAND_TIMEOUT).assert_success("umount");
    assert!(!is_mounted(&dir));
    until("the helper's process to end after umount", Duration::from_secs(10), || !guard.alive());

    // An option natster-mount does not know: one clear line, nothing mounted.
    let bad = format!("{}#default {} fuse ro,bogus_option,home={} 0 0", bin(), dir.display(), home.path().display());
    let (out, _fstab) = mount_by_fstab(&bad, &dir);
    out.assert_failure("mount with an unknown option");
    assert!(out.stderr.contains("unknown mount option 'bogus_option'"), "{}", out.stderr);
    assert!(!is_mounted(&dir));
}

#[test]
fn the_generated_user_unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "systemd-analyze is needed (package systemd)");
        eprintln!("SKIPPED unit verify: /usr/bin/systemd-analyze is missing");
        return;
    }
    let home = TestHome::new();
    home.run(["init", "--server", "nats://127.0.0.1:4222"]).assert_success("init");
    let user = tempfile::tempdir().unwrap();
    let (config, runtime) = (user.path().join("config"), user.path().join("runtime"));
    std::fs::create_dir_all(&runtime).unwrap();
    let mountpoint = user.path().join("My Natster");
    // No user systemd answers on this bus: install writes the unit and prints the commands.
    let isolated = |args: &[&str]| {
        let mut cmd = home.command(args);
        cmd.env("HOME", user.path())
            .env("XDG_CONFIG_HOME", &config)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent");
        run_with_timeout(cmd, COMMAND_TIMEOUT)
    };
    let out = isolated(&["service", "install", "--mountpoint", mountpoint.to_str().unwrap()]);
    out.assert_success("service install");
    assert!(out.stdout.contains("systemctl --user enable --now natster-mount.service"), "{}", out.stdout);
    let unit = config.join("systemd/user/natster-mount.service");
    let text = std::fs::read_to_string(&unit).expect("unit written");
    for want in ["Type=notify", "Restart=on-failure", "ExecStopPost=-", " up --mountpoint \"", "NATSTER_HOME="] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert!(mountpoint.is_dir(), "the mountpoint is made");
    let mut verify = Command::new(analyze);
    verify.args(["--user", "verify"]).arg(&unit).env("XDG_RUNTIME_DIR", &runtime).stdin(Stdio::null());
    let verified = run_with_timeout(verify, COMMAND_TIMEOUT);
    verified.assert_success("systemd-analyze verify");
    assert!(
        verified.stderr.trim().is_empty() && verified.stdout.trim().is_empty(),
        "verify complained: {verified:?}\n{text}"
    );
    let status = isolated(&["service", "status"]);
    assert!(status.stdout.contains("is installed"), "{}", status.stdout);
    isolated(&["service", "uninstall"]).assert_success("service uninstall");
    assert!(!unit.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_serve_serves_a_file_added_to_its_folder_without_a_command() {
    let nats = NatsServer::start();
    let (home, tree) = home_with_catalog(&nats, &[("old.txt", b"old".to_vec())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let client = catalog_client(&connect(&nats.url()).await, "media");
    let data = pseudo_random_bytes(5, 300_000);
    write_file(tree.path(), "new/clip.bin", &data);
    let written = Instant::now();
    let listed = wait_for("the new file in the served listing", CHANGE_PROMISE, || {
        let client = client.clone();
        async move { client.get().await.ok().filter(|l| l.entries.iter().any(|e| e.path == "/new/clip.bin")) }
    })
    .await;
    eprintln!("served {:?} after it was written", written.elapsed());
    let entry = listed.entries.iter().find(|e| e.path == "/new/clip.bin").unwrap();
    assert_eq!(entry.hash, sha256_hex(&data));
    std::fs::remove_file(tree.path().join("old.txt")).unwrap();
    wait_for("the removed file to leave the listing", CHANGE_PROMISE, || {
        let client = client.clone();
        async move { client.get().await.ok().filter(|l| l.entries.iter().all(|e| e.path != "/old.txt")).map(|_| ()) }
    })
    .await;
}

/// An autofs trigger on a folder, as `x-systemd.automount` leaves one; Drop removes it.
struct Autofs(PathBuf);

impl Autofs {
    /// Mounts a direct autofs trigger on `dir` whose daemon is gone at once (catatonic: no
    /// automount daemon answers here, so lookups pass through instead of waiting for one).
    fn catatonic(dir: &Path) -> Autofs {
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) fills two descriptors, closed below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let pgrp = unsafe { libc::getpgrp() };
        let opts = format!("fd={},pgrp={pgrp},minproto=5,maxproto=5,direct", fds[1]);
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "autofs", "-o", &opts, "natster-test-autofs"]).arg(dir);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT);
        // SAFETY: closing the two descriptors made above.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        out.assert_success("mount -t autofs");
        // The first lookup finds the daemon's pipe closed and turns the trigger catatonic.
        let _ = Command::new("ls").arg(dir).stdout(Stdio::null()).stderr(Stdio::null()).status();
        Autofs(dir.to_path_buf())
    }
}

impl Drop for Autofs {
    fn drop(&mut self) {
        while natster_mount::fs::mount::top_mount(&self.0).is_some_and(|(kind, _)| kind == "autofs") {
            if !Command::new("umount").arg("-l").arg(&self.0).status().is_ok_and(|s| s.success()) {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autofs_trigger_on_the_target_is_mounted_over_not_refused() {
    require_fuse!();
    if !running_as_root() || !Path::new("/sbin/mount.fuse3").exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "mount(8) as root and mount.fuse3 are needed");
        eprintln!("SKIPPED autofs test: needs root and /sbin/mount.fuse3");
        return;
    }
    // A kernel built without autofs (some VM kernels) can never put a trigger on a target, so
    // there is nothing to mount over: not applicable, not skipped.
    let kernel_has_autofs = std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|list| list.lines().any(|l| l.split_whitespace().last() == Some("autofs")));
    if !kernel_has_autofs {
        eprintln!("not applicable: this kernel has no autofs (absent from /proc/filesystems)");
        return;
    }
    let nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("a.txt", b"through autofs".to_vec())]).await;
    let _served = Served::start(&home, &nats, "media").await;
    let mnt = mountpoint();
    let dir = std::fs::canonicalize(mnt.path()).unwrap();
    let _autofs = Autofs::catatonic(&dir);
    assert_eq!(natster_mount::fs::mount::top_mount(&dir).map(|m| m.0).as_deref(), Some("autofs"));
    let line =
        format!("{}#default {} fuse ro,x-systemd.automount,home={} 0 0", bin(), dir.display(), home.path().display());
    let (out, _fstab) = mount_by_fstab(&line, &dir);
    let pid = out.stdout.split("(pid ").nth(1).and_then(|r| r.split(',').next()).and_then(|n| n.trim().parse().ok());
    let _guard = HelperMount { dir: dir.clone(), pid };
    out.assert_success("mount over the autofs trigger");
    // Mounted with mount(2) directly (never opening the trigger), on top of the autofs mount.
    assert_eq!(natster_mount::fs::mount::top_mount(&dir).map(|m| m.0).as_deref(), Some("fuse.natster-mount"));
    assert_eq!(read_in_mount(&dir.join("media/a.txt")).unwrap(), b"through autofs");
    let mut umount = Command::new("umount");
    umount.arg(&dir).stdin(Stdio::null());
    run_with_timeout(umount, COMMAND_TIMEOUT).assert_success("umount");
}

/// A served catalog whose server fails at once (here its folder is gone) is started again
/// after a wait, not in a loop: its serve record's own coming and going are home changes that
/// would otherwise start the next attempt at once (one failure every ~100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_served_catalog_is_retried_after_a_wait_not_in_a_loop() {
    let nats = NatsServer::start();
    let (home, tree) = home_with_catalog(&nats, &[("a.txt", b"a".to_vec())]).await;
    home.run_async(["catalog", "serve", "media", "--at-login"]).await.assert_success("serve --at-login");
    drop(tree);
    let up = Daemon::start(home.command(["up", "--no-mount"]), None);
    let failures = |d: &Daemon| d.log().matches("stopped serving").count();
    let until = Instant::now() + READY_DEADLINE;
    while failures(&up) == 0 {
        assert!(Instant::now() < until, "the server never failed:\n{}", up.log());
        std::thread::sleep(POLL);
    }
    assert!(up.log().contains("trying again in 5s"), "{}", up.log());
    // A loop is seen within a moment; the next attempt is due 5 s after the first.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(failures(&up), 1, "retried without waiting:\n{}", up.log());
}
