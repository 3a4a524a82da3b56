//! Lemurian's planner: pure code that decides where every op of a model runs.
//!
//! A tour, in the order data flows:
//! - [`profiles`] loads what each machine can do ([`lemur_protocol::MachineProfile`]) and
//!   how machines are joined ([`lemur_protocol::LinkProfile`]) from a `profiles/` directory.
//! - [`graph`] builds the model's op graph ([`OpGraph`]) for prefill, decode or training,
//!   at sub-layer granularity, with FLOPs and bytes on every op and edge.
//! - [`cost`] prices every op on every machine ([`CostModel`], [`Roofline`]).
//! - [`costs_report`] is the per-layer cost table behind `lemur-plan --costs`.
//!
//! The planner opens no sockets and starts no actors: it turns numbers into a plan.

pub mod cost;
pub mod costs_report;
pub mod graph;
pub mod model_source;
pub mod profiles;

pub use cost::{CostError, CostModel, CostTable, Roofline};
pub use graph::{Finetune, LoraSpec, Op, OpGraph, Workload};
pub use model_source::{load_model, ModelError};
pub use profiles::{ProfileError, ProfileSet};
