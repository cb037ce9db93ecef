//! What a newcomer trips on (issue 14), each driven through the CLI on a real nats-server
//! (plain, or operator mode run by `operator up`) and real mounts: bring-your-own creds, no
//! leftovers after an interrupted download, a `umount` that only unmounts natster-mount, quiet
//! exits on a closed pipe, and the smaller messages (ports, timeouts, re-rooting, a second
//! server, what an import's owner answered, `unimport`, refused creds, `--allow-all` in `ls`).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mounted::{fuse_available, Mounted};
use common::operator::*;
use common::*;
use natster_mount::accounts::{self, jwt, Operator};
use natster_mount::client::ClientError;
use natster_mount::context::{Context, Home};
use natster_mount::fs::mount::is_mounted;
use natster_mount::protocol::Operation;

/// An operator-mode server with accounts alice and bob; alice serves `media` (not shared).
struct World {
    _serve: Serve,
    up: OperatorUp,
    operator: tempfile::TempDir,
    alice: Person,
    bob: Person,
    tree: tempfile::TempDir,
    port: u16,
}

impl World {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

async fn world() -> World {
    let operator = operator_dir();
    let op = operator.path().to_path_buf();
    let port = free_port();
    operator_init(&op, port);
    let up = OperatorUp::start(&op);
    let alice = Person::with_account(&op, "alice").await;
    let bob = Person::with_account(&op, "bob").await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    write_file(tree.path(), "a.txt", b"hello\n");
    alice.run(&["catalog", "new", "media", tree.path().to_str().unwrap()]).await.assert_success("catalog new");
    let serve = Serve::start(&alice, "media");
    let own = alice.plain_client("media").await;
    wait_for("alice's catalog server", Duration::from_secs(20), || {
        let own = own.clone();
        async move { own.get().await.ok().map(|_| ()) }
    })
    .await;
    World { _serve: serve, up, operator, alice, bob, tree, port }
}

/// A plain nats-server and a home whose `media` catalog of `files` is served.
struct Plain {
    served: Option<Served>,
    home: TestHome,
    tree: tempfile::TempDir,
    nats: NatsServer,
}

async fn plain(files: &[(&str, Vec<u8>)], serve_args: &[&str]) -> Plain {
    let nats = NatsServer::start();
    let (home, tree) = home_with_catalog(&nats, files).await;
    let served = Served::start_with(&home, &nats, "media", serve_args).await;
    Plain { served: Some(served), home, tree, nats }
}

/// The kind of error a bare request to `subject` ends with (None: it was answered).
async fn raw_request_kind(nats: &async_nats::Client, subject: &str) -> Option<async_nats::RequestErrorKind> {
    match tokio::time::timeout(REQUEST_TIMEOUT, nats.request(subject.to_string(), "".into())).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.kind()),
        Err(_) => Some(async_nats::RequestErrorKind::TimedOut),
    }
}

fn assert_one_line(out: &RunOutput, what: &str) {
    assert_eq!(out.stderr_lines().len(), 1, "{what}: one line on stderr, got:\n{}", out.stderr);
}

fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let line = status.lines().find(|l| l.starts_with("Umask:")).expect("Umask line");
    u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).expect("octal umask")
}

fn partials(dir: &Path) -> Vec<String> {
    file_names(dir).into_iter().filter(|n| n.starts_with(".natster-download-")).collect()
}

/// Item 1 (its cheap part): `catalog new` refuses a name this context imports per catalog (the
/// original's unaliased subjects would clash), as `catalog import --per-catalog` refuses a name
/// it owns; an import through its owner's imports clashes with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_new_refuses_a_name_already_imported_per_catalog() {
    let w = world().await;
    w.bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "mine.txt", b"bob's own\n");
    let own = w.bob.run(&["catalog", "new", "media", dir.path().to_str().unwrap()]).await;
    own.assert_success("an own catalog beside one imported through its owner");
    let ls = w.bob.run(&["catalog", "ls"]).await;
    assert!(ls.stdout.contains(&format!("media@alice from {} (alice)", w.alice.key())), "{}", ls.stdout);
    std::fs::remove_file(w.bob.home.path().join("media.json")).unwrap();
    w.bob.run(&["catalog", "unimport", "media"]).await.assert_success("unimport");

    w.bob.run(&["catalog", "import", "media", "alice", "--per-catalog"]).await.assert_success("import per catalog");
    let new = w.bob.run(&["catalog", "new", "media", dir.path().to_str().unwrap()]).await;
    new.assert_failure("catalog new of a name imported per catalog");
    let expected = format!(
        "catalog media is already imported from {}; pick another name or `natster-mount catalog unimport media` first",
        w.alice.key()
    );
    assert!(new.stderr.contains(&expected), "{}", new.stderr);
    assert_one_line(&new, "catalog new");
    assert!(!w.bob.home.path().join("media.json").exists(), "the refused catalog was written");

    // The home's own files (server pins, `up`'s serve marks) are not catalog names.
    for reserved in ["known_servers", "at-login"] {
        let pins_before = std::fs::read(w.bob.home.path().join(format!("{reserved}.json"))).ok();
        let new = w.bob.run(&["catalog", "new", reserved, dir.path().to_str().unwrap()]).await;
        new.assert_failure("catalog new of a reserved name");
        assert!(new.stderr.contains("natster-mount's own files"), "{}", new.stderr);
        assert_one_line(&new, "catalog new of a reserved name");
        let after = std::fs::read(w.bob.home.path().join(format!("{reserved}.json"))).ok();
        assert_eq!(pins_before, after, "{reserved}.json was overwritten");
    }
}

/// Item 2: after `init --server URL --creds FILE` the account comes from the creds, so an
/// import added outside (as with nsc) is recorded with `--external` and reads; `init` again
/// keeps the creds; a server that is not a URL is refused in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bring_your_own_creds_imports_with_external() {
    let w = world().await;
    let bob_creds = w.bob.context().creds.expect("bob's creds");
    let bob_key = w.bob.key();
    let alice_key = w.alice.key();
    // Bob's creds in a fresh home that no local operator manages (the nsc / Synadia path).
    let no_operator = tempfile::tempdir().unwrap();
    let byo = Person::new(no_operator.path());
    let init = byo.run(&["init", "--server", &w.url(), "--creds", bob_creds.to_str().unwrap()]).await;
    init.assert_success("init --creds");
    assert_eq!(byo.key(), bob_key, "the account comes from the creds' user JWT");

    // Without --external: the nsc commands and what to do next.
    let refused = byo.run(&["catalog", "import", "media", &alice_key]).await;
    refused.assert_failure("import into an unmanaged account");
    assert!(refused.stdout.contains("nsc add import") && refused.stderr.contains("--external"), "{refused:?}");
    // The imports are added outside natster-mount (here: the operator's library, as nsc would).
    assert!(refused.stdout.contains(&format!("--remote-subject '{bob_key}.natster.catalog.>'")), "{refused:?}");
    let mut op = Operator::load(&Home::at(w.operator.path())).expect("operator");
    op.add_owner_import("bob", &alice_key).expect("add import");
    let sys = accounts::connect(&w.url(), &op.system_creds(), Duration::from_secs(5)).await.expect("system user");
    op.push_account(&sys, "bob").await.expect("push bob");
    w.alice.run(&["catalog", "share", "media", &bob_key]).await.assert_success("share");

    let import = byo.run(&["catalog", "import", "media", &alice_key, "--external"]).await;
    import.assert_success("import --external");
    assert!(import.stdout.contains("the owner's server answered: 1 files"), "{import:?}");
    let contents = byo.run(&["catalog", "contents", "media"]).await;
    contents.assert_success("contents");
    assert!(contents.stdout.contains("/a.txt"), "{}", contents.stdout);

    // `init` again to change the server keeps the creds (and the account and imports).
    let again = byo.run(&["init", "--server", &format!("{},{}", w.url(), w.url())]).await;
    again.assert_success("init again");
    assert!(again.stdout.contains("keeping creds"), "{}", again.stdout);
    let context = byo.context();
    assert_eq!(context.creds.as_deref(), Some(std::fs::canonicalize(&bob_creds).unwrap().as_path()));
    assert_eq!(context.imports.len(), 1);
    let who = byo.run(&["whoami"]).await;
    assert!(who.stdout.contains("status:   connected") && who.stdout.contains(&bob_key), "{}", who.stdout);

    let before = std::fs::read(byo.home.home().context_path("default")).unwrap();
    for bad in ["notaurl", "http://127.0.0.1:4222", "nats://127.0.0.1:notaport", "nats://:4222"] {
        let out = byo.run(&["init", "--server", bad]).await;
        out.assert_failure(bad);
        assert_one_line(&out, bad);
        assert!(out.stderr.contains("nats://HOST:PORT"), "{bad}: {}", out.stderr);
    }
    assert_eq!(std::fs::read(byo.home.home().context_path("default")).unwrap(), before, "a refused init wrote");
}

/// Item 3: SIGINT and SIGTERM in the middle of `catalog download` leave no `.partial`, with a
/// one-line message and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_download_leaves_nothing() {
    let size = 96 * 1024 * 1024;
    let fx = plain(&[("big.bin", pseudo_random_bytes(3, size))], &[]).await;
    let server_pid = fx.served.as_ref().expect("served").pid() as i32;
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("big.bin");
        let err = tempfile::NamedTempFile::new().unwrap();
        let mut child = fx
            .home
            .command(["catalog", "download", "media", "/big.bin", out.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(err.reopen().unwrap())
            .spawn()
            .expect("download");
        let until = Instant::now() + Duration::from_secs(30);
        while partials(out_dir.path()).is_empty() {
            assert!(child.try_wait().unwrap().is_none(), "download ended before its .partial was seen");
            assert!(Instant::now() < until, "no .partial appeared");
            std::thread::sleep(Duration::from_millis(2));
        }
        // Freeze the server so the download is certainly still running when the signal lands.
        // SAFETY: kill(2) on our own children.
        unsafe { libc::kill(server_pid, libc::SIGSTOP) };
        unsafe { libc::kill(child.id() as i32, signal) };
        let until = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                unsafe { libc::kill(server_pid, libc::SIGCONT) };
                panic!("download did not stop within 10 s of {name}");
            }
            std::thread::sleep(POLL);
        };
        unsafe { libc::kill(server_pid, libc::SIGCONT) };
        let stderr = std::fs::read_to_string(err.path()).unwrap();
        assert!(!status.success(), "{name}: exit {status}");
        assert_eq!(status.signal(), None, "{name}: killed by the signal instead of cleaning up");
        assert!(stderr.contains(&format!("interrupted by {name}")), "{name}: {stderr}");
        assert_eq!(stderr.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{name}: {stderr}");
        assert_eq!(file_names(out_dir.path()), Vec::<String>::new(), "{name} left files behind");
    }
}

/// Item 3: a downloaded file gets 0666 less the umask, and `-` writes standard output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_follows_the_umask_and_dash_is_stdout() {
    let bytes = pseudo_random_bytes(5, 700_000);
    let fx = plain(&[("clip.bin", bytes.clone())], &[]).await;
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("clip.bin");
    fx.home.run_async(["catalog", "download", "media", "clip.bin", out.to_str().unwrap()]).await.assert_success("dl");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask(), "mode {mode:o}");

    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = fx.home.command(["catalog", "download", "media", "clip.bin", "-"]);
    cmd.current_dir(cwd.path());
    let got = tokio::task::spawn_blocking(move || cmd.output().expect("download -")).await.unwrap();
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert!(got.stdout == bytes, "standard output is not the file ({} bytes)", got.stdout.len());
    assert!(String::from_utf8_lossy(&got.stderr).contains("→ standard output"));
    assert_eq!(file_names(cwd.path()), Vec::<String>::new(), "`-` wrote a file");
    assert!(fx.tree.path().join("clip.bin").exists());
}

/// A tmpfs mounted for a test; Drop unmounts it.
struct Tmpfs(tempfile::TempDir);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if is_mounted(self.0.path()) {
            let _ = Command::new("umount").arg(self.0.path()).status();
        }
    }
}

/// Item 4: `umount` refuses a mount that is not natster-mount and leaves it mounted; a stale
/// natster mount is still detached.
#[test]
fn umount_only_unmounts_natster_mounts() {
    if !running_as_root() {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    let home = TestHome::new();
    let tmpfs = Tmpfs(tempfile::tempdir().unwrap());
    let status = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(tmpfs.0.path()).status().unwrap();
    assert!(status.success(), "mount -t tmpfs failed");
    let out = home.run(["umount", tmpfs.0.path().to_str().unwrap()]);
    out.assert_failure("umount of a tmpfs");
    assert!(
        out.stderr.contains(&format!(
            "{} is not a natster-mount mount (it is tmpfs); use umount(8)",
            tmpfs.0.path().display()
        )),
        "{}",
        out.stderr
    );
    assert_one_line(&out, "umount tmpfs");
    assert!(is_mounted(tmpfs.0.path()), "umount unmounted a tmpfs");

    if !fuse_available() {
        return;
    }
    let nats = NatsServer::start();
    run_with_timeout(home.command(["init", "--server", &nats.url()]), COMMAND_TIMEOUT).assert_success("init");
    let m = Mounted::start(&home, &[]);
    // SAFETY: kill(2) on our own child: a mount process that dies leaves a stale mount.
    unsafe { libc::kill(m.pid() as i32, libc::SIGKILL) };
    wait_until_stale(m.path());
    let out = home.run(["umount", m.path().to_str().unwrap()]);
    out.assert_success("umount of a stale natster mount");
    assert!(!is_mounted(m.path()), "the stale mount is still there");
}

fn wait_until_stale(path: &Path) {
    let until = Instant::now() + Duration::from_secs(10);
    while !matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)) {
        assert!(Instant::now() < until, "{} did not become stale", path.display());
        std::thread::sleep(POLL);
    }
}

/// Item 5: a reader that goes away (`| head -1`) ends the command quietly with status 0: no
/// panic, no 101; `catalog download -` into a closed pipe too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_pipe_ends_quietly() {
    let files: Vec<(String, Vec<u8>)> = (0..50).map(|i| (format!("f{i:03}.txt"), vec![b'x'; i])).collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    let fx = plain(&files, &[]).await;
    for args in [&["catalog", "ls"][..], &["catalog", "contents", "media"], &["whoami"]] {
        let mut cmd = fx.home.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let done = tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().expect("spawn");
            // The reader is gone before the command writes its first line.
            drop(child.stdout.take());
            child.wait_with_output().expect("wait")
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(done.status.success(), "{args:?} exited with {} : {stderr}", done.status);
        assert!(stderr.trim().is_empty(), "{args:?} wrote to stderr: {stderr}");
    }
    let mut cmd = fx.home.command(["catalog", "download", "media", "f049.txt", "-"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let cwd = tempfile::tempdir().unwrap();
    cmd.current_dir(cwd.path()).env("TMPDIR", cwd.path());
    let done = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().expect("spawn");
        drop(child.stdout.take());
        child.wait_with_output().expect("wait")
    })
    .await
    .unwrap();
    assert!(done.status.success(), "download - exited with {}", done.status);
    assert!(!String::from_utf8_lossy(&done.stderr).contains("panicked"));
    assert_eq!(file_names(cwd.path()), Vec::<String>::new(), "download - left files behind");
    // As a shell pipeline.
    let line = format!("'{}' catalog contents media | head -1", bin());
    let sh = Command::new("sh")
        .args(["-c", &line])
        .env("NATSTER_HOME", fx.home.path())
        .env_remove("NATSTER_CONTEXT")
        .output()
        .unwrap();
    assert!(sh.status.success(), "{}", String::from_utf8_lossy(&sh.stderr));
    assert!(String::from_utf8_lossy(&sh.stdout).starts_with("PATH"));
    assert!(!String::from_utf8_lossy(&sh.stderr).contains("panicked"));
}

/// Item 6: the operator's port is chosen once: 0 is refused, another port later is refused
/// with the stored one named (by `init` and by `up`), and `up --port` has help text.
#[test]
fn operator_port_is_chosen_once() {
    let op = tempfile::tempdir().unwrap();
    let zero = run_operator(op.path(), &["operator", "init", "--port", "0"]);
    zero.assert_failure("operator init --port 0");
    assert!(zero.stderr.contains("0 is not in 1..=65535"), "{}", zero.stderr);
    assert!(!op.path().join("operator").exists(), "a refused init created the operator");

    let port = free_port();
    run_operator(op.path(), &["operator", "init", "--port", &port.to_string()]).assert_success("init");
    let settings = op.path().join("operator/local-server.json");
    let before = std::fs::read(&settings).unwrap();
    let other = if port == 65535 { port - 1 } else { port + 1 }.to_string();
    let again = run_operator(op.path(), &["operator", "init", "--port", &other]);
    again.assert_failure("operator init with another port");
    assert!(again.stderr.contains(&format!("already initialised on port {port}")), "{}", again.stderr);
    assert_one_line(&again, "init again");
    let same = run_operator(op.path(), &["operator", "init", "--port", &port.to_string()]);
    same.assert_success("operator init with the same port");
    assert!(same.stdout.contains(&format!("nats://127.0.0.1:{port}")));
    let up = run_operator(op.path(), &["operator", "up", "--port", &other]);
    up.assert_failure("operator up with another port");
    assert!(up.stderr.contains(&format!("already initialised on port {port}")), "{}", up.stderr);
    assert_eq!(std::fs::read(&settings).unwrap(), before, "the stored port changed");

    let help = run_operator(op.path(), &["operator", "up", "--help"]);
    let port_line = help.stdout.lines().find(|l| l.contains("--port")).expect("--port in help").to_string();
    assert!(port_line.trim().len() > "--port <PORT>".len() + 5, "no help text: {port_line}");
}

/// Item 6: `operator up` with its port taken says so in one line, not the nats-server log.
#[test]
fn operator_up_with_its_port_taken_says_so() {
    let op = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    run_operator(op.path(), &["operator", "init", "--port", &port.to_string()]).assert_success("init");
    let up = run_operator(op.path(), &["operator", "up"]);
    up.assert_failure("operator up on a taken port");
    assert!(up.stderr.contains(&format!("port {port} is already in use")), "{}", up.stderr);
    assert_one_line(&up, "operator up");
    drop(holder);
}

/// Item 6: zero timeouts are refused with a range that excludes 0.
#[test]
fn zero_timeouts_are_refused_with_the_range() {
    let home = TestHome::new();
    let mnt = tempfile::tempdir().unwrap();
    let mnt = mnt.path().to_str().unwrap();
    for (args, max) in [
        (vec!["--timeout", "0", "whoami"], 3600),
        (vec!["mount", mnt, "--read-timeout", "0"], 86400),
        (vec!["mount", mnt, "--listing-ttl", "0"], 86400),
        (vec!["mount", mnt, "--listing-ttl", "86401"], 86400),
    ] {
        let out = home.run(&args);
        out.assert_failure(&args.join(" "));
        let expected = format!("must be greater than 0 and at most {max} seconds");
        assert!(out.stderr.contains(&expected), "{args:?}: {}", out.stderr);
    }
}

/// Item 6: `catalog new NAME OTHERDIR` for an existing NAME asks for --force before re-rooting.
#[test]
fn catalog_new_asks_before_re_rooting() {
    let home = TestHome::new();
    let old = tempfile::tempdir().unwrap();
    let new = tempfile::tempdir().unwrap();
    for i in 0..5 {
        write_file(old.path(), &format!("f{i}.txt"), b"old");
    }
    write_file(new.path(), "other.txt", b"new");
    home.run(["catalog", "new", "media", old.path().to_str().unwrap()]).assert_success("catalog new");
    let file = home.path().join("media.json");
    let before = std::fs::read(&file).unwrap();
    let refused = home.run(["catalog", "new", "media", new.path().to_str().unwrap()]);
    refused.assert_failure("re-root without --force");
    let expected = format!(
        "catalog media indexes {}; pass --force to re-root it at {} (its 5 files would be dropped)",
        std::fs::canonicalize(old.path()).unwrap().display(),
        std::fs::canonicalize(new.path()).unwrap().display()
    );
    assert!(refused.stderr.contains(&expected), "{}", refused.stderr);
    assert_one_line(&refused, "catalog new");
    assert_eq!(std::fs::read(&file).unwrap(), before, "the refused re-root changed the catalog");
    // Same folder again: a plain re-index.
    home.run(["catalog", "new", "media", old.path().to_str().unwrap()]).assert_success("re-index");
    let forced = home.run(["catalog", "new", "media", new.path().to_str().unwrap(), "--force"]);
    forced.assert_success("re-root with --force");
    assert!(forced.stdout.contains("1 files"), "{}", forced.stdout);
}

/// Item 6: a second `catalog serve` of the same catalog is refused, saying where the first one
/// runs (from this home: its pid; from elsewhere: that another server answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_serve_is_refused() {
    let fx = plain(&[("a.txt", b"a".to_vec())], &[]).await;
    let first = fx.served.as_ref().unwrap().pid();
    let second = fx.home.run_async(["catalog", "serve", "media"]).await;
    second.assert_failure("second serve from the same home");
    assert!(second.stderr.contains(&format!("already served by pid {first}")), "{}", second.stderr);
    assert!(second.stderr.contains("--force"), "{}", second.stderr);
    assert_one_line(&second, "second serve");

    // The same catalog name served from another home on the same server and account.
    let other = TestHome::new();
    other.init(&fx.nats.url()).await;
    other.run_async(["catalog", "new", "media", fx.tree.path().to_str().unwrap()]).await.assert_success("new");
    let elsewhere = other.run_async(["catalog", "serve", "media"]).await;
    elsewhere.assert_failure("second serve from another home");
    assert!(elsewhere.stderr.contains("another server already answers for catalog 'media'"), "{}", elsewhere.stderr);
    assert_one_line(&elsewhere, "serve elsewhere");

    // --force serves anyway; once the first is gone, a plain serve starts again.
    let forced = Served::start_with(&other, &fx.nats, "media", &["--force"]).await;
    drop(forced);
    let mut fx = fx;
    drop(fx.served.take());
    let again = Served::start(&fx.home, &fx.nats, "media").await;
    drop(again);
}

/// Item 6: `catalog import` keeps the import but says what the owner's server answered, and
/// `catalog unimport` undoes an import (account JWT, server and context).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_reports_the_owner_answer_and_unimport_undoes_it() {
    let w = world().await;
    let bob_key = w.bob.key();
    let not_shared = w.bob.run(&["catalog", "import", "media", "alice"]).await;
    not_shared.assert_success("import before a share");
    assert!(not_shared.stderr.contains("answered 403: not shared with you yet"), "{not_shared:?}");
    assert!(not_shared.stderr.contains(&format!("catalog share media {bob_key}")), "{not_shared:?}");
    let missing = w.bob.run(&["catalog", "import", "nosuch", "alice"]).await;
    missing.assert_success("import of a catalog nobody serves");
    assert!(missing.stderr.contains("no server answers for catalog 'nosuch'"), "{missing:?}");
    assert!(missing.stderr.contains("offline or has no catalog of that name"), "{missing:?}");
    // Besides the hub, which every account of the operator imports.
    let not_hub = |c: Context| c.imports.into_iter().filter(|i| i.catalog != "hub").collect::<Vec<_>>();
    assert_eq!(not_hub(w.bob.context()).len(), 2, "both imports are kept");

    w.alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    let bob = w.bob.client("media").await;
    assert!(bob.get().await.is_ok(), "bob reads after the share");
    let owner_route = w.bob.context().imports.iter().find(|i| i.catalog == "media").unwrap().route();

    let undo = w.bob.run(&["catalog", "unimport", "media"]).await;
    undo.assert_success("unimport");
    assert!(undo.stdout.contains("catalog 'media' of"), "{}", undo.stdout);
    let imports = not_hub(w.bob.context());
    assert_eq!(imports.len(), 1);
    assert_eq!(imports[0].catalog, "nosuch");
    // The owner's imports stay while another of its catalogs is imported.
    let op = Operator::load(&Home::at(w.operator.path())).unwrap();
    assert!(op.owner_imports("bob").unwrap().contains(&w.alice.key()));
    let after = w.bob.client("media").await.get().await;
    assert!(matches!(after, Err(ClientError::NoResponders(_))), "no longer read: {after:?}");
    let twice = w.bob.run(&["catalog", "unimport", "media"]).await;
    twice.assert_failure("unimport twice");
    assert_one_line(&twice, "unimport twice");

    // The owner's last catalog takes its imports along; the server applied the new JWT.
    let last = w.bob.run(&["catalog", "unimport", "nosuch"]).await;
    last.assert_success("unimport the last");
    assert!(last.stdout.contains("no longer imports from"), "{}", last.stdout);
    let op = Operator::load(&Home::at(w.operator.path())).unwrap();
    assert!(op.owner_imports("bob").unwrap().is_empty());
    let bob_nats = w.bob.nats().await;
    let gone = raw_request_kind(&bob_nats, &owner_route.request_subject("media", Operation::Get)).await;
    assert_eq!(gone, Some(async_nats::RequestErrorKind::NoResponders), "the owner's import is gone");
    // With the import gone, the name is free for bob's own catalog.
    w.bob.run(&["catalog", "new", "media", w.tree.path().to_str().unwrap()]).await.assert_success("own media");
    drop(w.up);
}

/// Item 6: `whoami` with creds the server refuses says so in one line, with no ERROR log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_with_refused_creds_says_so() {
    let w = world().await;
    // A user of an account this operator never signed.
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let mut claims = jwt::Claims::new("stranger", &user.public_key(), jwt::UserNats::unlimited());
    let token = jwt::encode(&mut claims, &account).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("stranger.creds");
    std::fs::write(&creds, accounts::format_creds(&token, &user.seed().unwrap())).unwrap();
    let stranger = Person::new(dir.path());
    stranger.run(&["init", "--server", &w.url(), "--creds", creds.to_str().unwrap()]).await.assert_success("init");
    let who = stranger.run(&["whoami"]).await;
    assert!(
        who.stdout.contains("status:   the server at")
            && who.stdout.contains("refused these credentials (authorization violation); check --creds"),
        "{}",
        who.stdout
    );
    assert!(who.stderr.trim().is_empty(), "extra lines on stderr: {}", who.stderr);
}

/// Item 6: `catalog ls` says who reads a catalog served with `--allow-all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_shows_allow_all() {
    let mut fx = plain(&[("a.txt", b"a".to_vec())], &["--allow-all"]).await;
    let pid = fx.served.as_ref().unwrap().pid();
    let ls = fx.home.run_async(["catalog", "ls"]).await;
    ls.assert_success("catalog ls");
    assert!(ls.stdout.contains(&format!("media: every importer (--allow-all, served by pid {pid}")), "{}", ls.stdout);
    // Once that server is gone, the share list speaks again.
    drop(fx.served.take());
    let ls = fx.home.run_async(["catalog", "ls"]).await;
    assert!(ls.stdout.contains("media: only you"), "{}", ls.stdout);
}
