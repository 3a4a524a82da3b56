//! Lemurian: plan and run LLM work across a small cluster of unlike machines.
//!
//! This crate is the programmatic API: it re-exports the three libraries.
//! - [`planner`]: profiles, op graph, cost model, placement.
//! - [`protocol`]: the types that cross process boundaries.
//! - [`worker`]: the runtime that executes a plan.

pub use lemur_planner as planner;
pub use lemur_protocol as protocol;
pub use lemur_worker as worker;
