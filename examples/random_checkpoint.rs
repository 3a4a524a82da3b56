//! Writes a random checkpoint in Hugging Face layout (config.json + model.safetensors), to
//! try the runtime without downloading weights.
//!
//! `cargo run --release --example random_checkpoint -- tiny /tmp/lemur-tiny [seed] [f32|bf16]`
//! (presets: tiny, tiny-3layer, llama-1b-shaped, mistral-7b)

use anyhow::{bail, Context, Result};
use lemurian::protocol::ModelConfig;
use lemurian::worker::random_model::write_random_checkpoint_as;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(preset), Some(out)) = (args.first(), args.get(1)) else {
        bail!("usage: random_checkpoint PRESET OUT_DIR [SEED] [f32|bf16]");
    };
    let cfg = ModelConfig::preset(preset).with_context(|| format!("unknown preset `{preset}`"))?;
    let seed = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let dtype = lemurian::worker::weights::parse_dtype(args.get(3).map_or("f32", String::as_str))?;
    write_random_checkpoint_as(std::path::Path::new(out), &cfg, seed, dtype)?;
    println!("wrote {} ({} parameters) to {out}", cfg.name, cfg.param_count());
    Ok(())
}
