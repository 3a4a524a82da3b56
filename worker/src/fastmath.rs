//! Element-wise math the CPU runs on whole activations: an `exp` the compiler vectorises
//! (Cephes' polynomial, within 2e-7 relative of libm's) and SiLU-multiply over slices,
//! built for AVX2 where the CPU has it and split over the kernel pool when large.

#![allow(unsafe_code)]

use crate::qmm::pool;

/// Elements from which SiLU-multiply splits over threads.
const PARALLEL: usize = 1 << 15;

/// `e^x`, branch-free: `2^n * p(r)` with `x = n ln 2 + r`, `|r| <= ln 2 / 2`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[inline(always)]
fn silu_mul_plain(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// The same loop built for AVX2 and FMA (eight lanes).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
    silu_mul_plain(g, u, out)
}

fn silu_mul_chunk(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { silu_mul_avx2(g, u, out) };
    }
    silu_mul_plain(g, u, out)
}

/// `silu(g) * u` element-wise.
pub fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    let n = g.len().min(u.len());
    if n < PARALLEL {
        let mut out = vec![0f32; n];
        silu_mul_chunk(&g[..n], &u[..n], &mut out);
        return out;
    }
    let per = n.div_ceil(pool::threads() * 2);
    pool::map(n.div_ceil(per), &|t| {
        let (a, b) = (t * per, ((t + 1) * per).min(n));
        let mut o = vec![0f32; b - a];
        silu_mul_chunk(&g[a..b], &u[a..b], &mut o);
        o
    })
    .concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_libms_within_2e7() {
        let mut worst = 0f32;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn silu_mul_is_its_closed_form_split_or_not() {
        for n in [7, 1000, PARALLEL + 13] {
            let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
            let u: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let got = silu_mul(&g, &u);
            for ((o, g), u) in got.iter().zip(&g).zip(&u) {
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((o - want).abs() <= 1e-6 * want.abs().max(1.0), "{o} vs {want}");
            }
        }
    }
}
