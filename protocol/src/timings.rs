//! The cost model against reality: measured op times from a timed run (`lemur-worker
//! --timings`), set beside the plan's predictions, per op kind and per layer, with the
//! end-to-end step. `lemur-profile refine` reads the same file.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use crate::{OpKind, Phase, Plan};
use serde::{Deserialize, Serialize};

/// One op's predicted and measured time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpTiming {
    pub id: usize,
    pub kind: OpKind,
    pub phase: Phase,
    pub layer: Option<u32>,
    pub machine: String,
    pub predicted_ms: f64,
    pub measured_ms: f64,
}

/// What `lemur-worker --timings FILE` writes, and `lemur-profile refine` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// The plan the timed run executed (the op ids below are its).
    pub plan: Plan,
    /// Inference: predicted and measured time to first token and per output token, ms.
    #[serde(default)]
    pub ttft_ms: Option<(f64, f64)>,
    #[serde(default)]
    pub tpot_ms: Option<(f64, f64)>,
    /// Training: predicted and measured optimizer step (all micro-batches), ms.
    #[serde(default)]
    pub step_ms: Option<(f64, f64)>,
    pub ops: Vec<OpTiming>,
}

impl Timings {
    /// Pairs the plan's predictions with measured per-op times and step times.
    pub fn new(plan: &Plan, op_ms: &HashMap<usize, f64>, ttft_ms: f64, tpot_ms: Option<f64>) -> Self {
        Self {
            plan: plan.clone(),
            ttft_ms: Some((plan.predicted.ttft_ms.unwrap_or(0.0), ttft_ms)),
            tpot_ms: plan.predicted.tpot_ms.zip(tpot_ms),
            step_ms: None,
            ops: Self::pair(plan, op_ms),
        }
    }

    /// A training run's timings: per-op means per micro-batch and the optimizer step.
    pub fn train(plan: &Plan, op_ms: &HashMap<usize, f64>, step_ms: f64) -> Self {
        Self {
            plan: plan.clone(),
            ttft_ms: None,
            tpot_ms: None,
            step_ms: Some((plan.predicted.step_ms.unwrap_or(0.0), step_ms)),
            ops: Self::pair(plan, op_ms),
        }
    }

    fn pair(plan: &Plan, op_ms: &HashMap<usize, f64>) -> Vec<OpTiming> {
        plan.ops
            .iter()
            .filter_map(|o| {
                let measured = *op_ms.get(&o.id)?;
                Some(OpTiming {
                    id: o.id,
                    kind: o.kind,
                    phase: o.phase,
                    layer: o.layer,
                    machine: o.machine.clone(),
                    predicted_ms: o.costs_ms.get(&o.machine).copied().unwrap_or(0.0),
                    measured_ms: measured,
                })
            })
            .collect()
    }

    /// The validation table: per op kind and phase, per layer, and end to end.
    pub fn table(&self) -> String {
        let err = |p: f64, m: f64| if m > 0.0 { (p - m) / m * 100.0 } else { 0.0 };
        let mut s = String::new();
        for phase in [Phase::Prefill, Phase::Decode, Phase::Forward, Phase::Backward] {
            let ops: Vec<&OpTiming> = self.ops.iter().filter(|o| o.phase == phase).collect();
            if ops.is_empty() {
                continue;
            }
            let _ = writeln!(s, "{phase}: per op kind (all layers)");
            let _ = writeln!(s, "  {:<14} {:>12} {:>12} {:>8}", "op", "predicted ms", "measured ms", "error");
            let mut by_kind: BTreeMap<OpKind, (f64, f64)> = BTreeMap::new();
            for o in &ops {
                let e = by_kind.entry(o.kind).or_default();
                e.0 += o.predicted_ms;
                e.1 += o.measured_ms;
            }
            for k in OpKind::all() {
                if let Some((p, m)) = by_kind.get(&k) {
                    let _ = writeln!(s, "  {:<14} {:>12.3} {:>12.3} {:>+7.1}%", k.name(), p, m, err(*p, *m));
                }
            }
            let mut by_layer: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
            for o in ops.iter().filter(|o| o.layer.is_some()) {
                let e = by_layer.entry(o.layer.unwrap_or(0)).or_default();
                e.0 += o.predicted_ms;
                e.1 += o.measured_ms;
            }
            let errs: Vec<f64> = by_layer.values().map(|(p, m)| err(*p, *m)).collect();
            let worst = errs.iter().copied().fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a });
            let mean_p: f64 = by_layer.values().map(|x| x.0).sum::<f64>() / by_layer.len().max(1) as f64;
            let mean_m: f64 = by_layer.values().map(|x| x.1).sum::<f64>() / by_layer.len().max(1) as f64;
            let _ = writeln!(
                s,
                "  per layer: predicted {mean_p:.3} ms, measured {mean_m:.3} ms on average; error {:+.1}% (worst layer {worst:+.1}%)",
                err(mean_p, mean_m)
            );
            let (tp, tm): (f64, f64) = ops.iter().fold((0.0, 0.0), |a, o| (a.0 + o.predicted_ms, a.1 + o.measured_ms));
            let _ = writeln!(s, "  sum of ops: predicted {tp:.2} ms, measured {tm:.2} ms ({:+.1}%)", err(tp, tm));
        }
        if let Some((p, m)) = self.ttft_ms {
            let _ = writeln!(
                s,
                "end to end: time to first token predicted {p:.2} ms, measured {m:.2} ms ({:+.1}%)",
                err(p, m)
            );
        }
        if let Some((p, m)) = self.tpot_ms {
            let _ =
                writeln!(s, "end to end: time per token predicted {p:.2} ms, measured {m:.2} ms ({:+.1}%)", err(p, m));
        }
        if let Some((p, m)) = self.step_ms {
            let _ =
                writeln!(s, "end to end: optimizer step predicted {p:.1} ms, measured {m:.1} ms ({:+.1}%)", err(p, m));
        }
        s
    }
}
