//! Measuring a link between two processes with the workers' own transport: one side
//! listens (`lemur-profile link --listen`), the other probes (`--peer`): small-frame round
//! trips for latency, a stream of 4 MiB activation frames for bandwidth.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use lemur_protocol::wire::{Frame, FrameCodec, Hello, Message, TensorMeta, WireDType};
use lemur_protocol::LinkProfile;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

use crate::error::WorkerError;

const CLUSTER: &str = "lemur-link-probe";
const WAIT: Duration = Duration::from_secs(30);

async fn next(net: &mut Framed<TcpStream, FrameCodec>, what: &str) -> Result<Frame, WorkerError> {
    match tokio::time::timeout(WAIT, net.next()).await {
        Err(_) => Err(WorkerError::Wire(format!("no {what} within {} s", WAIT.as_secs()))),
        Ok(None) => Err(WorkerError::Wire(format!("the peer closed the connection before {what}"))),
        Ok(Some(f)) => Ok(f?),
    }
}

/// Serves one probe: echoes heartbeats, swallows activations, answers the end marker.
pub async fn serve(addr: &str, machine: &str) -> Result<(), WorkerError> {
    let listener =
        TcpListener::bind(addr).await.map_err(|e| WorkerError::Wire(format!("cannot listen on {addr}: {e}")))?;
    let (stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let mut net = Framed::new(stream, FrameCodec::default());
    let ours = Hello::new(CLUSTER, 1, machine);
    match next(&mut net, "a handshake").await?.message {
        Message::Hello(h) => h.check(&ours, None).map_err(WorkerError::Wire)?,
        other => return Err(WorkerError::Wire(format!("expected a handshake, got `{}`", other.name()))),
    }
    net.send(Frame::control(Message::Hello(ours))).await?;
    loop {
        let f = next(&mut net, "a probe frame").await?;
        match f.message {
            Message::Heartbeat { .. } => net.send(f).await?,
            Message::Activation { .. } => {}
            Message::Shutdown { .. } => return Ok(()),
            other => return Err(WorkerError::Wire(format!("unexpected `{}` while probing", other.name()))),
        }
    }
}

/// Probes a listening peer; returns the measured link between `machine` and the peer's.
pub async fn probe(addr: &str, machine: &str, rounds: usize, frames: usize) -> Result<LinkProfile, WorkerError> {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .map_err(|_| WorkerError::Wire(format!("cannot reach {addr} within {} s", WAIT.as_secs())))??;
    stream.set_nodelay(true)?;
    let mut net = Framed::new(stream, FrameCodec::default());
    let ours = Hello::new(CLUSTER, 0, machine);
    net.send(Frame::control(Message::Hello(ours.clone()))).await?;
    let peer = match next(&mut net, "a handshake").await?.message {
        Message::Hello(h) => {
            h.check(&ours, None).map_err(WorkerError::Wire)?;
            h.machine
        }
        other => return Err(WorkerError::Wire(format!("expected a handshake, got `{}`", other.name()))),
    };
    let mut rtts = Vec::with_capacity(rounds);
    for seq in 0..rounds as u64 {
        let t0 = Instant::now();
        net.send(Frame::control(Message::Heartbeat { rank: 0, seq })).await?;
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
        net.send(Frame { message: msg, tensors: vec![data.clone()] }).await?;
    }
    net.send(Frame::control(Message::Heartbeat { rank: 0, seq: u64::MAX })).await?;
    next(&mut net, "the end marker").await?;
    let secs = t0.elapsed().as_secs_f64() - one_way;
    let gbps = (frames * elems * 4) as f64 / secs.max(1e-9) / 1e9;
    net.send(Frame::control(Message::Shutdown { reason: "probe done".into() })).await?;
    let link = LinkProfile {
        name: format!("{machine}-{peer}"),
        between: [machine.to_string(), peer],
        bandwidth_gbps: gbps,
        latency_us: one_way * 1e6,
    };
    link.validate().map_err(|e| WorkerError::Wire(format!("measured link is invalid: {e}")))?;
    Ok(link)
}
