//! KLT: transform coding of K/V (Karhunen-Loeve transform with reverse water-filling, the classic
//! optimum for Gaussian sources; Huang & Schultheiss 1963). Per layer, stream and KV head a calibrated
//! transform z = F (x - mean) decorrelates the vector in the space whose squared error attention
//! pays (keys: the queries' second moment, rotated over relative positions for pre-RoPE keys; values:
//! the output projection's W_o W_o^T; [`crate::transform`]), and each component z_c is coded by its
//! own b_c-bit Lloyd-Max scalar quantizer, b_c chosen greedily from the calibrated distortions so that
//! the b_c sum to `bits` x d. Components nobody reads get 0 bits. No per-token or per-group metadata:
//! the bit rate is exactly `bits` (up to rounding to whole bits per token). Keys are stored before
//! RoPE when the file was fitted so (`kvq calibrate --method klt --key-rope pre`, the default).
//! Related work: SVDq (2025) and Palu (2024) code K/V in low-rank bases with mixed precision.
//!
//! With `code=ec` the components are instead read on one uniform grid and entropy-coded
//! ([`crate::ecsq`]): same block size, the finest grid step whose code fits, about 4x less key error
//! than the fixed codes at 2.67 bits on the default model (docs/QUALITY.md, "Entropy-coded KLT").
//! CPU only: a block is decoded sequentially, so no GPU kernel reads it yet.
//!
//! With `code=tcq` the fixed codes' widths stay, but each component's bits along the block's tokens
//! are one trellis code ([`crate::tcq`]): Viterbi-chosen, read back per token from the last k + H
//! bits of the component's stream by one table lookup (fixed length, random access: a kernel can).
//!
//! Block layout (one head, T = 32 tokens), little-endian bits:
//! ```text
//! [gain f16; T (streams fitted with a per-token gain only)]
//! code=fixed: [token 0: for each component c with b_c > 0, in order, its b_c-bit level index | token 1 | ...]
//! code=ec:    [u8 grid step q | u8 mode | u16 words n | n ANS words (mode 0), or mode 1 (a block the
//!             entropy code cannot fit): fixed codes at one bit a token less]
//! code=tcq:   [component 0's stream: T x b_0 bits, token t's at t b_0 | component 1's | ...] (b_c > 0)
//! ```
//! codes padded to whole 4-byte words. Bits/elem: round(bits x d) / d, the 16-bit gain included (d = 64,
//! bits=3: 192 bits a token, 176 of them codes when the stream has a gain).
//! Fixed bytes per layer stream: heads x (2 d^2 + d + levels) f32 (transforms, means, level tables),
//! and with `code=ec` the d x 257 quantiles per head; with `code=tcq` the trellis tables (per width b,
//! 2^(b + 6) f32, shared by the layer stream's heads, fitted from the quantiles when built) and each
//! component's deviation.

use crate::bits;
use crate::codec::{Codec, Format, FormatRef, Stream, StreamCtx};
use crate::config::Params;
use crate::ecsq::Ecsq;
use crate::error::{parse_err, FormatError, Result};
use crate::tcq::Tcq;
use crate::transform::{allocate, levels_len, levels_off, token_gain, KltBooks, QUANT};
use std::sync::Arc;

const BLOCK: usize = 32;

/// Largest attention-sink count accepted.
const MAX_SINK: usize = 64;

/// A parsed KLT config with its calibration loaded.
#[derive(Debug, Clone)]
pub struct Klt {
    /// Bits per element (code bits per token / head_dim).
    pub bits: f64,
    /// f16 recent tokens.
    pub window: usize,
    /// First tokens also kept in f16 (attention sinks).
    pub sink: usize,
    /// Calibration file path.
    pub path: String,
    /// How the components are coded.
    pub code: KltCode,
    books: Arc<KltBooks>,
}

/// How a KLT stream codes its components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KltCode {
    /// Fixed-width Lloyd-Max codes (`code=fixed`).
    Fixed,
    /// One uniform grid, entropy-coded ([`crate::ecsq`], `code=ec`).
    Ec,
    /// Trellis codes at the fixed codes' widths ([`crate::tcq`], `code=tcq`).
    Tcq,
}

impl KltCode {
    /// The `code=` value that names it.
    fn name(self) -> &'static str {
        match self {
            KltCode::Fixed => "fixed",
            KltCode::Ec => "ec",
            KltCode::Tcq => "tcq",
        }
    }
}

/// Parses `klt:bits=3,file=FILE,window=0,sink=0,code=fixed|ec|tcq`.
pub fn parse(mut p: Params) -> Result<FormatRef> {
    let raw = p.string("bits").unwrap_or_else(|| "3".into());
    let bits: f64 = raw
        .parse()
        .ok()
        .filter(|b: &f64| b.is_finite() && *b > 0.0)
        .ok_or_else(|| {
            parse_err(
                p.input(),
                format!("bits={raw}: expected a number > 0 (bits per element)"),
            )
        })?;
    let window = p.usize("window", 0, 0, 1 << 20)?;
    let sink = p.usize("sink", 0, 0, MAX_SINK)?;
    let path = p.string("file").ok_or_else(|| {
        parse_err(
            p.input(),
            "klt needs file=FILE; fit one with `kvq calibrate --method klt`",
        )
    })?;
    let code = match p.string("code").as_deref() {
        None | Some("fixed") => KltCode::Fixed,
        Some("ec") => KltCode::Ec,
        Some("tcq") => KltCode::Tcq,
        Some(v) => {
            return Err(parse_err(
                p.input(),
                format!(
                    "code={v}: expected fixed (Lloyd-Max codes), ec (entropy-coded) or tcq \
                     (trellis-coded)"
                ),
            ))
        }
    };
    p.finish(&["bits", "window", "sink", "file", "code"])?;
    let books = KltBooks::load(&path)?;
    if code != KltCode::Fixed && books.layers.values().flatten().any(|h| h.quant.is_empty()) {
        return Err(FormatError::File {
            path,
            reason: format!(
                "code={} needs the components' quantiles, which this calibration file lacks; \
                 refit it with `kvq calibrate --method klt`",
                code.name()
            ),
        });
    }
    if bits > books.bmax as f64 {
        return Err(FormatError::File {
            path,
            reason: format!(
                "levels fitted up to {} bits per component, the config asks bits={bits}",
                books.bmax
            ),
        });
    }
    Ok(Arc::new(Klt {
        bits,
        window,
        sink,
        path,
        code,
        books: Arc::new(books),
    }))
}

impl Format for Klt {
    fn canonical(&self) -> String {
        format!(
            "klt:bits={},window={},{}{}file={}",
            self.bits,
            self.window,
            if self.sink > 0 {
                format!("sink={},", self.sink)
            } else {
                String::new()
            },
            match self.code {
                KltCode::Fixed => String::new(),
                code => format!("code={},", code.name()),
            },
            self.path
        )
    }

    fn supports(&self, head_dim: usize) -> Result<()> {
        if head_dim != self.books.head_dim {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!(
                    "head_dim {head_dim} (the calibration file is for head_dim {})",
                    self.books.head_dim
                ),
            });
        }
        Ok(())
    }

    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        self.supports(ctx.head_dim)?;
        let key = ctx.stream == Stream::Key;
        let heads = self
            .books
            .layers
            .get(&(ctx.layer, key))
            .ok_or_else(|| FormatError::File {
                path: self.path.clone(),
                reason: format!(
                    "no {} transforms for layer {}",
                    if key { "key" } else { "value" },
                    ctx.layer
                ),
            })?;
        if heads.len() != ctx.n_kv_heads {
            return Err(FormatError::File {
                path: self.path.clone(),
                reason: format!(
                    "{} KV heads fitted, the model has {}",
                    heads.len(),
                    ctx.n_kv_heads
                ),
            });
        }
        let d = ctx.head_dim;
        let bmax = self.books.bmax;
        let scaled = self.books.scaled[!key as usize];
        // The per-token f16 gain is paid from the same budget: bits/elem counts it.
        let total = ((self.bits * d as f64).round() as usize).saturating_sub(16 * scaled as usize);
        if total == 0 {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!(
                    "bits={} x head_dim {d} leaves no code bits after the 16-bit per-token gain",
                    self.bits
                ),
            });
        }
        // Every head spends min(total, d x bmax) bits: the same block size for all of them.
        let codes: Vec<LmCode> = heads
            .iter()
            .map(|h| LmCode::new(h, d, bmax, total))
            .collect();
        let tcq: Vec<Option<Tcq>> = match self.code {
            KltCode::Tcq => {
                let widths: Vec<Vec<u8>> = codes.iter().map(|c| c.widths.clone()).collect();
                let quant: Vec<&[f32]> = heads.iter().map(|h| h.quant.as_slice()).collect();
                Tcq::layer(&widths, &quant, d)
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            _ => vec![None; heads.len()],
        };
        let heads = heads
            .iter()
            .zip(codes)
            .zip(tcq)
            .map(|((h, code), tcq)| {
                let total = code.bits();
                // Entropy coding keeps the block size; a block whose code does not fit (values far
                // outside the calibration) falls back to fixed codes one bit a token narrower, which
                // leaves room for the block header.
                let ec = (self.code == KltCode::Ec).then(|| {
                    let sigma = (0..d)
                        .map(|c| h.dist[c * (bmax + 1)] as f64)
                        .sum::<f64>()
                        .max(0.0)
                        / d as f64;
                    let fallback = LmCode::new(h, d, bmax, total.saturating_sub(1));
                    (Ecsq::new(d, h.quant.clone(), sigma.sqrt()), fallback)
                });
                KltHeadCodec {
                    d,
                    total,
                    scaled,
                    key,
                    pre_rope: key && self.books.key_pre_rope,
                    window: self.window,
                    sink: self.sink,
                    code,
                    ec,
                    tcq,
                    mean: h.mean.clone(),
                    fwd: h.fwd.clone(),
                    inv: h.inv.clone(),
                }
            })
            .collect();
        Ok(Box::new(KltCodec { heads }))
    }
}

/// Fixed-width codes: each component's Lloyd-Max levels at its allocated width.
struct LmCode {
    widths: Vec<u8>,
    levels: Vec<Vec<f32>>,
    cuts: Vec<Vec<f32>>,
}

impl LmCode {
    /// The allocation of `total` bits a token over one head's components, with their tables.
    fn new(h: &crate::transform::KltHead, d: usize, bmax: usize, total: usize) -> Self {
        let lv = levels_len(bmax);
        let widths = allocate(&h.dist, d, bmax, total);
        let levels: Vec<Vec<f32>> = widths
            .iter()
            .enumerate()
            .map(|(c, &b)| {
                if b == 0 {
                    return Vec::new();
                }
                let at = c * lv + levels_off(b as usize);
                h.levels[at..at + (1usize << b)].to_vec()
            })
            .collect();
        let cuts = levels
            .iter()
            .map(|l| l.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect())
            .collect();
        Self {
            widths,
            levels,
            cuts,
        }
    }

    /// Code bits a token.
    fn bits(&self) -> usize {
        self.widths.iter().map(|&b| b as usize).sum()
    }

    /// Writes one token's components `z` (already divided by its gain) at bit `pos`; returns the end.
    fn put(&self, z: &[f32], out: &mut [u8], mut pos: usize) -> usize {
        for (c, &b) in self.widths.iter().enumerate() {
            if b == 0 {
                continue;
            }
            let idx = self.cuts[c].partition_point(|&t| t < z[c]);
            bits::put_at(out, pos, idx as u32, b as u32);
            pos += b as usize;
        }
        pos
    }

    /// Reads one token's components into `z` (0 where no bits) from bit `pos`; returns the end.
    fn get(&self, block: &[u8], z: &mut [f32], mut pos: usize) -> usize {
        for (c, &b) in self.widths.iter().enumerate() {
            z[c] = if b == 0 {
                0.0
            } else {
                let v = self.levels[c][bits::get_at(block, pos, b as u32) as usize];
                pos += b as usize;
                v
            };
        }
        pos
    }
}

/// One KV head's codec: its transform and codes.
struct KltHeadCodec {
    d: usize,
    /// Code bits per token (the gain not included).
    total: usize,
    /// A per-token f16 gain leads the block.
    scaled: bool,
    key: bool,
    pre_rope: bool,
    window: usize,
    sink: usize,
    code: LmCode,
    /// `code=ec`: the entropy coder and the fixed codes of blocks it cannot fit.
    ec: Option<(Ecsq, LmCode)>,
    /// `code=tcq`: the trellis codes (at `code`'s widths).
    tcq: Option<Tcq>,
    mean: Vec<f32>,
    fwd: Vec<f32>,
    inv: Vec<f32>,
}

/// Entropy-coded block header (one word after the gains): grid step, mode, words of code.
const EC_CODED: u32 = 0;
const EC_FIXED: u32 = 1;

impl KltHeadCodec {
    /// Bytes of the per-token gains ahead of the codes (0 unscaled).
    fn codes_off(&self) -> usize {
        if self.scaled {
            2 * BLOCK
        } else {
            0
        }
    }

    /// What every block must pass before its codes are read: its length, and finite gains.
    fn check_block(&self, block: &[u8]) -> Result<()> {
        crate::formats::check_len("klt", block, self.block_bytes())?;
        if self.scaled {
            crate::formats::check_finite_f16("klt", block, 0, BLOCK, "gain")?;
        }
        Ok(())
    }

    /// 32-bit words of codes a block holds.
    fn code_words(&self) -> usize {
        (BLOCK * self.total).div_ceil(32)
    }

    /// Every token's components ([BLOCK][d], divided by the token's gain) and the gains.
    fn components(&self, x: &[f32], all: bool) -> (Vec<f32>, Vec<f32>) {
        let d = self.d;
        let mut z = vec![0f32; BLOCK * d];
        let mut gains = vec![1f32; BLOCK];
        let mut xc = vec![0f32; d];
        for ((row, zt), g) in x.chunks_exact(d).zip(z.chunks_exact_mut(d)).zip(&mut gains) {
            for ((c, &v), &m) in xc.iter_mut().zip(row).zip(&self.mean) {
                *c = v - m;
            }
            for (c, zc) in zt.iter_mut().enumerate() {
                // Fixed codes of unscaled streams need only the components that get bits.
                if all || self.scaled || self.code.widths[c] > 0 {
                    *zc = crate::codec::dot(&self.fwd[c * d..(c + 1) * d], &xc);
                }
            }
            if self.scaled {
                *g = token_gain(zt);
                zt.iter_mut().for_each(|v| *v /= *g);
            }
        }
        (z, gains)
    }

    /// Reads a block's components ([BLOCK][d], not yet times the gains).
    fn read_components(&self, block: &[u8]) -> Result<Vec<f32>> {
        let d = self.d;
        let mut z = vec![0f32; BLOCK * d];
        let off = self.codes_off();
        let fixed = |code: &LmCode, z: &mut [f32], start: usize| {
            let mut pos = start;
            for zt in z.chunks_exact_mut(d) {
                pos = code.get(block, zt, pos);
            }
        };
        if let Some(tcq) = &self.tcq {
            tcq.get(block, &mut z, 8 * off);
            return Ok(z);
        }
        match &self.ec {
            None => fixed(&self.code, &mut z, 8 * off),
            Some((ecsq, fallback)) => {
                let head = u32::from_le_bytes(block[off..off + 4].try_into().expect("4 bytes"));
                let (q, mode, n) = (
                    (head & 0xff) as u8,
                    (head >> 8) & 0xff,
                    (head >> 16) as usize,
                );
                let bad = |reason: String| FormatError::Corrupt {
                    format: "klt".into(),
                    reason,
                };
                match mode {
                    EC_CODED if n < self.code_words() => {
                        let words: Vec<u32> = block[off + 4..off + 4 + 4 * n]
                            .chunks_exact(4)
                            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
                            .collect();
                        ecsq.decode(q, &words, &mut z)?;
                    }
                    EC_CODED => {
                        return Err(bad(format!(
                            "{n} code words in a block of {}",
                            self.code_words() - 1
                        )))
                    }
                    EC_FIXED => fixed(fallback, &mut z, 8 * (off + 4)),
                    m => return Err(bad(format!("block mode {m}: expected 0 or 1"))),
                }
            }
        }
        Ok(z)
    }
}

impl Codec for KltHeadCodec {
    fn describe(&self) -> String {
        let widths = &self.code.widths;
        let w = |b: u8| widths.iter().filter(|&&x| x == b).count();
        let hist: Vec<String> = (0..=widths.iter().copied().max().unwrap_or(0))
            .rev()
            .filter(|&b| w(b) > 0)
            .map(|b| format!("{}x{b}", w(b)))
            .collect();
        let code = if self.ec.is_some() {
            "entropy-coded".to_string()
        } else if self.tcq.is_some() {
            format!("trellis({})", hist.join(" "))
        } else {
            format!("({})", hist.join(" "))
        };
        format!(
            "klt-{}:bits={}/{}{code}{}",
            if self.key { "k" } else { "v" },
            self.total + 16 * self.scaled as usize,
            self.d,
            if self.scaled { ",gain" } else { "" }
        )
    }
    fn block_tokens(&self) -> usize {
        BLOCK
    }
    fn block_bytes(&self) -> usize {
        self.codes_off() + self.code_words() * 4
    }
    fn window(&self) -> usize {
        self.window
    }
    fn sink(&self) -> usize {
        self.sink
    }
    fn pre_rope(&self) -> bool {
        self.pre_rope
    }
    fn fixed_bytes(&self) -> usize {
        let quant = self.ec.as_ref().map_or(0, |_| self.d * (QUANT + 1))
            + self.tcq.as_ref().map_or(0, Tcq::table_len);
        let levels: usize = self.code.levels.iter().map(Vec::len).sum();
        4 * (2 * self.d * self.d + self.d + levels + quant)
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        out.iter_mut().for_each(|b| *b = 0);
        let d = self.d;
        let off = self.codes_off();
        let (z, gains) = self.components(x, self.ec.is_some());
        if self.scaled {
            for (t, &g) in gains.iter().enumerate() {
                bits::put_f16(out, 2 * t, g);
            }
        }
        let fixed = |code: &LmCode, out: &mut [u8], start: usize| {
            let mut pos = start;
            for zt in z.chunks_exact(d) {
                pos = code.put(zt, out, pos);
            }
        };
        if let Some(tcq) = &self.tcq {
            tcq.put(&z, out, 8 * off);
            return;
        }
        match &self.ec {
            None => fixed(&self.code, out, 8 * off),
            Some((ecsq, fallback)) => {
                let head = match ecsq.encode(&z, self.code_words() - 1) {
                    Some((q, words)) => {
                        for (o, w) in out[off + 4..].chunks_exact_mut(4).zip(&words) {
                            o.copy_from_slice(&w.to_le_bytes());
                        }
                        q as u32 | EC_CODED << 8 | (words.len() as u32) << 16
                    }
                    None => {
                        fixed(fallback, out, 8 * (off + 4));
                        EC_FIXED << 8
                    }
                };
                out[off..off + 4].copy_from_slice(&head.to_le_bytes());
            }
        }
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        self.check_block(block)?;
        // Fixed codes: every b-bit index names one of the 2^b levels. Entropy-coded blocks are
        // checked by reading them.
        if self.ec.is_some() {
            self.read_components(block)?;
        }
        Ok(())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        // Not `validate`: it would read an entropy-coded block once more.
        self.check_block(block)?;
        let d = self.d;
        let z = self.read_components(block)?;
        for (t, (o, zt)) in out.chunks_exact_mut(d).zip(z.chunks_exact(d)).enumerate() {
            o.copy_from_slice(&self.mean);
            let g = if self.scaled {
                bits::f16_at(block, 2 * t)
            } else {
                1.0
            };
            for (c, &zc) in zt.iter().enumerate() {
                if zc == 0.0 {
                    continue;
                }
                let v = g * zc;
                for (j, oj) in o.iter_mut().enumerate() {
                    *oj += self.inv[j * d + c] * v;
                }
            }
        }
        Ok(())
    }
}

/// A layer stream's codec: one [`KltHeadCodec`] per KV head (each head has its own transform).
struct KltCodec {
    heads: Vec<KltHeadCodec>,
}

impl KltCodec {
    /// Head 0 answers the questions every head answers alike (sizes, window, rope).
    fn first(&self) -> &KltHeadCodec {
        &self.heads[0]
    }
}

impl Codec for KltCodec {
    /// Head 0's widths stand for the stream (every head spends the same bits, spread its own way).
    fn describe(&self) -> String {
        self.first().describe()
    }
    fn head_codec(&self, h: usize) -> Option<&dyn Codec> {
        self.heads.get(h).map(|c| c as &dyn Codec)
    }
    fn block_tokens(&self) -> usize {
        BLOCK
    }
    fn block_bytes(&self) -> usize {
        self.first().block_bytes()
    }
    fn window(&self) -> usize {
        self.first().window
    }
    fn sink(&self) -> usize {
        self.first().sink
    }
    fn pre_rope(&self) -> bool {
        self.first().pre_rope
    }
    fn fixed_bytes(&self) -> usize {
        self.heads.iter().map(|h| h.fixed_bytes()).sum()
    }
    /// Head 0's transform: callers that hold blocks of other heads go through [`crate::codec::of_head`].
    fn encode(&self, x: &[f32], out: &mut [u8]) {
        self.first().encode(x, out)
    }
    fn validate(&self, block: &[u8]) -> Result<()> {
        self.first().validate(block)
    }
    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.first().decode(block, out)
    }
}
