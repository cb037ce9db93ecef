//! One-time codes (`otc.generate`, `otc.claim`): an account asks for a code that binds its
//! context to a web login; the site account claims it once.
//!
//! Invariants, and what the original got wrong:
//! - Codes are 80 random bits from the OS (the original seeded a PRNG with the time).
//! - A code works once: a claim deletes it compare-and-set on the revision it read, so of two
//!   racing claims exactly one gets the context; after 5 minutes the bucket drops it.
//! - The stored context never holds the cloud token (`access_token`) or creds: a claim
//!   hands out who the account is, never a secret.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use rand::RngCore as _;

use super::wire::NatsterContext;
use super::Error;

pub const CODES_BUCKET: &str = "NATSTER_CODES";
pub const VALID_MINUTES: u32 = 5;

#[derive(Clone)]
pub struct Codes {
    kv: kv::Store,
}

impl Codes {
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Codes, Error> {
        let ttl = Duration::from_secs(u64::from(VALID_MINUTES) * 60);
        Ok(Codes { kv: super::projections::bucket(js, CODES_BUCKET, ttl, replicas).await? })
    }

    /// Stores `context` (secrets dropped) under a fresh code and returns the code.
    pub async fn generate(&self, mut context: NatsterContext) -> Result<String, Error> {
        context.access_token.clear();
        context.creds.clear();
        let mut bytes = [0u8; 10];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let code = data_encoding::BASE32_NOPAD.encode(&bytes);
        let value = serde_json::to_vec(&context).map_err(|e| Error::Store(e.to_string()))?;
        self.kv
            .create(&code, value.into())
            .await
            .map_err(|e| Error::Unavailable(format!("cannot store the code: {e}")))?;
        Ok(code)
    }

    /// The context stored under `code`, removed so that it cannot be claimed again; None if
    /// unknown, expired or claimed already.
    pub async fn claim(&self, code: &str) -> Result<Option<NatsterContext>, Error> {
        if code.is_empty() || code.len() > 64 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Ok(None);
        }
        let entry = self.kv.entry(code).await.map_err(|e| Error::Unavailable(format!("cannot read the code: {e}")))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else { return Ok(None) };
        if self.kv.delete_expect_revision(code, Some(entry.revision)).await.is_err() {
            return Ok(None); // another claim won
        }
        Ok(serde_json::from_slice(&entry.value).ok())
    }
}
