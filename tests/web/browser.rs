//! In a real headless Chromium, in operator mode with two accounts.

use std::time::{Duration, Instant};

use crate::common::operator::*;
use crate::common::*;
use crate::harness::*;

/// The browser world: alice serves `media` (a real H.264 video and an image) and shares it with
/// bob; bob imports it and has a catalog of his own; bob's web UI in a headless Chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_catalogs_show_the_video_plays_and_seeks_and_updates_are_live() {
    if !chromium_available_for(
        "web::browser::in_chromium_the_catalogs_show_the_video_plays_and_seeks_and_updates_are_live",
    ) {
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
    // With the global service, bob imports from his page's inbox (below); without, in a terminal.
    let inbox = nats_server_has_global();
    if !inbox {
        bob.run(&["catalog", "import", "media", "alice"]).await.assert_success("import");
    }

    // Alice's side sees every v2 read bob's web UI makes (with bob's account token first).
    let alice_nats = alice.nats().await;
    let recorder = Recorder::start(&alice_nats, "*.natster.catalog.media.read").await;
    let mut web =
        WebUi::start(bob.command(&["web", "--listen", "127.0.0.1:0", "--cache-size", "16M", "--listing-ttl", "1"]));

    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&web.login_url).await.expect("open the login link");
    if inbox {
        // The share waits in the inbox with an Import button; the catalog appears once clicked.
        let row = "document.querySelector('li.pending[data-catalog=\"media\"] button.import')";
        browser.wait_js("alice's share in bob's inbox", BROWSER_DEADLINE, &format!("return !!{row};")).await;
        browser.screenshot(&screenshot_dir().join("inbox.png")).await;
        browser.js(&format!("{row}.click(); return true;")).await;
        browser
            .wait_js(
                "the inbox emptied by the import",
                BROWSER_DEADLINE,
                "return !document.querySelector('li.pending[data-catalog=\"media\"]');",
            )
            .await;
        assert!(bob.context().imports.iter().any(|i| i.catalog == "media"), "the import is in bob's context");
    }
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
    let chunk = u64::from(natster_mount::server::DEFAULT_CHUNK_SIZE);
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
