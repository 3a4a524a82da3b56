//! Lemurian: plan and run LLM work across a small cluster of unlike machines.
//!
//! This crate is the programmatic API: it re-exports the three libraries and the planning
//! entry points.
//! - [`planner`]: profiles, op graph, cost model, placement ([`Planner`], [`plan`]).
//! - [`protocol`]: the types that cross process boundaries ([`Plan`]).
//! - [`worker`]: the runtime that executes a plan.
//!
//! ```no_run
//! let planned = lemurian::Planner::from_profiles("profiles")?.infer(2048, 256, 1).plan()?;
//! print!("{}", lemurian::planner::report::summary(&planned));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use lemur_planner as planner;
pub use lemur_protocol as protocol;
pub use lemur_worker as worker;

pub use lemur_planner::{plan, Finetune, LoraSpec, Mode, Objective, PlanRequest, Planned, Planner};
pub use lemur_protocol::Plan;
