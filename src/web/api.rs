//! The JSON API the pages use, and the SSE feed of [`super::events`].
//!
//! - `GET /api/catalogs`: every catalog this context reads (own and imported) with owner,
//!   revision, size, reachability and, when a global service is plugged in, online status.
//! - `GET /api/catalogs/<id>`: one catalog with its files (the page groups them in folders).
//! - `POST /api/catalogs/<id>/share|unshare` `{"account": KEY or local account name}`: own
//!   catalogs only, through the same code as `catalog share|unshare`.
//! - `GET /api/events`: Server-Sent Events; a `hello` first, then one event per change.
//! - `GET /api/inbox`, `GET /api/stats`: pending shares (global service) and engine counters.
//! - `POST /api/inbox/import {catalog, owner}`: imports a share, as `catalog import` does.
//! - `POST /api/login-link` (in `auth`): a fresh one-time link for another device.
//!
//! Catalog ids are the engine's folder names (`<catalog>` or `<catalog>@<owner8>`), unique.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};

use super::events::Event;
use super::AppState;
use crate::cli::Globals;
use crate::fs::MountedCatalog;

/// Longest account name or key accepted from a form.
const MAX_ACCOUNT: usize = 128;

pub(crate) fn is_own(state: &AppState, catalog: &MountedCatalog) -> bool {
    catalog.owner == state.ctx.me
}

fn globals(state: &AppState) -> Globals {
    Globals { home: state.ctx.home.clone(), context: state.ctx.context.clone(), timeout: state.ctx.timeout }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

pub(crate) async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such page\n").into_response()
}

#[derive(Serialize)]
struct Account {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

#[derive(Serialize)]
struct CatalogView {
    id: String,
    name: String,
    owner: Account,
    own: bool,
    revision: String,
    files: usize,
    bytes: u64,
    /// `reachable`, `not answering` or `no listing yet`, as the read engine knows it.
    reach: &'static str,
    /// From the global service; absent when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    online: Option<bool>,
    verified: &'static str,
    /// Own catalogs: who it is shared with.
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_with: Option<Vec<Account>>,
}

/// Names of the local operator's accounts by key (empty without a local operator).
fn account_names(g: &Globals) -> std::collections::HashMap<String, String> {
    let Ok(operator) = crate::accounts::Operator::load(&crate::sharing::operator_home(g)) else {
        return Default::default();
    };
    operator.accounts().into_iter().map(|r| (r.public_key, r.name)).collect()
}

/// Views of the catalogs at `indexes`, reading share lists and names off the async workers.
async fn views(state: &super::State, indexes: Vec<usize>) -> Vec<CatalogView> {
    let state2 = state.clone();
    let idx = indexes.clone();
    let (names, shares) = tokio::task::spawn_blocking(move || {
        let names = account_names(&globals(&state2));
        let shares: Vec<Option<Vec<String>>> = idx
            .iter()
            .map(|&i| {
                let c = state2.fs.catalog(i)?;
                if !is_own(&state2, &c) {
                    return None;
                }
                Some(crate::shares::ShareList::load(&state2.ctx.home, &c.name).map(|l| l.accounts).unwrap_or_default())
            })
            .collect();
        (names, shares)
    })
    .await
    .unwrap_or_default();
    let account = |key: &str| Account { key: key.to_string(), name: names.get(key).cloned() };
    let mut out = Vec::new();
    for (n, &i) in indexes.iter().enumerate() {
        let Some(c) = state.fs.catalog(i) else { continue };
        let files = state.fs.catalog_files(i);
        let revision = c.revision();
        let reach = if c.known_down() {
            "not answering"
        } else if revision.is_empty() && files.is_empty() {
            "no listing yet"
        } else {
            "reachable"
        };
        let own = is_own(state, &c);
        let mut owner = account(&c.owner);
        if own && owner.name.is_none() {
            owner.name = state.ctx.account_name.clone().or(Some("me".into()));
        }
        out.push(CatalogView {
            id: c.dir_name.clone(),
            name: c.name.clone(),
            owner,
            own,
            revision,
            files: files.len(),
            bytes: files.iter().map(|(_, e)| e.byte_size).sum(),
            reach,
            online: state.presence.online(&c.owner, &c.name),
            verified: if c.source.verification().starts_with("signed") { "signed" } else { "unverified" },
            shared_with: shares.get(n).cloned().flatten().map(|keys| keys.iter().map(|k| account(k)).collect()),
        });
    }
    out
}

pub(crate) async fn catalogs(State(state): State<super::State>) -> Response {
    let all = state.fs.catalogs().into_iter().map(|(i, _)| i).collect();
    let catalogs = views(&state, all).await;
    Json(serde_json::json!({
        "me": { "key": state.ctx.me, "name": state.ctx.account_name },
        "global_service": state.presence.inbox().is_some(),
        "catalogs": catalogs,
    }))
    .into_response()
}

fn index_of(state: &AppState, id: &str) -> Option<usize> {
    state.fs.catalogs().into_iter().find(|(_, c)| c.dir_name == id).map(|(i, _)| i)
}

#[derive(Serialize)]
struct FileView {
    path: String,
    size: u64,
    mime: String,
    hash: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    mtime: i64,
    url: String,
}

pub(crate) async fn catalog(State(state): State<super::State>, Path(id): Path<String>) -> Response {
    let Some(i) = index_of(&state, &id) else { return error(StatusCode::NOT_FOUND, format!("no catalog '{id}'")) };
    let view = views(&state, vec![i]).await.pop();
    let files: Vec<FileView> = state
        .fs
        .catalog_files(i)
        .into_iter()
        .map(|(path, e)| FileView {
            url: format!("/files/{}/{}", super::paths::encode(&id), super::paths::encode(&path)),
            path,
            size: e.byte_size,
            mime: e.mime_type,
            hash: e.hash,
            description: e.description,
            mtime: e.mtime,
        })
        .collect();
    Json(serde_json::json!({ "catalog": view, "files": files })).into_response()
}

#[derive(Deserialize)]
pub(crate) struct ShareForm {
    account: String,
}

async fn change_share(state: super::State, id: String, form: ShareForm, share: bool) -> Response {
    let Some(i) = index_of(&state, &id) else { return error(StatusCode::NOT_FOUND, format!("no catalog '{id}'")) };
    let Some(catalog) = state.fs.catalog(i) else {
        return error(StatusCode::NOT_FOUND, format!("no catalog '{id}'"));
    };
    if !is_own(&state, &catalog) {
        return error(StatusCode::FORBIDDEN, format!("catalog '{id}' is not yours: only its owner can share it"));
    }
    let account = form.account.trim().to_string();
    if account.is_empty() || account.len() > MAX_ACCOUNT || !account.chars().all(|c| c.is_ascii_graphic()) {
        return error(
            StatusCode::BAD_REQUEST,
            "give an account public key (56 characters, starting with A) or a local account name",
        );
    }
    let g = globals(&state);
    let name = catalog.name.clone();
    let who = account.clone();
    // Share lists and account files are written with blocking I/O: on a blocking thread.
    let runtime = tokio::runtime::Handle::current();
    let done =
        tokio::task::spawn_blocking(move || runtime.block_on(crate::sharing::catalog_share(&g, &name, &who, share)))
            .await;
    match done {
        Ok(Ok(())) => {
            state.events.send(Event { kind: "shares", catalog: Some(id.clone()) });
            let verb = if share { "shared with" } else { "no longer shared with" };
            Json(serde_json::json!({ "message": format!("catalog '{}' {verb} {account}", catalog.name) }))
                .into_response()
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "sharing failed unexpectedly; see the server's log"),
    }
}

pub(crate) async fn share(
    State(state): State<super::State>,
    Path(id): Path<String>,
    Json(form): Json<ShareForm>,
) -> Response {
    change_share(state, id, form, true).await
}

pub(crate) async fn unshare(
    State(state): State<super::State>,
    Path(id): Path<String>,
    Json(form): Json<ShareForm>,
) -> Response {
    change_share(state, id, form, false).await
}

pub(crate) async fn inbox(State(state): State<super::State>) -> Response {
    let Some(pending) = state.presence.inbox() else {
        return Json(serde_json::json!({ "available": false, "pending": [] })).into_response();
    };
    let g = globals(&state);
    let names = tokio::task::spawn_blocking(move || account_names(&g)).await.unwrap_or_default();
    let pending: Vec<serde_json::Value> = pending
        .into_iter()
        .map(|p| {
            let owner = Account { name: names.get(&p.owner).cloned(), key: p.owner };
            serde_json::json!({ "catalog": p.catalog, "owner": owner })
        })
        .collect();
    Json(serde_json::json!({ "available": true, "pending": pending })).into_response()
}

#[derive(Deserialize)]
pub(crate) struct ImportForm {
    catalog: String,
    owner: String,
}

/// `POST /api/inbox/import {catalog, owner}`: `catalog import CATALOG OWNER`, as the CLI runs it.
pub(crate) async fn import(State(state): State<super::State>, Json(form): Json<ImportForm>) -> Response {
    let (catalog, owner) = (form.catalog.trim().to_string(), form.owner.trim().to_string());
    if let Err(e) = crate::protocol::validate_catalog_name(&catalog) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    if !crate::protocol::is_account_key(&owner) {
        return error(StatusCode::BAD_REQUEST, "owner must be an account public key (56 characters, starting with A)");
    }
    let g = globals(&state);
    let (name, who) = (catalog.clone(), owner.clone());
    // The context and account JWT are written with blocking I/O: on a blocking thread.
    let runtime = tokio::runtime::Handle::current();
    let done = tokio::task::spawn_blocking(move || {
        runtime.block_on(crate::sharing::catalog_import(&g, &name, &who, false, false))
    })
    .await;
    match done {
        Ok(Ok(())) => {
            state.presence.imported();
            state.events.send(Event { kind: "catalogs", catalog: None });
            Json(serde_json::json!({ "message": format!("imported catalog '{catalog}'; it appears in a moment") }))
                .into_response()
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the import failed unexpectedly; see the server's log"),
    }
}

pub(crate) async fn stats(State(state): State<super::State>) -> Response {
    let cache = &state.fs.cache;
    Json(serde_json::json!({
        "cache": {
            "budget": cache.budget(),
            "cached_bytes": cache.cached_bytes(),
            "hits": cache.hits.load(Ordering::Relaxed),
            "misses": cache.misses.load(Ordering::Relaxed),
        },
        "served_bytes": state.served_bytes.load(Ordering::Relaxed),
        "open_files": state.fs.open_handles(),
    }))
    .into_response()
}

/// `GET /api/events`: `hello`, then one event per change, until the page or the server goes.
pub(crate) async fn events(State(state): State<super::State>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = state.events.subscribe();
    let stopping = state.stopping.clone();
    let hello = futures::stream::iter([Ok(SseEvent::default().event("hello").data("{}"))]);
    let changes = futures::stream::unfold((rx, stopping), |(mut rx, mut stopping)| async move {
        let next = tokio::select! {
            got = rx.recv() => got,
            _ = stopping.wait_for(|s| *s) => return None,
        };
        let event = match next {
            Ok(event) => SseEvent::default()
                .event(event.kind)
                .json_data(&event)
                .unwrap_or_else(|_| SseEvent::default().event("resync").data("{}")),
            // The page fell behind: it re-reads everything.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => SseEvent::default().event("resync").data("{}"),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), (rx, stopping)))
    });
    Sse::new(futures::StreamExt::chain(hello, changes)).keep_alive(KeepAlive::default())
}
