//! The model's op graph (petgraph): prefill, decode and training (forward + backward) at sub-layer granularity.
//!
//! Every op records the work it does as a list of [`Kernel`]s (what the cost model prices)
//! and the aggregates the placement needs: FLOPs, bytes read and written, resident weight
//! bytes, activations saved for backward, optimizer state and KV cache. Every edge records
//! the bytes of the tensor it moves. Node indices are op ids and are in execution order.

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use lemur_protocol::{DType, ModelConfig, OpKind, Phase, WeightFormat};

mod build;
use build::Builder;

/// An element-wise (memory-bound) kernel family; the cost model decides how many
/// launches and passes over memory each family takes on a machine's kernel style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EwClass {
    /// Table lookup: embedding rows gathered into the residual stream.
    Gather,
    RmsNorm,
    Rope,
    SiluMul,
    Add,
    /// Summing the query heads' dK and dV back onto their KV head (grouped-query
    /// attention's backward).
    RepeatKv,
    /// Softmax cross-entropy over the logits (training only).
    CrossEntropy,
    /// Softmax backward over materialised attention scores.
    SoftmaxBackward,
    /// A whole weight stored in a block format expanded to the run's dtype (training over
    /// a quantized base: each linear op's forward and input gradient).
    Dequantize(WeightFormat),
}

/// One kernel's worth of work, the unit the cost model prices.
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    /// `batch` independent (m x k) . (k x n) products; `weight_bytes` of the operands are
    /// parameters, stored in block format `quant` (the quantized kernels run) or dense.
    Gemm { batch: u64, m: u64, n: u64, k: u64, dtype: DType, weight_bytes: u64, quant: Option<WeightFormat> },
    /// Materialised-score attention: `bh` (batch x heads) products of `q_len` queries against
    /// `kv_len` keys of width `head_dim`; FLOPs = 4 bh q_len kv_len head_dim (QK^T and PV),
    /// times `gemms / 2` (the backward pass runs four such products).
    Attention { bh: u64, q_len: u64, kv_len: u64, head_dim: u64, gemms: u64, dtype: DType, read_bytes: u64 },
    /// Element-wise work with its minimal (fused) traffic.
    Elementwise { class: EwClass, backward: bool, read_bytes: u64, write_bytes: u64 },
}

impl Kernel {
    pub fn flops(&self) -> u64 {
        match *self {
            Kernel::Gemm { batch, m, n, k, .. } => 2 * batch * m * n * k,
            Kernel::Attention { bh, q_len, kv_len, head_dim, gemms, .. } => 2 * gemms * bh * q_len * kv_len * head_dim,
            Kernel::Elementwise { .. } => 0,
        }
    }

    /// Bytes read: (weights, activations).
    pub fn bytes_read(&self) -> (u64, u64) {
        match *self {
            // With parameters as the (k x n) operand, those bytes are the weights' as stored
            // (quantized or not); the activations are the (m x k) operand.
            Kernel::Gemm { batch, m, k, dtype, weight_bytes, .. } if weight_bytes > 0 => {
                (weight_bytes, batch * m * k * dtype.bytes())
            }
            Kernel::Gemm { batch, m, n, k, dtype, .. } => (0, batch * (m * k + k * n) * dtype.bytes()),
            Kernel::Attention { read_bytes, .. } => (0, read_bytes),
            Kernel::Elementwise { class: EwClass::Gather | EwClass::Dequantize(_), read_bytes, .. } => (read_bytes, 0),
            Kernel::Elementwise { read_bytes, .. } => (0, read_bytes),
        }
    }

    pub fn bytes_written(&self) -> u64 {
        match *self {
            Kernel::Gemm { batch, m, n, dtype, .. } => batch * m * n * dtype.bytes(),
            Kernel::Attention { bh, q_len, head_dim, gemms, dtype, .. } => {
                // Forward writes the context (q_len x head_dim per head); backward writes dQ, dK, dV.
                let outputs = if gemms > 2 { 3 } else { 1 };
                outputs * bh * q_len * head_dim * dtype.bytes()
            }
            Kernel::Elementwise { write_bytes, .. } => write_bytes,
        }
    }
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    /// Decoder layer, or `None` for the embedding, final norm and lm head.
    pub layer: Option<u32>,
    pub phase: Phase,
    /// For a backward op, the id of its forward op.
    pub forward_of: Option<usize>,
    pub kernels: Vec<Kernel>,
    pub flops: u64,
    pub weight_read_bytes: u64,
    pub act_read_bytes: u64,
    pub act_write_bytes: u64,
    /// Parameter bytes that must be resident where this op runs.
    pub weight_bytes: u64,
    /// Activations this (forward) op keeps alive until its backward runs.
    pub saved_bytes: u64,
    /// Gradients and optimizer state of the trainable parameters this op owns.
    pub optimizer_bytes: u64,
    /// KV cache this op owns (attention).
    pub kv_cache_bytes: u64,
}

impl Op {
    fn new(kind: OpKind, layer: Option<u32>, phase: Phase, kernels: Vec<Kernel>) -> Self {
        let mut op = Self {
            kind,
            layer,
            phase,
            forward_of: None,
            kernels,
            flops: 0,
            weight_read_bytes: 0,
            act_read_bytes: 0,
            act_write_bytes: 0,
            weight_bytes: 0,
            saved_bytes: 0,
            optimizer_bytes: 0,
            kv_cache_bytes: 0,
        };
        op.push_kernels(Vec::new());
        op
    }

    /// Appends kernels and recomputes the FLOP and byte totals.
    fn push_kernels(&mut self, more: Vec<Kernel>) {
        self.kernels.extend(more);
        self.flops = self.kernels.iter().map(Kernel::flops).sum();
        let (mut wr, mut ar, mut aw) = (0, 0, 0);
        for k in &self.kernels {
            let (w, a) = k.bytes_read();
            wr += w;
            ar += a;
            aw += k.bytes_written();
        }
        (self.weight_read_bytes, self.act_read_bytes, self.act_write_bytes) = (wr, ar, aw);
    }

    /// Bytes this op keeps resident besides weights: optimizer state, activations saved for
    /// backward (once per micro-batch in flight) and KV cache.
    pub fn state_bytes(&self, inflight: u64) -> u64 {
        self.optimizer_bytes + self.saved_bytes * inflight + self.kv_cache_bytes
    }

    /// Position of the op's block in the model: 0 embedding, 1..=L layers, L+1 the head.
    pub fn block(&self, num_layers: u64) -> u32 {
        match (self.kind, self.layer) {
            (OpKind::Embedding, _) => 0,
            (_, Some(l)) => l + 1,
            _ => num_layers as u32 + 1,
        }
    }

    /// A readable label: `L3.q_proj`, `lm_head`, `L3.q_proj'` for a backward op.
    pub fn label(&self) -> String {
        let tick = if self.phase == Phase::Backward { "'" } else { "" };
        match self.layer {
            Some(l) => format!("L{l}.{}{tick}", self.kind),
            None => format!("{}{tick}", self.kind),
        }
    }
}

/// What an edge carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKind {
    Activation,
    Gradient,
    /// Tensors a forward op keeps for its own backward op (always on the same machine).
    Saved,
}

/// One edge: a tensor moving from producer to consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    pub bytes: u64,
    pub kind: EdgeKind,
}

/// How a training run updates the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Finetune {
    /// Every parameter is trained (mixed precision AdamW).
    Full,
    Lora(LoraSpec),
}

/// Low-rank adapters: which projections carry them and of what rank.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: u64,
    pub targets: Vec<OpKind>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self { rank: lemur_protocol::DEFAULT_LORA_RANK, targets: vec![OpKind::QProj, OpKind::VProj] }
    }
}

/// What the graph computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// The prompt: `seq` tokens for each of `batch` sequences. `context` is the KV cache
    /// the attention ops must hold (prompt plus generated tokens).
    Prefill { batch: u64, seq: u64, context: u64 },
    /// One new token per sequence against a KV cache of `kv_len` tokens.
    Decode { batch: u64, kv_len: u64 },
    /// Forward and backward over `batch` sequences of `seq` tokens.
    Train { batch: u64, seq: u64, finetune: Finetune },
}

/// The op graph of one workload of one model.
/// The numbers a graph is built in: activations (and dense weights) in `activations`,
/// weights stored as `weights` (dense, or a GGUF block format).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Precision {
    pub activations: DType,
    pub weights: WeightFormat,
}

impl From<DType> for Precision {
    fn from(activations: DType) -> Self {
        Self { activations, weights: WeightFormat::Dense }
    }
}

#[derive(Debug, Clone)]
pub struct OpGraph {
    pub model: ModelConfig,
    pub dtype: DType,
    pub weights: WeightFormat,
    pub workload: Workload,
    pub graph: DiGraph<Op, Edge>,
}

/// Bytes per trainable parameter for gradients and AdamW state in mixed precision:
/// a gradient in the model's dtype, an f32 master copy, and f32 first and second moments.
pub fn full_ft_state_bytes(dtype: DType) -> u64 {
    dtype.bytes() + 4 + 4 + 4
}

/// Bytes per LoRA parameter: the f32 parameter itself, its f32 gradient and two f32 moments.
pub const LORA_STATE_BYTES: u64 = 16;

impl OpGraph {
    pub fn ops(&self) -> impl Iterator<Item = (usize, &Op)> {
        self.graph.node_indices().map(|i| (i.index(), &self.graph[i]))
    }

    pub fn op(&self, id: usize) -> &Op {
        &self.graph[NodeIndex::new(id)]
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Every edge as (producer id, consumer id, edge).
    pub fn edges(&self) -> impl Iterator<Item = (usize, usize, Edge)> + '_ {
        self.graph.edge_references().map(|e| (e.source().index(), e.target().index(), *e.weight()))
    }

    pub fn predecessors(&self, id: usize) -> impl Iterator<Item = usize> + '_ {
        self.graph.neighbors_directed(NodeIndex::new(id), Direction::Incoming).map(NodeIndex::index)
    }

    /// Total FLOPs over all ops.
    pub fn total_flops(&self) -> u64 {
        self.ops().map(|(_, o)| o.flops).sum()
    }

    /// Builds the graph for a workload.
    pub fn build(model: &ModelConfig, precision: impl Into<Precision>, workload: Workload) -> Self {
        let Precision { activations: dtype, weights } = precision.into();
        let mut b = Builder { m: model, dt: dtype, wf: weights, g: DiGraph::new() };
        match &workload {
            Workload::Prefill { batch, seq, context } => {
                b.forward(Phase::Prefill, *batch, *seq, *seq, *context, None);
            }
            Workload::Decode { batch, kv_len } => {
                let attend = kv_len + 1;
                let visible = model.sliding_window.map_or(attend, |w| attend.min(w));
                b.forward(Phase::Decode, *batch, 1, visible, attend, None);
            }
            Workload::Train { batch, seq, finetune } => {
                let fwd = b.forward(Phase::Forward, *batch, *seq, *seq, 0, Some(finetune));
                b.backward(&fwd, *batch, *seq, finetune);
            }
        }
        Self { model: model.clone(), dtype, weights, workload, graph: b.g }
    }
}

/// (input features, output features) of a linear op ([`ModelConfig::linear_dims`]).
pub fn linear_dims(m: &ModelConfig, kind: OpKind) -> (u64, u64) {
    m.linear_dims(kind)
}
