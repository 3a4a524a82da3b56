//! `lemur-profile`'s measurements: the same kernels the workers run (candle's, and
//! Lemurian's quantized ones), timed on a device, written as a [`MachineProfile`] in the
//! shipped schema; a link between two processes; and the refinement that folds measured op
//! times from real runs back in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use lemur_protocol::{
    Bandwidth, Curve, DType as PDType, Elementwise, KernelStyle, MachineProfile, Memory, QuantRates, WeightFormat,
};

use crate::error::WorkerError;
use crate::exec::attention_core;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    pub name: String,
    /// Fewer sizes and shorter timing loops: under a minute on a 2-core CPU.
    pub quick: bool,
    /// Dtypes for the GEMM and attention curves.
    pub dtypes: Vec<DType>,
    /// Overrides for memory (bytes) when the device cannot report it.
    pub memory_bytes: Option<u64>,
    /// Block formats whose quantized matrix-vector, GEMM and dequantize rates to measure.
    pub quantized: Vec<WeightFormat>,
}

/// One measurement of the run, for progress and the time estimate.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    Dispatch,
    Bandwidth,
    Gemm {
        dtype: DType,
        n: usize,
    },
    /// A matrix-vector product in `dtype`: how decode streams weights.
    Gemv {
        dtype: DType,
    },
    Attention {
        dtype: DType,
        seq: usize,
    },
    Elementwise,
    /// Linear ops on weights in one block format: matrix-vector, GEMM by rows, dequantize.
    Quantized {
        format: WeightFormat,
    },
}

impl Task {
    /// Rough seconds this task takes on a small CPU (for the up-front estimate).
    pub fn estimate_s(&self, quick: bool, cpu: bool) -> f64 {
        let scale = if quick { 0.3 } else { 1.0 };
        scale
            * match self {
                Task::Dispatch => 0.3,
                Task::Bandwidth => 1.5,
                Task::Gemm { n, .. } if cpu => 0.3 + (*n as f64 / 1024.0).powi(3) * 0.4,
                Task::Gemm { .. } => 0.5,
                Task::Gemv { .. } => 0.6,
                Task::Attention { seq, .. } if cpu => 0.3 + (*seq as f64 / 512.0).powi(2) * 0.3,
                Task::Attention { .. } => 0.5,
                Task::Elementwise => 1.5,
                Task::Quantized { .. } if cpu => 4.0,
                Task::Quantized { .. } => 1.0,
            }
    }
}

/// Sizes to measure on this device.
pub fn tasks(device: &Device, opts: &ProfileOptions) -> Vec<Task> {
    let cpu = device.is_cpu();
    let gemm: Vec<usize> = match (cpu, opts.quick) {
        (true, true) => vec![64, 128, 256, 512, 1024],
        (true, false) => vec![64, 128, 256, 512, 1024, 1536, 2048],
        (false, true) => vec![256, 1024, 2048, 4096],
        (false, false) => vec![256, 512, 1024, 2048, 4096, 8192],
    };
    let att: Vec<usize> = match (cpu, opts.quick) {
        (true, true) => vec![64, 128, 256, 512],
        (true, false) => vec![64, 128, 256, 512, 1024, 2048],
        (false, true) => vec![512, 1024, 2048],
        (false, false) => vec![512, 1024, 2048, 4096],
    };
    let mut t = vec![Task::Dispatch, Task::Bandwidth];
    for &dt in &opts.dtypes {
        t.push(Task::Gemv { dtype: dt });
        t.extend(gemm.iter().map(|&n| Task::Gemm { dtype: dt, n }));
        t.extend(att.iter().map(|&seq| Task::Attention { dtype: dt, seq }));
    }
    t.push(Task::Elementwise);
    t.extend(opts.quantized.iter().map(|&format| Task::Quantized { format }));
    t
}

/// Median seconds of `f` over at least `min_runs` runs and `min_time`, after one warm-up.
pub fn time_it(
    device: &Device,
    min_runs: usize,
    min_time: Duration,
    mut f: impl FnMut() -> Result<(), WorkerError>,
) -> Result<f64, WorkerError> {
    f()?;
    device.synchronize()?;
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < min_runs || (start.elapsed() < min_time && samples.len() < 10_000) {
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        samples.push(t0.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn rand(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, WorkerError> {
    Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
}

fn pdtype(d: DType) -> Result<PDType, WorkerError> {
    match d {
        DType::F32 => Ok(PDType::F32),
        DType::F16 => Ok(PDType::F16),
        DType::BF16 => Ok(PDType::Bf16),
        other => Err(WorkerError::Device(format!("cannot profile {other:?}"))),
    }
}

/// Physical and available memory of this host (Linux), bytes.
pub fn host_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("MemTotal:")? * 1024, field("MemAvailable:")? * 1024))
}

/// Runs every task on `device`; `progress(done, total, what)` reports as it goes.
pub fn measure(
    device: &Device,
    opts: &ProfileOptions,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<MachineProfile, WorkerError> {
    let (runs, min_time) = if opts.quick { (3, Duration::from_millis(80)) } else { (5, Duration::from_millis(400)) };
    let list = tasks(device, opts);
    let mut dispatch_s = 0.0;
    let mut read_gbps = 0.0;
    let mut copy_gbps = 0.0;
    let mut gemv_gbps: BTreeMap<PDType, f64> = BTreeMap::new();
    let mut gemm: BTreeMap<PDType, Curve> = BTreeMap::new();
    let mut attention: BTreeMap<PDType, Curve> = BTreeMap::new();
    let mut elementwise = None;
    let mut quantized = BTreeMap::new();
    for (i, task) in list.iter().enumerate() {
        progress(i, list.len(), &format!("{task:?}"));
        match *task {
            Task::Dispatch => {
                // 100 tiny kernels back to back, one synchronisation: the launch cost alone.
                let a = Tensor::ones(1, DType::F32, device)?;
                let b = Tensor::ones(1, DType::F32, device)?;
                dispatch_s = time_it(device, 20, min_time, || {
                    for _ in 0..100 {
                        let _ = (&a + &b)?;
                    }
                    Ok(())
                })? / 100.0;
            }
            Task::Bandwidth => {
                let elems = if opts.quick { 16 << 20 } else { 64 << 20 };
                let t = rand(&[elems], DType::F32, device)?;
                let bytes = (elems * 4) as f64;
                let read = time_it(device, runs, min_time, || {
                    let _ = t.sum_all()?;
                    Ok(())
                })?;
                let copy = time_it(device, runs, min_time, || {
                    let _ = t.copy()?;
                    Ok(())
                })?;
                // A matrix-vector product streams its matrix the way decode streams
                // weights; candle's reduction kernels are slow on some devices, so the
                // faster of the two is the read bandwidth.
                let (n, k) = if opts.quick { (4096, 4096) } else { (8192, 8192) };
                let w = candle_nn::Linear::new(rand(&[n, k], DType::F32, device)?, None);
                let x = rand(&[1, 1, k], DType::F32, device)?;
                let gemv = time_it(device, runs, min_time, || {
                    let _ = candle_core::Module::forward(&w, &x)?;
                    Ok(())
                })?;
                read_gbps = (bytes / read).max((n * k * 4) as f64 / gemv) / 1e9;
                copy_gbps = 2.0 * bytes / copy / 1e9;
            }
            Task::Gemv { dtype } => {
                // A 7B-sized projection (Mistral's MLP: 4096 x 14336) one token at a time.
                let (n, k) = if opts.quick { (4096, 4096) } else { (14336, 4096) };
                let w = candle_nn::Linear::new(rand(&[n, k], dtype, device)?, None);
                let x = rand(&[1, 1, k], dtype, device)?;
                let s = time_it(device, runs, min_time, || {
                    let _ = candle_core::Module::forward(&w, &x)?;
                    Ok(())
                })?;
                gemv_gbps.insert(pdtype(dtype)?, (n * k * dtype.size_in_bytes()) as f64 / s / 1e9);
            }
            Task::Gemm { dtype, n } => {
                // As the workers run a projection: a [1, n, n] activation through a linear
                // layer with an [out, in] weight.
                let x = rand(&[1, n, n], dtype, device)?;
                let lin = candle_nn::Linear::new(rand(&[n, n], dtype, device)?, None);
                let s = time_it(device, runs, min_time, || {
                    let _ = candle_core::Module::forward(&lin, &x)?;
                    Ok(())
                })?;
                let c = gemm.entry(pdtype(dtype)?).or_insert(Curve { size: vec![], tflops: vec![] });
                c.size.push(n as f64);
                c.tflops.push(2.0 * (n as f64).powi(3) / s / 1e12);
            }
            Task::Attention { dtype, seq } => {
                // The workers' own attention: 8 heads of 64, grouped 2:1, causal mask.
                let (h, kvh, d) = (8, 4, 64);
                let q = rand(&[1, h, seq, d], dtype, device)?;
                let k = rand(&[1, kvh, seq, d], dtype, device)?;
                let v = rand(&[1, kvh, seq, d], dtype, device)?;
                let vis = crate::fused::Visibility { q_start: 0, rows_per_group: seq, k_start: 0, window: None };
                let s = time_it(device, runs, min_time, || {
                    let _ = attention_core(&q, &k, &v, vis, h / kvh)?;
                    Ok(())
                })?;
                let c = attention.entry(pdtype(dtype)?).or_insert(Curve { size: vec![], tflops: vec![] });
                c.size.push(seq as f64);
                c.tflops.push(4.0 * (h * seq * seq * d) as f64 / s / 1e12);
            }
            Task::Elementwise => {
                elementwise = Some(measure_elementwise(device, runs, min_time, dispatch_s)?);
            }
            Task::Quantized { format } => {
                quantized.insert(format, measure_quantized(device, format, opts.quick, runs, min_time)?);
            }
        }
    }
    progress(list.len(), list.len(), "done");
    let (total, available) = match (opts.memory_bytes, device.is_cpu()) {
        (Some(b), _) => (b, b),
        (None, true) => {
            host_memory().ok_or_else(|| WorkerError::Device("cannot read /proc/meminfo; pass --memory-gb".into()))?
        }
        (None, false) => {
            return Err(WorkerError::Device("this device does not report its memory; pass --memory-gb".into()))
        }
    };
    // Leave a tenth of what is free for the runtime and the system.
    let usable = (available as f64 * 0.9) as u64;
    let kind = if device.is_cpu() {
        "CPU"
    } else if device.is_cuda() {
        "CUDA"
    } else {
        "Metal"
    };
    let profile = MachineProfile {
        name: opts.name.clone(),
        description: format!(
            "{kind} device measured by lemur-profile{} with candle's kernels",
            if opts.quick { " --quick" } else { "" }
        ),
        kernel_style: KernelStyle::Fused,
        dispatch_overhead_us: dispatch_s * 1e6,
        memory: Memory { total_bytes: total, usable_bytes: usable, max_alloc_bytes: usable },
        peak: None,
        bandwidth: Bandwidth { read_gbps, copy_gbps, gemv_gbps },
        elementwise,
        gemm,
        attention,
        quantized,
    };
    profile.validate().map_err(|e| WorkerError::Device(format!("measured profile is invalid: {e}")))?;
    Ok(profile)
}

/// Rates of linear ops on weights in `format`, through the function linear ops run
/// ([`crate::exec::quantized_matmul`]): a matrix-vector product over a weight too big for
/// the caches (7B-sized), GEMMs of a projection's width at several row counts (prefill's
/// chunks), and dequantizing the weight (what training over a quantized base does).
fn measure_quantized(
    device: &Device,
    format: WeightFormat,
    quick: bool,
    runs: usize,
    min_time: Duration,
) -> Result<QuantRates, WorkerError> {
    let ggml = crate::weights::ggml_type(format)
        .ok_or_else(|| WorkerError::Device(format!("{format} is not a block format to measure")))?;
    let quantize = |n: usize, k: usize| -> Result<(QMatMul, f64), WorkerError> {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let q = QTensor::quantize_onto(&w, ggml, device)?;
        let stored = q.storage_size_in_bytes() as f64;
        Ok((QMatMul::from_qtensor(q)?, stored))
    };
    // Decode: one row against a weight as large as Mistral's MLP projections (quick: its
    // attention's), so the weight streams from memory as it does in a real model.
    let (n, k) = if quick { (4096, 4096) } else { (14336, 4096) };
    let gemv_shape = format!("{n}x{k}");
    let (q, stored) = quantize(n, k)?;
    let x = rand(&[1, k], DType::F32, device)?;
    let s = time_it(device, runs, min_time, || {
        let _ = crate::exec::quantized_matmul(&q, &x)?;
        Ok(())
    })?;
    let gemv_gbps = stored / s / 1e9;
    // Dequantizing as training over a quantized base does it (`OpWeights::dense`).
    let w = crate::exec::OpWeights::QLinear(q);
    let dq = time_it(device, runs.min(3), min_time, || {
        let _ = w.dense(device)?;
        Ok(())
    })?;
    let dequantize_gbps = Some((n * k * 4) as f64 / dq / 1e9);
    drop(w);
    // Prefill: a 4096-wide projection (quick: 2048) at growing row counts.
    let (n, k) = if quick { (2048, 2048) } else { (4096, 4096) };
    let (q, _) = quantize(n, k)?;
    let rows: &[usize] = if quick { &[16, 64, 256] } else { &[16, 64, 256, 512] };
    let mut gemm = Curve { size: vec![], tflops: vec![] };
    for &m in rows {
        let x = rand(&[m, k], DType::F32, device)?;
        let s = time_it(device, runs, min_time, || {
            let _ = crate::exec::quantized_matmul(&q, &x)?;
            Ok(())
        })?;
        let work = (m * n * k) as f64;
        gemm.size.push(work.cbrt());
        gemm.tflops.push(2.0 * work / s / 1e12);
    }
    Ok(QuantRates {
        gemv_gbps,
        gemm,
        dequantize_gbps,
        source: format!(
            "measured by lemur-profile{}: the workers' quantized kernels, matrix-vector over a {gemv_shape} \
             weight, GEMM over {n}x{k} at {rows:?} rows",
            if quick { " --quick" } else { "" }
        ),
        estimate: false,
    })
}

/// Element-wise throughput (GB/s of minimal traffic, dispatch subtracted) of the kernels the
/// workers run for RMSNorm, RoPE, SiLU-multiply and residual adds.
fn measure_elementwise(
    device: &Device,
    runs: usize,
    min_time: Duration,
    dispatch_s: f64,
) -> Result<Elementwise, WorkerError> {
    let (s, h) = (512, 2048);
    let x = rand(&[1, s, h], DType::F32, device)?;
    let y = rand(&[1, s, h], DType::F32, device)?;
    let w = rand(&[h], DType::F32, device)?;
    let bytes = (s * h * 4) as f64;
    let rate = |secs: f64, traffic: f64| traffic / (secs - dispatch_s).max(secs * 0.05) / 1e9;
    let norm = time_it(device, runs, min_time, || {
        let _ = candle_nn::ops::rms_norm(&x, &w, 1e-5)?;
        Ok(())
    })?;
    let silu = time_it(device, runs, min_time, || {
        let _ = crate::fused::silu_mul(&x, &y)?;
        Ok(())
    })?;
    let add = time_it(device, runs, min_time, || {
        let _ = (&x + &y)?;
        Ok(())
    })?;
    let (heads, d) = (16, h / 16);
    let q = rand(&[1, heads, s, d], DType::F32, device)?;
    let cos = rand(&[s, d / 2], DType::F32, device)?;
    let sin = rand(&[s, d / 2], DType::F32, device)?;
    let rope = time_it(device, runs, min_time, || {
        let _ = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        Ok(())
    })?;
    // Training's backward kernels (the workers' hand-written VJPs).
    let norm_bwd = time_it(device, runs, min_time, || {
        let _ = crate::backward::rms_norm_backward(&x, &w, &y, 1e-5)?;
        Ok(())
    })?;
    let z = rand(&[1, s, h], DType::F32, device)?;
    let silu_bwd = time_it(device, runs, min_time, || {
        let _ = crate::backward::silu_mul_backward(&x, &y, &z)?;
        Ok(())
    })?;
    // The loss over logits [rows, vocab] (f32): softmax, then its gradient.
    let (rows, vocab) = (128, 32000);
    let logits = rand(&[rows, vocab], DType::F32, device)?;
    let targets = Tensor::arange(0u32, rows as u32, device)?;
    let ce = time_it(device, runs, min_time, || {
        let _ = crate::backward::cross_entropy(&logits, &targets)?;
        Ok(())
    })?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?;
    let ce_bwd = time_it(device, runs, min_time, || {
        let _ = crate::backward::cross_entropy_backward(&probs, &targets, 1.0 / rows as f64)?;
        Ok(())
    })?;
    let ce_bytes = (rows * vocab * 4) as f64;
    Ok(Elementwise {
        cross_entropy_gbps: Some(rate(ce, 2.0 * ce_bytes)),
        cross_entropy_backward_gbps: Some(rate(ce_bwd, 2.0 * ce_bytes)),
        rms_norm_gbps: rate(norm, 2.0 * bytes),
        rope_gbps: rate(rope, 2.0 * bytes),
        silu_mul_gbps: rate(silu, 3.0 * bytes),
        add_gbps: rate(add, 3.0 * bytes),
        // Minimal traffic as the planner's graph counts it: x and dy in, dx out; g, u and
        // dy in, dg and du out.
        rms_norm_backward_gbps: Some(rate(norm_bwd, 3.0 * bytes)),
        silu_mul_backward_gbps: Some(rate(silu_bwd, 5.0 * bytes)),
    })
}
