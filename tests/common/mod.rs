//! Shared helpers for the runtime tests: tiny random checkpoints, plans with forced
//! splits, loopback clusters of real `lemur-worker` processes, and a reference model.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lemurian::protocol::plan::PlanOp;
use lemurian::protocol::{ModelConfig, Plan};
use lemurian::worker::cluster::Cluster;

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// The tiny Mistral of the tests: GQA 4 heads over 2, 2 or 3 layers.
pub fn tiny(layers: u64, window: Option<u64>) -> ModelConfig {
    ModelConfig { name: "tiny".into(), num_layers: layers, sliding_window: window, ..ModelConfig::tiny() }
}

/// Writes `config.json` and `model.safetensors` with random weights (norms too) to `dir`.
pub fn write_model(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    let config = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "sliding_window": cfg.sliding_window, "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let mut rng = Rng::new(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let (h, q, kv, i, v) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size);
    let mut add = |name: String, shape: (u64, u64), scale: f32, offset: f32| -> Result<()> {
        let n = (shape.0 * shape.1) as usize;
        let data: Vec<f32> = (0..n).map(|_| offset + scale * rng.uniform()).collect();
        let t = if shape.0 == 1 {
            Tensor::from_vec(data, shape.1 as usize, &Device::Cpu)?
        } else {
            Tensor::from_vec(data, (shape.0 as usize, shape.1 as usize), &Device::Cpu)?
        };
        tensors.insert(name, t);
        Ok(())
    };
    let lin = |fan_in: u64| 1.7 / (fan_in as f32).sqrt();
    add("model.embed_tokens.weight".into(), (v, h), 1.0, 0.0)?;
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), (1, h), 0.3, 1.0)?;
        add(format!("{p}.post_attention_layernorm.weight"), (1, h), 0.3, 1.0)?;
        add(format!("{p}.self_attn.q_proj.weight"), (q, h), lin(h), 0.0)?;
        add(format!("{p}.self_attn.k_proj.weight"), (kv, h), lin(h), 0.0)?;
        add(format!("{p}.self_attn.v_proj.weight"), (kv, h), lin(h), 0.0)?;
        add(format!("{p}.self_attn.o_proj.weight"), (h, q), lin(q), 0.0)?;
        add(format!("{p}.mlp.gate_proj.weight"), (i, h), lin(h), 0.0)?;
        add(format!("{p}.mlp.up_proj.weight"), (i, h), lin(h), 0.0)?;
        add(format!("{p}.mlp.down_proj.weight"), (h, i), lin(i), 0.0)?;
    }
    add("model.norm.weight".into(), (1, h), 0.3, 1.0)?;
    add("lm_head.weight".into(), (v, h), lin(h) * 2.0, 0.0)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// Greedy generation with candle-transformers' Mistral over the same files (f32).
pub fn reference_generate(dir: &Path, prompt: &[u32], n: usize) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    use candle_transformers::models::mistral::{Config, Model};
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let mut model = Model::new(&cfg, vb)?;
    let mut tokens = Vec::new();
    let mut logits_all = Vec::new();
    let mut input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let mut pos = 0;
    for _ in 0..n {
        let logits = model.forward(&input, pos)?.squeeze(0)?.squeeze(0)?.to_vec1::<f32>()?;
        let next = argmax(&logits);
        pos += input.dim(1)?;
        tokens.push(next);
        logits_all.push(logits);
        input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
    }
    Ok((tokens, logits_all))
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A plan for `cfg` on machines named `machines` (profiles of the shipped `profiles/`),
/// with every op then moved to `machines[rule(op)]`.
pub fn plan_with(
    cfg: &ModelConfig,
    machines: &[&str],
    prompt: u64,
    gen: u64,
    rule: impl Fn(&PlanOp) -> usize,
) -> Result<Plan> {
    let profiles = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles");
    let planned = lemurian::Planner::from_profiles(profiles)?
        .machines(machines)?
        .model(cfg.clone())
        .infer(prompt, gen, 1)
        .solver(Duration::from_secs(10), 1e-3)
        .plan()?;
    let mut plan = planned.plan;
    let names: Vec<String> = plan.machines.iter().map(|m| m.name.clone()).collect();
    for op in plan.ops.iter_mut() {
        let m = rule(op);
        op.machine = names[m].clone();
    }
    plan.validate()?;
    Ok(plan)
}

/// Free loopback ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// The `lemur-worker` binary built next to this test.
pub fn worker_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("lemur-worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p lemur-worker` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// Kills its children when dropped, so a failing test leaves no process behind.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback cluster of `plan.machines` and its file.
pub fn cluster_file(dir: &Path, plan: &Plan) -> Result<PathBuf> {
    let names: Vec<&str> = plan.machines.iter().map(|m| m.name.as_str()).collect();
    let ports = free_ports(names.len());
    let mut c = Cluster::loopback("test", &names, 0);
    for (r, p) in c.ranks.iter_mut().zip(ports) {
        r.addr = format!("127.0.0.1:{p}");
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, c.to_toml())?;
    Ok(path)
}

/// Starts ranks 1.. in the background.
pub fn spawn_workers(cluster: &Path, n: usize, extra: &[&str]) -> Result<Procs> {
    let mut procs = Procs(Vec::new());
    for r in 1..n {
        let child = Command::new(worker_bin())
            .args(["--rank", &r.to_string(), "--cluster"])
            .arg(cluster)
            .args(["--wait", "60"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning a worker")?;
        procs.0.push(child);
    }
    Ok(procs)
}

/// Runs rank 0 to completion (with a deadline).
pub fn run_leader(
    cluster: &Path,
    plan_path: &Path,
    model: &Path,
    prompt: &[u32],
    n: usize,
    extra: &[&str],
) -> Result<Output> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut child = Command::new(worker_bin())
        .args(["--rank", "0", "--cluster"])
        .arg(cluster)
        .arg("--plan")
        .arg(plan_path)
        .arg("--model")
        .arg(model)
        .args(["--prompt-ids", &ids.join(","), "--max-new-tokens", &n.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("rank 0 did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child to exit within `limit`; returns its output.
pub fn wait_exit(child: Child, limit: Duration) -> Result<Output> {
    let mut child = child;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

pub fn parse_ids(stdout: &[u8]) -> Vec<u32> {
    String::from_utf8_lossy(stdout).trim().split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}
