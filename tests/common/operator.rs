//! The operator world: an operator home initialised with `operator init`, `operator up`
//! running it, and people with homes of their own whose accounts that operator signs.
//!
//! Guards: [`OperatorUp`] stops `operator up` with SIGTERM and reaps it (SIGKILL, to it and
//! its nats-server, after 10 s); [`Serve`] kills and reaps `catalog serve`. Both print their
//! output if the test is failing. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natster_mount::client::CatalogClient;
use natster_mount::context::Context;

use super::*;

/// Bound on `operator up` saying it is ready, and on it stopping after SIGTERM.
pub const UP_DEADLINE: Duration = Duration::from_secs(20);
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// A fresh, empty operator home.
pub fn operator_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("natster-operator-").tempdir().expect("operator dir")
}

/// The binary run as the operator (its home is also the operator home).
pub fn operator_command(operator_home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("NATSTER_HOME", operator_home)
        .env("NATSTER_OPERATOR_HOME", operator_home)
        .env_remove("NATSTER_CONTEXT")
        .env_remove("NATSTER_LOG")
        .stdin(Stdio::null());
    cmd
}

/// [`operator_command`] run to completion (bounded).
pub fn run_operator(operator_home: &Path, args: &[&str]) -> RunOutput {
    run_with_timeout(operator_command(operator_home, args), COMMAND_TIMEOUT)
}

/// `operator init --port PORT`, which must succeed.
pub fn operator_init(operator_home: &Path, port: u16) {
    run_operator(operator_home, &["operator", "init", "--port", &port.to_string()]).assert_success("operator init");
}

/// Child processes of `pid` (from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let listed = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut kids: Vec<u32> = listed.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    if kids.is_empty() {
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest.to_string()) else { continue };
            let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                if let Ok(child) = entry.file_name().to_string_lossy().parse() {
                    kids.push(child);
                }
            }
        }
    }
    kids
}

/// `natster-mount operator up`, running until dropped.
pub struct OperatorUp {
    pub child: Child,
    out: tempfile::NamedTempFile,
    pub operator_home: PathBuf,
}

impl OperatorUp {
    /// Starts `operator up` and waits (at most 20 s) until it says "Ctrl-C to stop".
    pub fn start(operator_home: &Path) -> OperatorUp {
        Self::start_with(operator_home, &[])
    }

    /// Like [`OperatorUp::start`], with extra `operator up` arguments (e.g. `--trace`).
    pub fn start_with(operator_home: &Path, extra: &[&str]) -> OperatorUp {
        let out = tempfile::NamedTempFile::new().expect("log");
        let mut args: Vec<&str> = ["operator", "up"].iter().chain(extra).copied().collect();
        if !nats_server_has_global() && !args.contains(&"--no-global") {
            args.push("--no-global");
        }
        // Both streams append to one file: two plain handles would overwrite each other's lines.
        let append = || std::fs::OpenOptions::new().append(true).open(out.path()).expect("log");
        let child = operator_command(operator_home, &args)
            .stdout(append())
            .stderr(append())
            .spawn()
            .expect("spawn operator up");
        let mut up = OperatorUp { child, out, operator_home: operator_home.to_path_buf() };
        let until = Instant::now() + UP_DEADLINE;
        while !up.output().contains("Ctrl-C to stop") {
            if let Ok(Some(status)) = up.child.try_wait() {
                panic!("operator up exited with {status}:\n{}", up.output());
            }
            assert!(Instant::now() < until, "operator up not ready:\n{}", up.output());
            std::thread::sleep(POLL);
        }
        up
    }

    /// Everything `operator up` printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.out.path()).unwrap_or_default()
    }

    /// nats-server's own log (with --trace: every protocol line).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.operator_home.join("operator/server/nats-server.log")).unwrap_or_default()
    }

    /// The one nats-server `operator up` runs.
    pub fn nats_server_pid(&self) -> u32 {
        let kids = children_of(self.child.id());
        assert_eq!(kids.len(), 1, "operator up should run exactly one nats-server: {kids:?}");
        kids[0]
    }
}

impl Drop for OperatorUp {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + STOP_DEADLINE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(POLL);
            }
            if let Ok(None) = self.child.try_wait() {
                // Its nats-server first: killing operator up alone would orphan it.
                for pid in children_of(self.child.id()) {
                    // SAFETY: kill(2) on a process the test started (through operator up).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- operator up output ---\n{}", tail(&self.output(), 30));
        }
    }
}

/// One person: a NATSTER_HOME of their own, and the operator home they use (for a
/// bring-your-own-creds person, an empty one: no local operator manages their account).
pub struct Person {
    pub home: TestHome,
    pub operator_home: PathBuf,
}

impl Person {
    pub fn new(operator_home: &Path) -> Person {
        Person { home: TestHome::new(), operator_home: operator_home.to_path_buf() }
    }

    /// A new person with account `name` added by the operator in `operator_home`.
    pub async fn with_account(operator_home: &Path, name: &str) -> Person {
        let person = Person::new(operator_home);
        person.run(&["operator", "add-account", name]).await.assert_success(&format!("add-account {name}"));
        person
    }

    /// The binary as this person, with their operator home.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.home.command(args);
        cmd.env("NATSTER_OPERATOR_HOME", &self.operator_home);
        cmd
    }

    /// [`Person::command`] run to completion off the runtime's threads (bounded).
    pub async fn run(&self, args: &[&str]) -> RunOutput {
        let cmd = self.command(args);
        tokio::task::spawn_blocking(move || run_with_timeout(cmd, COMMAND_TIMEOUT)).await.expect("command thread")
    }

    pub fn context(&self) -> Context {
        Context::load(&self.home.home(), "default").expect("context")
    }

    pub fn key(&self) -> String {
        self.context().account_public_key.expect("account key")
    }

    pub async fn nats(&self) -> async_nats::Client {
        self.context().connect(Duration::from_secs(5)).await.expect("connect with creds")
    }

    /// A library client as this person's CLI makes it: signing as their user, trusting the
    /// catalog's owner.
    pub async fn client(&self, catalog: &str) -> CatalogClient {
        CatalogClient::for_context(self.nats().await, &self.home.home(), &self.context(), catalog, test_options())
            .expect("client")
    }

    /// A plain library client over this person's connection (no signing, no trust).
    pub async fn plain_client(&self, catalog: &str) -> CatalogClient {
        CatalogClient::new(self.nats().await, catalog, test_options()).expect("client")
    }
}

/// `catalog serve CATALOG` (or any long-running command) as a person, not waited for; Drop
/// kills and reaps it.
pub struct Serve(Child, tempfile::NamedTempFile);

impl Serve {
    pub fn start(person: &Person, catalog: &str) -> Serve {
        Self::start_with(person, catalog, &[])
    }

    /// Like [`Serve::start`], with extra `catalog serve` arguments.
    pub fn start_with(person: &Person, catalog: &str, extra: &[&str]) -> Serve {
        let args: Vec<&str> = ["catalog", "serve", catalog].iter().chain(extra).copied().collect();
        Self::command(person, &args)
    }

    /// `natster-mount ARGS` as `person`, in the background (`up --no-mount`, say).
    pub fn command(person: &Person, args: &[&str]) -> Serve {
        let log = tempfile::NamedTempFile::new().expect("serve log");
        let child = person
            .command(args)
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("spawn natster-mount");
        Serve(child, log)
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.1.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then waits (bounded) for a clean exit; SIGKILL after 10 s.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + STOP_DEADLINE;
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!("--- its log ---\n{}", tail(&self.log(), 30));
        }
    }
}
