//! Lemurian's CPU kernels for linear ops on quantized weights (GGUF's blocks as stored).
//!
//! candle 0.11's CPU quantized matmul runs Q4_1, Q5_0 and Q5_1 with scalar code, costs a
//! prompt's every row in full, and its spinning thread pool slows the ops between matmuls;
//! these kernels are what a linear op on the CPU runs instead (`exec`'s `QLinear`):
//!
//! - activations are quantized per row to 8-bit blocks exactly as ggml and candle do
//!   (Q8_0 for the symmetric formats, Q8_1 for those with a minimum, Q8_K for K-quants), so
//!   results equal candle's to float rounding; their scales are widened to f32 once, since
//!   every weight row reads them;
//! - where the CPU has AVX-512 VNNI, Q4_0, Q5_0 and Q8_0 run `avx512`'s kernels (two
//!   blocks per register, one `vpdpbusd` per block pair and row) and Q4_K and Q6_K run
//!   `avx512k`'s (a block's values and scales unpacked once for four rows);
//! - otherwise the 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) run the AVX2 kernels
//!   of `avx2`, one weight row against four activation rows at a time; the other K-quants
//!   (and all of them without AVX-512) run candle's own AVX2 dot products per row; a CPU
//!   without AVX2 runs the plain dot products of [`blocks`];
//! - every path computes a row the same way whatever rows share its pass (what lets a
//!   batched request give exactly its solo tokens); `LEMUR_NO_AVX512=1` turns the AVX-512
//!   kernels off, to compare;
//! - work is split over the weight's rows across [`pool`]'s spinning threads (each task
//!   computes its own columns), prompts in tiles of rows that stay in cache while a task's
//!   weight rows are read once per tile.
//!
//! [`forward`] answers `None` for what it does not handle (other devices, other formats),
//! and the caller falls back to candle's `QMatMul`.

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512k;
pub mod blocks;
pub mod pool;

use std::borrow::Cow;

use candle_core::quantized::k_quants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, GgmlType, QK_K};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use blocks::{Block, A8, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QK};

/// Bytes of activation rows a task keeps in cache while it streams its weight rows (4 to 64
/// rows, within the L1 data cache).
const L1_TILE: usize = 32 * 1024;
/// Block products below which one thread does the whole matmul.
const MIN_PARALLEL: usize = 1024;

/// A format's SIMD kernels for one to four activation rows of `A`, where the CPU has them
/// (a batch of three decode rows runs one three-row pass, not three one-row passes).
type Dot<B, A, const R: usize> = unsafe fn(&[B], [&[A]; R]) -> [f32; R];
struct Simd<B, A> {
    one: Dot<B, A, 1>,
    two: Dot<B, A, 2>,
    three: Dot<B, A, 3>,
    four: Dot<B, A, 4>,
}

/// The kernels a 32-element format runs: AVX-512 VNNI over activation pairs, AVX2 over
/// activation blocks, or the plain dot products.
enum Kernels<B: Block> {
    #[cfg(target_arch = "x86_64")]
    Avx512(Simd<B, avx512::P8>),
    Avx2(Simd<B, A8>),
    Plain,
}

macro_rules! simd {
    ($isa:ident, $name:ident) => {
        Simd { one: $isa::$name::<1>, two: $isa::$name::<2>, three: $isa::$name::<3>, four: $isa::$name::<4> }
    };
}

/// The fastest kernels this CPU has for a format (`avx2`: the formats with a minimum, whose
/// 512-bit kernels measured no faster on prompts and 0.7-0.8x on a decode row: they run the
/// AVX2 kernels, with 256-bit `vpdpbusd` where the CPU has AVX-512 VNNI).
macro_rules! kernels {
    ($name:ident, $vnni:ident, avx2) => {
        kernels!(@pick Kernels::Avx2(simd!(avx2, $vnni)), $name)
    };
    ($name:ident) => {
        kernels!(@pick Kernels::Avx512(simd!(avx512, $name)), $name)
    };
    // `$fast` where the CPU has AVX-512 VNNI, else AVX2's, else the plain dot products.
    (@pick $fast:expr, $name:ident) => {{
        #[cfg(target_arch = "x86_64")]
        let k = if avx512::available() {
            $fast
        } else if avx2::available() {
            Kernels::Avx2(simd!(avx2, $name))
        } else {
            Kernels::Plain
        };
        #[cfg(not(target_arch = "x86_64"))]
        let k = Kernels::Plain;
        k
    }};
}

/// Whether [`forward`] runs weights of this format.
pub fn supports(dtype: GgmlDType) -> bool {
    use GgmlDType as G;
    matches!(dtype, G::Q4_0 | G::Q4_1 | G::Q5_0 | G::Q5_1 | G::Q8_0 | G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K)
}

/// `x @ w.T` for a quantized weight `[n, k]` and activations `[..., k]` on the CPU, or `None`
/// where these kernels do not apply.
pub fn forward(q: &QMatMul, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let QMatMul::QTensor(w) = q else { return Ok(None) };
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    if !matches!(x.device(), Device::Cpu) {
        record(w.dtype(), "candle's QMatMul (not the CPU)", rows);
        return Ok(None);
    }
    if !supports(w.dtype()) {
        record(w.dtype(), "candle's QMatMul (format)", rows);
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    let mut dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Ok(None);
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let m = xs.len() / k;
    let Some(out) = matmul(w, &xs, m)? else {
        record(w.dtype(), "candle's QMatMul (storage)", rows);
        return Ok(None);
    };
    record(w.dtype(), path(w.dtype()), m);
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, x.device()).map(Some)
}

/// Which kernels a format runs on this CPU.
fn path(dtype: GgmlDType) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    let (vnni, simd, fma) =
        (avx512::available(), avx2::available(), is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
    #[cfg(not(target_arch = "x86_64"))]
    let (vnni, simd, fma) = (false, false, false);
    use GgmlDType as G;
    match dtype {
        G::Q4K | G::Q6K if vnni => "Lemurian's AVX-512 VNNI",
        G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K if fma => "Lemurian's, candle's AVX2 K-quant dot",
        G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K => "Lemurian's, candle's plain K-quant dot",
        G::Q4_0 | G::Q5_0 | G::Q8_0 if vnni => "Lemurian's AVX-512 VNNI",
        _ if simd => "Lemurian's AVX2",
        _ => "Lemurian's plain (no AVX2)",
    }
}

/// How often each format ran on each path in this process: (format, path, calls, rows).
/// A handful of entries, searched in place: recording is on every matmul's path, so it
/// allocates nothing.
type Uses = Vec<(GgmlDType, &'static str, u64, u64)>;
static USES: std::sync::Mutex<Uses> = std::sync::Mutex::new(Vec::new());

fn record(dtype: GgmlDType, path: &'static str, rows: usize) {
    let mut u = USES.lock().unwrap_or_else(|p| p.into_inner());
    let at = match u.iter().position(|e| e.0 == dtype && e.1 == path) {
        Some(at) => at,
        None => {
            u.push((dtype, path, 0, 0));
            u.len() - 1
        }
    };
    u[at].2 += 1;
    u[at].3 += rows as u64;
}

/// The kernel paths quantized linear ops took in this process, one line each: format, path,
/// calls and activation rows (`lemur-worker --timings` prints them).
pub fn report() -> Vec<String> {
    let u = USES.lock().unwrap_or_else(|p| p.into_inner());
    let mut lines: Vec<String> = u.iter().map(|(f, p, c, r)| format!("{f:?}: {p} ({c} calls, {r} rows)")).collect();
    lines.sort();
    lines
}

/// `x @ w.T` for `m` rows of `x` (`[m, k]`, row-major), as `[m, n]`; `None` for a format or
/// storage these kernels do not take.
pub fn matmul(w: &QTensor, x: &[f32], m: usize) -> candle_core::Result<Option<Vec<f32>>> {
    let (n, k) = w.shape().dims2()?;
    if x.len() != m * k {
        candle_core::bail!("quantized matmul: {} activations for {m} rows of {k}", x.len());
    }
    let data = w.data()?;
    let Cow::Borrowed(bytes) = data else { return Ok(None) };
    use GgmlDType as G;
    Ok(match w.dtype() {
        G::Q4_0 => blocks32::<Q4_0>(bytes, n, k, x, m, kernels!(q4_0)),
        G::Q4_1 => blocks32::<Q4_1>(bytes, n, k, x, m, kernels!(q4_1, q4_1_vnni, avx2)),
        G::Q5_0 => blocks32::<Q5_0>(bytes, n, k, x, m, kernels!(q5_0)),
        G::Q5_1 => blocks32::<Q5_1>(bytes, n, k, x, m, kernels!(q5_1, q5_1_vnni, avx2)),
        G::Q8_0 => blocks32::<Q8_0>(bytes, n, k, x, m, kernels!(q8_0)),
        G::Q2K => kquant::<BlockQ2K>(bytes, n, k, x, m),
        G::Q3K => kquant::<BlockQ3K>(bytes, n, k, x, m),
        #[cfg(target_arch = "x86_64")]
        G::Q4K if avx512::available() => kquant512(bytes, n, k, x, m, simd!(avx512k, q4k)),
        G::Q4K => kquant::<BlockQ4K>(bytes, n, k, x, m),
        G::Q5K => kquant::<BlockQ5K>(bytes, n, k, x, m),
        #[cfg(target_arch = "x86_64")]
        G::Q6K if avx512::available() => kquant512(bytes, n, k, x, m, simd!(avx512k, q6k)),
        G::Q6K => kquant::<BlockQ6K>(bytes, n, k, x, m),
        _ => None,
    })
}

/// A weight's bytes as its blocks (candle stores them as a vector of the same layout).
fn cast<T>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return None;
    }
    // SAFETY: the pointer is aligned for `T`, the length a whole number of `T`s, and every
    // `T` here is plain bytes and f16s (any bit pattern is a value); the borrow keeps the
    // storage alive.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

fn blocks32<B: Block>(bytes: &[u8], n: usize, k: usize, x: &[f32], m: usize, kernels: Kernels<B>) -> Option<Vec<f32>> {
    if !k.is_multiple_of(QK) {
        return None;
    }
    let kb = k / QK;
    let w = cast::<B>(bytes).filter(|w| w.len() == n * kb)?;
    let acts = quantize(x, k, m, blocks::quantize);
    // SAFETY (each arm): the kernels exist only where the CPU has their features.
    Some(match kernels {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512(s) => {
            let pairs = avx512::pairs(&acts, kb, m);
            drive(w, n, kb, &pairs, m, dots(s))
        }
        Kernels::Avx2(s) => drive(w, n, kb, &acts, m, dots(s)),
        Kernels::Plain => drive(w, n, kb, &acts, m, Dots::each(blocks::dot::<B>)),
    })
}

/// A SIMD kernel set as the closures [`drive`] calls.
#[allow(clippy::type_complexity)]
fn dots<B, A>(
    s: Simd<B, A>,
) -> Dots<
    impl Fn(&[B], [&[A]; 1]) -> [f32; 1] + Sync,
    impl Fn(&[B], [&[A]; 2]) -> [f32; 2] + Sync,
    impl Fn(&[B], [&[A]; 3]) -> [f32; 3] + Sync,
    impl Fn(&[B], [&[A]; 4]) -> [f32; 4] + Sync,
> {
    // SAFETY: a `Simd` is made only where the CPU has its kernels' features.
    Dots {
        one: move |w: &[B], a: [&[A]; 1]| unsafe { (s.one)(w, a) },
        two: move |w: &[B], a: [&[A]; 2]| unsafe { (s.two)(w, a) },
        three: move |w: &[B], a: [&[A]; 3]| unsafe { (s.three)(w, a) },
        four: move |w: &[B], a: [&[A]; 4]| unsafe { (s.four)(w, a) },
    }
}

fn kquant<T: GgmlType<VecDotType = BlockQ8K>>(
    bytes: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Option<Vec<f32>> {
    if !k.is_multiple_of(QK_K) {
        return None;
    }
    let w = cast::<T>(bytes).filter(|w| w.len() == n * k / QK_K)?;
    let acts = q8k(x, k, m);
    Some(drive(w, n, k / QK_K, &acts, m, Dots::each(|w: &[T], a: &[BlockQ8K]| T::vec_dot(k, w, a))))
}

/// Q4_K and Q6_K on the AVX-512 VNNI kernels (`W` the block, `s` its kernels): the
/// activations quantized to Q8_K as candle does.
#[cfg(target_arch = "x86_64")]
fn kquant512<W: Sync>(
    bytes: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    s: Simd<W, avx512k::A8K>,
) -> Option<Vec<f32>> {
    let kb = k / QK_K;
    let w = cast::<W>(bytes).filter(|w| k.is_multiple_of(QK_K) && w.len() == n * kb)?;
    let acts = q8k(x, k, m);
    Some(drive(w, n, kb, avx512k::a8k(&acts), m, dots(s)))
}

/// Each row of `x` (`m` rows of `k`) as Q8_K blocks, as candle quantizes them (what every
/// K-quant path multiplies).
fn q8k(x: &[f32], k: usize, m: usize) -> Vec<BlockQ8K> {
    quantize(x, k, m, |row, out: &mut Vec<BlockQ8K>| {
        let start = out.len();
        out.extend((0..row.len() / QK_K).map(|_| BlockQ8K::zeros()));
        BlockQ8K::from_float(row, &mut out[start..]);
    })
}

/// Each row of `x` (`m` rows of `k`) as activation blocks, concatenated.
fn quantize<A: Send + Sync>(x: &[f32], k: usize, m: usize, q: impl Fn(&[f32], &mut Vec<A>) + Sync) -> Vec<A> {
    if m < 32 {
        let mut out = Vec::new();
        for row in x.chunks_exact(k) {
            q(row, &mut out);
        }
        return out;
    }
    let chunks: Vec<&[f32]> = x.chunks(k * 16).collect();
    let parts = pool::map(chunks.len(), &|t| {
        let mut out = Vec::new();
        for row in chunks[t].chunks_exact(k) {
            q(row, &mut out);
        }
        out
    });
    parts.into_iter().flatten().collect()
}

/// One weight row against one to four activation rows.
struct Dots<F1, F2, F3, F4> {
    one: F1,
    two: F2,
    three: F3,
    four: F4,
}

/// Dot products one row at a time, for every group size.
type Each<D> = Dots<Rowwise<D>, Rowwise<D>, Rowwise<D>, Rowwise<D>>;

impl<D: Copy> Each<D> {
    fn each(dot: D) -> Self {
        Dots { one: Rowwise(dot), two: Rowwise(dot), three: Rowwise(dot), four: Rowwise(dot) }
    }
}

/// The dot products of one weight row against `R` activation rows.
trait DotN<W, A, const R: usize> {
    fn dots(&self, w: &[W], a: [&[A]; R]) -> [f32; R];
}

impl<W, A, const R: usize, F: Fn(&[W], [&[A]; R]) -> [f32; R]> DotN<W, A, R> for F {
    fn dots(&self, w: &[W], a: [&[A]; R]) -> [f32; R] {
        self(w, a)
    }
}

/// A one-row dot product serves any group, row by row.
struct Rowwise<D>(D);

impl<W, A, const R: usize, D: Fn(&[W], &[A]) -> f32> DotN<W, A, R> for Rowwise<D> {
    fn dots(&self, w: &[W], a: [&[A]; R]) -> [f32; R] {
        a.map(|a| (self.0)(w, a))
    }
}

/// The matmul over weight rows `w` (`n` rows of `kb` blocks) and activation rows `acts`
/// (`m` rows of equal length: blocks, or the AVX-512 kernels' pairs), split over the
/// weight's rows; `[m, n]`. Rows go four at a time, the last one to three together, in tiles
/// that stay in the L1 cache while a task's weight rows stream past them.
fn drive<W: Sync, A: Sync, F1, F2, F3, F4>(
    w: &[W],
    n: usize,
    kb: usize,
    acts: &[A],
    m: usize,
    dots: Dots<F1, F2, F3, F4>,
) -> Vec<f32>
where
    F1: DotN<W, A, 1> + Sync,
    F2: DotN<W, A, 2> + Sync,
    F3: DotN<W, A, 3> + Sync,
    F4: DotN<W, A, 4> + Sync,
{
    let ka = acts.len() / m.max(1);
    let row = |r: usize| &acts[r * ka..(r + 1) * ka];
    let wrow = |j: usize| &w[j * kb..(j + 1) * kb];
    let tile = (L1_TILE / (ka * std::mem::size_of::<A>()).max(1)).clamp(4, 64) / 4 * 4;
    // Columns j0..j1 of every row, as `[m, j1 - j0]`.
    let columns = |j0: usize, j1: usize| {
        let width = j1 - j0;
        let mut part = vec![0f32; m * width];
        for r0 in (0..m).step_by(tile) {
            let r1 = (r0 + tile).min(m);
            for j in j0..j1 {
                let wr = wrow(j);
                let mut r = r0;
                let mut put = |r: usize, v: &[f32]| {
                    for (i, v) in v.iter().enumerate() {
                        part[(r + i) * width + j - j0] = *v;
                    }
                };
                while r + 4 <= r1 {
                    put(r, &dots.four.dots(wr, [row(r), row(r + 1), row(r + 2), row(r + 3)]));
                    r += 4;
                }
                match r1 - r {
                    3 => put(r, &dots.three.dots(wr, [row(r), row(r + 1), row(r + 2)])),
                    2 => put(r, &dots.two.dots(wr, [row(r), row(r + 1)])),
                    1 => put(r, &dots.one.dots(wr, [row(r)])),
                    _ => {}
                }
            }
        }
        part
    };
    let work = n * kb * m;
    let tasks = (work / MIN_PARALLEL).clamp(1, pool::threads() * 4).min(n);
    if tasks <= 1 {
        return columns(0, n);
    }
    let per = n.div_ceil(tasks);
    let parts = pool::map(n.div_ceil(per), &|t| columns(t * per, ((t + 1) * per).min(n)));
    let mut out = vec![0f32; m * n];
    for (t, part) in parts.into_iter().enumerate() {
        let j0 = t * per;
        let width = part.len() / m.max(1);
        for r in 0..m {
            out[r * n + j0..r * n + j0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
    out
}

#[cfg(test)]
mod tests;
