//! The attention seam of the engine: [`AttentionBackend`] appends a layer's new K/V to each sequence's
//! cache and computes attention over it. [`HostCacheBackend`] is the first, reference implementation:
//! it round-trips through the host (CPU-encoded `LayerCache`s) and is correct but slow; a
//! GPU-resident backend (encode kernels, caches in device memory) replaces it behind the same trait.

use crate::attention::GpuBatch;
use crate::error::{drv, GpuError, Result};
use crate::gpu::Gpu;
use cudarc::driver::CudaSlice;
use half::f16;
use kvq_formats::{CacheBytes, KvPlan, LayerCache, Rope};
use std::collections::HashMap;

/// A sequence of the engine (an opaque handle, never reused within one engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// The rows one sequence contributes to a forward: `n` consecutive tokens at positions `pos..pos+n`.
/// A forward's rows are these groups back to back, in slice order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRows {
    /// The sequence.
    pub id: SeqId,
    /// Position of its first row (tokens already in its cache).
    pub pos: usize,
    /// Rows (tokens) of this sequence in the forward.
    pub n: usize,
}

/// Head geometry of the model an attention backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub hq: usize,
    /// KV heads.
    pub hkv: usize,
    /// Channels per head.
    pub d: usize,
}

impl Heads {
    /// The geometry of a model's config (one place reads it for every backend).
    pub fn of(c: &kvq_model::LlamaConfig) -> Self {
        Self {
            layers: c.n_layers,
            hq: c.n_heads,
            hkv: c.n_kv_heads,
            d: c.head_dim,
        }
    }
}

/// Owns the KV caches of every sequence and computes attention over them, one layer at a time.
///
/// `append_and_attend` gets, for the forward's rows (see [`SeqRows`]), the rotated queries
/// `q` [rows][hq][d], the keys *before* RoPE `k` and the values `v` [rows][hkv][d] (f32, on the GPU,
/// buffers possibly longer than needed); it must append k/v to each sequence's cache for `layer`
/// (so a chunk attends to itself, causally) and write `out` [rows][hq][d].
pub trait AttentionBackend {
    /// What runs where (logged by the engine: nothing falls back silently).
    fn describe(&self) -> String;
    /// True when `append_and_attend` wants layer `layer`'s keys already rotated by RoPE (GPU-resident
    /// caches store them so, unless the layer's key codec is pre-RoPE); false (the default) hands keys
    /// before RoPE, as the CPU caches take them.
    fn wants_rotated_keys(&self, layer: usize) -> bool {
        let _ = layer;
        false
    }
    /// True when `append_and_attend` only queues device work through the [`crate::Gpu`] (never reads
    /// device data back on the host), so a decode step can be recorded and replayed as a CUDA graph.
    fn device_only(&self) -> bool {
        false
    }
    /// Creates the caches of a new sequence holding up to `capacity` tokens.
    fn add_sequence(&mut self, id: SeqId, capacity: usize) -> Result<()>;
    /// Frees a sequence's caches (unknown ids are ignored).
    fn remove_sequence(&mut self, id: SeqId);
    /// Stages layer `layer`'s append of `rows` before the QKV split, for backends whose caches take
    /// new K/V straight from the split kernel (f16 window rings on the GPU): the split writes them at
    /// the returned place and `append_and_attend` then skips its own append (one kernel fewer per
    /// layer). None (the default): `append_and_attend` appends `k`/`v` itself.
    fn stage_ring_append(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        rows: &[SeqRows],
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<Option<crate::cache::RingDst>> {
        let _ = (gpu, layer, rows, k, v);
        Ok(None)
    }
    /// Appends this layer's K/V of `rows` and writes their attention output (see the trait docs) to
    /// `out`; true when `out16` holds it too, as f16 (the engine then skips a conversion kernel).
    #[allow(clippy::too_many_arguments)]
    fn append_and_attend(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        rows: &[SeqRows],
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        out16: &mut CudaSlice<f16>,
    ) -> Result<bool>;
    /// Cache memory of a sequence, all layers (None for unknown ids).
    fn kv_bytes(&self, id: SeqId) -> Option<CacheBytes>;
    /// Appends `n` tokens of given K/V ([n][hkv][d] f32, keys as `wants_rotated_keys` says) to one
    /// layer of sequence `id` without computing attention: benchmarks fill long caches this way,
    /// since a decode step's cost does not depend on the cached values. Unsupported by default.
    #[allow(clippy::too_many_arguments)]
    fn append_only(
        &mut self,
        _gpu: &Gpu,
        _layer: usize,
        _id: SeqId,
        _n: usize,
        _k: &CudaSlice<f32>,
        _v: &CudaSlice<f32>,
    ) -> Result<()> {
        Err(GpuError::Input(format!(
            "{}: cannot append K/V without a forward",
            self.describe()
        )))
    }
}

/// How [`HostCacheBackend`] computes a layer's decode-step attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodePath {
    /// The fused CUDA kernel over the uploaded packed caches (`GpuBatch`).
    Kernel,
    /// The CPU reference (`LayerCache::attend`), when the format or shape has no kernel.
    Cpu,
}

/// The reference backend: **round-trips through the host on every layer of every forward.**
///
/// It downloads the chunk's pre-RoPE K and V, appends them to each sequence's CPU
/// `kvq_formats::LayerCache` (encoding on the CPU, exactly as kvq-model does), then computes attention:
/// prefill chunks on the CPU through the caches' decoded mirror (kvq-model's `attend_chunk`), decode
/// steps (one token per sequence) with the fused GPU kernel after uploading the whole packed cache of
/// the batch (`GpuBatch::upload`, O(context) bytes per layer per step), or on the CPU where the plan's
/// format or the head shape has no kernel. Numbers match the CPU reference path; speed does not. It is
/// the yardstick the GPU-resident backend is checked against.
pub struct HostCacheBackend {
    plan: KvPlan,
    rope: Rope,
    heads: Heads,
    seqs: HashMap<SeqId, Vec<LayerCache>>,
    decode: Vec<DecodePath>,
    why_cpu: Vec<String>,
}

impl HostCacheBackend {
    /// A backend for `plan` (one entry per layer) over heads of `rope`'s dimension.
    pub fn new(plan: KvPlan, rope: Rope, heads: Heads) -> Result<Self> {
        if plan.n_layers() != heads.layers {
            return Err(GpuError::Input(format!(
                "KV plan has {} layers, the model {}",
                plan.n_layers(),
                heads.layers
            )));
        }
        if heads.hkv == 0 || !heads.hq.is_multiple_of(heads.hkv) || rope.head_dim() != heads.d {
            return Err(GpuError::Shape(format!(
                "{} query heads over {} KV heads of {} channels (RoPE for {})",
                heads.hq,
                heads.hkv,
                heads.d,
                rope.head_dim()
            )));
        }
        // Which layers the fused decode kernel serves: decided once, from the codecs and the shape.
        let probe = plan.build_caches(heads.hkv, &rope)?;
        let g = heads.hq / heads.hkv;
        let mut decode = Vec::with_capacity(heads.layers);
        let mut why_cpu = Vec::new();
        for (l, c) in probe.iter().enumerate() {
            let (kc, vc) = (c.keys().codec(), c.values().codec());
            let why = match (kc.kernel(), vc.kernel()) {
                _ if !matches!(heads.d, 64 | 128) => {
                    Some(format!("head_dim {} (kernels: 64, 128)", heads.d))
                }
                _ if g > 8 => Some(format!("{g} query heads per KV head (kernels: <= 8)")),
                (Some(ks), Some(vs))
                    if ks.module == vs.module
                        && kc.block_tokens() == vc.block_tokens()
                        && kc.pre_rope() == ks.pre_rope =>
                {
                    None
                }
                _ => Some(format!(
                    "{} / {}: no CUDA decode kernel",
                    kc.describe(),
                    vc.describe()
                )),
            };
            match why {
                None => decode.push(DecodePath::Kernel),
                Some(w) => {
                    decode.push(DecodePath::Cpu);
                    why_cpu.push(format!("layer {l}: {w}"));
                }
            }
        }
        Ok(Self {
            plan,
            rope,
            heads,
            seqs: HashMap::new(),
            decode,
            why_cpu,
        })
    }

    /// The caches of a sequence (tests compare them with the CPU path's).
    pub fn caches(&self, id: SeqId) -> Option<&[LayerCache]> {
        self.seqs.get(&id).map(|v| v.as_slice())
    }
}

impl AttentionBackend for HostCacheBackend {
    fn describe(&self) -> String {
        let k = self
            .decode
            .iter()
            .filter(|p| **p == DecodePath::Kernel)
            .count();
        let mut s = format!(
            "host-cache reference backend ({}): K/V round-trip through the host and are encoded on the CPU; prefill attention on the CPU; decode attention with the fused CUDA kernel on {k} of {} layers",
            self.plan.describe(),
            self.decode.len()
        );
        if !self.why_cpu.is_empty() {
            let first = &self.why_cpu[0];
            s.push_str(&format!(
                ", CPU reference on {} ({first}{})",
                self.why_cpu.len(),
                if self.why_cpu.len() > 1 { ", ..." } else { "" }
            ));
        }
        s
    }

    fn add_sequence(&mut self, id: SeqId, _capacity: usize) -> Result<()> {
        let caches = self.plan.build_caches(self.heads.hkv, &self.rope)?;
        self.seqs.insert(id, caches);
        Ok(())
    }

    fn remove_sequence(&mut self, id: SeqId) {
        self.seqs.remove(&id);
    }

    fn append_and_attend(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        rows: &[SeqRows],
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        _out16: &mut CudaSlice<f16>,
    ) -> Result<bool> {
        let Heads { hq, hkv, d, .. } = self.heads;
        let n: usize = rows.iter().map(|r| r.n).sum();
        if layer >= self.decode.len() {
            return Err(GpuError::Input(format!(
                "layer {layer} of a {}-layer plan",
                self.decode.len()
            )));
        }
        let (qn, kn) = (n * hq * d, n * hkv * d);
        for (what, have, want) in [
            ("queries", q.len(), qn),
            ("keys", k.len(), kn),
            ("values", v.len(), kn),
            ("output", out.len(), qn),
        ] {
            if have < want {
                return Err(GpuError::Shape(format!(
                    "{what}: {have} values on the GPU, {n} rows need {want}"
                )));
            }
        }
        let st = gpu.stream();
        let down = |x: &CudaSlice<f32>, len: usize, what: &str| -> Result<Vec<f32>> {
            let mut h = vec![0f32; len];
            st.memcpy_dtoh(&x.slice(0..len), &mut h)
                .map_err(drv(format!("downloading {what}")))?;
            Ok(h)
        };
        let (qh, kh, vh) = (
            down(q, qn, "queries")?,
            down(k, kn, "keys")?,
            down(v, kn, "values")?,
        );
        // Append every sequence's rows first (its chunk attends to itself).
        let mut off = 0;
        for r in rows {
            let caches = self
                .seqs
                .get_mut(&r.id)
                .ok_or_else(|| GpuError::Input(format!("unknown sequence {:?}", r.id)))?;
            let c = &mut caches[layer];
            if c.len() != r.pos {
                return Err(GpuError::Input(format!(
                    "sequence {:?} holds {} tokens, the forward starts at {}",
                    r.id,
                    c.len(),
                    r.pos
                )));
            }
            let (a, b) = (off * hkv * d, (off + r.n) * hkv * d);
            c.append(&kh[a..b], &vh[a..b], r.n)?;
            off += r.n;
        }
        let mut oh = vec![0f32; qn];
        let decode_step = rows.iter().all(|r| r.n == 1);
        if decode_step && self.decode[layer] == DecodePath::Kernel {
            let refs: Vec<&LayerCache> = rows
                .iter()
                .map(|r| &self.seqs[&r.id][layer]) // present: checked while appending
                .collect();
            let batch = GpuBatch::upload(gpu, &refs, 1, layer as u64)?;
            oh = batch.attend(gpu, &qh, hq)?;
        } else {
            let mut off = 0;
            for r in rows {
                let c = &self.seqs[&r.id][layer];
                let (a, b) = (off * hq * d, (off + r.n) * hq * d);
                let o = kvq_model::model::attend_chunk(c, &qh[a..b], r.pos, r.n, (hq, hkv, d))?;
                oh[a..b].copy_from_slice(&o);
                off += r.n;
            }
        }
        st.memcpy_htod(&oh, &mut out.slice_mut(0..qn))
            .map_err(drv("uploading the attention output"))?;
        Ok(false)
    }

    fn kv_bytes(&self, id: SeqId) -> Option<CacheBytes> {
        self.seqs
            .get(&id)
            .map(|c| kvq_formats::plan::total_bytes(c))
    }
}
