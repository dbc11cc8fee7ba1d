//! The generic cache of one layer: paging into blocks, the full-precision window, RoPE for keys,
//! byte accounting and the reference attention (GQA, causal limit, softmax). Formats only see blocks.
//!
//! Two readers give the same numbers: [`LayerCache::attend_fused`] calls the codec's `key_scores` and
//! `accumulate_values` on the packed bytes (what the CUDA kernels do), and [`LayerCache::attend`] reads
//! a mirror made by decoding each block once when it is sealed (dequantize-then-reference, fast
//! enough for perplexity on a CPU). Tests hold the two equal for every format.

use crate::codec::{axpy, dot, of_head, Codec, Stream};
use crate::error::{FormatError, Result};
use crate::rope::Rope;
use half::f16;

/// Replaces what f16 storage cannot hold: NaN -> 0, +-Inf and overflow -> +-65504.
pub fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-65504.0, 65504.0)
    }
}

/// One stream (K or V) of one layer, all KV heads.
pub struct StreamCache {
    codec: Box<dyn Codec>,
    heads: usize,
    d: usize,
    /// Packed blocks, one byte vector per head (blocks back to back).
    packed: Vec<Vec<u8>>,
    /// Decoded view of every token, one vector per head ([token][d]); keys rotated.
    mirror: Vec<Vec<f32>>,
    /// Tokens sealed into blocks.
    sealed: usize,
    /// Tokens held (sealed + window).
    len: usize,
    /// Unsealed tokens in the codec's own form (pre-RoPE keys stay unrotated), f16-rounded.
    pending: Vec<Vec<f32>>,
    /// The first `codec.sink()` tokens, also kept f16 in the codec's form once their block is sealed
    /// (readers take them from here, not from the block), one vector per head.
    sinks: Vec<Vec<f32>>,
}

impl StreamCache {
    /// An empty stream for `heads` KV heads of `d` channels.
    pub fn new(codec: Box<dyn Codec>, heads: usize, d: usize) -> Self {
        Self {
            codec,
            heads,
            d,
            packed: vec![Vec::new(); heads],
            mirror: vec![Vec::new(); heads],
            sealed: 0,
            len: 0,
            pending: vec![Vec::new(); heads],
            sinks: vec![Vec::new(); heads],
        }
    }

    /// The codec of this stream.
    pub fn codec(&self) -> &dyn Codec {
        self.codec.as_ref()
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens sealed into packed blocks.
    pub fn sealed(&self) -> usize {
        self.sealed
    }

    /// Sink tokens held in f16 (the first `codec.sink()` positions); blocks stay aligned at 0.
    pub fn sink_len(&self) -> usize {
        self.len.min(self.codec.sink())
    }

    /// Bytes of the f16 tokens, all heads: the window, and sink tokens whose block is sealed (those
    /// cost f16 bytes on top of the block).
    fn f16_bytes(&self) -> usize {
        let sealed_sinks = self.sink_len().min(self.sealed);
        self.heads * (self.len - self.sealed + sealed_sinks) * self.d * 2
    }

    /// The f16 token at position `t` of head `h` in the codec's form, unless only a block holds it.
    fn f16_token(&self, h: usize, t: usize) -> Option<&[f32]> {
        let d = self.d;
        if t < self.sink_len() {
            Some(&self.sinks[h][t * d..(t + 1) * d])
        } else if t >= self.sealed && t < self.len {
            let i = t - self.sealed;
            Some(&self.pending[h][i * d..(i + 1) * d])
        } else {
            None
        }
    }

    /// The packed bytes of head `h` (all sealed blocks).
    pub fn packed(&self, h: usize) -> &[u8] {
        &self.packed[h]
    }

    /// Bytes held: packed blocks plus f16 sink and window tokens, all heads.
    pub fn bytes(&self) -> usize {
        let blocks = self.sealed / self.codec.block_tokens();
        self.heads * blocks * self.codec.block_bytes() + self.f16_bytes()
    }

    /// Appends `n` tokens, `x` laid out [token][head][d], already in the codec's form
    /// (rotated keys unless the codec is pre-RoPE). `rot` rotates a sealed key for the mirror.
    fn append(&mut self, x: &[f32], n: usize, rope: Option<&Rope>) -> Result<()> {
        let (h, d) = (self.heads, self.d);
        if x.len() != n * h * d {
            return Err(FormatError::Shape(format!(
                "append: {} values for {n} tokens x {h} heads x {d}",
                x.len()
            )));
        }
        for t in 0..n {
            for hh in 0..h {
                let src = &x[(t * h + hh) * d..(t * h + hh + 1) * d];
                let v: Vec<f32> = src
                    .iter()
                    .map(|&a| f16::from_f32(sanitize(a)).to_f32())
                    .collect();
                let mut m = v.clone();
                if let Some(r) = rope {
                    r.rotate(&mut m, self.len + t, 1.0);
                }
                if self.len + t < self.codec.sink() {
                    self.sinks[hh].extend_from_slice(&v);
                }
                self.pending[hh].extend_from_slice(&v);
                self.mirror[hh].extend_from_slice(&m);
            }
        }
        self.len += n;
        self.seal(rope);
        Ok(())
    }

    /// Seals the oldest pending tokens into blocks while more than the window plus a block wait.
    fn seal(&mut self, rope: Option<&Rope>) {
        let bt = self.codec.block_tokens();
        let d = self.d;
        let sink = self.sink_len();
        while self.len - self.sealed >= self.codec.window() + bt {
            let mut dec = vec![0f32; bt * d];
            // Sink tokens in this block: encoded with the others (they stay in its ranges, measured
            // better than repeating the first other token there: docs/QUALITY.md), but read from their
            // f16 copy, which the mirror already holds.
            let keep = sink.saturating_sub(self.sealed).min(bt);
            for h in 0..self.heads {
                let c = of_head(&*self.codec, h);
                let mut block = vec![0u8; c.block_bytes()];
                c.encode(&self.pending[h][..bt * d], &mut block);
                // Our own bytes always decode; a failure here is a codec bug, surfaced as NaN.
                if c.decode(&block, &mut dec).is_err() {
                    dec.iter_mut().for_each(|v| *v = f32::NAN);
                }
                if let Some(r) = rope {
                    for t in 0..bt {
                        r.rotate(&mut dec[t * d..(t + 1) * d], self.sealed + t, 1.0);
                    }
                }
                let at = self.sealed * d;
                self.mirror[h][at + keep * d..at + bt * d].copy_from_slice(&dec[keep * d..]);
                self.packed[h].extend_from_slice(&block);
                self.pending[h].drain(..bt * d);
            }
            self.sealed += bt;
        }
    }
}

/// Memory held by a cache, split the way results report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheBytes {
    /// Tokens held.
    pub tokens: usize,
    /// Packed block bytes (K and V, all heads and layers counted).
    pub packed: usize,
    /// Full-precision bytes: the f16 window and sink tokens.
    pub window: usize,
    /// Bytes that do not grow with tokens (codebooks, sketches).
    pub fixed: usize,
    /// Elements stored (tokens x heads x d x 2 for K and V).
    pub elems: usize,
}

impl CacheBytes {
    /// Bits per cached element, packed blocks and window counted, fixed bytes not.
    pub fn bits_per_elem(&self) -> f64 {
        if self.elems == 0 {
            return 0.0;
        }
        (self.packed + self.window) as f64 * 8.0 / self.elems as f64
    }

    /// Adds another layer's figures.
    pub fn add(&mut self, o: &CacheBytes) {
        self.tokens = self.tokens.max(o.tokens);
        self.packed += o.packed;
        self.window += o.window;
        self.fixed += o.fixed;
        self.elems += o.elems;
    }
}

/// Keys and values of one layer for one sequence.
pub struct LayerCache {
    k: StreamCache,
    v: StreamCache,
    rope: Rope,
    heads: usize,
    d: usize,
}

impl LayerCache {
    /// A cache from the layer's two codecs.
    pub fn new(k: Box<dyn Codec>, v: Box<dyn Codec>, heads: usize, rope: Rope) -> Self {
        let d = rope.head_dim();
        Self {
            k: StreamCache::new(k, heads, d),
            v: StreamCache::new(v, heads, d),
            rope,
            heads,
            d,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.k.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// The key stream.
    pub fn keys(&self) -> &StreamCache {
        &self.k
    }

    /// The value stream.
    pub fn values(&self) -> &StreamCache {
        &self.v
    }

    /// Appends `n` tokens: `k` are keys *before* RoPE and `v` values, both [token][kv head][d].
    /// Positions continue from `len()`. Keys are rotated here unless the key codec is pre-RoPE.
    pub fn append(&mut self, k: &[f32], v: &[f32], n: usize) -> Result<()> {
        let (h, d) = (self.heads, self.d);
        if k.len() != n * h * d || v.len() != n * h * d {
            return Err(FormatError::Shape(format!(
                "append of {n} tokens needs {} values each, got k={} v={}",
                n * h * d,
                k.len(),
                v.len()
            )));
        }
        if self.k.codec.pre_rope() {
            self.k.append(k, n, Some(&self.rope))?;
        } else {
            let mut kr = k.to_vec();
            let pos0 = self.k.len();
            for t in 0..n {
                for hh in 0..h {
                    self.rope.rotate(
                        &mut kr[(t * h + hh) * d..(t * h + hh + 1) * d],
                        pos0 + t,
                        1.0,
                    );
                }
            }
            self.k.append(&kr, n, None)?;
        }
        self.v.append(v, n, None)
    }

    /// Memory held by this layer.
    pub fn bytes(&self) -> CacheBytes {
        let total = self.k.bytes() + self.v.bytes();
        let window = self.k.f16_bytes() + self.v.f16_bytes();
        CacheBytes {
            tokens: self.len(),
            packed: total - window,
            window,
            fixed: self.k.codec.fixed_bytes() + self.v.codec.fixed_bytes(),
            elems: 2 * self.len() * self.heads * self.d,
        }
    }

    fn check_query(&self, q: &[f32], out: &[f32], visible: usize) -> Result<usize> {
        let d = self.d;
        if q.is_empty() || !q.len().is_multiple_of(d) || out.len() != q.len() {
            return Err(FormatError::Shape(format!(
                "query of {} values, out {}, head_dim {d}",
                q.len(),
                out.len()
            )));
        }
        let qh = q.len() / d;
        if !qh.is_multiple_of(self.heads) {
            return Err(FormatError::Shape(format!(
                "{qh} query heads not a multiple of {} KV heads",
                self.heads
            )));
        }
        if visible == 0 || visible > self.len() {
            return Err(FormatError::Shape(format!(
                "attention over {visible} of {} tokens",
                self.len()
            )));
        }
        Ok(qh)
    }

    /// Attention of rotated queries `q` ([query head][d]) over the first `visible` tokens, through the
    /// decoded mirror; `out` gets [query head][d]. Softmax scale 1/sqrt(d).
    pub fn attend(&self, q: &[f32], visible: usize, out: &mut [f32]) -> Result<()> {
        let qh = self.check_query(q, out, visible)?;
        let (d, g) = (self.d, qh / self.heads);
        let scale = 1.0 / (d as f32).sqrt();
        let mut s = vec![0f32; visible];
        for h in 0..qh {
            let kv = h / g;
            let qv = &q[h * d..(h + 1) * d];
            let keys = &self.k.mirror[kv];
            for (t, st) in s.iter_mut().enumerate() {
                *st = dot(qv, &keys[t * d..(t + 1) * d]) * scale;
            }
            softmax(&mut s);
            let o = &mut out[h * d..(h + 1) * d];
            o.iter_mut().for_each(|x| *x = 0.0);
            let vals = &self.v.mirror[kv];
            for (t, &p) in s.iter().enumerate() {
                axpy(p, &vals[t * d..(t + 1) * d], o);
            }
        }
        Ok(())
    }

    /// The same attention computed block by block from the packed bytes with the codec's
    /// `prep_query`, `key_scores` and `accumulate_values` (the contract the GPU kernels follow).
    pub fn attend_fused(&self, q: &[f32], visible: usize, out: &mut [f32]) -> Result<()> {
        let qh = self.check_query(q, out, visible)?;
        let (d, g) = (self.d, qh / self.heads);
        let scale = 1.0 / (d as f32).sqrt();
        let (kb, vb) = (self.k.codec().block_tokens(), self.v.codec().block_tokens());
        let mut s = vec![0f32; visible];
        for h in 0..qh {
            let kv = h / g;
            let (kc, vc) = (of_head(self.k.codec(), kv), of_head(self.v.codec(), kv));
            let qv = &q[h * d..(h + 1) * d];
            let prep = kc.prep_query(qv);
            let mut buf = vec![0f32; kb];
            for b in 0..self.k.sealed / kb {
                let lo = b * kb;
                if lo >= visible {
                    break;
                }
                let bytes = &self.k.packed[kv][b * kc.block_bytes()..(b + 1) * kc.block_bytes()];
                kc.key_scores(qv, &prep, bytes, lo, &self.rope, &mut buf);
                let hi = (lo + kb).min(visible);
                s[lo..hi].copy_from_slice(&buf[..hi - lo]);
            }
            for (t, st) in s.iter_mut().enumerate() {
                if let Some(k) = self.k.f16_token(kv, t) {
                    let mut k = k.to_vec();
                    if kc.pre_rope() {
                        self.rope.rotate(&mut k, t, 1.0);
                    }
                    *st = dot(qv, &k);
                }
            }
            s.iter_mut().for_each(|x| *x *= scale);
            softmax(&mut s);
            let o = &mut out[h * d..(h + 1) * d];
            o.iter_mut().for_each(|x| *x = 0.0);
            let mut p = vec![0f32; vb];
            for b in 0..self.v.sealed / vb {
                let lo = b * vb;
                if lo >= visible {
                    break;
                }
                let hi = (lo + vb).min(visible);
                p.iter_mut().for_each(|x| *x = 0.0);
                p[..hi - lo].copy_from_slice(&s[lo..hi]);
                // Sink tokens are summed from their f16 copy below, not from the block.
                p[..self.v.sink_len().saturating_sub(lo).min(hi - lo)]
                    .iter_mut()
                    .for_each(|x| *x = 0.0);
                let bytes = &self.v.packed[kv][b * vc.block_bytes()..(b + 1) * vc.block_bytes()];
                vc.accumulate_values(bytes, &p, o);
            }
            for (t, &st) in s.iter().enumerate() {
                if let Some(v) = self.v.f16_token(kv, t) {
                    axpy(st, v, o);
                }
            }
        }
        Ok(())
    }

    /// The decoded, rotated keys or values of head `h` (tests and `kvq inspect` compare them).
    pub fn decoded(&self, stream: Stream, h: usize) -> &[f32] {
        match stream {
            Stream::Key => &self.k.mirror[h],
            Stream::Value => &self.v.mirror[h],
        }
    }
}

/// In-place numerically stable softmax.
pub fn softmax(s: &mut [f32]) {
    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}
