//! `service install|uninstall|status`: `up` as a systemd user service, so the mount and the
//! marked catalogs come up at login (at boot too, with `loginctl enable-linger`).
//!
//! The unit is `Type=notify` (`up` sends READY=1 once mounted), restarts on failure with a
//! growing delay where systemd supports one (254 and later; a fixed delay before), and never
//! gives up restarting. A stop is SIGTERM, on which `up` unmounts; `ExecStopPost` detaches a
//! mount left stale by a crash, so a restart finds its folder usable. When no user systemd
//! runs (a container, an ssh session without a user manager) the unit is written and the
//! exact commands to run are printed instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::Globals;

/// What the unit runs.
#[derive(Debug, Clone)]
pub struct Unit {
    pub exe: PathBuf,
    pub home: PathBuf,
    pub context: String,
    pub mountpoint: PathBuf,
    pub fusermount: PathBuf,
}

/// `natster-mount.service` for the default context, `natster-mount-<context>.service` else.
pub fn unit_name(context: &str) -> String {
    if context == crate::context::DEFAULT_CONTEXT {
        "natster-mount.service".to_string()
    } else {
        format!("natster-mount-{context}.service")
    }
}

/// One word of a unit's command line or assignment, quoted for systemd: `%` and `$` doubled
/// (they would be expanded), and quotes around anything with spaces, quotes or backslashes.
fn quote(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if escaped.chars().any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\' || c == ';') {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        escaped
    }
}

fn command_line(words: &[&str]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

/// The unit file. `systemd_version` decides whether the restart delay can grow.
pub fn unit_text(unit: &Unit, systemd_version: Option<u32>) -> String {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let exec = command_line(&[&s(&unit.exe), "--context", &unit.context, "up", "--mountpoint", &s(&unit.mountpoint)]);
    let stop_post = command_line(&[&s(&unit.fusermount), "-uz", &s(&unit.mountpoint)]);
    let backoff = if systemd_version.is_some_and(|v| v >= 254) {
        "RestartSec=2\nRestartSteps=6\nRestartMaxDelaySec=60\n"
    } else {
        "RestartSec=5\n"
    };
    format!(
        "# Written by `natster-mount service install`; remove it with `natster-mount service uninstall`.\n\
         [Unit]\n\
         Description=Natster: serve and mount catalogs (context {context})\n\
         After=network-online.target\n\
         StartLimitIntervalSec=0\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         Environment={env}\n\
         ExecStart={exec}\n\
         ExecStopPost=-{stop_post}\n\
         Restart=on-failure\n\
         {backoff}\
         TimeoutStopSec=10\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        context = unit.context,
        env = quote(&format!("NATSTER_HOME={}", s(&unit.home))),
    )
}

/// `$XDG_CONFIG_HOME/systemd/user`, else `~/.config/systemd/user`.
fn unit_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("systemd/user"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".config/systemd/user")),
        None => bail!("neither XDG_CONFIG_HOME nor HOME is set; cannot tell where user units go"),
    }
}

/// Runs `cmd` with its output captured, killed after `bound`; None if it could not run.
fn run_bounded(mut cmd: Command, bound: Duration) -> Option<std::process::Output> {
    let dir = tempfile::tempdir().ok()?;
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).ok()?)
        .stderr(std::fs::File::create(&err).ok()?);
    let mut child = cmd.spawn().ok()?;
    let until = Instant::now() + bound;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    Some(std::process::Output {
        status,
        stdout: std::fs::read(out).unwrap_or_default(),
        stderr: std::fs::read(err).unwrap_or_default(),
    })
}

fn systemctl(args: &[&str]) -> Option<std::process::Output> {
    let mut cmd = Command::new("systemctl");
    cmd.arg("--user").args(args);
    run_bounded(cmd, Duration::from_secs(30))
}

/// Whether a user systemd answers (`systemctl --user` works).
fn user_systemd() -> bool {
    systemctl(&["show-environment"]).is_some_and(|o| o.status.success())
}

/// systemd's version (`systemctl --version`: "systemd 252 (…)").
pub fn systemd_version() -> Option<u32> {
    let out = run_bounded(
        {
            let mut c = Command::new("systemctl");
            c.arg("--version");
            c
        },
        Duration::from_secs(10),
    )?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1)?.parse().ok()
}

/// `program` as found on PATH, else `fallback`.
fn on_path(program: &str, fallback: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from(fallback))
}

/// The unit for this home and context, mounting at `mountpoint` (default ~/Natster).
pub fn plan(g: &Globals, mountpoint: Option<PathBuf>) -> Result<Unit> {
    let exe = std::env::current_exe().and_then(std::fs::canonicalize).context("cannot find this program's path")?;
    let mountpoint = match mountpoint {
        Some(m) => std::path::absolute(&m).with_context(|| format!("cannot use mountpoint {}", m.display()))?,
        None => super::default_mountpoint()?,
    };
    let home = std::path::absolute(g.home.path()).context("cannot resolve NATSTER_HOME")?;
    Ok(Unit {
        exe,
        home,
        context: g.context.clone(),
        mountpoint,
        fusermount: on_path("fusermount3", "/usr/bin/fusermount3"),
    })
}

fn check(what: &str, out: Option<std::process::Output>) -> Result<()> {
    match out {
        Some(o) if o.status.success() => Ok(()),
        Some(o) => bail!("`systemctl --user {what}` failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        None => bail!("`systemctl --user {what}` did not finish"),
    }
}

pub fn install(g: &Globals, mountpoint: Option<PathBuf>) -> Result<()> {
    g.load_context()?;
    let unit = plan(g, mountpoint)?;
    std::fs::create_dir_all(&unit.mountpoint)
        .with_context(|| format!("cannot create mountpoint {}", unit.mountpoint.display()))?;
    let name = unit_name(&g.context);
    let path = unit_dir()?.join(&name);
    crate::store::write_atomic(&path, unit_text(&unit, systemd_version()).as_bytes(), 0o644)?;
    outln!("wrote {}", path.display());
    if user_systemd() {
        check("daemon-reload", systemctl(&["daemon-reload"]))?;
        check(&format!("enable --now {name}"), systemctl(&["enable", "--now", &name]))?;
        outln!("enabled and started {name}: {} is mounted at every login", unit.mountpoint.display());
        outln!("to start it at boot without a login: loginctl enable-linger $USER");
    } else {
        outln!("no user systemd answers here; to enable and start it, run in your login session:");
        outln!("  systemctl --user daemon-reload");
        outln!("  systemctl --user enable --now {name}");
        outln!("and to start it at boot without a login: loginctl enable-linger $USER");
    }
    Ok(())
}

pub fn uninstall(g: &Globals) -> Result<()> {
    let name = unit_name(&g.context);
    let path = unit_dir()?.join(&name);
    if !path.exists() {
        bail!("{} is not installed (no {}); nothing to undo", name, path.display());
    }
    let running = user_systemd();
    if running {
        check(&format!("disable --now {name}"), systemctl(&["disable", "--now", &name]))?;
    }
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    if running {
        check("daemon-reload", systemctl(&["daemon-reload"]))?;
        outln!("stopped, disabled and removed {name}");
    } else {
        outln!("removed {}; no user systemd answers here, so if it was enabled elsewhere run:", path.display());
        outln!("  systemctl --user disable --now {name}");
        outln!("  systemctl --user daemon-reload");
    }
    Ok(())
}

pub fn status(g: &Globals) -> Result<()> {
    let name = unit_name(&g.context);
    let path = unit_dir()?.join(&name);
    if !path.exists() {
        outln!("{name} is not installed; install it with `natster-mount service install`");
        return Ok(());
    }
    outln!("{name} is installed: {}", path.display());
    if !user_systemd() {
        outln!("no user systemd answers here, so it is not running under systemd");
        return Ok(());
    }
    let active = systemctl(&["is-active", &name]).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let enabled = systemctl(&["is-enabled", &name]).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    outln!("{}, {}", enabled.unwrap_or_else(|| "unknown".into()), active.unwrap_or_else(|| "unknown".into()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_with_spaces_and_specifiers_are_quoted() {
        assert_eq!(quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(quote("/home/a b/N"), "\"/home/a b/N\"");
        assert_eq!(quote("100%"), "100%%");
        assert_eq!(quote("$HOME"), "$$HOME");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
    }
}
