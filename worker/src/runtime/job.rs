//! What a caller hands a rank and gets back: the job (a request or a training loop), the
//! callbacks that stream tokens and step figures, the timeouts, and the outcome.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;
use lemur_protocol::plan::PlanSet;
use lemur_protocol::wire::TrainSetup;
use lemur_protocol::Plan;
use serde::Serialize;

use crate::error::WorkerError;
use crate::sampling::Sampling;

/// LoRA tensors by PEFT name: shape and values (see [`crate::lora::AdapterTensors`]).
pub type AdapterGrads = crate::lora::AdapterTensors;

/// How long each wait may last.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting to a peer (it may still be starting).
    pub connect: Duration,
    /// Any single handshake or set-up read.
    pub handshake: Duration,
    /// A rank waiting for rank 0 to connect and send the plan.
    pub wait_for_leader: Duration,
    /// Loading weights on every rank.
    pub load: Duration,
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is dead.
    pub peer_dead: Duration,
    /// Serving: the longest a step may run before rank 0 declares the cluster stuck (a
    /// rank alive but not computing) and fails the requests in it.
    pub step: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
            wait_for_leader: Duration::from_secs(600),
            load: Duration::from_secs(600),
            heartbeat_interval: Duration::from_millis(1000),
            peer_dead: Duration::from_secs(5),
            step: Duration::from_secs(300),
        }
    }
}

/// Called on rank 0 with every generated token as it is chosen (streaming).
#[derive(Clone)]
pub struct TokenSink(pub Arc<dyn Fn(u32) + Send + Sync>);

impl std::fmt::Debug for TokenSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSink")
    }
}

/// How a serving rank 0 plans again over the ranks that are up, when one is lost or comes
/// back: given the plan the server started with and the machines left (in rank order), a
/// plan over exactly those machines, or why there is none (the model does not fit them).
/// Workers never plan: `lemur-serve` passes `lemur_planner::replan`.
#[derive(Clone)]
pub struct Replan(pub Arc<ReplanFn>);

/// The re-planner's signature: the first plan and the machines left, to a plan or why not.
pub type ReplanFn = dyn Fn(&Plan, &[String]) -> Result<Plan, String> + Send + Sync;

impl std::fmt::Debug for Replan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replan")
    }
}

/// One optimizer step's figures, for progress bars and loss logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub seconds: f64,
}

/// Called on rank 0 after every optimizer step.
#[derive(Clone)]
pub struct StepSink(pub Arc<dyn Fn(&StepLog) + Send + Sync>);

impl std::fmt::Debug for StepSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepSink")
    }
}

/// The training loop rank 0 drives.
#[derive(Debug, Clone)]
pub struct TrainLoop {
    /// Training sequences of seq + 1 tokens (inputs and next-token targets).
    pub sequences: Vec<Vec<u32>>,
    /// Sequences per micro-batch, and micro-batches per optimizer step.
    pub batch: usize,
    pub micro_batches: usize,
    /// Micro-batches in flight at once: the next one starts when one has finished on every
    /// rank. `micro_batches` is GPipe (every forward before the backwards drain); the
    /// number of pipeline stages is 1F1B's bound on saved activations.
    pub inflight: usize,
    /// Optimizer steps in all, and the first one to run (resuming).
    pub steps: u64,
    pub start_step: u64,
    /// Peak learning rate, linear warm-up steps, cosine decay to `min_lr_ratio` of it.
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm (over every rank's adapters) to this.
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Save a checkpoint every this many steps and at the end, here.
    pub save_every: u64,
    pub output: Option<PathBuf>,
    pub adapter_config: crate::checkpoint::AdapterConfig,
    /// One forward and backward, then gather the gradients instead of stepping.
    pub grad_check: bool,
    /// Adapter tensors (and moments) to load before the first step.
    pub resume: Option<AdapterGrads>,
    pub prior_losses: Vec<f64>,
    pub on_step: Option<StepSink>,
}

impl TrainLoop {
    /// The learning rate of step `s` (0-based): linear warm-up, then cosine decay.
    pub fn lr_at(&self, s: u64) -> f64 {
        if s < self.warmup {
            return self.lr * (s + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((s - self.warmup) as f64 / span).min(1.0);
        self.lr
            * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }
}

/// What rank 0 runs.
#[derive(Debug, Clone)]
pub struct Job {
    pub plan: Plan,
    pub model_dir: PathBuf,
    pub dtype: DType,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub eos: Option<u32>,
    pub sampling: Sampling,
    pub on_token: Option<TokenSink>,
    /// Time every op on every rank (for validating the cost model).
    pub timing: bool,
    /// Run the request this many times; times reported are medians over all runs but the
    /// first (a cold start), when there are several.
    pub repeat: usize,
    /// Training plans: how to initialise the adapters, and the loop to run. Inference with
    /// trained adapters: their shape, and `adapters` their tensors (PEFT names).
    pub train: Option<TrainSetup>,
    pub train_loop: Option<TrainLoop>,
    pub adapters: Option<AdapterGrads>,
    /// Dequantize GGUF's quantized weights at load (every rank) instead of running them
    /// as stored.
    pub dequantize: bool,
    /// Quantize dense weights (safetensors) to this format at load, on every rank.
    pub quantize: Option<lemur_protocol::WeightFormat>,
    /// When linear ops on quantized weights multiply by their dequantized weight.
    pub dense_matmul: lemur_protocol::wire::DenseMatmul,
    /// Serve requests (through [`super::Engine`]) with this batching instead of running
    /// `prompt`.
    pub serve: Option<crate::batch::BatchConfig>,
    /// Serving: plan around a lost rank and bring back one that returns (without it, a
    /// lost rank takes the cluster down).
    pub replan: Option<Replan>,
    /// Serving a plan set (`plan` is then its placement 0): each step runs in the
    /// placement its load asks for ([`crate::placement`]).
    pub plan_set: Option<Arc<PlanSet>>,
}

impl Job {
    /// A job for `plan` over the checkpoint at `model_dir` with nothing else set: no prompt
    /// (give one, a training loop or `serve`), one token, greedy, no adapters, weights as
    /// stored.
    pub fn new(plan: Plan, model_dir: PathBuf, dtype: DType) -> Self {
        Self {
            plan,
            model_dir,
            dtype,
            prompt: Vec::new(),
            max_new_tokens: 1,
            eos: None,
            sampling: Sampling::default(),
            on_token: None,
            timing: false,
            repeat: 1,
            train: None,
            train_loop: None,
            adapters: None,
            dequantize: false,
            quantize: None,
            serve: None,
            replan: None,
            dense_matmul: lemur_protocol::wire::DenseMatmul::Never,
            plan_set: None,
        }
    }

    /// A serving job over a plan set: its first placement is the plan, the others travel
    /// with it.
    pub fn with_plan_set(set: PlanSet, model_dir: PathBuf, dtype: DType) -> Self {
        let plan = set.decode.first().map_or_else(|| set.prefill[0].plan.clone(), |b| b.plan.clone());
        Self { plan_set: Some(Arc::new(set)), ..Self::new(plan, model_dir, dtype) }
    }

    /// The plan set's placements after the first (none without a set); an error if the
    /// set's first placement is not `plan`.
    pub fn alternatives(&self) -> Result<Vec<Plan>, WorkerError> {
        let Some(set) = &self.plan_set else { return Ok(Vec::new()) };
        let all = set.placements();
        if all.first() != Some(&&self.plan) {
            return Err(WorkerError::Plan("the job's plan is not its plan set's first placement".into()));
        }
        Ok(all[1..].iter().map(|p| (*p).clone()).collect())
    }

    /// The KV positions the job's placements leave for all requests together.
    pub fn kv_positions(&self) -> Option<usize> {
        match &self.plan_set {
            Some(set) => set.kv_positions(),
            None => self.plan.kv_positions(),
        }
        .map(|p| p as usize)
    }

    /// Checks the request against the model before any rank is contacted: a prompt of at
    /// least one token, every id inside the vocabulary, at least one token to generate,
    /// and prompt plus generated tokens within the model's positions.
    pub fn validate(&self, model: &lemur_protocol::ModelConfig) -> Result<(), WorkerError> {
        if self.train_loop.is_some() || self.serve.is_some() {
            return Ok(());
        }
        if self.prompt.is_empty() {
            return Err(WorkerError::Request("the prompt is empty: give at least one token".into()));
        }
        if let Some((i, id)) = self.prompt.iter().enumerate().find(|(_, &id)| u64::from(id) >= model.vocab_size) {
            return Err(WorkerError::Request(format!(
                "prompt token {i} is id {id}, outside the model's vocabulary of {} (ids 0..{})",
                model.vocab_size,
                model.vocab_size - 1
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(WorkerError::Request("max_new_tokens must be at least 1".into()));
        }
        let context = self.prompt.len() as u64 + self.max_new_tokens as u64;
        if context > model.max_position_embeddings {
            return Err(WorkerError::Request(format!(
                "prompt ({} tokens) + max_new_tokens ({}) exceeds the model's {} positions",
                self.prompt.len(),
                self.max_new_tokens,
                model.max_position_embeddings
            )));
        }
        Ok(())
    }
}

/// What rank 0 reports after a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub ttft: Duration,
    /// Mean time per output token after the first.
    pub tpot: Option<Duration>,
    /// Activation bytes sent by each rank, by rank.
    pub bytes_sent: Vec<u64>,
    /// Logits of every step (last position), kept for tests.
    pub logits: Vec<Vec<f32>>,
    /// KV cache handed over after prefill, bytes (all ranks).
    pub handover_bytes: u64,
    /// When the last of it arrived, from the prefill's start (the slowest rank), ms.
    pub handover_ms: f64,
    /// With timing on: every op's mean measured time, ms, by op id.
    pub op_ms: HashMap<usize, f64>,
    /// Training: the loss of the sequence, and every rank's LoRA gradients by PEFT name
    /// (`...lora_A.weight`): shape and values.
    pub loss: Option<f64>,
    pub lora_grads: AdapterGrads,
    /// Training: every step's mean loss (resumed runs include the earlier steps').
    pub train_losses: Vec<f64>,
    /// Training: every optimizer step's wall time, seconds (this run's steps only).
    pub step_seconds: Vec<f64>,
    /// Training: the most micro-batches each rank held at once, by rank.
    pub peak_runs: Vec<u32>,
    /// The most memory each rank's process held resident, bytes, by rank (0: unknown).
    pub peak_rss_bytes: Vec<u64>,
    /// With timing on: each rank's quantized-matmul kernel paths (`qmm::report`).
    pub kernel_paths: Vec<Vec<String>>,
    pub checkpoints: Vec<PathBuf>,
}

impl Outcome {
    /// The median optimizer step after the first (a warm-up, as for the per-op times), ms;
    /// the only step's time when one ran; NaN when none did.
    pub fn median_step_ms(&self) -> f64 {
        let warm = self.step_seconds.get(1..).filter(|s| !s.is_empty()).unwrap_or(&self.step_seconds);
        let mut steps = warm.to_vec();
        steps.sort_by(f64::total_cmp);
        steps.get(steps.len() / 2).copied().unwrap_or(f64::NAN) * 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> TrainLoop {
        TrainLoop {
            sequences: vec![],
            batch: 1,
            micro_batches: 1,
            inflight: 1,
            steps: 110,
            start_step: 0,
            lr: 1e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            save_every: 0,
            output: None,
            adapter_config: crate::checkpoint::AdapterConfig {
                rank: 8,
                alpha: 16.0,
                targets: vec![],
                base_model: String::new(),
            },
            grad_check: false,
            resume: None,
            prior_losses: vec![],
            on_step: None,
        }
    }

    #[test]
    fn median_step_skips_the_warm_up_step() {
        let mut o = Outcome {
            tokens: vec![],
            ttft: Duration::ZERO,
            tpot: None,
            bytes_sent: vec![],
            logits: vec![],
            handover_bytes: 0,
            handover_ms: 0.0,
            op_ms: HashMap::new(),
            loss: None,
            lora_grads: AdapterGrads::new(),
            train_losses: vec![],
            step_seconds: vec![9.0, 0.3, 0.1, 0.2],
            peak_runs: vec![],
            peak_rss_bytes: vec![],
            kernel_paths: vec![],
            checkpoints: vec![],
        };
        assert!((o.median_step_ms() - 200.0).abs() < 1e-9);
        o.step_seconds = vec![0.5];
        assert!((o.median_step_ms() - 500.0).abs() < 1e-9);
        o.step_seconds.clear();
        assert!(o.median_step_ms().is_nan());
    }

    #[test]
    fn learning_rate_warms_up_linearly_then_decays_by_cosine() {
        let s = schedule();
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-15);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-15);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-15);
        // Halfway through the decay: min + (1 - min) / 2.
        assert!((s.lr_at(60) - 1e-3 * 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-12);
    }
}
