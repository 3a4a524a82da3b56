//! `Compute`: a rank's candle state on its own thread (a `SyncArbiter`, never the I/O
//! arbiter), thin over the plain runners.
//!
//! Frames for compute arrive from the node (from any rank, this one included): inference
//! steps run as their inputs arrive ([`StepRun`]); training micro-batches are delivered
//! their inputs and then picked by the scheduler ([`Compute::train_tick`]). Every output
//! leaves through one [`Outbox`] as soon as it exists, to whichever rank needs it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use actix::WeakAddr;
use candle_core::{DType, Device, Tensor};
use lemur_protocol::wire::{DenseMatmul, Frame, Gather, KvMove, Message, RunKey, Segment, WireTensor};
use lemur_protocol::Phase;

use super::actors::Router;
use super::optimizer::{AdamW, AdapterState};
use crate::error::WorkerError;
use crate::exec::{Executor, KvCache, Seg, StepInput};
use crate::program::RankProgram;
use crate::program::{Outbound, Progress, StepRun};
use crate::tensor_wire::{from_wire, from_wire_all, to_wire, to_wire_all};
use crate::train::TrainRun;

/// Work for compute: a frame from rank `from`, or a scheduling tick.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) enum Work {
    Frame(Frame),
    /// Run the most urgent ready training micro-batch until it blocks (sent by Compute to
    /// itself, so that every message that arrived meanwhile is delivered before it chooses).
    Tick,
    /// The run's cluster is over (rank 0 is setting up a new placement): free the
    /// executor, weights and caches now rather than when the last address goes, so that
    /// rank 0 never holds two placements' weights at once.
    Release,
}

/// Traffic and timing of the requests in flight, reported to rank 0 when one finishes.
#[derive(Debug, Default)]
struct Traffic {
    /// Activation bytes sent since the last report (a finished request's `Stats`).
    bytes_sent: u64,
    frames_sent: u64,
    /// Per request: when its prefill started here, and the KV cache received since
    /// (bytes, and ms after the prefill's start when the last of it arrived).
    prefill_started: HashMap<u64, Instant>,
    handover: HashMap<u64, (u64, f64)>,
    /// Per op: total seconds and runs (timing on).
    op_time: HashMap<usize, (f64, u32)>,
    /// Training: the first step's op times, set aside (warm-up) and used only when the
    /// run has no other step.
    first_step_time: HashMap<usize, (f64, u32)>,
}

/// The candle state of a rank, on its own thread.
pub(super) struct Compute {
    pub me: u32,
    pub prog: Arc<RankProgram>,
    pub exec: Option<Executor>,
    pub router: Router,
    pub timing: bool,
    /// The cluster's id: fail points are named `{cluster}/rank{r}/...`, so that clusters
    /// in one test process fail only where their test says.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub cluster_id: String,
    /// When quantized linear ops multiply by their dequantized weight.
    pub dense_matmul: DenseMatmul,
    runs: HashMap<RunKey, StepRun>,
    trains: HashMap<RunKey, TrainRun>,
    /// Inputs that arrived before their step or micro-batch started.
    early: HashMap<RunKey, Vec<(usize, Vec<Tensor>)>>,
    early_grads: HashMap<RunKey, Vec<(usize, usize, Vec<Tensor>)>>,
    adapters: AdapterState,
    traffic: Traffic,
    /// Optimizer steps this process has applied.
    updates: u64,
    /// Its own address, and whether a Tick is already queued.
    /// (Weak: an actor holding its own address would never stop, and every re-plan's
    /// executor, weights and all, would stay behind.)
    me_addr: Option<WeakAddr<Compute>>,
    tick_pending: bool,
    /// The most training micro-batches held at once.
    peak_runs: u32,
    /// Steps and micro-batches started lately, and KV caches handed over (request, layer,
    /// the step that sent it): a frame that arrives twice is dropped the second time.
    started: Recent<RunKey>,
    handed_over: Recent<(u64, u32, u64)>,
}

/// Keys seen lately, the oldest forgotten past a bound: how a duplicated frame is told.
struct Recent<K> {
    set: HashSet<K>,
    order: VecDeque<K>,
}

impl<K: std::hash::Hash + Eq + Copy> Recent<K> {
    const KEEP: usize = 4096;

    fn new() -> Self {
        Self { set: HashSet::new(), order: VecDeque::new() }
    }

    /// Whether `k` is new; remembers it.
    fn first(&mut self, k: K) -> bool {
        if !self.set.insert(k) {
            return false;
        }
        self.order.push_back(k);
        if self.order.len() > Self::KEEP {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn contains(&self, k: &K) -> bool {
        self.set.contains(k)
    }
}

impl Actor for Compute {
    type Context = SyncContext<Self>;
}

/// Encodes a run's outputs and hands them to the router as they are produced.
struct Outbox<'a> {
    key: RunKey,
    router: &'a Router,
    bytes: &'a mut u64,
    frames: &'a mut u64,
    op_time: &'a mut HashMap<usize, (f64, u32)>,
    error: Option<WorkerError>,
}

impl Outbox<'_> {
    fn send(&mut self, o: Outbound) {
        if self.error.is_none() {
            if let Err(e) = self.try_send(o) {
                self.error = Some(e);
            }
        }
    }

    fn to(&mut self, rank: u32, frame: Frame) -> Result<(), WorkerError> {
        if rank != self.router.me {
            *self.bytes += frame.tensors.iter().map(|b| b.len() as u64).sum::<u64>();
            *self.frames += 1;
        }
        self.router.send(rank, frame)
    }

    fn try_send(&mut self, o: Outbound) -> Result<(), WorkerError> {
        let RunKey { request, step } = self.key;
        match o {
            Outbound::Activation { to, from_op, tensors } => {
                let (metas, datas) = to_wire_all(tensors.iter())?;
                let msg = Message::Activation { request_id: request, step, from_op, tensors: metas };
                self.to(to, Frame { message: msg, tensors: datas })
            }
            Outbound::Gradient { to, from_op, to_op, tensors } => {
                let (metas, datas) = to_wire_all(tensors.iter())?;
                let msg = Message::Gradient { opt_step: request, micro_batch: step, from_op, to_op, tensors: metas };
                self.to(to, Frame { message: msg, tensors: datas })
            }
            Outbound::Logits { logits } => {
                let rows = logits.squeeze(0)?.to_dtype(DType::F32)?;
                let (m, d) = to_wire(&rows)?;
                let msg = Message::Logits { step_id: request, logits: m };
                self.to(0, Frame { message: msg, tensors: vec![d] })
            }
            Outbound::Loss { loss } => {
                self.to(0, Frame::control(Message::Loss { opt_step: request, micro_batch: step, loss }))
            }
            Outbound::Kv { to, request, layer, cache } => {
                let (metas, datas) = to_wire_all([&cache.keys()?.contiguous()?, &cache.values()?.contiguous()?])?;
                let (start, step_id) = (cache.start as u64, self.key.request);
                let msg = Message::KvHandover { request_id: request, layer, start, step_id, tensors: metas };
                self.to(to, Frame { message: msg, tensors: datas })
            }
            Outbound::Timing { op, seconds } => {
                let e = self.op_time.entry(op).or_default();
                e.0 += seconds;
                e.1 += 1;
                Ok(())
            }
        }
    }
}

impl Compute {
    /// A compute actor without its executor yet (the actor system builds it on its thread).
    pub fn new(me: u32, prog: Arc<RankProgram>, router: Router, timing: bool) -> Self {
        Self {
            me,
            prog,
            exec: None,
            router,
            timing,
            cluster_id: String::new(),
            dense_matmul: DenseMatmul::Never,
            runs: HashMap::new(),
            trains: HashMap::new(),
            early: HashMap::new(),
            early_grads: HashMap::new(),
            adapters: AdapterState::default(),
            traffic: Traffic::default(),
            updates: 0,
            me_addr: None,
            tick_pending: false,
            peak_runs: 0,
            started: Recent::new(),
            handed_over: Recent::new(),
        }
    }

    fn device(&self) -> Device {
        self.exec.as_ref().map(|e| e.device.clone()).unwrap_or(Device::Cpu)
    }

    fn exec_mut(&mut self) -> Result<&mut Executor, WorkerError> {
        self.exec.as_mut().ok_or_else(|| WorkerError::Plan("executor missing".into()))
    }

    /// Where a run's outputs go as they are produced.
    fn outbox(&mut self, key: RunKey) -> Outbox<'_> {
        Outbox {
            key,
            router: &self.router,
            bytes: &mut self.traffic.bytes_sent,
            frames: &mut self.traffic.frames_sent,
            op_time: &mut self.traffic.op_time,
            error: None,
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), WorkerError> {
        let wire = frame.wire_tensors();
        let nth = |i: usize| wire.get(i).ok_or_else(|| WorkerError::Wire("a message without its tensors".into()));
        match frame.message {
            Message::Start { step_id, phase, segments, placement, moves, keep_kv, .. } => {
                let key = RunKey { request: step_id, step: 0 };
                if !self.started.first(key) {
                    tracing::debug!(rank = self.me, step_id, "a second start of the step; dropped");
                    return Ok(());
                }
                let layout = StepLayout { placement, moves, keep_kv };
                self.start_step(key, phase, &segments, nth(0)?, layout)
            }
            Message::StartMicroBatch { opt_step, micro_batch, .. } => {
                let key = RunKey { request: opt_step, step: micro_batch };
                if !self.started.first(key) {
                    tracing::debug!(
                        rank = self.me,
                        opt_step,
                        micro_batch,
                        "a second start of the micro-batch; dropped"
                    );
                    return Ok(());
                }
                self.start_micro_batch(key, nth(0)?)
            }
            Message::Activation { request_id, step, from_op, .. } => {
                let ts = from_wire_all(&wire, &self.device())?;
                self.activation(RunKey { request: request_id, step }, from_op, ts)
            }
            Message::Gradient { opt_step, micro_batch, from_op, to_op, .. } => {
                let key = RunKey { request: opt_step, step: micro_batch };
                tracing::debug!(?key, from_op, to_op, "gradient in");
                let ts = from_wire_all(&wire, &self.device())?;
                match self.trains.get_mut(&key) {
                    Some(run) => {
                        run.deliver_gradient(from_op, to_op, ts);
                        self.kick();
                    }
                    None if self.started.contains(&key) => self.late(key, from_op),
                    None => self.early_grads.entry(key).or_default().push((from_op, to_op, ts)),
                }
                Ok(())
            }
            Message::KvHandover { request_id, layer, start, step_id, .. } => {
                if !self.handed_over.first((request_id, layer, step_id)) {
                    tracing::debug!(rank = self.me, request_id, layer, "a second handover of the cache; dropped");
                    return Ok(());
                }
                let (k, v) = (nth(0)?.clone(), nth(1)?.clone());
                self.kv(request_id, layer, start, k, v)
            }
            Message::Update { t, lr, clip, weight_decay } => self.update(AdamW { t, lr, clip, weight_decay }),
            Message::Gather { opt_step, what } => self.gather(opt_step, what),
            Message::LoadAdapters { names, .. } => {
                let dev = self.device();
                let mut named = HashMap::new();
                for (n, t) in names.into_iter().zip(&wire) {
                    named.insert(n, from_wire(&t.meta, &t.data, &dev)?);
                }
                let exec = self.exec.as_ref().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
                self.adapters.load(&exec.adapters, &named)
            }
            Message::Finish { request_id } => self.finish(request_id),
            other => Err(WorkerError::Wire(format!("compute cannot handle `{}`", other.name()))),
        }
    }

    fn start_step(
        &mut self,
        key: RunKey,
        phase: Phase,
        segments: &[Segment],
        tokens: &WireTensor,
        layout: StepLayout,
    ) -> Result<(), WorkerError> {
        let prog = self.prog.clone();
        let RankProgram::Infer(prog) = prog.as_ref() else {
            return Err(WorkerError::Plan("an inference step under a training plan".into()));
        };
        let tokens = from_wire(&tokens.meta, &tokens.data, &self.device())?;
        let segments = check_segments(segments, &tokens)?;
        prog.placement(layout.placement)?;
        // The caches this step's placement needs elsewhere leave before it runs.
        let mut incoming = HashSet::new();
        for m in &layout.moves {
            if m.from == m.to || !segments.iter().any(|g| g.request == m.request_id) {
                return Err(WorkerError::Wire(format!(
                    "start: a move of request {}'s layer {} cache from rank {} to rank {} that the step cannot use",
                    m.request_id, m.layer, m.from, m.to
                )));
            }
            if m.to == self.me {
                incoming.insert((m.request_id, m.layer));
            }
            if m.from != self.me {
                continue;
            }
            let cache = self.exec_mut()?.kv.remove(&(m.request_id, m.layer)).ok_or_else(|| {
                WorkerError::Plan(format!(
                    "rank {} holds no KV cache of request {} layer {} to move to rank {}",
                    self.me, m.request_id, m.layer, m.to
                ))
            })?;
            let mut out = self.outbox(key);
            out.send(Outbound::Kv { to: m.to, request: m.request_id, layer: m.layer, cache });
            if let Some(e) = out.error.take() {
                return Err(e);
            }
        }
        if phase == Phase::Prefill {
            for g in segments.iter().filter(|g| g.position == 0) {
                self.traffic.prefill_started.insert(g.request, Instant::now());
            }
        }
        let dense = self.dense_matmul.applies(phase);
        let input = StepInput { tokens, segments, targets: None, dropout_seed: 0, dense };
        let mut run = StepRun::new(key.request, phase, input);
        (run.timing, run.placement, run.incoming, run.keep_kv) =
            (self.timing, layout.placement, incoming, layout.keep_kv);
        for (from_op, ts) in self.early.remove(&key).unwrap_or_default() {
            run.deliver(from_op, ts);
        }
        self.runs.insert(key, run);
        self.step(key)
    }

    fn start_micro_batch(&mut self, key: RunKey, tokens: &WireTensor) -> Result<(), WorkerError> {
        if !matches!(self.prog.as_ref(), RankProgram::Train(_)) {
            return Err(WorkerError::Plan("a training micro-batch under an inference plan".into()));
        }
        let all = from_wire(&tokens.meta, &tokens.data, &self.device())?;
        let s = all.dim(1)?;
        if s < 2 {
            return Err(WorkerError::Plan("a training sequence needs at least two tokens".into()));
        }
        let input = StepInput {
            targets: Some(all.narrow(1, 1, s - 1)?),
            dropout_seed: key.request.wrapping_mul(0x9E37_79B9) ^ u64::from(key.step),
            ..StepInput::single(key.request, all.narrow(1, 0, s - 1)?, 0)?
        };
        let mut run = TrainRun::new(key.request, key.step, input);
        run.timing = self.timing;
        for (from_op, ts) in self.early.remove(&key).unwrap_or_default() {
            run.deliver_activation(from_op, ts);
        }
        for (from_op, to_op, ts) in self.early_grads.remove(&key).unwrap_or_default() {
            run.deliver_gradient(from_op, to_op, ts);
        }
        self.trains.insert(key, run);
        self.peak_runs = self.peak_runs.max(self.trains.len() as u32);
        self.kick();
        Ok(())
    }

    fn activation(&mut self, key: RunKey, from_op: usize, ts: Vec<Tensor>) -> Result<(), WorkerError> {
        if matches!(self.prog.as_ref(), RankProgram::Train(_)) {
            match self.trains.get_mut(&key) {
                Some(run) => {
                    run.deliver_activation(from_op, ts);
                    self.kick();
                }
                None if self.started.contains(&key) => self.late(key, from_op),
                None => self.early.entry(key).or_default().push((from_op, ts)),
            }
            return Ok(());
        }
        match self.runs.get_mut(&key) {
            Some(run) => {
                run.deliver(from_op, ts);
                self.step(key)
            }
            None if self.started.contains(&key) => {
                self.late(key, from_op);
                Ok(())
            }
            None => {
                self.early.entry(key).or_default().push((from_op, ts));
                Ok(())
            }
        }
    }

    /// An input for a step or micro-batch that has ended: a duplicate, dropped.
    fn late(&self, key: RunKey, from_op: usize) {
        tracing::debug!(rank = self.me, ?key, from_op, "an input after its run ended; dropped");
    }

    fn kv(&mut self, request: u64, layer: u32, start: u64, k: WireTensor, v: WireTensor) -> Result<(), WorkerError> {
        let bytes = (k.data.len() + v.data.len()) as u64;
        let since = self.traffic.prefill_started.get(&request).map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let h = self.traffic.handover.entry(request).or_default();
        h.0 += bytes;
        h.1 = h.1.max(since);
        let ts = from_wire_all(&[k, v], &self.device())?;
        let cache = KvCache::new(&ts[0], &ts[1], start as usize)?;
        self.exec_mut()?.kv.insert((request, layer), cache);
        // A decode step may have been waiting for this cache.
        let waiting: Vec<_> = self.runs.iter().filter(|(_, r)| r.serves(request)).map(|(k, _)| *k).collect();
        for key in waiting {
            self.step(key)?;
        }
        Ok(())
    }

    /// Runs an inference step's local ops until it blocks or ends.
    fn step(&mut self, key: RunKey) -> Result<(), WorkerError> {
        let Some(mut run) = self.runs.remove(&key) else { return Ok(()) };
        let prog = self.prog.clone();
        let RankProgram::Infer(prog) = prog.as_ref() else {
            return Err(WorkerError::Plan("an inference step under a training plan".into()));
        };
        let mut exec = self.exec.take().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        let mut out = self.outbox(key);
        // Each output leaves as soon as its op has run.
        let progress = run.advance(prog, &mut exec, &mut |o| out.send(o));
        let failed = out.error.take();
        self.exec = Some(exec);
        let progress = progress?;
        if let Some(e) = failed {
            return Err(e);
        }
        if progress == Progress::Blocked {
            self.runs.insert(key, run);
        }
        Ok(())
    }

    /// Queues a Tick unless one is queued.
    fn kick(&mut self) {
        if !self.tick_pending {
            if let Some(a) = self.me_addr.as_ref().and_then(WeakAddr::upgrade) {
                a.do_send(Work::Tick);
                self.tick_pending = true;
            }
        }
    }

    /// Training's scheduler: finishes micro-batches that have run all their ops here, then
    /// picks the micro-batch to run until it blocks, backward before forward and older
    /// micro-batches first (1F1B's rule: a backward op frees memory and unblocks the ranks
    /// upstream), then looks again once the messages that arrived meanwhile are delivered
    /// (the next Tick queues behind them). Messages only deliver inputs.
    fn train_tick(&mut self) -> Result<(), WorkerError> {
        let prog = self.prog.clone();
        let RankProgram::Train(prog) = prog.as_ref() else {
            return Err(WorkerError::Plan("a training step under an inference plan".into()));
        };
        let finished: Vec<RunKey> =
            self.trains.iter_mut().filter_map(|(k, r)| r.next_local(prog).is_none().then_some(*k)).collect();
        for key in finished {
            self.finish_micro_batch(key)?;
        }
        let best = self
            .trains
            .iter_mut()
            .filter_map(|(k, r)| match r.next_local(prog) {
                Some((true, backward)) => Some(((!backward, *k), *k)),
                _ => None,
            })
            .min();
        let Some((_, key)) = best else { return Ok(()) };
        let Some(mut run) = self.trains.remove(&key) else { return Ok(()) };
        let mut exec = self.exec.take().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        let mut out = self.outbox(key);
        // Until it blocks: one Tick per stretch of ready ops, not per op (a Tick travels
        // through the actor system's thread, which is busy when the cores are).
        let progress = run.advance(prog, &mut exec, &mut |o| out.send(o), usize::MAX);
        let failed = out.error.take();
        self.exec = Some(exec);
        progress?;
        if let Some(e) = failed {
            return Err(e);
        }
        let done = run.next_local(prog).is_none();
        self.trains.insert(key, run);
        if done {
            self.finish_micro_batch(key)?;
        }
        self.kick();
        Ok(())
    }

    /// A micro-batch ran all its ops here: fold its gradients into the step's and report
    /// the norm so far to rank 0.
    fn finish_micro_batch(&mut self, key: RunKey) -> Result<(), WorkerError> {
        let Some(run) = self.trains.remove(&key) else { return Ok(()) };
        self.adapters.accumulate(run.lora_grads)?;
        let sumsq = self.adapters.grad_sumsq()?;
        let msg = Message::MicroBatchDone { rank: self.me, opt_step: key.request, micro_batch: key.step, sumsq };
        self.router.send(0, Frame::control(msg))
    }

    fn update(&mut self, h: AdamW) -> Result<(), WorkerError> {
        let exec = self.exec.as_ref().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        self.adapters.step(&exec.adapters, h)?;
        if self.updates == 0 {
            self.traffic.first_step_time = std::mem::take(&mut self.traffic.op_time);
        }
        self.updates += 1;
        // Fault injection for tests (tikv-style fail points): die right after an update.
        #[cfg(feature = "failpoints")]
        if fail::eval(&format!("{}/rank{}/after-update-{}", self.cluster_id, self.me, h.t), |_| ()).is_some() {
            tracing::error!(rank = self.me, t = h.t, "fail point: crashing");
            self.router.crash.do_send(super::actors::Crash(format!("fail point after update {}", h.t)));
        }
        Ok(())
    }

    /// Sends rank 0 this rank's adapters (f32, by PEFT name).
    fn gather(&mut self, opt_step: u64, what: Gather) -> Result<(), WorkerError> {
        let exec = self.exec.as_ref().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        let mut names = Vec::new();
        let mut f32s = Vec::new();
        for (n, t) in self.adapters.gather(&exec.adapters, what) {
            names.push(n);
            f32s.push(t.to_dtype(DType::F32)?);
        }
        let (metas, datas) = to_wire_all(f32s.iter())?;
        let msg = Message::Adapters { rank: self.me, opt_step, names, tensors: metas };
        self.router.send(0, Frame { message: msg, tensors: datas })
    }

    /// A request is over: drop its state and report its traffic to rank 0.
    fn finish(&mut self, request: u64) -> Result<(), WorkerError> {
        self.exec_mut()?.finish(request);
        // Inference steps are keyed by step, not request, and rank 0 finishes a request only
        // between its steps; training's are keyed by optimizer step.
        if matches!(self.prog.as_ref(), RankProgram::Train(_)) {
            self.early.retain(|k, _| k.request != request);
        }
        let t = &mut self.traffic;
        let bytes_sent = std::mem::take(&mut t.bytes_sent);
        let (handover_bytes, handover_ms) = t.handover.remove(&request).unwrap_or_default();
        t.prefill_started.remove(&request);
        if t.op_time.is_empty() {
            t.op_time = std::mem::take(&mut t.first_step_time);
        }
        let mut op_ms: Vec<(usize, f64)> =
            t.op_time.drain().map(|(op, (s, n))| (op, s * 1e3 / f64::from(n.max(1)))).collect();
        op_ms.sort_by_key(|x| x.0);
        let msg = Message::Stats {
            rank: self.me,
            request_id: request,
            bytes_sent,
            frames_sent: t.frames_sent,
            handover_bytes,
            handover_ms,
            op_ms,
            peak_runs: self.peak_runs,
            peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
            kernel_paths: if self.timing { crate::qmm::report() } else { vec![] },
        };
        self.router.send(0, Frame::control(msg))
    }
}

/// Where a `Start` runs: the plan set's placement, the caches that move for it, and
/// whether a finished prompt's caches stay where prefill left them.
struct StepLayout {
    placement: u32,
    moves: Vec<KvMove>,
    keep_kv: bool,
}

/// A `Start`'s segments, checked against its tokens (`[1, total]`): none empty, lengths
/// summing to the tokens, each request once.
fn check_segments(segments: &[Segment], tokens: &Tensor) -> Result<Vec<Seg>, WorkerError> {
    let bad = |why: String| WorkerError::Wire(format!("start: {why}"));
    let (b, total) = tokens.dims2()?;
    if b != 1 || segments.is_empty() {
        return Err(bad(format!("{} segments over tokens of shape [{b}, {total}]", segments.len())));
    }
    let mut seen = std::collections::HashSet::new();
    let mut sum = 0usize;
    let mut out = Vec::with_capacity(segments.len());
    for g in segments {
        if g.len == 0 || !seen.insert(g.request_id) {
            return Err(bad(format!("segment of request {} is empty or repeated", g.request_id)));
        }
        sum += g.len as usize;
        let position = usize::try_from(g.position).map_err(|_| bad(format!("position {}", g.position)))?;
        out.push(Seg { request: g.request_id, position, len: g.len as usize, last: g.last });
    }
    if sum != total {
        return Err(bad(format!("segments hold {sum} tokens, the step carries {total}")));
    }
    Ok(out)
}

/// The most memory this process has held resident (`VmHWM`), where the OS says (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Handler<Work> for Compute {
    type Result = ();
    fn handle(&mut self, w: Work, ctx: &mut Self::Context) {
        if self.me_addr.is_none() {
            self.me_addr = Some(ctx.address().downgrade());
        }
        let r = match w {
            Work::Frame(frame) => self.on_frame(frame),
            Work::Tick => {
                self.tick_pending = false;
                self.train_tick()
            }
            Work::Release => {
                (self.exec, self.runs, self.trains) = (None, HashMap::new(), HashMap::new());
                (self.early, self.early_grads) = (HashMap::new(), HashMap::new());
                // The actor itself stops once the node drops its address.
                return;
            }
        };
        if let Err(e) = r {
            let _ = self.router.send(0, Frame::control(Message::Error { rank: self.me, message: e.to_string() }));
        }
    }
}
