//! What the benchmarks share: the best of several timed rounds.

use std::time::Instant;

/// The best of `rounds` timings of `iters` calls, in seconds per call.
pub fn best(rounds: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .fold(f64::MAX, f64::min)
}
