//! `natster-mount` as a FUSE mount helper, the way sshfs and rclone are: mount.fuse3 (run by
//! mount(8) for an fstab line of type `fuse.natster-mount`) runs
//! `natster-mount SOURCE MOUNTPOINT -o OPTIONS`. SOURCE is a context name; the mount is made
//! by a detached `mount --foreground`, and the helper returns only once it is up.
//!
//! Options understood: `allow_other`, `uid=N`, `gid=N` (the owner every file shows, applied by
//! the filesystem itself), `cache_size=SIZE`, `context=NAME` or `context=/abs/NAME.context`,
//! `home=/abs/dir`. mount(8) runs helpers without HOME and PATH, so paths must be absolute.
//! Generic options that mean nothing here (`ro`, `rw`, `dev`, `suid`, `exec`, `auto`, `_netdev`,
//! `nofail`, `x-systemd.*`, …) are ignored; anything else is refused with one line.
//!
//! Tricky cases: mount.fuse3 strips `_netdev`, `nofail` and `auto` itself, adds `dev,suid` when
//! run as root, and with `drop_privileges` mounts by itself and passes `/dev/fd/N` as the
//! mountpoint; with `x-systemd.automount` the mountpoint already holds an autofs trigger, which
//! is mounted over (see `fs::mount::check_mountpoint`); [`mount_helper`] runs it. A context named like a subcommand
//! (`mount`, `up`) is given as `context=NAME` with any other SOURCE.

use std::ffi::OsString;
use std::path::PathBuf;

use std::time::Duration;

use anyhow::{bail, Result};

use super::{Globals, MountArgs};
use crate::context::Home;

/// Options mount(8) or mount.fuse3 may pass that do not concern a read-only network mount.
const IGNORED: &[&str] = &[
    "ro",
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "defaults",
    "_netdev",
    "nofail",
    "sync",
    "async",
    "dirsync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
    "mand",
    "nomand",
    "iversion",
    "noiversion",
    "default_permissions",
];

/// What the fstab line asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HelperOptions {
    pub allow_other: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cache_size: Option<u64>,
    pub context: Option<String>,
    pub home: Option<PathBuf>,
}

/// One call of the helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperCall {
    pub source: String,
    pub mountpoint: PathBuf,
    pub options: HelperOptions,
}

const KNOWN: &str = "natster-mount understands allow_other, uid=, gid=, cache_size=, context= and home= (and ignores \
                     generic ones such as ro, nodev, _netdev)";

/// Recognises `SOURCE MOUNTPOINT [-o OPTIONS]` (arguments after the program name) where SOURCE
/// is no subcommand and MOUNTPOINT is absolute (mount(8) and mount.fuse3 always pass it so);
/// None for an ordinary command line, so a mistyped subcommand (`catalg ls`) gets clap's
/// "unrecognized subcommand" rather than a mount.
pub fn detect(args: &[OsString], subcommands: &[String]) -> Option<Result<HelperCall>> {
    let strings: Option<Vec<&str>> = args.iter().map(|a| a.to_str()).collect();
    let args = strings?;
    let (source, mountpoint, rest) = match args.as_slice() {
        [source, mountpoint, rest @ ..] => (*source, *mountpoint, rest),
        _ => return None,
    };
    if source.starts_with('-') || !mountpoint.starts_with('/') || subcommands.iter().any(|c| c == source) {
        return None;
    }
    Some(parse_call(source, mountpoint, rest))
}

fn parse_call(source: &str, mountpoint: &str, rest: &[&str]) -> Result<HelperCall> {
    let mut options = HelperOptions::default();
    let mut i = 0;
    while i < rest.len() {
        let opts = match rest[i] {
            "-o" => {
                i += 1;
                match rest.get(i) {
                    Some(o) => *o,
                    None => bail!("-o needs a list of options; {KNOWN}"),
                }
            }
            o if o.starts_with("-o") => &o[2..],
            other => bail!("unexpected argument '{other}'; a mount helper takes SOURCE MOUNTPOINT -o OPTIONS"),
        };
        parse_options(opts, &mut options)?;
        i += 1;
    }
    Ok(HelperCall { source: source.to_string(), mountpoint: PathBuf::from(mountpoint), options })
}

/// Adds the comma-separated `opts` to `into`.
pub fn parse_options(opts: &str, into: &mut HelperOptions) -> Result<()> {
    for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let id = |v: Option<&str>| -> Result<u32> {
            match v.map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(n),
                _ => bail!("{key}= needs a number (e.g. {key}=1000; `id -u NAME` prints it)"),
            }
        };
        let absolute = |v: Option<&str>| -> Result<PathBuf> {
            match v {
                Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
                _ => bail!("{key}= needs an absolute path (mount runs helpers without HOME)"),
            }
        };
        match (key, value) {
            ("allow_other", None) => into.allow_other = true,
            ("uid", v) => into.uid = Some(id(v)?),
            ("gid", v) => into.gid = Some(id(v)?),
            ("cache_size", Some(v)) => {
                into.cache_size = Some(super::parse_size(v).map_err(|e| anyhow::anyhow!("cache_size={v}: {e}"))?)
            }
            ("context", Some(v)) if v.starts_with('/') => into.context = Some(v.to_string()),
            ("context", Some(v)) => {
                crate::context::validate_context_name(v)?;
                into.context = Some(v.to_string());
            }
            ("home", v) => into.home = Some(absolute(v)?),
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            (k, None) if IGNORED.contains(&k) => {}
            _ => bail!("unknown mount option '{opt}'; {KNOWN}"),
        }
    }
    Ok(())
}

impl HelperCall {
    /// The home and context name to mount: `home=`, else the environment's; `context=` (a
    /// name, or an absolute `.context` file whose folder is then the home), else SOURCE.
    pub fn resolve(&self) -> Result<(Home, String)> {
        let (home, context) = match &self.options.context {
            Some(path) if path.starts_with('/') => {
                let path = PathBuf::from(path);
                let name = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".context"));
                let (Some(name), Some(dir)) = (name, path.parent()) else {
                    bail!(
                        "context={} must name a .context file (e.g. /home/me/.natster/default.context)",
                        path.display()
                    )
                };
                if let Some(home) = &self.options.home {
                    if home != dir {
                        bail!("context={} is not inside home={}; give one of them", path.display(), home.display());
                    }
                }
                (Home::at(dir), name.to_string())
            }
            named => {
                let home = match &self.options.home {
                    Some(h) => Home::at(h),
                    None => Home::from_env()?,
                };
                (home, named.clone().unwrap_or_else(|| self.source.clone()))
            }
        };
        crate::context::validate_context_name(&context)
            .map_err(|e| anyhow::anyhow!("{e} (the fstab source is the context's name)"))?;
        Ok((home, context))
    }
}

/// Mounts as the fstab line asks: a detached `mount`, returning once the mount is up.
pub fn mount_helper(call: &HelperCall) -> Result<()> {
    let (home, context) = call.resolve()?;
    let g = Globals { home, context, timeout: Duration::from_secs(5) };
    let o = &call.options;
    let args = MountArgs {
        mountpoint: call.mountpoint.clone(),
        cache_size: o.cache_size.unwrap_or(256 << 20),
        read_timeout: Duration::from_secs(10),
        listing_ttl: Duration::from_secs(30),
        foreground: false,
        allow_other: o.allow_other,
        uid: o.uid,
        gid: o.gid,
    };
    super::mount(&g, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(args: &[&str]) -> Option<Result<HelperCall>> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        detect(&args, &["mount".to_string(), "up".to_string()])
    }

    #[test]
    fn mount_fuse3_calls_are_recognised_and_commands_are_not() {
        let c = call(&["default", "/mnt/n", "-o", "ro,allow_other,uid=1000,gid=100,cache_size=64M,dev,suid"])
            .unwrap()
            .unwrap();
        assert_eq!(c.source, "default");
        assert_eq!(c.mountpoint, PathBuf::from("/mnt/n"));
        assert!(c.options.allow_other);
        assert_eq!((c.options.uid, c.options.gid, c.options.cache_size), (Some(1000), Some(100), Some(64 << 20)));
        assert!(call(&["mount", "/mnt/n"]).is_none());
        assert!(call(&["--context", "x", "up"]).is_none());
        assert!(call(&["up"]).is_none());
        assert!(call(&["default", "/dev/fd/5", "-oro"]).unwrap().is_ok());
        // Mistyped subcommands: left to clap.
        assert!(call(&["catalg", "ls"]).is_none());
        assert!(call(&["default", "typo"]).is_none());
    }

    #[test]
    fn unknown_and_malformed_options_are_one_line_errors() {
        for (opts, says) in [
            ("ro,bogus", "unknown mount option 'bogus'"),
            ("uid=alice", "uid= needs a number"),
            ("home=relative/dir", "absolute path"),
            ("cache_size=lots", "cache_size=lots"),
            ("context=bad name", "context name"),
        ] {
            let err = call(&["default", "/mnt/n", "-o", opts]).unwrap().unwrap_err().to_string();
            assert!(err.contains(says), "{opts}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        for ignored in ["_netdev,nofail,x-systemd.automount,x-systemd.idle-timeout=60,noatime,comment=x", "rw"] {
            assert!(call(&["default", "/mnt/n", "-o", ignored]).unwrap().is_ok(), "{ignored}");
        }
    }

    #[test]
    fn an_absolute_context_file_names_its_home() {
        let c = call(&["x", "/mnt/n", "-o", "context=/srv/natster/films.context"]).unwrap().unwrap();
        let (home, context) = c.resolve().unwrap();
        assert_eq!((home.path().to_path_buf(), context.as_str()), (PathBuf::from("/srv/natster"), "films"));
        let c = call(&["films", "/mnt/n", "-o", "home=/srv/natster"]).unwrap().unwrap();
        let (home, context) = c.resolve().unwrap();
        assert_eq!((home.path().to_path_buf(), context.as_str()), (PathBuf::from("/srv/natster"), "films"));
        let c = call(&["x", "/mnt/n", "-o", "home=/a,context=/b/c.context"]).unwrap().unwrap();
        assert!(c.resolve().is_err());
    }
}
