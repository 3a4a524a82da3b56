//! [`Planner`]: the builder behind `lemurian::Planner`, from a profiles directory to a plan.

use std::path::Path;
use std::time::Duration;

use lemur_protocol::{DType, ModelConfig};

use crate::cost::Roofline;
use crate::graph::Finetune;
use crate::ilp::IlpOptions;
use crate::planning::{plan, PlanRequest, Planned, PlanningError};
use crate::problem::{Mode, Objective};
use crate::profiles::{ProfileError, ProfileSet};

/// Why the builder failed.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error(transparent)]
    Profiles(#[from] ProfileError),
    #[error(transparent)]
    Planning(#[from] PlanningError),
}

/// Builds a [`PlanRequest`] from measured profiles and plans it.
///
/// ```no_run
/// use lemur_planner::{Planner, Objective};
/// let planned = Planner::from_profiles("profiles")?
///     .machines(&["m4-pro", "m5-pro"])?
///     .infer(2048, 256, 1)
///     .objective(Objective::Latency)
///     .plan()?;
/// println!("TTFT {:?} ms", planned.plan.predicted.ttft_ms);
/// # Ok::<(), lemur_planner::builder::PlannerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Planner {
    profiles: ProfileSet,
    req: PlanRequest,
}

impl Planner {
    /// Loads `dir`; the cluster starts as one machine of each profile, planning Mistral-7B
    /// inference (prompt 2048, 256 generated) for latency.
    pub fn from_profiles(dir: impl AsRef<Path>) -> Result<Self, PlannerError> {
        let profiles = ProfileSet::load(dir.as_ref())?;
        let machines = profiles.machines.iter().map(|(m, _)| m.clone()).collect();
        let req = PlanRequest::new(ModelConfig::mistral_7b(), machines, profiles.links.clone());
        Ok(Self { profiles, req })
    }

    /// The cluster, by profile name; repeat a name for several machines of one kind.
    pub fn machines(mut self, names: &[&str]) -> Result<Self, PlannerError> {
        self.req.machines = names.iter().map(|n| self.profiles.machine(n).cloned()).collect::<Result<_, _>>()?;
        Ok(self)
    }

    pub fn model(mut self, model: ModelConfig) -> Self {
        self.req.model = model;
        self
    }

    pub fn dtype(mut self, dtype: DType) -> Self {
        self.req.dtype = dtype;
        self
    }

    /// How the weights are stored (dense by default; a GGUF format such as `Q4KM`).
    pub fn weights(mut self, weights: lemur_protocol::WeightFormat) -> Self {
        self.req.weights = weights;
        self
    }

    /// Plan generation: a prompt, then `gen_tokens` decoded, for `batch` sequences.
    pub fn infer(mut self, prompt: u64, gen_tokens: u64, batch: u64) -> Self {
        self.req.mode = Mode::Infer { prompt, gen_tokens, batch };
        self
    }

    /// Plan fine-tuning; sets the throughput objective (change it after if wanted).
    pub fn train(mut self, seq: u64, batch: u64, finetune: Finetune, micro_batches: u64) -> Self {
        self.req.mode = Mode::Train { seq, batch, finetune, micro_batches };
        self.req.objective = Objective::Throughput;
        self
    }

    pub fn objective(mut self, objective: Objective) -> Self {
        self.req.objective = objective;
        self
    }

    /// Solver time limit and the relative gap at which it may stop.
    pub fn solver(mut self, time_limit: Duration, rel_gap: f64) -> Self {
        self.req.ilp = IlpOptions { time_limit_s: time_limit.as_secs_f64(), rel_gap, ..self.req.ilp };
        self.req.heuristic_budget = (time_limit / 10).min(Duration::from_secs(2));
        self
    }

    /// The request as built so far.
    pub fn request(&self) -> &PlanRequest {
        &self.req
    }

    /// Solves for the placement with the roofline cost model.
    pub fn plan(&self) -> Result<Planned, PlannerError> {
        self.profiles.check_links(&self.req.machines.iter().map(|m| m.name.as_str()).collect::<Vec<_>>())?;
        Ok(plan(&Roofline, &self.req)?)
    }
}
