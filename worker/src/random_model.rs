//! Random checkpoints in Hugging Face layout (`config.json` + `model.safetensors`), for
//! tests, examples and benchmarks: weights cannot be downloaded here, and random ones
//! exercise every code path a real checkpoint does. Deterministic for a given seed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use lemur_protocol::ModelConfig;

use crate::error::WorkerError;

pub use crate::rng::Rng;

/// Writes `config.json` and `model.safetensors` (f32) for `cfg` to `dir`: projections
/// uniform with variance that keeps activations O(1), norm weights around 1 but not 1 (so
/// a bug in a norm shows), embeddings uniform in [-1, 1).
pub fn write_random_checkpoint(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<(), WorkerError> {
    write_random_checkpoint_as(dir, cfg, seed, candle_core::DType::F32)
}

/// As [`write_random_checkpoint`], stored in `dtype` (bf16 halves a 7B model's 29 GB).
pub fn write_random_checkpoint_as(
    dir: &Path,
    cfg: &ModelConfig,
    seed: u64,
    dtype: candle_core::DType,
) -> Result<(), WorkerError> {
    let io = |e: std::io::Error| WorkerError::File { path: dir.display().to_string(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(io)?;
    let config = serde_json::json!({
        "architectures": [if cfg.architecture == "llama" { "LlamaForCausalLM" } else { "MistralForCausalLM" }],
        "model_type": cfg.architecture, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": if dtype == candle_core::DType::BF16 { "bfloat16" } else { "float32" },
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| WorkerError::Weights(e.to_string()))?;
    std::fs::write(dir.join("config.json"), text).map_err(io)?;
    let mut rng = Rng::new(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let (h, q, kv, i, v) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size);
    let mut add = |name: String, rows: u64, cols: u64, scale: f32, offset: f32| -> Result<(), WorkerError> {
        let data: Vec<f32> = (0..rows * cols).map(|_| offset + scale * rng.uniform()).collect();
        let t = if rows == 1 {
            Tensor::from_vec(data, cols as usize, &Device::Cpu)?
        } else {
            Tensor::from_vec(data, (rows as usize, cols as usize), &Device::Cpu)?
        };
        let t = t.to_dtype(dtype)?;
        tensors.insert(name, t);
        Ok(())
    };
    let lin = |fan_in: u64| 1.7 / (fan_in as f32).sqrt();
    add("model.embed_tokens.weight".into(), v, h, 1.0, 0.0)?;
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), 1, h, 0.3, 1.0)?;
        add(format!("{p}.post_attention_layernorm.weight"), 1, h, 0.3, 1.0)?;
        add(format!("{p}.self_attn.q_proj.weight"), q, h, lin(h), 0.0)?;
        add(format!("{p}.self_attn.k_proj.weight"), kv, h, lin(h), 0.0)?;
        add(format!("{p}.self_attn.v_proj.weight"), kv, h, lin(h), 0.0)?;
        add(format!("{p}.self_attn.o_proj.weight"), h, q, lin(q), 0.0)?;
        add(format!("{p}.mlp.gate_proj.weight"), i, h, lin(h), 0.0)?;
        add(format!("{p}.mlp.up_proj.weight"), i, h, lin(h), 0.0)?;
        add(format!("{p}.mlp.down_proj.weight"), h, i, lin(i), 0.0)?;
    }
    add("model.norm.weight".into(), 1, h, 0.3, 1.0)?;
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), v, h, lin(h) * 2.0, 0.0)?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}
