//! AVX2 kernels for the 32-element formats: one weight row against up to four activation
//! rows at once, so a prompt's rows share each weight block's load and unpacking. (A tile
//! of two weight rows by two activation rows, each activation block loaded once for both,
//! measured 0.65x of this on every format: it unpacks each weight block for two rows only.)
//!
//! Each block is unpacked to 32 bytes, multiplied with the activation block's 32 bytes by
//! `maddubs` (unsigned times signed; a signed weight lends its sign to the activation) and
//! `madd` into eight 32-bit sums, and accumulated in f32 scaled by the two block scales:
//! the arithmetic of ggml's AVX2 `vec_dot_*` kernels. Q4_1 and Q5_1 also come as `_vnni`
//! kernels for CPUs with AVX-512 VNNI: the same steps with one 256-bit `vpdpbusd` for
//! `maddubs` and `madd` (the same integer sums, so the same results bit for bit).

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blocks::{A8, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

/// How far ahead of the block being multiplied the kernels prefetch the weight rows, which
/// stream from memory once per pass (a task's rows are contiguous, so this runs into the
/// next rows): a decode step measured 1.5x faster with 4 KB (SmolLM2 Q4_1, 2 threads: 91
/// -> 142-152 tokens/s; 0.5 KB gave 100, 8 KB no more than 4).
const PREFETCH_BYTES: usize = 4096;

/// Prefetches the cache lines `PREFETCH_BYTES` past the `len` bytes at `at`.
#[inline(always)]
pub(super) fn prefetch<T>(at: *const T, len: usize) {
    let ahead = at.cast::<u8>().wrapping_add(PREFETCH_BYTES);
    for line in (0..len).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address (and `wrapping_add` makes
        // none of the pointer arithmetic undefined).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
    }
}

/// Whether this CPU runs these kernels.
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

/// The sum of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// 16 bytes of nibbles as 32 bytes: the low nibbles first, then the high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let t = _mm_loadu_si128(qs.as_ptr().cast());
    let both = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4));
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// 32 bits as 32 bytes: 0xFF where the bit is set, 0 where not.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bits(qh: &[u8; 4]) -> __m256i {
    let x = i32::from_le_bytes(*qh);
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

macro_rules! kernel {
    (@abs true, $q:expr) => { _mm256_sign_epi8($q, $q) };
    (@abs false, $q:expr) => { $q };
    (@sign true, $y:expr, $q:expr) => { _mm256_sign_epi8($y, $q) };
    (@sign false, $y:expr, $q:expr) => { $y };
    // The block's scale (and minimum) as f32 lanes [d, m, 0, 0].
    (@scales true, $b:expr) => {
        _mm_cvtph_ps(_mm_cvtsi32_si128((u32::from($b.d.to_bits()) | u32::from($b.m.to_bits()) << 16) as i32))
    };
    (@scales false, $b:expr) => { _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from($b.d.to_bits()))) };
    // The minimum broadcast, for the offset term (nothing for the symmetric formats).
    (@min true, $sc:expr) => { _mm256_broadcastss_ps(_mm_movehdup_ps($sc)) };
    (@min false, $sc:expr) => { () };
    // The offset term m * s, an eighth of it in each lane of the accumulator.
    (@offset true, $acc:expr, $vm:expr, $a:expr) => { $acc = _mm256_fmadd_ps($vm, _mm256_set1_ps($a.s8), $acc) };
    (@offset false, $acc:expr, $vm:expr, $a:expr) => { let _ = ($vm, $a); };
    // Four bytes' products summed into each 32-bit lane: `maddubs` then `madd` with ones, or
    // one `vpdpbusd` (the same sums: `maddubs` cannot saturate on these ranges).
    (@dot4 false, $qa:expr, $y:expr) => { _mm256_madd_epi16(_mm256_maddubs_epi16($qa, $y), _mm256_set1_epi16(1)) };
    (@dot4 true, $qa:expr, $y:expr) => { _mm256_dpbusd_epi32(_mm256_setzero_si256(), $qa, $y) };
    // One kernel, or (a second name) also its `_vnni` twin.
    ($(#[$doc:meta])* $name:ident, $W:ty, signed: $signed:tt, min: $min:tt, |$b:ident| $unpack:expr) => {
        kernel!(@one false, "avx2,fma,f16c", $(#[$doc])* $name, $W, signed: $signed, min: $min, |$b| $unpack);
    };
    ($(#[$doc:meta])* $name:ident, $vnni:ident, $W:ty, signed: $signed:tt, min: $min:tt, |$b:ident| $unpack:expr) => {
        kernel!(@one false, "avx2,fma,f16c", $(#[$doc])* $name, $W, signed: $signed, min: $min, |$b| $unpack);
        kernel!(@one true, "avx2,fma,f16c,avx512vl,avx512vnni", $(#[$doc])*
            /// (This one with `vpdpbusd` on 256 bits: the CPU also has AVX-512 VL and VNNI.)
            $vnni, $W, signed: $signed, min: $min, |$b| $unpack);
    };
    (@one $v:tt, $features:literal, $(#[$doc:meta])* $name:ident, $W:ty, signed: $signed:tt, min: $min:tt, |$b:ident| $unpack:expr) => {
        $(#[$doc])*
        /// # Safety
        /// The CPU has AVX2, FMA and F16C ([`available`]), and for the `_vnni` kernels AVX-512
        /// VL and VNNI.
        #[target_feature(enable = $features)]
        pub unsafe fn $name<const R: usize>(w: &[$W], acts: [&[A8]; R]) -> [f32; R] {
            for a in &acts {
                assert!(a.len() >= w.len(), "activation row shorter than the weight row");
            }
            // Two sets of accumulators, for even and odd blocks: the adds of one block do not
            // wait for the previous block's.
            let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
            macro_rules! step {
                ($i:expr, $acc:ident) => {{
                    let $b = &w[$i];
                    let sc = kernel!(@scales $min, $b);
                    let vd = _mm256_broadcastss_ps(sc);
                    let vm = kernel!(@min $min, sc);
                    let q: __m256i = $unpack;
                    let qa = kernel!(@abs $signed, q);
                    for r in 0..R {
                        let a = &acts[r][$i];
                        let y = kernel!(@sign $signed, _mm256_loadu_si256(a.qs.as_ptr().cast()), q);
                        let p = _mm256_cvtepi32_ps(kernel!(@dot4 $v, qa, y));
                        $acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_set1_ps(a.d)), p, $acc[r]);
                        kernel!(@offset $min, $acc[r], vm, a);
                    }
                }};
            }
            let pairs = w.len() / 2;
            for i in 0..pairs {
                // The weight row streams from memory once per pass: ask for it ahead.
                prefetch(w.as_ptr().wrapping_add(2 * i), 2 * std::mem::size_of::<$W>());
                step!(2 * i, acc0);
                step!(2 * i + 1, acc1);
            }
            if w.len() % 2 == 1 {
                step!(w.len() - 1, acc0);
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
            }
            out
        }
    };
}

kernel!(
    /// Q4_0 weights (nibble - 8).
    q4_0, Q4_0, signed: true, min: false, |b| _mm256_sub_epi8(nibbles(&b.qs), _mm256_set1_epi8(8))
);
kernel!(
    /// Q4_1 weights (nibble, plus a minimum).
    q4_1, q4_1_vnni, Q4_1, signed: false, min: true, |b| nibbles(&b.qs)
);
kernel!(
    /// Q5_0 weights (five bits - 16).
    q5_0, Q5_0, signed: true, min: false,
    |b| _mm256_or_si256(nibbles(&b.qs), _mm256_andnot_si256(bits(&b.qh), _mm256_set1_epi8(0xF0u8 as i8)))
);
kernel!(
    /// Q5_1 weights (five bits, plus a minimum).
    q5_1, q5_1_vnni, Q5_1, signed: false, min: true,
    |b| _mm256_or_si256(nibbles(&b.qs), _mm256_and_si256(bits(&b.qh), _mm256_set1_epi8(0x10)))
);
kernel!(
    /// Q8_0 weights.
    q8_0, Q8_0, signed: true, min: false, |b| _mm256_loadu_si256(b.qs.as_ptr().cast())
);
