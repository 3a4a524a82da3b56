//! LoRA adapters: deterministic initialisation (every rank derives the same values for
//! the adapters it owns), PEFT tensor names, and the scale alpha / rank.

use candle_core::{Device, Tensor, Var};
use lemur_protocol::{ModelConfig, OpKind};

use crate::error::WorkerError;
use crate::rng::Rng;

/// Adapter tensors by PEFT name (`...lora_A.weight`, with `.exp_avg` / `.exp_avg_sq` for
/// AdamW moments): shape and f32 values, as checkpoints and rank 0 hold them.
pub type AdapterTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// One adapter: `y += scale * (dropout(x) A^T) B^T`, A `[r, in]`, B `[out, r]`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f64,
}

/// A dropout mask for `shape`: 0 with probability `p`, else 1 / (1 - p); deterministic in
/// `seed` (so a resumed run draws what the uninterrupted one drew).
pub fn dropout_mask(shape: &[usize], p: f64, seed: u64, device: &Device) -> Result<Tensor, WorkerError> {
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    let keep = 1.0 / (1.0 - p) as f32;
    let v: Vec<f32> = (0..n).map(|_| if (f64::from(rng.uniform()) + 1.0) / 2.0 < p { 0.0 } else { keep }).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Input and output features of a linear op ([`ModelConfig::linear_dims`]).
pub fn dims(cfg: &ModelConfig, kind: OpKind) -> (usize, usize) {
    let (i, o) = cfg.linear_dims(kind);
    (i as usize, o as usize)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_mask_drops_p_and_keeps_the_mean() {
        let m =
            dropout_mask(&[200, 100], 0.25, 7, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let zeros = m.iter().filter(|&&x| x == 0.0).count() as f64 / m.len() as f64;
        let mean = m.iter().map(|&x| f64::from(x)).sum::<f64>() / m.len() as f64;
        assert!((zeros - 0.25).abs() < 0.01, "{zeros}");
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        let again =
            dropout_mask(&[200, 100], 0.25, 7, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m, again, "same seed, same mask");
    }

    #[test]
    fn peft_names_follow_the_module_paths() {
        assert_eq!(
            peft_name(OpKind::QProj, 3, "lora_A"),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_name(OpKind::DownProj, 0, "lora_B"),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        );
    }
}
