//! Attention on the CPU in one pass: per query row its scores against the visible keys,
//! the masked softmax and the weighted sum of values, read straight from the KV cache's
//! buffer (no score tensor, no copies of K or V, no thread wake-ups for a decode step's
//! few rows). The arithmetic is `attention_with_probs`'s: scale inside the softmax, the
//! probabilities normalised before they weight V.

use candle_core::{CpuStorage, Storage, Tensor};

use crate::error::WorkerError;
use crate::fused::Visibility;
use crate::qmm::pool;

/// Query rows per head above which candle's GEMMs beat this loop (measured on SmolLM2:
/// a 512-token prompt's attention is faster there, a 64-token one here).
const MAX_ROWS: usize = 64;

/// Score entries (rows times keys times head dim) from which heads run on several threads.
const PARALLEL_WORK: usize = 1 << 18;

/// `q [b, h, s, d]` against `k, v [b, h / groups, kv, d]` (any strides with unit stride in
/// `d`) as `[b, s, h * d]`; `None` off the CPU, for another dtype, or past `MAX_ROWS` rows.
pub fn cpu_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    vis: Visibility,
    groups: usize,
) -> Result<Option<Tensor>, WorkerError> {
    let (b, h, s, d) = q.dims4()?;
    let (_, kvh, kv, _) = k.dims4()?;
    if groups == 0 || kvh * groups != h || v.dims4()? != (b, kvh, kv, d) || s > MAX_ROWS {
        return Ok(None);
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(qd)), Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) =
        (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    let at = |l: &candle_core::Layout| -> Option<(usize, [usize; 3])> {
        let st = l.stride();
        (st.len() == 4 && st[3] == 1).then(|| (l.start_offset(), [st[0], st[1], st[2]]))
    };
    let (Some(qa), Some(ka), Some(va)) = (at(ql), at(kl), at(vl)) else { return Ok(None) };
    let args = Args {
        q: (qd, qa),
        k: (kd, ka),
        v: (vd, va),
        h,
        groups,
        s,
        kv,
        d,
        scale: 1.0 / (d as f32).sqrt(),
        vis: Visibility { rows_per_group: s, ..vis },
    };
    let head = |bh: usize| head(&args, bh);
    let heads: Vec<Vec<f32>> =
        if b * h * s * kv * d >= PARALLEL_WORK { pool::map(b * h, &head) } else { (0..b * h).map(head).collect() };
    // [b, h, s, d] -> [b, s, h * d]
    let mut out = vec![0f32; b * s * h * d];
    for (bh, rows) in heads.iter().enumerate() {
        let (bi, hi) = (bh / h, bh % h);
        for t in 0..s {
            let o = ((bi * s + t) * h + hi) * d;
            out[o..o + d].copy_from_slice(&rows[t * d..(t + 1) * d]);
        }
    }
    drop((qs, ks, vs));
    Ok(Some(Tensor::from_vec(out, (b, s, h * d), q.device())?))
}

/// A strided `[b, heads, rows, d]` tensor's data: the slice, the start and three strides.
type View<'a> = (&'a [f32], (usize, [usize; 3]));

/// What every head's computation reads.
struct Args<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    h: usize,
    groups: usize,
    s: usize,
    kv: usize,
    d: usize,
    scale: f32,
    vis: Visibility,
}

fn row<'a>(t: &View<'a>, b: usize, h: usize, i: usize, d: usize) -> &'a [f32] {
    let (data, (start, st)) = *t;
    let o = start + b * st[0] + h * st[1] + i * st[2];
    &data[o..o + d]
}

/// One (batch, head): its `s` output rows of `d`.
#[inline(always)]
fn head_body(a: &Args, bh: usize) -> Vec<f32> {
    let (bi, hi) = (bh / a.h, bh % a.h);
    let kh = hi / a.groups;
    let (s, d) = (a.s, a.d);
    let mut out = vec![0f32; s * d];
    let mut probs = vec![0f32; a.kv];
    for t in 0..s {
        let qrow = row(&a.q, bi, hi, t, d);
        let (lo, hi_k) = a.vis.range(t, a.kv);
        if lo >= hi_k {
            continue; // sees no key: zeros, as the masked softmax gives
        }
        let mut max = f32::NEG_INFINITY;
        for (j, p) in probs.iter_mut().enumerate().take(hi_k).skip(lo) {
            *p = dot(qrow, row(&a.k, bi, kh, j, d)) * a.scale;
            max = max.max(*p);
        }
        let mut sum = 0f32;
        for p in &mut probs[lo..hi_k] {
            *p = crate::fastmath::exp(*p - max);
            sum += *p;
        }
        let inv = 1.0 / sum;
        let orow = &mut out[t * d..(t + 1) * d];
        for (j, p) in probs.iter().enumerate().take(hi_k).skip(lo) {
            let w = p * inv;
            for (o, &x) in orow.iter_mut().zip(row(&a.v, bi, kh, j, d)) {
                *o += w * x;
            }
        }
    }
    out
}

/// The same built for AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(a: &Args, bh: usize) -> Vec<f32> {
    head_body(a, bh)
}

fn head(a: &Args, bh: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        #[allow(unsafe_code)]
        return unsafe { head_avx2(a, bh) };
    }
    head_body(a, bh)
}

/// A dot product in eight lanes (vectorised by the compiler).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::attention_with_probs;
    use candle_core::{Device, Tensor};

    /// Against the tensor-op attention (the reference the runtime used before), on a KV
    /// cache viewed from a larger buffer, grouped heads, prompts and decode rows, windows.
    #[test]
    fn equals_the_tensor_op_attention() {
        let dev = Device::Cpu;
        for (b, h, groups, s, kv, d, q_start, k_start, window) in [
            (1, 9, 3, 1, 80, 64, 79, 0, None),
            (1, 4, 1, 7, 7, 16, 0, 0, None),
            (2, 6, 2, 5, 12, 8, 7, 0, Some(4)),
            (1, 8, 4, 33, 40, 32, 20, 3, None),
            (1, 4, 2, 64, 64, 64, 0, 0, None),
        ] {
            let kvh = h / groups;
            let q = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev).unwrap();
            let cache = Tensor::randn(0f32, 1.0, (b, kvh, kv + 9, d), &dev).unwrap();
            let (k, v) = (cache.narrow(2, 0, kv).unwrap(), (cache.narrow(2, 9, kv).unwrap() * 0.5).unwrap());
            let vis = Visibility { q_start, rows_per_group: s, k_start, window };
            let ours = cpu_attention(&q, &k, &v, vis, groups).unwrap().expect("cpu f32");
            let (want, _) = attention_with_probs(&q, &k.contiguous().unwrap(), &v, vis, groups).unwrap();
            let diff = (ours - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let diff: f32 = diff.to_scalar().unwrap();
            assert!(diff < 1e-5, "b{b} h{h} g{groups} s{s} kv{kv}: {diff}");
        }
    }
}
