//! Names of the ops and phases a plan places: the vocabulary shared by planner and workers.

use serde::{Deserialize, Serialize};

/// What an op computes. Granularity is sub-layer: one entry per kernel-sized step of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Embedding,
    AttnNorm,
    QProj,
    KProj,
    VProj,
    Rope,
    Attention,
    OProj,
    AttnResidual,
    MlpNorm,
    GateProj,
    UpProj,
    SiluMul,
    DownProj,
    MlpResidual,
    FinalNorm,
    LmHead,
}

impl OpKind {
    /// The ops of one decoder layer, in execution order.
    pub const LAYER: [OpKind; 14] = [
        OpKind::AttnNorm,
        OpKind::QProj,
        OpKind::KProj,
        OpKind::VProj,
        OpKind::Rope,
        OpKind::Attention,
        OpKind::OProj,
        OpKind::AttnResidual,
        OpKind::MlpNorm,
        OpKind::GateProj,
        OpKind::UpProj,
        OpKind::SiluMul,
        OpKind::DownProj,
        OpKind::MlpResidual,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::AttnNorm => "attn_norm",
            OpKind::QProj => "q_proj",
            OpKind::KProj => "k_proj",
            OpKind::VProj => "v_proj",
            OpKind::Rope => "rope",
            OpKind::Attention => "attention",
            OpKind::OProj => "o_proj",
            OpKind::AttnResidual => "attn_residual",
            OpKind::MlpNorm => "mlp_norm",
            OpKind::GateProj => "gate_proj",
            OpKind::UpProj => "up_proj",
            OpKind::SiluMul => "silu_mul",
            OpKind::DownProj => "down_proj",
            OpKind::MlpResidual => "mlp_residual",
            OpKind::FinalNorm => "final_norm",
            OpKind::LmHead => "lm_head",
        }
    }

    /// Linear projections: the ops that own a weight matrix and may carry a LoRA adapter.
    pub fn is_linear(self) -> bool {
        matches!(
            self,
            OpKind::QProj
                | OpKind::KProj
                | OpKind::VProj
                | OpKind::OProj
                | OpKind::GateProj
                | OpKind::UpProj
                | OpKind::DownProj
                | OpKind::LmHead
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::all().find(|k| k.name() == s)
    }

    pub fn all() -> impl Iterator<Item = OpKind> {
        [OpKind::Embedding].into_iter().chain(Self::LAYER).chain([OpKind::FinalNorm, OpKind::LmHead])
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which pass an op belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Inference: the whole prompt at once.
    Prefill,
    /// Inference: one new token against the KV cache.
    Decode,
    /// Training: forward pass.
    Forward,
    /// Training: backward pass (gradients).
    Backward,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
