//! The one interface every KV format implements.
//!
//! A [`Format`] is a parsed config (`kivi:bits=2`); for each layer and each of K and V it builds a
//! [`Codec`], which owns that stream's state (bit width for this layer, sketch, codebooks) and works on
//! whole packed blocks of one KV head. Paging, the full-precision window, online softmax and GQA live
//! once in [`crate::cache`]: a format never hands back dense K/V to attention.

use crate::error::Result;
use crate::rope::Rope;
use std::fmt;
use std::sync::Arc;

/// Which of the two cached tensors a codec stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Stream {
    /// Keys (scored against the query).
    Key,
    /// Values (summed with attention weights).
    Value,
}

/// Where a codec sits in the model: what a format may condition on when it is built.
#[derive(Debug, Clone)]
pub struct StreamCtx {
    /// Layer index, 0-based.
    pub layer: usize,
    /// Number of layers in the model (AsymKV/QJL scale their layer splits to it).
    pub n_layers: usize,
    /// Keys or values.
    pub stream: Stream,
    /// Channels per head.
    pub head_dim: usize,
    /// KV heads of the layer.
    pub n_kv_heads: usize,
    /// The model's rotary embedding (pre-RoPE formats rotate decoded keys with it).
    pub rope: Rope,
}

/// A parsed format config; cheap to clone behind an `Arc`, shared by every layer that uses it.
pub trait Format: Send + Sync + fmt::Debug {
    /// Canonical config string; `Params::parse` of it gives back the same format.
    fn canonical(&self) -> String;
    /// Checked before any allocation: can this format serve heads of this size?
    fn supports(&self, head_dim: usize) -> Result<()>;
    /// The same for one stream only (a format in a plan's `k=` slot never holds values, so it may
    /// accept what values could not).
    fn supports_stream(&self, head_dim: usize, stream: Stream) -> Result<()> {
        let _ = stream;
        self.supports(head_dim)
    }
    /// Builds the codec of one layer's keys or values.
    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>>;
}

/// Shared handle to a parsed format.
pub type FormatRef = Arc<dyn Format>;

/// Which CUDA kernel reads a codec's blocks: `kernels/formats/<module>.cu`, kernels named
/// `kvq_<module>_<op>_f16_hd<D>`, with up to four format integers (the key codec's go to
/// `KvqFmtArgs.i[0..4]`, the value codec's to `i[4..8]`); the page size is the kernel module's own (`kvq_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    /// Kernel module (and name prefix).
    pub module: &'static str,
    /// Format integers the kernel's policy reads.
    pub ints: [i32; 4],
    /// This codec's part of the decode kernel's variant name (`decode_{key tag}{value tag}`, e.g.
    /// `k2`, `v1`), so bit widths known at compile time get their own fast kernel; "" for none.
    pub tag: &'static str,
    /// For formats read in tiles smaller than a block (DecoQuant): (bytes staged once per tile, bytes
    /// per token, largest work unit the sequence is split in, tokens: the host may halve it down to
    /// one tile at short contexts); (0, 0, 0) when the kernel stages whole pages and splits in pages.
    pub tile: (usize, usize, usize),
    /// The kernel takes this stream's keys before RoPE and rotates them itself (pre-RoPE codecs); its
    /// table then starts with the rope: `[i32 style, 0, 0, 0][f32 inv_freq; d/2]` (see rope_header).
    pub pre_rope: bool,
    /// Bytes of this stream's table the kernel copies into shared memory when they fit (RVQ's f16
    /// codebooks); 0 for none.
    pub smem_table: usize,
    /// Rows of a per-query product the decode kernel reads precomputed (QJL's S q, `m`): the host runs
    /// the module's `sketch` kernel into a [rows][Hq][n] f32 buffer first, so split CTAs do not each
    /// form it; 0 for none.
    pub query_sketch: usize,
}

/// The rope at the start of a pre-RoPE codec's kernel table: i32 style (0 interleaved pairs, 1
/// rotate-half), three zero i32s, then the d/2 inverse frequencies as f32.
pub fn rope_header(rope: &Rope) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 4 * rope.inv_freq.len());
    for v in [rope.style.kernel_code(), 0, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for f in &rope.inv_freq {
        b.extend_from_slice(&f.to_le_bytes());
    }
    b
}

/// One layer's K or V codec: encodes and reads whole blocks of one KV head.
///
/// Blocks hold `block_tokens()` consecutive tokens of one head in `block_bytes()` bytes; the layout is
/// documented in each format module and docs/FORMATS.md and is what the CUDA kernels read. Token
/// vectors are `head_dim` f32s, token-major. Non-finite inputs are sanitized by the cache before
/// encode (NaN -> 0, +-Inf -> +-65504), so codecs see finite data.
pub trait Codec: Send + Sync {
    /// Canonical description of this stream's setting (e.g. `kivi:bits=1,...` for an AsymKV 1-bit layer).
    fn describe(&self) -> String;
    /// The codec of KV head `h` when heads are coded differently (KLT's per-head transforms); `None`
    /// when this codec serves every head. Readers go through [`of_head`].
    fn head_codec(&self, h: usize) -> Option<&dyn Codec> {
        let _ = h;
        None
    }
    /// Tokens per packed block (the quantization group along the sequence).
    fn block_tokens(&self) -> usize;
    /// Bytes of one packed block of one head, metadata included.
    fn block_bytes(&self) -> usize;
    /// Newest tokens kept in f16 outside blocks (KIVI residual, QJL buffer).
    fn window(&self) -> usize {
        0
    }
    /// Oldest tokens kept in f16 ahead of the first block: attention sinks (StreamingLLM, KVQuant),
    /// the few first tokens most heads attend to, whose quantization error every later query pays.
    fn sink(&self) -> usize {
        0
    }
    /// Keys stored before RoPE (RVQ, KIVI `prerope=on`): the cache hands this codec unrotated keys.
    fn pre_rope(&self) -> bool {
        false
    }
    /// Bytes per layer stream that do not grow with tokens (codebooks, sketch seeds), counted apart.
    fn fixed_bytes(&self) -> usize {
        0
    }
    /// The CUDA kernel that reads this codec's blocks; `None` while a format has no kernel yet.
    fn kernel(&self) -> Option<KernelSpec> {
        None
    }
    /// Packs `block_tokens * head_dim` finite values into `out` (`block_bytes` long).
    fn encode(&self, x: &[f32], out: &mut [u8]);
    /// Checks that arbitrary bytes form a block this codec can read (indices in range and so on).
    fn validate(&self, block: &[u8]) -> Result<()>;
    /// Reconstructs the block's vectors (pre-RoPE for pre-RoPE codecs); QJL gives its unbiased estimate.
    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()>;
    /// A per-layer table the CUDA kernel reads (QJL: the sketch S as f16, transposed [d][m]
    /// then row-major [m][d]); uploaded once
    /// by the GPU cache and passed as `KvqFmtArgs.p[0]`. Default: none.
    fn kernel_table(&self) -> Option<Vec<u8>> {
        None
    }
    /// Per-query work done once per query head and step (QJL's S q). Default: the query itself.
    fn prep_query(&self, q: &[f32]) -> Vec<f32> {
        q.to_vec()
    }
    /// Unscaled dot products q.k_t for the block's tokens, from the packed bytes. `q` is the rotated
    /// query, `prep` its `prep_query`, `pos0` the block's first position. Default: decode, rotate
    /// (pre-RoPE codecs), dot.
    fn key_scores(
        &self,
        q: &[f32],
        prep: &[f32],
        block: &[u8],
        pos0: usize,
        rope: &Rope,
        scores: &mut [f32],
    ) {
        let _ = prep;
        scores_from_decoded(self, q, block, pos0, rope, scores);
    }
    /// `acc += sum_t p[t] * v_t` over the block's tokens, from the packed bytes. Default: decode, axpy.
    fn accumulate_values(&self, block: &[u8], p: &[f32], acc: &mut [f32]) {
        let d = acc.len();
        let mut v = vec![0f32; self.block_tokens() * d];
        if self.decode(block, &mut v).is_err() {
            acc.iter_mut().for_each(|a| *a = f32::NAN);
            return;
        }
        for (t, &pt) in p.iter().enumerate() {
            if pt != 0.0 {
                axpy(pt, &v[t * d..(t + 1) * d], acc);
            }
        }
    }
}

/// The codec that reads and writes head `h`'s blocks: `c` itself unless it has per-head codecs.
pub fn of_head(c: &dyn Codec, h: usize) -> &dyn Codec {
    c.head_codec(h).unwrap_or(c)
}

/// `Codec::key_scores` through the decoded block (rotated at its positions for pre-RoPE codecs): the
/// default, and the path of codecs whose fused scoring does not apply to a layout (NaN on a bad block).
pub fn scores_from_decoded<C: Codec + ?Sized>(
    c: &C,
    q: &[f32],
    block: &[u8],
    pos0: usize,
    rope: &Rope,
    scores: &mut [f32],
) {
    let d = q.len();
    let mut k = vec![0f32; c.block_tokens() * d];
    if c.decode(block, &mut k).is_err() {
        scores.iter_mut().for_each(|s| *s = f32::NAN);
        return;
    }
    for (t, s) in scores.iter_mut().enumerate() {
        let kt = &mut k[t * d..(t + 1) * d];
        if c.pre_rope() {
            rope.rotate(kt, pos0 + t, 1.0);
        }
        *s = dot(q, kt);
    }
}

/// f32 dot product (reference arithmetic, accumulated in f32).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}
