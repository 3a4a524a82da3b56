//! Transport benchmark on loopback: throughput of one stream of 4 MiB activation frames and
//! the per-hop latency of a decode-sized activation (1 x 4096 f32), through Lemurian's
//! frame codec, against raw TCP moving the same bytes in the same run.
//!
//! `cargo bench -p lemur-worker --bench transport`

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use lemur_protocol::wire::{Frame, FrameCodec, Message, TensorMeta, WireDType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, FramedWrite};

fn activation(elems: usize) -> Frame {
    let meta = TensorMeta { dtype: WireDType::F32, shape: vec![1, elems] };
    let data = Bytes::from(vec![7u8; elems * 4]);
    Frame {
        message: Message::Activation { request_id: 1, step: 0, from_op: 3, tensors: vec![meta] },
        tensors: vec![data],
    }
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (a, b) = (a.unwrap(), b.unwrap().0);
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

async fn framed_throughput(frames: usize, elems: usize) -> f64 {
    let (a, b) = pair().await;
    let reader = tokio::spawn(async move {
        let mut r = FramedRead::new(b, FrameCodec::default());
        let mut bytes = 0usize;
        for _ in 0..frames {
            let f = r.next().await.unwrap().unwrap();
            bytes += f.tensors[0].len();
        }
        bytes
    });
    let mut w = FramedWrite::new(a, FrameCodec::default());
    let f = activation(elems);
    let t0 = Instant::now();
    for _ in 0..frames {
        w.send(f.clone()).await.unwrap();
    }
    let bytes = reader.await.unwrap();
    bytes as f64 / t0.elapsed().as_secs_f64() / 1e9
}

async fn raw_throughput(frames: usize, bytes: usize) -> f64 {
    let (mut a, mut b) = pair().await;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; bytes];
        for _ in 0..frames {
            b.read_exact(&mut buf).await.unwrap();
        }
    });
    let buf = vec![7u8; bytes];
    let t0 = Instant::now();
    for _ in 0..frames {
        a.write_all(&buf).await.unwrap();
    }
    reader.await.unwrap();
    (frames * bytes) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

async fn framed_hop(rounds: usize, elems: usize) -> Duration {
    let (a, b) = pair().await;
    let echo = tokio::spawn(async move {
        let (r, w) = b.into_split();
        let mut r = FramedRead::new(r, FrameCodec::default());
        let mut w = FramedWrite::new(w, FrameCodec::default());
        for _ in 0..rounds {
            let f = r.next().await.unwrap().unwrap();
            w.send(f).await.unwrap();
        }
    });
    let (r, w) = a.into_split();
    let mut r = FramedRead::new(r, FrameCodec::default());
    let mut w = FramedWrite::new(w, FrameCodec::default());
    let f = activation(elems);
    let t0 = Instant::now();
    for _ in 0..rounds {
        w.send(f.clone()).await.unwrap();
        r.next().await.unwrap().unwrap();
    }
    echo.await.unwrap();
    t0.elapsed() / (2 * rounds as u32)
}

async fn raw_hop(rounds: usize, bytes: usize) -> Duration {
    let (mut a, mut b) = pair().await;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; bytes];
        for _ in 0..rounds {
            b.read_exact(&mut buf).await.unwrap();
            b.write_all(&buf).await.unwrap();
        }
    });
    let mut buf = vec![7u8; bytes];
    let t0 = Instant::now();
    for _ in 0..rounds {
        a.write_all(&buf).await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
    }
    echo.await.unwrap();
    t0.elapsed() / (2 * rounds as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let big = 1 << 20; // 4 MiB of f32
    let small = 4096; // one decode token's hidden state
    let runs = 5;
    let (mut ft, mut rt_, mut fh, mut rh) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        ft.push(rt.block_on(framed_throughput(256, big)));
        rt_.push(rt.block_on(raw_throughput(256, big * 4)));
        fh.push(rt.block_on(framed_hop(2000, small)).as_secs_f64() * 1e6);
        rh.push(rt.block_on(raw_hop(2000, small * 4)).as_secs_f64() * 1e6);
    }
    let (ft, rt_, fh, rh) = (median(ft), median(rt_), median(fh), median(rh));
    println!("loopback transport, median of {runs} runs (this machine)");
    println!("{:<44} {:>12} {:>12} {:>8}", "", "lemurian", "raw tcp", "ratio");
    println!(
        "{:<44} {:>9.2} GB/s {:>7.2} GB/s {:>7.2}x",
        "throughput, 4 MiB activations, one stream",
        ft,
        rt_,
        ft / rt_
    );
    println!("{:<44} {:>10.1} us {:>9.1} us {:>7.2}x", "per hop, 16 KiB decode activation", fh, rh, fh / rh);
}
