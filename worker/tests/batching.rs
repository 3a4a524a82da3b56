//! Continuous batching through the runtime: an in-process cluster serving through the
//! [`Engine`], requests of different lengths at once, each checked against the same
//! request alone and against candle-transformers' Mistral.

mod common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, Result};
use candle_core::Device;
use lemur_protocol::plan::{PlanBucket, PlanOp, PlanSet, Switching};
use lemur_protocol::{OpKind, Phase};
use lemur_worker::batch::{BatchConfig, Event, FinishReason, Request};
use lemur_worker::runtime::memnet::{Fault, MemNet, Rule};
use lemur_worker::runtime::{run_node, serve_node, Engine, NodeConfig, SubmitError};
use lemur_worker::sampling::Sampling;

use common::*;

/// A server cluster: rank 0 serving on its own thread, the others as workers.
struct Served {
    engine: Engine,
    rt: tokio::runtime::Runtime,
    done: mpsc::Receiver<Result<(), lemur_worker::WorkerError>>,
    net: MemNet,
    addrs: Vec<String>,
}

fn serve(id: &str, plan: &lemur_protocol::Plan, model: &std::path::Path, batch: BatchConfig) -> Result<Served> {
    serve_with(id, plan, model, batch, fast())
}

fn serve_with(
    id: &str,
    plan: &lemur_protocol::Plan,
    model: &std::path::Path,
    batch: BatchConfig,
    timeouts: lemur_worker::runtime::Timeouts,
) -> Result<Served> {
    let mut job = infer_job(plan, model, &[1], 1);
    job.serve = Some(batch);
    serve_job(id, job, timeouts)
}

fn serve_job(id: &str, job: lemur_worker::runtime::Job, timeouts: lemur_worker::runtime::Timeouts) -> Result<Served> {
    let cluster = cluster_of(id, &job.plan);
    let net = MemNet::new();
    for rank in 1..cluster.ranks.len() as u32 {
        let mut cfg = NodeConfig::new(rank, cluster.clone(), Device::Cpu, None);
        (cfg.timeouts, cfg.transport) = (fast(), Arc::new(net.clone()));
        std::thread::spawn(move || run_node(cfg));
    }
    let mut cfg = NodeConfig::new(0, cluster.clone(), Device::Cpu, Some(job));
    (cfg.timeouts, cfg.transport) = (timeouts, Arc::new(net.clone()));
    let (etx, erx) = mpsc::channel();
    let (dtx, drx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = dtx.send(serve_node(cfg, move |e| {
            let _ = etx.send(e);
        }));
    });
    let engine = erx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow!("the server never became ready"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let addrs = cluster.ranks.iter().map(|r| r.addr.clone()).collect();
    Ok(Served { engine, rt, done: drx, net, addrs })
}

fn request(engine: &Engine, prompt: Vec<u32>, max_new: usize) -> Request {
    Request {
        id: engine.next_id(),
        prompt,
        max_new_tokens: max_new,
        stop_tokens: vec![],
        sampling: Sampling::default(),
        keep_logits: true,
    }
}

/// A request's tokens, logits and finish reason.
type Generated = (Vec<u32>, Vec<Vec<f32>>, FinishReason);

/// Reads a request's events to its `Done`, each within `limit`.
async fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>, limit: Duration) -> Result<Generated> {
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(limit, rx.recv()).await? {
            Some(Event::Token { token, logits: l, .. }) => {
                tokens.push(token);
                logits.extend(l);
            }
            Some(Event::Done { reason, .. }) => return Ok((tokens, logits, reason)),
            None => return Err(anyhow!("the stream ended without Done")),
        }
    }
}

/// Runs requests at once; each one's tokens, logits and finish reason, in order.
async fn run_all(engine: &Engine, reqs: Vec<Request>) -> Result<Vec<Generated>> {
    let mut streams = Vec::new();
    for r in reqs {
        streams.push(engine.submit(r).await?);
    }
    let mut out = Vec::new();
    for mut rx in streams {
        out.push(collect(&mut rx, Duration::from_secs(60)).await?);
    }
    Ok(out)
}

fn prompts() -> Vec<Vec<u32>> {
    (0..8u32).map(|i| (0..(3 + 5 * i)).map(|t| (t * 7 + i * 13) % 250 + 1).collect()).collect()
}

#[test]
fn eight_concurrent_requests_decode_as_they_would_alone_and_as_candle_does() -> Result<()> {
    eight_concurrent(1, "batching")
}

#[test]
fn with_two_steps_in_flight_the_tokens_are_the_same() -> Result<()> {
    eight_concurrent(2, "pipelined")
}

fn eight_concurrent(pipeline: usize, id: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(4);
    let model = model(dir.path(), &cfg, 5)?;
    // Layers 0-1 on rank 0, 2-3 on rank 1, and decode attention of layer 1 on rank 1: the
    // batch crosses ranks and every request's cache of layer 1 is handed over.
    let plan = infer_plan(&cfg, 2, 8, |op| {
        let late = op.layer.is_some_and(|l| l >= 2) || op.layer.is_none() && op.kind != OpKind::Embedding;
        let moved = op.kind == OpKind::Attention && op.layer == Some(1) && op.phase == Phase::Decode;
        usize::from(late || moved)
    })?;
    // Chunks of 8 prompt tokens, at most 12 per prefill step: the longer prompts are
    // chunked and interleave with the decode of the shorter ones.
    let batch = BatchConfig { prefill_chunk: 8, prefill_tokens: 12, max_batch: 8, pipeline, ..BatchConfig::default() };
    let s = serve(id, &plan, &model, batch)?;
    let lens = [9usize, 4, 12, 6, 10, 3, 8, 5];
    let together = s.rt.block_on(run_all(
        &s.engine,
        prompts().into_iter().zip(lens).map(|(p, n)| request(&s.engine, p, n)).collect(),
    ))?;
    for (i, (p, n)) in prompts().into_iter().zip(lens).enumerate() {
        let alone = s.rt.block_on(run_all(&s.engine, vec![request(&s.engine, p.clone(), n)]))?;
        assert_eq!(together[i].0, alone[0].0, "request {i}: tokens in the batch and alone");
        assert_eq!(together[i].2, FinishReason::Length);
        assert_eq!(together[i].0.len(), n);
        let (want, want_logits) = reference_generate(&model, &p, n)?;
        assert_eq!(together[i].0, want, "request {i}: tokens against candle");
        let d = max_diff(&together[i].1, &want_logits);
        assert!(d < 1e-4, "request {i}: logits differ from candle's by {d}");
    }
    let status = s.rt.block_on(s.engine.status())?;
    assert_eq!((status.running, status.queue_depth, status.kv_positions_reserved), (0, 0, 0));
    assert!(status.steps > 8 * 2, "{} steps", status.steps);
    s.rt.block_on(s.engine.drain(Duration::from_secs(5)));
    s.engine.stop();
    s.done.recv_timeout(Duration::from_secs(30))??;
    Ok(())
}

#[test]
fn a_dropped_stream_cancels_its_request_and_a_lost_rank_fails_the_rest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 6)?;
    let plan = infer_plan(&cfg, 2, 8, |op| usize::from(op.layer == Some(1)))?;
    let s = serve("cancel", &plan, &model, BatchConfig::default())?;
    let (engine, rt) = (&s.engine, &s.rt);
    rt.block_on(async {
        // A client that goes away: its request ends (cancelled) and its cache is freed.
        let mut rx = engine.submit(request(engine, vec![1, 2, 3], 2000)).await?;
        assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
        drop(rx);
        for _ in 0..100 {
            let st = engine.status().await?;
            if st.running == 0 {
                assert_eq!(st.kv_positions_reserved, 0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(engine.status().await?.running, 0, "the dropped request still runs");
        // A request that the model cannot hold is refused naming the limit.
        let err = engine.submit(request(engine, vec![1; 10], 100_000)).await.unwrap_err();
        assert!(err.to_string().contains("context of"), "{err}");
        // Rank 1 is cut off mid-stream: the request fails, later ones are refused.
        let mut rx = engine.submit(request(engine, vec![4, 5, 6], 2000)).await?;
        assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
        s.net.add(Rule::on(&s.addrs[0], &s.addrs[1], "start", Fault::Cut));
        let (.., reason) = collect(&mut rx, Duration::from_secs(30)).await?;
        assert_eq!(reason, FinishReason::Failed);
        let err = engine.submit(request(engine, vec![1], 1)).await.unwrap_err();
        assert!(matches!(&err, SubmitError::Unavailable(m) if m.contains("rank 1")), "{err}");
        let st = engine.status().await?;
        assert!(st.ranks[1].lost.is_some() && st.down.is_some(), "{st:?}");
        Ok::<_, anyhow::Error>(())
    })?;
    s.engine.stop();
    s.done.recv_timeout(Duration::from_secs(30))??;
    Ok(())
}

#[test]
fn a_step_that_never_ends_fails_its_requests_by_the_step_limit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 7)?;
    let plan = infer_plan(&cfg, 2, 8, |op| usize::from(op.layer == Some(1)))?;
    let limit = lemur_worker::runtime::Timeouts { step: Duration::from_millis(800), ..fast() };
    let s = serve_with("stuck", &plan, &model, BatchConfig::default(), limit)?;
    // Rank 1 stays alive (heartbeats flow) but one activation to it is held for 30 s.
    s.net.add(Rule::on(&s.addrs[0], &s.addrs[1], "activation", Fault::Delay(Duration::from_secs(30))));
    s.rt.block_on(async {
        let mut rx = s.engine.submit(request(&s.engine, vec![1, 2, 3], 4)).await?;
        let (.., reason) = collect(&mut rx, Duration::from_secs(20)).await?;
        assert_eq!(reason, FinishReason::Failed);
        let st = s.engine.status().await?;
        assert!(st.down.as_deref().is_some_and(|d| d.contains("step limit")), "{st:?}");
        assert!(st.ranks.iter().all(|r| r.lost.is_none()), "no rank was lost: {st:?}");
        Ok::<_, anyhow::Error>(())
    })?;
    s.engine.stop();
    s.done.recv_timeout(Duration::from_secs(30))??;
    Ok(())
}

#[test]
fn a_plan_set_follows_the_load_moving_caches_and_decodes_as_candle_does() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(4);
    let model = model(dir.path(), &cfg, 7)?;
    let layer = |op: &PlanOp, f: fn(u32) -> bool| op.layer.is_some_and(f);
    let head = |op: &PlanOp| op.layer.is_none() && op.kind != OpKind::Embedding;
    // Decode x1: layers 0-1 on rank 0, 2-3 and the head on rank 1. Decode x4: layers 0-2
    // on rank 1, layer 3 and the head on rank 0. Prefill 4: even layers on rank 1;
    // prefill 12: odd layers on rank 1. Every layer's attention changes rank somewhere.
    let x1 = infer_plan(&cfg, 2, 8, |op| usize::from(layer(op, |l| l >= 2) || head(op)))?;
    let x4 = infer_plan(&cfg, 2, 8, |op| usize::from(layer(op, |l| l <= 2)))?;
    let p4 = infer_plan(&cfg, 2, 8, |op| usize::from(layer(op, |l| l % 2 == 0)))?;
    let p12 = infer_plan(&cfg, 2, 8, |op| usize::from(layer(op, |l| l % 2 == 1)))?;
    let bucket = |size: u64, plan: &lemur_protocol::Plan| PlanBucket { size, plan: plan.clone() };
    let set = PlanSet {
        format_version: lemur_protocol::PLAN_FORMAT_VERSION,
        decode: vec![bucket(1, &x1), bucket(4, &x4)],
        prefill: vec![bucket(4, &p4), bucket(12, &p12)],
        weight_bytes: Default::default(),
        kv_bytes: Default::default(),
        // x1's placement is the faster one for one stream, x4's for several; moves are free.
        switching: Switching {
            decode_step_ms: vec![vec![1.0, 10.0], vec![5.0, 2.0]],
            move_fixed_ms: vec![vec![0.0; 2]; 2],
            move_ms_per_position: vec![vec![0.0; 2]; 2],
        },
    };
    set.validate()?;
    // Chunks of 8, at most 12 prompt tokens a step: steps of 3 to 12 prompt tokens, so a
    // prompt's chunks run in both prefill placements.
    let batch = BatchConfig { prefill_chunk: 8, prefill_tokens: 12, max_batch: 8, ..BatchConfig::default() };
    let job = lemur_worker::runtime::Job {
        serve: Some(batch),
        ..lemur_worker::runtime::Job::with_plan_set(set, model.clone(), candle_core::DType::F32)
    };
    let s = serve_job("plan-set", job, fast())?;
    // The last request runs alone long enough for the batch to move back to x1's placement.
    let lens = [9usize, 4, 12, 6, 10, 3, 8, 24];
    let together = s.rt.block_on(run_all(
        &s.engine,
        prompts().into_iter().zip(lens).map(|(p, n)| request(&s.engine, p, n)).collect(),
    ))?;
    let status = s.rt.block_on(s.engine.status())?;
    let placed = status.placement.expect("serving a plan set");
    assert!(placed.switches >= 2, "the decode placement should go to x4's and back: {placed:?}");
    assert_eq!(placed.decode_placement, 0, "one stream left: x1's placement");
    assert!(placed.moves > 8 * 4, "every request's caches move at least once per layer: {placed:?}");
    for (i, (p, n)) in prompts().into_iter().zip(lens).enumerate() {
        let alone = s.rt.block_on(run_all(&s.engine, vec![request(&s.engine, p.clone(), n)]))?;
        assert_eq!(together[i].0, alone[0].0, "request {i}: tokens in the batch and alone");
        let (want, want_logits) = reference_generate(&model, &p, n)?;
        assert_eq!(together[i].0, want, "request {i}: tokens against candle");
        let d = max_diff(&together[i].1, &want_logits);
        assert!(d < 1e-4, "request {i}: logits differ from candle's by {d}");
    }
    let status = s.rt.block_on(s.engine.status())?;
    assert_eq!((status.running, status.kv_positions_reserved), (0, 0));
    s.rt.block_on(s.engine.drain(Duration::from_secs(5)));
    s.engine.stop();
    s.done.recv_timeout(Duration::from_secs(30))??;
    Ok(())
}
