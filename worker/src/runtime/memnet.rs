//! An in-memory [`Transport`] with fault injection: a whole cluster in one process, whose
//! network a test can break on cue.
//!
//! Ranks listen and connect by their cluster addresses as over TCP; every frame is encoded
//! and decoded by the wire format (so malformed tensors fail as they would on a socket),
//! but travels through a channel. A test adds [`Rule`]s that fire when a matching frame is
//! sent (the nth `activation` from rank 1 to rank 0, say), in the spirit of tikv's
//! `transport_simulate.rs`:
//! - [`Fault::Drop`] loses the frame; [`Fault::Delay`] delivers it later (frames sent
//!   meanwhile overtake it: reordering). [`Fault::Duplicate`] delivers it twice;
//!   [`Fault::Corrupt`] flips a bit of its last byte (a tensor's data, in frames with one).
//! - [`Fault::Cut`] delivers it, then closes the connection both ways (a peer that died
//!   or a cable pulled out: the other side sees the stream end).
//! - [`Fault::Isolate`] delivers it, then closes every connection of the named address
//!   (a machine that crashed).
//! - [`Fault::Partition`] delivers it, then silently loses everything between the two
//!   ends from then on, heartbeats included (a hung peer: nothing closes, nothing arrives).
//!
//! Faults fire on events, not on timers, so tests that use them need no sleeps.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::Sink;
use lemur_protocol::auth::PRE_AUTH_MAX_FRAME;
use lemur_protocol::wire::{decode_payload, encode_payload, Frame, FrameError, FrameLimit};
use tokio::sync::mpsc;

use super::transport::{Conn, Listener, Transport};
use crate::error::WorkerError;

/// What happens to a frame a [`Rule`] matches.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    Drop,
    Delay(Duration),
    /// Deliver the frame twice.
    Duplicate,
    /// Flip a bit in the frame's last byte (tensor data, for frames that carry some).
    Corrupt,
    Cut,
    /// Close every connection of this address after delivering.
    Isolate(String),
    Partition,
}

/// A fault that fires on matching frames: sent from `from` to `to` (addresses; `None`
/// matches any), of message `message` (its [`lemur_protocol::wire::Message::name`]; `None`
/// matches any but heartbeats). It skips the first `skip` matches, then fires on the next
/// `times`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub from: Option<String>,
    pub to: Option<String>,
    pub message: Option<&'static str>,
    pub skip: usize,
    pub times: usize,
    pub fault: Fault,
}

impl Rule {
    /// Fires once on the first `message` frame from `from` to `to`.
    pub fn on(from: &str, to: &str, message: &'static str, fault: Fault) -> Self {
        Self { from: Some(from.into()), to: Some(to.into()), message: Some(message), skip: 0, times: 1, fault }
    }

    /// Fires on the (`skip` + 1)th match instead of the first.
    pub fn after(mut self, skip: usize) -> Self {
        self.skip = skip;
        self
    }

    fn matches(&self, from: &str, to: &str, message: &str) -> bool {
        self.from.as_deref().is_none_or(|f| f == from)
            && self.to.as_deref().is_none_or(|t| t == to)
            && match self.message {
                Some(m) => m == message,
                None => message != "heartbeat",
            }
    }
}

type Tx = Arc<Mutex<Option<mpsc::UnboundedSender<Bytes>>>>;

/// One direction of one connection, as the network sees it.
struct Direction {
    from: String,
    to: String,
    tx: Weak<Mutex<Option<mpsc::UnboundedSender<Bytes>>>>,
}

#[derive(Default)]
struct State {
    listeners: HashMap<String, mpsc::UnboundedSender<Conn>>,
    directions: Vec<Direction>,
    rules: Vec<(Rule, usize)>,
    /// Unordered pairs of addresses that lose everything between them.
    partitions: HashSet<(String, String)>,
    /// Frames sent, by (from, to, message name), faults or not.
    sent: HashMap<(String, String, &'static str), usize>,
}

impl State {
    fn cut(&mut self, a: &str, b: &str) {
        for d in &self.directions {
            if (d.from == a && d.to == b) || (d.from == b && d.to == a) {
                if let Some(tx) = d.tx.upgrade() {
                    tx.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
            }
        }
    }

    fn isolate(&mut self, a: &str) {
        for d in &self.directions {
            if d.from == a || d.to == a {
                if let Some(tx) = d.tx.upgrade() {
                    tx.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
            }
        }
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// The in-memory network. Clones share it.
#[derive(Clone, Default)]
pub struct MemNet {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemNet")
    }
}

impl MemNet {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a fault rule.
    pub fn add(&self, rule: Rule) {
        self.lock().rules.push((rule, 0));
    }

    /// Closes every connection between `a` and `b` now.
    pub fn cut(&self, a: &str, b: &str) {
        self.lock().cut(a, b);
    }

    /// Closes every connection of `a` now.
    pub fn isolate(&self, a: &str) {
        self.lock().isolate(a);
    }

    /// From now on, loses every frame between `a` and `b`.
    pub fn partition(&self, a: &str, b: &str) {
        self.lock().partitions.insert(pair(a, b));
    }

    pub fn heal(&self, a: &str, b: &str) {
        self.lock().partitions.remove(&pair(a, b));
    }

    /// Frames of `message` sent from `from` to `to` so far (lost ones included).
    pub fn sent(&self, from: &str, to: &str, message: &str) -> usize {
        self.lock().sent.iter().filter(|((f, t, m), _)| f == from && t == to && *m == message).map(|(_, n)| *n).sum()
    }
}

/// The sending half of one direction: applies the network's rules to every frame.
struct MemSink {
    from: String,
    to: String,
    tx: Tx,
    net: MemNet,
}

impl MemSink {
    fn deliver(&self, bytes: Bytes) -> Result<(), FrameError> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) if tx.send(bytes).is_ok() => Ok(()),
            _ => Err(FrameError::Io(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed"))),
        }
    }
}

impl Sink<Frame> for MemSink {
    type Error = FrameError;

    fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, frame: Frame) -> Result<(), FrameError> {
        let mut buf = BytesMut::new();
        encode_payload(&frame, &mut buf)?;
        let bytes = buf.freeze();
        let name = frame.message.name();
        let fault = {
            let mut st = self.net.lock();
            *st.sent.entry((self.from.clone(), self.to.clone(), name)).or_default() += 1;
            if st.partitions.contains(&pair(&self.from, &self.to)) {
                return Ok(());
            }
            let mut fired = None;
            for (rule, seen) in st.rules.iter_mut() {
                if rule.matches(&self.from, &self.to, name) {
                    *seen += 1;
                    if *seen > rule.skip && *seen <= rule.skip + rule.times {
                        fired = Some(rule.fault.clone());
                        break;
                    }
                }
            }
            fired
        };
        match fault {
            None => self.deliver(bytes),
            Some(Fault::Drop) => Ok(()),
            Some(Fault::Duplicate) => self.deliver(bytes.clone()).and_then(|_| self.deliver(bytes)),
            Some(Fault::Corrupt) => {
                let mut b = bytes.to_vec();
                if let Some(last) = b.last_mut() {
                    *last ^= 0x01;
                }
                self.deliver(Bytes::from(b))
            }
            Some(Fault::Delay(d)) => {
                let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(tx) = tx {
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = tx.send(bytes);
                    });
                }
                Ok(())
            }
            Some(Fault::Cut) => {
                let r = self.deliver(bytes);
                self.net.lock().cut(&self.from, &self.to);
                r
            }
            Some(Fault::Isolate(addr)) => {
                let r = self.deliver(bytes);
                self.net.lock().isolate(&addr);
                r
            }
            Some(Fault::Partition) => {
                let r = self.deliver(bytes);
                self.net.partition(&self.from, &self.to);
                r
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        Poll::Ready(Ok(()))
    }
}

impl MemNet {
    /// One direction `from` -> `to`: its sink and the receiving end's stream.
    fn direction(&self, from: &str, to: &str) -> (MemSink, mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let tx: Tx = Arc::new(Mutex::new(Some(tx)));
        self.lock().directions.push(Direction { from: from.into(), to: to.into(), tx: Arc::downgrade(&tx) });
        (MemSink { from: from.into(), to: to.into(), tx, net: self.clone() }, rx)
    }
}

/// One end of a connection to `remote`: what it receives and where it sends, with its
/// own frame limit, [`PRE_AUTH_MAX_FRAME`] until the handshake raises it.
fn mem_conn(rx: mpsc::UnboundedReceiver<Bytes>, writer: MemSink, remote: &str) -> Conn {
    let limit = FrameLimit::new(PRE_AUTH_MAX_FRAME);
    Conn { reader: stream_of(rx, limit.clone()), writer: Box::pin(writer), remote: remote.to_string(), limit }
}

/// The receiving end of a direction, with the connection's frame limit (as TCP's codec
/// checks it, counting the 4-byte length).
fn stream_of(rx: mpsc::UnboundedReceiver<Bytes>, limit: FrameLimit) -> super::transport::FrameStream {
    Box::pin(futures::stream::unfold((rx, limit), |(mut rx, limit)| async move {
        let bytes = rx.recv().await?;
        let frame = limit.check(bytes.len() + 4).and_then(|_| decode_payload(bytes));
        Some((frame, (rx, limit)))
    }))
}

struct MemListener(mpsc::UnboundedReceiver<Conn>);

impl Listener for MemListener {
    fn accept(&mut self) -> BoxFuture<'_, Result<Conn, WorkerError>> {
        Box::pin(async move { self.0.recv().await.ok_or_else(|| WorkerError::Wire("listener closed".into())) })
    }
}

impl Transport for MemNet {
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Result<Box<dyn Listener>, WorkerError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut st = self.lock();
            if st.listeners.get(addr).is_some_and(|l| !l.is_closed()) {
                return Err(WorkerError::Listen { addr: addr.to_string(), message: "address in use".into() });
            }
            st.listeners.insert(addr.to_string(), tx);
            Ok(Box::new(MemListener(rx)) as Box<dyn Listener>)
        })
    }

    fn connect<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, std::io::Result<Conn>> {
        Box::pin(async move {
            let refused =
                || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, format!("nothing listens on {to}"));
            let listener = self.lock().listeners.get(to).cloned().ok_or_else(refused)?;
            let (out_sink, out_rx) = self.direction(from, to);
            let (back_sink, back_rx) = self.direction(to, from);
            let server = mem_conn(out_rx, back_sink, from);
            listener.send(server).map_err(|_| refused())?;
            Ok(mem_conn(back_rx, out_sink, to))
        })
    }
}

#[cfg(test)]
mod tests {
    use futures::{SinkExt, StreamExt};
    use lemur_protocol::wire::Message;

    use super::*;

    fn beat(seq: u64) -> Frame {
        Frame::control(Message::Heartbeat { rank: 1, seq })
    }

    fn finish(id: u64) -> Frame {
        Frame::control(Message::Finish { request_id: id })
    }

    async fn pair_of(net: &MemNet) -> (Conn, Conn) {
        let mut l = net.listen("b").await.unwrap();
        let client = net.connect("a", "b").await.unwrap();
        let server = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_faults_fire_on_their_match() {
        let net = MemNet::new();
        net.add(Rule::on("a", "b", "finish", Fault::Drop).after(1));
        let (mut a, mut b) = pair_of(&net).await;
        for i in 0..4 {
            a.writer.send(finish(i)).await.unwrap();
        }
        a.writer.send(beat(9)).await.unwrap();
        // The second `finish` (id 1) was lost; the rest came in order.
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(b.reader.next().await.unwrap().unwrap().message);
        }
        assert_eq!(got, vec![finish(0).message, finish(2).message, finish(3).message, beat(9).message]);
        assert_eq!(net.sent("a", "b", "finish"), 4);
        assert_eq!(net.sent("b", "a", "finish"), 0);
    }

    #[tokio::test]
    async fn delay_reorders_cut_closes_and_partition_loses_silently() {
        let net = MemNet::new();
        net.add(Rule::on("a", "b", "finish", Fault::Delay(Duration::from_millis(30))));
        let (mut a, mut b) = pair_of(&net).await;
        a.writer.send(finish(0)).await.unwrap();
        a.writer.send(finish(1)).await.unwrap();
        assert_eq!(b.reader.next().await.unwrap().unwrap(), finish(1));
        assert_eq!(b.reader.next().await.unwrap().unwrap(), finish(0));

        net.partition("a", "b");
        a.writer.send(finish(2)).await.unwrap();
        b.writer.send(finish(3)).await.unwrap();
        let nothing = tokio::time::timeout(Duration::from_millis(50), b.reader.next()).await;
        assert!(nothing.is_err(), "a partitioned frame arrived");
        net.heal("a", "b");
        a.writer.send(finish(4)).await.unwrap();
        assert_eq!(b.reader.next().await.unwrap().unwrap(), finish(4));

        net.cut("a", "b");
        assert!(b.reader.next().await.is_none(), "a cut connection ends its stream");
        assert!(a.writer.send(finish(5)).await.is_err(), "and refuses writes");
        assert!(a.reader.next().await.is_none());
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_refused_and_dropping_a_side_closes_it() {
        let net = MemNet::new();
        let e = net.connect("a", "nowhere").await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        let (a, mut b) = pair_of(&net).await;
        drop(a);
        assert!(b.reader.next().await.is_none());
    }
}
