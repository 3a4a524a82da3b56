//! Training across ranks: a training plan from one rank's view, and the step runner that
//! runs forward ops, then their backward ops in reverse, as activations and gradients
//! arrive.
//!
//! Backward runs op by op as vector-Jacobian products: a forward op records its inputs as
//! fresh leaf variables; its backward op forms `sum_i <output_i, grad_i>` (the loss itself
//! for the lm head) and lets candle's autograd differentiate that through the op alone,
//! which yields the gradients of the op's inputs (sent to the backward ops of their
//! producers, on whatever rank) and of its LoRA adapters (accumulated here).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use lemur_protocol::{OpKind, Phase, Plan};

use crate::error::WorkerError;
use crate::exec::{Executor, StepInput};
use crate::program::Progress;

/// One op of a training plan.
#[derive(Debug, Clone)]
pub struct TrainOp {
    pub id: usize,
    pub kind: OpKind,
    pub layer: Option<u32>,
    pub rank: u32,
    /// For a backward op: its forward op.
    pub backward_of: Option<usize>,
    /// Forward: producer op ids. Backward: the backward ops whose gradients it sums.
    pub inputs: Vec<usize>,
    /// Forward: other ranks that consume the output.
    pub send_to: Vec<u32>,
    /// Backward: for each input producer of the forward op, its backward op and that rank.
    pub routes: Vec<(usize, usize, u32)>,
}

/// A training plan from one rank's point of view.
#[derive(Debug, Clone)]
pub struct TrainProgram {
    pub rank: u32,
    pub ops: Vec<TrainOp>,
    pub index: HashMap<usize, usize>,
    /// Forward ops that have a backward op (their inputs must be kept).
    pub has_backward: HashMap<usize, usize>,
    pub lora_rank: usize,
    pub lora_targets: Vec<OpKind>,
}

impl TrainProgram {
    pub fn new(plan: &Plan, rank: u32, rank_of_machine: &HashMap<String, u32>) -> Result<Self, WorkerError> {
        plan.validate().map_err(|e| WorkerError::Plan(e.to_string()))?;
        if plan.workload.mode != "train" {
            return Err(WorkerError::Plan(format!("not a training plan (mode `{}`)", plan.workload.mode)));
        }
        if plan.workload.finetune.as_deref() != Some("lora") {
            return Err(WorkerError::Plan("this worker trains LoRA adapters; the plan is for full fine-tuning".into()));
        }
        let by_id: HashMap<usize, &lemur_protocol::plan::PlanOp> = plan.ops.iter().map(|o| (o.id, o)).collect();
        let rank_of = |id: usize| -> Result<u32, WorkerError> {
            let m = &by_id[&id].machine;
            rank_of_machine.get(m).copied().ok_or_else(|| {
                WorkerError::Plan(format!("op {id} runs on machine `{m}`, which no rank of the cluster is"))
            })
        };
        let backward: HashMap<usize, usize> = plan
            .ops
            .iter()
            .filter_map(|o| o.forward_of.filter(|_| o.phase == Phase::Backward).map(|f| (f, o.id)))
            .collect();
        let mut fwd_inputs: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut fwd_consumers: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut grad_inputs: HashMap<usize, Vec<usize>> = HashMap::new();
        for e in &plan.edges {
            let (a, b) = (by_id[&e.from], by_id[&e.to]);
            match (a.phase, b.phase) {
                (Phase::Forward, Phase::Forward) => {
                    fwd_inputs.entry(e.to).or_default().push(e.from);
                    fwd_consumers.entry(e.from).or_default().push(e.to);
                }
                (Phase::Backward, Phase::Backward) => grad_inputs.entry(e.to).or_default().push(e.from),
                _ => {} // saved tensors: a forward op and its own backward op
            }
        }
        let mut ops = Vec::new();
        let mut list: Vec<_> = plan.ops.iter().collect();
        list.sort_by_key(|o| o.id);
        for o in list {
            let r = rank_of(o.id)?;
            let (inputs, send_to, routes) = match o.phase {
                Phase::Forward => {
                    let mut send_to = Vec::new();
                    for c in fwd_consumers.get(&o.id).into_iter().flatten() {
                        let cr = rank_of(*c)?;
                        if cr != r && !send_to.contains(&cr) {
                            send_to.push(cr);
                        }
                    }
                    (fwd_inputs.get(&o.id).cloned().unwrap_or_default(), send_to, Vec::new())
                }
                Phase::Backward => {
                    let f = o.forward_of.ok_or_else(|| {
                        WorkerError::Plan(format!("op {}: a backward op without its forward op", o.id))
                    })?;
                    let mut routes = Vec::new();
                    for p in fwd_inputs.get(&f).into_iter().flatten() {
                        if let Some(&pb) = backward.get(p) {
                            routes.push((*p, pb, rank_of(pb)?));
                        }
                    }
                    (grad_inputs.get(&o.id).cloned().unwrap_or_default(), Vec::new(), routes)
                }
                other => return Err(WorkerError::Plan(format!("op {}: a {other} op in a training plan", o.id))),
            };
            ops.push(TrainOp {
                id: o.id,
                kind: o.kind,
                layer: o.layer,
                rank: r,
                backward_of: o.forward_of.filter(|_| o.phase == Phase::Backward),
                inputs,
                send_to,
                routes,
            });
        }
        let index = ops.iter().enumerate().map(|(i, o)| (o.id, i)).collect();
        Ok(Self {
            rank,
            ops,
            index,
            has_backward: backward,
            lora_rank: plan.workload.lora_rank.unwrap_or(16) as usize,
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

/// What a training step wants sent.
#[derive(Debug, Clone)]
pub enum TrainOut {
    Activation { to: u32, from_op: usize, tensors: Arc<Vec<Tensor>> },
    Gradient { to: u32, from_op: usize, to_op: usize, tensors: Vec<Tensor> },
    Loss { loss: f64 },
}

struct Saved {
    inputs: Vec<(usize, Vec<Var>)>,
    outputs: Vec<Tensor>,
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
        }
    }

    pub fn deliver_activation(&mut self, from_op: usize, tensors: Vec<Tensor>) {
        self.acts.insert(from_op, Arc::new(tensors));
    }

    pub fn deliver_gradient(&mut self, from_op: usize, to_op: usize, tensors: Vec<Tensor>) {
        self.grads.insert((from_op, to_op), tensors);
    }

    /// Runs every local op whose inputs are ready, in plan order.
    pub fn advance(
        &mut self,
        prog: &TrainProgram,
        exec: &mut Executor,
        out: &mut dyn FnMut(TrainOut),
    ) -> Result<Progress, WorkerError> {
        while self.next < prog.ops.len() {
            let op = &prog.ops[self.next];
            if op.rank != prog.rank {
                self.next += 1;
                continue;
            }
            let label = || {
                format!(
                    "{}{}{}",
                    op.layer.map_or(String::new(), |l| format!("L{l}.")),
                    op.kind,
                    if op.backward_of.is_some() { "'" } else { "" }
                )
            };
            let fail = |e: WorkerError| WorkerError::Op { op: op.id, label: label(), message: e.to_string() };
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
            self.next += 1;
        }
        Ok(Progress::Done)
    }

    fn forward(
        &mut self,
        prog: &TrainProgram,
        op: &TrainOp,
        exec: &mut Executor,
        out: &mut dyn FnMut(TrainOut),
    ) -> Result<(), WorkerError> {
        let keep = prog.has_backward.contains_key(&op.id);
        let mut leaves: Vec<(usize, Vec<Var>)> = Vec::new();
        let mut ins: Vec<(OpKind, Vec<Tensor>)> = Vec::new();
        for p in &op.inputs {
            let kind = prog.ops[prog.index[p]].kind;
            let vals = &self.acts[p];
            if keep {
                let vars = vals.iter().map(Var::from_tensor).collect::<Result<Vec<_>, _>>()?;
                ins.push((kind, vars.iter().map(|v| v.as_tensor().clone()).collect()));
                leaves.push((*p, vars));
            } else {
                ins.push((kind, vals.to_vec()));
            }
        }
        let refs: Vec<(OpKind, &[Tensor])> = ins.iter().map(|(k, t)| (*k, t.as_slice())).collect();
        let outputs = exec.run(op.kind, op.layer, &refs, &self.input)?;
        if op.kind == OpKind::LmHead {
            out(TrainOut::Loss { loss: f64::from(outputs[0].to_scalar::<f32>()?) });
        }
        let detached = Arc::new(outputs.iter().map(Tensor::detach).collect::<Vec<_>>());
        for &to in &op.send_to {
            out(TrainOut::Activation { to, from_op: op.id, tensors: detached.clone() });
        }
        self.acts.insert(op.id, detached);
        if keep {
            self.saved.insert(op.id, Saved { inputs: leaves, outputs });
        }
        Ok(())
    }

    fn backward(
        &mut self,
        prog: &TrainProgram,
        op: &TrainOp,
        fwd: usize,
        exec: &mut Executor,
        out: &mut dyn FnMut(TrainOut),
    ) -> Result<(), WorkerError> {
        let saved = self
            .saved
            .remove(&fwd)
            .ok_or_else(|| WorkerError::Plan(format!("op {fwd} kept nothing for its backward")))?;
        let surrogate = if op.kind == OpKind::LmHead {
            saved.outputs[0].clone()
        } else {
            let mut total: Option<Tensor> = None;
            for c in &op.inputs {
                let g = self.grads.remove(&(*c, op.id)).unwrap_or_default();
                for (o, gi) in saved.outputs.iter().zip(&g) {
                    let term = (o * gi)?.sum_all()?;
                    total = Some(match total {
                        Some(t) => (t + term)?,
                        None => term,
                    });
                }
            }
            match total {
                Some(t) => t,
                None => return Ok(()), // nothing downstream needs a gradient
            }
        };
        let grads = surrogate.backward()?;
        for (p, vars) in &saved.inputs {
            let Some(&(_, pb, rank)) = op.routes.iter().find(|r| r.0 == *p) else { continue };
            let g = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned().map_or_else(|| v.as_tensor().zeros_like(), Ok))
                .collect::<Result<Vec<_>, _>>()?;
            if rank == prog.rank {
                self.grads.insert((op.id, pb), g);
            } else {
                out(TrainOut::Gradient { to: rank, from_op: op.id, to_op: pb, tensors: g });
            }
        }
        if let (Some(layer), Some(ad)) = (op.layer, exec.adapters.get(&(op.kind, op.layer))) {
            let ga = grads.get(ad.a.as_tensor()).cloned().map_or_else(|| ad.a.as_tensor().zeros_like(), Ok)?;
            let gb = grads.get(ad.b.as_tensor()).cloned().map_or_else(|| ad.b.as_tensor().zeros_like(), Ok)?;
            let e = self.lora_grads.entry((op.kind, layer));
            match e {
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
