//! qjl: 1-bit quantized Johnson-Lindenstrauss keys with norms and a per-block outlier sketch; values
//! by KIVI's per-token quantizer.
//!
//! Paper: Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero
//! Overhead" (arXiv 2406.03482); official code amirzandieh/QJL (kernels in `qjl_kernel/csrc`).
//!
//! # Keys
//! S is an m x d sketch drawn once per layer (ChaCha8, seed = config seed + layer index): Gaussian
//! rows, orthonormalized per chunk of d rows (Gram-Schmidt, which is QR with a positive diagonal),
//! each row then scaled to the mean norm of a d-dim Gaussian vector, `r_d = E||g||` =
//! sqrt(2) Gamma((d+1)/2) / Gamma(d/2) (about sqrt(d - 1/2)), and rounded to f16 (the GPU holds S in
//! f16; encoder and reader use the same rounded values). With rows uniform on the sphere of radius
//! `r_d`, `E[<s,q> sign(<s,k>)] = sqrt(2/pi) <q,k> / ||k||` exactly, so the paper's estimator with
//! `sqrt(pi/2)/m` is exactly unbiased. (Rows of norm sqrt(d), as in the paper and official code,
//! bias every score by the factor sqrt(d)/r_d, about 1 + 1/(4d): 0.4% at d=64.)
//!
//! Per block of `group` tokens of one head, the `outliers` channels with the largest norm over the
//! block are split out (ties: lower channel first; stored ascending). For each token, with k_in the
//! key with those channels zeroed and k_out the rest:
//! - `sign(S k_in)` as m bits and `||k_in||` as f16;
//! - `sign(S_o k_out)` as m_o bits and `||k_out||` as f16, where S_o is the first m_o rows of S, as
//!   in the official kernels (one sketch in GPU memory; the outlier term only ever touches the outlier
//!   columns of those rows).
//!
//! Score, with `P_in`/`P_out` the projections on the inlier/outlier channels of the block:
//! `<q,k> ~= sqrt(pi/2)/m ||k_in|| <S P_in q, sign(S k_in)> + sqrt(pi/2)/m_o ||k_out|| <S_o P_out q, sign(S_o k_out)>`.
//! Each term is unbiased (k_in = P_in k_in), and restricting q to each term's channels, as the
//! official score kernel does, removes the other channels' variance (on the test keys it cuts the
//! score error by 20-30% against using S q in both terms, docs/formats/qjl.md). `prep_query` returns S q (m floats) once
//! per query; per block the reader gathers the outlier columns of S and forms `g = S P_out q`
//! (m x outliers multiply-adds shared by the block's tokens), then uses `S q - g` for the inliers and
//! the first m_o entries of `g` for the outliers. `decode` returns the linear estimate
//! `k_hat = sqrt(pi/2)/m ||k_in|| P_in S^T sign(S k_in) + sqrt(pi/2)/m_o ||k_out|| P_out S_o^T sign(S_o k_out)`,
//! so `q . decode(k)` equals the score estimate and both cache readers agree. Norms above the f16
//! range are stored as 65504.
//!
//! m_o defaults to 64 (min(64, m, m0)); the official LongBench script uses 256 in the m layers and
//! 128 in the m0 layers, at 3 more key bits/elem (d=64) for about half the score error on keys with
//! strong outlier channels (measured table in docs/formats/qjl.md).
//!
//! Layer split: the first `l0` layers (clamped to the model's depth) use `m0` rows, the rest `m`;
//! in the 30-layer default model l0=15 is half the layers. The newest `buffer` tokens stay f16 (the
//! cache's window: it seals whole blocks, so `buffer` to `buffer + group - 1` tokens are f16). Values are not QJL: the value stream is
//! the `kivi:bits=v,group=group,window=buffer` format (per-token groups of `group` channels).
//!
//! # Byte layout of one key block (`group` tokens of one KV head), little-endian
//! ```text
//! offset 0          idx     u8[outliers], zero padding to a multiple of 4      ceil4(outliers) B
//! off_norm          norms   [ f16 ||k_in|| , f16 ||k_out|| ] x group           4 * group B
//! off_bits          signs   token 0: m bits | token 1: m bits | ...            group * m/8 B
//! off_obits         osigns  token 0: m_o bits | token 1: m_o bits | ...        group * m_o/8 B
//! ```
//! Bit j of a token's row (sign of row j of S) is bit j%8 of byte j/8, 1 = positive. A token's norms
//! are one 4-byte word; every section starts 4-byte aligned (group >= 16, m and m_o multiples of 8);
//! with m and m_o multiples of 32 each token's row is whole 32-bit words, so a warp lane per token
//! reads its signs as u32s. With `outliers = 0` the outlier sketch is not stored.
//!
//! Bits per key element: `(m + m_o + 32 + 8 * ceil4(outliers) / group) / d`. Defaults (m=256,
//! m0=512, m_o=64, 8 outliers, group 32): d=64: 5.531 (m layers), 9.531 (m0 layers); d=128: 2.766 and
//! 4.766. Values (KIVI 2-bit, group 32, f16 scale and zero): 3.0 at both. Fixed bytes: S as f16,
//! `2 m d` per layer (S_o is inside S).

use crate::bits::{f16_at, put_f16};
use crate::codec::{Codec, Format, FormatRef, KernelSpec, Stream, StreamCtx};
use crate::config::Params;
use crate::error::{parse_err, FormatError, Result};
use crate::rope::Rope;
use half::f16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;

/// The keys this format's parser takes, in canonical order.
const KEYS: &[&str] = &[
    "m", "m0", "l0", "outliers", "mo", "v", "group", "buffer", "seed",
];
/// Largest sketch: 4096 rows (512 bytes of signs per token).
const MAX_M: usize = 4096;
/// Outlier indices are u8: heads of up to 256 channels.
const MAX_HEAD_DIM: usize = 256;
/// Value bit widths of the kivi format (its per-token quantizer).
const VALUE_BITS: &[usize] = &[1, 2, 3, 4, 8];
/// Block lengths (tokens) and value channel groups.
const GROUPS: &[usize] = &[16, 32, 64];
/// Longest f16 buffer accepted.
const MAX_BUFFER: usize = 1 << 20;
/// sqrt(pi/2): the inverse of E|g| for a standard normal g.
const SQRT_HALF_PI: f64 = 1.253_314_137_315_500_3;

/// A parsed `qjl` config: sketch sizes, layer split, outlier split, value bits, block and buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qjl {
    /// Sketch rows in layers `l0..`.
    pub m: usize,
    /// Sketch rows in the first `l0` layers.
    pub m0: usize,
    /// Layers that use `m0` (clamped to the model's depth).
    pub l0: usize,
    /// Outlier channels split out per block.
    pub outliers: usize,
    /// Outlier sketch rows (the first `mo` rows of S).
    pub mo: usize,
    /// Value bits (KIVI per-token quantizer).
    pub v: usize,
    /// Tokens per key block; channels per value group.
    pub group: usize,
    /// Newest tokens kept in f16.
    pub buffer: usize,
    /// Sketch seed; layer `l` uses `seed + l`.
    pub seed: u64,
}

/// Parses `qjl:m=256,m0=512,l0=15,outliers=8,mo=64,v=2,group=32,buffer=128,seed=0` (all optional).
pub fn parse(mut p: Params) -> Result<FormatRef> {
    let input = p.input().to_string();
    let m = p.usize("m", 256, 8, MAX_M)?;
    let m0 = p.usize("m0", 512, 8, MAX_M)?;
    for (key, val) in [("m", m), ("m0", m0)] {
        if val % 8 != 0 {
            return Err(parse_err(
                &input,
                format!("{key}={val}: must be a multiple of 8 (sign bits pack into bytes)"),
            ));
        }
    }
    let l0 = p.usize("l0", 15, 0, 1 << 16)?;
    let outliers = p.usize("outliers", 8, 0, MAX_HEAD_DIM - 1)?;
    let mo_max = m.min(m0);
    let mo = p.usize("mo", 64.min(mo_max), 8, MAX_M)?;
    if mo % 8 != 0 || mo > mo_max {
        return Err(parse_err(
            &input,
            format!("mo={mo}: must be a multiple of 8 and at most min(m, m0) = {mo_max} (S_o is the first mo rows of S)"),
        ));
    }
    let v = p.choice("v", 2, VALUE_BITS)?;
    let group = p.choice("group", 32, GROUPS)?;
    let buffer = p.usize("buffer", 128, 0, MAX_BUFFER)?;
    let seed = p.u64("seed", 0)?;
    p.finish(KEYS)?;
    Ok(Arc::new(Qjl {
        m,
        m0,
        l0,
        outliers,
        mo,
        v,
        group,
        buffer,
        seed,
    }))
}

impl Qjl {
    /// Sketch rows of `layer` in a model of `n_layers` layers (`l0` clamped to the depth).
    pub fn rows_for(&self, layer: usize, n_layers: usize) -> usize {
        if layer < self.l0.min(n_layers) {
            self.m0
        } else {
            self.m
        }
    }

    /// The value stream's format string (KIVI's per-token quantizer, same group and window).
    pub fn value_format(&self) -> String {
        format!(
            "kivi:bits={},group={},window={}",
            self.v, self.group, self.buffer
        )
    }
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
        let unsupported = |what: String| FormatError::Unsupported {
            format: self.canonical(),
            what,
        };
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(unsupported(format!(
                "head_dim {head_dim} (outlier indices are u8: 1..=256)"
            )));
        }
        if self.outliers >= head_dim {
            return Err(unsupported(format!(
                "outliers={} with head_dim {head_dim} (needs outliers < head_dim)",
                self.outliers
            )));
        }
        Ok(())
    }

    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        match ctx.stream {
            Stream::Value => crate::formats::parse_format(&self.value_format())?.build(ctx),
            Stream::Key => {
                self.supports(ctx.head_dim)?;
                let m = self.rows_for(ctx.layer, ctx.n_layers);
                let seed = self.seed.wrapping_add(ctx.layer as u64);
                Ok(Box::new(QjlKeys::new(
                    m,
                    self.mo,
                    self.outliers,
                    self.group,
                    self.buffer,
                    ctx.head_dim,
                    seed,
                )))
            }
        }
    }
}

/// E||g|| for g ~ N(0, I_d), the sketch row norm that makes the sign estimator exactly unbiased:
/// sqrt(2) Gamma((d+1)/2) / Gamma(d/2), by R(d+2) = R(d) (d+1)/d on R(d) = Gamma((d+1)/2) / Gamma(d/2).
pub fn gaussian_norm_mean(d: usize) -> f64 {
    let pi = std::f64::consts::PI;
    let (mut r, mut k) = if d % 2 == 1 {
        (1.0 / pi.sqrt(), 1)
    } else {
        (pi.sqrt() / 2.0, 2)
    };
    while k < d {
        r *= (k as f64 + 1.0) / k as f64;
        k += 2;
    }
    std::f64::consts::SQRT_2 * r
}

/// The layer's sketch S (m x d, row-major), public so the GPU upload and tests use the very matrix
/// the codec encodes with: Gaussian rows from ChaCha8(`seed`), orthonormalized per chunk of d rows,
/// scaled to `gaussian_norm_mean(d)`, rounded to f16.
pub fn sketch(m: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut g: Vec<f64> = (0..m * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let scale = gaussian_norm_mean(d);
    for chunk in g.chunks_mut(d * d) {
        let rows = chunk.len() / d;
        for i in 0..rows {
            // Two passes of modified Gram-Schmidt against the chunk's earlier rows.
            for _ in 0..2 {
                for j in 0..i {
                    let (prev, cur) = chunk.split_at_mut(i * d);
                    let pj = &prev[j * d..(j + 1) * d];
                    let ri = &mut cur[..d];
                    let c: f64 = pj.iter().zip(ri.iter()).map(|(a, b)| a * b).sum();
                    ri.iter_mut().zip(pj).for_each(|(b, a)| *b -= c * a);
                }
            }
            let ri = &mut chunk[i * d..(i + 1) * d];
            let n = ri.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
            ri.iter_mut().for_each(|x| *x /= n);
        }
    }
    g.iter()
        .map(|&x| f16::from_f64(x * scale).to_f32())
        .collect()
}

/// One layer's key codec: the sketch and the block geometry.
struct QjlKeys {
    d: usize,
    m: usize,
    /// Outlier sketch rows actually stored (0 when `outliers` is 0).
    mo: usize,
    outliers: usize,
    group: usize,
    buffer: usize,
    seed: u64,
    /// S, m x d row-major, f16-rounded.
    s: Vec<f32>,
    off_norm: usize,
    off_bits: usize,
    off_obits: usize,
    bytes: usize,
}

impl QjlKeys {
    /// sqrt(pi/2)/m and sqrt(pi/2)/mo: the estimator's scales of the inlier and outlier terms.
    fn estimator_scales(&self) -> (f32, f32) {
        let a_in = (SQRT_HALF_PI / self.m as f64) as f32;
        let a_out = if self.mo > 0 {
            (SQRT_HALF_PI / self.mo as f64) as f32
        } else {
            0.0
        };
        (a_in, a_out)
    }

    fn new(
        m: usize,
        mo: usize,
        outliers: usize,
        group: usize,
        buffer: usize,
        d: usize,
        seed: u64,
    ) -> Self {
        let mo = if outliers == 0 { 0 } else { mo };
        let off_norm = outliers.div_ceil(4) * 4;
        let off_bits = off_norm + 4 * group;
        let off_obits = off_bits + group * m / 8;
        let bytes = off_obits + group * mo / 8;
        Self {
            d,
            m,
            mo,
            outliers,
            group,
            buffer,
            seed,
            s: sketch(m, d, seed),
            off_norm,
            off_bits,
            off_obits,
            bytes,
        }
    }

    fn corrupt(&self, reason: String) -> FormatError {
        FormatError::Corrupt {
            format: "qjl".into(),
            reason,
        }
    }

    /// The block's outlier channels (validated blocks only).
    fn indices<'a>(&self, block: &'a [u8]) -> &'a [u8] {
        &block[..self.outliers]
    }

    /// Token t's (||k_in||, ||k_out||).
    fn norms(&self, block: &[u8], t: usize) -> (f32, f32) {
        let o = self.off_norm + 4 * t;
        (f16_at(block, o), f16_at(block, o + 2))
    }

    /// `sum_j sign_j * w_j` over a token's sign row (bit set = +1).
    fn signed_sum(row: &[u8], w: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (byte, ws) in row.iter().zip(w.chunks(8)) {
            for (bit, &x) in ws.iter().enumerate() {
                if byte >> bit & 1 == 1 {
                    acc += x;
                } else {
                    acc -= x;
                }
            }
        }
        acc
    }
}

impl Codec for QjlKeys {
    fn describe(&self) -> String {
        format!(
            "qjl-keys:m={},mo={},outliers={},group={},buffer={},sketch_seed={}",
            self.m, self.mo, self.outliers, self.group, self.buffer, self.seed
        )
    }
    fn block_tokens(&self) -> usize {
        self.group
    }
    fn block_bytes(&self) -> usize {
        self.bytes
    }
    fn window(&self) -> usize {
        self.buffer
    }
    fn fixed_bytes(&self) -> usize {
        2 * self.m * self.d
    }

    fn kernel(&self) -> Option<KernelSpec> {
        // kernels/formats/qjl.cu: kernels for m in {128, 256, 512} (S q held in shared memory),
        // m_o in k-steps of 16, outlier slots in one k-step, 32-token blocks; values are the kivi
        // stream's.
        let tag = match self.m {
            128 => "kq128",
            256 => "kq256",
            512 => "kq512",
            _ => return None,
        };
        let ok = matches!(self.d, 64 | 128)
            && self.mo.is_multiple_of(16)
            && self.outliers <= 16
            && self.group == 32;
        ok.then_some(KernelSpec {
            module: "qjl",
            ints: [self.m as i32, self.mo as i32, self.outliers as i32, 0],
            tag,
            tile: (0, 0, 0),
            pre_rope: false,
            smem_table: 0,
            query_sketch: self.m,
        })
    }

    fn kernel_table(&self) -> Option<Vec<u8>> {
        // S^T (the encoder's and the scores' column reads) and S row-major (the decode prologue's S q:
        // 16-byte loads of a sketch row's channels), both f16.
        let (m, d) = (self.m, self.d);
        let mut out = Vec::with_capacity(4 * m * d);
        for c in 0..d {
            for j in 0..m {
                out.extend_from_slice(&f16::from_f32(self.s[j * d + c]).to_le_bytes());
            }
        }
        for &v in &self.s[..m * d] {
            out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        }
        Some(out)
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let (d, g) = (self.d, self.group);
        out.iter_mut().for_each(|b| *b = 0);
        // Outlier channels: largest sum of squares over the block; ties to the lower channel.
        let mut energy = vec![0f64; d];
        for tok in x.chunks_exact(d).take(g) {
            for (e, &v) in energy.iter_mut().zip(tok) {
                *e += v as f64 * v as f64;
            }
        }
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| energy[b].total_cmp(&energy[a]).then(a.cmp(&b)));
        let mut idx: Vec<usize> = order[..self.outliers].to_vec();
        idx.sort_unstable();
        let mut is_out = vec![false; d];
        for (slot, &c) in out.iter_mut().zip(&idx) {
            *slot = c as u8;
            is_out[c] = true;
        }
        let (rb, orb) = (self.m / 8, self.mo / 8);
        for (t, tok) in x.chunks_exact(d).take(g).enumerate() {
            let (mut n_in, mut n_out) = (0f64, 0f64);
            for (c, &v) in tok.iter().enumerate() {
                let sq = v as f64 * v as f64;
                if is_out[c] {
                    n_out += sq;
                } else {
                    n_in += sq;
                }
            }
            let o = self.off_norm + 4 * t;
            put_f16(out, o, (n_in.sqrt() as f32).min(65504.0));
            put_f16(out, o + 2, (n_out.sqrt() as f32).min(65504.0));
            for (j, row) in self.s.chunks_exact(d).enumerate() {
                let (mut p_in, mut p_out) = (0f64, 0f64);
                for (c, (&sv, &kv)) in row.iter().zip(tok).enumerate() {
                    let p = sv as f64 * kv as f64;
                    if is_out[c] {
                        p_out += p;
                    } else {
                        p_in += p;
                    }
                }
                if p_in > 0.0 {
                    out[self.off_bits + t * rb + j / 8] |= 1 << (j % 8);
                }
                if j < self.mo && p_out > 0.0 {
                    out[self.off_obits + t * orb + j / 8] |= 1 << (j % 8);
                }
            }
        }
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        crate::formats::check_len("qjl", block, self.bytes)?;
        let idx = self.indices(block);
        for (i, &c) in idx.iter().enumerate() {
            if c as usize >= self.d {
                return Err(self.corrupt(format!(
                    "outlier index {c} at slot {i} is not a channel of a {}-dim head",
                    self.d
                )));
            }
            if i > 0 && c <= idx[i - 1] {
                return Err(self.corrupt(format!(
                    "outlier indices not strictly increasing at slot {i} ({} then {c})",
                    idx[i - 1]
                )));
            }
        }
        if let Some(p) = block[self.outliers..self.off_norm]
            .iter()
            .position(|&b| b != 0)
        {
            return Err(self.corrupt(format!(
                "padding byte {} after the outlier indices is not zero",
                self.outliers + p
            )));
        }
        for t in 0..self.group {
            let (a, b) = self.norms(block, t);
            for (name, n) in [("||k_in||", a), ("||k_out||", b)] {
                if !n.is_finite() || n < 0.0 {
                    return Err(self.corrupt(format!(
                        "token {t}: {name} = {n}, expected a finite norm >= 0"
                    )));
                }
            }
        }
        Ok(())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.validate(block)?;
        let (d, g) = (self.d, self.group);
        if out.len() != g * d {
            return Err(FormatError::Shape(format!(
                "qjl decode: {} outputs for {g} tokens x {d}",
                out.len()
            )));
        }
        let idx = self.indices(block);
        let (rb, orb) = (self.m / 8, self.mo / 8);
        let (a_in, a_out) = self.estimator_scales();
        let mut acc = vec![0f32; d];
        for (t, o) in out.chunks_exact_mut(d).enumerate() {
            let (n_in, n_out) = self.norms(block, t);
            // Inliers: a ||k_in|| P_in S^T sign(S k_in).
            acc.iter_mut().for_each(|a| *a = 0.0);
            let row = &block[self.off_bits + t * rb..self.off_bits + (t + 1) * rb];
            for (j, srow) in self.s.chunks_exact(d).enumerate() {
                let sgn = if row[j / 8] >> (j % 8) & 1 == 1 {
                    1.0
                } else {
                    -1.0
                };
                acc.iter_mut().zip(srow).for_each(|(a, &s)| *a += sgn * s);
            }
            for (oc, &a) in o.iter_mut().zip(&acc) {
                *oc = a_in * n_in * a;
            }
            // Outliers: a_o ||k_out|| P_out S_o^T sign(S_o k_out).
            let orow = &block[self.off_obits + t * orb..self.off_obits + (t + 1) * orb];
            for &c in idx {
                let c = c as usize;
                let mut a = 0f32;
                for j in 0..self.mo {
                    let s = self.s[j * d + c];
                    a += if orow[j / 8] >> (j % 8) & 1 == 1 {
                        s
                    } else {
                        -s
                    };
                }
                o[c] = a_out * n_out * a;
            }
        }
        Ok(())
    }

    fn prep_query(&self, q: &[f32]) -> Vec<f32> {
        self.s
            .chunks_exact(self.d)
            .map(|row| crate::codec::dot(row, q))
            .collect()
    }

    fn key_scores(
        &self,
        q: &[f32],
        prep: &[f32],
        block: &[u8],
        _pos0: usize,
        _rope: &Rope,
        scores: &mut [f32],
    ) {
        let d = self.d;
        if self.validate(block).is_err() || q.len() != d || prep.len() != self.m {
            scores.iter_mut().for_each(|s| *s = f32::NAN);
            return;
        }
        let idx = self.indices(block);
        // g = S P_out q: the outlier columns of S against the query's outlier channels.
        let gq: Vec<f32> = self
            .s
            .chunks_exact(d)
            .map(|row| idx.iter().map(|&c| row[c as usize] * q[c as usize]).sum())
            .collect();
        let sq_in: Vec<f32> = prep.iter().zip(&gq).map(|(p, g)| p - g).collect();
        let sq_out = &gq[..self.mo];
        let (rb, orb) = (self.m / 8, self.mo / 8);
        let (a_in, a_out) = self.estimator_scales();
        for (t, s) in scores.iter_mut().enumerate().take(self.group) {
            let (n_in, n_out) = self.norms(block, t);
            let row = &block[self.off_bits + t * rb..self.off_bits + (t + 1) * rb];
            let mut score = a_in * n_in * Self::signed_sum(row, &sq_in);
            if self.mo > 0 {
                let orow = &block[self.off_obits + t * orb..self.off_obits + (t + 1) * orb];
                score += a_out * n_out * Self::signed_sum(orow, sq_out);
            }
            *s = score;
        }
    }
}
