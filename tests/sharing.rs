//! Accounts and sharing end to end through the CLI, on a real operator-mode nats-server run by
//! `natster-mount operator up`: alice serves and shares with bob, bob imports and reads (CLI and
//! mount), eve imports without a share and is refused, unsharing cuts bob off, no seed leaks.

mod common;

use std::path::{Path, PathBuf};

use std::time::Duration;

use common::mounted::{bounded, fuse_available_for, Mounted, MOUNT_IO_DEADLINE};
use common::operator::*;
use common::*;
use futures::StreamExt;
use natster_mount::client::{CatalogClient, ClientError};
use natster_mount::context::ImportedCatalog;
use natster_mount::identity::{Identity, PinStore};
use natster_mount::protocol::Operation;

struct World {
    up: OperatorUp,
    _operator_dir: tempfile::TempDir,
    alice: Person,
    bob: Person,
    eve: Person,
    tree: tempfile::TempDir,
    serve: Option<Serve>,
}

async fn world() -> World {
    let operator_dir = operator_dir();
    let op = operator_dir.path().to_path_buf();
    operator_init(&op, free_port());
    let up = OperatorUp::start_with(&op, &["--trace"]);
    let (alice, bob, eve) = (Person::new(&op), Person::new(&op), Person::new(&op));
    for (p, name) in [(&alice, "alice"), (&bob, "bob"), (&eve, "eve")] {
        p.run(&["operator", "add-account", name]).await.assert_success("add-account");
    }
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    write_file(tree.path(), "films/clip.bin", &pseudo_random_bytes(11, 3 * 1024 * 1024 + 5));
    write_file(tree.path(), "notes/read me.txt", b"hello bob\n");
    alice.run(&["catalog", "new", "media", tree.path().to_str().unwrap()]).await.assert_success("catalog new");

    let serve = Serve::start(&alice, "media");
    let own = alice.client("media").await;
    wait_for("alice's catalog server", Duration::from_secs(20), || {
        let own = own.clone();
        async move { own.get().await.ok().map(|_| ()) }
    })
    .await;
    World { up, _operator_dir: operator_dir, alice, bob, eve, tree, serve: Some(serve) }
}

fn seed_of(creds: &Path) -> String {
    let text = std::fs::read_to_string(creds).expect("creds");
    text.lines().find(|l| l.starts_with("SU")).expect("seed line").to_string()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_import_read_refuse_and_unshare() {
    let mut w = world().await;
    let bob_key = w.bob.key();
    let alice_key = w.alice.key();

    // Before sharing, bob's import gives him nothing but 403s.
    w.bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    let refused = w.bob.client("media").await.get().await;
    assert!(matches!(refused, Err(ClientError::Refused { code: 403, .. })), "{refused:?}");

    w.alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    let ls = w.alice.run(&["catalog", "ls"]).await;
    assert!(ls.stdout.contains(&bob_key) && ls.stdout.contains("(bob)"), "{}", ls.stdout);

    // Bob lists and downloads byte-identical through the CLI.
    let contents = w.bob.run(&["catalog", "contents", "media"]).await;
    contents.assert_success("contents");
    assert!(contents.stdout.contains("/films/clip.bin") && contents.stdout.contains("/notes/read me.txt"));
    let out = w.bob.home.path().join("clip.bin");
    w.bob.run(&["catalog", "download", "media", "/films/clip.bin", out.to_str().unwrap()]).await.assert_success("dl");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(w.tree.path().join("films/clip.bin")).unwrap());
    let bob_ls = w.bob.run(&["catalog", "ls"]).await;
    assert!(bob_ls.stdout.contains(&format!("media from {alice_key} (alice)")), "{}", bob_ls.stdout);
    let who = w.bob.run(&["whoami"]).await;
    assert!(who.stdout.contains(&bob_key) && who.stdout.contains("connected"), "{}", who.stdout);

    // ... and through the mount.
    // Without FUSE the rest still runs, but the test is recorded as skipped: it did not
    // prove the mount half of its claim.
    if fuse_available_for("sharing::share_import_read_refuse_and_unshare (its mount part)") {
        let m = Mounted::start(&w.bob.home, &[]);
        let mounted = m.path().join("media/films/clip.bin");
        let read =
            |p: PathBuf| bounded(&format!("read of {}", p.display()), MOUNT_IO_DEADLINE, move || std::fs::read(p));
        assert_eq!(read(mounted).unwrap(), std::fs::read(w.tree.path().join("films/clip.bin")).unwrap());
        assert_eq!(read(m.path().join("media/notes/read me.txt")).unwrap(), b"hello bob\n");
        m.stop();
    }

    // Eve imports without a share: her per-owner import reaches alice's server, whose share
    // list refuses get, open, read and download; no media reaches her on any route.
    w.eve.run(&["catalog", "import", "media", &alice_key]).await.assert_success("eve import");
    let eve_nats = w.eve.nats().await;
    let mut eve_media = eve_nats.subscribe("natster.media.>").await.unwrap();
    let mut eve_owner_media = eve_nats.subscribe("natster.from.*.media.>").await.unwrap();
    eve_nats.flush().await.unwrap();
    let eve_import = w.eve.context().imports.into_iter().find(|i| i.catalog == "media").unwrap();
    assert_eq!(
        eve_import,
        ImportedCatalog { owner_name: Some("alice".into()), ..ImportedCatalog::via_owner("media", &alice_key) },
        "through alice's per-owner imports"
    );
    let eve = CatalogClient::for_import(
        eve_nats.clone(),
        &eve_import,
        test_options(),
        std::sync::Arc::new(Identity::ephemeral()),
        PinStore::in_memory(),
    )
    .unwrap();
    assert!(matches!(eve.get().await, Err(ClientError::Refused { code: 403, .. })));
    let hash = sha256_hex(&std::fs::read(w.tree.path().join("films/clip.bin")).unwrap());
    let open = eve.open(&hash, None).await;
    assert!(matches!(open, Err(ClientError::Refused { code: 403, .. })), "{:?}", open.err());
    let route = eve_import.route();
    let read = raw_request(
        &eve_nats,
        &route.request_subject("media", Operation::Read),
        format!(r#"{{"session":"{}","first_chunk":0,"count":4}}"#, "0".repeat(32)),
    )
    .await;
    assert_eq!(code(&read), 403);
    let v1 = raw_request(
        &eve_nats,
        &route.request_subject("media", Operation::Download),
        format!(r#"{{"hash":"{hash}","target_xkey":"{}"}}"#, nkeys::XKey::new().public_key()),
    )
    .await;
    assert_eq!(code(&v1), 403);
    // Absence of media can only be checked by waiting a bounded moment.
    let stray = tokio::time::timeout(
        Duration::from_millis(500),
        futures::future::select(eve_media.next(), eve_owner_media.next()),
    )
    .await;
    assert!(stray.is_err(), "media reached eve");

    // A reader on bob's connection signing as eve does not pass for bob: the server checks the
    // signed identity against the account nats-server put in the subject.
    let eve_creds = w.eve.context().creds.expect("eve's creds");
    let eve_identity =
        std::sync::Arc::new(Identity::from_creds_file(&w.eve.home.home(), &eve_creds).expect("eve identity"));
    let alice_key = w.alice.key();
    let posing = CatalogClient::for_import(
        w.bob.nats().await,
        &ImportedCatalog::via_owner("media", &alice_key),
        test_options(),
        eve_identity,
        PinStore::in_memory(),
    )
    .expect("client");
    match posing.open(&hash, None).await {
        Err(ClientError::Refused { code: 403, message }) => {
            assert!(message.contains("belongs to account"), "{message}")
        }
        other => panic!("a reader signing as another account was not refused: {:?}", other.err()),
    }

    // After unshare, bob's next open is refused.
    let bob = w.bob.client("media").await;
    assert!(bob.open(&hash, None).await.is_ok());
    w.alice.run(&["catalog", "unshare", "media", "bob"]).await.assert_success("unshare");
    let after = bob.open(&hash, None).await;
    assert!(matches!(after, Err(ClientError::Refused { code: 403, .. })), "{:?}", after.err());

    // No seed in any log or on the wire (nats-server traced every protocol line), creds 0600.
    let serve_log = w.serve.take().map(|s| s.log()).unwrap_or_default();
    assert!(serve_log.contains("serving"), "serve log: {serve_log}");
    let wire = w.up.server_log();
    assert!(wire.contains("CONNECT"), "the server trace should show the wire protocol");
    for person in [&w.alice, &w.bob, &w.eve] {
        let creds = person.context().creds.expect("creds path");
        assert_eq!(mode(&creds), 0o600, "{}", creds.display());
        let seed = seed_of(&creds);
        assert!(!wire.contains(&seed), "a user seed appears in the nats-server trace");
        assert!(!w.up.output().contains(&seed) && !serve_log.contains(&seed));
    }
    for dir in std::fs::read_dir(w.up.operator_home.join("operator/accounts")).unwrap() {
        let nk = dir.unwrap().path().join("account.nk");
        let seed = std::fs::read_to_string(&nk).unwrap();
        assert_eq!(mode(&nk), 0o600);
        assert!(!wire.contains(seed.trim()), "an account seed appears in the nats-server trace");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let w = world().await;
    let context_before = std::fs::read(w.bob.home.context_path()).unwrap();
    let shares = w.alice.home.path().join("media.shares.json");

    let unknown = w.alice.run(&["catalog", "share", "media", "mallory"]).await;
    unknown.assert_failure("share with an unknown account");
    assert!(unknown.stderr.contains("neither an account public key"), "{}", unknown.stderr);

    let mut bad_key = w.bob.key();
    bad_key.replace_range(10..11, if &bad_key[10..11] == "A" { "B" } else { "A" });
    let malformed = w.alice.run(&["catalog", "share", "media", &bad_key]).await;
    malformed.assert_failure("share with a malformed key");
    assert!(malformed.stderr.contains("not a valid account public key"), "{}", malformed.stderr);

    let missing = w.alice.run(&["catalog", "share", "nosuch", "bob"]).await;
    missing.assert_failure("share a catalog that does not exist");
    assert!(missing.stderr.contains("no catalog named 'nosuch'"), "{}", missing.stderr);
    assert!(!shares.exists(), "a failed share wrote a share list");

    let not_shared = w.alice.run(&["catalog", "unshare", "media", "bob"]).await;
    not_shared.assert_failure("unshare what was not shared");

    w.bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    let after_first = std::fs::read(w.bob.home.context_path()).unwrap();
    assert_ne!(after_first, context_before);
    let twice = w.bob.run(&["catalog", "import", "media", "alice"]).await;
    twice.assert_failure("import twice");
    assert!(twice.stderr.contains("already imported"), "{}", twice.stderr);
    assert_eq!(std::fs::read(w.bob.home.context_path()).unwrap(), after_first, "a failed import changed the context");

    // A seed pasted for a key is named, never echoed.
    let seed = seed_of(&w.alice.context().creds.expect("creds path"));
    let pasted = w.alice.run(&["catalog", "share", "media", &seed]).await;
    pasted.assert_failure("share with a seed");
    assert!(pasted.stderr.contains("secret seed") && !pasted.stderr.contains(&seed[2..]), "{}", pasted.stderr);
    // The network's own account names cannot be taken by a person.
    let mallory = Person::new(&w.alice.operator_home);
    for name in ["natster_hub", "natster_global", "SYS"] {
        let added = mallory.run(&["operator", "add-account", name]).await;
        added.assert_failure("add-account of a reserved name");
        assert!(added.stderr.contains("reserved") && added.stderr_lines().len() == 1, "{}", added.stderr);
    }

    let self_import = w.alice.run(&["catalog", "import", "media", "alice"]).await;
    self_import.assert_failure("import your own catalog");
    let bad_name = w.bob.run(&["catalog", "import", "bad.name", "alice"]).await;
    bad_name.assert_failure("import a bad catalog name");
    for out in [&unknown, &malformed, &missing, &twice, &pasted] {
        assert_eq!(out.stderr_lines().len(), 1, "one line: {}", out.stderr);
    }
}

trait ContextPath {
    fn context_path(&self) -> PathBuf;
}

impl ContextPath for TestHome {
    fn context_path(&self) -> PathBuf {
        self.home().context_path("default")
    }
}

/// nsc and Synadia Cloud issue users with one of the account's signing keys, not the account
/// key. Alice's catalog server runs as such a user: bob refuses it, naming what is missing,
/// while it sends no chain, and reads it byte-identical once it sends alice's account JWT
/// (which lists the signing key); the operator that JWT is signed by is pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_user_issued_by_a_signing_key_is_trusted_through_its_account_jwt() {
    use natster_mount::accounts::jwt::{self, Claims, UserNats};
    use natster_mount::accounts::{format_creds, Operator};
    use natster_mount::context::Home;

    let mut w = world().await;
    let alice_key = w.alice.key();
    w.alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    w.bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    drop(w.serve.take());

    // A signing key in alice's account JWT, pushed to the server.
    let signer = nkeys::KeyPair::new_account();
    let mut operator = Operator::load(&Home::at(&w.alice.operator_home)).expect("operator");
    let mut claims = operator.account_claims("alice").expect("alice's claims");
    claims.nats.signing_keys.push(signer.public_key().into());
    let pending = operator.prepare_account("alice", claims).expect("sign");
    let account_jwt = pending.jwt().to_string();
    operator.apply_account(&w.alice.context().server, pending).await.expect("push alice's JWT");

    // A user issued by that key on alice's behalf, as `nsc add user` makes one.
    let user = nkeys::KeyPair::new_user();
    let mut nats = UserNats::unlimited();
    nats.issuer_account = Some(alice_key.clone());
    let token = jwt::encode(&mut Claims::new("alice-server", &user.public_key(), nats), &signer).expect("user JWT");
    let creds = w.alice.home.path().join("signing-key.creds");
    std::fs::write(&creds, format_creds(&token, &user.seed().expect("seed"))).expect("creds");
    let mut context = w.alice.context();
    context.creds = Some(creds);
    context.save(&w.alice.home.home(), "default").expect("context");

    let out = w.bob.home.path().join("clip.bin");
    let target = out.to_str().unwrap().to_string();
    let download = || async { w.bob.run(&["catalog", "download", "media", "/films/clip.bin", &target]).await };
    {
        let _serve = Serve::start(&w.alice, "media");
        let refused = wait_for("bob to refuse the chainless server", Duration::from_secs(30), || async {
            let run = download().await;
            (!run.status.success() && run.stderr.contains("no account JWT came with it")).then_some(run)
        })
        .await;
        eprintln!("refused: {}", refused.stderr.trim());
        assert!(!out.exists(), "nothing is written from a refused server");
    }

    let chain = w.alice.home.path().join("chain");
    std::fs::create_dir_all(&chain).expect("chain dir");
    std::fs::write(chain.join(format!("{alice_key}.jwt")), &account_jwt).expect("chain file");
    let _serve = Serve::start(&w.alice, "media");
    wait_for("bob's download through the signing-key chain", Duration::from_secs(30), || async {
        download().await.status.success().then_some(())
    })
    .await;
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(w.tree.path().join("films/clip.bin")).unwrap());
    let pins = std::fs::read_to_string(w.bob.home.path().join("known_servers.json")).expect("bob's pins");
    assert!(pins.contains(&operator.public_key()), "the operator is pinned: {pins}");
}

/// `unshare` takes the importer's per-catalog imports (the original's, which cost JWT space per
/// catalog) out of its account JWT when the local operator manages it; importing again after
/// a new share puts them back instead of saying "already imported".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshare_removes_per_catalog_imports_and_a_new_import_restores_them() {
    use natster_mount::accounts::Operator;
    use natster_mount::context::Home;

    let w = world().await;
    let per_catalog = || {
        let operator = Operator::load(&Home::at(&w.bob.operator_home)).expect("operator");
        let imports = operator.catalog_imports("bob").expect("bob's imports").into_iter().map(|i| i.catalog);
        imports.filter(|c| c != natster_mount::accounts::HUB_CATALOG).collect::<Vec<_>>()
    };
    w.alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    w.bob.run(&["catalog", "import", "media", "alice", "--per-catalog"]).await.assert_success("import");
    assert_eq!(per_catalog(), ["media"]);
    within("bob's listing", w.bob.client("media").await.get()).await.expect("bob reads");

    let unshare = w.alice.run(&["catalog", "unshare", "media", "bob"]).await;
    unshare.assert_success("unshare");
    assert!(unshare.stdout.contains("removed") && unshare.stdout.contains("per-catalog import"), "{}", unshare.stdout);
    assert!(per_catalog().is_empty(), "the per-catalog imports are gone: {:?}", per_catalog());
    let cut = within("bob's listing after the unshare", w.bob.client("media").await.get()).await;
    assert!(cut.is_err(), "bob reads nothing: {cut:?}");

    w.alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share again");
    w.bob.run(&["catalog", "import", "media", "alice", "--per-catalog"]).await.assert_success("import again");
    assert_eq!(per_catalog(), ["media"]);
    assert_eq!(w.bob.context().imports.iter().filter(|i| i.catalog == "media").count(), 1, "recorded once");
    within("bob's listing after the new share", w.bob.client("media").await.get()).await.expect("bob reads again");
}
