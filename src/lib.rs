//! natster-mount: decentralized media sharing over NATS, with the reader's side as a FUSE
//! filesystem. Each person owns a NATS account; a catalog is a folder its owner serves
//! (`server`); it is shared with another account by public key and imported by it; readers
//! list and read it through `client`, or mount every catalog they can read (`fs`). `daemon`
//! runs the long-lived parts (`up`, `mount`, `catalog serve`: folder watching, change notices,
//! readiness, status). The README describes the commands; each module's docs list its
//! invariants.
//!
//! Security model, in short (the README has the whole table): access rests on NATS accounts
//! (the account token that nats-server writes into every imported request, checked against
//! the owner's share list); authenticity on signatures checked offline by each end (`identity`:
//! the catalog server signs `get` and `open` replies with its user nkey and the JWT its
//! account issued, directly or through one of its signing keys, whose listing in the account
//! JWT the reader checks up to a trusted (or first-met, then pinned) operator; the reader
//! signs its `open` the same way), so neither another account, nor another user
//! of the reader's account, nor a NATS server in between can answer as the owner or learn a
//! session key; confidentiality and integrity of media on per-session AEAD keys (`crypto`);
//! and every v2 chunk is bound to the listing (`chunk_tree`): the index keeps a BLAKE3 tree
//! root per file, the signed listing carries it, each chunk carries its proof, and both ends
//! check it, so not even a server holding the owner's key gets bytes other than the indexed
//! ones past a reader holding the listing.
//! Original (v1) peers cannot sign: they are read unverified, whole files checked by sha256.

pub mod accounts;
pub mod cache;
pub mod chunk_memory;
pub mod chunk_tree;
pub mod cli;
pub mod client;
pub mod context;
pub mod crypto;
pub mod daemon;
pub mod fs;
pub mod global;
pub mod identity;
pub mod imports;
pub mod index;
pub mod listing;
pub mod protocol;
pub mod server;
pub mod serving;
pub mod shares;
pub mod sharing;
pub mod store;
pub mod web;
