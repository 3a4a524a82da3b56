//! Serving through a lost rank, over the in-memory network: rank 0 serves through the
//! [`Engine`] with a re-planner; a rank that dies mid-decode is planned around, its
//! requests replayed with their tokens unchanged (each equal to candle-transformers'
//! Mistral), and when it is started again it is probed, planned back in at a step
//! boundary, and serves again. A re-planner that finds no placement takes the cluster
//! down with its reason until the rank returns.

mod common;

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use candle_core::Device;
use lemur_protocol::{OpKind, Plan};
use lemur_worker::batch::{BatchConfig, Event, FinishReason, Request};
use lemur_worker::cluster::Cluster;
use lemur_worker::runtime::memnet::{Fault, MemNet, Rule};
use lemur_worker::runtime::{
    run_node, serve_node, serve_worker, ClusterStatus, Engine, Job, NodeConfig, Replan, SubmitError,
};
use lemur_worker::sampling::Sampling;

use common::*;

/// Starts rank `rank` on its own thread: a long-running worker, or one run.
fn worker(cluster: &Cluster, net: &MemNet, cache: &Path, rank: u32, forever: bool) {
    let mut cfg = NodeConfig::new(rank, cluster.clone(), Device::Cpu, None);
    (cfg.timeouts, cfg.transport) = (fast(), Arc::new(net.clone()));
    cfg.cache_dir = cache.join(format!("rank{rank}"));
    std::thread::spawn(move || if forever { serve_worker(cfg).map(|_| None) } else { run_node(cfg) });
}

struct Served {
    engine: Engine,
    rt: tokio::runtime::Runtime,
    cluster: Cluster,
    cache: tempfile::TempDir,
}

impl Served {
    fn addr(&self, r: usize) -> String {
        self.cluster.ranks[r].addr.clone()
    }

    fn status(&self) -> Result<ClusterStatus> {
        Ok(self.rt.block_on(self.engine.status())?)
    }

    /// Waits until `ok` holds of the status, at most 60 s.
    fn wait_for(&self, what: &str, ok: impl Fn(&ClusterStatus) -> bool) -> Result<ClusterStatus> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status()?;
            if ok(&s) {
                return Ok(s);
            }
            if Instant::now() > until {
                bail!("not {what} within 60 s; status: {s:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs greedy requests at once; each one's tokens and finish reason.
    fn run(&self, reqs: &[(Vec<u32>, usize)]) -> Result<Vec<(Vec<u32>, FinishReason)>> {
        self.rt.block_on(async {
            let mut streams = Vec::new();
            for (prompt, n) in reqs {
                streams.push(self.engine.submit(greedy(&self.engine, prompt.clone(), *n)).await?);
            }
            let mut out = Vec::new();
            for mut rx in streams {
                let mut tokens = Vec::new();
                loop {
                    match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await? {
                        Some(Event::Token { token, index, .. }) => {
                            if index != tokens.len() {
                                bail!("token index {index} after {} tokens", tokens.len());
                            }
                            tokens.push(token);
                        }
                        Some(Event::Done { reason, .. }) => break out.push((tokens, reason)),
                        None => bail!("the stream ended without Done"),
                    }
                }
            }
            Ok(out)
        })
    }
}

/// Rank 0 serving `plan` with `replan`; rank 1 a long-running worker, rank 2 one run
/// (or long-running too, with `forever`).
fn serve(id: &str, plan: &Plan, model: &Path, net: MemNet, replan: Replan, forever: bool) -> Result<Served> {
    serve_job(id, infer_job(plan, model, &[1], 1), net, replan, forever)
}

/// The same for a job made elsewhere (a plan set's).
fn serve_job(id: &str, mut job: Job, net: MemNet, replan: Replan, forever: bool) -> Result<Served> {
    let cluster = cluster_of(id, &job.plan);
    let cache = tempfile::tempdir()?;
    worker(&cluster, &net, cache.path(), 1, true);
    worker(&cluster, &net, cache.path(), 2, forever);
    job.serve = Some(BatchConfig { max_batch: 8, prefill_chunk: 8, prefill_tokens: 16, ..BatchConfig::default() });
    job.replan = Some(replan);
    let mut cfg = NodeConfig::new(0, cluster.clone(), Device::Cpu, Some(job));
    (cfg.timeouts, cfg.transport) = (fast(), Arc::new(net.clone()));
    cfg.cache_dir = cache.path().join("rank0");
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        serve_node(cfg, move |e| {
            let _ = etx.send(e);
        })
    });
    let engine = erx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow!("the server never became ready"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(Served { engine, rt, cluster, cache })
}

/// Layer 0 and the embedding on rank 0, layer 1 on rank 1, the final norm and lm head on
/// rank 2 (which sends rank 0 every step's logits).
fn three_rank_plan(cfg: &lemur_protocol::ModelConfig) -> Result<Plan> {
    infer_plan(cfg, 3, 8, |op| match op.layer {
        Some(l) => l as usize,
        None if op.kind == OpKind::Embedding => 0,
        None => 2,
    })
}

/// A greedy request for `n` tokens.
fn greedy(engine: &Engine, prompt: Vec<u32>, n: usize) -> Request {
    Request {
        id: engine.next_id(),
        prompt,
        max_new_tokens: n,
        stop_tokens: vec![],
        sampling: Sampling::default(),
        keep_logits: false,
    }
}

/// Four requests of different lengths (prompt, tokens to generate).
type Requests = Vec<(Vec<u32>, usize)>;

/// A random checkpoint (seed `seed`, in `dir`), four requests, candle-transformers'
/// tokens for each, and the three-rank plan.
fn fixture(dir: &Path, seed: u64) -> Result<(std::path::PathBuf, Requests, Vec<Vec<u32>>, Plan)> {
    let cfg = tiny(2);
    let model = model(dir, &cfg, seed)?;
    let reqs: Requests =
        (0..4u32).map(|i| ((0..(3 + 4 * i)).map(|t| (t * 11 + i * 7) % 200 + 1).collect(), 6 + i as usize)).collect();
    let want = reqs.iter().map(|(p, n)| reference_generate(&model, p, *n).map(|r| r.0)).collect::<Result<_>>()?;
    Ok((model, reqs, want, three_rank_plan(&cfg)?))
}

fn planner_replan() -> Replan {
    Replan(Arc::new(|plan, machines| {
        let names: Vec<&str> = machines.iter().map(String::as_str).collect();
        lemur_planner::replan(plan, &names, Duration::from_secs(5)).map_err(|e| e.to_string())
    }))
}

/// The planner's placement, except that over two machines everything but the embedding
/// goes to the second (so a re-plan moves weights there).
fn second_machine_replan() -> Replan {
    let inner = planner_replan();
    Replan(Arc::new(move |plan, machines| {
        let mut p = (inner.0)(plan, machines)?;
        if p.machines.len() == 2 {
            p.reassign(|op| usize::from(op.kind != OpKind::Embedding));
            p.validate().map_err(|e| e.to_string())?;
        }
        Ok(p)
    }))
}

/// The tokens of each run.
fn tokens(got: Vec<(Vec<u32>, FinishReason)>) -> Vec<Vec<u32>> {
    got.into_iter().map(|r| r.0).collect()
}

#[test]
fn a_rank_lost_mid_decode_is_planned_around_replayed_unchanged_and_planned_back_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, plan) = fixture(dir.path(), 7)?;
    let net = MemNet::new();
    let s = serve("failover", &plan, &model, net.clone(), planner_replan(), false)?;
    let (a0, a2) = (s.addr(0), s.addr(2));
    assert_eq!(s.status()?.ranks.iter().filter(|r| r.active).count(), 3);
    let blobs_to_2 = net.sent(&a0, &a2, "weight_blob");
    assert!(blobs_to_2 > 0);

    // Rank 2 dies after its third step's logits, mid-decode of all four requests.
    net.add(Rule::on(&a2, &a0, "logits", Fault::Isolate(a2.clone())).after(2));
    let got = s.run(&reqs)?;
    for (i, ((tokens, reason), want)) in got.iter().zip(&want).enumerate() {
        assert_eq!((tokens, *reason), (want, FinishReason::Length), "request {i} after the replay");
    }
    let st = s.wait_for("planned around rank 2", |st| st.replans == 1 && !st.replanning)?;
    assert!(st.replayed >= 1, "{st:?}");
    assert!(st.ranks[2].lost.is_some() && !st.ranks[2].active, "{st:?}");
    assert!(st.ranks[0].active && st.ranks[1].active);
    let logits_from_2 = net.sent(&a2, &a0, "logits");

    // Served by ranks 0 and 1 alone, still right.
    assert_eq!(tokens(s.run(&reqs[..2])?), want[..2]);
    assert_eq!(net.sent(&a2, &a0, "logits"), logits_from_2, "rank 2 is out of the placement");

    // Rank 2 started again: probed, planned back in, and serving.
    worker(&s.cluster, &net, s.cache.path(), 2, true);
    let st = s.wait_for("rank 2 back", |st| st.replans == 2 && !st.replanning && st.ranks.iter().all(|r| r.active))?;
    assert!(st.ranks.iter().all(|r| r.lost.is_none()), "{st:?}");
    assert_eq!(tokens(s.run(&reqs)?), want);
    assert!(net.sent(&a2, &a0, "logits") > logits_from_2, "rank 2 computes the head again");
    // Back in its first placement, rank 2 took its weights from its cache.
    assert_eq!(net.sent(&a0, &a2, "weight_blob"), blobs_to_2);
    Ok(())
}

#[test]
fn a_plan_set_is_replanned_as_one_placement_around_a_lost_rank_and_restored_when_it_returns() -> Result<()> {
    use lemur_protocol::plan::{PlanBucket, PlanSet, Switching};
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, x1) = fixture(dir.path(), 9)?;
    // Rank 2 runs the head in every placement; the layers trade ranks between them.
    let cfg = tiny(2);
    let layers = |l0: usize, l1: usize| {
        infer_plan(&cfg, 3, 8, move |op| match op.layer {
            Some(0) => l0,
            Some(_) => l1,
            None if op.kind == OpKind::Embedding => 0,
            None => 2,
        })
    };
    let bucket = |size: u64, plan: Plan| PlanBucket { size, plan };
    let set = PlanSet {
        format_version: lemur_protocol::PLAN_FORMAT_VERSION,
        decode: vec![bucket(1, x1), bucket(4, layers(1, 0)?)],
        prefill: vec![bucket(16, layers(2, 1)?)],
        weight_bytes: Default::default(),
        kv_bytes: Default::default(),
        switching: Switching {
            decode_step_ms: vec![vec![1.0, 10.0], vec![5.0, 2.0]],
            move_fixed_ms: vec![vec![0.0; 2]; 2],
            move_ms_per_position: vec![vec![0.0; 2]; 2],
        },
    };
    let net = MemNet::new();
    let job = Job::with_plan_set(set, model.clone(), candle_core::DType::F32);
    let s = serve_job("failover-set", job, net.clone(), planner_replan(), false)?;
    let (a0, a2) = (s.addr(0), s.addr(2));
    assert_eq!(tokens(s.run(&reqs)?), want, "served over the set");
    let placed = s.status()?.placement.expect("a plan set");
    assert!(placed.switches >= 1 && placed.moves > 0, "{placed:?}");

    // Rank 2 dies mid-decode: the ranks left serve one re-planned placement.
    net.add(Rule::on(&a2, &a0, "logits", Fault::Isolate(a2.clone())).after(2));
    assert_eq!(tokens(s.run(&reqs)?), want, "replayed on the ranks left");
    let st = s.wait_for("planned around rank 2", |st| st.replans == 1 && !st.replanning)?;
    assert!(st.placement.is_none(), "one placement over two ranks, not the set: {st:?}");
    assert_eq!(tokens(s.run(&reqs[..2])?), want[..2]);

    // Rank 2 back: the set as it was, switching again.
    worker(&s.cluster, &net, s.cache.path(), 2, true);
    let st = s.wait_for("rank 2 back", |st| st.replans == 2 && !st.replanning && st.ranks.iter().all(|r| r.active))?;
    assert_eq!(st.placement.map(|p| p.switches), Some(0), "{st:?}");
    assert_eq!(tokens(s.run(&reqs)?), want, "served over the set again");
    assert!(s.status()?.placement.is_some_and(|p| p.switches >= 1));
    Ok(())
}

#[test]
fn with_no_placement_over_the_ranks_left_requests_are_refused_with_the_reason_until_the_rank_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, plan) = fixture(dir.path(), 8)?;
    // A re-planner for which the model needs all three machines.
    let inner = planner_replan();
    let replan = Replan(Arc::new(move |plan, machines| {
        if machines.len() < 3 {
            return Err(format!("the model needs 1.5 GB more than {} machines hold", machines.len()));
        }
        (inner.0)(plan, machines)
    }));
    let net = MemNet::new();
    let s = serve("nofit", &plan, &model, net.clone(), replan, false)?;
    let (a0, a2) = (s.addr(0), s.addr(2));
    net.add(Rule::on(&a2, &a0, "logits", Fault::Isolate(a2.clone())).after(1));
    let got = s.run(&reqs[..1])?;
    assert_eq!(got[0].1, FinishReason::Failed, "nowhere to replay it");
    let st = s.wait_for("down", |st| st.down.is_some())?;
    assert!(st.down.as_deref().is_some_and(|d| d.contains("1.5 GB more")), "{st:?}");
    let err = s.rt.block_on(s.engine.submit(greedy(&s.engine, vec![1, 2], 2)));
    assert!(matches!(&err, Err(SubmitError::Unavailable(m)) if m.contains("1.5 GB more")), "{err:?}");
    worker(&s.cluster, &net, s.cache.path(), 2, true);
    s.wait_for("back up", |st| st.down.is_none() && !st.replanning && st.ranks.iter().all(|r| r.active))?;
    assert_eq!(tokens(s.run(&reqs)?), want);
    Ok(())
}

#[test]
fn a_rank_lost_in_prefill_is_planned_around_and_its_requests_replayed_unchanged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, plan) = fixture(dir.path(), 9)?;
    let net = MemNet::new();
    let s = serve("prefill", &plan, &model, net.clone(), planner_replan(), true)?;
    let (a1, a2) = (s.addr(1), s.addr(2));
    // Rank 1 dies as it hands its first prefill chunk on (and, long-running, waits for
    // the next leader: it is probed and planned back in).
    net.add(Rule::on(&a1, &a2, "activation", Fault::Isolate(a1.clone())));
    assert_eq!(tokens(s.run(&reqs)?), want);
    let st = s.wait_for("rank 1 back", |st| st.replans == 2 && !st.replanning && st.ranks.iter().all(|r| r.active))?;
    assert!(st.replayed >= 1, "{st:?}");
    assert_eq!(tokens(s.run(&reqs)?), want);
    Ok(())
}

#[test]
fn a_rank_lost_while_a_new_placement_loads_is_planned_around_too_and_both_come_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, plan) = fixture(dir.path(), 10)?;
    let net = MemNet::new();
    let s = serve("replan", &plan, &model, net.clone(), second_machine_replan(), false)?;
    let (a0, a1, a2) = (s.addr(0), s.addr(1), s.addr(2));
    // Rank 2 (one run) dies mid-decode; the placement over ranks 0 and 1 moves layer 0 and the
    // head to rank 1, which dies on the first chunk of those weights.
    let chunks = net.sent(&a0, &a1, "weight_chunk");
    net.add(Rule::on(&a2, &a0, "logits", Fault::Isolate(a2.clone())).after(2));
    net.add(Rule::on(&a0, &a1, "weight_chunk", Fault::Isolate(a1.clone())).after(chunks));
    assert_eq!(tokens(s.run(&reqs)?), want);
    assert!(net.sent(&a0, &a1, "weight_chunk") > chunks, "rank 1 died during the transfer");
    // Placed on rank 0 alone, then (rank 1 being long-running, back waiting for a leader)
    // on ranks 0 and 1; then rank 2, started again, joins.
    s.wait_for("rank 1 back", |st| st.replans == 2 && st.ranks[1].active && !st.replanning)?;
    assert_eq!(tokens(s.run(&reqs[..2])?), want[..2]);
    worker(&s.cluster, &net, s.cache.path(), 2, true);
    s.wait_for("rank 2 back", |st| st.replans == 3 && st.ranks.iter().all(|r| r.active) && !st.replanning)?;
    assert_eq!(tokens(s.run(&reqs)?), want);
    Ok(())
}

#[test]
fn a_hung_rank_is_planned_around_and_back_once_the_partition_heals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, plan) = fixture(dir.path(), 11)?;
    let net = MemNet::new();
    let s = serve("hung", &plan, &model, net.clone(), planner_replan(), true)?;
    let (a0, a2) = (s.addr(0), s.addr(2));
    // After rank 2's third logits nothing passes between it and rank 0, and nothing
    // closes: only the heartbeat deadline tells.
    net.add(Rule::on(&a2, &a0, "logits", Fault::Partition).after(2));
    assert_eq!(tokens(s.run(&reqs)?), want);
    let st = s.wait_for("planned around rank 2", |st| st.replans == 1 && !st.replanning)?;
    assert!(st.ranks[2].lost.is_some() && !st.ranks[2].active, "{st:?}");
    // Probes time out while the partition holds; once it heals, rank 2 (back waiting for
    // a leader) answers and is planned in.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!s.status()?.ranks[2].active);
    net.heal(&a0, &a2);
    s.wait_for("rank 2 back", |st| st.ranks.iter().all(|r| r.active) && !st.replanning)?;
    assert_eq!(tokens(s.run(&reqs)?), want);
    Ok(())
}

#[test]
fn a_rank_lost_in_the_first_set_up_is_planned_around_and_joins_when_started_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, plan) = fixture(dir.path(), 12)?;
    let net = MemNet::new();
    let a0 = addrs(&plan)[0].clone();
    let a2 = addrs(&plan)[2].clone();
    // Rank 2 dies on the first chunk of its weights.
    net.add(Rule::on(&a0, &a2, "weight_chunk", Fault::Isolate(a2.clone())));
    let s = serve("first", &plan, &model, net.clone(), planner_replan(), false)?;
    let st = s.status()?;
    assert!(!st.ranks[2].active && st.ranks[2].lost.is_some() && st.ranks[1].active, "{st:?}");
    assert_eq!(tokens(s.run(&reqs)?), want);
    worker(&s.cluster, &net, s.cache.path(), 2, true);
    s.wait_for("rank 2 in", |st| st.ranks.iter().all(|r| r.active) && !st.replanning)?;
    assert_eq!(tokens(s.run(&reqs)?), want);
    Ok(())
}
