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
    run_node, serve_node, serve_worker, ClusterStatus, Engine, NodeConfig, Replan, SubmitError,
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

/// Rank 0 serving `plan` with `replan`; rank 1 a long-running worker, rank 2 one run.
fn serve(id: &str, plan: &Plan, model: &Path, net: MemNet, replan: Replan) -> Result<Served> {
    let cluster = cluster_of(id, plan);
    let cache = tempfile::tempdir()?;
    worker(&cluster, &net, cache.path(), 1, true);
    worker(&cluster, &net, cache.path(), 2, false);
    let mut job = infer_job(plan, model, &[1], 1);
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

#[test]
fn a_rank_lost_mid_decode_is_planned_around_replayed_unchanged_and_planned_back_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, reqs, want, plan) = fixture(dir.path(), 7)?;
    let net = MemNet::new();
    let s = serve("failover", &plan, &model, net.clone(), planner_replan())?;
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
    assert_eq!(s.run(&reqs[..2])?.into_iter().map(|r| r.0).collect::<Vec<_>>(), want[..2]);
    assert_eq!(net.sent(&a2, &a0, "logits"), logits_from_2, "rank 2 is out of the placement");

    // Rank 2 started again: probed, planned back in, and serving.
    worker(&s.cluster, &net, s.cache.path(), 2, true);
    let st = s.wait_for("rank 2 back", |st| st.replans == 2 && !st.replanning && st.ranks.iter().all(|r| r.active))?;
    assert!(st.ranks.iter().all(|r| r.lost.is_none()), "{st:?}");
    assert_eq!(s.run(&reqs)?.into_iter().map(|r| r.0).collect::<Vec<_>>(), want);
    assert!(net.sent(&a2, &a0, "logits") > logits_from_2, "rank 2 computes the head again");
    // Back in its first placement, rank 2 took its weights from its cache.
    assert_eq!(net.sent(&a0, &a2, "weight_blob"), blobs_to_2);
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
    let s = serve("nofit", &plan, &model, net.clone(), replan)?;
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
    assert_eq!(s.run(&reqs)?.into_iter().map(|r| r.0).collect::<Vec<_>>(), want);
    Ok(())
}
