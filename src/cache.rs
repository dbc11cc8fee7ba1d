//! The GPU-resident compressed cache of one layer for many sequences: new tokens are appended to f16
//! window rings on the device, and each block that leaves the window is packed by the format's CUDA
//! encoder straight into a page taken from a shared pool. Nothing goes through the host but the
//! bookkeeping (lengths, page ids). It keeps the CPU reference's rules (`kvq_formats::LayerCache`):
//! a block is sealed once the window plus one whole block of tokens wait, so both hold the same bytes.

use crate::attention::{DeviceKv, KvShape, Workspace};
use crate::error::{drv, GpuError, Result};
use crate::gpu::{kernel_name, Gpu};
use crate::launch;
use crate::params::{KvqEncodeParams, KvqFmtArgs};
use cudarc::driver::{CudaSlice, DevicePtr};
use kvq_formats::Codec;

/// Sizes of a [`GpuLayerCache`].
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Sequences held at once (slots).
    pub slots: usize,
    /// KV heads.
    pub hkv: usize,
    /// Channels per head.
    pub d: usize,
    /// Most tokens one sequence may hold.
    pub max_tokens: usize,
    /// Pages in the shared pool (all slots); `None` gives every slot room for `max_tokens`.
    pub pool_pages: Option<usize>,
    /// Most tokens one sequence appends in one call (a prefill chunk).
    pub max_append: usize,
}

/// One layer's compressed K/V for `slots` sequences on the GPU.
pub struct GpuLayerCache {
    kv: DeviceKv,
    /// Pre-RoPE key codecs: the window's keys before RoPE (what the encoder reads), beside the rotated
    /// ring attention reads.
    k_pre: Option<CudaSlice<u16>>,
    window: usize,
    max_tokens: usize,
    max_append: usize,
    /// Pages of each slot, in order.
    pages: Vec<Vec<i32>>,
    /// How many of each slot's pages its device page-table row already holds (only new ones go up).
    table_rows: Vec<usize>,
    free: Vec<i32>,
    /// Tokens of each slot.
    len: Vec<usize>,
    k_ints: [i32; 4],
    v_ints: [i32; 4],
    /// Device copy of the last append's plan (grown on demand, reused across appends).
    idx_dev: CudaSlice<i32>,
    /// Dynamic shared memory of the format's encoder (bytes), read once at creation.
    enc_smem: usize,
    /// An append staged for the QKV split to write (`stage_ring_append`), sealed by `finish_staged`.
    staged: Option<(Vec<(usize, usize)>, KvqEncodeParams)>,
}

/// Where a kernel that produces new K/V rows writes them into a [`GpuLayerCache`]'s f16 window rings
/// in place of the cache's append kernel (kvq_model_qkv_split's ring arguments): device pointers of the
/// rings and of the staged plan's (slot, token) per row.
#[derive(Debug, Clone, Copy)]
pub struct RingDst {
    /// Key ring, f16 [slots][hkv][win_cap][d].
    pub k: u64,
    /// Value ring, same shape.
    pub v: u64,
    /// Slot of each row, i32 [rows].
    pub slot: u64,
    /// Absolute token index of each row, i32 [rows] (ring row = token % win_cap).
    pub tok: u64,
    /// Ring rows per (slot, head).
    pub win_cap: usize,
    /// Rows staged: the producing kernel must write exactly these.
    pub rows: usize,
    /// KV heads and channels per head of the rings.
    pub hkv: usize,
    /// Channels per head.
    pub d: usize,
}

/// Host-built index arrays of one append, uploaded as one buffer.
struct AppendPlan {
    row_slot: Vec<i32>,
    row_tok: Vec<i32>,
    job_slot: Vec<i32>,
    job_tok: Vec<i32>,
    job_page: Vec<i32>,
    job_blk: Vec<i32>,
}

impl GpuLayerCache {
    /// An empty cache for codecs `kc` / `vc` (one layer of a KV plan).
    pub fn new(gpu: &Gpu, kc: &dyn Codec, vc: &dyn Codec, cfg: CacheConfig) -> Result<Self> {
        if kc.window() != vc.window() {
            return Err(GpuError::Shape(format!(
                "K ({}) and V ({}) windows differ",
                kc.describe(),
                vc.describe()
            )));
        }
        let bt = kc.block_tokens();
        // (A pre-RoPE codec whose kernel does not rotate keys is refused by DeviceKv::new below.)
        let module = kc
            .kernel()
            .ok_or_else(|| GpuError::Shape(format!("{} has no CUDA kernel yet", kc.describe())))?
            .module;
        let (page_blocks, ..) = gpu.layout(module)?;
        // The format needs its CUDA encoder (not every decode kernel has one yet).
        gpu.function(module, &kernel_name(module, "encode", "f16", cfg.d))
            .map_err(|_| {
                GpuError::Shape(format!(
                    "{} has no CUDA encoder for head_dim {} (encoders: fp16, KIVI/AsymKV, QJL, DecoQuant, RVQ at 64, 128)",
                    kc.describe(),
                    cfg.d
                ))
            })?;
        // The encoder's dynamic shared memory: what the module states, else the block's values as f32
        // then the default scratch (2*D f32 pairs and BT*D u8 codes, KIVI's). Read once: reading the
        // module's global copies from the device and waits for the stream, which every append did
        // before, a host-device round trip in each layer of each decode step (the likely reason
        // run 17's chained steps still waited for the step before; run 18: a B=1 8B step now waits
        // 0.2 ms for the host instead of 0.4-0.7).
        let enc_smem = gpu
            .encode_smem(module, cfg.d)?
            .unwrap_or(bt * cfg.d * 4 + 8 * cfg.d + bt * cfg.d);
        let most = gpu.max_smem_per_block()?;
        if enc_smem > most {
            return Err(GpuError::Shape(format!(
                "{module}'s encoder needs {enc_smem} bytes of shared memory for blocks of {bt} tokens \
                 at head_dim {}; this GPU allows {most}",
                cfg.d
            )));
        }
        let page_tokens = page_blocks * bt;
        let max_pages = cfg.max_tokens.div_ceil(page_tokens).max(1);
        let pool_pages = cfg.pool_pages.unwrap_or(max_pages * cfg.slots);
        let win_cap = kc.window() + bt + cfg.max_append.max(1);
        let kv = DeviceKv::new(
            gpu,
            kc,
            vc,
            KvShape {
                slots: cfg.slots,
                hkv: cfg.hkv,
                d: cfg.d,
                max_pages,
                pool_pages,
                win_cap,
            },
        )?;
        let ints = |c: &dyn Codec| c.kernel().map(|s| s.ints).unwrap_or_default();
        let k_pre = if kc.pre_rope() {
            let n = cfg.slots * cfg.hkv * win_cap * cfg.d;
            Some(
                gpu.stream()
                    .alloc_zeros::<u16>(n)
                    .map_err(drv("allocating the pre-RoPE key window"))?,
            )
        } else {
            None
        };
        Ok(Self {
            k_pre,
            kv,
            window: kc.window(),
            max_tokens: cfg.max_tokens,
            max_append: cfg.max_append.max(1),
            pages: vec![Vec::new(); cfg.slots],
            table_rows: vec![0; cfg.slots],
            free: (0..pool_pages as i32).rev().collect(),
            len: vec![0; cfg.slots],
            k_ints: ints(kc),
            v_ints: ints(vc),
            enc_smem,
            idx_dev: gpu
                .stream()
                .alloc_zeros::<i32>(1024)
                .map_err(drv("allocating the append plan"))?,
            staged: None,
        })
    }

    /// The device cache the decode kernel reads.
    pub fn kv(&self) -> &DeviceKv {
        &self.kv
    }

    /// Tokens held by `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.len.get(slot).copied().unwrap_or(0)
    }

    /// Pages still free in the pool.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Empties `slot` and returns its pages to the pool.
    pub fn free_slot(&mut self, slot: usize) -> Result<()> {
        let pages = self
            .pages
            .get_mut(slot)
            .ok_or_else(|| GpuError::Shape(format!("no slot {slot}")))?;
        self.free.append(pages);
        self.table_rows[slot] = 0;
        self.len[slot] = 0;
        self.kv.host_sealed[slot] = 0;
        self.kv.host_win[slot] = 0;
        Ok(())
    }

    /// Appends tokens: `counts[i]` = (slot, n) in the order of the rows of `k` / `v` ([rows][Hkv][D],
    /// f32, keys already rotated, or before RoPE when [`GpuLayerCache::wants_unrotated_keys`]), then
    /// seals every block that has left the window. Checks lengths and pool space before touching anything.
    pub fn append(
        &mut self,
        gpu: &Gpu,
        counts: &[(usize, usize)],
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<()> {
        let p = self.prepare(gpu, counts, k, v)?;
        let op = if self.k_pre.is_some() {
            "append_prerope"
        } else {
            "append"
        };
        let append = gpu.function("cache", &kernel_name("cache", op, "f32", self.kv.shape.d))?;
        launch::append(gpu, &append, &p, self.kv.shape.d)?;
        self.commit(gpu, counts, &p)
    }

    /// Stages an append (as [`GpuLayerCache::append`]: plan checked, pages taken, rows uploaded) whose
    /// rows the kernel that produces them writes into the rings itself, at the returned [`RingDst`]
    /// (one launch fewer per layer); [`GpuLayerCache::finish_staged`] then seals and commits it (an
    /// append staged and never finished is dropped by the next one). None when keys are pre-RoPE: the
    /// append kernel also keeps their unrotated copy.
    pub fn stage_ring_append(
        &mut self,
        gpu: &Gpu,
        counts: &[(usize, usize)],
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<Option<RingDst>> {
        if self.k_pre.is_some() {
            return Ok(None);
        }
        let p = self.prepare(gpu, counts, k, v)?;
        self.staged = Some((counts.to_vec(), p));
        Ok(Some(RingDst {
            k: p.k_win,
            v: p.v_win,
            slot: p.row_slot,
            tok: p.row_tok,
            win_cap: self.kv.shape.win_cap,
            rows: p.rows as usize,
            hkv: self.kv.shape.hkv,
            d: self.kv.shape.d,
        }))
    }

    /// Seals and commits the append staged by [`GpuLayerCache::stage_ring_append`] once its rows are in
    /// the rings (`counts` must be the staged ones); false when none is staged.
    pub fn finish_staged(&mut self, gpu: &Gpu, counts: &[(usize, usize)]) -> Result<bool> {
        let Some((staged, p)) = self.staged.take() else {
            return Ok(false);
        };
        if staged != counts {
            let msg = format!("finishing an append staged for {staged:?} with rows {counts:?}");
            self.staged = Some((staged, p));
            self.abandon_staged();
            return Err(GpuError::Shape(msg));
        }
        self.commit(gpu, counts, &p)?;
        Ok(true)
    }

    /// Drops a staged append that was never finished: the pages its plan took return to the pool
    /// (each slot keeps what its committed length has sealed), the rows the split may have written
    /// into the rings are past that length and get overwritten.
    fn abandon_staged(&mut self) {
        let Some((counts, _)) = self.staged.take() else {
            return;
        };
        let (bt, pb) = (self.kv.block_tokens, self.kv.page_blocks);
        for (slot, _) in counts {
            let sealed = Self::sealed_for(self.len[slot], self.window, bt);
            let keep = (sealed / bt).div_ceil(pb);
            while self.pages[slot].len() > keep {
                if let Some(page) = self.pages[slot].pop() {
                    self.free.push(page);
                }
            }
        }
    }

    /// The checked plan of an append, uploaded, as the append and encode kernels' parameters.
    fn prepare(
        &mut self,
        gpu: &Gpu,
        counts: &[(usize, usize)],
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<KvqEncodeParams> {
        // A staged append never finished (the forward that staged it failed before attention):
        // give its pages back, so the other sequences of this layer go on (its length never moved).
        self.abandon_staged();
        let (hkv, d) = (self.kv.shape.hkv, self.kv.shape.d);
        let rows: usize = counts.iter().map(|c| c.1).sum();
        if k.len() < rows * hkv * d || v.len() < rows * hkv * d {
            return Err(GpuError::Shape(format!(
                "append of {rows} tokens needs {} values in K and V, got {} and {}",
                rows * hkv * d,
                k.len(),
                v.len()
            )));
        }
        let plan = self.plan(counts)?;
        let st = gpu.stream();
        let idx: Vec<i32> = [
            &plan.row_slot,
            &plan.row_tok,
            &plan.job_slot,
            &plan.job_tok,
            &plan.job_page,
            &plan.job_blk,
        ]
        .iter()
        .flat_map(|v| v.iter().copied())
        .chain(std::iter::once(0))
        .collect();
        if self.idx_dev.len() < idx.len() {
            self.idx_dev = st
                .alloc_zeros::<i32>(idx.len().next_power_of_two())
                .map_err(drv("allocating the append plan"))?;
        }
        // Stream order keeps the previous append's kernels reading their plan before this copy.
        gpu.upload(&idx, &mut self.idx_dev.slice_mut(..idx.len()))?;
        let base = self.idx_dev.device_ptr(st).0;
        let jobs = plan.job_slot.len();
        let at = |i: usize| base + 4 * i as u64;
        let mut ints = [0i32; 8];
        ints[..4].copy_from_slice(&self.k_ints);
        ints[4..].copy_from_slice(&self.v_ints);
        let kv = &self.kv;
        Ok(KvqEncodeParams {
            k_pages: kv.k_pages.device_ptr(st).0,
            v_pages: kv.v_pages.device_ptr(st).0,
            k_win: kv.k_win.device_ptr(st).0,
            v_win: kv.v_win.device_ptr(st).0,
            k_pre: self.k_pre.as_ref().map_or(0, |r| r.device_ptr(st).0),
            k_new: k.device_ptr(st).0,
            v_new: v.device_ptr(st).0,
            row_slot: at(0),
            row_tok: at(rows),
            job_slot: at(2 * rows),
            job_tok: at(2 * rows + jobs),
            job_page: at(2 * rows + 2 * jobs),
            job_blk: at(2 * rows + 3 * jobs),
            k_block_bytes: kv.k_block_bytes as i64,
            v_block_bytes: kv.v_block_bytes as i64,
            rows: rows as i32,
            jobs: jobs as i32,
            hkv: hkv as i32,
            win_cap: kv.shape.win_cap as i32,
            page_blocks: kv.page_blocks as i32,
            block_tokens: kv.block_tokens as i32,
            // p[0], p[1]: the key and value formats' tables (QJL's sketch, RVQ's codebooks and the
            // pre-RoPE rope header), as the decode kernel gets them.
            fmt: KvqFmtArgs {
                i: ints,
                p: {
                    let [k, v] = kv.table_ptrs(st);
                    [k, v, 0, 0]
                },
            },
        })
    }

    /// Seals the blocks an append's rows pushed out of the window and commits its lengths and pages.
    fn commit(&mut self, gpu: &Gpu, counts: &[(usize, usize)], p: &KvqEncodeParams) -> Result<()> {
        let kv = &self.kv;
        let module = kv.k_spec.module;
        let encode = gpu.function(module, &kernel_name(module, "encode", "f16", kv.shape.d))?;
        let bt = kv.block_tokens;
        launch::encode(gpu, &encode, p, self.enc_smem)?;
        // Commit the bookkeeping: pages were taken in `plan`; lengths now.
        for &(slot, n) in counts {
            self.len[slot] += n;
        }
        for (slot, l) in self.len.iter().enumerate() {
            let sealed = Self::sealed_for(*l, self.window, bt);
            self.kv.host_sealed[slot] = sealed;
            self.kv.host_win[slot] = l - sealed;
        }
        self.kv.sync_lengths(gpu)?;
        // Page-table entries of the pages this append took (most steps take none).
        for &(slot, _) in counts {
            let (have, now) = (self.table_rows[slot], self.pages[slot].len());
            if now == have {
                continue;
            }
            let off = slot * self.kv.shape.max_pages;
            let mut view = self.kv.page_table.slice_mut(off + have..off + now);
            gpu.upload(&self.pages[slot][have..now], &mut view)?;
            self.table_rows[slot] = now;
        }
        Ok(())
    }

    /// Tokens sealed into blocks for a sequence of `len` tokens (LayerCache's rule).
    fn sealed_for(len: usize, window: usize, bt: usize) -> usize {
        if len < window + bt {
            0
        } else {
            (len - window) / bt * bt
        }
    }

    /// True when [`GpuLayerCache::append`] takes keys before RoPE (a pre-RoPE key codec: the cache
    /// rotates the window's copy itself), false when it takes them rotated.
    pub fn wants_unrotated_keys(&self) -> bool {
        self.k_pre.is_some()
    }

    /// Rows and seal jobs of an append; takes the pages it needs from the pool (all or none).
    fn plan(&mut self, counts: &[(usize, usize)]) -> Result<AppendPlan> {
        let bt = self.kv.block_tokens;
        let pb = self.kv.page_blocks;
        let mut seen = vec![false; self.len.len()];
        let mut plan = AppendPlan {
            row_slot: vec![],
            row_tok: vec![],
            job_slot: vec![],
            job_tok: vec![],
            job_page: vec![],
            job_blk: vec![],
        };
        let mut need_pages = 0;
        for &(slot, n) in counts {
            if slot >= self.len.len() || std::mem::replace(&mut seen[slot], true) {
                return Err(GpuError::Shape(format!(
                    "append: slot {slot} unknown or listed twice ({} slots)",
                    self.len.len()
                )));
            }
            let l = self.len[slot];
            if n > self.max_append || l + n > self.max_tokens {
                return Err(GpuError::Shape(format!(
                    "append of {n} tokens to a sequence of {l}: at most {} per call and {} in all",
                    self.max_append, self.max_tokens
                )));
            }
            let (s0, s1) = (
                Self::sealed_for(l, self.window, bt),
                Self::sealed_for(l + n, self.window, bt),
            );
            need_pages += (s1 / bt).div_ceil(pb) - (s0 / bt).div_ceil(pb);
        }
        if need_pages > self.free.len() {
            return Err(GpuError::OutOfMemory {
                what: format!("{need_pages} more KV cache pages"),
                need: need_pages,
                free: self.free.len(),
            });
        }
        for &(slot, n) in counts {
            let l = self.len[slot];
            for t in l..l + n {
                plan.row_slot.push(slot as i32);
                plan.row_tok.push(t as i32);
            }
            let (s0, s1) = (
                Self::sealed_for(l, self.window, bt),
                Self::sealed_for(l + n, self.window, bt),
            );
            for blk in s0 / bt..s1 / bt {
                if blk % pb == 0 {
                    let page = self
                        .free
                        .pop()
                        .ok_or_else(|| GpuError::Shape("page pool accounting broke".into()))?;
                    self.pages[slot].push(page);
                }
                plan.job_slot.push(slot as i32);
                plan.job_tok.push((blk * bt) as i32);
                plan.job_page.push(self.pages[slot][blk / pb]);
                plan.job_blk.push((blk % pb) as i32);
            }
        }
        Ok(plan)
    }

    /// Buffers for attention over `rows` (slot, visible tokens).
    pub fn workspace(&self, gpu: &Gpu, rows: &[(usize, usize)], hq: usize) -> Result<Workspace> {
        self.kv.workspace(gpu, rows, hq)
    }
}

#[cfg(test)]
mod tests {
    use super::GpuLayerCache;
    use kvq_formats::{KvPlan, Rope, RopeStyle};

    /// The GPU cache seals exactly when the CPU reference does, for every window, block size and length
    /// (appends of uneven sizes), so both hold the same blocks.
    #[test]
    fn sealing_rule_matches_the_cpu_cache() {
        let rope = Rope::new(64, 10000.0, RopeStyle::Interleaved);
        for fmt in [
            "fp16",
            "kivi:bits=2",
            "kivi:bits=4,window=0",
            "kivi:bits=2,window=7,group=16",
        ] {
            let plan = KvPlan::parse(fmt, 1).unwrap();
            let mut c = plan.build_caches(1, &rope).unwrap().remove(0);
            let (w, bt) = (c.keys().codec().window(), c.keys().codec().block_tokens());
            let mut len = 0;
            for step in [1usize, 3, 31, 1, 64, 5, 200, 1, 1, 77] {
                let x = vec![0.5f32; step * 64];
                c.append(&x, &x, step).unwrap();
                len += step;
                assert_eq!(
                    GpuLayerCache::sealed_for(len, w, bt),
                    c.keys().sealed(),
                    "{fmt} at {len} tokens"
                );
            }
        }
    }
}
