//! QJL (Zandieh, Daliri, Han, "1-Bit Quantized JL Transform for KV Cache Quantization with Zero
//! Overhead", arXiv 2406.03482). Keys: S is a seeded Gaussian m x d matrix, orthogonalized (Gram-Schmidt
//! per d-row chunk, rows rescaled to norm sqrt(d)); a key is stored as sign(S k) (m bits) and ||k|| (f16).
//! Per block of `group` tokens the `outliers` channels of largest norm are split out and sketched with
//! their own `mo`-row sketch and norm. The query is never quantized:
//! `q.k ~= a_m ||k_in|| <S q, sign(S k_in)> + a_mo ||k_out|| <S_o q, sign(S_o k_out)>`,
//! with `a_m = 1 / (m E|<s, k/||k||>|)`; for rows uniform on the sqrt(d)-sphere E = sqrt(d) c_d,
//! c_d = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)) (-> sqrt(2/pi) as d grows: the paper's sqrt(pi/2)/m).
//! That constant makes the estimator exactly unbiased for orthogonalized rows. Values are not QJL:
//! the `kivi` per-token `v`-bit quantizer with groups of `group` channels. The newest `buffer` tokens
//! stay f16. Sketch dims: `m0` rows in the first `l0` layers, `m` elsewhere (l0 clamps to the depth).
//!
//! Key block layout (one head, G = group tokens), little-endian:
//! ```text
//! [outlier channel u8; n_out, padded to 4] [||k_in|| f16; G] [||k_out|| f16; G]
//! [sign(S k_in): G x m/8 bytes, token-major] [sign(S_o k_out): G x mo/8 bytes, token-major]
//! ```
//! Key bits/elem (d=64, m=256, mo=64, G=32, 8 outliers): (8 + 64 + 64 + 1024 + 256) * 8 / 2048 = 5.53;
//! d=128: 2.77. Fixed bytes: S and S_o as f16 (what the GPU holds).

use crate::bits;
use crate::codec::{Codec, Format, FormatRef, Stream, StreamCtx};
use crate::config::Params;
use crate::error::{FormatError, Result};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::sync::Arc;

/// A parsed QJL config.
#[derive(Debug, Clone, PartialEq)]
pub struct Qjl {
    /// Sketch rows of layers >= l0.
    pub m: usize,
    /// Sketch rows of the first l0 layers.
    pub m0: usize,
    /// Layers using m0.
    pub l0: usize,
    /// Outlier channels per block.
    pub outliers: usize,
    /// Outlier sketch rows.
    pub mo: usize,
    /// Value bits (KIVI per-token).
    pub v: usize,
    /// Tokens per block / channels per value group.
    pub group: usize,
    /// f16 recent tokens.
    pub buffer: usize,
    /// Sketch seed (the layer index is added).
    pub seed: u64,
}

/// Parses `qjl:m=256,m0=512,l0=15,outliers=8,mo=64,v=2,group=32,buffer=128,seed=0`.
pub fn parse(mut p: Params) -> Result<FormatRef> {
    let f = Qjl {
        m: p.usize("m", 256, 8, 8192)?,
        m0: p.usize("m0", 512, 8, 8192)?,
        l0: p.usize("l0", 15, 0, 100_000)?,
        outliers: p.usize("outliers", 8, 0, 255)?,
        mo: p.usize("mo", 64, 8, 8192)?,
        v: p.choice("v", 2, &[1, 2, 3, 4, 8])?,
        group: p.choice("group", 32, &[16, 32, 64])?,
        buffer: p.usize("buffer", 128, 0, 1 << 20)?,
        seed: p.u64("seed", 0)?,
    };
    for (k, v) in [("m", f.m), ("m0", f.m0), ("mo", f.mo)] {
        if v % 8 != 0 {
            return Err(crate::error::parse_err(
                p.input(),
                format!("{k}={v}: must be a multiple of 8"),
            ));
        }
    }
    p.finish(&[
        "m", "m0", "l0", "outliers", "mo", "v", "group", "buffer", "seed",
    ])?;
    Ok(Arc::new(f))
}

impl Format for Qjl {
    fn canonical(&self) -> String {
        format!(
            "qjl:m={},m0={},l0={},outliers={},mo={},v={},group={},buffer={},seed={}",
            self.m,
            self.m0,
            self.l0,
            self.outliers,
            self.mo,
            self.v,
            self.group,
            self.buffer,
            self.seed
        )
    }

    fn supports(&self, head_dim: usize) -> Result<()> {
        if head_dim < 2
            || self.outliers >= head_dim
            || !head_dim.is_multiple_of(self.group)
            || !head_dim.is_multiple_of(8)
        {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!(
                    "head_dim {head_dim} (needs outliers < d, a multiple of group={} and of 8)",
                    self.group
                ),
            });
        }
        Ok(())
    }

    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        self.supports(ctx.head_dim)?;
        if ctx.stream == Stream::Value {
            let kivi = format!(
                "kivi:bits={},group={},window={}",
                self.v, self.group, self.buffer
            );
            return crate::formats::parse_format(&kivi)?.build(ctx);
        }
        let d = ctx.head_dim;
        let m = if ctx.layer < self.l0.min(ctx.n_layers) {
            self.m0
        } else {
            self.m
        };
        let seed = self
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(ctx.layer as u64);
        Ok(Box::new(QjlKeys {
            d,
            m,
            mo: self.mo,
            n_out: self.outliers,
            group: self.group,
            buffer: self.buffer,
            s: sketch(m, d, seed),
            so: sketch(self.mo, d, seed ^ 0x9e37_79b9_7f4a_7c15),
            a_m: 1.0 / (m as f64 * expected_abs(d)) as f32,
            a_mo: 1.0 / (self.mo as f64 * expected_abs(d)) as f32,
        }))
    }
}

/// E|<s, u>| for s uniform on the sphere of radius sqrt(d) and a unit vector u: sqrt(d) * c_d.
fn expected_abs(d: usize) -> f64 {
    // c_1 = 1, c_2 = 2/pi, c_{n+2} = c_n * n / (n+1)  (E|u_1| on the unit n-sphere).
    let (mut c, mut n) = if d.is_multiple_of(2) {
        (2.0 / std::f64::consts::PI, 2usize)
    } else {
        (1.0, 1usize)
    };
    while n < d {
        c *= n as f64 / (n as f64 + 1.0);
        n += 2;
    }
    (d as f64).sqrt() * c
}

/// The seeded sketch: Gaussian rows, Gram-Schmidt within each chunk of d rows, rows of norm sqrt(d).
pub fn sketch(m: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f64, 1.0).expect("unit normal");
    let mut s: Vec<f64> = (0..m * d).map(|_| normal.sample(&mut rng)).collect();
    for r in 0..m {
        let chunk0 = r / d * d;
        for prev in chunk0..r {
            let dot: f64 = (0..d).map(|c| s[r * d + c] * s[prev * d + c]).sum();
            for c in 0..d {
                s[r * d + c] -= dot * s[prev * d + c];
            }
        }
        let norm = (0..d)
            .map(|c| s[r * d + c].powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-300);
        for c in 0..d {
            s[r * d + c] /= norm;
        }
    }
    let scale = (d as f64).sqrt();
    s.iter().map(|v| (v * scale) as f32).collect()
}

struct QjlKeys {
    d: usize,
    m: usize,
    mo: usize,
    n_out: usize,
    group: usize,
    buffer: usize,
    s: Vec<f32>,
    so: Vec<f32>,
    a_m: f32,
    a_mo: f32,
}

impl QjlKeys {
    fn idx_bytes(&self) -> usize {
        self.n_out.div_ceil(4) * 4
    }
    fn norms_off(&self) -> usize {
        self.idx_bytes()
    }
    fn signs_off(&self) -> usize {
        self.idx_bytes() + 4 * self.group
    }
    fn osigns_off(&self) -> usize {
        self.signs_off() + self.group * self.m / 8
    }
    /// <sketch rows, sign bits>: sum_i prep_i * (+1 | -1).
    fn signed_sum(prep: &[f32], signs: &[u8]) -> f32 {
        prep.iter()
            .enumerate()
            .map(|(i, &p)| {
                if signs[i / 8] >> (i % 8) & 1 == 1 {
                    p
                } else {
                    -p
                }
            })
            .sum()
    }
    fn sign_pack(s: &[f32], x: &[f32], rows: usize, d: usize, out: &mut [u8]) {
        for r in 0..rows {
            let v: f32 = (0..d).map(|c| s[r * d + c] * x[c]).sum();
            if v >= 0.0 {
                out[r / 8] |= 1 << (r % 8);
            }
        }
    }
}

impl Codec for QjlKeys {
    fn describe(&self) -> String {
        format!(
            "qjl-k:m={},mo={},outliers={},group={},buffer={}",
            self.m, self.mo, self.n_out, self.group, self.buffer
        )
    }
    fn block_tokens(&self) -> usize {
        self.group
    }
    fn block_bytes(&self) -> usize {
        self.osigns_off() + self.group * self.mo / 8
    }
    fn window(&self) -> usize {
        self.buffer
    }
    fn fixed_bytes(&self) -> usize {
        2 * (self.m + self.mo) * self.d
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let (d, g) = (self.d, self.group);
        out.iter_mut().for_each(|b| *b = 0);
        let mut norms: Vec<(f32, usize)> = (0..d)
            .map(|c| ((0..g).map(|t| x[t * d + c].powi(2)).sum::<f32>(), c))
            .collect();
        norms.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut outlier = vec![false; d];
        for (i, &(_, c)) in norms.iter().take(self.n_out).enumerate() {
            out[i] = c as u8;
            outlier[c] = true;
        }
        let (so, oo) = (self.signs_off(), self.osigns_off());
        let (mb, mob) = (self.m / 8, self.mo / 8);
        for t in 0..g {
            let row = &x[t * d..(t + 1) * d];
            let kin: Vec<f32> = row
                .iter()
                .enumerate()
                .map(|(c, &v)| if outlier[c] { 0.0 } else { v })
                .collect();
            let kout: Vec<f32> = row
                .iter()
                .enumerate()
                .map(|(c, &v)| if outlier[c] { v } else { 0.0 })
                .collect();
            let nin = kin.iter().map(|v| v * v).sum::<f32>().sqrt();
            let nout = kout.iter().map(|v| v * v).sum::<f32>().sqrt();
            bits::put_f16(out, self.norms_off() + 2 * t, nin.min(65504.0));
            bits::put_f16(out, self.norms_off() + 2 * (g + t), nout.min(65504.0));
            Self::sign_pack(
                &self.s,
                &kin,
                self.m,
                d,
                &mut out[so + t * mb..so + (t + 1) * mb],
            );
            Self::sign_pack(
                &self.so,
                &kout,
                self.mo,
                d,
                &mut out[oo + t * mob..oo + (t + 1) * mob],
            );
        }
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        crate::formats::check_len("qjl", block, self.block_bytes())?;
        if let Some(&c) = block[..self.n_out].iter().find(|&&c| c as usize >= self.d) {
            return Err(FormatError::Corrupt {
                format: "qjl".into(),
                reason: format!("outlier channel {c} >= head_dim {}", self.d),
            });
        }
        if (0..2 * self.group).any(|i| !bits::f16_at(block, self.norms_off() + 2 * i).is_finite()) {
            return Err(FormatError::Corrupt {
                format: "qjl".into(),
                reason: "non-finite norm".into(),
            });
        }
        Ok(())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.validate(block)?;
        let (d, g) = (self.d, self.group);
        let (so, oo) = (self.signs_off(), self.osigns_off());
        for t in 0..g {
            let nin = bits::f16_at(block, self.norms_off() + 2 * t);
            let nout = bits::f16_at(block, self.norms_off() + 2 * (g + t));
            let o = &mut out[t * d..(t + 1) * d];
            o.iter_mut().for_each(|v| *v = 0.0);
            let signs = &block[so + t * self.m / 8..];
            for r in 0..self.m {
                let sg = if signs[r / 8] >> (r % 8) & 1 == 1 {
                    1.0
                } else {
                    -1.0
                };
                crate::codec::axpy(sg * self.a_m * nin, &self.s[r * d..(r + 1) * d], o);
            }
            let osigns = &block[oo + t * self.mo / 8..];
            let mut ko = vec![0f32; d];
            for r in 0..self.mo {
                let sg = if osigns[r / 8] >> (r % 8) & 1 == 1 {
                    1.0
                } else {
                    -1.0
                };
                crate::codec::axpy(sg * self.a_mo * nout, &self.so[r * d..(r + 1) * d], &mut ko);
            }
            // The estimate is linear in the query: q.decode(k) equals the score estimator exactly.
            for c in 0..d {
                o[c] += ko[c];
            }
        }
        Ok(())
    }

    fn prep_query(&self, q: &[f32]) -> Vec<f32> {
        let d = self.d;
        let mut p: Vec<f32> = (0..self.m)
            .map(|r| crate::codec::dot(&self.s[r * d..(r + 1) * d], q))
            .collect();
        p.extend((0..self.mo).map(|r| crate::codec::dot(&self.so[r * d..(r + 1) * d], q)));
        p
    }

    fn key_scores(
        &self,
        _q: &[f32],
        prep: &[f32],
        block: &[u8],
        _pos0: usize,
        _rope: &crate::Rope,
        scores: &mut [f32],
    ) {
        if self.validate(block).is_err() {
            scores.iter_mut().for_each(|s| *s = f32::NAN);
            return;
        }
        let g = self.group;
        let (sq, soq) = prep.split_at(self.m);
        let (so, oo) = (self.signs_off(), self.osigns_off());
        for (t, s) in scores.iter_mut().enumerate() {
            let nin = bits::f16_at(block, self.norms_off() + 2 * t);
            let nout = bits::f16_at(block, self.norms_off() + 2 * (g + t));
            let a = Self::signed_sum(sq, &block[so + t * self.m / 8..]);
            let b = Self::signed_sum(soq, &block[oo + t * self.mo / 8..]);
            *s = self.a_m * nin * a + self.a_mo * nout * b;
        }
    }
}
