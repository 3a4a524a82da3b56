//! The placement ILP against independent references: brute-force enumeration, a min-cut,
//! memory limits, infeasibility, and the plan file's round trip and validation.

use std::path::Path;

use lemur_planner::evaluate::{evaluate, Assignment};
use lemur_planner::ilp::{solve, IlpOptions};
use lemur_planner::problem::{Instance, Mode, Objective};
use lemur_planner::{plan, Finetune, LoraSpec, PlanRequest, PlanningError, ProfileSet, Roofline};
use lemur_protocol::{DType, MachineProfile, ModelConfig, Plan};

fn profiles() -> ProfileSet {
    ProfileSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap()
}

fn machines(names: &[&str], usable_gb: Option<f64>) -> Vec<MachineProfile> {
    let set = profiles();
    names
        .iter()
        .map(|n| {
            let mut p = set.machine(n).unwrap().clone();
            if let Some(gb) = usable_gb {
                p.memory.usable_bytes = (gb * 1e9) as u64;
                p.memory.total_bytes = p.memory.total_bytes.max(p.memory.usable_bytes);
            }
            p
        })
        .collect()
}

/// Mistral-7B's shape with one layer: 17 ops, so 2^17 placements can be enumerated.
fn one_layer() -> ModelConfig {
    ModelConfig { name: "mistral-1layer".into(), num_layers: 1, ..ModelConfig::mistral_7b() }
}

fn instance(model: &ModelConfig, mode: Mode, objective: Objective, ms: &[MachineProfile]) -> Instance {
    Instance::new(&Roofline, model, DType::F16, mode, objective, ms, &profiles().links).unwrap()
}

/// The best feasible objective over every assignment of units to two machines.
fn brute_force(inst: &Instance) -> Option<f64> {
    assert_eq!(inst.phases.len(), 1);
    let n = inst.phases[0].units.len();
    assert!(n <= 20);
    let mut best: Option<f64> = None;
    for mask in 0u64..(1 << n) {
        let a = Assignment { units: vec![(0..n).map(|u| ((mask >> u) & 1) as usize).collect()] };
        let m = evaluate(inst, &a);
        if m.feasible() && best.is_none_or(|b| m.objective_s < b) {
            best = Some(m.objective_s);
        }
    }
    best
}

fn exact() -> IlpOptions {
    IlpOptions { time_limit_s: 60.0, rel_gap: 0.0, structured: true }
}

#[test]
fn ilp_equals_brute_force_on_small_graphs() {
    let model = one_layer();
    let lora = Finetune::Lora(LoraSpec::default());
    let cases = [
        (Mode::Infer { prompt: 512, gen_tokens: 0, batch: 1 }, Objective::Latency, None),
        (Mode::Infer { prompt: 4096, gen_tokens: 0, batch: 2 }, Objective::Throughput, None),
        (Mode::Train { seq: 512, batch: 1, finetune: Finetune::Full, micro_batches: 1 }, Objective::Throughput, None),
        (Mode::Train { seq: 256, batch: 1, finetune: lora.clone(), micro_batches: 1 }, Objective::Latency, None),
        // Tight memory: a machine holds at most 0.5 GB, forcing a split of the 1.3 GB of weights.
        (Mode::Train { seq: 128, batch: 1, finetune: lora, micro_batches: 1 }, Objective::Latency, Some(0.7)),
        (Mode::Infer { prompt: 1024, gen_tokens: 0, batch: 1 }, Objective::Latency, Some(0.7)),
    ];
    for (mode, objective, mem) in cases {
        let ms = machines(&["m4-pro", "m5-pro"], mem);
        let inst = instance(&model, mode.clone(), objective, &ms);
        let reference = brute_force(&inst).expect("some placement fits");
        let start = Assignment::single(&inst, 1);
        let out = solve(&inst, &start, exact()).unwrap();
        let a = out.assignment.expect("the ILP finds a placement");
        let got = evaluate(&inst, &a);
        assert!(got.feasible(), "{mode:?}: {:?}", got.violations);
        let rel = (got.objective_s - reference).abs() / reference;
        assert!(rel < 1e-6, "{mode:?} {objective:?}: ILP {} vs brute force {reference}", got.objective_s);
        // The solver's own objective is the evaluator's for its placement.
        assert!((out.objective_value - got.objective_s).abs() / reference < 1e-6, "{mode:?}");
    }
}

/// Max-flow (Dinic) over a dense capacity matrix; returns the min-cut value.
fn max_flow(cap: &mut [Vec<f64>], s: usize, t: usize) -> f64 {
    let n = cap.len();
    let mut flow = 0.0;
    loop {
        let mut level = vec![usize::MAX; n];
        level[s] = 0;
        let mut q = std::collections::VecDeque::from([s]);
        while let Some(u) = q.pop_front() {
            for v in 0..n {
                if level[v] == usize::MAX && cap[u][v] > 1e-15 {
                    level[v] = level[u] + 1;
                    q.push_back(v);
                }
            }
        }
        if level[t] == usize::MAX {
            return flow;
        }
        fn dfs(cap: &mut [Vec<f64>], level: &[usize], it: &mut [usize], u: usize, t: usize, f: f64) -> f64 {
            if u == t {
                return f;
            }
            while it[u] < cap.len() {
                let v = it[u];
                if level[v] == level[u] + 1 && cap[u][v] > 1e-15 {
                    let d = dfs(cap, level, it, v, t, f.min(cap[u][v]));
                    if d > 0.0 {
                        cap[u][v] -= d;
                        cap[v][u] += d;
                        return d;
                    }
                }
                it[u] += 1;
            }
            0.0
        }
        let mut it = vec![0; n];
        loop {
            let f = dfs(cap, &level, &mut it, s, t, f64::INFINITY);
            if f <= 0.0 {
                break;
            }
            flow += f;
        }
    }
}

/// The latency optimum of a one-phase instance on two machines as a min s-t cut: unit u on
/// the source side runs on machine 0. A tensor sent to the other side costs its transfer
/// once, whichever consumers read it (two auxiliary nodes per tensor).
fn min_cut_latency(inst: &Instance) -> f64 {
    let ph = &inst.phases[0];
    let n = ph.units.len();
    let tensors: Vec<_> =
        ph.tensors.iter().filter(|t| t.consumers.iter().any(|&c| ph.unit_of[c] != ph.unit_of[t.producer])).collect();
    let (s, t) = (n + 2 * tensors.len(), n + 2 * tensors.len() + 1);
    let mut cap = vec![vec![0.0; t + 1]; t + 1];
    let big = 1e6;
    for (u, row) in cap.iter_mut().enumerate().take(n) {
        // u -> t is cut when u runs on machine 0 (s -> u, below, when it runs on machine 1).
        row[t] += ph.weight * ph.unit_time(u, 0);
    }
    for (u, c) in cap[s].iter_mut().enumerate().take(n) {
        *c += ph.weight * ph.unit_time(u, 1);
    }
    for (i, tensor) in tensors.iter().enumerate() {
        let p = ph.unit_of[tensor.producer];
        let (a, b) = (n + 2 * i, n + 2 * i + 1);
        cap[p][a] += ph.weight * inst.transfer_s(0, 1, tensor.bytes);
        cap[b][p] += ph.weight * inst.transfer_s(1, 0, tensor.bytes);
        for &c in &tensor.consumers {
            let cu = ph.unit_of[c];
            if cu != p {
                cap[a][cu] = big;
                cap[cu][b] = big;
            }
        }
    }
    max_flow(&mut cap, s, t)
}

#[test]
fn latency_on_two_machines_equals_the_min_cut() {
    let ms = machines(&["m4-pro", "m5-pro"], Some(1000.0));
    let cases = [
        (ModelConfig::mistral_7b(), Mode::Infer { prompt: 2048, gen_tokens: 0, batch: 1 }),
        (ModelConfig::mistral_7b(), Mode::Train { seq: 512, batch: 1, finetune: Finetune::Full, micro_batches: 1 }),
        (
            ModelConfig::mistral_7b(),
            Mode::Train { seq: 128, batch: 1, finetune: Finetune::Lora(LoraSpec::default()), micro_batches: 1 },
        ),
        (ModelConfig::preset("llama-1b-shaped").unwrap(), Mode::Infer { prompt: 64, gen_tokens: 0, batch: 4 }),
    ];
    for (model, mode) in cases {
        let inst = instance(&model, mode.clone(), Objective::Latency, &ms);
        let reference = min_cut_latency(&inst);
        let out = solve(&inst, &Assignment::single(&inst, 0), exact()).unwrap();
        let got = evaluate(&inst, &out.assignment.unwrap()).objective_s;
        assert!((got - reference).abs() / reference < 1e-6, "{mode:?}: ILP {got} vs min cut {reference}");
    }
}

fn request(names: &[&str], mode: Mode, objective: Objective) -> PlanRequest {
    let mut r = PlanRequest::new(ModelConfig::mistral_7b(), machines(names, None), profiles().links);
    r.mode = mode;
    r.objective = objective;
    r.ilp = IlpOptions { time_limit_s: 20.0, rel_gap: 1e-3, structured: true };
    r
}

#[test]
fn plans_respect_memory_and_beat_every_baseline() {
    let lora = Finetune::Lora(LoraSpec::default());
    let cases = [
        request(&["m4-pro", "m5-pro"], Mode::Infer { prompt: 2048, gen_tokens: 256, batch: 1 }, Objective::Latency),
        request(&["m4-pro", "m5-pro"], Mode::Infer { prompt: 4096, gen_tokens: 512, batch: 2 }, Objective::Throughput),
        request(
            &["m4-pro", "m5-pro"],
            Mode::Train { seq: 512, batch: 1, finetune: lora.clone(), micro_batches: 8 },
            Objective::Throughput,
        ),
        request(
            &["m4-pro", "m5-pro", "m5-pro"],
            Mode::Train { seq: 1024, batch: 1, finetune: lora, micro_batches: 4 },
            Objective::Latency,
        ),
    ];
    for req in cases {
        let p = plan(&Roofline, &req).unwrap();
        // Memory recomputed from the plan file: weights of every op each machine runs.
        let graph_ops: Vec<_> =
            p.instance.phases.iter().flat_map(|ph| ph.graph.ops().map(|(_, o)| o.clone())).collect();
        for (mi, mc) in p.plan.machines.iter().enumerate() {
            let mut held = std::collections::BTreeSet::new();
            for op in p.plan.ops_on(&mc.name) {
                let g = &graph_ops[op.id];
                if g.weight_bytes > 0 {
                    held.insert((op.layer, op.kind));
                }
            }
            let weights: u64 =
                held.iter().map(|k| graph_ops.iter().find(|o| (o.layer, o.kind) == *k).unwrap().weight_bytes).sum();
            assert!(weights <= p.metrics.memory_bytes[mi], "{}", mc.name);
            assert!(p.metrics.memory_bytes[mi] <= mc.profile.memory.usable_bytes, "{} over capacity", mc.name);
        }
        for b in &p.plan.baselines {
            if let Some(ms) = b.predicted_ms {
                assert!(
                    p.plan.objective_ms <= ms * (1.0 + 1e-9),
                    "{}: plan {} ms vs {} ms",
                    b.name,
                    p.plan.objective_ms,
                    ms
                );
            }
        }
        assert!(p.plan.bound <= p.plan.objective_ms * (1.0 + 1e-9));
        assert!(p.plan.gap >= 0.0 && p.plan.gap < 0.05, "gap {}", p.plan.gap);
        p.plan.validate().unwrap();
    }
}

#[test]
fn mistral_inference_splits_prefill_and_decode_by_their_character() {
    let req =
        request(&["m4-pro", "m5-pro"], Mode::Infer { prompt: 2048, gen_tokens: 256, batch: 1 }, Objective::Latency);
    let p = plan(&Roofline, &req).unwrap();
    let share = |phase: lemur_protocol::Phase, machine: &str| {
        let ops: Vec<_> = p.plan.ops.iter().filter(|o| o.phase == phase).collect();
        ops.iter().filter(|o| o.machine == machine).count() as f64 / ops.len() as f64
    };
    // Compute-bound prefill to the GEMM-rich M5 Pro, bandwidth-bound decode to the M4 Pro.
    assert!(share(lemur_protocol::Phase::Prefill, "m5-pro") > 0.9);
    assert!(share(lemur_protocol::Phase::Decode, "m4-pro") > 0.9);
    assert!(p.plan.predicted.handover_bytes > 0);
}

#[test]
fn infeasible_requests_state_the_shortfall_per_machine() {
    let req = request(
        &["m4-pro", "m5-pro"],
        Mode::Train { seq: 512, batch: 1, finetune: Finetune::Full, micro_batches: 1 },
        Objective::Throughput,
    );
    let err = plan(&Roofline, &req).unwrap_err();
    assert!(matches!(err, PlanningError::DoesNotFit(_)));
    let msg = err.to_string();
    assert!(msg.contains("GB short") && msg.contains("m4-pro") && msg.contains("m5-pro"), "{msg}");
    // Attention's materialised scores at 8192 tokens x 4 sequences exceed any single allocation.
    let req =
        request(&["m4-pro", "m5-pro"], Mode::Infer { prompt: 8192, gen_tokens: 16, batch: 4 }, Objective::Latency);
    let msg = plan(&Roofline, &req).unwrap_err().to_string();
    assert!(msg.contains("attention") && msg.contains("buffer"), "{msg}");
}

#[test]
fn plan_json_round_trips_and_hand_edits_are_validated() {
    let req = request(
        &["m4-pro", "m5-pro"],
        Mode::Train { seq: 128, batch: 1, finetune: Finetune::Lora(LoraSpec::default()), micro_batches: 2 },
        Objective::Throughput,
    );
    let p = plan(&Roofline, &req).unwrap().plan;
    let json = serde_json::to_string_pretty(&p).unwrap();
    let back = Plan::from_json(&json).unwrap();
    assert_eq!(back, p);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for field in [
        "format_version",
        "model",
        "machines",
        "ops",
        "edges",
        "objective",
        "bound",
        "gap",
        "solve_seconds",
        "baselines",
    ] {
        assert!(v.get(field).is_some(), "plan JSON lacks `{field}`");
    }
    let op = &v["ops"][3];
    for field in ["id", "layer", "kind", "phase", "machine", "costs_ms"] {
        assert!(op.get(field).is_some(), "op lacks `{field}`");
    }

    // A valid hand edit: move a forward op and its backward op together.
    let mut edited = p.clone();
    let fwd = edited.ops.iter().position(|o| o.kind == lemur_protocol::OpKind::Rope && o.layer == Some(0)).unwrap();
    let bwd = edited.ops.iter().position(|o| o.forward_of == Some(fwd)).unwrap();
    edited.ops[fwd].machine = "m4-pro".into();
    edited.ops[bwd].machine = "m4-pro".into();
    edited.validate().unwrap();

    // Invalid edits name the op.
    let mut bad = p.clone();
    bad.ops[7].machine = "m9-ultra".into();
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("op 7") && err.contains("m9-ultra"), "{err}");
    let mut bad = p.clone();
    bad.ops[bwd].machine = if p.ops[fwd].machine == "m4-pro" { "m5-pro".into() } else { "m4-pro".into() };
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains(&format!("op {bwd}")) && err.contains("backward"), "{err}");
    let mut bad = p.clone();
    bad.ops.remove(12);
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("op 12") && err.contains("missing"), "{err}");
    let mut bad = p.clone();
    bad.ops[20].id = 21;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("op 21") && err.contains("more than once"), "{err}");
    let mut bad = p.clone();
    bad.edges[0].to = 99_999;
    assert!(bad.validate().unwrap_err().to_string().contains("does not exist"));
    let mut bad = p;
    bad.format_version = 99;
    assert!(bad.validate().unwrap_err().to_string().contains("99"));
    assert!(Plan::from_json("{\"format_version\": 1}").unwrap_err().to_string().contains("not a plan"));
}
