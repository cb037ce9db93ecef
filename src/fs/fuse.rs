//! fuser callbacks: a thin layer that turns kernel requests into `NatsterFs` calls. A read the
//! chunk cache holds is answered on the FUSE thread (memory only, no wait); any other runs as a
//! task on the tokio runtime and replies when done, so a slow catalog never blocks the FUSE
//! threads. The mount is read-only (`ro`), so the kernel answers writes with EROFS itself.
//!
//! Kernel caches: a listing is immutable per revision and every change is pushed to the kernel
//! (`notify_inval_entry` / `notify_inval_inode`, see `mount`), so names and attributes get a
//! long [`TTL`], folders are opened with `FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE` (the kernel keeps
//! what readdir returned until we invalidate the folder) and files with `FOPEN_KEEP_CACHE` (a
//! file whose content changes gets a new inode, so its old pages are never served). A second
//! `ls -lR` is then answered by the kernel alone, but for opendir/releasedir of each folder.
//! readdir(plus) reads the snapshot taken at opendir; offsets are positions in it, so a listing
//! applied between two calls neither skips nor repeats an entry.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};

use super::{Attr, Calls, DirSnapshot, FsError, NatsterFs, ReadNow};

/// How long the kernel may trust names and attributes; listing changes are pushed to it
/// explicitly (see `mount`), so this can be long.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// The mount root's attributes are kept briefly: a stat of the mountpoint is how a mount whose
/// process died is told stale (ENOTCONN, see `mount::check_mountpoint`), and anything that
/// stat-ed the root would otherwise keep that from being seen for a day.
const ROOT_TTL: Duration = Duration::from_secs(1);

/// Kernel requests in flight in the background (read-ahead): the kernel's default is 12, too few
/// to keep a window of chunks moving for several readers.
const MAX_BACKGROUND: u16 = 64;
/// Largest read the kernel sends at once for a sequential run (its read-ahead), in bytes.
pub const KERNEL_READAHEAD: u32 = 1024 * 1024;

pub struct FuseAdapter {
    pub fs: Arc<NatsterFs>,
    pub runtime: tokio::runtime::Handle,
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: if a.is_dir { FileType::Directory } else { FileType::RegularFile },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Let the kernel read ahead in large requests; our own read-ahead works past it.
        let _ = config.set_max_readahead(KERNEL_READAHEAD);
        // Names and attributes in one reply: `ls -l` of a fresh folder needs no lookup per entry.
        let _ =
            config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO);
        // Lookups and readdirs of one folder in parallel: the FUSE threads are several.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        Calls::count(&self.fs.calls.lookup);
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        Calls::count(&self.fs.calls.getattr);
        match self.fs.attr(ino.0) {
            Ok(a) => reply.attr(if ino.0 == super::ROOT_INO { &ROOT_TTL } else { &TTL }, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        Calls::count(&self.fs.calls.open);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        match self.fs.open(ino.0) {
            // A file's bytes never change while its hash does not; a new hash invalidates
            // the inode's pages explicitly, so the page cache may keep them across opens.
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        Calls::count(&self.fs.calls.read);
        // Within the runtime: a read answered from the cache may start read-ahead.
        let _runtime = self.runtime.enter();
        match self.fs.read_now(fh.0, offset, size) {
            ReadNow::Done(Ok(bytes)) => reply.data(&bytes),
            ReadNow::Done(Err(e)) => reply.error(errno(&e)),
            ReadNow::Fetch(pending) => {
                let fs = self.fs.clone();
                self.runtime.spawn(async move {
                    match fs.read_pending(pending).await {
                        Ok(bytes) => reply.data(&bytes),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        Calls::count(&self.fs.calls.opendir);
        match self.fs.opendir(ino.0) {
            // What readdir returned stays valid until the folder is invalidated (new revision).
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        Calls::count(&self.fs.calls.releasedir);
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        Calls::count(&self.fs.calls.readdir);
        let snapshot = match self.fs.open_dir(fh.0, ino.0) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut k = DirSnapshot::index_at(offset);
        while let Some(child) = snapshot.entry(k) {
            let kind = if child.is_dir { FileType::Directory } else { FileType::RegularFile };
            if reply.add(INodeNo(child.ino), snapshot.offset_after(k), kind, child.name) {
                break;
            }
            k += 1;
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        Calls::count(&self.fs.calls.readdirplus);
        let snapshot = match self.fs.open_dir(fh.0, ino.0) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(&e)),
        };
        let (uid, gid) = (self.fs.options.uid, self.fs.options.gid);
        let mut k = DirSnapshot::index_at(offset);
        while let Some((child, attr)) = snapshot.entry_with(k, uid, gid) {
            // `.` and `..`: the kernel takes no attributes for them; any valid ones will do.
            let attr = attr.unwrap_or(Attr {
                ino: child.ino,
                size: 0,
                is_dir: true,
                mtime: std::time::UNIX_EPOCH,
                perm: 0o555,
                nlink: 2,
                uid,
                gid,
            });
            if reply.add(
                INodeNo(child.ino),
                snapshot.offset_after(k),
                child.name,
                &TTL,
                &file_attr(&attr),
                Generation(0),
            ) {
                break;
            }
            k += 1;
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        Calls::count(&self.fs.calls.xattr);
        // Only `user.` attributes exist here. Saying so (ENOTSUP) for the others, rather than
        // "no such attribute", lets `ls -l` stop asking every file's security label and ACL:
        // it remembers a filesystem that does not support them (FUSE has no xattr cache, so
        // each ask is a request).
        if !name.as_encoded_bytes().starts_with(b"user.") {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let value = match self.fs.xattrs(ino.0) {
            Ok(attrs) => attrs.into_iter().find(|(k, _)| OsStr::new(k) == name).map(|(_, v)| v),
            Err(e) => return reply.error(errno(&e)),
        };
        match value {
            None => reply.error(errno(&FsError::NoAttr)),
            Some(v) => reply_sized(reply, size, v.as_bytes()),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        Calls::count(&self.fs.calls.xattr);
        match self.fs.xattrs(ino.0) {
            Ok(attrs) => {
                let mut names = Vec::new();
                for (k, _) in attrs {
                    names.extend_from_slice(k.as_bytes());
                    names.push(0);
                }
                reply_sized(reply, size, &names);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        Calls::count(&self.fs.calls.other);
        reply.statfs(0, 0, 0, 0, 0, 128 * 1024, 255, 128 * 1024);
    }
}

/// xattr protocol: size 0 asks for the length; otherwise the value must fit.
fn reply_sized(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() <= size as usize {
        reply.data(value);
    } else {
        reply.error(errno(&FsError::Range));
    }
}
