//! LoRA adapters: deterministic initialisation (every rank derives the same values for
//! the adapters it owns), PEFT tensor names, and the scale alpha / rank.

use candle_core::{Device, Tensor, Var};
use lemur_protocol::{ModelConfig, OpKind};

use crate::error::WorkerError;
use crate::random_model::Rng;

/// One adapter: `y += scale * (x A^T) B^T`, A `[r, in]`, B `[out, r]`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// Input and output features of a linear op.
pub fn dims(cfg: &ModelConfig, kind: OpKind) -> (usize, usize) {
    let h = cfg.hidden_size as usize;
    let (i, o) = match kind {
        OpKind::QProj => (h, cfg.q_dim() as usize),
        OpKind::KProj | OpKind::VProj => (h, cfg.kv_dim() as usize),
        OpKind::OProj => (cfg.q_dim() as usize, h),
        OpKind::GateProj | OpKind::UpProj => (h, cfg.intermediate_size as usize),
        OpKind::DownProj => (cfg.intermediate_size as usize, h),
        _ => (h, cfg.vocab_size as usize),
    };
    (i, o)
}

/// The initial A and B of the adapter on `kind` of `layer`: A uniform with PEFT's Kaiming
/// bound 1/sqrt(in); B zero (PEFT) or uniform 1/sqrt(r) for gradient checks. Deterministic
/// in (seed, layer, kind).
pub fn init(
    cfg: &ModelConfig,
    kind: OpKind,
    layer: u32,
    rank: usize,
    seed: u64,
    zero_b: bool,
    device: &Device,
) -> Result<(Tensor, Tensor), WorkerError> {
    let (inp, out) = dims(cfg, kind);
    let mut rng = Rng::new(seed ^ (u64::from(layer) << 20) ^ ((kind as u64 + 1) << 40));
    let bound_a = 1.0 / (inp as f32).sqrt();
    let a: Vec<f32> = (0..rank * inp).map(|_| bound_a * rng.uniform()).collect();
    let b: Vec<f32> = if zero_b {
        vec![0.0; out * rank]
    } else {
        let bound_b = 1.0 / (rank as f32).sqrt();
        (0..out * rank).map(|_| bound_b * rng.uniform()).collect()
    };
    Ok((Tensor::from_vec(a, (rank, inp), device)?, Tensor::from_vec(b, (out, rank), device)?))
}

/// PEFT's name for an adapter tensor (`which` is `lora_A` or `lora_B`).
pub fn peft_name(kind: OpKind, layer: u32, which: &str) -> String {
    let module = match kind {
        OpKind::QProj | OpKind::KProj | OpKind::VProj | OpKind::OProj => format!("self_attn.{}", kind.name()),
        _ => format!("mlp.{}", kind.name()),
    };
    format!("base_model.model.model.layers.{layer}.{module}.{which}.weight")
}
