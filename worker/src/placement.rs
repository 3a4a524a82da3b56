//! Serving a plan set: which placement each step runs in, and which KV caches must change
//! rank first. Rank 0's policy, as plain code (no actors, no sockets).
//!
//! Prefill steps run in the prefill bucket nearest the step's prompt tokens. Decode steps
//! run in the *current* decode placement, and the policy moves the batch to the bucket
//! nearest its size (nearest on a log scale, ties to the larger bucket) only when the
//! planner's prices ([`Switching`]) say it pays: the step time saved, over the tokens the
//! batch still has to generate (their median), must exceed the time to move every
//! request's cache to the new placement's attention ranks. And only once the batch has
//! asked for the same bucket `patience` decode steps in a row, so that a batch at a
//! bucket's edge (requests arriving and leaving) does not flap.
//!
//! Every request's cache is tracked layer by layer, wherever its prefill or its last
//! step left it; a step lists the caches that must move for its placement
//! ([`KvMove`]), so a prompt prefilled on one placement decodes on another, and a running
//! batch that switches takes its caches with it. Under a plan set the prefill
//! placement's own handover is off (`keep_kv`): the moves do it.

use std::collections::HashMap;

use lemur_protocol::plan::{PlanSet, Switching};
use lemur_protocol::wire::{KvMove, Segment};
use lemur_protocol::Phase;

use crate::error::WorkerError;
use crate::program::Program;

/// Where one placement runs each layer's attention, by rank: (prefill, decode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub prefill: Vec<u32>,
    pub decode: Vec<u32>,
}

/// What a step runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub placement: u32,
    pub moves: Vec<KvMove>,
}

/// The policy's counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlacerStats {
    /// The decode placement now (an index into the decode buckets).
    pub decode_placement: usize,
    /// Times the decode placement changed.
    pub switches: u64,
    /// Layer caches moved between ranks (a request's cache of one layer, once).
    pub moves: u64,
}

/// Rank 0's placement policy over a plan set.
#[derive(Debug, Clone)]
pub struct Placer {
    /// The layers, in the order `Layout`s list them.
    layers: Vec<u32>,
    /// Per placement: decode buckets first, then prefill buckets.
    layouts: Vec<Layout>,
    decode_sizes: Vec<u64>,
    prefill_sizes: Vec<u64>,
    prices: Switching,
    patience: u32,
    /// The decode bucket asked for, and for how many decode steps in a row.
    wanted: Option<(usize, u32)>,
    /// Per request, the rank holding its cache of each layer.
    kv: HashMap<u64, Vec<u32>>,
    stats: PlacerStats,
}

impl Placer {
    /// The decode steps a bucket must be asked for in a row before the batch moves.
    pub const PATIENCE: u32 = 4;

    /// The policy over `set`, whose placements rank 0's `prog` holds (placement 0 and its
    /// alternatives, in the set's order).
    pub fn new(set: &PlanSet, prog: &Program, patience: u32) -> Result<Self, WorkerError> {
        let n = set.decode.len() + set.prefill.len();
        if prog.alternatives.len() + 1 != n || set.decode.is_empty() || set.prefill.is_empty() {
            return Err(WorkerError::Plan(format!(
                "a plan set of {} decode and {} prefill buckets over {} placements",
                set.decode.len(),
                set.prefill.len(),
                prog.alternatives.len() + 1
            )));
        }
        let layers: Vec<u32> = prog.attention_ranks.keys().copied().collect();
        let mut layouts = Vec::with_capacity(n);
        for i in 0..n as u32 {
            let p = prog.placement(i)?;
            if p.attention_ranks.keys().ne(layers.iter()) {
                return Err(WorkerError::Plan(format!(
                    "placement {i} runs attention in other layers than placement 0"
                )));
            }
            layouts.push(Layout {
                prefill: p.attention_ranks.values().map(|r| r.0).collect(),
                decode: p.attention_ranks.values().map(|r| r.1).collect(),
            });
        }
        Ok(Self {
            layers,
            layouts,
            decode_sizes: set.decode.iter().map(|b| b.size).collect(),
            prefill_sizes: set.prefill.iter().map(|b| b.size).collect(),
            prices: set.switching.clone(),
            patience: patience.max(1),
            wanted: None,
            kv: HashMap::new(),
            stats: PlacerStats::default(),
        })
    }

    /// The policy for `job` when it serves a plan set, over rank 0's program `prog`.
    pub fn for_job(
        job: Option<&crate::runtime::Job>,
        prog: &crate::program::RankProgram,
    ) -> Result<Option<Self>, WorkerError> {
        match (job.and_then(|j| j.plan_set.as_ref()), prog) {
            (Some(set), crate::program::RankProgram::Infer(p)) => Ok(Some(Self::new(set, p, Self::PATIENCE)?)),
            (Some(_), _) => Err(WorkerError::Plan("a plan set is for serving, not training".into())),
            (None, _) => Ok(None),
        }
    }

    pub fn stats(&self) -> PlacerStats {
        self.stats
    }

    /// The bucket nearest `n` on a log scale (ties to the larger).
    fn nearest(sizes: &[u64], n: usize) -> usize {
        let d = |s: u64| ((n.max(1) as f64).ln() - (s.max(1) as f64).ln()).abs();
        let mut best = 0;
        for (i, &s) in sizes.iter().enumerate() {
            let (a, b) = (d(s), d(sizes[best]));
            if a < b - 1e-12 || ((a - b).abs() <= 1e-12 && s > sizes[best]) {
                best = i;
            }
        }
        best
    }

    /// The placement a step runs in, and the caches that must move for it. `remaining`
    /// gives a request's tokens still to generate.
    pub fn place(&mut self, phase: Phase, segments: &[Segment], remaining: impl Fn(u64) -> usize) -> Placed {
        let (placement, ranks) = match phase {
            Phase::Decode => {
                self.consider(segments, &remaining);
                let d = self.stats.decode_placement;
                (d, &self.layouts[d].decode)
            }
            _ => {
                let tokens: usize = segments.iter().map(|g| g.len as usize).sum();
                let p = self.decode_sizes.len() + Self::nearest(&self.prefill_sizes, tokens);
                (p, &self.layouts[p].prefill)
            }
        };
        let mut moves = Vec::new();
        for g in segments {
            let held = self.kv.entry(g.request_id).or_insert_with(|| ranks.clone());
            // A prompt's first chunk makes its caches where the placement runs attention.
            if g.position == 0 {
                held.clone_from(ranks);
            }
            for (i, (at, &want)) in held.iter_mut().zip(ranks).enumerate() {
                if *at != want {
                    moves.push(KvMove { request_id: g.request_id, layer: self.layers[i], from: *at, to: want });
                    *at = want;
                }
            }
        }
        self.stats.moves += moves.len() as u64;
        Placed { placement: placement as u32, moves }
    }

    /// Moves the decode placement to the batch's bucket when that has been asked for
    /// `patience` steps in a row and the time saved pays for the moves.
    fn consider(&mut self, segments: &[Segment], remaining: &impl Fn(u64) -> usize) {
        let (from, to) = (self.stats.decode_placement, Self::nearest(&self.decode_sizes, segments.len()));
        let p = &self.prices;
        let saved_per_step = p.decode_step_ms[from][to] - p.decode_step_ms[to][to];
        let mut left: Vec<usize> = segments.iter().map(|g| remaining(g.request_id)).collect();
        left.sort_unstable();
        let horizon = left.get(left.len() / 2).copied().unwrap_or(0) as f64;
        let cost: f64 = segments
            .iter()
            .map(|g| p.move_fixed_ms[from][to] + p.move_ms_per_position[from][to] * (g.position + 1) as f64)
            .sum();
        if to == from || saved_per_step <= 0.0 || saved_per_step * horizon <= cost {
            self.wanted = None;
            return;
        }
        let asked = match self.wanted {
            Some((b, k)) if b == to => k + 1,
            _ => 1,
        };
        if asked >= self.patience {
            tracing::info!(from, to, batch = segments.len(), saved_per_step, cost, "decode placement switched");
            self.stats.decode_placement = to;
            self.stats.switches += 1;
            self.wanted = None;
        } else {
            self.wanted = Some((to, asked));
        }
    }

    /// A request has ended: forget where its caches were.
    pub fn forget(&mut self, request: u64) {
        self.kv.remove(&request);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers, two ranks. Decode placements: x1 on rank 0, x4 with layer 1's
    /// attention on rank 1; one prefill placement with both layers on rank 1.
    fn placer(move_per_position: f64, patience: u32) -> Placer {
        let layout = |prefill: [u32; 2], decode: [u32; 2]| Layout { prefill: prefill.into(), decode: decode.into() };
        Placer {
            layers: vec![0, 1],
            layouts: vec![layout([0, 0], [0, 0]), layout([0, 0], [0, 1]), layout([1, 1], [1, 1])],
            decode_sizes: vec![1, 4],
            prefill_sizes: vec![64],
            prices: Switching {
                // x1's placement: 10 ms at 1, 40 at 4; x4's: 12 at 1, 20 at 4.
                decode_step_ms: vec![vec![10.0, 40.0], vec![12.0, 20.0]],
                move_fixed_ms: vec![vec![0.0, 1.0], vec![1.0, 0.0]],
                move_ms_per_position: vec![vec![0.0, move_per_position], vec![move_per_position, 0.0]],
            },
            patience,
            wanted: None,
            kv: HashMap::new(),
            stats: PlacerStats::default(),
        }
    }

    fn seg(id: u64, position: u64, len: u32) -> Segment {
        Segment { request_id: id, position, len, last: true }
    }

    fn mv(id: u64, layer: u32, from: u32, to: u32) -> KvMove {
        KvMove { request_id: id, layer, from, to }
    }

    #[test]
    fn nearest_bucket_on_a_log_scale() {
        let s = [1, 4, 16, 64];
        let got: Vec<usize> = [1, 2, 3, 5, 8, 9, 40, 1000].iter().map(|&n| Placer::nearest(&s, n)).collect();
        // 2 is as far from 1 as from 4 (ties go up); 8 as far from 4 as from 16.
        assert_eq!(got, vec![0, 1, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn a_prompt_prefilled_on_one_placement_moves_its_caches_to_the_decode_one() {
        let mut p = placer(0.01, 1);
        let left = |_| 10;
        // Prefill runs in placement 2 (everything on rank 1): no moves for a new prompt.
        assert_eq!(p.place(Phase::Prefill, &[seg(7, 0, 5)], left), Placed { placement: 2, moves: vec![] });
        // Decoding one request: x1's placement, both layers back to rank 0.
        let d = p.place(Phase::Decode, &[seg(7, 5, 1)], left);
        assert_eq!(d, Placed { placement: 0, moves: vec![mv(7, 0, 1, 0), mv(7, 1, 1, 0)] });
        // The next step needs nothing moved.
        assert_eq!(p.place(Phase::Decode, &[seg(7, 6, 1)], left).moves, vec![]);
        assert_eq!(p.stats().moves, 2);
    }

    #[test]
    fn the_batch_switches_when_the_saving_pays_for_the_moves_and_after_patience() {
        let mut p = placer(0.01, 3);
        let left = |_| 50;
        for id in 1..=4 {
            p.place(Phase::Prefill, &[seg(id, 0, 8)], left);
        }
        let batch: Vec<Segment> = (1..=4).map(|id| seg(id, 8, 1)).collect();
        // The first two steps of four requests stay on x1's placement (patience 3), moving
        // every cache from the prefill ranks there once.
        let first = p.place(Phase::Decode, &batch, left);
        assert_eq!((first.placement, first.moves.len()), (0, 8));
        assert_eq!(p.place(Phase::Decode, &batch, left), Placed { placement: 0, moves: vec![] });
        // The third asks again: saved 20 ms a step x 50 tokens > 4 x (1 + 0.01 x 9) ms.
        let third = p.place(Phase::Decode, &batch, left);
        assert_eq!(third.placement, 1);
        assert_eq!(third.moves, (1..=4).map(|id| mv(id, 1, 0, 1)).collect::<Vec<_>>());
        assert_eq!((p.stats().switches, p.stats().decode_placement), (1, 1));
        // Down to one request: x1's placement saves 2 ms a step, but only after 3 asks.
        let one = [seg(1, 11, 1)];
        assert_eq!(p.place(Phase::Decode, &one, left).placement, 1);
        assert_eq!(p.place(Phase::Decode, &one, left).placement, 1);
        assert_eq!(p.place(Phase::Decode, &one, left), Placed { placement: 0, moves: vec![mv(1, 1, 1, 0)] });
    }

    #[test]
    fn a_switch_that_does_not_pay_is_not_made() {
        // Moving costs 1 ms a position: 4 requests x 9 positions = 40 ms > 20 ms x 1 token left.
        let mut p = placer(1.0, 1);
        let batch: Vec<Segment> = (1..=4).map(|id| seg(id, 8, 1)).collect();
        assert_eq!(p.place(Phase::Decode, &batch, |_| 1).placement, 0);
        // With 50 tokens left it pays.
        assert_eq!(p.place(Phase::Decode, &batch, |_| 50).placement, 1);
        // An interrupted streak starts again.
        let mut p = placer(0.01, 2);
        p.place(Phase::Decode, &batch, |_| 50);
        p.place(Phase::Decode, &batch[..1], |_| 50);
        assert_eq!(p.place(Phase::Decode, &batch, |_| 50).placement, 0);
        assert_eq!(p.place(Phase::Decode, &batch, |_| 50).placement, 1);
    }
}
