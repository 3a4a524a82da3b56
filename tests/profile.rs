//! `lemur-profile` as a user runs it: a quick profile of this machine loads, plans and runs
//! (with every op timed, dense and quantized), the timings refine it, and a link between
//! two processes measures.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use common::*;
use lemurian::planner::profiles::ProfileSet;
use lemurian::protocol::timings::Timings;
use lemurian::protocol::WeightFormat;

fn bin(name: &str) -> std::path::PathBuf {
    worker_bin().with_file_name(name)
}

/// `lemur-plan` on `profiles` for `model` (f32, a `seq`-token prompt, `gen` generated) into
/// `out`; its summary.
fn plan_on(profiles: &Path, model: &Path, seq: u32, gen: u32, out: &Path) -> Result<String> {
    let o = Command::new(bin("lemur-plan"))
        .arg("--profiles")
        .arg(profiles)
        .arg("--model")
        .arg(model)
        .args(["--seq", &seq.to_string(), "--gen-tokens", &gen.to_string(), "--dtype", "f32", "--out"])
        .arg(out)
        .output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The plan run with every op timed into `timings`: prompt `1..=seq`, two repeats.
fn timed_run(cluster: &Path, plan: &Path, model: &Path, seq: u32, gen: usize, timings: &Path) -> Result<Output> {
    let prompt: Vec<u32> = (1..=seq).collect();
    run_leader(cluster, plan, model, &prompt, gen, &["--repeat", "2", "--timings", timings.to_str().unwrap()])
}

#[test]
fn a_measured_profile_loads_plans_runs_and_refines() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let profiles = dir.path().join("profiles");
    std::fs::create_dir(&profiles)?;
    let out = Command::new(env!("CARGO_BIN_EXE_lemur-profile"))
        .args(["--device", "cpu", "--name", "this-cpu", "--quick", "--quantized", "q4_1,q8_0,q4_k", "--out"])
        .arg(profiles.join("this-cpu.toml"))
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("measurements, about") && err.contains("TFLOP/s"), "{err}");
    std::fs::write(
        profiles.join("links.toml"),
        "[[link]]\nname = \"loopback\"\nbetween = [\"*\", \"*\"]\nbandwidth_gbps = 3.0\nlatency_us = 10.0\n",
    )?;
    let set = ProfileSet::load(&profiles)?;
    let p = set.machine("this-cpu")?;
    assert!(p.gemm.contains_key(&lemurian::protocol::DType::F32) && p.elementwise.is_some());
    let formats: Vec<WeightFormat> = p.quantized.keys().copied().collect();
    assert_eq!(formats, [WeightFormat::Q8_0, WeightFormat::Q4_1, WeightFormat::Q4K]);
    for q in p.quantized.values() {
        assert!(!q.estimate && q.source.contains("measured") && q.dequantize_gbps.is_some(), "{q:?}");
        assert_eq!(q.gemm.size.len(), 3, "three row counts");
    }

    // Plan a tiny random model on it and run it with every op timed.
    let model = dir.path().join("model");
    write_model(&model, &tiny(2, Some(4096)), 9)?;
    let plan_path = dir.path().join("plan.json");
    plan_on(&profiles, &model, 16, 4, &plan_path)?;
    let plan: lemurian::protocol::Plan = serde_json::from_str(&std::fs::read_to_string(&plan_path)?)?;
    let cluster = cluster_file(dir.path(), &plan)?;
    let timings = dir.path().join("timings.json");
    let out = timed_run(&cluster, &plan_path, &model, 16, 4, &timings)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("per op kind") && err.contains("per layer") && err.contains("end to end"), "{err}");
    let t: Timings = serde_json::from_str(&std::fs::read_to_string(&timings)?)?;
    assert_eq!(t.ops.len(), plan.ops.len(), "every op is timed");
    assert!(t.ops.iter().all(|o| o.measured_ms > 0.0 && o.predicted_ms > 0.0));

    // SmolLM2's Q4_1 file: its projections (Q4_1) and tied embedding (Q8_0) are priced at
    // the measured rates, and the summary says so.
    let gguf = smollm2()?;
    let q_plan = dir.path().join("q-plan.json");
    let text = plan_on(&profiles, &gguf, 32, 8, &q_plan)?;
    assert!(text.contains("Quantized GEMM rates: this-cpu q8_0/q4_1 measured"), "{text}");
    let q_timings = dir.path().join("q-timings.json");
    let out = timed_run(&cluster, &q_plan, &gguf, 32, 8, &q_timings)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Fold both runs' timings back in: the dense rates and the quantized formats' rates.
    let refined = dir.path().join("refined.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_lemur-profile"))
        .args(["refine", "--profile"])
        .arg(profiles.join("this-cpu.toml"))
        .arg("--from")
        .arg(&timings)
        .arg("--from")
        .arg(&q_timings)
        .arg("--out")
        .arg(&refined)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("matrix-vector q4_1") && err.contains("gemm q4_1 at N="), "{err}");
    let r = lemurian::planner::profiles::parse_machine(&refined, &std::fs::read_to_string(&refined)?)?;
    assert!(r.quantized[&WeightFormat::Q4_1].source.ends_with("refined from timed runs"), "{:?}", r.quantized);
    assert_eq!(r.quantized[&WeightFormat::Q4K], p.quantized[&WeightFormat::Q4K], "no Q4_K op ran");
    Ok(())
}

#[test]
fn a_link_between_two_processes_is_measured() -> Result<()> {
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_lemur-profile"))
        .args(["link", "--listen", &addr, "--name", "box-b"])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = Command::new(env!("CARGO_BIN_EXE_lemur-profile"))
        .args(["link", "--peer", &addr, "--name", "box-a"])
        .output()?;
    let _ = server.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let set_dir = tempfile::tempdir()?;
    std::fs::write(set_dir.path().join("links.toml"), &text)?;
    let links = lemurian::planner::profiles::parse_links(&set_dir.path().join("links.toml"), &text)?;
    assert_eq!(links[0].between, ["box-a".to_string(), "box-b".to_string()]);
    assert!(links[0].bandwidth_gbps > 0.1 && links[0].latency_us > 0.0 && links[0].latency_us < 10_000.0, "{links:?}");
    Ok(())
}
