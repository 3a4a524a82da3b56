//! `lemur-worker`: one rank of a Lemurian cluster (thin over `lemur_worker`).

/// candle allocates every op's output; mimalloc reuses freed memory instead of returning it
/// to the OS and faulting it back in, which made element-wise ops several times slower
/// (and `alloc::keep_freed_memory` turns its delayed purging off).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use lemur_protocol::auth::ClusterKey;
use lemur_protocol::cli::parse;
use lemur_protocol::timings::Timings;
use lemur_protocol::wire::DenseMatmul;
use lemur_protocol::wire::TrainSetup;
use lemur_protocol::{Plan, WeightFormat, WorkloadMode};
use lemur_worker::checkpoint::{AdapterConfig, LossLog};
use lemur_worker::cluster::Cluster;
use lemur_worker::runtime::{
    run_node, serve_worker, Job, NodeConfig, StepLog, StepSink, Timeouts, TokenSink, TrainLoop,
};
use lemur_worker::sampling::Sampling;
use lemur_worker::tokenizer::{Streamer, Tok};
use lemur_worker::weights::{parse_dtype, parse_quantize, Checkpoint};

/// Run one rank of a Lemurian cluster.
///
/// Ranks other than 0 listen on their address from the cluster file and serve one leader
/// after another (--once: one, then exit). Rank 0 is the leader: it connects to every rank,
/// sends the plan, and drives a request: it prints the generated text (or token ids, comma
/// separated) on stdout and timings on stderr.
///
/// Every connection authenticates with the cluster key given by --key-file (or
/// LEMUR_KEY_FILE); `lemur-worker keygen KEYFILE` writes a new one. Without a key, every
/// address in the cluster file must be a loopback address.
#[derive(Debug, Parser)]
#[command(name = "lemur-worker", version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// This process's rank in the cluster file.
    #[arg(long)]
    rank: u32,
    /// The cluster file: each rank's address and machine.
    #[arg(long)]
    cluster: PathBuf,
    /// cpu, cuda (cuda:N) or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Rank 0: the plan (from `lemur-plan --out`).
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Rank 0: the checkpoint, a Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json) or a GGUF file. Only rank 0 needs it: every other rank is sent the
    /// weights of its ops and keeps them in its cache (--cache-dir).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rank 0: the prompt as text; the generated text streams to stdout.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Rank 0: wrap --prompt in the checkpoint's chat template as a user message.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Rank 0: the prompt as token ids, comma separated; the generated ids go to stdout.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// Rank 0: how many tokens to generate at most.
    #[arg(long, default_value_t = 32, value_parser = parse::at_least_one::<usize>)]
    max_new_tokens: usize,
    /// Rank 0: stop at this token id (default: the tokenizer's end of sequence, with --prompt).
    #[arg(long)]
    eos: Option<u32>,
    /// Rank 0: sampling temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0, value_parser = parse::non_negative)]
    temperature: f64,
    /// Rank 0: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0, value_parser = parse::above_zero_to_one)]
    top_p: f64,
    /// Rank 0: keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Rank 0: seed of the sampler (same seed, same output).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Precision of the run: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Rank 0: also write every step's logits (JSON) here.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Rank 0: time every op on every rank and write predicted against measured times
    /// (JSON) here; the validation table goes to stderr. Training: forward and backward
    /// ops (means per micro-batch after the first step) and the optimizer step.
    #[arg(long)]
    timings: Option<PathBuf>,
    /// Rank 0: run the request this many times; the times reported are medians over the
    /// warm runs (all but the first).
    #[arg(long, default_value_t = 1, value_parser = parse::at_least_one::<usize>)]
    repeat: usize,
    /// Rank 0, training plans: run --prompt-ids as one training sequence (forward and
    /// backward) and write the loss and every rank's LoRA gradients (JSON) here.
    #[arg(long)]
    grad_check: Option<PathBuf>,
    /// LoRA alpha (the adapters' scale is alpha / rank).
    #[arg(long, default_value_t = 32.0, value_parser = parse::positive)]
    lora_alpha: f64,
    /// Seed of the adapters' initialisation.
    #[arg(long, default_value_t = 0)]
    lora_seed: u64,
    /// LoRA dropout on the adapters' input while training.
    #[arg(long, default_value_t = 0.0, value_parser = parse::below_one)]
    lora_dropout: f64,
    /// Initialise B randomly instead of PEFT's zeros (for gradient checks).
    #[arg(long)]
    lora_random_b: bool,
    /// Rank 0, training plans: fine-tune LoRA adapters on this JSONL file (one object a
    /// line, with `text`, tokenised by the model's tokenizer, or `input_ids`).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Optimizer steps (default: one pass over the data).
    #[arg(long, value_parser = parse::at_least_one::<u64>)]
    steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4, value_parser = parse::positive)]
    lr: f64,
    /// Linear warm-up steps before the cosine decay.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Where the cosine decay ends, as a fraction of the peak.
    #[arg(long, default_value_t = 0.1, value_parser = parse::fraction)]
    min_lr_ratio: f64,
    /// Clip the global gradient norm (over every rank) to this.
    #[arg(long, default_value_t = 1.0, value_parser = parse::positive)]
    max_grad_norm: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0, value_parser = parse::non_negative)]
    weight_decay: f64,
    /// Micro-batches in flight at once (default: the plan's schedule, GPipe or 1F1B).
    #[arg(long, value_parser = parse::at_least_one::<u64>)]
    inflight: Option<u64>,
    /// Checkpoints (PEFT adapters, optimizer state) go here.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Save every this many steps, and at the end.
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Continue from the newest checkpoint in --output-dir.
    #[arg(long)]
    resume: bool,
    /// Append one JSON line per step (step, loss, lr, grad norm, tokens, seconds) here
    /// (default: OUTPUT_DIR/loss.jsonl).
    #[arg(long)]
    loss_log: Option<PathBuf>,
    /// Rank 0, inference: apply trained LoRA adapters (a checkpoint or PEFT adapter directory).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Rank 0: dequantize a GGUF's quantized weights at load (every rank) instead of
    /// running them as stored with quantized matmuls.
    #[arg(long, conflicts_with = "quantize")]
    dequantize: bool,
    /// Rank 0: when linear ops on quantized weights multiply by their dequantized weight (one
    /// f32 GEMM over all rows) instead of the quantized kernels: never, prefill or always.
    #[arg(long, default_value = "never", value_parser = DenseMatmul::parse)]
    dense_matmul: DenseMatmul,
    /// Rank 0: quantize a checkpoint's dense weights at load (every rank), to q8_0, q4_0,
    /// q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k or the mixes q4_k_m, q5_k_m, each
    /// tensor as llama.cpp's llama-quantize would (the lm head in q6_k unless q8_0, the
    /// mixes' q6_k layers); the plan must be for that format.
    #[arg(long, value_parser = parse_quantize)]
    quantize: Option<WeightFormat>,
    /// The cluster key (from `lemur-worker keygen`), the same file on every machine; it
    /// must be readable by its owner only. Without one, the cluster must be on loopback.
    #[arg(long, env = "LEMUR_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Lemurian's cache folder: other ranks keep the weights rank 0 sent them under
    /// weights/<checkpoint hash>/ and load them from there while the hash matches.
    #[arg(long, env = "LEMUR_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Ranks other than 0: serve one leader's run, then exit (default: serve leader after
    /// leader until stopped).
    #[arg(long)]
    once: bool,
    /// Seconds a rank waits for rank 0 before giving up (with --once) or starting over.
    #[arg(long, default_value_t = 600, value_parser = parse::at_least_one::<u64>)]
    wait: u64,
    /// On failure, also print the error's backtrace (as LEMUR_BACKTRACE=1 does).
    #[arg(short, long)]
    verbose: bool,
}

/// Flags only rank 0 reads: the plan, the model, the request and the training loop. Other
/// ranks take all of it from rank 0, so one given to them is a mistake worth naming.
const LEADER_ONLY: &[&str] = &[
    "plan",
    "model",
    "prompt",
    "chat",
    "prompt_ids",
    "max_new_tokens",
    "eos",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "dtype",
    "dump_logits",
    "timings",
    "repeat",
    "grad_check",
    "lora_alpha",
    "lora_seed",
    "lora_dropout",
    "lora_random_b",
    "train",
    "steps",
    "lr",
    "warmup",
    "min_lr_ratio",
    "max_grad_norm",
    "weight_decay",
    "inflight",
    "output_dir",
    "save_every",
    "resume",
    "loss_log",
    "adapter",
    "dequantize",
    "quantize",
    "dense_matmul",
];

/// Write a new cluster key: 32 random bytes as hex, in a file only its owner can read.
/// Copy the file to every machine of the cluster and give it to every rank with --key-file.
#[derive(Debug, Parser)]
#[command(name = "lemur-worker keygen")]
struct Keygen {
    /// Where to write the key; an existing file is never overwritten.
    path: PathBuf,
}

fn main() -> ExitCode {
    lemur_worker::alloc::keep_freed_memory();
    // Test builds only: fail points named in the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if std::env::args_os().nth(1).is_some_and(|a| a == "keygen") {
        let k = Keygen::parse_from(std::env::args_os().skip(1));
        return lemur_protocol::cli::main(false, || {
            let key = ClusterKey::write_new(&k.path)?;
            eprintln!(
                "wrote a new cluster key to {} (fingerprint {}); copy it to every machine and start every rank with --key-file {}",
                k.path.display(),
                key.fingerprint(),
                k.path.display()
            );
            anyhow::Ok(())
        });
    }
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The flags given on the command line (not defaults) that this rank would ignore.
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let pick = |ids: &[&str]| -> Vec<String> {
        ids.iter().copied().filter(|id| given(id)).map(|id| format!("--{}", id.replace('_', "-"))).collect()
    };
    let ignored = if args.rank == 0 { pick(&["wait", "once"]) } else { pick(LEADER_ONLY) };
    lemur_protocol::cli::main(args.verbose, || run(args, &ignored))
}

fn run(args: Args, ignored: &[String]) -> Result<()> {
    if !ignored.is_empty() {
        let whom = if args.rank == 0 {
            "ranks other than 0 (rank 0 is the leader and waits for no one)"
        } else {
            "rank 0 only: other ranks take the plan, model and settings from rank 0"
        };
        bail!(
            "{} given to rank {}: {} applies to {whom}",
            ignored.join(", "),
            args.rank,
            if ignored.len() == 1 { "it" } else { "each" }
        );
    }
    let cluster = Cluster::load(&args.cluster)?;
    cluster.get(args.rank)?;
    let key = args.key_file.as_deref().map(ClusterKey::load).transpose().context("--key-file")?;
    cluster.check_exposure(key.is_some())?;
    if let (Some(k), Some(path)) = (&key, &args.key_file) {
        eprintln!("rank {}: cluster key {} (fingerprint {})", args.rank, path.display(), k.fingerprint());
    }
    let device = lemur_worker::device::open(&args.device).context("--device")?;
    let dtype = parse_dtype(&args.dtype).context("--dtype")?;
    let mut tok: Option<Arc<Tok>> = None;
    let job = if args.rank == 0 {
        let plan_path = args.plan.as_ref().context("rank 0 needs --plan")?;
        let text = std::fs::read_to_string(plan_path).with_context(|| format!("reading {}", plan_path.display()))?;
        let plan = Plan::from_json(&text).with_context(|| format!("{}", plan_path.display()))?;
        let plan_is_train = plan.workload.mode == WorkloadMode::Train;
        if plan_is_train && args.grad_check.is_none() && args.train.is_none() {
            bail!("a training plan needs --train DATA.jsonl (or --grad-check FILE)");
        }
        if !plan_is_train && args.train.is_some() {
            bail!("--train needs a training plan (lemur-plan --mode train --lora)");
        }
        let model_dir = args.model.clone().context("rank 0 needs --model")?;
        // The checkpoint first: a missing path or a corrupt config.json is reported as
        // such, not as a tokenizer missing from it.
        let checkpoint = Checkpoint::open(&model_dir).context("--model")?;
        checkpoint.check_plan_model(&plan.model).with_context(|| format!("--plan {}", plan_path.display()))?;
        let (prompt, eos, on_token) = match &args.prompt {
            _ if args.train.is_some() => (Vec::new(), None, None),
            Some(text) => {
                if text.trim().is_empty() {
                    bail!("--prompt is empty: give some text (or token ids with --prompt-ids)");
                }
                let t = Arc::new(Tok::from_checkpoint(&model_dir)?);
                let text = if args.chat { t.chat(text)? } else { text.clone() };
                let ids = t.encode(&text)?;
                if ids.is_empty() {
                    bail!("--prompt: the text encodes to no tokens; give at least one character");
                }
                let streamer = Arc::new(Mutex::new(Streamer::default()));
                let (t2, s2) = (t.clone(), streamer.clone());
                let sink = TokenSink(Arc::new(move |id| {
                    let piece = s2.lock().map(|mut s| s.push(&t2, id).unwrap_or_default()).unwrap_or_default();
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                }));
                let eos = args.eos.or(t.eos);
                tok = Some(t);
                (ids, eos, Some(sink))
            }
            None if !args.prompt_ids.is_empty() => (args.prompt_ids.clone(), args.eos, None),
            None => bail!("rank 0 needs --prompt or --prompt-ids (or --train for training plans)"),
        };
        let adapter = match &args.adapter {
            Some(dir) if !plan_is_train => {
                let (cfg, tensors, _) = lemur_worker::checkpoint::read(dir)?;
                Some((cfg, tensors))
            }
            Some(_) => bail!("--adapter applies to inference plans; training resumes with --resume"),
            None => None,
        };
        let train_loop = if plan_is_train { Some(train_loop(&args, &plan, &model_dir, &prompt)?) } else { None };
        let sampling =
            Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
        Some(Job {
            plan,
            model_dir,
            dtype,
            prompt,
            max_new_tokens: args.max_new_tokens,
            eos,
            sampling,
            on_token,
            timing: args.timings.is_some(),
            repeat: args.repeat,
            replan: None,
            plan_set: None,
            train_loop,
            train: match &adapter {
                Some((cfg, _)) => Some(TrainSetup {
                    alpha: cfg.alpha,
                    seed: 0,
                    zero_b: true,
                    rank: Some(cfg.rank as u64),
                    targets: Some(cfg.targets.clone()),
                    dropout: 0.0,
                }),
                None => plan_is_train.then_some(TrainSetup {
                    alpha: args.lora_alpha,
                    seed: args.lora_seed,
                    zero_b: !args.lora_random_b,
                    rank: None,
                    targets: None,
                    dropout: args.lora_dropout,
                }),
            },
            adapters: adapter.map(|(_, t)| t),
            dequantize: args.dequantize,
            quantize: args.quantize,
            serve: None,
            dense_matmul: args.dense_matmul,
        })
    } else {
        None
    };
    let plan = job.as_ref().map(|j| j.plan.clone());
    let mut cfg = NodeConfig::new(args.rank, cluster, device, job);
    cfg.timeouts = Timeouts { wait_for_leader: Duration::from_secs(args.wait), ..Timeouts::default() };
    cfg.key = key;
    if let Some(dir) = &args.cache_dir {
        cfg.cache_dir = dir.clone();
    }
    if args.rank != 0 && !args.once {
        serve_worker(cfg)?;
        return Ok(());
    }
    let outcome = run_node(cfg)?;
    if let Some(o) = outcome {
        if tok.is_some() {
            println!();
        } else {
            let ids: Vec<String> = o.tokens.iter().map(u32::to_string).collect();
            println!("{}", ids.join(","));
        }
        eprintln!("time to first token: {:.2} ms", o.ttft.as_secs_f64() * 1e3);
        if let Some(t) = o.tpot {
            eprintln!("time per token: {:.2} ms ({:.1} tokens/s)", t.as_secs_f64() * 1e3, 1.0 / t.as_secs_f64());
        }
        for (r, b) in o.bytes_sent.iter().enumerate() {
            eprintln!("rank {r} sent {b} bytes of activations");
        }
        for (r, m) in o.peak_rss_bytes.iter().enumerate().filter(|(_, m)| **m > 0) {
            eprintln!("rank {r} peak resident memory: {:.1} MB", *m as f64 / 1e6);
        }
        if o.handover_bytes > 0 {
            eprintln!("KV handover: {} bytes, complete {:.2} ms after prefill began", o.handover_bytes, o.handover_ms);
        }
        if let (Some(path), Some(plan)) = (&args.timings, &plan) {
            let t = if plan.workload.mode == WorkloadMode::Train {
                Timings::train(plan, &o.op_ms, o.median_step_ms())
            } else {
                Timings::new(plan, &o.op_ms, o.ttft.as_secs_f64() * 1e3, o.tpot.map(|d| d.as_secs_f64() * 1e3))
            };
            eprint!("{}", t.table());
            for (r, lines) in o.kernel_paths.iter().enumerate() {
                for line in lines {
                    eprintln!("rank {r} quantized matmuls, {line}");
                }
            }
            std::fs::write(path, serde_json::to_string_pretty(&t)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if !o.train_losses.is_empty() && args.grad_check.is_none() {
            let first = o.train_losses.first().copied().unwrap_or(f64::NAN);
            let last = o.train_losses.last().copied().unwrap_or(f64::NAN);
            eprintln!("trained {} steps: loss {first:.4} -> {last:.4}", o.train_losses.len());
            let peaks: Vec<String> = o.peak_runs.iter().map(u32::to_string).collect();
            eprintln!("micro-batches held at once, by rank: {}", peaks.join(","));
            for c in &o.checkpoints {
                eprintln!("checkpoint: {}", c.display());
            }
            println!("{}", o.train_losses.iter().map(|l| format!("{l:.6}")).collect::<Vec<_>>().join(","));
        }
        if let Some(path) = &args.grad_check {
            if let Some(loss) = o.loss {
                eprintln!("loss: {loss:.6}");
            }
            let grads: serde_json::Map<String, serde_json::Value> = o
                .lora_grads
                .iter()
                .map(|(k, (shape, v))| (k.clone(), serde_json::json!({ "shape": shape, "values": v })))
                .collect();
            let doc = serde_json::json!({ "loss": o.loss, "grads": grads });
            std::fs::write(path, serde_json::to_string(&doc)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &args.dump_logits {
            std::fs::write(path, serde_json::to_string(&o.logits)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The training loop rank 0 drives: data, schedule, checkpoints, progress.
fn train_loop(args: &Args, plan: &Plan, model: &Path, check_ids: &[u32]) -> Result<TrainLoop> {
    let adapter_config = AdapterConfig {
        rank: plan.workload.lora_rank_or_default() as usize,
        alpha: args.lora_alpha,
        targets: plan.workload.lora_targets.clone().unwrap_or_default(),
        base_model: model.display().to_string(),
    };
    let base = TrainLoop {
        sequences: Vec::new(),
        batch: plan.workload.batch.max(1) as usize,
        micro_batches: plan.workload.micro_batches.max(1) as usize,
        inflight: args
            .inflight
            .or(plan.workload.inflight)
            .unwrap_or(plan.workload.micro_batches)
            .clamp(1, plan.workload.micro_batches.max(1)) as usize,
        steps: 1,
        start_step: 0,
        lr: args.lr,
        warmup: args.warmup,
        min_lr_ratio: args.min_lr_ratio,
        max_grad_norm: args.max_grad_norm,
        weight_decay: args.weight_decay,
        save_every: args.save_every,
        output: args.output_dir.clone(),
        adapter_config,
        grad_check: false,
        resume: None,
        prior_losses: Vec::new(),
        on_step: None,
    };
    if args.grad_check.is_some() {
        return Ok(TrainLoop {
            sequences: vec![check_ids.to_vec()],
            batch: 1,
            micro_batches: 1,
            grad_check: true,
            ..base
        });
    }
    let data = args.train.as_ref().context("--train DATA.jsonl")?;
    let seq = plan.workload.seq as usize;
    let tok = Tok::from_checkpoint(model).ok();
    let sequences = lemur_worker::dataset::read_sequences(data, seq + 1, tok.as_ref())?;
    let per_step = base.batch * base.micro_batches;
    if sequences.len() < per_step {
        bail!(
            "{}: {} sequences of {} tokens, fewer than the {per_step} one step needs",
            data.display(),
            sequences.len(),
            seq + 1
        );
    }
    let steps = args.steps.unwrap_or((sequences.len() / per_step).max(1) as u64);
    let mut lp = TrainLoop { sequences, steps, ..base };
    if args.resume {
        let dir = args.output_dir.as_ref().context("--resume needs --output-dir")?;
        let r = lemur_worker::checkpoint::resume(dir, &lp.adapter_config)?;
        eprintln!("resuming from {} (step {})", r.path.display(), r.state.step);
        lp.start_step = r.state.step;
        lp.prior_losses = r.state.losses;
        lp.resume = Some(r.tensors);
    }
    let log_path = args.loss_log.clone().or_else(|| args.output_dir.as_ref().map(|d| d.join("loss.jsonl")));
    if let Some(d) = &args.output_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let bar = indicatif::ProgressBar::new(lp.steps);
    bar.set_style(indicatif::ProgressStyle::with_template("[{elapsed_precise}] {bar:30} step {pos}/{len} {msg}")?);
    bar.set_position(lp.start_step);
    let log = log_path.map(|path| LossLog { path });
    lp.on_step = Some(StepSink(Arc::new(move |s: &StepLog| {
        bar.set_position(s.step);
        bar.set_message(format!(
            "loss {:.4}, lr {:.2e}, {:.0} tokens/s",
            s.loss,
            s.lr,
            s.tokens as f64 / s.seconds.max(1e-9)
        ));
        if let Some(Err(e)) = log.as_ref().map(|l| l.append(s)) {
            tracing::warn!(error = %e, "loss log");
        }
    })));
    Ok(lp)
}
