//! The web UI: browse every catalog this context can read, play and download its files in a
//! browser, share and unshare one's own catalogs, with live updates. Served by natster-mount
//! itself on the same read engine as the mount ([`NatsterFs`]: chunk cache, deadlines,
//! read-ahead), so a player's seek fetches only the chunks around it and cached bytes are
//! never fetched twice. [`bind`] takes the engine from its caller: `natster-mount web` builds
//! one of its own, a daemon that also mounts can pass its mount's and share the cache.
//!
//! - `auth`: the one-time login token, session cookies (for the process's life), the 401 for
//!   everyone else, and fresh one-time links for another device.
//! - `api`: JSON for the pages (catalogs, files, share/unshare) and the SSE event feed.
//! - `files`: `GET /files/<catalog>/<path>`: ranges, ETag, streamed in bounded pieces.
//! - `paths`: decoding and checking the path of a `/files` URL.
//! - `events`: what changed (revisions, share lists, reachability), for the SSE feed.
//! - `presence`: the plug for the global service (online dots, the inbox of pending shares);
//!   `network` fills it from the global service and follows the context's imports.
//! - `pages`: the embedded HTML, CSS and JavaScript (no build step, no run-time dependency).
//!
//! Invariants and tricky cases:
//! - No seed, JWT or creds file ever reaches the browser: the server reads catalogs with the
//!   context's credentials, the browser only holds a session cookie (HttpOnly,
//!   SameSite=Strict, Secure under TLS).
//! - Every route but `/login` answers 401 without a valid session, the unknown ones too.
//! - A non-loopback address needs TLS (`--tls-cert/--tls-key`) or an explicit
//!   `--insecure-http`; plain HTTP on the network is said out loud at start.
//! - `/files` serves only bytes of an entry of a catalog's listing, found by exact path in the
//!   engine's tree: no file system path is ever built from the URL.
//! - Peer-chosen content never runs in our origin: files are served with `nosniff` and a
//!   sandboxing CSP, and types a browser would run (HTML, SVG, XML, JavaScript) as text.
//! - Shutdown ends the event streams first, so the server stops within 2 s.

mod api;
mod auth;
mod events;
mod files;
pub mod network;
mod pages;
mod paths;
pub mod presence;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::context::Home;
use crate::fs::NatsterFs;
pub use presence::{NoGlobalService, PendingShare, Presence};

/// Largest request body accepted (share forms are a few hundred bytes).
pub const MAX_BODY: usize = 4096;
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct WebOptions {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Allow plain HTTP on a non-loopback address.
    pub insecure_http: bool,
}

/// PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whose catalogs these are: the context the engine reads with.
#[derive(Debug, Clone)]
pub struct WebContext {
    pub home: Home,
    /// The context's name (share and unshare run as `--context NAME` would).
    pub context: String,
    /// The account's public key, or "self" for a context without one (as the engine's owners).
    pub me: String,
    pub account_name: Option<String>,
    /// Bound on the commands run for the page (share, unshare).
    pub timeout: Duration,
}

/// Shared by every request.
pub(crate) struct AppState {
    fs: Arc<NatsterFs>,
    ctx: WebContext,
    presence: Arc<dyn Presence>,
    auth: auth::Auth,
    events: events::Events,
    /// Bytes of file bodies sent, for `/api/stats`.
    served_bytes: AtomicU64,
    /// Flips to true at shutdown; event streams end on it.
    stopping: watch::Receiver<bool>,
}

type State = Arc<AppState>;

/// A bound web server, not serving yet: [`Bound::url`] is the one-time login link.
pub struct Bound {
    listener: std::net::TcpListener,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    app: Router,
    url: String,
    stop: watch::Sender<bool>,
    state: State,
}

/// Refuses a non-loopback address without TLS or `--insecure-http`, saying what to do.
pub fn check_listen(options: &WebOptions) -> Result<()> {
    if !options.listen.ip().is_loopback() && options.tls.is_none() && !options.insecure_http {
        bail!(
            "{} is not a loopback address: give --tls-cert FILE --tls-key FILE to serve HTTPS there, or \
             --insecure-http to send the session cookie and media unencrypted over the network",
            options.listen
        );
    }
    Ok(())
}

/// Binds `options.listen` and prepares the server over `fs`; refuses a non-loopback address
/// without TLS or `--insecure-http`, and says what to do.
pub async fn bind(
    fs: Arc<NatsterFs>,
    ctx: WebContext,
    presence: Arc<dyn Presence>,
    options: &WebOptions,
) -> Result<Bound> {
    check_listen(options)?;
    let tls = match &options.tls {
        Some(files) => Some(tls_config(files).await?),
        None => None,
    };
    let listener = std::net::TcpListener::bind(options.listen).with_context(|| {
        format!("cannot listen on {}; is another program using it? pick another with --listen", options.listen)
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop, stopping) = watch::channel(false);
    let auth = auth::Auth::new(tls.is_some());
    let token = auth.issue_login_token();
    let state = Arc::new(AppState {
        fs,
        ctx,
        presence,
        auth,
        events: events::Events::new(),
        served_bytes: AtomicU64::new(0),
        stopping,
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let host = if addr.is_ipv6() && !addr.ip().is_unspecified() { format!("[{host}]") } else { host };
    let url = format!("{scheme}://{host}:{}/login?token={token}", addr.port());
    Ok(Bound { listener, tls, app: router(state.clone()), url, stop, state })
}

impl Bound {
    /// The one-time login link (valid for one visit).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` resolves, then stops within [`SHUTDOWN_GRACE`] and a little.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Bound { listener, tls, app, stop, state, .. } = self;
        let watcher = tokio::spawn(events::watch(state.clone()));
        let handle = axum_server::Handle::new();
        let service = app.into_make_service();
        let server = {
            let handle = handle.clone();
            async move {
                match tls {
                    Some(config) => axum_server::from_tcp_rustls(listener, config)?.handle(handle).serve(service).await,
                    None => axum_server::from_tcp(listener)?.handle(handle).serve(service).await,
                }
            }
        };
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r,
            () = shutdown => {
                let _ = stop.send(true);
                handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
                server.await
            }
        };
        watcher.abort();
        result.context("the web server stopped")
    }
}

fn router(state: State) -> Router {
    let protected = Router::new()
        .route("/", get(pages::index))
        .route("/assets/{name}", get(pages::asset))
        .route("/api/catalogs", get(api::catalogs))
        .route("/api/catalogs/{id}", get(api::catalog))
        .route("/api/catalogs/{id}/share", post(api::share))
        .route("/api/catalogs/{id}/unshare", post(api::unshare))
        .route("/api/login-link", post(auth::new_link))
        .route("/api/inbox", get(api::inbox))
        .route("/api/inbox/import", post(api::import))
        .route("/api/stats", get(api::stats))
        .route("/api/events", get(api::events))
        .route("/files/{*rest}", get(files::serve))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_session));
    protected
        .route("/login", get(auth::login))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")))
        .layer(SetResponseHeaderLayer::if_not_present(header::X_FRAME_OPTIONS, HeaderValue::from_static("SAMEORIGIN")))
        .with_state(state)
}

/// Reads the PEM certificate chain and key; a missing or bad file is named with what to do.
async fn tls_config(files: &TlsFiles) -> Result<axum_server::tls_rustls::RustlsConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_pem = tokio::fs::read(&files.cert)
        .await
        .with_context(|| format!("cannot read --tls-cert {}", files.cert.display()))?;
    let key_pem =
        tokio::fs::read(&files.key).await.with_context(|| format!("cannot read --tls-key {}", files.key.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--tls-cert {} is not a PEM certificate chain: {e}", files.cert.display()))?;
    if certs.is_empty() {
        bail!("--tls-cert {} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)", files.cert.display());
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("--tls-key {} is not a PEM private key: {e}", files.key.display()))?;
    // The ring provider explicitly: the process-wide default is ambiguous when a build
    // enables more than one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up failed")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("--tls-cert and --tls-key do not make a usable pair: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config)))
}
