//! `lemur-plan`: plan a model's work across measured machines (thin over `lemur_planner`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use lemur_planner::costs_report::costs_report;
use lemur_planner::ilp::IlpOptions;
use lemur_planner::{load_model, plan, Finetune, LoraSpec, Mode, Objective, PlanRequest, ProfileSet, Roofline};
use lemur_protocol::cli::parse;
use lemur_protocol::{DType, MachineProfile, OpKind, WeightFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// Generation: prefill a prompt, then decode tokens.
    Infer,
    /// Fine-tuning: forward and backward over sequences.
    Train,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ObjectiveArg {
    /// One request (TTFT + gen-tokens x time per token) or one training micro-batch, in order.
    Latency,
    /// Pipelined work: minimise the busiest machine or link.
    Throughput,
}

/// Plan LLM work across a small cluster of unlike machines.
///
/// Measures nothing itself: reads machine profiles (`profiles/*.toml`) and links
/// (`profiles/links.toml`), builds the model's op graph, prices every op on every machine,
/// and solves an ILP (HiGHS) for the placement of every op. Prints the plan with its
/// predicted times, the baselines it beats, and the proven bound and gap.
#[derive(Debug, Parser)]
#[command(name = "lemur-plan", version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// Directory of machine profiles (`*.toml`) and `links.toml`.
    #[arg(long, default_value = "profiles")]
    profiles: PathBuf,
    /// A preset (mistral-7b, tiny, tiny-3layer, llama-1b-shaped), a Hugging Face directory or a config.json.
    #[arg(long, default_value = "mistral-7b")]
    model: String,
    /// Machines of the cluster, by profile name; repeat a name for several of one kind
    /// (`m4-pro,m5-pro,m5-pro`). Default: one of each profile.
    #[arg(long, value_delimiter = ',')]
    machines: Vec<String>,
    /// What to plan.
    #[arg(long, value_enum, default_value = "infer")]
    mode: ModeArg,
    /// What to minimise. Default: latency for inference, throughput for training.
    #[arg(long, value_enum)]
    objective: Option<ObjectiveArg>,
    /// Prompt length (infer) or sequence length (train and --costs). Default: 2048 for infer, 512 for train.
    #[arg(long, value_parser = parse::at_least_one::<u64>)]
    seq: Option<u64>,
    /// Sequences per batch (per micro-batch when training).
    #[arg(long, default_value_t = 1, value_parser = parse::at_least_one::<u64>)]
    batch: u64,
    /// Tokens generated per request (infer).
    #[arg(long, default_value_t = 256)]
    gen_tokens: u64,
    /// Micro-batches per optimizer step (train).
    #[arg(long, default_value_t = 8, value_parser = parse::at_least_one::<u64>)]
    micro_batches: u64,
    /// Train LoRA adapters instead of every weight (also prices --costs' backward as LoRA).
    #[arg(long)]
    lora: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16, value_parser = parse::at_least_one::<u64>)]
    lora_rank: u64,
    /// Projections that carry LoRA adapters.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_targets: Vec<String>,
    /// Precision of activations (and of dense weights): f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// How the weights are stored: dense (in --dtype), q8_0, q4_0, q4_1, q5_0, q5_1, q2_k,
    /// q3_k, q4_k, q5_k, q6_k, q4_k_m or q5_k_m, each tensor as llama.cpp's llama-quantize
    /// lays it out (what a GGUF holds and what the workers' `--quantize` makes); `--quantize`
    /// is the same flag. Default: a GGUF model's own format, else dense.
    #[arg(long, visible_alias = "quantize")]
    weights: Option<String>,
    /// Seconds the solver may take in all.
    #[arg(long, default_value_t = 60.0, value_parser = parse::positive)]
    time_limit: f64,
    /// Stop when the solver's relative gap is below this.
    #[arg(long, default_value_t = 1e-3, value_parser = parse::fraction)]
    gap: f64,
    /// Write the plan (JSON) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Plan a serving plan set: one placement per decode batch size and per prefill
    /// length (--decode-buckets, --prefill-buckets), printed as one table; --out writes it.
    #[arg(long, conflicts_with_all = ["costs", "svg", "lora"])]
    serve: bool,
    /// With --serve: decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64", value_parser = parse::at_least_one::<u64>)]
    decode_buckets: Vec<u64>,
    /// With --serve: prefill prompt lengths.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048", value_parser = parse::at_least_one::<u64>)]
    prefill_buckets: Vec<u64>,
    /// With --serve: positions per request (prompt plus generated) decode buckets plan for.
    #[arg(long, default_value_t = 2048, value_parser = parse::at_least_one::<u64>)]
    context: u64,
    /// Print the plan as JSON on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Write a per-machine timeline of the predicted schedule (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print the predicted forward and backward time of one decoder layer on each machine instead of planning.
    #[arg(long)]
    costs: bool,
    /// On failure, also print the error's backtrace (as LEMUR_BACKTRACE=1 does).
    #[arg(short, long)]
    verbose: bool,
}

/// Writes to stdout; a closed pipe (`| head`) ends the program quietly.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    lemur_protocol::cli::main(args.verbose, || run(args))
}

fn run(args: Args) -> Result<()> {
    let set = ProfileSet::load(&args.profiles)?;
    let model = load_model(&args.model).context("--model")?;
    let Some(dtype) = DType::parse(&args.dtype) else {
        bail!("--dtype must be f16, bf16 or f32, not `{}`", args.dtype)
    };
    let weights = match &args.weights {
        Some(w) => WeightFormat::parse(w).with_context(|| {
            let all: Vec<&str> = WeightFormat::ALL.iter().map(|f| f.name()).collect();
            format!("--weights: `{w}` is not a weight format ({})", all.join(", "))
        })?,
        None => lemur_planner::model_source::weights_of(&args.model).unwrap_or_default(),
    };
    let machines: Vec<&MachineProfile> = if args.machines.is_empty() {
        set.machines.iter().map(|(m, _)| m).collect()
    } else {
        args.machines.iter().map(|n| set.machine(n)).collect::<Result<_, _>>()?
    };
    set.check_links(&machines.iter().map(|m| m.name.as_str()).collect::<Vec<_>>())?;
    let mut targets = Vec::new();
    for t in &args.lora_targets {
        match OpKind::parse(t) {
            Some(k) if k.is_linear() => targets.push(k),
            _ => bail!("--lora-targets: `{t}` is not a projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head)"),
        }
    }
    let finetune = if args.lora { Finetune::Lora(LoraSpec { rank: args.lora_rank, targets }) } else { Finetune::Full };
    if args.costs {
        let seq = args.seq.unwrap_or(512);
        let report = costs_report(&Roofline, &model, &machines, dtype, seq, args.batch, finetune)
            .context("pricing the model")?;
        let text = if args.json { serde_json::to_string_pretty(&report)? + "\n" } else { report.to_table() };
        return emit(&text);
    }
    let (mode, default_objective) = match args.mode {
        ModeArg::Infer => (
            Mode::Infer { prompt: args.seq.unwrap_or(2048), gen_tokens: args.gen_tokens, batch: args.batch },
            Objective::Latency,
        ),
        ModeArg::Train => (
            Mode::Train {
                seq: args.seq.unwrap_or(512),
                batch: args.batch,
                finetune,
                micro_batches: args.micro_batches,
            },
            Objective::Throughput,
        ),
    };
    let objective = match args.objective {
        Some(ObjectiveArg::Latency) => Objective::Latency,
        Some(ObjectiveArg::Throughput) => Objective::Throughput,
        None => default_objective,
    };
    let mut req = PlanRequest::new(model, machines.into_iter().cloned().collect(), set.links.clone());
    req.dtype = dtype;
    req.weights = weights;
    req.mode = mode;
    req.objective = objective;
    req.ilp = IlpOptions { time_limit_s: args.time_limit, rel_gap: args.gap, structured: true };
    req.heuristic_budget = Duration::from_secs_f64((args.time_limit * 0.1).min(2.0));

    if args.serve {
        if args.mode != ModeArg::Infer {
            bail!("--serve plans inference; it cannot be used with --mode train");
        }
        let buckets = lemur_planner::serving::Buckets {
            decode: args.decode_buckets.clone(),
            prefill: args.prefill_buckets.clone(),
            context: args.context,
        };
        let n = buckets.decode.len() + buckets.prefill.len();
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        spinner.set_message(format!("solving {n} placements (up to {:.0} s each)", args.time_limit));
        spinner.enable_steady_tick(Duration::from_millis(120));
        let set = lemur_planner::serving::plan_set(&Roofline, &req, &buckets);
        spinner.finish_and_clear();
        let set = set?;
        if let Some(path) = &args.out {
            let json = serde_json::to_string_pretty(&set.to_file())?;
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        }
        return emit(&set.table());
    }
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    spinner.set_message(format!("solving the placement (up to {:.0} s)", args.time_limit));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let planned = plan(&Roofline, &req);
    spinner.finish_and_clear();
    let planned = planned?;

    if let Some(path) = &args.out {
        let json = serde_json::to_string_pretty(&planned.plan)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let svg = lemur_planner::timeline::svg(&planned);
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        emit(&(serde_json::to_string_pretty(&planned.plan)? + "\n"))
    } else {
        emit(&lemur_planner::report::summary(&planned))
    }
}
