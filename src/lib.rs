//! natster-mount: decentralized media sharing over NATS, with the reader's side as a FUSE
//! filesystem. Each person owns a NATS account; a catalog is a folder its owner serves
//! (`server`); it is shared with another account by public key and imported by it; readers
//! list and read it through `client`, or mount every catalog they can read (`fs`). The
//! README describes the commands; each module's docs list its invariants.

pub mod accounts;
pub mod cache;
pub mod cli;
pub mod client;
pub mod context;
pub mod crypto;
pub mod fs;
pub mod identity;
pub mod index;
pub mod protocol;
pub mod server;
pub mod serving;
pub mod shares;
pub mod sharing;
pub mod store;
