//! Listings: `get` page by page, with every entry a peer sends checked before the mount or
//! the CLI sees it. Bounds what a peer can make us hold (entries, bytes), drops entries whose
//! paths could escape or confuse a folder tree, and restarts a listing that changes mid-way.

use std::sync::atomic::Ordering;

use super::{CatalogClient, ClientError, Result};
use crate::identity::Purpose;
use crate::listing::Listing;
use crate::protocol::{self, CatalogEntry, CatalogSummary, GetRequest, Operation};

/// Most entries a listing may have; bounds what a peer can make us hold. The count a peer
/// announces is reserved up front (untouched memory until entries arrive), so it must fit
/// in [`MAX_LISTING_BYTES`] at about 104 bytes an entry before its text.
pub const MAX_ENTRIES: usize = 2_000_000;
/// Most bytes of entry text a listing may have, for the same reason.
pub const MAX_LISTING_BYTES: usize = 256 * 1024 * 1024;

impl CatalogClient {
    /// The whole listing, fetched page by page; restarts if it changes mid-way. Every page is
    /// checked against the catalog's trust (signed by its owner's server) unless the catalog
    /// is an original, v1-only peer that never signed. Remembered for [`CatalogClient::open`].
    pub async fn get(&self) -> Result<CatalogSummary> {
        let listing = self.get_listing("").await?.unwrap_or_default();
        let summary = listing.to_summary();
        self.inner.remember_listing(&summary);
        Ok(summary)
    }

    /// [`CatalogClient::get`], compact and without keeping anything in the client (the mount
    /// holds the listing in its tree and opens files by their entry); None as soon as the
    /// first page says the revision is still `shown` (when not empty): an unchanged catalog
    /// costs one page, however large.
    pub async fn get_listing(&self, shown: &str) -> Result<Option<Listing>> {
        'listing: for _ in 0..3 {
            let first = self.page(0).await?;
            if !shown.is_empty() && first.revision == shown {
                self.inner.note_protocol(first.protocol);
                return Ok(None);
            }
            let mut listing = Listing::header_of(&first);
            let Some(total) = first.total_entries else {
                // An original peer ignores `from` and sends everything at once.
                push_valid(&self.inner.catalog, &mut listing, &first.entries);
                self.inner.note_protocol(listing.protocol);
                return Ok(Some(listing));
            };
            let total = usize::try_from(total).unwrap_or(usize::MAX);
            if total > MAX_ENTRIES {
                return Err(ClientError::Protocol(format!("listing has {total} entries, more than {MAX_ENTRIES}")));
            }
            listing.reserve(total);
            let mut fetched = first.entries.len().min(total);
            push_valid(&self.inner.catalog, &mut listing, &first.entries[..fetched]);
            drop(first);
            while fetched < total {
                let page = self.page(fetched as u64).await?;
                if page.revision != listing.revision {
                    continue 'listing;
                }
                if page.entries.is_empty() {
                    return Err(ClientError::Protocol("listing page was empty before the end".into()));
                }
                let take = page.entries.len().min(total - fetched);
                push_valid(&self.inner.catalog, &mut listing, &page.entries[..take]);
                fetched += take;
                if listing.heap_bytes() > MAX_LISTING_BYTES {
                    return Err(ClientError::Protocol(format!("listing is larger than {MAX_LISTING_BYTES} bytes")));
                }
            }
            self.inner.note_protocol(listing.protocol);
            return Ok(Some(listing));
        }
        Err(ClientError::Protocol("listing kept changing while it was read; try again".into()))
    }

    /// One page of the listing from entry `from`, its signature checked.
    async fn page(&self, from: u64) -> Result<CatalogSummary> {
        let inner = &self.inner;
        let nonce = crate::crypto::new_session_id();
        let reply =
            inner.request_reply(Operation::Get, &GetRequest { from: Some(from), nonce: Some(nonce.clone()) }).await?;
        let page: CatalogSummary = reply.parse(Operation::Get)?;
        // 2 was unsigned and 3 sends chunks without proofs: neither is read, so that nobody
        // can downgrade a catalog to them.
        if (2..protocol::PROTOCOL_VERSION).contains(&page.protocol) {
            return Err(ClientError::Protocol(format!(
                "catalog '{}' is served by an older natster-mount (protocol {}); ask its owner to upgrade",
                inner.catalog, page.protocol
            )));
        }
        if reply.proof.is_some() || page.protocol >= protocol::PROTOCOL_VERSION {
            inner.check_signed(&reply, Purpose::Listing, &[inner.catalog.as_bytes(), nonce.as_bytes()])?;
            inner.unverified.store(false, Ordering::Relaxed);
        } else {
            // An original peer cannot sign: taken, unless this catalog signed before.
            inner.trust.allow_unsigned().map_err(|e| ClientError::Untrusted(inner.catalog.clone(), e))?;
            if !inner.unverified.swap(true, Ordering::Relaxed) {
                tracing::warn!(catalog = %inner.catalog, "catalog answers unsigned (an original Natster peer): its listing is not verified; files are still checked against their sha256");
            }
        }
        Ok(page)
    }
}

impl super::ClientInner {
    /// Keeps what `listing` says of each file, for opens by hash.
    fn remember_listing(&self, listing: &CatalogSummary) {
        let listed = listing
            .entries
            .iter()
            .map(|e| (e.hash.clone(), super::Listed { byte_size: e.byte_size, tree: e.tree.clone() }))
            .collect();
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = listed;
    }
}

/// Why an entry could confuse a filesystem built from the listing, if it could.
fn invalid_entry(e: &CatalogEntry) -> Option<&'static str> {
    if !protocol::is_sha256_hex(&e.hash) {
        return Some("invalid hash");
    }
    if e.path.len() > 4096
        || e.description.len() > 64 * 1024
        || e.mime_type.len() > 255
        || e.tree.as_ref().is_some_and(|t| t.len() > 64)
    {
        return Some("oversized field");
    }
    // A name or type shown in a terminal or a file manager must not carry escape sequences
    // or line breaks (a peer's `\x1b]52;…` would write the reader's clipboard).
    if e.path.chars().any(char::is_control) || e.mime_type.chars().any(char::is_control) {
        return Some("control character in path or mime type");
    }
    let rel = e.path.strip_prefix('/').unwrap_or(&e.path);
    if rel.is_empty() || rel.split('/').any(|p| p.is_empty() || p == "." || p == ".." || p.contains('\0')) {
        return Some("path is not a clean relative path");
    }
    None
}

/// Drops (and logs) entries a peer should never have sent; one bad entry must not hide the
/// rest of the catalog.
#[cfg(test)]
fn drop_invalid_entries(catalog: &str, entries: &mut Vec<CatalogEntry>) {
    entries.retain(|e| match invalid_entry(e) {
        None => true,
        Some(why) => {
            tracing::warn!(catalog, path = ?e.path, "ignoring listing entry: {why}");
            false
        }
    });
}

/// Adds `entries` to `listing`, dropping (and logging) those a peer should never have sent.
fn push_valid(catalog: &str, listing: &mut Listing, entries: &[CatalogEntry]) {
    for e in entries {
        if let Some(why) = invalid_entry(e).or_else(|| listing.push(e).err()) {
            tracing::warn!(catalog, path = ?e.path, "ignoring listing entry: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_drop_escaping_paths() {
        let entry = |path: &str| CatalogEntry {
            path: path.into(),
            description: String::new(),
            mime_type: String::new(),
            hash: "a".repeat(64),
            byte_size: 1,
            mtime: 0,
            tree: None,
        };
        assert!(invalid_entry(&entry("/a/b.mp4")).is_none());
        for bad in ["/../etc/passwd", "/a//b", "/", "/a/./b", "/a/..", "/a\nb.mp4", "/\u{1b}]52;c;eA==\u{7}.mp4"] {
            assert!(invalid_entry(&entry(bad)).is_some(), "{bad} accepted");
        }
        let mut listing = vec![entry("/ok.mp4"), entry("/../escape")];
        drop_invalid_entries("c", &mut listing);
        assert_eq!(listing.len(), 1);
    }
}
