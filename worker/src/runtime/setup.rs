//! Set-up, before any actor runs: connections with versioned handshakes, the plan from
//! rank 0, weights loaded, every rank ready. Every read has a deadline.
//!
//! Rank 0 checks the plan and the checkpoint, connects to every rank and sends `Setup`;
//! rank s >= 1 listens, accepts ranks below it and connects to ranks above it. Each rank
//! validates the plan, loads only its weights (and LoRA adapters) and reports `Ready`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;
use futures::future::{AbortHandle, Abortable, Aborted};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use lemur_protocol::auth::{Acceptor, Credentials, Dialer, HandshakeError};
use lemur_protocol::blob::{CheckpointRef, OpRef};
use lemur_protocol::wire::{DenseMatmul, Frame, FrameError, Message, RankInfo, TrainSetup};
use lemur_protocol::{OpKind, Plan, DEFAULT_LORA_RANK};

use super::fetch;
use super::transport::{Conn, Listener, Transport};
use super::{NodeConfig, Timeouts};
use crate::error::WorkerError;
use crate::exec::Executor;
use crate::program::RankProgram;
use crate::tensor_wire::{candle_dtype, wire_dtype};
use crate::weight_cache::{checkpoint_hash, variant, WeightCache};
use crate::weights::{check_model_shape, Checkpoint};

/// What set-up leaves for the actors: the connections by rank, the rank's program and
/// executor, and what rank 0 must know of the run.
pub(super) struct Ready {
    pub conns: HashMap<u32, Conn>,
    pub prog: RankProgram,
    pub exec: Executor,
    pub timing: bool,
    pub dense_matmul: DenseMatmul,
    /// The ranks of this run, sorted (rank 0 first).
    pub active: Vec<u32>,
}

/// Reads one frame from rank `rank` within `limit`; a timeout or a closed connection is
/// [`WorkerError::Peer`], naming the rank and what was awaited (whom a leader plans around).
pub(crate) async fn read_frame(conn: &mut Conn, limit: Duration, what: &str, rank: u32) -> Result<Frame, WorkerError> {
    let message = match tokio::time::timeout(limit, conn.reader.next()).await {
        Ok(Some(Ok(frame))) => return Ok(frame),
        Err(_) => format!("no {what} within {:.0} s", limit.as_secs_f64()),
        Ok(None) => format!("closed the connection before {what}"),
        // Left as it is (a reset handshake is retried); `WorkerError::at` blames it.
        Ok(Some(Err(e))) => return Err(e.into()),
    };
    Err(WorkerError::Peer { rank, message })
}

/// Connects to rank `expect` at `addr`, retrying until the connect timeout, and runs the
/// dialing side of the handshake; returns the authenticated connection and the peer's
/// machine.
pub(crate) async fn dial(
    net: &dyn Transport,
    from: &str,
    addr: &str,
    hs: &Handshake,
    expect: u32,
) -> Result<(Conn, String), WorkerError> {
    dial_within(net, from, addr, hs, expect, hs.timeouts.connect).await
}

/// As [`dial`], retrying for at most `patience` (zero: one attempt).
pub(crate) async fn dial_within(
    net: &dyn Transport,
    from: &str,
    addr: &str,
    hs: &Handshake,
    expect: u32,
    patience: Duration,
) -> Result<(Conn, String), WorkerError> {
    let deadline = Instant::now() + patience;
    loop {
        let mut conn = match net.connect(from, addr).await {
            Ok(c) => c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(addr, error = %e, "peer not up yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => {
                return Err(WorkerError::Peer { rank: expect, message: format!("cannot connect to {addr}: {e}") })
            }
        };
        match dial_handshake(&mut conn, addr, hs, expect).await {
            Ok(machine) => {
                conn.authenticated();
                return Ok((conn, machine));
            }
            // A worker between two leaders' runs resets connections its old listener
            // queued: the peer is not up yet, as when the connect itself is refused.
            Err(WorkerError::Frame(FrameError::Io(e))) if Instant::now() < deadline => {
                tracing::debug!(addr, error = %e, "the peer reset the handshake; dialing again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.at(expect)),
        }
    }
}

/// The dialing side of the handshake on a fresh connection; returns the peer's machine.
async fn dial_handshake(conn: &mut Conn, addr: &str, hs: &Handshake, expect: u32) -> Result<String, WorkerError> {
    let t = &hs.timeouts;
    let failed = |e: HandshakeError| WorkerError::Peer { rank: expect, message: format!("at {addr}: {e}") };
    let what = format!("handshake (at {addr})");
    let d = Dialer::new(hs.cred.clone(), hs.me, expect)?;
    conn.writer.send(Frame::control(d.hello())).await?;
    let proof = d.on_challenge(read_frame(conn, t.handshake, &what, expect).await?.message).map_err(failed)?;
    conn.writer.send(Frame::control(proof)).await?;
    d.on_welcome(read_frame(conn, t.handshake, &what, expect).await?.message).map_err(failed)
}

/// What a rank brings to every handshake.
#[derive(Debug, Clone)]
pub(crate) struct Handshake {
    pub cred: Credentials,
    pub me: u32,
    pub ranks: u32,
    pub machine: String,
    pub timeouts: Timeouts,
}

impl Handshake {
    pub fn of(cfg: &NodeConfig) -> Result<Self, WorkerError> {
        Ok(Self {
            cred: cfg.credentials(),
            me: cfg.rank,
            ranks: cfg.cluster.ranks.len() as u32,
            machine: cfg.cluster.get(cfg.rank)?.machine.clone(),
            timeouts: cfg.timeouts,
        })
    }
}

/// A connection the accepting side refused or lost during the handshake: where it came
/// from, and why (for this rank's log only; the peer was told less).
#[derive(Debug)]
pub(crate) struct Rejected {
    pub from: String,
    pub detail: String,
}

/// The accepting side of the handshake on one connection, under its own deadline; returns
/// the peer's authenticated rank and the connection.
pub(crate) async fn accept_one(mut conn: Conn, hs: Handshake) -> Result<(u32, Conn), Rejected> {
    let from = conn.remote.clone();
    let reject = |detail: String| Rejected { from: from.clone(), detail };
    let limit = hs.timeouts.handshake;
    let shake = async {
        let mut acc = Acceptor::new(hs.cred.clone(), hs.me, hs.ranks, &hs.machine).map_err(|e| e.to_string())?;
        let mut peer = None;
        for hello in [true, false] {
            let msg = match conn.reader.next().await {
                None => return Err("closed the connection during the handshake".to_string()),
                Some(Err(e)) => return Err(format!("sent a bad frame during the handshake: {e}")),
                Some(Ok(f)) => f.message,
            };
            let reply = if hello {
                acc.on_hello(msg)
            } else {
                acc.on_proof(msg).map(|(rank, welcome)| {
                    peer = Some(rank);
                    welcome
                })
            };
            match reply {
                Ok(m) => conn.writer.send(Frame::control(m)).await.map_err(|e| e.to_string())?,
                Err(refusal) => {
                    let _ = conn.writer.send(Frame::control(Message::Refused { reason: refusal.reason })).await;
                    return Err(refusal.detail);
                }
            }
        }
        peer.ok_or_else(|| "the handshake ended without a rank".to_string())
    };
    match tokio::time::timeout(limit, shake).await {
        Err(_) => Err(reject(format!("no complete handshake within {:.0} s", limit.as_secs_f64()))),
        Ok(Err(detail)) => Err(reject(detail)),
        Ok(Ok(rank)) => {
            conn.authenticated();
            Ok((rank, conn))
        }
    }
}

/// Handshakes in progress at once on a listening rank; a connection beyond them evicts
/// the oldest, so idle or slow connections cannot crowd out the real leader, whose
/// handshake takes a round trip.
const HANDSHAKE_SLOTS: usize = 16;

type Handshaking = futures::future::BoxFuture<'static, (String, Result<Result<(u32, Conn), Rejected>, Aborted>)>;

/// The accepting side of a listening rank, kept across the set-up's two phases (rank 0
/// first, then the other ranks of the run): handshakes run concurrently, each under its
/// own deadline, in at most [`HANDSHAKE_SLOTS`] slots.
struct Accepting {
    hs: Handshake,
    got: HashMap<u32, Conn>,
    pending: FuturesUnordered<Handshaking>,
    slots: VecDeque<AbortHandle>,
}

impl Accepting {
    fn new(hs: &Handshake) -> Self {
        Self { hs: hs.clone(), got: HashMap::new(), pending: FuturesUnordered::new(), slots: VecDeque::new() }
    }

    /// Accepts connections until every rank in `want` (each below this one) has
    /// authenticated; connections from other lower ranks are kept for later.
    async fn until(&mut self, listener: &mut dyn Listener, want: &[u32]) -> Result<(), WorkerError> {
        let me = self.hs.me;
        while want.iter().any(|r| !self.got.contains_key(r)) {
            tokio::select! {
                conn = listener.accept() => {
                    let conn = conn?;
                    if self.slots.len() >= HANDSHAKE_SLOTS {
                        if let Some(oldest) = self.slots.pop_front() {
                            oldest.abort();
                        }
                    }
                    let (handle, reg) = AbortHandle::new_pair();
                    let from = conn.remote.clone();
                    self.slots.push_back(handle);
                    self.pending.push(Abortable::new(accept_one(conn, self.hs.clone()), reg).map(move |r| (from, r)).boxed());
                }
                Some((from, res)) = self.pending.next(), if !self.pending.is_empty() => match res {
                    Err(Aborted) => tracing::warn!(peer = %from, "dropped a handshake to make room for newer connections"),
                    Ok(Ok((r, conn))) if r < me && !self.got.contains_key(&r) => {
                        tracing::info!(rank = me, peer = r, from = %from, "peer authenticated");
                        self.got.insert(r, conn);
                    }
                    Ok(Ok((r, _))) => tracing::warn!(peer = %from, rank = r, "refused a second or higher-ranked connection"),
                    Ok(Err(rej)) => tracing::warn!(peer = %rej.from, "refused a connection: {}", rej.detail),
                },
            }
        }
        Ok(())
    }
}

/// Connects this rank to every other, takes (or, on rank 0, sends) the plan, loads the
/// weights and, on rank 0, waits for every rank to be ready.
pub(super) async fn connect_and_load(cfg: &NodeConfig) -> Result<Ready, WorkerError> {
    let me = cfg.rank;
    let info = cfg.cluster.get(me)?.clone();
    let hs = Handshake::of(cfg)?;
    let t = cfg.timeouts;
    let net = cfg.transport.as_ref();
    let mut conns: HashMap<u32, Conn> = HashMap::new();
    let active: Vec<u32>;
    let (plan, alternatives, source, dtype, timing, train, dense_matmul) = if me == 0 {
        let job =
            cfg.job.clone().ok_or_else(|| WorkerError::Plan("rank 0 needs --plan, --model and a prompt".into()))?;
        // Check the plan, the request and every rank's weights before dialling anyone: only
        // rank 0 has the checkpoint, and it serves each rank the weights of its ops.
        let mut ck = Checkpoint::open(&job.model_dir)?;
        (ck.dequantize, ck.quantize) = (job.dequantize, job.quantize);
        let alternatives = job.alternatives()?;
        for p in std::iter::once(&job.plan).chain(&alternatives) {
            ck.check_plan_model(&p.model)?;
            ck.check_plan_weights(p)?;
        }
        job.validate(&ck.config)?;
        let ranks = cfg.cluster.rank_of_machine();
        active = cfg.run_ranks()?;
        let mut allowed = HashMap::new();
        for &r in &active {
            let ops = RankProgram::with_alternatives(&job.plan, &alternatives, r, &ranks)?.local_weights();
            ck.check_tensors(&ops)?;
            allowed.insert(r, fetch::ops_with_weights(&ops, &ck.config));
        }
        let (files, root) = (ck.files.clone(), cfg.cache_dir.clone());
        let hash = tokio::task::spawn_blocking(move || checkpoint_hash(&files, &root))
            .await
            .map_err(|e| WorkerError::Weights(format!("hashing the checkpoint panicked: {e}")))??;
        let checkpoint = CheckpointRef { hash, config: ck.config.clone() };
        tracing::info!(hash = %checkpoint.hash, path = %job.model_dir.display(), "serving the checkpoint's weights");
        let entries: Vec<RankInfo> = active.iter().map(|&r| cfg.cluster.get(r).cloned()).collect::<Result<_, _>>()?;
        for peer in &entries[1..] {
            let (mut conn, _) = dial(net, &info.addr, &peer.addr, &hs, peer.rank).await?;
            conn.writer
                .send(Frame::control(Message::Setup {
                    plan: Box::new(job.plan.clone()),
                    ranks: entries.clone(),
                    checkpoint: Box::new(checkpoint.clone()),
                    dtype: wire_dtype(job.dtype)?,
                    timing: job.timing,
                    train: job.train.clone(),
                    dequantize: job.dequantize,
                    quantize: job.quantize,
                    dense_matmul: job.dense_matmul,
                    alternatives: alternatives.clone(),
                }))
                .await
                .map_err(|e| WorkerError::from(e).at(peer.rank))?;
            conns.insert(peer.rank, conn);
        }
        let source = Source::Leader(Arc::new(ck), allowed);
        (job.plan, alternatives, source, job.dtype, job.timing, job.train, job.dense_matmul)
    } else {
        let mut listener = net.listen(&info.addr).await?;
        tracing::info!(rank = me, addr = %info.addr, "listening");
        // Rank 0 connects first and names the run's ranks; then the lower ones among
        // them connect to us and we connect to the higher ones.
        let mut acc = Accepting::new(&hs);
        tokio::time::timeout(t.wait_for_leader, acc.until(listener.as_mut(), &[0]))
            .await
            .map_err(|_| WorkerError::NoLeader { seconds: t.wait_for_leader.as_secs_f64() })??;
        let mut leader = acc.got.remove(&0).ok_or_else(|| WorkerError::Wire("no connection from rank 0".into()))?;
        let frame = read_frame(&mut leader, t.handshake, "the plan", 0).await?;
        let (plan, alternatives, ranks, checkpoint, dtype, timing, train, dequantize, quantize, dense_matmul) =
            match frame.message {
                Message::Setup {
                    plan,
                    ranks,
                    checkpoint,
                    dtype,
                    timing,
                    train,
                    dequantize,
                    quantize,
                    dense_matmul,
                    alternatives,
                } => (plan, alternatives, ranks, checkpoint, dtype, timing, train, dequantize, quantize, dense_matmul),
                // A leader checking that this rank is up (to bring it back into its plan).
                Message::Shutdown { reason } => return Err(WorkerError::Dismissed(reason)),
                other => {
                    return Err(WorkerError::Peer {
                        rank: 0,
                        message: format!("sent `{}` instead of the plan", other.name()),
                    })
                }
            };
        let run: Vec<u32> = ranks.iter().map(|r| r.rank).collect();
        let known = ranks.iter().all(|r| cfg.cluster.get(r.rank).is_ok_and(|mine| mine == r));
        if !known || !run.contains(&0) || !run.contains(&me) {
            let msg = "rank 0's cluster differs from this rank's cluster file".to_string();
            let _ = leader.writer.send(Frame::control(Message::Error { rank: me, message: msg.clone() })).await;
            return Err(WorkerError::Plan(msg));
        }
        let lower: Vec<u32> = run.iter().copied().filter(|&r| r != 0 && r < me).collect();
        let dial_up = async {
            let mut got = HashMap::new();
            for &r in run.iter().filter(|&&r| r > me) {
                let addr = cfg.cluster.get(r)?.addr.clone();
                got.insert(r, dial(net, &info.addr, &addr, &hs, r).await?.0);
            }
            Ok::<_, WorkerError>(got)
        };
        let peers = async { tokio::try_join!(acc.until(listener.as_mut(), &lower), dial_up) };
        let limit = t.connect + t.handshake;
        // Rank 0 sends nothing more until we ask for weights: if its connection ends
        // meanwhile (it gave this run up, say for a rank that died), so does the set-up.
        let gone = async {
            let why = match leader.reader.next().await {
                None => "closed the connection during the set-up".to_string(),
                Some(Err(e)) => format!("during the set-up: {e}"),
                Some(Ok(f)) => format!("sent `{}` during the set-up", f.message.name()),
            };
            WorkerError::Peer { rank: 0, message: why }
        };
        let ((), higher) = tokio::select! {
            r = tokio::time::timeout(limit, peers) => r.map_err(|_| {
                WorkerError::Wire(format!(
                    "the run's other ranks {run:?} did not all connect within {:.0} s",
                    limit.as_secs_f64()
                ))
            })??,
            e = gone => return Err(e),
        };
        // (A second rank 0 that authenticated meanwhile is dropped.)
        conns.extend(acc.got.drain().filter(|(r, _)| *r != 0 && run.contains(r)));
        conns.insert(0, leader);
        conns.extend(higher);
        active = run;
        let dtype = candle_dtype(dtype);
        let variant = variant(dtype, dequantize, quantize);
        (*plan, alternatives, Source::Fetch(*checkpoint, variant), dtype, timing, train, dense_matmul)
    };

    // Validate and load before any compute; report failures to rank 0 by name. Rank 0
    // serves every rank its weights while it loads its own.
    let loaded = match source {
        Source::Leader(ck, allowed) => {
            let serving = futures::future::try_join_all(
                conns.iter_mut().map(|(r, conn)| fetch::serve(conn, *r, &allowed[r], ck.clone(), dtype, &t)),
            );
            let own = load_local((&plan, &alternatives), me, cfg, ck.clone(), dtype, train.as_ref());
            tokio::try_join!(own, serving).map(|(own, _)| own)
        }
        Source::Fetch(checkpoint, variant) => match conns.get_mut(&0) {
            Some(leader) => {
                let plans = (&plan, alternatives.as_slice());
                load_fetched(plans, me, cfg, (checkpoint, variant), dtype, train.as_ref(), leader).await
            }
            None => Err(WorkerError::Wire("no connection from rank 0".into())),
        },
    };
    let (prog, exec, weight_bytes, load_seconds) = match loaded {
        Ok(p) => p,
        Err(e) => {
            if let Some(leader) = conns.get_mut(&0) {
                let _ = leader.writer.send(Frame::control(Message::Error { rank: me, message: e.to_string() })).await;
            }
            return Err(e);
        }
    };
    tracing::info!(rank = me, weight_bytes, load_seconds, "weights loaded");

    if me == 0 {
        for (r, conn) in conns.iter_mut() {
            let frame = read_frame(conn, t.load, "ready", *r).await.map_err(|e| e.at(*r))?;
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
    } else if let Some(leader) = conns.get_mut(&0) {
        leader.writer.send(Frame::control(Message::Ready { rank: me, weight_bytes, load_seconds })).await?;
    }
    Ok(Ready { conns, prog, exec, timing, dense_matmul, active })
}

/// Where a rank's weights come from.
enum Source {
    /// Rank 0: its checkpoint, and the ops whose weights each rank may fetch.
    Leader(Arc<Checkpoint>, HashMap<u32, Vec<OpRef>>),
    /// Another rank: rank 0's checkpoint, by hash, in this variant (see [`variant`]).
    Fetch(CheckpointRef, String),
}

/// The adapters this rank's ops get: (op, layer) list, LoRA rank, set-up.
type AdapterList = Option<(Vec<(lemur_protocol::OpKind, u32)>, usize, TrainSetup)>;

/// Which adapters this rank's program needs.
fn adapters_of(prog: &RankProgram, train: Option<&TrainSetup>) -> Result<AdapterList, WorkerError> {
    Ok(match (prog, train) {
        (RankProgram::Train(t), Some(setup)) => Some((t.local_adapters(), t.lora_rank, setup.clone())),
        (RankProgram::Train(_), None) => {
            return Err(WorkerError::Plan("a training plan needs the adapters' set-up".into()))
        }
        (RankProgram::Infer(p), Some(setup)) => {
            // Inference with trained adapters on the projections this rank runs.
            let targets = setup.targets.clone().unwrap_or_default();
            let rank = setup.rank.unwrap_or(DEFAULT_LORA_RANK) as usize;
            let mut list: Vec<_> = p
                .local_weights()
                .into_iter()
                .filter(|(k, _)| targets.contains(k))
                .filter_map(|(k, l)| l.map(|l| (k, l)))
                .collect();
            list.sort_by_key(|(k, l)| (*l, *k));
            Some((list, rank, setup.clone()))
        }
        (RankProgram::Infer(_), None) => None,
    })
}

/// Initialises the adapters `list` names on `exec`.
fn init_adapters(exec: &mut Executor, adapters: AdapterList) -> Result<(), WorkerError> {
    let Some((list, rank, setup)) = adapters else { return Ok(()) };
    for (kind, layer) in list {
        let (a, b) = crate::lora::init(&exec.cfg, kind, layer, rank, setup.seed, setup.zero_b, &exec.device)?;
        let ad = crate::lora::Adapter {
            a: candle_core::Var::from_tensor(&a)?,
            b: candle_core::Var::from_tensor(&b)?,
            scale: setup.alpha / rank as f64,
            dropout: setup.dropout,
        };
        exec.adapters.insert((kind, Some(layer)), ad);
    }
    Ok(())
}

type Loaded = (RankProgram, Executor, u64, f64);

/// Rank 0: its program, and its weights and adapters loaded from its checkpoint (on a
/// blocking thread).
async fn load_local(
    (plan, alternatives): (&Plan, &[Plan]),
    me: u32,
    cfg: &NodeConfig,
    ck: Arc<Checkpoint>,
    dtype: DType,
    train: Option<&TrainSetup>,
) -> Result<Loaded, WorkerError> {
    let prog = RankProgram::with_alternatives(plan, alternatives, me, &cfg.cluster.rank_of_machine())?;
    let adapters = adapters_of(&prog, train)?;
    let device = cfg.device.clone();
    let wanted = prog.local_weights();
    let t0 = Instant::now();
    let (exec, bytes) = tokio::task::spawn_blocking(move || {
        let mut exec = Executor::new(ck.config.clone(), device, dtype)?;
        let bar = crate::progress::ops_bar(0, &format!("rank {me}: loading weights"));
        let bytes = ck.load_into(&mut exec, &wanted, Some(&bar))?;
        bar.finish_and_clear();
        init_adapters(&mut exec, adapters)?;
        Ok::<_, WorkerError>((exec, bytes))
    })
    .await
    .map_err(|e| WorkerError::Weights(format!("loading panicked: {e}")))??;
    Ok((prog, exec, bytes, t0.elapsed().as_secs_f64()))
}

/// A rank other than 0: its program, and the weights of its ops from its cache or fetched
/// from rank 0 (see [`fetch`]), then its adapters.
async fn load_fetched(
    (plan, alternatives): (&Plan, &[Plan]),
    me: u32,
    cfg: &NodeConfig,
    (checkpoint, variant): (CheckpointRef, String),
    dtype: DType,
    train: Option<&TrainSetup>,
    leader: &mut Conn,
) -> Result<Loaded, WorkerError> {
    let config = checkpoint.config.clone();
    config.validate().map_err(|e| WorkerError::Peer { rank: 0, message: format!("the checkpoint's shape: {e}") })?;
    check_model_shape(&config, "rank 0's checkpoint", &plan.model)?;
    for alt in alternatives {
        check_model_shape(&config, "rank 0's checkpoint", &alt.model)?;
    }
    let prog = RankProgram::with_alternatives(plan, alternatives, me, &cfg.cluster.rank_of_machine())?;
    let adapters = adapters_of(&prog, train)?;
    let local = prog.local_weights();
    let t0 = Instant::now();
    let cache = WeightCache::new(&cfg.cache_dir, &checkpoint, &variant)?;
    let blobs =
        fetch::fetch(leader, me, fetch::ops_with_weights(&local, &config), cache, &config, &cfg.timeouts).await?;
    let device = cfg.device.clone();
    let (exec, bytes) = tokio::task::spawn_blocking(move || {
        let mut exec = Executor::new(config.clone(), device, dtype)?;
        let mut bytes = 0;
        for blob in blobs {
            let op = blob.meta.op;
            bytes += blob.meta.len;
            let w = blob.into_weights(&config, &exec.device, dtype)?;
            if op.kind == OpKind::Embedding && config.tie_word_embeddings && local.contains(&(OpKind::LmHead, None)) {
                exec.set_weights(OpKind::LmHead, None, w.tied_head()?);
            }
            exec.set_weights(op.kind, op.layer, w);
        }
        init_adapters(&mut exec, adapters)?;
        Ok::<_, WorkerError>((exec, bytes))
    })
    .await
    .map_err(|e| WorkerError::Weights(format!("loading panicked: {e}")))??;
    Ok((prog, exec, bytes, t0.elapsed().as_secs_f64()))
}

/// Whether rank `rank` is up and waiting for a leader: one connection attempt and a
/// handshake, then `Shutdown` (the rank goes back to waiting). Rank 0 only.
pub(super) async fn probe(cfg: &NodeConfig, rank: u32) -> bool {
    let (Ok(hs), Ok(me), Ok(them)) = (Handshake::of(cfg), cfg.cluster.get(cfg.rank), cfg.cluster.get(rank)) else {
        return false;
    };
    let dial = dial_within(cfg.transport.as_ref(), &me.addr, &them.addr, &hs, rank, Duration::ZERO);
    match tokio::time::timeout(cfg.timeouts.handshake, dial).await {
        Ok(Ok((mut conn, _))) => {
            let bye = Message::Shutdown { reason: "probe: rank 0 is checking that this rank is up".into() };
            let _ = conn.writer.send(Frame::control(bye)).await;
            true
        }
        _ => false,
    }
}
