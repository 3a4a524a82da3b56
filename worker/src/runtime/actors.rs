//! The messages between a rank's actors, the [`Peer`] actor (one per connection) and the
//! [`Router`] every actor sends frames through.
//!
//! A frame for rank r goes to r's `Peer`, which writes it; a frame for this rank itself
//! goes to this rank's `Node` as if it had arrived from a peer. So rank 0 runs the same
//! handlers for its own logits, losses and stats as for any other rank's.

use std::collections::HashMap;
use std::time::Instant;

use actix::io::{SinkWrite, WriteHandler};
use actix::prelude::*;
use lemur_protocol::wire::{Frame, FrameError, Message};

use super::transport::FrameSink;
use super::Timeouts;
use crate::error::WorkerError;

/// A frame that arrived from rank `from` (this rank itself for its own sends).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Inbound {
    pub from: u32,
    /// The cluster it came through (rank 0 starts a new one for each placement; frames
    /// of an old one are dropped).
    pub epoch: u64,
    pub frame: Frame,
}

/// A connection is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct PeerDown {
    pub rank: u32,
    pub epoch: u64,
    pub reason: String,
}

/// Close this connection (its run is over; a last frame written before is sent).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Close;

/// Write this frame to the peer.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Write(pub Frame);

/// Stop this rank at once, as a crash would: no goodbyes (fail points).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Crash(pub String);

/// Where frames go: peers by rank, and this rank's own node (its inbox).
#[derive(Clone)]
pub(super) struct Router {
    pub me: u32,
    pub epoch: u64,
    pub peers: HashMap<u32, Addr<Peer>>,
    pub inbox: Recipient<Inbound>,
    /// The node's crash switch (fail points).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub crash: Recipient<Crash>,
}

impl Router {
    /// Sends `frame` to rank `to`; to this rank itself, through its node's inbox.
    pub fn send(&self, to: u32, frame: Frame) -> Result<(), WorkerError> {
        if to == self.me {
            self.inbox.do_send(Inbound { from: self.me, epoch: self.epoch, frame });
            return Ok(());
        }
        let peer =
            self.peers.get(&to).ok_or_else(|| WorkerError::Peer { rank: to, message: "not connected".into() })?;
        peer.do_send(Write(frame));
        Ok(())
    }

    /// Sends `frame` to every rank, this one included.
    pub fn broadcast(&self, frame: &Frame) {
        self.to_peers(frame);
        self.inbox.do_send(Inbound { from: self.me, epoch: self.epoch, frame: frame.clone() });
    }

    /// Sends `frame` to every other rank.
    pub fn to_peers(&self, frame: &Frame) {
        for p in self.peers.values() {
            p.do_send(Write(frame.clone()));
        }
    }
}

/// One connection to another rank: reads frames (a stream), writes them (a sink), sends a
/// heartbeat every interval and declares the peer dead after `peer_dead` of silence or a
/// broken connection.
pub(super) struct Peer {
    pub rank: u32,
    pub me: u32,
    pub epoch: u64,
    /// The node: frames in, and the news that this connection is gone.
    pub inbox: Recipient<Inbound>,
    pub down: Recipient<PeerDown>,
    pub sink: SinkWrite<Frame, FrameSink>,
    pub last_seen: Instant,
    pub seq: u64,
    pub t: Timeouts,
    /// Closed by this rank: no more heartbeats.
    pub closing: bool,
}

impl Actor for Peer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.t.heartbeat_interval, |act, ctx| {
            if act.closing {
                return;
            }
            act.seq += 1;
            let _ = act.sink.write(Frame::control(Message::Heartbeat { rank: act.me, seq: act.seq }));
            if act.last_seen.elapsed() > act.t.peer_dead {
                act.down.do_send(PeerDown {
                    rank: act.rank,
                    epoch: act.epoch,
                    reason: format!("no heartbeat for {:.1} s", act.last_seen.elapsed().as_secs_f64()),
                });
                ctx.stop();
            }
        });
    }
}

impl StreamHandler<Result<Frame, FrameError>> for Peer {
    fn handle(&mut self, item: Result<Frame, FrameError>, ctx: &mut Self::Context) {
        match item {
            Ok(frame) => {
                self.last_seen = Instant::now();
                if !matches!(frame.message, Message::Heartbeat { .. }) {
                    self.inbox.do_send(Inbound { from: self.rank, epoch: self.epoch, frame });
                }
            }
            Err(e) => {
                self.down.do_send(PeerDown { rank: self.rank, epoch: self.epoch, reason: format!("bad frame: {e}") });
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.down.do_send(PeerDown { rank: self.rank, epoch: self.epoch, reason: "closed the connection".into() });
        ctx.stop();
    }
}

impl WriteHandler<FrameError> for Peer {
    fn error(&mut self, err: FrameError, _ctx: &mut Self::Context) -> Running {
        self.down.do_send(PeerDown { rank: self.rank, epoch: self.epoch, reason: format!("write failed: {err}") });
        Running::Stop
    }
}

impl Handler<Close> for Peer {
    type Result = ();
    fn handle(&mut self, _: Close, _ctx: &mut Self::Context) {
        // The sink sends what it holds, then closes; the actor stops when it has.
        self.closing = true;
        self.sink.close();
    }
}

impl Handler<Write> for Peer {
    type Result = ();
    fn handle(&mut self, msg: Write, _ctx: &mut Self::Context) {
        let _ = self.sink.write(msg.0);
    }
}
