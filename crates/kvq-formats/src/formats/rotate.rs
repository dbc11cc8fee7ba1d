//! An orthogonal rotation in front of a codec (`rot=on` on `kivi:` and `asymkv:`): each token vector
//! is multiplied by `R = H diag(s) / sqrt(d)` (H the Walsh-Hadamard matrix, s fixed random signs)
//! before it is encoded, and by `R^T` after it is decoded. R spreads an outlier channel's energy over
//! all channels, so min-max groups see flat data (the idea of QuaRot, Ashkboos et al., arXiv
//! 2404.00456, and of QuIP#'s incoherence processing). Attention is unchanged in exact arithmetic
//! (`q.k = (Rq).(Rk)`, `sum p v = R^T sum p (Rv)`), so only the quantization error moves.
//!
//! The packed blocks are the inner codec's; the bits per element do not change. There is no CUDA
//! kernel for the rotated form yet ([`Codec::kernel`] is `None`: the GPU path refuses it by name).

use crate::codec::{Codec, KernelSpec};
use crate::error::Result;

/// Seed of the sign vector: fixed, so a cache written by one process reads back in another.
const SIGN_SEED: u64 = 0x006b_7671_5f72_6f74;

/// The codec `inner` behind the rotation R of the module docs.
pub struct Rotated {
    inner: Box<dyn Codec>,
    signs: Vec<f32>,
}

impl Rotated {
    /// Wraps `inner` for vectors of `d` channels (`d` a power of two, checked by the format).
    pub fn new(inner: Box<dyn Codec>, d: usize) -> Self {
        let mut state = SIGN_SEED;
        let signs = (0..d)
            .map(|_| {
                // splitmix64: a fixed, well-mixed sign per channel.
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                if (z ^ (z >> 31)) & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        Self { inner, signs }
    }

    /// x <- R x for each token vector of `x`.
    fn forward(&self, x: &mut [f32]) {
        let d = self.signs.len();
        for v in x.chunks_exact_mut(d) {
            v.iter_mut().zip(&self.signs).for_each(|(a, s)| *a *= s);
            hadamard(v);
        }
    }

    /// x <- R^T x for each token vector of `x`.
    fn backward(&self, x: &mut [f32]) {
        let d = self.signs.len();
        for v in x.chunks_exact_mut(d) {
            hadamard(v);
            v.iter_mut().zip(&self.signs).for_each(|(a, s)| *a *= s);
        }
    }
}

/// In-place orthonormal Walsh-Hadamard transform (H / sqrt(n), its own inverse); `v.len()` a power
/// of two.
pub fn hadamard(v: &mut [f32]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    v.iter_mut().for_each(|x| *x *= s);
}

impl Codec for Rotated {
    fn describe(&self) -> String {
        format!("{},rot=on", self.inner.describe())
    }
    fn block_tokens(&self) -> usize {
        self.inner.block_tokens()
    }
    fn block_bytes(&self) -> usize {
        self.inner.block_bytes()
    }
    fn window(&self) -> usize {
        self.inner.window()
    }
    fn sink(&self) -> usize {
        self.inner.sink()
    }
    fn pre_rope(&self) -> bool {
        self.inner.pre_rope()
    }
    fn fixed_bytes(&self) -> usize {
        self.inner.fixed_bytes()
    }
    fn kernel(&self) -> Option<KernelSpec> {
        None
    }
    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let mut y = x.to_vec();
        self.forward(&mut y);
        // Rotated values stay within sqrt(d) x the largest input, and the cache clamps inputs to
        // the f16 range; clamp again so the inner codec sees f16-finite data as it expects.
        y.iter_mut().for_each(|v| *v = v.clamp(-65504.0, 65504.0));
        self.inner.encode(&y, out);
    }
    fn validate(&self, block: &[u8]) -> Result<()> {
        self.inner.validate(block)
    }
    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.inner.decode(block, out)?;
        self.backward(out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::asymkv::KiviCodec;
    use crate::testutil::{gaussian_with_outliers, rel_err};
    use crate::Stream;

    #[test]
    fn rotation_is_orthogonal_and_inverted() {
        for d in [64usize, 128] {
            let x = gaussian_with_outliers(3, d, 2, 5);
            let r = Rotated::new(
                Box::new(KiviCodec::new(Stream::Key, d, 8, 32, 0).unwrap()),
                d,
            );
            let mut y = x.clone();
            r.forward(&mut y);
            for (a, b) in x.chunks(d).zip(y.chunks(d)) {
                let na: f32 = a.iter().map(|v| v * v).sum();
                let nb: f32 = b.iter().map(|v| v * v).sum();
                assert!((na - nb).abs() <= 1e-4 * na, "norm kept: {na} vs {nb}");
            }
            r.backward(&mut y);
            assert!(rel_err(&y, &x) < 1e-6, "R^T R = I");
        }
    }

    #[test]
    fn rot_and_keys_options_parse_print_and_refuse() {
        use crate::formats::parse_format;
        for s in [
            "kivi:bits=2,group=32,window=0,rot=on",
            "kivi:bits=4,group=64,window=0,rot=on,keys=token",
            "asymkv:lk=4,lv=0,hi=2,lo=1,group=32,window=16,rot=on",
        ] {
            assert_eq!(parse_format(s).unwrap().canonical(), s);
        }
        // Off by default: the strings of earlier versions print back unchanged.
        assert_eq!(
            parse_format("kivi:bits=2").unwrap().canonical(),
            "kivi:bits=2,group=32,window=128"
        );
        let e = parse_format("kivi:bits=2,keys=token")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys=token needs rot=on"), "{e}");
        assert!(parse_format("kivi:bits=2,rot=maybe").is_err());
        // head_dim must be a power of two for the Hadamard transform.
        let f = parse_format("kivi:bits=2,group=16,rot=on").unwrap();
        assert!(f.supports(48).is_err());
        assert!(f.supports(64).is_ok());
    }

    #[test]
    fn rotation_cuts_the_error_of_outlier_channels() {
        // Values are quantized per token: one huge channel sets every group's range, which the
        // rotation spreads. The rotated codec must reconstruct with less error.
        let d = 64;
        let mut x = gaussian_with_outliers(32, d, 0, 9);
        for t in 0..32 {
            x[t * d + 5] *= 20.0;
        }
        let plain = KiviCodec::new(Stream::Value, d, 4, 32, 0).unwrap();
        let rot = Rotated::new(
            Box::new(KiviCodec::new(Stream::Value, d, 4, 32, 0).unwrap()),
            d,
        );
        let mut err = [0f64; 2];
        for (i, c) in [&plain as &dyn Codec, &rot].into_iter().enumerate() {
            let mut buf = vec![0u8; c.block_bytes()];
            c.encode(&x, &mut buf);
            let mut y = vec![0f32; x.len()];
            c.decode(&buf, &mut y).unwrap();
            // Error on the ordinary channels (the outlier channel is easy for both).
            let pick = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .enumerate()
                    .filter(|(i, _)| i % d != 5)
                    .map(|(_, a)| *a)
                    .collect()
            };
            err[i] = rel_err(&pick(&y), &pick(&x));
        }
        assert!(
            err[1] < 0.5 * err[0],
            "rotated {} vs plain {}",
            err[1],
            err[0]
        );
        assert_eq!(rot.describe(), format!("{},rot=on", plain.describe()));
        assert!(rot.kernel().is_none());
    }
}
