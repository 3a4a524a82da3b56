//! Planning again over part of a plan's cluster, as a server does when a machine is lost
//! or comes back: the same model, workload, dtype, weights and objective, over the
//! machines named, from the profiles and links the plan itself records (no profiles
//! folder needed), the result naming its machines as the cluster does.

use std::time::Duration;

use lemur_protocol::{Plan, WorkloadMode};

use crate::cost::Roofline;
use crate::ilp::IlpOptions;
use crate::planning::{plan, PlanRequest, PlanningError};
use crate::problem::{Mode, Objective};

/// `plan`'s workload placed over `machines` (names from `plan.machines`, in the order the
/// new plan lists them); the plan itself when they are all of its machines.
pub fn replan(plan_was: &Plan, machines: &[&str], time_limit: Duration) -> Result<Plan, PlanningError> {
    let mut had: Vec<&str> = plan_was.machines.iter().map(|m| m.name.as_str()).collect();
    let mut want = machines.to_vec();
    had.sort_unstable();
    want.sort_unstable();
    if had == want {
        return Ok(plan_was.clone());
    }
    let options = |problem: String| PlanningError::Options { field: "machines", problem };
    if machines.is_empty() {
        return Err(options("no machine left to plan over".into()));
    }
    let profiles = machines
        .iter()
        .map(|name| {
            plan_was
                .machines
                .iter()
                .find(|m| m.name == *name)
                .map(|m| m.profile.clone())
                .ok_or_else(|| options(format!("`{name}` is not one of the plan's machines")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let w = &plan_was.workload;
    if w.mode != WorkloadMode::Infer {
        return Err(options("only inference plans are planned again".into()));
    }
    let mut req = PlanRequest::new(plan_was.model.clone(), profiles, plan_was.links.clone());
    req.dtype = plan_was.dtype;
    req.weights = w.weights;
    req.mode = Mode::Infer { prompt: w.seq, gen_tokens: w.gen_tokens, batch: w.batch };
    req.objective =
        if plan_was.objective == Objective::Throughput.name() { Objective::Throughput } else { Objective::Latency };
    req.ilp = IlpOptions { time_limit_s: time_limit.as_secs_f64(), ..req.ilp };
    req.heuristic_budget = (time_limit / 10).min(Duration::from_secs(2));
    let mut out = plan(&Roofline, &req)?.plan;
    out.rename_machines(&machines.iter().map(|m| m.to_string()).collect::<Vec<_>>());
    out.validate().map_err(|e| options(format!("the new plan: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Planner;

    fn two_machine_plan() -> Plan {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles");
        Planner::from_profiles(dir)
            .unwrap()
            .machines(&["m4-pro", "m5-pro"])
            .unwrap()
            .model(lemur_protocol::ModelConfig::tiny())
            .infer(16, 8, 1)
            .solver(Duration::from_secs(5), 1e-3)
            .plan()
            .unwrap()
            .plan
    }

    #[test]
    fn a_machine_left_alone_gets_every_op_and_all_machines_give_the_plan_back() {
        let p = two_machine_plan();
        assert_eq!(replan(&p, &["m5-pro", "m4-pro"], Duration::from_secs(5)).unwrap(), p);
        for left in ["m4-pro", "m5-pro"] {
            let q = replan(&p, &[left], Duration::from_secs(5)).unwrap();
            assert_eq!(q.machines.len(), 1);
            assert_eq!(q.machines[0].name, left);
            assert!(q.ops.iter().all(|o| o.machine == left && o.costs_ms.keys().all(|k| k == left)));
            assert_eq!(
                (q.workload.seq, q.workload.gen_tokens, q.dtype),
                (p.workload.seq, p.workload.gen_tokens, p.dtype)
            );
            assert_eq!(q.ops.len(), p.ops.len());
        }
        let e = replan(&p, &["m9"], Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("`m9` is not one of the plan's machines"), "{e}");
    }

    #[test]
    fn a_model_too_big_for_what_is_left_says_by_how_much() {
        let mut p = two_machine_plan();
        // Shrink one machine's memory below the model's weights.
        p.machines[0].profile.memory.usable_bytes = 1000;
        let e = replan(&p, &[p.machines[0].name.clone().as_str()], Duration::from_secs(2)).unwrap_err().to_string();
        assert!(e.contains("GB"), "{e}");
    }
}
