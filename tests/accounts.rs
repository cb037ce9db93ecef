//! The self-hosted operator against a real operator-mode nats-server (full resolver) on a
//! random loopback port: generated config, creds, exports and imports, live JWT pushes, a
//! forged import, bad input, and no seed ever leaving its 0600 file.
//!
//! Every wait is bounded and polls; the server is killed when its guard drops, and its log
//! tail is printed if the test is failing.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use natster_mount::accounts::jwt::{self, AccountNats, Import};
use natster_mount::accounts::{
    catalog_imports, connect, creds_jwt, nsc_import_commands, push_account_jwt, LocalServer, LocalServerOptions,
    Operator,
};
use natster_mount::context::{Home, ImportedCatalog};

/// Bound on one connect/request/receive.
const STEP: Duration = Duration::from_secs(5);
/// Bound on a pushed JWT taking effect.
const APPLY: Duration = Duration::from_secs(10);
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(25);

/// Prints the server log tail if the test fails; the server itself is killed by its own Drop.
struct Guard(LocalServer);

impl Drop for Guard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nats-server log tail ----\n{}\n------------------------------", self.0.log_tail(60));
        }
    }
}

/// Polls `f` until it returns Some, at most `deadline`.
async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Every file under `dir` with its bytes: what "unchanged on disk" compares.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).expect("read"));
            }
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// Every seed the operator keeps on disk (`*.nk` files and the seed block of creds files).
fn seeds_on_disk(dir: &Path) -> Vec<String> {
    let mut seeds = Vec::new();
    for (path, bytes) in snapshot(dir) {
        let text = String::from_utf8_lossy(&bytes);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".nk") || name.ends_with(".creds") {
            seeds.extend(text.lines().map(str::trim).filter(|l| l.len() == 58 && l.starts_with('S')).map(String::from));
        }
    }
    seeds
}

/// Tokens shaped like an nkey seed: `S` + O/A/U + 56 base32 characters.
fn seed_like_tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| {
            t.len() == 58
                && (t.starts_with("SO") || t.starts_with("SA") || t.starts_with("SU"))
                && t.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        })
        .map(String::from)
        .collect()
}

fn jwt_payload_json(token: &str) -> String {
    let part = token.split('.').nth(1).expect("JWT payload");
    String::from_utf8(data_encoding::BASE64URL_NOPAD.decode(part.as_bytes()).expect("base64url")).expect("utf8")
}

async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: &str,
) -> Result<String, async_nats::RequestErrorKind> {
    match tokio::time::timeout(STEP, client.request(subject.to_string(), body.to_string().into())).await {
        Ok(Ok(msg)) => Ok(String::from_utf8_lossy(&msg.payload).into_owned()),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => Err(async_nats::RequestErrorKind::TimedOut),
    }
}

async fn next_message(sub: &mut async_nats::Subscriber, within: Duration) -> Option<async_nats::Message> {
    use futures::StreamExt as _;
    tokio::time::timeout(within, sub.next()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_mode_end_to_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = Home::at(tmp.path().join("home"));
    let mut op = Operator::init(&home).expect("init");
    let again = Operator::init(&home).expect("init is idempotent");
    assert_eq!(again.public_key(), op.public_key());
    assert_eq!(again.system_account_key(), op.system_account_key());

    let alice = op.add_account("alice").expect("alice");
    let bob = op.add_account("bob").expect("bob");
    let eve = op.add_account("eve").expect("eve");
    assert_eq!(op.accounts(), vec![alice.clone(), bob.clone(), eve.clone()]);
    assert_eq!(op.account_by_key(&bob.public_key), Some(bob.clone()));
    assert_eq!(Operator::load(&home).expect("load").accounts(), op.accounts());

    // Secrets on disk: creds and seed files 0600, folders 0700.
    for path in snapshot(op.dir()).keys() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".nk") || name.ends_with(".creds") {
            assert_eq!(mode(path), 0o600, "{}", path.display());
        }
        assert_eq!(mode(path.parent().expect("parent")), 0o700, "{}", path.display());
    }
    assert_eq!(mode(&alice.creds), 0o600);
    assert_eq!(mode(&op.system_creds()), 0o600);

    let log = tmp.path().join("nats-server.log");
    let store = tmp.path().join("store");
    let mut options = LocalServerOptions::new(&store);
    options.trace = true;
    options.log_file = Some(log.clone());
    let server =
        Guard(LocalServer::start(&op, options.clone()).await.expect("nats-server starts with the generated config"));
    let url = server.0.url();

    let a = connect(&url, &alice.creds, STEP).await.expect("alice connects");
    let b = connect(&url, &bob.creds, STEP).await.expect("bob connects");
    let e = connect(&url, &eve.creds, STEP).await.expect("eve connects");
    let sys = connect(&url, &op.system_creds(), STEP).await.expect("system user connects");

    // Alice serves catalogs c and d; every request she sees is reported with its subject.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    for catalog in ["c", "d"] {
        let mut sub = a.subscribe(format!("*.natster.catalog.{catalog}.get")).await.expect("subscribe");
        let (a2, tx) = (a.clone(), seen_tx.clone());
        tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(msg) = sub.next().await {
                let body = String::from_utf8_lossy(&msg.payload).into_owned();
                let _ = tx.send((msg.subject.to_string(), body));
                if let Some(reply) = msg.reply {
                    let _ = a2.publish(reply, msg.subject.to_string().into()).await;
                }
            }
        });
    }
    a.flush().await.expect("flush");

    // Without an import nothing reaches alice.
    assert_eq!(
        request(&b, "natster.catalog.c.get", "bob-early").await,
        Err(async_nats::RequestErrorKind::NoResponders)
    );
    assert_eq!(
        request(&e, "natster.catalog.c.get", "eve-early").await,
        Err(async_nats::RequestErrorKind::NoResponders)
    );

    // Bob imports alice's catalog c; the push takes effect without a restart.
    let bob_jwt = op.add_catalog_import("bob", "c", &alice.public_key).expect("import");
    push_account_jwt(&sys, &bob_jwt).await.expect("server takes bob's new JWT");
    let reply = eventually("bob's request reaches alice", APPLY, || async {
        request(&b, "natster.catalog.c.get", "from-bob").await.ok()
    })
    .await;
    assert_eq!(reply, format!("{}.natster.catalog.c.get", bob.public_key), "alice sees bob's key as first token");
    let (subject, body) = seen_rx.recv().await.expect("alice saw the request");
    assert_eq!((subject.as_str(), body.as_str()), (reply.as_str(), "from-bob"));
    assert_eq!(subject.split('.').next(), Some(bob.public_key.as_str()));

    // Media alice publishes for bob arrives on bob's local subject.
    let mut bob_media = b.subscribe("natster.media.c.*").await.expect("subscribe");
    // A round trip on bob's connection: the server has processed his SUB before alice publishes.
    request(&b, "natster.catalog.c.get", "from-bob-2").await.expect("round trip");
    assert_eq!(seen_rx.recv().await.map(|s| s.1), Some("from-bob-2".into()));
    a.publish(format!("{}.natster.media.c.x", bob.public_key), "chunk".into()).await.expect("publish");
    a.flush().await.expect("flush");
    let msg = next_message(&mut bob_media, STEP).await.expect("bob receives alice's media");
    assert_eq!(msg.subject.as_str(), "natster.media.c.x");
    assert_eq!(&msg.payload[..], b"chunk");

    // Eve still has no import: no responders.
    assert_eq!(
        request(&e, "natster.catalog.c.get", "eve-plain").await,
        Err(async_nats::RequestErrorKind::NoResponders)
    );

    // Eve forges imports that name bob's key in the remote subjects (signed by the operator,
    // so only the export's account token position stands in the way), plus one honest import
    // of catalog d that shows when the JWT has been applied.
    let mut forged = op.account_claims("eve").expect("claims");
    forged.nats.imports.push(Import {
        name: "natster_c".into(),
        subject: format!("{}.natster.catalog.c.>", bob.public_key),
        account: alice.public_key.clone(),
        local_subject: Some("natster.catalog.c.>".into()),
        to: None,
        kind: jwt::ExportType::Service,
    });
    forged.nats.imports.push(Import {
        name: "natster_c_media".into(),
        subject: format!("{}.natster.media.c.*", bob.public_key),
        account: alice.public_key.clone(),
        local_subject: Some("natster.media.c.*".into()),
        to: None,
        kind: jwt::ExportType::Stream,
    });
    forged.nats.imports.extend(catalog_imports(&eve.public_key, "d", &alice.public_key).expect("imports"));
    let forged_jwt = op.sign_account(&mut forged).expect("sign");
    // Fact found: nats-server stores the JWT (the claims are valid) and answers 200; the
    // token-position check happens when the imports are wired up, and drops the forged ones.
    push_account_jwt(&sys, &forged_jwt).await.expect("server takes the JWT but not the forged imports");
    let reply = eventually("eve's honest import of d takes effect", APPLY, || async {
        request(&e, "natster.catalog.d.get", "eve-d").await.ok()
    })
    .await;
    assert_eq!(reply, format!("{}.natster.catalog.d.get", eve.public_key));
    let mut eve_media = e.subscribe("natster.media.c.*").await.expect("subscribe");
    request(&e, "natster.catalog.d.get", "eve-d").await.expect("round trip after SUB");
    assert_eq!(
        request(&e, "natster.catalog.c.get", "from-eve").await,
        Err(async_nats::RequestErrorKind::NoResponders),
        "the forged service import is inert"
    );
    a.publish(format!("{}.natster.media.c.y", bob.public_key), "for-bob".into()).await.expect("publish");
    a.flush().await.expect("flush");
    let msg = next_message(&mut bob_media, STEP).await.expect("bob receives");
    assert_eq!(&msg.payload[..], b"for-bob");
    assert!(
        next_message(&mut eve_media, QUIET).await.is_none(),
        "the forged stream import must not deliver bob's media"
    );
    let mut seen = Vec::new();
    while let Ok(s) = seen_rx.try_recv() {
        seen.push(s);
    }
    assert_eq!(
        seen,
        vec![(format!("{}.natster.catalog.d.get", eve.public_key), "eve-d".to_string()); 2],
        "alice saw only eve's honest request, never one carrying bob's key"
    );

    // Removing bob's import cuts him off, again without a restart.
    let bob_jwt = op.remove_catalog_import("bob", "c", &alice.public_key).expect("remove");
    push_account_jwt(&sys, &bob_jwt).await.expect("push");
    eventually("bob's import is gone", APPLY, || async {
        (request(&b, "natster.catalog.c.get", "bob-late").await == Err(async_nats::RequestErrorKind::NoResponders))
            .then_some(())
    })
    .await;

    // Claims the server's validation rejects: an account token position that is not a `*`.
    let mut invalid = op.account_claims("eve").expect("claims");
    invalid.nats.exports[0].account_token_position = Some(2);
    let invalid_jwt = op.sign_account(&mut invalid).expect("sign");
    let err = push_account_jwt(&sys, &invalid_jwt).await.expect_err("invalid claims");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    // Only the system user can push; garbage never leaves the process.
    let err = push_account_jwt(&b, &bob_jwt).await.expect_err("a user account cannot push");
    assert!(format!("{err:#}").contains("no nats-server answered"), "{err:#}");
    assert!(push_account_jwt(&sys, "not.a.jwt").await.is_err());

    // A JWT signed by another operator: ours refuses it. nats-server 2.9.10 acknowledges it and
    // writes it to the resolver store without checking the issuer; the live account is kept
    // (its verification fails), but the poisoned store would refuse the account whenever it is
    // loaded again. Pushing the trusted JWT repairs the store.
    let rogue = nkeys::KeyPair::new_operator();
    let mut claims = op.account_claims("eve").expect("claims");
    let rogue_jwt = jwt::encode(&mut claims, &rogue).expect("encode");
    let err = op.verify_account_jwt(&rogue_jwt).expect_err("untrusted issuer");
    assert!(format!("{err:#}").contains("not by this operator"), "{err:#}");
    let eve_jwt = op.account_jwt("eve").expect("jwt");
    op.verify_account_jwt(&eve_jwt).expect("our own JWT verifies");
    let stored_eve = || std::fs::read_to_string(store.join("jwt").join(format!("{}.jwt", eve.public_key)));
    match push_account_jwt(&sys, &rogue_jwt).await {
        Err(err) => assert!(format!("{err:#}").contains("refused"), "{err:#}"),
        Ok(()) => {
            assert_eq!(stored_eve().expect("resolver file").trim(), rogue_jwt, "2.9.10 stores it");
            let reply = request(&e, "natster.catalog.d.get", "eve-live").await.expect("live account unchanged");
            assert_eq!(reply, format!("{}.natster.catalog.d.get", eve.public_key));
            op.push_account(&sys, "eve").await.expect("push the trusted JWT again");
            assert_eq!(stored_eve().expect("resolver file").trim(), eve_jwt, "the trusted JWT is back");
        }
    }

    // A restart on the same store: the config's resolver_preload carries bob's newer JWT (an
    // import that was never pushed), which replaces the older one in the resolver folder.
    op.add_catalog_import("bob", "c", &alice.public_key).expect("import again");
    for client in [&a, &b, &e, &sys] {
        let _ = client.drain().await;
    }
    drop(server);
    let server = Guard(LocalServer::start(&op, options).await.expect("restart"));
    let url = server.0.url();
    let a = connect(&url, &alice.creds, STEP).await.expect("alice reconnects");
    let b = connect(&url, &bob.creds, STEP).await.expect("bob reconnects");
    let mut sub = a.subscribe("*.natster.catalog.c.get").await.expect("subscribe");
    let a2 = a.clone();
    tokio::spawn(async move {
        use futures::StreamExt as _;
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = a2.publish(reply, msg.subject.to_string().into()).await;
            }
        }
    });
    a.flush().await.expect("flush");
    let reply = eventually("bob's preloaded import works after a restart", APPLY, || async {
        request(&b, "natster.catalog.c.get", "after-restart").await.ok()
    })
    .await;
    assert_eq!(reply, format!("{}.natster.catalog.c.get", bob.public_key));

    // No seed in the server log (which traced every CONNECT) nor in any JWT.
    let seeds = seeds_on_disk(op.dir());
    assert_eq!(seeds.len(), 1 + 6 * 2, "operator + (account, user) x (SYS, global, hub, alice, bob, eve)");
    let log_text = std::fs::read_to_string(&log).expect("log");
    assert!(log_text.contains("CONNECT"), "the log is a protocol trace");
    let mut jwts = vec![op.jwt().to_string(), op.system_account_jwt().to_string(), forged_jwt, invalid_jwt, rogue_jwt];
    for account in op.accounts() {
        jwts.push(op.account_jwt(&account.name).expect("jwt"));
        let creds = std::fs::read_to_string(&account.creds).expect("creds");
        jwts.push(creds_jwt(&creds).expect("creds JWT").to_string());
    }
    for seed in &seeds {
        assert!(!log_text.contains(seed.as_str()), "a seed appears in the nats-server log");
        for token in &jwts {
            assert!(!token.contains(seed.as_str()) && !jwt_payload_json(token).contains(seed.as_str()));
        }
    }
    assert_eq!(seed_like_tokens(&log_text), Vec::<String>::new(), "seed-shaped token in the server log");
    for token in &jwts {
        assert_eq!(seed_like_tokens(&jwt_payload_json(token)), Vec::<String>::new());
    }
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = Home::at(tmp.path().join("home"));
    let mut op = Operator::init(&home).expect("init");
    let alice = op.add_account("alice").expect("alice");
    let bob = op.add_account("bob").expect("bob");
    let user_key = nkeys::KeyPair::new_user().public_key();
    let before = snapshot(op.dir());

    let err = |r: anyhow::Result<String>| format!("{:#}", r.expect_err("must fail"));
    let e = format!("{:#}", op.add_account("alice").expect_err("duplicate"));
    assert!(e.contains("already exists"), "{e}");
    for bad in ["", "a.b", "a b", "a/b", "..", "ünï", "SYS"] {
        let e = format!("{:#}", op.add_account(bad).expect_err("bad name"));
        assert!(e.contains("account name"), "{bad:?}: {e}");
    }
    let e = err(op.add_catalog_import("nobody", "c", &alice.public_key));
    assert!(e.contains("no account 'nobody'") && e.contains("alice, bob"), "{e}");
    for bad_key in ["AXXXX", &user_key, &alice.public_key.to_lowercase(), &format!("{}x", alice.public_key)] {
        let e = err(op.add_catalog_import("bob", "c", bad_key));
        assert!(e.contains("not an account public key"), "{e}");
    }
    let mut broken = alice.public_key.clone().into_bytes();
    broken[10] = if broken[10] == b'B' { b'C' } else { b'B' };
    let e = err(op.add_catalog_import("bob", "c", &String::from_utf8(broken).expect("ascii")));
    assert!(e.contains("not an account public key"), "bad checksum: {e}");
    let e = err(op.add_catalog_import("bob", "c", &bob.public_key));
    assert!(e.contains("own catalogs"), "{e}");
    for bad in ["c.>", "*", "", "c d"] {
        let e = err(op.add_catalog_import("bob", bad, &alice.public_key));
        assert!(e.contains("catalog name"), "{e}");
    }
    let e = err(op.remove_catalog_import("bob", "c", &alice.public_key));
    assert!(e.contains("does not import"), "{e}");
    assert_eq!(snapshot(op.dir()), before, "failed operations changed files");
    assert_eq!(op.accounts().len(), 2);

    let jwt = op.add_catalog_import("bob", "c", &alice.public_key).expect("import");
    let claims: jwt::Claims<AccountNats> = jwt::decode(&jwt).expect("decode");
    assert_eq!(claims.iss, op.public_key());
    // The two of the global service's that every account has, and the catalog's two.
    assert_eq!(claims.nats.imports.len(), 4);
    let after_import = snapshot(op.dir());
    let e = err(op.add_catalog_import("bob", "c", &alice.public_key));
    assert!(e.contains("already imports catalog 'c'"), "{e}");
    let carol = op.add_account("carol").expect("carol");
    let after_carol = snapshot(op.dir());
    let e = err(op.add_catalog_import("bob", "c", &carol.public_key));
    assert!(e.contains("remove that one first"), "same catalog name from a second owner: {e}");
    assert_eq!(snapshot(op.dir()), after_carol);
    assert_eq!(after_carol.len(), after_import.len() + 3);

    // Catalog names that look like each other's import names stay apart ("x" has a stream
    // import named natster_x_media; catalog "x_media" has a service import of that name).
    op.add_catalog_import("bob", "x", &alice.public_key).expect("x");
    op.add_catalog_import("bob", "x_media", &alice.public_key).expect("x_media");
    op.remove_catalog_import("bob", "x_media", &alice.public_key).expect("remove x_media");
    let names: Vec<String> =
        op.account_claims("bob").expect("claims").nats.imports.iter().map(|i| i.name.clone()).collect();
    assert_eq!(
        names,
        ["natster_global", "natster_global_events", "natster_c", "natster_c_media", "natster_x", "natster_x_media"]
    );
    op.remove_catalog_import("bob", "x", &alice.public_key).expect("remove x");
    let jwt = op.account_jwt("bob").expect("jwt");

    // Everything survives a reload from disk.
    let loaded = Operator::load(&home).expect("load");
    assert_eq!(loaded.accounts(), op.accounts());
    assert_eq!(
        loaded.catalog_imports("bob").expect("imports"),
        vec![ImportedCatalog::per_catalog("c", &alice.public_key)]
    );
    assert_eq!(loaded.account_jwt("bob").expect("jwt"), jwt);

    // Exports are exactly the two Natster ones.
    let alice_claims = loaded.account_claims("alice").expect("claims");
    let exports: Vec<(&str, &str, Option<u32>)> = alice_claims
        .nats
        .exports
        .iter()
        .map(|x| (x.name.as_str(), x.subject.as_str(), x.account_token_position))
        .collect();
    assert_eq!(
        exports,
        vec![("natster_catalog", "*.natster.catalog.>", Some(1)), ("natster_media", "*.natster.media.*.*", Some(1))]
    );

    // Config: operator mode with a full resolver preloaded with every account.
    let store = tmp.path().join("store");
    let conf = loaded.server_config(4222, &store);
    for needle in [
        "listen: \"127.0.0.1:4222\"".to_string(),
        format!("operator: \"{}\"", loaded.jwt_path().display()),
        format!("system_account: {}", loaded.system_account_key()),
        "type: full".into(),
        "allow_delete: false".into(),
        format!("{}: \"{}\"", bob.public_key, jwt),
        format!("{}: \"{}\"", loaded.system_account_key(), loaded.system_account_jwt()),
        format!("store_dir: \"{}\"", store.display()),
    ] {
        assert!(conf.contains(&needle), "config lacks {needle}:\n{conf}");
    }

    // nsc lines for an account this operator does not manage.
    let foreign = nkeys::KeyPair::new_account().public_key();
    let lines = nsc_import_commands("me", &foreign, "movies", &alice.public_key).expect("nsc");
    assert_eq!(
        lines,
        vec![
            format!(
                "nsc add import --account 'me' --name 'natster_movies' --src-account {} --remote-subject \
                 '{foreign}.natster.catalog.movies.>' --local-subject 'natster.catalog.movies.>' --service",
                alice.public_key
            ),
            format!(
                "nsc add import --account 'me' --name 'natster_movies_media' --src-account {} --remote-subject \
                 '{foreign}.natster.media.movies.*' --local-subject 'natster.media.movies.*'",
                alice.public_key
            ),
        ]
    );
    assert!(nsc_import_commands("me", &foreign, "movies", "nope").is_err());
    assert!(nsc_import_commands("me", &foreign, "a.b", &alice.public_key).is_err());
    assert!(nsc_import_commands("me", &foreign, "movies", &foreign).is_err());
}
