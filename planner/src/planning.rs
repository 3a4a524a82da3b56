//! Planning end to end: baselines, a warm start, the ILP, and the plan with its evidence.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lemur_protocol::plan::{MachineUse, PlanBaseline, PlanEdge, PlanMachine, PlanOp, PlanWorkload, Predicted};
use lemur_protocol::{
    DType, FinetuneKind, LinkProfile, MachineProfile, ModelConfig, Plan, WeightFormat, WorkloadMode,
    PLAN_FORMAT_VERSION,
};

use crate::baselines::{baselines, warm_start, Baseline, Score};
use crate::cost::CostModel;
use crate::evaluate::{evaluate, headline, Assignment, Metrics};
use crate::graph::{Finetune, Precision};
use crate::ilp::{analytic_bounds, solve, IlpOptions, IlpOutcome};
use crate::problem::{Instance, InstanceError, Mode, Objective};

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Ilp(#[from] crate::ilp::IlpError),
    #[error("{0}")]
    DoesNotFit(String),
    #[error("solver option `{field}`: {problem}")]
    Options { field: &'static str, problem: String },
}

/// A planning request: the programmatic face of `lemur-plan`.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: ModelConfig,
    pub dtype: DType,
    /// How the weights are stored: dense in `dtype` (the default), or a GGUF block format.
    pub weights: WeightFormat,
    pub mode: Mode,
    pub objective: Objective,
    pub machines: Vec<MachineProfile>,
    pub links: Vec<LinkProfile>,
    pub ilp: IlpOptions,
    /// Time for the local search that warm-starts the ILP.
    pub heuristic_budget: Duration,
}

impl PlanRequest {
    /// Defaults: f16, inference of a 2048-token prompt and 256 generated tokens, latency.
    pub fn new(model: ModelConfig, machines: Vec<MachineProfile>, links: Vec<LinkProfile>) -> Self {
        Self {
            model,
            dtype: DType::F16,
            weights: WeightFormat::Dense,
            mode: Mode::Infer { prompt: 2048, gen_tokens: 256, batch: 1 },
            objective: Objective::Latency,
            machines,
            links,
            ilp: IlpOptions::default(),
            heuristic_budget: Duration::from_millis(1500),
        }
    }
}

/// The plan and how it was found.
#[derive(Debug, Clone)]
pub struct Planned {
    pub plan: Plan,
    pub instance: Instance,
    pub assignment: Assignment,
    pub metrics: Metrics,
    pub baselines: Vec<Baseline>,
    pub ilp: Option<IlpOutcome>,
    /// Which candidate won: `ilp`, `warm start`, or a baseline's name.
    pub chosen_by: String,
    pub analytic_bounds: (f64, f64),
}

/// Plans `req` with cost model `cost`.
pub fn plan(cost: &impl CostModel, req: &PlanRequest) -> Result<Planned, PlanningError> {
    let t0 = Instant::now();
    if !(req.ilp.time_limit_s.is_finite() && req.ilp.time_limit_s > 0.0) {
        let problem = format!("must be a finite number of seconds above 0, not {}", req.ilp.time_limit_s);
        return Err(PlanningError::Options { field: "time_limit_s", problem });
    }
    if !(0.0..=1.0).contains(&req.ilp.rel_gap) {
        let problem = format!("must be a relative gap in [0, 1], not {}", req.ilp.rel_gap);
        return Err(PlanningError::Options { field: "rel_gap", problem });
    }
    let precision = Precision { activations: req.dtype, weights: req.weights };
    let inst = Instance::new(cost, &req.model, precision, req.mode.clone(), req.objective, &req.machines, &req.links)?;
    tracing::info!(
        machines = inst.num_machines(),
        ops = inst.phases.iter().map(|p| p.graph.len()).sum::<usize>(),
        "planning"
    );
    let base = baselines(&inst);
    let start = warm_start(&inst, &base, req.heuristic_budget);
    let start_metrics = evaluate(&inst, &start);
    let mut candidates: Vec<(String, Assignment, Metrics)> = vec![("warm start".into(), start.clone(), start_metrics)];
    let ilp = if inst.num_machines() > 1 {
        let remaining = (req.ilp.time_limit_s - t0.elapsed().as_secs_f64()).max(0.5);
        let out = solve(&inst, &start, IlpOptions { time_limit_s: remaining, ..req.ilp })?;
        if let Some(a) = &out.assignment {
            let m = evaluate(&inst, a);
            candidates.push(("ilp".into(), a.clone(), m));
        }
        Some(out)
    } else {
        None
    };
    for b in &base {
        candidates.push((b.name.clone(), b.assignment.clone(), b.metrics.clone()));
    }
    // The plan is never worse than any candidate, baselines included.
    let mut best = 0;
    for i in 1..candidates.len() {
        if Score::of(&inst, &candidates[i].2).better(&Score::of(&inst, &candidates[best].2)) {
            best = i;
        }
    }
    let (chosen_by, assignment, metrics) = candidates.swap_remove(best);
    if !metrics.feasible() {
        return Err(PlanningError::DoesNotFit(shortfall(&inst)));
    }
    let analytic = analytic_bounds(&inst);
    let mut bound = match inst.objective {
        Objective::Latency => analytic.0,
        Objective::Throughput => analytic.1,
    };
    if let Some(o) = &ilp {
        if o.dual_bound.is_finite() {
            bound = bound.max(o.dual_bound);
        }
    }
    bound = bound.min(metrics.objective_s);
    let solve_seconds = t0.elapsed().as_secs_f64();
    let plan = build_plan(&inst, req, &assignment, &metrics, &base, bound, solve_seconds);
    Ok(Planned {
        plan,
        instance: inst,
        assignment,
        metrics,
        baselines: base,
        ilp,
        chosen_by,
        analytic_bounds: analytic,
    })
}

/// The memory every placement needs, against what the machines have, in GB per machine.
fn shortfall(inst: &Instance) -> String {
    let mut need: u64 = 0;
    for (p, ph) in inst.phases.iter().enumerate() {
        for (_, op) in ph.graph.ops() {
            let w = if p == 0 { op.weight_bytes } else { 0 };
            need += w + op.state_bytes(inst.inflight);
        }
    }
    let have: u64 = inst.machines.iter().map(|m| m.profile.memory.usable_bytes).sum();
    let gb = |b: u64| b as f64 / 1e9;
    for (p, ph) in inst.phases.iter().enumerate() {
        for (id, op) in ph.graph.ops() {
            if (0..inst.num_machines()).all(|m| !inst.allowed(p, id, m)) {
                let biggest = crate::problem::largest_tensor(&ph.graph, id);
                let max_alloc = inst.machines.iter().map(|m| m.profile.memory.max_alloc_bytes).max().unwrap_or(0);
                return format!(
                    "nothing fits: {} ({}) needs a {:.1} GB buffer and no machine allocates more than {:.1} GB at once; use a shorter sequence or a smaller batch",
                    op.label(),
                    ph.phase_name,
                    gb(biggest),
                    gb(max_alloc)
                );
            }
        }
    }
    let mut s = format!(
        "nothing fits: the workload needs {:.1} GB (weights, optimizer state, activations, KV cache) and the machines offer {:.1} GB",
        gb(need),
        gb(have)
    );
    if need > have {
        s += &format!("; {:.1} GB short. Spread in proportion to capacity, each machine is short by:", gb(need - have));
        for m in &inst.machines {
            let cap = m.profile.memory.usable_bytes;
            let share = (need as f64 * cap as f64 / have as f64) as u64;
            s += &format!(
                " {} {:.1} GB (needs {:.1} of {:.1});",
                m.name,
                gb(share.saturating_sub(cap)),
                gb(share),
                gb(cap)
            );
        }
        s.pop();
    } else {
        s += "; no split respects every machine's capacity and largest allocation";
    }
    s
}

fn build_plan(
    inst: &Instance,
    req: &PlanRequest,
    a: &Assignment,
    m: &Metrics,
    base: &[Baseline],
    bound: f64,
    solve_seconds: f64,
) -> Plan {
    let names: Vec<String> = inst.machines.iter().map(|mc| mc.name.clone()).collect();
    let mut ops = Vec::new();
    let mut edges = Vec::new();
    let mut offset = 0;
    for (p, ph) in inst.phases.iter().enumerate() {
        for (id, op) in ph.graph.ops() {
            let costs_ms = names.iter().enumerate().map(|(mi, n)| (n.clone(), ph.costs.at(id, mi) * 1e3)).collect();
            ops.push(PlanOp {
                id: offset + id,
                layer: op.layer,
                kind: op.kind,
                phase: op.phase,
                machine: names[a.machine_of(inst, p, id)].clone(),
                forward_of: op.forward_of.map(|f| f + offset),
                costs_ms,
            });
        }
        for (from, to, e) in ph.graph.edges() {
            let (ma, mb) = (a.machine_of(inst, p, from), a.machine_of(inst, p, to));
            let cost_ms = if ma == mb { 0.0 } else { inst.transfer_s(ma, mb, e.bytes) * 1e3 };
            edges.push(PlanEdge { from: offset + from, to: offset + to, bytes: e.bytes, cost_ms });
        }
        offset += ph.graph.len();
    }
    let head = headline(inst, m);
    let sched = crate::evaluate::schedule(inst, a);
    let per_machine = names
        .iter()
        .enumerate()
        .map(|(mi, n)| MachineUse {
            machine: n.clone(),
            compute_ms: inst
                .phases
                .iter()
                .enumerate()
                .map(|(p, ph)| (ph.phase_name.to_string(), m.compute_s[p][mi] * 1e3))
                .collect(),
            memory_bytes: sched.as_ref().map_or(m.memory_bytes[mi], |s| s.memory_bytes[mi]),
            memory_capacity_bytes: inst.machines[mi].profile.memory.usable_bytes,
            ingress_bytes: inst
                .phases
                .iter()
                .enumerate()
                .map(|(p, ph)| (ph.phase_name.to_string(), m.ingress_bytes[p][mi]))
                .collect(),
        })
        .collect();
    let workload = match &req.mode {
        Mode::Infer { prompt, gen_tokens, batch } => PlanWorkload {
            mode: WorkloadMode::Infer,
            seq: *prompt,
            batch: *batch,
            gen_tokens: *gen_tokens,
            finetune: None,
            lora_rank: None,
            lora_targets: None,
            micro_batches: 1,
            inflight: None,
            weights: req.weights,
        },
        Mode::Train { seq, batch, finetune, micro_batches } => {
            let (ft, rank, targets) = match finetune {
                Finetune::Full => (FinetuneKind::Full, None, None),
                Finetune::Lora(l) => (FinetuneKind::Lora, Some(l.rank), Some(l.targets.clone())),
            };
            PlanWorkload {
                mode: WorkloadMode::Train,
                seq: *seq,
                batch: *batch,
                gen_tokens: 0,
                finetune: Some(ft),
                lora_rank: rank,
                lora_targets: targets,
                micro_batches: *micro_batches,
                inflight: sched.as_ref().map(|s| s.inflight),
                weights: req.weights,
            }
        }
    };
    let obj = m.objective_s;
    Plan {
        format_version: PLAN_FORMAT_VERSION,
        model: inst.model.clone(),
        dtype: inst.dtype,
        workload,
        machines: inst
            .machines
            .iter()
            .map(|mc| PlanMachine { name: mc.name.clone(), profile: mc.profile.clone() })
            .collect(),
        links: inst.links.clone(),
        ops,
        edges,
        objective: inst.objective.name().into(),
        objective_ms: obj * 1e3,
        bound: bound * 1e3,
        gap: if obj > 0.0 { ((obj - bound) / obj).max(0.0) } else { 0.0 },
        solve_seconds,
        predicted: Predicted {
            ttft_ms: head.ttft_s.map(|s| s * 1e3),
            tpot_ms: head.tpot_s.map(|s| s * 1e3),
            step_ms: head.step_s.map(|s| s * 1e3),
            handover_ms: m.handover_s * 1e3,
            handover_bytes: m.handover_bytes,
            per_machine,
        },
        baselines: base
            .iter()
            .map(|b| PlanBaseline {
                name: b.name.clone(),
                predicted_ms: b.metrics.feasible().then_some(b.metrics.objective_s * 1e3),
                infeasible: (!b.metrics.feasible()).then(|| b.metrics.violations.join("; ")),
            })
            .collect(),
    }
}

/// Milliseconds per machine name, for summaries.
pub fn per_machine_ms(plan: &Plan, phase: &str) -> BTreeMap<String, f64> {
    plan.predicted
        .per_machine
        .iter()
        .map(|u| (u.machine.clone(), u.compute_ms.get(phase).copied().unwrap_or(0.0)))
        .collect()
}
