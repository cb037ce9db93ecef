//! The web UI end to end: `natster-mount web` over a real nats-server and a served catalog,
//! checked over HTTP (login and 401s, ranges byte for byte, ETag, bad paths, sharing and its
//! live events, TLS, stopping) and in a real headless Chromium (operator mode, two accounts:
//! the catalog list, a real H.264 video that plays and seeks fetching only the chunks around
//! the seek point, an image, live share and revision updates, a phone-width window).

mod common;
#[path = "common/web.rs"]
mod webui;

use std::time::{Duration, Instant};

use common::operator::*;
use common::*;
use webui::*;

/// A home with catalog `media` (served), and its web UI.
struct Site {
    _nats: NatsServer,
    home: TestHome,
    tree: tempfile::TempDir,
    _served: Served,
    web: WebUi,
    big: Vec<u8>,
}

const BIG: usize = 3 * 1024 * 1024 + 123;
const SECRET: &[u8] = b"top secret bytes outside the catalog";

async fn site(extra: &[&str]) -> Site {
    let nats = NatsServer::start();
    let big = pseudo_random_bytes(7, BIG);
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("big.bin", big.clone()),
        ("sub/a.bin", b"inside a folder".to_vec()),
        ("notes/hello.txt", b"hello from the catalog\n".to_vec()),
        ("page.html", b"<script>alert(1)</script>".to_vec()),
        ("empty.dat", Vec::new()),
    ];
    let (home, tree) = home_with_catalog(&nats, &files).await;
    // A file beside the catalog's folder: nothing may ever serve it.
    std::fs::write(tree.path().parent().expect("parent").join("secret.txt"), SECRET).ok();
    let served = Served::start(&home, &nats, "media").await;
    let mut args = vec!["web", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let web = WebUi::start(home.command(&args));
    Site { _nats: nats, home, tree, _served: served, web, big }
}

async fn get(web: &WebUi, cookie: &str, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = http().get(web.url(path)).header("cookie", cookie);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    tokio::time::timeout(Duration::from_secs(30), request.send()).await.expect("request timed out").expect("request")
}

async fn json(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_the_session_and_the_token_works_once() {
    let s = site(&[]).await;
    let web = &s.web;
    for path in [
        "/",
        "/assets/app.js",
        "/api/catalogs",
        "/api/catalogs/media",
        "/api/events",
        "/api/stats",
        "/files/media/big.bin",
        "/nope",
        "/login",
    ] {
        let r = http().get(web.url(path)).send().await.expect("request");
        assert_eq!(r.status(), 401, "{path} without a session");
    }
    let r = http()
        .post(web.url("/api/catalogs/media/share"))
        .header("content-type", "application/json")
        .body("{\"account\":\"x\"}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401, "share without a session");
    let wrong = web.login_url.replace("token=", "token=0");
    assert_eq!(http().get(&wrong).send().await.expect("login").status(), 401, "a wrong token");

    let cookie = web.login().await;
    // The link is used up: a second visit without the cookie gets nothing.
    assert_eq!(http().get(&web.login_url).send().await.expect("login").status(), 401, "token reused");
    assert_eq!(get(web, "natster_session=00", "/api/catalogs", &[]).await.status(), 401, "a forged cookie");

    let page = get(web, &cookie, "/", &[]).await;
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    let catalogs = json(get(web, &cookie, "/api/catalogs", &[]).await).await;
    let media = &catalogs["catalogs"][0];
    assert_eq!(media["id"], "media");
    assert_eq!(media["own"], true);
    assert_eq!(media["files"], 5, "{catalogs}");

    // A logged-in browser gets a fresh one-time link for another device; it works once.
    let r = http().post(web.url("/api/login-link")).header("cookie", &cookie).send().await.expect("link");
    assert_eq!(r.status(), 200);
    let link = json(r).await["url"].as_str().expect("url").to_string();
    assert!(link.starts_with(&format!("{}/login?token=", web.base)), "{link}");
    let r = http().get(&link).send().await.expect("second device");
    assert_eq!(r.status(), 303);
    let second = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    assert_eq!(get(web, &second, "/api/catalogs", &[]).await.status(), 200);
    assert_eq!(http().get(&link).send().await.expect("reuse").status(), 401, "the new link works once too");

    // A state change from another site's page is refused even with the cookie.
    let r = http()
        .post(web.url("/api/catalogs/media/share"))
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .header("content-type", "application/json")
        .body("{\"account\":\"bob\"}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
}

/// Requests for `v2` reads of catalog `media` in the server's own account.
async fn reads(nats: &NatsServer) -> Requests {
    Requests::record(&nats.url(), "natster.catalog.media.read").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_byte_exact_and_cached_bytes_are_not_fetched_again() {
    let s = site(&[]).await;
    let web = &s.web;
    let cookie = web.login().await;
    let size = s.big.len();
    let recorder = reads(&s._nats).await;

    let whole = get(web, &cookie, "/files/media/big.bin", &[]).await;
    assert_eq!(whole.status(), 200);
    let etag = whole.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", sha256_hex(&s.big)));
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.headers()["content-type"], "application/octet-stream");
    assert_eq!(whole.headers()["content-length"].to_str().unwrap(), size.to_string());
    assert!(whole.bytes().await.unwrap() == s.big, "whole file differs");
    let after_whole = recorder.settled().await;
    assert!(after_whole > 0, "the whole file came over v2 reads");

    let cases: Vec<(String, std::ops::Range<usize>)> = vec![
        ("bytes=0-0".into(), 0..1),
        (format!("bytes={}-{}", size - 1, size - 1), size - 1..size),
        ("bytes=1000000-1300000".into(), 1_000_000..1_300_001),
        ("bytes=-500".into(), size - 500..size),
        (format!("bytes={}-", size - 70_000), size - 70_000..size),
        (format!("bytes=5-{}", size * 2), 5..size),
    ];
    for (range, span) in &cases {
        let r = get(web, &cookie, "/files/media/big.bin", &[("range", range)]).await;
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes {}-{}/{size}", span.start, span.end - 1),
            "{range}"
        );
        assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
        let body = r.bytes().await.unwrap();
        assert!(body[..] == s.big[span.clone()], "{range}: bytes differ");
    }
    assert_eq!(recorder.settled().await, after_whole, "ranges of a cached file fetched again");

    for range in [format!("bytes={size}-"), format!("bytes={}-{}", size + 5, size + 10)] {
        let r = get(web, &cookie, "/files/media/big.bin", &[("range", &range)]).await;
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes */{size}"));
    }
    for range in ["bytes=abc", "items=0-1", "bytes=9-3", "bytes=--5", "bytes 0-1"] {
        let r = get(web, &cookie, "/files/media/big.bin", &[("range", range)]).await;
        assert!(r.status().is_client_error(), "{range}: {}", r.status());
    }
    let multi = get(web, &cookie, "/files/media/big.bin", &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(multi.status(), 200, "several ranges get the whole file");
    drop(multi);
    let not_modified = get(web, &cookie, "/files/media/big.bin", &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status(), 304);
    let stale = get(web, &cookie, "/files/media/big.bin", &[("range", "bytes=0-9"), ("if-range", "\"other\"")]).await;
    assert_eq!(stale.status(), 200, "If-Range of another version gets the whole file");
    drop(stale);
    let head = http().head(web.url("/files/media/big.bin")).header("cookie", &cookie).send().await.expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), size.to_string());
    assert_eq!(head.headers()["etag"].to_str().unwrap(), etag);
    let empty = get(web, &cookie, "/files/media/empty.dat", &[]).await;
    assert_eq!(empty.status(), 200);
    assert!(empty.bytes().await.unwrap().is_empty());
    let r = get(web, &cookie, "/files/media/empty.dat", &[("range", "bytes=0-")]).await;
    assert_eq!(r.status(), 416);

    // A download names the file; peer HTML is served as inert text.
    let r = get(web, &cookie, "/files/media/notes/hello.txt?download=1", &[]).await;
    assert!(r.headers()["content-disposition"].to_str().unwrap().starts_with("attachment; filename=\"hello.txt\""));
    assert_eq!(r.text().await.unwrap(), "hello from the catalog\n");
    let r = get(web, &cookie, "/files/media/page.html", &[]).await;
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert!(r.headers()["content-security-policy"].to_str().unwrap().starts_with("sandbox"));

    // A seek into the middle of an uncached part fetches only its chunks.
    let stats = json(get(web, &cookie, "/api/stats", &[]).await).await;
    assert!(stats["served_bytes"].as_u64().unwrap() >= size as u64, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_fetches_only_the_chunks_around_it() {
    let s = site(&[]).await;
    let web = &s.web;
    let cookie = web.login().await;
    let recorder = reads(&s._nats).await;
    let at = 2 * 1024 * 1024 + 10;
    let r = get(web, &cookie, "/files/media/big.bin", &[("range", &format!("bytes={at}-{}", at + 999))]).await;
    assert_eq!(r.status(), 206);
    assert!(r.bytes().await.unwrap()[..] == s.big[at..at + 1000]);
    recorder.settled().await;
    let chunk = 256 * 1024;
    let fetched: Vec<u64> =
        recorder.reads().iter().flat_map(|r| r.first_chunk..r.first_chunk + u64::from(r.count)).collect();
    assert!(!fetched.is_empty());
    let wanted = (at / chunk) as u64;
    assert!(fetched.iter().all(|&c| c >= wanted), "chunks before the seek point fetched: {fetched:?}");
    assert!(fetched.contains(&wanted), "{fetched:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_and_bad_input_get_4xx_and_nothing_outside_the_catalog() {
    let s = site(&[]).await;
    let web = &s.web;
    let cookie = web.login().await;
    let addr = web.addr();
    let headers = [("Cookie", cookie.as_str())];
    let cases = [
        ("/files/media/../secret.txt", 400),
        ("/files/media/sub/../../secret.txt", 400),
        ("/files/media/%2e%2e/secret.txt", 400),
        ("/files/media/sub%2Fa.bin", 400),
        ("/files/media/sub%2fa.bin", 400),
        ("/files/media/sub%5Ca.bin", 400),
        ("/files/media/big.bin%00.txt", 400),
        ("/files/media//big.bin", 400),
        ("/files//etc/passwd", 400),
        ("/files/media/%FF", 400),
        ("/files/media", 400),
        ("/files/media/sub", 404),
        ("/files/media/nothing.bin", 404),
        ("/files/nosuch/big.bin", 404),
        ("/files/media/./big.bin", 400),
        ("/api/catalogs/nosuch", 404),
    ];
    for (path, status) in cases {
        let (got, body) = raw_http(&addr, &format!("GET {path}"), &headers, b"").await;
        assert_eq!(got, status, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(!body.windows(SECRET.len()).any(|w| w == SECRET), "{path} served the secret");
        assert!(body.len() < 1000, "{path}: a short message, not content");
    }
    let long = format!("GET /files/media/{}", "a/".repeat(3000));
    let (got, _) = raw_http(&addr, &long, &headers, b"").await;
    assert!((400..500).contains(&got), "a very long path: {got}");

    let post = |body: Vec<u8>, content_type: &'static str| {
        let addr = addr.clone();
        let cookie = cookie.clone();
        async move {
            raw_http(
                &addr,
                "POST /api/catalogs/media/share",
                &[("Cookie", cookie.as_str()), ("Content-Type", content_type)],
                &body,
            )
            .await
        }
    };
    let (got, _) = post(format!("{{\"account\":\"{}\"}}", "A".repeat(20_000)).into_bytes(), "application/json").await;
    assert_eq!(got, 413, "an oversized form");
    let (got, _) = post(b"{\"account\":".to_vec(), "application/json").await;
    assert!((400..500).contains(&got), "malformed JSON: {got}");
    let (got, _) = post(b"account=bob".to_vec(), "application/x-www-form-urlencoded").await;
    assert!((400..500).contains(&got), "not JSON: {got}");
    let (got, body) = post(b"{\"account\":\"ANOTAKEY\"}".to_vec(), "application/json").await;
    assert_eq!(got, 400, "{}", String::from_utf8_lossy(&body));
    let (got, _) = post(b"{\"account\":\"a\\u0000b\"}".to_vec(), "application/json").await;
    assert_eq!(got, 400);
    let (got, _) =
        raw_http(&addr, "GET /files/media/big.bin", &[("Cookie", cookie.as_str()), ("Range", "bytes=\u{1}")], b"")
            .await;
    assert!((400..500).contains(&got));

    // Still serving after all of it: nothing panicked.
    let catalogs = json(get(web, &cookie, "/api/catalogs", &[]).await).await;
    assert_eq!(catalogs["catalogs"][0]["id"], "media");
    assert!(!web.stderr().contains("panicked"), "{}", web.stderr());
    let _ = &s.tree;
}

/// Reads SSE text from `response` until `want` appears in an event line; bounded.
async fn sse_until(response: &mut reqwest::Response, seen: &mut String, want: &str, deadline: Duration) {
    let until = Instant::now() + deadline;
    while !seen.contains(want) {
        let left = until.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no '{want}' within {deadline:?}; got:\n{seen}"))
            .expect("event stream");
        match chunk {
            Some(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            None => panic!("event stream ended before '{want}':\n{seen}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_and_unshare_from_the_page_and_the_cli_are_pushed_live() {
    let s = site(&[]).await;
    let web = &s.web;
    let cookie = web.login().await;
    let key = nkeys::KeyPair::new_account().public_key();
    let mut events = get(web, &cookie, "/api/events", &[]).await;
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    sse_until(&mut events, &mut seen, "event: hello", Duration::from_secs(10)).await;

    // A share made in a terminal reaches the open page within 2 s.
    s.home.run_async(["catalog", "share", "media", &key]).await.assert_success("catalog share");
    let shared_at = Instant::now();
    sse_until(&mut events, &mut seen, "event: shares", Duration::from_secs(4)).await;
    assert!(shared_at.elapsed() < Duration::from_secs(2) + Duration::from_millis(900), "{:?}", shared_at.elapsed());
    let catalogs = json(get(web, &cookie, "/api/catalogs", &[]).await).await;
    assert_eq!(catalogs["catalogs"][0]["shared_with"][0]["key"], key.as_str(), "{catalogs}");

    // Unshare through the API, as the page's button does.
    seen.clear();
    let r = http()
        .post(web.url("/api/catalogs/media/unshare"))
        .header("cookie", &cookie)
        .header("content-type", "application/json")
        .body(serde_json::json!({ "account": key }).to_string())
        .send()
        .await
        .expect("unshare");
    assert_eq!(r.status(), 200);
    assert!(json(r).await["message"].as_str().unwrap().contains("no longer shared"));
    sse_until(&mut events, &mut seen, "event: shares", Duration::from_secs(4)).await;
    let list = natster_mount::shares::ShareList::load(&s.home.home(), "media").expect("share list");
    assert!(list.accounts.is_empty(), "{list:?}");
    // Unsharing again says what is wrong.
    let r = http()
        .post(web.url("/api/catalogs/media/unshare"))
        .header("cookie", &cookie)
        .header("content-type", "application/json")
        .body(serde_json::json!({ "account": key }).to_string())
        .send()
        .await
        .expect("unshare");
    assert_eq!(r.status(), 400);
    assert!(json(r).await["error"].as_str().unwrap().contains("not shared"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_stops_within_two_seconds_with_streams_open() {
    let mut s = site(&[]).await;
    let cookie = s.web.login().await;
    let mut events = get(&s.web, &cookie, "/api/events", &[]).await;
    let mut seen = String::new();
    sse_until(&mut events, &mut seen, "event: hello", Duration::from_secs(10)).await;
    let mut download = get(&s.web, &cookie, "/files/media/big.bin", &[]).await;
    let _ = download.chunk().await;
    let took = s.web.terminate().expect("web did not stop within 10 s");
    assert!(took < Duration::from_millis(2500), "stopping took {took:?}");
    assert!(s.web.stdout().contains("web UI stopped"), "{}", s.web.stdout());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_needs_tls_or_insecure_http_and_tls_works() {
    let nats = NatsServer::start();
    let (home, _tree) = home_with_catalog(&nats, &[("a.txt", b"a".to_vec())]).await;
    let out = home.run_async(["web", "--listen", "0.0.0.0:0"]).await;
    out.assert_failure("web on 0.0.0.0 without TLS");
    assert!(out.stderr.contains("--tls-cert") && out.stderr.contains("--insecure-http"), "{}", out.stderr);
    let out = home
        .run_async([
            "web",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.key",
        ])
        .await;
    out.assert_failure("missing TLS files");
    assert!(out.stderr.contains("cannot read --tls-cert /nonexistent.pem"), "{}", out.stderr);

    let insecure = WebUi::start(home.command(["web", "--listen", "0.0.0.0:0", "--insecure-http"]));
    let until = Instant::now() + Duration::from_secs(5);
    while !insecure.stderr().contains("plain HTTP") {
        assert!(Instant::now() < until, "no warning: {}", insecure.stderr());
        tokio::time::sleep(POLL).await;
    }
    drop(insecure);

    // HTTPS with a self-signed certificate made by openssl.
    let dir = tempfile::tempdir().expect("tls dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(made.success());
    let web = WebUi::start(home.command([
        "web",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]));
    assert!(web.login_url.starts_with("https://127.0.0.1:"), "{}", web.login_url);
    let path = web.login_url.split_once(&web.addr()).unwrap().1.to_string();
    let head = tls_get(&web.addr(), &cert, &path).await;
    assert!(head.starts_with("HTTP/1.1 303"), "{head}");
    assert!(head.to_ascii_lowercase().contains("; secure"), "cookie without Secure: {head}");
    let head = tls_get(&web.addr(), &cert, "/api/catalogs").await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
}

/// A GET over TLS trusting only `cert`; returns the response head.
async fn tls_get(addr: &str, cert: &std::path::Path, path: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).expect("cert") {
        roots.add(c.expect("cert")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name").to_owned();
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).to_string();
    text.split("\r\n\r\n").next().unwrap_or("").to_string()
}

/// The browser world: alice serves `media` (a real H.264 video and an image) and shares it with
/// bob; bob imports it and has a catalog of his own; bob's web UI in a headless Chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_catalogs_show_the_video_plays_and_seeks_and_updates_are_live() {
    if !chromium_available_for("web::in_chromium_the_catalogs_show_the_video_plays_and_seeks_and_updates_are_live") {
        return;
    }
    let operator_dir = operator_dir();
    let op = operator_dir.path().to_path_buf();
    operator_init(&op, free_port());
    let _up = OperatorUp::start(&op);
    let alice = Person::with_account(&op, "alice").await;
    let bob = Person::with_account(&op, "bob").await;
    let tree = tempfile::Builder::new().prefix("natster-tree-").tempdir().expect("tree");
    let media_dir = tree.path().join("media");
    std::fs::create_dir_all(media_dir.join("stills")).expect("dirs");
    let video = make_video(&media_dir, 200, 2000).expect("ffmpeg makes the test video (scripts/setup.sh installs it)");
    make_image(&media_dir.join("stills")).expect("ffmpeg makes the test image");
    let video_bytes = std::fs::read(&video).expect("video");
    let size = video_bytes.len() as u64;
    alice.run(&["catalog", "new", "media", media_dir.to_str().unwrap()]).await.assert_success("catalog new");
    let bobs_dir = tree.path().join("bobs");
    write_file(&bobs_dir, "readme.txt", b"bob's own\n");
    bob.run(&["catalog", "new", "bobs", bobs_dir.to_str().unwrap()]).await.assert_success("bob's catalog");
    let _serve = Serve::start(&alice, "media");
    let _bob_serve = Serve::start(&bob, "bobs");
    alice.run(&["catalog", "share", "media", "bob"]).await.assert_success("share");
    bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");

    // Alice's side sees every v2 read bob's web UI makes (with bob's account token first).
    let alice_nats = alice.nats().await;
    let recorder = Recorder::start(&alice_nats, "*.natster.catalog.media.read").await;
    let mut web =
        WebUi::start(bob.command(&["web", "--listen", "127.0.0.1:0", "--cache-size", "16M", "--listing-ttl", "1"]));

    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&web.login_url).await.expect("open the login link");
    browser
        .wait_js("the shared catalog listed with its files", BROWSER_DEADLINE,
            "const li = document.querySelector('li.catalog[data-id=\"media\"]'); return !!li && li.textContent.includes('2 files');")
        .await;
    browser
        .wait_js(
            "live updates connected",
            BROWSER_DEADLINE,
            "return document.getElementById('live').classList.contains('on');",
        )
        .await;
    assert!(
        !browser.js("return document.cookie").await.as_str().unwrap_or("").contains("natster_session"),
        "the cookie is HttpOnly"
    );
    browser.screenshot(&screenshot_dir().join("catalogs.png")).await;
    // "Another device" shows a fresh one-time link.
    browser.js("document.getElementById('another').click(); return true;").await;
    browser
        .wait_js(
            "a link for another device",
            BROWSER_DEADLINE,
            "const u = document.getElementById('link-url'); return !!u && u.textContent.includes('/login?token=');",
        )
        .await;
    browser.js("document.querySelector('#link button').click(); return true;").await;
    // No seed or JWT reaches the browser: not in the page, not in the API.
    let creds = std::fs::read_to_string(bob.context().creds.expect("bob's creds")).expect("creds");
    let secrets: Vec<&str> = creds.lines().filter(|l| l.starts_with("SU") || l.starts_with("eyJ")).collect();
    assert_eq!(secrets.len(), 2, "a JWT and a seed in the creds file");
    let seen = browser
        .js("return fetch('/api/catalogs').then(r => r.text()).then(t => t + document.documentElement.outerHTML);")
        .await;
    for secret in secrets {
        assert!(!seen.as_str().unwrap().contains(secret), "a credential reached the browser");
    }

    // The video plays, then a seek to 80% plays from there.
    c.goto(&web.url("/#/f/media/video.mp4")).await.expect("player page");
    browser
        .wait_js(
            "video metadata",
            BROWSER_DEADLINE,
            "const v = document.getElementById('player'); return !!v && v.readyState >= 1 && v.duration > 100;",
        )
        .await;
    assert_eq!(
        browser.js("return document.createElement('video').canPlayType('video/mp4; codecs=\"avc1.42E01E\"')").await,
        "probably"
    );
    browser.js("const v = document.getElementById('player'); v.muted = true; v.play(); return true;").await;
    browser
        .wait_js("playback past 1 s", BROWSER_DEADLINE, "return document.getElementById('player').currentTime > 1;")
        .await;
    browser.js("document.getElementById('player').pause(); return true;").await;
    let before_seek = recorder.settled().await;
    browser
        .js("const v = document.getElementById('player'); v.currentTime = v.duration * 0.8; v.play(); return true;")
        .await;
    browser
        .wait_js(
            "playback from 80%",
            BROWSER_DEADLINE,
            "const v = document.getElementById('player'); return v.currentTime > v.duration * 0.8 + 1;",
        )
        .await;
    browser.screenshot(&screenshot_dir().join("player.png")).await;
    browser.js("document.getElementById('player').pause(); return true;").await;
    recorder.settled().await;
    let chunk = 256 * 1024u64;
    let chunks = |reads: &[(u64, u64)]| -> Vec<u64> { reads.iter().flat_map(|&(f, n)| f..f + n).collect() };
    let all = recorder.reads();
    let (early, late) = all.split_at(before_seek);
    let seek_chunk = size * 8 / 10 / chunk;
    let late = chunks(late);
    let early = chunks(early);
    let total = size.div_ceil(chunk);
    eprintln!(
        "video {size} bytes, {total} chunks; before the seek {} chunks fetched (max {:?}), after it {} (from {:?})",
        early.len(),
        early.iter().max(),
        late.len(),
        late.iter().min()
    );
    assert!(late.iter().any(|&c| c >= seek_chunk.saturating_sub(2)), "nothing fetched around the seek point: {late:?}");
    let band = total * 45 / 100..total * 70 / 100;
    let middle: Vec<u64> = early.iter().chain(&late).copied().filter(|c| band.contains(c)).collect();
    assert!(middle.is_empty(), "chunks between the start and the seek point were fetched: {middle:?}");
    // The bytes the player got are the file's (range check against the source through the browser).
    let probe = browser
        .js("return fetch('/files/media/video.mp4', {headers: {range: 'bytes=-16'}}).then(r => r.arrayBuffer()).then(b => Array.from(new Uint8Array(b)));")
        .await;
    let got: Vec<u8> = probe.as_array().expect("bytes").iter().map(|v| v.as_u64().unwrap() as u8).collect();
    assert_eq!(got, video_bytes[video_bytes.len() - 16..]);

    // An image renders.
    c.goto(&web.url("/#/f/media/stills/still.png")).await.expect("image page");
    browser
        .wait_js(
            "the image decoded",
            BROWSER_DEADLINE,
            "const i = document.getElementById('image'); return !!i && i.complete && i.naturalWidth > 0;",
        )
        .await;

    // Bob's own catalog: a share made in a terminal shows on the open page within 2 s, one made
    // with the page's form too.
    c.goto(&web.url("/#/c/bobs")).await.expect("bob's catalog");
    browser.wait_js("the share panel", BROWSER_DEADLINE, "return !!document.getElementById('share-account');").await;
    let alice_key = alice.key();
    bob.run(&["catalog", "share", "bobs", "alice"]).await.assert_success("bob shares from the CLI");
    let shared_at = Instant::now();
    browser
        .wait_js(
            "the CLI's share on the page",
            Duration::from_secs(4),
            &format!("return !!document.querySelector('li.share[data-key=\"{alice_key}\"]');"),
        )
        .await;
    assert!(
        shared_at.elapsed() < Duration::from_secs(2) + Duration::from_millis(900),
        "took {:?}",
        shared_at.elapsed()
    );
    // The page re-renders on every event, so elements are found and used in one step.
    browser.js("document.querySelector('li.share button').click(); return true;").await;
    browser.wait_js("unshared", BROWSER_DEADLINE, "return !document.querySelector('li.share');").await;
    browser
        .js("const i = document.getElementById('share-account'); i.value = 'alice'; i.form.requestSubmit(); return true;")
        .await;
    browser
        .wait_js(
            "shared from the form",
            BROWSER_DEADLINE,
            &format!("return !!document.querySelector('li.share[data-key=\"{alice_key}\"]');"),
        )
        .await;
    browser.screenshot(&screenshot_dir().join("catalog.png")).await;
    let list = natster_mount::shares::ShareList::load(&bob.home.home(), "bobs").expect("share list");
    assert_eq!(list.accounts, vec![alice_key.clone()]);

    // A new revision of alice's catalog appears without a reload.
    c.goto(&web.url("/#/c/media")).await.expect("media page");
    browser
        .wait_js(
            "the media files",
            BROWSER_DEADLINE,
            "return !!document.querySelector('li.file[data-path=\"video.mp4\"]');",
        )
        .await;
    write_file(&media_dir, "new-episode.txt", b"fresh\n");
    alice.run(&["catalog", "new", "media", media_dir.to_str().unwrap()]).await.assert_success("re-index");
    browser
        .wait_js(
            "the new file without reload",
            Duration::from_secs(20),
            "return !!document.querySelector('li.file[data-path=\"new-episode.txt\"]');",
        )
        .await;
    browser
        .js("const f = document.getElementById('filter'); f.value = 'episode'; f.dispatchEvent(new Event('input')); return true;")
        .await;
    browser
        .wait_js(
            "the name filter",
            BROWSER_DEADLINE,
            "return document.querySelectorAll('li.file').length === 1 && !!document.querySelector('li.file[data-path=\"new-episode.txt\"]');",
        )
        .await;

    // A phone-width window: nothing sticks out sideways, the player fits.
    c.set_window_size(390, 844).await.expect("phone width");
    c.goto(&web.url("/#/")).await.expect("list");
    browser
        .wait_js(
            "the list at phone width",
            BROWSER_DEADLINE,
            "return !!document.querySelector('li.catalog[data-id=\"media\"]');",
        )
        .await;
    let fits = "return document.documentElement.scrollWidth <= window.innerWidth + 1;";
    assert_eq!(browser.js(fits).await, true, "the catalog list overflows a phone's width");
    browser.screenshot(&screenshot_dir().join("catalogs-phone.png")).await;
    c.goto(&web.url("/#/f/media/video.mp4")).await.expect("player page");
    browser
        .wait_js(
            "video metadata at phone width",
            BROWSER_DEADLINE,
            "const v = document.getElementById('player'); return !!v && v.readyState >= 1;",
        )
        .await;
    assert_eq!(browser.js(fits).await, true, "the player page overflows a phone's width");
    assert_eq!(
        browser
            .js("return document.getElementById('player').getBoundingClientRect().width <= window.innerWidth;")
            .await,
        true
    );
    browser.js("const v = document.getElementById('player'); v.muted = true; v.currentTime = v.duration / 2; v.play(); return true;").await;
    browser
        .wait_js(
            "seeking at phone width",
            BROWSER_DEADLINE,
            "const v = document.getElementById('player'); return v.currentTime > v.duration / 2 + 0.5;",
        )
        .await;
    browser.screenshot(&screenshot_dir().join("player-phone.png")).await;
    browser.close().await;
    assert!(web.terminate().is_some());
}

/// Every v2 read request on `subject`, recorded through `nats` (an account's own connection).
struct Recorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(nats: &async_nats::Client, subject: &str) -> Recorder {
        use futures::StreamExt;
        let mut sub = nats.subscribe(subject.to_string()).await.expect("subscribe");
        nats.flush().await.expect("flush");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(r) = serde_json::from_slice::<natster_mount::protocol::ReadRequest>(&msg.payload) {
                    s.lock().unwrap().push((r.first_chunk, u64::from(r.count)));
                }
            }
        });
        Recorder { seen, task }
    }

    fn reads(&self) -> Vec<(u64, u64)> {
        self.seen.lock().unwrap().clone()
    }

    /// The count once unchanged for 500 ms (bounded at 30 s).
    async fn settled(&self) -> usize {
        let until = Instant::now() + Duration::from_secs(30);
        let (mut last, mut since) = (self.reads().len(), Instant::now());
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.reads().len();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= Duration::from_millis(500) {
                return now;
            }
            assert!(Instant::now() < until, "reads still arriving after 30 s");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
