//! AsymKV (Tao, Yu, Zhou, "Enabling 1-Bit Quantization of KV Cache with Layer-Wise Asymmetric
//! Quantization Configurations", arXiv 2410.13212, COLING 2025) and its uniform special case KIVI
//! (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024).
//!
//! **Quantizer (KIVI's).** Asymmetric min-max round-to-nearest with `L = 2^b - 1` levels:
//! `z = min`, `s = (max - min) / L`, `code = round((x - z) / s)` clamped to `0..=L`, `x' = z + s*code`.
//! `z` and `s` are stored as f16 and the codes are computed against the *stored* (f16-rounded) `z`
//! and `s`, so what the encoder saw is what every reader reconstructs. A zero range (`s = 0`) stores
//! code 0 and decodes to `z`, so constant data round-trips to f16 precision.
//! - keys, **per channel**: over a block of `G = group` tokens, each channel gets its own `(s, z)`;
//! - values, **per token**: each token's channels are cut into groups of `G` channels, each with its
//!   own `(s, z)`; `G` must divide `head_dim`.
//!
//! A block is `G` consecutive tokens of one KV head for both streams. The newest `window` tokens stay
//! f16 in the generic cache (KIVI's residual): [`Codec::window`] returns it.
//!
//! **AsymKV** chooses the bit width per layer: the first `lk` layers store keys at `hi` bits and the
//! rest at `lo`; the first `lv` layers store values at `hi`, the rest at `lo` (`lk`, `lv` clamp to the
//! model's depth). The paper's configurations have `lk >= lv` (keys hurt more: their error is amplified
//! by the query and the softmax); it is not enforced. `kivi:bits=b` is `b` bits everywhere.
//!
//! **Byte layout** of one block (one KV head, `G` tokens, `d` channels, `b` bits), little-endian,
//! identical for keys and values except for what a `(s, z)` pair covers:
//! ```text
//!  offset 0         2d             4d                   4d + R          4d + G*R
//!  +----------------+--------------+--------------------+-----//-------+
//!  | scale f16 x d  | zero f16 x d | codes of token 0   |  ...  tok G-1 |
//!  +----------------+--------------+--------------------+-----//-------+
//!  keys:   pair i = channel i                     (per channel, over the block's G tokens)
//!  values: pair i = token i/(d/G), channel group i%(d/G)  (per token, G channels each)
//!  row (one token): d b-bit codes, channel 0 first, little-endian bit stream (crate::bits),
//!                   padded with zero bits to R = ceil(d*b/32)*4 bytes (no padding when 32 | d).
//! ```
//! There are always `d` pairs (keys: `d` channels; values: `G` tokens x `d/G` groups), so the metadata
//! is `4d` bytes, every section starts 4-byte aligned, and a block is `4d + G*R` bytes. One token's
//! codes are contiguous (`R` = 16 bytes for d=64, b=2: one 128-bit load), so a warp lane can own a
//! token. `KiviCodec`'s `key_scores` and `accumulate_values` read attention straight from the bytes
//! in f32, keys with the scales folded into the query once per block
//! (`q.k_t = sum_c (q_c s_c) code_{t,c} + sum_c q_c z_c`), values as `sum_t (p_t s_{t,g}) code_{t,c}`
//! plus `sum_t p_t z_{t,g}` once per group: the exact reference the CUDA kernel is checked against
//! (the kernel decodes codes to f16 keys and values for its tensor-core MMAs, kernels/formats/kivi.cu).
//!
//! **Bits/elem as stored** (every byte counted): `(4d*8 + G*R*8) / (G*d)` = `b + 32/G` when `32 | d`:
//! with `G = 32`: 2.0 (1-bit), 3.0 (2-bit), 5.0 (4-bit), 9.0 (8-bit). At 1 bit the f16 scale and zero
//! cost as much as the payload (FORMATS.md). The f16 window adds 16 bits for each token it holds.
//!
//! Details, bit tables and measured errors: docs/formats/asymkv.md.
//!
//! **Range choice (`clip=`).** `clip=off` (the default) is KIVI's min-max above. `clip=mse` picks,
//! per group, the range `[lo', hi']` inside `[min, max]` with the least squared error of that group's
//! own reconstruction (codes clamped to `0..=L`, against the stored f16 `s` and `z`), from a fixed grid
//! of cuts off each end ([`CLIP_CUTS`], min-max included, ties keep min-max): AWQ's and OmniQuant's
//! clipped ranges, searched per group instead of learned. `clip=fit` follows that with up to three
//! least-squares refits of `(s, z)` to the codes (kept only while the error drops). Same bytes layout
//! and bits/elem, readers unchanged; the CUDA encoder writes min-max only, so a clipped codec has no
//! [`Codec::kernel`]. Measured in docs/QUALITY.md ("MSE-clipped ranges"): a lower squared error is not
//! always a lower perplexity; clipping helps behind `rot=on` and hurts unrotated values.
//!
//! **8-bit metadata (`meta=8`, values only).** Each group's `(s, z)` costs 8 + 8 bits instead of 16 +
//! 16: the block stores one f16 `S` (every group's scale is at most `S`), then per group a scale code
//! `c` with `s = S 2^(-c/16)` (`c = 255`: `s = 0`) and a zero code `k` (i8) with
//! `z = s (k/16 - L/2)`, i.e. the zero in sixteenths of the group's own step around the centred range.
//! The encoder picks, per group, the grid point next to the range it would have stored (`clip=` as
//! usual) with the least squared error. Layout `[S f16][2 zero bytes][c u8; d][k i8; d][codes]`, so
//! `4 + 2d` metadata bytes: `b + (32 + 16 d) / (G d)` bits/elem (d = 64, G = 64: `b + 0.258`, against
//! `b + 0.5`). `z` is tied to `s`: a group whose range lies far from 0 against its spread (one
//! constant other than 0, say) is coded with the least scale whose reachable zeros cover it, coarser
//! than its own range would need (rotated groups, which straddle 0, do not meet this). Keys per
//! channel keep f16 metadata (`meta=8` is refused for them); CPU only (no kernel reads the layout).
//!
//! **Levels (`levels=nf`).** At 2, 3 and 4 bits a code may stand for one of the `2^b` Lloyd-Max levels
//! of a normal distribution laid across the group's range (outermost levels at its ends;
//! [`nf_levels`]) instead of `2^b` even steps; the encoder takes the nearest level. Same bytes and
//! bits/elem; the CPU readers use the level where they used the code; the CUDA kernels read even steps,
//! so such a codec has no [`Codec::kernel`]. 1-bit codes are the range's two ends either way, so
//! `levels=nf` refuses them (and 8 bits) at parse time.
//!
//! Range overflow: a `b = 1` block whose range exceeds 65504 (e.g. -6e4 and +6e4 in one group) cannot
//! store `s` in f16; `s` is clamped to 65504 and `z` centred on the range, so decoding stays finite.

use crate::bits;
use crate::cache::sanitize;
use crate::codec::{axpy, dot, Codec, Format, FormatRef, KernelSpec, Stream, StreamCtx};
use crate::config::Params;
use crate::error::{FormatError, Result};
use crate::rope::Rope;
use half::f16;
use std::sync::Arc;

/// Bit widths a stream may use.
pub const BITS: &[usize] = &[1, 2, 3, 4, 8];
/// Group sizes: tokens per key block and channels per value group.
pub const GROUPS: &[usize] = &[16, 32, 64, 128];
/// Largest `lk` / `lv` accepted (they clamp to the model's depth anyway).
const MAX_LAYERS: usize = 1 << 16;
/// Largest full-precision window accepted.
const MAX_WINDOW: usize = 1 << 20;
/// Largest attention-sink count accepted (a handful is what the papers keep).
const MAX_SINK: usize = 1024;
/// Largest finite f16.
const F16_MAX: f32 = 65504.0;
/// `clip=mse` candidates: fractions of a group's range `max - min` cut off its low end and, separately,
/// its high end (every pair is tried; 37.5% each at most). Fine near 0, where 4-bit groups settle, and
/// coarser further out, where 2-bit groups do.
pub const CLIP_CUTS: &[f32] = &[
    0.0,
    1.0 / 64.0,
    2.0 / 64.0,
    3.0 / 64.0,
    4.0 / 64.0,
    6.0 / 64.0,
    8.0 / 64.0,
    12.0 / 64.0,
    16.0 / 64.0,
    24.0 / 64.0,
];

/// Most least-squares refits `clip=fit` makes per group.
const REFITS: usize = 3;

/// How a group's quantization range is chosen (`clip=`); the stored scale and zero are f16 either way,
/// so the choice costs no bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Clip {
    /// `clip=off`: the group's min and max (KIVI's quantizer, what the CUDA encoder writes).
    #[default]
    Off,
    /// `clip=mse`: the grid range with the least squared error in the group (outliers clamped).
    Mse,
    /// `clip=fit`: `mse`'s range, then least-squares refits of scale and zero to the codes it gave
    /// (Lloyd steps on the uniform grid, kept only while they lower the error; zero may leave the range).
    Fit,
}

impl Clip {
    /// The option's words, default first.
    const WORDS: &'static [&'static str] = &["off", "mse", "fit"];

    fn parse(p: &mut Params) -> Result<Self> {
        Ok(match p.word("clip", "off", Self::WORDS)?.as_str() {
            "mse" => Clip::Mse,
            "fit" => Clip::Fit,
            _ => Clip::Off,
        })
    }

    /// `,clip=...` for a config string (empty for the default).
    fn suffix(self) -> &'static str {
        match self {
            Clip::Off => "",
            Clip::Mse => ",clip=mse",
            Clip::Fit => ",clip=fit",
        }
    }
}

/// A parsed AsymKV or KIVI config; `uniform` remembers which syntax it came from so that
/// [`Format::canonical`] prints it back the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsymKv {
    /// Layers (from layer 0) whose keys use `hi` bits.
    pub lk: usize,
    /// Layers (from layer 0) whose values use `hi` bits.
    pub lv: usize,
    /// Bit width of the first layers.
    pub hi: usize,
    /// Bit width of the remaining layers.
    pub lo: usize,
    /// Tokens per block (keys: the per-channel group; values: also channels per group).
    pub group: usize,
    /// Newest tokens kept in f16.
    pub window: usize,
    /// Parsed from `kivi:` (one bit width for everything).
    pub uniform: bool,
    /// `rot=on`: every token vector rotated before quantization (super::rotate); CPU only so far.
    pub rot: bool,
    /// `keys=token`: keys quantized per token in groups of `group` channels, as values are (the axis
    /// that suits rotated keys, whose outlier channels are spread); needs `rot=on`.
    pub keys_per_token: bool,
    /// `prerope=on`: keys quantized before RoPE (KVQuant), where their outlier channels keep one
    /// magnitude along the sequence instead of being spun across channel pairs; CPU only so far.
    pub pre_rope: bool,
    /// `sink=N`: the first N tokens of K and V kept in f16 (attention sinks); CPU only so far.
    pub sink: usize,
    /// `clip=mse`: each group's range chosen for least squared error instead of min-max; CPU only.
    pub clip: Clip,
    /// `levels=nf`: 2-, 3- and 4-bit codes stand for Lloyd-Max levels of a normal distribution across
    /// the group's range instead of even steps (suits rotated groups, which are near-Gaussian); CPU only.
    pub nf: bool,
    /// `meta=8`: value groups' scale and zero as 8-bit codes under one f16 block scale (half the
    /// metadata bits, paid to other streams at the same bits/elem); values only, CPU only.
    pub meta8: bool,
}

/// Parses `asymkv:lk=16,lv=0,hi=2,lo=1,group=32,window=128` (every key optional, these defaults).
pub fn parse(mut p: Params) -> Result<FormatRef> {
    let lk = p.usize("lk", 16, 0, MAX_LAYERS)?;
    let lv = p.usize("lv", 0, 0, MAX_LAYERS)?;
    let hi = p.choice("hi", 2, BITS)?;
    let lo = p.choice("lo", 1, BITS)?;
    parse_shared(p, [lk, lv, hi, lo], false, &["lk", "lv", "hi", "lo"])
}

/// Parses `kivi:bits=2,group=32,window=128`: KIVI, AsymKV with the same bits for every K and V.
pub fn parse_kivi(mut p: Params) -> Result<FormatRef> {
    let bits = p.choice("bits", 2, BITS)?;
    parse_shared(p, [0, 0, bits, bits], true, &["bits"])
}

/// The keys both spellings share (group, window and the cache options), after each took its own
/// (`own`, giving `[lk, lv, hi, lo]`); then unknown keys and the options' combinations are checked.
fn parse_shared(
    mut p: Params,
    [lk, lv, hi, lo]: [usize; 4],
    uniform: bool,
    own: &[&str],
) -> Result<FormatRef> {
    const SHARED: [&str; 9] = [
        "group", "window", "rot", "keys", "prerope", "sink", "clip", "levels", "meta",
    ];
    let p_input = p.input().to_string();
    let f = AsymKv {
        lk,
        lv,
        hi,
        lo,
        group: p.choice("group", 32, GROUPS)?,
        window: p.usize("window", 128, 0, MAX_WINDOW)?,
        uniform,
        rot: p.word("rot", "off", &["on", "off"])? == "on",
        keys_per_token: p.word("keys", "channel", &["channel", "token"])? == "token",
        pre_rope: p.word("prerope", "off", &["on", "off"])? == "on",
        sink: p.usize("sink", 0, 0, MAX_SINK)?,
        clip: Clip::parse(&mut p)?,
        nf: p.word("levels", "uniform", &["uniform", "nf"])? == "nf",
        meta8: p.word("meta", "16", &["16", "8"])? == "8",
    };
    let known: Vec<&str> = own.iter().chain(SHARED.iter()).copied().collect();
    p.finish(&known)?;
    f.check_axes(&p_input)?;
    Ok(Arc::new(f))
}

/// The `,clip=mse` / `,levels=nf` / `,prerope=on` / `,sink=N` / `,meta=8` suffix of a config string (empty for
/// the defaults), shared by the format's canonical string and each codec's description.
fn cache_options(clip: Clip, nf: bool, pre_rope: bool, sink: usize, meta8: bool) -> String {
    let pre = if pre_rope { ",prerope=on" } else { "" };
    let clip = clip.suffix();
    let nf = if nf { ",levels=nf" } else { "" };
    let sink = if sink > 0 {
        format!(",sink={sink}")
    } else {
        String::new()
    };
    let meta = if meta8 { ",meta=8" } else { "" };
    format!("{clip}{nf}{pre}{sink}{meta}")
}

impl AsymKv {
    /// Per-token keys only behind the rotation: no CUDA kernel reads that layout as keys.
    fn check_axes(&self, input: &str) -> Result<()> {
        if self.nf && !(NF_BITS.contains(&self.hi) && NF_BITS.contains(&self.lo)) {
            return Err(crate::error::parse_err(
                input,
                "levels=nf has tables for 2-, 3- and 4-bit codes only (bits, or hi and lo, in 2..=4): \
                 1-bit codes are the range's two ends either way, 8-bit codes stay even steps",
            ));
        }
        if self.keys_per_token && !self.rot {
            return Err(crate::error::parse_err(
                input,
                "keys=token needs rot=on (per-token keys exist for rotated caches, CPU only)",
            ));
        }
        Ok(())
    }

    /// The bit width of one stream of `layer` in a model of `n_layers` layers (`lk`/`lv` clamped).
    pub fn bits_for(&self, layer: usize, n_layers: usize, stream: Stream) -> usize {
        let split = match stream {
            Stream::Key => self.lk,
            Stream::Value => self.lv,
        };
        if layer < split.min(n_layers) {
            self.hi
        } else {
            self.lo
        }
    }
}

impl Format for AsymKv {
    fn canonical(&self) -> String {
        let rot = match (self.rot, self.keys_per_token) {
            (false, _) => "",
            (true, false) => ",rot=on",
            (true, true) => ",rot=on,keys=token",
        };
        let opts = cache_options(self.clip, self.nf, self.pre_rope, self.sink, self.meta8);
        if self.uniform {
            format!(
                "kivi:bits={},group={},window={}{rot}{opts}",
                self.hi, self.group, self.window
            )
        } else {
            format!(
                "asymkv:lk={},lv={},hi={},lo={},group={},window={}{rot}{opts}",
                self.lk, self.lv, self.hi, self.lo, self.group, self.window
            )
        }
    }

    fn supports(&self, head_dim: usize) -> Result<()> {
        self.supports_stream(head_dim, Stream::Value)
    }

    /// Per-channel keys group tokens only, so a key-only format may use groups wider than a head.
    fn supports_stream(&self, head_dim: usize, stream: Stream) -> Result<()> {
        let channel_groups = stream == Stream::Value || self.keys_per_token;
        if head_dim == 0 || (channel_groups && !head_dim.is_multiple_of(self.group)) {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!(
                    "head_dim {head_dim}: value groups of {} channels must divide it",
                    self.group
                ),
            });
        }
        if self.rot && !head_dim.is_power_of_two() {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!("head_dim {head_dim}: rot=on needs a power of two (Hadamard)"),
            });
        }
        Ok(())
    }

    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        self.supports_stream(ctx.head_dim, ctx.stream)?;
        let bits = self.bits_for(ctx.layer, ctx.n_layers, ctx.stream);
        // Per-token keys use the value layout (and the CPU scoring from decoded vectors).
        let layout = if self.keys_per_token {
            Stream::Value
        } else {
            ctx.stream
        };
        if self.meta8 && layout == Stream::Key {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what:
                    "meta=8 for keys: it codes per-token value groups; per-channel keys keep f16 \
                       scales and zeros (give keys their own format: `k=...;v=kivi:...,meta=8`)"
                        .into(),
            });
        }
        let codec = KiviCodec::new(layout, ctx.head_dim, bits, self.group, self.window)?
            .with_cache_options(self.pre_rope && ctx.stream == Stream::Key, self.sink)
            .with_clip(self.clip)
            .with_levels(self.nf)
            .with_meta8(self.meta8);
        Ok(if self.rot {
            Box::new(super::rotate::Rotated::new(Box::new(codec), ctx.head_dim))
        } else {
            Box::new(codec)
        })
    }
}

/// One stream's KIVI codec (the layout in the module docs); public so that other formats storing
/// KIVI-quantized values (QJL) can reuse it.
#[derive(Debug, Clone)]
pub struct KiviCodec {
    stream: Stream,
    d: usize,
    bits: usize,
    group: usize,
    window: usize,
    pre_rope: bool,
    sink: usize,
    clip: Clip,
    nf: bool,
    meta8: bool,
}

/// `meta=8`: a scale code's step, as a power of two (`s = S 2^(-c / SCALE_STEPS)`).
const SCALE_STEPS: f64 = 16.0;
/// `meta=8`: the scale code that stands for `s = 0`.
const SCALE_ZERO: u8 = 255;

/// `meta=8`: `2^(-c / SCALE_STEPS)` for every scale code `c < SCALE_ZERO`, computed once (every
/// block read turns d codes into scales).
fn scale_step(c: u8) -> f32 {
    static STEPS: std::sync::OnceLock<[f32; SCALE_ZERO as usize]> = std::sync::OnceLock::new();
    STEPS.get_or_init(|| std::array::from_fn(|c| (2f64).powf(-(c as f64) / SCALE_STEPS) as f32))
        [c as usize]
}

impl KiviCodec {
    /// A codec for `head_dim` channels at `bits` bits with groups of `group`; checks the arguments
    /// (values need `group | head_dim`).
    pub fn new(
        stream: Stream,
        head_dim: usize,
        bits: usize,
        group: usize,
        window: usize,
    ) -> Result<Self> {
        let name = format!("kivi:bits={bits},group={group},window={window}");
        if !BITS.contains(&bits) || !GROUPS.contains(&group) {
            return Err(FormatError::Unsupported {
                format: name,
                what: format!(
                    "bits {bits} (want one of {BITS:?}) or group {group} (want one of {GROUPS:?})"
                ),
            });
        }
        if head_dim == 0 || (stream == Stream::Value && !head_dim.is_multiple_of(group)) {
            return Err(FormatError::Unsupported {
                format: name,
                what: format!("head_dim {head_dim} with value groups of {group} channels"),
            });
        }
        Ok(Self {
            stream,
            d: head_dim,
            bits,
            group,
            window,
            pre_rope: false,
            sink: 0,
            clip: Clip::Off,
            nf: false,
            meta8: false,
        })
    }

    /// Keys taken before RoPE (`prerope=on`) and `sink` f16 sink tokens: options of the generic cache
    /// that no CUDA kernel reads yet, so a codec with either has no [`Codec::kernel`].
    pub fn with_cache_options(mut self, pre_rope: bool, sink: usize) -> Self {
        self.pre_rope = pre_rope;
        self.sink = sink;
        self
    }

    /// How each group's range is chosen: `Clip::Mse` lowers the CPU encoder's error at the same bytes
    /// layout, but the CUDA encoder writes min-max only, so such a codec has no [`Codec::kernel`].
    pub fn with_clip(mut self, clip: Clip) -> Self {
        self.clip = clip;
        self
    }

    /// `nf`: 2- to 4-bit codes index [`nf_levels`] (Lloyd-Max levels of a normal distribution)
    /// instead of even steps; other widths ignore it. The CUDA kernels read even steps, so no
    /// [`Codec::kernel`].
    pub fn with_levels(mut self, nf: bool) -> Self {
        self.nf = nf && NF_BITS.contains(&self.bits);
        self
    }

    /// `meta8`: value groups' (scale, zero) as 8-bit codes under one f16 block scale (module docs);
    /// ignored for per-channel keys, which [`AsymKv`] refuses it for.
    pub fn with_meta8(mut self, meta8: bool) -> Self {
        self.meta8 = meta8 && self.stream == Stream::Value;
        self
    }

    /// Bit width of the codes.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Bytes of one token's code row (d codes, padded to 4 bytes).
    pub fn row_bytes(&self) -> usize {
        (self.d * self.bits).div_ceil(32) * 4
    }

    /// Byte offset of the codes (after `d` f16 scales and `d` f16 zeros; with `meta8` the f16
    /// block scale, 2 zero bytes and `d` scale and `d` zero codes).
    pub fn codes_offset(&self) -> usize {
        if self.meta8 {
            4 + 2 * self.d
        } else {
            4 * self.d
        }
    }

    /// Number of channels sharing one value `(s, z)` pair (keys: 1 channel per pair).
    fn groups_per_token(&self) -> usize {
        self.d / self.group
    }

    fn levels(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// The `d` stored (scale, zero) pairs of a block of the right length, as f32.
    fn pairs(&self, block: &[u8]) -> (Vec<f32>, Vec<f32>) {
        if self.meta8 {
            let top = bits::f16_at(block, 0);
            return (0..self.d)
                .map(|i| self.meta8_pair(top, block[4 + i], block[4 + self.d + i] as i8))
                .unzip();
        }
        let s = (0..self.d).map(|i| bits::f16_at(block, 2 * i)).collect();
        let z = (0..self.d)
            .map(|i| bits::f16_at(block, 2 * (self.d + i)))
            .collect();
        (s, z)
    }

    /// [`Self::pairs`] of a block checked for its length and for finite scales (>= 0) and zeros: what
    /// `validate` checks, read once for the readers that go on to use the pairs.
    fn checked_pairs(&self, block: &[u8]) -> Result<(Vec<f32>, Vec<f32>)> {
        crate::formats::check_len(&self.describe(), block, self.block_bytes())?;
        let (scales, zeros) = self.pairs(block);
        for (i, (&s, &z)) in scales.iter().zip(&zeros).enumerate() {
            if !s.is_finite() || s < 0.0 {
                return Err(self.corrupt(format!("scale {i} is {s}, expected a finite value >= 0")));
            }
            if !z.is_finite() {
                return Err(self.corrupt(format!("zero {i} is {z}, expected a finite value")));
            }
        }
        Ok((scales, zeros))
    }

    /// Index of the (scale, zero) pair of token `t`, channel `c`.
    fn pair_of(&self, t: usize, c: usize) -> usize {
        match self.stream {
            Stream::Key => c,
            Stream::Value => t * self.groups_per_token() + c / self.group,
        }
    }

    /// The codes of token `t` as f32, into `out` (`d` long).
    fn row_codes(&self, block: &[u8], t: usize, out: &mut [f32]) {
        let off = self.codes_offset() + t * self.row_bytes();
        let row = &block[off..off + self.row_bytes()];
        let b = self.bits as u32;
        match b {
            8 => out.iter_mut().zip(row).for_each(|(o, &c)| *o = c as f32),
            1 | 2 | 4 => {
                let per = 8 / self.bits;
                let mask = (1u8 << b) - 1;
                for (c, o) in out.iter_mut().enumerate() {
                    *o = self.lv(((row[c / per] >> ((c % per) as u32 * b)) & mask) as u32);
                }
            }
            _ => out
                .iter_mut()
                .enumerate()
                .for_each(|(c, o)| *o = self.lv(bits::get(row, b, c))),
        }
    }

    fn corrupt(&self, reason: String) -> FormatError {
        FormatError::Corrupt {
            format: self.describe(),
            reason,
        }
    }

    /// The stored (scale, zero) of one group's values `xs`: its min-max range, or with `clip=mse`
    /// the grid range of least squared error.
    fn params(&self, xs: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &x in xs {
            lo = lo.min(x);
            hi = hi.max(x);
        }
        if lo > hi {
            return (0.0, 0.0);
        }
        let min_max = self.pair(lo, hi);
        match self.clip {
            Clip::Off => min_max,
            Clip::Mse => self.clipped(xs, lo, hi, min_max),
            Clip::Fit => self.refit(xs, self.clipped(xs, lo, hi, min_max)),
        }
    }

    /// (stored scale, stored zero) of the range `[lo, hi]` (`lo <= hi`).
    fn pair(&self, lo: f32, hi: f32) -> (f32, f32) {
        let l = self.levels() as f32;
        let mut z = f16r(lo);
        let mut s = (hi - z) / l;
        if s > F16_MAX {
            // Only reachable at 1 bit with a range over 65504: centre the two levels on the range.
            s = F16_MAX;
            z = f16r(0.5 * (lo + hi) - 0.5 * s * l);
        }
        (f16r(s.max(0.0)), z)
    }

    /// `clip=fit`: up to [`REFITS`] least-squares fits `x ~ z + s * code` to the codes of the pair so
    /// far, each rounded to f16 and re-coded; a fit is kept only when it lowers the squared error.
    fn refit(&self, xs: &[f32], start: (f32, f32)) -> (f32, f32) {
        let Some(e0) = self.sq_err_below(xs, start, f64::INFINITY) else {
            return start;
        };
        let mut best = (e0, start);
        let n = xs.len() as f64;
        for _ in 0..REFITS {
            let (s, z) = best.1;
            if s <= 0.0 || best.0 == 0.0 {
                break;
            }
            let (mut sc, mut sx, mut scc, mut scx) = (0f64, 0f64, 0f64, 0f64);
            for &x in xs {
                let (c, x) = (self.lv(self.code(x, s, z)) as f64, x as f64);
                sc += c;
                sx += x;
                scc += c * c;
                scx += c * x;
            }
            let var = scc - sc * sc / n;
            if var <= 0.0 {
                break;
            }
            let s_fit = (scx - sc * sx / n) / var;
            let z_fit = (sx - s_fit * sc) / n;
            if !(s_fit > 0.0 && s_fit <= F16_MAX as f64 && z_fit.abs() <= F16_MAX as f64) {
                break;
            }
            let cand = (f16r(s_fit as f32), f16r(z_fit as f32));
            match self.sq_err_below(xs, cand, best.0) {
                Some(e) => best = (e, cand),
                None => break,
            }
        }
        best.1
    }

    /// Squared error of `xs` reconstructed through `(s, z)` exactly as [`Codec::decode`] does, or
    /// `None` as soon as it reaches `bound` (the candidate cannot win).
    fn sq_err_below(&self, xs: &[f32], (s, z): (f32, f32), bound: f64) -> Option<f64> {
        let mut e = 0f64;
        for &x in xs {
            let r = z + s * self.lv(self.code(x, s, z));
            e += ((r - x) as f64).powi(2);
            if e >= bound {
                return None;
            }
        }
        Some(e)
    }

    /// `clip=mse`: every pair of [`CLIP_CUTS`] off the low and high ends of `[lo, hi]`; the first
    /// strictly better than `min_max` (itself the cut pair (0, 0)) in grid order wins.
    fn clipped(&self, xs: &[f32], lo: f32, hi: f32, min_max: (f32, f32)) -> (f32, f32) {
        let r = hi - lo;
        if !(r > 0.0 && r.is_finite()) {
            return min_max;
        }
        let Some(e0) = self.sq_err_below(xs, min_max, f64::INFINITY) else {
            return min_max;
        };
        let mut best = (e0, min_max);
        for &a in CLIP_CUTS {
            for &b in CLIP_CUTS {
                if a == 0.0 && b == 0.0 {
                    continue;
                }
                let cand = self.pair(lo + a * r, hi - b * r);
                if let Some(e) = self.sq_err_below(xs, cand, best.0) {
                    best = (e, cand);
                }
            }
        }
        best.1
    }

    /// `meta8`: the (scale, zero) that block scale `top`, scale code `c` and zero code `k` stand for.
    fn meta8_pair(&self, top: f32, c: u8, k: i8) -> (f32, f32) {
        if c == SCALE_ZERO {
            return (0.0, 0.0);
        }
        let s = top * scale_step(c);
        (s, s * (k as f32 / 16.0 - self.levels() as f32 / 2.0))
    }

    /// `meta8`: `(s, z)` itself when the grid can hold its zero (`z / s` within the zero codes' reach
    /// of the centred range, `[-8 - L/2, 127/16 - L/2]`), else the least scale whose reachable ranges
    /// still cover the group's values, with a zero that does (a group of one constant other than 0,
    /// or far from 0 against its spread: coarser steps instead of a lost offset).
    fn meta8_reach(&self, xs: &[f32], (s, z): (f32, f32)) -> (f32, f32) {
        let l = self.levels() as f64;
        let (a, b) = (-8.0 - l / 2.0, 127.0 / 16.0 - l / 2.0);
        if s > 0.0 && (a..=b).contains(&(z as f64 / s as f64)) || (s == 0.0 && z == 0.0) {
            return (s, z);
        }
        let (lo, hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x as f64), hi.max(x as f64))
            });
        if lo > hi {
            return (s, z);
        }
        // z >= s a, z <= s b, z <= lo, z + L s >= hi: s >= max((hi - lo) / L, lo / a, hi / (L + b)).
        // A 1/64 margin keeps the zeros' interval open for the grid's rounding; its centre is taken.
        let sm = (((hi - lo) / l).max(lo / a).max(hi / (l + b)) * (1.0 + 1.0 / 64.0))
            .min(F16_MAX as f64);
        let (zl, zh) = ((hi - l * sm).max(sm * a), lo.min(sm * b));
        (sm as f32, (0.5 * (zl + zh.max(zl))) as f32)
    }

    /// `meta8`: the (scale code, zero code) of each group under block scale `top`: of the four grid
    /// points around the group's (scale, zero) from [`Self::params`], the one of least squared error.
    fn meta8_codes(&self, groups: &[&[f32]], pairs: &[(f32, f32)], top: f32) -> Vec<(u8, i8)> {
        let half = self.levels() as f64 / 2.0;
        groups
            .iter()
            .zip(pairs)
            .map(|(xs, &(s, z))| {
                if !(top > 0.0 && s > 0.0) {
                    return (SCALE_ZERO, 0);
                }
                let cf = (-SCALE_STEPS * (s as f64 / top as f64).log2()).clamp(0.0, 254.0);
                let mut best: Option<(f64, (u8, i8))> = None;
                for c in [cf.floor(), cf.ceil()] {
                    let c = c as u8;
                    let (sc, _) = self.meta8_pair(top, c, 0);
                    let kf = (16.0 * (z as f64 / sc as f64 + half)).clamp(-128.0, 127.0);
                    for k in [kf.floor(), kf.ceil()] {
                        let k = k as i8;
                        let bound = best.map_or(f64::INFINITY, |b| b.0);
                        if let Some(e) = self.sq_err_below(xs, self.meta8_pair(top, c, k), bound) {
                            best = Some((e, (c, k)));
                        }
                    }
                }
                best.map_or((SCALE_ZERO, 0), |b| b.1)
            })
            .collect()
    }

    fn code(&self, x: f32, s: f32, z: f32) -> u32 {
        if s <= 0.0 {
            return 0;
        }
        if self.nf {
            // Nearest level (the first of two equally near ones).
            let u = (x - z) / s;
            let t = nf_levels(self.bits);
            let mut best = 0;
            for (i, l) in t.iter().enumerate().skip(1) {
                if (l - u).abs() < (t[best] - u).abs() {
                    best = i;
                }
            }
            return best as u32;
        }
        let q = ((x - z) / s).round();
        q.clamp(0.0, self.levels() as f32) as u32
    }

    /// The level a code stands for, in steps of `s` above `z`.
    fn lv(&self, c: u32) -> f32 {
        if self.nf {
            nf_levels(self.bits)[c as usize]
        } else {
            c as f32
        }
    }
}

/// Code widths `levels=nf` has a table for (1-bit codes are the range's ends either way).
pub const NF_BITS: &[usize] = &[2, 3, 4];

/// The positive Lloyd-Max reconstruction levels of N(0, 1) (Max 1960) for 4, 8 and 16 levels,
/// symmetric about 0.
const LLOYD_MAX_4: [f32; 2] = [0.4528, 1.5104];
const LLOYD_MAX_8: [f32; 4] = [0.2451, 0.7560, 1.3439, 2.1520];
const LLOYD_MAX_16: [f32; 8] = [
    0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326,
];

/// The `2n` levels `+-half[i]` mapped onto `[0, 2n - 1]` (outermost levels at the range's ends), in
/// steps of the stored scale above the stored zero.
const fn lay_out<const N: usize>(half: &[f32]) -> [f32; N] {
    let h = N / 2;
    let top = half[h - 1];
    let last = (N - 1) as f32;
    let mut t = [0f32; N];
    let mut i = 0;
    while i < h {
        let v = half[i];
        t[h + i] = (top + v) / (2.0 * top) * last;
        t[h - 1 - i] = (top - v) / (2.0 * top) * last;
        i += 1;
    }
    t
}

const NF_LEVELS_2: [f32; 4] = lay_out::<4>(&LLOYD_MAX_4);
const NF_LEVELS_3: [f32; 8] = lay_out::<8>(&LLOYD_MAX_8);
const NF_LEVELS_4: [f32; 16] = lay_out::<16>(&LLOYD_MAX_16);

/// `levels=nf`: the `2^bits` Lloyd-Max levels of a normal distribution mapped onto `[0, 2^bits - 1]`
/// (outermost levels at the range's ends), ascending; empty for widths without a table ([`NF_BITS`]).
pub fn nf_levels(bits: usize) -> &'static [f32] {
    match bits {
        2 => &NF_LEVELS_2,
        3 => &NF_LEVELS_3,
        4 => &NF_LEVELS_4,
        _ => &[],
    }
}

/// Rounds to the nearest f16 (what the block stores).
fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl Codec for KiviCodec {
    fn describe(&self) -> String {
        let s = match self.stream {
            Stream::Key => "k",
            Stream::Value => "v",
        };
        let opts = cache_options(self.clip, self.nf, self.pre_rope, self.sink, self.meta8);
        format!(
            "kivi-{s}:bits={},group={},window={}{opts}",
            self.bits, self.group, self.window
        )
    }

    fn block_tokens(&self) -> usize {
        self.group
    }

    fn block_bytes(&self) -> usize {
        self.codes_offset() + self.group * self.row_bytes()
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

    fn kernel(&self) -> Option<KernelSpec> {
        // Pre-RoPE keys and sinks: no kernel reads them; clipped ranges: the CUDA encoder would
        // write other (min-max) bytes than this codec, so the cache must stay on the CPU encoder.
        if self.pre_rope || self.sink > 0 || self.clip != Clip::Off || self.nf || self.meta8 {
            return None;
        }
        // kernels/formats/kivi.cu reads 32-token blocks with unpadded rows (d*bits a multiple of 32);
        // 1, 2 and 4 bits have specialised kernels, other widths the generic one ("k0"/"v0").
        let tag = match (self.stream, self.bits) {
            (Stream::Key, 1) => "k1",
            (Stream::Key, 2) => "k2",
            (Stream::Key, 4) => "k4",
            (Stream::Key, _) => "k0",
            (Stream::Value, 1) => "v1",
            (Stream::Value, 2) => "v2",
            (Stream::Value, 4) => "v4",
            (Stream::Value, _) => "v0",
        };
        (self.group == 32 && (self.d * self.bits).is_multiple_of(32)).then_some(KernelSpec {
            module: "kivi",
            ints: [self.bits as i32, 32, 0, 0],
            tag,
            tile: (0, 0, 0),
            pre_rope: false,
            smem_table: 0,
            query_sketch: 0,
        })
    }

    /// Packs `G x d` values. Wrong-sized buffers (a caller bug, never user data) give an all-zero
    /// block, which decodes to zeros, rather than a panic.
    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let (d, g) = (self.d, self.group);
        out.iter_mut().for_each(|b| *b = 0);
        if x.len() != g * d || out.len() != self.block_bytes() {
            return;
        }
        let x: Vec<f32> = x.iter().map(|&v| sanitize(v)).collect();
        // (s, z) of the d pairs, in pair order.
        let pairs: Vec<(f32, f32)> = match self.stream {
            Stream::Key => {
                let mut column = vec![0f32; g];
                (0..d)
                    .map(|c| {
                        column
                            .iter_mut()
                            .enumerate()
                            .for_each(|(t, v)| *v = x[t * d + c]);
                        self.params(&column)
                    })
                    .collect()
            }
            Stream::Value => (0..g * self.groups_per_token())
                .map(|i| {
                    let (t, gi) = (i / self.groups_per_token(), i % self.groups_per_token());
                    self.params(&x[t * d + gi * g..t * d + (gi + 1) * g])
                })
                .collect(),
        };
        let pairs = if self.meta8 {
            let groups: Vec<&[f32]> = x.chunks_exact(g).collect();
            let pairs: Vec<(f32, f32)> = groups
                .iter()
                .zip(&pairs)
                .map(|(xs, &p)| self.meta8_reach(xs, p))
                .collect();
            // The block scale: the largest group scale, rounded up to an f16 so no code needs c < 0.
            let top = pairs.iter().fold(0f32, |m, p| m.max(p.0)).min(F16_MAX);
            let mut top16 = f16::from_f32(top);
            if top16.to_f32() < top {
                top16 = f16::from_bits(top16.to_bits() + 1);
            }
            let top = top16.to_f32();
            let codes = self.meta8_codes(&groups, &pairs, top);
            bits::put_f16(out, 0, top);
            for (i, &(c, k)) in codes.iter().enumerate() {
                out[4 + i] = c;
                out[4 + d + i] = k as u8;
            }
            codes
                .iter()
                .map(|&(c, k)| self.meta8_pair(top, c, k))
                .collect()
        } else {
            for (i, &(s, z)) in pairs.iter().enumerate() {
                bits::put_f16(out, 2 * i, s);
                bits::put_f16(out, 2 * (d + i), z);
            }
            pairs
        };
        let rb = self.row_bytes();
        let mut codes = vec![0u32; d];
        for t in 0..g {
            for (c, code) in codes.iter_mut().enumerate() {
                let (s, z) = pairs[self.pair_of(t, c)];
                *code = self.code(x[t * d + c], s, z);
            }
            let off = self.codes_offset() + t * rb;
            bits::pack(&codes, self.bits as u32, &mut out[off..off + rb]);
        }
    }

    fn validate(&self, block: &[u8]) -> Result<()> {
        self.checked_pairs(block).map(|_| ())
    }

    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        let (scales, zeros) = self.checked_pairs(block)?;
        let (d, g) = (self.d, self.group);
        if out.len() != g * d {
            return Err(FormatError::Shape(format!(
                "decode of {g} x {d} values into {}",
                out.len()
            )));
        }
        for (t, row) in out.chunks_exact_mut(d).enumerate() {
            self.row_codes(block, t, row);
            for (c, v) in row.iter_mut().enumerate() {
                let i = self.pair_of(t, c);
                *v = zeros[i] + scales[i] * *v;
            }
        }
        Ok(())
    }

    /// Keys: folds the per-channel scales into the query once per block, then one dot product of
    /// codes per token plus the block's constant `sum_c q_c z_c` (the CUDA kernel's arithmetic).
    fn key_scores(
        &self,
        q: &[f32],
        prep: &[f32],
        block: &[u8],
        pos0: usize,
        rope: &Rope,
        scores: &mut [f32],
    ) {
        let (d, g) = (self.d, self.group);
        let (scales, zeros) = match self.checked_pairs(block) {
            Ok(pairs) if q.len() == d && scores.len() == g => pairs,
            _ => {
                scores.iter_mut().for_each(|s| *s = f32::NAN);
                return;
            }
        };
        if self.stream == Stream::Value || self.pre_rope {
            // Not a key layout, or keys that RoPE turns per token: score from decoded vectors.
            let _ = prep;
            crate::codec::scores_from_decoded(self, q, block, pos0, rope, scores);
            return;
        }
        let qs: Vec<f32> = q.iter().zip(&scales).map(|(a, s)| a * s).collect();
        let bias = dot(q, &zeros);
        let mut codes = vec![0f32; d];
        for (t, s) in scores.iter_mut().enumerate() {
            self.row_codes(block, t, &mut codes);
            *s = dot(&qs, &codes) + bias;
        }
    }

    /// Values: per token and channel group, `acc += (p_t s) code`, and `sum_t p_t z` is added once per
    /// group at the end (the CUDA kernel's arithmetic).
    fn accumulate_values(&self, block: &[u8], p: &[f32], acc: &mut [f32]) {
        let (d, g) = (self.d, self.group);
        let (scales, zeros) = match self.checked_pairs(block) {
            Ok(pairs) if acc.len() == d && p.len() == g => pairs,
            _ => {
                acc.iter_mut().for_each(|a| *a = f32::NAN);
                return;
            }
        };
        let mut codes = vec![0f32; d];
        if self.stream == Stream::Key {
            // Not a value layout: accumulate decoded vectors.
            let mut v = vec![0f32; g * d];
            if self.decode(block, &mut v).is_err() {
                acc.iter_mut().for_each(|a| *a = f32::NAN);
                return;
            }
            for (t, &pt) in p.iter().enumerate() {
                axpy(pt, &v[t * d..(t + 1) * d], acc);
            }
            return;
        }
        let gpt = self.groups_per_token();
        let mut zsum = vec![0f32; gpt];
        for (t, &pt) in p.iter().enumerate() {
            if pt == 0.0 {
                continue;
            }
            self.row_codes(block, t, &mut codes);
            for (gi, zs) in zsum.iter_mut().enumerate() {
                let i = t * gpt + gi;
                let ps = pt * scales[i];
                *zs += pt * zeros[i];
                axpy(
                    ps,
                    &codes[gi * g..(gi + 1) * g],
                    &mut acc[gi * g..(gi + 1) * g],
                );
            }
        }
        for (gi, zs) in zsum.iter().enumerate() {
            acc[gi * g..(gi + 1) * g].iter_mut().for_each(|a| *a += zs);
        }
    }
}
