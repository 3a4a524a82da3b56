//! The distributed runtime against single-process references: real `lemur-worker`
//! processes on loopback, plans that split inside layers on 2 and 3 ranks, KV handover,
//! Mistral's sliding window, dead peers and bad input.

mod common;

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use common::*;
use lemurian::protocol::{OpKind, Phase, Plan};

const PROMPT: [u32; 7] = [1, 17, 42, 99, 3, 250, 8];

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

fn check_against_candle(plan: &Plan, layers: u64, n: usize) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(layers, Some(4096));
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    write_model(&model, &cfg, 7)?;
    let (want, want_logits) = reference_generate(&model, &PROMPT, n)?;
    let run = run_cluster(dir.path(), plan, &model, &PROMPT, n)?;
    assert_eq!(run.logits.len(), n);
    let d = max_diff(&run.logits, &want_logits);
    assert!(d < 1e-4, "logits differ by {d}");
    assert_eq!(run.tokens, want, "greedy tokens differ");
    Ok(run)
}

fn is_attention_side(k: OpKind) -> bool {
    matches!(k, OpKind::QProj | OpKind::KProj | OpKind::VProj | OpKind::Rope | OpKind::Attention | OpKind::OProj)
}

#[test]
fn two_ranks_attention_on_one_mlp_on_the_other_match_candle() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    let plan = plan_with(&cfg, &["m4-pro", "m5-pro"], 7, 64, |op| usize::from(is_attention_side(op.kind)))?;
    let run = check_against_candle(&plan, 2, 64)?;
    assert!(run.stderr.contains("rank 1 sent") && run.stderr.contains("time per token"), "{}", run.stderr);
    Ok(())
}

#[test]
fn two_ranks_alternating_every_op_match_candle() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    let plan = plan_with(&cfg, &["m4-pro", "m5-pro"], 7, 64, |op| op.id % 2)?;
    check_against_candle(&plan, 2, 64)?;
    Ok(())
}

#[test]
fn three_ranks_alternating_every_op_match_candle() -> Result<()> {
    let cfg = tiny(3, Some(4096));
    let plan =
        plan_with(&cfg, &["m4-pro", "m5-pro", "m5-pro"], 7, 64, |op| (op.id * 7 + op.layer.unwrap_or(0) as usize) % 3)?;
    check_against_candle(&plan, 3, 64)?;
    Ok(())
}

#[test]
fn one_process_with_every_op_on_rank_0_matches_candle() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    let mut plan = plan_with(&cfg, &["m4-pro", "m5-pro"], 7, 64, |_| 0)?;
    plan.machines.truncate(1);
    plan.validate()?;
    check_against_candle(&plan, 2, 64)?;
    Ok(())
}

#[test]
fn prefill_and_decode_on_different_ranks_hand_the_kv_cache_over() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    // Prefill on rank 1, decode on rank 0; layer 1's attention decodes on rank 1 for a mix.
    let plan = plan_with(&cfg, &["m4-pro", "m5-pro"], 7, 16, |op| match op.phase {
        Phase::Prefill => 1,
        _ if op.layer == Some(1) && op.kind == OpKind::Attention => 1,
        _ => 0,
    })?;
    check_against_candle(&plan, 2, 16)?;
    Ok(())
}

// ---- Mistral's sliding window, against a plain reference written here ----

/// Logits of the last position, recomputing the whole sequence with the window mask
/// `i - window < j <= i` (Mistral's reference semantics).
fn reference_window_logits(dir: &Path, cfg: &lemurian::protocol::ModelConfig, ids: &[u32]) -> Result<Vec<f32>> {
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let g = |n: &str| w[n].clone();
    let s = ids.len();
    let (h, nh, nkv, d) =
        (cfg.hidden_size as usize, cfg.num_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim as usize);
    let window = cfg.sliding_window.unwrap() as usize;
    let mut x = g("model.embed_tokens.weight").index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?; // [s, h]
    let mut mask = vec![f32::NEG_INFINITY; s * s];
    for i in 0..s {
        for j in 0..s {
            if j <= i && i < j + window {
                mask[i * s + j] = 0.0;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (s, s), &Device::Cpu)?;
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let xn = rms(&x, &g(&format!("{p}.input_layernorm.weight")), cfg.rms_norm_eps)?;
        let q = xn.matmul(&g(&format!("{p}.self_attn.q_proj.weight")).t()?)?.reshape((s, nh, d))?;
        let k = xn.matmul(&g(&format!("{p}.self_attn.k_proj.weight")).t()?)?.reshape((s, nkv, d))?;
        let v = xn.matmul(&g(&format!("{p}.self_attn.v_proj.weight")).t()?)?.reshape((s, nkv, d))?;
        let (q, k) = (rope_ref(&q, cfg.rope_theta, d)?, rope_ref(&k, cfg.rope_theta, d)?);
        let mut heads = Vec::new();
        for hd in 0..nh {
            let kv = hd / (nh / nkv);
            let qh = q.narrow(1, hd, 1)?.squeeze(1)?;
            let kh = k.narrow(1, kv, 1)?.squeeze(1)?;
            let vh = v.narrow(1, kv, 1)?.squeeze(1)?;
            let sc = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?.add(&mask)?;
            let pr = candle_nn::ops::softmax(&sc, D::Minus1)?;
            heads.push(pr.matmul(&vh)?);
        }
        let att = Tensor::cat(&heads, 1)?; // [s, nh * d]
        x = (x + att.matmul(&g(&format!("{p}.self_attn.o_proj.weight")).t()?)?)?;
        let xn = rms(&x, &g(&format!("{p}.post_attention_layernorm.weight")), cfg.rms_norm_eps)?;
        let gate = xn.matmul(&g(&format!("{p}.mlp.gate_proj.weight")).t()?)?;
        let up = xn.matmul(&g(&format!("{p}.mlp.up_proj.weight")).t()?)?;
        let act = (candle_nn::ops::sigmoid(&gate)? * &gate)?.mul(&up)?;
        x = (x + act.matmul(&g(&format!("{p}.mlp.down_proj.weight")).t()?)?)?;
    }
    let last = x.narrow(0, s - 1, 1)?;
    let last = rms(&last, &g("model.norm.weight"), cfg.rms_norm_eps)?;
    let _ = h;
    Ok(last.matmul(&g("lm_head.weight").t()?)?.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?)
}

#[test]
fn sliding_window_past_the_window_matches_mistral_semantics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2, Some(8));
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    write_model(&model, &cfg, 11)?;
    let prompt = [5u32, 77, 12, 200, 31, 9, 64, 128, 3, 45, 90];
    let n = 12; // prompt 11 > window 8, then 12 decode steps past it
    let mut ids = prompt.to_vec();
    let mut want = Vec::new();
    let mut want_logits = Vec::new();
    for _ in 0..n {
        let logits = reference_window_logits(&model, &cfg, &ids)?;
        let next = argmax(&logits);
        want.push(next);
        ids.push(next);
        want_logits.push(logits);
    }
    let plan = plan_with(&cfg, &["m4-pro", "m5-pro"], prompt.len() as u64, n as u64, |op| op.id % 2)?;
    let run = run_cluster(dir.path(), &plan, &model, &prompt, n)?;
    let d = max_diff(&run.logits, &want_logits);
    assert!(d < 1e-4, "logits differ by {d}");
    assert_eq!(run.tokens, want);
    Ok(())
}

// ---- failures ----

fn setup_two(dir: &Path, n_layers: u64) -> Result<(Plan, std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let cfg = tiny(n_layers, Some(4096));
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    write_model(&model, &cfg, 3)?;
    let plan = plan_with(&cfg, &["m4-pro", "m5-pro"], 4, 4000, |op| op.id % 2)?;
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string(&plan)?)?;
    let cluster = cluster_file(dir, &plan)?;
    Ok((plan, model, plan_path, cluster))
}

#[test]
fn bad_input_is_refused_before_any_compute() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (plan, model, plan_path, cluster) = setup_two(dir.path(), 2)?;
    // A rank that is not in the cluster file.
    let out = Command::new(worker_bin()).args(["--rank", "5", "--cluster"]).arg(&cluster).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rank 5") && err.contains("not in the cluster"), "{err}");
    // A plan for another model (3 layers) against this 2-layer checkpoint.
    let other = plan_with(&tiny(3, Some(4096)), &["m4-pro", "m5-pro"], 4, 4, |op| op.id % 2)?;
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, serde_json::to_string(&other)?)?;
    let out = run_leader(&cluster, &other_path, &model, &[1, 2], 2, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("3 layers") && err.contains("2 layers"), "{err}");
    // Missing weights for an op the rank was given: drop a tensor from the checkpoint.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken)?;
    std::fs::copy(model.join("config.json"), broken.join("config.json"))?;
    let mut w = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu)?;
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, broken.join("model.safetensors"))?;
    let out = run_leader(&cluster, &plan_path, &broken, &[1, 2], 2, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("up_proj"), "{err}");
    // A hand-edited plan naming a machine no rank runs.
    let mut bad = plan.clone();
    bad.machines[1].name = "m9-ultra".into();
    for op in bad.ops.iter_mut().filter(|o| o.machine == "m5-pro") {
        op.machine = "m9-ultra".into();
    }
    for op in bad.ops.iter_mut() {
        let costs = std::mem::take(&mut op.costs_ms);
        op.costs_ms = costs.into_iter().map(|(k, v)| (if k == "m5-pro" { "m9-ultra".into() } else { k }, v)).collect();
    }
    let bad_path = dir.path().join("bad.json");
    std::fs::write(&bad_path, serde_json::to_string(&bad)?)?;
    let out = run_leader(&cluster, &bad_path, &model, &[1, 2], 2, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("m9-ultra"), "{err}");
    Ok(())
}

#[test]
fn device_without_its_feature_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_, _, _, cluster) = setup_two(dir.path(), 2)?;
    let out =
        Command::new(worker_bin()).args(["--rank", "1", "--device", "cuda", "--cluster"]).arg(&cluster).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    // The test suite builds the worker without the `cuda` feature.
    assert!(!out.status.success() && err.contains("built without CUDA"), "{err}");
    Ok(())
}
