//! Sampling of the next token: greedy, or temperature with top-k and top-p, seeded.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded sampler.
pub struct Sampler {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler with its seed.
    pub fn new(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_k,
            top_p,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        // NaN logits never win (total_cmp would rank a NaN above +inf).
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.is_nan())
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0)
        };
        if self.temperature <= 0.0 {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            idx.truncate(self.top_k);
        }
        if idx.is_empty() {
            return argmax();
        }
        let m = logits[idx[0]];
        let mut p: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i] - m) / self.temperature).exp())
            .collect();
        let z: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        let mut cum = 0.0;
        let mut keep = p.len();
        for (j, &pj) in p.iter().enumerate() {
            cum += pj;
            if cum >= self.top_p {
                keep = j + 1;
                break;
            }
        }
        let total: f32 = p[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for j in 0..keep {
            r -= p[j];
            if r <= 0.0 {
                return idx[j] as u32;
            }
        }
        idx[keep - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded() {
        let l = [0.1, 3.0, 0.2, 2.9];
        assert_eq!(Sampler::new(0.0, 0, 1.0, 0).sample(&l), 1);
        let draw = |seed| {
            (0..50)
                .map(|_| 0)
                .scan(Sampler::new(1.0, 2, 1.0, seed), |s, _: i32| {
                    Some(s.sample(&l))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(
            draw(7).iter().all(|&t| t == 1 || t == 3),
            "top-k 2 keeps tokens 1 and 3"
        );
        // top-p tiny: only the most likely token.
        assert!((0..20).all(|_| Sampler::new(1.0, 0, 1e-6, 3).sample(&l) == 1));
    }
}
