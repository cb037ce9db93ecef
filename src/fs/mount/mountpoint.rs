//! The mountpoint: checks before mounting, mounting over an autofs trigger ourselves, the
//! topmost mount on a path (from /proc/self/mountinfo), the kernel's read-ahead on our mount
//! (raised where we may), and `umount`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::MountOptions;

/// Refuses a mountpoint that is missing, not a folder, not empty, already mounted or stale,
/// with what to do about it. An autofs trigger (`x-systemd.automount`) is accepted as is: the
/// mount goes on top of it, and listing it would wait for that very mount.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    // Before anything touches the folder itself: statx(2), which std uses, and open(2) would
    // trigger an autofs mount and wait for it (that is, for us).
    if let Some(abs) = absolute_unfollowed(path).filter(|abs| is_autofs(abs)) {
        return Ok(abs);
    }
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{} is a stale mount (Transport endpoint is not connected); run `natster-mount umount {}` first",
            path.display(),
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {} does not exist; create it with `mkdir -p {}`", path.display(), path.display())
        }
        Err(e) => bail!("cannot use mountpoint {}: {e}", path.display()),
        Ok(m) if !m.is_dir() => bail!("mountpoint {} is not a folder; give an empty folder", path.display()),
        Ok(_) => {}
    }
    let path = std::fs::canonicalize(path).with_context(|| format!("cannot use mountpoint {}", path.display()))?;
    if top_mount(&path).is_some() {
        bail!("{} is already mounted; run `natster-mount umount {}` first", path.display(), path.display());
    }
    let mut entries = std::fs::read_dir(&path).with_context(|| format!("cannot list mountpoint {}", path.display()))?;
    if entries.next().is_some() {
        bail!("mountpoint {} is not empty; mount on an empty folder so nothing in it is hidden", path.display());
    }
    Ok(path)
}

/// `path` made absolute with its folder resolved but its last component left alone.
fn absolute_unfollowed(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    let parent = std::fs::canonicalize(absolute.parent()?).ok()?;
    Some(parent.join(absolute.file_name()?))
}

/// True if the topmost mount on `abs` is an autofs trigger.
pub(super) fn is_autofs(abs: &Path) -> bool {
    top_mount(abs).is_some_and(|(kind, _)| kind == "autofs")
}

/// Mounts FUSE on `path` with mount(2) itself (root only), never opening or stat-ing the
/// folder, which on an autofs trigger would wait for this very mount: what libfuse does.
pub(super) fn mount_directly(path: &Path, options: &MountOptions) -> Result<OwnedFd> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{} is an automount trigger; only root can mount over one (mount it from /etc/fstab)", path.display());
    }
    let dev = CString::new("/dev/fuse").unwrap_or_default();
    // SAFETY: open(2) of a constant path; the descriptor is owned below.
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot open /dev/fuse; is the fuse module loaded?");
    }
    // SAFETY: fd was just opened and is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={},rootmode=40000,user_id={uid},group_id={gid}", fd.as_raw_fd());
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| anyhow::anyhow!("{} holds a NUL byte", path.display()));
    let (source, target, kind, data) =
        (cstr(b"natster")?, cstr(path.as_os_str().as_bytes())?, cstr(b"fuse.natster-mount")?, cstr(data.as_bytes())?);
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot mount on {}", path.display()));
    }
    Ok(fd)
}

/// Unmounts what [`mount_directly`] mounted; lazily, with a warning, if busy.
pub(super) fn unmount_directly(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(target) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return };
    // SAFETY: umount2(2) with a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return;
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        tracing::warn!(
            "{} is busy (a program still has files open in it): detached it lazily, those files now fail to read; close them before unmounting next time",
            path.display()
        );
        // SAFETY: as above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    } else {
        tracing::warn!("unmount of {} failed: {e}", path.display());
    }
}

/// Like [`check_mountpoint`], but first detaches a stale natster-mount left at `path` by a
/// process that died (a daemon restarted after a crash must not need a hand to come back).
pub fn check_mountpoint_clearing_stale(path: &Path) -> Result<PathBuf> {
    if absolute_unfollowed(path).is_some_and(|abs| is_autofs(&abs)) {
        return check_mountpoint(path);
    }
    let stale = matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if stale {
        tracing::warn!("{} is a stale mount left by a process that died; detaching it", path.display());
        umount(path)?;
    }
    check_mountpoint(path)
}

/// True if `path` is a mountpoint (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    top_mount(path).is_some()
}

/// Type and source of the topmost mount on the absolute path `abs`, if any (the two fields
/// after ` - ` in /proc/self/mountinfo).
pub fn top_mount(abs: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    top_mount_in(&info, abs)
}

fn top_mount_in(info: &str, abs: &Path) -> Option<(String, String)> {
    let line = top_mount_line(info, abs)?;
    let mut fields = line.split_once(" - ")?.1.split(' ');
    Some((fields.next()?.to_string(), fields.next().unwrap_or_default().to_string()))
}

/// The sysfs file holding the read-ahead of the topmost mount on `abs`: its device is the
/// mountinfo line's `major:minor`, digits only, so nothing else can become part of the path.
fn readahead_knob(info: &str, abs: &Path) -> Option<PathBuf> {
    let device = top_mount_line(info, abs)?.split(' ').nth(2)?;
    let (major, minor) = device.split_once(':')?;
    let digits = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    (digits(major) && digits(minor)).then(|| Path::new("/sys/class/bdi").join(device).join("read_ahead_kb"))
}

/// The mountinfo line of the topmost mount on `abs`: the last line for a mountpoint is the
/// topmost of mounts stacked on it.
fn top_mount_line<'a>(info: &'a str, abs: &Path) -> Option<&'a str> {
    let wanted = abs.to_string_lossy().replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011");
    info.lines().rev().find(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Raises the kernel's read-ahead on the mount at `abs` to `kb` KiB, best effort. The kernel
/// takes the smaller of what the filesystem asks for at init and the device's
/// `read_ahead_kb`, whose default (128 KiB) would cut every sequential read into 128 KiB
/// requests. Only root may write it; anyone else keeps the default (debug log), which costs
/// about a tenth of cold sequential speed (8192 requests per GiB instead of 1024).
pub(super) fn widen_readahead(abs: &Path, kb: u32) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(knob) = readahead_knob(&info, abs) else {
        return tracing::debug!("{} is not in /proc/self/mountinfo; kernel read-ahead left as it is", abs.display());
    };
    let now = std::fs::read_to_string(&knob).ok().and_then(|v| v.trim().parse::<u32>().ok());
    if now.is_some_and(|now| now >= kb) {
        return;
    }
    match std::fs::write(&knob, kb.to_string()) {
        Ok(()) => tracing::debug!("kernel read-ahead on {} raised to {kb} KiB", abs.display()),
        Err(e) => {
            tracing::debug!("kernel read-ahead on {} left at {now:?} KiB: {}: {e}", abs.display(), knob.display())
        }
    }
}
/// Detaches the mount at `path` lazily (`fusermount3 -uz`): it leaves the namespace now.
pub(super) fn detach_lazily(path: &Path) {
    match std::process::Command::new("fusermount3").arg("-uz").arg(path).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            tracing::warn!("lazy unmount of {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim())
        }
        Err(e) => tracing::warn!("cannot run fusermount3 to detach {}: {e}", path.display()),
    }
}

/// Unmounts `path` if it is a natster-mount FUSE mount; refuses anything else, naming what is
/// mounted there. Ours shows in /proc/self/mountinfo as type `fuse.natster-mount` (mounted
/// through fusermount3, which passes the subtype) or as type `fuse` with source `natster` (fuser
/// mounting directly as root, where the kernel gets no subtype). A stale mount (ENOTCONN) is
/// detached lazily.
pub fn umount(path: &Path) -> Result<()> {
    let stale = matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    // A stale mount cannot be resolved itself (stat fails): resolve its parent instead.
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        match (absolute.parent().and_then(|p| std::fs::canonicalize(p).ok()), absolute.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            _ => absolute,
        }
    });
    match top_mount(&abs) {
        None if !stale && !abs.exists() => {
            bail!("{} does not exist; give the folder natster-mount is mounted on", path.display())
        }
        None => bail!("{} is not mounted", path.display()),
        Some((kind, source)) if kind == "fuse.natster-mount" || (kind == "fuse" && source == "natster") => {}
        Some((kind, _)) => bail!("{} is not a natster-mount mount (it is {kind}); use umount(8)", path.display()),
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if stale {
        cmd.arg("-z");
    }
    let out = cmd.arg(&abs).output().context("cannot run fusermount3; install the fuse3 package")?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("busy") {
            bail!("{} is busy: a program still has files open in it; close them and try again", path.display());
        }
        bail!("cannot unmount {}: {msg}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topmost_mount_names_autofs_under_a_fuse_mount() {
        let info = "25 1 0:22 / /mnt/n rw,relatime shared:1 - autofs systemd-1 rw,fd=45,direct\n\
                    26 25 0:50 / /mnt/n rw,nosuid - fuse.natster-mount natster rw,user_id=0\n\
                    27 1 0:23 / /mnt/my\\040media rw - autofs systemd-1 rw,direct\n";
        assert_eq!(top_mount_in(info, Path::new("/mnt/n")), Some(("fuse.natster-mount".into(), "natster".into())));
        assert_eq!(top_mount_in(info, Path::new("/mnt/my media")), Some(("autofs".into(), "systemd-1".into())));
        assert_eq!(top_mount_in(info, Path::new("/mnt")), None);
        assert_eq!(readahead_knob(info, Path::new("/mnt/n")), Some(PathBuf::from("/sys/class/bdi/0:50/read_ahead_kb")));
        assert_eq!(readahead_knob(info, Path::new("/mnt")), None);
        let odd = "26 25 0:../x / /mnt/n rw - fuse natster rw\n";
        assert_eq!(readahead_knob(odd, Path::new("/mnt/n")), None, "a device that is not major:minor");
    }
}
