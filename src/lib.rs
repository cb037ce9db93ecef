//! natster-mount: decentralized media sharing over NATS, with the reader's side as a FUSE
//! filesystem. See `DESIGN.md` in the shared folder and the README.

pub mod accounts;
pub mod cache;
pub mod cli;
pub mod client;
pub mod context;
pub mod crypto;
pub mod fs;
pub mod index;
pub mod protocol;
pub mod server;
pub mod serving;
pub mod shares;
pub mod sharing;
