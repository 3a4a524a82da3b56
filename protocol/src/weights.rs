//! How a model's weights are stored: dense in the run's dtype, or one of GGUF's block
//! formats, with the bits each weight costs (its share of the block's scales included).
//! The planner sizes memory and weight traffic by it; plans record it.

use serde::{Deserialize, Serialize};

use crate::{DType, OpKind};

/// A weight format: what `--weights` names, and what a plan records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
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

    /// Bits per weight of one block format: `block` weights in `bytes` bytes.
    fn block_bits(self) -> Option<f64> {
        let (bytes, block) = match self {
            WeightFormat::Dense | WeightFormat::Q4KM | WeightFormat::Q5KM => return None,
            WeightFormat::Q8_0 => (34.0, 32.0),
            WeightFormat::Q4_0 => (18.0, 32.0),
            WeightFormat::Q4_1 => (20.0, 32.0),
            WeightFormat::Q5_0 => (22.0, 32.0),
            WeightFormat::Q5_1 => (24.0, 32.0),
            WeightFormat::Q2K => (84.0, 256.0),
            WeightFormat::Q3K => (110.0, 256.0),
            WeightFormat::Q4K => (144.0, 256.0),
            WeightFormat::Q5K => (176.0, 256.0),
            WeightFormat::Q6K => (210.0, 256.0),
        };
        Some(bytes * 8.0 / block)
    }

    /// Bits per weight of the tensor of op `kind`, or `None` when it is dense (norms are
    /// always dense: GGUF keeps them f32).
    pub fn bits(self, kind: OpKind) -> Option<f64> {
        if matches!(kind, OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm) {
            return None;
        }
        let q6 = WeightFormat::Q6K.block_bits();
        let mixed = |base: WeightFormat| match kind {
            OpKind::LmHead => q6,
            OpKind::VProj | OpKind::DownProj => Some((base.block_bits()? + q6?) / 2.0),
            _ => base.block_bits(),
        };
        match self {
            WeightFormat::Q4KM => mixed(WeightFormat::Q4K),
            WeightFormat::Q5KM => mixed(WeightFormat::Q5K),
            other => other.block_bits(),
        }
    }

    /// Bytes of `params` weights of op `kind` stored this way (dense ones in `dtype`).
    pub fn bytes(self, kind: OpKind, params: u64, dtype: DType) -> u64 {
        match self.bits(kind) {
            None => params * dtype.bytes(),
            Some(bits) => (params as f64 * bits / 8.0).ceil() as u64,
        }
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

    #[test]
    fn bits_per_weight_include_the_block_scales() {
        // (format, kind, bits): closed forms of GGUF's block layouts.
        let cases = [
            (WeightFormat::Q8_0, OpKind::QProj, 8.5),
            (WeightFormat::Q4_0, OpKind::GateProj, 4.5),
            (WeightFormat::Q4_1, OpKind::UpProj, 5.0),
            (WeightFormat::Q4K, OpKind::OProj, 4.5),
            (WeightFormat::Q6K, OpKind::DownProj, 6.5625),
            (WeightFormat::Q2K, OpKind::KProj, 2.625),
            (WeightFormat::Q4KM, OpKind::QProj, 4.5),
            (WeightFormat::Q4KM, OpKind::LmHead, 6.5625),
            (WeightFormat::Q4KM, OpKind::VProj, (4.5 + 6.5625) / 2.0),
        ];
        for (f, k, bits) in cases {
            assert_eq!(f.bits(k), Some(bits), "{f} {k}");
        }
        assert_eq!(WeightFormat::Q4_0.bits(OpKind::AttnNorm), None, "norms stay dense");
        assert_eq!(WeightFormat::Q8_0.bytes(OpKind::QProj, 64, DType::F16), 68);
        assert_eq!(WeightFormat::Dense.bytes(OpKind::QProj, 64, DType::F16), 128);
        assert_eq!(WeightFormat::parse("Q4_K_M"), Some(WeightFormat::Q4KM));
        assert_eq!(WeightFormat::parse("bf16"), Some(WeightFormat::Dense));
        assert_eq!(WeightFormat::parse("q3"), None);
        for f in WeightFormat::ALL {
            assert_eq!(WeightFormat::parse(f.name()), Some(f));
        }
    }
}
