//! Debounced file watching over the `notify` crate (inotify on Linux): a burst of changes
//! becomes one batch, so a folder's re-index or a home's reconcile runs a bounded number of
//! times however many files change.
//!
//! A batch ends [`Debounce::quiet`] after its last event, or [`Debounce::max_delay`] after its
//! first, whichever comes first: a single change is acted on within `quiet`, and a long copy
//! still gets acted on every `max_delay` (so files show up while it goes on), which bounds the
//! work to about one batch per `max_delay` of burst.
//!
//! Tricky cases: a queue overflow (the kernel dropped events) or a watch error counts as a
//! change, so the caller re-reads everything; the handler runs on notify's thread and only
//! records, it never blocks.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::Notify;
use tokio::time::Instant;

/// When a batch of changes is handed over.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

/// A served folder: a copy's many writes become one re-index; a change is served within the
/// 2 s promise (quiet + re-index + the readers' refresh).
pub const FOLDER_DEBOUNCE: Debounce = Debounce { quiet: Duration::from_millis(200), max_delay: Duration::from_secs(1) };

#[derive(Default)]
struct PendingState {
    first: Option<Instant>,
    last: Option<Instant>,
    events: u64,
}

#[derive(Default)]
struct Pending {
    state: Mutex<PendingState>,
    wake: Notify,
}

impl Pending {
    fn record(&self) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.first.get_or_insert(now);
        s.last = Some(now);
        s.events += 1;
        drop(s);
        self.wake.notify_one();
    }
}

/// Watches paths until dropped.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    pending: Arc<Pending>,
}

impl Watch {
    /// Watches `paths` (recursively or not); `relevant` picks the events that count (the
    /// access and open events that reading a file causes never do).
    pub fn new(
        paths: &[(&Path, bool)],
        relevant: impl Fn(&notify::Event) -> bool + Send + 'static,
    ) -> notify::Result<Watch> {
        let pending = Arc::new(Pending::default());
        let sink = pending.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if e.need_rescan() => sink.record(),
            Ok(e) if is_change(&e.kind) && relevant(&e) => sink.record(),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("file watch: {e}");
                sink.record();
            }
        })?;
        for (path, recursive) in paths {
            let mode = if *recursive { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
            watcher.watch(path, mode)?;
        }
        Ok(Watch { _watcher: watcher, pending })
    }

    /// Waits for the next batch of changes and returns how many events it held.
    pub async fn next_batch(&self, debounce: Debounce) -> u64 {
        loop {
            let woken = self.pending.wake.notified();
            let due = {
                let s = self.pending.state.lock().unwrap_or_else(|p| p.into_inner());
                match (s.first, s.last) {
                    (Some(first), Some(last)) => Some((last + debounce.quiet).min(first + debounce.max_delay)),
                    _ => None,
                }
            };
            match due {
                None => woken.await,
                Some(due) if Instant::now() >= due => {
                    let mut s = self.pending.state.lock().unwrap_or_else(|p| p.into_inner());
                    let events = s.events;
                    *s = PendingState::default();
                    return events;
                }
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = woken => {}
                    }
                }
            }
        }
    }
}

/// Events that change what a folder holds (reads and opens do not).
fn is_change(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// True if `event` names a path inside `dir`.
pub fn touches(event: &notify::Event, dir: &Path) -> bool {
    event.paths.iter().any(|p| p.starts_with(dir))
}

/// The file names (last components) an event names.
pub fn file_names(event: &notify::Event) -> impl Iterator<Item = String> + '_ {
    event.paths.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Canonical form of `path` if it resolves, else `path` itself.
pub fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_becomes_few_batches() {
        let dir = tempfile::tempdir().unwrap();
        let watch = Watch::new(&[(dir.path(), true)], |_| true).unwrap();
        let debounce = Debounce { quiet: Duration::from_millis(100), max_delay: Duration::from_millis(400) };
        for i in 0..200 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let events = tokio::time::timeout(Duration::from_secs(10), watch.next_batch(debounce)).await.unwrap();
        assert!(events >= 200, "{events} events");
        // Nothing more happened: no batch follows.
        let more = tokio::time::timeout(Duration::from_millis(300), watch.next_batch(debounce)).await;
        assert!(more.is_err(), "a second batch without changes");
    }
}
