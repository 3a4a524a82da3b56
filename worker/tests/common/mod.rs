//! An in-process test cluster: every rank a thread running `run_node` over one
//! [`MemNet`], whose faults the test sets; plans from the planner; a reference model.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use lemur_planner::{Finetune, LoraSpec, Planner};
use lemur_protocol::plan::PlanOp;
use lemur_protocol::{ModelConfig, OpKind, Plan};
use lemur_worker::checkpoint::AdapterConfig;
use lemur_worker::cluster::Cluster;
use lemur_worker::runtime::memnet::MemNet;
use lemur_worker::runtime::{run_node, Job, NodeConfig, Outcome, Timeouts, TrainLoop};
use lemur_worker::WorkerError;

pub const TARGETS: [OpKind; 2] = [OpKind::QProj, OpKind::VProj];

/// The tiny Mistral of the tests: GQA 4 heads over 2, over `layers` layers.
pub fn tiny(layers: u64) -> ModelConfig {
    ModelConfig { name: "tiny".into(), num_layers: layers, sliding_window: Some(4096), ..ModelConfig::tiny() }
}

/// A random checkpoint of `cfg` in `dir/model`.
pub fn model(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<PathBuf> {
    let path = dir.join("model");
    lemur_worker::random_model::write_random_checkpoint(&path, cfg, seed)?;
    Ok(path)
}

fn profiles() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles")
}

/// An inference plan on `n` machines (the shipped Apple profiles, repeated) with every op
/// then moved to rank `rule(op)`.
pub fn infer_plan(cfg: &ModelConfig, n: usize, gen: u64, rule: impl Fn(&PlanOp) -> usize) -> Result<Plan> {
    let names: Vec<&str> = ["m4-pro", "m5-pro", "m5-pro"][..n].to_vec();
    let mut plan = Planner::from_profiles(profiles())?
        .machines(&names)?
        .model(cfg.clone())
        .infer(16, gen, 1)
        .solver(Duration::from_secs(10), 1e-3)
        .plan()?
        .plan;
    plan.reassign(rule);
    plan.validate()?;
    Ok(plan)
}

/// A LoRA training plan (rank 8 on q and v, seq 32, 2 micro-batches) on two machines, ops
/// moved by `rule` of the forward op's id (a backward op stays with its forward op).
pub fn train_plan(cfg: &ModelConfig, rule: impl Fn(usize) -> usize) -> Result<Plan> {
    let mut plan = Planner::from_profiles(profiles())?
        .machines(&["m4-pro", "m5-pro"])?
        .model(cfg.clone())
        .train(32, 1, Finetune::Lora(LoraSpec { rank: 8, targets: TARGETS.to_vec() }), 2)
        .solver(Duration::from_secs(10), 1e-3)
        .plan()?
        .plan;
    plan.reassign(|op| rule(op.forward_of.unwrap_or(op.id)));
    plan.validate()?;
    Ok(plan)
}

/// Timeouts short enough that a lost peer shows within a second.
pub fn fast() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(10),
        handshake: Duration::from_secs(10),
        wait_for_leader: Duration::from_secs(30),
        load: Duration::from_secs(30),
        heartbeat_interval: Duration::from_millis(50),
        peer_dead: Duration::from_millis(600),
        step: Duration::from_secs(60),
    }
}

/// Greedy generation of `n` tokens from `prompt`.
pub fn infer_job(plan: &Plan, model: &Path, prompt: &[u32], n: usize) -> Job {
    Job { prompt: prompt.to_vec(), max_new_tokens: n, ..Job::new(plan.clone(), model.to_path_buf(), DType::F32) }
}

/// A training loop over `sequences` (width seq + 1) for `steps` steps, saving every 10.
pub fn train_job(plan: &Plan, model: &Path, sequences: Vec<Vec<u32>>, steps: u64, out: &Path) -> Job {
    let w = &plan.workload;
    let train_loop = TrainLoop {
        sequences,
        batch: 1,
        micro_batches: w.micro_batches as usize,
        inflight: w.micro_batches as usize,
        steps,
        start_step: 0,
        lr: 5e-3,
        warmup: 3,
        min_lr_ratio: 0.1,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        save_every: 10,
        output: Some(out.to_path_buf()),
        adapter_config: adapter_config(plan),
        grad_check: false,
        resume: None,
        prior_losses: Vec::new(),
        on_step: None,
    };
    let setup = lemur_protocol::wire::TrainSetup {
        alpha: 16.0,
        seed: 3,
        zero_b: true,
        rank: None,
        targets: None,
        dropout: 0.1,
    };
    Job { train: Some(setup), train_loop: Some(train_loop), ..infer_job(plan, model, &[], 1) }
}

pub fn adapter_config(plan: &Plan) -> AdapterConfig {
    AdapterConfig {
        rank: plan.workload.lora_rank_or_default() as usize,
        alpha: 16.0,
        targets: plan.workload.lora_targets.clone().unwrap_or_default(),
        base_model: "tiny".into(),
    }
}

/// A small repetitive data set: 40 rotations of one 33-token pattern.
pub fn sequences() -> Vec<Vec<u32>> {
    let mut rng = lemur_worker::rng::Rng::new(4);
    let pattern: Vec<u32> = (0..33).map(|_| ((rng.uniform() + 1.0) * 127.0) as u32).collect();
    (0..40).map(|i| pattern[i % 5..].iter().chain(&pattern[..i % 5]).copied().collect()).collect()
}

/// The cluster a test cluster of `plan` runs: one rank per plan machine, on loopback
/// addresses from port 7000 (names only: the in-memory network opens no socket).
pub fn cluster_of(id: &str, plan: &Plan) -> Cluster {
    let names: Vec<&str> = plan.machines.iter().map(|m| m.name.as_str()).collect();
    Cluster::loopback(id, &names, 7000)
}

/// The addresses of `plan`'s test cluster, by rank (what fault rules name).
pub fn addrs(plan: &Plan) -> Vec<String> {
    cluster_of("any", plan).ranks.into_iter().map(|r| r.addr).collect()
}

/// Ranks of one cluster, each a thread with its own actor system, over one network.
pub struct TestCluster {
    pub net: MemNet,
    pub cluster: Cluster,
    results: Vec<mpsc::Receiver<Result<Option<Outcome>, WorkerError>>>,
    /// The ranks' cache folder, when the cluster made its own (removed when dropped).
    _cache: Option<tempfile::TempDir>,
}

impl TestCluster {
    /// Starts every rank of `plan` (rank 0 with `job`) on `net`, with [`fast`] timeouts.
    pub fn start(id: &str, plan: &Plan, job: Job, net: MemNet) -> Self {
        Self::start_with(id, plan, job, net, |_| fast())
    }

    /// As [`TestCluster::start`], with each rank's timeouts, and a cache folder of its own.
    pub fn start_with(id: &str, plan: &Plan, job: Job, net: MemNet, timeouts: impl Fn(u32) -> Timeouts) -> Self {
        let cache = tempfile::tempdir().expect("a temporary cache folder");
        let mut c = Self::start_in(id, plan, job, net, cache.path(), timeouts);
        c._cache = Some(cache);
        c
    }

    /// As [`TestCluster::start_with`], rank r caching weights in `cache/rank{r}` (a
    /// machine of its own).
    pub fn start_in(
        id: &str,
        plan: &Plan,
        job: Job,
        net: MemNet,
        cache: &Path,
        timeouts: impl Fn(u32) -> Timeouts,
    ) -> Self {
        let cluster = cluster_of(id, plan);
        let mut results = Vec::new();
        let mut job = Some(job);
        for rank in 0..cluster.ranks.len() as u32 {
            let mut cfg =
                NodeConfig::new(rank, cluster.clone(), Device::Cpu, if rank == 0 { job.take() } else { None });
            cfg.timeouts = timeouts(rank);
            cfg.transport = Arc::new(net.clone());
            cfg.cache_dir = cache.join(format!("rank{rank}"));
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(run_node(cfg));
            });
            results.push(rx);
        }
        Self { net, cluster, results, _cache: None }
    }

    /// The address of rank `r` (what faults name).
    pub fn addr(&self, r: usize) -> String {
        self.cluster.ranks[r].addr.clone()
    }

    /// Waits for rank `r` to end, at most `limit`.
    pub fn join(&self, r: usize, limit: Duration) -> Result<Result<Option<Outcome>, WorkerError>> {
        self.results[r].recv_timeout(limit).map_err(|_| anyhow!("rank {r} did not end within {limit:?}"))
    }

    /// Waits for rank `r` to fail, at most 60 s; returns its error's message.
    pub fn failure(&self, r: usize) -> Result<String> {
        match self.join(r, Duration::from_secs(60))? {
            Ok(_) => Err(anyhow!("rank {r} succeeded; it should have failed")),
            Err(e) => Ok(e.to_string()),
        }
    }

    /// Waits for every rank; returns rank 0's outcome, failing if any rank failed.
    pub fn finish(&self) -> Result<Outcome> {
        let out = self.join(0, Duration::from_secs(120))??.ok_or_else(|| anyhow!("rank 0 returned no outcome"))?;
        for r in 1..self.results.len() {
            self.join(r, Duration::from_secs(30))??;
        }
        Ok(out)
    }
}

/// Greedy generation with candle-transformers' Mistral over the same files (f32).
pub fn reference_generate(dir: &Path, prompt: &[u32], n: usize) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    use candle_transformers::models::mistral::{Config, Model};
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let mut model = Model::new(&cfg, vb)?;
    let (mut tokens, mut logits_all) = (Vec::new(), Vec::new());
    let mut input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let mut pos = 0;
    for _ in 0..n {
        let logits = model.forward(&input, pos)?.squeeze(0)?.squeeze(0)?.to_vec1::<f32>()?;
        let next = lemur_worker::sampling::argmax(&logits);
        pos += input.dim(1)?;
        tokens.push(next);
        logits_all.push(logits);
        input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
    }
    Ok((tokens, logits_all))
}

pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}
