//! Percentiles over exact samples (sorted copies: the sample counts here are small
//! enough that no histogram approximation is needed).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    /// Milliseconds.
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Summarizes samples in microseconds into milliseconds.
pub fn summarize_us(samples: &mut [i64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |q: f64| {
        let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        samples[i] as f64 / 1000.0
    };
    let sum: f64 = samples.iter().map(|&v| v as f64).sum();
    Summary {
        count: n,
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        p999: at(0.999),
        max: samples[n - 1] as f64 / 1000.0,
        mean: sum / n as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut v: Vec<i64> = (1..=1000).map(|i| i * 1000).collect();
        let s = summarize_us(&mut v);
        assert_eq!((s.p50, s.p99, s.p999, s.max), (500.0, 990.0, 999.0, 1000.0));
    }
}
