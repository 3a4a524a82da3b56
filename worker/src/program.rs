//! What one rank does with a plan: its ops per phase in order, where their inputs come
//! from, where their outputs go, and the step runner that executes them as inputs arrive.
//!
//! The runner is plain code, no actors: the node feeds it received activations and drains
//! what it wants sent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use candle_core::Tensor;
use lemur_protocol::{OpKind, Phase, Plan, WorkloadMode};

use crate::error::WorkerError;
use crate::exec::{Executor, StepInput};
use crate::view::PlanIndex;
pub use crate::view::{OpSpec, Outbound, Progress};

/// One rank's view of a plan, whatever its workload: inference's phases and KV
/// handovers ([`Program`]), or training's forward and backward ops and adapters
/// ([`crate::train::TrainProgram`]).
#[derive(Debug, Clone)]
pub enum RankProgram {
    Infer(Program),
    Train(crate::train::TrainProgram),
}

impl RankProgram {
    /// Builds rank `rank`'s view; `rank_of_machine` maps the plan's machines to ranks.
    pub fn new(plan: &Plan, rank: u32, rank_of_machine: &HashMap<String, u32>) -> Result<Self, WorkerError> {
        Self::with_alternatives(plan, &[], rank, rank_of_machine)
    }

    /// The same, serving a plan set: `plan` is placement 0 and `alternatives` the rest.
    pub fn with_alternatives(
        plan: &Plan,
        alternatives: &[Plan],
        rank: u32,
        rank_of_machine: &HashMap<String, u32>,
    ) -> Result<Self, WorkerError> {
        Ok(match plan.workload.mode {
            WorkloadMode::Train if alternatives.is_empty() => {
                RankProgram::Train(crate::train::TrainProgram::new(plan, rank, rank_of_machine)?)
            }
            WorkloadMode::Train => {
                return Err(WorkerError::Plan("a training plan has no alternative placements".into()))
            }
            WorkloadMode::Infer => {
                let mut p = Program::new(plan, rank, rank_of_machine)?;
                for (i, alt) in alternatives.iter().enumerate() {
                    let alt = Program::new(alt, rank, rank_of_machine)
                        .map_err(|e| WorkerError::Plan(format!("placement {}: {e}", i + 1)))?;
                    p.alternatives.push(alt);
                }
                RankProgram::Infer(p)
            }
        })
    }

    /// The (kind, layer) of every op this rank runs forward: the weights it loads.
    pub fn local_weights(&self) -> HashSet<(OpKind, Option<u32>)> {
        match self {
            RankProgram::Infer(p) => p.local_weights(),
            RankProgram::Train(p) => p.local_weights(),
        }
    }
}

/// A phase's ops in execution order.
#[derive(Debug, Clone)]
pub struct PhaseProgram {
    pub phase: Phase,
    pub ops: Vec<OpSpec>,
    /// Index of each op id in `ops`.
    pub index: HashMap<usize, usize>,
    /// The rank running the lm head (sends logits to rank 0).
    pub head_rank: u32,
}

/// The whole plan from one rank's point of view.
#[derive(Debug, Clone)]
pub struct Program {
    pub rank: u32,
    pub phases: Vec<PhaseProgram>,
    /// Per layer: (prefill rank, decode rank) of its attention, for the KV handover.
    pub attention_ranks: BTreeMap<u32, (u32, u32)>,
    /// Serving a plan set: the set's other placements (a step names the one it runs;
    /// this program is placement 0). Empty otherwise.
    pub alternatives: Vec<Program>,
}

impl Program {
    /// Builds a rank's program; `rank_of_machine` maps the plan's machines to ranks.
    pub fn new(plan: &Plan, rank: u32, rank_of_machine: &HashMap<String, u32>) -> Result<Self, WorkerError> {
        let ix = PlanIndex::new(plan, rank_of_machine)?;
        if plan.workload.mode != WorkloadMode::Infer {
            return Err(WorkerError::Plan(format!("not an inference plan (mode `{}`)", plan.workload.mode)));
        }
        let mut phases = Vec::new();
        let mut attention_ranks: BTreeMap<u32, (Option<u32>, Option<u32>)> = BTreeMap::new();
        for phase in [Phase::Prefill, Phase::Decode] {
            let mut ops = Vec::new();
            let mut head_rank = None;
            let mut list: Vec<_> = plan.ops.iter().filter(|o| o.phase == phase).collect();
            list.sort_by_key(|o| o.id);
            for o in list {
                let op = ix.forward_op(o)?;
                if o.kind == OpKind::LmHead {
                    head_rank = Some(op.rank);
                }
                if o.kind == OpKind::Attention {
                    let layer =
                        o.layer.ok_or_else(|| WorkerError::Plan(format!("op {}: attention without a layer", o.id)))?;
                    let slot = attention_ranks.entry(layer).or_default();
                    if phase == Phase::Prefill {
                        slot.0 = Some(op.rank);
                    } else {
                        slot.1 = Some(op.rank);
                    }
                }
                ops.push(op);
            }
            if ops.is_empty() {
                continue;
            }
            let head_rank = head_rank.ok_or_else(|| WorkerError::Plan(format!("the {phase} phase has no lm head")))?;
            let index = ops.iter().enumerate().map(|(i, o)| (o.id, i)).collect();
            phases.push(PhaseProgram { phase, ops, index, head_rank });
        }
        if !phases.iter().any(|p| p.phase == Phase::Prefill) {
            return Err(WorkerError::Plan("the plan has no prefill phase".into()));
        }
        let attention_ranks = attention_ranks
            .into_iter()
            .map(|(l, (p, d))| {
                let p = p.unwrap_or(0);
                (l, (p, d.unwrap_or(p)))
            })
            .collect();
        Ok(Self { rank, phases, attention_ranks, alternatives: Vec::new() })
    }

    /// Placement `i` of the set: 0 is this program, `i` its `alternatives[i - 1]`.
    pub fn placement(&self, i: u32) -> Result<&Program, WorkerError> {
        match i {
            0 => Ok(self),
            i => self.alternatives.get(i as usize - 1).ok_or_else(|| {
                WorkerError::Wire(format!("placement {i} is not one of the set's {}", self.alternatives.len() + 1))
            }),
        }
    }

    pub fn phase(&self, phase: Phase) -> Result<&PhaseProgram, WorkerError> {
        self.phases
            .iter()
            .find(|p| p.phase == phase)
            .ok_or_else(|| WorkerError::Plan(format!("the plan has no {phase} phase")))
    }

    /// The (kind, layer) of every op this rank runs in any phase of any placement: the
    /// weights it loads, each once.
    pub fn local_weights(&self) -> HashSet<(OpKind, Option<u32>)> {
        let mut all: HashSet<_> = self
            .phases
            .iter()
            .flat_map(|p| p.ops.iter())
            .filter(|o| o.rank == self.rank)
            .map(|o| (o.kind, o.layer))
            .collect();
        for alt in &self.alternatives {
            all.extend(alt.local_weights());
        }
        all
    }

    /// Layers whose KV cache this rank must receive after prefill.
    pub fn handover_in(&self) -> Vec<u32> {
        self.attention_ranks.iter().filter(|(_, &(p, d))| d == self.rank && p != d).map(|(&l, _)| l).collect()
    }

    /// Layers whose KV cache this rank sends after prefill, with the receiving rank.
    pub fn handover_out(&self) -> Vec<(u32, u32)> {
        self.attention_ranks
            .iter()
            .filter(|(_, &(p, d))| p == self.rank && p != d)
            .map(|(&l, &(_, d))| (l, d))
            .collect()
    }
}

/// One batched step (prompt chunks, or one decode token per request) on one rank.
#[derive(Debug)]
pub struct StepRun {
    /// The step's id (unique over the leader's life).
    pub id: u64,
    pub phase: Phase,
    pub input: StepInput,
    values: HashMap<usize, Arc<Vec<Tensor>>>,
    next: usize,
    /// Bytes of activations sent by this rank in this step.
    pub bytes_sent: u64,
    /// Time every op, synchronising the device after each.
    pub timing: bool,
    /// The plan set's placement this step runs in (0 without a set).
    pub placement: u32,
    /// (request, layer) caches moving here for this step: their attention waits for them.
    pub incoming: HashSet<(u64, u32)>,
    /// Keep a finished prompt's caches here instead of handing them to the decode ranks.
    pub keep_kv: bool,
}

impl StepRun {
    pub fn new(id: u64, phase: Phase, input: StepInput) -> Self {
        Self {
            id,
            phase,
            input,
            values: HashMap::new(),
            next: 0,
            bytes_sent: 0,
            timing: false,
            placement: 0,
            incoming: HashSet::new(),
            keep_kv: false,
        }
    }

    /// Whether this step has a segment of `request`.
    pub fn serves(&self, request: u64) -> bool {
        self.input.segments.iter().any(|g| g.request == request)
    }

    /// An input that arrived from another rank.
    pub fn deliver(&mut self, from_op: usize, tensors: Vec<Tensor>) {
        self.values.insert(from_op, Arc::new(tensors));
    }

    /// Runs every local op whose inputs are ready, in plan order; `out` receives what must
    /// be sent. Stops at the first local op still waiting for a remote input.
    pub fn advance(
        &mut self,
        prog: &Program,
        exec: &mut Executor,
        out: &mut dyn FnMut(Outbound),
    ) -> Result<Progress, WorkerError> {
        let prog = prog.placement(self.placement)?;
        let phase = prog.phase(self.phase)?;
        while self.next < phase.ops.len() {
            let op = &phase.ops[self.next];
            if op.rank != prog.rank {
                self.next += 1;
                continue;
            }
            if !op.inputs.iter().all(|i| self.values.contains_key(i)) {
                return Ok(Progress::Blocked);
            }
            // Decode attention whose prefill ran elsewhere needs the handed-over caches, and
            // attention whose caches move here for this step needs them.
            if op.kind == OpKind::Attention {
                let layer = op.layer.unwrap_or(0);
                let missing = |g: &&crate::exec::Seg| !exec.kv.contains_key(&(g.request, layer));
                let handover = self.phase == Phase::Decode && prog.handover_in().contains(&layer);
                let waits = self
                    .input
                    .segments
                    .iter()
                    .filter(missing)
                    .any(|g| handover || self.incoming.contains(&(g.request, layer)));
                if waits {
                    return Ok(Progress::Blocked);
                }
            }
            let ins: Vec<(OpKind, &[Tensor])> =
                op.inputs.iter().map(|i| (phase.ops[phase.index[i]].kind, self.values[i].as_slice())).collect();
            let started = std::time::Instant::now();
            let result = exec.run(op.kind, op.layer, &ins, &self.input).map_err(|e| WorkerError::Op {
                op: op.id,
                label: op.label(),
                message: e.to_string(),
            })?;
            if self.timing {
                exec.device.synchronize()?;
                out(Outbound::Timing { op: op.id, seconds: started.elapsed().as_secs_f64() });
            }
            let result = Arc::new(result);
            for &to in &op.send_to {
                out(Outbound::Activation { to, from_op: op.id, tensors: result.clone() });
            }
            if op.kind == OpKind::LmHead {
                out(Outbound::Logits { logits: result[0].clone() });
            }
            if op.kind == OpKind::Attention && self.phase == Phase::Prefill && !self.keep_kv {
                let layer = op.layer.unwrap_or(0);
                for (l, to) in prog.handover_out() {
                    if l != layer {
                        continue;
                    }
                    for g in self.input.segments.iter().filter(|g| g.last) {
                        if let Some(cache) = exec.kv.remove(&(g.request, layer)) {
                            out(Outbound::Kv { to, request: g.request, layer, cache });
                        }
                    }
                }
            }
            self.values.insert(op.id, result);
            self.next += 1;
        }
        Ok(Progress::Done)
    }
}
