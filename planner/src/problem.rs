//! A planning instance: the machines, the workload's phases with their op graphs and cost
//! tables, the colocation units, the tensors that may cross links, and the objective.

use lemur_protocol::{DType, LinkProfile, MachineProfile, ModelConfig, OpKind, Phase, WeightFormat};

use crate::cost::{CostError, CostModel, CostTable};
use crate::graph::{EdgeKind, Finetune, OpGraph, Precision, Workload};
use crate::profiles::{find_link, ProfileError};

/// What the placement minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// One request (inference: TTFT + gen_tokens x TPOT + KV handover) or one training
    /// step of one micro-batch, executed in order: op times plus every crossing paid.
    Latency,
    /// Pipelined work: the busiest resource (a machine's compute or a machine's incoming link).
    Throughput,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Latency => "latency",
            Objective::Throughput => "throughput",
        }
    }
}

/// The work to plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// A prompt of `prompt` tokens, then `gen_tokens` generated, for `batch` sequences.
    Infer { prompt: u64, gen_tokens: u64, batch: u64 },
    /// Training steps over `batch` sequences of `seq` tokens per micro-batch; `micro_batches`
    /// in flight bound the activations each machine keeps for backward (1F1B).
    Train { seq: u64, batch: u64, finetune: Finetune, micro_batches: u64 },
}

/// One machine of the cluster. Several machines may share a profile; names are unique.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Unique within the cluster: the profile name, with `#2`, `#3` for repeats.
    pub name: String,
    pub profile: MachineProfile,
}

/// A tensor that may have to cross a link: produced by `producer`, read by `consumers`
/// (ids in the same phase graph), `bytes` long. Sent once to every other machine that
/// runs a consumer.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub producer: usize,
    pub consumers: Vec<usize>,
    pub bytes: u64,
}

/// One phase: its graph, costs, units and tensors.
#[derive(Debug, Clone)]
pub struct PhaseData {
    pub phase_name: &'static str,
    pub graph: OpGraph,
    pub costs: CostTable,
    /// How many times the phase runs per objective unit (decode: once per generated token).
    pub weight: f64,
    /// `unit[op]`: the colocation group of each op (a training op and its backward share one).
    pub unit_of: Vec<usize>,
    /// Ops of each unit.
    pub units: Vec<Vec<usize>>,
    pub tensors: Vec<Tensor>,
}

impl PhaseData {
    /// Seconds of `unit` on machine `m`.
    pub fn unit_time(&self, unit: usize, m: usize) -> f64 {
        self.units[unit].iter().map(|&o| self.costs.at(o, m)).sum()
    }
}

/// Everything the solvers need.
#[derive(Debug, Clone)]
pub struct Instance {
    pub model: ModelConfig,
    pub dtype: DType,
    /// How the weights are stored (dense in `dtype`, or quantized).
    pub weights: WeightFormat,
    pub mode: Mode,
    pub objective: Objective,
    pub machines: Vec<Machine>,
    pub links: Vec<LinkProfile>,
    /// Seconds per byte and fixed seconds for a transfer from machine a to machine b.
    pub link_cost: Vec<Vec<(f64, f64)>>,
    pub phases: Vec<PhaseData>,
    /// Training: saved activations are multiplied by at most this many micro-batches in
    /// flight (the ILP assumes all of them; the evaluator counts the stages a placement uses).
    pub inflight: u64,
    /// Inference: bytes of prompt KV cache of each decode attention op, for the handover.
    pub handover_bytes: Vec<(usize, u64)>,
    /// Scratch every machine that runs ops keeps free: training over a quantized base
    /// dequantizes one linear op's weight at a time (the largest such weight); 0 otherwise.
    pub workspace_bytes: u64,
}

/// Why an instance could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Cost(#[from] CostError),
    #[error("the cluster has no machines")]
    NoMachines,
    #[error("invalid workload: {0}")]
    Workload(String),
}

impl Instance {
    /// Builds the instance: graphs for each phase, every op priced on every machine.
    pub fn new(
        cost: &impl CostModel,
        model: &ModelConfig,
        precision: impl Into<Precision>,
        mode: Mode,
        objective: Objective,
        profiles: &[MachineProfile],
        links: &[LinkProfile],
    ) -> Result<Self, InstanceError> {
        let precision = precision.into();
        let (dtype, weights) = (precision.activations, precision.weights);
        if profiles.is_empty() {
            return Err(InstanceError::NoMachines);
        }
        let mut machines: Vec<Machine> = Vec::new();
        for p in profiles {
            let n = machines.iter().filter(|m| m.profile.name == p.name).count();
            let name = if n == 0 { p.name.clone() } else { format!("{}#{}", p.name, n + 1) };
            machines.push(Machine { name, profile: p.clone() });
        }
        let k = machines.len();
        let mut link_cost = vec![vec![(0.0, 0.0); k]; k];
        for a in 0..k {
            for b in 0..k {
                if a != b {
                    let l = find_link(links, &machines[a].profile.name, &machines[b].profile.name)?;
                    link_cost[a][b] = (1.0 / (l.bandwidth_gbps * 1e9), l.latency_us * 1e-6);
                }
            }
        }
        let refs: Vec<&MachineProfile> = machines.iter().map(|m| &m.profile).collect();
        let positive = |what: &str, v: u64| {
            if v == 0 {
                Err(InstanceError::Workload(format!("{what} must be positive")))
            } else {
                Ok(())
            }
        };
        let mut phases = Vec::new();
        let mut handover_bytes = Vec::new();
        let inflight;
        match &mode {
            Mode::Infer { prompt, gen_tokens, batch } => {
                positive("the prompt length", *prompt)?;
                positive("the batch", *batch)?;
                let context = prompt.checked_add(*gen_tokens).filter(|&c| c <= model.max_position_embeddings);
                let Some(context) = context else {
                    return Err(InstanceError::Workload(format!(
                        "prompt ({prompt}) + generated tokens ({gen_tokens}) exceeds the model's {} positions",
                        model.max_position_embeddings
                    )));
                };
                fits_in_sizes(model, dtype, *batch, context)?;
                let pre = OpGraph::build(
                    model,
                    precision,
                    Workload::Prefill { batch: *batch, seq: *prompt, context: *prompt },
                );
                // Decode is priced at the average context length of the generation.
                let kv_len = prompt + gen_tokens / 2;
                let mut dec = OpGraph::build(model, precision, Workload::Decode { batch: *batch, kv_len });
                // The decode phase's KV cache holds the whole context.
                let full =
                    OpGraph::build(model, precision, Workload::Decode { batch: *batch, kv_len: context.max(1) - 1 });
                for (id, op) in full.ops() {
                    let kv = op.kv_cache_bytes;
                    dec.graph[petgraph::graph::NodeIndex::new(id)].kv_cache_bytes = kv;
                }
                for (id, op) in pre.ops() {
                    if op.kind == OpKind::Attention {
                        handover_bytes.push((id, op.kv_cache_bytes));
                    }
                }
                phases.push(PhaseData::new(cost, "prefill", pre, &refs, 1.0, false)?);
                if *gen_tokens > 0 {
                    phases.push(PhaseData::new(cost, "decode", dec, &refs, *gen_tokens as f64, true)?);
                }
                inflight = 1;
            }
            Mode::Train { seq, batch, finetune, micro_batches } => {
                positive("the sequence length", *seq)?;
                positive("the batch", *batch)?;
                positive("the number of micro-batches", *micro_batches)?;
                if *seq > model.max_position_embeddings {
                    return Err(InstanceError::Workload(format!(
                        "the sequence length ({seq}) exceeds the model's {} positions",
                        model.max_position_embeddings
                    )));
                }
                fits_in_sizes(model, dtype, batch.saturating_mul(*micro_batches), *seq)?;
                if let Finetune::Lora(l) = finetune {
                    let widest = model.hidden_size.min(model.intermediate_size);
                    if l.rank == 0 || l.rank > widest {
                        return Err(InstanceError::Workload(format!(
                            "the LoRA rank must be between 1 and {widest} (the model's narrowest projection), not {}",
                            l.rank
                        )));
                    }
                    if l.targets.is_empty() {
                        return Err(InstanceError::Workload("LoRA needs at least one target projection".into()));
                    }
                }
                if weights.is_quantized() && *finetune == Finetune::Full {
                    return Err(InstanceError::Workload(format!(
                        "full fine-tuning updates every weight, which {weights} weights cannot hold: \
                         fine-tune LoRA adapters over them (--lora), or plan dense weights"
                    )));
                }
                let g = OpGraph::build(
                    model,
                    precision,
                    Workload::Train { batch: *batch, seq: *seq, finetune: finetune.clone() },
                );
                phases.push(PhaseData::new(cost, "train", g, &refs, 1.0, false)?);
                // 1F1B keeps at most one micro-batch per pipeline stage in flight; a
                // latency plan runs them one at a time.
                inflight = match objective {
                    Objective::Throughput => (*micro_batches).min(k as u64),
                    Objective::Latency => 1,
                };
            }
        }
        let workspace_bytes = phases
            .iter()
            .flat_map(|ph| ph.graph.ops().flat_map(|(_, op)| op.kernels.iter()))
            .filter(|k| {
                matches!(k, crate::graph::Kernel::Elementwise { class: crate::graph::EwClass::Dequantize(_), .. })
            })
            .map(crate::graph::Kernel::bytes_written)
            .max()
            .unwrap_or(0);
        Ok(Self {
            workspace_bytes,
            model: model.clone(),
            dtype,
            weights,
            mode,
            objective,
            machines,
            links: links.to_vec(),
            link_cost,
            phases,
            inflight,
            handover_bytes,
        })
    }

    pub fn num_machines(&self) -> usize {
        self.machines.len()
    }

    /// Seconds to move `bytes` from machine `a` to `b`.
    pub fn transfer_s(&self, a: usize, b: usize, bytes: u64) -> f64 {
        let (per_byte, fixed) = self.link_cost[a][b];
        fixed + per_byte * bytes as f64
    }

    /// The most a transfer of `bytes` into machine `b` can cost, over every source
    /// (the ILP's price for a crossing into `b`; exact when links are uniform).
    pub fn ingress_s(&self, b: usize, bytes: u64) -> f64 {
        (0..self.num_machines()).filter(|&a| a != b).map(|a| self.transfer_s(a, b, bytes)).fold(0.0, f64::max)
    }

    /// Whether op `op` of phase `p` may run on machine `m` (its largest tensor fits one allocation).
    pub fn allowed(&self, p: usize, op: usize, m: usize) -> bool {
        largest_tensor(&self.phases[p].graph, op) <= self.machines[m].profile.memory.max_alloc_bytes
    }

    /// Whether `unit` of phase `p` may run on machine `m`.
    pub fn unit_allowed(&self, p: usize, unit: usize, m: usize) -> bool {
        self.phases[p].units[unit].iter().all(|&o| self.allowed(p, o, m))
    }
}

/// The largest single buffer an op needs: a weight matrix, its output, one of K or V of the
/// cache, or attention's materialised scores.
pub fn largest_tensor(g: &OpGraph, op: usize) -> u64 {
    let o = g.op(op);
    let mut biggest = o.weight_bytes.max(o.kv_cache_bytes / 2);
    for k in &o.kernels {
        biggest = biggest.max(k.bytes_written());
        if let crate::graph::Kernel::Attention { bh, q_len, kv_len, dtype, .. } = *k {
            biggest = biggest.max(bh * q_len * kv_len * dtype.bytes());
        }
    }
    biggest
}

impl PhaseData {
    fn new(
        cost: &impl CostModel,
        name: &'static str,
        graph: OpGraph,
        machines: &[&MachineProfile],
        weight: f64,
        feedback: bool,
    ) -> Result<Self, CostError> {
        let costs = CostTable::new(cost, graph.ops().map(|(_, o)| o), machines)?;
        // Units: a backward op joins its forward op (weights do not move).
        let n = graph.len();
        let mut unit_of = vec![usize::MAX; n];
        let mut units: Vec<Vec<usize>> = Vec::new();
        for (id, op) in graph.ops() {
            match op.forward_of {
                Some(f) if op.phase == Phase::Backward => {
                    unit_of[id] = unit_of[f];
                    units[unit_of[f]].push(id);
                }
                _ => {
                    unit_of[id] = units.len();
                    units.push(vec![id]);
                }
            }
        }
        let mut tensors = Vec::new();
        for (id, _) in graph.ops() {
            let mut consumers = Vec::new();
            let mut bytes = 0;
            for e in graph.graph.edges_directed(petgraph::graph::NodeIndex::new(id), petgraph::Direction::Outgoing) {
                use petgraph::visit::EdgeRef;
                if e.weight().kind == EdgeKind::Saved {
                    continue;
                }
                consumers.push(e.target().index());
                bytes = bytes.max(e.weight().bytes);
            }
            if !consumers.is_empty() {
                tensors.push(Tensor { producer: id, consumers, bytes });
            }
        }
        if feedback {
            // Decode loops: the sampled token (one id per sequence) goes back to the embedding.
            let head = graph.ops().find(|(_, o)| o.kind == OpKind::LmHead).map(|(i, _)| i);
            let emb = graph.ops().find(|(_, o)| o.kind == OpKind::Embedding).map(|(i, _)| i);
            if let (Some(h), Some(e)) = (head, emb) {
                let batch = match graph.workload {
                    Workload::Decode { batch, .. } => batch,
                    _ => 1,
                };
                tensors.push(Tensor { producer: h, consumers: vec![e], bytes: 4 * batch });
            }
        }
        Ok(Self { phase_name: name, graph, costs, weight, unit_of, units, tensors })
    }
}

/// Whether the largest tensors of a workload (`tokens` = batch x context rows of logits,
/// MLP activations and KV) have byte counts that fit in a u64 with room to add them up:
/// a user's batch or length near u64::MAX is an error here, not a wrapped size later.
fn fits_in_sizes(model: &ModelConfig, dtype: DType, batch: u64, context: u64) -> Result<(), InstanceError> {
    let widest = model.vocab_size.max(model.intermediate_size).max(model.hidden_size);
    let bytes = batch
        .checked_mul(context)
        .and_then(|t| t.checked_mul(widest))
        .and_then(|e| e.checked_mul(dtype.bytes().max(4)))
        .and_then(|b| b.checked_mul(4 * model.num_layers.max(1)));
    match bytes {
        Some(b) if b < 1 << 62 => Ok(()),
        _ => Err(InstanceError::Workload(format!(
            "a batch of {batch} x {context} tokens is too large to size (its tensors would exceed 2^62 bytes)"
        ))),
    }
}
