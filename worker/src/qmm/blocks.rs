//! GGUF's 32-element block layouts, the 8-bit activation block they are multiplied
//! with, how activations are quantized (exactly as ggml and candle do), and the portable
//! scalar dot products (the fallback without AVX2, and the reference the SIMD kernels are
//! tested against).

use half::f16;

/// Elements per block of every format here.
pub const QK: usize = 32;

#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// A weight block of Q8_0, and the activation block of the symmetric formats.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// A block of 8-bit activations: ggml's Q8_0 (`d`) and Q8_1 (`d` and `s`, `d` times the
/// sum of `qs`) in one, with the scales already rounded to f16 and widened, since every
/// weight row reads them again.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct A8 {
    pub d: f32,
    pub s: f32,
    /// `s / 8`: the SIMD kernels add the offset term to each of their eight lanes.
    pub s8: f32,
    pub qs: [i8; 32],
}

// The layouts GGUF stores (and candle's block types share).
const _: () = assert!(std::mem::size_of::<Q4_0>() == 18);
const _: () = assert!(std::mem::size_of::<Q4_1>() == 20);
const _: () = assert!(std::mem::size_of::<Q5_0>() == 22);
const _: () = assert!(std::mem::size_of::<Q5_1>() == 24);
const _: () = assert!(std::mem::size_of::<Q8_0>() == 34);

/// A row of activations (a multiple of 32 long) as 8-bit blocks, rounded exactly as ggml's
/// `quantize_row_q8_0` and `quantize_row_q8_1` round them (`s` is f16(sum) * d in f16).
/// `v.round()` (half away from zero, as ggml's `roundf`) for |v| < 2^31, without the libm
/// call: truncate, then step by the exact fractional part; the loop around it vectorises.
#[inline(always)]
pub fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let f = v - t as f32;
    t + i32::from(f >= 0.5) - i32::from(f <= -0.5)
}

pub fn quantize(xs: &[f32], out: &mut Vec<A8>) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: the features were just detected.
        #[allow(unsafe_code)]
        return unsafe { quantize_avx2(xs, out) };
    }
    quantize_plain(xs, out)
}

/// The same loop built for AVX2 (the compiler vectorises each block's maximum, rounding
/// and sum; the arithmetic is the same IEEE operations, so the blocks are bit for bit the
/// plain loop's).
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,f16c")]
unsafe fn quantize_avx2(xs: &[f32], out: &mut Vec<A8>) {
    quantize_plain(xs, out)
}

#[inline(always)]
fn quantize_plain(xs: &[f32], out: &mut Vec<A8>) {
    for c in xs.chunks_exact(QK) {
        // The largest magnitude in eight lanes (a maximum is the same in any order), so the
        // loop vectorises instead of waiting on one running maximum.
        let mut lanes = [0f32; 8];
        for ch in c.chunks_exact(8) {
            for (m, x) in lanes.iter_mut().zip(ch) {
                *m = m.max(x.abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &m| a.max(m));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; 32];
        for (q, &x) in qs.iter_mut().zip(c) {
            *q = round_half_away(x * id) as i8;
        }
        let d = f16::from_f32(d);
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        let s = (f16::from_f32(sum as f32) * d).to_f32();
        out.push(A8 { d: d.to_f32(), s, s8: s * 0.125, qs });
    }
}

/// A 32-element weight block: its values as integers and how they scale.
pub trait Block: Copy + Send + Sync + 'static {
    /// The block's 32 integer values (element order).
    fn values(&self) -> [i32; 32];
    fn scale(&self) -> f32;
    /// The offset term: the block's minimum times the activation's scaled sum (0 for the
    /// symmetric formats).
    fn offset(&self, _a: &A8) -> f32 {
        0.0
    }
}

fn nibbles(qs: &[u8; 16]) -> [i32; 32] {
    let mut v = [0; 32];
    for j in 0..16 {
        v[j] = i32::from(qs[j] & 0x0F);
        v[j + 16] = i32::from(qs[j] >> 4);
    }
    v
}

fn with_high_bits(qs: &[u8; 16], qh: &[u8; 4]) -> [i32; 32] {
    let h = u32::from_le_bytes(*qh);
    let mut v = nibbles(qs);
    for (j, x) in v.iter_mut().enumerate() {
        *x |= (((h >> j) & 1) << 4) as i32;
    }
    v
}

impl Block for Q4_0 {
    fn values(&self) -> [i32; 32] {
        nibbles(&self.qs).map(|v| v - 8)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
}

impl Block for Q4_1 {
    fn values(&self) -> [i32; 32] {
        nibbles(&self.qs)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn offset(&self, a: &A8) -> f32 {
        self.m.to_f32() * a.s
    }
}

impl Block for Q5_0 {
    fn values(&self) -> [i32; 32] {
        with_high_bits(&self.qs, &self.qh).map(|v| v - 16)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
}

impl Block for Q5_1 {
    fn values(&self) -> [i32; 32] {
        with_high_bits(&self.qs, &self.qh)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn offset(&self, a: &A8) -> f32 {
        self.m.to_f32() * a.s
    }
}

impl Block for Q8_0 {
    fn values(&self) -> [i32; 32] {
        self.qs.map(i32::from)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
}

/// The dot product of a weight row with an activation row, block by block in integers and
/// scaled per block: what every kernel here computes, written plainly.
pub fn dot<B: Block>(w: &[B], a: &[A8]) -> f32 {
    let mut sum = 0f32;
    for (b, x) in w.iter().zip(a) {
        let sumi: i32 = b.values().iter().zip(&x.qs).map(|(&v, &q)| v * i32::from(q)).sum();
        sum += sumi as f32 * b.scale() * x.d + b.offset(x);
    }
    sum
}
