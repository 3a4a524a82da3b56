//! A real `lemur-worker` serving over TCP with a cluster key, attacked as a process on
//! the same network would: a 1 GiB length prefix, garbage, half a handshake, a crowd of
//! idle connections, a leader with the wrong key or none, an authenticated leader that
//! leaves before its plan. Each is dropped and logged with its address, and afterwards the
//! real leader (twice in a row) gets the tokens candle-transformers' Mistral computes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use candle_core::Device;
use common::*;
use futures::{SinkExt, StreamExt};
use lemur_protocol::auth::{ClusterKey, Credentials, Dialer};
use lemur_protocol::wire::{Frame, FrameCodec, RankInfo, DEFAULT_MAX_FRAME};
use lemur_worker::cluster::Cluster;
use lemur_worker::runtime::{run_node, NodeConfig, Timeouts};
use tokio_util::codec::{Encoder, Framed};

const PROMPT: [u32; 4] = [3, 14, 15, 92];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Rank 1 as a user runs it: serving leader after leader, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Worker {
    /// Kills the worker and returns what it logged.
    fn log(mut self) -> String {
        let _ = self.0.kill();
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

/// Whether the worker closed `s` within `limit` (a read returned end of file or an error).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a refusal frame may come first
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

fn leader(cluster: &Cluster, key: Option<ClusterKey>, job: lemur_worker::runtime::Job) -> NodeConfig {
    let mut cfg = NodeConfig::new(0, cluster.clone(), Device::Cpu, Some(job));
    cfg.timeouts = Timeouts { connect: Duration::from_secs(20), ..fast() };
    cfg.key = key;
    cfg
}

#[test]
fn hostile_peers_are_dropped_and_the_real_leader_is_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 11)?;
    let (want, _) = reference_generate(&model, &PROMPT, 6)?;
    let plan = infer_plan(&cfg, 2, 6, |op| op.id % 2)?;
    let (p0, p1) = (free_port(), free_port());
    let rank = |r: u32, port: u16, m: &str| RankInfo { rank: r, addr: format!("127.0.0.1:{port}"), machine: m.into() };
    let cluster = Cluster { id: "hostile".into(), ranks: vec![rank(0, p0, "m4-pro"), rank(1, p1, "m5-pro")] };
    let cluster_path = dir.path().join("cluster.toml");
    std::fs::write(
        &cluster_path,
        format!(
            "id = \"hostile\"\n[[rank]]\nrank = 0\naddr = \"127.0.0.1:{p0}\"\nmachine = \"m4-pro\"\n\
             [[rank]]\nrank = 1\naddr = \"127.0.0.1:{p1}\"\nmachine = \"m5-pro\"\n"
        ),
    )?;
    let key_path = dir.path().join("cluster.key");
    let key = ClusterKey::write_new(&key_path)?;
    let worker = Worker(
        Command::new(env!("CARGO_BIN_EXE_lemur-worker"))
            .args(["--rank", "1", "--cluster"])
            .arg(&cluster_path)
            .arg("--key-file")
            .arg(&key_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let addr = cluster.ranks[1].addr.clone();
    let connect = || -> Result<TcpStream> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(&addr) {
                Ok(s) => return Ok(s),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e).context("the worker never listened"),
            }
        }
    };

    // A crowd of idle connections, more than the worker has handshake slots for.
    let idle: Vec<TcpStream> = (0..24).map(|_| connect()).collect::<Result<_>>()?;
    // A length prefix of 1 GiB: dropped at once, long before the handshake deadline.
    let mut huge = connect()?;
    huge.write_all(&(1u32 << 30).to_le_bytes())?;
    assert!(closed_within(&mut huge, Duration::from_secs(3)), "a 1 GiB prefix kept the connection open");
    // Garbage that is not a frame at all.
    let mut garbage = connect()?;
    garbage.write_all(&[0x10, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])?;
    assert!(closed_within(&mut garbage, Duration::from_secs(3)), "garbage kept the connection open");
    // Half a handshake: a well-formed hello, then silence (it holds one slot, no more).
    let mut half = connect()?;
    let d = Dialer::new(Credentials::keyed(&key, "hostile"), 0, 1)?;
    let mut hello = BytesMut::new();
    FrameCodec::new(DEFAULT_MAX_FRAME).encode(Frame::control(d.hello()), &mut hello)?;
    half.write_all(&hello)?;

    // Leaders without the key: keyless, and with another key. Both fail, saying why.
    let job = || infer_job(&plan, &model, &PROMPT, 6);
    let e = run_node(leader(&cluster, None, job())).unwrap_err().to_string();
    assert!(e.contains("rank 1") && e.contains("cluster key"), "{e}");
    let e = run_node(leader(&cluster, Some(ClusterKey::generate()?), job())).unwrap_err().to_string();
    assert!(e.contains("rank 1") && e.contains("failed authentication"), "{e}");

    // An authenticated leader that leaves before sending its plan: the worker starts over.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let s = tokio::net::TcpStream::connect(&addr).await?;
        let mut f = Framed::new(s, FrameCodec::new(DEFAULT_MAX_FRAME));
        let d = Dialer::new(Credentials::keyed(&key, "hostile"), 0, 1)?;
        f.send(Frame::control(d.hello())).await?;
        let challenge = f.next().await.context("no challenge")??.message;
        f.send(Frame::control(d.on_challenge(challenge)?)).await?;
        let machine = d.on_welcome(f.next().await.context("no welcome")??.message)?;
        assert_eq!(machine, "m5-pro");
        anyhow::Ok(())
    })?;

    // The real leader, twice: the worker serves one after the other.
    for run in 0..2 {
        let out = run_node(leader(&cluster, Some(key.clone()), job()))?.context("no outcome")?;
        assert_eq!(out.tokens, want, "run {run}");
    }
    drop((idle, half));
    let log = worker.log();
    assert!(log.contains("fingerprint"), "{log}");
    // Each refusal is logged with the address it came from.
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("refused a connection")).collect();
    for what in ["exceeds the limit of 4096", "has no cluster key", "closed the connection during the handshake"] {
        assert!(refused.iter().any(|l| l.contains(what) && l.contains("127.0.0.1:")), "no `{what}` in:\n{log}");
    }
    assert!(log.contains("dropped a handshake to make room"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    Ok(())
}
