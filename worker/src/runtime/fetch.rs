//! Weights from one machine, over the set-up connection: a rank names the ops whose
//! weights its cache lacks (`FetchWeights`); rank 0 checks that the rank runs them, reads
//! each from its checkpoint in the format the run holds it, and streams it (`WeightBlob`,
//! then `WeightChunk`s of [`CHUNK_BYTES`], each with its SHA-256). The rank checks every
//! length against the shape before taking a byte, every chunk and the whole blob against
//! their checksums, and stores each blob in its cache before using it. A rank never opens
//! a path it was sent: only its own cache folder.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use candle_core::{DType, Device};
use futures::SinkExt;
use lemur_protocol::blob::{sha256_hex, OpRef, CHUNK_BYTES};
use lemur_protocol::wire::{Frame, Message, TensorMeta, WireDType};
use lemur_protocol::{ModelConfig, OpKind};

use super::setup::read_frame;
use super::transport::Conn;
use super::Timeouts;
use crate::error::WorkerError;
use crate::weight_cache::{Blob, Lookup, WeightCache};
use crate::weights::{weight_shape, Checkpoint};

/// The ops among `ops` that hold weights a rank must be sent: a tied lm head is left out
/// when the same rank holds the embedding (it shares the table).
pub fn ops_with_weights(ops: &HashSet<(OpKind, Option<u32>)>, config: &ModelConfig) -> Vec<OpRef> {
    let embedding_here = ops.contains(&(OpKind::Embedding, None));
    let mut out: Vec<OpRef> = ops
        .iter()
        .filter(|(k, _)| weight_shape(config, *k).is_some())
        .filter(|(k, _)| !(*k == OpKind::LmHead && config.tie_word_embeddings && embedding_here))
        .map(|&(kind, layer)| OpRef { kind, layer })
        .collect();
    out.sort_by_key(|o| (o.layer.map_or(-1, i64::from), o.kind));
    out
}

fn peer(rank: u32, message: impl Into<String>) -> WorkerError {
    WorkerError::Peer { rank, message: message.into() }
}

/// Rank 0: answers rank `rank`'s `FetchWeights` (ops it runs: `allowed`) from `ck`, in
/// `dtype`; returns the bytes sent.
pub(super) async fn serve(
    conn: &mut Conn,
    rank: u32,
    allowed: &[OpRef],
    ck: Arc<Checkpoint>,
    dtype: DType,
    t: &Timeouts,
) -> Result<u64, WorkerError> {
    let frame = read_frame(conn, t.load, "its list of weights to fetch", rank).await.map_err(|e| e.at(rank))?;
    let ops = match frame.message {
        Message::FetchWeights { ops } => ops,
        Message::Error { rank, message } => return Err(peer(rank, message)),
        other => return Err(peer(rank, format!("sent `{}` instead of the weights it lacks", other.name()))),
    };
    let allowed: HashSet<OpRef> = allowed.iter().copied().collect();
    if let Some(op) = ops.iter().find(|o| !allowed.contains(o)) {
        let msg = format!("rank {rank} asked for the weights of {op}, which its plan does not give it");
        let _ = conn.writer.send(Frame::control(Message::Error { rank: 0, message: msg.clone() })).await;
        return Err(WorkerError::Plan(msg));
    }
    if ops.is_empty() {
        tracing::info!(rank, "the rank's cache holds all its weights");
        return Ok(0);
    }
    let bar = crate::progress::ops_bar(ops.len() as u64, &format!("sending rank {rank} its weights"));
    let mut sent = 0u64;
    for op in ops {
        let ck = ck.clone();
        let blob = tokio::task::spawn_blocking(move || {
            let w = ck.op_weights(op.kind, op.layer, &Device::Cpu, dtype, &mut 0)?;
            Blob::of(op, &w)?.ok_or_else(|| WorkerError::Weights(format!("{op} has no weights")))
        })
        .await
        .map_err(|e| WorkerError::Weights(format!("reading weights panicked: {e}")))?;
        let blob = match blob {
            Ok(b) => b,
            Err(e) => {
                let _ = conn.writer.send(Frame::control(Message::Error { rank: 0, message: e.to_string() })).await;
                return Err(e);
            }
        };
        let data = Bytes::from(blob.data);
        let lost = |e: lemur_protocol::wire::FrameError| peer(rank, format!("sending its weights: {e}"));
        conn.writer.send(Frame::control(Message::WeightBlob { blob: blob.meta })).await.map_err(lost)?;
        let mut offset = 0;
        while offset < data.len() {
            let chunk = data.slice(offset..(offset + CHUNK_BYTES).min(data.len()));
            let meta = TensorMeta { dtype: WireDType::U8, shape: vec![chunk.len()] };
            let message = Message::WeightChunk { offset: offset as u64, sha256: sha256_hex(&chunk), data: meta };
            offset += chunk.len();
            conn.writer.send(Frame { message, tensors: vec![chunk] }).await.map_err(lost)?;
        }
        sent += data.len() as u64;
        bar.inc(1);
        bar.set_message(format!("sending rank {rank} its weights ({:.0} MB)", sent as f64 / 1e6));
    }
    bar.finish_and_clear();
    tracing::info!(rank, bytes = sent, "weights sent");
    Ok(sent)
}

/// A rank: the weights of `wanted`, from `cache` where it holds them whole, the rest
/// fetched from rank 0 over `leader` and stored in `cache`.
pub(super) async fn fetch(
    leader: &mut Conn,
    me: u32,
    wanted: Vec<OpRef>,
    cache: WeightCache,
    config: &ModelConfig,
    t: &Timeouts,
) -> Result<Vec<Blob>, WorkerError> {
    let c = cache.clone();
    let looked = tokio::task::spawn_blocking(move || wanted.into_iter().map(|op| (op, c.get(op))).collect::<Vec<_>>())
        .await
        .map_err(|e| WorkerError::Weights(format!("reading the weight cache panicked: {e}")))?;
    let mut have = Vec::new();
    let mut missing = Vec::new();
    for (op, found) in looked {
        match found {
            Lookup::Hit(b) => have.push(b),
            Lookup::Miss => missing.push(op),
            Lookup::Corrupt(why) => {
                tracing::warn!(rank = me, "cached weights of {op} are unusable ({why}); fetching them again");
                missing.push(op);
            }
        }
    }
    tracing::info!(rank = me, cached = have.len(), fetching = missing.len(), cache = %cache.dir().display(), "weights");
    leader.writer.send(Frame::control(Message::FetchWeights { ops: missing.clone() })).await?;
    let bar = crate::progress::ops_bar(missing.len() as u64, &format!("rank {me}: fetching weights"));
    let mut got_bytes = 0u64;
    for op in missing {
        let frame = read_frame(leader, t.load, &format!("the weights of {op}"), 0).await?;
        let meta = match frame.message {
            Message::WeightBlob { blob } => blob,
            Message::Error { rank, message } => return Err(peer(rank, message)),
            other => return Err(peer(0, format!("sent `{}` instead of the weights of {op}", other.name()))),
        };
        meta.check(op).map_err(|e| peer(0, e))?;
        // The length follows from the shape, checked against the model before allocating.
        let shape: Vec<u64> = meta.shape.iter().map(|&d| d as u64).collect();
        if weight_shape(config, op.kind) != Some(shape.clone()) {
            return Err(peer(0, format!("sent {op} of shape {shape:?}, which this model does not have")));
        }
        let len = meta.len as usize;
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            let frame = read_frame(leader, t.handshake, &format!("next chunk of {op}"), 0).await?;
            let Message::WeightChunk { offset, sha256, .. } = &frame.message else {
                return Err(peer(0, format!("sent `{}` in the middle of the weights of {op}", frame.message.name())));
            };
            let chunk = frame.tensors.first().cloned().unwrap_or_default();
            if *offset != data.len() as u64 || chunk.is_empty() || data.len() + chunk.len() > len {
                return Err(peer(
                    0,
                    format!(
                        "a chunk of {op} at {offset} (+{}) where {} of {len} bytes had come",
                        chunk.len(),
                        data.len()
                    ),
                ));
            }
            if sha256_hex(&chunk) != *sha256 {
                return Err(peer(0, format!("a chunk of {op} at {offset} fails its checksum")));
            }
            data.extend_from_slice(&chunk);
        }
        let blob = Blob { meta, data };
        if sha256_hex(&blob.data) != blob.meta.sha256 {
            return Err(peer(0, format!("the weights of {op} fail their checksum")));
        }
        let c = cache.clone();
        let blob = tokio::task::spawn_blocking(move || c.put(&blob).map(|_| blob))
            .await
            .map_err(|e| WorkerError::Weights(format!("writing the weight cache panicked: {e}")))??;
        got_bytes += blob.meta.len;
        have.push(blob);
        bar.inc(1);
        bar.set_message(format!("rank {me}: fetching weights ({:.0} MB)", got_bytes as f64 / 1e6));
    }
    bar.finish_and_clear();
    Ok(have)
}
