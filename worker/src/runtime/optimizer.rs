//! A rank's LoRA training state outside the forward and backward: gradients accumulated
//! over a step's micro-batches, AdamW and its moments, and the adapters by PEFT name for
//! checkpoints (gather) and resuming (load). Plain code over candle tensors, no actors.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use lemur_protocol::wire::Gather;
use lemur_protocol::OpKind;

use crate::checkpoint::{EXP_AVG, EXP_AVG_SQ};
use crate::error::WorkerError;
use crate::lora::{peft_name, Adapter};

/// The adapters of one rank, by (kind, layer) as the executor holds them.
pub type Adapters = HashMap<(OpKind, Option<u32>), Adapter>;

/// One AdamW step's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// The step number, from 1 (bias correction).
    pub t: u64,
    pub lr: f64,
    /// Factor on the gradients (global-norm clipping, decided by rank 0).
    pub clip: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl AdamW {
    pub const BETA1: f64 = 0.9;
    pub const BETA2: f64 = 0.999;
    pub const EPS: f64 = 1e-8;
}

/// Accumulated gradients and AdamW moments of one rank's adapters.
#[derive(Debug, Default)]
pub struct AdapterState {
    /// (dA, dB) summed over this step's micro-batches.
    acc: HashMap<(OpKind, u32), (Tensor, Tensor)>,
    /// (m_A, v_A, m_B, v_B).
    adam: HashMap<(OpKind, u32), [Tensor; 4]>,
}

impl AdapterState {
    /// Adds one micro-batch's adapter gradients.
    pub fn accumulate(&mut self, grads: HashMap<(OpKind, u32), (Tensor, Tensor)>) -> Result<(), WorkerError> {
        for (key, (ga, gb)) in grads {
            let merged = match self.acc.remove(&key) {
                Some((a, b)) => ((a + ga)?, (b + gb)?),
                None => (ga, gb),
            };
            self.acc.insert(key, merged);
        }
        Ok(())
    }

    /// The squared norm of the accumulated gradients (rank 0 adds every rank's up).
    pub fn grad_sumsq(&self) -> Result<f64, WorkerError> {
        let mut sumsq = 0.0;
        for (a, b) in self.acc.values() {
            for g in [a, b] {
                sumsq += f64::from(g.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            }
        }
        Ok(sumsq)
    }

    /// AdamW on every adapter with accumulated gradients, then clears them.
    pub fn step(&mut self, adapters: &Adapters, h: AdamW) -> Result<(), WorkerError> {
        let (b1, b2) = (AdamW::BETA1, AdamW::BETA2);
        let (c1, c2) = (1.0 - b1.powi(h.t as i32), 1.0 - b2.powi(h.t as i32));
        for ((kind, layer), ad) in adapters {
            let Some(layer) = *layer else { continue };
            let Some((ga, gb)) = self.acc.remove(&(*kind, layer)) else { continue };
            let [ma, va, mb, vb] = match self.adam.remove(&(*kind, layer)) {
                Some(st) => st,
                None => [ga.zeros_like()?, ga.zeros_like()?, gb.zeros_like()?, gb.zeros_like()?],
            };
            let mut next = Vec::new();
            for (var, g, m, v) in [(&ad.a, ga, ma, va), (&ad.b, gb, mb, vb)] {
                let g = (g * h.clip)?;
                let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
                let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + AdamW::EPS)?)?;
                let p = var.as_tensor();
                let new = (p - ((step + (p * h.weight_decay)?)? * h.lr)?)?;
                var.set(&new)?;
                next.push((m, v));
            }
            let [(ma, va), (mb, vb)]: [(Tensor, Tensor); 2] =
                next.try_into().map_err(|_| WorkerError::Plan("adapter update".into()))?;
            self.adam.insert((*kind, layer), [ma, va, mb, vb]);
        }
        self.acc.clear();
        Ok(())
    }

    /// The adapters by PEFT name: accumulated gradients, or parameters with their moments.
    pub fn gather(&self, adapters: &Adapters, what: Gather) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut keys: Vec<_> = adapters.keys().filter_map(|(k, l)| l.map(|l| (*k, l))).collect();
        keys.sort_by_key(|(k, l)| (*l, *k));
        for (kind, layer) in keys {
            let (na, nb) = (peft_name(kind, layer, "lora_A"), peft_name(kind, layer, "lora_B"));
            match what {
                Gather::Grads => {
                    if let Some((ga, gb)) = self.acc.get(&(kind, layer)) {
                        out.push((na, ga.clone()));
                        out.push((nb, gb.clone()));
                    }
                }
                Gather::State => {
                    let ad = &adapters[&(kind, Some(layer))];
                    out.push((na.clone(), ad.a.as_tensor().clone()));
                    out.push((nb.clone(), ad.b.as_tensor().clone()));
                    if let Some([ma, va, mb, vb]) = self.adam.get(&(kind, layer)) {
                        out.push((format!("{na}{EXP_AVG}"), ma.clone()));
                        out.push((format!("{na}{EXP_AVG_SQ}"), va.clone()));
                        out.push((format!("{nb}{EXP_AVG}"), mb.clone()));
                        out.push((format!("{nb}{EXP_AVG_SQ}"), vb.clone()));
                    }
                }
            }
        }
        out
    }

    /// Sets this rank's adapters (and moments) from named tensors; other names are ignored.
    pub fn load(&mut self, adapters: &Adapters, named: &HashMap<String, Tensor>) -> Result<(), WorkerError> {
        for ((kind, layer), ad) in adapters {
            let Some(layer) = *layer else { continue };
            let (na, nb) = (peft_name(*kind, layer, "lora_A"), peft_name(*kind, layer, "lora_B"));
            for (n, var) in [(&na, &ad.a), (&nb, &ad.b)] {
                if let Some(t) = named.get(n) {
                    if t.dims() != var.as_tensor().dims() {
                        return Err(WorkerError::Weights(format!(
                            "adapter `{n}` has shape {:?}, expected {:?}",
                            t.dims(),
                            var.as_tensor().dims()
                        )));
                    }
                    var.set(&t.to_dtype(var.as_tensor().dtype())?)?;
                }
            }
            let moment = |n: &str, suffix: &str| named.get(&format!("{n}{suffix}")).cloned();
            if let (Some(ma), Some(va), Some(mb), Some(vb)) =
                (moment(&na, EXP_AVG), moment(&na, EXP_AVG_SQ), moment(&nb, EXP_AVG), moment(&nb, EXP_AVG_SQ))
            {
                self.adam.insert((*kind, layer), [ma, va, mb, vb]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn adapter(a: &[f32], b: &[f32]) -> Adapter {
        let dev = Device::Cpu;
        Adapter {
            a: Var::from_tensor(&Tensor::new(a, &dev).unwrap().reshape((1, a.len())).unwrap()).unwrap(),
            b: Var::from_tensor(&Tensor::new(b, &dev).unwrap().reshape((b.len(), 1)).unwrap()).unwrap(),
            scale: 1.0,
            dropout: 0.0,
        }
    }

    fn grads(a: &[f32], b: &[f32]) -> HashMap<(OpKind, u32), (Tensor, Tensor)> {
        let dev = Device::Cpu;
        let ga = Tensor::new(a, &dev).unwrap().reshape((1, a.len())).unwrap();
        let gb = Tensor::new(b, &dev).unwrap().reshape((b.len(), 1)).unwrap();
        HashMap::from([((OpKind::QProj, 0), (ga, gb))])
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn adamw_matches_its_closed_form_over_two_steps() {
        let adapters: Adapters = HashMap::from([((OpKind::QProj, Some(0)), adapter(&[1.0, -2.0], &[0.5]))]);
        let mut st = AdapterState::default();
        // Two micro-batches accumulate: g = 0.25 + 0.75 = 1 for A[0].
        st.accumulate(grads(&[0.25, 0.0], &[2.0])).unwrap();
        st.accumulate(grads(&[0.75, -4.0], &[0.0])).unwrap();
        assert!((st.grad_sumsq().unwrap() - (1.0 + 16.0 + 4.0)).abs() < 1e-6);
        let (lr, wd, clip) = (0.1, 0.01, 0.5);
        st.step(&adapters, AdamW { t: 1, lr, clip, weight_decay: wd }).unwrap();
        // Step 1: m = (1 - b1) g, v = (1 - b2) g^2, so m / c1 / sqrt(v / c2) = sign(g).
        let expect1 = |p: f64, g: f64| p - lr * (g.signum() * (g.abs() / (g.abs() + 1e-8)) + wd * p);
        let (g_a, g_b) = ([1.0 * clip, -4.0 * clip], [2.0 * clip]);
        let a1 = [expect1(1.0, g_a[0]), expect1(-2.0, g_a[1])];
        let b1 = expect1(0.5, g_b[0]);
        let ad = &adapters[&(OpKind::QProj, Some(0))];
        for (got, want) in values(ad.a.as_tensor()).iter().zip(a1) {
            assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
        }
        assert!((f64::from(values(ad.b.as_tensor())[0]) - b1).abs() < 1e-5);
        assert_eq!(st.grad_sumsq().unwrap(), 0.0, "a step clears the gradients");

        // Step 2 with gradient h on A[0]: moments carry over.
        st.accumulate(grads(&[2.0, 0.0], &[0.0])).unwrap();
        st.step(&adapters, AdamW { t: 2, lr, clip: 1.0, weight_decay: 0.0 }).unwrap();
        let (b1c, b2c) = (AdamW::BETA1, AdamW::BETA2);
        let m = b1c * (1.0 - b1c) * g_a[0] + (1.0 - b1c) * 2.0;
        let v = b2c * (1.0 - b2c) * g_a[0] * g_a[0] + (1.0 - b2c) * 4.0;
        let upd = (m / (1.0 - b1c * b1c)) / ((v / (1.0 - b2c * b2c)).sqrt() + 1e-8);
        let want = a1[0] - lr * upd;
        let got = f64::from(values(ad.a.as_tensor())[0]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn state_gathers_and_loads_back_by_peft_name() {
        let adapters: Adapters = HashMap::from([((OpKind::VProj, Some(3)), adapter(&[1.0, 2.0], &[3.0]))]);
        let mut st = AdapterState::default();
        st.accumulate(grads(&[0.5, 0.5], &[1.0])).unwrap();
        let g = st.gather(&adapters, Gather::Grads);
        assert!(g.is_empty(), "gradients are keyed by the adapter's own kind and layer");
        let mut st = AdapterState::default();
        let mut by_key = grads(&[0.5, 0.5], &[1.0]);
        let v = by_key.remove(&(OpKind::QProj, 0)).unwrap();
        st.accumulate(HashMap::from([((OpKind::VProj, 3), v)])).unwrap();
        let g = st.gather(&adapters, Gather::Grads);
        assert_eq!(g.len(), 2);
        assert!(g[0].0.ends_with("layers.3.self_attn.v_proj.lora_A.weight"), "{}", g[0].0);
        st.step(&adapters, AdamW { t: 1, lr: 0.1, clip: 1.0, weight_decay: 0.0 }).unwrap();
        let saved: HashMap<String, Tensor> = st.gather(&adapters, Gather::State).into_iter().collect();
        assert_eq!(saved.len(), 6, "A, B and four moments");
        // A fresh rank loads them and holds the same parameters and moments.
        let fresh: Adapters = HashMap::from([((OpKind::VProj, Some(3)), adapter(&[0.0, 0.0], &[0.0]))]);
        let mut st2 = AdapterState::default();
        st2.load(&fresh, &saved).unwrap();
        let again: HashMap<String, Tensor> = st2.gather(&fresh, Gather::State).into_iter().collect();
        for (k, t) in &saved {
            assert_eq!(values(t), values(&again[k]), "{k}");
        }
        // A tensor of the wrong shape is refused by name.
        let mut bad = saved.clone();
        let name = g[0].0.clone();
        bad.insert(name.clone(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap());
        let e = st2.load(&fresh, &bad).unwrap_err().to_string();
        assert!(e.contains(&name) && e.contains("[2, 2]"), "{e}");
    }
}
