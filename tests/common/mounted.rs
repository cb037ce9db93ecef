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
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(deadline) {
        Ok(v) => v,
        // `f` panicked (an assertion inside it): fail with its panic, not as a hang.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("{what} ended without a result"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {deadline:?} (the mount hangs)")
        }
    }
}
pub const UNMOUNT_DEADLINE: Duration = Duration::from_secs(10);

/// Why FUSE tests cannot run here, or `None` when /dev/fuse and fusermount3 are present.
pub fn fuse_missing() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some(
            "/dev/fuse is missing (scripts/setup.sh installs fuse3; containers need --device /dev/fuse)".into(),
        );
    }
    let fusermount = Command::new("fusermount3").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if fusermount.is_err() {
        return Some("fusermount3 is missing (scripts/setup.sh installs fuse3)".into());
    }
    None
}

/// [`fuse_available_for`] named after the running test: libtest names each test's thread
/// after the test (tokio::test runs the body on that thread), so resilience.rs's plain
/// `if !fuse_available() { return; }` is reported by name too.
pub fn fuse_available() -> bool {
    let thread = std::thread::current();
    let name = match thread.name() {
        Some(n) if n != "main" => format!("{}::{n}", env!("CARGO_CRATE_NAME")),
        _ => format!("{}::(a FUSE test)", env!("CARGO_CRATE_NAME")),
    };
    fuse_available_for(&name)
}

/// Whether the FUSE test `test` can run. Without FUSE: under `CI=true` it panics (a CI
/// machine must run every test); otherwise it records `SKIPPED <test>: <reason>` on stderr
/// and as one line appended to the file named by `NATSTER_SKIP_LOG`, which scripts/test.sh
/// counts, so a skip is never reported as a pass.
pub fn fuse_available_for(test: &str) -> bool {
    runnable_or_skipped(test, "FUSE", fuse_missing())
}

/// Whether `test`, which needs `what`, can run: `missing` is why not. Without it, under
/// `CI=true` it panics; otherwise it records the skip as [`fuse_available_for`] says.
pub fn runnable_or_skipped(test: &str, what: &str, missing: Option<String>) -> bool {
    let Some(reason) = missing else { return true };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs {what} and CI=true forbids skipping it: {reason}");
    }
    let line = format!("SKIPPED {test}: {reason}\n");
    eprint!("{line}");
    if let Some(log) = std::env::var_os("NATSTER_SKIP_LOG") {
        use std::io::Write;
        // One write of one short line with O_APPEND: lines from parallel tests do not mix.
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("NATSTER_SKIP_LOG");
        f.write_all(line.as_bytes()).expect("write NATSTER_SKIP_LOG");
    }
    false
}

/// The running test's path (`crate::module::function`) from the type name of an item
/// declared inside it; used by [`require_fuse!`].
pub fn test_name_from(item_type_name: &str) -> String {
    let name = item_type_name.strip_suffix("::here").unwrap_or(item_type_name);
    name.replace("::{{closure}}", "")
}

/// `require_fuse!();` at the top of a FUSE test: returns from the test, recorded as
/// skipped by name, when FUSE is missing (and fails under `CI=true`).
#[macro_export]
macro_rules! require_fuse {
    () => {{
        fn here() {}
        let name = $crate::common::mounted::test_name_from(std::any::type_name_of_val(&here));
        if !$crate::common::mounted::fuse_available_for(&name) {
            return;
        }
    }};
}

/// `natster-mount mount --foreground` as a child; Drop sends SIGTERM, waits (bounded), and
/// falls back to a lazy unmount and SIGKILL, so no stale mount survives a failing test.
pub struct Mounted {
    child: Child,
    dir: std::path::PathBuf,
    /// The temporary mountpoint [`Mounted::start`] made (none for [`Mounted::start_at`]).
    _own_dir: Option<tempfile::TempDir>,
    log: tempfile::NamedTempFile,
}

impl Mounted {
    pub fn start(home: &TestHome, extra: &[&str]) -> Mounted {
        let dir = tempfile::Builder::new().prefix("natster-mnt-").tempdir().expect("mountpoint");
        let mut m = Self::start_at(home, dir.path(), extra);
        m._own_dir = Some(dir);
        m
    }

    /// Like [`Mounted::start`], on the caller's (empty) folder `dir`.
    pub fn start_at(home: &TestHome, dir: &Path, extra: &[&str]) -> Mounted {
        let log = tempfile::NamedTempFile::new().expect("mount log");
        let mnt = dir.to_str().expect("utf-8 temp path").to_string();
        let mut args = vec!["mount", mnt.as_str(), "--foreground"];
        args.extend_from_slice(extra);
        let child = home
            .command(&args)
            .env("NATSTER_LOG", "natster_mount=debug,warn")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("spawn mount");
        let mut m = Mounted { child, dir: dir.to_path_buf(), _own_dir: None, log };
        let until = Instant::now() + MOUNT_DEADLINE;
        while !is_mounted(&m.dir) {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("mount exited with {status}:\n{}", m.log());
            }
            assert!(Instant::now() < until, "mount not up within {MOUNT_DEADLINE:?}:\n{}", m.log());
            std::thread::sleep(POLL);
        }
        m
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Unmounts with SIGTERM and checks the process exits cleanly and the mount is gone.
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Like [`Mounted::stop`], with another signal (SIGINT: Ctrl-C).
    pub fn stop_with(mut self, signal: i32) {
        let status = self.terminate_with(signal).unwrap_or_else(|| panic!("mount did not exit after signal {signal}"));
        assert!(status.success(), "mount exited with {status} after signal {signal}:\n{}", self.log());
        assert!(!is_mounted(&self.dir), "still mounted after signal {signal}");
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.terminate_with(libc::SIGTERM)
    }

    fn terminate_with(&mut self, signal: i32) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
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
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
        }
        if std::thread::panicking() {
            eprintln!("--- mount log (last lines) ---\n{}", tail(&self.log(), 40));
        }
    }
}

/// Extended attribute `name` of `path` as text, within the mount I/O deadline.
pub fn getxattr(path: &Path, name: &str) -> Result<String, String> {
    let (p, n) = (path.to_path_buf(), name.to_string());
    bounded(&format!("getxattr {name}"), MOUNT_IO_DEADLINE, move || {
        let c_path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let c_name = std::ffi::CString::new(n).unwrap();
        let mut buf = vec![0u8; 4096];
        // SAFETY: valid C strings and a buffer of the given length.
        let len = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if len < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        buf.truncate(len as usize);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
}

/// The mount's FUSE request counts by kind (`user.natster.calls` on its root).
pub fn fuse_calls(mount: &Path) -> std::collections::BTreeMap<String, u64> {
    let text = getxattr(mount, "user.natster.calls").expect("user.natster.calls on the mount root");
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().expect("a count")))
        .collect()
}
