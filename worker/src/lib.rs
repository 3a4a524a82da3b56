//! Lemurian's worker: executes its rank's share of a plan.
//!
//! A tour:
//! - [`cluster`]: `cluster.toml`, which rank listens where as which machine.
//! - [`weights`]: a Hugging Face checkpoint, memory-mapped; only this rank's tensors load.
//! - [`exec`]: the candle arithmetic of every op kind, RoPE, GQA attention with causal and
//!   sliding-window masks, the KV cache.
//! - [`program`]: the plan from one rank's point of view, and the step runner that executes
//!   local ops as their inputs arrive.
//! - [`node`]: networking and the actix actors (peers, compute, node) that run a rank.
//! - [`device`]: cpu, cuda and metal behind cargo features.
//! - [`random_model`]: deterministic random checkpoints for tests, examples and benchmarks.
//!
//! Workers never plan: they validate the plan they are given and execute it.

pub mod backward;
pub mod checkpoint;
pub mod cluster;
pub mod device;
pub mod error;
pub mod exec;
pub mod fused;
pub mod link;
pub mod lora;
pub mod node;
pub mod profiler;
pub mod program;
pub mod random_model;
pub mod sampling;
pub mod tensor_wire;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::WorkerError;
