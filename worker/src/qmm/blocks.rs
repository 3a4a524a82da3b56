//! GGUF's 32-element block layouts, the 8-bit activation blocks they are multiplied
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

/// The activation block of the formats with a minimum (Q4_1, Q5_1): `s` is `d` times the
/// sum of `qs`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; 32],
}

// The layouts GGUF stores (and candle's block types share).
const _: () = assert!(std::mem::size_of::<Q4_0>() == 18);
const _: () = assert!(std::mem::size_of::<Q4_1>() == 20);
const _: () = assert!(std::mem::size_of::<Q5_0>() == 22);
const _: () = assert!(std::mem::size_of::<Q5_1>() == 24);
const _: () = assert!(std::mem::size_of::<Q8_0>() == 34);
const _: () = assert!(std::mem::size_of::<Q8_1>() == 36);

/// One block's scale and rounded values, as ggml's `quantize_row_q8_0` computes them.
fn q8(xs: &[f32], qs: &mut [i8; 32]) -> f16 {
    let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &x) in qs.iter_mut().zip(xs) {
        *q = (x * id).round() as i8;
    }
    f16::from_f32(d)
}

/// A row of activations (a multiple of 32 long) as Q8_0 blocks.
pub fn quantize_q8_0(xs: &[f32], out: &mut Vec<Q8_0>) {
    for c in xs.chunks_exact(QK) {
        let mut b = Q8_0 { d: f16::ZERO, qs: [0; 32] };
        b.d = q8(c, &mut b.qs);
        out.push(b);
    }
}

/// A row of activations as Q8_1 blocks (`s` rounded as ggml rounds it: f16(sum) * d).
pub fn quantize_q8_1(xs: &[f32], out: &mut Vec<Q8_1>) {
    for c in xs.chunks_exact(QK) {
        let mut b = Q8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] };
        b.d = q8(c, &mut b.qs);
        let sum: i32 = b.qs.iter().map(|&q| i32::from(q)).sum();
        b.s = f16::from_f32(sum as f32) * b.d;
        out.push(b);
    }
}

/// A 32-element weight block: its values as integers and how they scale.
pub trait Block: Copy + Send + Sync + 'static {
    /// The activation block it is multiplied with.
    type Act: Copy + Send + Sync + 'static;
    /// The block's 32 integer values (element order).
    fn values(&self) -> [i32; 32];
    fn scale(&self) -> f32;
    /// The activation's integer values and scale.
    fn act(a: &Self::Act) -> (&[i8; 32], f32);
    /// The offset term: the block's minimum times the activation's scaled sum (0 for the
    /// symmetric formats).
    fn offset(&self, a: &Self::Act) -> f32;
    fn quantize(xs: &[f32], out: &mut Vec<Self::Act>);
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
    type Act = Q8_0;
    fn values(&self) -> [i32; 32] {
        nibbles(&self.qs).map(|v| v - 8)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn act(a: &Q8_0) -> (&[i8; 32], f32) {
        (&a.qs, a.d.to_f32())
    }
    fn offset(&self, _: &Q8_0) -> f32 {
        0.0
    }
    fn quantize(xs: &[f32], out: &mut Vec<Q8_0>) {
        quantize_q8_0(xs, out)
    }
}

impl Block for Q4_1 {
    type Act = Q8_1;
    fn values(&self) -> [i32; 32] {
        nibbles(&self.qs)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn act(a: &Q8_1) -> (&[i8; 32], f32) {
        (&a.qs, a.d.to_f32())
    }
    fn offset(&self, a: &Q8_1) -> f32 {
        self.m.to_f32() * a.s.to_f32()
    }
    fn quantize(xs: &[f32], out: &mut Vec<Q8_1>) {
        quantize_q8_1(xs, out)
    }
}

impl Block for Q5_0 {
    type Act = Q8_0;
    fn values(&self) -> [i32; 32] {
        with_high_bits(&self.qs, &self.qh).map(|v| v - 16)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn act(a: &Q8_0) -> (&[i8; 32], f32) {
        (&a.qs, a.d.to_f32())
    }
    fn offset(&self, _: &Q8_0) -> f32 {
        0.0
    }
    fn quantize(xs: &[f32], out: &mut Vec<Q8_0>) {
        quantize_q8_0(xs, out)
    }
}

impl Block for Q5_1 {
    type Act = Q8_1;
    fn values(&self) -> [i32; 32] {
        with_high_bits(&self.qs, &self.qh)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn act(a: &Q8_1) -> (&[i8; 32], f32) {
        (&a.qs, a.d.to_f32())
    }
    fn offset(&self, a: &Q8_1) -> f32 {
        self.m.to_f32() * a.s.to_f32()
    }
    fn quantize(xs: &[f32], out: &mut Vec<Q8_1>) {
        quantize_q8_1(xs, out)
    }
}

impl Block for Q8_0 {
    type Act = Q8_0;
    fn values(&self) -> [i32; 32] {
        self.qs.map(i32::from)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn act(a: &Q8_0) -> (&[i8; 32], f32) {
        (&a.qs, a.d.to_f32())
    }
    fn offset(&self, _: &Q8_0) -> f32 {
        0.0
    }
    fn quantize(xs: &[f32], out: &mut Vec<Q8_0>) {
        quantize_q8_0(xs, out)
    }
}

/// The dot product of a weight row with an activation row, block by block in integers and
/// scaled per block: what every kernel here computes, written plainly.
pub fn dot<B: Block>(w: &[B], a: &[B::Act]) -> f32 {
    let mut sum = 0f32;
    for (b, x) in w.iter().zip(a) {
        let (qs, da) = B::act(x);
        let sumi: i32 = b.values().iter().zip(qs).map(|(&v, &q)| v * i32::from(q)).sum();
        sum += sumi as f32 * b.scale() * da + b.offset(x);
    }
    sum
}
