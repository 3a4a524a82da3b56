//! Fused kernels the workers add to candle's: attention's scale, causal sliding-window mask
//! and softmax in one pass over the scores, and the MLP's SiLU-multiply in one kernel.
//!
//! Unfused, candle runs that as a scale, an upcast to f32, a broadcast mask add, a softmax
//! and a downcast: five passes over a `[heads, q, kv]` tensor that is the largest thing in
//! a long prefill (32 x 2048 x 2048 for Mistral-7B), and five kernel launches per layer in
//! decode. [`masked_softmax`] reads the scores once (only the visible part of each row),
//! computes in f32 and writes the probabilities in the scores' dtype. The CPU
//! implementation is the reference; the CUDA one (feature `cuda`) is compiled at first use
//! with NVRTC and checked against it on the GPU machine. Other backends, and f16 on CUDA,
//! fall back to candle's unfused ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

use crate::error::WorkerError;

/// Which keys each query row sees: rows are `(group, query)` pairs, `rows_per_group`
/// queries at absolute positions `q_start..`, keys at `k_start..`; a key is visible iff
/// `q - window < k <= q`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Visibility {
    pub q_start: usize,
    pub rows_per_group: usize,
    pub k_start: usize,
    pub window: Option<usize>,
}

impl Visibility {
    /// The visible key columns `[lo, hi)` of score row `row` (of `kv_len` columns).
    pub fn range(&self, row: usize, kv_len: usize) -> (usize, usize) {
        let qp = self.q_start + row % self.rows_per_group.max(1);
        // Keys at absolute k with k <= qp and k > qp - window.
        let hi = (qp + 1).saturating_sub(self.k_start).min(kv_len);
        let lo = match self.window {
            Some(w) => (qp + 1).saturating_sub(w).saturating_sub(self.k_start).min(hi),
            None => 0,
        };
        (lo, hi)
    }

    /// The same visibility as an additive mask `[rows, kv_len]`: 0 where a key is visible,
    /// -inf where not (the form differentiable reference implementations add to scores).
    pub fn additive_mask(&self, rows: usize, kv_len: usize, device: &Device) -> Result<Tensor, WorkerError> {
        let mut data = vec![f32::NEG_INFINITY; rows * kv_len];
        for row in 0..rows {
            let (lo, hi) = self.range(row, kv_len);
            data[row * kv_len + lo..row * kv_len + hi].fill(0.0);
        }
        Ok(Tensor::from_vec(data, (rows, kv_len), device)?)
    }
}

#[derive(Debug, Clone, Copy)]
struct MaskedSoftmax {
    scale: f32,
    vis: Visibility,
}

/// `softmax(scale * scores)` over the last dim with invisible keys at zero probability;
/// `scores` is `[..., rows, kv_len]`, rows as in [`Visibility`]. A row that sees no key
/// gets all zeros.
pub fn masked_softmax(scores: &Tensor, scale: f64, vis: Visibility) -> Result<Tensor, WorkerError> {
    let op = MaskedSoftmax { scale: scale as f32, vis };
    let fused = match scores.device() {
        candle_core::Device::Cpu => true,
        candle_core::Device::Cuda(_) => matches!(scores.dtype(), DType::F32 | DType::BF16),
        _ => false,
    };
    if fused {
        return Ok(scores.contiguous()?.apply_op1_no_bwd(&op)?);
    }
    unfused(scores, scale, vis)
}

/// The same with candle's ops (the fallback, and the reference in tests).
pub fn unfused(scores: &Tensor, scale: f64, vis: Visibility) -> Result<Tensor, WorkerError> {
    let dims = scores.dims();
    let (rows, kv) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mut mask = Vec::with_capacity(rows * kv);
    for r in 0..rows {
        let (lo, hi) = vis.range(r, kv);
        mask.extend((0..kv).map(|j| if (lo..hi).contains(&j) { 0f32 } else { f32::NEG_INFINITY }));
    }
    let mask = Tensor::from_vec(mask, (rows, kv), scores.device())?;
    let s = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    // A fully masked row is NaN after softmax; the fused kernel gives zeros.
    let p = p.eq(&p)?.where_cond(&p, &p.zeros_like()?)?;
    Ok(p.to_dtype(scores.dtype())?)
}

fn softmax_row(src: &[f32], dst: &mut [f32], scale: f32, lo: usize, hi: usize) {
    dst.iter_mut().for_each(|d| *d = 0.0);
    if lo >= hi {
        return;
    }
    let max = src[lo..hi].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let mut sum = 0.0f32;
    for j in lo..hi {
        let e = (src[j] * scale - max).exp();
        dst[j] = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    dst[lo..hi].iter_mut().for_each(|d| *d *= inv);
}

/// Scores from which the masked softmax spreads its rows over threads.
const PARALLEL_SCORES: usize = 1 << 16;

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "lemur-masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        let kv = shape.dims().last().copied().unwrap_or(1).max(1);
        let rows_per_head = shape.dims().iter().rev().nth(1).copied().unwrap_or(1).max(1);
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("masked softmax needs contiguous scores")
        };
        let run = |src: &[f32]| -> Vec<f32> {
            use rayon::prelude::*;
            let mut out = vec![0f32; src.len()];
            let row = |(i, (d, s)): (usize, (&mut [f32], &[f32]))| {
                let (lo, hi) = self.vis.range(i % rows_per_head, kv);
                softmax_row(s, d, self.scale, lo, hi);
            };
            // Rows are independent: spread big score matrices over the cores, as candle's
            // softmax does; a decode step's few rows run here (waking threads costs more).
            if src.len() >= PARALLEL_SCORES {
                out.par_chunks_mut(kv).zip(src.par_chunks(kv)).enumerate().for_each(row);
            } else {
                out.chunks_mut(kv).zip(src.chunks(kv)).enumerate().for_each(row);
            }
            out
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(run(&v[start..end])),
            CpuStorage::BF16(v) => {
                let f: Vec<f32> = v[start..end].iter().map(|x| x.to_f32()).collect();
                CpuStorage::BF16(run(&f).into_iter().map(half::bf16::from_f32).collect())
            }
            CpuStorage::F16(v) => {
                let f: Vec<f32> = v[start..end].iter().map(|x| x.to_f32()).collect();
                CpuStorage::F16(run(&f).into_iter().map(half::f16::from_f32).collect())
            }
            _ => candle_core::bail!("masked softmax takes f32, bf16 or f16 scores"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, storage, layout)
    }
}

/// `silu(g) * u`, element-wise, in one kernel (candle runs `silu` and `mul` apart: two
/// launches and an intermediate the size of the MLP's activation).
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor, WorkerError> {
    let fused = g.dims() == u.dims()
        && g.dtype() == u.dtype()
        && match g.device() {
            candle_core::Device::Cpu => true,
            candle_core::Device::Cuda(_) => matches!(g.dtype(), DType::F32 | DType::BF16),
            _ => false,
        };
    if fused {
        return Ok(g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &SiluMul)?);
    }
    Ok((g.silu()? * u)?)
}

#[derive(Debug, Clone, Copy)]
struct SiluMul;

fn silu_mul_f32(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "lemur-silu-mul"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets()) else {
            candle_core::bail!("silu_mul needs contiguous inputs")
        };
        let out = match (g, u) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(crate::fastmath::silu_mul(&g[g0..g1], &u[u0..u1]))
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => CpuStorage::BF16(
                g[g0..g1]
                    .iter()
                    .zip(&u[u0..u1])
                    .map(|(a, b)| half::bf16::from_f32(silu_mul_f32(a.to_f32(), b.to_f32())))
                    .collect(),
            ),
            (CpuStorage::F16(g), CpuStorage::F16(u)) => CpuStorage::F16(
                g[g0..g1]
                    .iter()
                    .zip(&u[u0..u1])
                    .map(|(a, b)| half::f16::from_f32(silu_mul_f32(a.to_f32(), b.to_f32())))
                    .collect(),
            ),
            _ => candle_core::bail!("silu_mul takes two f32, bf16 or f16 tensors"),
        };
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::silu_mul(g, gl, u, ul)
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    //! The CUDA kernels: the masked softmax (one warp per score row) and SiLU-multiply
    //! (a grid-stride loop), f32 arithmetic, bf16 or f32 storage.

    use super::MaskedSoftmax;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Shape};
    use std::sync::OnceLock;

    const SRC: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float load(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(unsigned short* p, long i, float v) {
    unsigned int u = __float_as_uint(v);
    u += 0x7fffu + ((u >> 16) & 1u); // round to nearest even (no NaN reaches here)
    p[i] = (unsigned short)(u >> 16);
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
// One warp per score row (8 rows per block of 256 threads): no block-wide barriers.
template <typename T>
__device__ void masked_softmax(const T* src, T* dst, long rows, long kv, long rows_per_head, long q_start,
                               long rows_per_group, long k_start, long window, float scale) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long qp = q_start + (row % rows_per_head) % rows_per_group;
    long hi = qp + 1 - k_start; if (hi < 0) hi = 0; if (hi > kv) hi = kv;
    long lo = 0;
    if (window > 0) { lo = qp + 1 - window - k_start; if (lo < 0) lo = 0; if (lo > hi) lo = hi; }
    const T* s = src + row * kv;
    T* d = dst + row * kv;
    float m = NEG_INF;
    for (long j = lo + lane; j < hi; j += 32) m = fmaxf(m, load(s, j) * scale);
    m = warp_max(m);
    float sum = 0.0f;
    for (long j = lo + lane; j < hi; j += 32) sum += __expf(load(s, j) * scale - m);
    sum = warp_sum(sum);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (long j = lane; j < kv; j += 32) {
        float p = (j >= lo && j < hi) ? __expf(load(s, j) * scale - m) * inv : 0.0f;
        store(d, j, p);
    }
}
template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* out, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float a = load(g, i);
        store(out, i, a / (1.0f + __expf(-a)) * load(u, i));
    }
}
extern "C" __global__ void silu_mul_f32(const float* g, const float* u, float* out, long n) { silu_mul(g, u, out, n); }
extern "C" __global__ void silu_mul_bf16(const unsigned short* g, const unsigned short* u, unsigned short* out, long n) {
    silu_mul(g, u, out, n);
}
extern "C" __global__ void masked_softmax_f32(const float* s, float* d, long rows, long kv, long rph, long q0,
                                              long rpg, long k0, long w, float scale) {
    masked_softmax(s, d, rows, kv, rph, q0, rpg, k0, w, scale);
}
extern "C" __global__ void masked_softmax_bf16(const unsigned short* s, unsigned short* d, long rows, long kv,
                                               long rph, long q0, long rpg, long k0, long w, float scale) {
    masked_softmax(s, d, rows, kv, rph, q0, rpg, k0, w, scale);
}
"#;

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SRC)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling the masked-softmax kernel with NVRTC: {e}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// The masked softmax kernel's scalar arguments, in its signature's order.
    struct SoftmaxArgs {
        rows: i64,
        kv: i64,
        rows_per_head: i64,
        q0: i64,
        rpg: i64,
        k0: i64,
        w: i64,
        scale: f32,
    }

    /// Runs the masked softmax kernel `name` (the f32 or bf16 instance) on `src`.
    fn masked_softmax_t<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        src: &CudaView<'_, T>,
        len: usize,
        cfg: LaunchConfig,
        a: &SoftmaxArgs,
    ) -> candle_core::Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(name, "lemur_fused", ptx()?)?;
        // SAFETY: written in full by the kernel below.
        let out = unsafe { dev.alloc::<T>(len) }?;
        let mut b = func.builder();
        b.arg(src).arg(&out).arg(&a.rows).arg(&a.kv).arg(&a.rows_per_head);
        b.arg(&a.q0).arg(&a.rpg).arg(&a.k0).arg(&a.w).arg(&a.scale);
        // SAFETY: the arguments match the kernel's signature (bf16 is passed as its 16-bit
        // pattern); one warp per row.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    /// Runs the SiLU-multiply kernel `name` (the f32 or bf16 instance) over `n` elements.
    fn silu_mul_t<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        g: &CudaView<'_, T>,
        u: &CudaView<'_, T>,
        n: i64,
        cfg: LaunchConfig,
    ) -> candle_core::Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(name, "lemur_fused", ptx()?)?;
        // SAFETY: written in full by the kernel below.
        let out = unsafe { dev.alloc::<T>(n as usize) }?;
        let mut b = func.builder();
        b.arg(g).arg(u).arg(&out).arg(&n);
        // SAFETY: the arguments match the kernel's signature (grid-stride loop over n).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    pub(super) fn silu_mul(
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = g.device().clone();
        let shape = gl.shape().clone();
        let n = shape.elem_count() as i64;
        let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets()) else {
            candle_core::bail!("silu_mul needs contiguous inputs")
        };
        let blocks = (n as u64).div_ceil(256).min(65_535) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let slice = match (&g.slice, &u.slice) {
            (CudaStorageSlice::F32(g), CudaStorageSlice::F32(u)) => {
                CudaStorageSlice::F32(silu_mul_t(&dev, "silu_mul_f32", &g.slice(g0..g1), &u.slice(u0..u1), n, cfg)?)
            }
            (CudaStorageSlice::BF16(g), CudaStorageSlice::BF16(u)) => {
                CudaStorageSlice::BF16(silu_mul_t(&dev, "silu_mul_bf16", &g.slice(g0..g1), &u.slice(u0..u1), n, cfg)?)
            }
            _ => candle_core::bail!("silu_mul on CUDA takes two f32 or two bf16 tensors"),
        };
        Ok((CudaStorage { slice, device: dev }, shape))
    }

    pub(super) fn forward(
        op: &MaskedSoftmax,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = storage.device().clone();
        let shape = layout.shape().clone();
        let dims = shape.dims();
        let kv = *dims.last().unwrap_or(&1) as i64;
        let rows_per_head = dims.iter().rev().nth(1).copied().unwrap_or(1).max(1) as i64;
        let rows = shape.elem_count() as i64 / kv.max(1);
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("masked softmax needs contiguous scores")
        };
        let v = op.vis;
        let (q0, rpg, k0) = (v.q_start as i64, v.rows_per_group.max(1) as i64, v.k_start as i64);
        let w = v.window.map_or(0, |w| w as i64);
        // One warp per row, eight rows per block.
        let blocks = (rows as u64).div_ceil(8) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let args = SoftmaxArgs { rows, kv, rows_per_head, q0, rpg, k0, w, scale: op.scale };
        let slice = match &storage.slice {
            CudaStorageSlice::F32(src) => CudaStorageSlice::F32(masked_softmax_t(
                &dev,
                "masked_softmax_f32",
                &src.slice(start..end),
                shape.elem_count(),
                cfg,
                &args,
            )?),
            CudaStorageSlice::BF16(src) => CudaStorageSlice::BF16(masked_softmax_t(
                &dev,
                "masked_softmax_bf16",
                &src.slice(start..end),
                shape.elem_count(),
                cfg,
                &args,
            )?),
            _ => candle_core::bail!("masked softmax on CUDA takes f32 or bf16"),
        };
        Ok((CudaStorage { slice, device: dev }, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| 3.0 * rng.uniform()).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_equals_unfused_for_prefill_decode_groups_and_windows() {
        // (rows per group, groups, kv, q_start, k_start, window)
        for &(s, g, kv, q0, k0, w) in &[
            (7usize, 4usize, 7usize, 0usize, 0usize, None),
            (7, 4, 7, 0, 0, Some(3usize)),
            (1, 4, 9, 8, 0, None),
            (1, 4, 9, 20, 12, Some(5)),
            (3, 2, 10, 7, 0, Some(4)),
            (5, 1, 5, 0, 0, Some(1)),
        ] {
            let x = rand(&[2, 3, g * s, kv], (s * 31 + kv) as u64);
            let vis = Visibility { q_start: q0, rows_per_group: s, k_start: k0, window: w };
            let fused = masked_softmax(&x, 0.37, vis).unwrap();
            let reference = unfused(&x, 0.37, vis).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-6, "{s} {g} {kv} {q0} {k0} {w:?}");
            // Rows sum to one.
            let sums = fused.sum(3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(sums.iter().all(|x| (x - 1.0).abs() < 1e-5), "{sums:?}");
            let half = masked_softmax(&x.to_dtype(DType::BF16).unwrap(), 0.37, vis).unwrap();
            assert_eq!(half.dtype(), DType::BF16);
            assert!(max_diff(&half, &reference) < 1e-2);
        }
    }

    #[test]
    fn silu_mul_equals_candles_silu_times_u() {
        let (g, u) = (rand(&[3, 5, 70], 1), rand(&[3, 5, 70], 2));
        let want = (g.silu().unwrap() * &u).unwrap();
        assert!(max_diff(&silu_mul(&g, &u).unwrap(), &want) < 1e-5);
        let (gb, ub) = (g.to_dtype(DType::BF16).unwrap(), u.to_dtype(DType::BF16).unwrap());
        let got = silu_mul(&gb, &ub).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_diff(&got, &want) < 0.05);
        // A strided input is made contiguous first.
        let gt = g.transpose(1, 2).unwrap();
        let ut = u.transpose(1, 2).unwrap();
        assert!(max_diff(&silu_mul(&gt, &ut).unwrap(), &(gt.silu().unwrap() * &ut).unwrap()) < 1e-5);
    }

    #[test]
    fn visibility_is_causal_within_the_window() {
        let v = Visibility { q_start: 10, rows_per_group: 2, k_start: 4, window: Some(3) };
        // Row 0: query 10 sees keys 8, 9, 10 -> columns 4..7.
        assert_eq!(v.range(0, 20), (4, 7));
        // Row 3 = group 1, query 11: keys 9..=11 -> columns 5..8.
        assert_eq!(v.range(3, 20), (5, 8));
        // Only five keys: query 10 sees the last; query 11 sees none of them.
        assert_eq!(v.range(0, 5), (4, 5));
        assert_eq!(v.range(1, 5), (5, 5));
    }
}
