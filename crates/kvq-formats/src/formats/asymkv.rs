//! AsymKV (Tao, Yu, Zhou, arXiv 2410.13212, COLING 2025) and its uniform case KIVI (Liu et al. 2024).
//!
//! KIVI's quantizer: keys **per channel** over a block of `group` tokens, values **per token** over
//! groups of `group` channels; asymmetric min-max round-to-nearest (z = min, s = (max-min)/(2^b-1)),
//! scale and zero stored f16. AsymKV picks the bit width per layer: the first `lk` layers store keys at
//! `hi` bits and the rest at `lo`; the first `lv` layers store values at `hi`, the rest at `lo`.
//! The newest `window` tokens stay f16 (the cache's window).
//!
//! Byte layout of one block (one KV head, `G = group` tokens, `d` channels, `b` bits), little-endian:
//! ```text
//! keys:   [scale f16; d] [zero f16; d] [codes: token 0 (d x b bits) | token 1 | ... | token G-1]
//! values: [scale f16; G*d/G'] [zero f16; G*d/G'] [codes: token-major as for keys]
//!          (G' = group channels; scale/zero index = token * (d/G') + channel / G')
//! ```
//! Codes are a little-endian bit stream ([`crate::bits`]); one token's codes are `d*b/8` contiguous
//! bytes, so a kernel folds the per-channel key scales into the query once per block:
//! `q.k_t = sum_c (q_c s_c) code_{t,c} + sum_c q_c z_c`.
//!
//! Bits/elem as stored (d = 64, G = 32): keys `(4d + G*d*b/8)*8/(G*d)` = 2.5 (1-bit), 3.0 (2-bit),
//! 5.0 (4-bit); values the same (G' = 32). At 1 bit the f16 scale+zero cost as much as the payload.

use crate::bits;
use crate::codec::{Codec, Format, FormatRef, KernelSpec, Stream, StreamCtx};
use crate::config::Params;
use crate::error::{FormatError, Result};
use std::sync::Arc;

const BITS: &[usize] = &[1, 2, 3, 4, 8];
const GROUPS: &[usize] = &[16, 32, 64, 128];

/// A parsed AsymKV/KIVI config.
#[derive(Debug, Clone, PartialEq)]
pub struct AsymKv {
    /// Layers (from the first) whose keys use `hi` bits.
    pub lk: usize,
    /// Layers (from the first) whose values use `hi` bits.
    pub lv: usize,
    /// The higher bit width.
    pub hi: usize,
    /// The lower bit width.
    pub lo: usize,
    /// Tokens per key block, channels per value group.
    pub group: usize,
    /// Newest tokens kept in f16.
    pub window: usize,
    /// Parsed as `kivi` (uniform bits): printed back as `kivi:bits=..`.
    pub uniform: bool,
}

/// Parses `asymkv:lk=16,lv=0,hi=2,lo=1,group=32,window=128`.
pub fn parse(mut p: Params) -> Result<FormatRef> {
    let f = AsymKv {
        lk: p.usize("lk", 16, 0, 100_000)?,
        lv: p.usize("lv", 0, 0, 100_000)?,
        hi: p.choice("hi", 2, BITS)?,
        lo: p.choice("lo", 1, BITS)?,
        group: p.choice("group", 32, GROUPS)?,
        window: p.usize("window", 128, 0, 1 << 20)?,
        uniform: false,
    };
    p.finish(&["lk", "lv", "hi", "lo", "group", "window"])?;
    Ok(Arc::new(f))
}

/// Parses `kivi:bits=2,group=32,window=128` (AsymKV with the same bits everywhere).
pub fn parse_kivi(mut p: Params) -> Result<FormatRef> {
    let bits = p.choice("bits", 2, BITS)?;
    let group = p.choice("group", 32, GROUPS)?;
    let window = p.usize("window", 128, 0, 1 << 20)?;
    p.finish(&["bits", "group", "window"])?;
    Ok(Arc::new(AsymKv {
        lk: 0,
        lv: 0,
        hi: bits,
        lo: bits,
        group,
        window,
        uniform: true,
    }))
}

impl AsymKv {
    /// Bit width of one layer's stream.
    pub fn bits_for(&self, layer: usize, stream: Stream) -> usize {
        let l = match stream {
            Stream::Key => self.lk,
            Stream::Value => self.lv,
        };
        if layer < l {
            self.hi
        } else {
            self.lo
        }
    }
}

impl Format for AsymKv {
    fn canonical(&self) -> String {
        if self.uniform {
            format!(
                "kivi:bits={},group={},window={}",
                self.hi, self.group, self.window
            )
        } else {
            format!(
                "asymkv:lk={},lv={},hi={},lo={},group={},window={}",
                self.lk, self.lv, self.hi, self.lo, self.group, self.window
            )
        }
    }

    fn supports(&self, head_dim: usize) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(self.group) || !head_dim.is_multiple_of(8) {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!(
                    "head_dim {head_dim} (needs a multiple of group={} and of 8)",
                    self.group
                ),
            });
        }
        Ok(())
    }

    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        self.supports(ctx.head_dim)?;
        Ok(Box::new(KiviCodec {
            stream: ctx.stream,
            bits: self.bits_for(ctx.layer, ctx.stream) as u32,
            group: self.group,
            window: self.window,
            d: ctx.head_dim,
        }))
    }
}

/// One stream of one layer: per-channel keys or per-token values at a fixed bit width.
#[derive(Debug, Clone)]
pub struct KiviCodec {
    stream: Stream,
    bits: u32,
    group: usize,
    window: usize,
    d: usize,
}

impl KiviCodec {
    /// Number of (scale, zero) pairs in a block.
    fn n_params(&self) -> usize {
        match self.stream {
            Stream::Key => self.d,
            Stream::Value => self.group * (self.d / self.group),
        }
    }

    /// Index of the (scale, zero) pair of element (t, c).
    fn param_index(&self, t: usize, c: usize) -> usize {
        match self.stream {
            Stream::Key => c,
            Stream::Value => t * (self.d / self.group) + c / self.group,
        }
    }

    fn codes_offset(&self) -> usize {
        4 * self.n_params()
    }

    fn token_code_bytes(&self) -> usize {
        self.d * self.bits as usize / 8
    }

    fn params(&self, block: &[u8]) -> (Vec<f32>, Vec<f32>) {
        let n = self.n_params();
        let s = (0..n).map(|i| bits::f16_at(block, 2 * i)).collect();
        let z = (0..n).map(|i| bits::f16_at(block, 2 * (n + i))).collect();
        (s, z)
    }

    fn code(&self, block: &[u8], t: usize, c: usize) -> u32 {
        let off = self.codes_offset() + t * self.token_code_bytes();
        bits::get(&block[off..], self.bits, c)
    }
}

/// Min-max quantization of `vals` at `bits`: returns (scale, zero) as stored (f16-rounded) and fills
/// `codes`. A zero (or f16-underflowing) range stores scale 0: every code 0 decodes to the zero exactly.
pub fn minmax_quantize(vals: &[f32], bits: u32, codes: &mut [u32]) -> (f32, f32) {
    let (mn, mx) = vals
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let levels = ((1u32 << bits) - 1) as f32;
    let z = half::f16::from_f32(mn).to_f32();
    let s = half::f16::from_f32(((mx - z) / levels).min(65504.0)).to_f32();
    for (c, &v) in codes.iter_mut().zip(vals) {
        *c = if s > 0.0 {
            ((v - z) / s).round().clamp(0.0, levels) as u32
        } else {
            0
        };
    }
    (s, z)
}

impl Codec for KiviCodec {
    fn describe(&self) -> String {
        let side = match self.stream {
            Stream::Key => "k",
            Stream::Value => "v",
        };
        format!(
            "kivi-{side}:bits={},group={},window={}",
            self.bits, self.group, self.window
        )
    }

    fn block_tokens(&self) -> usize {
        self.group
    }

    fn block_bytes(&self) -> usize {
        self.codes_offset() + self.group * self.token_code_bytes()
    }

    fn window(&self) -> usize {
        self.window
    }

    fn kernel(&self) -> Option<KernelSpec> {
        // kernels/formats/kivi.cu is compiled for group 32 (its block of tokens).
        (self.group == 32).then_some(KernelSpec {
            module: "kivi",
            ints: [self.bits as i32, 32, 0, 0],
            tile_blocks: 4,
        })
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let (g, d) = (self.group, self.d);
        let n = self.n_params();
        let mut codes = vec![0u32; g * d];
        let put = |i: usize, s: f32, z: f32, out: &mut [u8]| {
            bits::put_f16(out, 2 * i, s);
            bits::put_f16(out, 2 * (n + i), z);
        };
        match self.stream {
            Stream::Key => {
                let mut col = vec![0f32; g];
                let mut cc = vec![0u32; g];
                for c in 0..d {
                    for t in 0..g {
                        col[t] = x[t * d + c];
                    }
                    let (s, z) = minmax_quantize(&col, self.bits, &mut cc);
                    put(c, s, z, out);
                    for t in 0..g {
                        codes[t * d + c] = cc[t];
                    }
                }
            }
            Stream::Value => {
                let ng = d / g;
                for t in 0..g {
                    for j in 0..ng {
                        let r = t * d + j * g..t * d + (j + 1) * g;
                        let (s, z) = minmax_quantize(&x[r.clone()], self.bits, &mut codes[r]);
                        put(t * ng + j, s, z, out);
                    }
                }
            }
        }
        let off = self.codes_offset();
        let tb = self.token_code_bytes();
        for t in 0..g {
            bits::pack(
                &codes[t * d..(t + 1) * d],
                self.bits,
                &mut out[off + t * tb..off + (t + 1) * tb],
            );
        }
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        crate::formats::check_len("kivi", block, self.block_bytes())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.validate(block)?;
        let (s, z) = self.params(block);
        let d = self.d;
        for t in 0..self.group {
            for c in 0..d {
                let i = self.param_index(t, c);
                out[t * d + c] = z[i] + s[i] * self.code(block, t, c) as f32;
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
        if self.stream != Stream::Key || self.validate(block).is_err() {
            scores.iter_mut().for_each(|s| *s = f32::NAN);
            return;
        }
        // Fold the per-channel scales into the query once per block; the zeros give one constant.
        let (s, z) = self.params(block);
        let qs: Vec<f32> = q.iter().zip(&s).map(|(a, b)| a * b).collect();
        let qz: f32 = q.iter().zip(&z).map(|(a, b)| a * b).sum();
        for (t, out) in scores.iter_mut().enumerate() {
            let mut acc = qz;
            for (c, &w) in qs.iter().enumerate() {
                acc += w * self.code(block, t, c) as f32;
            }
            *out = acc;
        }
    }

    fn accumulate_values(&self, block: &[u8], p: &[f32], acc: &mut [f32]) {
        if self.stream != Stream::Value || self.validate(block).is_err() {
            acc.iter_mut().for_each(|a| *a = f32::NAN);
            return;
        }
        let (s, z) = self.params(block);
        for (t, &pt) in p.iter().enumerate() {
            if pt == 0.0 {
                continue;
            }
            for (c, a) in acc.iter_mut().enumerate() {
                let i = self.param_index(t, c);
                *a += pt * (z[i] + s[i] * self.code(block, t, c) as f32);
            }
        }
    }
}
