//! Loading a rank's share of a Hugging Face checkpoint: `config.json` plus memory-mapped
//! `*.safetensors`, only the tensors of the ops this rank runs, in the run's dtype.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::{Embedding, Linear};
use lemur_protocol::{ModelConfig, OpKind};

use crate::error::WorkerError;
use crate::exec::{Executor, OpWeights};

/// A checkpoint directory, opened.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    tensors: MmapedSafetensors,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).field("config", &self.config).finish()
    }
}

fn file_err(path: &Path, message: impl Into<String>) -> WorkerError {
    WorkerError::File { path: path.display().to_string(), message: message.into() }
}

/// Hugging Face tensor names of an op's weights.
pub fn tensor_names(cfg: &ModelConfig, kind: OpKind, layer: Option<u32>) -> Vec<String> {
    let l = |suffix: &str| vec![format!("model.layers.{}.{suffix}", layer.unwrap_or(0))];
    match kind {
        OpKind::Embedding => vec!["model.embed_tokens.weight".into()],
        OpKind::AttnNorm => l("input_layernorm.weight"),
        OpKind::MlpNorm => l("post_attention_layernorm.weight"),
        OpKind::QProj => l("self_attn.q_proj.weight"),
        OpKind::KProj => l("self_attn.k_proj.weight"),
        OpKind::VProj => l("self_attn.v_proj.weight"),
        OpKind::OProj => l("self_attn.o_proj.weight"),
        OpKind::GateProj => l("mlp.gate_proj.weight"),
        OpKind::UpProj => l("mlp.up_proj.weight"),
        OpKind::DownProj => l("mlp.down_proj.weight"),
        OpKind::FinalNorm => vec!["model.norm.weight".into()],
        OpKind::LmHead if cfg.tie_word_embeddings => vec!["model.embed_tokens.weight".into()],
        OpKind::LmHead => vec!["lm_head.weight".into()],
        OpKind::Rope | OpKind::Attention | OpKind::AttnResidual | OpKind::MlpResidual | OpKind::SiluMul => vec![],
    }
}

impl Checkpoint {
    /// Opens `dir`: parses `config.json` and maps every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self, WorkerError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let config = ModelConfig::from_hf_json(&name, &text).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| file_err(dir, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(file_err(dir, "no *.safetensors files"));
        }
        // SAFETY: the files are mapped read-only; like every safetensors loader, this
        // assumes nobody truncates them while the worker runs.
        #[allow(unsafe_code)]
        let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| file_err(dir, e.to_string()))?;
        Ok(Self { dir: dir.to_path_buf(), config, tensors })
    }

    /// Checks that the plan was made for this checkpoint's shape.
    pub fn check_plan_model(&self, plan_model: &ModelConfig) -> Result<(), WorkerError> {
        let (a, b) = (&self.config, plan_model);
        let same = a.vocab_size == b.vocab_size
            && a.hidden_size == b.hidden_size
            && a.intermediate_size == b.intermediate_size
            && a.num_layers == b.num_layers
            && a.num_heads == b.num_heads
            && a.num_kv_heads == b.num_kv_heads
            && a.head_dim == b.head_dim;
        if !same {
            return Err(WorkerError::Plan(format!(
                "the plan is for model `{}` ({} layers, hidden {}), but {} holds `{}` ({} layers, hidden {})",
                b.name,
                b.num_layers,
                b.hidden_size,
                self.dir.display(),
                a.name,
                a.num_layers,
                a.hidden_size
            )));
        }
        Ok(())
    }

    /// Checks that every tensor `ops` need is present with the right shape, without loading.
    pub fn check_tensors(&self, ops: &HashSet<(OpKind, Option<u32>)>) -> Result<(), WorkerError> {
        let mut ops: Vec<_> = ops.iter().copied().collect();
        ops.sort_by_key(|(k, l)| (l.map_or(-1, i64::from), *k));
        for (kind, layer) in ops {
            for name in tensor_names(&self.config, kind, layer) {
                let view = self.tensors.get(&name).map_err(|_| {
                    WorkerError::Weights(format!(
                        "{}: no tensor `{name}`, needed by {kind}{}",
                        self.dir.display(),
                        layer.map_or(String::new(), |l| format!(" of layer {l}"))
                    ))
                })?;
                self.check_shape(&name, kind, view.shape())?;
            }
        }
        Ok(())
    }

    /// Loads the weights of `ops` into `exec`, converted to its dtype; returns the bytes loaded.
    pub fn load_into(
        &self,
        exec: &mut Executor,
        ops: &HashSet<(OpKind, Option<u32>)>,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<u64, WorkerError> {
        let mut ops: Vec<_> = ops.iter().copied().collect();
        ops.sort_by_key(|(k, l)| (l.map_or(-1, i64::from), *k));
        if let Some(p) = progress {
            p.set_length(ops.len() as u64);
        }
        let mut bytes = 0u64;
        let dev: Device = exec.device.clone();
        for (kind, layer) in ops {
            let names = tensor_names(&self.config, kind, layer);
            let w = match names.first() {
                None => OpWeights::None,
                Some(name) => {
                    let t = self
                        .tensors
                        .load(name, &dev)
                        .map_err(|e| {
                            WorkerError::Weights(format!("{}: tensor `{name}` for {kind}: {e}", self.dir.display()))
                        })?
                        .to_dtype(exec.dtype)?;
                    bytes += (t.elem_count() * exec.dtype.size_in_bytes()) as u64;
                    self.check_shape(name, kind, t.dims())?;
                    match kind {
                        OpKind::Embedding => OpWeights::Embedding(Embedding::new(t, self.config.hidden_size as usize)),
                        OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => OpWeights::Norm(t),
                        _ => OpWeights::Linear(Linear::new(t, None)),
                    }
                }
            };
            exec.set_weights(kind, layer, w);
            if let Some(p) = progress {
                p.inc(1);
            }
        }
        Ok(bytes)
    }

    fn check_shape(&self, name: &str, kind: OpKind, dims: &[usize]) -> Result<(), WorkerError> {
        let c = &self.config;
        let (h, q, kv, i, v) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.vocab_size);
        let want: Vec<u64> = match kind {
            OpKind::Embedding | OpKind::LmHead => vec![v, h],
            OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => vec![h],
            OpKind::QProj => vec![q, h],
            OpKind::KProj | OpKind::VProj => vec![kv, h],
            OpKind::OProj => vec![h, q],
            OpKind::GateProj | OpKind::UpProj => vec![i, h],
            OpKind::DownProj => vec![h, i],
            _ => return Ok(()),
        };
        let got: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if got != want {
            return Err(WorkerError::Weights(format!(
                "{}: tensor `{name}` has shape {got:?}, expected {want:?}",
                self.dir.display()
            )));
        }
        Ok(())
    }
}

/// The run's dtype by name.
pub fn parse_dtype(s: &str) -> Result<DType, WorkerError> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(WorkerError::Plan(format!("dtype must be f32, f16 or bf16, not `{other}`"))),
    }
}
