//! The roofline cost model: closed forms for single kernels, monotonicity, and which machine wins what.

use std::path::Path;

use lemur_planner::cost::{elementwise_factor, CostModel, Roofline};
use lemur_planner::graph::{EwClass, Finetune, Kernel, OpGraph, Workload};
use lemur_planner::profiles::ProfileSet;
use lemur_protocol::{DType, KernelStyle, MachineProfile, ModelConfig, OpKind, Phase};

fn profiles() -> ProfileSet {
    ProfileSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1e-12)
}

#[test]
fn square_gemm_runs_at_the_measured_rate() {
    let set = profiles();
    let m5 = set.machine("m5-pro").unwrap();
    let k = Kernel::Gemm {
        batch: 1,
        m: 2048,
        n: 2048,
        k: 2048,
        dtype: DType::F16,
        weight_bytes: 2048 * 2048 * 2,
        quant: None,
    };
    let expect = 2.0 * 2048f64.powi(3) / 12.58e12 + 10e-6;
    assert!(close(Roofline.kernel_seconds(&k, m5).unwrap(), expect));
}

#[test]
fn matrix_vector_products_run_at_memory_speed() {
    let set = profiles();
    for (name, bw) in [("m4-pro", 253e9), ("m5-pro", 118e9)] {
        let m = set.machine(name).unwrap();
        let w = 4096 * 14336 * 2;
        let k = Kernel::Gemm { batch: 1, m: 1, n: 14336, k: 4096, dtype: DType::F16, weight_bytes: w, quant: None };
        let bytes = (w + 4096 * 2 + 14336 * 2) as f64;
        assert!(close(Roofline.kernel_seconds(&k, m).unwrap(), bytes / bw + 10e-6), "{name}");
    }
}

#[test]
fn a_measured_matrix_vector_rate_prices_that_dtype_only() {
    let mut m = profiles().machine("m4-pro").unwrap().clone();
    let f16 = m.gemm[&DType::F16].clone();
    m.gemm.insert(DType::Bf16, f16);
    m.bandwidth.gemv_gbps.insert(DType::Bf16, 20.0);
    let gemv = |dtype: DType| {
        let w = 4096 * 4096 * dtype.bytes();
        let k = Kernel::Gemm { batch: 1, m: 1, n: 4096, k: 4096, dtype, weight_bytes: w, quant: None };
        (Roofline.kernel_seconds(&k, &m).unwrap(), (w + 2 * 4096 * dtype.bytes()) as f64)
    };
    let (t, bytes) = gemv(DType::Bf16);
    assert!(close(t, bytes / 20e9 + 10e-6), "bf16 streams at its measured 20 GB/s");
    let (t, bytes) = gemv(DType::F16);
    assert!(close(t, bytes / 253e9 + 10e-6), "f16 still at the read bandwidth");
}

#[test]
fn elementwise_pays_launches_and_passes() {
    let set = profiles();
    let m4 = set.machine("m4-pro").unwrap();
    let k =
        Kernel::Elementwise { class: EwClass::RmsNorm, backward: false, read_bytes: 1_000_000, write_bytes: 500_000 };
    let (launches, traffic) = elementwise_factor(EwClass::RmsNorm, false, KernelStyle::Eager);
    assert_eq!((launches, traffic), (8, 9.0));
    let expect = 8.0 * 10e-6 + 1.5e6 * 9.0 / 230e9;
    assert!(close(Roofline.kernel_seconds(&k, m4).unwrap(), expect));
    let mut fused = m4.clone();
    fused.kernel_style = KernelStyle::Fused;
    assert!(close(Roofline.kernel_seconds(&k, &fused).unwrap(), 10e-6 + 1.5e6 / 230e9));
}

#[test]
fn missing_dtype_curve_is_a_clear_error() {
    let set = profiles();
    let m5 = set.machine("m5-pro").unwrap();
    let k = Kernel::Gemm { batch: 1, m: 64, n: 64, k: 64, dtype: DType::Bf16, weight_bytes: 0, quant: None };
    let err = Roofline.kernel_seconds(&k, m5).unwrap_err().to_string();
    assert!(err.contains("m5-pro") && err.contains("gemm") && err.contains("bf16"), "{err}");
}

fn layer_ms(m: &MachineProfile, w: Workload, phase: Phase) -> f64 {
    let g = OpGraph::build(&ModelConfig::mistral_7b(), DType::F16, w);
    g.ops()
        .filter(|(_, o)| o.layer == Some(0) && o.phase == phase)
        .map(|(_, o)| Roofline.op_seconds(o, m).unwrap())
        .sum::<f64>()
        * 1e3
}

#[test]
fn op_times_grow_with_sequence_length() {
    let set = profiles();
    for (m, _) in &set.machines {
        let mut last = vec![0.0; 451];
        for seq in [16, 64, 128, 512, 1024, 2048, 4096, 8192] {
            let g = OpGraph::build(
                &ModelConfig::mistral_7b(),
                DType::F16,
                Workload::Prefill { batch: 1, seq, context: seq },
            );
            for (id, op) in g.ops() {
                let t = Roofline.op_seconds(op, m).unwrap();
                assert!(t >= last[id], "{} on {} got faster at seq {seq}", op.label(), m.name);
                last[id] = t;
            }
        }
    }
}

#[test]
fn compute_goes_to_the_m5_and_decode_to_the_m4() {
    let set = profiles();
    let (m4, m5) = (set.machine("m4-pro").unwrap(), set.machine("m5-pro").unwrap());
    let prefill = Workload::Prefill { batch: 1, seq: 2048, context: 2048 };
    let (p4, p5) = (layer_ms(m4, prefill.clone(), Phase::Prefill), layer_ms(m5, prefill, Phase::Prefill));
    assert!(p4 / p5 > 1.6 && p4 / p5 < 2.3, "prefill layer: m4 {p4} ms, m5 {p5} ms");
    let decode = Workload::Decode { batch: 1, kv_len: 2048 };
    let (d4, d5) = (layer_ms(m4, decode.clone(), Phase::Decode), layer_ms(m5, decode, Phase::Decode));
    assert!(d5 / d4 > 1.8 && d5 / d4 < 2.2, "decode layer: m4 {d4} ms, m5 {d5} ms");
    // Decode of one layer streams its 436 MB of weights: at least that over the read bandwidth.
    assert!(d4 > 436.2e6 / 253e9 * 1e3);
}

#[test]
fn backward_costs_about_twice_forward_for_full_finetuning() {
    let set = profiles();
    let m5 = set.machine("m5-pro").unwrap();
    let w = Workload::Train { batch: 1, seq: 1024, finetune: Finetune::Full };
    let f = layer_ms(m5, w.clone(), Phase::Forward);
    let b = layer_ms(m5, w, Phase::Backward);
    assert!(b / f > 1.8 && b / f < 2.6, "forward {f} ms, backward {b} ms");
    // LoRA's backward skips the weight gradients of the frozen base: about one forward.
    let w = Workload::Train { batch: 1, seq: 1024, finetune: Finetune::Lora(Default::default()) };
    let lb = layer_ms(m5, w, Phase::Backward);
    assert!(lb < 0.75 * b, "lora backward {lb} ms vs full {b} ms");
}

#[test]
fn linear_backward_is_two_gemms_of_the_forward_shape() {
    let set = profiles();
    let m4 = set.machine("m4-pro").unwrap();
    let g = OpGraph::build(
        &ModelConfig::mistral_7b(),
        DType::F16,
        Workload::Train { batch: 1, seq: 2048, finetune: Finetune::Full },
    );
    let find =
        |phase| g.ops().find(|(_, o)| o.kind == OpKind::GateProj && o.layer == Some(5) && o.phase == phase).unwrap().1;
    let (f, b) = (find(Phase::Forward), find(Phase::Backward));
    assert_eq!(b.flops, 2 * f.flops);
    let (tf, tb) = (Roofline.op_seconds(f, m4).unwrap(), Roofline.op_seconds(b, m4).unwrap());
    assert!(close(tb, 2.0 * tf), "forward {tf}, backward {tb}");
}

/// A GEMM on quantized weights takes its format's rates where the profile has them (its
/// curve when compute-bound, its matrix-vector rate when memory-bound), and the dense ones
/// of its dtype where it does not; dequantizing runs at the format's measured rate.
#[test]
fn quantized_gemms_run_at_their_formats_rates() {
    use lemur_planner::cost::{gemm_rates, RateSource};
    use lemur_protocol::{Curve, QuantRates, WeightFormat};
    let mut m = profiles().machine("m5-pro").unwrap().clone();
    m.quantized.clear();
    m.quantized.insert(
        WeightFormat::Q4_0,
        QuantRates {
            gemv_gbps: 50.0,
            gemm: Curve { size: vec![100.0, 1000.0], tflops: vec![1.0, 4.0] },
            dequantize_gbps: Some(20.0),
            source: "test".into(),
            estimate: false,
        },
    );
    let w = 4096 * 4096 * 18 / 32;
    let gemm = |rows: u64, quant| Kernel::Gemm {
        batch: 1,
        m: rows,
        n: 4096,
        k: 4096,
        dtype: DType::F16,
        weight_bytes: w,
        quant,
    };
    // Decode: one row streams the stored bytes (and the activations) at 50 GB/s.
    let t = Roofline.kernel_seconds(&gemm(1, Some(WeightFormat::Q4_0)), &m).unwrap();
    assert!(close(t, (w + 2 * 4096 * 2) as f64 / 50e9 + 10e-6), "{t}");
    // Prefill: 512 rows, N = cbrt(512 x 4096 x 4096) = 2048: past the curve's end, 4 TFLOP/s.
    let t = Roofline.kernel_seconds(&gemm(512, Some(WeightFormat::Q4_0)), &m).unwrap();
    assert!(close(t, 2.0 * 512.0 * 4096.0 * 4096.0 / 4e12 + 10e-6), "{t}");
    // Q8_0 has no entry: the f16 rates, and the report is told so.
    let r = gemm_rates(&m, DType::F16, Some(WeightFormat::Q8_0), 2048.0).unwrap();
    assert_eq!(r.source, RateSource::Unpriced);
    assert!(close(r.flops_per_s, 12.58e12) && close(r.stream_bytes_per_s, 118e9));
    assert_eq!(gemm_rates(&m, DType::F16, None, 2048.0).unwrap().source, RateSource::Dense);
    let dq = Kernel::Elementwise {
        class: EwClass::Dequantize(WeightFormat::Q4_0),
        backward: false,
        read_bytes: w,
        write_bytes: 4096 * 4096 * 2,
    };
    assert!(close(Roofline.kernel_seconds(&dq, &m).unwrap(), 4096.0 * 4096.0 * 2.0 / 20e9 + 10e-6));
}
