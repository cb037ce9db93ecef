//! The page and its assets, embedded in the binary: one HTML shell, one script, one style
//! sheet, one icon (`src/web/assets/`). No build step and nothing fetched from elsewhere; the
//! page's CSP allows only our own origin.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");
const ICON: &str = include_str!("assets/icon.svg");

const PAGE_CSP: &str = "default-src 'self'; img-src 'self'; media-src 'self'; frame-src 'self'; \
                        object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset_response(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(crate) async fn index() -> Response {
    let mut response = asset_response("text/html; charset=utf-8", INDEX);
    response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
    response
}

pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => asset_response("text/javascript; charset=utf-8", APP_JS),
        "style.css" => asset_response("text/css; charset=utf-8", STYLE),
        "icon.svg" => asset_response("image/svg+xml", ICON),
        _ => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}
