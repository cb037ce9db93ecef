//! `GET /files/<catalog>/<path>`: a file's bytes through the read engine, for players,
//! viewers and downloads.
//!
//! - One `Range: bytes=…` range gives 206 with `Content-Range`; beyond the end, 416 with
//!   `Content-Range: bytes */SIZE`; a malformed header, 400. Several ranges are answered with
//!   the whole file (200), which HTTP allows, rather than a multipart body nobody here needs.
//! - `ETag` is the content's sha256 (`If-None-Match` gives 304; an `If-Range` naming another
//!   tag gives the whole file).
//! - The body is read in [`PIECE`]-byte reads of one open handle, each pulled only when the
//!   connection has taken the last one, so memory per response is one piece and a client that
//!   goes away stops the reading (the handle is released on drop). The engine's read-ahead and
//!   chunk cache apply as for the mount.
//! - The first piece is read before the status line is sent, so an unreachable catalog is a
//!   502/504 with a reason, not a truncated 200. A later failure can only cut the body short.
//! - `?download=1` makes it an attachment named after the file.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::paths;
use crate::fs::{FsError, NatsterFs};

/// Bytes per read of the body.
pub const PIECE: u64 = 256 * 1024;

fn message(status: StatusCode, text: impl Into<String>) -> Response {
    (status, format!("{}\n", text.into())).into_response()
}

/// The status and reason for a read that failed before anything was sent.
pub(crate) fn fs_error_response(e: &FsError) -> Response {
    match e {
        FsError::NotFound => message(StatusCode::NOT_FOUND, "no such file"),
        FsError::Forbidden(m) => message(StatusCode::FORBIDDEN, format!("the catalog's owner refused access: {m}")),
        FsError::Timeout(d) => message(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the catalog did not answer within {d:?}; it may be offline, try again later"),
        ),
        FsError::Unreachable(m) => {
            message(StatusCode::BAD_GATEWAY, format!("the catalog is not reachable ({m}); try again later"))
        }
        other => message(StatusCode::BAD_GATEWAY, format!("cannot read the file: {other}")),
    }
}

/// The `Content-Type` to send for a peer-declared mime type: types a browser would execute
/// become plain text, anything unparsable becomes `application/octet-stream`.
pub(crate) fn safe_content_type(declared: &str) -> String {
    let essence = declared.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let token = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c));
    let valid = essence.split_once('/').is_some_and(|(t, s)| token(t) && token(s));
    if !valid {
        return "application/octet-stream".into();
    }
    let active = essence.contains("html")
        || essence.contains("xml")
        || essence.contains("javascript")
        || essence.contains("ecmascript")
        || essence == "text/css"
        || essence == "application/x-shockwave-flash";
    if active || essence.starts_with("text/") {
        "text/plain; charset=utf-8".into()
    } else {
        essence
    }
}

/// What the `Range` header asks for, given the file's size.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wanted {
    Whole,
    Part(Range<u64>),
    Unsatisfiable,
    Malformed,
}

pub(crate) fn wanted(range: Option<&str>, size: u64) -> Wanted {
    let Some(range) = range else { return Wanted::Whole };
    let parsed = match http_range_header::parse_range_header(range) {
        Ok(p) => p,
        Err(_) => return Wanted::Malformed,
    };
    match parsed.validate(size) {
        Ok(ranges) if ranges.len() == 1 => Wanted::Part(*ranges[0].start()..ranges[0].end().saturating_add(1)),
        // An empty file: nothing is satisfiable but the whole (empty) file.
        Ok(ranges) if ranges.is_empty() => Wanted::Unsatisfiable,
        Ok(_) => Wanted::Whole,
        Err(_) => Wanted::Unsatisfiable,
    }
}

/// An open handle of the engine, released when the response body is dropped.
struct Reading {
    fs: Arc<NatsterFs>,
    fh: u64,
    pos: u64,
    end: u64,
    state: super::State,
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.fs.release(self.fh);
    }
}

impl Reading {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, FsError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let size = (self.end - self.pos).min(PIECE) as u32;
        let bytes = self.fs.read(self.fh, self.pos, size).await?;
        if bytes.is_empty() {
            return Err(FsError::Remote("the file ended early".into()));
        }
        self.pos += bytes.len() as u64;
        self.state.served_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(Some(bytes))
    }
}

fn attachment_header(path: &str, download: bool) -> Option<HeaderValue> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' }).collect();
    let kind = if download { "attachment" } else { "inline" };
    HeaderValue::from_str(&format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{}", paths::encode(name))).ok()
}

pub(crate) async fn serve(State(state): State<super::State>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let raw = uri.path().strip_prefix("/files/").unwrap_or("");
    let target = match paths::parse(raw) {
        Ok(t) => t,
        Err(reason) => return message(StatusCode::BAD_REQUEST, reason),
    };
    let fs = state.fs.clone();
    let Some(index) = fs.catalogs().into_iter().find(|(_, c)| c.dir_name == target.catalog).map(|(i, _)| i) else {
        return message(StatusCode::NOT_FOUND, format!("no catalog '{}'", target.catalog));
    };
    let Some((ino, entry)) = fs.catalog_file(index, &target.path) else {
        return message(StatusCode::NOT_FOUND, format!("no file '{}' in catalog '{}'", target.path, target.catalog));
    };
    let size = entry.byte_size;
    let etag = format!("\"{}\"", entry.hash);
    let matches_etag = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').map(|t| t.trim().trim_start_matches("W/")).any(|t| t == etag || t == "*"))
    };
    let mut common = HeaderMap::new();
    common.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    common.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        common.insert(header::ETAG, v);
    }
    if matches_etag(header::IF_NONE_MATCH) == Some(true) {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok().or(Some("")));
    // If-Range naming another version: the client's partial copy is stale, send it all.
    let range = if matches_etag(header::IF_RANGE) == Some(false) { None } else { range };
    let (status, span) = match wanted(range, size) {
        Wanted::Whole => (StatusCode::OK, 0..size),
        Wanted::Part(span) => (StatusCode::PARTIAL_CONTENT, span),
        Wanted::Malformed => {
            return message(
                StatusCode::BAD_REQUEST,
                "malformed Range header; expected bytes=START-END, START- or -LENGTH",
            )
        }
        Wanted::Unsatisfiable => {
            let mut response =
                message(StatusCode::RANGE_NOT_SATISFIABLE, format!("range not satisfiable: the file has {size} bytes"));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            response.headers_mut().extend(common);
            return response;
        }
    };
    // HEAD: the headers GET would send, without reading a byte.
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        match stream_body(&state, ino, span.clone()).await {
            Ok(body) => body,
            Err(response) => return *response,
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.extend(common);
    if let Ok(v) = HeaderValue::from_str(&safe_content_type(&entry.mime_type)) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(span.end - span.start));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", span.start, span.end - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    let download = uri.query().is_some_and(|q| q.split('&').any(|p| p == "download" || p == "download=1"));
    if let Some(v) = attachment_header(&target.path, download) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    // Peer content runs nowhere in our origin; Chromium's PDF viewer refuses sandboxed
    // documents, and runs in its own origin anyway.
    if !entry.mime_type.eq_ignore_ascii_case("application/pdf") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "sandbox; default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'",
            ),
        );
    }
    response
}

/// The body for bytes `span` of file `ino`: its first piece read now (so a failure is a status,
/// not a cut body), the rest as the connection takes it.
async fn stream_body(state: &super::State, ino: u64, span: Range<u64>) -> Result<Body, Box<Response>> {
    let fs = state.fs.clone();
    let fh = match fs.open(ino) {
        Ok(fh) => fh,
        Err(e) => return Err(Box::new(fs_error_response(&e))),
    };
    let mut reading = Reading { fs: fs.clone(), fh, pos: span.start, end: span.end, state: state.clone() };
    let first = match reading.next_piece().await {
        Ok(first) => first,
        Err(e) => return Err(Box::new(fs_error_response(&e))),
    };
    let rest = futures::stream::try_unfold(reading, |mut reading| async move {
        match reading.next_piece().await {
            Ok(Some(bytes)) => Ok(Some((bytes, reading))),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!("a web download was cut short: {e}");
                Err(std::io::Error::other(e.to_string()))
            }
        }
    });
    let body = futures::StreamExt::chain(futures::stream::iter(first.map(Ok::<_, std::io::Error>)), rest);
    Ok(Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(wanted(None, 10), Wanted::Whole);
        assert_eq!(wanted(Some("bytes=0-0"), 10), Wanted::Part(0..1));
        assert_eq!(wanted(Some("bytes=2-"), 10), Wanted::Part(2..10));
        assert_eq!(wanted(Some("bytes=-3"), 10), Wanted::Part(7..10));
        assert_eq!(wanted(Some("bytes=5-100"), 10), Wanted::Part(5..10));
        assert_eq!(wanted(Some("bytes=10-"), 10), Wanted::Unsatisfiable);
        assert_eq!(wanted(Some("bytes=0-1,4-5"), 10), Wanted::Whole);
        assert_eq!(wanted(Some("bytes=0-"), 0), Wanted::Unsatisfiable);
        for bad in ["bytes=", "bytes=a-b", "items=0-1", "bytes=5-1", "", "bytes=--1"] {
            assert!(matches!(wanted(Some(bad), 10), Wanted::Malformed | Wanted::Unsatisfiable), "{bad}");
        }
        assert_eq!(wanted(Some("bytes=x"), 10), Wanted::Malformed);
    }

    #[test]
    fn content_types() {
        assert_eq!(safe_content_type("video/mp4"), "video/mp4");
        assert_eq!(safe_content_type("Image/PNG"), "image/png");
        assert_eq!(safe_content_type("text/html"), "text/plain; charset=utf-8");
        assert_eq!(safe_content_type("image/svg+xml"), "text/plain; charset=utf-8");
        assert_eq!(safe_content_type("application/javascript"), "text/plain; charset=utf-8");
        assert_eq!(safe_content_type("text/plain; charset=latin1"), "text/plain; charset=utf-8");
        assert_eq!(safe_content_type("video/mp4\r\nX-Evil: 1"), "application/octet-stream");
        assert_eq!(safe_content_type(""), "application/octet-stream");
    }
}
