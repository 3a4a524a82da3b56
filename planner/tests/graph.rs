//! The op graph against closed forms: op and edge counts, FLOPs, bytes, saved activations.

use lemur_planner::graph::{linear_dims, EdgeKind, Finetune, LoraSpec, OpGraph, Workload};
use lemur_protocol::{DType, ModelConfig, OpKind, Phase};

fn mistral() -> ModelConfig {
    ModelConfig::mistral_7b()
}

/// Parameters of every linear op of one layer (q, k, v, o, gate, up, down).
fn layer_linear_params(m: &ModelConfig) -> u64 {
    OpKind::LAYER.iter().filter(|k| k.is_linear()).map(|&k| linear_dims(m, k)).map(|(i, o)| i * o).sum()
}

#[test]
fn prefill_graph_counts() {
    let m = mistral();
    let g = OpGraph::build(&m, DType::F16, Workload::Prefill { batch: 1, seq: 128, context: 128 });
    assert_eq!(g.len(), 451);
    assert_eq!(g.edges().count(), 32 * 19 + 2);
    assert!(g.ops().all(|(_, o)| o.phase == Phase::Prefill));
    // Ids are in execution order: every edge goes forward.
    assert!(g.edges().all(|(a, b, _)| a < b));
    assert_eq!(g.op(0).kind, OpKind::Embedding);
    assert_eq!(g.op(450).kind, OpKind::LmHead);
    assert_eq!(g.op(1 + 14 * 3 + 5).label(), "L3.attention");
}

#[test]
fn weights_add_up_to_the_parameter_count() {
    let m = mistral();
    let g = OpGraph::build(&m, DType::F16, Workload::Decode { batch: 1, kv_len: 10 });
    let weights: u64 = g.ops().map(|(_, o)| o.weight_bytes).sum();
    assert_eq!(weights, 2 * 7_241_732_096);
}

#[test]
fn quantized_weights_cost_their_bits_per_weight() {
    use lemur_planner::graph::Precision;
    use lemur_protocol::WeightFormat;
    let m = mistral();
    let (h, kv, i, v, l) = (m.hidden_size, m.kv_dim(), m.intermediate_size, m.vocab_size, m.num_layers);
    // Q4_K_M: Q4_K (144 bytes per 256 weights), Q6_K (210 / 256) for the head, and their
    // mean for v_proj and down_proj; norms stay f16 here.
    let q4 = |n: u64| n * 144 / 256;
    let q6 = |n: u64| n * 210 / 256;
    let mix = |n: u64| n * (144 + 210) / 512;
    let layer = q4(h * h) + q4(kv * h) + mix(kv * h) + q4(h * h) + 2 * q4(i * h) + mix(i * h) + 2 * 2 * h;
    let want = q4(v * h) + q6(v * h) + l * layer + 2 * h;
    let p = Precision { activations: DType::F16, weights: WeightFormat::Q4KM };
    let g = OpGraph::build(&m, p, Workload::Decode { batch: 1, kv_len: 10 });
    let got: u64 = g.ops().map(|(_, o)| o.weight_bytes).sum();
    assert_eq!(got, want);
    // llama.cpp's Mistral-7B Q4_K_M file holds 4.37 GB.
    assert!((got as f64 / 1e9 - 4.37).abs() < 0.02, "{got}");
    // Decode reads each weight once, as stored: q_proj reads its Q4_K bytes.
    let q = g.ops().find(|(_, o)| o.kind == OpKind::QProj).unwrap().1;
    assert_eq!(q.weight_read_bytes, q4(h * h));
    assert_eq!(q.act_read_bytes, h * 2, "one token's f16 activations");
}

#[test]
fn prefill_flops_match_the_closed_form() {
    let m = mistral();
    let (b, s) = (2, 300);
    let g = OpGraph::build(&m, DType::F16, Workload::Prefill { batch: b, seq: s, context: 400 });
    let t = b * s;
    let per_layer = 2 * t * layer_linear_params(&m) + 4 * b * m.num_heads * s * s * m.head_dim;
    // The lm head runs on the last position of each sequence only.
    let head = 2 * b * m.hidden_size * m.vocab_size;
    assert_eq!(g.total_flops(), m.num_layers * per_layer + head);
}

#[test]
fn decode_flops_and_kv_cache_match_the_closed_form() {
    let m = mistral();
    for (kv_len, visible) in [(100, 101), (5000, 4096)] {
        let g = OpGraph::build(&m, DType::F16, Workload::Decode { batch: 1, kv_len });
        let per_layer = 2 * layer_linear_params(&m) + 4 * m.num_heads * visible * m.head_dim;
        assert_eq!(g.total_flops(), m.num_layers * per_layer + 2 * m.hidden_size * m.vocab_size);
        let kv: u64 = g.ops().map(|(_, o)| o.kv_cache_bytes).sum();
        // K and V, 8 heads of 128, f16, per held token per layer; the window caps what is held.
        assert_eq!(kv, m.num_layers * 2 * visible * 1024 * 2);
    }
}

#[test]
fn decode_reads_every_weight_once() {
    let m = mistral();
    let g = OpGraph::build(&m, DType::F16, Workload::Decode { batch: 1, kv_len: 10 });
    let read: u64 = g.ops().map(|(_, o)| o.weight_read_bytes).sum();
    // Norm weights are counted with activations (they are read by element-wise kernels);
    // the embedding is a gather of one row.
    let norms = (2 * m.num_layers + 1) * m.hidden_size * 2;
    let gather = m.hidden_size * 2 + 4;
    assert_eq!(read, 2 * 7_241_732_096 - norms - m.vocab_size * m.hidden_size * 2 + gather);
}

#[test]
fn edges_carry_the_tensor_bytes() {
    let m = mistral();
    let (b, s) = (1, 512);
    let g = OpGraph::build(&m, DType::F16, Workload::Prefill { batch: b, seq: s, context: s });
    let find = |from: OpKind, to: OpKind| {
        g.edges()
            .find(|&(a, c, _)| g.op(a).kind == from && g.op(c).kind == to && g.op(a).layer == Some(0))
            .map(|(_, _, e)| e.bytes)
            .unwrap()
    };
    assert_eq!(find(OpKind::Rope, OpKind::Attention), 512 * (4096 + 1024) * 2);
    assert_eq!(find(OpKind::SiluMul, OpKind::DownProj), 512 * 14336 * 2);
    assert_eq!(find(OpKind::AttnNorm, OpKind::KProj), 512 * 4096 * 2);
    assert_eq!(find(OpKind::VProj, OpKind::Attention), 512 * 1024 * 2);
}

#[test]
fn full_finetune_training_graph() {
    let m = mistral();
    let (b, s) = (1, 512);
    let g = OpGraph::build(&m, DType::F16, Workload::Train { batch: b, seq: s, finetune: Finetune::Full });
    assert_eq!(g.len(), 902);
    let fwd = g.ops().filter(|(_, o)| o.phase == Phase::Forward).count();
    assert_eq!(fwd, 451);
    // Every backward op follows its forward op, and sits after it in id order.
    for (id, o) in g.ops().filter(|(_, o)| o.phase == Phase::Backward) {
        let f = o.forward_of.unwrap();
        assert!(f < id);
        assert_eq!(g.op(f).kind, o.kind);
    }
    // 6 N T for the linears (forward 2, backward 4), 3x the forward attention.
    let t = b * s;
    let lin = m.num_layers * layer_linear_params(&m) + m.hidden_size * m.vocab_size;
    let attn = m.num_layers * 4 * b * m.num_heads * s * s * m.head_dim;
    assert_eq!(g.total_flops(), 6 * t * lin + 3 * attn);
    // Gradient edges mirror activation edges (the embedding's input needs none).
    let acts = g.edges().filter(|e| e.2.kind == EdgeKind::Activation).count();
    let grads = g.edges().filter(|e| e.2.kind == EdgeKind::Gradient).count();
    assert_eq!(acts, grads);
    // Optimizer state: 14 bytes per f16 parameter (grad 2, f32 master 4, moments 8).
    let opt: u64 = g.ops().map(|(_, o)| o.optimizer_bytes).sum();
    assert_eq!(opt, 14 * 7_241_732_096);
}

#[test]
fn saved_activations_match_the_closed_form() {
    let m = mistral();
    let (b, s) = (1, 256);
    let t = b * s;
    let g = OpGraph::build(&m, DType::F16, Workload::Train { batch: b, seq: s, finetune: Finetune::Full });
    let saved = |kind: OpKind| g.ops().find(|(_, o)| o.kind == kind && o.layer == Some(1)).unwrap().1.saved_bytes;
    let (h, inter) = (m.hidden_size, m.intermediate_size);
    assert_eq!(saved(OpKind::AttnNorm), t * h * 2 + t * 4);
    assert_eq!(saved(OpKind::QProj), t * h * 2);
    assert_eq!(saved(OpKind::DownProj), t * inter * 2);
    assert_eq!(saved(OpKind::SiluMul), 2 * t * inter * 2);
    assert_eq!(saved(OpKind::Rope), 0);
    // Q, K, V, the output, and the materialised probabilities.
    assert_eq!(saved(OpKind::Attention), t * (2 * 4096 + 2 * 1024) * 2 + b * 32 * s * s * 2);
}

#[test]
fn lora_training_graph_skips_what_needs_no_gradient() {
    let m = mistral();
    let lora = LoraSpec::default();
    let g =
        OpGraph::build(&m, DType::F16, Workload::Train { batch: 1, seq: 64, finetune: Finetune::Lora(lora.clone()) });
    // No backward for the embedding, layer 0's attention norm, or layer 0's k_proj.
    assert_eq!(g.len(), 451 + 448);
    let bwd = |kind: OpKind, layer: Option<u32>| {
        g.ops().any(|(_, o)| o.phase == Phase::Backward && o.kind == kind && o.layer == layer)
    };
    assert!(!bwd(OpKind::Embedding, None));
    assert!(!bwd(OpKind::AttnNorm, Some(0)));
    assert!(!bwd(OpKind::KProj, Some(0)));
    assert!(bwd(OpKind::KProj, Some(1)));
    assert!(bwd(OpKind::QProj, Some(0)));
    // Adapters only: r (in + out) parameters on q and v of every layer, 16 bytes each.
    let opt: u64 = g.ops().map(|(_, o)| o.optimizer_bytes).sum();
    assert_eq!(opt, m.num_layers * 16 * ((4096 + 4096) + (4096 + 1024)) * 16);
    // Frozen projections save nothing for backward; adapted ones save X and XA.
    let saved = |kind: OpKind| g.ops().find(|(_, o)| o.kind == kind && o.layer == Some(1)).unwrap().1.saved_bytes;
    assert_eq!(saved(OpKind::KProj), 0);
    assert_eq!(saved(OpKind::QProj), 64 * 4096 * 2 + 64 * 16 * 2);
    // LoRA's backward does no weight-gradient GEMM for the frozen base: fewer FLOPs than full.
    let full = OpGraph::build(&m, DType::F16, Workload::Train { batch: 1, seq: 64, finetune: Finetune::Full });
    assert!(g.total_flops() < full.total_flops());
}

#[test]
fn tiny_presets_build() {
    for name in ["tiny", "tiny-3layer", "llama-1b-shaped"] {
        let m = ModelConfig::preset(name).unwrap();
        m.validate().unwrap();
        let g = OpGraph::build(&m, DType::F32, Workload::Prefill { batch: 1, seq: 8, context: 8 });
        assert_eq!(g.len() as u64, 3 + 14 * m.num_layers);
    }
}

/// QLoRA: a linear op over a quantized base dequantizes its weight (the stored bytes in,
/// the dense weight out) and multiplies densely in training's forward, and again for the
/// input gradient in backward, as the workers do; the weight stays resident quantized.
/// Inference on the same weights runs the quantized kernels.
#[test]
fn qlora_dequantizes_each_weight_for_the_forward_and_the_input_gradient() {
    use lemur_planner::graph::{EwClass, Kernel, Precision};
    use lemur_protocol::WeightFormat;
    let m = mistral();
    let (h, i) = (m.hidden_size, m.intermediate_size);
    let p = Precision { activations: DType::F16, weights: WeightFormat::Q4KM };
    let train = Workload::Train { batch: 1, seq: 64, finetune: Finetune::Lora(LoraSpec::default()) };
    let g = OpGraph::build(&m, p, train);
    let op = |kind: OpKind, layer: u32, phase: Phase| {
        g.ops().find(|(_, o)| o.kind == kind && o.layer == Some(layer) && o.phase == phase).unwrap().1
    };
    // Layer 0's down_proj is Q6_K (use_more_bits), layer 4's Q4_K.
    for (layer, stored) in [(0, i * h * 210 / 256), (4, i * h * 144 / 256)] {
        let f = op(OpKind::DownProj, layer, Phase::Forward);
        assert_eq!(f.weight_bytes, stored, "resident as stored");
        let Kernel::Elementwise { class: EwClass::Dequantize(q), read_bytes, write_bytes, backward: false } =
            f.kernels[0]
        else {
            panic!("{:?}", f.kernels)
        };
        assert_eq!(q, if layer == 0 { WeightFormat::Q6K } else { WeightFormat::Q4K });
        assert_eq!((read_bytes, write_bytes), (stored, i * h * 2));
        assert!(matches!(f.kernels[1], Kernel::Gemm { quant: None, weight_bytes, .. } if weight_bytes == i * h * 2));
        let b = op(OpKind::DownProj, layer, Phase::Backward);
        let dq = b.kernels.iter().filter(|k| matches!(k, Kernel::Elementwise { class: EwClass::Dequantize(_), .. }));
        assert_eq!(dq.count(), 1, "once more for dX: {:?}", b.kernels);
    }
    let infer = OpGraph::build(&m, p, Workload::Prefill { batch: 1, seq: 64, context: 64 });
    let q = infer.ops().find(|(_, o)| o.kind == OpKind::QProj).unwrap().1;
    assert!(matches!(q.kernels.as_slice(), [Kernel::Gemm { quant: Some(WeightFormat::Q4K), .. }]), "{:?}", q.kernels);
}
