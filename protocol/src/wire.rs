//! Messages between workers and their framing: a versioned handshake, plan and control
//! messages, and tensors as dtype + shape + raw little-endian bytes.
//!
//! A frame is `u32 LE length | u32 LE header length | header (JSON) | tensor bytes`. The
//! header is a [`Message`]; a message that carries tensors lists their [`TensorMeta`]
//! (dtype and shape) and the raw bytes follow in that order, with no per-element encoding.
//! Decoding checks every length against the frame before touching it and hands tensor data
//! out as [`Bytes`] slices of the received buffer (no copy). A frame longer than the
//! codec's limit, a header that is not a known message, or tensor bytes that do not match
//! their shapes is a [`FrameError`], never a panic or an unbounded allocation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::{Phase, Plan};

/// First field of every handshake: "LMUR".
pub const MAGIC: u32 = 0x4c4d_5552;
/// Bumped whenever a message changes shape.
pub const PROTOCOL_VERSION: u32 = 8;
/// Default largest frame: 1 GiB (a prefill activation of 8k tokens x 4096 in f32 is 128 MiB).
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;

/// Element type of a tensor on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDType {
    F32,
    F16,
    Bf16,
    U32,
    /// Raw bytes (weight chunks).
    U8,
}

impl WireDType {
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 | WireDType::U32 => 4,
            WireDType::F16 | WireDType::Bf16 => 2,
            WireDType::U8 => 1,
        }
    }
}

/// Shape and type of a tensor whose bytes follow the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    pub dtype: WireDType,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    /// Bytes of data, or `None` if the shape overflows.
    pub fn nbytes(&self) -> Option<usize> {
        self.shape.iter().try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
    }
}

/// A tensor on the wire: metadata and raw little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTensor {
    pub meta: TensorMeta,
    pub data: Bytes,
}

/// The first message on every connection, from the side that dials (see [`crate::auth`]
/// for the handshake it opens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: u32,
    pub version: u32,
    pub rank: u32,
    /// Whether the dialer holds a cluster key.
    #[serde(default)]
    pub keyed: bool,
    /// 32 fresh random bytes, hex.
    #[serde(default)]
    pub nonce: String,
}

/// Where each rank listens and which machine (profile) it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankInfo {
    pub rank: u32,
    pub addr: String,
    /// The plan's machine name this rank executes.
    pub machine: String,
}

/// How every rank initialises its LoRA adapters (rank and targets come from the plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSetup {
    pub alpha: f64,
    pub seed: u64,
    /// PEFT's initialisation (B = 0, so training starts from the base model); off gives a
    /// random B, which gradient checks need.
    pub zero_b: bool,
    /// Inference with trained adapters: their rank and target projections (training
    /// plans carry these themselves).
    #[serde(default)]
    pub rank: Option<u64>,
    #[serde(default)]
    pub targets: Option<Vec<crate::OpKind>>,
    /// LoRA dropout on the adapters' input while training.
    #[serde(default)]
    pub dropout: f64,
}

/// When linear ops on quantized weights multiply by the weight dequantized for that op
/// (an f32 GEMM over every row at once) instead of candle's quantized kernels, which cost
/// each row the full dot-product arithmetic. The choice is by phase, never by batch size,
/// so that a request's numbers do not depend on what runs beside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenseMatmul {
    /// Always the quantized kernels (as candle-transformers' `quantized_llama` runs).
    #[default]
    Never,
    /// Prefill steps dequantize; decode runs the quantized kernels.
    Prefill,
    /// Every step dequantizes (batched decode amortises it over its rows).
    Always,
}

impl DenseMatmul {
    /// By name (what `--dense-matmul` takes); the error lists the names.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Self::Never),
            "prefill" => Ok(Self::Prefill),
            "always" => Ok(Self::Always),
            _ => Err(format!("`{s}` is not one of never, prefill, always")),
        }
    }

    /// Whether a step of `phase` dequantizes.
    pub fn applies(self, phase: Phase) -> bool {
        match self {
            Self::Never => false,
            Self::Prefill => phase == Phase::Prefill,
            Self::Always => true,
        }
    }
}

/// One request's share of a batched inference step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub request_id: u64,
    /// Absolute position of the segment's first token.
    pub position: u64,
    /// Tokens in this segment (at least 1).
    pub len: u32,
    /// Prefill: the prompt's last chunk (after it, the KV cache moves to the rank that
    /// decodes it). Always true in decode.
    pub last: bool,
}

/// One request's KV cache of one layer, moved from rank `from` to rank `to` before a
/// step whose placement runs that layer's attention elsewhere (serving a plan set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvMove {
    pub request_id: u64,
    pub layer: u32,
    pub from: u32,
    pub to: u32,
}

/// What a `Gather` asks each rank for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gather {
    /// The adapter gradients accumulated over this step's micro-batches (gradient checks).
    Grads,
    /// The adapters' parameters with their AdamW moments (checkpoints).
    State,
}

/// Which run of work a tensor belongs to: inference's (batch step id, 0), or training's
/// (optimizer step, micro-batch). Both key the same maps on a rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    /// The batch step's id (inference: unique over the leader's life) or the optimizer
    /// step (training).
    pub request: u64,
    /// 0 (inference), or the micro-batch (training).
    pub step: u32,
}

/// Every message workers exchange. Messages with tensors list their metadata here; the
/// bytes travel after the header (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello(Hello),
    /// The acceptor's answer to a hello: its rank, whether it holds a key, its nonce and its
    /// proof of the key over both nonces.
    Challenge {
        rank: u32,
        keyed: bool,
        nonce: String,
        proof: String,
    },
    /// The dialer's proof of the key over both nonces.
    Proof {
        proof: String,
    },
    /// The acceptor has authenticated the dialer: the handshake is over.
    Welcome {
        machine: String,
    },
    /// The handshake was refused; the connection closes after this.
    Refused {
        reason: String,
    },
    /// Rank 0 to every rank: the plan, the cluster, and the checkpoint whose weights it
    /// serves (a rank fetches those of its ops, or takes them from its cache).
    Setup {
        plan: Box<Plan>,
        ranks: Vec<RankInfo>,
        checkpoint: Box<crate::blob::CheckpointRef>,
        dtype: WireDType,
        /// Time every op, synchronising the device after each (cost-model validation).
        timing: bool,
        /// Training: how to initialise the LoRA adapters.
        #[serde(default)]
        train: Option<TrainSetup>,
        /// Dequantize GGUF's quantized weights at load instead of running them as stored.
        #[serde(default)]
        dequantize: bool,
        /// Quantize dense weights to this format at load.
        #[serde(default)]
        quantize: Option<crate::WeightFormat>,
        /// When quantized linear ops multiply by their dequantized weight.
        #[serde(default)]
        dense_matmul: DenseMatmul,
        /// Serving a plan set: its other placements (a `Start` names the one it runs). A
        /// rank loads the weights of its ops in every one, each once.
        #[serde(default)]
        alternatives: Vec<Plan>,
    },
    /// A rank to rank 0 after the set-up: the ops whose weights it lacks (none when its
    /// cache holds them all), in this order.
    FetchWeights {
        ops: Vec<crate::blob::OpRef>,
    },
    /// Rank 0 to a rank: the next op's weights follow in `WeightChunk`s, `blob.len` bytes in all.
    WeightBlob {
        blob: crate::blob::BlobMeta,
    },
    /// Rank 0 to a rank: bytes `offset..offset + data` of the current blob, with their SHA-256.
    WeightChunk {
        offset: u64,
        sha256: String,
        data: TensorMeta,
    },
    /// A rank has loaded its weights and connected to its peers.
    Ready {
        rank: u32,
        weight_bytes: u64,
        load_seconds: f64,
    },
    /// Rank 0 to every rank: run one batched step in `phase`'s placement: `tokens`
    /// (`[1, total]` u32) are the segments' tokens one after another, each segment one
    /// request's next tokens (a prompt chunk, or one token in decode). `step_id` keys the
    /// step's activations and logits (with step 0).
    ///
    /// Serving a plan set: `placement` picks the set's placement the step runs in (0, the
    /// setup's plan, otherwise its `alternatives[placement - 1]`), `moves` are the KV
    /// caches that must change rank first (the sender ships each at the step's start, the
    /// receiver's attention waits for it), and `keep_kv` keeps a finished prompt's caches
    /// where prefill left them instead of handing them to the placement's decode ranks.
    Start {
        step_id: u64,
        phase: Phase,
        tokens: TensorMeta,
        segments: Vec<Segment>,
        #[serde(default)]
        placement: u32,
        #[serde(default)]
        moves: Vec<KvMove>,
        #[serde(default)]
        keep_kv: bool,
    },
    /// The output of op `from_op`, sent to a rank that consumes it (every local consumer
    /// there reads it). Inference: step `step` of request `request_id`. Training: micro-batch
    /// `step` of optimizer step `request_id` (see [`RunKey`]).
    Activation {
        request_id: u64,
        step: u32,
        from_op: usize,
        tensors: Vec<TensorMeta>,
    },
    /// Training: the gradient of op `from_op`'s backward with respect to one input of its
    /// forward op, for the backward op `to_op` of that input's producer.
    Gradient {
        opt_step: u64,
        micro_batch: u32,
        from_op: usize,
        to_op: usize,
        tensors: Vec<TensorMeta>,
    },
    /// Rank 0 to every rank: run the forward and backward of one training micro-batch
    /// (`tokens`: batch x (seq + 1) ids, inputs and next-token targets).
    StartMicroBatch {
        opt_step: u64,
        micro_batch: u32,
        tokens: TensorMeta,
    },
    /// After prefill, or for a step's [`KvMove`]: the K and V cache of `layer` (first
    /// entry at absolute position `start`), for the rank that runs its attention next.
    /// `step_id` is the step that sent it (a cache may move more than once).
    KvHandover {
        request_id: u64,
        layer: u32,
        start: u64,
        #[serde(default)]
        step_id: u64,
        tensors: Vec<TensorMeta>,
    },
    /// The lm head's output for a step, to rank 0: `[segments, vocab]`, one row per
    /// segment (at its last position), in the `Start`'s order.
    Logits {
        step_id: u64,
        logits: TensorMeta,
    },
    /// Training: the loss of one micro-batch, from the rank with the lm head to rank 0.
    Loss {
        opt_step: u64,
        micro_batch: u32,
        loss: f64,
    },
    /// Training: a rank's LoRA tensors (gradients or parameters) by PEFT name, to rank 0.
    Adapters {
        rank: u32,
        opt_step: u64,
        names: Vec<String>,
        tensors: Vec<TensorMeta>,
    },
    /// Training: a rank has run one micro-batch's backward; `sumsq` is the squared norm of
    /// its accumulated adapter gradients so far (complete once every micro-batch is in).
    MicroBatchDone {
        rank: u32,
        opt_step: u64,
        micro_batch: u32,
        sumsq: f64,
    },
    /// Training: apply AdamW step `t` (1-based: the optimizer steps taken, this one
    /// included) to the accumulated gradients times `clip`, then clear them.
    Update {
        t: u64,
        lr: f64,
        clip: f64,
        weight_decay: f64,
    },
    /// Training: send rank 0 the adapters as an `Adapters` message.
    Gather {
        opt_step: u64,
        what: Gather,
    },
    /// Training or inference with adapters: set these adapter tensors (PEFT names; moments
    /// carry `.exp_avg` / `.exp_avg_sq` suffixes).
    LoadAdapters {
        names: Vec<String>,
        tensors: Vec<TensorMeta>,
    },
    /// A request is over: drop its KV cache.
    Finish {
        request_id: u64,
    },
    /// A rank's traffic for a finished request, to rank 0: activation bytes sent, and the
    /// KV cache it received after prefill (bytes, and when the last of it arrived, counted
    /// from the prefill's start on this rank).
    Stats {
        rank: u32,
        request_id: u64,
        bytes_sent: u64,
        frames_sent: u64,
        handover_bytes: u64,
        handover_ms: f64,
        /// With timing on: each op's mean measured time on this rank, ms.
        op_ms: Vec<(usize, f64)>,
        /// Training: the most micro-batches this rank held at once.
        #[serde(default)]
        peak_runs: u32,
        /// The most memory this rank's process has held resident, bytes (0: unknown).
        #[serde(default)]
        peak_rss_bytes: u64,
        /// With timing on: which kernels this rank's quantized matmuls ran, one line per
        /// format (`Q8_0: Lemurian's AVX2 (633 calls, 322563 rows)`).
        #[serde(default)]
        kernel_paths: Vec<String>,
    },
    /// Something failed on `rank`.
    Error {
        rank: u32,
        message: String,
    },
    Heartbeat {
        rank: u32,
        seq: u64,
    },
    /// Stop; the receiver exits cleanly.
    Shutdown {
        reason: String,
    },
}

impl Message {
    /// Metadata of the tensors that follow this message's header.
    pub fn tensor_metas(&self) -> Vec<&TensorMeta> {
        match self {
            Message::Start { tokens, .. } | Message::StartMicroBatch { tokens, .. } => vec![tokens],
            Message::Activation { tensors, .. }
            | Message::Gradient { tensors, .. }
            | Message::KvHandover { tensors, .. }
            | Message::Adapters { tensors, .. }
            | Message::LoadAdapters { tensors, .. } => tensors.iter().collect(),
            Message::Logits { logits, .. } => vec![logits],
            Message::WeightChunk { data, .. } => vec![data],
            _ => Vec::new(),
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Challenge { .. } => "challenge",
            Message::Proof { .. } => "proof",
            Message::Welcome { .. } => "welcome",
            Message::Refused { .. } => "refused",
            Message::Setup { .. } => "setup",
            Message::FetchWeights { .. } => "fetch_weights",
            Message::WeightBlob { .. } => "weight_blob",
            Message::WeightChunk { .. } => "weight_chunk",
            Message::Ready { .. } => "ready",
            Message::Start { .. } => "start",
            Message::Activation { .. } => "activation",
            Message::Gradient { .. } => "gradient",
            Message::StartMicroBatch { .. } => "start_micro_batch",
            Message::KvHandover { .. } => "kv_handover",
            Message::Logits { .. } => "logits",
            Message::Loss { .. } => "loss",
            Message::Adapters { .. } => "adapters",
            Message::MicroBatchDone { .. } => "micro_batch_done",
            Message::Update { .. } => "update",
            Message::Gather { .. } => "gather",
            Message::LoadAdapters { .. } => "load_adapters",
            Message::Finish { .. } => "finish",
            Message::Stats { .. } => "stats",
            Message::Error { .. } => "error",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Shutdown { .. } => "shutdown",
        }
    }
}

/// One decoded frame: a message and the data of its tensors, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub message: Message,
    pub tensors: Vec<Bytes>,
}

impl Frame {
    /// A frame without tensors.
    pub fn control(message: Message) -> Self {
        Self { message, tensors: Vec::new() }
    }

    /// The tensors of this frame, metadata with data.
    pub fn wire_tensors(&self) -> Vec<WireTensor> {
        self.message
            .tensor_metas()
            .into_iter()
            .zip(&self.tensors)
            .map(|(m, d)| WireTensor { meta: m.clone(), data: d.clone() })
            .collect()
    }
}

/// A frame that cannot be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes is shorter than its 4-byte header length")]
    Short { len: usize },
    #[error("header claims {claimed} bytes but the frame has {available} after it")]
    HeaderLength { claimed: usize, available: usize },
    #[error("unknown or malformed message: {0}")]
    Message(String),
    #[error("tensor {index} has a shape whose size overflows")]
    Overflow { index: usize },
    #[error("the tensors declare {declared} bytes but the frame carries {carried}")]
    TensorBytes { declared: usize, carried: usize },
    #[error("message `{message}` declares {declared} tensors but {given} were given")]
    TensorCount { message: &'static str, declared: usize, given: usize },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// A connection's largest acceptable frame, shared between its decoder and its owner:
/// a connection starts at [`crate::auth::PRE_AUTH_MAX_FRAME`] and its owner raises the
/// limit once the peer has authenticated.
#[derive(Debug, Clone)]
pub struct FrameLimit(Arc<AtomicUsize>);

impl FrameLimit {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(max)))
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, max: usize) {
        self.0.store(max, Ordering::Relaxed);
    }

    /// Errs if a frame of `len` bytes is over the limit.
    pub fn check(&self, len: usize) -> Result<(), FrameError> {
        let max = self.get();
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(())
    }
}

/// Length-delimited frames of [`Frame`]s, with a maximum frame size.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    max: FrameLimit,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        Self::with_limit(FrameLimit::new(max_frame), max_frame)
    }

    /// A codec whose limit its owner can change while it runs, never above `ceiling`.
    pub fn with_limit(limit: FrameLimit, ceiling: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .little_endian()
            .length_field_length(4)
            .max_frame_length(ceiling)
            .new_codec();
        Self { inner, max: limit }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

/// Decodes one frame's payload (without the outer length).
pub fn decode_payload(mut payload: Bytes) -> Result<Frame, FrameError> {
    if payload.len() < 4 {
        return Err(FrameError::Short { len: payload.len() });
    }
    let header_len = payload.get_u32_le() as usize;
    if header_len > payload.len() {
        return Err(FrameError::HeaderLength { claimed: header_len, available: payload.len() });
    }
    let header = payload.split_to(header_len);
    let message: Message = serde_json::from_slice(&header).map_err(|e| FrameError::Message(e.to_string()))?;
    let mut declared = 0usize;
    let metas = message.tensor_metas();
    for (index, m) in metas.iter().enumerate() {
        let n = m.nbytes().ok_or(FrameError::Overflow { index })?;
        declared = declared.checked_add(n).ok_or(FrameError::Overflow { index })?;
    }
    if declared != payload.len() {
        return Err(FrameError::TensorBytes { declared, carried: payload.len() });
    }
    let tensors = metas.iter().map(|m| payload.split_to(m.nbytes().unwrap_or(0))).collect();
    Ok(Frame { message, tensors })
}

/// Checks a frame's tensors against its message and returns the header bytes.
fn header_of(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let metas = frame.message.tensor_metas();
    if metas.len() != frame.tensors.len() {
        return Err(FrameError::TensorCount {
            message: frame.message.name(),
            declared: metas.len(),
            given: frame.tensors.len(),
        });
    }
    for (index, (m, d)) in metas.iter().zip(&frame.tensors).enumerate() {
        let n = m.nbytes().ok_or(FrameError::Overflow { index })?;
        if n != d.len() {
            return Err(FrameError::TensorBytes { declared: n, carried: d.len() });
        }
    }
    serde_json::to_vec(&frame.message).map_err(|e| FrameError::Message(e.to_string()))
}

/// Encodes one frame's payload (without the outer length).
pub fn encode_payload(frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
    let header = header_of(frame)?;
    dst.reserve(4 + header.len() + frame.tensors.iter().map(Bytes::len).sum::<usize>());
    dst.put_u32_le(header.len() as u32);
    dst.put_slice(&header);
    for t in &frame.tensors {
        dst.put_slice(t);
    }
    Ok(())
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        // Refuse an oversized frame from its length alone, before buffering (or reserving
        // room for) it.
        if src.len() >= 4 {
            self.max.check(u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize)?;
        }
        match self.inner.decode(src)? {
            Some(payload) => decode_payload(payload.freeze()).map(Some),
            None => Ok(None),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let header = header_of(&frame)?;
        let len = 4 + header.len() + frame.tensors.iter().map(Bytes::len).sum::<usize>();
        self.max.check(len)?;
        // One copy, straight into the write buffer.
        dst.reserve(4 + len);
        dst.put_u32_le(len as u32);
        dst.put_u32_le(header.len() as u32);
        dst.put_slice(&header);
        for t in &frame.tensors {
            dst.put_slice(t);
        }
        Ok(())
    }
}
