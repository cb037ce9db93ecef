//! Over HTTP: login and 401s, ranges byte for byte, ETag, a seek's chunks, bad paths and
//! input, share events, TLS, stopping.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::harness::*;

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

/// A JSON POST with the session `cookie`, as the page's forms send it.
async fn post_json(web: &WebUi, cookie: &str, path: &str, body: serde_json::Value) -> reqwest::Response {
    let request = http()
        .post(web.url(path))
        .header("cookie", cookie)
        .header("content-type", "application/json")
        .body(body.to_string());
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
    // Byte ranges fetched (a small read may fetch 16 KiB leaves instead of whole chunks).
    let chunk = u64::from(natster_mount::server::DEFAULT_CHUNK_SIZE);
    let fetched: Vec<(u64, u64)> = recorder
        .reads()
        .iter()
        .map(|r| {
            let unit = r.unit.map_or(chunk, u64::from);
            (r.first_chunk * unit, (r.first_chunk + u64::from(r.count)) * unit)
        })
        .collect();
    assert!(!fetched.is_empty());
    let at = at as u64;
    let chunk_start = at / chunk * chunk;
    assert!(fetched.iter().all(|&(start, _)| start >= chunk_start), "bytes before the seek point's chunk: {fetched:?}");
    assert!(fetched.iter().any(|&(start, end)| start <= at && at < end), "the seek point itself: {fetched:?}");
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
    // Imports from the inbox: a bad catalog name or owner key is refused before anything runs.
    let owner = nkeys::KeyPair::new_account().public_key();
    for (catalog, owner, why) in [("../media", owner.as_str(), "catalog name"), ("media", "ANOTAKEY", "owner")] {
        let r = post_json(web, &cookie, "/api/inbox/import", serde_json::json!({ "catalog": catalog, "owner": owner }))
            .await;
        assert_eq!(r.status(), 400, "bad {why}");
        assert!(!json(r).await["error"].as_str().unwrap_or("").is_empty(), "says why ({why})");
    }
    let inbox = json(get(web, &cookie, "/api/inbox", &[]).await).await;
    assert_eq!(inbox["available"], false, "no global service on a plain server: {inbox}");

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
    let r = post_json(web, &cookie, "/api/catalogs/media/unshare", serde_json::json!({ "account": key })).await;
    assert_eq!(r.status(), 200);
    assert!(json(r).await["message"].as_str().unwrap().contains("no longer shared"));
    sse_until(&mut events, &mut seen, "event: shares", Duration::from_secs(4)).await;
    let list = natster_mount::shares::ShareList::load(&s.home.home(), "media").expect("share list");
    assert!(list.accounts.is_empty(), "{list:?}");
    // Unsharing again says what is wrong.
    let r = post_json(web, &cookie, "/api/catalogs/media/unshare", serde_json::json!({ "account": key })).await;
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
