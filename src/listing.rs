//! A catalog listing held compactly: what a mount keeps of a `get` reply or an index, for
//! catalogs of millions of entries. Hashes and chunk tree roots are binary, mime types and
//! descriptions are interned (most files share a handful), and every path lives in one arena.
//! About 100 bytes per entry plus its path, against ~350 for a [`CatalogSummary`].
//!
//! It is built entry by entry (a page of `get` at a time, or streamed out of a JSON file in
//! either the `get` shape or the index file's shape), so no whole-listing `Vec<CatalogEntry>`
//! is ever held beside it, and written back as JSON in the `get` shape the same way.
//!
//! Invariants: paths are stored without their leading `/`; an entry whose hash or tree root is
//! not 64 hex digits is refused at [`Listing::push`] (the caller decides whether to drop or
//! fail); an entry read back ([`Listing::entry`]) equals the [`CatalogEntry`] pushed, but for
//! the leading `/` of its path, which is always written back.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::protocol::{self, CatalogEntry, CatalogSummary};

/// Strings many entries share (mime types, descriptions), kept once.
#[derive(Debug, Default, Clone)]
pub struct Interned {
    strings: Vec<Box<str>>,
    index: HashMap<Box<str>, u32>,
}

impl Interned {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.strings.len() as u32;
        self.strings.push(s.into());
        self.index.insert(s.into(), i);
        i
    }

    fn get(&self, i: u32) -> &str {
        self.strings.get(i as usize).map(|s| &**s).unwrap_or("")
    }
}

/// One file of a listing, without its path's bytes (they are in the listing's arena).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedFile {
    path_start: u32,
    path_len: u32,
    pub hash: [u8; 32],
    pub tree: Option<[u8; 32]>,
    pub byte_size: u64,
    pub mtime: i64,
    mime_type: u32,
    description: u32,
}

impl ListedFile {
    /// Same bytes, same signed tree root: the kernel's pages for one are the other's.
    pub fn same_content(&self, other: &ListedFile) -> bool {
        self.hash == other.hash && self.byte_size == other.byte_size && self.tree == other.tree
    }
}

/// A compact listing: see the module docs.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    pub name: String,
    pub description: String,
    pub image: Option<String>,
    pub revision: String,
    pub protocol: u32,
    /// `total_entries` as the first page said (None from original peers and for files).
    pub total_entries: Option<u64>,
    paths: String,
    files: Vec<ListedFile>,
    strings: Interned,
}

/// 64 lowercase hex digits as bytes. Hex is case-insensitive, but a listing's hashes are
/// lowercase and must read back as sent, so anything else is refused. One pass over a table:
/// a million-entry listing decodes two million of these.
fn hex32(s: &str) -> Option<[u8; 32]> {
    const INVALID: u8 = 0xff;
    const NIBBLE: [u8; 256] = {
        let mut t = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let digits: &[u8; 64] = s.as_bytes().try_into().ok()?;
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
        bad |= (hi | lo) & 0xf0;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    (bad == 0).then_some(out)
}

impl Listing {
    /// An empty listing with `summary`'s header (name, description, revision...).
    pub fn header_of(summary: &CatalogSummary) -> Listing {
        Listing {
            name: summary.name.clone(),
            description: summary.description.clone(),
            image: summary.image.clone(),
            revision: summary.revision.clone(),
            protocol: summary.protocol,
            total_entries: summary.total_entries,
            ..Listing::default()
        }
    }

    /// A listing of nothing, for catalog `name`.
    pub fn empty(name: &str, protocol: u32) -> Listing {
        Listing { name: name.to_string(), protocol, ..Listing::default() }
    }

    /// `summary`, compacted; entries that [`Listing::push`] refuses are dropped.
    pub fn from_summary(summary: &CatalogSummary) -> Listing {
        let mut listing = Listing::header_of(summary);
        for e in &summary.entries {
            let _ = listing.push(e);
        }
        listing
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn reserve(&mut self, entries: usize) {
        self.files.reserve(entries);
    }

    /// Gives back what growing left unused (a listing is complete and kept from here on).
    pub fn shrink_to_fit(&mut self) {
        self.files.shrink_to_fit();
        self.paths.shrink_to_fit();
    }

    /// Adds an entry; refuses one whose hash or tree root is not lowercase 64-digit hex.
    pub fn push(&mut self, e: &CatalogEntry) -> Result<(), &'static str> {
        self.push_parts(&e.path, &e.description, &e.mime_type, &e.hash, e.byte_size, e.mtime, e.tree.as_deref())
    }

    #[allow(clippy::too_many_arguments)]
    fn push_parts(
        &mut self,
        path: &str,
        description: &str,
        mime_type: &str,
        hash: &str,
        byte_size: u64,
        mtime: i64,
        tree: Option<&str>,
    ) -> Result<(), &'static str> {
        let hash = hex32(hash).ok_or("invalid hash")?;
        let tree = match tree {
            Some(t) => Some(hex32(t).ok_or("invalid chunk tree root")?),
            None => None,
        };
        let path = path.strip_prefix('/').unwrap_or(path);
        let path_start = u32::try_from(self.paths.len()).map_err(|_| "listing paths exceed 4 GiB")?;
        let path_len = u32::try_from(path.len()).map_err(|_| "path too long")?;
        self.paths.push_str(path);
        let file = ListedFile {
            path_start,
            path_len,
            hash,
            tree,
            byte_size,
            mtime,
            mime_type: self.strings.intern(mime_type),
            description: self.strings.intern(description),
        };
        self.files.push(file);
        Ok(())
    }

    /// The files, in the order they were pushed.
    pub fn files(&self) -> &[ListedFile] {
        &self.files
    }

    /// A file's path below the catalog, without its leading `/`.
    pub fn path(&self, f: &ListedFile) -> &str {
        let start = f.path_start as usize;
        self.paths.get(start..start + f.path_len as usize).unwrap_or("")
    }

    /// Where `f`'s path sits in the arena (start, length): names of a tree built on this
    /// listing are spans of it.
    pub fn path_span(&self, f: &ListedFile) -> (u32, u32) {
        (f.path_start, f.path_len)
    }

    /// Bytes `start..start + len` of the path arena.
    pub fn arena(&self, start: u32, len: u32) -> &str {
        let start = start as usize;
        self.paths.get(start..start + len as usize).unwrap_or("")
    }

    pub fn mime_type(&self, f: &ListedFile) -> &str {
        self.strings.get(f.mime_type)
    }

    pub fn description_of(&self, f: &ListedFile) -> &str {
        self.strings.get(f.description)
    }

    /// `f` as the wire has it.
    pub fn entry(&self, f: &ListedFile) -> CatalogEntry {
        CatalogEntry {
            path: format!("/{}", self.path(f)),
            description: self.description_of(f).to_string(),
            mime_type: self.mime_type(f).to_string(),
            hash: hex::encode(f.hash),
            byte_size: f.byte_size,
            mtime: f.mtime,
            tree: f.tree.map(hex::encode),
        }
    }

    /// Keeps only the files `keep` accepts (with their path).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &ListedFile) -> bool) {
        let paths = std::mem::take(&mut self.paths);
        self.files.retain(|f| {
            let start = f.path_start as usize;
            keep(paths.get(start..start + f.path_len as usize).unwrap_or(""), f)
        });
        self.paths = paths;
    }

    /// Appends `other`'s files (a further page of the same listing).
    pub fn extend_from(&mut self, other: &Listing) {
        self.files.reserve(other.files.len());
        for f in &other.files {
            let (mime, desc) = (other.mime_type(f), other.description_of(f));
            let path = other.path(f);
            let path_start = self.paths.len() as u32;
            self.paths.push_str(path);
            let file = ListedFile {
                path_start,
                path_len: path.len() as u32,
                mime_type: self.strings.intern(mime),
                description: self.strings.intern(desc),
                ..*f
            };
            self.files.push(file);
        }
    }

    /// Bytes held, roughly (what a peer can make us hold).
    pub fn heap_bytes(&self) -> usize {
        self.paths.capacity()
            + self.files.capacity() * std::mem::size_of::<ListedFile>()
            + self.strings.strings.iter().map(|s| 2 * s.len() + 48).sum::<usize>()
    }

    /// The whole listing as a `get` reply (for callers that want the wire type).
    pub fn to_summary(&self) -> CatalogSummary {
        CatalogSummary {
            name: self.name.clone(),
            description: self.description.clone(),
            image: self.image.clone(),
            entries: self.files.iter().map(|f| self.entry(f)).collect(),
            revision: self.revision.clone(),
            protocol: self.protocol,
            total_entries: None,
        }
    }
}

/// Written in the `get` reply's shape (a [`CatalogSummary`] reads it back), entry by entry.
impl Serialize for Listing {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Entries<'a>(&'a Listing);
        impl Serialize for Entries<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut seq = serializer.serialize_seq(Some(self.0.files.len()))?;
                for f in &self.0.files {
                    seq.serialize_element(&self.0.entry(f))?;
                }
                seq.end()
            }
        }
        let mut s = serializer.serialize_struct("CatalogSummary", 6)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field("description", &self.description)?;
        if let Some(image) = &self.image {
            s.serialize_field("image", image)?;
        }
        s.serialize_field("entries", &Entries(self))?;
        s.serialize_field("revision", &self.revision)?;
        s.serialize_field("protocol", &self.protocol)?;
        s.end()
    }
}

/// One entry as either shape spells it: `get` (`mtime`, seconds) or the index file
/// (`mtime_ns`).
#[derive(Deserialize)]
struct AnyEntry<'a> {
    #[serde(borrow)]
    path: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    description: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    mime_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    hash: std::borrow::Cow<'a, str>,
    byte_size: u64,
    #[serde(default)]
    mtime: Option<i64>,
    #[serde(default)]
    mtime_ns: Option<i64>,
    #[serde(default, borrow)]
    tree: Option<std::borrow::Cow<'a, str>>,
}

/// Pushes every entry of a JSON array into the listing as it is read; hashes an index file's
/// entries as `Catalog::revision` does, when given a hasher.
struct EntriesInto<'a>(&'a mut Listing, Option<&'a mut Sha256>);

impl<'de> DeserializeSeed<'de> for EntriesInto<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesInto<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of catalog entries")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(n) = seq.size_hint() {
            self.0.reserve(n);
        }
        let mut revision = self.1;
        while let Some(e) = seq.next_element::<AnyEntry>()? {
            if let Some(h) = revision.as_deref_mut() {
                for part in [&*e.path, &*e.hash, &*e.mime_type, &*e.description, e.tree.as_deref().unwrap_or("")] {
                    h.update(part.as_bytes());
                    h.update([0]);
                }
                h.update(e.byte_size.to_be_bytes());
                h.update(e.mtime_ns.unwrap_or(0).to_be_bytes());
            }
            let mtime = e.mtime.or(e.mtime_ns.map(|ns| ns.div_euclid(1_000_000_000))).unwrap_or(0);
            // A damaged entry is left out, as a peer's would be; the rest still shows.
            let _ = self.0.push_parts(
                &e.path,
                &e.description,
                &e.mime_type,
                &e.hash,
                e.byte_size,
                mtime,
                e.tree.as_deref(),
            );
        }
        Ok(())
    }
}

/// Reads a `get` reply or an index file (`Catalog`'s JSON) without holding its entries twice.
impl<'de> Deserialize<'de> for Listing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Listing, D::Error> {
        struct ListingVisitor;
        impl<'de> Visitor<'de> for ListingVisitor {
            type Value = Listing;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a catalog listing")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Listing, A::Error> {
                let mut listing = Listing { protocol: 1, ..Listing::default() };
                let mut named = false;
                // An index file (it has a root_dir) is our own catalog: served in our protocol,
                // its revision the digest `Catalog::revision` makes.
                let mut index: Option<Sha256> = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "name" => {
                            listing.name = map.next_value()?;
                            named = true;
                        }
                        "description" => listing.description = map.next_value()?,
                        "image" => listing.image = map.next_value()?,
                        "revision" => listing.revision = map.next_value()?,
                        "protocol" => listing.protocol = map.next_value()?,
                        "total_entries" => listing.total_entries = map.next_value()?,
                        "root_dir" => {
                            map.next_value::<de::IgnoredAny>()?;
                            index = Some(Sha256::new());
                        }
                        "entries" => {
                            let mut hasher = index.take().map(|mut h| {
                                for part in [&listing.name, &listing.description] {
                                    h.update(part.as_bytes());
                                    h.update([0]);
                                }
                                h
                            });
                            map.next_value_seed(EntriesInto(&mut listing, hasher.as_mut()))?;
                            if let Some(h) = hasher {
                                listing.protocol = protocol::PROTOCOL_VERSION;
                                listing.revision = hex::encode(&h.finalize()[..8]);
                            }
                        }
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                if !named {
                    return Err(de::Error::missing_field("name"));
                }
                Ok(listing)
            }
        }
        deserializer.deserialize_map(ListingVisitor)
    }
}

/// Reads a listing saved as JSON (either shape) from `path`; `Ok(None)` if there is no such
/// file.
///
/// The file is read whole and parsed in place: strings without escapes are borrowed from it,
/// which makes a million-entry index parse several times faster than through a reader (byte by
/// byte, every string copied). The text is freed before this returns; only the compact
/// listing stays.
pub fn load(path: &std::path::Path) -> anyhow::Result<Option<Listing>> {
    use anyhow::Context as _;
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    // Checked as UTF-8 once, in bulk, rather than string by string.
    let text = String::from_utf8(text).map_err(|e| {
        anyhow::anyhow!("{} is not a valid listing: not UTF-8 at byte {}", path.display(), e.utf8_error().valid_up_to())
    })?;
    let listing: Listing =
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid listing", path.display()))?;
    Ok(Some(listing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_entries_a_reader_takes_fit_its_byte_bound() {
        let reserved = crate::client::MAX_ENTRIES * std::mem::size_of::<ListedFile>();
        assert!(reserved <= crate::client::MAX_LISTING_BYTES, "{reserved} bytes reserved for the largest listing");
    }

    fn entry(path: &str, n: u8) -> CatalogEntry {
        CatalogEntry {
            path: path.into(),
            description: if n.is_multiple_of(2) { String::new() } else { "odd".into() },
            mime_type: "video/mp4".into(),
            hash: hex::encode([n; 32]),
            byte_size: u64::from(n) * 1000,
            mtime: i64::from(n),
            tree: (n != 3).then(|| hex::encode([n + 1; 32])),
        }
    }

    #[test]
    fn hex32_takes_exactly_64_lowercase_digits() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let digits = hex::encode(bytes);
        assert_eq!(hex32(&digits), Some(bytes));
        assert_eq!(hex32(&"0123456789abcdef".repeat(4)).map(hex::encode), Some("0123456789abcdef".repeat(4)));
        for bad in [
            digits.to_uppercase(),
            digits[..62].to_string(),
            format!("{digits}00"),
            format!("{}g", &digits[..63]),
            format!("{}é", &digits[..62]),
            format!("{} ", &digits[..63]),
            String::new(),
        ] {
            assert_eq!(hex32(&bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn entries_read_back_as_pushed_and_round_trip_through_json() {
        let summary = CatalogSummary {
            name: "c".into(),
            description: "d".into(),
            image: None,
            entries: (0..10).map(|n| entry(&format!("/a/f{n}.mp4"), n)).collect(),
            revision: "r1".into(),
            protocol: protocol::PROTOCOL_VERSION,
            total_entries: None,
        };
        let listing = Listing::from_summary(&summary);
        assert_eq!(listing.len(), 10);
        for (f, e) in listing.files().iter().zip(&summary.entries) {
            assert_eq!(&listing.entry(f), e);
        }
        let json = serde_json::to_vec(&listing).unwrap();
        let back: CatalogSummary = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.entries, summary.entries);
        assert_eq!((back.name.as_str(), back.revision.as_str()), ("c", "r1"));
        let again: Listing = serde_json::from_slice(&json).unwrap();
        assert_eq!(again.files(), listing.files());
        assert_eq!(again.protocol, protocol::PROTOCOL_VERSION);
    }

    #[test]
    fn index_files_and_bad_hashes() {
        let json = format!(
            r#"{{"name":"c","root_dir":"/x","entries":[
                {{"path":"/a.mp4","hash":"{}","byte_size":5,"mtime_ns":3000000001}},
                {{"path":"/bad","hash":"zz","byte_size":5}},
                {{"path":"/upper","hash":"{}","byte_size":5}}]}}"#,
            "ab".repeat(32),
            "AB".repeat(32)
        );
        let listing: Listing = serde_json::from_str(&json).unwrap();
        assert_eq!(listing.len(), 1);
        let f = listing.files()[0];
        assert_eq!((listing.path(&f), f.mtime, f.byte_size), ("a.mp4", 3, 5));
    }

    #[test]
    fn an_entry_costs_about_a_hundred_bytes_beside_its_path() {
        // The 1,000,000-entry budget of issue 16 (≤ 400 MiB before any read) rests on this.
        assert!(std::mem::size_of::<ListedFile>() <= 112, "{}", std::mem::size_of::<ListedFile>());
        let mut listing = Listing::default();
        for n in 0..10_000u32 {
            let mut e = entry(&format!("/folder/file-{n:07}.mp4"), (n % 250) as u8);
            e.hash = hex::encode(sha2_like(n));
            listing.push(&e).unwrap();
        }
        listing.shrink_to_fit();
        let per_entry = listing.heap_bytes() / listing.len();
        assert!(per_entry <= 112 + 24 + 8, "{per_entry} bytes per entry");
    }

    fn sha2_like(n: u32) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&n.to_be_bytes());
        h
    }
}
