//! The Natster network on a real operator-mode nats-server with JetStream (`operator up`):
//! the inbox (a share shows within 2 s, with no poll), heartbeats re-broadcast only to the
//! accounts a catalog is shared with, presence (offline after a clean stop and after kill -9),
//! a mount that follows the owner's re-index within 2 s, projections that survive restarts and
//! are rebuilt from the log by a second instance with empty KV, forged events and one-time
//! codes, the original's envelopes (tests/vectors/global.json), and everything still working
//! with no global service at all (what happened meanwhile reaching it once it runs).
//!
//! Each test builds its own network; presence runs on a 3 s TTL and 1 s heartbeats so the
//! deadlines stay short. Deadlines promised by the product (2 s, 5 s) are tested with slack.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::mounted::{bounded, fuse_available_for, Mounted, MOUNT_IO_DEADLINE};
use common::operator::*;
use common::*;
use futures::StreamExt;
use natster_mount::global::client::GlobalClient;
use natster_mount::global::wire::{Heartbeat, Share};
use serde_json::Value;

/// Presence TTL and heartbeat interval of these networks (seconds).
const TTL: &str = "3";
const BEAT: &str = "1";
/// Slack on a promised deadline: the machine is shared with other builds and tests.
const SLACK: Duration = Duration::from_secs(1);

struct Net {
    up: OperatorUp,
    _dir: tempfile::TempDir,
    op: PathBuf,
}

/// An operator and `operator up` (with its global service unless `global` is false).
fn network(global: bool) -> Net {
    assert!(
        nats_server_has_global(),
        "nats-server {} is too old for the global service; run scripts/setup.sh",
        nats_server_version()
    );
    let dir = operator_dir();
    let op = dir.path().to_path_buf();
    operator_init(&op, free_port());
    let mut extra = vec!["--presence-ttl", TTL, "--heartbeat-interval", BEAT];
    if !global {
        extra.push("--no-global");
    }
    let up = OperatorUp::start_with(&op, &extra);
    Net { up, _dir: dir, op }
}

/// A person whose catalog `media` indexes a small tree (kept until the folder drops).
async fn with_catalog(op: &Path, name: &str) -> (Person, tempfile::TempDir) {
    let person = Person::with_account(op, name).await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    write_file(tree.path(), "films/clip.bin", &pseudo_random_bytes(7, 300_000));
    write_file(tree.path(), "notes/hello.txt", b"hello\n");
    person.run(&["catalog", "new", "media", tree.path().to_str().unwrap()]).await.assert_success("catalog new");
    (person, tree)
}

/// `catalog serve media` with 1 s heartbeats, once it answers its owner.
async fn serve(person: &Person) -> Serve {
    let serve = Serve::start_with(person, "media", &["--heartbeat-interval", BEAT]);
    let own = person.client("media").await;
    wait_for("the catalog server", Duration::from_secs(20), || {
        let own = own.clone();
        async move { own.get().await.ok().map(|_| ()) }
    })
    .await;
    serve
}

async fn global(person: &Person) -> GlobalClient {
    GlobalClient::new(person.nats().await, Duration::from_secs(5))
}

/// Heartbeats and offline notices an account receives, recorded from now on.
struct Beats {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, Heartbeat)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Beats {
    async fn record(person: &Person) -> Beats {
        let nats = person.nats().await;
        let mut sub = nats.subscribe("natster.global-events.*").await.expect("subscribe");
        nats.flush().await.expect("flush");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let _nats = nats;
            while let Some(msg) = sub.next().await {
                if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                    s.lock().unwrap().push((msg.subject.to_string(), beat));
                }
            }
        });
        Beats { seen, task }
    }

    fn of(&self, owner: &str, online: bool) -> Vec<Heartbeat> {
        let kind = if online { "natster.global-events.heartbeat" } else { "natster.global-events.offline" };
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(s, b)| s == kind && b.account_key == owner).map(|(_, b)| b.clone()).collect()
    }

    async fn wait(&self, what: &str, owner: &str, online: bool, deadline: Duration) -> Heartbeat {
        wait_for(what, deadline, || {
            let got = self.of(owner, online).last().cloned();
            async move { got }
        })
        .await
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Beats {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn one_unavailable_line(out: &RunOutput, what: &str) {
    let lines: Vec<&str> = out.stderr_lines().into_iter().filter(|l| l.contains("unavailable")).collect();
    assert_eq!(lines.len(), 1, "{what}: exactly one line about the global service:\n{}", out.stderr);
    assert!(lines[0].contains("presence and the inbox are unavailable"), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_within_2s_and_heartbeats_only_to_share_targets() {
    let net = network(true);
    let (alice, _tree) = with_catalog(&net.op, "alice").await;
    let (bob, eve) = (Person::with_account(&net.op, "bob").await, Person::with_account(&net.op, "eve").await);
    let (alice_key, bob_key) = (alice.key(), bob.key());
    let bob_beats = Beats::record(&bob).await;
    let eve_beats = Beats::record(&eve).await;
    let bob_nats = bob.nats().await;
    let mut shared_events = bob_nats.subscribe("natster.global-events.shared").await.unwrap();
    bob_nats.flush().await.unwrap();
    let _serve = serve(&alice).await;

    // The share reaches bob's inbox within 2 s: pushed to him, and in the projection.
    let share = alice.run(&["catalog", "share", "media", "bob"]).await;
    share.assert_success("share");
    assert!(share.stderr_lines().is_empty(), "the global service runs: {}", share.stderr);
    let shared_at = Instant::now();
    let pushed = tokio::time::timeout(Duration::from_secs(2) + SLACK, shared_events.next()).await;
    let pushed: Share =
        serde_json::from_slice(&pushed.expect("shared event within 2 s").expect("event").payload).unwrap();
    assert_eq!((pushed.from_account.as_str(), pushed.catalog.as_str()), (alice_key.as_str(), "media"));
    let command = format!("natster-mount catalog import media {alice_key}");
    let inbox = wait_for("bob's inbox to show alice's share", Duration::from_secs(2) + SLACK, || {
        let bob = &bob;
        let command = command.clone();
        async move {
            let out = bob.run(&["catalog", "inbox"]).await;
            out.stdout.contains(&command).then_some(out)
        }
    })
    .await;
    eprintln!("inbox showed the share {:?} after it was made", shared_at.elapsed());
    assert!(inbox.stdout.contains("media from") && inbox.stdout.contains("(alice)"), "{}", inbox.stdout);
    assert!(!inbox.stdout.contains("hub from"), "the hub is imported at add-account:\n{}", inbox.stdout);

    // Eve's inbox and my.shares never mention it.
    let eve_inbox = eve.run(&["catalog", "inbox"]).await;
    eve_inbox.assert_success("eve inbox");
    assert!(eve_inbox.stdout.contains("nothing pending"), "{}", eve_inbox.stdout);
    let eve_shares = global(&eve).await.my_shares().await.expect("eve my.shares");
    assert!(eve_shares.iter().all(|s| s.from_account != alice_key && s.catalog != "media"), "{eve_shares:?}");
    assert!(eve_shares.iter().any(|s| s.catalog == "hub"), "eve's hub share: {eve_shares:?}");

    // Bob imports everything pending; catalog ls shows it online; his mount shows it and the hub.
    let all = bob.run(&["catalog", "import", "--all"]).await;
    all.assert_success("import --all");
    assert!(all.stdout.contains("imported catalog 'media'"), "{}", all.stdout);
    assert!(bob.context().imports.iter().any(|i| i.catalog == "media" && i.owner == alice_key));
    assert!(bob.run(&["catalog", "inbox"]).await.stdout.contains("nothing pending"));
    bob_beats.wait("a heartbeat of alice's media at bob", &alice_key, true, Duration::from_secs(5)).await;
    let ls = bob.run(&["catalog", "ls"]).await;
    assert!(ls.stdout.contains(&format!("media from {alice_key} (alice): online, revision")), "{}", ls.stdout);
    let bob_shares = global(&bob).await.my_shares().await.expect("bob my.shares");
    let media = bob_shares.iter().find(|s| s.catalog == "media").expect("media in bob's shares");
    assert!(media.catalog_online && media.revision > 0 && media.to_account == bob_key, "{media:?}");
    if fuse_available_for("global::inbox_within_2s_and_heartbeats_only_to_share_targets (its mount part)") {
        let m = Mounted::start(&bob.home, &[]);
        let root = m.path().to_path_buf();
        let names = bounded("ls of the mount", MOUNT_IO_DEADLINE, move || file_names(&root));
        assert_eq!(names, ["hub", "media"]);
        let path = m.path().join("media/notes/hello.txt");
        assert_eq!(bounded("read", MOUNT_IO_DEADLINE, move || std::fs::read(path)).unwrap(), b"hello\n");
        m.stop();
    }

    // Eve, to whom nothing of alice's is shared, got no heartbeat of it (she did get the hub's).
    eve_beats.wait("a hub heartbeat at eve", &net.hub_key(), true, Duration::from_secs(5)).await;
    assert!(eve_beats.of(&alice_key, true).is_empty() && eve_beats.of(&alice_key, false).is_empty());
}

impl Net {
    fn hub_key(&self) -> String {
        let context = natster_mount::context::Context::load(
            &natster_mount::context::Home::at(self.op.join("operator/hub/home")),
            "default",
        )
        .expect("hub context");
        context.account_public_key.expect("hub key")
    }
}

/// getxattr(2) of a text attribute.
fn xattr(path: &Path, name: &str) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated; the buffer is valid for its length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| String::from_utf8_lossy(&buf[..len as usize]).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_follows_reindex_within_2s_and_sees_offline() {
    let net = network(true);
    let (alice, tree) = with_catalog(&net.op, "alice").await;
    let bob = Person::with_account(&net.op, "bob").await;
    let alice_key = alice.key();
    let mut served = serve(&alice).await;
    alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    let beats = Beats::record(&bob).await;
    beats.wait("alice's heartbeat", &alice_key, true, Duration::from_secs(5)).await;

    let fuse = fuse_available_for("global::mount_follows_reindex_within_2s_and_sees_offline (its mount part)");
    // A long TTL: only a heartbeat can bring the new file in time.
    let mount = fuse.then(|| Mounted::start(&bob.home, &["--listing-ttl", "600"]));
    if let Some(m) = &mount {
        let folder = m.path().join("media");
        let f = folder.clone();
        wait_for("the mount to say media is online", Duration::from_secs(5), || {
            let f = f.clone();
            async move { (xattr(&f, "user.natster.online").as_deref() == Some("online")).then_some(()) }
        })
        .await;

        // Alice adds a file and re-indexes; bob's mount lists it within 2 s.
        write_file(tree.path(), "notes/new.txt", b"fresh\n");
        alice.run(&["catalog", "new", "media", tree.path().to_str().unwrap()]).await.assert_success("re-index");
        let reindexed = Instant::now();
        let notes = folder.join("notes");
        wait_for("the new file in bob's mount", Duration::from_secs(2) + SLACK, || {
            let notes = notes.clone();
            async move {
                let names = tokio::task::spawn_blocking(move || std::fs::read_dir(notes).ok().map(|d| d.count()))
                    .await
                    .ok()
                    .flatten();
                (names == Some(2)).then_some(())
            }
        })
        .await;
        eprintln!("the mount listed the re-indexed file {:?} after the re-index", reindexed.elapsed());
        let new = folder.join("notes/new.txt");
        assert_eq!(bounded("read of the new file", MOUNT_IO_DEADLINE, move || std::fs::read(new)).unwrap(), b"fresh\n");
        let revision = xattr(&folder, "user.natster.revision").expect("revision xattr");
        let listing = alice.client("media").await.get().await.expect("listing");
        assert_eq!(revision, listing.revision);
        assert_eq!(xattr(&folder, "user.natster.owner").as_deref(), Some(alice_key.as_str()));
    }

    // A clean stop: offline at bob within 5 s, in the mount and in catalog ls.
    beats.clear();
    served.terminate();
    let stopped = Instant::now();
    beats.wait("alice's offline notice", &alice_key, false, Duration::from_secs(5) + SLACK).await;
    eprintln!("offline reached bob {:?} after the clean stop", stopped.elapsed());
    if let Some(m) = &mount {
        let folder = m.path().join("media");
        wait_for("the mount to say offline", Duration::from_secs(2), || {
            let f = folder.clone();
            async move { (xattr(&f, "user.natster.online").as_deref() == Some("offline")).then_some(()) }
        })
        .await;
    }
    let ls = bob.run(&["catalog", "ls"]).await;
    assert!(ls.stdout.contains(&format!("media from {alice_key} (alice): offline")), "{}", ls.stdout);

    // kill -9: offline within the presence TTL (plus one sweep).
    let mut again = serve(&alice).await;
    beats.wait("alice back online", &alice_key, true, Duration::from_secs(5)).await;
    beats.clear();
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(again.pid() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let ttl = Duration::from_secs(TTL.parse().unwrap());
    beats.wait("offline after kill -9", &alice_key, false, ttl + ttl / 4 + Duration::from_secs(1) + SLACK).await;
    eprintln!("offline after kill -9 reached bob {:?} after the kill", killed.elapsed());
    again.terminate();
    if let Some(m) = mount {
        m.stop();
    }
    drop(net);
}

/// `global serve` as a child process (an instance beside or instead of `operator up`'s).
struct GlobalServe {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl GlobalServe {
    fn start(op: &Path, extra: &[&str]) -> GlobalServe {
        let log = tempfile::NamedTempFile::new().expect("log");
        let args: Vec<&str> = ["global", "serve", "--presence-ttl", TTL].iter().chain(extra).copied().collect();
        let child = operator_command(op, &args)
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("global serve");
        let mut g = GlobalServe { child, log };
        let until = Instant::now() + Duration::from_secs(20);
        while !g.log().contains("global service running") {
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!("global serve exited with {status}:\n{}", g.log());
            }
            assert!(Instant::now() < until, "global serve not ready:\n{}", g.log());
            std::thread::sleep(POLL);
        }
        g
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GlobalServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- global serve log ---\n{}", tail(&self.log(), 30));
        }
    }
}

/// A JetStream context as a user of the global account.
async fn global_js(net: &Net, person: &Person) -> async_nats::jetstream::Context {
    let creds = net.op.join("operator/global/user.creds");
    let nats = natster_mount::accounts::connect(&person.context().server, &creds, Duration::from_secs(5))
        .await
        .expect("global account connection");
    async_nats::jetstream::new(nats)
}

/// Every projection value (the generation marker aside), by bucket and key.
async fn projections(js: &async_nats::jetstream::Context) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for bucket in ["PROJ_ACCOUNT", "PROJ_CATALOG"] {
        let Ok(kv) = js.get_key_value(bucket).await else { continue };
        let Ok(mut keys) = kv.keys().await else { continue };
        while let Some(Ok(key)) = keys.next().await {
            if key == "_generation" {
                continue;
            }
            if let Ok(Some(bytes)) = kv.get(&key).await {
                out.insert(format!("{bucket}/{key}"), serde_json::from_slice(&bytes).expect("projection JSON"));
            }
        }
    }
    out
}

/// True once every projection consumer has applied every event.
async fn caught_up(js: &async_nats::jetstream::Context) -> bool {
    let Ok(stream) = js.get_stream("NATSTER_EVENTS").await else { return false };
    let mut names = stream.consumer_names();
    let mut count = 0;
    while let Some(Ok(name)) = names.next().await {
        let Ok(mut consumer) = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>(&name).await else {
            return false;
        };
        let Ok(info) = consumer.info().await else { return false };
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            return false;
        }
        count += 1;
    }
    count == 2
}

async fn settled(js: &async_nats::jetstream::Context) -> BTreeMap<String, Value> {
    wait_for("the projections to catch up", Duration::from_secs(20), || async { caught_up(js).await.then_some(()) })
        .await;
    projections(js).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_survive_restarts_and_rebuild_from_the_log() {
    let net = network(false);
    let first = GlobalServe::start(&net.op, &[]);
    let (alice, _tree) = with_catalog(&net.op, "alice").await;
    let (bob, eve) = (Person::with_account(&net.op, "bob").await, Person::with_account(&net.op, "eve").await);
    for (verb, who) in [("share", "bob"), ("share", "eve"), ("unshare", "eve"), ("share", "eve")] {
        let out = alice.run(&["catalog", verb, "media", who]).await;
        out.assert_success(verb);
        assert!(out.stderr_lines().is_empty(), "{verb}: {}", out.stderr);
    }
    alice.run(&["catalog", "unshare", "media", "eve"]).await.assert_success("unshare");
    bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");

    // A second instance in the same queue group: both answer, the views do not change.
    let second = GlobalServe::start(&net.op, &[]);
    let js = global_js(&net, &alice).await;
    let before = settled(&js).await;
    let bob_entry = &before[&format!("PROJ_ACCOUNT/{}", bob.key())];
    assert_eq!(bob_entry["in_shares"].as_array().unwrap().len(), 2, "hub and media: {bob_entry}");
    let stats = global(&bob).await.stats().await.expect("stats");
    assert_eq!(stats.total_initialized, 3);
    // Hub shares with three accounts, and alice's three shares (an unshare is not subtracted).
    assert_eq!(stats.share_count, 6, "{stats:?}");
    let client = global(&eve).await;
    for _ in 0..20 {
        client.whoami().await.expect("whoami through either instance").expect("eve initialized");
    }
    let sys = natster_mount::accounts::connect(
        &alice.context().server,
        &net.op.join("operator/global/user.creds"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let inbox = sys.new_inbox();
    let mut pongs = sys.subscribe(inbox.clone()).await.unwrap();
    sys.publish_with_reply("$SRV.PING.natster-global", inbox, "".into()).await.unwrap();
    let mut ids = BTreeSet::new();
    while let Ok(Some(pong)) = tokio::time::timeout(Duration::from_secs(1), pongs.next()).await {
        let pong: Value = serde_json::from_slice(&pong.payload).unwrap();
        ids.insert(pong["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 2, "both instances answer $SRV.PING");

    // Both killed, one restarted: the same views.
    first.kill();
    second.kill();
    let third = GlobalServe::start(&net.op, &[]);
    assert_eq!(settled(&js).await, before, "projections changed across a restart");
    third.kill();

    // Empty KV: a fresh instance rebuilds every view from the log, each event once.
    for bucket in ["PROJ_ACCOUNT", "PROJ_CATALOG"] {
        js.delete_key_value(bucket).await.expect("delete bucket");
    }
    let fourth = GlobalServe::start(&net.op, &[]);
    // The projections start beside the request handlers, so their log line may follow
    // "running": awaited, bounded.
    wait_for("the rebuild's log line", Duration::from_secs(10), || async {
        fourth.log().contains("rebuilding it from the event log").then_some(())
    })
    .await;
    assert_eq!(settled(&js).await, before, "the rebuilt projections differ");
    alice.run(&["catalog", "share", "media", "eve"]).await.assert_success("share after the rebuild");
    let after = settled(&js).await;
    assert_eq!(after[&format!("PROJ_ACCOUNT/{}", eve.key())]["in_shares"].as_array().unwrap().len(), 2);
    assert_eq!(global(&bob).await.stats().await.expect("stats").share_count, 7);
    drop(fourth);
    drop(net);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_events_codes_and_original_envelopes() {
    let net = network(false);
    let site = Person::with_account(&net.op, "site").await;
    let _instance = GlobalServe::start(&net.op, &["--site-account", &site.key()]);
    let (alice, _tree) = with_catalog(&net.op, "alice").await;
    let (bob, eve) = (Person::with_account(&net.op, "bob").await, Person::with_account(&net.op, "eve").await);
    let (alice_key, bob_key) = (alice.key(), bob.key());
    alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    let beats = Beats::record(&bob).await;
    let eve_nats = eve.nats().await;

    // No one logs an event as another origin: the body cannot name one, and the subject that
    // would (alice's key in token 0) has no import in eve's account.
    let init_as_alice = format!(
        r#"{{"catalog":"none","target":"none","event_type":"natster_initialized","data":{{"account_key":"{alice_key}"}}}}"#
    );
    let reply = raw_request(&eve_nats, "natster.global.events.put", init_as_alice.clone()).await;
    assert_eq!(code(&reply), 403, "{reply}");
    let bound = r#"{"catalog":"none","target":"none","event_type":"context_bound","data":{}}"#;
    assert_eq!(code(&raw_request(&eve_nats, "natster.global.events.put", bound).await), 403);
    let forged_subject = format!("{alice_key}.natster.global.events.put");
    let direct =
        tokio::time::timeout(Duration::from_secs(2), eve_nats.request(forged_subject, init_as_alice.into())).await;
    assert!(!matches!(direct, Ok(Ok(_))), "a request on alice's subject reached the service");
    let again = raw_request(
        &eve_nats,
        "natster.global.events.put",
        r#"{"catalog":"none","target":"none","event_type":"natster_initialized"}"#,
    )
    .await;
    assert_eq!(code(&again), 409, "initialized twice: {again}");

    // A spoofed heartbeat (alice's key, from eve) is dropped: bob hears nothing of it.
    let spoof = format!(r#"{{"catalog":"media","account_key":"{alice_key}","revision":4242}}"#);
    eve_nats.publish("natster.global.heartbeats.put", spoof.into()).await.unwrap();
    let own = r#"{"catalog":"media","account_key":"","revision":4243}"#;
    eve_nats.publish("natster.global.heartbeats.put", own.into()).await.unwrap();
    eve_nats.flush().await.unwrap();
    let _serve = serve(&alice).await;
    beats.wait("alice's own heartbeat", &alice_key, true, Duration::from_secs(5)).await;
    let spoofed: Vec<Heartbeat> = beats.of(&alice_key, true).into_iter().filter(|b| b.revision == 4242).collect();
    assert!(spoofed.is_empty() && beats.of(&eve.key(), true).is_empty(), "spoofed heartbeats reached bob");
    let media = global(&bob).await.my_shares().await.unwrap().into_iter().find(|s| s.catalog == "media").unwrap();
    assert_ne!(media.revision, 4242);

    // One-time codes: for one's own context only, claimed by the site only, once.
    let context = |key: &str| {
        format!(r#"{{"account_name":"bob","account_public_key":"{key}","access_token":"PAT-secret","user_id":"u"}}"#)
    };
    let bob_nats = bob.nats().await;
    assert_eq!(code(&raw_request(&bob_nats, "natster.global.otc.generate", context(&alice_key)).await), 403);
    let generated = raw_request(&bob_nats, "natster.global.otc.generate", context(&bob_key)).await;
    assert_eq!(code(&generated), 200, "{generated}");
    let code_value = generated["data"]["code"].as_str().unwrap().to_string();
    assert!(generated["data"]["claim_url"].as_str().unwrap().ends_with(&format!("/#/{code_value}")));
    let claim = format!(r#"{{"code":"{code_value}","oauth_id":"github|42"}}"#);
    assert_eq!(code(&raw_request(&eve_nats, "natster.global.otc.claim", claim.clone()).await), 403);
    assert_eq!(code(&raw_request(&eve_nats, "natster.global.context.get", "github|42").await), 403);
    let site_nats = site.nats().await;
    let claimed = raw_request(&site_nats, "natster.global.otc.claim", claim.clone()).await;
    assert_eq!(code(&claimed), 200, "{claimed}");
    assert_eq!(claimed["data"]["account_public_key"], bob_key.as_str());
    assert_eq!(claimed["data"]["access_token"], "", "the PAT is never stored nor handed out");
    assert_eq!(code(&raw_request(&site_nats, "natster.global.otc.claim", claim).await), 404, "a code works once");
    let who = wait_for("bob's bound context", Duration::from_secs(5), || {
        let bob = &bob;
        async move { global(bob).await.whoami().await.ok().flatten().filter(|w| w.oauth_id.is_some()) }
    })
    .await;
    assert_eq!(who.oauth_id.as_deref(), Some("github|42"));

    // Bad input gets the 4xx envelope and the service carries on.
    for (subject, body, expected) in [
        ("natster.global.events.put", "{not json".to_string(), 400),
        ("natster.global.events.put", "x".repeat(100_000), 413),
        ("natster.global.otc.generate", "\"a string\"".to_string(), 400),
    ] {
        let reply = raw_request(&eve_nats, subject, body).await;
        assert_eq!(code(&reply), expected, "{subject}: {reply}");
        assert!(reply["error"].is_string() && reply["data"].is_null(), "{reply}");
    }
    let taken = global(&bob).await.validate_name("media").await.unwrap();
    assert!(!taken.valid && taken.message.contains(&alice_key), "{taken:?}");
    assert!(global(&alice).await.validate_name("media").await.unwrap().valid);

    // Every function's reply has the types the original's Go structs need.
    original_envelopes(&net, &site).await;
}

fn check_shape(value: &Value, shape: &Value, path: &str) {
    match shape {
        Value::Object(fields) => {
            let object = value.as_object().unwrap_or_else(|| panic!("{path} is not an object: {value}"));
            for (field, kind) in fields {
                let (name, optional) = match field.strip_suffix('?') {
                    Some(n) => (n, true),
                    None => (field.as_str(), false),
                };
                match object.get(name) {
                    None | Some(Value::Null) if optional => {}
                    None => panic!("{path}.{name} is missing: {value}"),
                    Some(v) => check_shape(v, kind, &format!("{path}.{name}")),
                }
            }
        }
        Value::String(kind) => {
            let ok = match kind.as_str() {
                "string" => value.is_string(),
                "int" => value.is_i64() || value.is_u64(),
                "bool" => value.is_boolean(),
                "array" => value.is_array(),
                "object" => value.is_object(),
                "null" => value.is_null(),
                "any" => true,
                other => panic!("unknown type {other} in the vector"),
            };
            assert!(ok, "{path} should be {kind}: {value}");
        }
        other => panic!("bad shape {other}"),
    }
}

async fn original_envelopes(net: &Net, site: &Person) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/global.json");
    let vector: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // A fresh account, added while no global service heard it: its natster_initialized is ours to send.
    let caller = Person::new(&net.op);
    let added = caller.run(&["operator", "add-account", "vectors"]).await;
    added.assert_success("add-account");
    let key = caller.key();
    let nats = caller.nats().await;
    let mut code_value = String::new();
    for f in vector["functions"].as_array().unwrap() {
        let name = f["fn"].as_str().unwrap();
        let request = f["request"].as_str().unwrap().replace("ACCOUNT", &key).replace("CODE", &code_value);
        let connection = if f["site_only"].as_bool() == Some(true) { site.nats().await } else { nats.clone() };
        let reply = raw_request(&connection, f["subject"].as_str().unwrap(), request).await;
        check_shape(&reply, &vector["envelope"], name);
        // add-account already logged natster_initialized: the vector's own put is a 409 then.
        if name == "events.put" && code(&reply) == 409 {
            check_shape(&reply, &vector["error_envelope"], name);
            continue;
        }
        assert_eq!(code(&reply), 200, "{name}: {reply}");
        check_shape(&reply["data"], &f["data"], name);
        if let Some(items) = f.get("items") {
            let rows = reply["data"].as_array().unwrap();
            assert!(!rows.is_empty(), "{name}: the hub share at least");
            for row in rows {
                check_shape(row, items, name);
            }
        }
        if name == "otc.generate" {
            code_value = reply["data"]["code"].as_str().unwrap().to_string();
        }
    }
    let refused = raw_request(&nats, "natster.global.otc.claim", r#"{"code":"x","oauth_id":"y"}"#).await;
    check_shape(&refused, &vector["error_envelope"], "otc.claim refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_have_the_original_shape() {
    let net = network(true);
    let (alice, _tree) = with_catalog(&net.op, "alice").await;
    let bob = Person::with_account(&net.op, "bob").await;
    alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/global.json");
    let vector: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let shape = &vector["heartbeat"]["body"];
    let alice_nats = alice.nats().await;
    let mut local =
        alice_nats.subscribe(vector["heartbeat"]["local_subject"].as_str().unwrap().to_string()).await.unwrap();
    alice_nats.flush().await.unwrap();
    let bob_nats = bob.nats().await;
    let mut global_beats = bob_nats.subscribe("natster.global-events.heartbeat").await.unwrap();
    bob_nats.flush().await.unwrap();
    let _serve = serve(&alice).await;
    let beat = tokio::time::timeout(Duration::from_secs(5), local.next()).await.expect("local heartbeat").unwrap();
    let beat: Value = serde_json::from_slice(&beat.payload).unwrap();
    check_shape(&beat, shape, "local heartbeat");
    assert_eq!(beat["account_key"], alice.key().as_str());
    assert_eq!(beat["catalog"], "media");
    let listing = alice.client("media").await.get().await.unwrap();
    assert_eq!(beat["revision_id"], listing.revision.as_str(), "our own revision rides along");
    let relayed = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), global_beats.next()).await.expect("relayed").unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        if v["account_key"] == alice.key().as_str() {
            break v;
        }
    };
    check_shape(&relayed, shape, "relayed heartbeat");
    assert_eq!(relayed["revision"], beat["revision"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_global_service_everything_but_the_inbox_works() {
    let net = network(false);
    let alice = Person::new(&net.op);
    let added = alice.run(&["operator", "add-account", "alice"]).await;
    added.assert_success("add-account");
    one_unavailable_line(&added, "add-account");
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().unwrap();
    write_file(tree.path(), "a.txt", b"still works\n");
    alice.run(&["catalog", "new", "media", tree.path().to_str().unwrap()]).await.assert_success("catalog new");
    let bob = Person::with_account(&net.op, "bob").await;
    let _serve = serve(&alice).await;
    let share = alice.run(&["catalog", "share", "media", "bob"]).await;
    share.assert_success("share");
    one_unavailable_line(&share, "share");
    let import = bob.run(&["catalog", "import", "media", "alice"]).await;
    import.assert_success("import");
    one_unavailable_line(&import, "import");
    assert!(import.stdout.contains("the owner's server answered: 1 files"), "{}", import.stdout);
    let ls = bob.run(&["catalog", "ls"]).await;
    ls.assert_success("ls");
    one_unavailable_line(&ls, "ls");
    let inbox = bob.run(&["catalog", "inbox"]).await;
    inbox.assert_failure("inbox without a global service");
    assert_eq!(inbox.stderr_lines().len(), 1, "{}", inbox.stderr);
    assert!(inbox.stderr.contains("the inbox is unavailable"), "{}", inbox.stderr);
    let out = bob.home.path().join("a.txt");
    bob.run(&["catalog", "download", "media", "/a.txt", out.to_str().unwrap()]).await.assert_success("download");
    assert_eq!(std::fs::read(&out).unwrap(), b"still works\n");
    if fuse_available_for("global::without_a_global_service_everything_but_the_inbox_works (its mount part)") {
        let m = Mounted::start(&bob.home, &[]);
        let path = m.path().join("media/a.txt");
        assert_eq!(bounded("read", MOUNT_IO_DEADLINE, move || std::fs::read(path)).unwrap(), b"still works\n");
        let folder = m.path().join("media");
        assert_eq!(xattr(&folder, "user.natster.online").as_deref(), Some("unknown"));
        m.stop();
    }
    assert!(net.up.output().contains("nats-server v"), "operator up says its version:\n{}", net.up.output());

    // What happened meanwhile was kept: once a global service runs, alice's next command sends
    // her share with eve, and eve's inbox (which first sends her own kept natster_initialized)
    // shows it.
    let eve = Person::with_account(&net.op, "eve").await;
    alice.run(&["catalog", "share", "media", "eve"]).await.assert_success("share with eve");
    let _instance = GlobalServe::start(&net.op, &[]);
    let ls = alice.run(&["catalog", "ls"]).await;
    assert!(ls.stderr_lines().is_empty(), "{}", ls.stderr);
    let inbox = eve.run(&["catalog", "inbox"]).await;
    inbox.assert_success("eve's inbox");
    assert!(inbox.stdout.contains(&format!("natster-mount catalog import media {}", alice.key())), "{}", inbox.stdout);
    let who = global(&eve).await.whoami().await.expect("whoami");
    assert!(who.is_some_and(|w| w.initialized > 0), "eve's kept natster_initialized was sent");
}

/// A share made while the global service is down reaches the inbox once it runs again with
/// no further command from the owner: the owner's running `up` sends what the command kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_up_sends_the_events_kept_during_an_outage() {
    let net = network(false);
    let (alice, _tree) = with_catalog(&net.op, "alice").await;
    let bob = Person::with_account(&net.op, "bob").await;
    let up = Serve::command(&alice, &["up", "--no-mount", "--log", "natster_mount=debug,warn"]);
    let share = alice.run(&["catalog", "share", "media", "bob"]).await;
    share.assert_success("share");
    one_unavailable_line(&share, "share");
    let outbox = alice.home.path().join("default.outbox.json");
    assert!(outbox.exists(), "the share event was kept");

    let _instance = GlobalServe::start(&net.op, &[]);
    let wanted = format!("natster-mount catalog import media {}", alice.key());
    let took = Instant::now();
    wait_for("alice's share in bob's inbox, sent by her running up", Duration::from_secs(45), || {
        let (bob, wanted) = (&bob, &wanted);
        async move { bob.run(&["catalog", "inbox"]).await.stdout.contains(wanted.as_str()).then_some(()) }
    })
    .await;
    eprintln!("kept share in bob's inbox {:?} after the global service started", took.elapsed());
    assert!(!outbox.exists(), "nothing left kept:\n{}", up.log());
    assert!(
        up.log().contains("event(s) kept while the global service did not answer"),
        "up says what it sent:\n{}",
        up.log()
    );
}

/// An own catalog served by another process is online in the owner's mount at once: its
/// server answers the mount's `$SRV.PING.natster-catalog` (no global service here, and its
/// next heartbeat is ten minutes away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_catalog_served_elsewhere_is_online_in_the_mount_at_once() {
    if !fuse_available_for("global::an_own_catalog_served_elsewhere_is_online_in_the_mount_at_once") {
        return;
    }
    let net = network(false);
    let (alice, _tree) = with_catalog(&net.op, "alice").await;
    let _served = Serve::start_with(&alice, "media", &["--heartbeat-interval", "600"]);
    let own = alice.client("media").await;
    wait_for("alice's catalog server", Duration::from_secs(20), || {
        let own = own.clone();
        async move { own.get().await.ok().map(|_| ()) }
    })
    .await;
    let m = Mounted::start(&alice.home, &[]);
    let folder = m.path().join("media");
    let f = folder.clone();
    wait_for("media online in alice's own mount", Duration::from_secs(3), || {
        let f = f.clone();
        async move { (xattr(&f, "user.natster.online").as_deref() == Some("online")).then_some(()) }
    })
    .await;
    let revision = xattr(&folder, "user.natster.revision").unwrap_or_default();
    assert!(!revision.is_empty(), "the revision its server announced");
    m.stop();
}

/// `operator up` starts its global service before the hub's catalog server, so the hub's first
/// heartbeat is heard: the hub is online at once, not after the next heartbeat (30 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_is_online_as_soon_as_operator_up_is_ready() {
    let dir = operator_dir();
    let op = dir.path().to_path_buf();
    operator_init(&op, free_port());
    let _up = OperatorUp::start(&op);
    let alice = Person::with_account(&op, "alice").await;
    let alice = &alice;
    wait_for("the hub online in alice's catalog ls", Duration::from_secs(10), || async move {
        let ls = alice.run(&["catalog", "ls"]).await;
        ls.stdout.lines().any(|l| l.contains("hub") && l.contains("online")).then_some(())
    })
    .await;
}
