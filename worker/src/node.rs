//! A rank's runtime: connection set-up with timeouts, then three kinds of actix actors.
//!
//! - `Peer`: one per connected rank. Reads frames (`FramedRead` as a stream), writes them
//!   (`SinkWrite` over tokio's `FramedWrite`), sends a heartbeat every second and declares
//!   the peer dead after five silent seconds or a broken connection.
//! - `Compute`: owns the candle state ([`Executor`]) on a `SyncArbiter` thread, never on
//!   the I/O arbiter. It runs each step's local ops as their inputs arrive and sends
//!   outputs to the ranks that need them as soon as they exist.
//! - `Node`: routes frames between peers and compute; on rank 0 it drives the request
//!   (prefill, then one decode step per token) and gathers timings.
//!
//! Set-up: every rank binds its address; rank 0 connects to every rank, each rank s >= 1
//! connects to every rank t > s, all with a versioned handshake. Rank 0 sends the plan; each
//! rank validates it, loads only its weights and reports `Ready`. Flow control is by step:
//! rank 0 starts step n + 1 only after step n's logits, so in-flight data is one step's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::io::{SinkWrite, WriteHandler};
use actix::prelude::*;
use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use futures::{SinkExt, StreamExt};
use lemur_protocol::wire::{
    Frame, FrameCodec, FrameError, Hello, Message, TensorMeta, TrainSetup, WireDType, WireTensor,
};
use lemur_protocol::{Phase, Plan};
use serde::Serialize;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

use crate::cluster::Cluster;
use crate::error::WorkerError;
use crate::exec::{Executor, KvCache, StepInput};
use crate::program::{Outbound, Program, Progress, StepRun};
use crate::sampling::{Sampler, Sampling};
use crate::tensor_wire::{from_wire, to_wire, wire_dtype};
use crate::train::{TrainOut, TrainProgram, TrainRun};
use crate::weights::Checkpoint;

/// How long each wait may last.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting to a peer (it may still be starting).
    pub connect: Duration,
    /// Any single handshake or set-up read.
    pub handshake: Duration,
    /// A rank waiting for rank 0 to connect and send the plan.
    pub wait_for_leader: Duration,
    /// Loading weights on every rank.
    pub load: Duration,
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is dead.
    pub peer_dead: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
            wait_for_leader: Duration::from_secs(600),
            load: Duration::from_secs(600),
            heartbeat_interval: Duration::from_millis(1000),
            peer_dead: Duration::from_secs(5),
        }
    }
}

/// Called on rank 0 with every generated token as it is chosen (streaming).
#[derive(Clone)]
pub struct TokenSink(pub Arc<dyn Fn(u32) + Send + Sync>);

impl std::fmt::Debug for TokenSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSink")
    }
}

/// One optimizer step's figures, for progress bars and loss logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub seconds: f64,
}

/// Called on rank 0 after every optimizer step.
#[derive(Clone)]
pub struct StepSink(pub Arc<dyn Fn(&StepLog) + Send + Sync>);

impl std::fmt::Debug for StepSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepSink")
    }
}

/// The training loop rank 0 drives.
#[derive(Debug, Clone)]
pub struct TrainLoop {
    /// Training sequences of seq + 1 tokens (inputs and next-token targets).
    pub sequences: Vec<Vec<u32>>,
    /// Sequences per micro-batch, and micro-batches per optimizer step.
    pub batch: usize,
    pub micro_batches: usize,
    /// Micro-batches in flight at once: the next one starts when one has finished on every
    /// rank. `micro_batches` is GPipe (every forward before the backwards drain); the
    /// number of pipeline stages is 1F1B's bound on saved activations.
    pub inflight: usize,
    /// Optimizer steps in all, and the first one to run (resuming).
    pub steps: u64,
    pub start_step: u64,
    /// Peak learning rate, linear warm-up steps, cosine decay to `min_lr_ratio` of it.
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm (over every rank's adapters) to this.
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Save a checkpoint every this many steps and at the end, here.
    pub save_every: u64,
    pub output: Option<PathBuf>,
    pub adapter_config: crate::checkpoint::AdapterConfig,
    /// One forward and backward, then gather the gradients instead of stepping.
    pub grad_check: bool,
    /// Adapter tensors (and moments) to load before the first step.
    pub resume: Option<AdapterGrads>,
    pub prior_losses: Vec<f64>,
    pub on_step: Option<StepSink>,
}

impl TrainLoop {
    /// The learning rate of step `s` (0-based): linear warm-up, then cosine decay.
    pub fn lr_at(&self, s: u64) -> f64 {
        if s < self.warmup {
            return self.lr * (s + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((s - self.warmup) as f64 / span).min(1.0);
        self.lr
            * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }
}

/// What rank 0 runs.
#[derive(Debug, Clone)]
pub struct Job {
    pub plan: Plan,
    pub model_dir: PathBuf,
    pub dtype: DType,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub eos: Option<u32>,
    pub sampling: Sampling,
    pub on_token: Option<TokenSink>,
    /// Time every op on every rank (for validating the cost model).
    pub timing: bool,
    /// Run the request this many times; times reported are medians over all runs but the
    /// first (a cold start), when there are several.
    pub repeat: usize,
    /// Training plans: how to initialise the adapters, and the loop to run. Inference with
    /// trained adapters: their shape, and `adapters` their tensors (PEFT names).
    pub train: Option<TrainSetup>,
    pub train_loop: Option<TrainLoop>,
    pub adapters: Option<AdapterGrads>,
}

/// Everything a rank needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub rank: u32,
    pub cluster: Cluster,
    pub device: Device,
    /// Rank 0 only.
    pub job: Option<Job>,
    pub timeouts: Timeouts,
}

/// What rank 0 reports after a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub ttft: Duration,
    /// Mean time per output token after the first.
    pub tpot: Option<Duration>,
    /// Activation bytes sent by each rank, by rank.
    pub bytes_sent: Vec<u64>,
    /// Logits of every step (last position), kept for tests.
    pub logits: Vec<Vec<f32>>,
    /// KV cache handed over after prefill, bytes (all ranks).
    pub handover_bytes: u64,
    /// When the last of it arrived, from the prefill's start (the slowest rank), ms.
    pub handover_ms: f64,
    /// With timing on: every op's mean measured time, ms, by op id.
    pub op_ms: HashMap<usize, f64>,
    /// Training: the loss of the sequence, and every rank's LoRA gradients by PEFT name
    /// (`...lora_A.weight`): shape and values.
    pub loss: Option<f64>,
    pub lora_grads: AdapterGrads,
    /// Training: every step's mean loss (resumed runs include the earlier steps').
    pub train_losses: Vec<f64>,
    /// Training: every optimizer step's wall time, seconds (this run's steps only).
    pub step_seconds: Vec<f64>,
    /// Training: the most micro-batches each rank held at once, by rank.
    pub peak_runs: Vec<u32>,
    pub checkpoints: Vec<PathBuf>,
}

type Net = Framed<TcpStream, FrameCodec>;

/// A rank's view of the plan: inference or training.
enum Prog {
    Infer(Program),
    Train(TrainProgram),
}

impl Prog {
    fn new(plan: &Plan, rank: u32, cluster: &Cluster) -> Result<Self, WorkerError> {
        let map = cluster.rank_of_machine();
        Ok(if plan.workload.mode == "train" {
            Prog::Train(TrainProgram::new(plan, rank, &map)?)
        } else {
            Prog::Infer(Program::new(plan, rank, &map)?)
        })
    }

    fn local_weights(&self) -> std::collections::HashSet<(lemur_protocol::OpKind, Option<u32>)> {
        match self {
            Prog::Infer(p) => p.local_weights(),
            Prog::Train(p) => p.local_weights(),
        }
    }
}

/// Where the runtime leaves rank 0's outcome (or any rank's error) for `run_node`.
type Shared = Arc<Mutex<Option<Result<Option<Outcome>, WorkerError>>>>;

/// Activations that arrived before their step started, by (request, step).
type Early = HashMap<(u64, u32), Vec<(usize, Vec<Tensor>)>>;

/// Gradients that arrived before their step started: (from op, to op, tensors).
type EarlyGrads = HashMap<(u64, u32), Vec<(usize, usize, Vec<Tensor>)>>;

/// LoRA gradients by PEFT name: shape and values.
pub type AdapterGrads = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

async fn read_frame(net: &mut Net, limit: Duration, what: &str, peer: &str) -> Result<Frame, WorkerError> {
    match tokio::time::timeout(limit, net.next()).await {
        Err(_) => Err(WorkerError::Wire(format!("{peer}: no {what} within {:.0} s", limit.as_secs_f64()))),
        Ok(None) => Err(WorkerError::Wire(format!("{peer}: closed the connection before {what}"))),
        Ok(Some(r)) => Ok(r?),
    }
}

/// Connects to `addr`, retrying until `limit`, and shakes hands; returns the connection.
async fn dial(addr: &str, ours: &Hello, expect: u32, t: &Timeouts) -> Result<Net, WorkerError> {
    let deadline = Instant::now() + t.connect;
    let stream = loop {
        match TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(addr, error = %e, "peer not up yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(WorkerError::Peer { rank: expect, message: format!("cannot connect to {addr}: {e}") })
            }
        }
    };
    stream.set_nodelay(true)?;
    let mut net = Framed::new(stream, FrameCodec::default());
    net.send(Frame::control(Message::Hello(ours.clone()))).await?;
    let peer = format!("rank {expect} at {addr}");
    match read_frame(&mut net, t.handshake, "handshake", &peer).await?.message {
        Message::Hello(h) => h.check(ours, Some(expect)).map_err(|m| WorkerError::Peer { rank: expect, message: m })?,
        Message::Refused { reason } => {
            return Err(WorkerError::Peer { rank: expect, message: format!("refused us: {reason}") })
        }
        other => {
            return Err(WorkerError::Peer {
                rank: expect,
                message: format!("sent `{}` instead of a handshake", other.name()),
            })
        }
    }
    Ok(net)
}

/// Accepts one connection and shakes hands; returns the peer's rank and the connection.
async fn accept_one(listener: &TcpListener, ours: &Hello, n: u32, t: &Timeouts) -> Result<(u32, Net), WorkerError> {
    let (stream, from) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let mut net = Framed::new(stream, FrameCodec::default());
    let frame = read_frame(&mut net, t.handshake, "handshake", &from.to_string()).await?;
    let Message::Hello(h) = frame.message else {
        return Err(WorkerError::Wire(format!("{from} sent `{}` instead of a handshake", frame.message.name())));
    };
    let verdict = h.check(ours, None).and_then(|_| {
        if h.rank >= n || h.rank == ours.rank {
            Err(format!("rank {} is not a peer of rank {} in a cluster of {n}", h.rank, ours.rank))
        } else {
            Ok(())
        }
    });
    if let Err(reason) = verdict {
        let _ = net.send(Frame::control(Message::Refused { reason: reason.clone() })).await;
        return Err(WorkerError::Peer { rank: h.rank, message: reason });
    }
    net.send(Frame::control(Message::Hello(ours.clone()))).await?;
    Ok((h.rank, net))
}

fn u32_tensor(ids: &[u32]) -> (TensorMeta, Bytes) {
    let data: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    (TensorMeta { dtype: WireDType::U32, shape: vec![1, ids.len()] }, Bytes::from(data))
}

/// Runs a rank until its work is done. Rank 0 returns the request's outcome.
pub fn run_node(cfg: NodeConfig) -> Result<Option<Outcome>, WorkerError> {
    let system = actix::System::new();
    let result: Shared = Arc::new(Mutex::new(None));
    let res = result.clone();
    system.block_on(async move {
        if let Err(e) = start(cfg, res.clone()).await {
            *res.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e));
            System::current().stop();
        }
    });
    system.run()?;
    let out = result.lock().unwrap_or_else(|p| p.into_inner()).take();
    out.unwrap_or_else(|| Err(WorkerError::Wire("the runtime stopped without a result".into())))
}

async fn start(cfg: NodeConfig, result: Shared) -> Result<(), WorkerError> {
    let me = cfg.rank;
    let n = cfg.cluster.ranks.len() as u32;
    let info = cfg.cluster.get(me)?.clone();
    let ours = Hello::new(&cfg.cluster.id, me, &info.machine);
    let t = cfg.timeouts;
    let mut conns: HashMap<u32, Net> = HashMap::new();
    let (plan, model_dir, dtype, timing, train) = if me == 0 {
        let job =
            cfg.job.clone().ok_or_else(|| WorkerError::Plan("rank 0 needs --plan, --model and a prompt".into()))?;
        // Check the plan and every rank's weights before dialling anyone (the checkpoint
        // is at the same path on every machine; each rank checks again as it loads).
        let ck = Checkpoint::open(&job.model_dir)?;
        ck.check_plan_model(&job.plan.model)?;
        for r in 0..n {
            ck.check_tensors(&Prog::new(&job.plan, r, &cfg.cluster)?.local_weights())?;
        }
        for r in 1..n {
            let addr = cfg.cluster.get(r)?.addr.clone();
            let mut net = dial(&addr, &ours, r, &t).await?;
            net.send(Frame::control(Message::Setup {
                plan: Box::new(job.plan.clone()),
                ranks: cfg.cluster.ranks.clone(),
                model_dir: job.model_dir.display().to_string(),
                dtype: wire_dtype(job.dtype)?,
                timing: job.timing,
                train: job.train.clone(),
            }))
            .await?;
            conns.insert(r, net);
        }
        (job.plan, job.model_dir, job.dtype, job.timing, job.train)
    } else {
        let listener = TcpListener::bind(&info.addr)
            .await
            .map_err(|e| WorkerError::Wire(format!("cannot listen on {}: {e}", info.addr)))?;
        tracing::info!(rank = me, addr = %info.addr, "listening");
        // Lower ranks (0 included) connect to us; we connect to higher ranks.
        let accept = async {
            let mut got: HashMap<u32, Net> = HashMap::new();
            while (0..me).any(|r| !got.contains_key(&r)) {
                match accept_one(&listener, &ours, n, &t).await {
                    Ok((r, net)) if r < me => {
                        got.insert(r, net);
                    }
                    Ok((r, _)) => tracing::warn!(rank = r, "unexpected connection from a higher rank"),
                    Err(e) => tracing::warn!(error = %e, "refused a connection"),
                }
            }
            Ok::<_, WorkerError>(got)
        };
        let dial_up = async {
            let mut got = HashMap::new();
            for r in me + 1..n {
                let addr = cfg.cluster.get(r)?.addr.clone();
                got.insert(r, dial(&addr, &ours, r, &t).await?);
            }
            Ok::<_, WorkerError>(got)
        };
        let (lower, higher) = tokio::time::timeout(t.wait_for_leader, async { tokio::try_join!(accept, dial_up) })
            .await
            .map_err(|_| WorkerError::Wire(format!("no leader within {:.0} s", t.wait_for_leader.as_secs_f64())))??;
        conns.extend(lower);
        conns.extend(higher);
        let leader = conns.get_mut(&0).ok_or_else(|| WorkerError::Wire("no connection from rank 0".into()))?;
        let frame = read_frame(leader, t.handshake, "the plan", "rank 0").await?;
        let Message::Setup { plan, ranks, model_dir, dtype, timing, train } = frame.message else {
            return Err(WorkerError::Peer {
                rank: 0,
                message: format!("sent `{}` instead of the plan", frame.message.name()),
            });
        };
        if ranks != cfg.cluster.ranks {
            let msg = "rank 0's cluster differs from this rank's cluster file".to_string();
            let _ = leader.send(Frame::control(Message::Error { rank: me, message: msg.clone() })).await;
            return Err(WorkerError::Plan(msg));
        }
        (*plan, PathBuf::from(model_dir), crate::tensor_wire::candle_dtype(dtype), timing, train)
    };

    // Validate and load before any compute; report failures to rank 0 by name.
    let prepared = prepare(&plan, me, &cfg, &model_dir, dtype, train.as_ref()).await;
    let (prog, exec, weight_bytes, load_s) = match prepared {
        Ok(p) => p,
        Err(e) => {
            if let Some(leader) = conns.get_mut(&0) {
                let _ = leader.send(Frame::control(Message::Error { rank: me, message: e.to_string() })).await;
            }
            return Err(e);
        }
    };
    tracing::info!(rank = me, weight_bytes, load_s, "weights loaded");

    // Rank 0 waits for every rank to be ready.
    if me == 0 {
        for (r, net) in conns.iter_mut() {
            let frame = read_frame(net, t.load, "ready", &format!("rank {r}")).await?;
            match frame.message {
                Message::Ready { .. } => {}
                Message::Error { rank, message } => return Err(WorkerError::Peer { rank, message }),
                other => {
                    return Err(WorkerError::Peer {
                        rank: *r,
                        message: format!("sent `{}` instead of ready", other.name()),
                    })
                }
            }
        }
    }

    // Actors.
    let prog = Arc::new(prog);
    let node = Node::create(|ctx| {
        let me_addr = ctx.address();
        let mut peers = HashMap::new();
        for (r, net) in conns.drain() {
            let parts = net.into_parts();
            let (rd, wr) = parts.io.into_split();
            let mut reader = FramedRead::new(rd, FrameCodec::default());
            *reader.read_buffer_mut() = parts.read_buf;
            let writer = FramedWrite::new(wr, FrameCodec::default());
            let node = me_addr.clone();
            let peer = Peer::create(move |pctx| {
                Peer::add_stream(reader, pctx);
                Peer { rank: r, me, node, sink: SinkWrite::new(writer, pctx), last_seen: Instant::now(), seq: 0, t }
            });
            peers.insert(r, peer);
        }
        let cell = Arc::new(Mutex::new(Some(exec)));
        let (prog2, peers2, node2) = (prog.clone(), peers.clone(), me_addr.clone());
        let compute = SyncArbiter::start(1, move || Compute {
            me,
            prog: prog2.clone(),
            trains: HashMap::new(),
            early_grads: HashMap::new(),
            acc: HashMap::new(),
            adam: HashMap::new(),
            exec: cell.lock().unwrap_or_else(|p| p.into_inner()).take(),
            runs: HashMap::new(),
            early: HashMap::new(),
            peers: peers2.clone(),
            node: node2.clone(),
            bytes_sent: HashMap::new(),
            frames_sent: 0,
            prefill_started: HashMap::new(),
            handover: HashMap::new(),
            timing,
            op_time: HashMap::new(),
            first_step_time: HashMap::new(),
            updates: 0,
            me_addr: None,
            tick_pending: false,
            peak_runs: 0,
        });
        Node { me, n, peers, compute, leader: None, result: result.clone(), shutting_down: false }
    });
    if me == 0 {
        let job = cfg.job.clone().ok_or_else(|| WorkerError::Plan("rank 0 needs a job".into()))?;
        node.do_send(Begin {
            train_loop: job.train_loop.clone(),
            adapters: job.adapters.clone(),
            repeat: job.repeat.max(1),
            prompt: job.prompt,
            max_new_tokens: job.max_new_tokens,
            eos: job.eos,
            sampling: job.sampling,
            on_token: job.on_token,
        });
    } else {
        node.do_send(ToPeer {
            rank: 0,
            frame: Frame::control(Message::Ready { rank: me, weight_bytes, load_seconds: load_s }),
        });
    }
    Ok(())
}

async fn prepare(
    plan: &Plan,
    me: u32,
    cfg: &NodeConfig,
    model_dir: &std::path::Path,
    dtype: DType,
    train: Option<&TrainSetup>,
) -> Result<(Prog, Executor, u64, f64), WorkerError> {
    let prog = Prog::new(plan, me, &cfg.cluster)?;
    let adapters = match (&prog, train) {
        (Prog::Train(t), Some(setup)) => Some((t.local_adapters(), t.lora_rank, setup.clone())),
        (Prog::Train(_), None) => return Err(WorkerError::Plan("a training plan needs the adapters' set-up".into())),
        (Prog::Infer(p), Some(setup)) => {
            // Inference with trained adapters on the projections this rank runs.
            let targets = setup.targets.clone().unwrap_or_default();
            let rank = setup.rank.unwrap_or(16) as usize;
            let mut list: Vec<_> = p
                .local_weights()
                .into_iter()
                .filter(|(k, _)| targets.contains(k))
                .filter_map(|(k, l)| l.map(|l| (k, l)))
                .collect();
            list.sort_by_key(|(k, l)| (*l, *k));
            Some((list, rank, setup.clone()))
        }
        (Prog::Infer(_), None) => None,
    };
    let dir = model_dir.to_path_buf();
    let device = cfg.device.clone();
    let model = plan.model.clone();
    let wanted = prog.local_weights();
    let t0 = Instant::now();
    let (exec, bytes) = tokio::task::spawn_blocking(move || {
        let ck = Checkpoint::open(&dir)?;
        ck.check_plan_model(&model)?;
        let mut exec = Executor::new(ck.config.clone(), device, dtype)?;
        let bar = indicatif::ProgressBar::new(0);
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ops")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("rank {me}: loading weights"));
        let bytes = ck.load_into(&mut exec, &wanted, Some(&bar))?;
        bar.finish_and_clear();
        if let Some((list, rank, setup)) = adapters {
            for (kind, layer) in list {
                let (a, b) = crate::lora::init(&ck.config, kind, layer, rank, setup.seed, setup.zero_b, &exec.device)?;
                let scale = setup.alpha / rank as f64;
                let ad = crate::lora::Adapter {
                    a: candle_core::Var::from_tensor(&a)?,
                    b: candle_core::Var::from_tensor(&b)?,
                    scale,
                    dropout: setup.dropout,
                };
                exec.adapters.insert((kind, Some(layer)), ad);
            }
        }
        Ok::<_, WorkerError>((exec, bytes))
    })
    .await
    .map_err(|e| WorkerError::Weights(format!("loading panicked: {e}")))??;
    Ok((prog, exec, bytes, t0.elapsed().as_secs_f64()))
}

// ---- messages between actors ----

#[derive(Message)]
#[rtype(result = "()")]
struct Inbound {
    from: u32,
    frame: Frame,
}

#[derive(Message)]
#[rtype(result = "()")]
struct PeerDown {
    rank: u32,
    reason: String,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ToPeer {
    rank: u32,
    frame: Frame,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Write(Frame);

#[derive(Message)]
#[rtype(result = "()")]
struct Begin {
    train_loop: Option<TrainLoop>,
    adapters: Option<AdapterGrads>,
    repeat: usize,
    prompt: Vec<u32>,
    max_new_tokens: usize,
    eos: Option<u32>,
    sampling: Sampling,
    on_token: Option<TokenSink>,
}

/// Compute's view of incoming work.
#[derive(Message)]
#[rtype(result = "()")]
enum Work {
    Start {
        request: u64,
        step: u32,
        phase: Phase,
        position: u64,
        tokens: WireTensor,
    },
    Activation {
        request: u64,
        step: u32,
        from_op: usize,
        to_op: Option<usize>,
        tensors: Vec<WireTensor>,
    },
    Kv {
        request: u64,
        layer: u32,
        start: u64,
        k: WireTensor,
        v: WireTensor,
    },
    Finish {
        request: u64,
    },
    Update {
        t: u64,
        lr: f64,
        clip: f64,
        weight_decay: f64,
    },
    Gather {
        request: u64,
        what: String,
    },
    LoadAdapters {
        tensors: Vec<(String, WireTensor)>,
    },
    /// Run the most urgent ready training micro-batch until it blocks (sent by Compute to
    /// itself, so that every message that arrived meanwhile is delivered before it chooses).
    Tick,
}

/// Compute to node.
#[derive(Message)]
#[rtype(result = "()")]
enum Event {
    Logits {
        step: u32,
        logits: Vec<f32>,
    },
    Loss {
        loss: f64,
    },
    TrainDone {
        rank: u32,
        step: u32,
        sumsq: f64,
    },
    Adapters {
        rank: u32,
        grads: AdapterGrads,
    },
    Failed {
        message: String,
    },
    Stats {
        request: u64,
        bytes_sent: u64,
        frames_sent: u64,
        handover_bytes: u64,
        handover_ms: f64,
        op_ms: Vec<(usize, f64)>,
        peak_runs: u32,
    },
}

// ---- Peer ----

/// One connection to another rank.
struct Peer {
    rank: u32,
    me: u32,
    node: Addr<Node>,
    sink: SinkWrite<Frame, FramedWrite<OwnedWriteHalf, FrameCodec>>,
    last_seen: Instant,
    seq: u64,
    t: Timeouts,
}

impl Actor for Peer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.t.heartbeat_interval, |act, ctx| {
            act.seq += 1;
            let _ = act.sink.write(Frame::control(Message::Heartbeat { rank: act.me, seq: act.seq }));
            if act.last_seen.elapsed() > act.t.peer_dead {
                act.node.do_send(PeerDown {
                    rank: act.rank,
                    reason: format!("no heartbeat for {:.1} s", act.last_seen.elapsed().as_secs_f64()),
                });
                ctx.stop();
            }
        });
    }
}

impl StreamHandler<Result<Frame, FrameError>> for Peer {
    fn handle(&mut self, item: Result<Frame, FrameError>, ctx: &mut Self::Context) {
        match item {
            Ok(frame) => {
                self.last_seen = Instant::now();
                if !matches!(frame.message, Message::Heartbeat { .. }) {
                    self.node.do_send(Inbound { from: self.rank, frame });
                }
            }
            Err(e) => {
                self.node.do_send(PeerDown { rank: self.rank, reason: format!("bad frame: {e}") });
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.node.do_send(PeerDown { rank: self.rank, reason: "closed the connection".into() });
        ctx.stop();
    }
}

impl WriteHandler<FrameError> for Peer {
    fn error(&mut self, err: FrameError, _ctx: &mut Self::Context) -> Running {
        self.node.do_send(PeerDown { rank: self.rank, reason: format!("write failed: {err}") });
        Running::Stop
    }
}

impl Handler<Write> for Peer {
    type Result = ();
    fn handle(&mut self, msg: Write, _ctx: &mut Self::Context) {
        let _ = self.sink.write(msg.0);
    }
}

// ---- Compute ----

/// The candle state of a rank, on its own thread.
struct Compute {
    me: u32,
    prog: Arc<Prog>,
    trains: HashMap<(u64, u32), TrainRun>,
    early_grads: EarlyGrads,
    /// Adapter gradients accumulated over a step's micro-batches, and AdamW moments
    /// (m_A, v_A, m_B, v_B), by (kind, layer).
    acc: HashMap<(lemur_protocol::OpKind, u32), (Tensor, Tensor)>,
    adam: HashMap<(lemur_protocol::OpKind, u32), [Tensor; 4]>,
    exec: Option<Executor>,
    runs: HashMap<(u64, u32), StepRun>,
    /// Activations that arrived before their step's start.
    early: Early,
    peers: HashMap<u32, Addr<Peer>>,
    node: Addr<Node>,
    bytes_sent: HashMap<u64, u64>,
    frames_sent: u64,
    /// Per request: when its prefill started here, and the KV cache received since.
    prefill_started: HashMap<u64, Instant>,
    handover: HashMap<u64, (u64, f64)>,
    timing: bool,
    /// Per op: total seconds and runs (timing on).
    op_time: HashMap<usize, (f64, u32)>,
    /// Training: the first step's op times, set aside (warm-up) and used only when the
    /// run has no other step.
    first_step_time: HashMap<usize, (f64, u32)>,
    /// Optimizer steps this process has applied.
    updates: u64,
    /// Its own address, and whether a Tick is already queued.
    me_addr: Option<Addr<Compute>>,
    tick_pending: bool,
    /// The most training micro-batches held at once.
    peak_runs: u32,
}

impl Actor for Compute {
    type Context = SyncContext<Self>;
}

/// Encodes a step's outputs and hands them to the peers' writers as they are produced.
struct Outbox<'a> {
    me: u32,
    request: u64,
    step: u32,
    peers: &'a HashMap<u32, Addr<Peer>>,
    node: &'a Addr<Node>,
    bytes: &'a mut u64,
    frames: &'a mut u64,
    op_time: &'a mut HashMap<usize, (f64, u32)>,
    error: Option<WorkerError>,
}

impl Outbox<'_> {
    fn send_train(&mut self, o: TrainOut) {
        if self.error.is_some() {
            return;
        }
        let r = match o {
            TrainOut::Activation { to, from_op, tensors } => {
                self.try_send(Outbound::Activation { to, from_op, tensors })
            }
            TrainOut::Gradient { to, from_op, to_op, tensors } => self.gradient(to, from_op, to_op, &tensors),
            TrainOut::Timing { op, seconds } => self.try_send(Outbound::Timing { op, seconds }),
            TrainOut::Loss { loss } => {
                if self.me == 0 {
                    self.node.do_send(Event::Loss { loss });
                    Ok(())
                } else {
                    let msg = Message::Loss { request_id: self.request, step: self.step, loss };
                    self.to(0, Frame::control(msg))
                }
            }
        };
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn gradient(&mut self, to: u32, from_op: usize, to_op: usize, tensors: &[Tensor]) -> Result<(), WorkerError> {
        let mut metas = Vec::new();
        let mut datas = Vec::new();
        for t in tensors {
            let (m, d) = to_wire(t)?;
            metas.push(m);
            datas.push(d);
        }
        let msg = Message::Activation {
            request_id: self.request,
            step: self.step,
            from_op,
            to_op: Some(to_op),
            tensors: metas,
        };
        self.to(to, Frame { message: msg, tensors: datas })
    }

    fn send(&mut self, o: Outbound) {
        if self.error.is_none() {
            if let Err(e) = self.try_send(o) {
                self.error = Some(e);
            }
        }
    }

    fn to(&mut self, rank: u32, frame: Frame) -> Result<(), WorkerError> {
        *self.bytes += frame.tensors.iter().map(|b| b.len() as u64).sum::<u64>();
        *self.frames += 1;
        let peer = self.peers.get(&rank).ok_or_else(|| WorkerError::Peer { rank, message: "not connected".into() })?;
        peer.do_send(Write(frame));
        Ok(())
    }

    fn try_send(&mut self, o: Outbound) -> Result<(), WorkerError> {
        let (request, step) = (self.request, self.step);
        match o {
            Outbound::Activation { to, from_op, tensors } => {
                let mut metas = Vec::new();
                let mut datas = Vec::new();
                for t in tensors.iter() {
                    let (m, d) = to_wire(t)?;
                    metas.push(m);
                    datas.push(d);
                }
                let msg = Message::Activation { request_id: request, step, from_op, to_op: None, tensors: metas };
                self.to(to, Frame { message: msg, tensors: datas })
            }
            Outbound::Logits { logits } => {
                let last = logits.flatten_from(1)?.get(0)?.to_dtype(DType::F32)?;
                if self.me == 0 {
                    let v = last.to_vec1::<f32>()?;
                    self.node.do_send(Event::Logits { step, logits: v });
                    Ok(())
                } else {
                    let (m, d) = to_wire(&last)?;
                    self.to(
                        0,
                        Frame { message: Message::Logits { request_id: request, step, logits: m }, tensors: vec![d] },
                    )
                }
            }
            Outbound::Timing { op, seconds } => {
                let e = self.op_time.entry(op).or_default();
                e.0 += seconds;
                e.1 += 1;
                Ok(())
            }
            Outbound::Kv { to, layer, cache } => {
                let (mk, dk) = to_wire(&cache.keys()?.contiguous()?)?;
                let (mv, dv) = to_wire(&cache.values()?.contiguous()?)?;
                let msg = Message::KvHandover {
                    request_id: request,
                    layer,
                    start: cache.start as u64,
                    tensors: vec![mk, mv],
                };
                self.to(to, Frame { message: msg, tensors: vec![dk, dv] })
            }
        }
    }
}

impl Compute {
    fn decode(&self, ts: &[WireTensor]) -> Result<Vec<Tensor>, WorkerError> {
        let dev = self.exec.as_ref().map(|e| e.device.clone()).unwrap_or(Device::Cpu);
        ts.iter().map(|t| from_wire(&t.meta, &t.data, &dev)).collect()
    }

    /// Where a step's outputs go as they are produced.
    fn outbox(&mut self, key: (u64, u32)) -> Outbox<'_> {
        Outbox {
            me: self.me,
            request: key.0,
            step: key.1,
            peers: &self.peers,
            node: &self.node,
            bytes: self.bytes_sent.entry(key.0).or_default(),
            frames: &mut self.frames_sent,
            op_time: &mut self.op_time,
            error: None,
        }
    }

    fn step(&mut self, key: (u64, u32)) -> Result<(), WorkerError> {
        let Some(mut run) = self.runs.remove(&key) else { return Ok(()) };
        let prog = self.prog.clone();
        let Prog::Infer(prog) = prog.as_ref() else {
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
            if let Some(a) = &self.me_addr {
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
        let Prog::Train(prog) = prog.as_ref() else {
            return Err(WorkerError::Plan("a training step under an inference plan".into()));
        };
        let finished: Vec<(u64, u32)> =
            self.trains.iter_mut().filter_map(|(k, r)| r.next_local(prog).is_none().then_some(*k)).collect();
        for key in finished {
            self.finish_train_run(key)?;
        }
        let best = self
            .trains
            .iter_mut()
            .filter_map(|(k, r)| match r.next_local(prog) {
                Some((true, backward)) => Some(((!backward, k.0, k.1), *k)),
                _ => None,
            })
            .min();
        let Some((_, key)) = best else { return Ok(()) };
        let Some(mut run) = self.trains.remove(&key) else { return Ok(()) };
        let mut exec = self.exec.take().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        let mut out = self.outbox(key);
        // Until it blocks: one Tick per stretch of ready ops, not per op (a Tick travels
        // through the actor system's thread, which is busy when the cores are).
        let progress = run.advance(prog, &mut exec, &mut |o| out.send_train(o), usize::MAX);
        let failed = out.error.take();
        self.exec = Some(exec);
        progress?;
        if let Some(e) = failed {
            return Err(e);
        }
        let done = run.next_local(prog).is_none();
        self.trains.insert(key, run);
        if done {
            self.finish_train_run(key)?;
        }
        self.kick();
        Ok(())
    }

    /// A micro-batch ran all its ops here.
    fn finish_train_run(&mut self, key: (u64, u32)) -> Result<(), WorkerError> {
        let Some(run) = self.trains.remove(&key) else { return Ok(()) };
        // This micro-batch is done here: fold its gradients into the step's, report the norm.
        for (key, (ga, gb)) in run.lora_grads {
            let merged = match self.acc.remove(&key) {
                Some((a, b)) => ((a + ga)?, (b + gb)?),
                None => (ga, gb),
            };
            self.acc.insert(key, merged);
        }
        let mut sumsq = 0.0;
        for (a, b) in self.acc.values() {
            sumsq += f64::from(a.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            sumsq += f64::from(b.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        }
        let (request, step) = key;
        if self.me == 0 {
            self.node.do_send(Event::TrainDone { rank: 0, step, sumsq });
        } else if let Some(p) = self.peers.get(&0) {
            p.do_send(Write(Frame::control(Message::TrainDone { rank: self.me, request_id: request, step, sumsq })));
        }
        Ok(())
    }

    /// AdamW on every local adapter with the accumulated gradients times `clip`.
    fn update(&mut self, t: u64, lr: f64, clip: f64, weight_decay: f64) -> Result<(), WorkerError> {
        let exec = self.exec.as_mut().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        for ((kind, layer), ad) in exec.adapters.iter() {
            let Some(layer) = *layer else { continue };
            let Some((ga, gb)) = self.acc.remove(&(*kind, layer)) else { continue };
            let st = match self.adam.remove(&(*kind, layer)) {
                Some(st) => st,
                None => [ga.zeros_like()?, ga.zeros_like()?, gb.zeros_like()?, gb.zeros_like()?],
            };
            let [ma, va, mb, vb] = st;
            let mut next = Vec::new();
            for (var, g, m, v) in [(&ad.a, ga, ma, va), (&ad.b, gb, mb, vb)] {
                let g = (g * clip)?;
                let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
                let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + eps)?)?;
                let p = var.as_tensor();
                let new = (p - ((step + (p * weight_decay)?)? * lr)?)?;
                var.set(&new)?;
                next.push((m, v));
            }
            let [(ma, va), (mb, vb)]: [(Tensor, Tensor); 2] =
                next.try_into().map_err(|_| WorkerError::Plan("adapter update".into()))?;
            self.adam.insert((*kind, layer), [ma, va, mb, vb]);
        }
        self.acc.clear();
        if self.updates == 0 {
            self.first_step_time = std::mem::take(&mut self.op_time);
        }
        self.updates += 1;
        // Fault injection for tests (like tikv's fail points): die right after an update.
        if std::env::var("LEMUR_FAILPOINT").is_ok_and(|v| v == format!("exit-after-update:{t}")) {
            tracing::error!(rank = self.me, t, "fail point: exiting");
            std::process::exit(3);
        }
        Ok(())
    }

    /// The local adapters by PEFT name: accumulated gradients, or parameters with moments.
    fn gather(&self, what: &str) -> Result<Vec<(String, Tensor)>, WorkerError> {
        let exec = self.exec.as_ref().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        let mut out = Vec::new();
        let mut keys: Vec<_> = exec.adapters.keys().filter_map(|(k, l)| l.map(|l| (*k, l))).collect();
        keys.sort_by_key(|(k, l)| (*l, *k));
        for (kind, layer) in keys {
            let (na, nb) =
                (crate::lora::peft_name(kind, layer, "lora_A"), crate::lora::peft_name(kind, layer, "lora_B"));
            if what == "grads" {
                if let Some((ga, gb)) = self.acc.get(&(kind, layer)) {
                    out.push((na, ga.clone()));
                    out.push((nb, gb.clone()));
                }
                continue;
            }
            let ad = &exec.adapters[&(kind, Some(layer))];
            out.push((na.clone(), ad.a.as_tensor().clone()));
            out.push((nb.clone(), ad.b.as_tensor().clone()));
            if let Some([ma, va, mb, vb]) = self.adam.get(&(kind, layer)) {
                let ch = crate::checkpoint::EXP_AVG;
                let cq = crate::checkpoint::EXP_AVG_SQ;
                out.push((format!("{na}{ch}"), ma.clone()));
                out.push((format!("{na}{cq}"), va.clone()));
                out.push((format!("{nb}{ch}"), mb.clone()));
                out.push((format!("{nb}{cq}"), vb.clone()));
            }
        }
        Ok(out)
    }

    /// Sets local adapters (and moments) from named tensors; others are ignored.
    fn load_adapters(&mut self, named: HashMap<String, Tensor>) -> Result<(), WorkerError> {
        let exec = self.exec.as_mut().ok_or_else(|| WorkerError::Plan("executor missing".into()))?;
        for ((kind, layer), ad) in exec.adapters.iter() {
            let Some(layer) = *layer else { continue };
            let (na, nb) =
                (crate::lora::peft_name(*kind, layer, "lora_A"), crate::lora::peft_name(*kind, layer, "lora_B"));
            for (n, var) in [(&na, &ad.a), (&nb, &ad.b)] {
                if let Some(t) = named.get(n) {
                    if t.dims() != var.as_tensor().dims() {
                        return Err(WorkerError::Weights(format!(
                            "adapter `{n}` has shape {:?}, expected {:?}",
                            t.dims(),
                            var.as_tensor().dims()
                        )));
                    }
                    var.set(&t.to_dtype(var.as_tensor().dtype())?)?;
                }
            }
            let moment = |n: &str, suffix: &str| named.get(&format!("{n}{suffix}")).cloned();
            let (ch, cq) = (crate::checkpoint::EXP_AVG, crate::checkpoint::EXP_AVG_SQ);
            if let (Some(ma), Some(va), Some(mb), Some(vb)) =
                (moment(&na, ch), moment(&na, cq), moment(&nb, ch), moment(&nb, cq))
            {
                self.adam.insert((*kind, layer), [ma, va, mb, vb]);
            }
        }
        Ok(())
    }

    fn send_adapters(&self, request: u64, tensors: Vec<(String, Tensor)>) -> Result<(), WorkerError> {
        if self.me == 0 {
            let mut flat = AdapterGrads::new();
            for (n, t) in tensors {
                let t = t.to_dtype(DType::F32)?;
                flat.insert(n, (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
            }
            self.node.do_send(Event::Adapters { rank: 0, grads: flat });
            return Ok(());
        }
        let mut names = Vec::new();
        let mut metas = Vec::new();
        let mut datas = Vec::new();
        for (n, t) in tensors {
            let (m, d) = to_wire(&t.to_dtype(DType::F32)?)?;
            names.push(n);
            metas.push(m);
            datas.push(d);
        }
        if let Some(p) = self.peers.get(&0) {
            p.do_send(Write(Frame {
                message: Message::Adapters { rank: self.me, request_id: request, names, tensors: metas },
                tensors: datas,
            }));
        }
        Ok(())
    }

    fn work(&mut self, w: Work) -> Result<(), WorkerError> {
        match w {
            Work::Start { request, step, phase: Phase::Forward, tokens, .. } => {
                let dev = self.exec.as_ref().map(|e| e.device.clone()).unwrap_or(Device::Cpu);
                let all = from_wire(&tokens.meta, &tokens.data, &dev)?;
                let s = all.dim(1)?;
                if s < 2 {
                    return Err(WorkerError::Plan("a training sequence needs at least two tokens".into()));
                }
                let input = StepInput {
                    request,
                    tokens: all.narrow(1, 0, s - 1)?,
                    position: 0,
                    targets: Some(all.narrow(1, 1, s - 1)?),
                    dropout_seed: request.wrapping_mul(0x9E37_79B9) ^ u64::from(step),
                };
                let mut run = TrainRun::new(request, step, input);
                run.timing = self.timing;
                for (from_op, ts) in self.early.remove(&(request, step)).unwrap_or_default() {
                    run.deliver_activation(from_op, ts);
                }
                for (from_op, to_op, ts) in self.early_grads.remove(&(request, step)).unwrap_or_default() {
                    run.deliver_gradient(from_op, to_op, ts);
                }
                self.trains.insert((request, step), run);
                self.peak_runs = self.peak_runs.max(self.trains.len() as u32);
                self.kick();
                Ok(())
            }
            Work::Start { request, step, phase, position, tokens } => {
                if phase == Phase::Prefill {
                    self.prefill_started.insert(request, Instant::now());
                }
                let dev = self.exec.as_ref().map(|e| e.device.clone()).unwrap_or(Device::Cpu);
                let tokens = from_wire(&tokens.meta, &tokens.data, &dev)?;
                let mut run = StepRun::new(
                    request,
                    step,
                    phase,
                    StepInput { request, tokens, position: position as usize, targets: None, dropout_seed: 0 },
                );
                run.timing = self.timing;
                for (from_op, ts) in self.early.remove(&(request, step)).unwrap_or_default() {
                    run.deliver(from_op, ts);
                }
                self.runs.insert((request, step), run);
                self.step((request, step))
            }
            Work::Activation { request, step, from_op, to_op: Some(to_op), tensors } => {
                tracing::debug!(request, micro_batch = step, from_op, to_op, "gradient in");
                let ts = self.decode(&tensors)?;
                match self.trains.get_mut(&(request, step)) {
                    Some(run) => {
                        run.deliver_gradient(from_op, to_op, ts);
                        self.kick();
                        Ok(())
                    }
                    None => {
                        self.early_grads.entry((request, step)).or_default().push((from_op, to_op, ts));
                        Ok(())
                    }
                }
            }
            Work::Activation { request, step, from_op, tensors, .. }
                if matches!(self.prog.as_ref(), Prog::Train(_)) =>
            {
                tracing::debug!(request, micro_batch = step, from_op, "activation in");
                let ts = self.decode(&tensors)?;
                match self.trains.get_mut(&(request, step)) {
                    Some(run) => {
                        run.deliver_activation(from_op, ts);
                        self.kick();
                        Ok(())
                    }
                    None => {
                        self.early.entry((request, step)).or_default().push((from_op, ts));
                        Ok(())
                    }
                }
            }
            Work::Activation { request, step, from_op, tensors, .. } => {
                let ts = self.decode(&tensors)?;
                match self.runs.get_mut(&(request, step)) {
                    Some(run) => {
                        run.deliver(from_op, ts);
                        self.step((request, step))
                    }
                    None => {
                        self.early.entry((request, step)).or_default().push((from_op, ts));
                        Ok(())
                    }
                }
            }
            Work::Kv { request, layer, start, k, v } => {
                let bytes = (k.data.len() + v.data.len()) as u64;
                let since = self.prefill_started.get(&request).map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                let h = self.handover.entry(request).or_default();
                h.0 += bytes;
                h.1 = h.1.max(since);
                let ts = self.decode(&[k, v])?;
                let cache = KvCache::new(&ts[0], &ts[1], start as usize)?;
                if let Some(exec) = self.exec.as_mut() {
                    exec.kv.insert((request, layer), cache);
                }
                // A decode step may have been waiting for this cache.
                let waiting: Vec<_> = self.runs.keys().copied().filter(|(r, _)| *r == request).collect();
                for key in waiting {
                    self.step(key)?;
                }
                Ok(())
            }
            Work::Update { t, lr, clip, weight_decay } => self.update(t, lr, clip, weight_decay),
            Work::Tick => {
                self.tick_pending = false;
                self.train_tick()
            }
            Work::Gather { request, what } => {
                let tensors = self.gather(&what)?;
                self.send_adapters(request, tensors)
            }
            Work::LoadAdapters { tensors } => {
                let dev = self.exec.as_ref().map(|e| e.device.clone()).unwrap_or(Device::Cpu);
                let mut named = HashMap::new();
                for (n, t) in tensors {
                    named.insert(n, from_wire(&t.meta, &t.data, &dev)?);
                }
                self.load_adapters(named)
            }
            Work::Finish { request } => {
                if let Some(exec) = self.exec.as_mut() {
                    exec.finish(request);
                }
                self.runs.retain(|(r, _), _| *r != request);
                self.early.retain(|(r, _), _| *r != request);
                let bytes_sent = self.bytes_sent.remove(&request).unwrap_or(0);
                let (handover_bytes, handover_ms) = self.handover.remove(&request).unwrap_or_default();
                self.prefill_started.remove(&request);
                if self.op_time.is_empty() {
                    self.op_time = std::mem::take(&mut self.first_step_time);
                }
                let mut op_ms: Vec<(usize, f64)> =
                    self.op_time.drain().map(|(op, (s, n))| (op, s * 1e3 / f64::from(n.max(1)))).collect();
                op_ms.sort_by_key(|x| x.0);
                self.node.do_send(Event::Stats {
                    request,
                    bytes_sent,
                    frames_sent: self.frames_sent,
                    handover_bytes,
                    handover_ms,
                    op_ms,
                    peak_runs: self.peak_runs,
                });
                Ok(())
            }
        }
    }
}

impl Handler<Work> for Compute {
    type Result = ();
    fn handle(&mut self, w: Work, ctx: &mut Self::Context) {
        if self.me_addr.is_none() {
            self.me_addr = Some(ctx.address());
        }
        if let Err(e) = self.work(w) {
            self.node.do_send(Event::Failed { message: e.to_string() });
        }
    }
}

// ---- Node ----

/// Where rank 0's training loop stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TrainPhase {
    Running,
    GatheringGrads,
    GatheringState { finish: bool },
}

struct Trainer {
    cfg: TrainLoop,
    /// Optimizer steps taken.
    step: u64,
    /// This step's micro-batch losses.
    losses: Vec<f64>,
    /// Micro-batches finished per rank, and each rank's gradient norm once all are in.
    done: HashMap<u32, u32>,
    /// Ranks that finished each micro-batch, and the micro-batches not yet started.
    mb_done: HashMap<u32, u32>,
    pending: std::collections::VecDeque<(u32, WireTensor)>,
    sumsq: HashMap<u32, f64>,
    started: Instant,
    phase: TrainPhase,
    gathered: AdapterGrads,
    gathered_ranks: std::collections::HashSet<u32>,
    all_losses: Vec<f64>,
    step_seconds: Vec<f64>,
    checkpoints: Vec<PathBuf>,
}

struct LeaderState {
    request: u64,
    prompt_len: usize,
    max_new_tokens: usize,
    eos: Option<u32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    started: Instant,
    first: Option<Duration>,
    step_started: Instant,
    decode_times: Vec<Duration>,
    /// Per rank: bytes sent, KV handover bytes and ms, most micro-batches held at once.
    stats: HashMap<u32, (u64, u64, f64, u32)>,
    op_ms: HashMap<usize, f64>,
    done: bool,
    sampler: Sampler,
    sampling: Sampling,
    on_token: Option<TokenSink>,
    prompt: Vec<u32>,
    repeats_left: usize,
    /// Training: the loss, the gathered adapter gradients, the ranks that sent theirs.
    loss: Option<f64>,
    lora_grads: AdapterGrads,
    adapter_ranks: std::collections::HashSet<u32>,
    trainer: Option<Trainer>,
    /// Finished requests: (ttft, mean time per token, per-op ms).
    history: Vec<(Duration, Option<Duration>, HashMap<usize, f64>)>,
}

/// Routes frames and, on rank 0, drives the request.
struct Node {
    me: u32,
    n: u32,
    peers: HashMap<u32, Addr<Peer>>,
    compute: Addr<Compute>,
    leader: Option<LeaderState>,
    result: Shared,
    shutting_down: bool,
}

impl Actor for Node {
    type Context = Context<Self>;
}

impl Node {
    fn finish_with(&mut self, r: Result<Option<Outcome>, WorkerError>, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        let reason = match &r {
            Ok(_) => "done".to_string(),
            Err(e) => e.to_string(),
        };
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        for p in self.peers.values() {
            p.do_send(Write(Frame::control(Message::Shutdown { reason: reason.clone() })));
        }
        // Let the shutdown frames go out, then stop.
        ctx.run_later(Duration::from_millis(200), |_, _| System::current().stop());
    }

    fn broadcast_start(&mut self, step: u32, phase: Phase, position: u64, ids: &[u32]) {
        let Some(l) = &self.leader else { return };
        let request = l.request;
        let (meta, data) = u32_tensor(ids);
        for p in self.peers.values() {
            let msg = Message::Start { request_id: request, step, phase, tokens: meta.clone(), position };
            p.do_send(Write(Frame { message: msg, tensors: vec![data.clone()] }));
        }
        self.compute.do_send(Work::Start { request, step, phase, position, tokens: WireTensor { meta, data } });
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
        let finished = l.tokens.len() >= l.max_new_tokens || l.eos == Some(token);
        if finished {
            self.end_request(ctx);
            return;
        }
        l.step_started = now;
        let position = (l.prompt_len + l.tokens.len() - 1) as u64;
        let next = step + 1;
        self.broadcast_start(next, Phase::Decode, position, &[token]);
    }

    fn on_loss(&mut self, loss: f64) {
        if let Some(l) = self.leader.as_mut() {
            l.loss = Some(loss);
            if let Some(t) = l.trainer.as_mut() {
                t.losses.push(loss);
            }
        }
    }

    /// Sends adapter tensors to every rank (each keeps its own).
    fn load_everywhere(&mut self, tensors: &AdapterGrads) {
        let mut names = Vec::new();
        let mut metas = Vec::new();
        let mut datas = Vec::new();
        for (n, (shape, v)) in tensors {
            names.push(n.clone());
            metas.push(TensorMeta { dtype: WireDType::F32, shape: shape.clone() });
            datas.push(Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()));
        }
        for p in self.peers.values() {
            let msg = Message::LoadAdapters { names: names.clone(), tensors: metas.clone() };
            p.do_send(Write(Frame { message: msg, tensors: datas.clone() }));
        }
        let local =
            names.into_iter().zip(metas.into_iter().zip(datas).map(|(meta, data)| WireTensor { meta, data })).collect();
        self.compute.do_send(Work::LoadAdapters { tensors: local });
    }

    /// Queues the current step's micro-batches and starts as many as may be in flight.
    fn start_train_step(&mut self) {
        let Some(l) = self.leader.as_mut() else { return };
        let Some(t) = l.trainer.as_mut() else { return };
        let s = t.step;
        let request = s + 1;
        l.request = request;
        t.losses.clear();
        t.done.clear();
        t.mb_done.clear();
        t.sumsq.clear();
        t.started = Instant::now();
        let (b, m) = (t.cfg.batch, t.cfg.micro_batches);
        let n = t.cfg.sequences.len().max(1);
        t.pending.clear();
        for mb in 0..m {
            let rows: Vec<&Vec<u32>> = (0..b).map(|i| &t.cfg.sequences[((s as usize * m + mb) * b + i) % n]).collect();
            let width = rows[0].len();
            let data: Vec<u8> = rows.iter().flat_map(|r| r.iter()).flat_map(|t| t.to_le_bytes()).collect();
            let meta = TensorMeta { dtype: WireDType::U32, shape: vec![b, width] };
            t.pending.push_back((mb as u32, WireTensor { meta, data: Bytes::from(data) }));
        }
        for _ in 0..t.cfg.inflight.clamp(1, m.max(1)) {
            self.start_next_micro_batch();
        }
    }

    /// Sends the next queued micro-batch of this step to every rank.
    fn start_next_micro_batch(&mut self) {
        let Some(l) = self.leader.as_mut() else { return };
        let request = l.request;
        let Some((mb, tokens)) = l.trainer.as_mut().and_then(|t| t.pending.pop_front()) else { return };
        for p in self.peers.values() {
            let msg = Message::Start {
                request_id: request,
                step: mb,
                phase: Phase::Forward,
                tokens: tokens.meta.clone(),
                position: 0,
            };
            p.do_send(Write(Frame { message: msg, tensors: vec![tokens.data.clone()] }));
        }
        self.compute.do_send(Work::Start { request, step: mb, phase: Phase::Forward, position: 0, tokens });
    }

    /// A rank finished a micro-batch; when every rank finished every one, step the optimizer.
    fn on_train_done(&mut self, rank: u32, mb: u32, sumsq: f64, ctx: &mut Context<Self>) {
        let n = self.n;
        let Some(l) = self.leader.as_mut() else { return };
        let Some(t) = l.trainer.as_mut() else { return };
        let finished = t.mb_done.entry(mb).or_default();
        *finished += 1;
        if *finished == n {
            // A micro-batch left the pipeline on every rank: admit the next.
            self.start_next_micro_batch();
        }
        let Some(l) = self.leader.as_mut() else { return };
        let Some(t) = l.trainer.as_mut() else { return };
        let c = t.done.entry(rank).or_default();
        *c += 1;
        if *c as usize == t.cfg.micro_batches {
            t.sumsq.insert(rank, sumsq);
        }
        if t.sumsq.len() as u32 != n {
            return;
        }
        let request = l.request;
        if t.cfg.grad_check {
            t.phase = TrainPhase::GatheringGrads;
            for p in self.peers.values() {
                p.do_send(Write(Frame::control(Message::Gather { request_id: request, what: "grads".into() })));
            }
            self.compute.do_send(Work::Gather { request, what: "grads".into() });
            return;
        }
        let norm = t.sumsq.values().sum::<f64>().sqrt();
        let clip = (t.cfg.max_grad_norm / (norm + 1e-6)).min(1.0);
        let step = t.step;
        let lr = t.cfg.lr_at(step);
        let loss = if t.losses.is_empty() { f64::NAN } else { t.losses.iter().sum::<f64>() / t.losses.len() as f64 };
        t.all_losses.push(loss);
        let upd = Message::Update { request_id: request, t: step + 1, lr, clip, weight_decay: t.cfg.weight_decay };
        for p in self.peers.values() {
            p.do_send(Write(Frame::control(upd.clone())));
        }
        self.compute.do_send(Work::Update { t: step + 1, lr, clip, weight_decay: t.cfg.weight_decay });
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
            for p in self.peers.values() {
                p.do_send(Write(Frame::control(Message::Gather { request_id: request, what: "state".into() })));
            }
            self.compute.do_send(Work::Gather { request, what: "state".into() });
        } else if last {
            self.finish_training(ctx);
        } else {
            self.start_train_step();
        }
    }

    fn write_checkpoint(&mut self, finish: bool, ctx: &mut Context<Self>) {
        let Some(t) = self.leader.as_mut().and_then(|l| l.trainer.as_mut()) else { return };
        t.phase = TrainPhase::Running;
        let state = crate::checkpoint::TrainerState { step: t.step, losses: t.all_losses.clone() };
        let dir = t.cfg.output.clone().unwrap_or_default();
        match crate::checkpoint::write(&dir, &t.cfg.adapter_config, &state, &t.gathered) {
            Ok(path) => {
                tracing::info!(path = %path.display(), "checkpoint written");
                t.checkpoints.push(path);
            }
            Err(e) => {
                self.finish_with(Err(e), ctx);
                return;
            }
        }
        if finish {
            self.finish_training(ctx);
        } else {
            self.start_train_step();
        }
    }

    /// The current request is over: every rank drops its state and reports its stats;
    /// after them (or 5 s), the request completes.
    fn end_request(&mut self, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        l.done = true;
        let request = l.request;
        for p in self.peers.values() {
            p.do_send(Write(Frame::control(Message::Finish { request_id: request })));
        }
        self.compute.do_send(Work::Finish { request });
        ctx.run_later(Duration::from_secs(5), move |act, ctx| {
            if act.leader.as_ref().is_some_and(|l| l.request == request && l.done) {
                act.complete_request(ctx);
            }
        });
    }

    fn finish_training(&mut self, ctx: &mut Context<Self>) {
        let Some(l) = self.leader.as_mut() else { return };
        l.first = Some(l.started.elapsed());
        self.end_request(ctx);
    }

    /// Training: a rank's adapter gradients; when every rank's are in, the step is over.
    fn on_adapters(&mut self, rank: u32, grads: AdapterGrads, ctx: &mut Context<Self>) {
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
        let outcome = Outcome {
            tokens: l.tokens.clone(),
            ttft,
            tpot,
            bytes_sent: (0..self.n).map(|r| l.stats.get(&r).map_or(0, |s| s.0)).collect(),
            logits: l.logits.clone(),
            handover_bytes: l.stats.values().map(|s| s.1).sum(),
            handover_ms: l.stats.values().map(|s| s.2).fold(0.0, f64::max),
            peak_runs: (0..self.n).map(|r| l.stats.get(&r).map_or(0, |s| s.3)).collect(),
            op_ms,
            loss: l.loss,
            lora_grads: l.lora_grads.clone(),
            train_losses: l.trainer.as_ref().map(|t| t.all_losses.clone()).unwrap_or_default(),
            step_seconds: l.trainer.as_ref().map(|t| t.step_seconds.clone()).unwrap_or_default(),
            checkpoints: l.trainer.as_ref().map(|t| t.checkpoints.clone()).unwrap_or_default(),
        };
        self.finish_with(Ok(Some(outcome)), ctx);
    }
}

impl Handler<Begin> for Node {
    type Result = ();
    fn handle(&mut self, b: Begin, _ctx: &mut Self::Context) {
        let now = Instant::now();
        self.leader = Some(LeaderState {
            request: 1,
            prompt_len: b.prompt.len(),
            max_new_tokens: b.max_new_tokens,
            eos: b.eos,
            tokens: Vec::new(),
            logits: Vec::new(),
            started: now,
            first: None,
            step_started: now,
            decode_times: Vec::new(),
            stats: HashMap::new(),
            op_ms: HashMap::new(),
            done: false,
            sampler: Sampler::new(b.sampling),
            sampling: b.sampling,
            on_token: b.on_token,
            prompt: b.prompt.clone(),
            repeats_left: b.repeat - 1,
            history: Vec::new(),
            loss: None,
            lora_grads: std::collections::BTreeMap::new(),
            adapter_ranks: std::collections::HashSet::new(),
            trainer: None,
        });
        if let Some(tensors) = &b.adapters {
            self.load_everywhere(tensors);
        }
        if let Some(tl) = b.train_loop {
            if let Some(tensors) = &tl.resume {
                self.load_everywhere(tensors);
            }
            let start = tl.start_step;
            if let Some(l) = self.leader.as_mut() {
                l.trainer = Some(Trainer {
                    all_losses: tl.prior_losses.clone(),
                    step_seconds: Vec::new(),
                    cfg: tl,
                    step: start,
                    losses: Vec::new(),
                    done: HashMap::new(),
                    mb_done: HashMap::new(),
                    pending: std::collections::VecDeque::new(),
                    sumsq: HashMap::new(),
                    started: Instant::now(),
                    phase: TrainPhase::Running,
                    gathered: AdapterGrads::new(),
                    gathered_ranks: std::collections::HashSet::new(),
                    checkpoints: Vec::new(),
                });
            }
            self.start_train_step();
            return;
        }
        self.broadcast_start(0, Phase::Prefill, 0, &b.prompt);
    }
}

impl Handler<ToPeer> for Node {
    type Result = ();
    fn handle(&mut self, m: ToPeer, _ctx: &mut Self::Context) {
        if let Some(p) = self.peers.get(&m.rank) {
            p.do_send(Write(m.frame));
        }
    }
}

impl Handler<Event> for Node {
    type Result = ();
    fn handle(&mut self, e: Event, ctx: &mut Self::Context) {
        match e {
            Event::Logits { step, logits } => self.on_logits(step, logits, ctx),
            Event::Loss { loss } => self.on_loss(loss),
            Event::Adapters { rank, grads } => self.on_adapters(rank, grads, ctx),
            Event::TrainDone { rank, step, sumsq } => self.on_train_done(rank, step, sumsq, ctx),
            Event::Failed { message } => {
                if self.me == 0 {
                    self.finish_with(Err(WorkerError::Peer { rank: 0, message }), ctx);
                } else if let Some(p) = self.peers.get(&0) {
                    p.do_send(Write(Frame::control(Message::Error { rank: self.me, message })));
                }
            }
            Event::Stats { request, bytes_sent, frames_sent, handover_bytes, handover_ms, op_ms, peak_runs } => {
                if self.me == 0 {
                    if let Some(l) = self.leader.as_mut() {
                        l.op_ms.extend(op_ms);
                        l.stats.insert(0, (bytes_sent, handover_bytes, handover_ms, peak_runs));
                        if l.stats.len() as u32 == self.n {
                            self.complete_request(ctx);
                        }
                    }
                } else if let Some(p) = self.peers.get(&0) {
                    let msg = Message::Stats {
                        rank: self.me,
                        request_id: request,
                        bytes_sent,
                        frames_sent,
                        handover_bytes,
                        handover_ms,
                        op_ms,
                        peak_runs,
                    };
                    p.do_send(Write(Frame::control(msg)));
                }
            }
        }
    }
}

impl Handler<Inbound> for Node {
    type Result = ();
    fn handle(&mut self, m: Inbound, ctx: &mut Self::Context) {
        let from = m.from;
        let tensors = m.frame.wire_tensors();
        match m.frame.message {
            Message::Start { request_id, step, phase, position, .. } => {
                if let Some(tokens) = tensors.into_iter().next() {
                    self.compute.do_send(Work::Start { request: request_id, step, phase, position, tokens });
                }
            }
            Message::Activation { request_id, step, from_op, to_op, .. } => {
                self.compute.do_send(Work::Activation { request: request_id, step, from_op, to_op, tensors });
            }
            Message::KvHandover { request_id, layer, start, .. } => {
                let mut it = tensors.into_iter();
                if let (Some(k), Some(v)) = (it.next(), it.next()) {
                    self.compute.do_send(Work::Kv { request: request_id, layer, start, k, v });
                }
            }
            Message::Logits { step, .. } if self.me == 0 => {
                let v: Vec<f32> = tensors
                    .first()
                    .map(|t| t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
                    .unwrap_or_default();
                self.on_logits(step, v, ctx);
            }
            Message::Finish { request_id } => self.compute.do_send(Work::Finish { request: request_id }),
            Message::Update { t, lr, clip, weight_decay, .. } => {
                self.compute.do_send(Work::Update { t, lr, clip, weight_decay })
            }
            Message::Gather { request_id, what } => self.compute.do_send(Work::Gather { request: request_id, what }),
            Message::LoadAdapters { names, .. } => {
                self.compute.do_send(Work::LoadAdapters { tensors: names.into_iter().zip(tensors).collect() });
            }
            Message::TrainDone { rank, step, sumsq, .. } if self.me == 0 => self.on_train_done(rank, step, sumsq, ctx),
            Message::Loss { loss, .. } if self.me == 0 => self.on_loss(loss),
            Message::Adapters { rank, names, .. } if self.me == 0 => {
                let grads = names
                    .into_iter()
                    .zip(tensors)
                    .map(|(n, t)| {
                        let v: Vec<f32> =
                            t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                        (n, (t.meta.shape.clone(), v))
                    })
                    .collect();
                self.on_adapters(rank, grads, ctx);
            }
            Message::Stats { rank, bytes_sent, handover_bytes, handover_ms, op_ms, peak_runs, .. } if self.me == 0 => {
                if let Some(l) = self.leader.as_mut() {
                    l.op_ms.extend(op_ms);
                    l.stats.insert(rank, (bytes_sent, handover_bytes, handover_ms, peak_runs));
                    if l.done && l.stats.len() as u32 == self.n {
                        self.complete_request(ctx);
                    }
                }
            }
            Message::Error { rank, message } if self.me == 0 => {
                self.finish_with(Err(WorkerError::Peer { rank, message }), ctx);
            }
            Message::Shutdown { reason } => {
                tracing::info!(rank = self.me, from, reason, "shutdown");
                self.shutting_down = true;
                *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(None));
                System::current().stop();
            }
            other => tracing::warn!(rank = self.me, from, message = other.name(), "unexpected message"),
        }
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
            self.shutting_down = true;
            *self.result.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Err(WorkerError::Peer { rank: 0, message: format!("leader lost: {}", m.reason) }));
            System::current().stop();
        } else if let Some(p) = self.peers.get(&0) {
            p.do_send(Write(Frame::control(Message::Error { rank: m.rank, message: format!("lost: {}", m.reason) })));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> TrainLoop {
        TrainLoop {
            sequences: vec![],
            batch: 1,
            micro_batches: 1,
            inflight: 1,
            steps: 110,
            start_step: 0,
            lr: 1e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            save_every: 0,
            output: None,
            adapter_config: crate::checkpoint::AdapterConfig {
                rank: 8,
                alpha: 16.0,
                targets: vec![],
                base_model: String::new(),
            },
            grad_check: false,
            resume: None,
            prior_losses: vec![],
            on_step: None,
        }
    }

    #[test]
    fn learning_rate_warms_up_linearly_then_decays_by_cosine() {
        let s = schedule();
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-15);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-15);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-15);
        // Halfway through the decay: min + (1 - min) / 2.
        assert!((s.lr_at(60) - 1e-3 * 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-12);
    }
}
