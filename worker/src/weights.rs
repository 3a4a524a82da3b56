//! Loading a rank's share of a checkpoint, in either format users have: a Hugging Face
//! directory (`config.json` plus memory-mapped `*.safetensors`) or a GGUF file. A GGUF's
//! quantized linear and embedding tensors are kept as stored (candle's quantized matmul
//! and embedding lookup), unless the rank is asked to dequantize them to the run's dtype;
//! norms and unquantized tensors load in the run's dtype. Only the tensors of the ops this
//! rank runs are read. GGUF stores Q and K rows permuted for interleaved RoPE; they are
//! permuted back (whole quantized rows, which are independent) so both formats give the
//! same model.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear};
pub use lemur_protocol::gguf::gguf_file_of;
use lemur_protocol::gguf::GgufHeader;
use lemur_protocol::{ModelConfig, OpKind, Plan, WeightFormat};

use crate::error::WorkerError;
use crate::exec::{Executor, OpWeights};

enum Tensors {
    Safetensors(MmapedSafetensors),
    Gguf { file: PathBuf, content: gguf_file::Content },
}

/// A checkpoint, opened: its shape, its tensors, and (GGUF) its header.
pub struct Checkpoint {
    /// The directory or GGUF file.
    pub path: PathBuf,
    pub config: ModelConfig,
    /// The GGUF header, for GGUF checkpoints (tokenizer and chat template live there).
    pub gguf: Option<GgufHeader>,
    tensors: Tensors,
    /// The files its weights and shape come from (what its content hash covers).
    pub files: Vec<PathBuf>,
    /// Dequantize GGUF's quantized tensors at load instead of running them as stored.
    pub dequantize: bool,
    /// Quantize dense tensors (safetensors, or an unquantized GGUF) to this at load.
    pub quantize: Option<WeightFormat>,
}

/// The single-type weight formats and candle's block type for each.
const BLOCK_TYPES: [(WeightFormat, GgmlDType); 10] = [
    (WeightFormat::Q8_0, GgmlDType::Q8_0),
    (WeightFormat::Q4_0, GgmlDType::Q4_0),
    (WeightFormat::Q4_1, GgmlDType::Q4_1),
    (WeightFormat::Q5_0, GgmlDType::Q5_0),
    (WeightFormat::Q5_1, GgmlDType::Q5_1),
    (WeightFormat::Q2K, GgmlDType::Q2K),
    (WeightFormat::Q3K, GgmlDType::Q3K),
    (WeightFormat::Q4K, GgmlDType::Q4K),
    (WeightFormat::Q5K, GgmlDType::Q5K),
    (WeightFormat::Q6K, GgmlDType::Q6K),
];

/// The formats a dense checkpoint can be quantized to at load.
pub fn block_formats() -> impl Iterator<Item = WeightFormat> {
    BLOCK_TYPES.iter().map(|(w, _)| *w)
}

/// A block format by name (what `--quantize` takes); the error lists them all.
pub fn parse_block_format(s: &str) -> Result<WeightFormat, String> {
    WeightFormat::parse(s).filter(|f| ggml_type(*f).is_some()).ok_or_else(|| {
        let all: Vec<&str> = block_formats().map(WeightFormat::name).collect();
        format!("`{s}` is not a block format ({})", all.join(", "))
    })
}

/// What `--quantize` takes: a block format, or one of llama.cpp's mixes (q4_k_m, q5_k_m),
/// laid out per tensor as `llama-quantize` does; the error lists them all.
pub fn parse_quantize(s: &str) -> Result<WeightFormat, String> {
    WeightFormat::parse(s).filter(|f| f.is_quantized()).ok_or_else(|| {
        let all: Vec<&str> = WeightFormat::ALL.iter().filter(|f| f.is_quantized()).map(|f| f.name()).collect();
        format!("`{s}` is not a quantized format ({})", all.join(", "))
    })
}

/// candle's block type of a single-type weight format (`None` for dense and for mixes).
pub fn ggml_type(f: WeightFormat) -> Option<GgmlDType> {
    BLOCK_TYPES.iter().find(|(w, _)| *w == f).map(|(_, t)| *t)
}

/// The weight format of a GGUF block type (dense for f32, f16, bf16).
pub(crate) fn format_of(t: GgmlDType) -> Option<WeightFormat> {
    match t {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Some(WeightFormat::Dense),
        _ => BLOCK_TYPES.iter().find(|(_, g)| *g == t).map(|(w, _)| *w),
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("path", &self.path).field("config", &self.config).finish()
    }
}

fn file_err(path: &Path, message: impl Into<String>) -> WorkerError {
    WorkerError::File { path: path.display().to_string(), message: message.into() }
}

/// Tensor names of an op's weights, Hugging Face or GGUF style.
pub fn tensor_names(cfg: &ModelConfig, gguf: bool, kind: OpKind, layer: Option<u32>) -> Vec<String> {
    let l = layer.unwrap_or(0);
    let (hf, gg): (Option<String>, Option<String>) = match kind {
        OpKind::Embedding => (Some("model.embed_tokens.weight".into()), Some("token_embd.weight".into())),
        OpKind::AttnNorm => {
            (Some(format!("model.layers.{l}.input_layernorm.weight")), Some(format!("blk.{l}.attn_norm.weight")))
        }
        OpKind::MlpNorm => (
            Some(format!("model.layers.{l}.post_attention_layernorm.weight")),
            Some(format!("blk.{l}.ffn_norm.weight")),
        ),
        OpKind::QProj => {
            (Some(format!("model.layers.{l}.self_attn.q_proj.weight")), Some(format!("blk.{l}.attn_q.weight")))
        }
        OpKind::KProj => {
            (Some(format!("model.layers.{l}.self_attn.k_proj.weight")), Some(format!("blk.{l}.attn_k.weight")))
        }
        OpKind::VProj => {
            (Some(format!("model.layers.{l}.self_attn.v_proj.weight")), Some(format!("blk.{l}.attn_v.weight")))
        }
        OpKind::OProj => {
            (Some(format!("model.layers.{l}.self_attn.o_proj.weight")), Some(format!("blk.{l}.attn_output.weight")))
        }
        OpKind::GateProj => {
            (Some(format!("model.layers.{l}.mlp.gate_proj.weight")), Some(format!("blk.{l}.ffn_gate.weight")))
        }
        OpKind::UpProj => {
            (Some(format!("model.layers.{l}.mlp.up_proj.weight")), Some(format!("blk.{l}.ffn_up.weight")))
        }
        OpKind::DownProj => {
            (Some(format!("model.layers.{l}.mlp.down_proj.weight")), Some(format!("blk.{l}.ffn_down.weight")))
        }
        OpKind::FinalNorm => (Some("model.norm.weight".into()), Some("output_norm.weight".into())),
        OpKind::LmHead if cfg.tie_word_embeddings => {
            (Some("model.embed_tokens.weight".into()), Some("token_embd.weight".into()))
        }
        OpKind::LmHead => (Some("lm_head.weight".into()), Some("output.weight".into())),
        OpKind::Rope | OpKind::Attention | OpKind::AttnResidual | OpKind::MlpResidual | OpKind::SiluMul => (None, None),
    };
    if gguf { gg } else { hf }.into_iter().collect()
}

/// Undoes llama.cpp's permutation of Q and K rows (interleaved RoPE pairs back to halves).
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor, WorkerError> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// [`unpermute_qk`] on a quantized tensor's raw bytes: `rows` rows of equal size, each a
/// run of independent blocks, reordered whole.
pub fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Result<Vec<u8>, String> {
    if rows == 0 || heads == 0 || !bytes.len().is_multiple_of(rows) || !rows.is_multiple_of(2 * heads) {
        return Err(format!("{} bytes do not split into {rows} rows of {heads} heads' pairs", bytes.len()));
    }
    let (row, per_head) = (bytes.len() / rows, rows / heads);
    let half = per_head / 2;
    let mut out = Vec::with_capacity(bytes.len());
    for new in 0..rows {
        // new = h * per_head + j * half + i  <-  old = h * per_head + i * 2 + j
        let (h, rest) = (new / per_head, new % per_head);
        let (j, i) = (rest / half, rest % half);
        let old = h * per_head + i * 2 + j;
        out.extend_from_slice(&bytes[old * row..(old + 1) * row]);
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens a Hugging Face directory or a GGUF file (or a directory holding one).
    pub fn open(path: &Path) -> Result<Self, WorkerError> {
        if !path.exists() {
            return Err(file_err(path, "no such file or directory (a GGUF file or a Hugging Face directory)"));
        }
        if path.is_file() && path.extension().is_none_or(|x| x != "gguf") {
            return Err(file_err(path, "a file that is not .gguf: give a GGUF file or a Hugging Face directory"));
        }
        if let Some(file) = gguf_file_of(path) {
            return Self::open_gguf(&file);
        }
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let config = ModelConfig::from_hf_json(&name, &text).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| file_err(path, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(file_err(path, "no *.safetensors files"));
        }
        // SAFETY: the files are mapped read-only; like every safetensors loader, this
        // assumes nobody truncates them while the worker runs.
        #[allow(unsafe_code)]
        let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| file_err(path, e.to_string()))?;
        files.insert(0, cfg_path);
        Ok(Self {
            path: path.to_path_buf(),
            config,
            gguf: None,
            tensors: Tensors::Safetensors(tensors),
            files,
            dequantize: false,
            quantize: None,
        })
    }

    fn open_gguf(file: &Path) -> Result<Self, WorkerError> {
        let mut f = std::fs::File::open(file).map_err(|e| file_err(file, e.to_string()))?;
        let header = GgufHeader::read(&mut f).map_err(|e| file_err(file, e.to_string()))?;
        let name = file.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let config = header.model_config(&name).map_err(|e| file_err(file, e.to_string()))?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).map_err(|e| file_err(file, e.to_string()))?;
        let content = gguf_file::Content::read(&mut f).map_err(|e| file_err(file, crate::error::candle_message(&e)))?;
        Ok(Self {
            path: file.to_path_buf(),
            config,
            gguf: Some(header),
            tensors: Tensors::Gguf { file: file.to_path_buf(), content },
            files: vec![file.to_path_buf()],
            dequantize: false,
            quantize: None,
        })
    }

    /// How this rank will hold the weights: what `--quantize` makes of dense ones, a GGUF's
    /// own format (its `general.file_type`, else its first query projection's type) unless
    /// dequantized, or dense.
    pub fn weight_format(&self) -> WeightFormat {
        if let Some(q) = self.quantize {
            return q;
        }
        let Tensors::Gguf { content, .. } = &self.tensors else { return WeightFormat::Dense };
        if self.dequantize {
            return WeightFormat::Dense;
        }
        self.gguf
            .as_ref()
            .and_then(GgufHeader::weight_format)
            .or_else(|| content.tensor_infos.get("blk.0.attn_q.weight").and_then(|i| format_of(i.ggml_dtype)))
            .unwrap_or(WeightFormat::Dense)
    }

    /// Checks that the plan was made for the weight format the ranks will run.
    pub fn check_plan_weights(&self, plan: &Plan) -> Result<(), WorkerError> {
        let (planned, run) = (plan.workload.weights, self.weight_format());
        if planned == run {
            return Ok(());
        }
        let how = if self.quantize.is_some() {
            "--quantize"
        } else if self.is_gguf() && !self.dequantize {
            "as the GGUF stores them (--dequantize runs them dense)"
        } else {
            "dense"
        };
        Err(WorkerError::Plan(format!(
            "the plan assumes {planned} weights, but {} will run {run} weights ({how}); plan with `lemur-plan --weights {run}`",
            self.path.display()
        )))
    }

    fn is_gguf(&self) -> bool {
        matches!(self.tensors, Tensors::Gguf { .. })
    }

    /// Checks that the plan was made for this checkpoint's shape.
    pub fn check_plan_model(&self, plan_model: &ModelConfig) -> Result<(), WorkerError> {
        check_model_shape(&self.config, &self.path.display().to_string(), plan_model)
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.tensors {
            Tensors::Safetensors(st) => st.get(name).ok().map(|v| v.shape().to_vec()),
            Tensors::Gguf { content, .. } => content.tensor_infos.get(name).map(|i| i.shape.dims().to_vec()),
        }
    }

    /// Reads one tensor, dequantized, as the run's dtype, Q and K in Hugging Face order.
    fn load(&self, name: &str, kind: OpKind, dev: &Device, dtype: DType) -> Result<Tensor, WorkerError> {
        let missing =
            |e: String| WorkerError::Weights(format!("{}: tensor `{name}` for {kind}: {e}", self.path.display()));
        let t = match &self.tensors {
            Tensors::Safetensors(st) => st.load(name, dev).map_err(|e| missing(e.to_string()))?,
            Tensors::Gguf { file, content } => {
                let mut f = std::fs::File::open(file).map_err(|e| file_err(file, e.to_string()))?;
                let q = content.tensor(&mut f, name, dev).map_err(|e| missing(e.to_string()))?;
                let t = q.dequantize(dev)?;
                match kind {
                    OpKind::QProj => unpermute_qk(&t, self.config.num_heads as usize)?,
                    OpKind::KProj => unpermute_qk(&t, self.config.num_kv_heads as usize)?,
                    _ => t,
                }
            }
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// The tensor `name` as stored, when it is quantized and kept so: Q and K rows permuted
    /// back, on `dev`. `None` for safetensors, unquantized GGUF tensors, or `dequantize`.
    fn load_quantized(&self, name: &str, kind: OpKind, dev: &Device) -> Result<Option<QTensor>, WorkerError> {
        let Tensors::Gguf { file, content } = &self.tensors else { return Ok(None) };
        let Some(info) = content.tensor_infos.get(name) else { return Ok(None) };
        if self.dequantize || matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        let missing =
            |e: String| WorkerError::Weights(format!("{}: tensor `{name}` for {kind}: {e}", self.path.display()));
        let mut f = std::fs::File::open(file).map_err(|e| file_err(file, e.to_string()))?;
        let q = content.tensor(&mut f, name, &Device::Cpu).map_err(|e| missing(e.to_string()))?;
        let heads = match kind {
            OpKind::QProj => Some(self.config.num_heads as usize),
            OpKind::KProj => Some(self.config.num_kv_heads as usize),
            _ => None,
        };
        if heads.is_none() && dev.is_cpu() {
            return Ok(Some(q));
        }
        let (dtype, shape) = (q.dtype(), q.shape().clone());
        let mut bytes = q.data()?.into_owned();
        if let Some(heads) = heads {
            bytes = unpermute_rows(&bytes, shape.dims2()?.0, heads).map_err(missing)?;
        }
        Ok(Some(QTensor::new(QStorage::from_data(std::borrow::Cow::Owned(bytes), dev, dtype)?, shape)?))
    }

    /// A dense tensor quantized to `t` at load (`--quantize`), on `dev`.
    fn quantize_at_load(&self, name: &str, kind: OpKind, t: GgmlDType, dev: &Device) -> Result<QTensor, WorkerError> {
        let dense = self.load(name, kind, &Device::Cpu, DType::F32)?;
        QTensor::quantize_onto(&dense, t, dev).map_err(|e| {
            WorkerError::Weights(format!(
                "{}: tensor `{name}` {:?} cannot be quantized to {t:?}: {}",
                self.path.display(),
                dense.dims(),
                crate::error::candle_message(&e)
            ))
        })
    }

    /// Checks that every tensor `ops` need is present with the right shape, without loading.
    pub fn check_tensors(&self, ops: &HashSet<(OpKind, Option<u32>)>) -> Result<(), WorkerError> {
        let mut ops: Vec<_> = ops.iter().copied().collect();
        ops.sort_by_key(|(k, l)| (l.map_or(-1, i64::from), *k));
        for (kind, layer) in ops {
            for name in tensor_names(&self.config, self.is_gguf(), kind, layer) {
                let shape = self.shape_of(&name).ok_or_else(|| {
                    WorkerError::Weights(format!(
                        "{}: no tensor `{name}`, needed by {kind}{}",
                        self.path.display(),
                        layer.map_or(String::new(), |l| format!(" of layer {l}"))
                    ))
                })?;
                self.check_shape(&name, kind, &shape)?;
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
        // Ops are sorted, so a tied embedding loads before the head that shares its table.
        let mut table: Option<OpWeights> = None;
        for (kind, layer) in ops {
            let tied = match (&table, kind) {
                (Some(t), OpKind::LmHead) if self.config.tie_word_embeddings => Some(t.tied_head()?),
                _ => None,
            };
            // A tied head reuses the embedding's table rather than loading it again.
            let w = match tied {
                Some(w) => w,
                None => self.op_weights(kind, layer, &dev, exec.dtype, &mut bytes)?,
            };
            if kind == OpKind::Embedding {
                table = Some(w.clone());
            }
            exec.set_weights(kind, layer, w);
            if let Some(p) = progress {
                p.inc(1);
            }
        }
        Ok(bytes)
    }

    /// The weights of op `kind` in `layer` on `dev` as the run holds them (quantized as
    /// stored or by `--quantize`, else dense in `dtype`); adds their size to `bytes`.
    pub(crate) fn op_weights(
        &self,
        kind: OpKind,
        layer: Option<u32>,
        dev: &Device,
        dtype: DType,
        bytes: &mut u64,
    ) -> Result<OpWeights, WorkerError> {
        let names = tensor_names(&self.config, self.is_gguf(), kind, layer);
        let Some(name) = names.first() else { return Ok(OpWeights::None) };
        if matches!(kind, OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm) {
            return self.dense_weights(name, kind, dev, dtype, bytes);
        }
        // `--quantize` lays tensors out as llama-quantize would (the planner prices that
        // layout): the head in Q6_K, a mix's Q6_K layers, fallbacks.
        let target = self.quantize.map(|q| q.tensor_format(kind, layer, &self.config).and_then(ggml_type));
        let stored = match target {
            Some(Some(t)) => Some(self.quantize_at_load(name, kind, t, dev)?),
            Some(None) => None,
            None => self.load_quantized(name, kind, dev)?,
        };
        let Some(q) = stored else { return self.dense_weights(name, kind, dev, dtype, bytes) };
        *bytes += q.storage_size_in_bytes() as u64;
        self.check_shape(name, kind, q.shape().dims())?;
        Ok(match kind {
            OpKind::Embedding => OpWeights::QEmbedding(Arc::new(q)),
            _ => OpWeights::QLinear(QMatMul::from_qtensor(q)?),
        })
    }

    /// An op's weights loaded in the run's dtype (dequantized if stored quantized).
    fn dense_weights(
        &self,
        name: &str,
        kind: OpKind,
        dev: &Device,
        dtype: DType,
        bytes: &mut u64,
    ) -> Result<OpWeights, WorkerError> {
        let t = self.load(name, kind, dev, dtype)?;
        *bytes += (t.elem_count() * dtype.size_in_bytes()) as u64;
        self.check_shape(name, kind, t.dims())?;
        Ok(match kind {
            OpKind::Embedding => OpWeights::Embedding(Embedding::new(t, self.config.hidden_size as usize)),
            OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => OpWeights::Norm(t),
            _ => OpWeights::Linear(Linear::new(t, None)),
        })
    }

    fn check_shape(&self, name: &str, kind: OpKind, dims: &[usize]) -> Result<(), WorkerError> {
        let Some(want) = weight_shape(&self.config, kind) else { return Ok(()) };
        let got: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if got != want {
            return Err(WorkerError::Weights(format!(
                "{}: tensor `{name}` has shape {got:?}, expected {want:?}",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// Checks that a plan made for `plan_model` fits a checkpoint of shape `a` (`what` names it).
pub fn check_model_shape(a: &ModelConfig, what: &str, plan_model: &ModelConfig) -> Result<(), WorkerError> {
    let b = plan_model;

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
            b.name, b.num_layers, b.hidden_size, what, a.name, a.num_layers, a.hidden_size
        )));
    }
    Ok(())
}

/// The shape of op `kind`'s weight in a model of shape `c` (`None`: an op without one).
pub fn weight_shape(c: &ModelConfig, kind: OpKind) -> Option<Vec<u64>> {
    let (h, q, kv, i, v) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.vocab_size);
    Some(match kind {
        OpKind::Embedding | OpKind::LmHead => vec![v, h],
        OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => vec![h],
        OpKind::QProj => vec![q, h],
        OpKind::KProj | OpKind::VProj => vec![kv, h],
        OpKind::OProj => vec![h, q],
        OpKind::GateProj | OpKind::UpProj => vec![i, h],
        OpKind::DownProj => vec![h, i],
        _ => return None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_rows_unpermute_like_the_dense_weight() {
        // 12 rows of 3 bytes; row r holds r: the row order after unpermuting must be the
        // dense un-permutation's.
        let (rows, heads, width) = (12usize, 3usize, 3usize);
        let bytes: Vec<u8> = (0..rows).flat_map(|r| vec![r as u8; width]).collect();
        let dense = Tensor::from_vec(
            (0..rows * width).map(|i| (i / width) as f32).collect::<Vec<_>>(),
            (rows, width),
            &Device::Cpu,
        )
        .unwrap();
        let want: Vec<u8> =
            unpermute_qk(&dense, heads).unwrap().to_vec2::<f32>().unwrap().iter().map(|r| r[0] as u8).collect();
        let got: Vec<u8> = unpermute_rows(&bytes, rows, heads).unwrap().chunks(width).map(|r| r[0]).collect();
        assert_eq!(got, want);
        assert!(unpermute_rows(&bytes, 5, heads).is_err(), "rows must split into heads' pairs");
    }
}
