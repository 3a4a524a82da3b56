//! `lemur-serve`: rank 0 of a cluster behind an OpenAI-compatible HTTP API (thin over
//! `lemur_serve`).

/// candle allocates every op's output; mimalloc reuses freed memory (see lemur-worker).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lemur_protocol::auth::ClusterKey;
use lemur_protocol::cli::parse;
use lemur_protocol::plan::PlanSet;
use lemur_protocol::wire::DenseMatmul;
use lemur_protocol::{Plan, WeightFormat, WorkloadMode};
use lemur_worker::batch::BatchConfig;
use lemur_worker::cluster::Cluster;
use lemur_worker::runtime::{Job, NodeConfig, Replan};
use lemur_worker::tokenizer::Tok;
use lemur_worker::weights::{parse_dtype, parse_quantize, Checkpoint};

/// Serve a model from a Lemurian cluster over OpenAI's HTTP API.
///
/// This process is rank 0: it plans (or reads the plan), connects the other ranks
/// (started as `lemur-worker --rank N --cluster CLUSTER`), loads the weights once and
/// answers requests, batching them continuously, until SIGINT or SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "lemur-serve", version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// The cluster file: each rank's address and machine.
    #[arg(long)]
    cluster: PathBuf,
    /// The checkpoint: a Hugging Face directory or a GGUF file (only rank 0 needs it: the
    /// other ranks get their weights from it).
    #[arg(long)]
    model: PathBuf,
    /// The plan (from `lemur-plan --out`).
    #[arg(long, conflicts_with_all = ["profiles", "plan_set"], required_unless_present_any = ["profiles", "plan_set"])]
    plan: Option<PathBuf>,
    /// A plan set (from `lemur-plan --serve --out`): each step runs in the placement of
    /// its load's bucket, the batch moving (with its KV caches) when the planner's prices
    /// say it pays. Every rank holds the weights of its ops in every placement.
    #[arg(long, conflicts_with = "profiles")]
    plan_set: Option<PathBuf>,
    /// Plan here from the machine profiles in this folder (the cluster's machines).
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// Where to listen for HTTP.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// The cluster key the workers were started with (`lemur-worker keygen`). Without
    /// one, every address in the cluster file must be a loopback address.
    #[arg(long, env = "LEMUR_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// When a rank is lost, fail its requests and answer 503 until restarted, instead of
    /// planning again over the ranks left (replaying its requests) and bringing the rank
    /// back when it returns.
    #[arg(long)]
    no_failover: bool,
    /// Seconds the planner may take for a new placement after a rank is lost or back.
    #[arg(long, default_value_t = 10, value_parser = parse::at_least_one::<u64>)]
    replan_seconds: u64,
    /// Lemurian's cache folder (the checkpoint's hash is remembered under checkpoints/).
    #[arg(long, env = "LEMUR_CACHE")]
    cache_dir: Option<PathBuf>,
    /// The model's id in requests and /v1/models (default: the checkpoint's file or folder name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// cpu, cuda (cuda:N) or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the run: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The most requests running at once.
    #[arg(long, default_value_t = 16, value_parser = parse::at_least_one::<usize>)]
    max_batch: usize,
    /// Prompts run in chunks of at most this many tokens, between decode steps.
    #[arg(long, default_value_t = 512, value_parser = parse::at_least_one::<usize>)]
    prefill_chunk: usize,
    /// The most prompt tokens in one prefill step (whole chunks; at least one runs): lower
    /// it to bound how long a burst of prompts holds the running streams.
    #[arg(long, value_parser = parse::at_least_one::<usize>)]
    prefill_tokens: Option<usize>,
    /// Steps in flight at once over disjoint requests (2 or more keeps a pipeline of ranks
    /// busy: each works on one step while the others work on theirs).
    #[arg(long, default_value_t = 1, value_parser = parse::at_least_one::<usize>)]
    pipeline: usize,
    /// Requests waiting beyond the running ones; more are answered 429.
    #[arg(long, default_value_t = 256, value_parser = parse::at_least_one::<usize>)]
    max_queue: usize,
    /// KV positions for all requests together (default: what the plan's memory leaves).
    #[arg(long, value_parser = parse::at_least_one::<usize>)]
    kv_positions: Option<usize>,
    /// max_tokens of a completion request that gives none (OpenAI's default is 16).
    #[arg(long, default_value_t = 16, value_parser = parse::at_least_one::<u64>)]
    default_max_tokens: u64,
    /// max_tokens of a chat request that gives none.
    #[arg(long, default_value_t = 512, value_parser = parse::at_least_one::<u64>)]
    default_chat_max_tokens: u64,
    /// Seconds running requests may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30, value_parser = parse::at_least_one::<u64>)]
    grace: u64,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 2, value_parser = parse::at_least_one::<usize>)]
    http_workers: usize,
    /// Planning with --profiles: the prompt and generated lengths to plan for.
    #[arg(long, default_value_t = 512, value_parser = parse::at_least_one::<u64>)]
    plan_prompt: u64,
    #[arg(long, default_value_t = 256, value_parser = parse::at_least_one::<u64>)]
    plan_gen: u64,
    /// Planning with --profiles: plan a plan set with these decode batch sizes (as
    /// `lemur-plan --serve` does; decode buckets plan for --plan-prompt + --plan-gen
    /// positions) instead of one placement, and serve it as --plan-set does.
    #[arg(long, value_delimiter = ',', value_parser = parse::at_least_one::<u64>)]
    decode_buckets: Option<Vec<u64>>,
    /// With --decode-buckets: the prefill buckets' prompt lengths (default 128,512).
    #[arg(long, value_delimiter = ',', value_parser = parse::at_least_one::<u64>)]
    prefill_buckets: Option<Vec<u64>>,
    /// Dequantize a GGUF's quantized weights at load instead of running them as stored.
    #[arg(long, conflicts_with = "quantize")]
    dequantize: bool,
    /// When linear ops on quantized weights multiply by their dequantized weight (one f32
    /// GEMM over all a step's rows) instead of the quantized kernels: never, prefill or
    /// always. Dequantizing costs every step a pass over the weights (single-threaded in
    /// candle); on the CPU it is slower than the quantized kernels (docs/serving.md).
    #[arg(long, default_value = "never", value_parser = DenseMatmul::parse)]
    dense_matmul: DenseMatmul,
    /// Quantize a checkpoint's dense weights at load (q8_0, q4_k, q4_k_m, ...; each tensor as
    /// llama.cpp's llama-quantize would); a --plan must be for it.
    #[arg(long, value_parser = parse_quantize)]
    quantize: Option<WeightFormat>,
    /// On failure, also print the error's backtrace.
    #[arg(short, long)]
    verbose: bool,
}

fn main() -> ExitCode {
    lemur_worker::alloc::keep_freed_memory();
    let args = Args::parse();
    lemur_protocol::cli::main(args.verbose, || run(args))
}

fn run(args: Args) -> Result<()> {
    // clap's `requires` lets these through beside a conflicting --plan; say so before
    // anything loads.
    if args.decode_buckets.is_some() && args.profiles.is_none() {
        bail!("--decode-buckets plans a plan set here: it needs --profiles DIR");
    }
    if args.prefill_buckets.is_some() && args.decode_buckets.is_none() {
        bail!("--prefill-buckets needs --decode-buckets (it is a plan set's other half)");
    }
    let cluster = Cluster::load(&args.cluster)?;
    let key = args.key_file.as_deref().map(ClusterKey::load).transpose().context("--key-file")?;
    // Before loading anything: a keyless cluster must not be reachable from a network.
    cluster.check_exposure(key.is_some())?;
    let device = lemur_worker::device::open(&args.device).context("--device")?;
    let dtype = parse_dtype(&args.dtype).context("--dtype")?;
    let quantize = args.quantize;
    let mut checkpoint = Checkpoint::open(&args.model).context("--model")?;
    (checkpoint.dequantize, checkpoint.quantize) = (args.dequantize, quantize);
    let set = match (&args.plan_set, &args.profiles, &args.decode_buckets) {
        (None, Some(dir), Some(decode)) => Some(plan_set_here(&args, dir, decode, &cluster, &checkpoint)?),
        (Some(path), _, _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let set = PlanSet::from_json(&text).with_context(|| format!("--plan-set {}", path.display()))?;
            for p in set.placements() {
                checkpoint.check_plan_model(&p.model).with_context(|| format!("--plan-set {}", path.display()))?;
            }
            Some(set)
        }
        _ => None,
    };
    let plan = match (&args.plan, &args.profiles, &set) {
        (_, _, Some(set)) => set.placements()[0].clone(),
        (Some(path), _, _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let plan = Plan::from_json(&text).with_context(|| format!("{}", path.display()))?;
            if plan.workload.mode != WorkloadMode::Infer {
                bail!("--plan {}: a {} plan; serving needs an inference plan", path.display(), plan.workload.mode);
            }
            checkpoint.check_plan_model(&plan.model).with_context(|| format!("--plan {}", path.display()))?;
            plan
        }
        (None, Some(dir), _) => plan_here(&args, dir, &cluster, &checkpoint)?,
        (None, None, _) => bail!("give --plan PLAN, --plan-set SET or --profiles DIR"),
    };
    let tok = Arc::new(Tok::from_checkpoint(&args.model).context("--model: the server needs the tokenizer")?);
    let listener = TcpListener::bind(&args.http).with_context(|| format!("--http {}", args.http))?;
    let model = args.served_model_name.clone().unwrap_or_else(|| {
        let stem = args.model.file_stem().or(args.model.file_name());
        stem.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let batch = BatchConfig {
        max_batch: args.max_batch,
        prefill_chunk: args.prefill_chunk,
        prefill_tokens: args.prefill_tokens.unwrap_or(args.prefill_chunk),
        max_queue: args.max_queue,
        pipeline: args.pipeline,
        kv_positions: args.kv_positions,
        ..BatchConfig::default()
    };
    let predicted = (plan.predicted.ttft_ms.map(|t| t / 1e3), plan.predicted.tpot_ms.map(|t| t / 1e3));
    let vocab = plan.model.vocab_size as usize;
    let job = Job {
        dequantize: args.dequantize,
        quantize,
        serve: Some(batch),
        dense_matmul: args.dense_matmul,
        replan: (!args.no_failover).then(|| replanner(Duration::from_secs(args.replan_seconds))),
        ..match set {
            Some(set) => Job::with_plan_set(set, args.model.clone(), dtype),
            None => Job::new(plan, args.model.clone(), dtype),
        }
    };
    let front = lemur_serve::Front {
        listener,
        tok,
        model,
        vocab,
        default_max_tokens: (args.default_max_tokens, args.default_chat_max_tokens),
        predicted,
        machines: cluster.ranks.iter().map(|r| r.machine.clone()).collect(),
        grace: Duration::from_secs(args.grace),
        http_workers: args.http_workers,
    };
    let mut cfg = NodeConfig::new(0, cluster, device, Some(job));
    cfg.key = key;
    if let Some(dir) = &args.cache_dir {
        cfg.cache_dir = dir.clone();
    }
    lemur_serve::serve(cfg, front)?;
    eprintln!("lemur-serve: stopped");
    Ok(())
}

/// Plans a plan set over the cluster's machines for this checkpoint.
fn plan_set_here(
    args: &Args,
    dir: &std::path::Path,
    decode: &[u64],
    cluster: &Cluster,
    ck: &Checkpoint,
) -> Result<PlanSet> {
    let planner = planner_here(args, dir, cluster, ck)?;
    let buckets = lemur_planner::serving::Buckets {
        decode: decode.to_vec(),
        prefill: args.prefill_buckets.clone().unwrap_or_else(|| vec![128, 512]),
        context: args.plan_prompt + args.plan_gen,
    };
    let set = lemur_planner::serving::plan_set(&lemur_planner::Roofline, planner.request(), &buckets)
        .context("planning the plan set")?;
    eprint!("{}", set.table());
    Ok(set.to_file())
}

/// A planner over the cluster's machines for this checkpoint (batch 1 at the given lengths).
fn planner_here(
    args: &Args,
    dir: &std::path::Path,
    cluster: &Cluster,
    ck: &Checkpoint,
) -> Result<lemur_planner::Planner> {
    let dtype = lemur_protocol::DType::parse(&args.dtype).with_context(|| format!("--dtype {}", args.dtype))?;
    let machines: Vec<&str> = cluster.ranks.iter().map(|r| r.machine.as_str()).collect();
    let planner = lemur_planner::Planner::from_profiles(dir)
        .with_context(|| format!("--profiles {}", dir.display()))?
        .machines(&machines)
        .with_context(|| format!("--cluster {}", args.cluster.display()))?
        .model(ck.config.clone())
        .dtype(dtype)
        .infer(args.plan_prompt, args.plan_gen, 1);
    Ok(planner.weights(ck.weight_format()))
}

/// Plans the cluster's machines for this checkpoint (batch 1 at the given lengths).
fn plan_here(args: &Args, dir: &std::path::Path, cluster: &Cluster, ck: &Checkpoint) -> Result<Plan> {
    let planned = planner_here(args, dir, cluster, ck)?.plan().context("planning")?;
    eprint!("{}", lemur_planner::report::summary(&planned));
    Ok(planned.plan)
}

/// A new placement over the machines left, from the profiles the plan records.
fn replanner(limit: Duration) -> Replan {
    Replan(Arc::new(move |plan, machines| {
        let names: Vec<&str> = machines.iter().map(String::as_str).collect();
        lemur_planner::replan(plan, &names, limit).map_err(|e| e.to_string())
    }))
}
