//! Lemurian's planner: pure code that decides where every op of a model runs.
//!
//! A tour, in the order data flows:
//! - [`profiles`] loads what each machine can do ([`lemur_protocol::MachineProfile`]) and
//!   how machines are joined ([`lemur_protocol::LinkProfile`]) from a `profiles/` directory.
//! - [`graph`] builds the model's op graph ([`OpGraph`]) for prefill, decode or training,
//!   at sub-layer granularity, with FLOPs and bytes on every op and edge.
//! - [`cost`] prices every op on every machine ([`CostModel`], [`Roofline`]).
//! - [`problem`] turns a request into an [`Instance`]: phases, colocation units, tensors
//!   that may cross links, memory terms.
//! - [`evaluate`] prices a placement exactly; everything is judged by it.
//! - [`baselines`] builds the comparison placements (single machine, contiguous splits
//!   by memory, FLOPS and DP, greedy) and the local-search warm start.
//! - [`ilp`] is the placement ILP on HiGHS through good_lp.
//! - [`planning`] runs them all and assembles the [`lemur_protocol::Plan`] with its evidence.
//! - [`builder`]: [`Planner`], the programmatic way in.
//! - [`costs_report`] is the per-layer cost table behind `lemur-plan --costs`.
//! - [`serving`]: plan sets for a server, one placement per load bucket (decode batch
//!   sizes, prefill lengths), with each machine's memory for all of them.
//!
//! The planner opens no sockets and starts no actors: it turns numbers into a plan.

pub mod baselines;
pub mod builder;
pub mod cost;
pub mod costs_report;
pub mod evaluate;
pub mod graph;
pub mod ilp;
pub mod model_source;
pub mod planning;
pub mod problem;
pub mod profiles;
pub mod refine;
pub mod replan;
pub mod report;
pub mod serving;
pub mod timeline;

pub use builder::Planner;
pub use cost::{CostError, CostModel, CostTable, Roofline};
pub use graph::{Finetune, LoraSpec, Op, OpGraph, Workload};
pub use model_source::{load_model, ModelError};
pub use planning::{plan, PlanRequest, Planned, PlanningError};
pub use problem::{Instance, Mode, Objective};
pub use profiles::{ProfileError, ProfileSet};
pub use replan::replan;
