//! Rank 0 as a server: the [`Engine`] handle a front end (`lemur-serve`'s HTTP) submits
//! requests through, the messages behind it, and the node's state while it serves.
//!
//! A request's events ([`Event`]) arrive on its own channel as the scheduler produces
//! them; dropping the receiver cancels the request at the next step. Draining stops
//! admissions, lets the running requests finish within a grace period, cancels what is
//! left, and resolves once nothing runs; [`Engine::stop`] then tells every rank.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::leader::Node;
use crate::batch::{Event, Refusal, Request, Scheduler};

/// Whom a request's events go to.
pub(super) enum Sink {
    /// The one-shot job of `lemur-worker`'s rank 0.
    Job,
    Client(mpsc::UnboundedSender<Event>),
}

/// Rank 0's inference state.
pub(super) struct Serving {
    pub sched: Scheduler,
    pub sinks: HashMap<u64, Sink>,
    /// When each step in flight started.
    pub step_started: HashMap<u64, Instant>,
    /// Since when a step has been in flight without a break.
    pub busy_since: Option<Instant>,
    pub steps: u64,
    /// Segments in the last step started.
    pub last_batch: usize,
    /// Time with a step in flight.
    pub busy: Duration,
    /// Why the cluster cannot serve (a rank lost, a rank's error).
    pub down: Option<String>,
    /// What rank 0 knows of each rank, by rank.
    pub ranks: Vec<RankStatus>,
    pub draining: bool,
    pub drained: Vec<oneshot::Sender<()>>,
    /// A new placement is being planned and set up (requests wait in the queue).
    pub replanning: bool,
    /// A lost rank is back: re-plan once the steps in flight are done.
    pub rejoin_pending: bool,
    /// Placements made since the start (each lost rank, each rank back).
    pub replans: u64,
    /// Requests put back in the queue to run again on a new placement.
    pub replayed: u64,
    /// Serving a plan set: the placement of each step.
    pub placer: Option<crate::placement::Placer>,
}

impl Serving {
    pub fn new(sched: Scheduler, ranks: u32, active: &[u32]) -> Self {
        Self {
            sched,
            sinks: HashMap::new(),
            step_started: HashMap::new(),
            busy_since: None,
            steps: 0,
            last_batch: 0,
            busy: Duration::ZERO,
            down: None,
            ranks: (0..ranks)
                .map(|rank| RankStatus { rank, active: active.contains(&rank), ..RankStatus::default() })
                .collect(),
            draining: false,
            drained: Vec::new(),
            replanning: false,
            rejoin_pending: false,
            replans: 0,
            replayed: 0,
            placer: None,
        }
    }
}

/// Why the engine did not take a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The cluster cannot serve: a rank was lost or failed, or the runtime has stopped.
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
}

/// One rank as the server sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankStatus {
    pub rank: u32,
    /// In the current placement.
    pub active: bool,
    /// Why it is gone, if it is.
    pub lost: Option<String>,
    pub peak_rss_bytes: u64,
    pub bytes_sent: u64,
}

/// A snapshot of the cluster and its scheduler.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterStatus {
    pub ranks: Vec<RankStatus>,
    pub down: Option<String>,
    pub draining: bool,
    /// A new placement is being set up (a rank lost or back); requests queue meanwhile.
    pub replanning: bool,
    /// Placements made since the start, the first excluded.
    pub replans: u64,
    /// Requests replayed on a new placement since the start.
    pub replayed: u64,
    pub queue_depth: usize,
    pub running: usize,
    pub kv_positions_reserved: usize,
    pub kv_positions: Option<usize>,
    pub steps: u64,
    /// Requests in the last step started.
    pub last_batch: usize,
    /// Seconds with a step in flight since the start.
    pub busy_seconds: f64,
    /// Serving a plan set: the decode placement now, its switches and the KV caches moved.
    pub placement: Option<crate::placement::PlacerStats>,
}

#[derive(Message)]
#[rtype(result = "Result<(), SubmitError>")]
pub(super) struct Submit {
    pub req: Request,
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Cancel(pub u64);

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Drain {
    pub grace: Duration,
    pub done: oneshot::Sender<()>,
}

#[derive(Message)]
#[rtype(result = "ClusterStatus")]
pub(super) struct Status;

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Stop;

/// A handle on rank 0's runtime: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Engine {
    pub(super) node: Addr<Node>,
    pub(super) next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// A request id never used before.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues `req`; its events arrive on the returned channel, ending with `Done`.
    pub async fn submit(&self, req: Request) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let (tx, rx) = mpsc::unbounded_channel();
        match self.node.send(Submit { req, events: tx }).await {
            Ok(r) => r.map(|()| rx),
            Err(e) => Err(SubmitError::Unavailable(format!("the runtime has stopped ({e})"))),
        }
    }

    /// Cancels a request (a no-op for one that has ended).
    pub fn cancel(&self, id: u64) {
        self.node.do_send(Cancel(id));
    }

    pub async fn status(&self) -> Result<ClusterStatus, SubmitError> {
        self.node.send(Status).await.map_err(|e| SubmitError::Unavailable(format!("the runtime has stopped ({e})")))
    }

    /// Stops admissions; resolves when every running request has ended (cancelled after
    /// `grace`).
    pub async fn drain(&self, grace: Duration) {
        let (done, wait) = oneshot::channel();
        if self.node.send(Drain { grace, done }).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Tells every rank to shut down and stops this rank's runtime.
    pub fn stop(&self) {
        self.node.do_send(Stop);
    }
}

impl Node {
    /// Answers drain waiters once nothing runs.
    pub(super) fn check_drained(&mut self, _ctx: &mut Context<Self>) {
        let Some(s) = self.serving.as_mut() else { return };
        if s.draining && s.sched.is_idle() {
            for w in s.drained.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

impl Handler<Submit> for Node {
    type Result = Result<(), SubmitError>;
    fn handle(&mut self, m: Submit, _ctx: &mut Self::Context) -> Self::Result {
        let s = self.serving.as_mut().ok_or_else(|| SubmitError::Unavailable("not serving".into()))?;
        if let Some(why) = &s.down {
            return Err(SubmitError::Unavailable(why.clone()));
        }
        let id = m.req.id;
        s.sched.submit(m.req)?;
        s.sinks.insert(id, Sink::Client(m.events));
        self.pump();
        Ok(())
    }
}

impl Handler<Cancel> for Node {
    type Result = ();
    fn handle(&mut self, Cancel(id): Cancel, ctx: &mut Self::Context) {
        if let Some(s) = self.serving.as_mut() {
            let events = s.sched.cancel(id);
            self.dispatch(events, ctx);
        }
    }
}

impl Handler<Drain> for Node {
    type Result = ();
    fn handle(&mut self, m: Drain, ctx: &mut Self::Context) {
        let Some(s) = self.serving.as_mut() else {
            let _ = m.done.send(());
            return;
        };
        s.draining = true;
        s.drained.push(m.done);
        let events = s.sched.drain();
        ctx.run_later(m.grace, |act, ctx| {
            if let Some(s) = act.serving.as_mut() {
                let events = s.sched.cancel_all();
                act.dispatch(events, ctx);
                // A step whose ranks never answer must not hold the shutdown.
                ctx.run_later(Duration::from_secs(5), |act, ctx| {
                    if let Some(s) = act.serving.as_mut() {
                        let events = s.sched.fail_all();
                        act.dispatch(events, ctx);
                    }
                });
            }
        });
        self.dispatch(events, ctx);
    }
}

impl Handler<Status> for Node {
    type Result = MessageResult<Status>;
    fn handle(&mut self, _: Status, _ctx: &mut Self::Context) -> Self::Result {
        let Some(s) = self.serving.as_ref() else {
            return MessageResult(ClusterStatus { down: Some("not serving".into()), ..ClusterStatus::default() });
        };
        MessageResult(ClusterStatus {
            ranks: s.ranks.clone(),
            down: s.down.clone(),
            draining: s.draining,
            replanning: s.replanning || s.rejoin_pending,
            replans: s.replans,
            replayed: s.replayed,
            queue_depth: s.sched.queue_depth(),
            running: s.sched.running(),
            kv_positions_reserved: s.sched.reserved_positions(),
            kv_positions: s.sched.config().kv_positions,
            steps: s.steps,
            last_batch: s.last_batch,
            busy_seconds: s.busy.as_secs_f64(),
            placement: s.placer.as_ref().map(|p| p.stats()),
        })
    }
}

impl Handler<Stop> for Node {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        self.finish_with(Ok(None), ctx);
    }
}
