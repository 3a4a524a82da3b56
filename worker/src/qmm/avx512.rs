//! AVX-512 VNNI kernels for the symmetric 32-element formats (Q4_0, Q5_0, Q8_0): two blocks
//! per 512-bit register, one weight row against up to four activation rows, each block's
//! integer dot product in one `vpdpbusd` (unsigned bytes times signed bytes, summed in
//! fours into 32-bit lanes).
//!
//! The activations are laid out once per matmul as [`P8`] pairs: two blocks' 64 bytes
//! stored plus 128 (unsigned), and each block's scale spread over its eight lanes, so a
//! row's part of a block pair is one load, one `vpdpbusd`, a conversion and two float ops.
//! The weight pair's `128 * sum`, negated, seeds the accumulator, so the dot product stays
//! exact in integers: a block's integer sum is exactly the AVX2 and the plain kernels';
//! only the float accumulation order differs, and it is the same for a row whatever rows
//! share its pass. (The formats with a minimum, Q4_1 and Q5_1, measured no faster this way
//! on prompts and slower on a decode row: they stay on the AVX2 kernels.)

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::avx2::{bits, nibbles, prefetch};
use super::blocks::{A8, Q4_0, Q5_0, Q8_0};

/// Whether this CPU runs these kernels (`LEMUR_NO_AVX512=1` turns them off, to measure the
/// AVX2 kernels beside them on the same machine).
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("LEMUR_NO_AVX512").is_none_or(|v| v.is_empty() || v == "0")
            && super::avx2::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// Two activation blocks as one register's worth: their bytes plus 128 and their scales,
/// each block's in its eight lanes. An odd row's last pair has a second block of zeros
/// (scale 0), which adds nothing.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct P8 {
    pub qs: [u8; 64],
    pub d: [f32; 16],
}

/// `m` rows of `kb` activation blocks as rows of `kb.div_ceil(2)` pairs.
pub fn pairs(acts: &[A8], kb: usize, m: usize) -> Vec<P8> {
    let np = kb.div_ceil(2);
    let offset = 0x80;
    let mut out = Vec::with_capacity(m * np);
    for row in acts.chunks_exact(kb).take(m) {
        for p in 0..np {
            let mut pair = P8 { qs: [offset; 64], d: [0.0; 16] };
            for (h, a) in row[2 * p..(2 * p + 2).min(kb)].iter().enumerate() {
                for (q, &v) in pair.qs[32 * h..32 * h + 32].iter_mut().zip(&a.qs) {
                    *q = (v as u8) ^ offset;
                }
                pair.d[8 * h..8 * h + 8].fill(a.d);
            }
            out.push(pair);
        }
    }
    out
}

/// Two f16 values as sixteen f32 lanes: the first in lanes 0-7, the second in 8-15.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn halves(a: u16, b: u16) -> __m512 {
    let h = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(_mm_set1_epi16(a as i16)), _mm_set1_epi16(b as i16));
    _mm512_cvtph_ps(h)
}

macro_rules! kernel {
    ($(#[$doc:meta])* $name:ident, $W:ty, |$b:ident| $unpack:expr) => {
        $(#[$doc])*
        /// # Safety
        /// The CPU has AVX-512 F, BW, VL and VNNI, AVX2, FMA and F16C ([`available`]).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub unsafe fn $name<const R: usize>(w: &[$W], acts: [&[P8]; R]) -> [f32; R] {
            let np = w.len().div_ceil(2);
            for a in &acts {
                assert!(a.len() >= np, "activation row shorter than the weight row");
            }
            // Two sets of accumulators, for even and odd pairs: no add waits on the one
            // before it (a decode row is one long chain otherwise).
            let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            macro_rules! step {
                ($p:expr, $acc:ident) => {{
                    let b0 = &w[2 * $p];
                    let b1 = w.get(2 * $p + 1);
                    let q0: __m256i = {
                        let $b = b0;
                        $unpack
                    };
                    let q1: __m256i = match b1 {
                        Some($b) => $unpack,
                        None => _mm256_setzero_si256(),
                    };
                    let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1);
                    let vd = halves(b0.d.to_bits(), b1.map_or(0, |b| b.d.to_bits()));
                    // Minus 128 times the weights' sums, in fours: what the activations'
                    // offset adds.
                    let zero = _mm512_setzero_si512();
                    let seed = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(0x80u8 as i8), q));
                    for r in 0..R {
                        let a = &acts[r][$p];
                        let y = _mm512_load_si512(a.qs.as_ptr().cast());
                        let dot = _mm512_dpbusd_epi32(seed, y, q);
                        let s = _mm512_mul_ps(vd, _mm512_load_ps(a.d.as_ptr()));
                        $acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, $acc[r]);
                    }
                }};
            }
            for i in 0..np / 2 {
                // The weight row streams from memory once per pass: ask for it ahead.
                prefetch(w.as_ptr().wrapping_add(4 * i), 4 * std::mem::size_of::<$W>());
                step!(2 * i, acc0);
                step!(2 * i + 1, acc1);
            }
            if np % 2 == 1 {
                step!(np - 1, acc0);
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
            }
            out
        }
    };
}

kernel!(
    /// Q4_0 weights (nibble - 8).
    q4_0, Q4_0, |b| _mm256_sub_epi8(nibbles(&b.qs), _mm256_set1_epi8(8))
);
kernel!(
    /// Q5_0 weights (five bits - 16).
    q5_0, Q5_0,
    |b| _mm256_or_si256(nibbles(&b.qs), _mm256_andnot_si256(bits(&b.qh), _mm256_set1_epi8(0xF0u8 as i8)))
);
kernel!(
    /// Q8_0 weights.
    q8_0, Q8_0, |b| _mm256_loadu_si256(b.qs.as_ptr().cast())
);
