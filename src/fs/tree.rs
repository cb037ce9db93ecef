//! The inode tree built from catalog listings.
//!
//! Invariants:
//! - Inode numbers are stable for the mount's life while a path exists: `(catalog, path)` maps
//!   to one inode; numbers of vanished paths are forgotten, so a peer renaming files cannot
//!   grow the table forever.
//! - The root holds one folder per mounted catalog; folders are added and removed as the
//!   catalogs one can read change (imports, own catalogs), never by a listing: a listing only
//!   ever changes what is under its own catalog's folder. Two catalogs never share a folder name.
//! - Applying a listing is a diff: unchanged files keep their inode (and the kernel's pages);
//!   a changed or removed entry is reported in [`Invalidations`] for the kernel to forget.
//! - A listing naming a file and a folder at the same path keeps the first one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::{CatalogEntry, CatalogSummary};

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone)]
pub enum NodeKind {
    Dir { children: BTreeMap<String, u64> },
    File { catalog: usize, entry: CatalogEntry },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: NodeKind,
    pub mtime: SystemTime,
}

/// File attributes, FUSE-independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub is_dir: bool,
    pub mtime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What the kernel must forget after a listing changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Invalidations {
    /// (parent inode, name) of entries added, removed or changed.
    pub entries: Vec<(u64, String)>,
    /// Inodes whose attributes or data changed.
    pub inodes: Vec<u64>,
}

impl Invalidations {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.inodes.is_empty()
    }
}

#[derive(Default)]
pub struct Tree {
    pub nodes: HashMap<u64, Node>,
    /// (catalog, path) → inode, kept while the path exists so inode numbers stay stable.
    pub inos: HashMap<(usize, String), u64>,
    next_ino: u64,
}

fn mtime_of(secs: i64) -> SystemTime {
    if secs > 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

impl Tree {
    /// A root holding one empty folder per catalog, named `dir_names[i]` for catalog `i`.
    pub fn new(dir_names: &[&str], now: SystemTime) -> Tree {
        let mut tree = Tree { next_ino: ROOT_INO, ..Tree::default() };
        let mut root_children = BTreeMap::new();
        for (i, name) in dir_names.iter().enumerate() {
            let ino = tree.ino_for(i, "");
            root_children.insert(name.to_string(), ino);
            tree.nodes.insert(
                ino,
                Node {
                    ino,
                    parent: ROOT_INO,
                    name: name.to_string(),
                    kind: NodeKind::Dir { children: BTreeMap::new() },
                    mtime: now,
                },
            );
        }
        tree.nodes.insert(
            ROOT_INO,
            Node {
                ino: ROOT_INO,
                parent: ROOT_INO,
                name: String::new(),
                kind: NodeKind::Dir { children: root_children },
                mtime: now,
            },
        );
        tree
    }

    fn ino_for(&mut self, source: usize, path: &str) -> u64 {
        if let Some(&ino) = self.inos.get(&(source, path.to_string())) {
            return ino;
        }
        self.next_ino += 1;
        self.inos.insert((source, path.to_string()), self.next_ino);
        self.next_ino
    }

    /// Adds an empty folder `name` in the root for catalog `i`; None if the name is taken.
    pub fn add_catalog(&mut self, i: usize, name: &str, now: SystemTime) -> Option<Invalidations> {
        if self.children_mut(ROOT_INO)?.contains_key(name) {
            return None;
        }
        let ino = self.ino_for(i, "");
        let kind = NodeKind::Dir { children: BTreeMap::new() };
        self.nodes.insert(ino, Node { ino, parent: ROOT_INO, name: name.to_string(), kind, mtime: now });
        self.children_mut(ROOT_INO)?.insert(name.to_string(), ino);
        Some(Invalidations { entries: vec![(ROOT_INO, name.to_string())], inodes: vec![ROOT_INO] })
    }

    /// Removes catalog `i`'s folder, everything under it and its inode numbers.
    pub fn remove_catalog(&mut self, i: usize) -> Invalidations {
        let Some(top) = self.catalog_ino(i) else { return Invalidations::default() };
        let name = self.nodes.get(&top).map(|n| n.name.clone()).unwrap_or_default();
        if let Some(children) = self.children_mut(ROOT_INO) {
            children.remove(&name);
        }
        self.remove_subtree(top);
        self.inos.retain(|(s, _), _| *s != i);
        Invalidations { entries: vec![(ROOT_INO, name)], inodes: vec![ROOT_INO, top] }
    }

    /// The inode of catalog `i`'s folder.
    pub fn catalog_ino(&self, i: usize) -> Option<u64> {
        self.inos.get(&(i, String::new())).copied()
    }

    fn children_mut(&mut self, ino: u64) -> Option<&mut BTreeMap<String, u64>> {
        match self.nodes.get_mut(&ino) {
            Some(Node { kind: NodeKind::Dir { children }, .. }) => Some(children),
            _ => None,
        }
    }

    /// Removes `ino` and everything under it.
    fn remove_subtree(&mut self, ino: u64) {
        if let Some(node) = self.nodes.remove(&ino) {
            if let NodeKind::Dir { children } = node.kind {
                for child in children.into_values() {
                    self.remove_subtree(child);
                }
            }
        }
    }

    /// Replaces catalog `source`'s folder with `listing`; returns what the kernel must forget.
    /// New folders get `folder_mtime`.
    pub fn apply_listing(
        &mut self,
        source: usize,
        listing: &CatalogSummary,
        folder_mtime: SystemTime,
    ) -> Invalidations {
        let mut inv = Invalidations::default();
        let tree = self;
        let top = tree.ino_for(source, "");
        // Index the new listing by path, to diff against the current tree.
        let mut wanted: BTreeMap<String, &CatalogEntry> = BTreeMap::new();
        for e in &listing.entries {
            wanted.insert(e.path.trim_start_matches('/').to_string(), e);
        }
        let mut wanted_dirs: HashSet<&str> = HashSet::new();
        for path in wanted.keys() {
            let mut at = path.as_str();
            while let Some((dir, _)) = at.rsplit_once('/') {
                if !wanted_dirs.insert(dir) {
                    break;
                }
                at = dir;
            }
        }
        // Remove files that vanished or changed, and folders that no longer hold anything.
        let mut existing: Vec<(String, u64)> = tree
            .inos
            .iter()
            .filter(|((s, p), ino)| *s == source && !p.is_empty() && tree.nodes.contains_key(ino))
            .map(|((_, p), ino)| (p.clone(), *ino))
            .collect();
        existing.sort();
        for (path, ino) in existing.iter().rev() {
            let Some(node) = tree.nodes.get(ino).cloned() else { continue };
            let keep = match &node.kind {
                NodeKind::File { entry, .. } => wanted.get(path).is_some_and(|w| *w == entry),
                NodeKind::Dir { .. } => wanted_dirs.contains(path.as_str()),
            };
            if !keep {
                if let Some(children) = tree.children_mut(node.parent) {
                    children.remove(&node.name);
                }
                tree.remove_subtree(*ino);
                inv.entries.push((node.parent, node.name.clone()));
                inv.inodes.push(*ino);
            }
        }
        // Add what is new.
        for (path, entry) in &wanted {
            let mut parent = top;
            let mut so_far = String::new();
            let parts: Vec<&str> = path.split('/').collect();
            for (depth, part) in parts.iter().enumerate() {
                if !so_far.is_empty() {
                    so_far.push('/');
                }
                so_far.push_str(part);
                let is_file = depth + 1 == parts.len();
                let ino = tree.ino_for(source, &so_far);
                if !tree.nodes.contains_key(&ino) {
                    let kind = if is_file {
                        NodeKind::File { catalog: source, entry: (*entry).clone() }
                    } else {
                        NodeKind::Dir { children: BTreeMap::new() }
                    };
                    let mtime = if is_file { mtime_of(entry.mtime) } else { folder_mtime };
                    // A listing with a file and a folder of the same name: the first one wins.
                    match tree.children_mut(parent) {
                        Some(children) if !children.contains_key(*part) => {
                            children.insert(part.to_string(), ino);
                        }
                        _ => break,
                    }
                    tree.nodes.insert(ino, Node { ino, parent, name: part.to_string(), kind, mtime });
                    inv.entries.push((parent, part.to_string()));
                }
                if !matches!(tree.nodes.get(&ino), Some(Node { kind: NodeKind::Dir { .. }, .. })) && !is_file {
                    break;
                }
                parent = ino;
            }
        }
        // Forget inode numbers of paths that are gone, so a peer renaming files cannot grow
        // the table forever (unchanged and re-added paths kept theirs above).
        let nodes = &tree.nodes;
        tree.inos.retain(|(s, _), ino| *s != source || nodes.contains_key(ino));
        inv.entries.sort();
        inv.entries.dedup();
        inv
    }
}
