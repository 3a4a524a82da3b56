//! The scheduler's policies, driven step by step with made-up logits.
use super::*;

fn req(id: u64, prompt: usize, max_new: usize) -> Request {
    Request {
        id,
        prompt: (0..prompt as u32).map(|t| t + 100 * id as u32).collect(),
        max_new_tokens: max_new,
        stop_tokens: vec![0],
        sampling: Sampling::default(),
        keep_logits: false,
    }
}

/// Logits whose argmax is `token`, one row per segment of `plan`.
fn answer(s: &mut Scheduler, plan: &StepPlan, token: impl Fn(u64) -> u32) -> Vec<Event> {
    let rows: Vec<Vec<f32>> = plan
        .segments
        .iter()
        .map(|g| {
            let mut v = vec![0.0f32; 8];
            v[token(g.request_id) as usize] = 1.0;
            v
        })
        .collect();
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    s.on_logits(plan.id, &refs).unwrap()
}

#[test]
fn prompts_are_chunked_the_same_alone_and_together_and_prefill_alternates_with_decode() {
    let cfg = BatchConfig { prefill_chunk: 4, prefill_tokens: 6, ..BatchConfig::default() };
    let mut s = Scheduler::new(cfg);
    s.submit(req(1, 3, 5)).unwrap();
    let p = s.next_step().unwrap();
    assert_eq!((p.phase, p.tokens.len()), (Phase::Prefill, 3));
    assert!(s.next_step().is_none(), "one step in flight");
    answer(&mut s, &p, |_| 1);
    // A 10-token newcomer: chunks 4, 4, 2, each alternating with request 1's decode.
    s.submit(req(2, 10, 2)).unwrap();
    let mut seen = Vec::new();
    while let Some(p) = s.next_step() {
        seen.push((p.phase, p.segments.iter().map(|g| (g.request_id, g.position, g.len, g.last)).collect::<Vec<_>>()));
        answer(&mut s, &p, |_| 1);
    }
    use Phase::{Decode as D, Prefill as P};
    assert_eq!(
        seen,
        vec![
            (D, vec![(1, 3, 1, true)]),
            (P, vec![(2, 0, 4, false)]),
            (D, vec![(1, 4, 1, true)]),
            (P, vec![(2, 4, 4, false)]),
            (D, vec![(1, 5, 1, true)]),
            (P, vec![(2, 8, 2, true)]),
            (D, vec![(1, 6, 1, true), (2, 10, 1, true)]),
        ]
    );
    assert!(s.is_idle());
    let mut frees = s.take_frees();
    frees.sort();
    assert_eq!(frees, [1, 2]);
}

#[test]
fn prefill_packs_whole_chunks_up_to_the_budget() {
    let cfg = BatchConfig { prefill_chunk: 4, prefill_tokens: 9, ..BatchConfig::default() };
    let mut s = Scheduler::new(cfg);
    for (id, n) in [(1, 3), (2, 6), (3, 2)] {
        s.submit(req(id, n, 1)).unwrap();
    }
    let p = s.next_step().unwrap();
    // 3 + 4 fit; request 3's 2 would make 9: fits too.
    let lens: Vec<_> = p.segments.iter().map(|g| (g.request_id, g.len, g.last)).collect();
    assert_eq!(lens, [(1, 3, true), (2, 4, false), (3, 2, true)]);
    assert_eq!(p.tokens[..3], [100, 101, 102]);
    assert_eq!(p.tokens[3..7], [200, 201, 202, 203]);
}

#[test]
fn stops_lengths_and_tokens_are_reported_in_order() {
    let mut s = Scheduler::new(BatchConfig::default());
    s.submit(req(1, 2, 3)).unwrap();
    s.submit(req(2, 2, 9)).unwrap();
    let mut events = Vec::new();
    let mut step = 0;
    while let Some(p) = s.next_step() {
        step += 1;
        // Request 2 says the stop token (0) on its third token.
        events.extend(answer(&mut s, &p, |r| if r == 2 && step == 3 { 0 } else { 5 }));
    }
    let tokens = |r: u64| -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Token { request, token, .. } if *request == r => Some(*token),
                _ => None,
            })
            .collect()
    };
    assert_eq!(tokens(1), [5, 5, 5]);
    assert_eq!(tokens(2), [5, 5, 0]);
    let dones: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Done { request, reason, completion_tokens, .. } => Some((*request, *reason, *completion_tokens)),
            _ => None,
        })
        .collect();
    assert_eq!(dones, [(1, FinishReason::Length, 3), (2, FinishReason::Stop, 3)]);
}

#[test]
fn kv_budget_queues_what_does_not_fit_and_admits_it_when_room_frees() {
    let cfg = BatchConfig { kv_positions: Some(20), max_queue: 2, ..BatchConfig::default() };
    let mut s = Scheduler::new(cfg);
    s.submit(req(1, 5, 7)).unwrap(); // 12
    s.submit(req(2, 5, 5)).unwrap(); // 10: waits (22 > 20)
    assert_eq!(s.submit(req(3, 1, 1)), Err(Refusal::QueueFull(2)));
    assert_eq!(s.submit(req(4, 15, 10)), Err(Refusal::TooBig { needed: 25, limit: 20 }));
    let p = s.next_step().unwrap();
    assert_eq!(p.segments.len(), 1);
    assert_eq!((s.running(), s.queue_depth(), s.reserved_positions()), (1, 1, 12));
    let mut admitted_after = None;
    let mut steps = 1;
    answer(&mut s, &p, |_| 1);
    while let Some(p) = s.next_step() {
        steps += 1;
        if admitted_after.is_none() && p.segments.iter().any(|g| g.request_id == 2) {
            admitted_after = Some(steps);
        }
        answer(&mut s, &p, |_| 1);
    }
    // Request 1: prefill + 6 decode steps; request 2 starts right after.
    assert_eq!(admitted_after, Some(8));
    assert_eq!(s.reserved_positions(), 0);
}

#[test]
fn cancelling_in_flight_waits_for_the_step_and_frees_the_cache() {
    let mut s = Scheduler::new(BatchConfig::default());
    s.submit(req(1, 4, 10)).unwrap();
    s.submit(req(2, 4, 10)).unwrap();
    let p = s.next_step().unwrap();
    assert!(s.cancel(1).is_empty(), "in the step in flight");
    let ev = answer(&mut s, &p, |_| 3);
    assert!(matches!(ev[0], Event::Done { request: 1, reason: FinishReason::Cancelled, .. }));
    assert!(matches!(ev[1], Event::Token { request: 2, token: 3, .. }));
    assert_eq!(s.take_frees(), [1]);
    // Between steps, a cancel is immediate.
    let ev = s.cancel(2);
    assert!(matches!(ev[0], Event::Done { request: 2, completion_tokens: 1, .. }));
    assert_eq!(s.take_frees(), [2]);
    assert!(s.is_idle());
    // Waiting requests have no cache to free.
    let mut s = Scheduler::new(BatchConfig { max_batch: 1, ..BatchConfig::default() });
    s.submit(req(1, 2, 2)).unwrap();
    s.submit(req(2, 2, 2)).unwrap();
    let _ = s.next_step();
    assert!(matches!(s.cancel(2)[0], Event::Done { request: 2, .. }));
    assert!(s.take_frees().is_empty());
    assert!(s.on_logits(99, &[]).is_err(), "logits of another step");
}

#[test]
fn a_pipeline_of_two_runs_disjoint_halves_and_each_request_alone_in_order() {
    let cfg = BatchConfig { pipeline: 2, ..BatchConfig::default() };
    let mut s = Scheduler::new(cfg);
    for id in 1..=4 {
        s.submit(req(id, 2, 3)).unwrap();
    }
    // One prefill of all four, then (nothing else to do) no second step.
    let p = s.next_step().unwrap();
    assert_eq!(p.segments.len(), 4);
    assert!(s.next_step().is_none(), "every request is in the step in flight");
    answer(&mut s, &p, |_| 1);
    // Two decode steps in flight at once, two requests each, never sharing one.
    let a = s.next_step().unwrap();
    let b = s.next_step().unwrap();
    assert!(s.next_step().is_none(), "two in flight at most");
    let ids = |p: &StepPlan| p.segments.iter().map(|g| g.request_id).collect::<Vec<_>>();
    assert_eq!((ids(&a), ids(&b)), (vec![1, 2], vec![3, 4]));
    // They may return in either order; each request's positions advance by one.
    answer(&mut s, &b, |_| 1);
    let c = s.next_step().unwrap();
    assert_eq!(ids(&c), [3, 4]);
    assert_eq!(c.segments[0].position, 3);
    answer(&mut s, &a, |_| 1);
    answer(&mut s, &c, |_| 1);
    let mut left = 0;
    while let Some(p) = s.next_step() {
        left += 1;
        answer(&mut s, &p, |_| 1);
    }
    assert!(s.is_idle() && left >= 1);
}

#[test]
fn a_replay_prefills_prompt_and_tokens_so_far_and_the_stream_goes_on() {
    let mut s = Scheduler::new(BatchConfig { kv_positions: Some(100), ..BatchConfig::default() });
    s.submit(req(1, 3, 5)).unwrap();
    s.submit(req(2, 2, 5)).unwrap();
    let token = |id: u64| 1 + id as u32;
    let mut seen: Vec<(u64, usize, u32)> = Vec::new();
    let record = |events: Vec<Event>, seen: &mut Vec<(u64, usize, u32)>| {
        for e in events {
            if let Event::Token { request, index, token, .. } = e {
                seen.push((request, index, token));
            }
        }
    };
    // Prefill, then two decode steps; a third is in flight when the cluster goes.
    for _ in 0..3 {
        let p = s.next_step().unwrap();
        let ev = answer(&mut s, &p, token);
        record(ev, &mut seen);
    }
    let lost = s.next_step().unwrap();
    assert_eq!(lost.phase, Phase::Decode);
    assert!(s.replay_all().is_empty());
    assert_eq!((s.running(), s.queue_depth(), s.reserved_positions()), (0, 2, 0));
    assert!(s.on_logits(lost.id, &[&[0.0; 8], &[0.0; 8]]).is_err(), "the lost step is forgotten");
    // The replay: one prefill of each prompt with its three tokens so far.
    let p = s.next_step().unwrap();
    assert_eq!(p.phase, Phase::Prefill);
    let prompt1: Vec<u32> = req(1, 3, 5).prompt;
    let prompt2: Vec<u32> = req(2, 2, 5).prompt;
    let want: Vec<u32> = [prompt1, vec![2; 3], prompt2, vec![3; 3]].concat();
    assert_eq!(p.tokens, want);
    assert_eq!(
        p.segments.iter().map(|g| (g.position, g.len, g.last)).collect::<Vec<_>>(),
        [(0, 6, true), (0, 5, true)]
    );
    let ev = answer(&mut s, &p, token);
    record(ev, &mut seen);
    let d = s.next_step().unwrap();
    // Decode goes on at the positions the uninterrupted run would use.
    assert_eq!(d.segments.iter().map(|g| g.position).collect::<Vec<_>>(), [3 + 4 - 1, 2 + 4 - 1]);
    let mut ends = Vec::new();
    let ev = answer(&mut s, &d, token);
    for e in &ev {
        if let Event::Done { request, prompt_tokens, completion_tokens, reason } = e {
            ends.push((*request, *prompt_tokens, *completion_tokens, *reason));
        }
    }
    record(ev, &mut seen);
    assert!(s.is_idle());
    assert_eq!(ends, [(1, 3, 5, FinishReason::Length), (2, 2, 5, FinishReason::Length)]);
    for id in [1, 2] {
        let idx: Vec<usize> = seen.iter().filter(|t| t.0 == id).map(|t| t.1).collect();
        assert_eq!(idx, [0, 1, 2, 3, 4], "request {id}: every index once, in order");
    }
    // A smaller cluster: a waiting request that no longer fits fails.
    s.submit(req(3, 10, 10)).unwrap();
    let ev = s.set_kv_positions(Some(15));
    assert!(matches!(ev[..], [Event::Done { request: 3, reason: FinishReason::Failed, .. }]), "{ev:?}");
}

#[test]
fn refusals_name_the_limit() {
    let mut s = Scheduler::new(BatchConfig { max_positions: 10, ..BatchConfig::default() });
    let e = s.submit(req(1, 8, 4)).unwrap_err();
    assert_eq!(e.to_string(), "12 positions (prompt 8 + max_tokens 4) exceed the model's context of 10");
    assert_eq!(s.submit(req(1, 0, 4)), Err(Refusal::EmptyPrompt));
    s.submit(req(1, 2, 2)).unwrap();
    assert_eq!(s.submit(req(1, 2, 2)), Err(Refusal::Duplicate(1)));
    s.drain();
    assert_eq!(s.submit(req(2, 2, 2)), Err(Refusal::Draining));
}
