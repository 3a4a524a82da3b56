//! How a model's weights are stored: dense in the run's dtype, or one of GGUF's block
//! formats, with the bits each weight costs (its share of the block's scales included),
//! and the format each tensor gets in a file `llama-quantize` made (the mixes, the lm head
//! in 6 bits, the fallbacks for rows that a 256-weight block does not divide).
//! The planner sizes memory and weight traffic and picks kernel rates by it; plans record it.

use serde::{Deserialize, Serialize};

use crate::{DType, ModelConfig, OpKind};

/// A weight format: what `--weights` names, and what a plan records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Every weight in the run's dtype (f16, bf16 or f32).
    #[default]
    Dense,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the lm head and for `attn_v` and
    /// `ffn_down` in about half the layers (priced here at their average).
    Q4KM,
    /// llama.cpp's Q5_K_M mix: Q5_K, with Q6_K where Q4_K_M has it.
    Q5KM,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 13] = [
        WeightFormat::Dense,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q2K,
        WeightFormat::Q3K,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
        WeightFormat::Q4KM,
        WeightFormat::Q5KM,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Dense => "dense",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Q5_0 => "q5_0",
            WeightFormat::Q5_1 => "q5_1",
            WeightFormat::Q2K => "q2_k",
            WeightFormat::Q3K => "q3_k",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::Q5K => "q5_k",
            WeightFormat::Q6K => "q6_k",
            WeightFormat::Q4KM => "q4_k_m",
            WeightFormat::Q5KM => "q5_k_m",
        }
    }

    /// By name (`q4_k_m`, `Q4_K_M`; `dense`, `f16`, `bf16` and `f32` mean dense).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        if matches!(s.as_str(), "f16" | "bf16" | "f32") {
            return Some(WeightFormat::Dense);
        }
        Self::ALL.into_iter().find(|f| f.name() == s)
    }

    /// Bits per weight of one block format: `block` weights in `bytes` bytes; `None` for
    /// dense weights and the mixes (whose tensors have different formats).
    pub fn block_bits(self) -> Option<f64> {
        let (bytes, block) = self.block_layout()?;
        Some(bytes as f64 * 8.0 / block as f64)
    }

    /// (bytes, weights) of one block of a block format.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        Some(match self {
            WeightFormat::Dense | WeightFormat::Q4KM | WeightFormat::Q5KM => return None,
            WeightFormat::Q8_0 => (34, 32),
            WeightFormat::Q4_0 => (18, 32),
            WeightFormat::Q4_1 => (20, 32),
            WeightFormat::Q5_0 => (22, 32),
            WeightFormat::Q5_1 => (24, 32),
            WeightFormat::Q2K => (84, 256),
            WeightFormat::Q3K => (110, 256),
            WeightFormat::Q4K => (144, 256),
            WeightFormat::Q5K => (176, 256),
            WeightFormat::Q6K => (210, 256),
        })
    }

    /// One block format (not dense, not a mix): what a tensor is stored as and what a
    /// profile's quantized rates are keyed by.
    pub fn is_block(self) -> bool {
        self.block_layout().is_some()
    }

    /// The block format of the tensor of op `kind` in `layer` when a model is quantized to
    /// `self` by llama.cpp's `llama-quantize` (no importance matrix, no overrides); `None`
    /// when it stays dense (norms; everything of a dense model).
    ///
    /// This follows `llama_tensor_get_type` (llama.cpp `src/llama-quant.cpp`) for Llama-family
    /// models: the lm head (and the embedding when the two are tied) in Q6_K unless the file
    /// is Q8_0; Q4_K_M and Q5_K_M put `attn_v` and `ffn_down` in Q6_K in the first and last
    /// eighth of the layers and every third one between (`use_more_bits`); Q2_K raises
    /// `attn_v` (Q4_K with 4+ query heads per KV head, else Q3_K), `attn_output` and
    /// `ffn_down` (Q3_K). Then a tensor whose rows a block does not divide falls back
    /// (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, Q2_K and Q3_K to Q4_0), and one that a
    /// 32-weight block does not divide stays dense. `tests/gguf.rs` checks it against the
    /// tensors of SmolLM2's shipped file.
    pub fn tensor_format(self, kind: OpKind, layer: Option<u32>, model: &ModelConfig) -> Option<WeightFormat> {
        use WeightFormat::*;
        if self == Dense || matches!(kind, OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm) {
            return None;
        }
        let base = match self {
            Q4KM => Q4K,
            Q5KM => Q5K,
            other => other,
        };
        let more_bits = |l: u32| {
            let n = model.num_layers as i64;
            let i = i64::from(l);
            i < n / 8 || i >= 7 * n / 8 || (i - n / 8).rem_euclid(3) == 2
        };
        let head = if base == Q8_0 { Q8_0 } else { Q6K };
        let chosen = match (kind, layer) {
            (OpKind::LmHead, _) => head,
            (OpKind::Embedding, _) if model.tie_word_embeddings => head,
            (OpKind::VProj | OpKind::DownProj, Some(l)) if matches!(self, Q4KM | Q5KM) && more_bits(l) => Q6K,
            (OpKind::VProj, _) if self == Q2K => {
                if model.num_kv_heads > 0 && model.num_heads / model.num_kv_heads >= 4 {
                    Q4K
                } else {
                    Q3K
                }
            }
            (OpKind::OProj | OpKind::DownProj, _) if self == Q2K => Q3K,
            _ => base,
        };
        // Rows are the op's input features: the tensor's first GGUF dimension.
        let cols = match kind {
            OpKind::Embedding => model.hidden_size,
            k => model.linear_dims(k).0,
        };
        let fits = |f: WeightFormat| f.block_layout().is_some_and(|(_, b)| cols % b == 0);
        if fits(chosen) {
            return Some(chosen);
        }
        let fallback = match chosen {
            Q4K => Q5_0,
            Q5K => Q5_1,
            Q6K => Q8_0,
            Q2K | Q3K => Q4_0,
            other => other,
        };
        fits(fallback).then_some(fallback)
    }

    /// Bytes of the `params` weights of op `kind` in `layer` stored this way (see
    /// [`WeightFormat::tensor_format`]; dense ones in `dtype`).
    pub fn tensor_bytes(self, kind: OpKind, layer: Option<u32>, model: &ModelConfig, params: u64, dtype: DType) -> u64 {
        match self.tensor_format(kind, layer, model).and_then(WeightFormat::block_layout) {
            None => params * dtype.bytes(),
            Some((bytes, block)) => params.div_ceil(block) * bytes,
        }
    }

    /// Bytes stored in each block format over the model's embedding, linear ops and lm head
    /// (dense tensors under [`WeightFormat::Dense`], in `dtype`); a tied lm head is counted
    /// once, as the embedding.
    pub fn breakdown(self, model: &ModelConfig, dtype: DType) -> std::collections::BTreeMap<WeightFormat, u64> {
        let mut out = std::collections::BTreeMap::new();
        let mut add = |kind: OpKind, layer: Option<u32>, params: u64| {
            let f = self.tensor_format(kind, layer, model).unwrap_or(WeightFormat::Dense);
            *out.entry(f).or_insert(0) += self.tensor_bytes(kind, layer, model, params, dtype);
        };
        add(OpKind::Embedding, None, model.vocab_size * model.hidden_size);
        if !model.tie_word_embeddings {
            add(OpKind::LmHead, None, model.vocab_size * model.hidden_size);
        }
        for l in 0..model.num_layers as u32 {
            use OpKind::*;
            for kind in [QProj, KProj, VProj, OProj, GateProj, UpProj, DownProj] {
                let (i, o) = model.linear_dims(kind);
                add(kind, Some(l), i * o);
            }
        }
        out
    }

    /// The block format of a GGUF tensor's `ggml_type`; `None` for dense types and for
    /// block types Lemurian does not run.
    pub fn from_ggml_type(t: u32) -> Option<Self> {
        Some(match t {
            2 => WeightFormat::Q4_0,
            3 => WeightFormat::Q4_1,
            6 => WeightFormat::Q5_0,
            7 => WeightFormat::Q5_1,
            8 => WeightFormat::Q8_0,
            10 => WeightFormat::Q2K,
            11 => WeightFormat::Q3K,
            12 => WeightFormat::Q4K,
            13 => WeightFormat::Q5K,
            14 => WeightFormat::Q6K,
            _ => return None,
        })
    }

    /// The format of a GGUF file by its `general.file_type` (llama.cpp's `llama_ftype`);
    /// `None` for types this list does not price (their tensors decide at run time).
    pub fn from_gguf_file_type(t: u64) -> Option<Self> {
        Some(match t {
            0 | 1 | 32 => WeightFormat::Dense,
            2 => WeightFormat::Q4_0,
            3 => WeightFormat::Q4_1,
            7 => WeightFormat::Q8_0,
            8 => WeightFormat::Q5_0,
            9 => WeightFormat::Q5_1,
            10 => WeightFormat::Q2K,
            11..=13 => WeightFormat::Q3K,
            14 => WeightFormat::Q4K,
            15 => WeightFormat::Q4KM,
            16 => WeightFormat::Q5K,
            17 => WeightFormat::Q5KM,
            18 => WeightFormat::Q6K,
            _ => return None,
        })
    }

    pub fn is_quantized(self) -> bool {
        self != WeightFormat::Dense
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(layers: u64, hidden: u64, inter: u64, tied: bool) -> ModelConfig {
        let mut m = ModelConfig::preset("mistral-7b").unwrap();
        m.num_layers = layers;
        m.hidden_size = hidden;
        m.intermediate_size = inter;
        m.head_dim = hidden / m.num_heads;
        m.tie_word_embeddings = tied;
        m
    }

    #[test]
    fn bits_per_weight_include_the_block_scales() {
        // (format, bits): closed forms of GGUF's block layouts.
        let cases = [
            (WeightFormat::Q8_0, 8.5),
            (WeightFormat::Q4_0, 4.5),
            (WeightFormat::Q4_1, 5.0),
            (WeightFormat::Q4K, 4.5),
            (WeightFormat::Q6K, 6.5625),
            (WeightFormat::Q2K, 2.625),
        ];
        for (f, bits) in cases {
            assert_eq!(f.block_bits(), Some(bits), "{f}");
            assert!(f.is_block());
        }
        assert_eq!(WeightFormat::Q4KM.block_bits(), None, "a mix has no one block");
        let m = ModelConfig::preset("mistral-7b").unwrap();
        assert_eq!(WeightFormat::Q4_0.tensor_format(OpKind::AttnNorm, Some(0), &m), None, "norms stay dense");
        assert_eq!(WeightFormat::Q8_0.tensor_bytes(OpKind::QProj, Some(0), &m, 64, DType::F16), 68);
        assert_eq!(WeightFormat::Dense.tensor_bytes(OpKind::QProj, Some(0), &m, 64, DType::F16), 128);
        assert_eq!(WeightFormat::parse("Q4_K_M"), Some(WeightFormat::Q4KM));
        assert_eq!(WeightFormat::parse("bf16"), Some(WeightFormat::Dense));
        assert_eq!(WeightFormat::parse("q3"), None);
        for f in WeightFormat::ALL {
            assert_eq!(WeightFormat::parse(f.name()), Some(f));
        }
    }

    #[test]
    fn q4_k_m_follows_llama_quantize() {
        // Mistral-7B: 32 layers; use_more_bits is true for layers 0-3, 28-31 and 6, 9, ..., 27.
        let m = ModelConfig::preset("mistral-7b").unwrap();
        let q6: Vec<u32> = (0..32)
            .filter(|&l| WeightFormat::Q4KM.tensor_format(OpKind::DownProj, Some(l), &m) == Some(WeightFormat::Q6K))
            .collect();
        let mut expect: Vec<u32> = (0..4).chain(28..32).chain((6..28).step_by(3)).collect();
        expect.sort();
        assert_eq!(q6, expect);
        assert_eq!(q6.len(), 16, "half the layers, as the mix's average assumes");
        for l in 0..32 {
            let v = WeightFormat::Q4KM.tensor_format(OpKind::VProj, Some(l), &m);
            let d = WeightFormat::Q4KM.tensor_format(OpKind::DownProj, Some(l), &m);
            assert_eq!(v, d, "layer {l}: attn_v and ffn_down follow the same rule");
            assert_eq!(WeightFormat::Q4KM.tensor_format(OpKind::QProj, Some(l), &m), Some(WeightFormat::Q4K));
        }
        assert_eq!(WeightFormat::Q4KM.tensor_format(OpKind::LmHead, None, &m), Some(WeightFormat::Q6K));
        assert_eq!(WeightFormat::Q4KM.tensor_format(OpKind::Embedding, None, &m), Some(WeightFormat::Q4K));
        assert_eq!(WeightFormat::Q8_0.tensor_format(OpKind::LmHead, None, &m), Some(WeightFormat::Q8_0));
        assert_eq!(WeightFormat::Q4_0.tensor_format(OpKind::LmHead, None, &m), Some(WeightFormat::Q6K));
        // The whole file by hand: embedding Q4_K 73,728,000 B, head Q6_K 107,520,000 B; 16
        // layers all Q4_K (122,683,392 B each), 16 with attn_v and ffn_down in Q6_K
        // (138,903,552 B each). TheBloke's mistral-7b-v0.1.Q4_K_M.gguf holds 4.37 GB: these
        // plus 1 MB of f32 norms and the tokenizer.
        let b = WeightFormat::Q4KM.breakdown(&m, DType::F16);
        assert_eq!(b.values().sum::<u64>(), 73_728_000 + 107_520_000 + 16 * (122_683_392 + 138_903_552));
        assert_eq!(b.keys().copied().collect::<Vec<_>>(), [WeightFormat::Q4K, WeightFormat::Q6K]);
    }

    #[test]
    fn rows_a_block_does_not_divide_fall_back() {
        // Hidden 576 (SmolLM2-135M): 576 = 2.25 x 256, so the K-quants fall back on every
        // tensor whose rows are 576 wide; ffn_down's 1536 = 6 x 256 keeps its K-quant.
        let m = model(30, 576, 1536, true);
        let f = |w: WeightFormat, k, l| w.tensor_format(k, l, &m);
        assert_eq!(f(WeightFormat::Q4KM, OpKind::QProj, Some(3)), Some(WeightFormat::Q5_0));
        assert_eq!(f(WeightFormat::Q4KM, OpKind::VProj, Some(0)), Some(WeightFormat::Q8_0));
        assert_eq!(f(WeightFormat::Q4KM, OpKind::DownProj, Some(0)), Some(WeightFormat::Q6K));
        assert_eq!(f(WeightFormat::Q4KM, OpKind::DownProj, Some(3)), Some(WeightFormat::Q4K));
        assert_eq!(f(WeightFormat::Q4_1, OpKind::Embedding, None), Some(WeightFormat::Q8_0), "tied: the head's type");
        assert_eq!(f(WeightFormat::Q4_1, OpKind::UpProj, Some(7)), Some(WeightFormat::Q4_1));
        // Rows of 48 weights: no 32-weight block divides them, so the tensor stays dense.
        let odd = model(2, 48, 96, false);
        assert_eq!(WeightFormat::Q4_0.tensor_format(OpKind::QProj, Some(0), &odd), None);
        assert_eq!(WeightFormat::Q4_0.tensor_bytes(OpKind::QProj, Some(0), &odd, 48 * 48, DType::F32), 48 * 48 * 4);
    }
}
