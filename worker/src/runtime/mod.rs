//! A rank's runtime: connections, the actors that run a plan, and rank 0's loops.
//!
//! A tour, in the order a run goes through it:
//! - [`job`]: what a caller hands a rank ([`NodeConfig`], [`Job`], [`TrainLoop`]) and what
//!   rank 0 gets back ([`Outcome`]).
//! - [`transport`]: the [`Transport`] trait: [`Tcp`] in production, and [`memnet`], an
//!   in-memory network with fault injection for tests.
//! - `setup`: handshakes, the plan from rank 0, weights loaded, every rank ready; every
//!   read with a deadline.
//! - `actors`: the messages between actors, the `Peer` actor (one per connection,
//!   heartbeats) and the `Router`: a frame for this rank itself goes through the same
//!   handlers as one from any other rank.
//! - `compute`: the `Compute` actor: candle on its own thread, thin over the runners in
//!   [`crate::program`] and [`crate::train`], with training's scheduler; `optimizer`: AdamW
//!   and the adapters by PEFT name, plain code.
//! - `leader`: the `Node` actor, routing frames and on rank 0 running the continuous-
//!   batching scheduler's steps ([`crate::batch`]); `serving`: rank 0 as a server, behind
//!   the [`Engine`] handle; `trainer`: rank 0's training loop (micro-batch window, gradient
//!   norm, optimizer steps, checkpoints).
//!
//! Flow control is by step: rank 0 starts step n + 1 only after step n's logits, and admits
//! a training micro-batch only when one has left every rank.

mod actors;
mod compute;
mod failover;
mod fetch;
pub mod job;
mod leader;
pub mod memnet;
mod optimizer;
mod serving;
pub(crate) mod setup;
mod trainer;
pub mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::io::SinkWrite;
use actix::prelude::*;
use candle_core::Device;
use lemur_protocol::auth::{ClusterKey, Credentials};

pub use job::{AdapterGrads, Job, Outcome, Replan, StepLog, StepSink, Timeouts, TokenSink, TrainLoop};
pub use optimizer::{AdamW, AdapterState};
pub use serving::{ClusterStatus, Engine, RankStatus, SubmitError};
pub use transport::{Conn, Tcp, Transport};

use crate::cluster::Cluster;
use crate::error::WorkerError;
use actors::{Peer, Router};
use compute::Compute;
use leader::{Begin, Node, Shared};

/// Everything a rank needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub rank: u32,
    pub cluster: Cluster,
    pub device: Device,
    /// Rank 0 only.
    pub job: Option<Job>,
    pub timeouts: Timeouts,
    /// How ranks reach each other ([`Tcp`] unless testing).
    pub transport: Arc<dyn Transport>,
    /// The cluster's shared key: every connection authenticates with it. Without one, the
    /// cluster must be on loopback addresses only ([`NodeConfig::check_exposure`]).
    pub key: Option<ClusterKey>,
    /// Lemurian's cache folder: ranks other than 0 keep the weights rank 0 sent them under
    /// `weights/`; rank 0 remembers its checkpoint's hash under `checkpoints/`.
    pub cache_dir: std::path::PathBuf,
    /// Rank 0: the ranks this run uses, rank 0 among them (default: every rank of the
    /// cluster file). The others are never dialled and go on waiting for a leader.
    pub active: Option<Vec<u32>>,
}

impl NodeConfig {
    /// A rank over TCP with the default timeouts and no key.
    pub fn new(rank: u32, cluster: Cluster, device: Device, job: Option<Job>) -> Self {
        Self {
            rank,
            cluster,
            device,
            job,
            timeouts: Timeouts::default(),
            transport: Arc::new(Tcp),
            key: None,
            cache_dir: crate::weight_cache::default_cache_dir(),
            active: None,
        }
    }

    /// What this rank proves itself with in handshakes.
    pub fn credentials(&self) -> Credentials {
        Credentials::new(self.key.as_ref(), &self.cluster.id)
    }

    /// The ranks of this run, sorted: [`NodeConfig::active`], checked against the cluster.
    pub fn run_ranks(&self) -> Result<Vec<u32>, WorkerError> {
        let Some(active) = &self.active else { return Ok(self.cluster.ranks.iter().map(|r| r.rank).collect()) };
        let mut a = active.clone();
        a.sort_unstable();
        a.dedup();
        if a.first() != Some(&0) {
            return Err(WorkerError::Plan(format!("the run's ranks {a:?} must include rank 0, the leader")));
        }
        for &r in &a {
            self.cluster.get(r)?;
        }
        Ok(a)
    }

    /// Refuses a keyless cluster with an address other than loopback
    /// ([`Cluster::check_exposure`]).
    pub fn check_exposure(&self) -> Result<(), WorkerError> {
        self.cluster.check_exposure(self.key.is_some())
    }
}

/// Runs a rank until its work is done. Rank 0 returns the request's outcome.
pub fn run_node(cfg: NodeConfig) -> Result<Option<Outcome>, WorkerError> {
    run_system(cfg, |_| {})
}

/// Runs a rank other than 0 as a long-running service: after each leader's run, ended or
/// failed (the leader died, a rank failed, the plan did not fit), it goes back to waiting
/// for the next leader. It returns only on what another round cannot mend: an address it
/// cannot listen on, an exposed keyless cluster, a bad cluster entry.
pub fn serve_worker(cfg: NodeConfig) -> Result<(), WorkerError> {
    if cfg.rank == 0 {
        return Err(WorkerError::Plan("rank 0 is the leader; it runs a job or serves with lemur-serve".into()));
    }
    let me = cfg.rank;
    for round in 1u64.. {
        match run_node(cfg.clone()) {
            Ok(_) => tracing::info!(rank = me, round, "the leader's run ended; waiting for the next leader"),
            Err(e @ (WorkerError::Listen { .. } | WorkerError::Insecure(_) | WorkerError::Key(_))) => return Err(e),
            Err(WorkerError::NoLeader { seconds }) => {
                tracing::debug!(rank = me, seconds, "no leader yet; still waiting")
            }
            Err(WorkerError::Dismissed(reason)) => tracing::debug!(rank = me, reason, "rank 0 looked in; waiting"),
            Err(e) => tracing::warn!(rank = me, round, error = %e, "the run failed; waiting for the next leader"),
        }
    }
    Ok(())
}

/// Runs rank 0 as a server: `cfg.job` must have `serve` set. Once every rank is ready,
/// `on_ready` gets the [`Engine`] on this thread's actor system (where a front end can
/// spawn its own tasks); the call returns after [`Engine::stop`].
pub fn serve_node(cfg: NodeConfig, on_ready: impl FnOnce(Engine) + 'static) -> Result<(), WorkerError> {
    if cfg.rank != 0 || cfg.job.as_ref().is_none_or(|j| j.serve.is_none()) {
        return Err(WorkerError::Plan("only rank 0 serves, with a job that says how to batch".into()));
    }
    run_system(cfg, move |node| {
        on_ready(Engine { node, next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)) });
    })
    .map(|_| ())
}

fn run_system(cfg: NodeConfig, on_ready: impl FnOnce(Addr<Node>) + 'static) -> Result<Option<Outcome>, WorkerError> {
    cfg.check_exposure()?;
    let system = actix::System::new();
    let result: Shared = Arc::new(Mutex::new(None));
    let res = result.clone();
    system.block_on(async move {
        match start(cfg, res.clone()).await {
            Ok(node) => on_ready(node),
            Err(e) => {
                *res.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e));
                System::current().stop();
            }
        }
    });
    system.run()?;
    let out = result.lock().unwrap_or_else(|p| p.into_inner()).take();
    out.unwrap_or_else(|| Err(WorkerError::Wire("the runtime stopped without a result".into())))
}

/// Set-up, then the actors: a `Peer` per connection, `Compute` on its own thread, the `Node`.
async fn start(cfg: NodeConfig, result: Shared) -> Result<Addr<Node>, WorkerError> {
    let me = cfg.rank;
    let n = cfg.cluster.ranks.len() as u32;
    let replan = cfg.job.as_ref().and_then(|j| j.replan.clone());
    let (ready, failover, cfg) = match replan {
        Some(r) if me == 0 => {
            let (lost, ready, run) = failover::first_setup(&cfg, &r).await?;
            (ready, Some(failover::Failover::new(cfg, r, lost)), run)
        }
        _ => (setup::connect_and_load(&cfg).await?, None, cfg),
    };
    let t = cfg.timeouts;
    let placer = if me == 0 { crate::placement::Placer::for_job(cfg.job.as_ref(), &ready.prog)? } else { None };
    let node = Node::create(|ctx| {
        let active = ready.active.clone();
        let (router, compute) = spawn_cluster(ctx.address(), me, 0, ready, &cfg);
        Node {
            me,
            n,
            active,
            epoch: 0,
            router,
            compute,
            leader: None,
            serving: None,
            failover,
            result: result.clone(),
            shutting_down: false,
            step_timeout: t.step,
        }
    });
    if me == 0 {
        let job = cfg.job.ok_or_else(|| WorkerError::Plan("rank 0 needs a job".into()))?;
        node.do_send(Begin(job, placer));
    }
    Ok(node)
}

/// The actors of one run's cluster for `node`: a `Peer` per connection and `Compute` on
/// its own thread with the run's program and weights, all tagged `epoch`.
fn spawn_cluster(
    node: Addr<Node>,
    me: u32,
    epoch: u64,
    ready: setup::Ready,
    cfg: &NodeConfig,
) -> (Router, Addr<Compute>) {
    let t = cfg.timeouts;
    let mut peers = HashMap::new();
    for (r, conn) in ready.conns {
        let (inbox, down) = (node.clone().recipient(), node.clone().recipient());
        let peer = Peer::create(move |pctx| {
            Peer::add_stream(conn.reader, pctx);
            let sink = SinkWrite::new(conn.writer, pctx);
            Peer { rank: r, me, epoch, inbox, down, sink, last_seen: Instant::now(), seq: 0, t, closing: false }
        });
        peers.insert(r, peer);
    }
    let router = Router { me, epoch, peers, inbox: node.clone().recipient(), crash: node.recipient() };
    let prog = Arc::new(ready.prog);
    let cell = Arc::new(Mutex::new(Some(ready.exec)));
    let (router2, id) = (router.clone(), cfg.cluster.id.clone());
    let (timing, dense_matmul) = (ready.timing, ready.dense_matmul);
    let compute = SyncArbiter::start(1, move || {
        let exec = cell.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut c = Compute::new(me, prog.clone(), router2.clone(), timing);
        c.exec = exec;
        c.cluster_id = id.clone();
        c.dense_matmul = dense_matmul;
        c
    });
    (router, compute)
}
