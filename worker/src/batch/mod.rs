//! Continuous batching: rank 0's scheduler of inference requests, as plain code (no
//! actors, no sockets), so that every policy below is tested directly.
//!
//! Requests wait in a bounded queue and are admitted, first come first served, while the
//! batch has room and their KV caches fit the positions the cluster can hold. Each step
//! is either a prefill step (chunks of admitted prompts, packed up to a token budget) or
//! a decode step (one token for every request that has finished its prompt). When both
//! kinds of work exist the scheduler alternates, so that a long newcomer's prompt never
//! stops the running streams for more than one chunk.
//!
//! A request's prompt is always cut into the same chunks, whatever else runs beside it,
//! so that its attention computes exactly what it would alone: only the rows of the
//! linear ops are shared, and those are computed row by row.

use std::collections::VecDeque;

use lemur_protocol::wire::Segment;
use lemur_protocol::Phase;

use crate::sampling::{Sampler, Sampling};

/// How the scheduler batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// The most requests running at once (prefilling or decoding).
    pub max_batch: usize,
    /// A prompt is run in chunks of at most this many tokens.
    pub prefill_chunk: usize,
    /// The most prompt tokens in one prefill step (at least one chunk always runs).
    pub prefill_tokens: usize,
    /// The most requests waiting for admission; beyond it a submit is refused.
    pub max_queue: usize,
    /// KV positions the cluster holds for all requests together (`None`: unbounded). A
    /// request reserves its prompt plus its `max_new_tokens` (at most `max_positions`).
    pub kv_positions: Option<usize>,
    /// The model's positions: a request longer than this is refused.
    pub max_positions: usize,
    /// A sliding window bounds each request's cache (to the window plus the cache's
    /// growth room), whatever its length.
    pub window: Option<usize>,
    /// Steps in flight at once, over disjoint requests: with the ranks of a pipeline, each
    /// works on one step while the others work on theirs. Decode steps then take an equal
    /// share of the decoding requests each.
    pub pipeline: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            prefill_chunk: 512,
            prefill_tokens: 512,
            max_queue: 256,
            kv_positions: None,
            max_positions: usize::MAX,
            window: None,
            pipeline: 1,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Tokens that end the request (end of sequence, end of turn); the stop token is
    /// reported like any other.
    pub stop_tokens: Vec<u32>,
    pub sampling: Sampling,
    /// Report each token's logits with it (tests and `--logits`).
    pub keep_logits: bool,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced a stop token.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
    /// Its client cancelled it (or the server shut down).
    Cancelled,
    /// The cluster failed under it (a rank lost, a rank's error).
    Failed,
}

impl FinishReason {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Failed => "failed",
        }
    }
}

/// What happened to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Its next token (`index` from 0), with the logits it was chosen from if asked.
    Token { request: u64, index: usize, token: u32, logits: Option<Vec<f32>> },
    /// It ended; its KV cache is freed.
    Done { request: u64, reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{needed} positions (prompt {prompt} + max_tokens {max_new}) exceed the model's context of {limit}")]
    TooLong { prompt: usize, max_new: usize, needed: usize, limit: usize },
    #[error("{needed} KV positions exceed the {limit} the cluster holds")]
    TooBig { needed: usize, limit: usize },
    #[error("request {0} is already known")]
    Duplicate(u64),
    #[error("the server is shutting down")]
    Draining,
}

/// One step for the cluster to run.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub id: u64,
    pub phase: Phase,
    pub segments: Vec<Segment>,
    /// The segments' tokens, one after another.
    pub tokens: Vec<u32>,
}

/// A request the scheduler holds.
#[derive(Debug)]
struct Seq {
    req: Request,
    sampler: Sampler,
    /// Prompt tokens whose KV is computed (or in the step in flight).
    prefilled: usize,
    generated: Vec<u32>,
    /// Generated tokens appended to `req.prompt` by a replay (their KV is recomputed by
    /// prefill, and the last prefill row samples the next token).
    fed: usize,
    /// Cancelled while in the step in flight: dropped when its logits come.
    cancelled: bool,
    /// KV positions reserved.
    reserved: usize,
}

impl Seq {
    fn prompt_done(&self) -> bool {
        self.prefilled == self.req.prompt.len()
    }
}

/// Rank 0's scheduler.
#[derive(Debug)]
pub struct Scheduler {
    cfg: BatchConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: u64,
    in_flight: Vec<StepPlan>,
    last_phase: Option<Phase>,
    reserved: usize,
    draining: bool,
    /// Requests whose KV caches the ranks must drop (`Finish`), collected for the caller.
    frees: Vec<u64>,
}

impl Scheduler {
    pub fn new(cfg: BatchConfig) -> Self {
        let cfg = BatchConfig {
            max_batch: cfg.max_batch.max(1),
            prefill_chunk: cfg.prefill_chunk.max(1),
            prefill_tokens: cfg.prefill_tokens.max(1),
            pipeline: cfg.pipeline.max(1),
            ..cfg
        };
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            in_flight: Vec::new(),
            last_phase: None,
            reserved: 0,
            draining: false,
            frees: Vec::new(),
        }
    }

    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// Queues a request, or says why not.
    pub fn submit(&mut self, req: Request) -> Result<(), Refusal> {
        if self.draining {
            return Err(Refusal::Draining);
        }
        if req.prompt.is_empty() {
            return Err(Refusal::EmptyPrompt);
        }
        let (prompt, max_new) = (req.prompt.len(), req.max_new_tokens);
        let needed = prompt.saturating_add(max_new);
        if needed > self.cfg.max_positions {
            return Err(Refusal::TooLong { prompt, max_new, needed, limit: self.cfg.max_positions });
        }
        let reserve = self.cfg.window.map_or(needed, |w| needed.min(w + 2 * crate::exec::KV_CHUNK));
        if let Some(limit) = self.cfg.kv_positions {
            if reserve > limit {
                return Err(Refusal::TooBig { needed: reserve, limit });
            }
        }
        if self.waiting.len() >= self.cfg.max_queue {
            return Err(Refusal::QueueFull(self.waiting.len()));
        }
        if self.waiting.iter().chain(&self.running).any(|s| s.req.id == req.id) {
            return Err(Refusal::Duplicate(req.id));
        }
        let sampler = Sampler::new(req.sampling);
        self.waiting.push_back(Seq {
            req,
            sampler,
            prefilled: 0,
            generated: Vec::new(),
            fed: 0,
            cancelled: false,
            reserved: reserve,
        });
        Ok(())
    }

    /// Ends a request at its client's wish. Its `Done` comes back now, or with the logits
    /// of the step it is in.
    pub fn cancel(&mut self, id: u64) -> Vec<Event> {
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let s = self.waiting.remove(i).expect("index from position");
            return vec![done(&s, FinishReason::Cancelled)];
        }
        let in_step = self.busy(id);
        let Some(i) = self.running.iter().position(|s| s.req.id == id) else { return Vec::new() };
        if in_step {
            self.running[i].cancelled = true;
            return Vec::new();
        }
        vec![self.retire(i, FinishReason::Cancelled)]
    }

    /// Stops taking requests and cancels those not yet admitted.
    pub fn drain(&mut self) -> Vec<Event> {
        self.draining = true;
        self.waiting.drain(..).map(|s| done(&s, FinishReason::Cancelled)).collect()
    }

    /// Cancels every request (the cluster is gone, or the grace period is over).
    pub fn cancel_all(&mut self) -> Vec<Event> {
        let mut events = self.drain();
        let ids: Vec<u64> = self.running.iter().map(|s| s.req.id).collect();
        for id in ids {
            events.extend(self.cancel(id));
        }
        events
    }

    /// Fails every request and forgets the step in flight (its logits will not come).
    pub fn fail_all(&mut self) -> Vec<Event> {
        self.in_flight.clear();
        let mut events: Vec<Event> = self.waiting.drain(..).map(|s| done(&s, FinishReason::Failed)).collect();
        while !self.running.is_empty() {
            events.push(self.retire(0, FinishReason::Failed));
        }
        self.frees.clear();
        events
    }

    /// Puts every running request back at the head of the queue, in order, to run again
    /// from scratch on another cluster (the old one's KV caches are gone): its prompt and
    /// the tokens generated so far are prefilled again, and the last prefill row samples
    /// the next token, so its events go on where they stopped (a greedy request's tokens
    /// are unchanged). Steps in flight are forgotten; requests cancelled in them end now.
    pub fn replay_all(&mut self) -> Vec<Event> {
        self.in_flight.clear();
        self.frees.clear();
        let mut events = Vec::new();
        let mut back = Vec::new();
        for mut s in self.running.drain(..) {
            self.reserved -= s.reserved;
            if s.cancelled {
                events.push(done(&s, FinishReason::Cancelled));
                continue;
            }
            let unfed = s.generated[s.fed..].to_vec();
            s.req.prompt.extend(unfed);
            s.fed = s.generated.len();
            s.prefilled = 0;
            back.push(s);
        }
        for s in back.into_iter().rev() {
            self.waiting.push_front(s);
        }
        events
    }

    /// Sets the KV positions the cluster holds (a new placement); waiting requests that
    /// can no longer fit end now, failed.
    pub fn set_kv_positions(&mut self, limit: Option<usize>) -> Vec<Event> {
        self.cfg.kv_positions = limit;
        let Some(limit) = limit else { return Vec::new() };
        let (keep, gone): (VecDeque<Seq>, VecDeque<Seq>) = self.waiting.drain(..).partition(|s| s.reserved <= limit);
        self.waiting = keep;
        gone.iter().map(|s| done(s, FinishReason::Failed)).collect()
    }

    /// Requests whose KV caches must be dropped on every rank, since the last call.
    pub fn take_frees(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.frees)
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.in_flight.is_empty()
    }

    /// The steps in flight, oldest first.
    pub fn in_flight(&self) -> &[StepPlan] {
        &self.in_flight
    }

    /// Whether request `id` is in a step in flight.
    fn busy(&self, id: u64) -> bool {
        self.in_flight.iter().any(|p| p.segments.iter().any(|g| g.request_id == id))
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Tokens request `id` may still generate (0 if it is not running).
    pub fn remaining(&self, id: u64) -> usize {
        self.running
            .iter()
            .find(|s| s.req.id == id)
            .map_or(0, |s| s.req.max_new_tokens.saturating_sub(s.generated.len()))
    }

    /// KV positions reserved by the running requests.
    pub fn reserved_positions(&self) -> usize {
        self.reserved
    }

    /// The next step to run, if there is work for it and fewer than `pipeline` steps are
    /// in flight.
    pub fn next_step(&mut self) -> Option<StepPlan> {
        if self.in_flight.len() >= self.cfg.pipeline {
            return None;
        }
        self.admit();
        let free: Vec<bool> = self.running.iter().map(|s| !self.busy(s.req.id)).collect();
        let mut decoders: Vec<usize> =
            (0..self.running.len()).filter(|&i| free[i] && self.running[i].prompt_done()).collect();
        // With several steps in flight, each decode step takes an equal share.
        let decoding = self.running.iter().filter(|s| s.prompt_done()).count();
        decoders.truncate(decoding.div_ceil(self.cfg.pipeline).max(1));
        let prefill_waits = (0..self.running.len()).any(|i| free[i] && !self.running[i].prompt_done());
        let decode = !decoders.is_empty() && (!prefill_waits || self.last_phase == Some(Phase::Prefill));
        let plan = if decode {
            self.decode_step(&decoders)
        } else if prefill_waits {
            self.prefill_step(&free)
        } else {
            return None;
        };
        self.last_phase = Some(plan.phase);
        self.in_flight.push(plan.clone());
        Some(plan)
    }

    /// Admits waiting requests in order while the batch has room and their KV fits.
    fn admit(&mut self) {
        while let Some(next) = self.waiting.front() {
            let fits = self.cfg.kv_positions.is_none_or(|limit| self.reserved + next.reserved <= limit);
            if self.running.len() >= self.cfg.max_batch || !fits {
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            self.reserved += s.reserved;
            self.running.push(s);
        }
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn decode_step(&mut self, decoders: &[usize]) -> StepPlan {
        let mut segments = Vec::with_capacity(decoders.len());
        let mut tokens = Vec::with_capacity(decoders.len());
        for &i in decoders {
            let s = &self.running[i];
            let last = *s.generated.last().expect("a decoding request has sampled a token");
            let position = (s.req.prompt.len() + s.generated.len() - s.fed - 1) as u64;
            segments.push(Segment { request_id: s.req.id, position, len: 1, last: true });
            tokens.push(last);
        }
        StepPlan { id: self.fresh_id(), phase: Phase::Decode, segments, tokens }
    }

    fn prefill_step(&mut self, free: &[bool]) -> StepPlan {
        let (chunk, budget) = (self.cfg.prefill_chunk, self.cfg.prefill_tokens);
        let mut segments = Vec::new();
        let mut tokens = Vec::new();
        for (s, _) in self.running.iter_mut().zip(free).filter(|(s, f)| **f && !s.prompt_done()) {
            let len = chunk.min(s.req.prompt.len() - s.prefilled);
            if !tokens.is_empty() && tokens.len() + len > budget {
                break;
            }
            let from = s.prefilled;
            s.prefilled += len;
            tokens.extend_from_slice(&s.req.prompt[from..from + len]);
            segments.push(Segment {
                request_id: s.req.id,
                position: from as u64,
                len: len as u32,
                last: s.prompt_done(),
            });
        }
        StepPlan { id: self.fresh_id(), phase: Phase::Prefill, segments, tokens }
    }

    /// The logits of step `step_id` (one row per segment): samples each request's next
    /// token and ends those that are done. Logits of another step are an error.
    pub fn on_logits(&mut self, step_id: u64, rows: &[&[f32]]) -> Result<Vec<Event>, String> {
        let Some(at) = self.in_flight.iter().position(|p| p.id == step_id) else {
            return Err(format!("logits for step {step_id}, which is not in flight"));
        };
        let plan = self.in_flight.remove(at);
        if rows.len() != plan.segments.len() {
            return Err(format!("step {step_id}: {} rows of logits for {} segments", rows.len(), plan.segments.len()));
        }
        let mut events = Vec::new();
        for (g, row) in plan.segments.iter().zip(rows) {
            let Some(i) = self.running.iter().position(|s| s.req.id == g.request_id) else { continue };
            if self.running[i].cancelled {
                events.push(self.retire(i, FinishReason::Cancelled));
                continue;
            }
            if !g.last {
                continue;
            }
            let s = &mut self.running[i];
            let token = s.sampler.sample(row);
            s.generated.push(token);
            let logits = s.req.keep_logits.then(|| row.to_vec());
            events.push(Event::Token { request: s.req.id, index: s.generated.len() - 1, token, logits });
            if s.req.stop_tokens.contains(&token) {
                events.push(self.retire(i, FinishReason::Stop));
            } else if s.generated.len() >= s.req.max_new_tokens {
                events.push(self.retire(i, FinishReason::Length));
            }
        }
        Ok(events)
    }

    /// Removes running request `i`, frees its reservation and (if it has any) its KV.
    fn retire(&mut self, i: usize, reason: FinishReason) -> Event {
        let s = self.running.remove(i);
        self.reserved -= s.reserved;
        if s.prefilled > 0 {
            self.frees.push(s.req.id);
        }
        done(&s, reason)
    }
}

fn done(s: &Seq, reason: FinishReason) -> Event {
    Event::Done {
        request: s.req.id,
        reason,
        prompt_tokens: s.req.prompt.len() - s.fed,
        completion_tokens: s.generated.len(),
    }
}

#[cfg(test)]
mod tests;
