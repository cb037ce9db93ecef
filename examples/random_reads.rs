//! Latency of small random reads through any filesystem (a natster mount, sshfs, a local disk).
//!
//! Opens PATH once (a fresh file descriptor, no O_DIRECT), then does COUNT `pread`s of SIZE
//! bytes at distinct random SIZE-aligned offsets, one after the other, timing each. Give the
//! same `BENCH_SEED` to two runs to read the same offsets on two filesystems.
//!
//! Usage: `random_reads PATH COUNT SIZE`
//!
//! Prints a human-readable summary and one machine-readable line:
//! `RESULT n=.. size=.. p50_ms=.. p99_ms=.. mean_ms=.. min_ms=.. max_ms=..`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use rand::SeedableRng;

#[path = "common/latency.rs"]
mod latency;
use latency::{ms, Summary};

#[path = "common/outcome.rs"]
mod outcome;

fn main() -> ExitCode {
    outcome::exit_code("random_reads", run())
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, count, size] = args.as_slice() else {
        eprintln!("usage: random_reads PATH COUNT SIZE");
        std::process::exit(2)
    };
    let count: usize = count.parse().context("COUNT must be a number")?;
    let size: usize = size.parse().context("SIZE must be a number")?;
    if count == 0 || size == 0 {
        bail!("COUNT and SIZE must be at least 1");
    }
    let file = File::open(path).with_context(|| format!("cannot open {path}"))?;
    let len = file.metadata()?.len();
    let slots = usize::try_from(len / size as u64).unwrap_or(usize::MAX);
    if slots == 0 {
        bail!("{path} has {len} bytes, fewer than one read of {size}");
    }
    let mut rng = match std::env::var("BENCH_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
        None => rand::rngs::StdRng::from_entropy(),
    };
    // Distinct offsets, so no read is served by the page cache filled by an earlier one.
    let slots_read: Vec<usize> = if count <= slots {
        rand::seq::index::sample(&mut rng, slots, count).into_vec()
    } else {
        (0..count).map(|_| rand::Rng::gen_range(&mut rng, 0..slots)).collect()
    };
    let mut buf = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for slot in slots_read {
        let offset = slot as u64 * size as u64;
        let started = Instant::now();
        file.read_exact_at(&mut buf, offset).with_context(|| format!("pread of {size} bytes at {offset}"))?;
        samples.push(started.elapsed());
    }
    let summary = Summary::of(&mut samples).context("no samples")?;
    let Summary { p50, p99, mean, min, max } = summary;
    println!(
        "{count} random {size}-byte preads of {path}: p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, min {:.3} ms, max {:.3} ms",
        ms(p50),
        ms(p99),
        ms(mean),
        ms(min),
        ms(max)
    );
    println!("RESULT n={count} size={size} {}", summary.result_fields());
    Ok(())
}
