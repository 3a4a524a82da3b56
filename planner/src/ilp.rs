//! The placement ILP (good_lp over HiGHS): binary placement of every unit on every machine,
//! crossing variables for every tensor and destination, memory rows, and the objective.
//!
//! Formulation, per phase p (prefill/decode, or the training graph), unit u, machine m:
//! - `x[p][u][m]` binary, `sum_m x[p][u][m] = 1`; units whose buffers exceed a machine's
//!   largest allocation are fixed off it. A training op and its backward form one unit.
//! - `y[p][t][d] >= x[p][unit(c)][d] - x[p][unit(producer)][d]` for every consumer `c` of
//!   tensor `t`: the tensor is sent to `d` once, however many consumers there read it.
//! - inference: `w[o][m] >= x[prefill][o][m]`, `w[o][m] >= x[decode][o][m]` (the machine
//!   holds op o's weights), `h[a][d] >= x[decode][a][d] - x[prefill][a][d]` (attention a's
//!   prompt KV cache is handed over to d).
//! - memory: weights + optimizer state + saved activations x in-flight micro-batches + KV
//!   cache on m <= usable bytes of m.
//! - latency objective: sum of weighted unit times and crossing times; throughput: `T` at
//!   least every machine's weighted compute and every machine's weighted incoming transfers.
//! - cuts: the objective is at least the analytic bounds; machines with one profile are
//!   ordered by load (symmetry breaking).

use std::time::Instant;

use good_lp::solvers::highs::highs;
use good_lp::{constraint, variable, Expression, ProblemVariables, SolverModel, Variable};

use crate::evaluate::{evaluate, Assignment};
use crate::problem::{Instance, Objective};

/// What the solver returned.
#[derive(Debug, Clone)]
pub struct IlpOutcome {
    /// The solver's best placement, if it found one.
    pub assignment: Option<Assignment>,
    /// The solver's proven lower bound on the objective (seconds).
    pub dual_bound: f64,
    /// The solver's own relative gap.
    pub gap: f64,
    pub status: String,
    /// The solver's objective value for its placement (seconds).
    pub objective_value: f64,
    pub seconds: f64,
    pub num_vars: usize,
    pub num_rows: usize,
}

/// Solver settings.
#[derive(Debug, Clone, Copy)]
pub struct IlpOptions {
    pub time_limit_s: f64,
    pub rel_gap: f64,
    /// Warm start, analytic-bound cuts and symmetry rows. Off gives the plain formulation
    /// (kept for the solver benchmark's baseline).
    pub structured: bool,
}

impl Default for IlpOptions {
    fn default() -> Self {
        Self { time_limit_s: 60.0, rel_gap: 1e-3, structured: true }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IlpError {
    #[error("the HiGHS solver failed: {0}")]
    Solver(String),
}

/// Variables with their column index (HiGHS columns are numbered in creation order).
struct Vars {
    vars: ProblemVariables,
    count: usize,
}

impl Vars {
    fn add(&mut self, def: good_lp::VariableDefinition) -> (Variable, usize) {
        self.count += 1;
        (self.vars.add(def), self.count - 1)
    }
}

/// The analytic lower bounds: every unit on its best machine with free links (latency), and
/// perfect balance of that best-machine work (throughput). Seconds.
pub fn analytic_bounds(inst: &Instance) -> (f64, f64) {
    let k = inst.num_machines();
    let mut best_sum = 0.0;
    let mut biggest: f64 = 0.0;
    for ph in &inst.phases {
        for u in 0..ph.units.len() {
            let b = (0..k).map(|m| ph.unit_time(u, m)).fold(f64::INFINITY, f64::min);
            best_sum += ph.weight * b;
            biggest = biggest.max(ph.weight * b);
        }
    }
    (best_sum, (best_sum / k as f64).max(biggest))
}

/// Builds and solves the ILP, warm-started from `start`.
///
/// HiGHS sometimes hands back the warm start's columns instead of its own incumbent (seen
/// when presolve settles the model): the returned placement then prices above the solver's
/// objective. That is detected, and the model solved again without the hint, with the warm
/// start's objective as a cutoff.
pub fn solve(inst: &Instance, start: &Assignment, opts: IlpOptions) -> Result<IlpOutcome, IlpError> {
    let t0 = Instant::now();
    let start = &canonical(inst, start);
    let first = solve_once(inst, start, opts, opts.structured)?;
    if !opts.structured {
        return Ok(first);
    }
    let stale = match &first.assignment {
        Some(a) => {
            let exact = evaluate(inst, a).objective_s;
            exact > first.objective_value * (1.0 + 1e-9) + 1e-12
        }
        None => false,
    };
    if !stale {
        return Ok(first);
    }
    tracing::debug!("HiGHS returned the warm start's columns; solving again without the hint");
    let left = (opts.time_limit_s - t0.elapsed().as_secs_f64()).max(0.5);
    let mut second = solve_once(inst, start, IlpOptions { time_limit_s: left, ..opts }, false)?;
    second.seconds = t0.elapsed().as_secs_f64();
    Ok(second)
}

/// Relabels machines that share a profile so that their loads are non-increasing, as the
/// symmetry rows demand (otherwise HiGHS would reject the warm start).
pub fn canonical(inst: &Instance, a: &Assignment) -> Assignment {
    let k = inst.num_machines();
    let m = evaluate(inst, a);
    let (load, _) = m.resource_loads(inst);
    let mut map: Vec<usize> = (0..k).collect();
    let mut done = vec![false; k];
    for i in 0..k {
        if done[i] {
            continue;
        }
        let group: Vec<usize> = (i..k).filter(|&j| inst.machines[j].profile == inst.machines[i].profile).collect();
        let mut by_load = group.clone();
        by_load.sort_by(|&x, &y| load[y].total_cmp(&load[x]));
        for (slot, &from) in group.iter().zip(&by_load) {
            map[from] = *slot;
            done[*slot] = true;
        }
    }
    Assignment { units: a.units.iter().map(|row| row.iter().map(|&x| map[x]).collect()).collect() }
}

fn solve_once(inst: &Instance, start: &Assignment, opts: IlpOptions, hint: bool) -> Result<IlpOutcome, IlpError> {
    let t0 = Instant::now();
    let k = inst.num_machines();
    let mut v = Vars { vars: ProblemVariables::new(), count: 0 };
    let mut init: Vec<f64> = Vec::new();
    let start_metrics = evaluate(inst, start);

    // x[p][u][m]
    let mut x: Vec<Vec<Vec<Variable>>> = Vec::new();
    for (p, ph) in inst.phases.iter().enumerate() {
        let mut xp = Vec::with_capacity(ph.units.len());
        for u in 0..ph.units.len() {
            let mut row = Vec::with_capacity(k);
            for m in 0..k {
                let ub = if inst.unit_allowed(p, u, m) { 1.0 } else { 0.0 };
                let (var, _) = v.add(variable().binary().max(ub));
                init.push(if start.units[p][u] == m { 1.0 } else { 0.0 });
                row.push(var);
            }
            xp.push(row);
        }
        x.push(xp);
    }
    // y[p][t][d] for tensors that can cross.
    let mut y: Vec<Vec<(usize, Vec<Variable>)>> = Vec::new();
    for (p, ph) in inst.phases.iter().enumerate() {
        let mut yp = Vec::new();
        for (ti, t) in ph.tensors.iter().enumerate() {
            let pu = ph.unit_of[t.producer];
            if t.consumers.iter().all(|&c| ph.unit_of[c] == pu) {
                continue;
            }
            let src = start.units[p][pu];
            let mut row = Vec::with_capacity(k);
            for d in 0..k {
                let (var, _) = v.add(variable().min(0.0).max(1.0));
                let sent = d != src && t.consumers.iter().any(|&c| start.units[p][ph.unit_of[c]] == d);
                init.push(if sent { 1.0 } else { 0.0 });
                row.push(var);
            }
            yp.push((ti, row));
        }
        y.push(yp);
    }
    let two_phase = inst.phases.len() == 2;
    // w[o][m]: weights held (inference, two phases).
    let n_ops = inst.phases[0].graph.len();
    let mut w: Vec<Option<Vec<Variable>>> = vec![None; n_ops];
    if two_phase {
        for (o, slot) in w.iter_mut().enumerate() {
            if inst.phases[0].graph.op(o).weight_bytes == 0 {
                continue;
            }
            let mut row = Vec::with_capacity(k);
            for m in 0..k {
                let (var, _) = v.add(variable().min(0.0).max(1.0));
                let held = (0..2).any(|p| start.machine_of(inst, p, o) == m);
                init.push(if held { 1.0 } else { 0.0 });
                row.push(var);
            }
            *slot = Some(row);
        }
    }
    // h[a][d]: handover of attention a's prompt KV cache to d.
    let mut h: Vec<(usize, u64, Vec<Variable>)> = Vec::new();
    if two_phase {
        for &(att, bytes) in &inst.handover_bytes {
            let mut row = Vec::with_capacity(k);
            let (from, to) = (start.machine_of(inst, 0, att), start.machine_of(inst, 1, att));
            for d in 0..k {
                let (var, _) = v.add(variable().min(0.0).max(1.0));
                init.push(if d == to && from != to { 1.0 } else { 0.0 });
                row.push(var);
            }
            h.push((att, bytes, row));
        }
    }
    let throughput = inst.objective == Objective::Throughput;
    let t_var = if throughput {
        let (var, _) = v.add(variable().min(0.0));
        init.push(start_metrics.objective_s);
        Some(var)
    } else {
        None
    };

    // Expressions: per-machine weighted compute and ingress, total latency.
    let mut compute: Vec<Expression> = vec![Expression::from(0.0); k];
    let mut ingress: Vec<Expression> = vec![Expression::from(0.0); k];
    let mut latency = Expression::from(0.0);
    for (p, ph) in inst.phases.iter().enumerate() {
        for (u, row) in x[p].iter().enumerate() {
            for (m, &var) in row.iter().enumerate() {
                let c = ph.weight * ph.unit_time(u, m);
                compute[m] += c * var;
                latency += c * var;
            }
        }
        for (ti, row) in &y[p] {
            let bytes = ph.tensors[*ti].bytes;
            for (d, &var) in row.iter().enumerate() {
                let c = ph.weight * inst.ingress_s(d, bytes);
                ingress[d] += c * var;
                latency += c * var;
            }
        }
    }
    for (_, bytes, row) in &h {
        for (d, &var) in row.iter().enumerate() {
            let c = inst.ingress_s(d, *bytes);
            ingress[d] += c * var;
            latency += c * var;
        }
    }
    let objective = match t_var {
        Some(t) => Expression::from(t),
        None => latency.clone(),
    };
    let mut model = v.vars.minimise(objective.clone()).using(highs);
    let mut rows = 0usize;
    let mut add = |model: &mut good_lp::solvers::highs::HighsProblem, c: good_lp::Constraint| {
        model.add_constraint(c);
        rows += 1;
    };

    for xp in &x {
        for row in xp {
            let s: Expression = row.iter().copied().sum();
            add(&mut model, constraint!(s == 1.0));
        }
    }
    for (p, ph) in inst.phases.iter().enumerate() {
        for (ti, row) in &y[p] {
            let t = &ph.tensors[*ti];
            let pu = ph.unit_of[t.producer];
            let mut seen = Vec::new();
            for &c in &t.consumers {
                let cu = ph.unit_of[c];
                if cu == pu || seen.contains(&cu) {
                    continue;
                }
                seen.push(cu);
                for d in 0..k {
                    add(&mut model, constraint!(row[d] >= x[p][cu][d] - x[p][pu][d]));
                }
            }
        }
    }
    if two_phase {
        for (o, slot) in w.iter().enumerate() {
            if let Some(row) = slot {
                for (m, &wv) in row.iter().enumerate() {
                    for (p, ph) in inst.phases.iter().enumerate() {
                        add(&mut model, constraint!(wv >= x[p][ph.unit_of[o]][m]));
                    }
                }
            }
        }
        for (att, _, row) in &h {
            let (u0, u1) = (inst.phases[0].unit_of[*att], inst.phases[1].unit_of[*att]);
            for (d, &hv) in row.iter().enumerate() {
                add(&mut model, constraint!(hv >= x[1][u1][d] - x[0][u0][d]));
            }
        }
    }
    // Memory.
    for m in 0..k {
        let mut mem = Expression::from(0.0);
        for (p, ph) in inst.phases.iter().enumerate() {
            for (o, op) in ph.graph.ops() {
                let var = x[p][ph.unit_of[o]][m];
                let other = op.state_bytes(inst.inflight);
                let weights = if two_phase { 0 } else { op.weight_bytes };
                let bytes = (other + weights) as f64;
                if bytes > 0.0 {
                    mem += bytes * var;
                }
            }
        }
        if two_phase {
            for (o, slot) in w.iter().enumerate() {
                if let Some(row) = slot {
                    mem += inst.phases[0].graph.op(o).weight_bytes as f64 * row[m];
                }
            }
        }
        // Less the scratch a training step over a quantized base dequantizes into.
        let cap = inst.machines[m].profile.memory.usable_bytes.saturating_sub(inst.workspace_bytes) as f64;
        add(&mut model, constraint!(mem <= cap));
    }
    // Objective rows and cuts.
    let (lat_bound, thr_bound) = analytic_bounds(inst);
    if let Some(t) = t_var {
        for m in 0..k {
            add(&mut model, constraint!(t >= compute[m].clone()));
            add(&mut model, constraint!(t >= ingress[m].clone()));
        }
        if opts.structured {
            add(&mut model, constraint!(t >= thr_bound));
        }
    } else if opts.structured {
        add(&mut model, constraint!(latency.clone() >= lat_bound));
    }
    // Symmetry: machines sharing a profile are interchangeable; order them by load.
    for a in (0..k).filter(|_| opts.structured) {
        if let Some(b) = (a + 1..k).find(|&b| inst.machines[b].profile == inst.machines[a].profile) {
            add(&mut model, constraint!(compute[a].clone() >= compute[b].clone()));
        }
    }
    let num_vars = init.len();

    let mut hm = model.into_inner();
    hm.make_quiet();
    hm.set_option("time_limit", opts.time_limit_s.max(0.01));
    hm.set_option("mip_rel_gap", opts.rel_gap);
    hm.set_option("random_seed", 7);
    hm.set_option("threads", 1);
    if hint {
        // A warm start that breaks a symmetry row would be rejected; HiGHS then starts cold.
        let _ = hm.try_set_solution(Some(&init), None, None, None);
    } else if opts.structured {
        // No incumbent to hand over: prune everything worse than the warm start instead.
        hm.set_option("objective_bound", start_metrics.objective_s * (1.0 + 1e-9) + 1e-12);
    }
    let solved = hm.try_solve().map_err(|e| IlpError::Solver(format!("{e:?}")))?;
    let status = format!("{:?}", solved.status());
    let gap = solved.mip_gap();
    let dual_bound = solved.double_info_value(c"mip_dual_bound").unwrap_or(f64::NEG_INFINITY);
    let assignment = if solved.primal_solution_status() == highs::HighsSolutionStatus::Feasible {
        let sol = solved.get_solution();
        let cols = sol.columns();
        let mut a = Assignment { units: Vec::new() };
        let mut idx = 0;
        for ph in &inst.phases {
            let mut row = Vec::with_capacity(ph.units.len());
            for _ in 0..ph.units.len() {
                let best = (0..k).max_by(|&i, &j| cols[idx + i].total_cmp(&cols[idx + j])).unwrap_or(0);
                row.push(best);
                idx += k;
            }
            a.units.push(row);
        }
        Some(a)
    } else {
        None
    };
    Ok(IlpOutcome {
        assignment,
        dual_bound,
        gap: if gap.is_finite() { gap } else { f64::INFINITY },
        status,
        objective_value: solved.objective_value(),
        seconds: t0.elapsed().as_secs_f64(),
        num_vars,
        num_rows: rows,
    })
}
