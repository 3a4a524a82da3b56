//! Lemurian's wire types: everything that crosses a process boundary.
//!
//! A tour:
//! - [`model`]: the model's shape ([`ModelConfig`]), from presets or a Hugging Face `config.json`.
//! - [`profile`]: what a machine can do ([`MachineProfile`]) and how machines are joined ([`LinkProfile`]).
//! - [`op`]: the names of ops ([`OpKind`]) and passes ([`Phase`]) that plans place.
//! - [`plan`]: the plan file ([`Plan`]) workers execute, and its validation.
//! - [`blob`]: one op's weights as the leader streams them and a rank caches them
//!   (shape, encoding, SHA-256), and the cache file's layout.
//! - [`auth`]: the cluster key file and the handshake's state machines (mutual
//!   challenge-response under HMAC-SHA256, before anything else is accepted).
//! - [`wire`]: messages between workers ([`wire::Message`]), tensors as raw bytes, and
//!   the length-delimited [`wire::FrameCodec`].
//! - [`openai`]: OpenAI's HTTP API as `lemur-serve` speaks it (requests checked field by
//!   field, responses, stream chunks, the error body).
//! - [`gguf`]: a bounds-checked GGUF header reader (model shape, tokenizer metadata).
//! - [`weights`]: how weights are stored ([`WeightFormat`]: dense or a GGUF block format) and their bits.
//! - [`timings`]: predicted against measured op times, and the validation table.
//! - [`error`]: [`FieldError`], a validation error that names the field at fault.
//! - [`cli`]: what every binary shares: logging to stderr and `error: ...` reports.
//!
//! Only this crate defines what goes on the wire or into a file another process reads.

pub mod auth;
pub mod blob;
pub mod cli;
pub mod error;
pub mod gguf;
pub mod model;
pub mod op;
pub mod openai;
pub mod plan;
pub mod plan_set;
pub mod profile;
pub mod timings;
pub mod weights;
pub mod wire;

pub use error::FieldError;
pub use model::ModelConfig;
pub use op::{OpKind, Phase};
pub use plan::{FinetuneKind, Plan, PlanError, WorkloadMode, DEFAULT_LORA_RANK, PLAN_FORMAT_VERSION};
pub use profile::{
    Bandwidth, Curve, DType, Elementwise, KernelStyle, LinkProfile, MachineProfile, Memory, Peak, QuantRates,
};
pub use weights::WeightFormat;
