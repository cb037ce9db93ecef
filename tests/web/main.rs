//! The web UI end to end: `natster-mount web` over a real nats-server and a served catalog,
//! checked over HTTP (login and 401s, ranges byte for byte, ETag, bad paths, sharing and its
//! live events, TLS, stopping) and in a real headless Chromium (operator mode, two accounts:
//! the catalog list, a real H.264 video that plays and seeks fetching only the chunks around
//! the seek point, an image, live share and revision updates, a phone-width window).

#[path = "../common/mod.rs"]
mod common;

mod browser;
mod harness;
mod http;
