//! `Node`: a rank's router between its peers and its compute, and on rank 0 the leader
//! that drives a request (prefill, then one decode step per token), gathers every rank's
//! stats and reports the [`Outcome`]. Training's loop is in `trainer`.
//!
//! Frames from any rank, this one included, arrive as [`Inbound`]: work for compute goes
//! to compute; results for the leader (logits, losses, stats, errors) go to its handlers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use lemur_protocol::wire::{Frame, Message};
use lemur_protocol::Phase;

use super::actors::{Crash, Inbound, PeerDown, Router};
use super::compute::{Compute, Work};
use super::job::TrainLoop;
use super::job::{AdapterGrads, Job, Outcome, TokenSink};
use super::trainer::{TrainAction, Trainer};
use crate::error::WorkerError;
use crate::sampling::{Sampler, Sampling};
use crate::tensor_wire::{f32_to_wire, f32_values, ids_to_wire};

/// Where the runtime leaves rank 0's outcome (or any rank's error) for `run_node`.
pub(super) type Shared = Arc<Mutex<Option<Result<Option<Outcome>, WorkerError>>>>;

/// What rank 0 is asked to run, once the actors are up.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Begin(pub Job);

/// Per rank, what it reported when a request finished.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RankStats {
    pub bytes_sent: u64,
    pub handover_bytes: u64,
    pub handover_ms: f64,
    pub peak_runs: u32,
    pub peak_rss_bytes: u64,
}

/// Rank 0's state of the request in flight.
pub(super) struct LeaderState {
    pub request: u64,
    prompt_len: usize,
    max_new_tokens: usize,
    eos: Option<u32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    pub started: Instant,
    pub first: Option<Duration>,
    step_started: Instant,
    decode_times: Vec<Duration>,
    stats: HashMap<u32, RankStats>,
    op_ms: HashMap<usize, f64>,
    pub done: bool,
    sampler: Sampler,
    sampling: Sampling,
    on_token: Option<TokenSink>,
    prompt: Vec<u32>,
    repeats_left: usize,
    /// Training: the last micro-batch's loss, the gathered adapter gradients, the ranks
    /// that sent theirs.
    pub loss: Option<f64>,
    pub lora_grads: AdapterGrads,
    pub adapter_ranks: std::collections::HashSet<u32>,
    pub trainer: Option<Trainer>,
    /// Finished requests: (ttft, mean time per token, per-op ms).
    history: Vec<(Duration, Option<Duration>, HashMap<usize, f64>)>,
}

/// Routes frames and, on rank 0, drives the request.
pub(super) struct Node {
    pub me: u32,
    pub n: u32,
    pub router: Router,
    pub compute: Addr<Compute>,
    pub leader: Option<LeaderState>,
    pub result: Shared,
    pub shutting_down: bool,
}

impl Actor for Node {
    type Context = Context<Self>;
}

impl Node {
    /// Ends this rank's run with `r`: tells every peer, then stops the system.
    pub fn finish_with(&mut self, r: Result<Option<Outcome>, WorkerError>, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        let reason = match &r {
            Ok(_) => "done".to_string(),
            Err(e) => e.to_string(),
        };
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.router.to_peers(&Frame::control(Message::Shutdown { reason }));
        // Let the shutdown frames go out, then stop.
        ctx.run_later(Duration::from_millis(200), |_, _| System::current().stop());
    }

    /// Stops at once with `r`, telling no one (a lost leader, a shutdown, a crash).
    fn stop_now(&mut self, r: Result<Option<Outcome>, WorkerError>) {
        self.shutting_down = true;
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        System::current().stop();
    }

    fn broadcast_start(&mut self, step: u32, phase: Phase, position: u64, ids: &[u32]) {
        let Some(l) = &self.leader else { return };
        let tokens = ids_to_wire(&[ids]);
        let msg = Message::Start { request_id: l.request, step, phase, tokens: tokens.meta, position };
        self.router.broadcast(&Frame { message: msg, tensors: vec![tokens.data] });
    }

    fn on_logits(&mut self, step: u32, logits: Vec<f32>, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        if l.done || step as usize != l.tokens.len() {
            return;
        }
        let token = l.sampler.sample(&logits);
        if let Some(sink) = &l.on_token {
            (sink.0)(token);
        }
        let now = Instant::now();
        if step == 0 {
            l.first = Some(now - l.started);
        } else {
            l.decode_times.push(now - l.step_started);
        }
        l.tokens.push(token);
        l.logits.push(logits);
        if l.tokens.len() >= l.max_new_tokens || l.eos == Some(token) {
            self.end_request(ctx);
            return;
        }
        l.step_started = now;
        let position = (l.prompt_len + l.tokens.len() - 1) as u64;
        self.broadcast_start(step + 1, Phase::Decode, position, &[token]);
    }

    /// Sends adapter tensors to every rank (each keeps its own).
    pub fn load_everywhere(&mut self, tensors: &AdapterGrads) {
        let mut names = Vec::new();
        let mut metas = Vec::new();
        let mut datas = Vec::new();
        for (n, (shape, v)) in tensors {
            let w = f32_to_wire(shape, v);
            names.push(n.clone());
            metas.push(w.meta);
            datas.push(w.data);
        }
        let msg = Message::LoadAdapters { names, tensors: metas };
        self.router.broadcast(&Frame { message: msg, tensors: datas });
    }

    /// The current request is over: every rank drops its state and reports its stats;
    /// after them (or 5 s), the request completes.
    pub fn end_request(&mut self, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        l.done = true;
        let request = l.request;
        self.router.broadcast(&Frame::control(Message::Finish { request_id: request }));
        ctx.run_later(Duration::from_secs(5), move |act, ctx| {
            if act.leader.as_ref().is_some_and(|l| l.request == request && l.done) {
                act.complete_request(ctx);
            }
        });
    }

    /// A request is over (logits and stats are in): run it again, or report.
    fn complete_request(&mut self, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        if !l.done {
            return;
        }
        let tpot = if l.decode_times.is_empty() {
            None
        } else {
            Some(l.decode_times.iter().sum::<Duration>() / l.decode_times.len() as u32)
        };
        l.history.push((l.first.unwrap_or_default(), tpot, std::mem::take(&mut l.op_ms)));
        if l.repeats_left == 0 {
            self.report(ctx);
            return;
        }
        l.repeats_left -= 1;
        l.request += 1;
        l.tokens.clear();
        l.logits.clear();
        l.first = None;
        l.decode_times.clear();
        l.stats.clear();
        l.done = false;
        l.sampler = Sampler::new(l.sampling);
        let now = Instant::now();
        l.started = now;
        l.step_started = now;
        let prompt = l.prompt.clone();
        self.broadcast_start(0, Phase::Prefill, 0, &prompt);
    }

    fn report(&mut self, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_ref() else { return };
        // Medians over warm runs: all but the first when there are several.
        let warm = if l.history.len() > 1 { &l.history[1..] } else { &l.history[..] };
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v.get(v.len() / 2).copied()
        };
        let ttft = median(warm.iter().map(|h| h.0).collect()).unwrap_or_default();
        let tpot = median(warm.iter().filter_map(|h| h.1).collect());
        let mut op_ms: HashMap<usize, f64> = HashMap::new();
        let ops: std::collections::BTreeSet<usize> = warm.iter().flat_map(|h| h.2.keys().copied()).collect();
        for op in ops {
            let mut v: Vec<f64> = warm.iter().filter_map(|h| h.2.get(&op).copied()).collect();
            v.sort_by(f64::total_cmp);
            op_ms.insert(op, v[v.len() / 2]);
        }
        let stat = |r: u32| l.stats.get(&r).copied().unwrap_or_default();
        let outcome = Outcome {
            tokens: l.tokens.clone(),
            ttft,
            tpot,
            bytes_sent: (0..self.n).map(|r| stat(r).bytes_sent).collect(),
            logits: l.logits.clone(),
            handover_bytes: l.stats.values().map(|s| s.handover_bytes).sum(),
            handover_ms: l.stats.values().map(|s| s.handover_ms).fold(0.0, f64::max),
            peak_runs: (0..self.n).map(|r| stat(r).peak_runs).collect(),
            peak_rss_bytes: (0..self.n).map(|r| stat(r).peak_rss_bytes).collect(),
            op_ms,
            loss: l.loss,
            lora_grads: l.lora_grads.clone(),
            train_losses: l.trainer.as_ref().map(|t| t.all_losses.clone()).unwrap_or_default(),
            step_seconds: l.trainer.as_ref().map(|t| t.step_seconds.clone()).unwrap_or_default(),
            checkpoints: l.trainer.as_ref().map(|t| t.checkpoints.clone()).unwrap_or_default(),
        };
        self.finish_with(Ok(Some(outcome)), ctx);
    }

    fn begin_training(&mut self, tl: TrainLoop, ctx: &mut Context<Self>) {
        if let Some(tensors) = &tl.resume {
            self.load_everywhere(tensors);
        }
        let mut t = Trainer::new(tl, self.n);
        let actions = t.start_step();
        if let Some(l) = self.leader.as_mut() {
            l.trainer = Some(t);
        }
        self.run_train(actions, ctx);
    }

    /// Carries out what the training loop asks for.
    fn run_train(&mut self, actions: Vec<TrainAction>, ctx: &mut Context<Self>) {
        if let Some(l) = self.leader.as_mut() {
            if let Some(t) = &l.trainer {
                l.request = t.opt_step;
            }
        }
        for a in actions {
            match a {
                TrainAction::Broadcast(frame) => self.router.broadcast(&frame),
                TrainAction::Finish => {
                    if let Some(l) = self.leader.as_mut() {
                        l.first = Some(l.started.elapsed());
                    }
                    self.end_request(ctx);
                }
                TrainAction::Fail(e) => self.finish_with(Err(e), ctx),
            }
        }
    }

    fn on_loss(&mut self, loss: f64) {
        if let Some(l) = self.leader.as_mut() {
            l.loss = Some(loss);
            if let Some(t) = l.trainer.as_mut() {
                t.on_loss(loss);
            }
        }
    }

    fn on_micro_batch_done(&mut self, rank: u32, mb: u32, sumsq: f64, ctx: &mut Context<Self>) {
        let Some(t) = self.leader.as_mut().and_then(|l| l.trainer.as_mut()) else { return };
        let actions = t.on_micro_batch_done(rank, mb, sumsq);
        self.run_train(actions, ctx);
    }

    /// A rank's adapters: a checkpoint's state, or a gradient check's gradients (when every
    /// rank's are in, the check is over).
    fn on_adapters(&mut self, rank: u32, tensors: AdapterGrads, ctx: &mut Context<Self>) {
        let n = self.n;
        let Some(l) = self.leader.as_mut() else { return };
        let tensors = match l.trainer.as_mut().map(|t| t.on_state(rank, tensors)) {
            Some(Ok(actions)) => return self.run_train(actions, ctx),
            Some(Err(tensors)) => tensors,
            None => return,
        };
        l.lora_grads.extend(tensors);
        l.adapter_ranks.insert(rank);
        if l.adapter_ranks.len() as u32 != n || l.done {
            return;
        }
        l.first = Some(l.started.elapsed());
        self.end_request(ctx);
    }

    /// A frame for the leader (rank 0 only).
    fn on_leader_frame(&mut self, from: u32, frame: Frame, ctx: &mut Context<Self>) {
        let wire = frame.wire_tensors();
        match frame.message {
            Message::Logits { step, .. } => match wire.first().map(f32_values) {
                Some(Ok(v)) => self.on_logits(step, v, ctx),
                Some(Err(e)) => self.finish_with(Err(WorkerError::Peer { rank: from, message: e.to_string() }), ctx),
                None => {}
            },
            Message::MicroBatchDone { rank, micro_batch, sumsq, .. } => {
                self.on_micro_batch_done(rank, micro_batch, sumsq, ctx)
            }
            Message::Loss { loss, .. } => self.on_loss(loss),
            Message::Adapters { rank, names, .. } => {
                let mut grads = AdapterGrads::new();
                for (n, t) in names.into_iter().zip(&wire) {
                    match f32_values(t) {
                        Ok(v) => {
                            grads.insert(n, (t.meta.shape.clone(), v));
                        }
                        Err(e) => {
                            let e = WorkerError::Peer { rank, message: format!("adapter `{n}`: {e}") };
                            return self.finish_with(Err(e), ctx);
                        }
                    }
                }
                self.on_adapters(rank, grads, ctx);
            }
            Message::Stats {
                rank, bytes_sent, handover_bytes, handover_ms, op_ms, peak_runs, peak_rss_bytes, ..
            } => {
                if let Some(l) = self.leader.as_mut() {
                    l.op_ms.extend(op_ms);
                    let s = RankStats { bytes_sent, handover_bytes, handover_ms, peak_runs, peak_rss_bytes };
                    l.stats.insert(rank, s);
                    if l.done && l.stats.len() as u32 == self.n {
                        self.complete_request(ctx);
                    }
                }
            }
            Message::Error { rank, message } => self.finish_with(Err(WorkerError::Peer { rank, message }), ctx),
            other => tracing::warn!(rank = self.me, from, message = other.name(), "unexpected message"),
        }
    }
}

impl Handler<Inbound> for Node {
    type Result = ();
    fn handle(&mut self, m: Inbound, ctx: &mut Self::Context) {
        let from = m.from;
        match &m.frame.message {
            Message::Start { .. }
            | Message::StartMicroBatch { .. }
            | Message::Activation { .. }
            | Message::Gradient { .. }
            | Message::KvHandover { .. }
            | Message::Finish { .. }
            | Message::Update { .. }
            | Message::Gather { .. }
            | Message::LoadAdapters { .. } => {
                self.compute.do_send(Work::Frame(m.frame));
            }
            Message::Shutdown { reason } => {
                tracing::info!(rank = self.me, from, reason, "shutdown");
                self.stop_now(Ok(None));
            }
            Message::Error { rank, message } if self.me != 0 => {
                // Only rank 0 collects errors; one that reached here is passed on.
                let msg = Message::Error { rank: *rank, message: message.clone() };
                let _ = self.router.send(0, Frame::control(msg));
            }
            _ if self.me == 0 => self.on_leader_frame(from, m.frame, ctx),
            other => tracing::warn!(rank = self.me, from, message = other.name(), "unexpected message"),
        }
    }
}

impl Handler<Begin> for Node {
    type Result = ();
    fn handle(&mut self, Begin(job): Begin, ctx: &mut Self::Context) {
        let now = Instant::now();
        self.leader = Some(LeaderState {
            request: 1,
            prompt_len: job.prompt.len(),
            max_new_tokens: job.max_new_tokens,
            eos: job.eos,
            tokens: Vec::new(),
            logits: Vec::new(),
            started: now,
            first: None,
            step_started: now,
            decode_times: Vec::new(),
            stats: HashMap::new(),
            op_ms: HashMap::new(),
            done: false,
            sampler: Sampler::new(job.sampling),
            sampling: job.sampling,
            on_token: job.on_token,
            prompt: job.prompt.clone(),
            repeats_left: job.repeat.max(1) - 1,
            history: Vec::new(),
            loss: None,
            lora_grads: AdapterGrads::new(),
            adapter_ranks: std::collections::HashSet::new(),
            trainer: None,
        });
        if let Some(tensors) = &job.adapters {
            self.load_everywhere(tensors);
        }
        if let Some(tl) = job.train_loop {
            self.begin_training(tl, ctx);
            return;
        }
        self.broadcast_start(0, Phase::Prefill, 0, &job.prompt);
    }
}

impl Handler<PeerDown> for Node {
    type Result = ();
    fn handle(&mut self, m: PeerDown, ctx: &mut Self::Context) {
        if self.shutting_down {
            return;
        }
        if self.me == 0 {
            self.finish_with(Err(WorkerError::Peer { rank: m.rank, message: format!("lost: {}", m.reason) }), ctx);
        } else if m.rank == 0 {
            tracing::error!(rank = self.me, reason = m.reason, "lost the leader; exiting");
            self.stop_now(Err(WorkerError::Peer { rank: 0, message: format!("leader lost: {}", m.reason) }));
        } else {
            let msg = Message::Error { rank: m.rank, message: format!("lost: {}", m.reason) };
            let _ = self.router.send(0, Frame::control(msg));
        }
    }
}

impl Handler<Crash> for Node {
    type Result = ();
    fn handle(&mut self, m: Crash, _ctx: &mut Self::Context) {
        self.stop_now(Err(WorkerError::Peer { rank: self.me, message: m.0 }));
    }
}
