//! Exact evaluation of a placement: per-machine compute, memory and link traffic, and the
//! objective. Baselines, heuristics and the ILP's answer are all judged by this one function.

use crate::problem::{Instance, Mode, Objective};

/// Where every unit of every phase runs: `units[phase][unit] = machine`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub units: Vec<Vec<usize>>,
}

impl Assignment {
    /// Everything on one machine.
    pub fn single(inst: &Instance, m: usize) -> Self {
        Self { units: inst.phases.iter().map(|p| vec![m; p.units.len()]).collect() }
    }

    /// The machine of op `op` in phase `p`.
    pub fn machine_of(&self, inst: &Instance, p: usize, op: usize) -> usize {
        self.units[p][inst.phases[p].unit_of[op]]
    }

    /// Whether machine `m` runs any unit of any phase.
    pub fn uses(&self, m: usize) -> bool {
        self.units.iter().flatten().any(|&x| x == m)
    }

    /// How many of the `k` machines run something.
    pub fn machines_used(&self, k: usize) -> u64 {
        (0..k).filter(|&m| self.uses(m)).count() as u64
    }
}

/// Adds the instance's scratch to every machine the placement runs something on.
fn add_workspace(inst: &Instance, a: &Assignment, mem: &mut [u64]) {
    for (m, b) in mem.iter_mut().enumerate() {
        if a.uses(m) {
            *b += inst.workspace_bytes;
        }
    }
}

/// What a placement costs, resource by resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Seconds of compute per phase per machine (one run of the phase).
    pub compute_s: Vec<Vec<f64>>,
    /// Seconds of incoming transfers per phase per machine.
    pub ingress_s: Vec<Vec<f64>>,
    /// Bytes received per phase per machine.
    pub ingress_bytes: Vec<Vec<u64>>,
    /// One run of each phase executed in order: compute plus transfers.
    pub latency_s: Vec<f64>,
    /// Inference: KV cache moved from prefill to decode placement.
    pub handover_s: f64,
    pub handover_bytes: u64,
    /// Handover seconds arriving at each machine.
    pub handover_in_s: Vec<f64>,
    /// Bytes resident per machine: weights, optimizer state, saved activations, KV cache.
    pub memory_bytes: Vec<u64>,
    /// The objective's value in seconds.
    pub objective_s: f64,
    /// Total transfer seconds (weighted): the throughput objective's tie-break.
    pub transfer_total_s: f64,
    /// Reasons the placement cannot run (memory or allocation limits); empty if it can.
    pub violations: Vec<String>,
}

impl Metrics {
    pub fn feasible(&self) -> bool {
        self.violations.is_empty()
    }

    /// Per-machine load of the throughput objective: weighted compute and ingress.
    pub fn resource_loads(&self, inst: &Instance) -> (Vec<f64>, Vec<f64>) {
        let k = inst.num_machines();
        let mut comp = vec![0.0; k];
        let mut ing = vec![0.0; k];
        for (p, ph) in inst.phases.iter().enumerate() {
            for m in 0..k {
                comp[m] += ph.weight * self.compute_s[p][m];
                ing[m] += ph.weight * self.ingress_s[p][m];
            }
        }
        for (v, h) in ing.iter_mut().zip(&self.handover_in_s) {
            *v += h;
        }
        (comp, ing)
    }
}

/// Evaluates `a` on `inst`.
pub fn evaluate(inst: &Instance, a: &Assignment) -> Metrics {
    let k = inst.num_machines();
    let np = inst.phases.len();
    let mut compute_s = vec![vec![0.0; k]; np];
    let mut ingress_s = vec![vec![0.0; k]; np];
    let mut ingress_bytes = vec![vec![0u64; k]; np];
    let mut latency_s = vec![0.0; np];
    let mut memory_bytes = vec![0u64; k];
    let mut violations = Vec::new();
    let mut transfer_total_s = 0.0;

    // Pipelined training keeps at most one micro-batch per stage in flight (1F1B): as many
    // as the machines the placement uses, capped by the planned in-flight count.
    let used = a.machines_used(k);
    let inflight = inst.inflight.min(used.max(1));
    // Weights are shared between phases (op ids match between prefill and decode).
    let n_ops = inst.phases[0].graph.len();
    let mut holds = vec![vec![false; k]; n_ops];
    for (p, ph) in inst.phases.iter().enumerate() {
        for (id, op) in ph.graph.ops() {
            let m = a.machine_of(inst, p, id);
            compute_s[p][m] += ph.costs.at(id, m);
            if op.weight_bytes > 0 && id < n_ops {
                holds[id][m] = true;
            }
            memory_bytes[m] += op.state_bytes(inflight);
        }
        for (u, &m) in a.units[p].iter().enumerate() {
            if !inst.unit_allowed(p, u, m) {
                let op = ph.units[u][0];
                violations.push(format!(
                    "{} ({}) needs a buffer larger than {}'s largest allocation",
                    ph.graph.op(op).label(),
                    ph.phase_name,
                    inst.machines[m].name
                ));
            }
        }
        let mut transfers = 0.0;
        for t in &ph.tensors {
            let src = a.machine_of(inst, p, t.producer);
            let mut sent = vec![false; k];
            for &c in &t.consumers {
                let dst = a.machine_of(inst, p, c);
                if dst != src && !sent[dst] {
                    sent[dst] = true;
                    let s = inst.transfer_s(src, dst, t.bytes);
                    ingress_s[p][dst] += s;
                    ingress_bytes[p][dst] += t.bytes;
                    transfers += s;
                }
            }
        }
        latency_s[p] = compute_s[p].iter().sum::<f64>() + transfers;
        transfer_total_s += ph.weight * transfers;
    }
    for (id, h) in holds.iter().enumerate() {
        for (m, &held) in h.iter().enumerate() {
            if held {
                memory_bytes[m] += inst.phases[0].graph.op(id).weight_bytes;
            }
        }
    }
    add_workspace(inst, a, &mut memory_bytes);
    let mut handover_s = 0.0;
    let mut handover_bytes = 0;
    let mut handover_in = vec![0.0; k];
    if inst.phases.len() == 2 {
        for &(att, bytes) in &inst.handover_bytes {
            let (from, to) = (a.machine_of(inst, 0, att), a.machine_of(inst, 1, att));
            if from != to {
                let s = inst.transfer_s(from, to, bytes);
                handover_s += s;
                handover_bytes += bytes;
                handover_in[to] += s;
            }
        }
    }
    transfer_total_s += handover_s;
    for (m, &used) in memory_bytes.iter().enumerate() {
        let cap = inst.machines[m].profile.memory.usable_bytes;
        if used > cap {
            violations.push(format!(
                "{} needs {:.2} GB but may use {:.2} GB ({:.2} GB short)",
                inst.machines[m].name,
                used as f64 / 1e9,
                cap as f64 / 1e9,
                (used - cap) as f64 / 1e9
            ));
        }
    }
    let mut metrics = Metrics {
        compute_s,
        ingress_s,
        ingress_bytes,
        latency_s,
        handover_s,
        handover_bytes,
        handover_in_s: handover_in,
        memory_bytes,
        objective_s: 0.0,
        transfer_total_s,
        violations,
    };
    metrics.objective_s = match inst.objective {
        Objective::Latency => {
            inst.phases.iter().zip(&metrics.latency_s).map(|(ph, l)| ph.weight * l).sum::<f64>() + metrics.handover_s
        }
        Objective::Throughput => {
            let (comp, ing) = metrics.resource_loads(inst);
            comp.iter().chain(&ing).copied().fold(0.0, f64::max)
        }
    };
    metrics
}

/// Predicted headline times of a placement, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Headline {
    /// Inference: time to first token (prefill, executed in order).
    pub ttft_s: Option<f64>,
    /// Inference: time per output token (one decode step, executed in order).
    pub tpot_s: Option<f64>,
    /// Training: one optimizer step over all micro-batches, pipelined.
    pub step_s: Option<f64>,
}

/// The numbers a user reads first.
pub fn headline(inst: &Instance, m: &Metrics) -> Headline {
    match &inst.mode {
        Mode::Infer { .. } => {
            Headline { ttft_s: Some(m.latency_s[0] + m.handover_s), tpot_s: m.latency_s.get(1).copied(), step_s: None }
        }
        Mode::Train { micro_batches, .. } => {
            // Pipelined: the first micro-batch pays the full latency, each further one the
            // busiest resource (GPipe/1F1B steady state).
            let (comp, ing) = m.resource_loads(inst);
            let bottleneck = comp.iter().chain(&ing).copied().fold(0.0, f64::max);
            let step = m.latency_s[0] + (*micro_batches as f64 - 1.0) * bottleneck;
            Headline { ttft_s: None, tpot_s: None, step_s: Some(step) }
        }
    }
}

/// Training's pipeline schedule for a placement, chosen to fit memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `gpipe` (every micro-batch's forward may run before the backwards drain) or `1f1b`
    /// (a micro-batch enters when one has left: at most one per stage in flight).
    pub name: &'static str,
    /// Micro-batches in flight at once.
    pub inflight: u64,
    /// Bytes each machine holds under this schedule.
    pub memory_bytes: Vec<u64>,
    /// What GPipe would need on each machine, when it does not fit.
    pub gpipe_memory_bytes: Vec<u64>,
}

/// GPipe when every machine holds every micro-batch's saved activations (the most overlap,
/// nothing to throttle), otherwise 1F1B with one micro-batch per stage the placement uses
/// (what the ILP's memory constraints assumed). `None` for inference.
pub fn schedule(inst: &Instance, a: &Assignment) -> Option<Schedule> {
    let Mode::Train { micro_batches, .. } = inst.mode else { return None };
    let k = inst.num_machines();
    let memory_at = |inflight: u64| {
        let mut mem = vec![0u64; k];
        for (p, ph) in inst.phases.iter().enumerate() {
            for (id, op) in ph.graph.ops() {
                mem[a.machine_of(inst, p, id)] += op.weight_bytes + op.state_bytes(inflight);
            }
        }
        add_workspace(inst, a, &mut mem);
        mem
    };
    let fits = |mem: &[u64]| mem.iter().zip(&inst.machines).all(|(b, m)| *b <= m.profile.memory.usable_bytes);
    let gpipe = memory_at(micro_batches);
    if fits(&gpipe) {
        return Some(Schedule {
            name: "gpipe",
            inflight: micro_batches,
            memory_bytes: gpipe,
            gpipe_memory_bytes: vec![],
        });
    }
    let used = a.machines_used(k);
    let inflight = inst.inflight.min(used.max(1)).min(micro_batches);
    Some(Schedule { name: "1f1b", inflight, memory_bytes: memory_at(inflight), gpipe_memory_bytes: gpipe })
}
