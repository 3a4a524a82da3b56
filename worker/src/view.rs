//! What the runners share: one op as a runner sees it ([`OpSpec`], forward or backward),
//! the plan indexed for building a rank's view ([`PlanIndex`]), what a runner asks to
//! send ([`Outbound`]) and whether it is done ([`Progress`]). Inference's view and runner
//! are in `program.rs`, training's in `train.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use lemur_protocol::{OpKind, Phase, Plan};

use crate::error::WorkerError;

/// One op as a runner sees it, inference or training.
#[derive(Debug, Clone)]
pub struct OpSpec {
    pub id: usize,
    pub kind: OpKind,
    pub layer: Option<u32>,
    pub rank: u32,
    /// Forward: producer op ids, in the plan's edge order. Backward: the backward ops
    /// whose gradients it sums.
    pub inputs: Vec<usize>,
    /// Forward: other ranks that consume this op's output.
    pub send_to: Vec<u32>,
    /// Training, a backward op: its forward op.
    pub backward_of: Option<usize>,
    /// Training, a backward op: for each input producer of its forward op, that
    /// producer's backward op and its rank (where the input's gradient goes).
    pub routes: Vec<(usize, usize, u32)>,
}

impl OpSpec {
    /// `L3.q_proj`, with a `'` for a backward op (`L3.q_proj'`): how errors name an op.
    pub fn label(&self) -> String {
        let layer = self.layer.map_or(String::new(), |l| format!("L{l}."));
        format!("{layer}{}{}", self.kind, if self.backward_of.is_some() { "'" } else { "" })
    }
}

/// What every rank's view of a plan starts from: the plan validated, its ops by id, the
/// rank of each op, and the forward edges both ways.
pub(crate) struct PlanIndex<'a> {
    pub by_id: HashMap<usize, &'a lemur_protocol::plan::PlanOp>,
    rank_of_machine: &'a HashMap<String, u32>,
    /// Forward edges (both ends in the same forward-like phase): inputs and consumers.
    pub inputs: HashMap<usize, Vec<usize>>,
    pub consumers: HashMap<usize, Vec<usize>>,
}

impl<'a> PlanIndex<'a> {
    pub fn new(plan: &'a Plan, rank_of_machine: &'a HashMap<String, u32>) -> Result<Self, WorkerError> {
        plan.validate().map_err(|e| WorkerError::Plan(e.to_string()))?;
        let by_id: HashMap<usize, &lemur_protocol::plan::PlanOp> = plan.ops.iter().map(|o| (o.id, o)).collect();
        let mut inputs: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut consumers: HashMap<usize, Vec<usize>> = HashMap::new();
        for e in &plan.edges {
            if by_id[&e.from].phase == Phase::Backward || by_id[&e.to].phase == Phase::Backward {
                continue; // gradients and saved tensors: the training view routes those
            }
            inputs.entry(e.to).or_default().push(e.from);
            consumers.entry(e.from).or_default().push(e.to);
        }
        Ok(Self { by_id, rank_of_machine, inputs, consumers })
    }

    /// The rank that runs op `id`.
    pub fn rank_of(&self, id: usize) -> Result<u32, WorkerError> {
        let m = &self.by_id[&id].machine;
        self.rank_of_machine
            .get(m)
            .copied()
            .ok_or_else(|| WorkerError::Plan(format!("op {id} runs on machine `{m}`, which no rank of the cluster is")))
    }

    /// The other ranks that consume forward op `id`'s output, each once.
    pub fn send_to(&self, id: usize) -> Result<Vec<u32>, WorkerError> {
        let r = self.rank_of(id)?;
        let mut send_to = Vec::new();
        for c in self.consumers.get(&id).into_iter().flatten() {
            let cr = self.rank_of(*c)?;
            if cr != r && !send_to.contains(&cr) {
                send_to.push(cr);
            }
        }
        Ok(send_to)
    }

    /// A forward op as a runner sees it.
    pub fn forward_op(&self, o: &lemur_protocol::plan::PlanOp) -> Result<OpSpec, WorkerError> {
        Ok(OpSpec {
            id: o.id,
            kind: o.kind,
            layer: o.layer,
            rank: self.rank_of(o.id)?,
            inputs: self.inputs.get(&o.id).cloned().unwrap_or_default(),
            send_to: self.send_to(o.id)?,
            backward_of: None,
            routes: Vec::new(),
        })
    }
}

/// Something a step or micro-batch runner wants sent, inference and training alike.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Op `from_op`'s output, to `to`.
    Activation { to: u32, from_op: usize, tensors: Arc<Vec<Tensor>> },
    /// Training: the gradient from backward op `from_op` for backward op `to_op` on `to`.
    Gradient { to: u32, from_op: usize, to_op: usize, tensors: Vec<Tensor> },
    /// The lm head's logits (`[1, segments, vocab]`), to rank 0.
    Logits { logits: Tensor },
    /// Training: a micro-batch's loss, to rank 0.
    Loss { loss: f64 },
    /// A request's KV cache of one layer after its prefill, to the rank that decodes it.
    Kv { to: u32, request: u64, layer: u32, cache: crate::exec::KvCache },
    /// How long op `op` took (with timing on).
    Timing { op: usize, seconds: f64 },
}

/// Whether a step has finished on this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for an input from another rank.
    Blocked,
    Done,
}
