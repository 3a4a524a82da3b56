//! Plan sets for serving: one placement per load bucket (decode steps by batch size,
//! prefills by prompt length), with what each machine must hold for all of them at once.
//!
//! Each bucket is solved as its own inference request (decode buckets: `batch` requests
//! at half the context prompt and half generated, judged by the decode step; prefill
//! buckets: one prompt of that length), so each keeps its own proven bound and gap. A
//! machine holds the weights of every op any bucket places on it, each once, plus the KV
//! cache of the largest decode bucket; the set says whether that fits.
//!
//! [`switching`] prices what a server following the load weighs each step: every decode
//! placement's step at every decode bucket's batch (the exact evaluation of that
//! placement on that bucket's instance), and moving a request's KV cache between two
//! placements' attention machines over the links.

use std::collections::{BTreeSet, HashMap};

use lemur_protocol::{OpKind, Phase};

use crate::cost::CostModel;
use crate::evaluate::evaluate;
use crate::planning::{plan, PlanRequest, Planned, PlanningError};
use crate::problem::Mode;

/// The buckets of a plan set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// Decode batch sizes.
    pub decode: Vec<u64>,
    /// Prefill prompt lengths.
    pub prefill: Vec<u64>,
    /// Positions per request (prompt plus generated) that decode buckets plan for.
    pub context: u64,
}

impl Default for Buckets {
    fn default() -> Self {
        Self { decode: vec![1, 4, 16, 64], prefill: vec![128, 512, 2048], context: 2048 }
    }
}

/// One bucket's placement and figures.
#[derive(Debug)]
pub struct BucketPlan {
    pub phase: Phase,
    /// Batch size (decode) or prompt length (prefill).
    pub size: u64,
    pub planned: Planned,
    /// Seconds of one step (a decode step of the batch, or the prefill).
    pub step_s: f64,
    /// Generated tokens per second (decode) or prompt tokens per second (prefill).
    pub tokens_per_s: f64,
    /// The best single machine's figure for the same step: (name, tokens per second).
    pub best_single: Option<(String, f64)>,
    /// Each machine's share of the step's compute.
    pub share: Vec<f64>,
}

/// A serving plan set.
#[derive(Debug)]
pub struct PlanSet {
    pub machines: Vec<String>,
    pub buckets: Vec<BucketPlan>,
    /// Per machine: weights of every op any bucket places there (once each), and the KV
    /// cache of the largest decode bucket.
    pub weight_bytes: Vec<u64>,
    pub kv_bytes: Vec<u64>,
    pub capacity_bytes: Vec<u64>,
    /// What switching between the decode placements costs and gains.
    pub switching: lemur_protocol::plan::Switching,
    /// Positions per request the decode buckets planned for.
    pub context: u64,
}

impl PlanSet {
    /// The set as a file.
    pub fn to_file(&self) -> lemur_protocol::plan::PlanSet {
        let bucket = |b: &BucketPlan| lemur_protocol::plan::PlanBucket { size: b.size, plan: b.planned.plan.clone() };
        let by = |v: &[u64]| self.machines.iter().cloned().zip(v.iter().copied()).collect();
        lemur_protocol::plan::PlanSet {
            format_version: lemur_protocol::PLAN_FORMAT_VERSION,
            decode: self.buckets.iter().filter(|b| b.phase == Phase::Decode).map(bucket).collect(),
            prefill: self.buckets.iter().filter(|b| b.phase == Phase::Prefill).map(bucket).collect(),
            weight_bytes: by(&self.weight_bytes),
            kv_bytes: by(&self.kv_bytes),
            switching: self.switching.clone(),
        }
    }

    /// Whether every machine holds what the set needs of it.
    pub fn fits(&self) -> bool {
        (0..self.machines.len()).all(|m| self.weight_bytes[m] + self.kv_bytes[m] <= self.capacity_bytes[m])
    }

    /// The set as a table: bucket, placement, step time, tokens/s against the best single
    /// machine, then memory per machine.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<34} {:>12} {:>12} {:>26}",
            "bucket", "placement (share of compute)", "step ms", "tokens/s", "best single machine"
        );
        for b in &self.buckets {
            let name = match b.phase {
                Phase::Decode => format!("decode x{}", b.size),
                _ => format!("prefill {}", b.size),
            };
            let placement: Vec<String> = self
                .machines
                .iter()
                .zip(&b.share)
                .filter(|(_, s)| **s > 0.005)
                .map(|(m, s)| format!("{m} {:.0}%", s * 100.0))
                .collect();
            let single = b
                .best_single
                .as_ref()
                .map_or("-".to_string(), |(m, t)| format!("{m} {t:.1} ({:.2}x)", b.tokens_per_s / t));
            let _ = writeln!(
                out,
                "{:<16} {:<34} {:>12.2} {:>12.1} {:>26}",
                name,
                placement.join(" · "),
                b.step_s * 1e3,
                b.tokens_per_s,
                single
            );
        }
        let decode: Vec<&BucketPlan> = self.buckets.iter().filter(|b| b.phase == Phase::Decode).collect();
        if decode.len() > 1 {
            let sw = &self.switching;
            let half = (self.context / 2).max(1) as f64;
            let _ = writeln!(
                out,
                "\nfollowing the load (decode): each bucket in its own placement and in x{}'s, and moving one \
                 request's cache ({half:.0} positions) from x{}'s placement to the bucket's:",
                decode[0].size, decode[0].size
            );
            let theirs = format!("x{}'s placement ms", decode[0].size);
            let _ = writeln!(out, "{:<16} {:>12} {:>22} {:>16}", "bucket", "own ms", theirs, "move ms");
            for (b, bucket) in decode.iter().enumerate().skip(1) {
                let (own, fixed) = (sw.decode_step_ms[b][b], sw.decode_step_ms[0][b]);
                let moved = sw.move_fixed_ms[0][b] + sw.move_ms_per_position[0][b] * half;
                let _ = writeln!(
                    out,
                    "{:<16} {:>12.2} {:>14.2} ({:.2}x) {:>16.2}",
                    format!("decode x{}", bucket.size),
                    own,
                    fixed,
                    fixed / own,
                    moved
                );
            }
        }
        let gb = |b: u64| b as f64 / 1e9;
        let _ = writeln!(out, "\nmemory per machine (weights of every bucket once + KV of the largest decode bucket):");
        for (m, name) in self.machines.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {name}: {:.2} GB weights + {:.2} GB KV of {:.2} GB usable",
                gb(self.weight_bytes[m]),
                gb(self.kv_bytes[m]),
                gb(self.capacity_bytes[m])
            );
        }
        let _ =
            writeln!(out, "{}", if self.fits() { "the set fits" } else { "the set does NOT fit: plan fewer buckets" });
        out
    }
}

/// Plans every bucket of `buckets` for `base` (its model, machines, precision and solver
/// options; its mode is replaced per bucket).
pub fn plan_set(cost: &impl CostModel, base: &PlanRequest, buckets: &Buckets) -> Result<PlanSet, PlanningError> {
    let mut out = Vec::new();
    let half = (buckets.context / 2).max(1);
    for &b in &buckets.decode {
        let mut req = base.clone();
        req.mode = Mode::Infer { prompt: half, gen_tokens: half, batch: b.max(1) };
        out.push(bucket(cost, &req, Phase::Decode, b.max(1))?);
    }
    for &l in &buckets.prefill {
        let mut req = base.clone();
        req.mode = Mode::Infer { prompt: l.max(1), gen_tokens: 1, batch: 1 };
        out.push(bucket(cost, &req, Phase::Prefill, l.max(1))?);
    }
    let first = out.first().ok_or(PlanningError::Options {
        field: "buckets",
        problem: "a plan set needs at least one decode or prefill bucket".into(),
    })?;
    let inst = &first.planned.instance;
    let machines: Vec<String> = inst.machines.iter().map(|m| m.name.clone()).collect();
    let capacity_bytes = inst.machines.iter().map(|m| m.profile.memory.usable_bytes).collect();
    // Weights by (kind, layer) on each machine, over every phase of every bucket.
    let mut held: Vec<BTreeSet<(OpKind, Option<u32>)>> = vec![BTreeSet::new(); machines.len()];
    let mut bytes_of: HashMap<(OpKind, Option<u32>), u64> = HashMap::new();
    let mut kv_bytes = vec![0u64; machines.len()];
    for b in &out {
        let inst = &b.planned.instance;
        let mut kv = vec![0u64; machines.len()];
        for (p, phase) in inst.phases.iter().enumerate() {
            for (i, op) in phase.graph.ops() {
                let m = b.planned.assignment.units[p][phase.unit_of[i]];
                if op.weight_bytes > 0 {
                    held[m].insert((op.kind, op.layer));
                    bytes_of.insert((op.kind, op.layer), op.weight_bytes);
                }
                if b.phase == Phase::Decode && op.phase == Phase::Decode {
                    kv[m] += op.kv_cache_bytes;
                }
            }
        }
        for (k, v) in kv_bytes.iter_mut().zip(kv) {
            *k = (*k).max(v);
        }
    }
    let weight_bytes = held.iter().map(|h| h.iter().map(|k| bytes_of[k]).sum()).collect();
    let decode: Vec<&BucketPlan> = out.iter().filter(|b| b.phase == Phase::Decode).collect();
    let switching = switching(&decode);
    let context = buckets.context;
    Ok(PlanSet { machines, buckets: out, weight_bytes, kv_bytes, capacity_bytes, switching, context })
}

/// The prices of switching between decode placements (`buckets`, all decode): each
/// placement's step at each bucket's batch, and moving one request's KV cache from one
/// placement's decode attention machines to another's (per layer that changes machine:
/// the link's fixed cost, and its per-byte cost times the bytes of one position's K and V).
pub fn switching(buckets: &[&BucketPlan]) -> lemur_protocol::plan::Switching {
    let decode = 1;
    let step = |p: &BucketPlan, b: &BucketPlan| {
        let m = evaluate(&b.planned.instance, &p.planned.assignment);
        m.latency_s.get(decode).copied().unwrap_or(f64::NAN) * 1e3
    };
    let decode_step_ms = buckets.iter().map(|p| buckets.iter().map(|b| step(p, b)).collect()).collect();
    // Per layer, the machine of each placement's decode attention.
    let attention = |b: &BucketPlan| -> Vec<(Option<u32>, usize)> {
        let inst = &b.planned.instance;
        let ph = &inst.phases[decode];
        let mut at: Vec<(Option<u32>, usize)> = ph
            .graph
            .ops()
            .filter(|(_, op)| op.kind == OpKind::Attention)
            .map(|(i, op)| (op.layer, b.planned.assignment.machine_of(inst, decode, i)))
            .collect();
        at.sort();
        at
    };
    let (mut fixed, mut per_position) = (Vec::new(), Vec::new());
    for p in buckets {
        let (mut f_row, mut p_row) = (Vec::new(), Vec::new());
        for q in buckets {
            let inst = &q.planned.instance;
            let bytes = 2 * inst.model.kv_dim() * inst.dtype.bytes();
            let (mut f, mut per) = (0.0, 0.0);
            for ((_, a), (_, b)) in attention(p).into_iter().zip(attention(q)) {
                if a != b {
                    let (per_byte, fixed_s) = inst.link_cost[a][b];
                    f += fixed_s * 1e3;
                    per += per_byte * bytes as f64 * 1e3;
                }
            }
            f_row.push(f);
            p_row.push(per);
        }
        fixed.push(f_row);
        per_position.push(p_row);
    }
    lemur_protocol::plan::Switching { decode_step_ms, move_fixed_ms: fixed, move_ms_per_position: per_position }
}

fn bucket(cost: &impl CostModel, req: &PlanRequest, phase: Phase, size: u64) -> Result<BucketPlan, PlanningError> {
    let planned = plan(cost, req)?;
    let p = usize::from(phase == Phase::Decode);
    let step_s = planned.metrics.latency_s.get(p).copied().unwrap_or(f64::NAN);
    let tokens_per_s = size as f64 / step_s;
    let compute = &planned.metrics.compute_s[p];
    let total: f64 = compute.iter().sum();
    let share = compute.iter().map(|c| if total > 0.0 { c / total } else { 0.0 }).collect();
    let best_single = planned
        .baselines
        .iter()
        .filter(|b| b.name.starts_with("all on ") && b.metrics.feasible())
        .filter_map(|b| {
            b.metrics.latency_s.get(p).map(|s| (b.name.trim_start_matches("all on ").to_string(), size as f64 / s))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    Ok(BucketPlan { phase, size, planned, step_s, tokens_per_s, best_single, share })
}
