//! Measuring a link between two processes with the workers' own transport: one side
//! listens (`lemur-profile link --listen`), the other probes (`--peer`): small-frame round
//! trips for latency, a stream of 4 MiB activation frames for bandwidth.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use lemur_protocol::auth::{ClusterKey, Credentials};
use lemur_protocol::wire::{Frame, Message, TensorMeta, WireDType};
use lemur_protocol::LinkProfile;

use crate::error::WorkerError;
use crate::runtime::setup::{accept_one, dial, Handshake};
use crate::runtime::transport::{Conn, Tcp, Transport};
use crate::runtime::Timeouts;

const CLUSTER: &str = "lemur-link-probe";
const WAIT: Duration = Duration::from_secs(30);

async fn next(net: &mut Conn, what: &str) -> Result<Frame, WorkerError> {
    // The probe's two ranks mean nothing to its user: name the address instead.
    crate::runtime::setup::read_frame(net, WAIT, what, 1).await.map_err(|e| match e {
        WorkerError::Peer { message, .. } => WorkerError::Wire(format!("{}: {message}", net.remote)),
        e => e,
    })
}

/// The probe's handshake: the workers' own, in a two-rank cluster of its own (keyed when
/// `key` is given, so a listener on a network answers only the prober that holds it).
fn handshake(me: u32, machine: &str, key: Option<&ClusterKey>) -> Handshake {
    let cred = Credentials::new(key, CLUSTER);
    let timeouts = Timeouts { connect: WAIT, handshake: WAIT, ..Timeouts::default() };
    Handshake { cred, me, ranks: 2, machine: machine.into(), timeouts }
}

/// Serves one probe: echoes heartbeats, swallows activations, answers the end marker.
/// Connections that fail the handshake are refused and it waits for the next.
pub async fn serve(addr: &str, machine: &str, key: Option<&ClusterKey>) -> Result<(), WorkerError> {
    let mut listener = Tcp.listen(addr).await?;
    let hs = handshake(1, machine, key);
    let mut net = loop {
        let conn = listener.accept().await?;
        match accept_one(conn, hs.clone()).await {
            Ok((_, conn)) => break conn,
            Err(rej) => tracing::warn!(peer = %rej.from, "refused a probe: {}", rej.detail),
        }
    };
    loop {
        let f = next(&mut net, "a probe frame").await?;
        match f.message {
            Message::Heartbeat { .. } => net.writer.send(f).await?,
            Message::Activation { .. } => {}
            Message::Shutdown { .. } => return Ok(()),
            other => return Err(WorkerError::Wire(format!("unexpected `{}` while probing", other.name()))),
        }
    }
}

/// Probes a listening peer; returns the measured link between `machine` and the peer's.
pub async fn probe(
    addr: &str,
    machine: &str,
    key: Option<&ClusterKey>,
    rounds: usize,
    frames: usize,
) -> Result<LinkProfile, WorkerError> {
    let (mut net, peer) = dial(&Tcp, "", addr, &handshake(0, machine, key), 1).await?;
    let mut rtts = Vec::with_capacity(rounds);
    for seq in 0..rounds as u64 {
        let t0 = Instant::now();
        net.writer.send(Frame::control(Message::Heartbeat { rank: 0, seq })).await?;
        next(&mut net, "an echo").await?;
        rtts.push(t0.elapsed().as_secs_f64());
    }
    rtts.sort_by(f64::total_cmp);
    let one_way = rtts[rtts.len() / 2] / 2.0;
    let elems = 1 << 20;
    let meta = TensorMeta { dtype: WireDType::F32, shape: vec![1, elems] };
    let data = Bytes::from(vec![1u8; elems * 4]);
    let t0 = Instant::now();
    for _ in 0..frames {
        let msg = Message::Activation { request_id: 0, step: 0, from_op: 0, tensors: vec![meta.clone()] };
        net.writer.send(Frame { message: msg, tensors: vec![data.clone()] }).await?;
    }
    net.writer.send(Frame::control(Message::Heartbeat { rank: 0, seq: u64::MAX })).await?;
    next(&mut net, "the end marker").await?;
    let secs = t0.elapsed().as_secs_f64() - one_way;
    let gbps = (frames * elems * 4) as f64 / secs.max(1e-9) / 1e9;
    net.writer.send(Frame::control(Message::Shutdown { reason: "probe done".into() })).await?;
    let link = LinkProfile {
        name: format!("{machine}-{peer}"),
        between: [machine.to_string(), peer],
        bandwidth_gbps: gbps,
        latency_us: one_way * 1e6,
    };
    link.validate().map_err(|e| WorkerError::Wire(format!("measured link is invalid: {e}")))?;
    Ok(link)
}
