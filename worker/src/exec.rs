//! The executor's arithmetic: every op kind of a Llama/Mistral decoder in candle, the
//! rotary tables, and the per-request KV cache with Mistral's sliding window.
//!
//! Semantics follow Mistral's reference and Hugging Face: a query at position i attends
//! to keys j with i - window < j <= i, in prefill and in decode; the cache keeps at most
//! `window` positions. (candle-transformers' Mistral keeps window + 1 in prefill and
//! ignores the window in decode; with a window that does not bind, both agree.)

use std::collections::HashMap;

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear};
use lemur_protocol::{ModelConfig, OpKind};

use crate::error::WorkerError;
use crate::fused::{masked_softmax, Visibility};
use crate::lora::Adapter;

/// The weights one op needs.
#[derive(Debug, Clone)]
pub enum OpWeights {
    Embedding(Embedding),
    /// A quantized embedding table (GGUF, as stored): rows are dequantized on lookup.
    QEmbedding(Arc<QTensor>),
    Norm(Tensor),
    Linear(Linear),
    /// A linear op on quantized weights (GGUF, as stored): `qmm`'s kernels on the CPU,
    /// candle's quantized matmul elsewhere.
    QLinear(QMatMul),
    None,
}

impl OpWeights {
    /// The lm head that shares this embedding table (tied word embeddings).
    pub fn tied_head(&self) -> Result<OpWeights, WorkerError> {
        match self {
            OpWeights::QEmbedding(q) => Ok(OpWeights::QLinear(QMatMul::from_arc(q.clone())?)),
            OpWeights::Embedding(e) => Ok(OpWeights::Linear(Linear::new(e.embeddings().clone(), None))),
            _ => Err(WorkerError::Weights("a tied lm head needs the embedding's table".into())),
        }
    }

    /// A linear op's weight as a dense `[out, in]` tensor: the weight itself, or for a
    /// quantized one a dequantized copy made now (the caller drops it after use).
    pub fn dense(&self, device: &Device) -> Result<Tensor, WorkerError> {
        match self {
            OpWeights::Linear(l) => Ok(l.weight().clone()),
            OpWeights::QLinear(QMatMul::QTensor(q)) => Ok(q.dequantize(device)?),
            OpWeights::QLinear(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Ok(t.clone()),
            _ => Err(WorkerError::Weights("not a linear weight".into())),
        }
    }
}

/// The K and V cache of one layer of one request: preallocated buffers
/// `[batch, kv_heads, capacity, head_dim]` whose first `len` positions are live, appended to
/// in place; `start` is the absolute position of the first. A sliding window keeps at least
/// the last `window` positions (the mask hides older ones); the buffer is compacted when full.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
    pub start: usize,
}

/// Positions a cache grows by at once beyond what it holds.
pub const KV_CHUNK: usize = 256;

/// How many finished requests' cache buffers an executor keeps for new requests: a server's
/// next request usually starts as one finishes, so a few suffice, and they stay within the
/// KV budget the finished requests held.
const SPARE_REQUESTS: usize = 2;

impl KvCache {
    /// A cache holding `k` and `v` (`[b, kv_heads, len, d]`) for positions from `start`.
    pub fn new(k: &Tensor, v: &Tensor, start: usize) -> Result<Self, WorkerError> {
        Self::reusing(k, v, start, &mut Vec::new())
    }

    /// As [`KvCache::new`], in the buffers of a finished request's cache from `spare` when
    /// one fits (same shape and dtype, room for `k`'s positions): a new request then costs
    /// no allocation and no zeroing of fresh pages. Positions past `len` are never read.
    pub fn reusing(k: &Tensor, v: &Tensor, start: usize, spare: &mut Vec<KvCache>) -> Result<Self, WorkerError> {
        let (b, h, len, d) = k.dims4()?;
        let fits = |c: &KvCache| {
            c.k.dims4().is_ok_and(|(cb, ch, cap, cd)| (cb, ch, cd) == (b, h, d) && cap > len)
                && c.k.dtype() == k.dtype()
                && c.k.device().same_device(k.device())
        };
        let mut c = match spare.iter().position(fits) {
            Some(i) => {
                let mut c = spare.swap_remove(i);
                (c.len, c.start) = (0, start);
                c
            }
            None => {
                let mut c = Self { k: k.clone(), v: v.clone(), len: 0, start };
                c.reserve(len, 0)?;
                c
            }
        };
        c.k.slice_set(&k.contiguous()?, 2, 0)?;
        c.v.slice_set(&v.contiguous()?, 2, 0)?;
        c.len = len;
        Ok(c)
    }

    /// Live keys and values `[b, kv_heads, len, d]` (views into the buffers).
    pub fn keys(&self) -> Result<Tensor, WorkerError> {
        Ok(self.k.narrow(2, 0, self.len)?)
    }

    pub fn values(&self) -> Result<Tensor, WorkerError> {
        Ok(self.v.narrow(2, 0, self.len)?)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// New buffers with room for `more` positions after the last `keep` live ones.
    fn reserve(&mut self, more: usize, keep: usize) -> Result<(), WorkerError> {
        let (b, h, _, d) = self.k.dims4()?;
        let cap = (keep + more).next_multiple_of(KV_CHUNK) + KV_CHUNK;
        let (k, v) = (
            Tensor::zeros((b, h, cap, d), self.k.dtype(), self.k.device())?,
            Tensor::zeros((b, h, cap, d), self.v.dtype(), self.v.device())?,
        );
        if keep > 0 {
            let from = self.len - keep;
            k.slice_set(&self.k.narrow(2, from, keep)?.contiguous()?, 2, 0)?;
            v.slice_set(&self.v.narrow(2, from, keep)?.contiguous()?, 2, 0)?;
            self.start += from;
        }
        (self.k, self.v, self.len) = (k, v, keep);
        Ok(())
    }

    /// Appends `k` and `v` (`[b, kv_heads, s, d]`); with a window, positions older than it
    /// may be dropped.
    pub fn append(&mut self, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<(), WorkerError> {
        let s = k.dim(2)?;
        if self.len + s > self.k.dim(2)? {
            let keep = window.map_or(self.len, |w| self.len.min(w));
            self.reserve(s, keep)?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += s;
        Ok(())
    }
}

/// What an op computes with: weights by (kind, layer), rotary tables, KV caches.
#[derive(Debug)]
pub struct Executor {
    pub cfg: ModelConfig,
    pub device: Device,
    pub dtype: DType,
    weights: HashMap<(OpKind, Option<u32>), OpWeights>,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// KV caches by (request, layer).
    pub kv: HashMap<(u64, u32), KvCache>,
    /// Finished requests' cache buffers, for the next requests (at most [`SPARE_REQUESTS`]
    /// requests' worth).
    spare: Vec<KvCache>,
    /// LoRA adapters by (kind, layer).
    pub adapters: HashMap<(OpKind, Option<u32>), Adapter>,
}

/// One request's share of a step: `len` tokens from absolute position `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub request: u64,
    pub position: usize,
    pub len: usize,
    /// Prefill: the prompt's last chunk (its KV cache may move to the decode rank after it).
    pub last: bool,
}

/// What a step runs on: its tokens and the requests they belong to.
#[derive(Debug, Clone)]
pub struct StepInput {
    /// Token ids `[batch, seq]` (u32). A batched inference step packs its segments one
    /// after another along `seq` (batch 1); training has one segment of `batch` sequences.
    pub tokens: Tensor,
    /// The segments of `seq`, in order; their lengths sum to `seq`.
    pub segments: Vec<Seg>,
    /// Training: the next token at every position `[batch, seq]`; the lm head then returns
    /// the mean cross-entropy instead of the last position's logits.
    pub targets: Option<Tensor>,
    /// Training: seeds this micro-batch's LoRA dropout masks.
    pub dropout_seed: u64,
    /// Linear ops on quantized weights multiply by the weight dequantized for the op (an
    /// f32 GEMM over all rows) instead of running the quantized kernels.
    pub dense: bool,
}

impl StepInput {
    /// One request's `tokens` (`[batch, seq]`) from `position`.
    pub fn single(request: u64, tokens: Tensor, position: usize) -> Result<Self, WorkerError> {
        let len = tokens.dim(1)?;
        let segments = vec![Seg { request, position, len, last: true }];
        Ok(Self { tokens, segments, targets: None, dropout_seed: 0, dense: false })
    }

    /// The first segment's position (training has exactly one segment).
    pub fn position(&self) -> usize {
        self.segments.first().map_or(0, |s| s.position)
    }

    /// Index of each segment's last token along `seq`.
    fn last_rows(&self) -> Vec<u32> {
        let mut at = 0;
        self.segments
            .iter()
            .map(|s| {
                at += s.len;
                (at - 1) as u32
            })
            .collect()
    }
}

/// `x` times a quantized weight, as linear ops run it: Lemurian's own kernels on the CPU
/// (`qmm`), candle's elsewhere, on f32 activations (the kernels quantize them to 8 bits);
/// the result in `x`'s dtype. `lemur-profile` times this same function.
pub fn quantized_matmul(q: &QMatMul, x: &Tensor) -> Result<Tensor, WorkerError> {
    let x32 = x.to_dtype(DType::F32)?;
    let y = match crate::qmm::forward(q, &x32)? {
        Some(y) => y,
        None => q.forward(&x32)?,
    };
    Ok(y.to_dtype(x.dtype())?)
}

impl Executor {
    pub fn new(cfg: ModelConfig, device: Device, dtype: DType) -> Result<Self, WorkerError> {
        let (cos, sin) = rope_tables(&cfg, &device, dtype)?;
        Ok(Self {
            cfg,
            device,
            dtype,
            weights: HashMap::new(),
            cos,
            sin,
            kv: HashMap::new(),
            spare: Vec::new(),
            adapters: HashMap::new(),
        })
    }

    pub fn set_weights(&mut self, kind: OpKind, layer: Option<u32>, w: OpWeights) {
        self.weights.insert((kind, layer), w);
    }

    pub(crate) fn weight(&self, kind: OpKind, layer: Option<u32>) -> Result<&OpWeights, WorkerError> {
        self.weights
            .get(&(kind, layer))
            .ok_or_else(|| WorkerError::Weights(format!("no weights loaded for {kind} of layer {layer:?}")))
    }

    /// A linear op with its LoRA adapter (dropout on the adapter's input while training).
    pub(crate) fn linear(
        &self,
        kind: OpKind,
        layer: Option<u32>,
        x: &Tensor,
        step: &StepInput,
    ) -> Result<Tensor, WorkerError> {
        let y = match self.weight(kind, layer)? {
            OpWeights::Linear(l) => l.forward(x)?,
            // Training over a quantized base (QLoRA) multiplies with the op's weight
            // dequantized for this op only, as bitsandbytes does: activations stay exact,
            // so gradients are those of the dequantized model.
            // A step that asks for it does the same for speed: one GEMM over all its rows.
            w @ OpWeights::QLinear(_) if step.targets.is_some() || step.dense => {
                x.broadcast_matmul(&w.dense(&self.device)?.to_dtype(x.dtype())?.t()?)?
            }
            OpWeights::QLinear(q) => quantized_matmul(q, x)?,
            _ => return Err(WorkerError::Weights(format!("{kind} needs a linear weight"))),
        };
        Ok(match self.adapters.get(&(kind, layer)) {
            Some(ad) => {
                let x = self.lora_input(kind, layer, x, ad.dropout, step)?;
                let low = x.broadcast_matmul(&ad.a.as_tensor().t()?)?.broadcast_matmul(&ad.b.as_tensor().t()?)?;
                (y + (low * ad.scale)?)?
            }
            None => y,
        })
    }

    fn norm(&self, kind: OpKind, layer: Option<u32>, x: &Tensor) -> Result<Tensor, WorkerError> {
        let eps = self.cfg.rms_norm_eps;
        match self.weight(kind, layer)? {
            OpWeights::Norm(w) => Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?),
            _ => Err(WorkerError::Weights(format!("{kind} needs a norm weight"))),
        }
    }

    /// Runs one op. `inputs` pairs each input's producer kind with its output tensors.
    pub fn run(
        &mut self,
        kind: OpKind,
        layer: Option<u32>,
        inputs: &[(OpKind, &[Tensor])],
        step: &StepInput,
    ) -> Result<Vec<Tensor>, WorkerError> {
        let one = |want: &[OpKind]| -> Result<&Tensor, WorkerError> {
            inputs
                .iter()
                .find(|(k, _)| want.contains(k))
                .and_then(|(_, t)| t.first())
                .ok_or_else(|| WorkerError::Plan(format!("{kind} lacks an input from {want:?}")))
        };
        let stream_kinds = [OpKind::Embedding, OpKind::MlpResidual, OpKind::AttnResidual];
        Ok(match kind {
            OpKind::Embedding => match self.weight(kind, layer)? {
                OpWeights::Embedding(e) => vec![e.forward(&step.tokens)?],
                OpWeights::QEmbedding(q) => vec![q.embedding(&step.tokens)?.to_dtype(self.dtype)?],
                _ => return Err(WorkerError::Weights("embedding needs its table".into())),
            },
            OpKind::AttnNorm | OpKind::MlpNorm => vec![self.norm(kind, layer, one(&stream_kinds)?)?],
            OpKind::FinalNorm if step.targets.is_some() => vec![self.norm(kind, layer, one(&stream_kinds)?)?],
            OpKind::FinalNorm => {
                // Generation needs each segment's last position only (norms are per position).
                let x = one(&stream_kinds)?;
                let x = match step.segments.len() {
                    1 => x.narrow(1, x.dim(1)? - 1, 1)?,
                    n => {
                        let rows = Tensor::from_vec(step.last_rows(), n, x.device())?;
                        x.index_select(&rows, 1)?
                    }
                };
                vec![self.norm(kind, layer, &x)?]
            }
            OpKind::QProj | OpKind::KProj | OpKind::VProj => {
                vec![self.linear(kind, layer, one(&[OpKind::AttnNorm])?, step)?]
            }
            OpKind::GateProj | OpKind::UpProj => vec![self.linear(kind, layer, one(&[OpKind::MlpNorm])?, step)?],
            OpKind::OProj => vec![self.linear(kind, layer, one(&[OpKind::Attention])?, step)?],
            OpKind::DownProj => vec![self.linear(kind, layer, one(&[OpKind::SiluMul])?, step)?],
            // Training's loss and attention keep what their backward needs: they run in
            // `Executor::forward_train` (backward.rs), never here.
            OpKind::LmHead | OpKind::Attention if step.targets.is_some() => {
                return Err(WorkerError::Plan(format!("{kind} of a training step runs through forward_train")))
            }
            OpKind::LmHead => vec![self.linear(kind, layer, one(&[OpKind::FinalNorm])?, step)?],
            OpKind::Rope => {
                let (q, k) = (one(&[OpKind::QProj])?, one(&[OpKind::KProj])?);
                vec![
                    self.rope(q, self.cfg.num_heads, &step.segments)?,
                    self.rope(k, self.cfg.num_kv_heads, &step.segments)?,
                ]
            }
            OpKind::Attention => {
                let (q, k, v) = attention_inputs(inputs)?;
                let layer = layer.ok_or_else(|| WorkerError::Plan("attention without a layer".into()))?;
                vec![self.attention(q, k, v, layer, step)?]
            }
            OpKind::AttnResidual => {
                let o = one(&[OpKind::OProj])?;
                let stream = one(&[OpKind::Embedding, OpKind::MlpResidual])?;
                vec![(stream + o)?]
            }
            OpKind::MlpResidual => {
                let d = one(&[OpKind::DownProj])?;
                let stream = one(&[OpKind::AttnResidual])?;
                vec![(stream + d)?]
            }
            OpKind::SiluMul => {
                let (g, u) = (one(&[OpKind::GateProj])?, one(&[OpKind::UpProj])?);
                vec![crate::fused::silu_mul(g, u)?]
            }
        })
    }

    /// `[b, s, heads * d]` -> rotated `[b, heads, s, d]`, each segment's tokens at their
    /// absolute positions.
    fn rope(&self, x: &Tensor, heads: u64, segments: &[Seg]) -> Result<Tensor, WorkerError> {
        let (b, s, _) = x.dims3()?;
        let d = self.cfg.head_dim as usize;
        let x = x.reshape((b, s, heads as usize, d))?.transpose(1, 2)?.contiguous()?;
        let max = self.cos.dim(0)?;
        if let Some(end) = segments.iter().map(|g| g.position + g.len).find(|&end| end > max) {
            return Err(WorkerError::Plan(format!("position {end} exceeds the model's {max} positions")));
        }
        let (cos, sin) = match segments {
            [one] => (self.cos.narrow(0, one.position, s)?, self.sin.narrow(0, one.position, s)?),
            _ => {
                let at: Vec<u32> =
                    segments.iter().flat_map(|g| (g.position..g.position + g.len).map(|p| p as u32)).collect();
                let at = Tensor::from_vec(at, s, x.device())?;
                (self.cos.index_select(&at, 0)?, self.sin.index_select(&at, 0)?)
            }
        };
        Ok(candle_nn::rotary_emb::rope(&x, &cos, &sin)?)
    }

    /// Generation's causal, sliding-window attention with grouped KV heads, per segment
    /// against its own request's cache (which it appends to).
    fn attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: u32,
        step: &StepInput,
    ) -> Result<Tensor, WorkerError> {
        let (b, s, _) = v.dims3()?;
        let (d, kvh) = (self.cfg.head_dim as usize, self.cfg.num_kv_heads as usize);
        let v = v.reshape((b, s, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let mut queries = Vec::with_capacity(step.segments.len());
        let mut at = 0;
        for g in &step.segments {
            let part = |t: &Tensor| t.narrow(2, at, g.len);
            self.cache_segment(&part(k)?, &part(&v)?, layer, g)?;
            queries.push(part(q)?);
            at += g.len;
        }
        if let [one] = step.segments.as_slice() {
            return self.attend_segment(q, layer, one);
        }
        // A batch of decode rows: each request's pass over its own cache is too little work
        // to split, so the requests go over the pool side by side (each computed as alone).
        let this = &*self;
        let attend = |i: usize| this.attend_segment(&queries[i], layer, &step.segments[i]);
        let n = step.segments.len();
        let outs: Vec<Tensor> = if self.device.is_cpu() && step.segments.iter().all(|g| g.len <= 4) {
            crate::qmm::pool::map(n, &attend).into_iter().collect::<Result<_, _>>()?
        } else {
            (0..n).map(attend).collect::<Result<_, _>>()?
        };
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// Appends one segment's `k, v [b, kv_heads, s, d]` to its request's cache (or starts it).
    fn cache_segment(&mut self, k: &Tensor, v: &Tensor, layer: u32, g: &Seg) -> Result<(), WorkerError> {
        let window = self.cfg.sliding_window.map(|w| w as usize);
        let key = (g.request, layer);
        match self.kv.get_mut(&key) {
            Some(c) => c.append(k, v, window)?,
            None => {
                let c = KvCache::reusing(k, v, g.position, &mut self.spare)?;
                self.kv.insert(key, c);
            }
        }
        Ok(())
    }

    /// One segment's attention, `q [b, h, s, d]`, over its request's cache.
    fn attend_segment(&self, q: &Tensor, layer: u32, g: &Seg) -> Result<Tensor, WorkerError> {
        let cfg = &self.cfg;
        let groups = (cfg.num_heads / cfg.num_kv_heads) as usize;
        let window = cfg.sliding_window.map(|w| w as usize);
        let c = self
            .kv
            .get(&(g.request, layer))
            .ok_or_else(|| WorkerError::Request(format!("request {} has no KV cache for layer {layer}", g.request)))?;
        let vis = Visibility { q_start: g.position, rows_per_group: g.len, k_start: c.start, window };
        attention_core(q, &c.keys()?, &c.values()?, vis, groups)
    }

    /// Drops a request's caches, keeping their buffers for the next requests.
    pub fn finish(&mut self, request: u64) {
        let layers: Vec<(u64, u32)> = self.kv.keys().filter(|(r, _)| *r == request).copied().collect();
        let keep = SPARE_REQUESTS * self.cfg.num_layers as usize;
        for key in layers {
            if let Some(c) = self.kv.remove(&key) {
                if self.spare.len() < keep {
                    self.spare.push(c);
                }
            }
        }
    }
}

/// Attention's inputs: rotated q and k from the rope op, raw v from v_proj.
pub(crate) fn attention_inputs<'a>(
    inputs: &[(OpKind, &'a [Tensor])],
) -> Result<(&'a Tensor, &'a Tensor, &'a Tensor), WorkerError> {
    let qk = inputs
        .iter()
        .find(|(k, _)| *k == OpKind::Rope)
        .map(|(_, t)| *t)
        .filter(|t| t.len() == 2)
        .ok_or_else(|| WorkerError::Plan("attention lacks rotated q and k".into()))?;
    let v = inputs
        .iter()
        .find(|(k, _)| *k == OpKind::VProj)
        .and_then(|(_, t)| t.first())
        .ok_or_else(|| WorkerError::Plan("attention lacks an input from [VProj]".into()))?;
    Ok((&qk[0], &qk[1], v))
}

/// Materialised-score attention: `q [b, h, s, d]` against `k, v [b, h / groups, kv, d]`
/// with `vis` saying which keys each query sees; returns `[b, s, h * d]`. The query heads
/// of each KV head's group are folded into its rows (`[b, kv_heads, groups * s, d]`), so
/// K and V are never copied per head; scale, mask and softmax are one fused pass
/// ([`masked_softmax`]); on the CPU in f32, [`crate::attend`]'s one-pass kernel computes the
/// same. (`lemur-profile` times exactly this function for the attention curve.)
pub fn attention_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    vis: Visibility,
    groups: usize,
) -> Result<Tensor, WorkerError> {
    if let Some(out) = crate::attend::cpu_attention(q, k, v, vis, groups)? {
        return Ok(out);
    }
    Ok(attention_with_probs(q, k, v, vis, groups)?.0)
}

/// [`attention_core`] and its probabilities `[b, h, s, kv]` (in q's dtype), which training keeps.
pub fn attention_with_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    vis: Visibility,
    groups: usize,
) -> Result<(Tensor, Tensor), WorkerError> {
    let (b, h, s, d) = q.dims4()?;
    let kvh = h / groups.max(1);
    let kv = k.dim(2)?;
    let q = q.contiguous()?.reshape((b, kvh, groups * s, d))?;
    let scores = q.matmul(&k.t()?)?; // [b, kv_heads, groups * s, kv]
    let probs = masked_softmax(&scores, 1.0 / (d as f64).sqrt(), Visibility { rows_per_group: s, ..vis })?;
    let out = probs.matmul(v)?.reshape((b, h, s, d))?; // [b, h, s, d]
    Ok((out.transpose(1, 2)?.reshape((b, s, h * d))?, probs.reshape((b, h, s, kv))?))
}

/// Rotary tables `[max_positions, head_dim / 2]`, computed as candle-transformers does.
pub fn rope_tables(cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor), WorkerError> {
    let dim = cfg.head_dim as usize;
    let max = cfg.max_position_embeddings as usize;
    let theta = cfg.rope_theta as f32;
    let inv: Vec<f32> = (0..dim).step_by(2).map(|i| 1f32 / theta.powf(i as f32 / dim as f32)).collect();
    let n = inv.len();
    let inv = Tensor::from_vec(inv, (1, n), device)?.to_dtype(dtype)?;
    let t = Tensor::arange(0u32, max as u32, device)?.to_dtype(dtype)?.reshape((max, 1))?;
    let freqs = t.matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// `[b, kv_heads, s, d]` -> `[b, kv_heads * groups, s, d]`, each KV head repeated for its group.
pub fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor, WorkerError> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4()?;
    Ok(Tensor::cat(&vec![x; groups], 2)?.reshape((b, h * groups, s, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K and V `[1, 1, n, 2]` whose entries are their absolute positions.
    fn positions(from: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (from..from + n).flat_map(|p| [p as f32, -(p as f32)]).collect();
        Tensor::from_vec(v, (1, 1, n, 2), &Device::Cpu).unwrap()
    }

    /// A new request's cache in a finished one's buffers holds exactly its own positions
    /// (the old ones past its length are never seen) and grows as a fresh one does; a
    /// buffer of another shape is left in the spare list.
    #[test]
    fn a_reused_cache_buffer_holds_only_the_new_requests_keys() {
        let old = KvCache::new(&positions(0, 40), &positions(0, 40), 0).unwrap();
        let odd = KvCache::new(
            &Tensor::zeros((1, 2, 4, 2), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::zeros((1, 2, 4, 2), DType::F32, &Device::Cpu).unwrap(),
            0,
        )
        .unwrap();
        let mut spare = vec![odd, old];
        let mut c = KvCache::reusing(&positions(500, 3), &positions(500, 3), 500, &mut spare).unwrap();
        assert_eq!(spare.len(), 1, "the matching buffer was taken");
        assert_eq!(spare[0].k.dims4().unwrap().1, 2, "the other shape stays");
        for p in 503..800 {
            c.append(&positions(p, 1), &positions(p, 1), None).unwrap();
        }
        let k: Vec<f32> = c.keys().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = (500..800).flat_map(|p| [p as f32, -(p as f32)]).collect();
        assert_eq!(k, want);
        assert_eq!((c.start, c.len()), (500, 300));
    }

    #[test]
    fn kv_cache_appends_in_place_grows_and_compacts_to_the_window() {
        for window in [None, Some(5usize), Some(300)] {
            let mut c = KvCache::new(&positions(10, 3), &positions(10, 3), 10).unwrap();
            let mut next = 13;
            for step in 0..700 {
                let n = if step % 50 == 0 { 7 } else { 1 };
                c.append(&positions(next, n), &positions(next, n), window).unwrap();
                next += n;
                assert_eq!(c.start + c.len(), next, "window {window:?}");
                if let Some(w) = window {
                    assert!(c.len() >= w.min(next - 10), "the window's keys are kept");
                } else {
                    assert_eq!(c.start, 10);
                }
                let k: Vec<f32> = c.keys().unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let want: Vec<f32> = (c.start..next).flat_map(|p| [p as f32, -(p as f32)]).collect();
                assert_eq!(k, want);
            }
            // A windowed cache stays bounded.
            if let Some(w) = window {
                assert!(c.k.dim(2).unwrap() <= w + 2 * KV_CHUNK + 7, "capacity {}", c.k.dim(2).unwrap());
            }
        }
    }
}
