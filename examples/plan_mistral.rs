//! Plans Mistral-7B on the shipped profiles through the programmatic API and prints the
//! same summary as `lemur-plan`: inference (prompt 2048, 256 generated), then LoRA training.
//!
//! `cargo run --release --example plan_mistral`

use std::time::Duration;

use anyhow::Result;
use lemurian::planner::report::summary;
use lemurian::{Finetune, LoraSpec, Planner};

fn main() -> Result<()> {
    let profiles = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles");
    let planner =
        Planner::from_profiles(profiles)?.machines(&["m4-pro", "m5-pro"])?.solver(Duration::from_secs(30), 1e-3);

    let inference = planner.clone().infer(2048, 256, 1).plan()?;
    print!("{}", summary(&inference));
    println!();

    let training = planner.train(512, 1, Finetune::Lora(LoraSpec::default()), 8).plan()?;
    print!("{}", summary(&training));

    // The plan is plain data: what workers execute and what `--out plan.json` writes.
    let ops_on_m5 = training.plan.ops_on("m5-pro").count();
    println!("\n{} of {} training ops run on the m5-pro", ops_on_m5, training.plan.ops.len());
    Ok(())
}
