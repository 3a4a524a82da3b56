//! The human-readable plan summary that `lemur-plan` and `examples/plan_mistral.rs` print.

use std::collections::BTreeMap;
use std::fmt::Write;

use lemur_protocol::{OpKind, Phase, WeightFormat, WorkloadMode};

use crate::planning::Planned;

/// One-letter codes for the ops of a decoder layer, in order.
const LAYER_CODES: &str = "n q k v r A o + n g u s d +";

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

/// Bytes in the largest unit that keeps them readable.
fn bytes(b: u64) -> String {
    match b {
        0 => "0 B".into(),
        b if b < 10_000 => format!("{b} B"),
        b if b < 10_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        b if b < 10_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b => format!("{:.2} GB", b as f64 / 1e9),
    }
}

/// How the weights are stored: each block format's share of the bytes (`parts`, the
/// weights' breakdown).
fn weights_line(plan: &lemur_protocol::Plan, parts: &BTreeMap<WeightFormat, u64>) -> String {
    let total: u64 = parts.values().sum();
    let shares: Vec<String> = parts
        .iter()
        .map(|(f, b)| {
            let name = if *f == WeightFormat::Dense { plan.dtype.to_string() } else { f.to_string() };
            format!("{name} {} ({:.0}%)", bytes(*b), *b as f64 / total.max(1) as f64 * 100.0)
        })
        .collect();
    format!(
        "Weights: {} as llama-quantize lays it out, {}: {}; memory and weight traffic at each tensor's bits",
        plan.workload.weights,
        bytes(total),
        shares.join(", ")
    )
}

/// Which rates priced the quantized GEMMs on each machine: measured, estimated, or none
/// (the dense rates of the run's dtype).
fn quantized_rates_line(plan: &lemur_protocol::Plan, parts: &BTreeMap<WeightFormat, u64>) -> String {
    let formats: Vec<WeightFormat> = parts.keys().copied().filter(|f| f.is_block()).collect();
    let per_machine: Vec<String> = plan
        .machines
        .iter()
        .map(|m| {
            let (mut measured, mut estimated, mut missing) = (vec![], vec![], vec![]);
            for f in &formats {
                match m.profile.quantized.get(f) {
                    Some(q) if q.estimate => estimated.push(f.name()),
                    Some(_) => measured.push(f.name()),
                    None => missing.push(f.name()),
                }
            }
            let mut words = vec![];
            if !measured.is_empty() {
                words.push(format!("{} measured", measured.join("/")));
            }
            if !estimated.is_empty() {
                words.push(format!("{} ESTIMATES (see its profile's `source`)", estimated.join("/")));
            }
            if !missing.is_empty() {
                words.push(format!("{} not in its profile, priced at its {} rates", missing.join("/"), plan.dtype));
            }
            format!("{} {}", m.name, words.join(", "))
        })
        .collect();
    format!("Quantized GEMM rates: {}", per_machine.join("; "))
}

/// The summary: machines, placement per layer, per-machine use, predictions, baselines, proof.
pub fn summary(p: &Planned) -> String {
    let plan = &p.plan;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Plan for {} ({}, {}), {} of {}{}",
        plan.model.name,
        match plan.workload.weights {
            WeightFormat::Dense => plan.dtype.to_string(),
            w => format!("{w} weights, {} activations", plan.dtype),
        },
        plan.workload.mode,
        match plan.workload.mode {
            WorkloadMode::Infer => format!("prompt {} + {} generated", plan.workload.seq, plan.workload.gen_tokens),
            WorkloadMode::Train => format!("seq {}", plan.workload.seq),
        },
        match &plan.workload.finetune {
            Some(f) => format!("{f} fine-tuning, batch {}", plan.workload.batch),
            None => format!("batch {}", plan.workload.batch),
        },
        if plan.workload.mode == WorkloadMode::Train {
            format!(", {} micro-batches", plan.workload.micro_batches)
        } else {
            String::new()
        },
    );
    let _ = writeln!(s, "Objective: {}", objective_words(plan.objective.as_str(), plan.workload.mode.as_str()));
    if plan.workload.weights.is_quantized() {
        let parts = plan.workload.weights.breakdown(&plan.model, plan.dtype);
        let _ = writeln!(s, "{}", weights_line(plan, &parts));
        let _ = writeln!(s, "{}", quantized_rates_line(plan, &parts));
    }
    if let (Some(w), WorkloadMode::Train) = (plan.workload.inflight, plan.workload.mode) {
        let m = plan.workload.micro_batches;
        let _ = if w >= m {
            writeln!(s, "Schedule: GPipe, all {m} micro-batches in flight (every machine holds their activations)")
        } else {
            writeln!(s, "Schedule: 1F1B, {w} of {m} micro-batches in flight (GPipe's activations would not fit)")
        };
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Machines:");
    let letter = |i: usize| (b'A' + i as u8) as char;
    for (i, m) in plan.machines.iter().enumerate() {
        let pr = &m.profile;
        let _ = writeln!(
            s,
            "  {} {:<10} GEMM peak {:>5.2} TFLOP/s, read {:>5.0} GB/s, {:.1} GB usable",
            letter(i),
            m.name,
            pr.gemm.values().map(|c| c.peak()).fold(0.0, f64::max),
            pr.bandwidth.read_gbps,
            gb(pr.memory.usable_bytes)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Placement (one letter per op; layer ops: {LAYER_CODES}):");
    let names: Vec<&str> = plan.machines.iter().map(|m| m.name.as_str()).collect();
    let code = |machine: &str| letter(names.iter().position(|n| *n == machine).unwrap_or(0));
    let phases: Vec<Phase> = {
        let mut v: Vec<Phase> = plan.ops.iter().map(|o| o.phase).filter(|ph| *ph != Phase::Backward).collect();
        v.dedup();
        v
    };
    for ph in phases {
        let ops: Vec<_> = plan.ops.iter().filter(|o| o.phase == ph).collect();
        let find = |kind: OpKind| ops.iter().find(|o| o.kind == kind && o.layer.is_none()).map(|o| code(&o.machine));
        let _ = writeln!(
            s,
            "  {:<8} embedding {}  final norm {}  lm head {}",
            ph.name(),
            find(OpKind::Embedding).unwrap_or('-'),
            find(OpKind::FinalNorm).unwrap_or('-'),
            find(OpKind::LmHead).unwrap_or('-')
        );
        let mut rows: Vec<(u32, u32, String)> = Vec::new();
        for l in 0..plan.model.num_layers as u32 {
            let pattern: String = OpKind::LAYER
                .iter()
                .map(|&k| ops.iter().find(|o| o.layer == Some(l) && o.kind == k).map_or('-', |o| code(&o.machine)))
                .map(|c| format!("{c} "))
                .collect::<String>()
                .trim_end()
                .to_string();
            match rows.last_mut() {
                Some(last) if last.2 == pattern => last.1 = l,
                _ => rows.push((l, l, pattern)),
            }
        }
        for (a, b, pat) in rows {
            let span = if a == b { format!("L{a}") } else { format!("L{a}-L{b}") };
            let _ = writeln!(s, "           {span:<8} {pat}");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Per machine (compute and bytes received per run of each phase):");
    let phase_names: Vec<&str> = p.instance.phases.iter().map(|ph| ph.phase_name).collect();
    for u in &plan.predicted.per_machine {
        let per_phase: Vec<String> = phase_names
            .iter()
            .map(|ph| {
                let ms = u.compute_ms.get(*ph).copied().unwrap_or(0.0);
                let recv = u.ingress_bytes.get(*ph).copied().unwrap_or(0);
                format!("{ph} {ms:.1} ms, received {}", bytes(recv))
            })
            .collect();
        let _ = writeln!(
            s,
            "  {:<10} {}; memory {:.2} / {:.2} GB",
            u.machine,
            per_phase.join("; "),
            gb(u.memory_bytes),
            gb(u.memory_capacity_bytes)
        );
    }
    let _ = writeln!(s);
    let pr = &plan.predicted;
    if let (Some(ttft), tpot) = (pr.ttft_ms, pr.tpot_ms) {
        let _ = write!(s, "Predicted: time to first token {ttft:.1} ms");
        if let Some(t) = tpot {
            let _ = write!(s, ", time per output token {t:.2} ms ({:.1} tokens/s)", 1e3 / t);
        }
        if pr.handover_bytes > 0 {
            let _ = write!(
                s,
                ", KV handover {:.1} MB in {:.1} ms (inside TTFT)",
                pr.handover_bytes as f64 / 1e6,
                pr.handover_ms
            );
        }
        let _ = writeln!(s);
    }
    if let Some(step) = pr.step_ms {
        let tokens = plan.workload.seq * plan.workload.batch * plan.workload.micro_batches;
        let _ = writeln!(s, "Predicted: training step {step:.1} ms ({:.0} tokens/s)", tokens as f64 / step * 1e3);
    }
    let _ = writeln!(s, "Objective ({}): {:.2} ms", plan.objective, plan.objective_ms);
    let _ = writeln!(s);
    let _ = writeln!(s, "Baselines (same cost model):");
    let _ = writeln!(s, "  {:<52} {:>12} {:>9}", "placement", "objective", "speedup");
    for b in &plan.baselines {
        match b.predicted_ms {
            Some(ms) => {
                let _ = writeln!(s, "  {:<52} {:>9.2} ms {:>8.2}x", b.name, ms, ms / plan.objective_ms);
            }
            None => {
                let why = b.infeasible.as_deref().unwrap_or("");
                let _ = writeln!(s, "  {:<52} {:>12} ({})", b.name, "does not fit", why);
            }
        }
    }
    let _ = writeln!(s, "  {:<52} {:>9.2} ms {:>8.2}x", "this plan", plan.objective_ms, 1.0);
    let _ = writeln!(s);
    let (lat, thr) = p.analytic_bounds;
    let _ = writeln!(
        s,
        "Proof: lower bound {:.2} ms, gap {:.3}% (analytic bounds: best machine per op {:.2} ms, perfect balance {:.2} ms)",
        plan.bound,
        plan.gap * 100.0,
        lat * 1e3,
        thr * 1e3
    );
    match &p.ilp {
        Some(o) => {
            let _ = writeln!(
                s,
                "Solver: HiGHS {} in {:.2} s ({} variables, {} rows, solver gap {:.3}%); plan from {}; total {:.2} s",
                o.status,
                o.seconds,
                o.num_vars,
                o.num_rows,
                o.gap * 100.0,
                p.chosen_by,
                plan.solve_seconds
            );
        }
        None => {
            let _ = writeln!(s, "Solver: one machine, nothing to place");
        }
    }
    s
}

fn objective_words(objective: &str, mode: &str) -> &'static str {
    match (objective, mode) {
        ("latency", "infer") => "latency of one request: TTFT + generated tokens x time per token (+ KV handover)",
        ("latency", _) => "latency of one micro-batch's forward and backward, executed in order",
        (_, "infer") => "throughput: the busiest resource per request (prefill + every decode step)",
        _ => "throughput: the busiest resource (machine compute or incoming link) per micro-batch",
    }
}
