//! Training's pipeline schedule: GPipe when every micro-batch's activations fit, otherwise
//! 1F1B with one micro-batch per stage, checked against the graph's memory totals.

use std::path::Path;

use lemur_planner::graph::{Finetune, LoraSpec, OpGraph, Workload};
use lemur_planner::{plan, Mode, PlanRequest, ProfileSet, Roofline};
use lemur_protocol::{DType, ModelConfig};

fn request(usable: Option<u64>, machines: &[&str], micro_batches: u64) -> PlanRequest {
    let set = ProfileSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap();
    let profiles = machines
        .iter()
        .map(|n| {
            let mut p = set.machine(n).unwrap().clone();
            if let Some(b) = usable {
                p.memory.usable_bytes = b;
                p.memory.max_alloc_bytes = p.memory.max_alloc_bytes.min(b);
            }
            p
        })
        .collect();
    let model = ModelConfig { num_layers: 4, ..ModelConfig::preset("llama-150m-shaped").unwrap() };
    let mut req = PlanRequest::new(model, profiles, set.links);
    req.mode = Mode::Train { seq: 512, batch: 1, finetune: Finetune::Lora(LoraSpec::default()), micro_batches };
    req
}

/// (weights + optimizer state, saved activations per micro-batch) of the whole graph.
fn totals(req: &PlanRequest) -> (u64, u64) {
    let Mode::Train { seq, batch, finetune, .. } = req.mode.clone() else { unreachable!() };
    let g = OpGraph::build(&req.model, req.dtype, Workload::Train { batch, seq, finetune });
    let fixed = g.ops().map(|(_, o)| o.weight_bytes + o.optimizer_bytes).sum();
    let saved = g.ops().map(|(_, o)| o.saved_bytes).sum();
    (fixed, saved)
}

#[test]
fn one_machine_uses_gpipe_when_it_fits_and_1f1b_when_it_does_not() {
    let req = request(None, &["m5-pro"], 8);
    let (fixed, saved) = totals(&req);
    assert!(saved > 0 && fixed > 0);
    let roomy = plan(&Roofline, &req).unwrap().plan;
    assert_eq!(roomy.workload.inflight, Some(8));
    assert_eq!(roomy.predicted.per_machine[0].memory_bytes, fixed + 8 * saved);

    // Room for the weights and three micro-batches: GPipe's eight do not fit, 1F1B's one does.
    let tight = request(Some(fixed + 3 * saved), &["m5-pro"], 8);
    let planned = plan(&Roofline, &tight).unwrap();
    let p = &planned.plan;
    assert_eq!(p.workload.inflight, Some(1));
    assert_eq!(p.predicted.per_machine[0].memory_bytes, fixed + saved);
    let text = lemur_planner::report::summary(&planned);
    assert!(text.contains("Schedule: 1F1B, 1 of 8"), "{text}");
}

#[test]
fn two_machines_under_pressure_keep_one_micro_batch_per_stage() {
    let base = request(None, &["m4-pro", "m5-pro"], 8);
    let (fixed, saved) = totals(&base);
    // Each machine holds its half and about two micro-batches' activations, not eight.
    let cap = fixed / 2 + 2 * saved;
    let req = request(Some(cap), &["m4-pro", "m5-pro"], 8);
    let p = plan(&Roofline, &req).unwrap().plan;
    let used = p.machines.iter().filter(|m| p.ops.iter().any(|o| o.machine == m.name)).count() as u64;
    assert_eq!(p.workload.inflight, Some(used.min(8)), "one micro-batch per stage");
    for m in &p.predicted.per_machine {
        assert!(m.memory_bytes <= cap, "{} holds {} of {cap}", m.machine, m.memory_bytes);
    }
    let _ = DType::F16;
}
