//! The `--costs` report: predicted forward and backward time of each decoder layer on each machine.

use std::collections::BTreeMap;

use lemur_protocol::{DType, MachineProfile, ModelConfig, OpKind, Phase};
use serde::Serialize;

use crate::cost::{CostError, CostModel};
use crate::graph::{Finetune, OpGraph, Workload};

/// One row of the layer table.
#[derive(Debug, Clone, Serialize)]
pub struct LayerCost {
    pub machine: String,
    pub layer: u32,
    pub forward_ms: f64,
    pub backward_ms: f64,
}

/// One op's predicted time on every machine.
#[derive(Debug, Clone, Serialize)]
pub struct OpCost {
    pub id: usize,
    pub layer: Option<u32>,
    pub kind: OpKind,
    pub phase: Phase,
    pub flops: u64,
    pub costs_ms: BTreeMap<String, f64>,
}

/// The whole report (`lemur-plan --costs --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct CostsReport {
    pub model: String,
    pub dtype: DType,
    pub seq: u64,
    pub batch: u64,
    /// `full` or `lora-r{rank}`.
    pub finetune: String,
    pub layer_costs: Vec<LayerCost>,
    pub ops: Vec<OpCost>,
}

/// Prices the training graph (forward + backward) of `model` on every machine.
pub fn costs_report(
    cost: &impl CostModel,
    model: &ModelConfig,
    machines: &[&MachineProfile],
    dtype: DType,
    seq: u64,
    batch: u64,
    finetune: Finetune,
) -> Result<CostsReport, CostError> {
    let label = match &finetune {
        Finetune::Full => "full".to_string(),
        Finetune::Lora(l) => format!("lora-r{}", l.rank),
    };
    let g = OpGraph::build(model, dtype, Workload::Train { batch, seq, finetune });
    let mut ops = Vec::with_capacity(g.len());
    for (id, op) in g.ops() {
        let mut costs_ms = BTreeMap::new();
        for m in machines {
            costs_ms.insert(m.name.clone(), cost.op_seconds(op, m)? * 1e3);
        }
        ops.push(OpCost { id, layer: op.layer, kind: op.kind, phase: op.phase, flops: op.flops, costs_ms });
    }
    let mut layer_costs = Vec::new();
    for m in machines {
        for layer in 0..model.num_layers as u32 {
            let sum = |phase: Phase| -> f64 {
                ops.iter().filter(|o| o.layer == Some(layer) && o.phase == phase).map(|o| o.costs_ms[&m.name]).sum()
            };
            layer_costs.push(LayerCost {
                machine: m.name.clone(),
                layer,
                forward_ms: sum(Phase::Forward),
                backward_ms: sum(Phase::Backward),
            });
        }
    }
    Ok(CostsReport { model: model.name.clone(), dtype, seq, batch, finetune: label, layer_costs, ops })
}

impl CostsReport {
    /// A readable table: one decoder layer per machine (layers are identical), the
    /// per-kind breakdown, and whole-model totals.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let machines: Vec<&String> = self.ops.first().map(|o| o.costs_ms.keys().collect()).unwrap_or_default();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Predicted time of one decoder layer: {}, {}, seq {}, batch {}, backward: {}",
            self.model,
            self.dtype,
            self.seq,
            self.batch,
            if self.finetune == "full" {
                "full fine-tuning (weight gradients included)".into()
            } else {
                self.finetune.clone()
            }
        );
        let _ = writeln!(s);
        let _ = write!(s, "{:<16}", "op (layer 0)");
        for m in &machines {
            let _ = write!(s, "{:>14}{:>14}", format!("{m} fwd ms"), "bwd ms");
        }
        let _ = writeln!(s);
        for kind in OpKind::LAYER {
            let _ = write!(s, "{:<16}", kind.name());
            for m in &machines {
                for phase in [Phase::Forward, Phase::Backward] {
                    let v = self
                        .ops
                        .iter()
                        .find(|o| o.layer == Some(0) && o.kind == kind && o.phase == phase)
                        .map(|o| format!("{:.3}", o.costs_ms[*m]))
                        .unwrap_or_else(|| "-".into());
                    let _ = write!(s, "{v:>14}");
                }
            }
            let _ = writeln!(s);
        }
        let _ = write!(s, "{:<16}", "layer total");
        for m in &machines {
            let row = self.layer_costs.iter().find(|r| &&r.machine == m && r.layer == 0);
            if let Some(r) = row {
                let _ = write!(s, "{:>14.3}{:>14.3}", r.forward_ms, r.backward_ms);
            }
        }
        let _ = writeln!(s);
        let _ = write!(s, "{:<16}", "whole model");
        for m in &machines {
            for phase in [Phase::Forward, Phase::Backward] {
                let t: f64 = self.ops.iter().filter(|o| o.phase == phase).map(|o| o.costs_ms[*m]).sum();
                let _ = write!(s, "{t:>14.1}");
            }
        }
        let _ = writeln!(s);
        s
    }
}
