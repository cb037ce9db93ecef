//! The web UI under test: `natster-mount web` as a child ([`WebUi`]), HTTP helpers (a
//! session cookie, raw requests that keep `..` and odd bytes in the path), and a headless
//! Chromium driven through chromedriver ([`Browser`]). Every guard kills what it started;
//! every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{free_port, tail, POLL};

/// Bound on `natster-mount web` printing its login link.
pub const WEB_START_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on one browser interaction (a page load, an element, a media event).
pub const BROWSER_DEADLINE: Duration = Duration::from_secs(30);

/// `natster-mount web` running until dropped (SIGTERM, then SIGKILL after 10 s).
pub struct WebUi {
    child: Child,
    out: tempfile::NamedTempFile,
    err: tempfile::NamedTempFile,
    /// `http://127.0.0.1:PORT` (or https).
    pub base: String,
    /// The one-time login link it printed.
    pub login_url: String,
}

impl WebUi {
    /// Starts `cmd` (a `natster-mount web …` command) and waits for its login link.
    pub fn start(mut cmd: Command) -> WebUi {
        let out = tempfile::NamedTempFile::new().expect("web stdout");
        let err = tempfile::NamedTempFile::new().expect("web stderr");
        let child = cmd
            .env("NATSTER_LOG", "natster_mount=debug,warn")
            .stdout(out.reopen().expect("stdout"))
            .stderr(err.reopen().expect("stderr"))
            .spawn()
            .expect("spawn natster-mount web");
        let mut web = WebUi { child, out, err, base: String::new(), login_url: String::new() };
        let until = Instant::now() + WEB_START_DEADLINE;
        loop {
            if let Some(url) = web.stdout().lines().find_map(|l| l.strip_prefix("open ").map(str::to_string)) {
                let base = url.split("/login").next().expect("base url").to_string();
                web.base = base;
                web.login_url = url;
                return web;
            }
            if let Ok(Some(status)) = web.child.try_wait() {
                panic!("natster-mount web exited with {status}:\n{}\n{}", web.stdout(), web.stderr());
            }
            assert!(Instant::now() < until, "natster-mount web printed no link:\n{}", web.stderr());
            std::thread::sleep(POLL);
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.out.path()).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.err.path()).unwrap_or_default()
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> String {
        self.base.split("://").nth(1).expect("address").to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends SIGTERM and returns how long the process took to exit (None: not within 10 s).
    pub fn terminate(&mut self) -> Option<Duration> {
        let started = Instant::now();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Trades the login link for the session cookie (`name=value`), checking its attributes.
    pub async fn login(&self) -> String {
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
        let response = client.get(&self.login_url).send().await.expect("login request");
        assert_eq!(response.status(), 303, "login with the printed link");
        let cookie =
            response.headers().get("set-cookie").expect("a session cookie").to_str().expect("ascii cookie").to_string();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(cookie.contains(attribute), "cookie lacks {attribute}: {cookie}");
        }
        cookie.split(';').next().expect("name=value").to_string()
    }
}

impl Drop for WebUi {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.terminate().is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- natster-mount web stderr ---\n{}", tail(&self.stderr(), 40));
        }
    }
}

/// A plain HTTP client that follows no redirects.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

/// One HTTP/1.1 request written by hand, so the path reaches the server exactly as given
/// (URL libraries resolve `..` and re-encode). Returns the status and the body.
pub async fn raw_http(addr: &str, request_line: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let mut head = format!("{request_line} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write request");
    stream.write_all(body).await.expect("write body");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("response timed out")
        .expect("read response");
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body_at = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |p| p + 4);
    (status, response[body_at..].to_vec())
}

/// Why the browser tests cannot run here, or None when chromium and chromedriver are there.
pub fn chromium_missing() -> Option<String> {
    for bin in ["chromium", "chromedriver"] {
        let found = Command::new(bin).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !found.is_ok_and(|s| s.success()) {
            return Some(format!("{bin} is missing (scripts/setup.sh installs chromium and chromium-driver)"));
        }
    }
    None
}

/// Whether browser test `test` can run; records it as skipped (NATSTER_SKIP_LOG) if not, and
/// fails under CI=true, like the FUSE tests.
pub fn chromium_available_for(test: &str) -> bool {
    crate::common::mounted::runnable_or_skipped(test, "chromium", chromium_missing())
}

/// chromedriver (and through it a headless Chromium) in a process group of its own; Drop
/// ends the WebDriver session and kills the whole group, so no browser outlives the test.
pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    _profile: tempfile::TempDir,
    log: tempfile::NamedTempFile,
}

impl Browser {
    pub async fn start() -> Browser {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("chromedriver log");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        let profile = tempfile::Builder::new().prefix("natster-chromium-").tempdir().expect("profile");
        let mut browser_guard = DriverGuard(Some(driver));
        let url = format!("http://127.0.0.1:{port}");
        let until = Instant::now() + BROWSER_DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "chromedriver did not listen on {port}");
            tokio::time::sleep(POLL).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--autoplay-policy=no-user-gesture-required",
            "--window-size=1280,900",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert("goog:chromeOptions".into(), serde_json::json!({ "args": args, "binary": chromium_path() }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            BROWSER_DEADLINE,
            fantoccini::ClientBuilder::new(connector).capabilities(caps).connect(&url),
        )
        .await
        .expect("chromedriver session timed out")
        .unwrap_or_else(|e| panic!("cannot start chromium through chromedriver: {e}"));
        let driver = browser_guard.0.take().expect("driver");
        Browser { client, driver, _profile: profile, log }
    }

    /// Runs `script` (a function body returning a value) in the page.
    pub async fn js(&self, script: &str) -> serde_json::Value {
        tokio::time::timeout(BROWSER_DEADLINE, self.client.execute(script, vec![]))
            .await
            .unwrap_or_else(|_| panic!("script timed out: {script}"))
            .unwrap_or_else(|e| panic!("script failed: {e}: {script}"))
    }

    /// Polls `script` until it returns true; panics with `what` after `deadline`.
    pub async fn wait_js(&self, what: &str, deadline: Duration, script: &str) {
        let until = Instant::now() + deadline;
        loop {
            if self.js(script).await == serde_json::Value::Bool(true) {
                return;
            }
            assert!(Instant::now() < until, "timed out after {deadline:?} waiting for {what} ({script})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes a PNG screenshot of the page to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot folder");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Closes the browser cleanly (the guard still kills anything left).
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.client.clone().close()).await;
    }
}

fn chromium_path() -> String {
    ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
        .unwrap_or_else(|| "chromium".into())
}

/// Kills chromedriver's whole process group (Chromium included) and reaps it.
fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) on the process group our own child leads.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

/// Holds chromedriver until the session is up, so a failed start kills it too.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            kill_group(child);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            eprintln!("--- chromedriver log (last lines) ---\n{}", tail(&log, 20));
        }
    }
}

/// Where the test run leaves its screenshots: `target/web-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("web-screenshots")
}

/// A real H.264/AAC mp4 of `seconds` at about `kbps`, moov first (faststart), made by ffmpeg;
/// None when ffmpeg is missing.
pub fn make_video(dir: &Path, seconds: u32, kbps: u32) -> Option<PathBuf> {
    let out = dir.join("video.mp4");
    let rate = format!("{kbps}k");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=640x360:rate=25:duration={seconds}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={seconds}"))
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "25"])
        .args(["-b:v", &rate, "-minrate", &rate, "-maxrate", &rate, "-bufsize", &rate, "-x264-params", "nal-hrd=cbr"])
        .args(["-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart"])
        .arg(&out)
        .stdin(Stdio::null())
        .status()
        .ok()?;
    status.success().then_some(out)
}

/// A small PNG made by ffmpeg; None when ffmpeg is missing.
pub fn make_image(dir: &Path) -> Option<PathBuf> {
    let out = dir.join("still.png");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x180", "-frames:v", "1"])
        .arg(&out)
        .stdin(Stdio::null())
        .status()
        .ok()?;
    status.success().then_some(out)
}
