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
//! Block layout (one head, T = 32 tokens), little-endian bits:
//! ```text
//! [gain f16; T (streams fitted with a per-token gain only)]
//! [token 0: for each component c with b_c > 0, in order, its b_c-bit level index | token 1 | ...]
//! ```
//! codes padded to whole 4-byte words. Bits/elem: round(bits x d) / d, the 16-bit gain included (d = 64,
//! bits=3: 192 bits a token, 176 of them codes when the stream has a gain).
//! Fixed bytes per layer stream: heads x (2 d^2 + d + levels) f32 (transforms, means, level tables).

use crate::bits;
use crate::codec::{Codec, Format, FormatRef, Stream, StreamCtx};
use crate::config::Params;
use crate::error::{parse_err, FormatError, Result};
use crate::transform::{allocate, levels_len, levels_off, token_gain, KltBooks};
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
    books: Arc<KltBooks>,
}

/// Parses `klt:bits=3,file=FILE,window=0,sink=0`.
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
    p.finish(&["bits", "window", "sink", "file"])?;
    let books = KltBooks::load(&path)?;
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
        books: Arc::new(books),
    }))
}

impl Format for Klt {
    fn canonical(&self) -> String {
        format!(
            "klt:bits={},window={},{}file={}",
            self.bits,
            self.window,
            if self.sink > 0 {
                format!("sink={},", self.sink)
            } else {
                String::new()
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
        let lv = levels_len(bmax);
        let heads = heads
            .iter()
            .map(|h| {
                // Every head spends min(total, d x bmax) bits: the same block size for all of them.
                let widths = allocate(&h.dist, d, bmax, total);
                let total = widths.iter().map(|&b| b as usize).sum();
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
                KltHeadCodec {
                    d,
                    total,
                    scaled,
                    key,
                    pre_rope: key && self.books.key_pre_rope,
                    window: self.window,
                    sink: self.sink,
                    widths,
                    mean: h.mean.clone(),
                    fwd: h.fwd.clone(),
                    inv: h.inv.clone(),
                    levels,
                    cuts,
                }
            })
            .collect();
        Ok(Box::new(KltCodec { heads }))
    }
}

/// One KV head's codec: its transform, widths and level tables.
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
    widths: Vec<u8>,
    mean: Vec<f32>,
    fwd: Vec<f32>,
    inv: Vec<f32>,
    levels: Vec<Vec<f32>>,
    cuts: Vec<Vec<f32>>,
}

impl KltHeadCodec {
    /// Bytes of the per-token gains ahead of the codes (0 unscaled).
    fn codes_off(&self) -> usize {
        if self.scaled {
            2 * BLOCK
        } else {
            0
        }
    }
}

impl Codec for KltHeadCodec {
    fn describe(&self) -> String {
        let w = |b: u8| self.widths.iter().filter(|&&x| x == b).count();
        let hist: Vec<String> = (0..=self.widths.iter().copied().max().unwrap_or(0))
            .rev()
            .filter(|&b| w(b) > 0)
            .map(|b| format!("{}x{b}", w(b)))
            .collect();
        format!(
            "klt-{}:bits={}/{}({}){}",
            if self.key { "k" } else { "v" },
            self.total + 16 * self.scaled as usize,
            self.d,
            hist.join(" "),
            if self.scaled { ",gain" } else { "" }
        )
    }
    fn block_tokens(&self) -> usize {
        BLOCK
    }
    fn block_bytes(&self) -> usize {
        self.codes_off() + (BLOCK * self.total).div_ceil(32) * 4
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
        4 * (2 * self.d * self.d + self.d + self.levels.iter().map(Vec::len).sum::<usize>())
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        out.iter_mut().for_each(|b| *b = 0);
        let d = self.d;
        let (mut xc, mut z) = (vec![0f32; d], vec![0f32; d]);
        let off = self.codes_off();
        let mut pos = 8 * off;
        for (t, row) in x.chunks_exact(d).take(BLOCK).enumerate() {
            for ((c, &v), &m) in xc.iter_mut().zip(row).zip(&self.mean) {
                *c = v - m;
            }
            for (c, zc) in z.iter_mut().enumerate() {
                // Unscaled codecs need only the components that get bits.
                if self.scaled || self.widths[c] > 0 {
                    *zc = crate::codec::dot(&self.fwd[c * d..(c + 1) * d], &xc);
                }
            }
            let g = if self.scaled {
                let g = token_gain(&z);
                bits::put_f16(out, 2 * t, g);
                g
            } else {
                1.0
            };
            for (c, &b) in self.widths.iter().enumerate() {
                if b == 0 {
                    continue;
                }
                let idx = self.cuts[c].partition_point(|&t| t < z[c] / g);
                bits::put_at(out, pos, idx as u32, b as u32);
                pos += b as usize;
            }
        }
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        // Every b-bit index names one of the 2^b levels: only the length and the gains can be wrong.
        crate::formats::check_len("klt", block, self.block_bytes())?;
        if self.scaled {
            crate::formats::check_finite_f16("klt", block, 0, BLOCK, "gain")?;
        }
        Ok(())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.validate(block)?;
        let d = self.d;
        let mut pos = 8 * self.codes_off();
        for (t, o) in out.chunks_exact_mut(d).take(BLOCK).enumerate() {
            o.copy_from_slice(&self.mean);
            let g = if self.scaled {
                bits::f16_at(block, 2 * t)
            } else {
                1.0
            };
            for (c, &b) in self.widths.iter().enumerate() {
                if b == 0 {
                    continue;
                }
                let z = g * self.levels[c][bits::get_at(block, pos, b as u32) as usize];
                pos += b as usize;
                for (j, oj) in o.iter_mut().enumerate() {
                    *oj += self.inv[j * d + c] * z;
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
