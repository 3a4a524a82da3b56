//! Rank 0 serving through a lost rank and back.
//!
//! When a rank of the placement is lost (its connection closes, its heartbeats stop, or
//! it reports an error), rank 0 ends the run's cluster: the surviving ranks are told to
//! go back to waiting, frames of the old cluster are dropped by their epoch, and every
//! running request goes back to the head of the queue to be replayed from its prompt and
//! the tokens generated so far ([`crate::batch::Scheduler::replay_all`]; greedy output is
//! unchanged). It then plans again over the ranks left ([`super::Replan`], given by the
//! front end: workers never plan), sets the new placement up as at the start (the
//! survivors' weights come from their caches), and goes on serving; requests that
//! arrive meanwhile wait in the queue. If the model fits nowhere, every request gets 503
//! with the planner's shortfall until a rank comes back. Lost ranks are probed every
//! [`PROBE_EVERY`]; one that answers is planned back in once the steps in flight are done.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use lemur_protocol::wire::{Frame, Message};
use lemur_protocol::Plan;

use super::actors::Close;
use super::leader::Node;
use super::setup::{self, Ready};
use super::{spawn_cluster, NodeConfig, Replan};
use crate::error::WorkerError;

/// How often rank 0 looks for lost ranks that came back.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// What rank 0 needs to set a new placement up.
pub(super) struct Failover {
    /// Rank 0's configuration; its job's plan is the one the server started with.
    pub cfg: NodeConfig,
    pub replan: Replan,
    /// Ranks out of the placement, and why.
    pub lost: BTreeMap<u32, String>,
    probing: bool,
}

impl Failover {
    pub fn new(cfg: NodeConfig, replan: Replan, lost: BTreeMap<u32, String>) -> Self {
        Self { cfg, replan, lost, probing: false }
    }
}

/// `cfg` (whose job holds the plan the server started with) re-planned over the ranks
/// not in `lost`: the configuration to set up, and its plan.
pub(super) async fn place(
    mut cfg: NodeConfig,
    replan: &Replan,
    lost: &BTreeMap<u32, String>,
) -> Result<(NodeConfig, Plan), WorkerError> {
    let live: Vec<_> = cfg.cluster.ranks.iter().filter(|r| !lost.contains_key(&r.rank)).cloned().collect();
    let machines: Vec<String> = live.iter().map(|r| r.machine.clone()).collect();
    tracing::info!(?machines, "planning a new placement");
    let Some(mut job) = cfg.job.take() else { return Err(WorkerError::Plan("rank 0 has no job".into())) };
    // Every rank back: the plan set the server started with, as it was.
    if lost.is_empty() && job.plan_set.is_some() {
        let plan = job.plan.clone();
        cfg.job = Some(job);
        return Ok((cfg, plan));
    }
    // A placement planned over the ranks left is one placement, not a set.
    job.plan_set = None;
    let (first, replan) = (job.plan.clone(), replan.clone());
    let plan = tokio::task::spawn_blocking(move || (replan.0)(&first, &machines))
        .await
        .map_err(|e| WorkerError::Plan(format!("planning panicked: {e}")))?
        .map_err(|e| WorkerError::Plan(format!("no placement over the ranks left: {e}")))?;
    let used: Vec<u32> = live
        .iter()
        .filter(|r| r.rank == 0 || plan.machines.iter().any(|m| m.name == r.machine))
        .map(|r| r.rank)
        .collect();
    job.plan = plan.clone();
    cfg.job = Some(job);
    cfg.active = Some(used);
    Ok((cfg, plan))
}

/// Rank 0's first set-up with failover: a rank that cannot be reached or fails its
/// set-up is planned around as if lost while serving (and probed to come back); the
/// ranks lost, what was set up, and its configuration (with the plan it runs).
pub(super) async fn first_setup(
    cfg: &NodeConfig,
    replan: &Replan,
) -> Result<(BTreeMap<u32, String>, setup::Ready, NodeConfig), WorkerError> {
    let mut lost = BTreeMap::new();
    let mut run = cfg.clone();
    loop {
        match setup::connect_and_load(&run).await {
            Ok(ready) => return Ok((lost, ready, run)),
            Err(WorkerError::Peer { rank, message }) if rank != 0 && !lost.contains_key(&rank) => {
                tracing::warn!(rank, message, "a rank failed its set-up; planning around it");
                lost.insert(rank, message);
                run = place(cfg.clone(), replan, &lost)
                    .await
                    .map_err(|e| WorkerError::Plan(format!("{e} (lost: {})", describe(&lost))))?
                    .0;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A new placement set up: its ranks, the plan set's policy (when every rank
/// is back and the server serves a set), and the KV positions it leaves.
type Rebuilt = (Ready, Option<crate::placement::Placer>, Option<usize>);

/// `rank 2: why; rank 3: why`.
fn describe(lost: &BTreeMap<u32, String>) -> String {
    lost.iter().map(|(r, why)| format!("rank {r}: {why}")).collect::<Vec<_>>().join("; ")
}

impl Node {
    /// Looks for lost ranks every [`PROBE_EVERY`].
    pub(super) fn start_probing(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(PROBE_EVERY, |act, ctx| act.probe_lost(ctx));
    }

    /// Rank `rank` of the placement is gone: plan around it.
    pub(super) fn lose(&mut self, rank: u32, reason: String, ctx: &mut Context<Self>) {
        let Some(f) = self.failover.as_mut() else { return };
        tracing::warn!(rank, reason, "lost a rank; planning again over the ranks left");
        f.lost.insert(rank, reason.clone());
        if let Some(r) = self.serving.as_mut().and_then(|s| s.ranks.get_mut(rank as usize)) {
            r.lost = Some(reason);
        }
        self.rebuild(ctx);
    }

    /// Ends the current cluster, replays the running requests, and plans and sets up a
    /// placement over the ranks not lost.
    fn rebuild(&mut self, ctx: &mut Context<Self>) {
        let (Some(f), Some(serving)) = (self.failover.as_ref(), self.serving.as_mut()) else { return };
        self.router.to_peers(&Frame::control(Message::Shutdown { reason: "re-planning".into() }));
        for p in self.router.peers.values() {
            p.do_send(Close);
        }
        self.compute.do_send(super::compute::Work::Release);
        self.router.peers.clear();
        self.epoch += 1;
        serving.replanning = true;
        serving.rejoin_pending = false;
        serving.step_started.clear();
        serving.busy_since = None;
        serving.replayed += serving.sched.running() as u64;
        let events = serving.sched.replay_all();
        let (cfg, replan, epoch) = (f.cfg.clone(), f.replan.clone(), self.epoch);
        let lost = f.lost.clone();
        let fut = async move {
            let (cfg, _) = place(cfg, &replan, &lost).await?;
            let ready = setup::connect_and_load(&cfg).await?;
            let placer = crate::placement::Placer::for_job(cfg.job.as_ref(), &ready.prog)?;
            let kv = cfg.job.as_ref().and_then(|j| j.kv_positions());
            Ok((ready, placer, kv))
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| act.rebuilt(epoch, result, ctx)));
        self.dispatch(events, ctx);
    }

    /// The new placement is up (or could not be made).
    fn rebuilt(&mut self, epoch: u64, result: Result<Rebuilt, WorkerError>, ctx: &mut Context<Self>) {
        if self.shutting_down || epoch != self.epoch {
            return;
        }
        match result {
            Ok((ready, placer, set_kv)) => {
                let Some(f) = self.failover.as_ref() else { return };
                self.active = ready.active.clone();
                let (router, compute) = spawn_cluster(ctx.address(), self.me, self.epoch, ready, &f.cfg);
                (self.router, self.compute) = (router, compute);
                let kv = f.cfg.job.as_ref().and_then(|j| j.serve).and_then(|c| c.kv_positions);
                let Some(s) = self.serving.as_mut() else { return };
                s.replanning = false;
                s.replans += 1;
                s.down = None;
                for r in s.ranks.iter_mut() {
                    r.active = self.active.contains(&r.rank);
                    r.lost = f.lost.get(&r.rank).cloned();
                }
                s.placer = placer;
                let events = s.sched.set_kv_positions(kv.or(set_kv));
                tracing::info!(epoch, ranks = ?self.active, replans = s.replans, "serving on the new placement");
                self.dispatch(events, ctx);
            }
            // Another rank failed during the set-up: plan around it too.
            Err(WorkerError::Peer { rank, message })
                if rank != 0 && self.failover.as_ref().is_some_and(|f| !f.lost.contains_key(&rank)) =>
            {
                self.lose(rank, message, ctx)
            }
            Err(e) => {
                tracing::error!("the cluster is down: {e}");
                let Some(s) = self.serving.as_mut() else { return };
                s.replanning = false;
                s.down = Some(e.to_string());
                let events = s.sched.fail_all();
                self.dispatch(events, ctx);
            }
        }
    }

    /// Probes the lost ranks, one round at a time.
    fn probe_lost(&mut self, ctx: &mut Context<Self>) {
        let busy = self.serving.as_ref().is_none_or(|s| s.replanning || s.draining);
        let Some(f) = self.failover.as_mut() else { return };
        if f.probing || f.lost.is_empty() || busy || self.shutting_down {
            return;
        }
        f.probing = true;
        let (cfg, ranks) = (f.cfg.clone(), f.lost.keys().copied().collect::<Vec<_>>());
        let fut = async move {
            let mut back = Vec::new();
            for r in ranks {
                if setup::probe(&cfg, r).await {
                    back.push(r);
                }
            }
            back
        };
        ctx.spawn(fut.into_actor(self).map(|back, act, ctx| act.probed(back, ctx)));
    }

    fn probed(&mut self, back: Vec<u32>, ctx: &mut Context<Self>) {
        let Some(f) = self.failover.as_mut() else { return };
        f.probing = false;
        if back.is_empty() || self.shutting_down {
            return;
        }
        for r in &back {
            f.lost.remove(r);
        }
        tracing::info!(ranks = ?back, "lost ranks are back; planning them in at the next step boundary");
        if let Some(s) = self.serving.as_mut() {
            s.rejoin_pending = true;
        }
        self.maybe_rejoin(ctx);
    }

    /// Re-plans with the ranks that came back once no step is in flight.
    pub(super) fn maybe_rejoin(&mut self, ctx: &mut Context<Self>) {
        let ready =
            self.serving.as_ref().is_some_and(|s| s.rejoin_pending && !s.replanning && s.sched.in_flight().is_empty());
        if ready {
            self.rebuild(ctx);
        }
    }
}
