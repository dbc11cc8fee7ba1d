//! DecoQuant (Liu et al., "Unlocking Data-free Low-bit Quantization with Matrix Decomposition for KV
//! Cache Compression", ACL 2024): a chunk of tokens X (chunk x d) is reshaped to rows of `sub` channels
//! ((chunk*d/sub) x sub) and factored by an untruncated SVD X = U S V^T. The central tensor
//! T_L = U (chunk*d elements, orthonormal columns: a narrow range, outliers migrate out) is quantized
//! with one symmetric absmax scale per token; the auxiliary tensor T_S = S V^T (sub x sub) stays f16.
//!
//! Deviation from the paper: T_S is per KV head (the paper concatenates a layer's heads before the
//! reshape); the factorization and its math are the same, the head's rows simply stay separate.
//!
//! Reading without reconstruction (FORMATS.md): every `sub`-piece x_c of a token is u_c T_S, so
//! `q.k = sum_c u_c . (T_S q_c)` (the query is transformed once per block) and
//! `sum_t p_t v_t = (sum_t p_t u_t) T_S` per piece (one product per block).
//!
//! Byte layout of one block (one head, `C = chunk` tokens, `d` channels, `b` bits), little-endian:
//! ```text
//! [T_S f16; sub*sub, row-major]  (absent with svd=off)
//! [scale f16; C]                 one symmetric absmax scale per token
//! [codes: token 0 (d x b bits) | ... | token C-1]   code = q + 2^(b-1) - 1, q in [-(2^(b-1)-1), 2^(b-1)-1]
//! ```
//! Bits/elem as stored: `(2*sub^2 + 2C + C*d*b/8) * 8 / (C*d)`; d=64, b=4: 4.50 at C=256, 4.31 at C=1024;
//! d=128, b=4: 4.25 at C=256, 4.16 at C=1024.

use crate::bits;
use crate::codec::{Codec, Format, FormatRef, KernelSpec, Stream, StreamCtx};
use crate::config::Params;
use crate::error::{FormatError, Result};
use crate::linalg::sym_eigen;
use std::sync::Arc;

/// A parsed DecoQuant config.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoQuant {
    /// Bits of the central tensor.
    pub bits: usize,
    /// Tokens per decomposed chunk (the block).
    pub chunk: usize,
    /// Channels per row of the reshaped matrix (size of T_S).
    pub sub: usize,
    /// Decompose (on) or plain per-token quantization of X (off: the paper's baseline).
    pub svd: bool,
}

/// Parses `decoquant:bits=4,chunk=1024,sub=16,svd=on`.
pub fn parse(mut p: Params) -> Result<FormatRef> {
    let bits = p.choice("bits", 4, &[2, 4, 8])?;
    let chunk = p.usize("chunk", 1024, 16, 4096)?;
    let sub = p.choice("sub", 16, &[4, 8, 16, 32])?;
    let svd = p.word("svd", "on", &["on", "off"])? == "on";
    if chunk % 16 != 0 {
        return Err(crate::error::parse_err(
            p.input(),
            format!("chunk={chunk}: must be a multiple of 16"),
        ));
    }
    p.finish(&["bits", "chunk", "sub", "svd"])?;
    Ok(Arc::new(DecoQuant {
        bits,
        chunk,
        sub,
        svd,
    }))
}

impl Format for DecoQuant {
    fn canonical(&self) -> String {
        format!(
            "decoquant:bits={},chunk={},sub={},svd={}",
            self.bits,
            self.chunk,
            self.sub,
            if self.svd { "on" } else { "off" }
        )
    }

    fn supports(&self, head_dim: usize) -> Result<()> {
        if head_dim == 0
            || !head_dim.is_multiple_of(self.sub)
            || !(head_dim * self.bits).is_multiple_of(8)
        {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!("head_dim {head_dim} (needs a multiple of sub={})", self.sub),
            });
        }
        Ok(())
    }

    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        self.supports(ctx.head_dim)?;
        Ok(Box::new(DecoCodec {
            f: self.clone(),
            d: ctx.head_dim,
            stream: ctx.stream,
        }))
    }
}

struct DecoCodec {
    f: DecoQuant,
    d: usize,
    stream: crate::codec::Stream,
}

impl DecoCodec {
    fn ts_bytes(&self) -> usize {
        if self.f.svd {
            2 * self.f.sub * self.f.sub
        } else {
            0
        }
    }
    fn codes_off(&self) -> usize {
        self.ts_bytes() + 2 * self.f.chunk
    }
    fn token_bytes(&self) -> usize {
        self.d * self.f.bits / 8
    }
    fn qmax(&self) -> f32 {
        ((1 << (self.f.bits - 1)) - 1) as f32
    }
    /// T_S (sub x sub, row-major); identity with svd=off.
    fn ts(&self, block: &[u8]) -> Vec<f32> {
        let s = self.f.sub;
        if self.f.svd {
            (0..s * s).map(|i| bits::f16_at(block, 2 * i)).collect()
        } else {
            (0..s * s)
                .map(|i| if i / s == i % s { 1.0 } else { 0.0 })
                .collect()
        }
    }
    /// The dequantized central tensor of token t (d values: d/sub rows of sub).
    fn u(&self, block: &[u8], t: usize, out: &mut [f32]) {
        let sc = bits::f16_at(block, self.ts_bytes() + 2 * t);
        let off = self.codes_off() + t * self.token_bytes();
        let q = self.qmax();
        for (c, o) in out.iter_mut().enumerate() {
            *o = (bits::get(&block[off..], self.f.bits as u32, c) as f32 - q) * sc;
        }
    }
}

/// Factors the rows of `x` (n rows of `s`): returns (T_L rows as f32, T_S row-major) with x = T_L T_S.
pub fn decompose(x: &[f32], s: usize) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / s;
    let mut g = vec![0f64; s * s];
    for r in 0..n {
        let row = &x[r * s..(r + 1) * s];
        for i in 0..s {
            for j in i..s {
                g[i * s + j] += row[i] as f64 * row[j] as f64;
            }
        }
    }
    for i in 0..s {
        for j in 0..i {
            g[i * s + j] = g[j * s + i];
        }
    }
    let (w, v) = sym_eigen(&g, s);
    let smax = w[0].max(0.0).sqrt();
    let sig: Vec<f64> = w.iter().map(|&l| l.max(0.0).sqrt()).collect();
    // T_S = S V^T; T_L = X V S^-1 (columns of ~zero singular value are dropped: their T_S rows are 0).
    let mut ts = vec![0f32; s * s];
    for k in 0..s {
        for j in 0..s {
            ts[k * s + j] = (sig[k] * v[j * s + k]) as f32;
        }
    }
    let mut tl = vec![0f32; x.len()];
    for r in 0..n {
        for k in 0..s {
            if sig[k] <= 1e-7 * smax || sig[k] == 0.0 {
                continue;
            }
            let dot: f64 = (0..s).map(|j| x[r * s + j] as f64 * v[j * s + k]).sum();
            tl[r * s + k] = (dot / sig[k]) as f32;
        }
    }
    (tl, ts)
}

impl Codec for DecoCodec {
    fn describe(&self) -> String {
        self.f.canonical()
    }
    fn block_tokens(&self) -> usize {
        self.f.chunk
    }
    fn block_bytes(&self) -> usize {
        self.codes_off() + self.f.chunk * self.token_bytes()
    }

    fn kernel(&self) -> Option<KernelSpec> {
        // kernels/formats/decoquant.cu: tiles of 64 tokens, pieces of 16 channels; the sequence is
        // split in units of up to 256 tokens (a divisor of the block) so short contexts spread too.
        let (b, d, c) = (self.f.bits, self.d, self.f.chunk);
        let ok = c.is_multiple_of(64) && (d == 64 || d == 128) && self.f.sub == 16;
        let unit = [256, 128, 64]
            .into_iter()
            .find(|u| c.is_multiple_of(*u))
            .unwrap_or(64);
        let tag = match (self.stream, b) {
            (Stream::Key, 2) => "k2",
            (Stream::Key, 4) => "k4",
            (Stream::Key, 8) => "k8",
            (Stream::Value, 2) => "v2",
            (Stream::Value, 4) => "v4",
            (Stream::Value, 8) => "v8",
            _ => return None,
        };
        ok.then_some(KernelSpec {
            module: "decoquant",
            ints: [b as i32, c as i32, unit as i32, self.f.svd as i32],
            tag,
            tile: (self.ts_bytes(), 2 + self.token_bytes(), unit),
            pre_rope: false,
            smem_table: 0,
            query_sketch: 0,
        })
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let (d, s, c) = (self.d, self.f.sub, self.f.chunk);
        out.iter_mut().for_each(|b| *b = 0);
        let tl = if self.f.svd {
            let (mut tl, mut ts) = decompose(x, s);
            // T_S carries the singular values (up to sqrt(rows) x max|x|): move any excess over the
            // f16 range into T_L, whose per-token scales absorb it.
            let m = ts.iter().fold(0f32, |a, v| a.max(v.abs()));
            if m > 30000.0 {
                let alpha = m / 30000.0;
                ts.iter_mut().for_each(|v| *v /= alpha);
                tl.iter_mut().for_each(|v| *v *= alpha);
            }
            for (i, &v) in ts.iter().enumerate() {
                bits::put_f16(out, 2 * i, v);
            }
            tl
        } else {
            x.to_vec()
        };
        let qmax = self.qmax();
        let mut codes = vec![0u32; d];
        let tb = self.token_bytes();
        for t in 0..c {
            let row = &tl[t * d..(t + 1) * d];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sc = half::f16::from_f32((amax / qmax).min(65504.0)).to_f32();
            for (k, &v) in codes.iter_mut().zip(row) {
                let q = if sc > 0.0 {
                    (v / sc).round().clamp(-qmax, qmax)
                } else {
                    0.0
                };
                *k = (q + qmax) as u32;
            }
            bits::put_f16(out, self.ts_bytes() + 2 * t, sc);
            let off = self.codes_off() + t * tb;
            bits::pack(&codes, self.f.bits as u32, &mut out[off..off + tb]);
        }
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        crate::formats::check_len("decoquant", block, self.block_bytes())?;
        let n = self.ts_bytes() / 2 + self.f.chunk;
        crate::formats::check_finite_f16("decoquant", block, 0, n, "T_S or scale")?;
        Ok(())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.validate(block)?;
        let (d, s) = (self.d, self.f.sub);
        let ts = self.ts(block);
        let mut u = vec![0f32; d];
        for t in 0..self.f.chunk {
            self.u(block, t, &mut u);
            for c in 0..d / s {
                for j in 0..s {
                    out[t * d + c * s + j] = (0..s).map(|k| u[c * s + k] * ts[k * s + j]).sum();
                }
            }
        }
        Ok(())
    }

    fn key_scores(
        &self,
        q: &[f32],
        _prep: &[f32],
        block: &[u8],
        _pos0: usize,
        _rope: &crate::Rope,
        scores: &mut [f32],
    ) {
        if self.validate(block).is_err() {
            scores.iter_mut().for_each(|s| *s = f32::NAN);
            return;
        }
        let (d, s) = (self.d, self.f.sub);
        let ts = self.ts(block);
        // w_c = T_S q_c per piece, once per block.
        let mut w = vec![0f32; d];
        for c in 0..d / s {
            for k in 0..s {
                w[c * s + k] = (0..s).map(|j| ts[k * s + j] * q[c * s + j]).sum();
            }
        }
        let mut u = vec![0f32; d];
        for (t, out) in scores.iter_mut().enumerate() {
            self.u(block, t, &mut u);
            *out = crate::codec::dot(&u, &w);
        }
    }

    fn accumulate_values(&self, block: &[u8], p: &[f32], acc: &mut [f32]) {
        if self.validate(block).is_err() {
            acc.iter_mut().for_each(|a| *a = f32::NAN);
            return;
        }
        let (d, s) = (self.d, self.f.sub);
        let mut su = vec![0f32; d];
        let mut u = vec![0f32; d];
        for (t, &pt) in p.iter().enumerate() {
            if pt != 0.0 {
                self.u(block, t, &mut u);
                crate::codec::axpy(pt, &u, &mut su);
            }
        }
        // One T_S product per block.
        let ts = self.ts(block);
        for c in 0..d / s {
            for j in 0..s {
                acc[c * s + j] += (0..s).map(|k| su[c * s + k] * ts[k * s + j]).sum::<f32>();
            }
        }
    }
}
