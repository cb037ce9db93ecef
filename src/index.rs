//! Catalog index: walks a folder and records, per file, its path, size, sha256 and mime type in
//! `$NATSTER_HOME/<name>.json`, in the original Natster format (plus additive fields the
//! original ignores). Re-indexing keeps the hash of every file whose size, mtime and inode
//! number did not change, so an unchanged tree costs one `stat` per file (and one of its tree
//! file), and nothing is written.
//!
//! In the same read pass as the sha256, each file's leaf hashes ([`crate::chunk_tree`]) are
//! computed: their root goes into the entry as `tree` (hex; additive), the leaves themselves
//! into a content-addressed side file, `$NATSTER_HOME/trees/<sha256>.leaves` (raw 32-byte
//! hashes), from which the server answers chunk proofs. A side file that is missing or of the
//! wrong length makes the next re-index hash that file again; one whose content does not give
//! the entry's root is refused by the server ([`load_tree`]).

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chunk_tree;
use crate::context::Home;
use crate::protocol::{self, CatalogEntry, CatalogSummary};

/// One indexed file, in the original's `MediaEntry` shape plus `mtime_ns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Path below the root, with a leading `/` and `/` separators.
    pub path: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub mime_type: String,
    pub hash: String,
    pub byte_size: u64,
    /// Modification time in nanoseconds since the epoch; with the size, decides whether a
    /// file must be hashed again.
    #[serde(default)]
    pub mtime_ns: i64,
    /// The file's inode number when it was hashed (0: unknown, an older index): a file
    /// replaced by another of the same size and mtime (`cp -p`, `rsync -t`) is hashed again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ino: u64,
    /// Root of the file's chunk tree in hex ([`crate::chunk_tree`]); absent in indexes
    /// written before protocol 4 or by the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A catalog as stored on disk (the original's `MediaLibrary`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Catalog {
    pub name: String,
    pub root_dir: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, rename = "image", skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub last_modified: i64,
    #[serde(default)]
    pub entries: Vec<IndexEntry>,
}

/// What a (re-)index did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IndexReport {
    pub files: usize,
    pub hashed: usize,
    pub reused: usize,
    pub removed: usize,
    pub bytes_hashed: u64,
    pub skipped: Vec<String>,
    /// Whether the index file was written (an unchanged tree leaves it as it was).
    pub written: bool,
    /// Tree files of replaced or removed files deleted after the index was saved.
    pub trees_removed: usize,
}

impl Catalog {
    pub fn file_path(home: &Home, name: &str) -> PathBuf {
        home.path().join(format!("{name}.json"))
    }

    /// Loads catalog `name` from `home`, with an error that says how to create it.
    pub fn load(home: &Home, name: &str) -> Result<Catalog> {
        protocol::validate_catalog_name(name).map_err(anyhow::Error::msg)?;
        let path = Self::file_path(home, name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no catalog named '{name}' in {}; create it with `natster-mount catalog new {name} DIR`",
                home.path().display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let catalog: Catalog = serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a valid catalog file; re-create it with `natster-mount catalog new`", path.display())
        })?;
        if catalog.name != name {
            bail!("{} holds catalog '{}', not '{name}'; rename or re-create it", path.display(), catalog.name);
        }
        Ok(catalog)
    }

    /// Writes the catalog atomically (temporary file, then rename), so a reader or a crash
    /// never sees half a file.
    pub fn save(&self, home: &Home) -> Result<PathBuf> {
        home.ensure()?;
        let path = Self::file_path(home, &self.name);
        let mut tmp = tempfile::NamedTempFile::new_in(home.path())
            .with_context(|| format!("cannot write into {}", home.path().display()))?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        tmp.write_all(b"\n")?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(path)
    }

    pub fn find_by_hash(&self, hash: &str) -> Option<&IndexEntry> {
        self.entries.iter().find(|e| e.hash == hash)
    }

    /// A digest of everything a reader sees; changes exactly when the listing changes.
    pub fn revision(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.name, &self.description] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for e in &self.entries {
            for part in [&e.path, &e.hash, &e.mime_type, &e.description, e.tree.as_deref().unwrap_or("")] {
                h.update(part.as_bytes());
                h.update([0]);
            }
            h.update(e.byte_size.to_be_bytes());
            h.update(e.mtime_ns.to_be_bytes());
        }
        hex::encode(&h.finalize()[..8])
    }

    /// The `get` reply for this catalog.
    pub fn summary(&self) -> CatalogSummary {
        CatalogSummary {
            name: self.name.clone(),
            description: self.description.clone(),
            image: self.image.clone(),
            entries: self
                .entries
                .iter()
                .map(|e| CatalogEntry {
                    path: e.path.clone(),
                    description: e.description.clone(),
                    mime_type: e.mime_type.clone(),
                    hash: e.hash.clone(),
                    byte_size: e.byte_size,
                    mtime: e.mtime_ns.div_euclid(1_000_000_000),
                    tree: e.tree.clone(),
                })
                .collect(),
            revision: self.revision(),
            protocol: protocol::PROTOCOL_VERSION,
            total_entries: None,
        }
    }
}

/// Catalog `name` of `home` as a compact listing (what a mount shows of an own catalog),
/// streamed from its file: never the whole index beside it. Same errors as [`Catalog::load`].
pub fn load_listing(home: &Home, name: &str) -> Result<crate::listing::Listing> {
    protocol::validate_catalog_name(name).map_err(anyhow::Error::msg)?;
    let path = Catalog::file_path(home, name);
    let Some(listing) = crate::listing::load(&path)? else {
        bail!(
            "no catalog named '{name}' in {}; create it with `natster-mount catalog new {name} DIR`",
            home.path().display()
        )
    };
    if listing.name != name {
        bail!("{} holds catalog '{}', not '{name}'; rename or re-create it", path.display(), listing.name);
    }
    Ok(listing)
}

/// JSON files of the home that are not catalogs (server pins, `up`'s serve marks).
pub const NOT_CATALOGS: &[&str] = &["known_servers", "at-login"];

/// Names of the catalogs indexed in `home` (its `<name>.json` files), sorted.
pub fn catalog_names(home: &Home) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|item| {
            let file = item.file_name().to_string_lossy().to_string();
            if file == crate::identity::PINS_FILE {
                return None;
            }
            let stem = file.strip_suffix(".json")?;
            let catalog = !stem.ends_with(".shares") && !NOT_CATALOGS.contains(&stem);
            (catalog && protocol::validate_catalog_name(stem).is_ok()).then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

/// A file found by the walk.
struct Found {
    rel: String,
    abs: PathBuf,
    size: u64,
    mtime_ns: i64,
    ino: u64,
}

/// Indexes `dir` as catalog `name`: creates it, or re-indexes incrementally when it exists.
/// `progress` receives the number of bytes to hash, then each hashed amount.
pub fn index_folder(
    home: &Home,
    name: &str,
    dir: &Path,
    description: Option<&str>,
    progress: &(dyn Fn(ProgressEvent) + Sync),
) -> Result<(Catalog, IndexReport)> {
    protocol::validate_catalog_name(name).map_err(anyhow::Error::msg)?;
    let root = fs::canonicalize(dir)
        .with_context(|| format!("cannot open folder {}; check that it exists and is readable", dir.display()))?;
    if !root.is_dir() {
        bail!("{} is not a folder; give the folder to share", dir.display());
    }
    let root_str = root
        .to_str()
        .with_context(|| format!("folder path {} is not valid UTF-8; move or rename it", root.display()))?
        .to_string();

    // Held until the index is saved: the trees this run writes are referenced by no index
    // until then, and a collection must not take them meanwhile.
    let trees_held = hold_trees(home)?;
    let previous = if Catalog::file_path(home, name).exists() { Some(Catalog::load(home, name)?) } else { None };
    let known: HashMap<&str, &IndexEntry> = match &previous {
        Some(p) if p.root_dir == root_str => p.entries.iter().map(|e| (e.path.as_str(), e)).collect(),
        _ => HashMap::new(),
    };

    let mut report = IndexReport::default();
    let found = walk(&root, &private_folders(home), &mut report.skipped)?;

    let mut entries: Vec<Option<IndexEntry>> = Vec::with_capacity(found.len());
    let mut to_hash: Vec<usize> = Vec::new();
    for (i, f) in found.iter().enumerate() {
        match known.get(f.rel.as_str()) {
            Some(old)
                if old.byte_size == f.size
                    && old.mtime_ns == f.mtime_ns
                    && (old.ino == 0 || old.ino == f.ino)
                    && protocol::is_sha256_hex(&old.hash)
                    && has_tree_file(home, old) =>
            {
                entries.push(Some(IndexEntry { ino: f.ino, ..(*old).clone() }));
                report.reused += 1;
            }
            _ => {
                entries.push(None);
                to_hash.push(i);
            }
        }
    }
    progress(ProgressEvent::Start { bytes: to_hash.iter().map(|&i| found[i].size).sum() });

    let hashes = hash_files(home, &found, &to_hash, progress, &mut report.skipped)?;
    for (i, (hash, tree)) in hashes {
        let f = &found[i];
        entries[i] = Some(IndexEntry {
            path: f.rel.clone(),
            description: String::new(),
            mime_type: mime_guess::from_path(&f.rel).first_or_octet_stream().essence_str().to_string(),
            hash,
            byte_size: f.size,
            mtime_ns: f.mtime_ns,
            ino: f.ino,
            tree: Some(tree),
        });
        report.hashed += 1;
        report.bytes_hashed += f.size;
    }
    progress(ProgressEvent::Done);

    let entries: Vec<IndexEntry> = entries.into_iter().flatten().collect();
    report.files = entries.len();
    let present: std::collections::HashSet<&str> = found.iter().map(|f| f.rel.as_str()).collect();
    report.removed = known.keys().filter(|p| !present.contains(*p)).count();

    let description = match (description, &previous) {
        (Some(d), _) => d.to_string(),
        (None, Some(p)) => p.description.clone(),
        (None, None) => String::new(),
    };
    let mut catalog = Catalog {
        name: name.to_string(),
        root_dir: root_str,
        description,
        image: previous.as_ref().and_then(|p| p.image.clone()),
        last_modified: previous.as_ref().map(|p| p.last_modified).unwrap_or(0),
        entries,
    };
    let changed = previous.as_ref().map(|p| p.revision() != catalog.revision() || p.root_dir != catalog.root_dir);
    if changed != Some(false) {
        catalog.last_modified = unix_now();
        catalog.save(home)?;
        report.written = true;
    } else if previous.as_ref().is_some_and(|p| p.entries.iter().zip(&catalog.entries).any(|(a, b)| a.ino != b.ino)) {
        // Same listing; the inode numbers an older index lacked are kept for next time.
        catalog.save(home)?;
        report.written = true;
    }
    drop(trees_held);
    let kept: std::collections::HashSet<&str> = catalog.entries.iter().map(|e| e.hash.as_str()).collect();
    if previous.is_some_and(|p| p.entries.iter().any(|e| !kept.contains(e.hash.as_str()))) {
        report.trees_removed = collect_trees(home, &catalog);
    }
    Ok((catalog, report))
}

/// The lock every index run holds shared and [`collect_trees`] exclusively.
fn trees_lock(home: &Home) -> PathBuf {
    home.path().join("trees").join(".lock")
}

fn hold_trees(home: &Home) -> Result<crate::store::FileLock> {
    let dir = home.path().join("trees");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::store::FileLock::acquire_shared(&trees_lock(home))
}

/// Removes the tree files no catalog of `home` lists any more (files replaced or removed);
/// gives how many. `saved` is a catalog of the home as just saved, so it is not read again.
/// Skipped while another index runs (it holds the trees shared: its new trees are in no index
/// yet), and when any catalog cannot be read (its trees are unknown). Blocking.
pub fn collect_trees(home: &Home, saved: &Catalog) -> usize {
    let Ok(Some(_lock)) = crate::store::FileLock::try_acquire(&trees_lock(home)) else { return 0 };
    let mut listed: std::collections::HashSet<String> = saved.entries.iter().map(|e| e.hash.clone()).collect();
    for name in catalog_names(home).into_iter().filter(|n| *n != saved.name) {
        match Catalog::load(home, &name) {
            Ok(c) => listed.extend(c.entries.into_iter().map(|e| e.hash)),
            Err(e) => {
                tracing::debug!("tree files not collected: {e:#}");
                return 0;
            }
        }
    }
    let Ok(dir) = fs::read_dir(home.path().join("trees")) else { return 0 };
    let mut removed = 0;
    for item in dir.flatten() {
        let file = item.file_name();
        let Some(hash) = file.to_str().and_then(|f| f.strip_suffix(".leaves")) else { continue };
        if protocol::is_sha256_hex(hash) && !listed.contains(hash) && fs::remove_file(item.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

pub enum ProgressEvent {
    Start { bytes: u64 },
    Hashed(u64),
    Done,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn mtime_ns(meta: &fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

/// Walks the tree in name order. Regular files are indexed; a symlink is indexed only when
/// it resolves to a file inside the root (the server enforces the same rule when serving).
/// Symlinked folders are not followed, which also rules out loops.
/// Folders never indexed, wherever they sit: this home and the local operator's (seeds,
/// creds, contexts), canonical.
fn private_folders(home: &Home) -> Vec<PathBuf> {
    [Some(home.clone()), Home::operator_from_env()]
        .into_iter()
        .flatten()
        .filter_map(|h| fs::canonicalize(h.path()).ok())
        .collect()
}

/// True for a file that holds a NATS secret by its name: an nkey seed or a creds file.
fn is_secret_file(name: &str) -> bool {
    name.ends_with(".nk") || name.ends_with(".creds")
}

fn walk(root: &Path, private: &[PathBuf], skipped: &mut Vec<String>) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    let mut walker = walkdir::WalkDir::new(root).follow_links(false).sort_by_file_name().into_iter();
    while let Some(item) = walker.next() {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                skipped.push(format!("{e}"));
                continue;
            }
        };
        let ft = item.file_type();
        let abs = item.path().to_path_buf();
        let Ok(rel_path) = abs.strip_prefix(root) else { continue };
        if ft.is_dir() {
            if private.iter().any(|p| p == &abs) {
                skipped.push(format!(
                    "/{} (natster-mount's own state: keys and credentials are never shared)",
                    rel_path.display()
                ));
                walker.skip_current_dir();
            }
            continue;
        }
        let Some(rel) = rel_path.to_str() else {
            skipped.push(format!("{} (name is not valid UTF-8)", abs.display()));
            continue;
        };
        if rel.chars().any(char::is_control) {
            skipped.push(format!("/{} (its name holds a control character, which readers refuse)", rel.escape_debug()));
            continue;
        }
        if is_secret_file(rel) {
            skipped.push(format!("/{rel} (a NATS key or creds file: never shared)"));
            continue;
        }
        let meta = if ft.is_symlink() {
            match fs::canonicalize(&abs) {
                Ok(target) if target.starts_with(root) && target.is_file() => match fs::metadata(&target) {
                    Ok(m) => m,
                    Err(e) => {
                        skipped.push(format!("/{rel} (cannot read its target: {e})"));
                        continue;
                    }
                },
                _ => {
                    skipped.push(format!("/{rel} (symlink leaves the folder or is broken)"));
                    continue;
                }
            }
        } else if ft.is_file() {
            match item.metadata() {
                Ok(m) => m,
                // Gone since the folder was read (a download's temporary file, say).
                Err(e) => {
                    skipped.push(format!("/{rel} (cannot stat it: {e})"));
                    continue;
                }
            }
        } else {
            skipped.push(format!("/{rel} (not a regular file)"));
            continue;
        };
        found.push(Found { rel: format!("/{rel}"), abs, size: meta.len(), mtime_ns: mtime_ns(&meta), ino: meta.ino() });
    }
    Ok(found)
}

/// Hashes `found[i]` for every i in `which`, on one thread per core, and saves each one's
/// leaves; gives (sha256, tree root) in hex. A file removed meanwhile is left out and told
/// in `skipped`; any other failure fails the whole index.
fn hash_files(
    home: &Home,
    found: &[Found],
    which: &[usize],
    progress: &(dyn Fn(ProgressEvent) + Sync),
    skipped: &mut Vec<String>,
) -> Result<Vec<(usize, (String, String))>> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(which.len()));
    let vanished = Mutex::new(Vec::new());
    let first_error = Mutex::new(None);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(which.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = which.get(k) else { break };
                match hash_file(&found[i].abs, progress).and_then(|h| save_tree(home, h)) {
                    Ok(h) => results.lock().unwrap_or_else(|p| p.into_inner()).push((i, h)),
                    // Removed while the index ran: left out, as if the walk had not seen it.
                    Err(e) if !found[i].abs.exists() => {
                        let line = format!("{} (removed while it was indexed: {e:#})", found[i].rel);
                        vanished.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    }
                    Err(e) => {
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    skipped.extend(vanished.into_inner().unwrap_or_else(|p| p.into_inner()));
    Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// What one read pass over a file finds.
pub struct FileHashes {
    /// sha256 in lowercase hex.
    pub sha256: String,
    pub tree: chunk_tree::Tree,
}

/// sha256 and chunk tree of a file, in one read pass.
pub fn hash_file(path: &Path, progress: &(dyn Fn(ProgressEvent) + Sync)) -> Result<FileHashes> {
    let mut file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut leaves = chunk_tree::LeafHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        leaves.update(&buf[..n]);
        len += n as u64;
        progress(ProgressEvent::Hashed(n as u64));
    }
    let tree = chunk_tree::Tree::from_leaves(len, leaves.finish()).map_err(anyhow::Error::msg)?;
    Ok(FileHashes { sha256: hex::encode(hasher.finalize()), tree })
}

/// Where the leaves of the file with sha256 `hash` are kept.
pub fn tree_path(home: &Home, hash: &str) -> PathBuf {
    home.path().join("trees").join(format!("{hash}.leaves"))
}

/// Writes a hashed file's leaves to its side file; gives (sha256, tree root) in hex.
fn save_tree(home: &Home, hashes: FileHashes) -> Result<(String, String)> {
    let bytes: Vec<u8> = hashes.tree.leaves().concat();
    crate::store::write_atomic(&tree_path(home, &hashes.sha256), &bytes, 0o600)?;
    Ok((hashes.sha256, hex::encode(hashes.tree.root())))
}

/// True when `entry` has a tree root and a side file of the right length (one `stat`).
fn has_tree_file(home: &Home, entry: &IndexEntry) -> bool {
    let want = chunk_tree::leaf_count(entry.byte_size).saturating_mul(32);
    entry.tree.is_some() && fs::metadata(tree_path(home, &entry.hash)).is_ok_and(|m| m.len() == want)
}

/// Why [`load_tree`] found no usable tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeFileError {
    #[error("the index has no chunk tree for it (indexed before protocol 4)")]
    NotIndexed,
    #[error("its tree file {0} is missing")]
    Missing(String),
    #[error("its tree file {0} is damaged or belongs to other content")]
    Damaged(String),
}

/// The chunk tree of `entry` from its side file, checked against the entry's root (blocking).
pub fn load_tree(home: &Home, entry: &IndexEntry) -> std::result::Result<chunk_tree::Tree, TreeFileError> {
    let root = entry.tree.as_deref().ok_or(TreeFileError::NotIndexed)?;
    let path = tree_path(home, &entry.hash);
    let shown = path.display().to_string();
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TreeFileError::Missing(shown)),
        Err(_) => return Err(TreeFileError::Damaged(shown)),
    };
    if bytes.len() as u64 != chunk_tree::leaf_count(entry.byte_size).saturating_mul(32) {
        return Err(TreeFileError::Damaged(shown));
    }
    let leaves = bytes.chunks_exact(32).map(|h| h.try_into().unwrap_or([0u8; 32])).collect();
    let tree =
        chunk_tree::Tree::from_leaves(entry.byte_size, leaves).map_err(|_| TreeFileError::Damaged(shown.clone()))?;
    if hex::encode(tree.root()) != root {
        return Err(TreeFileError::Damaged(shown));
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet(_: ProgressEvent) {}

    #[test]
    fn reindex_reuses_unchanged_hashes_and_sees_changes() {
        let home_dir = tempfile::tempdir().unwrap();
        let home = Home::at(home_dir.path());
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir_all(tree.path().join("a/b")).unwrap();
        fs::write(tree.path().join("a/b/one.txt"), b"one").unwrap();
        fs::write(tree.path().join("two.mp4"), b"two").unwrap();

        let (cat, r) = index_folder(&home, "c", tree.path(), Some("d"), &quiet).unwrap();
        assert_eq!((r.files, r.hashed, r.reused), (2, 2, 0));
        assert_eq!(cat.entries[0].path, "/a/b/one.txt");
        assert_eq!(cat.entries[1].mime_type, "video/mp4");
        assert_eq!(cat.entries[0].hash, hex::encode(Sha256::digest(b"one")));
        let root = hex::encode(chunk_tree::Tree::of(b"one").root());
        assert_eq!(cat.entries[0].tree.as_deref(), Some(root.as_str()));
        assert_eq!(load_tree(&home, &cat.entries[0]).unwrap().root(), chunk_tree::Tree::of(b"one").root());

        // A mount streams the index into a compact listing with the same revision.
        let compact = load_listing(&home, "c").unwrap();
        assert_eq!(compact.revision, cat.revision());
        assert_eq!(compact.to_summary().entries, cat.summary().entries);

        let (cat2, r) = index_folder(&home, "c", tree.path(), None, &quiet).unwrap();
        assert_eq!((r.hashed, r.reused), (0, 2));
        assert_eq!(cat2.revision(), cat.revision());
        assert_eq!(cat2.description, "d");

        // A lost tree file is made again; a damaged one is refused until then.
        let one = tree_path(&home, &cat.entries[0].hash);
        std::fs::write(&one, [0u8; 32]).unwrap();
        assert!(matches!(load_tree(&home, &cat.entries[0]), Err(TreeFileError::Damaged(_))));
        std::fs::remove_file(&one).unwrap();
        assert!(matches!(load_tree(&home, &cat.entries[0]), Err(TreeFileError::Missing(_))));
        let (_, r) = index_folder(&home, "c", tree.path(), None, &quiet).unwrap();
        assert_eq!((r.hashed, r.reused), (1, 1));
        assert!(load_tree(&home, &cat.entries[0]).is_ok());

        // Replaced by another file of the same size and mtime (`cp -p`): hashed again.
        let two = tree.path().join("two.mp4");
        let mtime = fs::metadata(&two).unwrap().modified().unwrap();
        fs::write(tree.path().join("other"), b"TWO").unwrap();
        fs::File::options().write(true).open(tree.path().join("other")).unwrap().set_modified(mtime).unwrap();
        fs::rename(tree.path().join("other"), &two).unwrap();
        let (cat_cp, r) = index_folder(&home, "c", tree.path(), None, &quiet).unwrap();
        assert_eq!((r.hashed, r.reused), (1, 1));
        assert_eq!(cat_cp.entries[1].hash, hex::encode(Sha256::digest(b"TWO")));

        fs::write(tree.path().join("two.mp4"), b"changed").unwrap();
        fs::remove_file(tree.path().join("a/b/one.txt")).unwrap();
        let (cat3, r) = index_folder(&home, "c", tree.path(), None, &quiet).unwrap();
        assert_eq!((r.files, r.hashed, r.removed), (1, 1, 1));
        assert_ne!(cat3.revision(), cat.revision());
        assert_eq!(Catalog::load(&home, "c").unwrap().entries, cat3.entries);
    }

    #[test]
    fn trees_of_removed_files_are_collected_unless_another_catalog_lists_them() {
        let home_dir = tempfile::tempdir().unwrap();
        let home = Home::at(home_dir.path());
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fs::write(a.path().join("gone.bin"), b"gone").unwrap();
        fs::write(a.path().join("shared.bin"), b"in both").unwrap();
        fs::write(a.path().join("kept.bin"), b"kept").unwrap();
        fs::write(b.path().join("copy.bin"), b"in both").unwrap();
        let (cat, _) = index_folder(&home, "a", a.path(), None, &quiet).unwrap();
        index_folder(&home, "b", b.path(), None, &quiet).unwrap();
        let tree_of = |path: &str| tree_path(&home, &cat.entries.iter().find(|e| e.path == path).unwrap().hash);
        let (gone, shared, kept) = (tree_of("/gone.bin"), tree_of("/shared.bin"), tree_of("/kept.bin"));

        // While another index runs (it holds the trees shared), nothing is collected.
        let other_run = hold_trees(&home).unwrap();
        fs::remove_file(a.path().join("gone.bin")).unwrap();
        fs::remove_file(a.path().join("shared.bin")).unwrap();
        let (_, r) = index_folder(&home, "a", a.path(), None, &quiet).unwrap();
        assert_eq!(r.trees_removed, 0);
        assert!(gone.exists());
        drop(other_run);

        assert_eq!(collect_trees(&home, &Catalog::load(&home, "a").unwrap()), 1);
        assert!(!gone.exists(), "no catalog lists it");
        assert!(shared.exists(), "catalog b still lists the same content");
        assert!(kept.exists());
        assert!(load_tree(&home, Catalog::load(&home, "a").unwrap().entries.first().unwrap()).is_ok());
    }

    #[test]
    fn keys_creds_and_the_home_itself_are_never_indexed() {
        // The home inside the shared folder, as ~/.natster is inside ~.
        let tree = tempfile::tempdir().unwrap();
        let home = Home::at(tree.path().join(".natster"));
        fs::create_dir_all(home.path()).unwrap();
        fs::write(home.path().join("identity.nk"), b"SUAB").unwrap();
        fs::write(home.path().join("default.context"), b"{}").unwrap();
        fs::create_dir_all(tree.path().join("keys")).unwrap();
        fs::write(tree.path().join("keys/alice.creds"), b"-----BEGIN NATS USER JWT-----").unwrap();
        fs::write(tree.path().join("keys/op.nk"), b"SOAB").unwrap();
        fs::write(tree.path().join("film.mp4"), b"film").unwrap();
        let (cat, r) = index_folder(&home, "c", tree.path(), None, &quiet).unwrap();
        let paths: Vec<&str> = cat.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/film.mp4"]);
        let said = r.skipped.join("\n");
        assert!(said.contains("/.natster (natster-mount's own state"), "{said}");
        assert!(said.contains("/keys/alice.creds (a NATS key or creds file") && said.contains("/keys/op.nk"), "{said}");
    }

    #[test]
    fn symlinks_leaving_the_root_are_skipped() {
        let home_dir = tempfile::tempdir().unwrap();
        let home = Home::at(home_dir.path());
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let tree = tempfile::tempdir().unwrap();
        fs::write(tree.path().join("in.txt"), b"i").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), tree.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(tree.path().join("in.txt"), tree.path().join("alias")).unwrap();
        let (cat, r) = index_folder(&home, "c", tree.path(), None, &quiet).unwrap();
        let paths: Vec<_> = cat.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/alias", "/in.txt"]);
        assert_eq!(r.skipped.len(), 1);
    }

    #[test]
    fn bad_names_and_folders_are_refused() {
        let home_dir = tempfile::tempdir().unwrap();
        let home = Home::at(home_dir.path());
        let err = index_folder(&home, "bad name", home_dir.path(), None, &quiet).unwrap_err();
        assert!(err.to_string().contains("letters, digits"), "{err}");
        let err = index_folder(&home, "ok", Path::new("/does/not/exist"), None, &quiet).unwrap_err();
        assert!(err.to_string().contains("cannot open folder"), "{err}");
    }
}
