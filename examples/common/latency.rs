//! Latency statistics shared by the benchmark examples.

use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The figures every latency benchmark reports.
pub struct Summary {
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples` (sorted here); None when there are none.
    pub fn of(samples: &mut [Duration]) -> Option<Summary> {
        samples.sort();
        let (&min, &max) = (samples.first()?, samples.last()?);
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        Some(Summary { p50: percentile(samples, 0.50), p99: percentile(samples, 0.99), mean, min, max })
    }

    /// The `key=value` fields of a `RESULT` line, which scripts/bench.sh parses.
    pub fn result_fields(&self) -> String {
        format!(
            "p50_ms={:.3} p99_ms={:.3} mean_ms={:.3} min_ms={:.3} max_ms={:.3}",
            ms(self.p50),
            ms(self.p99),
            ms(self.mean),
            ms(self.min),
            ms(self.max)
        )
    }
}
