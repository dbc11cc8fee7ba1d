//! Entropy-coded scalar quantization (ECSQ) of transform components, for the KLT format's `code=ec`.
//! Each component z_c is read on a uniform grid of step `delta` (one step for every component of a
//! block: in the KLT's weighted space equal steps are the equal-slope point, so the bits go where the
//! variance is without an allocation table), and the grid indices are range-coded by an ANS coder
//! (the `constriction` crate) under a static model: the calibration samples' quantiles per component
//! ([`crate::transform::QUANT`]), read as a piecewise-linear CDF. At the same mean squared error a
//! uniform grid with an entropy coder spends about 0.25 bit per component less than the best
//! fixed-width (Lloyd-Max) code at high rates, and it gives components worth a fraction of a bit
//! that fraction (Gish & Pierce 1968; the KV-cache case: CacheGen, Liu et al. 2024).
//!
//! The block keeps a fixed size: the encoder takes the finest step of a geometric grid whose code
//! fits, so the format's bits/elem stay exact and a cache can place blocks as for any other format.

use crate::error::{FormatError, Result};
use constriction::stream::model::DefaultContiguousCategoricalEntropyModel;
use constriction::stream::stack::DefaultAnsCoder;
use constriction::stream::{Decode, Encode};
use std::sync::OnceLock;

/// Steps on the grid: delta_q = sigma x 2^((q - STEP_ZERO) / STEPS_PER_OCTAVE), q = 0..=255.
const STEPS_PER_OCTAVE: f64 = 16.0;
const STEP_ZERO: f64 = 192.0;

/// Widest index range per component (+-MAX_BINS): tails past it saturate, as a fixed code's outer
/// level does.
const MAX_BINS: i32 = 2048;

/// Probability mass mixed in uniformly so that values the calibration never saw still have a code
/// (at most log2((2M + 1) / FLOOR) bits each).
const FLOOR: f64 = 1e-4;

/// Bits the coder may add past the symbols' ideal lengths (its final state is flushed whole).
const ANS_SLACK_BITS: f64 = 64.0;

/// One component's code at one step: its model, reconstruction points and ideal code lengths.
struct Table {
    m: i32,
    inv_delta: f32,
    model: DefaultContiguousCategoricalEntropyModel,
    centroid: Vec<f32>,
    cost: Vec<f32>,
}

impl Table {
    /// Builds the table from one component's quantiles (`QUANT + 1` sorted values).
    fn new(quant: &[f32], delta: f64) -> Self {
        let ext = quant
            .iter()
            .fold(0f64, |a, &v| a.max((v as f64).abs()))
            .max(delta);
        let m = ((ext / delta + 0.5).ceil() as i32 + 1).clamp(1, MAX_BINS);
        let n = (2 * m + 1) as usize;
        let (mut mass, mut moment) = (vec![0f64; n], vec![0f64; n]);
        let bin = |x: f64| ((x / delta).round() as i64).clamp(-m as i64, m as i64) as i32;
        let seg = 1.0 / (quant.len() - 1) as f64;
        for w in quant.windows(2) {
            let (a, b) = (w[0] as f64, w[1] as f64);
            if b <= a {
                let i = (bin(a) + m) as usize;
                mass[i] += seg;
                moment[i] += seg * a;
                continue;
            }
            for i in bin(a)..=bin(b) {
                let lo = if i == -m {
                    a
                } else {
                    a.max((i as f64 - 0.5) * delta)
                };
                let hi = if i == m {
                    b
                } else {
                    b.min((i as f64 + 0.5) * delta)
                };
                if hi > lo {
                    let p = seg * (hi - lo) / (b - a);
                    mass[(i + m) as usize] += p;
                    moment[(i + m) as usize] += p * 0.5 * (lo + hi);
                }
            }
        }
        let total: f64 = mass.iter().sum();
        let probs: Vec<f64> = mass
            .iter()
            .map(|&p| (1.0 - FLOOR) * p / total.max(f64::MIN_POSITIVE) + FLOOR / n as f64)
            .collect();
        let centroid = (0..n)
            .map(|s| {
                let i = s as i32 - m;
                if mass[s] > 1e-12 {
                    (moment[s] / mass[s]) as f32
                } else {
                    (i as f64 * delta) as f32
                }
            })
            .collect();
        let cost = probs.iter().map(|&p| -(p.log2()) as f32).collect();
        // n >= 3 positive finite probabilities: the constructor cannot fail.
        let model =
            DefaultContiguousCategoricalEntropyModel::from_floating_point_probabilities_fast(
                &probs, None,
            )
            .expect("at least 3 positive probabilities");
        Self {
            m,
            inv_delta: (1.0 / delta) as f32,
            model,
            centroid,
            cost,
        }
    }

    /// The symbol (index + m) a value is coded as; NaN reads as 0.
    fn symbol(&self, z: f32) -> usize {
        let i = (z * self.inv_delta).round();
        let i = if i.is_nan() {
            0
        } else {
            i.clamp(-self.m as f32, self.m as f32) as i32
        };
        (i + self.m) as usize
    }
}

/// One head's entropy coder: per grid step, every component's table, built when first used.
pub struct Ecsq {
    d: usize,
    sigma: f64,
    quant: Vec<f32>,
    tables: Vec<OnceLock<Vec<Table>>>,
}

impl Ecsq {
    /// `quant`: [d][QUANT + 1] quantiles; `sigma`: the components' typical scale (the grid's unit).
    pub fn new(d: usize, quant: Vec<f32>, sigma: f64) -> Self {
        Self {
            d,
            sigma: if sigma.is_finite() && sigma > 0.0 {
                sigma
            } else {
                1.0
            },
            quant,
            tables: (0..256).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The step of grid point `q`.
    pub fn delta(&self, q: u8) -> f64 {
        self.sigma * ((q as f64 - STEP_ZERO) / STEPS_PER_OCTAVE).exp2()
    }

    fn at(&self, q: u8) -> &[Table] {
        self.tables[q as usize].get_or_init(|| {
            let w = self.quant.len() / self.d;
            self.quant
                .chunks_exact(w)
                .map(|qc| Table::new(qc, self.delta(q)))
                .collect()
        })
    }

    /// Ideal code length in bits of the components `z` ([tokens][d]) at step `q`.
    fn ideal_bits(&self, z: &[f32], q: u8) -> f64 {
        let t = self.at(q);
        z.chunks_exact(self.d)
            .map(|row| {
                row.iter()
                    .zip(t)
                    .map(|(&v, tc)| tc.cost[tc.symbol(v)] as f64)
                    .sum::<f64>()
            })
            .sum()
    }

    /// Codes `z` ([tokens][d]) at the finest step whose code fits `cap_words` 32-bit words: the step
    /// and the words, or None when not even the coarsest fits (the caller then stores the block
    /// another way).
    pub fn encode(&self, z: &[f32], cap_words: usize) -> Option<(u8, Vec<u32>)> {
        let cap = 32.0 * cap_words as f64;
        let fits = |q: u8| self.ideal_bits(z, q) + ANS_SLACK_BITS <= cap;
        if !fits(255) {
            return None;
        }
        // Coarser steps cost fewer bits: the least q that fits, by bisection.
        let (mut lo, mut hi) = (0u8, 255u8);
        if fits(0) {
            hi = 0;
        }
        while hi > lo + 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        (hi..=255).find_map(|q| {
            let words = self.code(z, q)?;
            (words.len() <= cap_words).then_some((q, words))
        })
    }

    fn code(&self, z: &[f32], q: u8) -> Option<Vec<u32>> {
        let t = self.at(q);
        let mut coder = DefaultAnsCoder::new();
        for row in z.chunks_exact(self.d).rev() {
            for (&v, tc) in row.iter().zip(t).rev() {
                coder.encode_symbol(tc.symbol(v), &tc.model).ok()?;
            }
        }
        coder.into_compressed().ok()
    }

    /// Reads back `out.len() / d` tokens' components coded at step `q` from `words`.
    pub fn decode(&self, q: u8, words: &[u32], out: &mut [f32]) -> Result<()> {
        let bad = |what: &str| FormatError::Corrupt {
            format: "klt".into(),
            reason: format!("entropy-coded block: {what}"),
        };
        let t = self.at(q);
        let mut coder = DefaultAnsCoder::from_compressed_slice(words)
            .map_err(|()| bad("code ends in a zero word"))?;
        for row in out.chunks_exact_mut(self.d) {
            for (o, tc) in row.iter_mut().zip(t) {
                let s = coder
                    .decode_symbol(&tc.model)
                    .map_err(|_| bad("code ends early"))?;
                *o = tc.centroid[s];
            }
        }
        if !coder.is_empty() {
            return Err(bad("words left over after the last component"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    const D: usize = 8;

    /// A coder whose components are Laplacian-like with scales 2^-c, fitted on 4000 samples.
    fn coder(seed: u64) -> Ecsq {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut quant = Vec::new();
        for c in 0..D {
            let mut s: Vec<f64> = (0..4000)
                .map(|_| {
                    let u: f64 = r.random_range(-0.5..0.5);
                    -u.signum() * (1.0 - 2.0 * u.abs()).ln() * 0.5f64.powi(c as i32)
                })
                .collect();
            s.sort_by(f64::total_cmp);
            let q = crate::transform::QUANT;
            quant.extend((0..=q).map(|j| s[j * (s.len() - 1) / q] as f32));
        }
        Ecsq::new(D, quant, 0.5)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever the block, a code that is returned fits its words, reads back to values within one
        /// grid step of the input (inside the grid's range) and is the same code again when re-encoded.
        #[test]
        fn codes_fit_read_back_within_a_step_and_repeat(
            seed in 0u64..1000,
            scale in 0.01f32..8.0,
            cap in 8usize..200,
        ) {
            let e = coder(7);
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let z: Vec<f32> = (0..32 * D).map(|_| r.random_range(-1.0f32..1.0) * scale).collect();
            if let Some((q, words)) = e.encode(&z, cap) {
                prop_assert!(words.len() <= cap);
                let mut y = vec![0f32; z.len()];
                e.decode(q, &words, &mut y).unwrap();
                let t = e.at(q);
                for (i, (&a, &b)) in z.iter().zip(&y).enumerate() {
                    let tc = &t[i % D];
                    let delta = 1.0 / tc.inv_delta;
                    if a.abs() < (tc.m as f32 - 0.5) * delta {
                        prop_assert!((a - b).abs() <= delta * 1.0001, "{a} read {b}, step {delta}");
                    }
                }
                prop_assert_eq!(e.encode(&z, cap), Some((q, words)));
            }
        }
    }

    #[test]
    fn more_room_means_a_finer_step_and_less_error() {
        let e = coder(3);
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let z: Vec<f32> = (0..32 * D)
            .map(|i| r.random_range(-1.0f32..1.0) * 0.5f32.powi((i % D) as i32))
            .collect();
        let mut last = (u8::MAX, f64::INFINITY);
        for cap in [4, 8, 16, 32, 64] {
            let (q, words) = e.encode(&z, cap).expect("fits");
            let mut y = vec![0f32; z.len()];
            e.decode(q, &words, &mut y).unwrap();
            let err: f64 = z
                .iter()
                .zip(&y)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            assert!(
                q <= last.0 && err <= last.1 * 1.0001,
                "cap {cap}: q {q} err {err} after {last:?}"
            );
            last = (q, err);
        }
        assert!(last.1 < 1e-3 * z.iter().map(|v| (v * v) as f64).sum::<f64>());
    }
}
