//! Training across ranks: a training plan from one rank's view, and the step runner that
//! runs forward ops, then their backward ops in reverse, as activations and gradients
//! arrive.
//!
//! Backward runs op by op as vector-Jacobian products written by hand (`backward`): a
//! forward op keeps its inputs (and, for attention and the lm head, its probabilities);
//! its backward op sums the gradients its consumers sent, and yields the gradients of the
//! op's inputs (sent to the backward ops of their producers, on whatever rank) and of its
//! LoRA adapter (accumulated here).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use lemur_protocol::{FinetuneKind, OpKind, Phase, Plan, WorkloadMode};

use crate::backward::Saved;
use crate::error::WorkerError;
use crate::exec::{Executor, StepInput};
use crate::view::{OpSpec, Outbound, PlanIndex, Progress};

/// A training plan from one rank's point of view.
#[derive(Debug, Clone)]
pub struct TrainProgram {
    pub rank: u32,
    pub ops: Vec<OpSpec>,
    pub index: HashMap<usize, usize>,
    /// Forward ops that have a backward op (their inputs must be kept).
    pub has_backward: HashMap<usize, usize>,
    pub lora_rank: usize,
    pub lora_targets: Vec<OpKind>,
}

impl TrainProgram {
    pub fn new(plan: &Plan, rank: u32, rank_of_machine: &HashMap<String, u32>) -> Result<Self, WorkerError> {
        let ix = PlanIndex::new(plan, rank_of_machine)?;
        if plan.workload.mode != WorkloadMode::Train {
            return Err(WorkerError::Plan(format!("not a training plan (mode `{}`)", plan.workload.mode)));
        }
        if plan.workload.finetune != Some(FinetuneKind::Lora) {
            return Err(WorkerError::Plan("this worker trains LoRA adapters; the plan is for full fine-tuning".into()));
        }
        let backward: HashMap<usize, usize> = plan
            .ops
            .iter()
            .filter_map(|o| o.forward_of.filter(|_| o.phase == Phase::Backward).map(|f| (f, o.id)))
            .collect();
        let mut grad_inputs: HashMap<usize, Vec<usize>> = HashMap::new();
        for e in &plan.edges {
            if ix.by_id[&e.from].phase == Phase::Backward && ix.by_id[&e.to].phase == Phase::Backward {
                grad_inputs.entry(e.to).or_default().push(e.from);
            }
        }
        let mut ops = Vec::new();
        let mut list: Vec<_> = plan.ops.iter().collect();
        list.sort_by_key(|o| o.id);
        for o in list {
            let op = match o.phase {
                Phase::Forward => ix.forward_op(o)?,
                Phase::Backward => {
                    let f = o.forward_of.ok_or_else(|| {
                        WorkerError::Plan(format!("op {}: a backward op without its forward op", o.id))
                    })?;
                    let mut routes = Vec::new();
                    for p in ix.inputs.get(&f).into_iter().flatten() {
                        if let Some(&pb) = backward.get(p) {
                            routes.push((*p, pb, ix.rank_of(pb)?));
                        }
                    }
                    OpSpec {
                        id: o.id,
                        kind: o.kind,
                        layer: o.layer,
                        rank: ix.rank_of(o.id)?,
                        inputs: grad_inputs.get(&o.id).cloned().unwrap_or_default(),
                        send_to: Vec::new(),
                        backward_of: Some(f),
                        routes,
                    }
                }
                other => return Err(WorkerError::Plan(format!("op {}: a {other} op in a training plan", o.id))),
            };
            ops.push(op);
        }
        let index = ops.iter().enumerate().map(|(i, o)| (o.id, i)).collect();
        Ok(Self {
            rank,
            ops,
            index,
            has_backward: backward,
            lora_rank: plan.workload.lora_rank_or_default() as usize,
            lora_targets: plan.workload.lora_targets.clone().unwrap_or_default(),
        })
    }

    /// The (kind, layer) of every forward op this rank runs: the weights it loads.
    pub fn local_weights(&self) -> std::collections::HashSet<(OpKind, Option<u32>)> {
        self.ops.iter().filter(|o| o.rank == self.rank && o.backward_of.is_none()).map(|o| (o.kind, o.layer)).collect()
    }

    /// Adapters this rank owns: LoRA targets among its forward ops.
    pub fn local_adapters(&self) -> Vec<(OpKind, u32)> {
        self.ops
            .iter()
            .filter(|o| o.rank == self.rank && o.backward_of.is_none() && self.lora_targets.contains(&o.kind))
            .filter_map(|o| o.layer.map(|l| (o.kind, l)))
            .collect()
    }
}

/// One micro-batch's forward and backward on one rank.
pub struct TrainRun {
    pub request: u64,
    pub step: u32,
    pub input: StepInput,
    acts: HashMap<usize, Arc<Vec<Tensor>>>,
    grads: HashMap<(usize, usize), Vec<Tensor>>,
    saved: HashMap<usize, Saved>,
    next: usize,
    /// LoRA gradients accumulated in this run, by (kind, layer): (dA, dB).
    pub lora_grads: HashMap<(OpKind, u32), (Tensor, Tensor)>,
    /// Time every op (synchronising the device after each).
    pub timing: bool,
}

impl std::fmt::Debug for TrainRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainRun")
            .field("request", &self.request)
            .field("step", &self.step)
            .field("next", &self.next)
            .finish()
    }
}

impl TrainRun {
    pub fn new(request: u64, step: u32, input: StepInput) -> Self {
        Self {
            request,
            step,
            input,
            acts: HashMap::new(),
            grads: HashMap::new(),
            saved: HashMap::new(),
            next: 0,
            lora_grads: HashMap::new(),
            timing: false,
        }
    }

    pub fn deliver_activation(&mut self, from_op: usize, tensors: Vec<Tensor>) {
        self.acts.insert(from_op, Arc::new(tensors));
    }

    pub fn deliver_gradient(&mut self, from_op: usize, to_op: usize, tensors: Vec<Tensor>) {
        self.grads.insert((from_op, to_op), tensors);
    }

    /// This rank's next op in plan order: `None` when every op has run, else whether its
    /// inputs are in and whether it is a backward op.
    pub fn next_local(&mut self, prog: &TrainProgram) -> Option<(bool, bool)> {
        while self.next < prog.ops.len() && prog.ops[self.next].rank != prog.rank {
            self.next += 1;
        }
        let op = prog.ops.get(self.next)?;
        let ready = match op.backward_of {
            None => op.inputs.iter().all(|i| self.acts.contains_key(i)),
            Some(_) => op.inputs.iter().all(|c| self.grads.contains_key(&(*c, op.id))),
        };
        Some((ready, op.backward_of.is_some()))
    }

    /// Runs local ops whose inputs are ready, in plan order, at most `max_ops` of them.
    pub fn advance(
        &mut self,
        prog: &TrainProgram,
        exec: &mut Executor,
        out: &mut dyn FnMut(Outbound),
        max_ops: usize,
    ) -> Result<Progress, WorkerError> {
        let mut ran = 0;
        while self.next < prog.ops.len() {
            if ran == max_ops {
                return Ok(Progress::Blocked);
            }
            let op = &prog.ops[self.next];
            if op.rank != prog.rank {
                self.next += 1;
                continue;
            }
            let fail = |e: WorkerError| WorkerError::Op { op: op.id, label: op.label(), message: e.to_string() };
            let started = std::time::Instant::now();
            match op.backward_of {
                None => {
                    if !op.inputs.iter().all(|i| self.acts.contains_key(i)) {
                        return Ok(Progress::Blocked);
                    }
                    self.forward(prog, op, exec, out).map_err(fail)?;
                }
                Some(f) => {
                    if !op.inputs.iter().all(|c| self.grads.contains_key(&(*c, op.id))) {
                        return Ok(Progress::Blocked);
                    }
                    self.backward(prog, op, f, exec, out).map_err(fail)?;
                }
            }
            if self.timing {
                exec.device.synchronize()?;
                out(Outbound::Timing { op: op.id, seconds: started.elapsed().as_secs_f64() });
            }
            self.next += 1;
            ran += 1;
        }
        Ok(Progress::Done)
    }

    fn forward(
        &mut self,
        prog: &TrainProgram,
        op: &OpSpec,
        exec: &mut Executor,
        out: &mut dyn FnMut(Outbound),
    ) -> Result<(), WorkerError> {
        let ins: Vec<(OpKind, Arc<Vec<Tensor>>)> =
            op.inputs.iter().map(|p| (prog.ops[prog.index[p]].kind, self.acts[p].clone())).collect();
        let refs: Vec<(OpKind, &[Tensor])> = ins.iter().map(|(k, t)| (*k, t.as_slice())).collect();
        let (outputs, extra) = exec.forward_train(op.kind, op.layer, &refs, &self.input)?;
        if op.kind == OpKind::LmHead {
            out(Outbound::Loss { loss: f64::from(outputs[0].to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?) });
        }
        let outputs = Arc::new(outputs);
        for &to in &op.send_to {
            out(Outbound::Activation { to, from_op: op.id, tensors: outputs.clone() });
        }
        self.acts.insert(op.id, outputs);
        if prog.has_backward.contains_key(&op.id) {
            let inputs = ins.into_iter().map(|(k, t)| (k, t.as_ref().clone())).collect();
            self.saved.insert(op.id, Saved { inputs, extra });
        }
        Ok(())
    }

    fn backward(
        &mut self,
        prog: &TrainProgram,
        op: &OpSpec,
        fwd: usize,
        exec: &mut Executor,
        out: &mut dyn FnMut(Outbound),
    ) -> Result<(), WorkerError> {
        let saved = self
            .saved
            .remove(&fwd)
            .ok_or_else(|| WorkerError::Plan(format!("op {fwd} kept nothing for its backward")))?;
        // The gradient of each output, summed over the consumers' backward ops; the lm
        // head is the root (d loss / d loss = 1).
        let grads: Vec<Tensor> = if op.kind == OpKind::LmHead {
            vec![Tensor::new(1f32, &exec.device)?]
        } else {
            let mut total: Vec<Tensor> = Vec::new();
            for c in &op.inputs {
                let g = self.grads.remove(&(*c, op.id)).unwrap_or_default();
                total = if total.is_empty() {
                    g
                } else {
                    total.iter().zip(&g).map(|(a, b)| a + b).collect::<Result<_, _>>()?
                };
            }
            if total.is_empty() {
                return Ok(()); // nothing downstream needs a gradient
            }
            total
        };
        let fwd_inputs = &prog.ops[prog.index[&fwd]].inputs;
        let g = exec.backward(op.kind, op.layer, &saved, &grads, &self.input)?;
        for (p, gi) in fwd_inputs.iter().zip(g.inputs) {
            let (Some(gi), Some(&(_, pb, rank))) = (gi, op.routes.iter().find(|r| r.0 == *p)) else { continue };
            if rank == prog.rank {
                self.grads.insert((op.id, pb), gi);
            } else {
                out(Outbound::Gradient { to: rank, from_op: op.id, to_op: pb, tensors: gi });
            }
        }
        if let (Some(layer), Some((ga, gb))) = (op.layer, g.lora) {
            match self.lora_grads.entry((op.kind, layer)) {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let (a, b) = o.get().clone();
                    o.insert(((a + ga)?, (b + gb)?));
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((ga, gb));
                }
            }
        }
        Ok(())
    }
}
