//! Who may use the web UI: whoever opened the one-time login link that `natster-mount web`
//! printed. The first visit of `/login?token=…` trades the token for a session cookie
//! (HttpOnly, SameSite=Strict, Secure under TLS); the token is dead from then on. Every other
//! route answers 401 without that cookie.
//!
//! Tokens and session ids are 32 random bytes; only their SHA-256 is kept, so comparing them
//! leaks nothing useful through timing. State-changing requests (anything but GET and HEAD)
//! from a page of another origin are refused even with the cookie (belt and braces beside
//! SameSite=Strict and the JSON-only bodies).

use std::collections::HashSet;
use std::sync::Mutex;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use sha2::{Digest, Sha256};

const COOKIE: &str = "natster_session";
/// Longest token or cookie value looked at (ours are 64 hex digits).
const MAX_SECRET: usize = 128;

pub(crate) struct Auth {
    /// SHA-256 of the login token not used yet.
    login: Mutex<Option<[u8; 32]>>,
    /// SHA-256 of every live session id.
    sessions: Mutex<HashSet<[u8; 32]>>,
    /// Whether cookies get `Secure` (served over TLS).
    secure: bool,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Auth {
    pub fn new(secure: bool) -> Auth {
        Auth { login: Mutex::new(None), sessions: Mutex::new(HashSet::new()), secure }
    }

    /// A new one-time login token; any earlier unused one stops working.
    pub fn issue_login_token(&self) -> String {
        let token = random_secret();
        *self.login.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest(&token));
        token
    }

    /// Uses up the login token if `token` is it.
    fn redeem(&self, token: &str) -> bool {
        let mut login = self.login.lock().unwrap_or_else(|p| p.into_inner());
        if token.len() <= MAX_SECRET && *login == Some(digest(token)) {
            *login = None;
            true
        } else {
            false
        }
    }

    fn new_session(&self) -> String {
        let id = random_secret();
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(digest(&id));
        id
    }

    fn has_session(&self, headers: &HeaderMap) -> bool {
        let Some(id) = session_cookie(headers) else { return false };
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).contains(&digest(id))
    }

    fn cookie(&self, id: &str) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/{secure}")
    }
}

/// The value of our cookie, from any `Cookie` header.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == COOKIE && value.len() <= MAX_SECRET)
        .map(|(_, value)| value)
}

fn text(status: StatusCode, message: &str) -> Response {
    let mut response = (status, format!("{message}\n")).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub(crate) fn unauthorized() -> Response {
    text(
        StatusCode::UNAUTHORIZED,
        "not logged in: open the login link that `natster-mount web` printed (each link works once)",
    )
}

#[derive(serde::Deserialize)]
pub(crate) struct LoginQuery {
    token: Option<String>,
}

/// `GET /login?token=…`: the one-time token becomes a session cookie.
pub(crate) async fn login(
    State(state): State<super::State>,
    headers: HeaderMap,
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let token = query.ok().and_then(|Query(q)| q.token).unwrap_or_default();
    let fresh = state.auth.redeem(&token);
    if !fresh && !state.auth.has_session(&headers) {
        return text(
            StatusCode::UNAUTHORIZED,
            "this login link is wrong or was already used; restart `natster-mount web` for a new one",
        );
    }
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if fresh {
        let cookie = state.auth.cookie(&state.auth.new_session());
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
    }
    response
}

/// `POST /api/login-link`: a fresh one-time link, for logging in another device (a phone)
/// from a browser that is logged in already. It replaces any link not used yet, and is
/// spelled with the host this browser reached us by.
pub(crate) async fn new_link(State(state): State<super::State>, headers: HeaderMap) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let plausible =
        !host.is_empty() && host.len() <= 255 && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    if !plausible {
        return text(StatusCode::BAD_REQUEST, "no usable Host header to build the link with");
    }
    let scheme = if state.auth.secure { "https" } else { "http" };
    let url = format!("{scheme}://{host}/login?token={}", state.auth.issue_login_token());
    let mut response = axum::Json(serde_json::json!({ "url": url })).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// True if a state-changing request comes from a page of another origin than ours.
fn cross_origin(headers: &HeaderMap) -> bool {
    let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST)) else {
        // Browsers send Origin on every cross-origin POST; without one it is not a browser's.
        return false;
    };
    let (Ok(origin), Ok(host)) = (origin.to_str(), host.to_str()) else { return true };
    origin.split_once("://").map(|(_, h)| h) != Some(host)
}

/// Middleware: 401 without a session, 403 for a cross-origin state change.
pub(crate) async fn require_session(State(state): State<super::State>, request: Request, next: Next) -> Response {
    if !state.auth.has_session(request.headers()) {
        return unauthorized();
    }
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    if !safe && cross_origin(request.headers()) {
        return text(StatusCode::FORBIDDEN, "refused: this request came from another web site");
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_token_works_once() {
        let auth = Auth::new(false);
        let token = auth.issue_login_token();
        assert!(!auth.redeem("nope"));
        assert!(auth.redeem(&token));
        assert!(!auth.redeem(&token), "second use");
        let id = auth.new_session();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&format!("a=b; {COOKIE}={id}")).unwrap());
        assert!(auth.has_session(&headers));
        headers.insert(header::COOKIE, HeaderValue::from_static("natster_session=0000"));
        assert!(!auth.has_session(&headers));
    }

    #[test]
    fn cross_origin_posts_are_told_apart() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8642"));
        assert!(!cross_origin(&headers));
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8642"));
        assert!(!cross_origin(&headers));
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(cross_origin(&headers));
    }
}
