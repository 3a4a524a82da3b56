//! The plan file: what workers execute and users inspect. Complete and self-describing:
//! the model, the machines with their profiles, every op with its machine and its predicted
//! cost everywhere, every edge, the objective with its proof (bound, gap), and the baselines.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{DType, LinkProfile, MachineProfile, ModelConfig, OpKind, Phase};

/// The plan format this build reads and writes.
pub const PLAN_FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub format_version: u32,
    pub model: ModelConfig,
    pub dtype: DType,
    pub workload: PlanWorkload,
    pub machines: Vec<PlanMachine>,
    pub links: Vec<LinkProfile>,
    pub ops: Vec<PlanOp>,
    pub edges: Vec<PlanEdge>,
    /// `latency` or `throughput`.
    pub objective: String,
    /// The objective's predicted value, milliseconds.
    pub objective_ms: f64,
    /// A proven lower bound on the objective, milliseconds.
    pub bound: f64,
    /// (objective - bound) / objective.
    pub gap: f64,
    pub solve_seconds: f64,
    pub predicted: Predicted,
    pub baselines: Vec<PlanBaseline>,
}

/// What was planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanWorkload {
    pub mode: WorkloadMode,
    /// Prompt length (infer) or sequence length (train).
    pub seq: u64,
    pub batch: u64,
    /// Tokens generated (infer).
    pub gen_tokens: u64,
    /// What training updates (train).
    pub finetune: Option<FinetuneKind>,
    pub lora_rank: Option<u64>,
    pub lora_targets: Option<Vec<OpKind>>,
    pub micro_batches: u64,
    /// Training: micro-batches in flight at once (`micro_batches` for GPipe; the stages
    /// the placement uses for 1F1B), as the planner's memory check assumed. Absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inflight: Option<u64>,
    /// How the weights were assumed stored (dense in the plan's dtype, or quantized).
    #[serde(default)]
    pub weights: crate::WeightFormat,
}

/// What a plan runs: generation, or fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadMode {
    /// Prefill a prompt, then decode tokens.
    Infer,
    /// Forward and backward over training sequences.
    Train,
}

impl WorkloadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadMode::Infer => "infer",
            WorkloadMode::Train => "train",
        }
    }
}

impl std::fmt::Display for WorkloadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What fine-tuning updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneKind {
    /// Every weight.
    Full,
    /// Low-rank adapters on some projections; the base weights stay frozen.
    Lora,
}

impl std::fmt::Display for FinetuneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FinetuneKind::Full => "full",
            FinetuneKind::Lora => "lora",
        })
    }
}

/// The LoRA rank when nothing says otherwise (PEFT's common choice, `lemur-plan --lora-rank`'s default).
pub const DEFAULT_LORA_RANK: u64 = 16;

impl PlanWorkload {
    /// The LoRA rank of a LoRA training plan ([`DEFAULT_LORA_RANK`] if the plan omits it).
    pub fn lora_rank_or_default(&self) -> u64 {
        self.lora_rank.unwrap_or(DEFAULT_LORA_RANK)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanMachine {
    /// Unique within the plan (`m5-pro`, `m5-pro#2`).
    pub name: String,
    pub profile: MachineProfile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanOp {
    pub id: usize,
    pub layer: Option<u32>,
    pub kind: OpKind,
    pub phase: Phase,
    /// The machine it runs on (a name from `machines`).
    pub machine: String,
    /// For a backward op, the id of its forward op.
    #[serde(default)]
    pub forward_of: Option<usize>,
    /// Predicted milliseconds on every machine.
    pub costs_ms: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanEdge {
    pub from: usize,
    pub to: usize,
    pub bytes: u64,
    /// Link time if the edge crosses machines in this plan, else 0.
    pub cost_ms: f64,
}

pub use crate::plan_set::{PlanBucket, PlanSet, Switching};

/// Predicted figures of the chosen placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicted {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub step_ms: Option<f64>,
    pub handover_ms: f64,
    pub handover_bytes: u64,
    pub per_machine: Vec<MachineUse>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineUse {
    pub machine: String,
    /// Compute per phase run (prefill, decode step, or training micro-batch), milliseconds.
    pub compute_ms: BTreeMap<String, f64>,
    pub memory_bytes: u64,
    pub memory_capacity_bytes: u64,
    /// Bytes received per phase run.
    pub ingress_bytes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBaseline {
    pub name: String,
    /// The baseline's objective in milliseconds, or `None` if it does not fit.
    pub predicted_ms: Option<f64>,
    /// Why it cannot run, if it cannot.
    pub infeasible: Option<String>,
}

/// A plan that cannot be executed, with the op or field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("plan format {found} is not supported (this build reads {PLAN_FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("op {id}: {problem}")]
    Op { id: usize, problem: String },
    #[error("edge {from} -> {to}: {problem}")]
    Edge { from: usize, to: usize, problem: String },
    #[error("{0}")]
    Other(String),
}

impl Plan {
    /// Checks that the plan can be executed: supported version, unique machines, every op
    /// placed exactly once on a known machine, backward ops with their forward ops, and
    /// edges that join existing ops in execution order within a phase.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.format_version != PLAN_FORMAT_VERSION {
            return Err(PlanError::Version { found: self.format_version });
        }
        self.model.validate().map_err(|e| PlanError::Other(format!("model: {e}")))?;
        let mut names = BTreeSet::new();
        for m in &self.machines {
            if !names.insert(m.name.as_str()) {
                return Err(PlanError::Other(format!("machine `{}` is listed twice", m.name)));
            }
            m.profile.validate().map_err(|e| PlanError::Other(format!("machine `{}`: {e}", m.name)))?;
        }
        let mut by_id: BTreeMap<usize, &PlanOp> = BTreeMap::new();
        for op in &self.ops {
            if by_id.insert(op.id, op).is_some() {
                return Err(PlanError::Op { id: op.id, problem: "is placed more than once".into() });
            }
            if !names.contains(op.machine.as_str()) {
                return Err(PlanError::Op {
                    id: op.id,
                    problem: format!(
                        "runs on unknown machine `{}` (the plan's machines: {})",
                        op.machine,
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        for (expect, &id) in by_id.keys().enumerate() {
            if id != expect {
                return Err(PlanError::Op { id: expect, problem: "is missing (op ids must be 0..n)".into() });
            }
        }
        for op in &self.ops {
            if let Some(f) = op.forward_of {
                let fwd = by_id.get(&f).ok_or_else(|| PlanError::Op {
                    id: op.id,
                    problem: format!("is the backward of op {f}, which does not exist"),
                })?;
                if fwd.machine != op.machine {
                    return Err(PlanError::Op {
                        id: op.id,
                        problem: format!(
                            "is the backward of op {f} but runs on `{}`, not `{}` where its weights are",
                            op.machine, fwd.machine
                        ),
                    });
                }
            }
        }
        for e in &self.edges {
            let (Some(a), Some(b)) = (by_id.get(&e.from), by_id.get(&e.to)) else {
                return Err(PlanError::Edge {
                    from: e.from,
                    to: e.to,
                    problem: "names an op that does not exist".into(),
                });
            };
            if e.from >= e.to {
                return Err(PlanError::Edge { from: e.from, to: e.to, problem: "goes against execution order".into() });
            }
            let phase_group = |p: Phase| matches!(p, Phase::Forward | Phase::Backward);
            if a.phase != b.phase && !(phase_group(a.phase) && phase_group(b.phase)) {
                return Err(PlanError::Edge {
                    from: e.from,
                    to: e.to,
                    problem: format!("joins a {} op to a {} op", a.phase, b.phase),
                });
            }
        }
        Ok(())
    }

    /// Parses and validates a plan from JSON.
    pub fn from_json(text: &str) -> Result<Self, PlanError> {
        let plan: Plan = serde_json::from_str(text).map_err(|e| PlanError::Other(format!("not a plan: {e}")))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Moves every op to machine number `rule(op)` (an index into `machines`), keeping the
    /// edges' link costs in step; for hand-made splits in tests, examples and benchmarks.
    /// The caller validates the result.
    pub fn reassign(&mut self, rule: impl Fn(&PlanOp) -> usize) {
        let names: Vec<String> = self.machines.iter().map(|m| m.name.clone()).collect();
        for op in self.ops.iter_mut() {
            let m = rule(op).min(names.len().saturating_sub(1));
            op.machine = names[m].clone();
        }
        let machine_of: BTreeMap<usize, String> = self.ops.iter().map(|o| (o.id, o.machine.clone())).collect();
        for e in self.edges.iter_mut() {
            if machine_of.get(&e.from) == machine_of.get(&e.to) {
                e.cost_ms = 0.0;
            }
        }
    }

    /// KV positions the cluster can hold for all requests together, by the plan's memory
    /// figures: each machine's room (capacity less what the plan uses, which counts the
    /// planned batch's caches) over the bytes one position costs in its decode attention
    /// layers, plus the planned positions; the tightest machine decides. `None` for a
    /// plan whose machines hold no decode attention.
    pub fn kv_positions(&self) -> Option<u64> {
        let per_layer = 2 * self.model.kv_dim() * self.dtype.bytes();
        let held = self.workload.seq + self.workload.gen_tokens;
        let held = self.model.sliding_window.map_or(held, |w| held.min(w));
        let planned = held * self.workload.batch.max(1);
        self.predicted
            .per_machine
            .iter()
            .filter_map(|m| {
                let layers = self
                    .ops_on(&m.machine)
                    .filter(|o| o.phase == crate::Phase::Decode && o.kind == crate::OpKind::Attention)
                    .count() as u64;
                let room = m.memory_capacity_bytes.saturating_sub(m.memory_bytes);
                (layers > 0).then(|| planned + room / (layers * per_layer).max(1))
            })
            .min()
    }

    /// Renames machine i to `names[i]` everywhere the plan names it (its ops, their costs,
    /// the predicted use per machine).
    pub fn rename_machines(&mut self, names: &[String]) {
        let map: BTreeMap<String, String> =
            self.machines.iter().zip(names).map(|(m, n)| (m.name.clone(), n.clone())).collect();
        let rename = |s: &mut String| {
            if let Some(n) = map.get(s.as_str()) {
                *s = n.clone();
            }
        };
        for m in self.machines.iter_mut() {
            rename(&mut m.name);
        }
        for op in self.ops.iter_mut() {
            rename(&mut op.machine);
            op.costs_ms = std::mem::take(&mut op.costs_ms)
                .into_iter()
                .map(|(k, v)| (map.get(&k).cloned().unwrap_or(k), v))
                .collect();
        }
        for u in self.predicted.per_machine.iter_mut() {
            rename(&mut u.machine);
        }
    }

    /// The ops placed on `machine`, in execution order.
    pub fn ops_on<'a>(&'a self, machine: &'a str) -> impl Iterator<Item = &'a PlanOp> + 'a {
        self.ops.iter().filter(move |o| o.machine == machine)
    }
}
