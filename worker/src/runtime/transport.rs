//! How ranks reach each other: the [`Transport`] trait and its TCP implementation.
//!
//! A transport listens at a cluster address and connects to one; every connection comes
//! back as a [`Conn`]: a stream of decoded [`Frame`]s and a sink of frames to send. The
//! runtime above it (handshakes, peers, heartbeats) is the same whatever carries the
//! bytes: [`Tcp`] in production, the in-memory `MemNet` (`memnet.rs`) in tests, where the network
//! can drop, delay, cut and partition on command.

use std::fmt;
use std::pin::Pin;

use futures::future::BoxFuture;
use futures::{Sink, Stream};
use lemur_protocol::auth::PRE_AUTH_MAX_FRAME;
use lemur_protocol::wire::{Frame, FrameCodec, FrameError, FrameLimit, DEFAULT_MAX_FRAME};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::error::WorkerError;

/// Frames as they arrive from a peer; the stream ends when the connection closes.
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, FrameError>> + Send>>;
/// Frames to a peer.
pub type FrameSink = Pin<Box<dyn Sink<Frame, Error = FrameError> + Send>>;

/// One connection to a peer.
pub struct Conn {
    pub reader: FrameStream,
    pub writer: FrameSink,
    /// Where it comes from, for logs and errors (an address).
    pub remote: String,
    /// The largest frame the reader accepts: [`PRE_AUTH_MAX_FRAME`] until the handshake
    /// has authenticated the peer, then [`DEFAULT_MAX_FRAME`] ([`Conn::authenticated`]).
    pub limit: FrameLimit,
}

impl Conn {
    /// The peer has authenticated: take frames of any size the protocol allows.
    pub fn authenticated(&self) {
        self.limit.set(DEFAULT_MAX_FRAME);
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("remote", &self.remote).finish_non_exhaustive()
    }
}

/// Connections arriving at a listening address.
pub trait Listener: Send {
    fn accept(&mut self) -> BoxFuture<'_, Result<Conn, WorkerError>>;
}

/// A way for ranks to reach each other.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Listens at `addr` (a cluster address).
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Result<Box<dyn Listener>, WorkerError>>;
    /// One attempt to connect from the rank listening at `from` to `to` (the caller
    /// retries while the peer is still starting).
    fn connect<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, std::io::Result<Conn>>;
}

/// TCP with Nagle off, frames by [`FrameCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

fn tcp_conn(stream: TcpStream, remote: String) -> std::io::Result<Conn> {
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let limit = FrameLimit::new(PRE_AUTH_MAX_FRAME);
    Ok(Conn {
        reader: Box::pin(FramedRead::new(rd, FrameCodec::with_limit(limit.clone(), DEFAULT_MAX_FRAME))),
        writer: Box::pin(FramedWrite::new(wr, FrameCodec::default())),
        remote,
        limit,
    })
}

struct TcpAccept(TcpListener);

impl Listener for TcpAccept {
    fn accept(&mut self) -> BoxFuture<'_, Result<Conn, WorkerError>> {
        Box::pin(async move {
            let (stream, from) = self.0.accept().await?;
            Ok(tcp_conn(stream, from.to_string())?)
        })
    }
}

impl Transport for Tcp {
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Result<Box<dyn Listener>, WorkerError>> {
        Box::pin(async move {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| WorkerError::Listen { addr: addr.to_string(), message: e.to_string() })?;
            Ok(Box::new(TcpAccept(l)) as Box<dyn Listener>)
        })
    }

    fn connect<'a>(&'a self, _from: &'a str, to: &'a str) -> BoxFuture<'a, std::io::Result<Conn>> {
        Box::pin(async move { tcp_conn(TcpStream::connect(to).await?, to.to_string()) })
    }
}
