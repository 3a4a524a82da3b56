//! Rank 0's training loop on the `Node`: micro-batches admitted up to the plan's window,
//! the global gradient norm from every rank's report, the optimizer step everywhere,
//! checkpoints gathered from every rank, and the per-step figures.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Instant;

use actix::prelude::*;
use lemur_protocol::wire::{Frame, Gather, Message, WireTensor};

use super::job::{AdapterGrads, StepLog, TrainLoop};
use super::leader::Node;
use crate::checkpoint::TrainerState;
use crate::tensor_wire::ids_to_wire;

/// Where rank 0's training loop stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum TrainPhase {
    Running,
    GatheringGrads,
    GatheringState { finish: bool },
}

/// Rank 0's training loop state.
pub(super) struct Trainer {
    pub cfg: TrainLoop,
    /// Optimizer steps taken.
    pub step: u64,
    /// This step's micro-batch losses.
    losses: Vec<f64>,
    /// Micro-batches finished per rank, and each rank's gradient norm once all are in.
    done: HashMap<u32, u32>,
    sumsq: HashMap<u32, f64>,
    /// Ranks that finished each micro-batch, and the micro-batches not yet started.
    mb_done: HashMap<u32, u32>,
    pending: VecDeque<(u32, WireTensor)>,
    started: Instant,
    phase: TrainPhase,
    gathered: AdapterGrads,
    gathered_ranks: HashSet<u32>,
    pub all_losses: Vec<f64>,
    pub step_seconds: Vec<f64>,
    pub checkpoints: Vec<PathBuf>,
}

impl Trainer {
    fn new(cfg: TrainLoop) -> Self {
        Self {
            all_losses: cfg.prior_losses.clone(),
            step: cfg.start_step,
            cfg,
            losses: Vec::new(),
            done: HashMap::new(),
            sumsq: HashMap::new(),
            mb_done: HashMap::new(),
            pending: VecDeque::new(),
            started: Instant::now(),
            phase: TrainPhase::Running,
            gathered: AdapterGrads::new(),
            gathered_ranks: HashSet::new(),
            step_seconds: Vec::new(),
            checkpoints: Vec::new(),
        }
    }

    /// The optimizer step's id on the wire (1-based: step s runs as opt_step s + 1).
    fn opt_step(&self) -> u64 {
        self.step + 1
    }
}

impl Node {
    pub(super) fn begin_training(&mut self, tl: TrainLoop) {
        if let Some(tensors) = &tl.resume {
            self.load_everywhere(tensors);
        }
        if let Some(l) = self.leader.as_mut() {
            l.trainer = Some(Trainer::new(tl));
        }
        self.start_train_step();
    }

    fn trainer(&mut self) -> Option<&mut Trainer> {
        self.leader.as_mut().and_then(|l| l.trainer.as_mut())
    }

    /// Queues the current step's micro-batches and starts as many as may be in flight.
    fn start_train_step(&mut self) {
        let Some(l) = self.leader.as_mut() else { return };
        let Some(t) = l.trainer.as_mut() else { return };
        let s = t.step;
        l.request = t.opt_step();
        t.losses.clear();
        t.done.clear();
        t.mb_done.clear();
        t.sumsq.clear();
        t.started = Instant::now();
        let (b, m) = (t.cfg.batch, t.cfg.micro_batches);
        let n = t.cfg.sequences.len().max(1);
        t.pending.clear();
        for mb in 0..m {
            let rows: Vec<&[u32]> =
                (0..b).map(|i| t.cfg.sequences[((s as usize * m + mb) * b + i) % n].as_slice()).collect();
            t.pending.push_back((mb as u32, ids_to_wire(&rows)));
        }
        for _ in 0..t.cfg.inflight.clamp(1, m.max(1)) {
            self.start_next_micro_batch();
        }
    }

    /// Sends the next queued micro-batch of this step to every rank.
    fn start_next_micro_batch(&mut self) {
        let Some(t) = self.trainer() else { return };
        let opt_step = t.opt_step();
        let Some((micro_batch, tokens)) = t.pending.pop_front() else { return };
        let msg = Message::StartMicroBatch { opt_step, micro_batch, tokens: tokens.meta };
        self.router.broadcast(&Frame { message: msg, tensors: vec![tokens.data] });
    }

    pub(super) fn on_loss(&mut self, loss: f64) {
        if let Some(l) = self.leader.as_mut() {
            l.loss = Some(loss);
            if let Some(t) = l.trainer.as_mut() {
                t.losses.push(loss);
            }
        }
    }

    /// A rank finished a micro-batch; when every rank finished every one, step the optimizer.
    pub(super) fn on_micro_batch_done(&mut self, rank: u32, mb: u32, sumsq: f64, ctx: &mut Context<Self>) {
        let n = self.n;
        let Some(t) = self.trainer() else { return };
        let finished = t.mb_done.entry(mb).or_default();
        *finished += 1;
        if *finished == n {
            // A micro-batch left the pipeline on every rank: admit the next.
            self.start_next_micro_batch();
        }
        let Some(t) = self.trainer() else { return };
        let c = t.done.entry(rank).or_default();
        *c += 1;
        if *c as usize == t.cfg.micro_batches {
            t.sumsq.insert(rank, sumsq);
        }
        if t.sumsq.len() as u32 != n {
            return;
        }
        let opt_step = t.opt_step();
        if t.cfg.grad_check {
            t.phase = TrainPhase::GatheringGrads;
            self.router.broadcast(&Frame::control(Message::Gather { opt_step, what: Gather::Grads }));
            return;
        }
        let norm = t.sumsq.values().sum::<f64>().sqrt();
        let clip = (t.cfg.max_grad_norm / (norm + 1e-6)).min(1.0);
        let step = t.step;
        let lr = t.cfg.lr_at(step);
        let loss = if t.losses.is_empty() { f64::NAN } else { t.losses.iter().sum::<f64>() / t.losses.len() as f64 };
        t.all_losses.push(loss);
        let weight_decay = t.cfg.weight_decay;
        let tokens = (t.cfg.batch
            * t.cfg.micro_batches
            * t.cfg.sequences.first().map_or(1, |r| r.len().saturating_sub(1))) as u64;
        let seconds = t.started.elapsed().as_secs_f64();
        t.step_seconds.push(seconds);
        let log = StepLog { step: step + 1, loss, lr, grad_norm: norm, tokens, seconds };
        if let Some(sink) = &t.cfg.on_step {
            (sink.0)(&log);
        }
        t.step += 1;
        let last = t.step >= t.cfg.steps;
        let save = t.cfg.output.is_some() && (last || (t.cfg.save_every > 0 && t.step % t.cfg.save_every == 0));
        if save {
            t.phase = TrainPhase::GatheringState { finish: last };
            t.gathered.clear();
            t.gathered_ranks.clear();
        }
        self.router.broadcast(&Frame::control(Message::Update { t: step + 1, lr, clip, weight_decay }));
        if save {
            self.router.broadcast(&Frame::control(Message::Gather { opt_step, what: Gather::State }));
        } else if last {
            self.finish_training(ctx);
        } else {
            self.start_train_step();
        }
    }

    fn write_checkpoint(&mut self, finish: bool, ctx: &mut Context<Self>) {
        let Some(t) = self.trainer() else { return };
        t.phase = TrainPhase::Running;
        let state = TrainerState { step: t.step, losses: t.all_losses.clone() };
        let dir = t.cfg.output.clone().unwrap_or_default();
        match crate::checkpoint::write(&dir, &t.cfg.adapter_config, &state, &t.gathered) {
            Ok(path) => {
                tracing::info!(path = %path.display(), "checkpoint written");
                t.checkpoints.push(path);
            }
            Err(e) => return self.finish_with(Err(e), ctx),
        }
        if finish {
            self.finish_training(ctx);
        } else {
            self.start_train_step();
        }
    }

    fn finish_training(&mut self, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        l.first = Some(l.started.elapsed());
        self.end_request(ctx);
    }

    /// A rank's adapters: for a checkpoint, or a gradient check's gradients; when every
    /// rank's are in, write the checkpoint or end the run.
    pub(super) fn on_adapters(&mut self, rank: u32, grads: AdapterGrads, ctx: &mut Context<Self>) {
        let n = self.n;
        let Some(l) = self.leader.as_mut() else { return };
        if let Some(t) = l.trainer.as_mut() {
            if let TrainPhase::GatheringState { finish } = t.phase {
                t.gathered.extend(grads);
                t.gathered_ranks.insert(rank);
                if t.gathered_ranks.len() as u32 == n {
                    self.write_checkpoint(finish, ctx);
                }
                return;
            }
        }
        l.lora_grads.extend(grads);
        l.adapter_ranks.insert(rank);
        if l.adapter_ranks.len() as u32 != n || l.done {
            return;
        }
        l.first = Some(l.started.elapsed());
        self.end_request(ctx);
    }
}
