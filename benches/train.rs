//! Training benchmark: tokens/s of a LoRA training step run by two `lemur-worker`
//! processes on loopback against one process on the same shape, and each measured step
//! against the plan's predicted step, in the same run. Plans come from this machine's
//! measured CPU profile (`profiles/measured`), then from that profile refined with a timed
//! one-worker training run (`lemur-profile refine`'s arithmetic), closing the loop.
//!
//! `cargo build --release -p lemur-worker -p lemur-planner && cargo bench --bench train`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use lemurian::protocol::timings::Timings;
use lemurian::protocol::{ModelConfig, Plan};
use lemurian::worker::cluster::Cluster;
use lemurian::worker::random_model::write_random_checkpoint;
use lemurian::{Finetune, LoraSpec};

const SEQ: u64 = 128;
const MICRO: u64 = 4;
const STEPS: u64 = 3;

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Median seconds per step after the first, from the loss log, and the timings when asked.
fn run(dir: &Path, model: &Path, plan: &Plan, data: &Path, timed: bool) -> Result<(f64, Option<Timings>)> {
    let bin = target_dir().join("lemur-worker");
    if !bin.exists() {
        bail!("{} is missing: run `cargo build --release -p lemur-worker` first", bin.display());
    }
    std::fs::create_dir_all(dir)?;
    let names: Vec<&str> = plan.machines.iter().map(|m| m.name.as_str()).collect();
    let mut cluster = Cluster::loopback("bench-train", &names, 0);
    for r in cluster.ranks.iter_mut() {
        r.addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    }
    let cpath = dir.join("cluster.toml");
    std::fs::write(&cpath, cluster.to_toml())?;
    let ppath = dir.join("plan.json");
    std::fs::write(&ppath, serde_json::to_string(plan)?)?;
    let log = dir.join("loss.jsonl");
    let _ = std::fs::remove_file(&log);
    let tpath = dir.join("timings.json");
    let mut workers = Vec::new();
    for r in 1..names.len() {
        workers.push(
            Command::new(&bin)
                .args(["--once", "--rank", &r.to_string(), "--cluster"])
                .arg(&cpath)
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let out = Command::new(&bin)
        .args(["--rank", "0", "--cluster"])
        .arg(&cpath)
        .arg("--plan")
        .arg(&ppath)
        .arg("--model")
        .arg(model)
        .arg("--train")
        .arg(data)
        .args(["--steps", &STEPS.to_string(), "--loss-log"])
        .arg(&log)
        .args(if timed { vec!["--timings".into(), tpath.clone().into_os_string()] } else { vec![] })
        .output()?;
    for mut w in workers {
        let _ = w.wait();
    }
    if !out.status.success() {
        bail!("training failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut secs: Vec<f64> = std::fs::read_to_string(&log)?
        .lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["seconds"].as_f64())
        .collect();
    secs.sort_by(f64::total_cmp);
    let median = secs.get(secs.len() / 2).copied().context("no step times")?;
    let timings = if timed { Some(serde_json::from_str(&std::fs::read_to_string(&tpath)?)?) } else { None };
    Ok((median, timings))
}

fn main() -> Result<()> {
    let cfg = ModelConfig { num_layers: 4, ..ModelConfig::preset("llama-150m-shaped").expect("preset") };
    let model = target_dir().join("bench-models").join("llama-150m-4l");
    if !model.join("model.safetensors").exists() {
        write_random_checkpoint(&model, &cfg, 2)?;
    }
    let work = tempfile::tempdir()?;
    let data = work.path().join("data.jsonl");
    let lines: String = (0..64u32)
        .map(|i| serde_json::json!({ "input_ids": (0..SEQ as u32 + 1).map(|j| (i * 131 + j * 7) % 32000).collect::<Vec<_>>() }).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines)?;
    let profiles = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/measured"));
    let lora = Finetune::Lora(LoraSpec::default());
    let plan_for = |dir: &Path, machines: &[&str]| -> Result<Plan> {
        let mut p = lemurian::Planner::from_profiles(dir)?
            .machines(machines)?
            .model(cfg.clone())
            .dtype(lemurian::protocol::DType::F32)
            .train(SEQ, 1, lora.clone(), MICRO)
            .plan()?
            .plan;
        p.validate()?;
        p.machines.retain(|m| p.ops.iter().any(|o| o.machine == m.name));
        Ok(p)
    };
    let tokens = (SEQ * MICRO) as f64;
    let predicted = |p: &Plan| p.predicted.step_ms.unwrap_or(f64::NAN) / 1e3;

    // 1. The measured microbenchmark profile, and a timed one-worker run.
    let one_base = plan_for(&profiles, &["dev-cpu"])?;
    let (s0, timings) = run(&work.path().join("timed"), &model, &one_base, &data, true)?;
    let timings = timings.context("timings")?;
    // 2. Refine the profile from that run and plan again.
    let base = lemurian::planner::ProfileSet::load(&profiles)?;
    let prof = base.machine("dev-cpu").context("dev-cpu profile")?;
    let (refined, _) = lemurian::planner::refine::refine(prof, std::slice::from_ref(&timings))?;
    let rdir = work.path().join("refined");
    std::fs::create_dir_all(&rdir)?;
    std::fs::write(rdir.join("dev-cpu.toml"), toml::to_string(&refined)?)?;
    std::fs::copy(profiles.join("links.toml"), rdir.join("links.toml"))?;
    let one = plan_for(&rdir, &["dev-cpu"])?;
    let two = plan_for(&rdir, &["dev-cpu", "dev-cpu"])?;
    let (s1, _) = run(&work.path().join("one"), &model, &one, &data, false)?;
    let (s2, _) = run(&work.path().join("two"), &model, &two, &data, false)?;
    println!(
        "LoRA training step of {} ({} layers, f32), {MICRO} micro-batches of {SEQ} tokens, this 2-core machine",
        cfg.name, cfg.num_layers
    );
    println!("{:<44} {:>8} {:>9} {:>11} {:>13}", "", "step s", "tokens/s", "predicted s", "measured/pred");
    let row = |name: &str, s: f64, p: f64| {
        println!("{name:<44} {s:>8.3} {:>9.1} {p:>11.3} {:>12.2}x", tokens / s, s / p);
    };
    row("one worker, microbenchmark profile (timed)", s0, predicted(&one_base));
    row("one worker, refined profile", s1, predicted(&one));
    row(&format!("two workers ({} ranks used), refined profile", two.machines.len()), s2, predicted(&two));
    println!("two workers against one: {:.2}x the tokens/s", s1 / s2);
    Ok(())
}
