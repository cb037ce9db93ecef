//! One served catalog as a long-running part: the catalog server, a watch on its folder that
//! re-indexes what changed (debounced), a watch on its catalog and share files in the home, and
//! the notices that tell readers. Used by `catalog serve` and by `up` (one per catalog).
//!
//! Invariants and tricky cases:
//! - A change in the folder is served and announced within [`FOLDER_DEBOUNCE`]'s quiet time
//!   plus one incremental re-index (hashing only what changed); a burst makes about one
//!   re-index per `max_delay`. Each re-index is logged with what it found, and counted.
//! - The served listing is re-loaded right after a re-index, not at the next heartbeat, and a
//!   notice goes out only when the revision differs from the last one announced (the server's
//!   own heartbeat may have re-loaded it first).
//! - A catalog re-rooted elsewhere (`catalog new --force`) moves the folder watch with it.
//! - The home holding the catalog may sit inside its folder: events there are ignored, or each
//!   re-index (which writes the catalog file) would cause the next.
//! - No file I/O on the async workers: re-index, loads and share lists run on the blocking pool.
//! - Stops as soon as `shutdown` resolves; the server's own stop is bounded (about 0.5 s).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};

use super::notice::Announcer;
use super::watch::{self, Watch, FOLDER_DEBOUNCE};
use crate::context::Home;
use crate::index;
use crate::server::{CatalogServer, ServerHandle, ServerOptions};

/// The home's files about one catalog change rarely and come in pairs (temporary, rename).
const HOME_DEBOUNCE: watch::Debounce =
    watch::Debounce { quiet: std::time::Duration::from_millis(100), max_delay: std::time::Duration::from_millis(500) };

/// One catalog being served, and what `status` reports about it.
pub struct ServedCatalog {
    pub name: String,
    handle: tokio::sync::watch::Sender<Option<ServerHandle>>,
    reindexes: AtomicU64,
    problem: Mutex<Option<String>>,
}

/// A served catalog as `status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServedStatus {
    pub catalog: String,
    pub online: bool,
    pub revision: String,
    pub entries: usize,
    pub readers_last_minute: usize,
    pub reindexes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl ServedCatalog {
    pub fn new(name: &str) -> Arc<ServedCatalog> {
        Arc::new(ServedCatalog {
            name: name.to_string(),
            handle: tokio::sync::watch::channel(None).0,
            reindexes: AtomicU64::new(0),
            problem: Mutex::new(None),
        })
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// Resolves once the server's subscriptions are in place.
    pub async fn serving(&self) {
        let mut handle = self.handle.subscribe();
        let Ok(h) = handle.wait_for(|h| h.is_some()).await.map(|h| h.clone()) else { return };
        if let Some(h) = h {
            let _ = h.serving().wait_for(|s| *s).await;
        }
    }

    /// Re-indexes done by the folder watch so far.
    pub fn reindexes(&self) -> u64 {
        self.reindexes.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> ServedStatus {
        let problem = self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match self.handle.borrow().as_ref() {
            Some(h) => ServedStatus {
                catalog: self.name.clone(),
                online: *h.serving().borrow(),
                revision: h.revision(),
                entries: h.entries(),
                readers_last_minute: h.readers_last_minute(),
                reindexes: self.reindexes(),
                problem,
            },
            None => ServedStatus {
                catalog: self.name.clone(),
                online: false,
                revision: String::new(),
                entries: 0,
                readers_last_minute: 0,
                reindexes: 0,
                problem,
            },
        }
    }

    /// Serves until `shutdown` resolves. `watch_folder`: keep the catalog current with its folder.
    /// `connected` says when NATS (re)connects, when readers are told again.
    pub async fn run(
        self: Arc<Self>,
        nats: async_nats::Client,
        connected: tokio::sync::watch::Receiver<bool>,
        home: Home,
        options: ServerOptions,
        watch_folder: bool,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let name = self.name.clone();
        let built = {
            let (nats, home, name) = (nats.clone(), home.clone(), name.clone());
            tokio::task::spawn_blocking(move || CatalogServer::new(nats, home, &name, options))
                .await
                .context("the catalog load was cancelled")?
        };
        let server = match built {
            Ok(server) => server,
            Err(e) => {
                self.set_problem(Some(format!("{e:#}")));
                return Err(e);
            }
        };
        let handle = server.handle();
        self.handle.send_replace(Some(handle.clone()));
        self.set_problem(None);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut serving = tokio::spawn(server.run(async {
            let _ = stop_rx.await;
        }));
        let keeper = tokio::spawn(self.clone().keep_current(nats, connected, home, handle, watch_folder));
        tokio::pin!(shutdown);
        let outcome = tokio::select! {
            _ = &mut shutdown => None,
            ended = &mut serving => Some(ended),
        };
        keeper.abort();
        let outcome = match outcome {
            Some(ended) => ended,
            None => {
                let _ = stop_tx.send(());
                serving.await
            }
        };
        match outcome {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the server of catalog '{name}' failed: {e}")),
        }
    }

    /// Folder and home watches, re-index, re-load and notices, until aborted.
    async fn keep_current(
        self: Arc<Self>,
        nats: async_nats::Client,
        mut connected: tokio::sync::watch::Receiver<bool>,
        home: Home,
        handle: ServerHandle,
        watch_folder: bool,
    ) {
        let name = self.name.clone();
        let announcer = Announcer::new(nats, home.clone(), &name);
        let home_dir = watch::resolved(home.path());
        let files = [format!("{name}.json"), format!("{name}.shares.json")];
        let home_watch = match Watch::new(&[(&home_dir, false)], move |e| {
            watch::file_names(e).any(|f| files.contains(&f))
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(catalog = %name, "cannot watch {} ({e}); share and re-index changes are picked up at the next heartbeat", home_dir.display());
                None
            }
        };
        let mut root = handle.root();
        let mut folder = if watch_folder { watch_root(&name, &root, &home_dir) } else { None };
        // Readers hear from us once we serve, and again after every reconnect.
        let mut serving = handle.serving();
        let _ = serving.wait_for(|s| *s).await;
        let mut announced = handle.revision();
        announcer.announce(&announced, false).await;
        let mut was_connected = *connected.borrow_and_update();
        loop {
            let mut access = false;
            tokio::select! {
                events = batch(folder.as_ref(), FOLDER_DEBOUNCE) => {
                    self.reindex(&home, &root, events).await;
                    handle.reload().await;
                }
                _ = batch(home_watch.as_ref(), HOME_DEBOUNCE) => {
                    handle.reload().await;
                    access = announcer.shares_changed().await;
                    let now = handle.root();
                    if now != root && watch_folder {
                        tracing::info!(catalog = %name, "catalog now indexes {}; watching it instead of {}", now.display(), root.display());
                        folder = watch_root(&name, &now, &home_dir);
                    }
                    root = now;
                }
                changed = connected.changed() => {
                    if changed.is_err() {
                        connected = tokio::sync::watch::channel(true).1;
                        continue;
                    }
                    let now = *connected.borrow_and_update();
                    let reconnected = now && !was_connected;
                    was_connected = now;
                    if reconnected {
                        announcer.announce(&handle.revision(), false).await;
                    }
                    continue;
                }
            }
            let revision = handle.revision();
            if revision != announced || access {
                announcer.announce(&revision, access).await;
                announced = revision;
            }
        }
    }

    /// Re-indexes the folder (blocking pool), logging what it found.
    async fn reindex(&self, home: &Home, root: &Path, events: u64) {
        let started = std::time::Instant::now();
        let (h, n, r) = (home.clone(), self.name.clone(), root.to_path_buf());
        let done = tokio::task::spawn_blocking(move || index::index_folder(&h, &n, &r, None, &|_| {})).await;
        let count = self.reindexes.fetch_add(1, Ordering::Relaxed) + 1;
        match done {
            Ok(Ok((catalog, report))) => {
                tracing::info!(
                    catalog = %self.name,
                    reindex = count,
                    events,
                    files = report.files,
                    hashed = report.hashed,
                    removed = report.removed,
                    revision = %catalog.revision(),
                    "re-indexed after a change in the folder ({} ms)",
                    started.elapsed().as_millis()
                );
                self.set_problem(None);
            }
            Ok(Err(e)) => {
                tracing::warn!(catalog = %self.name, "re-index failed: {e:#}; still serving the previous listing");
                self.set_problem(Some(format!("re-index failed: {e:#}")));
            }
            Err(e) => tracing::warn!(catalog = %self.name, "re-index did not finish: {e}"),
        }
    }
}

/// The next batch of a watch, or never without one.
pub async fn batch(watch: Option<&Watch>, debounce: watch::Debounce) -> u64 {
    match watch {
        Some(w) => w.next_batch(debounce).await,
        None => std::future::pending().await,
    }
}

/// A recursive watch on the catalog's folder, ignoring the home inside it if it is there.
fn watch_root(name: &str, root: &Path, home_dir: &Path) -> Option<Watch> {
    let home_dir: PathBuf = home_dir.to_path_buf();
    match Watch::new(&[(root, true)], move |e| !watch::touches(e, &home_dir)) {
        Ok(w) => {
            tracing::info!(catalog = %name, "watching {} for changes", root.display());
            Some(w)
        }
        Err(e) => {
            tracing::warn!(
                catalog = %name,
                "cannot watch {} ({e}); run `natster-mount catalog new {name} {}` after changing it (or raise fs.inotify.max_user_watches)",
                root.display(),
                root.display()
            );
            None
        }
    }
}
