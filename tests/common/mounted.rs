//! A real FUSE mount of `natster-mount mount --foreground`, as a guard that always unmounts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natster_mount::fs::mount::is_mounted;

use super::{tail, TestHome, POLL};

pub const MOUNT_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on one interaction with a mount in tests (a read, a listing, a stat).
pub const MOUNT_IO_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `f` (which touches a mount) on its own thread and returns its result, failing the
/// test with `what` if it has not finished within `deadline`: a hung FUSE read must fail
/// the test, not stall the suite. The thread is left behind on a hang; the mount's guard
/// then detaches the mount, which ends the hung call.
pub fn bounded<T: Send + 'static>(what: &str, deadline: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(deadline) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {deadline:?} (the mount hangs)"),
    }
}
pub const UNMOUNT_DEADLINE: Duration = Duration::from_secs(10);

pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists()
        && Command::new("fusermount3").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !ok {
        eprintln!("skipping: /dev/fuse or fusermount3 is missing (scripts/setup.sh installs fuse3)");
    }
    ok
}

/// `natster-mount mount --foreground` as a child; Drop sends SIGTERM, waits (bounded), and
/// falls back to a lazy unmount and SIGKILL, so no stale mount survives a failing test.
pub struct Mounted {
    child: Child,
    dir: tempfile::TempDir,
    log: tempfile::NamedTempFile,
}

impl Mounted {
    pub fn start(home: &TestHome, extra: &[&str]) -> Mounted {
        let dir = tempfile::Builder::new().prefix("natster-mnt-").tempdir().expect("mountpoint");
        let log = tempfile::NamedTempFile::new().expect("mount log");
        let mnt = dir.path().to_str().expect("utf-8 temp path").to_string();
        let mut args = vec!["mount", mnt.as_str(), "--foreground"];
        args.extend_from_slice(extra);
        let child = home
            .command(&args)
            .env("NATSTER_LOG", "natster_mount=debug,warn")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("spawn mount");
        let mut m = Mounted { child, dir, log };
        let until = Instant::now() + MOUNT_DEADLINE;
        while !is_mounted(m.dir.path()) {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("mount exited with {status}:\n{}", m.log());
            }
            assert!(Instant::now() < until, "mount not up within {MOUNT_DEADLINE:?}:\n{}", m.log());
            std::thread::sleep(POLL);
        }
        m
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Unmounts with SIGTERM and checks the process exits cleanly and the mount is gone.
    pub fn stop(mut self) {
        let status = self.terminate().expect("mount process did not exit after SIGTERM");
        assert!(status.success(), "mount exited with {status}:\n{}", self.log());
        assert!(!is_mounted(self.dir.path()), "still mounted after SIGTERM");
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + UNMOUNT_DEADLINE;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(POLL);
        }
        None
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.terminate().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(self.dir.path()) {
            let _ = Command::new("fusermount3").arg("-uz").arg(self.dir.path()).status();
        }
        if std::thread::panicking() {
            eprintln!("--- mount log (last lines) ---\n{}", tail(&self.log(), 40));
        }
    }
}
