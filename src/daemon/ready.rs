//! Saying "up": sd_notify `READY=1` (and `STOPPING=1`) under systemd (`Type=notify`), and a
//! readiness pipe for a process that daemonizes itself (`mount` without `--foreground`, the
//! fstab helper): the parent returns only once the child wrote that the mount is up, or
//! fails with the child's own one-line error. Nothing polls mountinfo.
//!
//! The pipe's write end reaches the child as descriptor `NATSTER_READY_FD`; the child marks
//! it close-on-exec at once (programs it runs, such as fusermount3, must not hold it, or the
//! parent would wait for them too), writes one line (`ready …` or `error: …`) and closes it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

/// Environment variable naming the readiness pipe's descriptor in the child.
pub const READY_FD_ENV: &str = "NATSTER_READY_FD";

/// Tells systemd we are ready (a no-op outside a `Type=notify` unit).
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
}

/// Tells systemd we are stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// The write end of a readiness pipe this process was given.
pub struct ReadyPipe(std::fs::File);

impl ReadyPipe {
    /// The pipe named by [`READY_FD_ENV`], if any (taken: the variable is removed).
    pub fn from_env() -> Option<ReadyPipe> {
        let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
        // Called first thing in main, before any other thread exists.
        std::env::remove_var(READY_FD_ENV);
        // SAFETY: fcntl on a descriptor number only reads or sets its flags.
        let valid = fd > 2 && unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;
        // SAFETY: the parent passed us this descriptor for us alone; it is valid (checked above).
        valid.then(|| ReadyPipe(unsafe { std::fs::File::from_raw_fd(fd) }))
    }

    /// Says the mount is up; the parent prints `message` and exits 0.
    pub fn ready(mut self, message: &str) {
        let _ = writeln!(self.0, "ready {message}");
    }

    /// Says why starting failed; the parent prints it and exits 1.
    pub fn failed(mut self, error: &str) {
        let line = error.lines().next().unwrap_or("failed");
        let _ = writeln!(self.0, "error: {line}");
    }
}

/// Runs this program again with `args` as a detached process (its own session, output to
/// `log`), and waits until it says it is ready (returns its pid and message) or fails (its
/// error), at most `deadline`.
pub fn spawn_detached(
    args: &[OsString],
    envs: &[(&str, OsString)],
    log: &Path,
    deadline: Duration,
) -> Result<(u32, String)> {
    use std::os::unix::process::CommandExt;
    let (read_end, write_end) = pipe()?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot write {}", log.display()))?;
    let mut cmd = Command::new(std::env::current_exe().context("cannot find this program's path")?);
    cmd.args(args)
        .env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let fd = write_end.as_raw_fd();
    // SAFETY: setsid and fcntl are async-signal-safe; the child leaves our session (a mount
    // made at boot must outlive mount(8)) and keeps the pipe's write end across exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the background process")?;
    drop(write_end);
    let pid = child.id();
    let line = read_line_bounded(read_end, deadline);
    match line {
        Some(line) if line.starts_with("ready") => Ok((pid, line.trim_start_matches("ready").trim().to_string())),
        Some(line) if line.starts_with("error:") => {
            let _ = child.wait();
            bail!("{}", line.trim_start_matches("error:").trim())
        }
        _ => {
            // Exited without a word, or still silent at the deadline.
            let status = child.try_wait().ok().flatten();
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let reason = last_error_line(log).unwrap_or_else(|| "see the log".to_string());
            match status {
                Some(status) => bail!("the background process exited ({status}): {reason}; log {}", log.display()),
                None => bail!("the background process did not come up within {deadline:?}; see {}", log.display()),
            }
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a pipe");
    }
    // SAFETY: both descriptors were just created by pipe2 and are ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The first line written to `fd`, waiting at most `deadline` (None on EOF or timeout).
fn read_line_bounded(fd: OwnedFd, deadline: Duration) -> Option<String> {
    let until = std::time::Instant::now() + deadline;
    let mut file = std::fs::File::from(fd);
    let mut got = Vec::new();
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: poll on one valid descriptor we own.
        let n = unsafe { libc::poll(&mut poll, 1, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            continue;
        }
        let mut buf = [0u8; 512];
        match file.read(&mut buf) {
            Ok(0) => return (!got.is_empty()).then(|| String::from_utf8_lossy(&got).trim().to_string()),
            Ok(k) => {
                got.extend_from_slice(&buf[..k]);
                if let Some(end) = got.iter().position(|b| *b == b'\n') {
                    return Some(String::from_utf8_lossy(&got[..end]).to_string());
                }
                if got.len() > 4096 {
                    return Some(String::from_utf8_lossy(&got).to_string());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The last `error:` line of a log, for a child that died without writing to the pipe.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let tail = &text[text.len().saturating_sub(16 * 1024)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim().to_string())
}
