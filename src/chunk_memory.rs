//! Memory for decrypted chunks, which the mount's cache keeps for minutes.
//!
//! The process serves every transient buffer (NATS read buffers, sealed records) from glibc's
//! heap, where freed ones are reused without a page fault (see `tune_allocator` in main.rs).
//! Long-lived chunks interleaved with them would pin the heap: a cache evicting its oldest
//! chunk frees a hole between younger transient buffers that glibc cannot hand back, and the
//! process would hold far more than the cache budget. So a large decrypted chunk lives in an
//! anonymous mapping of its own, and a mapping the cache drops goes back to a small pool of
//! spare ones, from which the next chunk of that size is decrypted: in a steady stream (the
//! cache evicting one chunk per chunk it takes) no page is faulted in or zeroed again.
//!
//! Invariants:
//! - a buffer is exactly the length asked for; its bytes are whatever the caller writes over
//!   all of it (a chunk decrypted into it);
//! - the pool holds at most [`SPARE_BYTES`] of spare mappings, so memory is the cache budget
//!   plus that; the rest are unmapped when dropped;
//! - at most [`MAX_MAPPINGS`] mappings are live (the kernel's per-process limit is 65,530 and
//!   threads and the allocator need some); past that, and when a mapping fails, chunks go to
//!   the heap: slower, never a failed read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

/// Chunks at least this large get a mapping (glibc's own default mmap threshold); smaller
/// ones (16 KiB leaf records, file tails) stay on the heap.
pub const OWN_MAPPING_MIN: usize = 128 * 1024;
/// Spare mappings kept for reuse, in bytes.
pub const SPARE_BYTES: usize = 8 << 20;
/// Live mappings at most.
pub const MAX_MAPPINGS: usize = 16 * 1024;

static LIVE_MAPPINGS: AtomicUsize = AtomicUsize::new(0);
static SPARE: Mutex<Vec<memmap2::MmapMut>> = Mutex::new(Vec::new());

/// A writable buffer for one decrypted chunk.
pub enum ChunkBuffer {
    Mapped(Mapping),
    Heap(Vec<u8>),
}

/// A mapping that goes back to the spare pool when dropped.
pub struct Mapping(Option<memmap2::MmapMut>);

impl ChunkBuffer {
    /// A buffer of `len` bytes for the caller to overwrite whole (a chunk decrypted into
    /// it): a reused mapping still holds an earlier chunk's bytes, so never read it first.
    pub fn with_len(len: usize) -> ChunkBuffer {
        if len >= OWN_MAPPING_MIN {
            if let Some(map) = Mapping::take(len) {
                return ChunkBuffer::Mapped(map);
            }
        }
        ChunkBuffer::Heap(vec![0; len])
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            ChunkBuffer::Mapped(map) => map.as_mut_slice(),
            ChunkBuffer::Heap(v) => v,
        }
    }

    /// Shared, immutable bytes; a mapping returns to the pool when the last clone is dropped.
    pub fn freeze(self) -> Bytes {
        match self {
            ChunkBuffer::Mapped(map) => Bytes::from_owner(map),
            ChunkBuffer::Heap(v) => Bytes::from(v),
        }
    }
}

impl Mapping {
    /// A spare mapping of exactly `len` bytes, or a new one; None past the mapping limit or
    /// when the kernel refuses one.
    fn take(len: usize) -> Option<Mapping> {
        if let Ok(mut spare) = SPARE.lock() {
            if let Some(at) = spare.iter().rposition(|m| m.len() == len) {
                return Some(Mapping(Some(spare.swap_remove(at))));
            }
        }
        if LIVE_MAPPINGS.fetch_add(1, Ordering::Relaxed) >= MAX_MAPPINGS {
            LIVE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match memmap2::MmapMut::map_anon(len) {
            Ok(map) => Some(Mapping(Some(map))),
            Err(_) => {
                LIVE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let Some(map) = self.0.take() else { return };
        let Ok(mut spare) = SPARE.lock() else {
            LIVE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let mut held: usize = spare.iter().map(|m| m.len()).sum();
        // The newest size is what the next chunk most likely needs: spares of another size
        // (another catalog's chunk size) make room for it.
        while held + map.len() > SPARE_BYTES {
            let Some(at) = spare.iter().position(|m| m.len() != map.len()) else { break };
            held -= spare[at].len();
            drop(spare.swap_remove(at));
            LIVE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
        }
        if held + map.len() <= SPARE_BYTES {
            spare.push(map);
        } else {
            LIVE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool is one per process: its tests take turns.
    static POOL_TESTS: Mutex<()> = Mutex::new(());

    /// A buffer holding a copy of `src`, as a chunk decrypted into it would.
    fn copy_of(src: &[u8]) -> ChunkBuffer {
        let mut buf = ChunkBuffer::with_len(src.len());
        buf.as_mut_slice().copy_from_slice(src);
        buf
    }

    #[test]
    fn large_buffers_are_mapped_and_reused_small_ones_are_heap_and_both_keep_their_bytes() {
        let _turn = POOL_TESTS.lock();
        let large: Vec<u8> = (0..OWN_MAPPING_MIN + 5).map(|i| i as u8).collect();
        let buf = copy_of(&large);
        assert!(matches!(buf, ChunkBuffer::Mapped(_)));
        let bytes = buf.freeze();
        assert_eq!(&bytes[..], &large[..]);
        let addr = bytes.as_ptr();
        drop(bytes);
        // The dropped mapping is the spare one the next chunk of its size gets.
        let other: Vec<u8> = (0..OWN_MAPPING_MIN + 5).map(|i| (i * 7) as u8).collect();
        let again = copy_of(&other).freeze();
        assert_eq!(again.as_ptr(), addr);
        assert_eq!(&again[..], &other[..]);

        let small = vec![7u8; 100];
        let buf = copy_of(&small);
        assert!(matches!(buf, ChunkBuffer::Heap(_)));
        assert_eq!(&buf.freeze()[..], &small[..]);
    }

    #[test]
    fn the_spare_pool_is_bounded() {
        let _turn = POOL_TESTS.lock();
        let size = OWN_MAPPING_MIN + 4096 * 3;
        let bufs: Vec<Bytes> = (0..2 * SPARE_BYTES / size + 2).map(|_| copy_of(&vec![1u8; size]).freeze()).collect();
        drop(bufs);
        let held: usize = SPARE.lock().map(|s| s.iter().map(|m| m.len()).sum()).unwrap_or(0);
        assert!(held <= SPARE_BYTES, "{held} spare bytes");
    }
}
