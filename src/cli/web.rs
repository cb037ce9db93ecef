//! `natster-mount web`: the web UI over a read engine of its own (the catalogs this context
//! reads, kept fresh as the mount keeps them, following its imports), with presence and the
//! inbox from the global service, until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use super::Globals;
use crate::fs::mount::{gather_catalogs, spawn_listing_refresh};
use crate::fs::NatsterFs;
use crate::web::network::{Follow, NetworkPresence};
use crate::web::{self, TlsFiles, WebContext, WebOptions};

pub struct WebArgs {
    pub listen: SocketAddr,
    pub open: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_http: bool,
    pub cache_size: u64,
    pub read_timeout: Duration,
    pub listing_ttl: Duration,
}

pub async fn web(g: &Globals, args: WebArgs) -> Result<()> {
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => bail!("give both --tls-cert FILE and --tls-key FILE (PEM), or neither"),
    };
    let web_options = WebOptions { listen: args.listen, tls: tls.clone(), insecure_http: args.insecure_http };
    web::check_listen(&web_options)?;
    // The mount's options: the same read engine, cache and client timeouts.
    let engine = super::MountArgs {
        mountpoint: PathBuf::new(),
        cache_size: args.cache_size,
        read_timeout: args.read_timeout,
        listing_ttl: args.listing_ttl,
        foreground: true,
        allow_other: false,
        uid: None,
        gid: None,
    };
    let options = super::up::mount_options(g, &engine)?;
    let context = g.load_context()?;
    let nats = context.connect(g.timeout).await?;
    let gathered = {
        let (home, context, nats, options) = (g.home.clone(), context.clone(), nats.clone(), options.clone());
        tokio::task::spawn_blocking(move || gather_catalogs(&home, &context, &nats, &options)).await??
    };
    let fs = Arc::new(NatsterFs::new(Vec::new(), options.fs.clone()));
    let connected = crate::daemon::link::watch_state(&nats);
    let me = context.account_public_key.clone().unwrap_or_else(|| "self".into());
    let planned = gathered.iter().map(|g| g.planned()).collect();
    let refresh =
        Arc::new(spawn_listing_refresh(fs.clone(), nats.clone(), connected, options.listing_ttl, gathered, me));
    let follow =
        Follow { home: g.home.clone(), context: g.context.clone(), nats, options, refresh: refresh.clone(), planned };
    let (presence, following) = NetworkPresence::spawn(fs.clone(), follow);
    let ctx = WebContext {
        home: g.home.clone(),
        context: g.context.clone(),
        me: context.account_public_key.clone().unwrap_or_else(|| "self".into()),
        account_name: context.account_name.clone(),
        timeout: g.timeout,
    };
    let count = fs.catalogs().len();
    let bound = web::bind(fs, ctx, presence, &web_options).await?;
    let addr = bound.local_addr()?;
    if !addr.ip().is_loopback() && tls.is_none() {
        eprintln!(
            "warning: serving plain HTTP on {addr} (--insecure-http): the session cookie and every file cross the network unencrypted"
        );
    }
    let shutdown = super::Shutdown::new()?;
    outln!("web UI for context '{}' ({count} catalog(s)) on {addr}", g.context);
    outln!("open {}", bound.url());
    outln!("the link logs in one browser, once; Ctrl-C to stop");
    if args.open {
        open_browser(bound.url().to_string());
    }
    let served = bound.run(shutdown.signalled()).await;
    following.abort();
    refresh.stop();
    outln!("web UI stopped");
    served
}

/// Opens `url` in the desktop's browser (xdg-open), reporting failure without failing.
fn open_browser(url: String) {
    tokio::task::spawn_blocking(move || {
        let status = std::process::Command::new("xdg-open")
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("note: could not open a browser (xdg-open); open the link above yourself");
        }
    });
}
