//! Model configurations of the Llama/Mistral family: built-in presets, Hugging Face `config.json`, parameter counts.

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// The shape of a decoder-only transformer of the Llama/Mistral family.
///
/// Everything the planner prices and the worker executes follows from these numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A short name: `mistral-7b`, `tiny`, or the `_name_or_path`/file stem of a checkpoint.
    pub name: String,
    /// `mistral` or `llama`.
    pub architecture: String,
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    /// Mistral's sliding attention window; `None` for full causal attention.
    pub sliding_window: Option<u64>,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: u64,
    /// The lm head reuses the embedding matrix (SmolLM2 does this; Mistral does not).
    pub tie_word_embeddings: bool,
}

/// The names of the built-in presets, for help texts and errors.
pub const PRESETS: &[&str] = &["mistral-7b", "tiny", "tiny-3layer", "llama-1b-shaped", "llama-150m-shaped"];

impl ModelConfig {
    /// (input features, output features) of a linear op; the one definition planner and
    /// workers share. Kinds that are not projections (norms, attention) get the lm head's.
    pub fn linear_dims(&self, kind: crate::OpKind) -> (u64, u64) {
        use crate::OpKind::*;
        let h = self.hidden_size;
        match kind {
            QProj => (h, self.q_dim()),
            KProj | VProj => (h, self.kv_dim()),
            OProj => (self.q_dim(), h),
            GateProj | UpProj => (h, self.intermediate_size),
            DownProj => (self.intermediate_size, h),
            _ => (h, self.vocab_size),
        }
    }

    /// Mistral-7B v0.1, as published in its `config.json`.
    pub fn mistral_7b() -> Self {
        Self {
            name: "mistral-7b".into(),
            architecture: "mistral".into(),
            vocab_size: 32_000,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            sliding_window: Some(4096),
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 32_768,
            tie_word_embeddings: false,
        }
    }

    /// A two-layer Mistral small enough for tests that run real kernels (GQA 4:2, window 8).
    pub fn tiny() -> Self {
        Self {
            name: "tiny".into(),
            architecture: "mistral".into(),
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            sliding_window: Some(4096),
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
        }
    }

    /// A Llama-style stack of roughly one billion parameters (for runtime benchmarks).
    pub fn llama_1b_shaped() -> Self {
        Self {
            name: "llama-1b-shaped".into(),
            architecture: "llama".into(),
            vocab_size: 32_000,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_layers: 22,
            num_heads: 32,
            num_kv_heads: 4,
            head_dim: 64,
            sliding_window: None,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
        }
    }

    /// Looks a preset up by name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "mistral-7b" => Some(Self::mistral_7b()),
            "tiny" => Some(Self::tiny()),
            "tiny-3layer" => Some(Self { name: "tiny-3layer".into(), num_layers: 3, ..Self::tiny() }),
            "llama-1b-shaped" => Some(Self::llama_1b_shaped()),
            // A few hundred MB in f32: big enough for timings that mean something on a CPU.
            "llama-150m-shaped" => Some(Self {
                name: "llama-150m-shaped".into(),
                hidden_size: 1024,
                intermediate_size: 2816,
                num_layers: 8,
                num_heads: 16,
                num_kv_heads: 4,
                head_dim: 64,
                ..Self::llama_1b_shaped()
            }),
            _ => None,
        }
    }

    /// Parses a Hugging Face `config.json` of the Llama/Mistral family.
    ///
    /// `name` labels the result (usually the checkpoint directory's name).
    pub fn from_hf_json(name: &str, json: &str) -> Result<Self, FieldError> {
        let hf: HfConfig = serde_json::from_str(json).map_err(|e| FieldError::new("config.json", e.to_string()))?;
        let arch = hf.model_type.clone().unwrap_or_default();
        if arch != "mistral" && arch != "llama" {
            return Err(FieldError::new(
                "model_type",
                format!("`{arch}` is not supported: Lemurian runs the Llama/Mistral family (`llama`, `mistral`)"),
            ));
        }
        if hf.attention_bias.unwrap_or(false) || hf.mlp_bias.unwrap_or(false) {
            return Err(FieldError::new("attention_bias", "biased projections are not supported".to_string()));
        }
        let num_heads = hf.num_attention_heads;
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if num_heads > 0 => hf.hidden_size / num_heads,
            None => 0,
        };
        let cfg = Self {
            name: name.to_string(),
            architecture: arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            sliding_window: hf.sliding_window,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the shape is internally consistent.
    pub fn validate(&self) -> Result<(), FieldError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(FieldError::new(field, "must be positive".to_string()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(FieldError::new(
                "num_kv_heads",
                format!("{} query heads cannot be grouped over {} KV heads", self.num_heads, self.num_kv_heads),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(FieldError::new(
                "head_dim",
                format!("RoPE needs an even head dimension, got {}", self.head_dim),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(FieldError::new("sliding_window", "must be positive (or null for none)".to_string()));
        }
        for (field, v) in [("rope_theta", self.rope_theta), ("rms_norm_eps", self.rms_norm_eps)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(FieldError::new(field, format!("must be finite and positive, got {v}")));
            }
        }
        Ok(())
    }

    /// Width of the query projection's output: heads x head_dim.
    pub fn q_dim(&self) -> u64 {
        self.num_heads * self.head_dim
    }

    /// Width of each of the key and value projections' outputs.
    pub fn kv_dim(&self) -> u64 {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters of one decoder layer (projections, MLP and both norms).
    pub fn layer_params(&self) -> u64 {
        let h = self.hidden_size;
        let attn = h * self.q_dim() + 2 * h * self.kv_dim() + self.q_dim() * h;
        let mlp = 3 * h * self.intermediate_size;
        attn + mlp + 2 * h
    }

    /// All parameters: embedding, layers, final norm and (untied) lm head.
    pub fn param_count(&self) -> u64 {
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_layers * self.layer_params() + self.hidden_size + head
    }
}

/// The subset of a Hugging Face `config.json` that Lemurian reads; other keys are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: u64,
    hidden_size: u64,
    intermediate_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    sliding_window: Option<u64>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<u64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistral_7b_has_its_published_parameter_count() {
        assert_eq!(ModelConfig::mistral_7b().param_count(), 7_241_732_096);
    }

    #[test]
    fn hf_config_of_mistral_matches_the_preset() {
        let json = r#"{
          "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
          "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
          "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
          "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
          "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32000
        }"#;
        let cfg = ModelConfig::from_hf_json("mistral-7b", json).unwrap();
        assert_eq!(cfg, ModelConfig::mistral_7b());
    }

    #[test]
    fn smollm2_config_ties_embeddings() {
        // SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads, tied embeddings.
        let json = r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
          "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
          "num_key_value_heads": 3, "rope_theta": 100000, "rms_norm_eps": 1e-05,
          "max_position_embeddings": 8192, "tie_word_embeddings": true}"#;
        let cfg = ModelConfig::from_hf_json("smollm2-135m", json).unwrap();
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.sliding_window, None);
        // Published size of SmolLM2-135M: 134,515,008 parameters.
        assert_eq!(cfg.param_count(), 134_515_008);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = ModelConfig::from_hf_json(
            "x",
            r#"{"model_type": "gpt2", "vocab_size": 1, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "model_type");
        let err = ModelConfig::from_hf_json("x", r#"{"model_type": "llama", "vocab_size": 1, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2, "head_dim": 4}"#)
        .unwrap_err();
        assert_eq!(err.field, "num_kv_heads");
        let err = ModelConfig::from_hf_json("x", r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }
}
