//! LoRA training across ranks: the adapters' gradients from a plan split over 2 and 3
//! worker processes equal single-process candle autograd on the same batch.

mod common;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use common::*;
use lemurian::protocol::{ModelConfig, OpKind, Plan};
use lemurian::{Finetune, LoraSpec};

const TARGETS: [OpKind; 4] = [OpKind::QProj, OpKind::VProj, OpKind::OProj, OpKind::DownProj];
const RANK: usize = 4;
const ALPHA: f64 = 8.0;
const SEED: u64 = 5;

/// Mean next-token cross-entropy of `ids` under the model plus LoRA adapters, written
/// plainly (no fused kernels), differentiated by candle's autograd.
fn reference_grads(dir: &Path, cfg: &ModelConfig, ids: &[u32]) -> Result<(f64, HashMap<String, Vec<f32>>)> {
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let g = |n: &str| w[n].clone();
    let s = ids.len() - 1;
    let (nh, nkv, d) = (cfg.num_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim as usize);
    let mut adapters: HashMap<(OpKind, u32), (Var, Var)> = HashMap::new();
    for l in 0..cfg.num_layers as u32 {
        for k in TARGETS {
            let (a, b) = lemurian::worker::lora::init(cfg, k, l, RANK, SEED, false, &Device::Cpu)?;
            adapters.insert((k, l), (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
        }
    }
    let scale = ALPHA / RANK as f64;
    let lin = |x: &Tensor, name: &str, k: OpKind, l: u32| -> candle_core::Result<Tensor> {
        let y = x.matmul(&g(name).t()?)?;
        match adapters.get(&(k, l)) {
            Some((a, b)) => y + (x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * scale)?,
            None => Ok(y),
        }
    };
    let inp = Tensor::new(&ids[..s], &Device::Cpu)?;
    let tgt = Tensor::new(&ids[1..], &Device::Cpu)?;
    let mut x = g("model.embed_tokens.weight").index_select(&inp, 0)?;
    let mut mask = vec![f32::NEG_INFINITY; s * s];
    for i in 0..s {
        for j in 0..=i {
            mask[i * s + j] = 0.0;
        }
    }
    let mask = Tensor::from_vec(mask, (s, s), &Device::Cpu)?;
    for l in 0..cfg.num_layers as u32 {
        let p = format!("model.layers.{l}");
        let xn = rms(&x, &g(&format!("{p}.input_layernorm.weight")), cfg.rms_norm_eps)?;
        let q = lin(&xn, &format!("{p}.self_attn.q_proj.weight"), OpKind::QProj, l)?.reshape((s, nh, d))?;
        let k = lin(&xn, &format!("{p}.self_attn.k_proj.weight"), OpKind::KProj, l)?.reshape((s, nkv, d))?;
        let v = lin(&xn, &format!("{p}.self_attn.v_proj.weight"), OpKind::VProj, l)?.reshape((s, nkv, d))?;
        let (q, k) = (rope_ref(&q, cfg.rope_theta, d)?, rope_ref(&k, cfg.rope_theta, d)?);
        let mut heads = Vec::new();
        for h in 0..nh {
            let kv = h / (nh / nkv);
            let qh = q.narrow(1, h, 1)?.squeeze(1)?;
            let kh = k.narrow(1, kv, 1)?.squeeze(1)?;
            let vh = v.narrow(1, kv, 1)?.squeeze(1)?;
            let sc = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?.add(&mask)?;
            heads.push(candle_nn::ops::softmax(&sc, D::Minus1)?.matmul(&vh)?);
        }
        let att = Tensor::cat(&heads, 1)?;
        x = (x + lin(&att, &format!("{p}.self_attn.o_proj.weight"), OpKind::OProj, l)?)?;
        let xn = rms(&x, &g(&format!("{p}.post_attention_layernorm.weight")), cfg.rms_norm_eps)?;
        let gate = lin(&xn, &format!("{p}.mlp.gate_proj.weight"), OpKind::GateProj, l)?;
        let up = lin(&xn, &format!("{p}.mlp.up_proj.weight"), OpKind::UpProj, l)?;
        let act = (candle_nn::ops::sigmoid(&gate)? * &gate)?.mul(&up)?;
        x = (x + lin(&act, &format!("{p}.mlp.down_proj.weight"), OpKind::DownProj, l)?)?;
    }
    let x = rms(&x, &g("model.norm.weight"), cfg.rms_norm_eps)?;
    let logits = x.matmul(&g("lm_head.weight").t()?)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &tgt)?;
    let grads = loss.backward()?;
    let mut out = HashMap::new();
    for ((k, l), (a, b)) in &adapters {
        for (which, var) in [("lora_A", a), ("lora_B", b)] {
            let gr = grads.get(var.as_tensor()).expect("a gradient").flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            out.insert(lemurian::worker::lora::peft_name(*k, *l, which), gr);
        }
    }
    Ok((f64::from(loss.to_scalar::<f32>()?), out))
}

fn training_plan(
    cfg: &ModelConfig,
    machines: &[&str],
    seq: u64,
    rule: impl Fn(usize, &lemurian::protocol::plan::PlanOp) -> usize,
) -> Result<Plan> {
    lora_plan(cfg, machines, seq, RANK as u64, 1, rule)
}

/// A LoRA training plan with every op then moved by `rule` (given the forward op's id, so
/// a backward op stays with its forward op).
fn lora_plan(
    cfg: &ModelConfig,
    machines: &[&str],
    seq: u64,
    rank: u64,
    micro_batches: u64,
    rule: impl Fn(usize, &lemurian::protocol::plan::PlanOp) -> usize,
) -> Result<Plan> {
    let profiles = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles");
    let planned = lemurian::Planner::from_profiles(profiles)?
        .machines(machines)?
        .model(cfg.clone())
        .train(seq, 1, Finetune::Lora(LoraSpec { rank, targets: TARGETS.to_vec() }), micro_batches)
        .solver(std::time::Duration::from_secs(10), 1e-3)
        .plan()?;
    let mut plan = planned.plan;
    // Backward ops stay with their forward ops: place by the forward op's id.
    let ops = plan.ops.clone();
    plan.reassign(|op| {
        let f = op.forward_of.unwrap_or(op.id);
        rule(f, &ops[f])
    });
    plan.validate()?;
    Ok(plan)
}

fn run_grad_check(dir: &Path, plan: &Plan, model: &Path, ids: &[u32]) -> Result<(f64, HashMap<String, Vec<f32>>)> {
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string(plan)?)?;
    let cluster = cluster_file(dir, plan)?;
    let mut workers = spawn_workers(&cluster, plan.machines.len(), &[])?;
    let dump = dir.join("grads.json");
    let seed = SEED.to_string();
    let alpha = ALPHA.to_string();
    let out = run_leader(
        &cluster,
        &plan_path,
        model,
        ids,
        1,
        &["--grad-check", dump.to_str().unwrap(), "--lora-seed", &seed, "--lora-alpha", &alpha, "--lora-random-b"],
    )?;
    assert!(out.status.success(), "rank 0 failed: {}", String::from_utf8_lossy(&out.stderr));
    for w in workers.0.drain(..) {
        wait_exit(w, std::time::Duration::from_secs(10))?;
    }
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dump)?)?;
    let loss = doc["loss"].as_f64().unwrap_or(f64::NAN);
    let grads = doc["grads"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()))
        .collect();
    Ok((loss, grads))
}

fn check(plan: &Plan, layers: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(layers, Some(4096));
    let model = dir.path().join("model");
    write_model(&model, &cfg, 21)?;
    let ids: Vec<u32> = vec![1, 17, 42, 99, 3, 250, 8, 64, 11, 200, 5, 77];
    let (want_loss, want) = reference_grads(&model, &cfg, &ids)?;
    let (loss, got) = run_grad_check(dir.path(), plan, &model, &ids)?;
    compare_grads((loss, &got), (want_loss, &want))
}

/// The same check over a quantized base (QLoRA): the workers train LoRA on a Q8_0 GGUF of
/// the model, the reference differentiates an f32 model built from its dequantized weights.
fn check_quantized(plan: &Plan, layers: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(layers, Some(4096));
    let st = dir.path().join("st");
    write_model(&st, &cfg, 21)?;
    let gguf = dir.path().join("model-q8_0.gguf");
    write_gguf_as(&st, &cfg, &gguf, candle_core::quantized::GgmlDType::Q8_0)?;
    let deq = dir.path().join("dequantized");
    dequantized_copy(&gguf, &cfg, &st, &deq)?;
    let ids: Vec<u32> = vec![1, 17, 42, 99, 3, 250, 8, 64, 11, 200, 5, 77];
    let (want_loss, want) = reference_grads(&deq, &cfg, &ids)?;
    let mut plan = plan.clone();
    plan.workload.weights = lemurian::protocol::WeightFormat::Q8_0;
    let (loss, got) = run_grad_check(dir.path(), &plan, &gguf, &ids)?;
    compare_grads((loss, &got), (want_loss, &want))
}

/// A safetensors copy of a GGUF's weights, dequantized, in Hugging Face names and order.
fn dequantized_copy(gguf: &Path, cfg: &ModelConfig, src: &Path, out: &Path) -> Result<()> {
    let mut f = std::fs::File::open(gguf)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)?;
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let mut put = |gg: &str, hf: &str, heads: Option<u64>| -> Result<()> {
        let t = content.tensor(&mut f, gg, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        let t = match heads {
            Some(h) => lemurian::worker::weights::unpermute_qk(&t, h as usize)?,
            None => t,
        };
        w.insert(hf.to_string(), t);
        Ok(())
    };
    put("token_embd.weight", "model.embed_tokens.weight", None)?;
    put("output_norm.weight", "model.norm.weight", None)?;
    put("output.weight", "lm_head.weight", None)?;
    for l in 0..cfg.num_layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        put(&format!("blk.{l}.attn_norm.weight"), &hf("input_layernorm.weight"), None)?;
        put(&format!("blk.{l}.ffn_norm.weight"), &hf("post_attention_layernorm.weight"), None)?;
        put(&format!("blk.{l}.attn_q.weight"), &hf("self_attn.q_proj.weight"), Some(cfg.num_heads))?;
        put(&format!("blk.{l}.attn_k.weight"), &hf("self_attn.k_proj.weight"), Some(cfg.num_kv_heads))?;
        put(&format!("blk.{l}.attn_v.weight"), &hf("self_attn.v_proj.weight"), None)?;
        put(&format!("blk.{l}.attn_output.weight"), &hf("self_attn.o_proj.weight"), None)?;
        put(&format!("blk.{l}.ffn_gate.weight"), &hf("mlp.gate_proj.weight"), None)?;
        put(&format!("blk.{l}.ffn_up.weight"), &hf("mlp.up_proj.weight"), None)?;
        put(&format!("blk.{l}.ffn_down.weight"), &hf("mlp.down_proj.weight"), None)?;
    }
    std::fs::create_dir_all(out)?;
    std::fs::copy(src.join("config.json"), out.join("config.json"))?;
    candle_core::safetensors::save(&w, out.join("model.safetensors"))?;
    Ok(())
}

/// Loss within 1e-4 and every LoRA gradient within 1e-4 of the reference's.
fn compare_grads(got: (f64, &HashMap<String, Vec<f32>>), want: (f64, &HashMap<String, Vec<f32>>)) -> Result<()> {
    let ((loss, got), (want_loss, want)) = (got, want);
    assert!((loss - want_loss).abs() < 1e-4, "loss {loss} vs {want_loss}");
    assert_eq!(got.len(), want.len(), "adapters: got {:?}", got.keys().collect::<Vec<_>>());
    let mut worst = 0.0f32;
    for (name, w) in want {
        let g = got.get(name).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.len(), w.len(), "{name}");
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
        assert!(w.iter().any(|x| x.abs() > 1e-6), "{name}: the reference gradient is zero");
    }
    assert!(worst < 1e-4, "LoRA gradients differ by up to {worst}");
    Ok(())
}

fn is_attention(k: OpKind) -> bool {
    matches!(k, OpKind::QProj | OpKind::KProj | OpKind::VProj | OpKind::Rope | OpKind::Attention | OpKind::OProj)
}

#[test]
fn lora_gradients_from_two_ranks_match_single_process_autograd() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    let plan = training_plan(&cfg, &["m4-pro", "m5-pro"], 11, |_, op| usize::from(is_attention(op.kind)))?;
    check(&plan, 2)
}

#[test]
fn lora_gradients_from_three_ranks_alternating_ops_match() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    let plan = training_plan(&cfg, &["m4-pro", "m5-pro", "m5-pro"], 11, |f, _| f % 3)?;
    check(&plan, 2)
}

#[test]
fn qlora_gradients_over_a_quantized_base_match_autograd_on_its_dequantized_weights() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    let mut one = training_plan(&cfg, &["m4-pro", "m5-pro"], 11, |_, _| 0)?;
    one.machines.truncate(1);
    one.validate()?;
    check_quantized(&one, 2)?;
    check_quantized(&training_plan(&cfg, &["m4-pro", "m5-pro"], 11, |_, op| usize::from(is_attention(op.kind)))?, 2)?;
    check_quantized(&training_plan(&cfg, &["m4-pro", "m5-pro", "m5-pro"], 11, |f, _| f % 3)?, 2)
}

#[test]
fn lora_gradients_in_one_process_match() -> Result<()> {
    let cfg = tiny(2, Some(4096));
    let mut plan = training_plan(&cfg, &["m4-pro", "m5-pro"], 11, |_, _| 0)?;
    plan.machines.truncate(1);
    plan.validate()?;
    check(&plan, 2)
}

// ---- the training loop ----

struct TrainSetupFiles {
    dir: tempfile::TempDir,
    model: std::path::PathBuf,
    data: std::path::PathBuf,
}

/// A tiny model and a small repetitive data set (so the loss can fall quickly).
fn training_files() -> Result<TrainSetupFiles> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_model(&model, &tiny(2, Some(4096)), 13)?;
    let mut rng = lemurian::worker::random_model::Rng::new(4);
    let pattern: Vec<u32> = (0..24).map(|_| ((rng.uniform() + 1.0) * 127.0) as u32).collect();
    let mut lines = String::new();
    for i in 0..40 {
        let rotated: Vec<u32> = pattern[i % 5..].iter().chain(&pattern[..i % 5]).copied().collect();
        lines += &serde_json::json!({ "input_ids": rotated }).to_string();
        lines.push('\n');
    }
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, lines)?;
    Ok(TrainSetupFiles { dir, model, data })
}

/// Trains with real worker processes; returns (exit ok, losses printed, stderr).
fn train(files: &TrainSetupFiles, plan: &Plan, tag: &str, extra: &[&str]) -> Result<(bool, Vec<f64>, String)> {
    let dir = files.dir.path().join(tag);
    std::fs::create_dir_all(&dir)?;
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string(plan)?)?;
    let cluster = cluster_file(&dir, plan)?;
    let mut workers = Procs(Vec::new());
    for r in 1..plan.machines.len() {
        let mut cmd = std::process::Command::new(worker_bin());
        cmd.args(["--once", "--rank", &r.to_string(), "--cluster"]).arg(&cluster).args(["--wait", "60"]);
        cmd.env("LEMUR_CACHE", test_cache(&cluster));
        workers.0.push(cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn()?);
    }
    let mut cmd = std::process::Command::new(worker_bin());
    cmd.args(["--rank", "0", "--cluster"])
        .env("LEMUR_CACHE", test_cache(&cluster))
        .arg(&cluster)
        .arg("--plan")
        .arg(&plan_path)
        .arg("--model")
        .arg(&files.model)
        .arg("--train")
        .arg(&files.data)
        .args(["--lr", "5e-3", "--warmup", "3", "--lora-seed", "3", "--lora-dropout", "0.1"])
        .args(extra);
    let out = cmd.output()?;
    for w in workers.0.drain(..) {
        let _ = wait_exit(w, std::time::Duration::from_secs(15));
    }
    let losses = String::from_utf8_lossy(&out.stdout).trim().split(',').filter_map(|x| x.parse::<f64>().ok()).collect();
    Ok((out.status.success(), losses, String::from_utf8_lossy(&out.stderr).to_string()))
}

/// The training plan of the loop tests: rank 8 adapters, seq 32, 2 micro-batches.
fn train_plan(machines: &[&str], rule: impl Fn(usize, &lemurian::protocol::plan::PlanOp) -> usize) -> Result<Plan> {
    lora_plan(&tiny(2, Some(4096)), machines, 32, 8, 2, rule)
}

#[test]
fn training_lowers_the_loss_and_saves_peft_adapters_identically_on_one_and_two_ranks() -> Result<()> {
    let files = training_files()?;
    let two = train_plan(&["m4-pro", "m5-pro"], |f, _| f % 2)?;
    let out = files.dir.path().join("out2");
    let (ok, losses, err) = train(&files, &two, "two", &["--steps", "20", "--output-dir", out.to_str().unwrap()])?;
    assert!(ok, "{err}");
    assert_eq!(losses.len(), 20);
    assert!(losses[19] < losses[0] / 3.0, "loss did not fall: {losses:?}");
    assert!(err.contains("trained 20 steps"), "{err}");
    // The same run in one process gives the same losses.
    let mut one = train_plan(&["m4-pro", "m5-pro"], |_, _| 0)?;
    one.machines.truncate(1);
    one.validate()?;
    let (ok1, losses1, err1) = train(&files, &one, "one", &["--steps", "20"])?;
    assert!(ok1, "{err1}");
    for (a, b) in losses.iter().zip(&losses1) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "two ranks {losses:?}\none rank {losses1:?}");
    }
    // The checkpoint is in PEFT's layout.
    let ckpt = out.join("checkpoint-20");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("adapter_config.json"))?)?;
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    let tensors = candle_core::safetensors::load(ckpt.join("adapter_model.safetensors"), &Device::Cpu)?;
    assert_eq!(tensors.len(), 2 * 4 * 2);
    let a = &tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[8usize, 64][..], &[64usize, 8][..]));
    assert!(b.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "B left zero: nothing was learned");
    let log = std::fs::read_to_string(out.join("loss.jsonl"))?;
    assert_eq!(log.lines().count(), 20);
    Ok(())
}

/// The ranks' peak micro-batches held at once, from rank 0's report.
fn peaks(stderr: &str) -> Vec<u32> {
    let line = stderr.lines().find_map(|l| l.strip_prefix("micro-batches held at once, by rank: ")).expect(stderr);
    line.split(',').map(|x| x.parse().unwrap()).collect()
}

#[test]
fn a_1f1b_window_bounds_the_micro_batches_held_and_changes_no_loss() -> Result<()> {
    let files = training_files()?;
    // Four micro-batches across two ranks; the tiny model fits, so the plan says GPipe.
    let plan = lora_plan(&tiny(2, Some(4096)), &["m4-pro", "m5-pro"], 32, 8, 4, |f, _| f % 2)?;
    assert_eq!(plan.workload.inflight, Some(4), "GPipe when everything fits");
    let (ok, gpipe, err) = train(&files, &plan, "gpipe", &["--steps", "3"])?;
    assert!(ok, "{err}");
    assert!(peaks(&err)[0] >= 2, "GPipe overlaps micro-batches: {err}");
    for window in [1u32, 2] {
        let w = window.to_string();
        let (ok, losses, err) = train(&files, &plan, &format!("w{window}"), &["--steps", "3", "--inflight", &w])?;
        assert!(ok, "{err}");
        let p = peaks(&err);
        assert!(p.iter().all(|&x| (1..=window).contains(&x)), "window {window}: peaks {p:?}");
        for (a, b) in losses.iter().zip(&gpipe) {
            assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "window {window}: {losses:?} vs GPipe {gpipe:?}");
        }
        assert_eq!(losses.len(), 3);
    }
    Ok(())
}

#[test]
fn trained_adapters_load_back_and_change_generation() -> Result<()> {
    let files = training_files()?;
    let plan = train_plan(&["m4-pro", "m5-pro"], |f, _| f % 2)?;
    let out = files.dir.path().join("out");
    let (ok, _, err) = train(&files, &plan, "train", &["--steps", "15", "--output-dir", out.to_str().unwrap()])?;
    assert!(ok, "{err}");
    let ckpt = out.join("checkpoint-15");
    let cfg = tiny(2, Some(4096));
    let prompt = [5u32, 9, 17, 33, 65, 129];
    let generate = |tag: &str, split: bool, adapter: bool| -> Result<Vec<u32>> {
        let dir = files.dir.path().join(tag);
        std::fs::create_dir_all(&dir)?;
        let mut p =
            plan_with(&cfg, &["m4-pro", "m5-pro"], prompt.len() as u64, 8, |op| if split { op.id % 2 } else { 0 })?;
        if !split {
            p.machines.truncate(1);
        }
        let plan_path = dir.join("plan.json");
        std::fs::write(&plan_path, serde_json::to_string(&p)?)?;
        let cluster = cluster_file(&dir, &p)?;
        let mut workers = spawn_workers(&cluster, p.machines.len(), &[])?;
        let extra: Vec<&str> = if adapter { vec!["--adapter", ckpt.to_str().unwrap()] } else { vec![] };
        let o = run_leader(&cluster, &plan_path, &files.model, &prompt, 8, &extra)?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for w in workers.0.drain(..) {
            wait_exit(w, std::time::Duration::from_secs(10))?;
        }
        Ok(parse_ids(&o.stdout))
    };
    let base = generate("base", true, false)?;
    let tuned = generate("tuned", true, true)?;
    let tuned_one = generate("tuned-one", false, true)?;
    assert_ne!(base, tuned, "the adapters change generation");
    assert_eq!(tuned, tuned_one, "adapters split across ranks act as in one process");
    Ok(())
}
