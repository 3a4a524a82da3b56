//! AVX-512 VNNI kernels for Q4_K and Q6_K: one weight row against up to four activation rows
//! (Q8_K), each weight block's values, scales and minimums unpacked once for all of them.
//!
//! A Q4_K block is 256 weights in eight sub-blocks of 32, each with a 6-bit scale and
//! minimum; its dot product with a Q8_K block is `d * da * sum_j sc_j (q_j . a_j) - dmin *
//! da * sum_j m_j sum(a_j)`. Per 64 weights (two sub-blocks, one register) a row costs a
//! `vpmaddubsw` (nibbles times activation bytes into 16-bit pairs) and a `vpdpwssd` (times
//! the two scales, summed into 32-bit lanes); the minimum's term comes from the Q8_K
//! block's sums of 16. The integer sums are exactly candle's (ggml's `vec_dot_q4_K_q8_K`),
//! and a row's float accumulation is the same whatever rows share its pass.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K, QK_K};
use half::f16;

use super::avx2::{hsum, prefetch};

/// GGUF's Q4_K block (candle's `BlockQ4K`, whose fields are private to candle).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// ggml's Q8_K activation block (candle's `BlockQ8K`, the same layout).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct A8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<Q4K>() == std::mem::size_of::<BlockQ4K>());
const _: () = assert!(std::mem::align_of::<Q4K>() == std::mem::align_of::<BlockQ4K>());
const _: () = assert!(std::mem::size_of::<A8K>() == std::mem::size_of::<BlockQ8K>());
const _: () = assert!(std::mem::align_of::<A8K>() == std::mem::align_of::<BlockQ8K>());

/// Candle's Q8_K blocks as [`A8K`]s.
pub fn a8k(blocks: &[BlockQ8K]) -> &[A8K] {
    // SAFETY: both are `repr(C)` structs of the same fields in the same order (candle's
    // copy of ggml's `block_q8_K`: f32, 256 i8, 16 i16), so size and alignment agree
    // (asserted above) and every bit pattern of one is a value of the other.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<A8K>(), blocks.len()) }
}

/// The block's eight 6-bit scales (bytes 0-7) and minimums (8-15), as ggml unpacks them.
#[inline(always)]
fn scales_and_mins(s: &[u8; 12]) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    [
        u0 & KMASK1,
        (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4),
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ]
}

/// A register of 32 16-bit lane indices, lane `l` holding `index(l)` (for `vpermw`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn lanes(index: impl Fn(usize) -> usize) -> __m512i {
    let idx: [i16; 32] = std::array::from_fn(|l| index(l) as i16);
    _mm512_loadu_si512(idx.as_ptr().cast())
}

/// Q4_K weights against Q8_K activation rows.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI (`avx512::available`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4k<const R: usize>(w: &[Q4K], acts: [&[A8K]; R]) -> [f32; R] {
    for a in &acts {
        assert!(a.len() >= w.len(), "activation row shorter than the weight row");
    }
    let low = _mm512_set1_epi8(0x0F);
    // Scale lanes for the register of sub-blocks 2c and 2c + 1: 16 of each.
    let pick = |c: usize| lanes(|l| 2 * c + l / 16);
    let picks = [pick(0), pick(1), pick(2), pick(3)];
    // The minimums (lanes 8-15) each twice: one per sum of 16 activations.
    let mins_twice = _mm256_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm256_setzero_ps(); R];
    for (i, b) in w.iter().enumerate() {
        prefetch(b, std::mem::size_of_val(b));
        let sm = scales_and_mins(&b.scales);
        let sm16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(sm.as_ptr().cast()));
        let sm512 = _mm512_castsi256_si512(sm16);
        let mut q = [_mm512_setzero_si512(); 4];
        let mut sc = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            let bits = _mm256_loadu_si256(b.qs.as_ptr().add(32 * c).cast());
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(bits), _mm256_srli_epi16(bits, 4));
            q[c] = _mm512_and_si512(both, low);
            sc[c] = _mm512_permutexvar_epi16(picks[c], sm512);
        }
        let mins = _mm256_permutexvar_epi16(mins_twice, sm16);
        let block = Unpacked { q, sc, sums_by: mins, d: b.d.to_f32(), sums_d: -b.dmin.to_f32() };
        block.rows(i, &acts, &mut acc, &mut accm);
    }
    finish(&acc, &accm)
}

/// A weight block unpacked for [`Unpacked::rows`]: its values as four registers of 64
/// unsigned bytes, each register's sub-block scales as 16-bit lanes, what multiplies the
/// activations' sums of 16 (the minimums, or the scales), and the two float factors.
struct Unpacked {
    q: [__m512i; 4],
    sc: [__m512i; 4],
    sums_by: __m256i,
    d: f32,
    sums_d: f32,
}

impl Unpacked {
    /// Adds the block's dot products with block `i` of each activation row: `d * da * sum(sc
    /// q a)` to `acc`, `sums_d * da * sum(sums_by * bsums)` to `acc_sums`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn rows<const R: usize>(
        &self,
        i: usize,
        acts: &[&[A8K]; R],
        acc: &mut [__m512; R],
        acc_sums: &mut [__m256; R],
    ) {
        for r in 0..R {
            let a = &acts[r][i];
            let mut sumi = _mm512_setzero_si512();
            for c in 0..4 {
                let y = _mm512_loadu_si512(a.qs.as_ptr().add(64 * c).cast());
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(self.q[c], y), self.sc[c]);
            }
            let m = _mm256_madd_epi16(_mm256_loadu_si256(a.bsums.as_ptr().cast()), self.sums_by);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(self.d * a.d), acc[r]);
            acc_sums[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(self.sums_d * a.d), acc_sums[r]);
        }
    }
}

/// Each row's two accumulators summed.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn finish<const R: usize>(acc: &[__m512; R], acc_sums: &[__m256; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) + hsum(acc_sums[r]);
    }
    out
}

/// GGUF's Q6_K block (candle's `BlockQ6K`): 256 weights of 6 bits (low four in `ql`, high
/// two in `qh`) in sixteen sub-blocks of 16 with signed 8-bit scales; a weight is
/// `d * scale * (q - 32)`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

const _: () = assert!(std::mem::size_of::<Q6K>() == std::mem::size_of::<BlockQ6K>());
const _: () = assert!(std::mem::align_of::<Q6K>() == std::mem::align_of::<BlockQ6K>());

/// Q6_K weights against Q8_K activation rows: per 64 weights a row costs a `vpmaddubsw`
/// (the 6-bit values, unsigned, times the activations) and a `vpdpwssd` (times the four
/// sub-blocks' scales); the `- 32` comes from the Q8_K block's sums of 16, which line up
/// with Q6_K's sub-blocks. The integer sums are candle's (ggml's `vec_dot_q6_K_q8_K`).
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI (`avx512::available`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6k<const R: usize>(w: &[Q6K], acts: [&[A8K]; R]) -> [f32; R] {
    for a in &acts {
        assert!(a.len() >= w.len(), "activation row shorter than the weight row");
    }
    let low = _mm512_set1_epi8(0x0F);
    let two = _mm512_set1_epi8(0x03);
    // The high bits of the two halves of a register: bits 0-1 and 2-3 (even registers),
    // 4-5 and 6-7 (odd), shifted per 16-bit lane.
    let shifts = [
        _mm512_inserti64x4::<1>(_mm512_set1_epi16(0), _mm256_set1_epi16(2)),
        _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(6)),
    ];
    // Scale lanes for the register of sub-blocks 4c .. 4c + 3: eight 16-bit lanes each.
    let pick = |c: usize| lanes(|l| 4 * c + l / 8);
    let picks = [pick(0), pick(1), pick(2), pick(3)];
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc32 = [_mm256_setzero_ps(); R];
    for (i, b) in w.iter().enumerate() {
        prefetch(b, std::mem::size_of_val(b));
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.scales.as_ptr().cast()));
        let sc512 = _mm512_castsi256_si512(sc16);
        let mut q = [_mm512_setzero_si512(); 4];
        let mut sc = [_mm512_setzero_si512(); 4];
        for n in 0..2 {
            let l = _mm512_loadu_si512(b.ql.as_ptr().add(64 * n).cast());
            let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.qh.as_ptr().add(32 * n).cast()));
            let high = |s: __m512i| _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(h, s), two), 4);
            q[2 * n] = _mm512_or_si512(_mm512_and_si512(l, low), high(shifts[0]));
            q[2 * n + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low), high(shifts[1]));
        }
        for c in 0..4 {
            sc[c] = _mm512_permutexvar_epi16(picks[c], sc512);
        }
        let d = b.d.to_f32();
        let block = Unpacked { q, sc, sums_by: sc16, d, sums_d: -32.0 * d };
        block.rows(i, &acts, &mut acc, &mut acc32);
    }
    finish(&acc, &acc32)
}
