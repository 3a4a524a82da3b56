//! `lemur-plan`: plan a model's work across measured machines (thin over `lemur_planner`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lemur_planner::{costs_report::costs_report, load_model, Finetune, LoraSpec, ProfileSet, Roofline};
use lemur_protocol::{DType, MachineProfile};

/// Plan LLM work across a small cluster of unlike machines.
#[derive(Debug, Parser)]
#[command(name = "lemur-plan", version, about)]
struct Args {
    /// Directory of machine profiles (`*.toml`) and `links.toml`.
    #[arg(long, default_value = "profiles")]
    profiles: PathBuf,
    /// A preset (mistral-7b, tiny, llama-1b-shaped), a Hugging Face directory or a config.json.
    #[arg(long, default_value = "mistral-7b")]
    model: String,
    /// Machines of the cluster, by profile name; repeat a name for several of one kind
    /// (`m4-pro,m5-pro,m5-pro`). Default: one of each profile.
    #[arg(long, value_delimiter = ',')]
    machines: Vec<String>,
    /// Print the predicted forward and backward time of one decoder layer on each machine.
    #[arg(long)]
    costs: bool,
    /// Sequence length (training and --costs) or prompt length (inference).
    #[arg(long, default_value_t = 512)]
    seq: u64,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Price the backward pass of LoRA fine-tuning instead of full fine-tuning.
    #[arg(long)]
    lora: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    lora_rank: u64,
    /// Precision of weights and activations: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Writes to stdout; a closed pipe (`| head`) ends the program quietly.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let set = ProfileSet::load(&args.profiles)?;
    let model = load_model(&args.model)?;
    let Some(dtype) = DType::parse(&args.dtype) else {
        bail!("--dtype must be f16, bf16 or f32, not `{}`", args.dtype)
    };
    let machines: Vec<&MachineProfile> = if args.machines.is_empty() {
        set.machines.iter().map(|(m, _)| m).collect()
    } else {
        args.machines.iter().map(|n| set.machine(n)).collect::<Result<_, _>>()?
    };
    if args.costs {
        let finetune = if args.lora {
            Finetune::Lora(LoraSpec { rank: args.lora_rank, ..LoraSpec::default() })
        } else {
            Finetune::Full
        };
        let report = costs_report(&Roofline, &model, &machines, dtype, args.seq, args.batch, finetune)
            .context("pricing the model")?;
        let text = if args.json { serde_json::to_string_pretty(&report)? + "\n" } else { report.to_table() };
        return emit(&text);
    }
    bail!("planning arrives with the ILP planner; use --costs for the cost table")
}
