//! The closed-loop driver: `concurrency` workers each call, wait for the answer and call
//! again until the deadline; every latency is kept, so the percentiles are exact. A short
//! warm-up before the measured window is not counted.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Stats {
    pub requests: usize,
    pub errors: usize,
    /// Every call made, the warm-up's included (to share the gateway's CPU time out).
    pub calls_made: usize,
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
}

impl Stats {
    /// Exact percentiles of `latencies` (sorted here) over a window of `elapsed`.
    pub fn from_latencies(mut latencies: Vec<Duration>, errors: usize, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        let at = |q: f64| -> Duration {
            if latencies.is_empty() {
                return Duration::ZERO;
            }
            let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
            latencies[i - 1]
        };
        Self {
            requests: latencies.len(),
            errors,
            calls_made: latencies.len() + errors,
            rps: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

/// Milliseconds with three decimals, for the report.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Drives `call` (true = success) from `concurrency` workers for `duration` after a
/// warm-up of `warmup`. Workers stop by themselves at the deadline.
pub async fn drive<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Stats
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now() + warmup;
    let deadline = start + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::with_capacity(4096), 0usize);
                let mut made = 0usize;
                loop {
                    let begun = Instant::now();
                    if begun >= deadline {
                        break;
                    }
                    let ok = call().await;
                    made += 1;
                    if begun < start {
                        continue;
                    }
                    if ok {
                        latencies.push(begun.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors, made)
            })
        })
        .collect();
    let (mut all, mut errors, mut made) = (Vec::new(), 0, 0);
    for worker in workers {
        match worker.await {
            Ok((latencies, errs, calls)) => {
                all.extend(latencies);
                errors += errs;
                made += calls;
            }
            // A caller that died: its calls are lost, so the run had fewer callers than it
            // says; counted as an error, which the CI check refuses.
            Err(_) => errors += 1,
        }
    }
    Stats {
        calls_made: made,
        ..Stats::from_latencies(all, errors, duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact() {
        let lat: Vec<_> = (1..=1000).rev().map(Duration::from_micros).collect();
        let s = Stats::from_latencies(lat, 0, Duration::from_secs(1));
        assert_eq!(s.p50, Duration::from_micros(500));
        assert_eq!(s.p99, Duration::from_micros(990));
        assert_eq!(s.p999, Duration::from_micros(999));
        assert_eq!(s.requests, 1000);
    }
}
