//! Choosing the next token from logits: greedy by default; temperature, top-k and top-p
//! (nucleus) sampling with a seeded generator, so the same seed gives the same output.

use crate::rng::Rng;

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 42 }
    }
}

/// A sampler with its generator's state.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Self {
        Self { cfg, rng: Rng::new(cfg.seed) }
    }

    /// The candidate tokens with their probabilities after temperature, top-k and top-p,
    /// most likely first (exposed for tests).
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let t = self.cfg.temperature.max(1e-6);
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k);
        }
        let max = logits[idx[0] as usize] as f64;
        let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] as f64 - max) / t).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.cfg.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            idx.truncate(keep);
            probs.truncate(keep);
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        idx.into_iter().zip(probs).collect()
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let dist = self.distribution(logits);
        let u = (f64::from(self.rng.uniform()) + 1.0) / 2.0;
        let mut acc = 0.0;
        for &(i, p) in &dist {
            acc += p;
            if u < acc {
                return i;
            }
        }
        dist.last().map_or(0, |d| d.0)
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(Sampling::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn temperature_softmax_matches_closed_form() {
        let s = Sampler::new(Sampling { temperature: 2.0, ..Sampling::default() });
        let d = s.distribution(&[0.0, 2.0_f32.ln() * 2.0]);
        // exp(0/2) : exp(ln2) = 1 : 2.
        assert_eq!(d[0].0, 1);
        assert!((d[0].1 - 2.0 / 3.0).abs() < 1e-9 && (d[1].1 - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [4.0f32, 3.0, 2.0, 1.0, 0.0];
        let s = Sampler::new(Sampling { temperature: 1.0, top_k: 2, ..Sampling::default() });
        let d = s.distribution(&logits);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1]);
        let e = std::f64::consts::E;
        assert!((d[0].1 - e / (e + 1.0)).abs() < 1e-9);
        // Probabilities of 4,3,2,1,0 at T=1: 0.636, 0.234, 0.086, ...: p=0.8 keeps two.
        let s = Sampler::new(Sampling { temperature: 1.0, top_p: 0.8, ..Sampling::default() });
        assert_eq!(s.distribution(&logits).len(), 2);
        let s = Sampler::new(Sampling { temperature: 1.0, top_p: 0.9, ..Sampling::default() });
        assert_eq!(s.distribution(&logits).len(), 3);
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [1.0f32, 0.0, 2.0];
        let cfg = Sampling { temperature: 1.0, seed: 9, ..Sampling::default() };
        let mut a = Sampler::new(cfg);
        let mut b = Sampler::new(cfg);
        let draws: Vec<u32> = (0..20_000).map(|_| a.sample(&logits)).collect();
        let again: Vec<u32> = (0..20_000).map(|_| b.sample(&logits)).collect();
        assert_eq!(draws, again, "same seed, same tokens");
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for t in 0..3u32 {
            let want = (logits[t as usize] as f64).exp() / z;
            let got = draws.iter().filter(|&&d| d == t).count() as f64 / draws.len() as f64;
            assert!((got - want).abs() < 0.015, "token {t}: {got} vs {want}");
        }
    }
}
