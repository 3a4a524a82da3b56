//! Refinement arithmetic: timings synthesised from a known slowdown of each kernel's busy
//! time must be reproduced by the refined profile's predictions.

use std::collections::HashMap;
use std::path::Path;

use lemur_planner::cost::{CostModel, Roofline};
use lemur_planner::graph::Kernel;
use lemur_planner::refine::refine;
use lemur_planner::{Mode, Objective, PlanRequest, ProfileSet};
use lemur_protocol::timings::Timings;
use lemur_protocol::{KernelStyle, MachineProfile, ModelConfig, Phase};

fn profile() -> MachineProfile {
    let set = ProfileSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap();
    let mut p = set.machine("m5-pro").unwrap().clone();
    p.name = "box".into();
    p.kernel_style = KernelStyle::Fused;
    p
}

/// A two-layer llama-150m-shaped request on `prof` alone (mode set by the caller).
fn request(prof: &MachineProfile) -> PlanRequest {
    let model = ModelConfig { num_layers: 2, ..ModelConfig::preset("llama-150m-shaped").unwrap() };
    let links = ProfileSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap().links;
    PlanRequest::new(model, vec![prof.clone()], links)
}

/// The slowdown applied to a kernel's busy time (time beyond dispatch).
fn slowdown(k: &Kernel) -> f64 {
    match k {
        Kernel::Gemm { m, .. } if *m > 1 => 1.6,
        Kernel::Gemm { .. } => 1.2, // decode: memory-bound
        Kernel::Attention { .. } => 1.4,
        Kernel::Elementwise { .. } => 3.0,
    }
}

/// The element-wise rates the synthetic machine really has, GB/s (forward, backward).
fn truth_gbps(class: lemur_planner::graph::EwClass, backward: bool) -> Option<f64> {
    use lemur_planner::graph::EwClass::*;
    match (class, backward) {
        (RmsNorm, false) => Some(30.0),
        (RmsNorm, true) => Some(9.0),
        (Rope, false) => Some(7.0),
        (SiluMul, false) => Some(12.0),
        (SiluMul, true) => Some(4.0),
        (Add, false) => Some(50.0),
        _ => None,
    }
}

/// Measured op times (ms) synthesised kernel by kernel from the truth above.
fn synthesise(inst: &lemur_planner::problem::Instance, prof: &MachineProfile) -> HashMap<usize, f64> {
    let d = prof.dispatch_s();
    let mut op_ms = HashMap::new();
    let mut offset = 0;
    for ph in &inst.phases {
        for (id, op) in ph.graph.ops() {
            let t: f64 = op
                .kernels
                .iter()
                .map(|k| match k {
                    // Element-wise truth: one launch plus the bytes at a per-class rate.
                    Kernel::Elementwise { class, backward, .. } if truth_gbps(*class, *backward).is_some() => {
                        let (w, a) = k.bytes_read();
                        d + (w + a + k.bytes_written()) as f64 / (truth_gbps(*class, *backward).unwrap() * 1e9)
                    }
                    _ => {
                        let base = Roofline.kernel_seconds(k, prof).unwrap();
                        d + slowdown(k) * (base - d)
                    }
                })
                .sum();
            op_ms.insert(offset + id, t * 1e3);
        }
        offset += ph.graph.len();
    }
    op_ms
}

/// Plans an inference request on `prof`, synthesises its timed run and refines `prof` by it.
fn plan_run_refine(
    prof: &MachineProfile,
    req: &PlanRequest,
) -> (lemur_planner::Planned, HashMap<usize, f64>, MachineProfile, lemur_planner::refine::RefineReport) {
    let planned = lemur_planner::plan(&Roofline, req).unwrap();
    let op_ms = synthesise(&planned.instance, prof);
    let timings = Timings::new(&planned.plan, &op_ms, 0.0, None);
    let (refined, report) = refine(prof, std::slice::from_ref(&timings)).unwrap();
    (planned, op_ms, refined, report)
}

#[test]
fn refined_profile_predicts_what_was_measured() {
    let prof = profile();
    let mut req = request(&prof);
    req.mode = Mode::Infer { prompt: 256, gen_tokens: 8, batch: 1 };
    req.objective = Objective::Latency;
    let (planned, op_ms, refined, report) = plan_run_refine(&prof, &req);
    let inst = &planned.instance;
    assert!(report.observations.keys().any(|k| k.starts_with("gemm")));
    assert!(report.observations.contains_key("read bandwidth"));
    // The element-wise rates are recovered exactly.
    let e = refined.elementwise.clone().unwrap();
    for (got, want) in [(e.rms_norm_gbps, 30.0), (e.rope_gbps, 7.0), (e.silu_mul_gbps, 12.0), (e.add_gbps, 50.0)] {
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    }
    // Every single-quantity op now predicts its measured time.
    let mut checked = 0;
    let mut offset = 0;
    for ph in &inst.phases {
        for (id, op) in ph.graph.ops() {
            let measured = op_ms[&(offset + id)] * 1e-3;
            let single = match op.kernels.as_slice() {
                [Kernel::Gemm { .. }] | [Kernel::Elementwise { .. }] => true,
                [.., Kernel::Attention { q_len, .. }] => *q_len > 1,
                _ => false,
            };
            let is_gather = matches!(
                op.kernels.as_slice(),
                [Kernel::Elementwise { class: lemur_planner::graph::EwClass::Gather, .. }]
            );
            if single && !is_gather {
                let predicted = Roofline.op_seconds(op, &refined).unwrap();
                let err = (predicted - measured).abs() / measured;
                assert!(err < 0.01, "{} ({}): predicted {predicted}, measured {measured}", op.label(), ph.phase_name);
                checked += 1;
            }
        }
        offset += ph.graph.len();
    }
    assert!(checked > 40, "checked {checked} ops");
    // And the refined profile is a valid profile that round-trips through TOML.
    let text = toml::to_string(&refined).unwrap();
    let back = lemur_planner::profiles::parse_machine(Path::new("refined.toml"), &text).unwrap();
    assert_eq!(back, refined);
    let _ = Phase::Prefill;
}

#[test]
fn decode_refines_the_dtypes_matrix_vector_rate_where_the_profile_has_one() {
    let mut prof = profile();
    prof.bandwidth.gemv_gbps.insert(lemur_protocol::DType::F16, 100.0);
    let mut req = request(&prof);
    req.mode = Mode::Infer { prompt: 128, gen_tokens: 8, batch: 1 };
    req.objective = Objective::Latency;
    let (planned, op_ms, refined, report) = plan_run_refine(&prof, &req);
    assert!(report.observations.contains_key("gemv f16"), "{:?}", report.observations);
    assert!(!report.observations.contains_key("read bandwidth"));
    assert_eq!(refined.bandwidth.read_gbps, prof.bandwidth.read_gbps);
    // Decode's projections (memory-bound, one kernel each) now predict what was measured.
    let decode = &planned.instance.phases[1];
    let offset = planned.instance.phases[0].graph.len();
    let mut checked = 0;
    for (id, op) in decode.graph.ops() {
        if let [Kernel::Gemm { m: 1, .. }] = op.kernels.as_slice() {
            let measured = op_ms[&(offset + id)] * 1e-3;
            let predicted = Roofline.op_seconds(op, &refined).unwrap();
            assert!((predicted - measured).abs() / measured < 0.01, "{}: {predicted} vs {measured}", op.label());
            checked += 1;
        }
    }
    assert!(checked >= 14, "checked {checked}");
}

#[test]
fn training_timings_refine_the_backward_rates_and_the_lm_head() {
    let prof = profile();
    let mut req = request(&prof);
    let lora = lemur_planner::graph::LoraSpec::default();
    req.mode = Mode::Train { seq: 256, batch: 1, finetune: lemur_planner::Finetune::Lora(lora), micro_batches: 2 };
    let planned = lemur_planner::plan(&Roofline, &req).unwrap();
    let inst = &planned.instance;
    let op_ms = synthesise(inst, &prof);
    let timings = Timings::train(&planned.plan, &op_ms, 1.0);
    let (refined, report) = refine(&prof, std::slice::from_ref(&timings)).unwrap();
    let e = refined.elementwise.clone().unwrap();
    assert_eq!(e.rms_norm_backward_gbps.map(|v| (v * 1e6).round() / 1e6), Some(9.0), "{:?}", report.lines);
    assert_eq!(e.silu_mul_backward_gbps.map(|v| (v * 1e6).round() / 1e6), Some(4.0));
    // Backward ops set by one quantity, and the lm head (its GEMM beside the loss), now
    // predict what was measured.
    let mut checked = Vec::new();
    for (id, op) in inst.phases[0].graph.ops() {
        let gemms = op.kernels.iter().filter(|k| matches!(k, Kernel::Gemm { .. })).count();
        let only_ew = op.kernels.iter().all(|k| matches!(k, Kernel::Gemm { .. } | Kernel::Elementwise { .. }));
        let simple_bwd = op.phase == Phase::Backward
            && matches!(
                op.kernels.as_slice(),
                [Kernel::Gemm { .. }]
                    | [Kernel::Elementwise {
                        backward: true,
                        class: lemur_planner::graph::EwClass::RmsNorm | lemur_planner::graph::EwClass::SiluMul,
                        ..
                    }]
            );
        let head = op.kind == lemur_protocol::OpKind::LmHead && gemms == 1 && only_ew;
        if simple_bwd || head {
            let measured = op_ms[&id] * 1e-3;
            let predicted = Roofline.op_seconds(op, &refined).unwrap();
            let err = (predicted - measured).abs() / measured;
            assert!(err < 0.01, "{} ({:?}): predicted {predicted}, measured {measured}", op.label(), op.phase);
            checked.push(op.label());
        }
    }
    assert!(checked.len() > 10, "checked {checked:?}");
    assert!(checked.iter().filter(|l| l.contains("lm_head")).count() == 2, "{checked:?}");
}

#[test]
fn refinement_without_matching_ops_is_an_error() {
    let prof = profile();
    let mut other = prof.clone();
    other.name = "elsewhere".into();
    let mut req = request(&other);
    req.model = ModelConfig::tiny();
    req.mode = Mode::Infer { prompt: 8, gen_tokens: 2, batch: 1 };
    let planned = lemur_planner::plan(&Roofline, &req).unwrap();
    let op_ms: HashMap<usize, f64> = planned.plan.ops.iter().map(|o| (o.id, 1.0)).collect();
    let t = Timings::new(&planned.plan, &op_ms, 1.0, Some(1.0));
    let err = refine(&prof, &[t]).unwrap_err().to_string();
    assert!(err.contains("box"), "{err}");
}

/// Quantized projections teach their block format's rates: a format with estimated rates
/// becomes measured, and one the profile lacked (priced at the dense rates) gains an entry.
/// Each single-GEMM op of prefill and decode then predicts what was measured.
#[test]
fn quantized_timings_refine_each_formats_rates() {
    use lemur_protocol::WeightFormat;
    let mut prof = profile();
    // Q4_0 keeps its estimate; the lm head's Q6_K starts with no rates at all.
    prof.quantized.retain(|f, _| *f == WeightFormat::Q4_0);
    assert!(prof.quantized[&WeightFormat::Q4_0].estimate);
    let mut req = request(&prof);
    req.weights = WeightFormat::Q4_0;
    req.mode = Mode::Infer { prompt: 256, gen_tokens: 8, batch: 1 };
    req.objective = Objective::Latency;
    let (planned, op_ms, refined, report) = plan_run_refine(&prof, &req);
    let inst = &planned.instance;
    for key in ["gemv q4_0", "gemv q6_k"] {
        assert!(report.observations.contains_key(key), "{key}: {:?}", report.observations);
    }
    assert!(report.observations.keys().any(|k| k.starts_with("gemm q4_0 @")), "{:?}", report.observations);
    let q4 = &refined.quantized[&WeightFormat::Q4_0];
    assert!(!q4.estimate && q4.source.starts_with("refine"), "{q4:?}");
    assert!(refined.quantized.contains_key(&WeightFormat::Q6K), "the head's format gained rates");
    // Decode was 1.2x and prefill 1.6x slower than priced: the refined rates are that much lower.
    let gemv = prof.quantized[&WeightFormat::Q4_0].gemv_gbps;
    assert!((q4.gemv_gbps - gemv / 1.2).abs() < 1e-3 * gemv, "{} vs {}", q4.gemv_gbps, gemv / 1.2);
    let mut checked = 0;
    let mut offset = 0;
    for ph in &inst.phases {
        for (id, op) in ph.graph.ops() {
            if let [Kernel::Gemm { quant: Some(_), .. }] = op.kernels.as_slice() {
                let measured = op_ms[&(offset + id)] * 1e-3;
                let predicted = Roofline.op_seconds(op, &refined).unwrap();
                let err = (predicted - measured).abs() / measured;
                assert!(err < 0.01, "{} ({}): predicted {predicted}, measured {measured}", op.label(), ph.phase_name);
                checked += 1;
            }
        }
        offset += ph.graph.len();
    }
    assert!(checked >= 2 * 15, "checked {checked}");
    let text = toml::to_string(&refined).unwrap();
    assert_eq!(lemur_planner::profiles::parse_machine(Path::new("refined.toml"), &text).unwrap(), refined);
}
