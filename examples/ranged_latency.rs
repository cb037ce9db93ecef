//! Latency of small ranged reads through the library client.
//!
//! Connects with a context, lists a catalog, opens one of its files once (one v2 session), then
//! reads COUNT ranges of SIZE bytes at random 4 KiB-aligned offsets, one after the other,
//! timing each. Every read is a cold fetch: the library client keeps no cache, so each one
//! asks the server for the chunk(s) covering the range, waits for them, then verifies and
//! decrypts them. A few warm-up reads (not counted) come first, so connection and subscription
//! set-up do not land in the figures.
//!
//! Usage: `ranged_latency CATALOG FILE [COUNT=200] [SIZE=65536]`
//! where FILE is a path in the catalog (`/big.bin`) or a sha256.
//! Environment: `NATSTER_HOME`, `NATSTER_CONTEXT` (default `default`), `BENCH_SEED` (a number,
//! for reproducible offsets).
//!
//! Prints a human-readable summary and one machine-readable line:
//! `RESULT n=.. size=.. chunk_size=.. chunks_per_read=.. open_ms=.. p50_ms=.. p99_ms=.. mean_ms=.. min_ms=.. max_ms=..`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use natster_mount::client::{CatalogClient, ClientOptions};
use natster_mount::context::{Context, Home, DEFAULT_CONTEXT};
use rand::{Rng, SeedableRng};

const WARMUP: usize = 3;
const ALIGN: u64 = 4096;

fn usage() -> ! {
    eprintln!("usage: ranged_latency CATALOG FILE [COUNT=200] [SIZE=65536]");
    std::process::exit(2)
}

#[path = "common/latency.rs"]
mod latency;
use latency::{ms, Summary};

#[path = "common/outcome.rs"]
mod outcome;

#[tokio::main]
async fn main() -> ExitCode {
    outcome::exit_code("ranged_latency", run().await)
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 4 {
        usage();
    }
    let catalog = &args[0];
    let wanted = &args[1];
    let count: usize = args.get(2).map(|s| s.parse()).transpose().context("COUNT must be a number")?.unwrap_or(200);
    let size: usize = args.get(3).map(|s| s.parse()).transpose().context("SIZE must be a number")?.unwrap_or(65536);
    if count == 0 || size == 0 {
        bail!("COUNT and SIZE must be at least 1");
    }

    let home = Home::from_env()?;
    let context_name = std::env::var("NATSTER_CONTEXT").ok().filter(|s| !s.is_empty());
    let context = Context::load(&home, context_name.as_deref().unwrap_or(DEFAULT_CONTEXT))?;
    let nats = context.connect(Duration::from_secs(5)).await?;
    let client = CatalogClient::new(nats, catalog, ClientOptions::default())?;
    let listing = client.get().await?;
    let entry = listing
        .entries
        .iter()
        .find(|e| e.hash == *wanted || e.path.trim_start_matches('/') == wanted.trim_start_matches('/'))
        .with_context(|| format!("catalog '{catalog}' has no file '{wanted}'"))?;
    if entry.byte_size < size as u64 {
        bail!("{} has {} bytes, fewer than one read of {size}", entry.path, entry.byte_size);
    }

    let opened = Instant::now();
    let file = client.open(&entry.hash, Some(entry.byte_size)).await?;
    let open_time = opened.elapsed();

    let mut rng = match std::env::var("BENCH_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
        None => rand::rngs::StdRng::from_entropy(),
    };
    let slots = (entry.byte_size - size as u64) / ALIGN + 1;
    let chunk_size = file.chunk_size();
    let mut chunks_touched = 0u64;
    let mut samples = Vec::with_capacity(count);
    for i in 0..WARMUP + count {
        let offset = rng.gen_range(0..slots) * ALIGN;
        let started = Instant::now();
        let bytes = file.read_range(offset, size).await.with_context(|| format!("read of {size} bytes at {offset}"))?;
        let took = started.elapsed();
        if bytes.len() != size {
            bail!("read at {offset} returned {} bytes, expected {size}", bytes.len());
        }
        if i >= WARMUP {
            samples.push(took);
            chunks_touched += (offset + size as u64 - 1) / chunk_size - offset / chunk_size + 1;
        }
    }
    let summary = Summary::of(&mut samples).context("no samples")?;
    let Summary { p50, p99, mean, min, max } = summary;
    let per_read = chunks_touched as f64 / count as f64;
    println!(
        "{count} random {size}-byte reads of {} ({} bytes, {chunk_size}-byte chunks, {per_read:.2} chunks/read): \
         p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms, min {:.2} ms, max {:.2} ms (open {:.2} ms)",
        entry.path,
        entry.byte_size,
        ms(p50),
        ms(p99),
        ms(mean),
        ms(min),
        ms(max),
        ms(open_time)
    );
    println!(
        "RESULT n={count} size={size} chunk_size={chunk_size} chunks_per_read={per_read:.2} open_ms={:.3} {}",
        ms(open_time),
        summary.result_fields()
    );
    Ok(())
}
