//! The inode tree built from catalog listings.
//!
//! Each catalog's folder is one immutable [`CatalogTree`] built from one listing (one
//! revision) and shared behind an `Arc`: a new revision builds a new tree beside the old one and
//! swaps it in, so an open folder's snapshot (see `DirSnapshot` in `mod.rs`) keeps reading the
//! revision it was opened on, and no lock is held while a listing of millions of entries is
//! turned into a tree. A tree is compact: its [`Listing`] (binary hashes, interned strings, one
//! path arena), plus 32 bytes per node; names are spans of the listing's path arena, and each
//! folder's children are one contiguous run, sorted by name (lookup is a binary search).
//!
//! Invariants:
//! - Inode numbers: the root is [`ROOT_INO`]; catalog `i`'s folder is [`catalog_base`]`(i)`, and
//!   everything under it is `catalog_base(i) + n` with `n` counting up for the mount's life, so
//!   an inode says which catalog holds it and a number is never given to two different things.
//! - A path keeps its inode across revisions while it stays a folder, or stays a file with the
//!   same content (hash, size and chunk tree root): the kernel may keep its pages. A file whose
//!   content changes gets a new inode, so no page of the old content can ever be served for the
//!   new one (through a new open or an old one: an old open keeps the old inode and its entry).
//! - The root holds one folder per mounted catalog; folders are added and removed as the
//!   catalogs one can read change (imports, own catalogs), never by a listing: a listing only
//!   ever changes what is under its own catalog's folder. Two catalogs never share a folder name.
//! - Applying a listing reports in [`Invalidations`] what the kernel must forget: entries
//!   removed or given a new inode, folders whose children changed (their readdir cache and link
//!   count), files whose attributes changed. Added names need no entry invalidation: the kernel
//!   keeps no negative entry (we never reply to a lookup with a negative entry and a timeout).
//! - A listing naming a file and a folder at the same path keeps the file; a path listed twice
//!   keeps its first entry.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::listing::{ListedFile, Listing};
use crate::protocol::CatalogEntry;

pub const ROOT_INO: u64 = 1;
/// Inodes of catalog `i` are `(i + 1) << CATALOG_SHIFT` and up: 2^40 numbers per catalog.
const CATALOG_SHIFT: u32 = 40;
const NO_FILE: u32 = u32::MAX;
const NONE: u32 = u32::MAX;

/// Generations of folders' contents, process-wide: see [`next_generation`].
static GENERATIONS: AtomicU32 = AtomicU32::new(1);

/// A number for one version of a folder's contents (a catalog tree, the root's set of
/// folders), never 0 and below 2^31: readdir offsets carry it (see `DirSnapshot`), so that an
/// offset of one version is never found in the kernel's readdir cache of another.
pub fn next_generation() -> u32 {
    loop {
        let g = GENERATIONS.fetch_add(1, AtomicOrdering::Relaxed) & 0x7fff_ffff;
        if g != 0 {
            return g;
        }
    }
}

/// Inode of catalog `i`'s folder.
pub fn catalog_base(i: usize) -> u64 {
    (i as u64 + 1) << CATALOG_SHIFT
}

/// The catalog whose tree holds `ino`, if any (None for the root).
pub fn catalog_of(ino: u64) -> Option<usize> {
    (ino >> CATALOG_SHIFT).checked_sub(1).map(|c| c as usize)
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
    /// (parent inode, name) of entries removed or given a new inode.
    pub entries: Vec<(u64, String)>,
    /// Inodes whose attributes, data or children changed.
    pub inodes: Vec<u64>,
}

impl Invalidations {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.inodes.is_empty()
    }

    fn finish(mut self) -> Self {
        self.entries.sort();
        self.entries.dedup();
        self.inodes.sort_unstable();
        self.inodes.dedup();
        self
    }
}

fn mtime_of(secs: i64) -> SystemTime {
    if secs > 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

/// One file or folder of a catalog tree (32 bytes).
#[derive(Debug, Clone, Copy)]
struct TNode {
    ino: u64,
    parent: u32,
    /// Name: a span of the listing's path arena (empty for the catalog folder).
    name_start: u32,
    name_len: u32,
    /// Index into the listing's files, or [`NO_FILE`] for a folder.
    file: u32,
    first_child: u32,
    child_count: u32,
}

/// One entry of a folder, as readdir and lookup see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child<'a> {
    pub ino: u64,
    pub is_dir: bool,
    pub name: &'a str,
}

/// One catalog's folder at one revision: see the module docs.
pub struct CatalogTree {
    listing: Listing,
    /// `nodes[0]` is the catalog's folder.
    nodes: Vec<TNode>,
    /// Each folder's children, contiguous and by name.
    children: Vec<u32>,
    /// (inode, node), sorted by inode.
    by_ino: Vec<(u64, u32)>,
    /// Next inode offset under `catalog_base` (never reused).
    next_local: u64,
    dir_mtime: SystemTime,
    /// This version's number ([`next_generation`]).
    pub generation: u32,
}

/// `a` before `b` in depth-first order of their components: `/` sorts before every byte, so a
/// folder's whole subtree is one run (`a/x` before `a-b`).
fn cmp_paths(a: &str, b: &str) -> Ordering {
    let key = |c: u8| if c == b'/' { 0 } else { c };
    a.bytes().map(key).cmp(b.bytes().map(key))
}

impl CatalogTree {
    /// An empty folder at `base`.
    pub fn empty(base: u64, dir_mtime: SystemTime) -> CatalogTree {
        CatalogTree::build(Listing::default(), base, None, dir_mtime).0
    }

    /// The tree of `listing` with its folder at inode `base`, reusing `old`'s inode numbers
    /// where the module's rules allow; also what the kernel must forget of `old`.
    pub fn build(
        mut listing: Listing,
        base: u64,
        old: Option<&CatalogTree>,
        dir_mtime: SystemTime,
    ) -> (CatalogTree, Invalidations) {
        listing.shrink_to_fit();
        let files = listing.files();
        let mut order: Vec<u32> = (0..files.len() as u32).collect();
        let by_path =
            |&a: &u32, &b: &u32| cmp_paths(listing.path(&files[a as usize]), listing.path(&files[b as usize]));
        // Indexes and servers list in this order already; sort only what is not. Stable: of a
        // path listed twice, the first entry comes first and is kept.
        if !order.is_sorted_by(|a, b| by_path(a, b) != Ordering::Greater) {
            order.sort_by(by_path);
        }

        let root =
            TNode { ino: base, parent: 0, name_start: 0, name_len: 0, file: NO_FILE, first_child: 0, child_count: 0 };
        let mut nodes: Vec<TNode> = Vec::with_capacity(files.len() + files.len() / 64 + 1);
        nodes.push(root);
        // stack[d]: the folder at depth d of the current path; last[d]: its newest child.
        let mut stack: Vec<u32> = vec![0];
        let mut last: Vec<u32> = vec![NONE];
        let name_of = |nodes: &Vec<TNode>, n: u32| {
            let node = &nodes[n as usize];
            listing.arena(node.name_start, node.name_len)
        };
        'files: for &fi in &order {
            let f = &files[fi as usize];
            let path = listing.path(f);
            let (start, _) = listing.path_span(f);
            let mut offset = 0usize;
            let parts: Vec<&str> = path.split('/').collect();
            for (depth, part) in parts.iter().enumerate() {
                if part.is_empty() {
                    continue 'files; // a damaged saved listing; a peer's was checked
                }
                let is_file = depth + 1 == parts.len();
                let d = depth + 1; // stack depth of this component's node
                let name_start = start + offset as u32;
                offset += part.len() + 1;
                if !is_file && stack.len() > d && name_of(&nodes, stack[d]) == *part {
                    continue; // the same folder as the previous path's
                }
                stack.truncate(d);
                last.truncate(d);
                let prev = last[d - 1];
                if prev != NONE && name_of(&nodes, prev) == *part {
                    // The parent's newest child has this name: a file (kept), or a path twice.
                    continue 'files;
                }
                let parent = stack[d - 1];
                let idx = nodes.len() as u32;
                nodes.push(TNode {
                    ino: 0,
                    parent,
                    name_start,
                    name_len: part.len() as u32,
                    file: if is_file { fi } else { NO_FILE },
                    first_child: 0,
                    child_count: 0,
                });
                last[d - 1] = idx;
                if !is_file {
                    stack.push(idx);
                    last.push(NONE);
                }
            }
        }
        drop(order);

        // Children runs: count, prefix sums, fill (creation order is name order per folder).
        for i in 1..nodes.len() {
            let p = nodes[i].parent as usize;
            nodes[p].child_count += 1;
        }
        let mut at = 0u32;
        for n in nodes.iter_mut() {
            n.first_child = at;
            at += n.child_count;
        }
        let mut children = vec![0u32; at as usize];
        let mut fill: Vec<u32> = nodes.iter().map(|n| n.first_child).collect();
        for (i, n) in nodes.iter().enumerate().skip(1) {
            let p = n.parent as usize;
            children[fill[p] as usize] = i as u32;
            fill[p] += 1;
        }
        drop(fill);

        let mut tree = CatalogTree {
            listing,
            nodes,
            children,
            by_ino: Vec::new(),
            next_local: old.map_or(1, |o| o.next_local),
            dir_mtime,
            generation: next_generation(),
        };
        let inv = tree.number(base, old);
        let mut by_ino: Vec<(u64, u32)> = tree.nodes.iter().enumerate().map(|(i, n)| (n.ino, i as u32)).collect();
        by_ino.sort_unstable();
        tree.by_ino = by_ino;
        (tree, inv)
    }

    /// Gives every node its inode: `old`'s for the same folder or the same file content, else a
    /// new one; returns what the kernel must forget.
    fn number(&mut self, base: u64, old: Option<&CatalogTree>) -> Invalidations {
        let mut inv = Invalidations::default();
        // The old node each new node took its inode from (NONE: new).
        let mut from_old: Vec<u32> = vec![NONE; self.nodes.len()];
        let mut matched_old: Vec<bool> = vec![false; old.map_or(0, |o| o.nodes.len())];
        self.nodes[0].ino = base;
        if old.is_some() {
            from_old[0] = 0;
            matched_old[0] = true;
        }
        for i in 1..self.nodes.len() {
            let node = self.nodes[i];
            let name = self.listing.arena(node.name_start, node.name_len);
            let old_parent = from_old[node.parent as usize];
            let parent_ino = self.nodes[node.parent as usize].ino;
            let mut reused = None;
            if let (Some(o), true) = (old, old_parent != NONE) {
                if let Some(oi) = o.child_index(old_parent, name) {
                    let on = &o.nodes[oi as usize];
                    match (node.file, on.file) {
                        (NO_FILE, NO_FILE) => reused = Some(oi),
                        (nf, of) if nf != NO_FILE && of != NO_FILE => {
                            let (new_f, old_f) = (&self.listing.files()[nf as usize], &o.listing.files()[of as usize]);
                            if new_f.same_content(old_f) {
                                reused = Some(oi);
                                let same_attrs = new_f.mtime == old_f.mtime
                                    && self.listing.mime_type(new_f) == o.listing.mime_type(old_f)
                                    && self.listing.description_of(new_f) == o.listing.description_of(old_f);
                                if !same_attrs {
                                    inv.inodes.push(on.ino);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            match reused {
                Some(oi) => {
                    self.nodes[i].ino = old.map_or(0, |o| o.nodes[oi as usize].ino);
                    from_old[i] = oi;
                    matched_old[oi as usize] = true;
                }
                None => {
                    self.nodes[i].ino = base + self.next_local;
                    self.next_local += 1;
                    if old.is_some() {
                        inv.inodes.push(parent_ino);
                    }
                }
            }
        }
        if let Some(o) = old {
            // Whatever of the old tree was not carried over, below a folder that was.
            for (oi, on) in o.nodes.iter().enumerate().skip(1) {
                if !matched_old[oi] && matched_old[on.parent as usize] {
                    let parent_ino = o.nodes[on.parent as usize].ino;
                    inv.entries.push((parent_ino, o.listing.arena(on.name_start, on.name_len).to_string()));
                    inv.inodes.push(parent_ino);
                }
            }
        }
        inv.finish()
    }

    fn child_range(&self, n: u32) -> &[u32] {
        let node = &self.nodes[n as usize];
        let start = node.first_child as usize;
        self.children.get(start..start + node.child_count as usize).unwrap_or(&[])
    }

    fn name(&self, n: u32) -> &str {
        let node = &self.nodes[n as usize];
        self.listing.arena(node.name_start, node.name_len)
    }

    /// Node index of `dir`'s child `name`.
    fn child_index(&self, dir: u32, name: &str) -> Option<u32> {
        let range = self.child_range(dir);
        range.binary_search_by(|&c| self.name(c).cmp(name)).ok().map(|k| range[k])
    }

    fn index_of(&self, ino: u64) -> Option<u32> {
        self.by_ino.binary_search_by_key(&ino, |&(i, _)| i).ok().map(|k| self.by_ino[k].1)
    }

    /// Inode of the catalog's folder.
    pub fn base(&self) -> u64 {
        self.nodes[0].ino
    }

    pub fn contains(&self, ino: u64) -> bool {
        self.index_of(ino).is_some()
    }

    /// Files in this tree.
    pub fn file_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.file != NO_FILE).count()
    }

    pub fn listing(&self) -> &Listing {
        &self.listing
    }

    fn attr_at(&self, n: u32, uid: u32, gid: u32) -> Attr {
        let node = &self.nodes[n as usize];
        let (size, is_dir, perm, nlink, mtime) = match self.file_at(n) {
            Some(f) => (f.byte_size, false, 0o444, 1, mtime_of(f.mtime)),
            None => (0, true, 0o555, 2 + node.child_count, self.dir_mtime),
        };
        Attr { ino: node.ino, size, is_dir, mtime, perm, nlink, uid, gid }
    }

    fn file_at(&self, n: u32) -> Option<&ListedFile> {
        let f = self.nodes[n as usize].file;
        (f != NO_FILE).then(|| &self.listing.files()[f as usize])
    }

    pub fn attr(&self, ino: u64, uid: u32, gid: u32) -> Option<Attr> {
        Some(self.attr_at(self.index_of(ino)?, uid, gid))
    }

    /// `dir`'s child `name`: Err(true) if `dir` is a file, Err(false) if there is none.
    pub fn lookup(&self, dir: u64, name: &str, uid: u32, gid: u32) -> Result<Attr, bool> {
        let d = self.index_of(dir).ok_or(false)?;
        if self.nodes[d as usize].file != NO_FILE {
            return Err(true);
        }
        let c = self.child_index(d, name).ok_or(false)?;
        Ok(self.attr_at(c, uid, gid))
    }

    /// Inode of the parent of folder `dir` (the root for the catalog's folder).
    pub fn parent_of(&self, dir: u64) -> Option<u64> {
        let d = self.index_of(dir)?;
        Some(if d == 0 { ROOT_INO } else { self.nodes[self.nodes[d as usize].parent as usize].ino })
    }

    /// Number of entries of folder `dir` (None: not a folder of this tree).
    pub fn child_count(&self, dir: u64) -> Option<usize> {
        let d = self.index_of(dir)?;
        (self.nodes[d as usize].file == NO_FILE).then(|| self.child_range(d).len())
    }

    /// The `k`th entry of folder `dir`, by name.
    pub fn child_at(&self, dir: u64, k: usize) -> Option<Child<'_>> {
        let d = self.index_of(dir)?;
        let c = *self.child_range(d).get(k)?;
        Some(Child {
            ino: self.nodes[c as usize].ino,
            is_dir: self.nodes[c as usize].file == NO_FILE,
            name: self.name(c),
        })
    }

    /// The `k`th entry of folder `dir` with its attributes.
    pub fn child_attr_at(&self, dir: u64, k: usize, uid: u32, gid: u32) -> Option<(Child<'_>, Attr)> {
        let d = self.index_of(dir)?;
        let c = *self.child_range(d).get(k)?;
        let child = Child {
            ino: self.nodes[c as usize].ino,
            is_dir: self.nodes[c as usize].file == NO_FILE,
            name: self.name(c),
        };
        Some((child, self.attr_at(c, uid, gid)))
    }

    /// The listing entry of file `ino` (its path as the listing spells it).
    pub fn entry(&self, ino: u64) -> Option<CatalogEntry> {
        let f = self.file_at(self.index_of(ino)?)?;
        Some(self.listing.entry(f))
    }

    /// Whether `ino` is a file of this tree.
    pub fn is_file(&self, ino: u64) -> Option<bool> {
        Some(self.nodes[self.index_of(ino)? as usize].file != NO_FILE)
    }

    /// Every file as (path without the leading `/`, inode, entry), by path.
    pub fn files(&self) -> Vec<(String, u64, CatalogEntry)> {
        let mut out: Vec<(String, u64, CatalogEntry)> = self
            .nodes
            .iter()
            .filter(|n| n.file != NO_FILE)
            .map(|n| {
                let f = &self.listing.files()[n.file as usize];
                (self.listing.path(f).to_string(), n.ino, self.listing.entry(f))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The file at `path` (without the leading `/`), walking from the catalog's folder.
    pub fn file_at_path(&self, path: &str) -> Option<(u64, CatalogEntry)> {
        let mut n = 0u32;
        for part in path.split('/') {
            n = self.child_index(n, part)?;
        }
        let f = self.file_at(n)?;
        Some((self.nodes[n as usize].ino, self.listing.entry(f)))
    }

    /// Bytes this tree holds beyond its listing, roughly (for the memory checks).
    pub fn index_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<TNode>()
            + self.children.capacity() * 4
            + self.by_ino.capacity() * std::mem::size_of::<(u64, u32)>()
    }
}

/// The whole mount: the root's catalog folders and each one's tree.
#[derive(Default)]
pub struct Tree {
    /// Catalog folders of the root, by name.
    root: BTreeMap<String, usize>,
    catalogs: HashMap<usize, Arc<CatalogTree>>,
    pub mtime: Option<SystemTime>,
    /// Version of the root's set of folders ([`next_generation`]).
    pub root_generation: u32,
}

impl Tree {
    /// A root holding one empty folder per catalog, named `dir_names[i]` for catalog `i`.
    pub fn new(dir_names: &[&str], now: SystemTime) -> Tree {
        let mut tree = Tree { mtime: Some(now), ..Tree::default() };
        for (i, name) in dir_names.iter().enumerate() {
            tree.add_catalog(i, name, now);
        }
        tree
    }

    /// Adds an empty folder `name` in the root for catalog `i`; None if the name is taken.
    pub fn add_catalog(&mut self, i: usize, name: &str, now: SystemTime) -> Option<Invalidations> {
        if self.root.contains_key(name) {
            return None;
        }
        self.root.insert(name.to_string(), i);
        self.root_generation = next_generation();
        self.catalogs.insert(i, Arc::new(CatalogTree::empty(catalog_base(i), now)));
        Some(Invalidations { entries: Vec::new(), inodes: vec![ROOT_INO] })
    }

    /// Removes catalog `i`'s folder, everything under it and its inode numbers.
    pub fn remove_catalog(&mut self, i: usize) -> Invalidations {
        let Some(name) = self.root.iter().find(|(_, &c)| c == i).map(|(n, _)| n.clone()) else {
            return Invalidations::default();
        };
        self.root.remove(&name);
        self.catalogs.remove(&i);
        self.root_generation = next_generation();
        Invalidations { entries: vec![(ROOT_INO, name)], inodes: vec![ROOT_INO, catalog_base(i)] }
    }

    /// The inode of catalog `i`'s folder.
    pub fn catalog_ino(&self, i: usize) -> Option<u64> {
        self.catalogs.contains_key(&i).then(|| catalog_base(i))
    }

    /// Catalog `i`'s tree as shown now.
    pub fn catalog(&self, i: usize) -> Option<Arc<CatalogTree>> {
        self.catalogs.get(&i).cloned()
    }

    /// The tree holding `ino` (not the root).
    pub fn tree_of(&self, ino: u64) -> Option<&Arc<CatalogTree>> {
        self.catalogs.get(&catalog_of(ino)?)
    }

    /// Replaces catalog `i`'s tree with `new` if `i` is still mounted and its tree is still
    /// `was` (a catalog removed, or re-added, meanwhile keeps what it has). False if not.
    pub fn swap(&mut self, i: usize, was: &Arc<CatalogTree>, new: CatalogTree) -> bool {
        match self.catalogs.get_mut(&i) {
            Some(current) if Arc::ptr_eq(current, was) => {
                *current = Arc::new(new);
                true
            }
            _ => false,
        }
    }

    /// The root's catalog folders: (name, catalog index), by name.
    pub fn root_entries(&self) -> impl Iterator<Item = (&str, usize)> {
        self.root.iter().map(|(n, &i)| (n.as_str(), i))
    }

    /// Catalog folder `name` of the root.
    pub fn root_child(&self, name: &str) -> Option<usize> {
        self.root.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{CatalogSummary, PROTOCOL_VERSION};

    fn entry(path: &str, content: u8) -> CatalogEntry {
        CatalogEntry {
            path: path.into(),
            description: String::new(),
            mime_type: "video/mp4".into(),
            hash: hex::encode([content; 32]),
            byte_size: u64::from(content),
            mtime: 5,
            tree: None,
        }
    }

    fn listing(entries: Vec<CatalogEntry>) -> Listing {
        Listing::from_summary(&CatalogSummary {
            name: "c".into(),
            description: String::new(),
            image: None,
            entries,
            revision: String::new(),
            protocol: PROTOCOL_VERSION,
            total_entries: None,
        })
    }

    fn names(t: &CatalogTree, dir: u64) -> Vec<String> {
        (0..t.child_count(dir).unwrap()).map(|k| t.child_at(dir, k).unwrap().name.to_string()).collect()
    }

    const BASE: u64 = 1 << CATALOG_SHIFT;

    #[test]
    fn folders_hold_their_children_by_name_and_conflicts_keep_the_file() {
        let l = listing(vec![
            entry("/b/two.mp4", 2),
            entry("/a-z.mp4", 1),
            entry("/a/x/deep.mp4", 3),
            entry("/b", 9), // a file where a folder is: the file stays
            entry("/a/one.mp4", 4),
            entry("/a/one.mp4", 5), // twice: the first stays
        ]);
        let (t, _) = CatalogTree::build(l, BASE, None, UNIX_EPOCH);
        assert_eq!(names(&t, BASE), ["a", "a-z.mp4", "b"]);
        let a = t.lookup(BASE, "a", 0, 0).unwrap();
        assert!(a.is_dir);
        assert_eq!(names(&t, a.ino), ["one.mp4", "x"]);
        assert_eq!(t.lookup(a.ino, "one.mp4", 0, 0).unwrap().size, 4);
        let b = t.lookup(BASE, "b", 0, 0).unwrap();
        assert!(!b.is_dir && b.size == 9);
        assert_eq!(t.lookup(b.ino, "two.mp4", 0, 0), Err(true));
        assert_eq!(t.lookup(BASE, "nope", 0, 0), Err(false));
        assert_eq!(t.file_at_path("a/x/deep.mp4").unwrap().1.byte_size, 3);
        assert_eq!(t.attr(BASE, 0, 0).unwrap().nlink, 5);
        assert_eq!(t.parent_of(a.ino), Some(BASE));
        assert_eq!(t.file_count(), 4);
    }

    #[test]
    fn inodes_survive_unchanged_content_and_change_with_it() {
        let one = vec![entry("/keep.mp4", 1), entry("/d/change.mp4", 2), entry("/d/gone.mp4", 3)];
        let (t1, _) = CatalogTree::build(listing(one), BASE, None, UNIX_EPOCH);
        let ino = |t: &CatalogTree, p: &str| t.file_at_path(p).unwrap().0;
        let d1 = t1.lookup(BASE, "d", 0, 0).unwrap().ino;
        let mut retimed = entry("/keep.mp4", 1);
        retimed.mtime = 6;
        let two = vec![retimed, entry("/d/change.mp4", 7), entry("/new.mp4", 4)];
        let (t2, inv) = CatalogTree::build(listing(two), BASE, Some(&t1), UNIX_EPOCH);
        assert_eq!(ino(&t2, "keep.mp4"), ino(&t1, "keep.mp4"), "same content keeps its inode");
        assert_ne!(ino(&t2, "d/change.mp4"), ino(&t1, "d/change.mp4"), "new content, new inode");
        assert_eq!(t2.lookup(BASE, "d", 0, 0).unwrap().ino, d1);
        assert!(!t2.contains(ino(&t1, "d/change.mp4")));
        assert_eq!(inv.entries, [(d1, "change.mp4".to_string()), (d1, "gone.mp4".to_string())]);
        // The root gained a file, `d` lost and changed one, keep.mp4's mtime changed.
        let mut want = vec![BASE, d1, ino(&t1, "keep.mp4")];
        want.sort();
        assert_eq!(inv.inodes, want);
        // Numbers are never given twice.
        let mut all: Vec<u64> = t1.by_ino.iter().chain(&t2.by_ino).map(|p| p.0).collect();
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before - all.len(), 3, "only the root, d and keep.mp4 are shared");
    }

    #[test]
    fn a_million_entries_stay_under_the_budget() {
        // Issue 16: a 1,000,000-entry catalog in ≤ 400 MiB before any read. Count bytes per
        // entry of a 100,000-entry tree (listing and index), not wall-clock time.
        let n = 100_000u32;
        let mut l = Listing::default();
        for i in 0..n {
            let mut e = entry(&format!("/big/f{i:07}.mp4"), 0);
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_be_bytes());
            e.hash = hex::encode(h);
            e.tree = Some(hex::encode(h));
            l.push(&e).unwrap();
        }
        let (t, _) = CatalogTree::build(l, BASE, None, UNIX_EPOCH);
        let per_entry = (t.listing().heap_bytes() + t.index_bytes()) / n as usize;
        eprintln!(
            "compact tree: {per_entry} bytes per entry (listing and index, paths of {} bytes)",
            "big/f0000000.mp4".len()
        );
        assert!(per_entry <= 200, "{per_entry} bytes per entry");
        assert_eq!(t.child_count(t.lookup(BASE, "big", 0, 0).unwrap().ino), Some(n as usize));
    }
}
