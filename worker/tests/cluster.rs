//! The runtime in one process over the fault-injecting in-memory network: results equal
//! candle-transformers' Mistral whatever the frames' timing, and every fault (a hung peer,
//! a killed peer, a dying leader, a worker lost mid-training) ends the run with an error
//! that names the rank, within the heartbeat deadline, with no sleeps in the tests.
//! Duplicated frames change nothing either; a rank dying as it hands its KV cache over
//! fails the request naming it.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use lemur_worker::runtime::memnet::{Fault, MemNet, Rule};
use lemur_worker::runtime::Timeouts;

const PROMPT: [u32; 5] = [1, 7, 42, 99, 3];

#[test]
fn two_and_three_ranks_in_one_process_match_candle() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 3)?;
    let (want, want_logits) = reference_generate(&model, &PROMPT, 12)?;
    for n in [1, 2, 3] {
        let plan = infer_plan(&cfg, n, 12, |op| op.id % n)?;
        let c = TestCluster::start(&format!("match-{n}"), &plan, infer_job(&plan, &model, &PROMPT, 12), MemNet::new());
        let out = c.finish()?;
        assert_eq!(out.tokens, want, "{n} ranks");
        let d = max_diff(&out.logits, &want_logits);
        assert!(d < 1e-4, "{n} ranks: logits differ by {d}");
        if cfg!(target_os = "linux") {
            assert!(out.peak_rss_bytes.iter().all(|&m| m > 1 << 20), "{:?}", out.peak_rss_bytes);
        }
        if n > 1 {
            assert!(c.net.sent(&c.addr(1), &c.addr(0), "activation") > 0, "rank 1 sent no activation");
            assert!(out.bytes_sent[1] > 0);
        }
    }
    Ok(())
}

/// Greedy tokens of a 2-rank run (ranks by `rule`) whose frames `(from, to, message, skip)`
/// each meet `fault` on 3 matches from the (skip + 1)th: candle-transformers' tokens.
fn faults_change_no_token(
    id: &str,
    seed: u64,
    rule: impl Fn(&lemur_protocol::plan::PlanOp) -> usize,
    fault: Fault,
    frames: &[(usize, usize, &'static str, usize)],
    times: usize,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, seed)?;
    let (want, _) = reference_generate(&model, &PROMPT, 8)?;
    let plan = infer_plan(&cfg, 2, 8, rule)?;
    let net = MemNet::new();
    let c0 = addrs(&plan);
    for &(from, to, msg, skip) in frames {
        let mut r = Rule::on(&c0[from], &c0[to], msg, fault.clone()).after(skip);
        r.times = times;
        net.add(r);
    }
    let c = TestCluster::start(id, &plan, infer_job(&plan, &model, &PROMPT, 8), net);
    assert_eq!(c.finish()?.tokens, want, "{id}");
    Ok(())
}

#[test]
fn delayed_and_reordered_frames_change_no_token() -> Result<()> {
    // Hold back activations both ways and a start: later frames overtake them.
    let frames = [(1, 0, "activation", 0), (0, 1, "activation", 3), (0, 1, "start", 2)];
    faults_change_no_token("reorder", 5, |op| op.id % 2, Fault::Delay(Duration::from_millis(40)), &frames, 3)
}

#[test]
fn duplicated_frames_change_no_token() -> Result<()> {
    // The embedding and layer 0 on rank 1, which runs its whole part of a step on the
    // step's start: a second start would run it again. Activations both ways, a step's
    // start and its logits, each delivered twice.
    let rule = |op: &lemur_protocol::plan::PlanOp| {
        usize::from(op.layer == Some(0) || op.kind == lemur_protocol::OpKind::Embedding)
    };
    let frames = [(1, 0, "activation", 1), (0, 1, "activation", 2), (0, 1, "start", 3), (1, 0, "logits", 2)];
    faults_change_no_token("duplicate", 6, rule, Fault::Duplicate, &frames, 2)
}

#[test]
fn a_rank_dying_as_it_hands_its_kv_cache_over_fails_the_request_naming_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 4)?;
    // Prefill on rank 1, decode on rank 0: rank 1 sends rank 0 each layer's cache.
    let plan = infer_plan(&cfg, 2, 8, |op| usize::from(op.phase == lemur_protocol::Phase::Prefill))?;
    let net = MemNet::new();
    let (a0, a1) = ("127.0.0.1:7000", "127.0.0.1:7001");
    net.add(Rule::on(a1, a0, "kv_handover", Fault::Isolate(a1.into())));
    let c = TestCluster::start("handover", &plan, infer_job(&plan, &model, &PROMPT, 8), net);
    let err = c.failure(0)?;
    assert!(err.contains("rank 1") && err.contains("lost"), "{err}");
    assert!(c.net.sent(a1, a0, "kv_handover") == 1, "it died on the first layer's cache");
    Ok(())
}

/// A long request on two ranks, for the fault tests; rank r's peer deadline `dead(r)`.
fn long_request(dir: &std::path::Path, net: MemNet, id: &str, dead: impl Fn(u32) -> u64) -> Result<TestCluster> {
    let cfg = tiny(2);
    let model = model(dir, &cfg, 3)?;
    let plan = infer_plan(&cfg, 2, 1000, |op| op.id % 2)?;
    let job = infer_job(&plan, &model, &PROMPT, 1000);
    Ok(TestCluster::start_with(id, &plan, job, net, |r| Timeouts {
        peer_dead: Duration::from_millis(dead(r)),
        ..fast()
    }))
}

#[test]
fn a_hung_peer_fails_the_request_naming_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let net = MemNet::new();
    let (a0, a1) = ("127.0.0.1:7000", "127.0.0.1:7001");
    // After the third decode step reaches rank 1, nothing more passes either way, and
    // nothing closes: only the heartbeat deadline can tell.
    net.add(Rule::on(a0, a1, "start", Fault::Partition).after(3));
    // Rank 0 is the one to notice (rank 1 would, a few seconds later).
    let c = long_request(dir.path(), net, "hung", |r| if r == 0 { 600 } else { 5000 })?;
    let err = c.failure(0)?;
    assert!(err.contains("rank 1") && err.contains("no heartbeat"), "{err}");
    let err1 = c.failure(1)?;
    assert!(err1.contains("leader lost"), "{err1}");
    Ok(())
}

#[test]
fn a_killed_peer_fails_the_request_and_a_worker_without_leader_stops() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let net = MemNet::new();
    let (a0, a1) = ("127.0.0.1:7000", "127.0.0.1:7001");
    // Rank 1 dies as it sends its fifth activation: every connection of it closes.
    net.add(Rule::on(a1, a0, "activation", Fault::Isolate(a1.into())).after(4));
    let c = long_request(dir.path(), net, "killed", |_| 600)?;
    let err = c.failure(0)?;
    assert!(err.contains("rank 1") && err.contains("lost"), "{err}");
    let err1 = c.failure(1)?;
    assert!(err1.contains("leader lost"), "{err1}");
    Ok(())
}

#[test]
fn a_dying_leader_stops_every_worker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(3);
    let model = model(dir.path(), &cfg, 3)?;
    let plan = infer_plan(&cfg, 3, 1000, |op| op.id % 3)?;
    let net = MemNet::new();
    let addrs = addrs(&plan);
    net.add(Rule::on(&addrs[0], &addrs[2], "start", Fault::Isolate(addrs[0].clone())).after(2));
    let c = TestCluster::start("leader", &plan, infer_job(&plan, &model, &PROMPT, 1000), net);
    for r in [1, 2] {
        let err = c.failure(r)?;
        assert!(err.contains("rank 0") && err.contains("leader lost"), "rank {r}: {err}");
    }
    let err0 = c.failure(0)?;
    assert!(err0.contains("lost"), "{err0}");
    Ok(())
}

#[test]
fn a_worker_lost_mid_training_fails_the_run_and_resume_reaches_the_same_loss() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 13)?;
    let plan = train_plan(&cfg, |f| f % 2)?;
    let (full, broken) = (dir.path().join("full"), dir.path().join("broken"));
    let c = TestCluster::start("train-full", &plan, train_job(&plan, &model, sequences(), 30, &full), MemNet::new());
    let reference = c.finish()?.train_losses;
    assert_eq!(reference.len(), 30);
    assert!(reference[29] < reference[0] / 2.0, "loss did not fall: {reference:?}");

    // Rank 1 is lost right after the 25th optimizer step reaches it.
    let net = MemNet::new();
    let addrs = addrs(&plan);
    net.add(Rule::on(&addrs[0], &addrs[1], "update", Fault::Isolate(addrs[1].clone())).after(24));
    let c = TestCluster::start("train-broken", &plan, train_job(&plan, &model, sequences(), 30, &broken), net);
    let err = c.failure(0)?;
    assert!(err.contains("rank 1"), "{err}");
    assert!(broken.join("checkpoint-20").exists() && !broken.join("checkpoint-30").exists());

    // Resuming from the newest checkpoint reaches the uninterrupted run's loss.
    let r = lemur_worker::checkpoint::resume(&broken, &adapter_config(&plan))?;
    assert!(r.path.ends_with("checkpoint-20"));
    let mut job = train_job(&plan, &model, sequences(), 30, &broken);
    if let Some(tl) = job.train_loop.as_mut() {
        tl.start_step = r.state.step;
        tl.prior_losses = r.state.losses;
        tl.resume = Some(r.tensors);
    }
    let resumed = TestCluster::start("train-resume", &plan, job, MemNet::new()).finish()?.train_losses;
    assert_eq!(resumed.len(), 30);
    let (a, b) = (reference[29], resumed[29]);
    assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "final loss {b} after resuming vs {a} uninterrupted");
    Ok(())
}

/// A fail point (the `fail` crate, `--features failpoints`) crashes rank 1 right after an
/// optimizer step: no goodbye, its connections drop, rank 0 names it.
#[cfg(feature = "failpoints")]
#[test]
fn a_fail_point_crashes_a_rank_after_an_update() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 13)?;
    let plan = train_plan(&cfg, |f| f % 2)?;
    fail::cfg("failpoint/rank1/after-update-2", "return").map_err(anyhow::Error::msg)?;
    let out = dir.path().join("out");
    let c = TestCluster::start("failpoint", &plan, train_job(&plan, &model, sequences(), 5, &out), MemNet::new());
    let err1 = c.failure(1)?;
    assert!(err1.contains("fail point after update 2"), "{err1}");
    let err = c.failure(0)?;
    assert!(err.contains("rank 1") && err.contains("lost"), "{err}");
    fail::remove("failpoint/rank1/after-update-2");
    Ok(())
}
