//! The record a running `catalog serve` (or `up`, for each catalog it serves) leaves in the home (`$NATSTER_HOME/<catalog>.serving.json`):
//! which process serves the catalog, on which host, and whether with `--allow-all`. A second
//! `catalog serve` reads it to say where the first one runs; `catalog ls` reads it to show who
//! can read a catalog served to every importer.
//!
//! Invariants and tricky cases:
//! - The record is advisory: a process killed with SIGKILL leaves it behind, so a record
//!   counts only while its process lives (same host: `kill(pid, 0)` and a `serve` command line;
//!   a record from another host sharing the home cannot be checked and counts as live).
//! - Only the process a record names removes it, so a forced second server that exits first
//!   does not erase the first one's record.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::context::Home;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeRecord {
    pub catalog: String,
    pub pid: u32,
    pub host: String,
    #[serde(default)]
    pub allow_all: bool,
    /// Seconds since the epoch.
    #[serde(default)]
    pub started: u64,
}

/// This machine's host name (empty if unknown).
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

fn process_serves(pid: u32) -> bool {
    let Ok(pid_t) = i32::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    let alive =
        unsafe { libc::kill(pid_t, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A reused pid belongs to some other program: its command line names no `serve` (nor `up`,
    // which serves the catalogs marked for it).
    alive
        && fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.split(|b| *b == 0).any(|arg| arg == b"serve" || arg == b"up"))
            .unwrap_or(true)
}

impl ServeRecord {
    pub fn path(home: &Home, catalog: &str) -> PathBuf {
        home.path().join(format!("{catalog}.serving.json"))
    }

    /// The record of this process serving `catalog`.
    pub fn current(catalog: &str, allow_all: bool) -> ServeRecord {
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        ServeRecord { catalog: catalog.to_string(), pid: std::process::id(), host: host_name(), allow_all, started }
    }

    /// The record of a server of `catalog` that still runs; None if there is none, it is
    /// unreadable, or its process is gone.
    pub fn load_live(home: &Home, catalog: &str) -> Option<ServeRecord> {
        let bytes = fs::read(Self::path(home, catalog)).ok()?;
        let record: ServeRecord = serde_json::from_slice(&bytes).ok()?;
        let live = record.host != host_name() || process_serves(record.pid);
        live.then_some(record)
    }

    /// Writes the record (atomically); the guard removes it when dropped.
    pub fn save(&self, home: &Home) -> Result<ServeGuard> {
        home.ensure()?;
        let path = Self::path(home, &self.catalog);
        let mut tmp = tempfile::NamedTempFile::new_in(home.path())?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        tmp.persist(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(ServeGuard { path, pid: self.pid })
    }

    /// "pid 123 on host h".
    pub fn whereabouts(&self) -> String {
        if self.host.is_empty() {
            format!("pid {}", self.pid)
        } else {
            format!("pid {} on {}", self.pid, self.host)
        }
    }
}

/// Removes the record on drop, if it is still ours.
pub struct ServeGuard {
    path: PathBuf,
    pid: u32,
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        let ours = fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ServeRecord>(&b).ok())
            .is_some_and(|r| r.pid == self.pid && r.host == host_name());
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}
