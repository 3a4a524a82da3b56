//! Lemurian's worker: executes its rank's share of a plan.
//!
//! A tour, from the arithmetic up:
//! - Compute, no I/O: [`exec`] (the candle arithmetic of every op kind: RoPE, GQA attention
//!   with causal and sliding-window masks, the KV cache), [`fused`] (kernels added to
//!   candle's, CPU reference and CUDA), [`qmm`] (Lemurian's CPU kernels for linear ops on
//!   quantized weights, over a spinning thread pool), [`attend`] (CPU attention in one pass
//!   over the KV cache), [`fastmath`] (vectorised exp, SiLU-multiply), [`backward`] (the
//!   hand-written backward of every op), [`lora`] (adapters, initialisation, PEFT names,
//!   dropout masks), [`rng`].
//! - One rank's view of a plan, and the plain state machines that run it as inputs arrive
//!   and return what to send (no actors): [`view`] (what they share: one op type, the
//!   plan index, the outputs), [`program`] (the rank's program of either workload;
//!   inference: a step of prefill or decode, KV handovers) and [`train`] (a training
//!   micro-batch: forward, then backward); [`batch`] (rank 0's continuous-batching
//!   scheduler: which requests' tokens the next step runs) and [`placement`] (serving a
//!   plan set: which placement each step runs in, and the KV caches that move for it).
//! - [`runtime`]: set-up over a [`runtime::Transport`] (TCP, or the in-memory
//!   [`runtime::memnet`] with fault injection), the actix actors over the state machines,
//!   the optimizer, and rank 0's request and training loops.
//! - Files: [`cluster`] (`cluster.toml`), [`weights`] (checkpoints: safetensors, GGUF),
//!   [`weight_cache`] (weights as the leader streams them, a rank's cache of them, the
//!   checkpoint's content hash),
//!   [`checkpoint`] (PEFT adapter checkpoints, resuming), [`dataset`] (JSONL training
//!   data), [`tokenizer`]; [`sampling`] turns logits into tokens.
//! - Measuring: [`profiler`] (`lemur-profile`'s device measurements), [`link`].
//! - [`device`]: cpu, cuda and metal behind cargo features; [`tensor_wire`]: tensors to and
//!   from wire bytes; [`progress`]: progress bars; [`random_model`]: deterministic random checkpoints for tests.
//!
//! Workers never plan: they validate the plan they are given and execute it.

pub mod alloc;
pub mod attend;
pub mod backward;
pub mod batch;
pub mod checkpoint;
pub mod cluster;
pub mod dataset;
pub mod device;
pub mod error;
pub mod exec;
pub mod fastmath;
pub mod fused;
pub mod link;
pub mod lora;
pub mod placement;
pub mod profiler;
pub mod program;
pub mod progress;
pub mod qmm;
pub mod random_model;
pub mod rng;
pub mod runtime;
pub mod sampling;
pub mod tensor_wire;
pub mod tokenizer;
pub mod train;
pub mod view;
pub mod weight_cache;
pub mod weights;

pub use error::WorkerError;
