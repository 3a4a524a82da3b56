//! `lemur-worker`: one rank of a Lemurian cluster (thin over `lemur_worker`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lemur_protocol::Plan;
use lemur_worker::cluster::Cluster;
use lemur_worker::node::{run_node, Job, NodeConfig, Timeouts};
use lemur_worker::weights::parse_dtype;

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
    /// Rank 0: the Hugging Face model directory (config.json and *.safetensors), at the same path on every rank.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rank 0: the prompt as token ids, comma separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// Rank 0: how many tokens to generate (greedy).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Rank 0: stop at this token id.
    #[arg(long)]
    eos: Option<u32>,
    /// Precision of the run: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Rank 0: also write every step's logits (JSON) here.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
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
    let job = if args.rank == 0 {
        let plan_path = args.plan.as_ref().context("rank 0 needs --plan")?;
        let text = std::fs::read_to_string(plan_path).with_context(|| format!("reading {}", plan_path.display()))?;
        let plan = Plan::from_json(&text).with_context(|| format!("{}", plan_path.display()))?;
        let model_dir = args.model.clone().context("rank 0 needs --model")?;
        if args.prompt_ids.is_empty() {
            bail!("rank 0 needs --prompt-ids");
        }
        Some(Job {
            plan,
            model_dir,
            dtype,
            prompt: args.prompt_ids.clone(),
            max_new_tokens: args.max_new_tokens,
            eos: args.eos,
        })
    } else {
        None
    };
    let timeouts = Timeouts { wait_for_leader: Duration::from_secs(args.wait), ..Timeouts::default() };
    let outcome = run_node(NodeConfig { rank: args.rank, cluster, device, job, timeouts })?;
    if let Some(o) = outcome {
        let ids: Vec<String> = o.tokens.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
        eprintln!("time to first token: {:.2} ms", o.ttft.as_secs_f64() * 1e3);
        if let Some(t) = o.tpot {
            eprintln!("time per token: {:.2} ms ({:.1} tokens/s)", t.as_secs_f64() * 1e3, 1.0 / t.as_secs_f64());
        }
        for (r, b) in o.bytes_sent.iter().enumerate() {
            eprintln!("rank {r} sent {b} bytes of activations");
        }
        if let Some(path) = &args.dump_logits {
            std::fs::write(path, serde_json::to_string(&o.logits)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
