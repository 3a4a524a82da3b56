//! Hand-written backward passes (vector-Jacobian products) of every op kind, and the
//! training forward that keeps what they need.
//!
//! Training used to differentiate each op with candle's autograd. That works, but candle's
//! matmul backward also computes the gradient of the frozen weight (a second GEMM as large
//! as the forward one, plus a zeroed weight-sized buffer), its fused RMSNorm, RoPE and
//! softmax have no backward (so the forward had to run slow differentiable forms), and a
//! residual's backward cost a full autograd walk for what is a pass-through. Here each op's
//! backward is the closed form the planner's cost model prices (`planner::graph`'s backward
//! kernels), and the forward runs the same fused kernels as inference:
//!
//! - linear `y = x W^T + s (m x) A^T B^T` (LoRA with dropout mask `m`):
//!   `dx = dy W + m (s dy B) A`, `dB = s dy^T (m x A^T)`, `dA = (s dy B)^T (m x)`;
//! - RMSNorm `y = w x r`, `r = 1 / rms(x)`: `dx = r (g - x̂ mean(g x̂))`, `g = w dy`, `x̂ = x r`;
//! - RoPE is a rotation: its transpose is the rotation by the opposite angle;
//! - attention `O = P V`, `P = softmax(s Q K^T + M)`: `dV = P^T dO`, `dP = dO V^T`,
//!   `dS = P (dP - rowsum(dP P))`, `dQ = s dS K`, `dK = s dS^T Q`, summed over each KV
//!   head's group of query heads;
//! - SiLU-multiply `y = silu(g) u`: `du = dy silu(g)`, `dg = dy u σ(g) (1 + g (1 - σ(g)))`;
//! - a residual add passes its gradient to both inputs;
//! - the lm head with mean cross-entropy: `dlogits = (softmax - onehot) / N`.
//!
//! Each is tested against candle's autograd on the differentiable forms (below).

use candle_core::{DType, Tensor, D};
use lemur_protocol::OpKind;

use crate::error::WorkerError;
use crate::exec::{attention_inputs, attention_with_probs, repeat_kv, Executor, OpWeights, StepInput};

/// What a forward op keeps for its backward: its inputs (by producer kind, as `run`
/// received them) and op-specific extras (attention probabilities, the lm head's softmax).
#[derive(Debug, Clone)]
pub struct Saved {
    pub inputs: Vec<(OpKind, Vec<Tensor>)>,
    pub extra: Vec<Tensor>,
}

/// An op's backward: gradients of its inputs (aligned with [`Saved::inputs`]; `None` for
/// inputs that take none, such as token ids) and of its LoRA adapter `(dA, dB)`.
#[derive(Debug)]
pub struct OpGrads {
    pub inputs: Vec<Option<Vec<Tensor>>>,
    pub lora: Option<(Tensor, Tensor)>,
}

/// The dropout seed of the adapter on `kind` of `layer` for one micro-batch.
pub fn dropout_seed(step: &StepInput, kind: OpKind, layer: Option<u32>) -> u64 {
    step.dropout_seed ^ (u64::from(layer.unwrap_or(0)) << 24) ^ ((kind as u64 + 1) << 48)
}

fn to_2d(x: &Tensor) -> Result<Tensor, WorkerError> {
    let n = x.dim(D::Minus1)?;
    Ok(x.reshape(((), n))?)
}

impl Executor {
    /// Runs a forward op of a training step and returns its outputs and what its backward needs.
    pub fn forward_train(
        &mut self,
        kind: OpKind,
        layer: Option<u32>,
        inputs: &[(OpKind, &[Tensor])],
        step: &StepInput,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>), WorkerError> {
        match kind {
            OpKind::Attention => {
                let (q, k, v) = attention_inputs(inputs)?;
                let (out, probs) = self.attention_train(q, k, v, step)?;
                Ok((vec![out], vec![probs]))
            }
            OpKind::LmHead if step.targets.is_some() => {
                let x = inputs
                    .iter()
                    .find(|(k, _)| *k == OpKind::FinalNorm)
                    .and_then(|(_, t)| t.first())
                    .ok_or_else(|| WorkerError::Plan("lm_head lacks its input from final_norm".into()))?;
                let targets = step.targets.as_ref().ok_or_else(|| WorkerError::Plan("no targets".into()))?;
                let logits = to_2d(&self.linear(kind, layer, x, step)?)?.to_dtype(DType::F32)?;
                let (loss, probs) = cross_entropy(&logits, &targets.flatten_all()?)?;
                Ok((vec![loss], vec![probs]))
            }
            _ => Ok((self.run(kind, layer, inputs, step)?, Vec::new())),
        }
    }

    /// `[b, s, h*d]` attention of rotated `q [b, h, s, d]`, `k [b, kv, s, d]` and raw
    /// `v [b, s, kv*d]` within one sequence, with the probabilities `[b, h, s, s]`.
    fn attention_train(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &StepInput,
    ) -> Result<(Tensor, Tensor), WorkerError> {
        let cfg = &self.cfg;
        let (b, h, s, d) = q.dims4()?;
        let kvh = cfg.num_kv_heads as usize;
        let v = v.reshape((b, s, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let window = cfg.sliding_window.map(|w| w as usize);
        let vis =
            crate::fused::Visibility { q_start: step.position(), rows_per_group: s, k_start: step.position(), window };
        attention_with_probs(q, k, &v, vis, h / kvh)
    }

    /// The backward of a forward op: `grads` are the gradients of its outputs (summed over
    /// its consumers), `saved` what its forward kept.
    pub fn backward(
        &self,
        kind: OpKind,
        layer: Option<u32>,
        saved: &Saved,
        grads: &[Tensor],
        step: &StepInput,
    ) -> Result<OpGrads, WorkerError> {
        let first = |i: usize| -> Result<&Tensor, WorkerError> {
            saved.inputs.get(i).and_then(|(_, t)| t.first()).ok_or_else(|| {
                WorkerError::Plan(format!("{kind}: backward lacks saved input {i} (inputs {})", saved.inputs.len()))
            })
        };
        let dy = grads.first().ok_or_else(|| WorkerError::Plan(format!("{kind}: backward without a gradient")))?;
        let all = |g: Vec<Tensor>| saved.inputs.iter().map(|_| Some(g.clone())).collect::<Vec<_>>();
        Ok(match kind {
            OpKind::Embedding => OpGrads { inputs: vec![None; saved.inputs.len()], lora: None },
            OpKind::AttnResidual | OpKind::MlpResidual => OpGrads { inputs: all(vec![dy.clone()]), lora: None },
            OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => {
                let w = match self.weight(kind, layer)? {
                    OpWeights::Norm(w) => w,
                    _ => return Err(WorkerError::Weights(format!("{kind} needs a norm weight"))),
                };
                let dx = rms_norm_backward(first(0)?, w, dy, self.cfg.rms_norm_eps)?;
                OpGrads { inputs: vec![Some(vec![dx])], lora: None }
            }
            k if k.is_linear() => {
                let x = first(0)?;
                let dy = if k == OpKind::LmHead && step.targets.is_some() {
                    // Mean cross-entropy over every position: (softmax - onehot) / N.
                    let probs =
                        saved.extra.first().ok_or_else(|| WorkerError::Plan("lm_head kept no softmax".into()))?;
                    let targets = step.targets.as_ref().ok_or_else(|| WorkerError::Plan("no targets".into()))?;
                    let t = targets.flatten_all()?;
                    let n = t.dim(0)?;
                    let scale =
                        f64::from(dy.to_dtype(DType::F32)?.flatten_all()?.get(0)?.to_scalar::<f32>()?) / n as f64;
                    let d = cross_entropy_backward(probs, &t, scale)?.to_dtype(x.dtype())?;
                    let mut shape = x.dims().to_vec();
                    *shape.last_mut().unwrap_or(&mut 0) = d.dim(1)?;
                    d.reshape(shape)?
                } else {
                    dy.clone()
                };
                let (dx, lora) = self.linear_backward(k, layer, x, &dy, step)?;
                OpGrads { inputs: vec![Some(vec![dx])], lora }
            }
            OpKind::Rope => {
                let dq = self.rope_backward(dy)?;
                let dk = self
                    .rope_backward(grads.get(1).ok_or_else(|| WorkerError::Plan("rope backward lacks dk".into()))?)?;
                // Inputs: q (from q_proj) and k (from k_proj), in the order saved.
                let inputs = saved
                    .inputs
                    .iter()
                    .map(|(k, _)| match k {
                        OpKind::QProj => Ok(Some(vec![dq.clone()])),
                        OpKind::KProj => Ok(Some(vec![dk.clone()])),
                        other => Err(WorkerError::Plan(format!("rope has an input from {other}"))),
                    })
                    .collect::<Result<_, WorkerError>>()?;
                OpGrads { inputs, lora: None }
            }
            OpKind::Attention => {
                let refs: Vec<(OpKind, &[Tensor])> = saved.inputs.iter().map(|(k, t)| (*k, t.as_slice())).collect();
                let (q, k, v) = attention_inputs(&refs)?;
                let probs = saved.extra.first().ok_or_else(|| WorkerError::Plan("attention kept no probs".into()))?;
                let (dq, dk, dv) = attention_backward(q, k, v, probs, dy, self.cfg.num_kv_heads as usize)?;
                let inputs = saved
                    .inputs
                    .iter()
                    .map(|(k, _)| match k {
                        OpKind::Rope => Ok(Some(vec![dq.clone(), dk.clone()])),
                        OpKind::VProj => Ok(Some(vec![dv.clone()])),
                        other => Err(WorkerError::Plan(format!("attention has an input from {other}"))),
                    })
                    .collect::<Result<_, WorkerError>>()?;
                OpGrads { inputs, lora: None }
            }
            OpKind::SiluMul => {
                let find = |want: OpKind| {
                    saved
                        .inputs
                        .iter()
                        .find(|(k, _)| *k == want)
                        .and_then(|(_, t)| t.first())
                        .ok_or_else(|| WorkerError::Plan(format!("silu_mul lacks its input from {want}")))
                };
                let (dg, du) = silu_mul_backward(find(OpKind::GateProj)?, find(OpKind::UpProj)?, dy)?;
                let inputs = saved
                    .inputs
                    .iter()
                    .map(|(k, _)| Some(vec![if *k == OpKind::GateProj { dg.clone() } else { du.clone() }]))
                    .collect();
                OpGrads { inputs, lora: None }
            }
            other => return Err(WorkerError::Plan(format!("no backward for {other}"))),
        })
    }

    /// This micro-batch's dropout mask for the adapter on `kind` of `layer`, shaped like
    /// `x`, or `None` when nothing is dropped (no dropout, or not training).
    fn lora_mask(
        &self,
        kind: OpKind,
        layer: Option<u32>,
        x: &Tensor,
        dropout: f64,
        step: &StepInput,
    ) -> Result<Option<Tensor>, WorkerError> {
        if dropout > 0.0 && step.targets.is_some() {
            let seed = dropout_seed(step, kind, layer);
            Ok(Some(crate::lora::dropout_mask(x.dims(), dropout, seed, x.device())?.to_dtype(x.dtype())?))
        } else {
            Ok(None)
        }
    }

    /// The adapter's input: `x` with this micro-batch's dropout mask applied (training).
    pub(crate) fn lora_input(
        &self,
        kind: OpKind,
        layer: Option<u32>,
        x: &Tensor,
        dropout: f64,
        step: &StepInput,
    ) -> Result<Tensor, WorkerError> {
        Ok(match self.lora_mask(kind, layer, x, dropout, step)? {
            Some(mask) => (x * mask)?,
            None => x.clone(),
        })
    }

    /// `dx` of a linear op and its adapter's `(dA, dB)`.
    fn linear_backward(
        &self,
        kind: OpKind,
        layer: Option<u32>,
        x: &Tensor,
        dy: &Tensor,
        step: &StepInput,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>), WorkerError> {
        // A quantized base weight is dequantized for this op's input gradient only and
        // dropped after it (QLoRA: memory stays near the quantized size).
        let w = self
            .weight(kind, layer)?
            .dense(&self.device)
            .map_err(|_| WorkerError::Weights(format!("{kind} needs a linear weight")))?
            .to_dtype(dy.dtype())?;
        let (x2, dy2) = (to_2d(x)?, to_2d(dy)?);
        let mut dx = dy2.matmul(&w.contiguous()?)?;
        let mut lora = None;
        if let Some(ad) = self.adapters.get(&(kind, layer)) {
            let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
            let xd = self.lora_mask(kind, layer, &x2, ad.dropout, step)?;
            let xm = match &xd {
                Some(m) => (&x2 * m)?,
                None => x2.clone(),
            };
            let h = xm.matmul(&a.t()?)?; // [t, r]
            let dh = (dy2.matmul(b)? * ad.scale)?; // [t, r]
            let db = (dy2.t()?.matmul(&h)? * ad.scale)?; // [out, r]
            let da = dh.t()?.matmul(&xm)?; // [r, in]
            let dxl = dh.matmul(a)?;
            let dxl = match &xd {
                Some(m) => (dxl * m)?,
                None => dxl,
            };
            dx = (dx + dxl)?;
            lora = Some((da, db));
        }
        Ok((dx.reshape(x.dims())?, lora))
    }

    /// Rotated `[b, h, s, d]` gradient -> `[b, s, h*d]` gradient of the unrotated input.
    fn rope_backward(&self, dy: &Tensor) -> Result<Tensor, WorkerError> {
        let (b, h, s, d) = dy.dims4()?;
        // Training runs from position 0 (a whole sequence).
        let cos = self.cos.narrow(0, 0, s)?;
        let sin = self.sin.narrow(0, 0, s)?.neg()?;
        let dx = candle_nn::rotary_emb::rope(&dy.contiguous()?, &cos, &sin)?;
        Ok(dx.transpose(1, 2)?.reshape((b, s, h * d))?)
    }
}

/// Mean cross-entropy of `logits [n, vocab]` (f32) against `targets [n]`, and the softmax
/// (kept for the backward). One fused softmax pass; the loss reads only the targets'
/// probabilities, unless one underflows, when it takes the exact log-softmax path.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor), WorkerError> {
    let probs = candle_nn::ops::softmax_last_dim(logits)?;
    let picked = probs.gather(&targets.unsqueeze(1)?, 1)?;
    let loss = if picked.min_all()?.to_scalar::<f32>()? > 1e-30 {
        picked.log()?.mean_all()?.neg()?
    } else {
        candle_nn::loss::cross_entropy(logits, targets)?
    };
    Ok((loss, probs))
}

/// `scale (softmax - onehot(targets))`: the logits' gradient of `scale` times the summed
/// cross-entropy.
pub fn cross_entropy_backward(probs: &Tensor, targets: &Tensor, scale: f64) -> Result<Tensor, WorkerError> {
    let n = targets.dim(0)?;
    let minus = Tensor::full(-scale as f32, (n, 1), probs.device())?;
    Ok((probs * scale)?.scatter_add(&targets.unsqueeze(1)?, &minus, 1)?)
}

/// `dx` of `y = w x / rms(x)` (computed in f32).
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor, WorkerError> {
    let dt = x.dtype();
    let (x, w, dy) = (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = x.broadcast_mul(&r)?;
    let g = dy.broadcast_mul(&w)?;
    let dot = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
    Ok(dx.to_dtype(dt)?)
}

/// `(dg, du)` of `y = silu(g) u`.
pub fn silu_mul_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor), WorkerError> {
    let sig = candle_nn::ops::sigmoid(g)?;
    let du = (dy * (g * &sig)?)?;
    // silu'(g) = σ(g) (1 + g (1 - σ(g)))
    let dsilu = (&sig * ((g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = ((dy * u)? * dsilu)?;
    Ok((dg, du))
}

/// Gradients of rotated `q`, `k` (`[b, h|kv, s, d]`) and raw `v` (`[b, s, kv*d]`) from
/// the output gradient `[b, s, h*d]` and the saved probabilities `[b, h, s, s]`.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    dout: &Tensor,
    kv_heads: usize,
) -> Result<(Tensor, Tensor, Tensor), WorkerError> {
    let (b, h, s, d) = q.dims4()?;
    let groups = h / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let v4 = v.reshape((b, s, kv_heads, d))?.transpose(1, 2)?.contiguous()?;
    let (kr, vr) = (repeat_kv(k, groups)?, repeat_kv(&v4, groups)?);
    let dout = dout.reshape((b, s, h, d))?.transpose(1, 2)?.contiguous()?;
    let dvr = probs.t()?.matmul(&dout)?; // [b, h, s, d]
    let dp = dout.matmul(&vr.t()?)?.to_dtype(DType::F32)?; // [b, h, s, s]
    let p32 = probs.to_dtype(DType::F32)?;
    let row = (&dp * &p32)?.sum_keepdim(D::Minus1)?;
    let ds = (p32 * dp.broadcast_sub(&row)?)?.to_dtype(q.dtype())?;
    let dq = (ds.matmul(&kr)? * scale)?;
    let dkr = (ds.t()?.matmul(q)? * scale)?;
    // Heads h = kv * groups + g share KV head kv: sum each group back.
    let fold = |x: Tensor| -> Result<Tensor, WorkerError> { Ok(x.reshape((b, kv_heads, groups, s, d))?.sum(2)?) };
    let dk = fold(dkr)?;
    let dv = fold(dvr)?.transpose(1, 2)?.reshape((b, s, kv_heads * d))?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Uniform values in [-1, 1), deterministic.
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.uniform()).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= tol * m.max(1.0), "max difference {d} (reference max {m})");
        assert!(m > 0.0, "the reference gradient is zero");
    }

    #[test]
    fn cross_entropy_equals_candles_including_underflowing_targets() {
        let logits = (rand(&[6, 50], 20) * 4.0).unwrap();
        let t = Tensor::new(&[3u32, 0, 49, 7, 7, 21], &Device::Cpu).unwrap();
        let (loss, _) = cross_entropy(&logits, &t).unwrap();
        close(&loss, &candle_nn::loss::cross_entropy(&logits, &t).unwrap(), 1e-6);
        // A target 200 nats below the rest: its probability underflows f32.
        let mut v = logits.to_vec2::<f32>().unwrap();
        v[2][49] = -200.0;
        let low = Tensor::new(v, &Device::Cpu).unwrap();
        let (loss, _) = cross_entropy(&low, &t).unwrap();
        let want = candle_nn::loss::cross_entropy(&low, &t).unwrap();
        close(&loss, &want, 1e-6);
        assert!(want.to_scalar::<f32>().unwrap() > 30.0);
    }

    #[test]
    fn rms_norm_backward_matches_autograd() {
        let x = Var::from_tensor(&rand(&[2, 5, 16], 1)).unwrap();
        let w = rand(&[16], 2);
        let dy = rand(&[2, 5, 16], 3);
        let eps = 1e-5;
        let ms = x.as_tensor().sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y = x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap();
        let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        close(&rms_norm_backward(x.as_tensor(), &w, &dy, eps).unwrap(), g.get(x.as_tensor()).unwrap(), 1e-5);
    }

    #[test]
    fn attention_backward_matches_autograd_with_groups_and_a_window() {
        let (b, h, kv, s, d) = (2, 4, 2, 7, 8);
        let q = Var::from_tensor(&rand(&[b, h, s, d], 4)).unwrap();
        let k = Var::from_tensor(&rand(&[b, kv, s, d], 5)).unwrap();
        let v = Var::from_tensor(&rand(&[b, s, kv * d], 6)).unwrap();
        let dout = rand(&[b, s, h * d], 7);
        // Reference: the differentiable forms (repeat, scores, mask, softmax), window 3.
        let vis = crate::fused::Visibility { q_start: 0, rows_per_group: s, k_start: 0, window: Some(3) };
        let mask = vis.additive_mask(s, s, &Device::Cpu).unwrap();
        let v4 = v.as_tensor().reshape((b, s, kv, d)).unwrap().transpose(1, 2).unwrap();
        let kr = repeat_kv(k.as_tensor(), h / kv).unwrap();
        let vr = repeat_kv(&v4.contiguous().unwrap(), h / kv).unwrap();
        let sc = (q.as_tensor().matmul(&kr.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax(&sc.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let out = p.matmul(&vr).unwrap().transpose(1, 2).unwrap().reshape((b, s, h * d)).unwrap();
        let g = (out * &dout).unwrap().sum_all().unwrap().backward().unwrap();
        let (dq, dk, dv) = attention_backward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &p, &dout, kv).unwrap();
        close(&dq, g.get(q.as_tensor()).unwrap(), 1e-5);
        close(&dk, g.get(k.as_tensor()).unwrap(), 1e-5);
        close(&dv, g.get(v.as_tensor()).unwrap(), 1e-5);
    }

    #[test]
    fn rope_backward_is_the_transpose_of_rope() {
        let cfg = lemur_protocol::ModelConfig::preset("tiny").unwrap();
        let exec = Executor::new(cfg.clone(), Device::Cpu, DType::F32).unwrap();
        let (b, s, heads, d) = (2, 6, cfg.num_heads as usize, cfg.head_dim as usize);
        let x = Var::from_tensor(&rand(&[b, s, heads * d], 8)).unwrap();
        let dy = rand(&[b, heads, s, d], 9);
        let x4 = x.as_tensor().reshape((b, s, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let y = candle_nn::rotary_emb::rope_slow(
            &x4,
            &exec.cos.narrow(0, 0, s).unwrap(),
            &exec.sin.narrow(0, 0, s).unwrap(),
        )
        .unwrap();
        let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        close(&exec.rope_backward(&dy).unwrap(), g.get(x.as_tensor()).unwrap(), 1e-5);
    }

    #[test]
    fn linear_lora_silu_and_cross_entropy_backward_match_autograd() {
        use crate::lora::Adapter;
        let cfg = lemur_protocol::ModelConfig::preset("tiny").unwrap();
        let mut exec = Executor::new(cfg.clone(), Device::Cpu, DType::F32).unwrap();
        let (h, vocab, r) = (cfg.hidden_size as usize, cfg.vocab_size as usize, 4);
        let (b, s) = (2, 5);
        let w = rand(&[vocab, h], 10);
        exec.set_weights(OpKind::LmHead, None, OpWeights::Linear(candle_nn::Linear::new(w.clone(), None)));
        let a = Var::from_tensor(&rand(&[r, h], 11)).unwrap();
        let bb = Var::from_tensor(&rand(&[vocab, r], 12)).unwrap();
        exec.adapters.insert((OpKind::LmHead, None), Adapter { a: a.clone(), b: bb.clone(), scale: 2.0, dropout: 0.3 });
        let targets =
            Tensor::from_vec((0..(b * s) as u32).map(|i| (i * 37) % vocab as u32).collect(), (b, s), &Device::Cpu)
                .unwrap();
        let step = StepInput {
            targets: Some(targets.clone()),
            dropout_seed: 99,
            ..StepInput::single(1, targets.clone(), 0).unwrap()
        };
        // Reference: silu-multiply of leaves, then the lm head and cross-entropy, by autograd.
        let gate = Var::from_tensor(&rand(&[b, s, h], 13)).unwrap();
        let up = Var::from_tensor(&rand(&[b, s, h], 14)).unwrap();
        let x = (candle_nn::ops::sigmoid(gate.as_tensor()).unwrap() * gate.as_tensor())
            .unwrap()
            .mul(up.as_tensor())
            .unwrap();
        let mask = crate::lora::dropout_mask(&[b, s, h], 0.3, dropout_seed(&step, OpKind::LmHead, None), &Device::Cpu)
            .unwrap();
        let low = (&x * &mask).unwrap().broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap();
        let logits = (x.broadcast_matmul(&w.t().unwrap()).unwrap()
            + (low.broadcast_matmul(&bb.as_tensor().t().unwrap()).unwrap() * 2.0).unwrap())
        .unwrap();
        let loss =
            candle_nn::loss::cross_entropy(&logits.reshape((b * s, vocab)).unwrap(), &targets.flatten_all().unwrap())
                .unwrap();
        let g = loss.backward().unwrap();

        // Hand-written: silu_mul forward, lm head forward_train, then both backwards.
        let xin = x.detach();
        let ins = [(OpKind::FinalNorm, std::slice::from_ref(&xin))];
        let (out, extra) = exec.forward_train(OpKind::LmHead, None, &ins, &step).unwrap();
        close(&out[0], &loss, 1e-6);
        let saved = Saved { inputs: vec![(OpKind::FinalNorm, vec![xin.clone()])], extra };
        let one = Tensor::new(1f32, &Device::Cpu).unwrap();
        let head = exec.backward(OpKind::LmHead, None, &saved, &[one], &step).unwrap();
        let (da, db) = head.lora.unwrap();
        close(&da, g.get(a.as_tensor()).unwrap(), 1e-5);
        close(&db, g.get(bb.as_tensor()).unwrap(), 1e-5);
        let dx = head.inputs[0].as_ref().unwrap()[0].clone();
        let saved = Saved {
            inputs: vec![
                (OpKind::GateProj, vec![gate.as_tensor().detach()]),
                (OpKind::UpProj, vec![up.as_tensor().detach()]),
            ],
            extra: vec![],
        };
        let act = exec.backward(OpKind::SiluMul, Some(0), &saved, &[dx], &step).unwrap();
        close(&act.inputs[0].as_ref().unwrap()[0], g.get(gate.as_tensor()).unwrap(), 1e-5);
        close(&act.inputs[1].as_ref().unwrap()[0], g.get(up.as_tensor()).unwrap(), 1e-5);
    }
}
