//! Shared integration-test harness: a real `nats-server` on a random loopback port, a
//! `NATSTER_HOME` in a temporary folder, the `natster-mount` binary run as a child process
//! (one-shot commands and `catalog serve`), and library clients connected to the same server.
//!
//! Every wait is bounded and polls a condition; every child process is killed and reaped when
//! its guard drops, and its log is printed if the test is failing.

#![allow(dead_code)]

pub mod mounted;
pub mod operator;

use std::ffi::OsStr;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use natster_mount::client::{CatalogClient, ClientOptions};
use natster_mount::context::Home;
use sha2::{Digest, Sha256};

/// Interval between two checks of a condition.
pub const POLL: Duration = Duration::from_millis(20);
/// Bound on a nats-server becoming reachable.
pub const NATS_START_DEADLINE: Duration = Duration::from_secs(10);
/// Bound on a `catalog serve` child answering `get`.
pub const SERVE_READY_DEADLINE: Duration = Duration::from_secs(20);
/// Bound on any one-shot CLI command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a raw request/reply in tests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_natster-mount")
}

/// The nats-server binary, found as the product finds it.
pub fn nats_server_bin() -> PathBuf {
    natster_mount::accounts::nats_server_binary()
}

/// The tests' nats-server's version, as `--version` says it.
pub fn nats_server_version() -> natster_mount::accounts::ServerVersion {
    let out = Command::new(nats_server_bin()).arg("--version").output().expect("nats-server --version");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    natster_mount::accounts::ServerVersion::parse(&text).unwrap_or_else(|| panic!("no version in {text:?}"))
}

/// Whether the tests' nats-server can carry the global service (2.10 or newer); scripts/test.sh
/// also runs the sharing tests on Debian's 2.9.10, where `operator up` runs without it.
pub fn nats_server_has_global() -> bool {
    nats_server_version() >= natster_mount::accounts::ServerVersion(2, 10, 0)
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    // Below the ephemeral range, as the product picks: no client connection of a parallel
    // test can take it while a server is down between restarts.
    natster_mount::accounts::stable_free_port().expect("cannot find a free loopback port")
}

fn read_log(file: &tempfile::NamedTempFile) -> String {
    let mut text = String::new();
    if let Ok(mut f) = file.reopen() {
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.read_to_string(&mut text);
    }
    text
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// A `nats-server` on 127.0.0.1 and a random free port; killed when dropped.
pub struct NatsServer {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl NatsServer {
    /// Starts the server and waits (at most 10 s) until it accepts TCP connections. Retries
    /// with another port if the chosen one was taken in the meantime.
    pub fn start() -> NatsServer {
        Self::start_on(None)
    }

    /// Stops the server (its clients see the connection drop).
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Stops the server and starts a new one on the same port, as a restart would.
    pub fn restart(&mut self) {
        self.stop();
        let fresh = Self::start_on(Some(self.port));
        let old = std::mem::replace(self, fresh);
        drop(old);
    }

    fn start_on(fixed_port: Option<u16>) -> NatsServer {
        let mut failures = Vec::new();
        for _attempt in 0..5 {
            let port = fixed_port.unwrap_or_else(free_port);
            let log = tempfile::NamedTempFile::new().expect("cannot create a temporary log file");
            let stderr = log.reopen().expect("cannot open the temporary log file");
            let mut child = Command::new(nats_server_bin())
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {}: {e}; install the nats-server package", nats_server_bin().display())
                });
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + NATS_START_DEADLINE;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    failures.push(format!("port {port}: exited with {status}: {}", tail(&read_log(&log), 5)));
                    break;
                }
                // Ready means *this* child says so: a port answering could be another test's
                // server that took the same port a moment earlier (ours then fails to bind).
                if read_log(&log).contains("Server is ready")
                    && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                {
                    return NatsServer { child, port, log };
                }
                if Instant::now() >= deadline {
                    kill_and_reap(&mut child);
                    failures.push(format!("port {port}: not reachable within {NATS_START_DEADLINE:?}"));
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
        panic!("nats-server did not start: {}", failures.join("; "));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- nats-server log (last lines) ---\n{}", tail(&self.log(), 30));
        }
    }
}

/// What a finished CLI command did.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// Panics with the command's output unless it exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless the command failed (non-zero exit).
    pub fn assert_failure(&self, what: &str) -> &Self {
        assert!(
            !self.status.success(),
            "{what} should have failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| !l.trim().is_empty()).collect()
    }
}

/// A temporary `NATSTER_HOME`, and the binary run against it.
pub struct TestHome {
    dir: tempfile::TempDir,
}

impl Default for TestHome {
    fn default() -> Self {
        Self::new()
    }
}

impl TestHome {
    pub fn new() -> TestHome {
        TestHome {
            dir: tempfile::Builder::new().prefix("natster-home-").tempdir().expect("cannot create NATSTER_HOME"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The same folder as the library sees it.
    pub fn home(&self) -> Home {
        Home::at(self.dir.path())
    }

    /// The binary with `NATSTER_HOME` set and no inherited context or log settings.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("NATSTER_HOME", self.dir.path())
            .env_remove("NATSTER_CONTEXT")
            .env_remove("NATSTER_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the binary to completion (killed after 60 s, which fails the test).
    pub fn run<I, S>(&self, args: I) -> RunOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_with_timeout(self.command(args), COMMAND_TIMEOUT)
    }

    /// [`TestHome::run`] off the async runtime's threads.
    pub async fn run_async<I, S>(&self, args: I) -> RunOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = self.command(args);
        tokio::task::spawn_blocking(move || run_with_timeout(cmd, COMMAND_TIMEOUT))
            .await
            .expect("command thread panicked")
    }

    /// Writes the default context: this home talks to `url` without credentials.
    pub async fn init(&self, url: &str) {
        self.run_async(["init", "--server", url]).await.assert_success("natster-mount init");
    }
}

/// A fresh home initialised against `nats`, with catalog `media` indexing `files` (not
/// served); the tree stays on disk until the returned folder drops.
pub async fn home_with_catalog<B: AsRef<[u8]>>(
    nats: &NatsServer,
    files: &[(&str, B)],
) -> (TestHome, tempfile::TempDir) {
    let home = TestHome::new();
    home.init(&nats.url()).await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    for (rel, bytes) in files {
        write_file(tree.path(), rel, bytes.as_ref());
    }
    let root = tree.path().to_str().expect("utf-8").to_string();
    home.run_async(["catalog", "new", "media", root.as_str()]).await.assert_success("catalog new");
    (home, tree)
}

/// Runs `cmd` with stdout and stderr captured in temporary files (no pipe can fill up),
/// polling for its exit; kills it and panics after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> RunOutput {
    let out = tempfile::NamedTempFile::new().expect("temporary stdout");
    let err = tempfile::NamedTempFile::new().expect("temporary stderr");
    cmd.stdout(out.reopen().expect("stdout file")).stderr(err.reopen().expect("stderr file"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot wait for child") {
            break status;
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                tail(&read_log(&out), 20),
                tail(&read_log(&err), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    RunOutput { status, stdout: read_log(&out), stderr: read_log(&err) }
}

/// Connects a plain NATS client to `url` (bounded).
pub async fn connect(url: &str) -> async_nats::Client {
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .subscription_capacity(64 * 1024);
    tokio::time::timeout(REQUEST_TIMEOUT * 2, options.connect(url))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// Client settings for tests: short bounds so that a failure shows quickly.
pub fn test_options() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        chunk_timeout: Duration::from_secs(1),
        retries: 3,
        ..ClientOptions::default()
    }
}

/// The data of a decrypted v2 chunk (its proof stripped, not checked).
pub fn proven_data(plain: &[u8]) -> &[u8] {
    let (_, at) = natster_mount::chunk_tree::unframe(plain).expect("a proven chunk");
    &plain[at..]
}

/// A library client for `catalog` over `nats`, with [`test_options`].
pub fn catalog_client(nats: &async_nats::Client, catalog: &str) -> CatalogClient {
    CatalogClient::new(nats.clone(), catalog, test_options()).expect("valid catalog name")
}

/// `natster-mount catalog serve NAME` as a child process; killed when dropped.
pub struct Served {
    child: Child,
    log: tempfile::NamedTempFile,
    catalog: String,
}

impl Served {
    /// Serves `catalog` of `home` with default options, and waits until it answers `get`.
    pub async fn start(home: &TestHome, nats: &NatsServer, catalog: &str) -> Served {
        Self::start_with(home, nats, catalog, &[]).await
    }

    /// Like [`Served::start`], with extra `catalog serve` arguments.
    pub async fn start_with(home: &TestHome, nats: &NatsServer, catalog: &str, extra: &[&str]) -> Served {
        let log = tempfile::NamedTempFile::new().expect("temporary serve log");
        let child = home
            .command(["catalog", "serve", catalog].iter().chain(extra))
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("serve log"))
            .spawn()
            .expect("cannot spawn natster-mount catalog serve");
        let mut served = Served { child, log, catalog: catalog.to_string() };
        served.wait_ready(&nats.url()).await;
        served
    }

    /// Polls `get` through the library client until it succeeds (at most 20 s).
    async fn wait_ready(&mut self, url: &str) {
        let nats = connect(url).await;
        let client = CatalogClient::new(
            nats,
            &self.catalog,
            ClientOptions { request_timeout: Duration::from_secs(1), ..test_options() },
        )
        .expect("valid catalog name");
        let deadline = Instant::now() + SERVE_READY_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("catalog serve {} exited with {status}:\n{}", self.catalog, tail(&self.log(), 20));
            }
            let last = match client.get().await {
                Ok(_) => return,
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                panic!(
                    "catalog serve {} not ready within {SERVE_READY_DEADLINE:?} (last: {last}):\n{}",
                    self.catalog,
                    tail(&self.log(), 20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Panics if the serve process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("catalog serve {} exited with {status}:\n{}", self.catalog, tail(&self.log(), 20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- catalog serve {} log (last lines) ---\n{}", self.catalog, tail(&self.log(), 30));
        }
    }
}

/// Polls `check` every 20 ms until it yields a value; panics after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Bound on a whole library operation (a download, a read of many chunks) in tests: the
/// client has its own timeouts, this catches a hang in the client itself.
pub const OPERATION_DEADLINE: Duration = Duration::from_secs(60);

/// Awaits `fut`, failing the test if it takes longer than [`OPERATION_DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(OPERATION_DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {OPERATION_DEADLINE:?}"))
}

/// Sends `payload` to `subject` and parses the reply as JSON (bounded).
pub async fn raw_request(
    nats: &async_nats::Client,
    subject: &str,
    payload: impl Into<bytes::Bytes>,
) -> serde_json::Value {
    let msg = tokio::time::timeout(REQUEST_TIMEOUT, nats.request(subject.to_string(), payload.into()))
        .await
        .unwrap_or_else(|_| panic!("request to {subject} timed out"))
        .unwrap_or_else(|e| panic!("request to {subject} failed: {e}"));
    serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
        panic!("reply from {subject} is not JSON ({e}): {:?}", String::from_utf8_lossy(&msg.payload))
    })
}

/// The `code` of a reply envelope.
pub fn code(reply: &serde_json::Value) -> u64 {
    reply["code"].as_u64().unwrap_or_else(|| panic!("reply has no code: {reply}"))
}

/// True if the tests run as root (mounting tmpfs, mount(8), the FUSE device's sysfs knobs).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// Deterministic, fast pseudo-random bytes (splitmix64), different for every `seed`.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `bytes` at `root/rel`, creating parent folders.
pub fn write_file(root: &Path, rel: &str, bytes: &[u8]) -> PathBuf {
    let path = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("cannot create folders");
    }
    std::fs::write(&path, bytes).expect("cannot write test file");
    path
}

/// Names of the files in `dir` (not recursive).
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("cannot list folder")
        .map(|e| e.expect("cannot read folder entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every message on `subject`, recorded by a plain subscription (which sees each request
/// beside the catalog server's queue group); stops recording when dropped.
pub struct Requests {
    seen: std::sync::Arc<std::sync::Mutex<Vec<bytes::Bytes>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Requests {
    pub async fn record(url: &str, subject: &str) -> Requests {
        use futures::StreamExt;
        let client = connect(url).await;
        let mut sub = client.subscribe(subject.to_string()).await.expect("subscribe");
        client.flush().await.expect("flush");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                s.lock().unwrap().push(msg.payload);
            }
        });
        Requests { seen, task }
    }

    pub fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The recorded messages parsed as v2 `read` requests.
    pub fn reads(&self) -> Vec<natster_mount::protocol::ReadRequest> {
        let seen = self.seen.lock().unwrap();
        seen.iter().map(|p| serde_json::from_slice(p).expect("a read request")).collect()
    }

    /// The count once it has stopped moving: requests already sent reach the recorder in
    /// milliseconds, so a count unchanged for 500 ms is final. Bounded at 20 s.
    pub async fn settled(&self) -> usize {
        let until = Instant::now() + Duration::from_secs(20);
        let (mut last, mut since) = (self.len(), Instant::now());
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.len();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= Duration::from_millis(500) {
                return now;
            }
            assert!(Instant::now() < until, "requests still arriving after 20 s ({now})");
        }
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// SIGSTOPs process `pid` (a catalog server: it stops answering without closing anything);
/// Drop sends SIGCONT, so a failing test never leaves it frozen.
pub struct Frozen(pub u32);

impl Frozen {
    pub fn new(pid: u32) -> Frozen {
        // SAFETY: kill(2) on a child of this test.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0, "SIGSTOP {pid}");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child of this test.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Receives `total` v1 chunks from `sub` as an original Natster client does (each chunk's
/// headers by their literal wire names, opened with the sender key they name, which must be
/// the reply's `sender_xkey`), waiting at most `chunk_wait` for each; returns the file.
pub async fn receive_v1(
    sub: &mut async_nats::Subscriber,
    target: &nkeys::XKey,
    sender_xkey: &str,
    total: u64,
    chunk_wait: Duration,
) -> Vec<u8> {
    use futures::StreamExt;
    let mut chunks: std::collections::BTreeMap<u64, Vec<u8>> = std::collections::BTreeMap::new();
    while (chunks.len() as u64) < total {
        let msg = tokio::time::timeout(chunk_wait, sub.next())
            .await
            .unwrap_or_else(|_| panic!("v1 chunk missing after {} of {total}", chunks.len()))
            .expect("subscription ended");
        let headers = msg.headers.as_ref().expect("v1 chunk without headers");
        let header = |name: &str| {
            headers.get(name).map(|v| v.as_str().to_string()).unwrap_or_else(|| panic!("chunk without {name}"))
        };
        let index: u64 = header("x-natster-chunk-idx").parse().expect("numeric chunk index");
        assert_eq!(header("x-natster-total-chunks"), total.to_string());
        let sender_hdr = header("x-natster-sender-xkey");
        assert_eq!(sender_hdr, sender_xkey, "sender xkey header differs from the reply's");
        let sender = nkeys::XKey::from_public_key(&sender_hdr).expect("sender header is an xkey");
        let plain = target.open(&msg.payload, &sender).unwrap_or_else(|e| panic!("chunk {index} does not open: {e}"));
        assert!(chunks.insert(index, plain).is_none(), "chunk {index} arrived twice");
    }
    assert_eq!(chunks.keys().copied().collect::<Vec<_>>(), (0..total).collect::<Vec<_>>());
    chunks.into_values().flatten().collect()
}
