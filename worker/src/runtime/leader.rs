//! `Node`: a rank's router between its peers and its compute, and on rank 0 the leader:
//! it runs the continuous-batching [`Scheduler`]'s steps, hands each request's tokens to
//! whoever asked for it (a one-shot job here, or a client of the server in `serving`),
//! gathers every rank's stats and reports the [`Outcome`]. Training's loop is in `trainer`.
//!
//! Frames from any rank, this one included, arrive as [`Inbound`]: work for compute goes
//! to compute; results for the leader (logits, losses, stats, errors) go to its handlers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use lemur_protocol::wire::{Frame, Message};

use super::actors::{Crash, Inbound, PeerDown, Router};
use super::compute::{Compute, Work};
use super::job::TrainLoop;
use super::job::{AdapterGrads, Job, Outcome, TokenSink};
use super::serving::{Serving, Sink};
use super::trainer::{TrainAction, Trainer};
use crate::batch::{BatchConfig, Event, Request, Scheduler};
use crate::error::WorkerError;
use crate::placement::{Placed, Placer};
use crate::tensor_wire::{f32_to_wire, f32_values, ids_to_wire};

/// Where the runtime leaves rank 0's outcome (or any rank's error) for `run_node`.
pub(super) type Shared = Arc<Mutex<Option<Result<Option<Outcome>, WorkerError>>>>;

/// What rank 0 is asked to run, once the actors are up.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Begin(pub Job, pub Option<Placer>);

/// Per rank, what it reported when a request finished.
#[derive(Debug, Clone, Default)]
pub(super) struct RankStats {
    pub bytes_sent: u64,
    pub handover_bytes: u64,
    pub handover_ms: f64,
    pub peak_runs: u32,
    pub peak_rss_bytes: u64,
    pub kernel_paths: Vec<String>,
}

/// Rank 0's state of the request in flight.
pub(super) struct LeaderState {
    pub request: u64,
    /// The one-shot request, submitted again for each repeat.
    template: Option<Request>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    pub started: Instant,
    pub first: Option<Duration>,
    step_started: Instant,
    decode_times: Vec<Duration>,
    stats: HashMap<u32, RankStats>,
    op_ms: HashMap<usize, f64>,
    pub done: bool,
    on_token: Option<TokenSink>,
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
    /// Ranks in the cluster file.
    pub n: u32,
    /// Ranks of the current run (rank 0 first).
    pub active: Vec<u32>,
    /// The current run's cluster: frames and losses from an older one are ignored.
    pub epoch: u64,
    pub router: Router,
    pub compute: Addr<Compute>,
    pub leader: Option<LeaderState>,
    /// Rank 0's inference: the scheduler and whom each request's events go to.
    pub serving: Option<Serving>,
    /// Rank 0 serving: re-planning around lost ranks and bringing them back.
    pub failover: Option<super::failover::Failover>,
    pub result: Shared,
    pub shutting_down: bool,
    /// The longest a serving step may run.
    pub step_timeout: Duration,
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

    /// Runs the scheduler's next steps, as many as it has room and work for.
    pub(super) fn pump(&mut self) {
        let Some(serving) = self.serving.as_mut() else { return };
        if serving.down.is_some() || serving.replanning || serving.rejoin_pending {
            return;
        }
        while let Some(step) = serving.sched.next_step() {
            let now = Instant::now();
            serving.busy_since.get_or_insert(now);
            serving.step_started.insert(step.id, now);
            serving.steps += 1;
            serving.last_batch = step.segments.len();
            let tokens = ids_to_wire(&[&step.tokens]);
            let sched = &serving.sched;
            let (placed, keep_kv) = match serving.placer.as_mut() {
                Some(p) => (p.place(step.phase, &step.segments, |id| sched.remaining(id)), true),
                None => (Placed { placement: 0, moves: Vec::new() }, false),
            };
            let msg = Message::Start {
                step_id: step.id,
                phase: step.phase,
                tokens: tokens.meta,
                segments: step.segments,
                placement: placed.placement,
                moves: placed.moves,
                keep_kv,
            };
            self.router.broadcast(&Frame { message: msg, tensors: vec![tokens.data] });
        }
    }

    /// Hands the scheduler's events to whoever asked, frees finished requests' caches on
    /// every rank, and starts the next step.
    pub(super) fn dispatch(&mut self, events: Vec<Event>, ctx: &mut Context<Self>) {
        let Some(serving) = self.serving.as_mut() else { return };
        let mut gone = Vec::new();
        let mut job_events = Vec::new();
        for e in events {
            let (request, last) = match &e {
                Event::Token { request, .. } => (*request, false),
                Event::Done { request, .. } => (*request, true),
            };
            match serving.sinks.get(&request) {
                Some(Sink::Job) => job_events.push(e),
                Some(Sink::Client(tx)) => {
                    let closed = tx.send(e).is_err();
                    if closed && !last {
                        gone.push(request);
                    }
                }
                None => {}
            }
            if last {
                serving.sinks.remove(&request);
            }
        }
        // A client that went away cancels its request.
        let mut more = Vec::new();
        for id in gone {
            more.extend(serving.sched.cancel(id));
        }
        for id in serving.sched.take_frees() {
            if let Some(p) = serving.placer.as_mut() {
                p.forget(id);
            }
            self.router.broadcast(&Frame::control(Message::Finish { request_id: id }));
        }
        for e in job_events {
            self.job_event(e, ctx);
        }
        if !more.is_empty() {
            return self.dispatch(more, ctx);
        }
        self.pump();
        self.check_drained(ctx);
        self.maybe_rejoin(ctx);
    }

    fn on_logits(&mut self, step_id: u64, rows: Vec<f32>, shape: &[usize], ctx: &mut Context<Self>) {
        let Some(serving) = self.serving.as_mut() else { return };
        let vocab = shape.last().copied().unwrap_or(0).max(1);
        let rows: Vec<&[f32]> = rows.chunks(vocab).collect();
        let took = serving.step_started.remove(&step_id).map(|t| t.elapsed()).unwrap_or_default();
        tracing::debug!(step_id, rows = rows.len(), ms = took.as_secs_f64() * 1e3, "step done");
        let result = serving.sched.on_logits(step_id, &rows);
        if serving.sched.in_flight().is_empty() {
            if let Some(since) = serving.busy_since.take() {
                serving.busy += since.elapsed();
            }
        }
        match result {
            Ok(events) => self.dispatch(events, ctx),
            Err(e) => tracing::warn!(step_id, "{e}"),
        }
    }

    /// The one-shot job's tokens (rank 0 of `lemur-worker`).
    fn job_event(&mut self, e: Event, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        match e {
            Event::Token { token, logits, index, .. } => {
                if let Some(sink) = &l.on_token {
                    (sink.0)(token);
                }
                let now = Instant::now();
                if index == 0 {
                    l.first = Some(now - l.started);
                } else {
                    l.decode_times.push(now - l.step_started);
                }
                l.step_started = now;
                l.tokens.push(token);
                l.logits.extend(logits);
            }
            Event::Done { request, .. } => {
                l.done = true;
                Self::await_stats(request, ctx);
            }
        }
    }

    /// Submits the one-shot job's request (again, for a repeat).
    fn submit_job(&mut self, ctx: &mut Context<Self>) {
        let (Some(l), Some(serving)) = (self.leader.as_mut(), self.serving.as_mut()) else { return };
        let Some(mut req) = l.template.clone() else { return };
        req.id = l.request;
        if let Err(e) = serving.sched.submit(req) {
            return self.finish_with(Err(WorkerError::Request(e.to_string())), ctx);
        }
        serving.sinks.insert(l.request, Sink::Job);
        self.pump();
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

    /// A training run (or gradient check) is over: every rank drops its state and reports
    /// its stats; after them (or 5 s), it completes.
    pub fn end_request(&mut self, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        l.done = true;
        let request = l.request;
        self.router.broadcast(&Frame::control(Message::Finish { request_id: request }));
        Self::await_stats(request, ctx);
    }

    /// Every rank reports its stats on a request's Finish; the request completes after
    /// them, or after 5 s.
    fn await_stats(request: u64, ctx: &mut Context<Self>) {
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
        let now = Instant::now();
        l.started = now;
        l.step_started = now;
        self.submit_job(ctx);
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
        // Each rank's statistics, in rank order (defaults for a rank that sent none).
        let stats: Vec<RankStats> = (0..self.n).map(|r| l.stats.get(&r).cloned().unwrap_or_default()).collect();
        let outcome = Outcome {
            tokens: l.tokens.clone(),
            ttft,
            tpot,
            bytes_sent: stats.iter().map(|s| s.bytes_sent).collect(),
            logits: l.logits.clone(),
            handover_bytes: l.stats.values().map(|s| s.handover_bytes).sum(),
            handover_ms: l.stats.values().map(|s| s.handover_ms).fold(0.0, f64::max),
            peak_runs: stats.iter().map(|s| s.peak_runs).collect(),
            peak_rss_bytes: stats.iter().map(|s| s.peak_rss_bytes).collect(),
            kernel_paths: stats.into_iter().map(|s| s.kernel_paths).collect(),
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
        let mut t = Trainer::new(tl, self.active.len() as u32);
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
        let n = self.active.len() as u32;
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
            Message::Logits { step_id, .. } => match wire.first().map(|t| (f32_values(t), &t.meta.shape)) {
                Some((Ok(v), shape)) => self.on_logits(step_id, v, &shape.clone(), ctx),
                Some((Err(e), _)) => self.fail(WorkerError::Peer { rank: from, message: e.to_string() }, ctx),
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
                rank,
                request_id,
                bytes_sent,
                handover_bytes,
                handover_ms,
                op_ms,
                peak_runs,
                peak_rss_bytes,
                kernel_paths,
                ..
            } => {
                if let Some(r) = self.serving.as_mut().and_then(|s| s.ranks.get_mut(rank as usize)) {
                    r.peak_rss_bytes = r.peak_rss_bytes.max(peak_rss_bytes);
                    r.bytes_sent += bytes_sent;
                }
                if let Some(l) = self.leader.as_mut().filter(|l| l.request == request_id || l.trainer.is_some()) {
                    l.op_ms.extend(op_ms);
                    let s =
                        RankStats { bytes_sent, handover_bytes, handover_ms, peak_runs, peak_rss_bytes, kernel_paths };
                    l.stats.insert(rank, s);
                    if l.done && l.stats.len() == self.active.len() {
                        self.complete_request(ctx);
                    }
                }
            }
            Message::Error { rank, message } => self.fail(WorkerError::Peer { rank, message }, ctx),
            other => tracing::warn!(rank = self.me, from, message = other.name(), "unexpected message"),
        }
    }

    /// Something failed on a rank: a one-shot run ends with the error; a server fails the
    /// requests it holds and answers 503 from then on.
    pub(super) fn fail(&mut self, e: WorkerError, ctx: &mut Context<Self>) {
        if self.leader.is_some() {
            return self.finish_with(Err(e), ctx);
        }
        // With failover, a rank's failure is planned around.
        if let (Some(_), Some(_), WorkerError::Peer { rank, message }) = (&self.failover, &self.serving, &e) {
            if *rank != 0 && self.active.contains(rank) {
                return self.lose(*rank, message.clone(), ctx);
            }
        }
        let Some(serving) = self.serving.as_mut() else { return self.finish_with(Err(e), ctx) };
        tracing::error!("the cluster is down: {e}");
        serving.down.get_or_insert_with(|| e.to_string());
        serving.step_started.clear();
        let events = serving.sched.fail_all();
        self.dispatch(events, ctx);
    }
}

impl Handler<Inbound> for Node {
    type Result = ();
    fn handle(&mut self, m: Inbound, ctx: &mut Self::Context) {
        if m.epoch != self.epoch {
            return;
        }
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
    fn handle(&mut self, Begin(job, placer): Begin, ctx: &mut Self::Context) {
        if let Some(cfg) = job.serve {
            // The model bounds every request; the plan's memory bounds them all together.
            let model = &job.plan.model;
            let cfg = BatchConfig {
                max_positions: cfg.max_positions.min(model.max_position_embeddings as usize),
                window: cfg.window.or(model.sliding_window.map(|w| w as usize)),
                kv_positions: cfg.kv_positions.or(job.kv_positions()),
                ..cfg
            };
            tracing::info!(?cfg, plan_set = placer.is_some(), "serving");
            let mut serving = Serving::new(Scheduler::new(cfg), self.n, &self.active);
            serving.placer = placer;
            if let Some(f) = &self.failover {
                for (r, why) in &f.lost {
                    serving.ranks[*r as usize].lost = Some(why.clone());
                }
                self.start_probing(ctx);
            }
            self.serving = Some(serving);
            // A step that never ends (a rank alive but stuck) must not hang its requests.
            ctx.run_interval(Duration::from_secs(1), |act, ctx| {
                let limit = act.step_timeout;
                let Some(s) = act.serving.as_ref() else { return };
                let late =
                    s.sched.in_flight().iter().find(|p| s.step_started.get(&p.id).is_some_and(|t| t.elapsed() > limit));
                if let Some(step) = late {
                    let msg = format!("step {} ran past the {:.0} s step limit", step.id, limit.as_secs_f64());
                    act.fail(WorkerError::Wire(msg), ctx);
                }
            });
            return;
        }
        let now = Instant::now();
        let template = (job.train_loop.is_none()).then(|| Request {
            id: 1,
            prompt: job.prompt.clone(),
            max_new_tokens: job.max_new_tokens,
            stop_tokens: job.eos.into_iter().collect(),
            sampling: job.sampling,
            keep_logits: true,
        });
        self.leader = Some(LeaderState {
            request: 1,
            template,
            tokens: Vec::new(),
            logits: Vec::new(),
            started: now,
            first: None,
            step_started: now,
            decode_times: Vec::new(),
            stats: HashMap::new(),
            op_ms: HashMap::new(),
            done: false,
            on_token: job.on_token,
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
        // One request alone: its whole prompt in one prefill step.
        let cfg = BatchConfig { prefill_chunk: usize::MAX, prefill_tokens: usize::MAX, ..BatchConfig::default() };
        self.serving = Some(Serving::new(Scheduler::new(cfg), self.n, &self.active));
        self.submit_job(ctx);
    }
}

impl Handler<PeerDown> for Node {
    type Result = ();
    fn handle(&mut self, m: PeerDown, ctx: &mut Self::Context) {
        if self.shutting_down || m.epoch != self.epoch {
            return;
        }
        if self.me == 0 {
            if self.failover.is_some() && self.serving.is_some() {
                return self.lose(m.rank, m.reason, ctx);
            }
            if let Some(r) = self.serving.as_mut().and_then(|s| s.ranks.get_mut(m.rank as usize)) {
                r.lost = Some(m.reason.clone());
            }
            self.fail(WorkerError::Peer { rank: m.rank, message: format!("lost: {}", m.reason) }, ctx);
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
