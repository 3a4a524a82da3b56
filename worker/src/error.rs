//! The worker's error type.

/// Everything that can go wrong in a worker, naming the file, op or peer at fault.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("candle: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("the plan cannot run here: {0}")]
    Plan(String),
    /// A request (prompt, token ids, lengths) that the model cannot take.
    #[error("request: {0}")]
    Request(String),
    #[error("op {op} ({label}): {message}")]
    Op { op: usize, label: String, message: String },
    #[error("weights: {0}")]
    Weights(String),
    /// A rank's address that it cannot listen on.
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    /// A rank other than 0 waited its whole `wait_for_leader` without a leader arriving.
    #[error("no leader within {seconds:.0} s")]
    NoLeader { seconds: f64 },
    /// Rank 0 connected and ended the set-up at once (a probe that this rank is up).
    #[error("rank 0 ended the set-up: {0}")]
    Dismissed(String),
    #[error("wire: {0}")]
    Wire(String),
    #[error("rank {rank}: {message}")]
    Peer { rank: u32, message: String },
    #[error("cluster file {path}: {message}")]
    Cluster { path: String, message: String },
    #[error("device: {0}")]
    Device(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Key(#[from] lemur_protocol::auth::KeyError),
    /// A set-up that would expose the cluster (a network address without a key).
    #[error("{0}")]
    Insecure(String),
    #[error("frame: {0}")]
    Frame(#[from] lemur_protocol::wire::FrameError),
}

impl WorkerError {
    /// This error, blamed on rank `rank` where it is a failure of the link to it (a
    /// closed or broken connection, a bad frame): what a leader plans around.
    pub fn at(self, rank: u32) -> Self {
        match self {
            Self::Wire(message) => Self::Peer { rank, message },
            Self::Frame(e) => Self::Peer { rank, message: format!("frame: {e}") },
            Self::Io(e) => Self::Peer { rank, message: format!("i/o: {e}") },
            e => e,
        }
    }
}

/// A candle error's message without the backtrace candle attaches when RUST_BACKTRACE is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => other.to_string(),
    }
}
