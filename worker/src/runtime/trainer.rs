//! Rank 0's training loop as a plain state machine: it is told what the ranks report
//! (losses, finished micro-batches with their gradient norms, gathered adapters) and
//! answers with what to send. Micro-batches are admitted up to the plan's window, the
//! global gradient norm clips the step, AdamW runs everywhere, checkpoints are gathered
//! from every rank and written here. No actors: the node executes the [`TrainAction`]s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Instant;

use lemur_protocol::wire::{Frame, Gather, Message, WireTensor};

use super::job::{AdapterGrads, StepLog, TrainLoop};
use crate::checkpoint::TrainerState;
use crate::error::WorkerError;
use crate::tensor_wire::ids_to_wire;

/// What the loop asks the node to do.
#[derive(Debug)]
pub(super) enum TrainAction {
    /// Send this frame to every rank, this one included.
    Broadcast(Frame),
    /// The loop is over: end the request.
    Finish,
    /// The loop cannot go on.
    Fail(WorkerError),
}

/// Where the loop stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Running,
    /// A gradient check: every rank's gradients are coming to the node.
    GatheringGrads,
    /// Every rank's adapters are coming for a checkpoint; then finish, or go on.
    GatheringState {
        finish: bool,
    },
}

/// Rank 0's training loop state.
pub(super) struct Trainer {
    pub cfg: TrainLoop,
    ranks: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// The optimizer step in flight, as the wire names it (step + 1).
    pub opt_step: u64,
    /// This step's micro-batch losses.
    losses: Vec<f64>,
    /// Micro-batches finished per rank, and each rank's gradient norm once all are in.
    done: HashMap<u32, u32>,
    sumsq: HashMap<u32, f64>,
    /// Ranks that finished each micro-batch, and the micro-batches not yet started.
    mb_done: HashMap<u32, u32>,
    pending: VecDeque<(u32, WireTensor)>,
    started: Instant,
    phase: Phase,
    gathered: AdapterGrads,
    gathered_ranks: HashSet<u32>,
    pub all_losses: Vec<f64>,
    pub step_seconds: Vec<f64>,
    pub checkpoints: Vec<PathBuf>,
}

impl Trainer {
    /// A loop over `ranks` ranks.
    pub fn new(cfg: TrainLoop, ranks: u32) -> Self {
        Self {
            all_losses: cfg.prior_losses.clone(),
            step: cfg.start_step,
            opt_step: cfg.start_step + 1,
            cfg,
            ranks,
            losses: Vec::new(),
            done: HashMap::new(),
            sumsq: HashMap::new(),
            mb_done: HashMap::new(),
            pending: VecDeque::new(),
            started: Instant::now(),
            phase: Phase::Running,
            gathered: AdapterGrads::new(),
            gathered_ranks: HashSet::new(),
            step_seconds: Vec::new(),
            checkpoints: Vec::new(),
        }
    }

    /// Queues the current step's micro-batches and starts as many as may be in flight.
    pub fn start_step(&mut self) -> Vec<TrainAction> {
        let s = self.step;
        self.opt_step = s + 1;
        self.losses.clear();
        self.done.clear();
        self.mb_done.clear();
        self.sumsq.clear();
        self.started = Instant::now();
        let (b, m) = (self.cfg.batch, self.cfg.micro_batches);
        let n = self.cfg.sequences.len().max(1);
        self.pending.clear();
        for mb in 0..m {
            let rows: Vec<&[u32]> =
                (0..b).map(|i| self.cfg.sequences[((s as usize * m + mb) * b + i) % n].as_slice()).collect();
            self.pending.push_back((mb as u32, ids_to_wire(&rows)));
        }
        (0..self.cfg.inflight.clamp(1, m.max(1))).filter_map(|_| self.next_micro_batch()).collect()
    }

    /// The next queued micro-batch of this step, for every rank.
    fn next_micro_batch(&mut self) -> Option<TrainAction> {
        let (micro_batch, tokens) = self.pending.pop_front()?;
        let msg = Message::StartMicroBatch { opt_step: self.opt_step, micro_batch, tokens: tokens.meta };
        Some(TrainAction::Broadcast(Frame { message: msg, tensors: vec![tokens.data] }))
    }

    pub fn on_loss(&mut self, loss: f64) {
        self.losses.push(loss);
    }

    /// A rank finished micro-batch `mb` with gradients of squared norm `sumsq` so far; when
    /// every rank finished every one, the optimizer steps (or a gradient check gathers).
    pub fn on_micro_batch_done(&mut self, rank: u32, mb: u32, sumsq: f64) -> Vec<TrainAction> {
        let mut out = Vec::new();
        let finished = self.mb_done.entry(mb).or_default();
        *finished += 1;
        if *finished == self.ranks {
            // A micro-batch left the pipeline on every rank: admit the next.
            out.extend(self.next_micro_batch());
        }
        let c = self.done.entry(rank).or_default();
        *c += 1;
        if *c as usize == self.cfg.micro_batches {
            self.sumsq.insert(rank, sumsq);
        }
        if self.sumsq.len() as u32 != self.ranks {
            return out;
        }
        if self.cfg.grad_check {
            self.phase = Phase::GatheringGrads;
            out.push(TrainAction::Broadcast(Frame::control(Message::Gather {
                opt_step: self.opt_step,
                what: Gather::Grads,
            })));
            return out;
        }
        let norm = self.sumsq.values().sum::<f64>().sqrt();
        let clip = (self.cfg.max_grad_norm / (norm + 1e-6)).min(1.0);
        let step = self.step;
        let lr = self.cfg.lr_at(step);
        let loss =
            if self.losses.is_empty() { f64::NAN } else { self.losses.iter().sum::<f64>() / self.losses.len() as f64 };
        self.all_losses.push(loss);
        let tokens = (self.cfg.batch
            * self.cfg.micro_batches
            * self.cfg.sequences.first().map_or(1, |r| r.len().saturating_sub(1))) as u64;
        let seconds = self.started.elapsed().as_secs_f64();
        self.step_seconds.push(seconds);
        if let Some(sink) = &self.cfg.on_step {
            (sink.0)(&StepLog { step: step + 1, loss, lr, grad_norm: norm, tokens, seconds });
        }
        self.step += 1;
        let weight_decay = self.cfg.weight_decay;
        out.push(TrainAction::Broadcast(Frame::control(Message::Update { t: step + 1, lr, clip, weight_decay })));
        let last = self.step >= self.cfg.steps;
        let every = self.cfg.save_every;
        if self.cfg.output.is_some() && (last || (every > 0 && self.step.is_multiple_of(every))) {
            self.phase = Phase::GatheringState { finish: last };
            self.gathered.clear();
            self.gathered_ranks.clear();
            let msg = Message::Gather { opt_step: self.opt_step, what: Gather::State };
            out.push(TrainAction::Broadcast(Frame::control(msg)));
        } else if last {
            out.push(TrainAction::Finish);
        } else {
            out.extend(self.start_step());
        }
        out
    }

    /// A rank's adapters for a checkpoint; when every rank's are in, the checkpoint is
    /// written and the loop finishes or goes on. When the loop is not gathering state
    /// (a gradient check's gradients), the tensors come back.
    pub fn on_state(&mut self, rank: u32, tensors: AdapterGrads) -> Result<Vec<TrainAction>, AdapterGrads> {
        let Phase::GatheringState { finish } = self.phase else { return Err(tensors) };
        self.gathered.extend(tensors);
        self.gathered_ranks.insert(rank);
        if self.gathered_ranks.len() as u32 != self.ranks {
            return Ok(Vec::new());
        }
        self.phase = Phase::Running;
        let state = TrainerState { step: self.step, losses: self.all_losses.clone() };
        let dir = self.cfg.output.clone().unwrap_or_default();
        match crate::checkpoint::write(&dir, &self.cfg.adapter_config, &state, &self.gathered) {
            Ok(path) => {
                tracing::info!(path = %path.display(), "checkpoint written");
                self.checkpoints.push(path);
            }
            Err(e) => return Ok(vec![TrainAction::Fail(e)]),
        }
        Ok(if finish { vec![TrainAction::Finish] } else { self.start_step() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::AdapterConfig;

    fn cfg(micro_batches: usize, inflight: usize, steps: u64, output: Option<PathBuf>) -> TrainLoop {
        TrainLoop {
            sequences: (0..8).map(|i| vec![i; 5]).collect(),
            batch: 1,
            micro_batches,
            inflight,
            steps,
            start_step: 0,
            lr: 1e-3,
            warmup: 0,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            save_every: 2,
            output,
            adapter_config: AdapterConfig { rank: 4, alpha: 8.0, targets: vec![], base_model: String::new() },
            grad_check: false,
            resume: None,
            prior_losses: vec![],
            on_step: None,
        }
    }

    fn names(actions: &[TrainAction]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                TrainAction::Broadcast(f) => match &f.message {
                    Message::StartMicroBatch { micro_batch, .. } => format!("start {micro_batch}"),
                    Message::Update { t, clip, .. } => format!("update {t} clip {clip:.3}"),
                    Message::Gather { what, .. } => format!("gather {what:?}"),
                    other => other.name().to_string(),
                },
                TrainAction::Finish => "finish".into(),
                TrainAction::Fail(e) => format!("fail {e}"),
            })
            .collect()
    }

    #[test]
    fn micro_batches_are_admitted_by_the_window_and_the_step_clips_by_the_global_norm() {
        // Two ranks, three micro-batches, one in flight (1F1B-like window of 1).
        let mut t = Trainer::new(cfg(3, 1, 2, None), 2);
        assert_eq!(names(&t.start_step()), ["start 0"]);
        t.on_loss(2.0);
        assert!(t.on_micro_batch_done(0, 0, 1.0).is_empty(), "rank 1 still holds micro-batch 0");
        assert_eq!(names(&t.on_micro_batch_done(1, 0, 1.0)), ["start 1"]);
        assert_eq!(names(&t.on_micro_batch_done(0, 1, 2.0)), Vec::<String>::new());
        assert_eq!(names(&t.on_micro_batch_done(1, 1, 2.0)), ["start 2"]);
        t.on_loss(4.0);
        assert!(names(&t.on_micro_batch_done(0, 2, 9.0)).is_empty());
        // Every rank has every micro-batch: norm sqrt(9 + 16) = 5, clip 1 / 5, then step 2 starts.
        assert_eq!(names(&t.on_micro_batch_done(1, 2, 16.0)), ["update 1 clip 0.200", "start 0"]);
        assert_eq!(t.all_losses, vec![3.0]);
        assert_eq!(t.opt_step, 2);
        for mb in 0..3 {
            for r in 0..2 {
                let _ = t.on_micro_batch_done(r, mb, 0.25);
            }
        }
        // The last step: a small norm is not clipped up, and the loop finishes.
        assert_eq!(t.step, 2);
        assert_eq!(t.all_losses.len(), 2);
        assert!(t.all_losses[1].is_nan(), "no loss was reported for step 2");
    }

    #[test]
    fn checkpoints_gather_every_rank_then_go_on_and_finish() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(cfg(1, 1, 4, Some(dir.path().to_path_buf())), 2);
        let _ = t.start_step();
        let _ = t.on_micro_batch_done(0, 0, 0.0);
        assert_eq!(names(&t.on_micro_batch_done(1, 0, 0.0)), ["update 1 clip 1.000", "start 0"]);
        let _ = t.on_micro_batch_done(0, 0, 0.0);
        // Step 2 of 4, save_every 2: gather the state.
        assert_eq!(names(&t.on_micro_batch_done(1, 0, 0.0)), ["update 2 clip 1.000", "gather State"]);
        let a = AdapterGrads::from([("a".to_string(), (vec![1], vec![1.0]))]);
        let b = AdapterGrads::from([("b".to_string(), (vec![1], vec![2.0]))]);
        assert_eq!(names(&t.on_state(0, a).unwrap()), Vec::<String>::new());
        assert_eq!(names(&t.on_state(1, b).unwrap()), ["start 0"]);
        assert!(dir.path().join("checkpoint-2").exists());
        assert!(t.on_state(0, AdapterGrads::new()).is_err(), "not gathering now");
        for _ in 0..2 {
            let _ = t.on_micro_batch_done(0, 0, 0.0);
            let _ = t.on_micro_batch_done(1, 0, 0.0);
        }
        let _ = t.on_state(0, AdapterGrads::new());
        assert_eq!(names(&t.on_state(1, AdapterGrads::new()).unwrap()), ["finish"]);
        assert!(dir.path().join("checkpoint-4").exists());
        assert_eq!(t.checkpoints.len(), 2);
    }
}
