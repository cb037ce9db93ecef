//! Imports that scale and names that cannot clash, on a real operator-mode nats-server:
//! - what nats-server allows for per-owner imports (mapping, wildcards, token position, an
//!   exporter of named catalogs only), with hand-made JWTs;
//! - bob imports 3,000 catalogs from 30 owners, every owner using the same 100 names: all
//!   succeed, his JWT holds 60 imports, the two `movies` read their own bytes, and the owners'
//!   share lists still refuse bob and eve what is not shared with them;
//! - a push the server refuses (its JWT store cannot be written) leaves the context, the local
//!   JWT and the server in agreement, for an import and an unimport; and two owners' `movies`
//!   both show in the mount.
//!
//! Figures (JWT size, time of the last import) are printed; nothing asserts on speed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mounted::{bounded, fuse_available_for, Mounted, MOUNT_IO_DEADLINE};
use common::operator::*;
use common::*;
use futures::StreamExt;
use natster_mount::accounts::jwt::{Export, ExportType, Import};
use natster_mount::accounts::{
    catalog_imports, connect, lookup_account_jwt, owner_imports, push_account_jwt, Applied, LocalServer,
    LocalServerOptions, Operator,
};
use natster_mount::client::{CatalogClient, ClientError};
use natster_mount::context::{shown_names, Home, ImportedCatalog};
use natster_mount::identity::{Identity, PinStore};
use natster_mount::imports::{self, AccountSide, ImportRequest};
use natster_mount::protocol::{Operation, Route};
use natster_mount::shares::ShareList;

const STEP: Duration = Duration::from_secs(5);
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(500);

/// Bare request: the reply's text, or the kind of error.
async fn request(c: &async_nats::Client, subject: &str) -> Result<String, async_nats::RequestErrorKind> {
    match tokio::time::timeout(STEP, c.request(subject.to_string(), "x".into())).await {
        Ok(Ok(m)) => Ok(String::from_utf8_lossy(&m.payload).into_owned()),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => Err(async_nats::RequestErrorKind::TimedOut),
    }
}

/// The account JWT the server's resolver holds for `key`.
async fn server_jwt(sys: &async_nats::Client, key: &str) -> String {
    lookup_account_jwt(sys, key).await.expect("lookup")
}

fn import(name: &str, subject: String, account: &str, local: String, kind: ExportType) -> Import {
    Import { name: name.into(), subject, account: account.into(), local_subject: Some(local), to: None, kind }
}

/// Answers every catalog request of `nats` with the subject it arrived on.
async fn echo_requests(nats: &async_nats::Client) {
    let mut sub = nats.subscribe("*.natster.catalog.>").await.expect("subscribe");
    let client = nats.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, msg.subject.to_string().into()).await;
            }
        }
    });
    nats.flush().await.expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_nats_allows_for_per_owner_imports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = Home::at(tmp.path().join("home"));
    let mut op = Operator::init(&home).expect("operator");
    let alice = op.add_account("alice").expect("alice");
    let narrow = op.add_account("narrow").expect("narrow");
    let bob = op.add_account("bob").expect("bob");
    let eve = op.add_account("eve").expect("eve");
    let server = LocalServer::start(&op, LocalServerOptions::new(tmp.path().join("store"))).await.expect("server");
    let url = server.url();
    let sys = connect(&url, &op.system_creds(), STEP).await.expect("sys");
    let a = connect(&url, &alice.creds, STEP).await.expect("alice");
    let n = connect(&url, &narrow.creds, STEP).await.expect("narrow");
    let b = connect(&url, &bob.creds, STEP).await.expect("bob");
    let e = connect(&url, &eve.creds, STEP).await.expect("eve");
    echo_requests(&a).await;
    echo_requests(&n).await;
    let (ak, nk, bk, ek) = (&alice.public_key, &narrow.public_key, &bob.public_key, &eve.public_key);

    // `narrow` exports only its catalog `movies` (as an nsc user might), not `*.natster.catalog.>`.
    let mut claims = op.account_claims("narrow").expect("claims");
    claims.nats.exports = vec![
        Export {
            name: "movies".into(),
            subject: "*.natster.catalog.movies.>".into(),
            kind: ExportType::Service,
            account_token_position: Some(1),
        },
        Export {
            name: "movies_media".into(),
            subject: "*.natster.media.movies.*".into(),
            kind: ExportType::Stream,
            account_token_position: Some(1),
        },
    ];
    push_account_jwt(&sys, &op.sign_account(&mut claims).expect("sign")).await.expect("narrow's exports");

    // Bob: the per-owner imports of alice and of narrow, and a per-catalog import of narrow's movies.
    let mut claims = op.account_claims("bob").expect("claims");
    claims.nats.imports.extend(owner_imports(bk, ak).expect("imports"));
    claims.nats.imports.extend(owner_imports(bk, nk).expect("imports"));
    claims.nats.imports.extend(catalog_imports(bk, "movies", nk).expect("imports"));
    push_account_jwt(&sys, &op.sign_account(&mut claims).expect("sign")).await.expect("bob's imports");
    let alice_route = Route::Owner(ak.clone());
    let via_alice = wait_for("bob's per-owner import of alice", STEP, || async {
        request(&b, &alice_route.request_subject("movies", Operation::Get)).await.ok()
    })
    .await;
    // `>` maps to `>`: alice sees bob's key first, then the catalog and operation.
    assert_eq!(via_alice, format!("{bk}.natster.catalog.movies.get"));
    assert_eq!(
        request(&b, &alice_route.request_subject("anything", Operation::Open)).await,
        Ok(format!("{bk}.natster.catalog.anything.open")),
        "one import reaches every catalog name; the owner's share list decides"
    );
    // An exporter of named catalogs: the per-owner (wildcard) import is not a subset of its
    // export, so it is inert, while the per-catalog import works.
    let narrow_route = Route::Owner(nk.clone());
    assert_eq!(
        request(&b, &narrow_route.request_subject("movies", Operation::Get)).await,
        Err(async_nats::RequestErrorKind::NoResponders)
    );
    assert_eq!(
        request(&b, &Route::Direct.request_subject("movies", Operation::Get)).await,
        Ok(format!("{bk}.natster.catalog.movies.get"))
    );

    // Media: `*.*` maps in order onto the owner's namespace.
    let mut media = b.subscribe(format!("{}.>", natster_mount::protocol::owner_prefix(ak))).await.expect("sub");
    let mut direct_media = b.subscribe("natster.media.>").await.expect("sub");
    request(&b, &alice_route.request_subject("movies", Operation::Get)).await.expect("round trip after SUB");
    // Bob's own request on that subject comes back to his own subscription first.
    let own = tokio::time::timeout(STEP, media.next()).await.expect("own request").expect("message");
    assert!(own.subject.as_str().contains(".catalog."), "{}", own.subject);
    a.publish(format!("{bk}.natster.media.movies.s1"), "chunk".into()).await.expect("publish");
    a.flush().await.expect("flush");
    let msg = tokio::time::timeout(STEP, media.next()).await.expect("media in time").expect("message");
    assert_eq!(msg.subject.as_str(), alice_route.media_wildcard("movies").replace('*', "s1"));
    assert_eq!(&msg.payload[..], b"chunk");
    n.publish(format!("{bk}.natster.media.movies.s2"), "narrow".into()).await.expect("publish");
    n.flush().await.expect("flush");
    let msg = tokio::time::timeout(STEP, direct_media.next()).await.expect("media in time").expect("message");
    assert_eq!(msg.subject.as_str(), "natster.media.movies.s2", "narrow's media, per catalog only");

    // Eve forges per-owner imports of alice naming bob's key, and one with a `*` where her
    // key must be, beside an honest one: the JWT is taken, the forged imports are inert.
    let mut claims = op.account_claims("eve").expect("claims");
    let forged = [
        import("f", format!("{bk}.natster.catalog.>"), ak, "natster.forged.catalog.>".into(), ExportType::Service),
        import("fm", format!("{bk}.natster.media.*.*"), ak, "natster.forged.media.*.*".into(), ExportType::Stream),
        import("w", "*.natster.catalog.>".into(), ak, "natster.wild.*.catalog.>".into(), ExportType::Service),
        import("wm", "*.natster.media.*.*".into(), ak, "natster.wild.*.media.*.*".into(), ExportType::Stream),
    ];
    claims.nats.imports.extend(forged);
    claims.nats.imports.extend(owner_imports(ek, ak).expect("imports"));
    push_account_jwt(&sys, &op.sign_account(&mut claims).expect("sign")).await.expect("taken with 200");
    let honest = wait_for("eve's honest import", STEP, || async {
        request(&e, &alice_route.request_subject("movies", Operation::Get)).await.ok()
    })
    .await;
    assert_eq!(honest, format!("{ek}.natster.catalog.movies.get"), "alice sees eve as eve");
    for subject in ["natster.forged.catalog.movies.get".to_string(), format!("natster.wild.{bk}.catalog.movies.get")] {
        assert_eq!(request(&e, &subject).await, Err(async_nats::RequestErrorKind::NoResponders), "{subject}");
    }
    let mut eve_sees = e.subscribe("natster.>").await.expect("sub");
    request(&e, &alice_route.request_subject("movies", Operation::Get)).await.expect("round trip after SUB");
    let _own_request = tokio::time::timeout(STEP, eve_sees.next()).await.expect("own request");
    a.publish(format!("{bk}.natster.media.movies.s3"), "for bob".into()).await.expect("publish");
    a.flush().await.expect("flush");
    assert!(tokio::time::timeout(QUIET, eve_sees.next()).await.is_err(), "bob's media reached eve");

    // A local subject with fewer wildcards than its subject: the server refuses the whole JWT.
    let mut claims = op.account_claims("eve").expect("claims");
    claims.nats.imports.push(import(
        "bad",
        format!("{ek}.natster.media.*.*"),
        ak,
        "natster.bad.media.*".into(),
        ExportType::Stream,
    ));
    let err = push_account_jwt(&sys, &op.sign_account(&mut claims).expect("sign")).await.expect_err("refused");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
}

/// One person's folder of a single file, indexed as catalog `name`, shared with `with`.
async fn catalog_with_file(person: &Person, name: &str, bytes: &[u8], with: &str) -> tempfile::TempDir {
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    write_file(tree.path(), "film.bin", bytes);
    person.run(&["catalog", "new", name, tree.path().to_str().expect("utf-8")]).await.assert_success("catalog new");
    if !with.is_empty() {
        person.run(&["catalog", "share", name, with]).await.assert_success("share");
    }
    tree
}

/// Waits until `person`'s own catalog `name` answers.
async fn until_served(person: &Person, name: &str) {
    let client = person.client(name).await;
    wait_for(&format!("catalog {name} served"), Duration::from_secs(20), || {
        let client = client.clone();
        async move { client.get().await.ok().map(|_| ()) }
    })
    .await;
}

/// A client for `catalog` of `owner` through the per-owner imports, trusting only the owner.
fn via_owner(nats: &async_nats::Client, catalog: &str, owner: &str) -> CatalogClient {
    let import = ImportedCatalog::via_owner(catalog, owner);
    CatalogClient::for_import(
        nats.clone(),
        &import,
        test_options(),
        Identity::ephemeral().into(),
        PinStore::in_memory(),
    )
    .expect("client")
}

/// The whole of file `/film.bin` of the catalog `person` reads as `name`.
async fn read_film(client: &CatalogClient) -> Vec<u8> {
    let listing = within("listing", client.get()).await.expect("listing");
    let entry = listing.entries.iter().find(|e| e.path == "/film.bin").expect("film.bin listed").clone();
    let file = within("open", client.open(&entry.hash, Some(entry.byte_size))).await.expect("open");
    within("read", file.read_range(0, entry.byte_size as usize)).await.expect("read")
}

const OWNERS: usize = 30;
const CATALOGS_PER_OWNER: usize = 100;

/// How the test world's bob makes his imports.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// Each owner's catalogs in one `imports::add` (as an "import all" would).
    PerOwner,
    /// One `imports::add` per catalog, as 3,000 `catalog import` runs would.
    OneByOne,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bob_imports_3000_catalogs_from_30_owners() {
    thirty_owners(Pace::PerOwner).await;
}

/// The same, one import at a time: each rewrites (and syncs) bob's growing context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 3,000 imports one at a time, about a minute; run with --ignored --nocapture for its figures"]
async fn soak_bob_imports_3000_catalogs_one_by_one() {
    thirty_owners(Pace::OneByOne).await;
}

async fn thirty_owners(pace: Pace) {
    let operator_dir = operator_dir();
    let op_home = operator_dir.path().to_path_buf();
    operator_init(&op_home, free_port());
    let _up = OperatorUp::start(&op_home);
    let bob = Person::with_account(&op_home, "bob").await;
    let eve = Person::with_account(&op_home, "eve").await;
    let started = Instant::now();
    let mut owners = Vec::new();
    for i in 0..OWNERS {
        owners.push(Person::with_account(&op_home, &format!("owner{i:02}")).await);
    }
    eprintln!("{OWNERS} owner accounts in {:.1} s", started.elapsed().as_secs_f64());
    let bob_key = bob.key();

    // Owners 0 and 1 each serve a `movies` of their own bytes, shared with bob; owner 0 also
    // serves `secret`, shared with nobody.
    let films = [pseudo_random_bytes(1, 300 * 1024 + 7), pseudo_random_bytes(2, 200 * 1024 + 3)];
    let _trees = [
        catalog_with_file(&owners[0], "movies", &films[0], "bob").await,
        catalog_with_file(&owners[1], "movies", &films[1], "bob").await,
        catalog_with_file(&owners[0], "secret", b"not for bob", "").await,
    ];
    let _served =
        [Serve::start(&owners[0], "movies"), Serve::start(&owners[1], "movies"), Serve::start(&owners[0], "secret")];
    until_served(&owners[0], "movies").await;
    until_served(&owners[1], "movies").await;
    until_served(&owners[0], "secret").await;

    // Every owner shares 100 catalogs with bob, all owners using the same 100 names (movies is
    // one of them for owners 0 and 1). Share lists through the library: 3,000 CLI runs would
    // only measure process starts.
    let names = |i: usize| -> Vec<String> {
        (0..CATALOGS_PER_OWNER).map(|j| if j == 0 && i < 2 { "movies".into() } else { format!("c{j:03}") }).collect()
    };
    for (i, owner) in owners.iter().enumerate() {
        for name in names(i).into_iter().filter(|n| n != "movies") {
            ShareList { catalog: name, accounts: vec![bob_key.clone()] }.save(&owner.home.home()).expect("share");
        }
    }

    // Bob imports all but the last through the library, as `catalog import` does; the last,
    // owner 1's `movies`, through the CLI.
    let mut operator = Operator::load(&Home::at(&op_home)).expect("operator");
    let bob_home = bob.home.home();
    let mut pushes = Vec::new();
    let mut count = 0usize;
    let all = Instant::now();
    for (i, owner) in owners.iter().enumerate() {
        let key = owner.key();
        let requests: Vec<ImportRequest> = names(i)
            .into_iter()
            .filter(|name| !(i == 1 && name == "movies"))
            .map(|name| ImportRequest { owner_name: Some(format!("owner{i:02}")), ..ImportRequest::new(&name, &key) })
            .collect();
        let batches: Vec<&[ImportRequest]> = match pace {
            Pace::PerOwner => vec![&requests[..]],
            Pace::OneByOne => requests.chunks(1).collect(),
        };
        for batch in batches {
            let one = Instant::now();
            let side = AccountSide::Managed { operator: &mut operator, account: "bob" };
            let added = imports::add(&bob_home, "default", side, batch).await.expect("import");
            count += added.imports.len();
            if added.applied == Applied::Pushed {
                pushes.push((count, added.imports.len(), one.elapsed()));
            }
        }
    }
    let library_time = all.elapsed();
    assert_eq!(pushes.len(), OWNERS, "one push per owner, none per catalog");
    // The server builds an account's imports at its first connection after a change (tens of
    // ms with 60 imports); a running mount would have paid that already.
    let bob_nats = bob.nats().await;
    let last = Instant::now();
    let cli = bob.run(&["catalog", "import", "movies", "owner01"]).await;
    let last_import = last.elapsed();
    cli.assert_success("the 3,000th import");
    count += 1;
    assert!(cli.stdout.contains("as 'movies@owner01' (another catalog has that name)"), "{}", cli.stdout);
    assert!(cli.stdout.contains("the owner's server answered: 1 files"), "{}", cli.stdout);

    // All succeeded, each under a name of its own; the JWT holds two imports per owner.
    let mut context = bob.context();
    // The hub, which every account of the operator imports, aside.
    context.imports.retain(|i| i.catalog != "hub");
    assert_eq!((count, context.imports.len()), (OWNERS * CATALOGS_PER_OWNER, OWNERS * CATALOGS_PER_OWNER));
    let shown = shown_names(&[], &context.imports);
    assert_eq!(shown.iter().collect::<std::collections::HashSet<_>>().len(), shown.len(), "names repeat");
    assert!(shown.contains(&"movies".to_string()) && shown.contains(&"movies@owner01".to_string()));
    assert!(shown.contains(&"c007@owner29".to_string()), "a name 30 owners use");
    let operator = Operator::load(&Home::at(&op_home)).expect("operator");
    assert_eq!(operator.owner_imports("bob").expect("owners").len(), OWNERS);
    let jwt = operator.account_jwt("bob").expect("jwt");
    let mut claims = operator.account_claims("bob").expect("claims");
    // The network's imports (the global service's two, the hub's two) aside.
    let network: Vec<String> =
        operator.global_account_key().into_iter().chain(operator.hub_account().map(|h| h.public_key)).collect();
    claims.nats.imports.retain(|i| !network.contains(&i.account));
    assert_eq!(claims.nats.imports.len(), 2 * OWNERS, "two imports per owner, none per catalog");
    let (push_at, push_batch, push_took) = pushes.last().copied().expect("owners");
    eprintln!(
        "bob: {} imports from {OWNERS} owners; account JWT {} bytes ({} imports); {} library calls in {:.1} s; last \
         push (owner {OWNERS}'s first, {push_batch} catalog(s), ending at import #{push_at}) {:.1} ms; last import \
         (CLI, #{count}, process start and the owner's answer included) {:.0} ms",
        context.imports.len(),
        jwt.len(),
        claims.nats.imports.len(),
        if pace == Pace::PerOwner { OWNERS } else { count - 1 },
        library_time.as_secs_f64(),
        push_took.as_secs_f64() * 1000.0,
        last_import.as_secs_f64() * 1000.0,
    );
    assert!(jwt.len() < 64 * 1024, "bob's JWT is {} bytes", jwt.len());
    let context_bytes = std::fs::metadata(bob_home.context_path("default")).expect("context").len();
    eprintln!("bob's context file: {context_bytes} bytes");
    if pace == Pace::OneByOne {
        // A few more single imports at 3,000 through the CLI (each an unimport and an import,
        // neither needing a push): the time of one import is not one sample's luck.
        let mut times = Vec::new();
        for _ in 0..5 {
            bob.run(&["catalog", "unimport", "movies@owner01"]).await.assert_success("unimport");
            let t = Instant::now();
            bob.run(&["catalog", "import", "movies", "owner01"]).await.assert_success("import again");
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "CLI import at 3,000, 5 runs: min {:.0} ms, median {:.0} ms, max {:.0} ms",
            times[0], times[2], times[4]
        );
    }
    let url = context.server.clone();
    let sys = connect(&url, &operator.system_creds(), STEP).await.expect("sys");
    assert_eq!(server_jwt(&sys, &bob_key).await, jwt, "the server holds bob's local JWT");

    // `catalog ls` lists every import by its name.
    let ls = bob.run(&["catalog", "ls"]).await;
    ls.assert_success("ls");
    // The imported section ends where the next header (presence, pending shares) starts; the
    // hub, which every account imports, aside.
    let listed = ls
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("imported"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.trim_start().starts_with("hub "))
        .count();
    assert_eq!(listed, OWNERS * CATALOGS_PER_OWNER, "catalog ls");
    assert!(ls.stdout.contains(&format!("  movies@owner01 from {} (owner01)", owners[1].key())), "{}", ls.stdout);

    // Eve listens for any media while bob reads both `movies`: each reads its own bytes.
    let eve_nats = eve.nats().await;
    let refused = via_owner(&eve_nats, "movies", &owners[1].key()).get().await;
    assert!(matches!(refused, Err(ClientError::NoResponders(_))), "eve has no import of owner 1: {refused:?}");
    let mut eve_sees = eve_nats.subscribe("natster.>").await.expect("sub");
    eve_nats.flush().await.expect("flush");
    assert_eq!(read_film(&bob.client("movies").await).await, films[0], "owner 0's movies");
    assert_eq!(read_film(&bob.client("movies@owner01").await).await, films[1], "owner 1's movies");
    assert!(tokio::time::timeout(QUIET, eve_sees.next()).await.is_err(), "media reached eve");

    // The gate stays per catalog: bob's import of owner 0 reaches `secret`, which its share
    // list refuses; eve imports owner 0's movies and is refused too.
    let secret = via_owner(&bob_nats, "secret", &owners[0].key()).get().await;
    assert!(matches!(secret, Err(ClientError::Refused { code: 403, .. })), "{secret:?}");
    let eve_import = eve.run(&["catalog", "import", "movies", "owner00"]).await;
    eve_import.assert_success("eve imports");
    assert!(eve_import.stderr.contains("answered 403"), "{}", eve_import.stderr);
    let refused = eve.client("movies").await.get().await;
    assert!(matches!(refused, Err(ClientError::Refused { code: 403, .. })), "{refused:?}");
}

/// The resolver's file for `key` under an `operator up` in `op_home`.
fn resolver_file(op_home: &Path, key: &str) -> PathBuf {
    op_home.join("operator/server/jwt").join(format!("{key}.jwt"))
}

/// Makes the server's JWT store refuse updates of `key` (its file becomes a folder, which no
/// one, root included, can write a JWT into) until dropped.
struct StoreRefuses {
    file: PathBuf,
    aside: PathBuf,
}

impl StoreRefuses {
    fn new(file: PathBuf) -> StoreRefuses {
        let aside = file.with_extension("jwt.aside");
        std::fs::rename(&file, &aside).expect("move the JWT aside");
        std::fs::create_dir(&file).expect("a folder in its place");
        StoreRefuses { file, aside }
    }
}

impl Drop for StoreRefuses {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.file);
        let _ = std::fs::rename(&self.aside, &self.file);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_push_changes_nothing_and_same_names_both_mount() {
    let operator_dir = operator_dir();
    let op_home = operator_dir.path().to_path_buf();
    operator_init(&op_home, free_port());
    let up = OperatorUp::start(&op_home);
    let alice = Person::with_account(&op_home, "alice").await;
    let bob = Person::with_account(&op_home, "bob").await;
    let dave = Person::with_account(&op_home, "dave").await;
    let carol = Person::with_account(&op_home, "carol").await;
    let films = [b"alice's film\n".to_vec(), b"bob's film, not alice's\n".to_vec()];
    let _trees = [
        catalog_with_file(&alice, "movies", &films[0], "carol").await,
        catalog_with_file(&bob, "movies", &films[1], "carol").await,
    ];
    let _served = [Serve::start(&alice, "movies"), Serve::start(&bob, "movies")];
    until_served(&alice, "movies").await;
    until_served(&bob, "movies").await;

    carol.run(&["catalog", "import", "movies", "alice"]).await.assert_success("alice's movies");
    let second = carol.run(&["catalog", "import", "movies", "bob"]).await;
    second.assert_success("bob's movies, the same name");
    assert!(second.stdout.contains("as 'movies@bob'"), "{}", second.stdout);
    let contents = carol.run(&["catalog", "contents", "movies@bob"]).await;
    contents.assert_success("contents of movies@bob");
    assert!(contents.stdout.contains("catalog 'movies'"), "{}", contents.stdout);

    if fuse_available_for("imports_scale::a_refused_push_changes_nothing_and_same_names_both_mount (its mount part)") {
        let m = Mounted::start(&carol.home, &[]);
        let root = m.path().to_path_buf();
        let mut names = bounded("root listing", MOUNT_IO_DEADLINE, move || file_names(&root));
        names.retain(|n| n != "hub");
        assert_eq!(names, ["movies", "movies@bob"], "both owners' movies, the first keeping its name");
        for (dir, film) in [("movies", &films[0]), ("movies@bob", &films[1])] {
            let path = m.path().join(dir).join("film.bin");
            let bytes = bounded("read", MOUNT_IO_DEADLINE, move || std::fs::read(path)).expect("read");
            assert_eq!(&bytes, film, "{dir} reads its own owner's bytes");
        }
        m.stop();
    }

    let carol_key = carol.key();
    let context_file = carol.home.home().context_path("default");
    let local_jwt = op_home.join("operator/accounts/carol/account.jwt");
    let sys_creds = Operator::load(&Home::at(&op_home)).expect("operator").system_creds();
    let sys = connect(&carol.context().server, &sys_creds, STEP).await.expect("sys");
    let agree = || async {
        let local = std::fs::read_to_string(&local_jwt).expect("local JWT");
        assert_eq!(server_jwt(&sys, &carol_key).await, local, "server and local JWT agree");
    };
    agree().await;

    // A third owner's catalog needs a push, which the server refuses: nothing changes.
    let (context_before, jwt_before) = (std::fs::read(&context_file).unwrap(), std::fs::read(&local_jwt).unwrap());
    let refusing = StoreRefuses::new(resolver_file(&op_home, &carol_key));
    let refused = carol.run(&["catalog", "import", "movies", "dave"]).await;
    refused.assert_failure("import refused by the server");
    assert_eq!(refused.stderr_lines().len(), 1, "one line: {}", refused.stderr);
    assert!(refused.stderr.contains("nothing was changed"), "{}", refused.stderr);
    let unimport = carol.run(&["catalog", "unimport", "movies@bob"]).await;
    unimport.assert_failure("unimport refused by the server");
    assert!(unimport.stderr.contains("the import is kept"), "{}", unimport.stderr);
    drop(refusing);
    assert_eq!(std::fs::read(&context_file).unwrap(), context_before, "the context is unchanged");
    assert_eq!(std::fs::read(&local_jwt).unwrap(), jwt_before, "the local JWT is unchanged");
    agree().await;
    let carol_nats = carol.nats().await;
    let dave_route = Route::Owner(dave.key());
    assert_eq!(
        request(&carol_nats, &dave_route.request_subject("movies", Operation::Get)).await,
        Err(async_nats::RequestErrorKind::NoResponders),
        "the live account has no import of dave"
    );
    let ls = carol.run(&["catalog", "ls"]).await;
    assert!(ls.stdout.contains("movies@bob from") && !ls.stdout.contains(&dave.key()), "{}", ls.stdout);

    // Once the server takes pushes again, the same commands work.
    let retried = carol.run(&["catalog", "import", "movies", "dave"]).await;
    retried.assert_success("retry");
    assert!(retried.stdout.contains("as 'movies@dave'"), "{}", retried.stdout);
    carol.run(&["catalog", "unimport", "movies@bob"]).await.assert_success("unimport");
    agree().await;
    let operator = Operator::load(&Home::at(&op_home)).expect("operator");
    assert_eq!(operator.owner_imports("carol").expect("owners"), vec![alice.key(), dave.key()]);
    let names: Vec<String> = carol.context().imports.iter().map(|i| i.catalog.clone()).filter(|c| c != "hub").collect();
    assert_eq!(names, ["movies", "movies"]);

    // With no server running there is nothing to disagree with: the change is stored, and the
    // server loads it when it starts.
    drop(up);
    let offline = carol.run(&["catalog", "unimport", "movies@dave"]).await;
    offline.assert_success("unimport with the server stopped");
    assert!(offline.stderr.contains("takes effect at `operator up`"), "{}", offline.stderr);
    let _up = OperatorUp::start(&op_home);
    let sys = connect(&carol.context().server, &sys_creds, STEP).await.expect("sys again");
    let local = std::fs::read_to_string(&local_jwt).expect("local JWT");
    assert_eq!(server_jwt(&sys, &carol_key).await, local, "the restarted server loaded the local JWT");
    let operator = Operator::load(&Home::at(&op_home)).expect("operator");
    assert_eq!(operator.owner_imports("carol").expect("owners"), vec![alice.key()]);
}

/// The original's scheme for comparison: per-catalog imports, one push of the whole JWT each,
/// until the JWT no longer fits in a NATS message. That failed push changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: about 1,600 per-catalog imports, some 20 minutes; run with --ignored --nocapture for its figures"]
async fn soak_per_catalog_imports_for_comparison() {
    let operator_dir = operator_dir();
    let op_home = operator_dir.path().to_path_buf();
    operator_init(&op_home, free_port());
    let _up = OperatorUp::start(&op_home);
    let owner = Person::with_account(&op_home, "owner").await;
    let carol = Person::with_account(&op_home, "carol").await;
    let (owner_key, carol_key) = (owner.key(), carol.key());
    let mut operator = Operator::load(&Home::at(&op_home)).expect("operator");
    let home = carol.home.home();
    let context_file = home.context_path("default");
    let local_jwt = op_home.join("operator/accounts/carol/account.jwt");
    for n in 1..=2000usize {
        let request = ImportRequest {
            route: natster_mount::context::ImportRoute::Catalog,
            ..ImportRequest::new(&format!("c{n:04}"), &owner_key)
        };
        let before = (std::fs::read(&context_file).unwrap(), std::fs::read(&local_jwt).unwrap());
        let t = Instant::now();
        let side = AccountSide::Managed { operator: &mut operator, account: "carol" };
        match imports::add(&home, "default", side, &[request]).await {
            Ok(_) if [400, 800, 1200, 1600].contains(&n) => eprintln!(
                "per-catalog import #{n}: {:.0} ms, account JWT {} bytes",
                t.elapsed().as_secs_f64() * 1000.0,
                std::fs::metadata(&local_jwt).unwrap().len()
            ),
            Ok(_) => {}
            Err(e) => {
                eprintln!("per-catalog import #{n} failed after {:.0} ms: {e:#}", t.elapsed().as_secs_f64() * 1000.0);
                assert!(n > 400, "failed early: {e:#}");
                let after = (std::fs::read(&context_file).unwrap(), std::fs::read(&local_jwt).unwrap());
                assert!(after == before, "the failed import changed the context or the local JWT");
                assert_eq!(carol.context().imports.iter().filter(|i| i.catalog != "hub").count(), n - 1);
                // The server either kept the old JWT or (a push whose answer came too late)
                // applied the new one after all; then the same import again makes them agree.
                let sys = connect(&carol.context().server, &operator.system_creds(), STEP).await.expect("sys");
                let held = wait_for("the server answering a lookup", Duration::from_secs(60), || async {
                    lookup_account_jwt(&sys, &carol_key).await.ok()
                })
                .await;
                if held.as_bytes() != &before.1[..] {
                    eprintln!("the server applied the refused push late; importing again");
                    let side = AccountSide::Managed { operator: &mut operator, account: "carol" };
                    let request = ImportRequest {
                        route: natster_mount::context::ImportRoute::Catalog,
                        ..ImportRequest::new(&format!("c{n:04}"), &owner_key)
                    };
                    imports::add(&home, "default", side, &[request]).await.expect("the retry");
                }
                let local = std::fs::read_to_string(&local_jwt).unwrap();
                assert_eq!(server_jwt(&sys, &carol_key).await, local, "the server and the local JWT agree");
                return;
            }
        }
    }
    panic!("2,000 per-catalog imports fitted in one JWT: the limit moved");
}
