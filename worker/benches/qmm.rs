//! Quantized matmul benchmark: Lemurian's CPU kernels (`lemur_worker::qmm`) against
//! candle's `QMatMul` on the same weights in the same run, for a decode row against a
//! 16384 x 4096 matrix (larger than this VM's 32 MB L3 in every format but Q4_K's; the
//! weight bytes' rate against a loop that only reads as many bytes: the memory limit) and
//! a 64-row prompt against SmolLM2's MLP matrix.
//!
//! `cargo bench -p lemur-worker --bench qmm` (threads: `LEMUR_THREADS`, `RAYON_NUM_THREADS`)

#![allow(unsafe_code)]

mod common;

use common::best;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

/// Sums 64-bit words in sixteen lanes: a loop that only reads memory.
#[inline(always)]
fn read_all(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 16];
    for c in buf.chunks_exact(16) {
        for i in 0..16 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}

/// The same built for AVX2 (256-bit loads).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_all_avx2(buf: &[u64]) -> u64 {
    read_all(buf)
}

/// Seconds to read `bytes` once with [`read_all`]: the memory limit for streaming weights.
fn read_limit(bytes: usize) -> f64 {
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    best(5, 10, || {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            std::hint::black_box(unsafe { read_all_avx2(&buf) });
            return;
        }
        std::hint::black_box(read_all(&buf));
    })
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!(
        "{:<6} {:>5} {:>12} | {:>10} {:>10} {:>7} | {:>8} {:>8}",
        "format", "rows", "matrix", "lemur", "candle", "ratio", "GB/s", "limit"
    );
    let cases: &[(GgmlDType, usize, usize, usize)] = &[
        (GgmlDType::Q4_1, 1, 16384, 4096),
        (GgmlDType::Q8_0, 1, 16384, 4096),
        (GgmlDType::Q5_0, 1, 16384, 4096),
        (GgmlDType::Q4K, 1, 16384, 4096),
        (GgmlDType::Q6K, 1, 16384, 4096),
        (GgmlDType::Q4_1, 64, 1536, 576),
        (GgmlDType::Q8_0, 64, 1536, 576),
        (GgmlDType::Q5_0, 64, 1536, 576),
        (GgmlDType::Q4K, 64, 576, 1536),
        (GgmlDType::Q6K, 64, 576, 1536),
        (GgmlDType::Q8_0, 512, 1536, 576),
        (GgmlDType::Q5_0, 512, 1536, 576),
        (GgmlDType::Q4K, 512, 576, 1536),
    ];
    for &(dtype, m, n, k) in cases {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let q = QTensor::quantize(&w, dtype)?;
        let bytes = q.data()?.len();
        let reference = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let iters = match m {
            1 => 50,
            m if m > 64 => 4,
            _ => 20,
        };
        let ours = best(5, iters, || {
            std::hint::black_box(lemur_worker::qmm::matmul(&q, &xs, m).unwrap());
        });
        let theirs = best(5, iters, || {
            std::hint::black_box(reference.forward(&x).unwrap());
        });
        let gmac = |t: f64| (m * n * k) as f64 / t / 1e9;
        let (gbs, limit) = if m == 1 {
            (format!("{:.1}", bytes as f64 / ours / 1e9), format!("{:.1}", bytes as f64 / read_limit(bytes) / 1e9))
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:<6} {m:>5} {:>12} | {:>10} {:>10} {:>6.2}x | {gbs:>8} {limit:>8}",
            format!("{dtype:?}"),
            format!("{n}x{k}"),
            format!("{:.1}", gmac(ours)),
            format!("{:.1}", gmac(theirs)),
            theirs / ours,
        );
    }
    println!("(GMAC/s; ratio = Lemurian's speed over candle's; GB/s = weight bytes per second for one row, limit = a plain read of as many bytes)");
    Ok(())
}
