//! Where prefill attention's time goes: the workers' attention at Mistral-7B's shape (32
//! query heads over 8 KV heads of 128, causal), timed as a whole and part by part (QK^T,
//! the fused masked softmax, PV, the output transpose), with the device synchronised.
//!
//! `cargo run --release --example attention_parts -- [cpu|cuda] [seq] [f32|bf16]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lemurian::worker::exec::attention_core;
use lemurian::worker::fused::{masked_softmax, Visibility};

fn time(dev: &Device, label: &str, flops: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let runs = 10;
    let t0 = Instant::now();
    for _ in 0..runs {
        f()?;
    }
    dev.synchronize()?;
    let s = t0.elapsed().as_secs_f64() / runs as f64;
    let rate = if flops > 0.0 { format!("{:8.1} TFLOP/s", flops / s / 1e12) } else { String::new() };
    println!("{label:<34} {:9.3} ms {rate}", s * 1e3);
    Ok(s)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = lemurian::worker::device::open(args.get(1).map_or("cpu", String::as_str))?;
    let s: usize = args.get(2).map_or(Ok(2048), |x| x.parse())?;
    let dtype = match args.get(3).map(String::as_str) {
        Some("f32") => DType::F32,
        _ => DType::BF16,
    };
    let (h, kvh, d) = (32, 8, 128);
    let g = h / kvh;
    let q = Tensor::randn(0f32, 1.0, (1, h, s, d), &dev)?.to_dtype(dtype)?;
    let k = Tensor::randn(0f32, 1.0, (1, kvh, s, d), &dev)?.to_dtype(dtype)?;
    let v = Tensor::randn(0f32, 1.0, (1, kvh, s, d), &dev)?.to_dtype(dtype)?;
    let vis = Visibility { q_start: 0, rows_per_group: s, k_start: 0, window: None };
    let gemm = 2.0 * (h * s * s * d) as f64;
    println!("attention, {h} heads over {kvh} KV heads of {d}, {s} tokens, {dtype:?}, on {dev:?}");
    time(&dev, "whole (attention_core)", 2.0 * gemm, || {
        attention_core(&q, &k, &v, vis, g)?;
        Ok(())
    })?;
    let qf = q.reshape((1, kvh, g * s, d))?;
    time(&dev, "QK^T", gemm, || {
        qf.matmul(&k.t()?)?;
        Ok(())
    })?;
    let scores = qf.matmul(&k.t()?)?;
    time(&dev, "masked softmax (fused)", 0.0, || {
        masked_softmax(&scores, 1.0 / (d as f64).sqrt(), vis)?;
        Ok(())
    })?;
    let probs = masked_softmax(&scores, 1.0 / (d as f64).sqrt(), vis)?;
    time(&dev, "PV", gemm, || {
        probs.matmul(&v)?;
        Ok(())
    })?;
    let out = probs.matmul(&v)?.reshape((1, h, s, d))?;
    time(&dev, "output transpose", 0.0, || {
        out.transpose(1, 2)?.reshape((1, s, h * d))?;
        Ok(())
    })?;
    Ok(())
}
