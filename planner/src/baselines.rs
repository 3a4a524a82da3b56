//! The placements Lemurian is compared against, and the heuristics that warm-start the ILP:
//! single machines, contiguous layer splits (by memory as exo and llama.cpp RPC do, by peak
//! FLOPS as cake does, optimal by dynamic programming as pipeline planners do), greedy per
//! op, and a local search over single-unit moves.

use std::time::{Duration, Instant};

use crate::evaluate::{evaluate, Assignment, Metrics};
use crate::problem::{Instance, Objective};

/// A baseline placement and what it costs.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub name: String,
    pub assignment: Assignment,
    pub metrics: Metrics,
}

/// A comparable score: feasibility first, then the objective, then a tie-break.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub excess_bytes: u64,
    pub violations: usize,
    pub objective: f64,
    pub secondary: f64,
}

impl Score {
    pub fn of(inst: &Instance, m: &Metrics) -> Self {
        let excess_bytes = m
            .memory_bytes
            .iter()
            .zip(&inst.machines)
            .map(|(&u, mc)| u.saturating_sub(mc.profile.memory.usable_bytes))
            .sum();
        let secondary = match inst.objective {
            Objective::Latency => m.transfer_total_s,
            Objective::Throughput => {
                let (c, i) = m.resource_loads(inst);
                c.iter().chain(&i).map(|x| x * x).sum::<f64>() + m.transfer_total_s * 1e-3
            }
        };
        Self { excess_bytes, violations: m.violations.len(), objective: m.objective_s, secondary }
    }

    /// Strictly better than `other`.
    pub fn better(&self, other: &Score) -> bool {
        if self.violations != other.violations || self.excess_bytes != other.excess_bytes {
            return (self.excess_bytes, self.violations) < (other.excess_bytes, other.violations);
        }
        let tol = 1e-12 * other.objective.abs().max(1e-9);
        if self.objective < other.objective - tol {
            return true;
        }
        self.objective <= other.objective + tol && self.secondary < other.secondary * (1.0 - 1e-12)
    }
}

fn baseline(inst: &Instance, name: String, assignment: Assignment) -> Baseline {
    let metrics = evaluate(inst, &assignment);
    Baseline { name, assignment, metrics }
}

/// Block of every unit of every phase: 0 embedding, 1..=L layers, L+1 head.
fn unit_blocks(inst: &Instance) -> Vec<Vec<usize>> {
    let l = inst.model.num_layers;
    inst.phases.iter().map(|ph| ph.units.iter().map(|u| ph.graph.op(u[0]).block(l) as usize).collect()).collect()
}

/// The assignment that gives block `b` to `machine_of_block[b]`.
fn by_blocks(inst: &Instance, machine_of_block: &[usize]) -> Assignment {
    Assignment { units: unit_blocks(inst).iter().map(|ub| ub.iter().map(|&b| machine_of_block[b]).collect()).collect() }
}

/// Contiguous layers in proportion to `shares`, machines in cluster order; the embedding
/// goes with the first machine's layers and the head with the last's.
pub fn proportional(inst: &Instance, shares: &[f64]) -> Assignment {
    let l = inst.model.num_layers as usize;
    let total: f64 = shares.iter().sum();
    let mut machine_of_block = vec![0; l + 2];
    let mut acc = 0.0;
    let mut start = 0;
    for (m, s) in shares.iter().enumerate() {
        acc += s / total;
        let end = if m + 1 == shares.len() { l } else { ((acc * l as f64).round() as usize).clamp(start, l) };
        for b in start..end {
            machine_of_block[b + 1] = m;
        }
        start = end;
    }
    machine_of_block[0] = machine_of_block[1];
    machine_of_block[l + 1] = machine_of_block[l];
    by_blocks(inst, &machine_of_block)
}

/// Distinct orders of the machines (machines with one profile are interchangeable), at most `cap`.
fn machine_orders(inst: &Instance, cap: usize) -> Vec<Vec<usize>> {
    fn rec(inst: &Instance, left: &mut Vec<usize>, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>, cap: usize) {
        if out.len() >= cap {
            return;
        }
        if left.is_empty() {
            out.push(cur.clone());
            return;
        }
        let mut seen: Vec<&str> = Vec::new();
        for i in 0..left.len() {
            let m = left[i];
            let kind = inst.machines[m].profile.name.as_str();
            if seen.contains(&kind) {
                continue;
            }
            seen.push(kind);
            left.remove(i);
            cur.push(m);
            rec(inst, left, cur, out, cap);
            cur.pop();
            left.insert(i, m);
        }
    }
    let mut out = Vec::new();
    rec(inst, &mut (0..inst.num_machines()).collect(), &mut Vec::new(), &mut out, cap);
    out
}

/// Precomputed costs of a chain of items (blocks or units) for the contiguous DP.
struct Chain {
    /// Weighted compute seconds of item i on machine m.
    time: Vec<Vec<f64>>,
    /// Memory bytes of item i (weights, optimizer, saved activations, KV cache).
    mem: Vec<u64>,
    /// `cut[i]`: weighted bytes per phase crossing the boundary before item i.
    cut: Vec<Vec<u64>>,
    /// Item of every unit of every phase.
    item_of_unit: Vec<Vec<usize>>,
}

fn chain(inst: &Instance, blocks: bool) -> Chain {
    let item_of_unit: Vec<Vec<usize>> = if blocks {
        unit_blocks(inst)
    } else {
        // Units in the first phase's order; later phases map through op ids.
        let first = &inst.phases[0];
        inst.phases
            .iter()
            .map(|ph| ph.units.iter().map(|u| first.unit_of[u[0].min(first.graph.len() - 1)]).collect())
            .collect()
    };
    let n = item_of_unit.iter().flatten().copied().max().unwrap_or(0) + 1;
    let k = inst.num_machines();
    let mut time = vec![vec![0.0; k]; n];
    let mut mem = vec![0u64; n];
    let mut cut = vec![vec![0u64; inst.phases.len()]; n + 1];
    for (p, ph) in inst.phases.iter().enumerate() {
        for (u, ops) in ph.units.iter().enumerate() {
            let item = item_of_unit[p][u];
            for (m, t) in time[item].iter_mut().enumerate() {
                *t += ph.weight * ph.unit_time(u, m);
            }
            for &o in ops {
                let op = ph.graph.op(o);
                let w = if p == 0 { op.weight_bytes } else { 0 };
                mem[item] += w + op.state_bytes(inst.inflight);
            }
        }
        for t in &ph.tensors {
            let a = item_of_unit[p][ph.unit_of[t.producer]];
            let last = t.consumers.iter().map(|&c| item_of_unit[p][ph.unit_of[c]]).max().unwrap_or(a);
            let first = t.consumers.iter().map(|&c| item_of_unit[p][ph.unit_of[c]]).min().unwrap_or(a);
            // A tensor crosses every boundary between its producer and its furthest consumer.
            let (lo, hi) = (a.min(first), a.max(last));
            for row in cut.iter_mut().take(hi + 1).skip(lo + 1) {
                row[p] += t.bytes;
            }
        }
    }
    Chain { time, mem, cut, item_of_unit }
}

/// The best contiguous split of the chain over machines in one of several orders, by DP.
/// Each machine gets a (possibly empty) run of items; the objective is approximated
/// separably and the winner judged exactly.
fn contiguous_dp(inst: &Instance, ch: &Chain, orders: &[Vec<usize>]) -> Option<Assignment> {
    let n = ch.time.len();
    let k = inst.num_machines();
    let mut best: Option<(Score, Assignment)> = None;
    // Prefix sums per machine.
    let mut pre = vec![vec![0.0; n + 1]; k];
    for (m, row) in pre.iter_mut().enumerate() {
        for i in 0..n {
            row[i + 1] = row[i] + ch.time[i][m];
        }
    }
    let mut pmem = vec![0u64; n + 1];
    for i in 0..n {
        pmem[i + 1] = pmem[i] + ch.mem[i];
    }
    let cut_cost = |i: usize, to: usize| -> f64 {
        inst.phases.iter().enumerate().map(|(p, ph)| ph.weight * inst.ingress_s(to, ch.cut[i][p])).sum()
    };
    let combine = |acc: f64, seg: f64| match inst.objective {
        Objective::Latency => acc + seg,
        Objective::Throughput => acc.max(seg),
    };
    for order in orders {
        // dp[j][i]: best value with items 0..i on the first j machines of the order.
        let mut dp = vec![vec![f64::INFINITY; n + 1]; k + 1];
        let mut from = vec![vec![0usize; n + 1]; k + 1];
        dp[0][0] = 0.0;
        for j in 1..=k {
            let m = order[j - 1];
            let cap = inst.machines[m].profile.memory.usable_bytes.saturating_sub(inst.workspace_bytes);
            for i in 0..=n {
                // Machine m takes items s..i.
                for s in 0..=i {
                    let prev = dp[j - 1][s];
                    if !prev.is_finite() {
                        continue;
                    }
                    if s < i && pmem[i] - pmem[s] > cap {
                        continue;
                    }
                    let mut seg = pre[m][i] - pre[m][s];
                    if s < i && s > 0 {
                        let c = cut_cost(s, m);
                        seg = match inst.objective {
                            Objective::Latency => seg + c,
                            Objective::Throughput => seg.max(c),
                        };
                    }
                    let v = if s == i { prev } else { combine(prev, seg) };
                    if v < dp[j][i] {
                        dp[j][i] = v;
                        from[j][i] = s;
                    }
                }
            }
        }
        if !dp[k][n].is_finite() {
            continue;
        }
        let mut machine_of_item = vec![0; n];
        let mut i = n;
        for j in (1..=k).rev() {
            let s = from[j][i];
            for item in machine_of_item.iter_mut().take(i).skip(s) {
                *item = order[j - 1];
            }
            i = s;
        }
        let a = Assignment {
            units: ch.item_of_unit.iter().map(|row| row.iter().map(|&it| machine_of_item[it]).collect()).collect(),
        };
        let score = Score::of(inst, &evaluate(inst, &a));
        if best.as_ref().is_none_or(|(b, _)| score.better(b)) {
            best = Some((score, a));
        }
    }
    best.map(|(_, a)| a)
}

/// Greedy per op: units in execution order, each to the machine that adds least to the
/// objective given the units placed so far, skipping machines whose memory it would overflow.
pub fn greedy(inst: &Instance) -> Assignment {
    let k = inst.num_machines();
    let mut a = Assignment { units: inst.phases.iter().map(|p| vec![usize::MAX; p.units.len()]).collect() };
    let mut load = vec![0.0; k];
    let mut mem = vec![0u64; k];
    let n_ops = inst.phases[0].graph.len();
    let mut holds = vec![vec![false; k]; n_ops];
    for (p, ph) in inst.phases.iter().enumerate() {
        for (u, ops) in ph.units.iter().enumerate() {
            let mut best = (f64::INFINITY, 0usize, 0u64);
            for m in 0..k {
                if !inst.unit_allowed(p, u, m) {
                    continue;
                }
                let mut add_mem = 0;
                let mut comm = 0.0;
                for &o in ops {
                    let op = ph.graph.op(o);
                    if op.weight_bytes > 0 && o < n_ops && !holds[o][m] {
                        add_mem += op.weight_bytes;
                    }
                    add_mem += op.state_bytes(inst.inflight);
                    for pred in ph.graph.predecessors(o) {
                        let pm = a.units[p][ph.unit_of[pred]];
                        if pm != usize::MAX && pm != m {
                            let bytes = ph.tensors.iter().find(|t| t.producer == pred).map_or(0, |t| t.bytes);
                            comm += inst.transfer_s(pm, m, bytes);
                        }
                    }
                }
                let t = ph.weight * (ph.unit_time(u, m) + comm);
                let over = mem[m] + add_mem + inst.workspace_bytes > inst.machines[m].profile.memory.usable_bytes;
                let v = match inst.objective {
                    Objective::Latency => t,
                    Objective::Throughput => load[m] + t,
                } + if over { 1e9 } else { 0.0 };
                if v < best.0 {
                    best = (v, m, add_mem);
                }
            }
            let (_, m, add_mem) = best;
            a.units[p][u] = m;
            load[m] += ph.weight * ph.unit_time(u, m);
            mem[m] += add_mem;
            for &o in ops {
                if o < n_ops && ph.graph.op(o).weight_bytes > 0 {
                    holds[o][m] = true;
                }
            }
        }
    }
    a
}

/// Improves `a` by moving single units between machines while the score improves, for at
/// most `budget`.
pub fn local_search(inst: &Instance, mut a: Assignment, budget: Duration) -> Assignment {
    let start = Instant::now();
    let k = inst.num_machines();
    let mut score = Score::of(inst, &evaluate(inst, &a));
    loop {
        let mut improved = false;
        for p in 0..inst.phases.len() {
            for u in 0..a.units[p].len() {
                if start.elapsed() > budget {
                    return a;
                }
                let cur = a.units[p][u];
                let mut best: Option<(Score, usize)> = None;
                for m in (0..k).filter(|&m| m != cur && inst.unit_allowed(p, u, m)) {
                    a.units[p][u] = m;
                    let s = Score::of(inst, &evaluate(inst, &a));
                    if s.better(best.as_ref().map_or(&score, |b| &b.0)) {
                        best = Some((s, m));
                    }
                }
                match best {
                    Some((s, m)) => {
                        a.units[p][u] = m;
                        score = s;
                        improved = true;
                    }
                    None => a.units[p][u] = cur,
                }
            }
        }
        if !improved {
            return a;
        }
    }
}

/// Every baseline of the evidence table, priced by the same cost model.
pub fn baselines(inst: &Instance) -> Vec<Baseline> {
    let mut out = Vec::new();
    for m in 0..inst.num_machines() {
        out.push(baseline(inst, format!("all on {}", inst.machines[m].name), Assignment::single(inst, m)));
    }
    if inst.num_machines() > 1 {
        let mem: Vec<f64> = inst.machines.iter().map(|m| m.profile.memory.usable_bytes as f64).collect();
        out.push(baseline(inst, "layers by memory (exo, llama.cpp RPC)".into(), proportional(inst, &mem)));
        let flops: Vec<f64> = inst
            .machines
            .iter()
            .map(|m| {
                m.profile
                    .peak
                    .as_ref()
                    .and_then(|p| p.tflops.get(&inst.dtype).copied())
                    .unwrap_or_else(|| m.profile.gemm.values().map(|c| c.peak()).fold(0.0, f64::max))
            })
            .collect();
        out.push(baseline(inst, "layers by peak FLOPS (cake)".into(), proportional(inst, &flops)));
        let orders = machine_orders(inst, 5040);
        if let Some(a) = contiguous_dp(inst, &chain(inst, true), &orders) {
            out.push(baseline(inst, "optimal contiguous layers (DP, pipeline planners)".into(), a));
        }
        out.push(baseline(inst, "greedy per op".into(), greedy(inst)));
    }
    out
}

/// The best starting point for the ILP: the best baseline, the op-level contiguous DP, and
/// greedy, each improved by local search.
pub fn warm_start(inst: &Instance, base: &[Baseline], budget: Duration) -> Assignment {
    let mut starts: Vec<Assignment> = base.iter().map(|b| b.assignment.clone()).collect();
    if inst.num_machines() > 1 {
        let orders = machine_orders(inst, 24);
        if let Some(a) = contiguous_dp(inst, &chain(inst, false), &orders) {
            starts.push(a);
        }
    }
    let score = |a: &Assignment| Score::of(inst, &evaluate(inst, a));
    starts.sort_by(|x, y| {
        let (sx, sy) = (score(x), score(y));
        if sx.better(&sy) {
            std::cmp::Ordering::Less
        } else if sy.better(&sx) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    starts.truncate(2);
    let per = budget / starts.len().max(1) as u32;
    let mut best: Option<(Score, Assignment)> = None;
    for s in starts {
        let a = local_search(inst, s, per);
        let sc = score(&a);
        if best.as_ref().is_none_or(|(b, _)| sc.better(b)) {
            best = Some((sc, a));
        }
    }
    best.map(|(_, a)| a).unwrap_or_else(|| Assignment::single(inst, 0))
}
