//! CPU attention benchmark: `attend::cpu_attention` on SmolLM2-135M's heads (9 query heads
//! in 3 groups, 64 wide) for a causal prompt of 64 to 1024 rows and a decode row against
//! as long a cache, against candle's matmul-softmax-matmul (`exec::attention_with_probs`,
//! the reference the runtime used before) in the same run.
//!
//! `cargo bench -p lemur-worker --bench attend` (threads: `LEMUR_THREADS`)

mod common;

use common::best;

use candle_core::{Device, Tensor};
use lemur_worker::fused::Visibility;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (h, groups, d) = (9, 3, 64);
    println!("{:>6} {:>6} | {:>10} {:>10} {:>7}", "rows", "keys", "lemur ms", "candle ms", "ratio");
    for (s, kv) in [(64, 64), (512, 512), (1024, 1024), (1, 512), (1, 2048)] {
        let q = Tensor::randn(0f32, 1.0, (1, h, s, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, h / groups, kv, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, h / groups, kv, d), &dev)?;
        let vis = Visibility { q_start: kv - s, rows_per_group: s, k_start: 0, window: None };
        let iters = if s == 1 { 200 } else { 5 };
        let ours = best(5, iters, || {
            std::hint::black_box(lemur_worker::attend::cpu_attention(&q, &k, &v, vis, groups).unwrap());
        });
        let theirs = best(3, iters, || {
            std::hint::black_box(lemur_worker::exec::attention_with_probs(&q, &k, &v, vis, groups).unwrap());
        });
        println!("{s:>6} {kv:>6} | {:>10.3} {:>10.3} {:>6.2}x", ours * 1e3, theirs * 1e3, theirs / ours);
    }
    println!("(best of 5 rounds, milliseconds per call; ratio = candle's time over Lemurian's)");
    Ok(())
}
