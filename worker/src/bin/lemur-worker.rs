//! `lemur-worker`: one rank of a Lemurian cluster (thin over `lemur_worker`).

/// candle allocates every op's output; mimalloc reuses freed memory instead of returning it
/// to the OS and faulting it back in, which made element-wise ops several times slower.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lemur_protocol::timings::Timings;
use lemur_protocol::wire::TrainSetup;
use lemur_protocol::Plan;
use lemur_worker::cluster::Cluster;
use lemur_worker::node::{run_node, Job, NodeConfig, Timeouts, TokenSink};
use lemur_worker::sampling::Sampling;
use lemur_worker::tokenizer::{Streamer, Tok};
use lemur_worker::weights::{gguf_file_of, parse_dtype};

/// Run one rank of a Lemurian cluster.
///
/// Ranks other than 0 listen on their address from the cluster file and wait for rank 0.
/// Rank 0 is the leader: it connects to every rank, sends the plan, and drives a request:
/// it prints the generated token ids on stdout, comma separated, and timings on stderr.
#[derive(Debug, Parser)]
#[command(name = "lemur-worker", version, about, long_about)]
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
    /// tokenizer.json) or a GGUF file, at the same path on every rank.
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
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Rank 0: stop at this token id (default: the tokenizer's end of sequence, with --prompt).
    #[arg(long)]
    eos: Option<u32>,
    /// Rank 0: sampling temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Rank 0: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0)]
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
    /// (JSON) here; the validation table goes to stderr.
    #[arg(long)]
    timings: Option<PathBuf>,
    /// Rank 0: run the request this many times; the times reported are medians over the
    /// warm runs (all but the first).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Rank 0, training plans: run --prompt-ids as one training sequence (forward and
    /// backward) and write the loss and every rank's LoRA gradients (JSON) here.
    #[arg(long)]
    grad_check: Option<PathBuf>,
    /// LoRA alpha (the adapters' scale is alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// Seed of the adapters' initialisation.
    #[arg(long, default_value_t = 0)]
    lora_seed: u64,
    /// Initialise B randomly instead of PEFT's zeros (for gradient checks).
    #[arg(long)]
    lora_random_b: bool,
    /// Seconds a rank waits for rank 0 before giving up.
    #[arg(long, default_value_t = 600)]
    wait: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        eprintln!("lemur-worker: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let cluster = Cluster::load(&args.cluster)?;
    cluster.get(args.rank)?;
    let device = lemur_worker::device::open(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let mut tok: Option<Arc<Tok>> = None;
    let job = if args.rank == 0 {
        let plan_path = args.plan.as_ref().context("rank 0 needs --plan")?;
        let text = std::fs::read_to_string(plan_path).with_context(|| format!("reading {}", plan_path.display()))?;
        let plan = Plan::from_json(&text).with_context(|| format!("{}", plan_path.display()))?;
        let plan_is_train = plan.workload.mode == "train";
        if plan_is_train && args.grad_check.is_none() {
            bail!("a training plan runs with --grad-check FILE (the training loop is not built yet)");
        }
        let model_dir = args.model.clone().context("rank 0 needs --model")?;
        let (prompt, eos, on_token) = match &args.prompt {
            Some(text) => {
                let t = Arc::new(load_tokenizer(&model_dir)?);
                let text = if args.chat { t.chat(text)? } else { text.clone() };
                let ids = t.encode(&text)?;
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
            None => bail!("rank 0 needs --prompt or --prompt-ids"),
        };
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
            train: plan_is_train.then_some(TrainSetup {
                alpha: args.lora_alpha,
                seed: args.lora_seed,
                zero_b: !args.lora_random_b,
            }),
        })
    } else {
        None
    };
    let timeouts = Timeouts { wait_for_leader: Duration::from_secs(args.wait), ..Timeouts::default() };
    let plan = job.as_ref().map(|j| j.plan.clone());
    let outcome = run_node(NodeConfig { rank: args.rank, cluster, device, job, timeouts })?;
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
        if o.handover_bytes > 0 {
            eprintln!("KV handover: {} bytes, complete {:.2} ms after prefill began", o.handover_bytes, o.handover_ms);
        }
        if let (Some(path), Some(plan)) = (&args.timings, &plan) {
            let t = Timings::new(plan, &o.op_ms, o.ttft.as_secs_f64() * 1e3, o.tpot.map(|d| d.as_secs_f64() * 1e3));
            eprint!("{}", t.table());
            std::fs::write(path, serde_json::to_string_pretty(&t)?)
                .with_context(|| format!("writing {}", path.display()))?;
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

/// The tokenizer of a checkpoint: its GGUF metadata, or `tokenizer.json` in its directory.
fn load_tokenizer(model: &Path) -> Result<Tok> {
    if let Some(file) = gguf_file_of(model) {
        let mut f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        let header = lemur_protocol::gguf::GgufHeader::read(&mut f).with_context(|| format!("{}", file.display()))?;
        return Ok(Tok::from_gguf(&header, &file)?);
    }
    Ok(Tok::from_dir(model)?)
}
