//! `natster-mount status`: each long-running process (`up`, `mount`, `catalog serve`) answers
//! on a unix socket of its own, `$NATSTER_HOME/run/<pid>.sock`, with one JSON line describing
//! what it serves and mounts, then closes. `status` asks every socket there.
//!
//! Why a socket and not a state file: the numbers (readers in the last minute, cache use,
//! online or not) are read live from the running parts, with no periodic disk writes, and a
//! process that died cannot leave a stale answer: its socket refuses the connection, and
//! `status` removes it. The socket reads nothing from the caller (no request to parse), and
//! lives in the home (0700), so only its owner can ask.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::served::ServedStatus;
use crate::context::Home;
use crate::fs::mount::MountedStatus;

/// Bound on one answer, both ways.
const ANSWER_BOUND: Duration = Duration::from_secs(2);
/// Largest answer `status` reads.
const MAX_ANSWER: u64 = 4 << 20;

/// What one process reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: u32,
    /// `up`, `mount` or `catalog serve`.
    pub role: String,
    pub context: String,
    pub server: String,
    pub connected: bool,
    /// Seconds since the epoch.
    pub started: u64,
    #[serde(default)]
    pub serving: Vec<ServedStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<MountStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountStatus {
    pub mountpoint: String,
    pub cache_used: u64,
    pub cache_budget: u64,
    pub catalogs: Vec<MountedStatus>,
}

fn run_dir(home: &Home) -> PathBuf {
    home.path().join("run")
}

/// Answers on `run/<pid>.sock` until dropped (the socket file goes with it).
pub struct StatusSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts answering with what `report` says at the time of each connection. Inside the runtime.
pub fn serve(home: &Home, report: Arc<dyn Fn() -> ProcessStatus + Send + Sync>) -> Result<StatusSocket> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = run_dir(home);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {} (`status` will not see this process)", path.display()))?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let report = report.clone();
            tokio::spawn(async move {
                let Ok(mut line) = serde_json::to_vec(&report()) else { return };
                line.push(b'\n');
                let _ = tokio::time::timeout(ANSWER_BOUND, stream.write_all(&line)).await;
            });
        }
    });
    Ok(StatusSocket { path, task })
}

/// Every live process's report, by pid; sockets of processes that died are removed.
pub fn gather(home: &Home) -> Vec<ProcessStatus> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(run_dir(home)).into_iter().flatten().flatten();
    let mut sockets: Vec<PathBuf> =
        entries.map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "sock")).collect();
    sockets.sort();
    for socket in sockets {
        match ask(&socket) {
            Ok(status) => found.push(status),
            Err(Ask::Gone) => {
                let _ = std::fs::remove_file(&socket);
            }
            Err(Ask::Garbled(why)) => tracing::warn!("{}: {why}", socket.display()),
        }
    }
    found.sort_by_key(|s| s.pid);
    found
}

enum Ask {
    Gone,
    Garbled(String),
}

fn ask(socket: &Path) -> std::result::Result<ProcessStatus, Ask> {
    let stream = UnixStream::connect(socket).map_err(|_| Ask::Gone)?;
    let _ = stream.set_read_timeout(Some(ANSWER_BOUND));
    let mut text = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut text).map_err(|e| Ask::Garbled(format!("no answer: {e}")))?;
    serde_json::from_slice(&text).map_err(|e| Ask::Garbled(format!("unreadable answer: {e}")))
}
