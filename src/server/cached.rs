//! Reads that never wait for a disk: what the kernel already holds, asked for from an async
//! worker without a trip to the blocking pool.
//!
//! A small random read's record is mostly in the page cache (a popular file, a leaf next to one
//! just read), and handing it to the blocking pool and back costs two thread wake-ups, which on
//! this scale is more than the read itself. So the first record of a small read is first tried
//! here, and only what would block goes to the pool.
//!
//! Invariants:
//! - Nothing here waits for storage: data is read with `preadv2(RWF_NOWAIT)`, which fails with
//!   `EAGAIN` rather than wait for I/O (it may start read-ahead of the missing pages, so a
//!   retry or the blocking read that follows finds them sooner), and the file's identity with
//!   `statx(AT_STATX_DONT_SYNC)`, which answers from the attributes the kernel has (a network
//!   filesystem is not asked).
//! - A read that is only partly cached, a filesystem or kernel without `RWF_NOWAIT`, or any
//!   other error is reported as [`Cached::No`]; the caller then does the whole read on the
//!   blocking pool, so the outcome never depends on which path ran.

use std::fs::File;

use super::files::FileIdentity;

/// Whether a page-cache-only read got everything.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cached<T> {
    Yes(T),
    /// Not (all) in memory, or the fast path is unavailable: do it on the blocking pool.
    No,
}

/// Fills `buf` from `file` at `offset` if every byte is in the page cache.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Cached<()> {
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < buf.len() {
        let Ok(at) = libc::off_t::try_from(offset.saturating_add(done as u64)) else { return Cached::No };
        let rest = &mut buf[done..];
        let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        // SAFETY: `iov` points at `rest`, which is valid for writes of its length and outlives
        // the call; the descriptor is owned by `file`.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        match n {
            // EAGAIN (not cached), EOPNOTSUPP/EINVAL (no RWF_NOWAIT here), EINTR, or EOF
            // before `buf` is full: the blocking path reads again and reports what it finds.
            n if n <= 0 => return Cached::No,
            n => done += n as usize,
        }
    }
    Cached::Yes(())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn read_exact_at(_file: &File, _buf: &mut [u8], _offset: u64) -> Cached<()> {
    Cached::No
}

/// The open file's size and mtime as the kernel has them, without asking a remote server.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn identity(file: &File) -> Cached<FileIdentity> {
    use std::os::fd::AsRawFd;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let flags = libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC;
    let mask = libc::STATX_SIZE | libc::STATX_MTIME;
    // SAFETY: the path is a NUL-terminated empty string (AT_EMPTY_PATH: the descriptor itself)
    // and `stx` is valid for writes of a `statx`.
    let rc = unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), flags, mask, stx.as_mut_ptr()) };
    if rc != 0 {
        return Cached::No;
    }
    // SAFETY: statx succeeded, so it wrote the struct (which was zeroed to begin with anyway).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & mask != mask {
        return Cached::No;
    }
    Cached::Yes(FileIdentity {
        size: stx.stx_size,
        mtime_ns: stx.stx_mtime.tv_sec.saturating_mul(1_000_000_000).saturating_add(i64::from(stx.stx_mtime.tv_nsec)),
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn identity(_file: &File) -> Cached<FileIdentity> {
    Cached::No
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;

    #[test]
    fn a_cached_file_reads_like_a_blocking_read_and_eof_is_no() {
        let mut f = tempfile::tempfile().expect("temp file");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).expect("write");
        // Just written, so in the page cache; a filesystem without RWF_NOWAIT says No.
        let mut buf = vec![0u8; 40_000];
        let fast = read_exact_at(&f, &mut buf, 50_000);
        if fast == Cached::Yes(()) {
            assert_eq!(buf, data[50_000..90_000]);
            // Written back and dropped from the page cache. The advice is only advice (tmpfs
            // keeps the pages), and RWF_NOWAIT may start read-ahead for what is missing and
            // find it done on the next call: so an evicted range may read either way, but
            // what it reads must be the data, and a range still resident must read at once.
            f.sync_all().expect("sync");
            evict(&f);
            let resident_before = resident(&f, 50_000, 40_000);
            buf.fill(0);
            match read_exact_at(&f, &mut buf, 50_000) {
                Cached::Yes(()) => assert_eq!(buf, data[50_000..90_000], "a range read without waiting is the data"),
                Cached::No => assert!(!resident_before, "a resident range was left to the blocking path"),
            }
        }
        let mut past = vec![0u8; 20_000];
        assert_eq!(read_exact_at(&f, &mut past, 90_000), Cached::No, "a read past EOF is left to the blocking path");
        let mut blocking = vec![0u8; 40_000];
        f.read_exact_at(&mut blocking, 50_000).expect("read");
        assert_eq!(blocking, data[50_000..90_000]);
    }

    #[cfg(target_os = "linux")]
    fn evict(f: &File) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain advice call on a descriptor `f` owns.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise");
    }

    #[cfg(not(target_os = "linux"))]
    fn evict(_f: &File) {}

    /// Whether every page of `[offset, offset + len)` is in the page cache (`mincore` on a
    /// mapping that is never touched, so asking does not read anything in).
    #[cfg(target_os = "linux")]
    fn resident(f: &File, offset: u64, len: usize) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
        let start = offset as usize / page * page;
        let map_len = offset as usize + len - start;
        // SAFETY: a fresh read-only shared mapping of a file `f` owns; it is never dereferenced
        // and is unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                start as libc::off_t,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        let mut vec = vec![0u8; map_len.div_ceil(page)];
        // SAFETY: `addr` is a page-aligned mapping of `map_len` bytes and `vec` has one byte
        // per page of it.
        let rc = unsafe { libc::mincore(addr, map_len, vec.as_mut_ptr()) };
        // SAFETY: unmapping exactly the mapping made above.
        unsafe { libc::munmap(addr, map_len) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().all(|v| v & 1 == 1)
    }

    #[cfg(not(target_os = "linux"))]
    fn resident(_f: &File, _offset: u64, _len: usize) -> bool {
        true
    }

    #[test]
    fn identity_matches_the_blocking_stat() {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(b"hello").expect("write");
        let blocking = FileIdentity::of_file(&f).expect("stat");
        let fast = identity(&f);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(fast, Cached::Yes(blocking), "statx of an open file answers on Linux");
        }
    }
}
