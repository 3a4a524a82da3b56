//! Online refinement: measured per-op times from a real run folded back into a machine's
//! profile, so the planner learns what the machine actually does.
//!
//! Each measured op of the profile's machine is priced kernel by kernel as the cost model
//! does; what the measurement says about the one quantity that decided the op's time is
//! recorded: the GEMM rate at the op's equivalent size (compute-bound GEMMs), the read
//! bandwidth or the dtype's matrix-vector rate (memory-bound GEMMs: decode), the attention
//! rate at its key length, or the element-wise rate of its kernel class. Ops whose time is
//! mostly dispatch overhead say nothing about a rate and are skipped. Medians of those observations replace or extend
//! the profile's curves and rates. Re-priced with the refined profile, an op whose time is
//! set by one such quantity predicts what was measured.

use std::collections::BTreeMap;

use lemur_protocol::timings::Timings;
use lemur_protocol::{Curve, Elementwise, MachineProfile, Plan, QuantRates, WeightFormat};
use lemur_protocol::{FinetuneKind, WorkloadMode};

use crate::cost::{gemm_rates, CostModel, Roofline};
use crate::graph::{EwClass, Finetune, Kernel, LoraSpec};
use crate::problem::{Instance, InstanceError, Mode, Objective};

#[derive(Debug, thiserror::Error)]
pub enum RefineError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Cost(#[from] crate::cost::CostError),
    #[error("the plan is for `{0}`; refinement reads inference and training plans")]
    Mode(String),
    #[error("no measured op ran on a machine with profile `{0}`")]
    Nothing(String),
    #[error("the refined profile is invalid: {0}")]
    Invalid(String),
}

/// What the refinement changed, for the user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RefineReport {
    /// Observations used per target (`gemm f32 @ 812`, `read bandwidth`, ...).
    pub observations: BTreeMap<String, usize>,
    pub lines: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Puts the observed points into a curve: a point within 3% of an existing size replaces it.
fn merge(curve: &mut Curve, observed: &BTreeMap<u64, Vec<f64>>) {
    for (&size, rates) in observed {
        let (x, y) = (size as f64, median(rates.clone()));
        match curve.size.iter().position(|&s| (s - x).abs() <= 0.03 * x) {
            Some(i) => {
                curve.size[i] = x;
                curve.tflops[i] = y;
            }
            None => {
                let i = curve.size.partition_point(|&s| s < x);
                curve.size.insert(i, x);
                curve.tflops.insert(i, y);
            }
        }
    }
}

/// Observations gathered from timed runs, by target.
#[derive(Debug, Default)]
struct Observed {
    gemm: BTreeMap<lemur_protocol::DType, BTreeMap<u64, Vec<f64>>>,
    attention: BTreeMap<lemur_protocol::DType, BTreeMap<u64, Vec<f64>>>,
    read: Vec<f64>,
    /// Memory-bound GEMMs of a dtype whose matrix-vector rate the profile has.
    gemv: BTreeMap<lemur_protocol::DType, Vec<f64>>,
    /// Quantized weights: stored weight bytes per second of memory-bound GEMMs, and GEMM
    /// rates by size, per block format.
    quant_gemv: BTreeMap<WeightFormat, Vec<f64>>,
    quant_gemm: BTreeMap<WeightFormat, BTreeMap<u64, Vec<f64>>>,
    /// The activations' dtype of the quantized GEMMs observed (whose dense rates priced a
    /// format the profile lacked).
    quant_dtype: Option<lemur_protocol::DType>,
    ew: BTreeMap<&'static str, Vec<f64>>,
    used: usize,
}

/// Refines `profile` with the measured times of one or more timed runs (each carries the
/// plan it executed).
pub fn refine(profile: &MachineProfile, runs: &[Timings]) -> Result<(MachineProfile, RefineReport), RefineError> {
    let mut obs = Observed::default();
    for t in runs {
        observe(profile, &t.plan, t, &mut obs)?;
    }
    if obs.used == 0 {
        return Err(RefineError::Nothing(profile.name.clone()));
    }
    apply(profile, obs)
}

fn observe(profile: &MachineProfile, plan: &Plan, timings: &Timings, obs: &mut Observed) -> Result<(), RefineError> {
    let w = &plan.workload;
    let mode = match (w.mode, w.finetune) {
        (WorkloadMode::Infer, _) => Mode::Infer { prompt: w.seq, gen_tokens: w.gen_tokens, batch: w.batch },
        (WorkloadMode::Train, Some(ft)) => Mode::Train {
            seq: w.seq,
            batch: w.batch,
            finetune: match ft {
                FinetuneKind::Full => Finetune::Full,
                FinetuneKind::Lora => Finetune::Lora(LoraSpec {
                    rank: w.lora_rank_or_default(),
                    targets: w.lora_targets.clone().unwrap_or_default(),
                }),
            },
            micro_batches: w.micro_batches,
        },
        (WorkloadMode::Train, None) => return Err(RefineError::Mode("train without `finetune`".into())),
    };
    let machines: Vec<MachineProfile> = plan.machines.iter().map(|m| m.profile.clone()).collect();
    let precision = crate::graph::Precision { activations: plan.dtype, weights: w.weights };
    let inst = Instance::new(&Roofline, &plan.model, precision, mode, Objective::Latency, &machines, &plan.links)?;
    // Plan op id -> (phase index, graph op id).
    let mut where_op = BTreeMap::new();
    let mut offset = 0;
    for (p, ph) in inst.phases.iter().enumerate() {
        for (id, _) in ph.graph.ops() {
            where_op.insert(offset + id, (p, id));
        }
        offset += ph.graph.len();
    }
    let on_profile: Vec<&str> =
        plan.machines.iter().filter(|m| m.profile.name == profile.name).map(|m| m.name.as_str()).collect();
    let dispatch = profile.dispatch_s();
    let Observed { gemm, attention, read, gemv, quant_gemv, quant_gemm, quant_dtype, ew, used } = obs;
    for t in &timings.ops {
        if !on_profile.contains(&t.machine.as_str()) || t.measured_ms <= 0.0 {
            continue;
        }
        let Some(&(p, id)) = where_op.get(&t.id) else { continue };
        let op = inst.phases[p].graph.op(id);
        let measured = t.measured_ms * 1e-3;
        let ks = &op.kernels;
        // One GEMM with element-wise work beside it (the lm head and its loss in training):
        // the GEMM gets what the element-wise kernels are not predicted to take.
        let gemms: Vec<&Kernel> = ks.iter().filter(|k| matches!(k, Kernel::Gemm { .. })).collect();
        let elementwise_only = ks.iter().all(|k| matches!(k, Kernel::Gemm { .. } | Kernel::Elementwise { .. }));
        if let ([k @ Kernel::Gemm { m, n, k: kk, dtype, quant, .. }], true) = (gemms.as_slice(), elementwise_only) {
            let others: f64 = ks
                .iter()
                .filter(|x| !matches!(x, Kernel::Gemm { .. }))
                .map(|x| Roofline.kernel_seconds(x, profile))
                .sum::<Result<f64, _>>()?;
            let (w, a) = k.bytes_read();
            let bytes = (w + a + k.bytes_written()) as f64;
            let size = ((m * n * kk) as f64).cbrt();
            let rates = gemm_rates(profile, *dtype, *quant, size)?;
            let compute = k.flops() as f64 / rates.flops_per_s.max(1.0);
            let busy = measured - dispatch - others;
            if busy < 0.2 * measured {
                continue; // dispatch-dominated: says nothing about the rate
            }
            let memory_bound = bytes / rates.stream_bytes_per_s > compute;
            // A compute-bound GEMM is a point on a curve: TFLOP/s at its size.
            let point = |curve: &mut BTreeMap<u64, Vec<f64>>| {
                curve.entry(size.round() as u64).or_default().push(k.flops() as f64 / busy / 1e12)
            };
            if quant.is_some() {
                *quant_dtype = Some(*dtype);
            }
            match (quant, memory_bound) {
                // A quantized weight teaches its format's rates, whether the profile had
                // them or priced it at the dense ones.
                (Some(f), true) => quant_gemv.entry(*f).or_default().push(bytes / busy),
                (Some(f), false) => point(quant_gemm.entry(*f).or_default()),
                // Memory-bound: the dtype's matrix-vector rate where the profile has one.
                (None, true) if profile.bandwidth.gemv_gbps.contains_key(dtype) => {
                    gemv.entry(*dtype).or_default().push(bytes / busy)
                }
                (None, true) => read.push(bytes / busy),
                (None, false) => point(gemm.entry(*dtype).or_default()),
            }
            *used += 1;
            continue;
        }
        match ks.as_slice() {
            [rest @ .., att @ Kernel::Attention { kv_len, q_len, dtype, .. }] if *q_len > 1 => {
                let others: f64 = rest.iter().map(|k| Roofline.kernel_seconds(k, profile)).sum::<Result<f64, _>>()?;
                let busy = measured - others - dispatch;
                if busy < 0.2 * measured {
                    continue;
                }
                attention.entry(*dtype).or_default().entry(*kv_len).or_default().push(att.flops() as f64 / busy / 1e12);
                *used += 1;
            }
            [k @ Kernel::Elementwise { class, backward, .. }] => {
                let name = match (class, backward) {
                    (EwClass::RmsNorm, false) => "rms_norm",
                    (EwClass::RmsNorm, true) => "rms_norm_backward",
                    (EwClass::Rope, false) => "rope",
                    (EwClass::SiluMul, false) => "silu_mul",
                    (EwClass::SiluMul, true) => "silu_mul_backward",
                    (EwClass::Add, false) => "add",
                    // A residual's backward passes the gradient through; RoPE's backward
                    // runs in the same kernel as its forward but says less about it.
                    _ => continue,
                };
                let (w, a) = k.bytes_read();
                let bytes = (w + a + k.bytes_written()) as f64;
                let busy = measured - dispatch;
                if busy < 0.2 * measured {
                    continue;
                }
                ew.entry(name).or_default().push(bytes / busy / 1e9);
                *used += 1;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Merges observed rates into a profile's curves (one per dtype), reporting each change.
fn refine_curves(
    table: &str,
    label: &str,
    curves: &mut BTreeMap<lemur_protocol::DType, Curve>,
    observed: &BTreeMap<lemur_protocol::DType, BTreeMap<u64, Vec<f64>>>,
    report: &mut RefineReport,
) {
    for (dt, obs) in observed {
        let curve = curves.entry(*dt).or_insert(Curve { size: vec![], tflops: vec![] });
        refine_curve(table, label, dt, curve, obs, report);
    }
}

/// Merges observed points (TFLOP/s by size) into the curve of `key` (a dtype, or a block
/// format's GEMM), reporting each change.
fn refine_curve(
    table: &str,
    label: &str,
    key: &dyn std::fmt::Display,
    curve: &mut Curve,
    obs: &BTreeMap<u64, Vec<f64>>,
    report: &mut RefineReport,
) {
    for (size, v) in obs {
        report.observations.insert(format!("{table} {key} @ {size}"), v.len());
        report.lines.push(format!(
            "{table} {key} at {label}{size}: {:.3} -> {:.3} TFLOP/s",
            curve.at(*size as f64),
            median(v.clone())
        ));
    }
    merge(curve, obs);
}

/// Folds quantized observations into the profile's per-format rates. A format the profile
/// had no rates for starts from the dense ones of the runs' `dtype` (what priced it), so a
/// point the runs did not observe keeps the price the plan was made with.
fn refine_quantized(
    out: &mut MachineProfile,
    dtype: lemur_protocol::DType,
    gemv: &BTreeMap<WeightFormat, Vec<f64>>,
    gemm: &BTreeMap<WeightFormat, BTreeMap<u64, Vec<f64>>>,
    report: &mut RefineReport,
) {
    let dense_curve = out.gemm.get(&dtype).cloned();
    let dense_gemv = out.bandwidth.gemv_gbps.get(&dtype).copied().unwrap_or(out.bandwidth.read_gbps);
    for f in gemv.keys().chain(gemm.keys()) {
        if out.quantized.contains_key(f) {
            continue;
        }
        let Some(curve) = dense_curve.clone() else { continue };
        out.quantized.insert(
            *f,
            QuantRates {
                gemv_gbps: dense_gemv,
                gemm: curve,
                dequantize_gbps: None,
                source: "refine from timed runs (unobserved points: the dense rates)".into(),
                estimate: false,
            },
        );
    }
    for (f, q) in out.quantized.iter_mut() {
        let mut touched = false;
        if let Some(v) = gemv.get(f) {
            let new = median(v.clone()) / 1e9;
            report.observations.insert(format!("gemv {f}"), v.len());
            report.lines.push(format!("matrix-vector {f}: {:.1} -> {new:.1} GB/s of stored weights", q.gemv_gbps));
            q.gemv_gbps = new;
            touched = true;
        }
        if let Some(obs) = gemm.get(f) {
            refine_curve("gemm", "N=", f, &mut q.gemm, obs, report);
            touched = true;
        }
        if touched && q.estimate {
            // Measured now: the derivation no longer describes the figures.
            q.estimate = false;
            q.source = format!("refine from timed runs, over: {}", q.source);
        } else if touched && !q.source.contains("refine") {
            q.source = format!("{}; refined from timed runs", q.source);
        }
    }
}

fn apply(profile: &MachineProfile, obs: Observed) -> Result<(MachineProfile, RefineReport), RefineError> {
    let Observed { gemm, attention, read, gemv, quant_gemv, quant_gemm, quant_dtype, ew, .. } = obs;
    let mut out = profile.clone();
    let mut report = RefineReport::default();
    refine_curves("gemm", "N=", &mut out.gemm, &gemm, &mut report);
    if let Some(dtype) = quant_dtype {
        refine_quantized(&mut out, dtype, &quant_gemv, &quant_gemm, &mut report);
    }
    refine_curves("attention", "", &mut out.attention, &attention, &mut report);
    if !read.is_empty() {
        let new = median(read.clone()) / 1e9;
        report.observations.insert("read bandwidth".into(), read.len());
        report.lines.push(format!("read bandwidth: {:.1} -> {new:.1} GB/s", out.bandwidth.read_gbps));
        out.bandwidth.read_gbps = new;
    }
    for (dt, v) in &gemv {
        let new = median(v.clone()) / 1e9;
        report.observations.insert(format!("gemv {dt}"), v.len());
        let old = out.bandwidth.gemv_gbps.get(dt).copied().unwrap_or(0.0);
        report.lines.push(format!("matrix-vector {dt}: {old:.1} -> {new:.1} GB/s"));
        out.bandwidth.gemv_gbps.insert(*dt, new);
    }
    let get = |name: &str| ew.get(name).map(|v| median(v.clone()));
    let current = out.elementwise.clone();
    let merged = match current {
        Some(e) => Some(Elementwise {
            rms_norm_gbps: get("rms_norm").unwrap_or(e.rms_norm_gbps),
            rope_gbps: get("rope").unwrap_or(e.rope_gbps),
            silu_mul_gbps: get("silu_mul").unwrap_or(e.silu_mul_gbps),
            add_gbps: get("add").unwrap_or(e.add_gbps),
            rms_norm_backward_gbps: get("rms_norm_backward").or(e.rms_norm_backward_gbps),
            silu_mul_backward_gbps: get("silu_mul_backward").or(e.silu_mul_backward_gbps),
            cross_entropy_gbps: e.cross_entropy_gbps,
            cross_entropy_backward_gbps: e.cross_entropy_backward_gbps,
        }),
        None => match (get("rms_norm"), get("rope"), get("silu_mul"), get("add")) {
            (Some(a), Some(b), Some(c), Some(d)) => Some(Elementwise {
                rms_norm_gbps: a,
                rope_gbps: b,
                silu_mul_gbps: c,
                add_gbps: d,
                rms_norm_backward_gbps: get("rms_norm_backward"),
                silu_mul_backward_gbps: get("silu_mul_backward"),
                cross_entropy_gbps: None,
                cross_entropy_backward_gbps: None,
            }),
            _ => None,
        },
    };
    for (name, v) in &ew {
        report.observations.insert(format!("elementwise {name}"), v.len());
        report.lines.push(format!("elementwise {name}: {:.2} GB/s", median(v.clone())));
    }
    out.elementwise = merged;
    out.validate().map_err(|e| RefineError::Invalid(e.to_string()))?;
    Ok((out, report))
}
