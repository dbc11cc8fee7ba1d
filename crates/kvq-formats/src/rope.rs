//! Rotary position embedding as the cache needs it: formats that store keys before RoPE (RVQ) rotate
//! decoded keys at attention time, so RoPE lives here beside the formats, not only in the model.

/// How rotary pairs are laid out in a head's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): llama.cpp / GGUF weights.
    Interleaved,
    /// Pairs (i, i + d/2): HF transformers' rotate-half.
    Half,
}

/// Rotary embedding of one head: per-pair inverse frequencies (scaling already folded in) and layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Inverse frequency of each of the d/2 pairs.
    pub inv_freq: Vec<f32>,
    /// Channel layout of the pairs.
    pub style: RopeStyle,
}

impl RopeStyle {
    /// The style as the CUDA kernels number it (kernels/model.cu, pre-RoPE kernel tables): 0
    /// interleaved pairs, 1 rotate-half.
    pub fn kernel_code(self) -> i32 {
        match self {
            RopeStyle::Interleaved => 0,
            RopeStyle::Half => 1,
        }
    }
}

impl Rope {
    /// Plain RoPE with base `theta` (no scaling) for `head_dim` channels.
    pub fn new(head_dim: usize, theta: f32, style: RopeStyle) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        Self { inv_freq, style }
    }

    /// Head dimension this rope was built for.
    pub fn head_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// The channel indices (a, b) of rotary pair `i`.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        match self.style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Half => (i, i + self.inv_freq.len()),
        }
    }

    /// Rotates `x` (one head vector) in place to position `pos`; `sign` = -1.0 undoes it.
    pub fn rotate(&self, x: &mut [f32], pos: usize, sign: f32) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            // f64 angle: positions reach 1e5+, where f32 angles lose several digits.
            let ang = pos as f64 * f as f64;
            let (s, c) = ang.sin_cos();
            let (s, c) = (sign * s as f32, c as f32);
            let (a, b) = self.pair(i);
            let (xa, xb) = (x[a], x[b]);
            x[a] = xa * c - xb * s;
            x[b] = xa * s + xb * c;
        }
    }

    /// Maps a channel index of the HF (rotate-half) order to this rope's channel order, so that
    /// channel groupings defined on HF channels (RVQ's strided key groups) mean the same on GGUF.
    pub fn hf_channel(&self, c: usize) -> usize {
        let half = self.inv_freq.len();
        match self.style {
            RopeStyle::Half => c,
            RopeStyle::Interleaved => {
                if c < half {
                    2 * c
                } else {
                    2 * (c - half) + 1
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_orthogonal_and_relative() {
        for style in [RopeStyle::Interleaved, RopeStyle::Half] {
            let r = Rope::new(8, 10000.0, style);
            let q: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
            let k: Vec<f32> = (0..8).map(|i| (i as f32 * 1.3).cos()).collect();
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
            let (mut q1, mut k1, mut q2, mut k2) = (q.clone(), k.clone(), q.clone(), k.clone());
            r.rotate(&mut q1, 10, 1.0);
            r.rotate(&mut k1, 7, 1.0);
            r.rotate(&mut q2, 25, 1.0);
            r.rotate(&mut k2, 22, 1.0);
            assert!((dot(&q1, &k1) - dot(&q2, &k2)).abs() < 1e-4);
            let mut back = q1.clone();
            r.rotate(&mut back, 10, -1.0);
            assert!(back.iter().zip(&q).all(|(a, b)| (a - b).abs() < 1e-5));
        }
    }
}
