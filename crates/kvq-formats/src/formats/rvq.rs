//! RVQ (Kumar, "Residual vector quantization for KV cache compression in large language model",
//! arXiv 2410.15704). Per token and KV head the vector is divided by its std over head_dim (0 -> 1),
//! split into groups of `group` channels (keys: strided groups defined on HF rotate-half channels, so
//! group j = HF channels j, j+G, j+2G, ... with G = d/group, mapped to this model's channel order;
//! values: contiguous), and each group is encoded by a residual quantizer of `depth` stages of `codes`
//! codewords, shared by every group and head of the layer's K (another for V). Keys are quantized
//! before RoPE (the cache rotates decoded keys). Codebooks are learned by `kvq calibrate`
//! ([`crate::calibrate`]); a file with more stages than `depth` serves any smaller depth. With
//! `books=group` each group position (of d/group) has its own codebooks, shared by the heads (a product
//! quantizer's per-subspace books; `kvq calibrate --books group`); same bits, CPU only.
//!
//! Block layout (one head, T = 32 tokens), little-endian:
//! ```text
//! [std f16; T] [codes: token 0 (d/group groups x depth stages x ceil(log2 codes) bits) | ... ]
//! ```
//! Bits/elem: (16 + (d/group) * depth * ceil(log2 codes)) / d: d=64, 8 x 11-bit: 3.0; d=128: 2.875.
//! Fixed bytes: depth x codes x group f32 per layer stream (1 MiB at 8 x 2048 x 32 as f16 on the GPU).

use crate::bits;
use crate::calibrate::{nearest, table_name, Codebooks};
use crate::codec::{rope_header, Codec, Format, FormatRef, KernelSpec, Stream, StreamCtx};
use crate::config::Params;
use crate::error::{parse_err, FormatError, Result};
use crate::rope::Rope;
use std::sync::Arc;

const BLOCK: usize = 32;

/// A parsed RVQ config with its codebooks loaded.
#[derive(Debug, Clone)]
pub struct Rvq {
    /// Channels per group.
    pub group: usize,
    /// Codewords per stage.
    pub codes: usize,
    /// Stages used.
    pub depth: usize,
    /// Key grouping: strided (paper) or contiguous.
    pub strided: bool,
    /// f16 recent tokens.
    pub window: usize,
    /// One codebook set per group position (`books=group`) instead of one per layer stream.
    pub per_group: bool,
    /// Codebook file path.
    pub path: String,
    books: Arc<Codebooks>,
}

/// Parses `rvq:group=32,codes=2048,depth=8,codebooks=FILE,groups=strided,window=0,books=shared`.
pub fn parse(mut p: Params) -> Result<FormatRef> {
    let group = p.choice("group", 32, &[8, 16, 32, 64])?;
    let codes = p.usize("codes", 2048, 2, 1 << 16)?;
    let depth = p.usize("depth", 8, 1, 32)?;
    let strided = p.word("groups", "strided", &["strided", "contiguous"])? == "strided";
    let window = p.usize("window", 0, 0, 1 << 20)?;
    let per_group = p.word("books", "shared", &["shared", "group"])? == "group";
    let path = p.string("codebooks").ok_or_else(|| {
        parse_err(
            p.input(),
            "rvq needs codebooks=FILE; learn them with `kvq calibrate`",
        )
    })?;
    p.finish(&[
        "group",
        "codes",
        "depth",
        "groups",
        "window",
        "books",
        "codebooks",
    ])?;
    let books = Codebooks::load(&path)?;
    if books.group != group || books.codes != codes || books.depth < depth {
        return Err(FormatError::File {
            path,
            reason: format!(
                "codebooks are group={} codes={} depth={}, the config asks group={group} codes={codes} depth={depth}",
                books.group, books.codes, books.depth
            ),
        });
    }
    if per_group != (books.sets > 1) {
        return Err(FormatError::File {
            path,
            reason: format!(
                "codebooks have {} set(s) per layer stream, the config asks books={}",
                books.sets,
                if per_group { "group" } else { "shared" }
            ),
        });
    }
    Ok(Arc::new(Rvq {
        group,
        codes,
        depth,
        strided,
        window,
        per_group,
        path,
        books: Arc::new(books),
    }))
}

impl Format for Rvq {
    fn canonical(&self) -> String {
        format!(
            "rvq:group={},codes={},depth={},groups={},window={},{}codebooks={}",
            self.group,
            self.codes,
            self.depth,
            if self.strided {
                "strided"
            } else {
                "contiguous"
            },
            self.window,
            if self.per_group { "books=group," } else { "" },
            self.path
        )
    }

    fn supports(&self, head_dim: usize) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(self.group) {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!(
                    "head_dim {head_dim} (needs a multiple of group={})",
                    self.group
                ),
            });
        }
        if self.per_group && self.books.sets != head_dim / self.group {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!(
                    "head_dim {head_dim}: the codebooks have {} group sets, head_dim / group = {}",
                    self.books.sets,
                    head_dim / self.group
                ),
            });
        }
        Ok(())
    }

    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        self.supports(ctx.head_dim)?;
        let key = ctx.stream == Stream::Key;
        let name = table_name(ctx.layer, key);
        let t = self
            .books
            .tables
            .get(&name)
            .ok_or_else(|| FormatError::File {
                path: self.path.clone(),
                reason: format!(
                    "no tensor '{name}' (codebooks for layer {} missing)",
                    ctx.layer
                ),
            })?;
        let per_stage = self.codes * self.group;
        // The file's sets are [sets][file depth][codes][group]; keep the first `depth` stages of each.
        let stored = self.books.depth * per_stage;
        let books = t
            .chunks_exact(stored)
            .flat_map(|set| &set[..self.depth * per_stage])
            .copied()
            .collect();
        Ok(Box::new(RvqCodec {
            d: ctx.head_dim,
            group: self.group,
            codes: self.codes,
            depth: self.depth,
            cbits: usize::BITS - (self.codes - 1).leading_zeros(),
            window: self.window,
            key,
            strided: self.strided,
            rope: ctx.rope.clone(),
            channels: channel_groups(ctx, self.group, key && self.strided),
            per_group: self.per_group,
            books,
        }))
    }
}

/// Channel order of the groups: `channels[g*group + j]` is the j-th channel of group g.
pub fn channel_groups(ctx: &StreamCtx, group: usize, strided: bool) -> Vec<usize> {
    let d = ctx.head_dim;
    let ng = d / group;
    (0..d)
        .map(|i| {
            let (g, j) = (i / group, i % group);
            if strided {
                ctx.rope.hf_channel(g + j * ng)
            } else {
                i
            }
        })
        .collect()
}

/// Normalized group vectors of `x` (n tokens x d): what the quantizer sees, for encode and calibration.
pub fn group_vectors(
    x: &[f32],
    d: usize,
    channels: &[usize],
    out_scale: &mut Vec<f32>,
) -> Vec<f32> {
    let n = x.len() / d;
    let mut v = Vec::with_capacity(x.len());
    out_scale.clear();
    for t in 0..n {
        let row = &x[t * d..(t + 1) * d];
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / d as f32;
        let s = half::f16::from_f32(var.sqrt().min(65504.0)).to_f32();
        let s = if s > 0.0 { s } else { 1.0 };
        out_scale.push(s);
        v.extend(channels.iter().map(|&c| row[c] / s));
    }
    v
}

struct RvqCodec {
    d: usize,
    group: usize,
    codes: usize,
    depth: usize,
    cbits: u32,
    window: usize,
    key: bool,
    strided: bool,
    rope: Rope,
    channels: Vec<usize>,
    per_group: bool,
    /// [sets][depth][codes][group]: one set, or one per group position with `per_group`.
    books: Vec<f32>,
}

impl RvqCodec {
    fn token_bits(&self) -> usize {
        (self.d / self.group) * self.depth * self.cbits as usize
    }
    fn codes_off(&self) -> usize {
        (2 * BLOCK).div_ceil(4) * 4
    }
    /// Offset in `books` of the codebooks of group position `gi`.
    fn set_off(&self, gi: usize) -> usize {
        if self.per_group {
            gi * self.depth * self.codes * self.group
        } else {
            0
        }
    }
}

impl Codec for RvqCodec {
    fn describe(&self) -> String {
        format!(
            "rvq-{}:group={},codes={},depth={}{}",
            if self.key { "k" } else { "v" },
            self.group,
            self.codes,
            self.depth,
            if self.per_group { ",books=group" } else { "" }
        )
    }
    fn block_tokens(&self) -> usize {
        BLOCK
    }
    fn block_bytes(&self) -> usize {
        (self.codes_off() + (BLOCK * self.token_bits()).div_ceil(8)).div_ceil(4) * 4
    }
    fn window(&self) -> usize {
        self.window
    }
    fn pre_rope(&self) -> bool {
        self.key
    }
    fn fixed_bytes(&self) -> usize {
        self.books.len() * 2
    }
    /// kernels/formats/rvq.cu: groups of 32, at most 16 stages, keys in strided groups (a rotary pair
    /// then sits in one group, 16 positions apart, so the kernel rotates each group on its own), one
    /// codebook set per layer stream (`books=group` is CPU only).
    fn kernel(&self) -> Option<KernelSpec> {
        let ok = self.group == 32
            && !self.per_group
            && self.depth <= 16
            && matches!(self.d, 64 | 128)
            && (self.strided || !self.key);
        ok.then_some(KernelSpec {
            module: "rvq",
            ints: [self.depth as i32, self.cbits as i32, self.codes as i32, 0],
            tag: "",
            tile: (0, 0, 0),
            pre_rope: self.key,
            smem_table: self.depth * self.codes * 32 * 2,
            query_sketch: 0,
        })
    }
    /// `[rope header][i32 channel of each group position; d][f32 books][f16 books]`, the layout
    /// kernels/formats/rvq.cu reads (the encoder searches the f32 books, attention sums the f16 ones).
    fn kernel_table(&self) -> Option<Vec<u8>> {
        if self.per_group {
            return None;
        }
        let mut b = rope_header(&self.rope);
        for &c in &self.channels {
            b.extend_from_slice(&(c as i32).to_le_bytes());
        }
        for v in &self.books {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in &self.books {
            b.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
        }
        Some(b)
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        out.iter_mut().for_each(|b| *b = 0);
        let (g, cs) = (self.group, self.codes * self.group);
        let mut scales = Vec::new();
        let v = group_vectors(x, self.d, &self.channels, &mut scales);
        let mut codes = Vec::with_capacity(BLOCK * self.token_bits() / self.cbits as usize);
        for (t, s) in scales.iter().enumerate() {
            bits::put_f16(out, 2 * t, *s);
        }
        let ng = self.d / g;
        for (i, gv) in v.chunks_exact(g).enumerate() {
            let mut r = gv.to_vec();
            let set = self.set_off(i % ng);
            for st in 0..self.depth {
                let cb = &self.books[set + st * cs..set + (st + 1) * cs];
                let k = nearest(cb, &r);
                for j in 0..g {
                    r[j] -= cb[k * g + j];
                }
                codes.push(k as u32);
            }
        }
        let off = self.codes_off();
        bits::pack(&codes, self.cbits, &mut out[off..]);
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        crate::formats::check_len("rvq", block, self.block_bytes())?;
        crate::formats::check_finite_f16("rvq", block, 0, BLOCK, "scale")?;
        let n = BLOCK * self.token_bits() / self.cbits as usize;
        if let Some(i) = (0..n)
            .find(|&i| bits::get(&block[self.codes_off()..], self.cbits, i) as usize >= self.codes)
        {
            return Err(FormatError::Corrupt {
                format: "rvq".into(),
                reason: format!("code {i} out of range"),
            });
        }
        Ok(())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.validate(block)?;
        let (g, d, cs) = (self.group, self.d, self.codes * self.group);
        let per_tok = d / g * self.depth;
        let codes = &block[self.codes_off()..];
        for t in 0..BLOCK {
            let s = bits::f16_at(block, 2 * t);
            for gi in 0..d / g {
                let mut acc = vec![0f32; g];
                let set = self.set_off(gi);
                for st in 0..self.depth {
                    let k =
                        bits::get(codes, self.cbits, t * per_tok + gi * self.depth + st) as usize;
                    let at = set + st * cs + k * g;
                    crate::codec::axpy(1.0, &self.books[at..at + g], &mut acc);
                }
                for j in 0..g {
                    out[t * d + self.channels[gi * g + j]] = acc[j] * s;
                }
            }
        }
        Ok(())
    }
}
