//! Solver benchmark: time and proven gap for the Mistral-7B training graph (throughput
//! objective) on 2, 4 and 8 machines, Lemurian's structured solve against the plain
//! formulation in the same run, under the same time limits.
//!
//! `cargo bench -p lemur-planner --bench solve` (about four minutes); `-- --quick` runs the
//! 2-machine case only.

use std::path::Path;
use std::time::{Duration, Instant};

use lemur_planner::evaluate::Assignment;
use lemur_planner::ilp::{solve, IlpOptions};
use lemur_planner::problem::Instance;
use lemur_planner::{plan, Finetune, LoraSpec, Mode, Objective, PlanRequest, ProfileSet, Roofline};
use lemur_protocol::{DType, ModelConfig};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let set = ProfileSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).expect("profiles");
    let cases: &[(&[&str], f64, f64)] = &[
        (&["m4-pro", "m5-pro"], 2.0, 1e-3),
        (&["m4-pro", "m4-pro", "m5-pro", "m5-pro"], 30.0, 1e-2),
        (&["m4-pro", "m4-pro", "m4-pro", "m4-pro", "m5-pro", "m5-pro", "m5-pro", "m5-pro"], 60.0, 2e-2),
    ];
    let mode = Mode::Train { seq: 512, batch: 1, finetune: Finetune::Lora(LoraSpec::default()), micro_batches: 8 };
    println!("Mistral-7B LoRA training graph (seq 512, 899 ops), throughput objective, HiGHS, 1 thread");
    println!(
        "{:<9} {:>7} {:>7} | {:>10} {:>9} {:>12} | {:>10} {:>9} {:>12} | {:>8}",
        "machines",
        "limit",
        "target",
        "lemurian s",
        "gap",
        "objective ms",
        "plain s",
        "gap",
        "objective ms",
        "obj ratio"
    );
    for (names, limit, target) in cases.iter().take(if quick { 1 } else { cases.len() }) {
        let machines: Vec<_> = names.iter().map(|n| set.machine(n).expect("profile").clone()).collect();
        let mut req = PlanRequest::new(ModelConfig::mistral_7b(), machines.clone(), set.links.clone());
        req.mode = mode.clone();
        req.objective = Objective::Throughput;
        req.ilp = IlpOptions { time_limit_s: *limit, rel_gap: *target, structured: true };
        req.heuristic_budget = Duration::from_secs_f64((limit * 0.1).min(2.0));
        let t0 = Instant::now();
        let p = plan(&Roofline, &req).expect("plan");
        let ours_s = t0.elapsed().as_secs_f64();

        let inst = Instance::new(
            &Roofline,
            &req.model,
            DType::F16,
            mode.clone(),
            Objective::Throughput,
            &machines,
            &set.links,
        )
        .expect("instance");
        let t0 = Instant::now();
        let plain = solve(
            &inst,
            &Assignment::single(&inst, 0),
            IlpOptions { time_limit_s: *limit, rel_gap: *target, structured: false },
        )
        .expect("plain solve");
        let plain_s = t0.elapsed().as_secs_f64();
        let plain_obj =
            plain.assignment.as_ref().map(|a| lemur_planner::evaluate::evaluate(&inst, a).objective_s * 1e3);
        let fmt_gap = |g: f64| if g.is_finite() { format!("{:.3}%", g * 100.0) } else { "none".into() };
        println!(
            "{:<9} {:>6.0}s {:>6.1}% | {:>10.2} {:>9} {:>12.2} | {:>10.2} {:>9} {:>12} | {:>8}",
            names.len(),
            limit,
            target * 100.0,
            ours_s,
            fmt_gap(p.plan.gap),
            p.plan.objective_ms,
            plain_s,
            fmt_gap(plain.gap),
            plain_obj.map_or("none".into(), |o| format!("{o:.2}")),
            plain_obj.map_or("-".into(), |o| format!("{:.2}x", o / p.plan.objective_ms)),
        );
    }
}
