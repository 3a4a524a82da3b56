//! A serving plan set (`lemur-plan --serve --out`, `lemur-serve --plan-set`): one plan per
//! load bucket, what the set costs each machine, and the planner's prices for switching
//! a running batch from one decode placement to another.
//!
//! The server runs every step in one of the set's placements: prefill steps in a prefill
//! bucket's (by the step's prompt tokens), decode steps in a decode bucket's (by the batch
//! size). Placements are numbered as [`PlanSet::placements`] lists them: the decode
//! buckets in order, then the prefill buckets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::plan::{Plan, PlanError, WorkloadMode, PLAN_FORMAT_VERSION};
use crate::{OpKind, Phase};

/// A serving plan set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSet {
    pub format_version: u32,
    /// Decode buckets by batch size; each plan's decode phase is the bucket's placement.
    pub decode: Vec<PlanBucket>,
    /// Prefill buckets by prompt length; each plan's prefill phase is the bucket's.
    pub prefill: Vec<PlanBucket>,
    /// Per machine (the plans' machine names): weights of every bucket's ops, each once,
    /// and the KV cache of the largest decode bucket, bytes.
    pub weight_bytes: BTreeMap<String, u64>,
    pub kv_bytes: BTreeMap<String, u64>,
    /// What switching between the decode buckets' placements costs and gains.
    pub switching: Switching,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBucket {
    /// Batch size (decode) or prompt length (prefill).
    pub size: u64,
    pub plan: Plan,
}

/// The planner's prices for moving a running batch between decode placements, indexed
/// by decode bucket: `[from][to]` or `[placement][bucket]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switching {
    /// `decode_step_ms[p][b]`: one decode step of bucket `b`'s batch in bucket `p`'s
    /// placement, milliseconds (the diagonal is each bucket's own step).
    pub decode_step_ms: Vec<Vec<f64>>,
    /// Moving one request's KV cache from placement `p`'s decode attention machines to
    /// `q`'s, every layer that changes machine: a fixed part (milliseconds) ...
    pub move_fixed_ms: Vec<Vec<f64>>,
    /// ... and milliseconds per cached position.
    pub move_ms_per_position: Vec<Vec<f64>>,
}

impl PlanSet {
    /// Every placement of the set, numbered as steps name them: decode buckets, then
    /// prefill buckets.
    pub fn placements(&self) -> Vec<&Plan> {
        self.decode.iter().chain(&self.prefill).map(|b| &b.plan).collect()
    }

    /// Checks that the set can be served: supported version, every plan valid and for
    /// inference, all over the same model, machines and precision, and switching tables
    /// the size of the decode buckets. Errors name the bucket.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.format_version != PLAN_FORMAT_VERSION {
            return Err(PlanError::Version { found: self.format_version });
        }
        if self.decode.is_empty() || self.prefill.is_empty() {
            return Err(PlanError::Other("a served plan set needs at least one decode and one prefill bucket".into()));
        }
        let first = &self.decode[0].plan;
        let names = |p: &Plan| p.machines.iter().map(|m| m.name.clone()).collect::<BTreeSet<_>>();
        for (what, b) in self.buckets() {
            let bad = |problem: String| PlanError::Other(format!("{what} bucket {}: {problem}", b.size));
            b.plan.validate().map_err(|e| bad(e.to_string()))?;
            if b.plan.workload.mode != WorkloadMode::Infer {
                return Err(bad(format!("a {} plan, not an inference plan", b.plan.workload.mode)));
            }
            if b.plan.model != first.model
                || b.plan.dtype != first.dtype
                || b.plan.workload.weights != first.workload.weights
            {
                return Err(bad("its model, dtype or weight format differs from the first bucket's".into()));
            }
            if names(&b.plan) != names(first) {
                return Err(bad("its machines differ from the first bucket's".into()));
            }
        }
        let n = self.decode.len();
        let s = &self.switching;
        for (field, m) in [
            ("decode_step_ms", &s.decode_step_ms),
            ("move_fixed_ms", &s.move_fixed_ms),
            ("move_ms_per_position", &s.move_ms_per_position),
        ] {
            if m.len() != n || m.iter().any(|r| r.len() != n || r.iter().any(|x| !x.is_finite() || *x < 0.0)) {
                return Err(PlanError::Other(format!(
                    "switching.{field}: needs {n} x {n} finite, non-negative entries (one per decode bucket)"
                )));
            }
        }
        Ok(())
    }

    /// Parses and validates a plan set from JSON.
    pub fn from_json(text: &str) -> Result<Self, PlanError> {
        let set: PlanSet = serde_json::from_str(text).map_err(|e| PlanError::Other(format!("not a plan set: {e}")))?;
        set.validate()?;
        Ok(set)
    }

    fn buckets(&self) -> impl Iterator<Item = (&'static str, &PlanBucket)> {
        self.decode.iter().map(|b| ("decode", b)).chain(self.prefill.iter().map(|b| ("prefill", b)))
    }

    /// The KV positions the set leaves for all requests together: on each machine, the
    /// memory beside the set's weights over the bytes one position costs in the most
    /// attention layers any placement runs there (either phase); the tightest machine
    /// decides. `None` if no placement runs attention anywhere.
    pub fn kv_positions(&self) -> Option<u64> {
        let first = &self.decode.first()?.plan;
        let per_layer = 2 * first.model.kv_dim() * first.dtype.bytes();
        first
            .predicted
            .per_machine
            .iter()
            .filter_map(|m| {
                let layers = self
                    .placements()
                    .iter()
                    .flat_map(|p| {
                        [Phase::Prefill, Phase::Decode].map(|ph| {
                            p.ops_on(&m.machine).filter(|o| o.phase == ph && o.kind == OpKind::Attention).count()
                        })
                    })
                    .max()
                    .unwrap_or(0) as u64;
                let weights = self.weight_bytes.get(&m.machine).copied().unwrap_or(0);
                let room = m.memory_capacity_bytes.saturating_sub(weights);
                (layers > 0).then(|| room / (layers * per_layer).max(1))
            })
            .min()
    }
}
