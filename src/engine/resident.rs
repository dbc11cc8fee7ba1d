//! The GPU-resident attention backend: every layer's compressed cache lives in device memory
//! ([`GpuLayerCache`]: window rings, CUDA encoders, shared page pool); a forward appends the rotated
//! keys and the values there and runs the fused decode kernel over one row per token (a prefill chunk
//! is rows with growing visible prefixes, i.e. causal). Nothing crosses to the host but bookkeeping.
//! It serves plans whose every layer has a CUDA encoder and decoder (fp16, KIVI/AsymKV, QJL, DecoQuant,
//! RVQ today).

use super::backend::{AttentionBackend, Heads, SeqId, SeqRows};
use crate::attention::Workspace;
use crate::cache::{CacheConfig, GpuLayerCache, RingDst};
use crate::error::{GpuError, Result};
use crate::gpu::Gpu;
use cudarc::driver::CudaSlice;
use kvq_formats::{CacheBytes, KvPlan, LayerCache, Rope};
use std::collections::HashMap;

/// Limits of a [`ResidentBackend`]: how many sequences, how long, and the largest prefill chunk.
#[derive(Debug, Clone, Copy)]
pub struct ResidentLimits {
    /// Sequences held at once.
    pub slots: usize,
    /// Most tokens per sequence.
    pub max_tokens: usize,
    /// Largest number of tokens one sequence appends in one forward (the prefill chunk).
    pub max_chunk: usize,
}

/// Attention over GPU-resident compressed caches (see the module docs).
pub struct ResidentBackend {
    layers: Vec<GpuLayerCache>,
    /// Per-layer (K, V) element bytes for accounting: (block bytes K+V per block, tokens per block).
    acct: Vec<(usize, usize)>,
    heads: Heads,
    limits: ResidentLimits,
    slots: HashMap<SeqId, usize>,
    free: Vec<usize>,
    /// Workspaces by (layer, rows), reused across steps.
    ws: HashMap<(usize, usize), Workspace>,
    plan: String,
    /// The QKV split writes new K/V into the rings (`stage_ring_append`); `KVQ_FUSED_APPEND=0` turns
    /// it off (the cache's append kernel, to compare).
    fused_append: bool,
}

impl ResidentBackend {
    /// Allocates every layer's cache for `limits` on `gpu`; errors name the layer whose format has no
    /// CUDA encoder/decoder, or the memory the pools need.
    pub fn new(
        gpu: &Gpu,
        plan: &KvPlan,
        rope: &Rope,
        heads: Heads,
        limits: ResidentLimits,
    ) -> Result<Self> {
        if plan.n_layers() != heads.layers {
            return Err(GpuError::Input(format!(
                "KV plan has {} layers, the model {}",
                plan.n_layers(),
                heads.layers
            )));
        }
        let probe: Vec<LayerCache> = plan.build_caches(heads.hkv, rope)?;
        let mut layers = Vec::with_capacity(heads.layers);
        let mut acct = Vec::with_capacity(heads.layers);
        for (l, c) in probe.iter().enumerate() {
            let (kc, vc) = (c.keys().codec(), c.values().codec());
            let cfg = CacheConfig {
                slots: limits.slots,
                hkv: heads.hkv,
                d: heads.d,
                max_tokens: limits.max_tokens,
                pool_pages: None,
                max_append: limits.max_chunk,
            };
            let gc = GpuLayerCache::new(gpu, kc, vc, cfg).map_err(|e| {
                GpuError::Shape(format!(
                    "layer {l} ({} / {}): {e}",
                    kc.describe(),
                    vc.describe()
                ))
            })?;
            acct.push((kc.block_bytes() + vc.block_bytes(), kc.block_tokens()));
            layers.push(gc);
        }
        Ok(Self {
            layers,
            acct,
            heads,
            limits,
            slots: HashMap::new(),
            free: (0..limits.slots).rev().collect(),
            ws: HashMap::new(),
            plan: plan.describe(),
            fused_append: std::env::var("KVQ_FUSED_APPEND").map_or(true, |v| v != "0"),
        })
    }

    /// (slot, tokens) to append and (slot, visible prefix) to attend for the forward's `rows` of
    /// `layer`, each sequence checked to be at the position its cache holds.
    #[allow(clippy::type_complexity)]
    fn rows_of(
        &self,
        layer: usize,
        rows: &[SeqRows],
    ) -> Result<(Vec<(usize, usize)>, Vec<(usize, usize)>)> {
        let gc = self.layers.get(layer).ok_or_else(|| {
            GpuError::Input(format!(
                "layer {layer} of a {}-layer cache",
                self.heads.layers
            ))
        })?;
        let mut counts = Vec::with_capacity(rows.len());
        let mut att_rows = Vec::new();
        for r in rows {
            let slot = self.slot(r.id)?;
            let have = gc.len(slot);
            if have != r.pos {
                return Err(GpuError::Input(format!(
                    "sequence {:?} at position {} but its layer-{layer} cache holds {have} tokens",
                    r.id, r.pos
                )));
            }
            counts.push((slot, r.n));
            att_rows.extend((1..=r.n).map(|i| (slot, r.pos + i)));
        }
        Ok((counts, att_rows))
    }

    /// Whether the QKV split writes new K/V into the rings (default: on unless `KVQ_FUSED_APPEND=0`);
    /// off, the cache's own append kernel does (checks compare the two).
    pub fn with_fused_append(mut self, on: bool) -> Self {
        self.fused_append = on;
        self
    }

    fn slot(&self, id: SeqId) -> Result<usize> {
        self.slots
            .get(&id)
            .copied()
            .ok_or_else(|| GpuError::Input(format!("unknown sequence {id:?}")))
    }
}

impl AttentionBackend for ResidentBackend {
    fn describe(&self) -> String {
        format!(
            "GPU-resident compressed cache ({}; {} slots x {} tokens): CUDA encoders and fused decode kernels",
            self.plan, self.limits.slots, self.limits.max_tokens
        )
    }

    fn wants_rotated_keys(&self, layer: usize) -> bool {
        self.layers
            .get(layer)
            .is_none_or(|c| !c.wants_unrotated_keys())
    }

    fn device_only(&self) -> bool {
        true
    }

    fn add_sequence(&mut self, id: SeqId, capacity: usize) -> Result<()> {
        if capacity > self.limits.max_tokens {
            return Err(GpuError::Input(format!(
                "a sequence of {capacity} tokens: this GPU cache holds at most {} per sequence",
                self.limits.max_tokens
            )));
        }
        let slot = self.free.pop().ok_or_else(|| {
            GpuError::Input(format!(
                "all {} sequence slots of the GPU cache are in use",
                self.limits.slots
            ))
        })?;
        self.slots.insert(id, slot);
        Ok(())
    }

    fn remove_sequence(&mut self, id: SeqId) {
        if let Some(slot) = self.slots.remove(&id) {
            for l in &mut self.layers {
                // A known slot always frees; nothing to report.
                let _ = l.free_slot(slot);
            }
            self.free.push(slot);
        }
    }

    fn stage_ring_append(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        rows: &[SeqRows],
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<Option<RingDst>> {
        // (pre-RoPE key codecs keep the append kernel, which also stores their unrotated copy)
        if !self.fused_append || !self.wants_rotated_keys(layer) {
            return Ok(None);
        }
        let (counts, _) = self.rows_of(layer, rows)?;
        self.layers[layer].stage_ring_append(gpu, &counts, k, v)
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
        out16: &mut CudaSlice<half::f16>,
    ) -> Result<bool> {
        let Heads { hq, .. } = self.heads;
        let (counts, att_rows) = self.rows_of(layer, rows)?;
        let gc = &mut self.layers[layer];
        // A staged append (its rows already in the rings by the split): seal and commit it.
        if !gc.finish_staged(gpu, &counts)? {
            gc.append(gpu, &counts, k, v)?;
        }
        let n = att_rows.len();
        let ws = match self.ws.entry((layer, n)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let ws = e.into_mut();
                gc.kv().set_rows(gpu, ws, &att_rows)?;
                ws
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(gc.workspace(gpu, &att_rows, hq)?)
            }
        };
        gc.kv().launch_into(gpu, ws, q, out, out16)?;
        Ok(true)
    }

    fn append_only(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        id: SeqId,
        n: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<()> {
        let slot = self.slot(id)?;
        let gc = self.layers.get_mut(layer).ok_or_else(|| {
            GpuError::Input(format!(
                "layer {layer} of a {}-layer cache",
                self.heads.layers
            ))
        })?;
        gc.append(gpu, &[(slot, n)], k, v)
    }

    fn kv_bytes(&self, id: SeqId) -> Option<CacheBytes> {
        let slot = *self.slots.get(&id)?;
        let Heads { hkv, d, .. } = self.heads;
        let mut b = CacheBytes::default();
        for (l, &(block_bytes, bt)) in self.layers.iter().zip(&self.acct) {
            let len = l.len(slot);
            let sealed = l.kv().sealed(slot);
            b.tokens = len;
            b.packed += sealed / bt.max(1) * block_bytes * hkv;
            b.window += (len - sealed) * hkv * d * 2 * 2;
            b.elems += len * hkv * d * 2;
        }
        Some(b)
    }
}
