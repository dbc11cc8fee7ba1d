//! Fused decode attention over compressed caches on the GPU. [`DeviceKv`] is one layer's K/V in the
//! kernels' layout (page pools, page table, f16 window rings, lengths); one launch (plus the split
//! merge) computes one query token per batch row and query head directly from the packed bytes.
//! [`GpuBatch::upload`] fills a `DeviceKv` from CPU caches (tests, benchmarks); the engine's cache
//! (`crate::cache::GpuLayerCache`) fills it with the GPU encode kernels.

use crate::error::{drv, GpuError, Result};
use crate::gpu::{kernel_name, Gpu};
use crate::launch;
use crate::params::{KvqDecodeParams, KvqFmtArgs};
use cudarc::driver::{CudaSlice, DevicePtr};
use kvq_formats::{Codec, KernelSpec, LayerCache, Stream};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Warps per decode CTA (kernels/include/kvq_decode.cuh's WARPS).
const WARPS: usize = 4;

/// The shape of a [`DeviceKv`]: how many cache slots, pages and window rows it holds.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    /// Sequences (cache slots).
    pub slots: usize,
    /// KV heads.
    pub hkv: usize,
    /// Channels per head.
    pub d: usize,
    /// Page table row length (most pages one sequence may use).
    pub max_pages: usize,
    /// Pages in the pool, all slots together.
    pub pool_pages: usize,
    /// Rows of each (slot, head) window ring.
    pub win_cap: usize,
}

/// One layer's K/V of several sequences, resident on the GPU in the kernels' layout.
pub struct DeviceKv {
    /// The key format's per-layer table (QJL's sketch, RVQ's codebooks), `KvqFmtArgs.p[0]`.
    table: Option<CudaSlice<u8>>,
    /// The value format's per-layer table (RVQ's codebooks), `KvqFmtArgs.p[1]`.
    v_table: Option<CudaSlice<u8>>,
    /// Dynamic shared memory the kernel keeps past the page stages (RVQ's decoded rows, buffered scores
    /// and, when they fit, codebooks), all warps.
    extra_smem: usize,
    pub(crate) k_pages: CudaSlice<u8>,
    pub(crate) v_pages: CudaSlice<u8>,
    pub(crate) page_table: CudaSlice<i32>,
    pub(crate) k_win: CudaSlice<u16>,
    pub(crate) v_win: CudaSlice<u16>,
    pub(crate) n_sealed: CudaSlice<i32>,
    pub(crate) n_win: CudaSlice<i32>,
    /// Host copy of the sealed token counts (sizes the split count).
    pub(crate) host_sealed: Vec<usize>,
    /// Host copy of the window token counts.
    pub(crate) host_win: Vec<usize>,
    /// Slots, heads, pages, ring rows.
    pub shape: KvShape,
    /// Block stride in the pools (the codec's block bytes padded to 16).
    pub(crate) k_block_bytes: usize,
    /// The codecs' own block bytes (what is read and reported).
    pub(crate) k_block_real: usize,
    pub(crate) v_block_real: usize,
    pub(crate) v_block_bytes: usize,
    pub(crate) block_tokens: usize,
    pub(crate) page_blocks: usize,
    pub(crate) stages: usize,
    /// Shared memory of one pipeline stage, all warps.
    stage_bytes: usize,
    /// Tokens per unit the kernel splits a sequence in (a page, or the format's largest work unit).
    split_tokens: usize,
    /// Tokens per tile of formats read in tiles smaller than a block (0: whole pages), the smallest
    /// work unit such a format can be split in.
    tile_tokens: usize,
    /// Keeps tiled formats at their largest work unit at every context (the parity check runs them
    /// both ways, since its short cases would otherwise only ever see shrunken units).
    pub(crate) whole_units: bool,
    pub(crate) k_spec: KernelSpec,
    pub(crate) v_spec: KernelSpec,
    /// Decode CTAs resident at once on the whole GPU (sizes the split count to one wave).
    cta_slots: usize,
}

impl DeviceKv {
    /// Allocates an empty cache (zeroed pools, lengths 0) for codecs `kc` / `vc`; errors when they have
    /// no CUDA kernel, disagree on kernel or block size, or do not fit the GPU's memory.
    pub fn new(gpu: &Gpu, kc: &dyn Codec, vc: &dyn Codec, shape: KvShape) -> Result<Self> {
        let what = |s: &str| GpuError::Shape(format!("{s} has no CUDA kernel yet"));
        let k_spec = kc.kernel().ok_or_else(|| what(&kc.describe()))?;
        let v_spec = vc.kernel().ok_or_else(|| what(&vc.describe()))?;
        // The key codec's module holds the kernel; it must have a variant for the value codec's tag
        // (checked when the kernel is looked up below), and both must share the block size.
        let tiled = |t: (usize, usize, usize)| (t.1 > 0, t.2);
        if kc.block_tokens() != vc.block_tokens() || tiled(v_spec.tile) != tiled(k_spec.tile) {
            return Err(GpuError::Shape(format!(
                "K ({}) and V ({}) must share the block size and tiling",
                kc.describe(),
                vc.describe()
            )));
        }
        // Blocks sit at a stride padded to 16 bytes (16-byte copies; QJL blocks are 4-byte multiples).
        let (kreal, vreal, bt) = (kc.block_bytes(), vc.block_bytes(), kc.block_tokens());
        let (kbb, vbb) = (kreal.next_multiple_of(16), vreal.next_multiple_of(16));
        let (page_blocks, max_stages, tile_tokens, rows_per_ch) = gpu.layout(k_spec.module)?;
        if kc.pre_rope() != k_spec.pre_rope {
            return Err(GpuError::Shape(format!(
                "{} stores keys before RoPE, its kernel does not rotate them: not on the GPU yet",
                kc.describe()
            )));
        }
        // As many pipeline stages as fit (large blocks, e.g. 8-bit codes, get fewer), 24 KiB kept for
        // the kernels' static shared memory (QJL's S q and queries take 21 KiB at m = 512; at m <= 256 its
        // per-warp outlier-row tables bring that to 30 KiB, but QJL's two stages are far below the room,
        // so the reserve never binds it). KVQ_STAGES lowers it (tuning experiments).
        let per_stage = WARPS
            * if tile_tokens == 0 {
                page_blocks * (kbb + vbb)
            } else {
                let tile = |t: (usize, usize, usize)| t.0 + tile_tokens * t.1;
                tile(k_spec.tile) + tile(v_spec.tile)
            };
        let rows = WARPS * rows_per_ch * shape.d;
        let room = gpu.max_smem_per_block()?.saturating_sub(24 << 10);
        let limit = room.saturating_sub(rows);
        let mut stages = max_stages.min(4).min(limit / per_stage);
        if let Some(s) = std::env::var("KVQ_STAGES")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            stages = stages.min(s);
        }
        if stages == 0 {
            return Err(GpuError::Shape(format!(
                "{} / {}: one page stage needs {per_stage} bytes of shared memory, the GPU allows {limit}",
                kc.describe(),
                vc.describe()
            )));
        }
        let s = shape;
        let pool = s.pool_pages.max(1) * s.hkv * page_blocks;
        let ring = s.slots * s.hkv * s.win_cap.max(1) * s.d;
        let need = pool * (kbb + vbb) + 4 * ring + 4 * s.slots * (s.max_pages + 2);
        let (free, _) = gpu.mem_info()?;
        if need > free {
            return Err(GpuError::OutOfMemory {
                what: format!(
                    "a KV cache of {} pages x {} heads ({} / {})",
                    s.pool_pages,
                    s.hkv,
                    kc.describe(),
                    vc.describe()
                ),
                need,
                free,
            });
        }
        // The formats' tables the kernel copies into shared memory (RVQ's f16 books), when they fit
        // beside the stages and rows (the kernel reads them from global memory otherwise).
        let books = k_spec.smem_table.max(v_spec.smem_table);
        let extra = if stages * per_stage + rows + books <= room {
            rows + books
        } else {
            rows
        };
        let smem = Self::smem(stages * per_stage + extra, s.d);
        let decode = gpu.function(k_spec.module, &Self::decode_name(&k_spec, &v_spec, s.d))?;
        // Raise the function's dynamic shared memory limit (48 KiB less its static memory until raised)
        // before the occupancy query: a request above it reads as 0 CTAs per SM, which this took as 1
        // for kernels not yet launched in the process (the launch raised it), so the cache planned a
        // quarter of its splits: run 13's KIVI-2 and QJL at B=8, 128k took 2.3x run 12's time that
        // way (confirmed in run 14, which also found KIVI-4 and DecoQuant-4 held back).
        use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        decode
            .set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(drv("setting the decode kernel's shared memory"))?;
        let per_sm = decode
            .occupancy_max_active_blocks_per_multiprocessor(128, smem, None)
            .map_err(drv("querying the decode kernel's occupancy"))?;
        if per_sm == 0 {
            return Err(GpuError::Shape(format!(
                "{} / {}: the decode kernel fits no CTA of {smem} bytes of shared memory on an SM",
                kc.describe(),
                vc.describe()
            )));
        }
        let per_sm = per_sm as usize;
        let st = gpu.stream();
        let a = |what: &str| drv(format!("allocating {what}"));
        let upload = |c: &dyn Codec| -> Result<Option<CudaSlice<u8>>> {
            match c.kernel_table() {
                Some(t) => Ok(Some(st.clone_htod(&t).map_err(a("the format's table"))?)),
                None => Ok(None),
            }
        };
        let (table, v_table) = (upload(kc)?, upload(vc)?);
        Ok(Self {
            table,
            v_table,
            extra_smem: extra,
            k_pages: st.alloc_zeros(pool * kbb).map_err(a("the K page pool"))?,
            v_pages: st.alloc_zeros(pool * vbb).map_err(a("the V page pool"))?,
            page_table: st
                .alloc_zeros(s.slots * s.max_pages.max(1))
                .map_err(a("the page table"))?,
            k_win: st.alloc_zeros(ring).map_err(a("the K window"))?,
            v_win: st.alloc_zeros(ring).map_err(a("the V window"))?,
            n_sealed: st.alloc_zeros(s.slots).map_err(a("lengths"))?,
            n_win: st.alloc_zeros(s.slots).map_err(a("lengths"))?,
            host_sealed: vec![0; s.slots],
            host_win: vec![0; s.slots],
            shape: KvShape {
                win_cap: s.win_cap.max(1),
                max_pages: s.max_pages.max(1),
                ..s
            },
            k_block_bytes: kbb,
            k_block_real: kreal,
            v_block_real: vreal,
            v_block_bytes: vbb,
            block_tokens: bt,
            page_blocks,
            stages,
            stage_bytes: per_stage,
            split_tokens: if k_spec.tile.2 > 0 {
                k_spec.tile.2
            } else {
                page_blocks * bt
            },
            tile_tokens: if k_spec.tile.2 > 0 { tile_tokens } else { 0 },
            whole_units: false,
            k_spec,
            v_spec,
            cta_slots: gpu.sm_count()? * per_sm,
        })
    }

    /// Device addresses of the key and value formats' tables (`KvqFmtArgs.p[0..2]` of decode and
    /// encode), 0 where none.
    pub(crate) fn table_ptrs(&self, st: &std::sync::Arc<cudarc::driver::CudaStream>) -> [u64; 2] {
        let p = |t: &Option<CudaSlice<u8>>| t.as_ref().map(|t| t.device_ptr(st).0).unwrap_or(0);
        [p(&self.table), p(&self.v_table)]
    }

    /// Tokens per format block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Tokens of `slot` sealed into blocks (0 for an unknown slot).
    pub fn sealed(&self, slot: usize) -> usize {
        self.host_sealed.get(slot).copied().unwrap_or(0)
    }

    /// Format blocks per page (the kernel module's constant).
    pub fn page_blocks(&self) -> usize {
        self.page_blocks
    }

    /// Uploads the host copies of the lengths to the device.
    pub(crate) fn sync_lengths(&mut self, gpu: &Gpu) -> Result<()> {
        let ns: Vec<i32> = self.host_sealed.iter().map(|&n| n as i32).collect();
        let nw: Vec<i32> = self.host_win.iter().map(|&n| n as i32).collect();
        gpu.upload(&ns, &mut self.n_sealed.as_view_mut())?;
        gpu.upload(&nw, &mut self.n_win.as_view_mut())
    }

    /// Bytes one attention call reads for `rows` (slot, visible tokens): packed pages + window.
    pub fn bytes_read(&self, rows: &[(usize, usize)]) -> usize {
        let (kbb, vbb, bt) = (self.k_block_real, self.v_block_real, self.block_tokens);
        rows.iter()
            .map(|&(s, len)| {
                let sealed = self.host_sealed[s].min(len);
                let win = len
                    .saturating_sub(self.host_sealed[s])
                    .min(self.host_win[s]);
                self.shape.hkv * (sealed / bt * (kbb + vbb) + win * self.shape.d * 4)
            })
            .sum()
    }

    /// Buffers for one attention call over `rows` (slot, visible tokens) with `hq` query heads.
    pub fn workspace(&self, gpu: &Gpu, rows: &[(usize, usize)], hq: usize) -> Result<Workspace> {
        let n = rows.len().max(1);
        if let Some(&(s, _)) = rows.iter().find(|r| r.0 >= self.shape.slots) {
            return Err(GpuError::Shape(format!(
                "slot {s} of {} slots",
                self.shape.slots
            )));
        }
        let most = (self.cta_slots / (n * self.shape.hkv)).max(1) + 1;
        let st = gpu.stream();
        let a = |what: &str| drv(format!("allocating {what}"));
        let slots: Vec<i32> = rows.iter().map(|r| r.0 as i32).collect();
        let lens: Vec<i32> = rows.iter().map(|r| r.1 as i32).collect();
        Ok(Workspace {
            q: st
                .alloc_zeros(n * hq * self.shape.d)
                .map_err(a("queries"))?,
            part_acc: st
                .alloc_zeros(n * hq * most * self.shape.d)
                .map_err(a("partials"))?,
            part_ml: st.alloc_zeros(n * hq * most * 2).map_err(a("partials"))?,
            out: st.alloc_zeros(n * hq * self.shape.d).map_err(a("output"))?,
            seq_slot: st.clone_htod(&slots).map_err(a("row slots"))?,
            row_len: st.clone_htod(&lens).map_err(a("row lengths"))?,
            counters: st
                .alloc_zeros(n * self.shape.hkv)
                .map_err(a("split counters"))?,
            sketch: match self.k_spec.query_sketch {
                0 => None,
                _ if !query_sketch() => None,
                m => Some(st.alloc_zeros(n * hq * m).map_err(a("sketched queries"))?),
            },
            rows: rows.to_vec(),
            hq,
            most_splits: most - 1,
        })
    }

    /// Points `ws` at new rows (same count): uploads their slots and visible lengths.
    pub fn set_rows(&self, gpu: &Gpu, ws: &mut Workspace, rows: &[(usize, usize)]) -> Result<()> {
        if rows.len() != ws.rows.len() || rows.iter().any(|r| r.0 >= self.shape.slots) {
            return Err(GpuError::Shape(format!(
                "{} rows for a workspace of {} (slots < {})",
                rows.len(),
                ws.rows.len(),
                self.shape.slots
            )));
        }
        let slots: Vec<i32> = rows.iter().map(|r| r.0 as i32).collect();
        let lens: Vec<i32> = rows.iter().map(|r| r.1 as i32).collect();
        gpu.upload(&slots, &mut ws.seq_slot.as_view_mut())?;
        gpu.upload(&lens, &mut ws.row_len.as_view_mut())?;
        ws.rows = rows.to_vec();
        Ok(())
    }

    /// The decode kernel's name: `decode`, or `decode_{key tag}{value tag}` for tagged variants.
    fn decode_name(k: &KernelSpec, v: &KernelSpec, d: usize) -> String {
        let op = if k.tag.is_empty() && v.tag.is_empty() {
            "decode".to_string()
        } else {
            format!("decode_{}{}", k.tag, v.tag)
        };
        kernel_name(k.module, &op, "f16", d)
    }

    /// Dynamic shared memory of the decode kernel: the warps' page stages, the window's one stage of
    /// 16 f16 tokens per warp, and the merge scratch ([WARPS][8][D] f32), whichever is largest.
    fn smem(pages: usize, d: usize) -> usize {
        let window = WARPS * 2 * 16 * 2 * d;
        let merge = WARPS * 8 * d * 4;
        pages.max(window).max(merge)
    }

    /// (splits over sealed pages, pages per split) for `slots` resident CTAs: about one wave in all,
    /// the window CTA of each (row, head) aside, at least `min_pps` pages per split (a split of a
    /// page or two costs a CTA's start and a merge term for little work: short contexts at batch 1),
    /// pages per split a multiple of the warps.
    fn split_count(slots: usize, heads: usize, max_pages: usize, min_pps: usize) -> (usize, usize) {
        let want = (slots / heads.max(1)).max(1);
        let mut pps = max_pages.div_ceil(want).max(min_pps).max(1);
        if pps > WARPS {
            pps = pps.next_multiple_of(WARPS);
        }
        (max_pages.div_ceil(pps), pps)
    }

    /// (tokens per split unit, splits, units per split) for the rows of `ws`. Tiled formats fold the
    /// query once per work unit and a warp takes whole units, so where a split would hold fewer units
    /// than warps (short contexts: DecoQuant at batch 1, 4k left three of four warps idle) the unit is
    /// halved, down to one tile, until every warp has one.
    fn split_plan(&self, ws: &Workspace) -> (usize, usize, usize) {
        let longest = ws
            .rows
            .iter()
            .map(|&(s, len)| self.host_sealed[s].min(len))
            .max()
            .unwrap_or(0);
        let tile = if self.whole_units {
            0
        } else {
            self.tile_tokens
        };
        let heads = ws.rows.len() * self.shape.hkv;
        let item = if self.tile_tokens > 0 {
            self.tile_tokens
        } else {
            self.split_tokens
        };
        plan_units(
            longest,
            heads,
            self.cta_slots,
            ws.most_splits,
            self.split_tokens,
            tile,
            item,
        )
    }

    /// Launches decode attention for the rows of `ws` on the queries in `ws.q`, result in `ws.out`
    /// (asynchronous).
    pub fn launch(&self, gpu: &Gpu, ws: &mut Workspace) -> Result<()> {
        self.launch_io(gpu, ws, None)
    }

    /// [`DeviceKv::launch`] on the queries in `q`, result in `out` and, as f16, in `out16` (each
    /// [rows][Hq][D] at least): the engine's buffers, so a decode step copies nothing in or out of the
    /// workspace and needs no conversion before the output projection.
    pub fn launch_into(
        &self,
        gpu: &Gpu,
        ws: &mut Workspace,
        q: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        out16: &mut CudaSlice<half::f16>,
    ) -> Result<()> {
        let len = ws.rows.len() * ws.hq * self.shape.d;
        if q.len() < len || out.len() < len || out16.len() < len {
            return Err(GpuError::Shape(format!(
                "attention over {} rows needs {len} query/output values, got {}/{}/{}",
                ws.rows.len(),
                q.len(),
                out.len(),
                out16.len()
            )));
        }
        let st = gpu.stream();
        let io = (
            q.device_ptr(st).0,
            out.device_ptr(st).0,
            out16.device_ptr(st).0,
        );
        self.launch_io(gpu, ws, Some(io))
    }

    /// The launch, on `io` = (queries, output, f16 output) device addresses or the workspace's own
    /// buffers (no f16 output then).
    fn launch_io(&self, gpu: &Gpu, ws: &mut Workspace, io: Option<(u64, u64, u64)>) -> Result<()> {
        let (hkv, d) = (self.shape.hkv, self.shape.d);
        let g = ws.hq / hkv;
        if g == 0 || !ws.hq.is_multiple_of(hkv) || g > 8 {
            return Err(GpuError::Shape(format!(
                "{} query heads over {hkv} KV heads (G <= 8)",
                ws.hq
            )));
        }
        let (unit, splits, pps) = self.split_plan(ws);
        let module = self.k_spec.module;
        let decode = gpu.function(module, &Self::decode_name(&self.k_spec, &self.v_spec, d))?;
        let merge = gpu.function(module, &kernel_name(module, "merge", "f16", d))?;
        let st = gpu.stream();
        let ptr = |s: &dyn Fn(&cudarc::driver::CudaStream) -> u64| s(st);
        let mut ints = [0i32; 8];
        ints[..4].copy_from_slice(&self.k_spec.ints);
        ints[4..].copy_from_slice(&self.v_spec.ints);
        let p = KvqDecodeParams {
            k_pages: ptr(&|s| self.k_pages.device_ptr(s).0),
            v_pages: ptr(&|s| self.v_pages.device_ptr(s).0),
            page_table: ptr(&|s| self.page_table.device_ptr(s).0),
            k_win: ptr(&|s| self.k_win.device_ptr(s).0),
            v_win: ptr(&|s| self.v_win.device_ptr(s).0),
            n_sealed: ptr(&|s| self.n_sealed.device_ptr(s).0),
            n_win: ptr(&|s| self.n_win.device_ptr(s).0),
            seq_slot: ptr(&|s| ws.seq_slot.device_ptr(s).0),
            row_len: ptr(&|s| ws.row_len.device_ptr(s).0),
            q: io.map_or_else(|| ws.q.device_ptr(st).0, |x| x.0),
            part_acc: ptr(&|s| ws.part_acc.device_ptr(s).0),
            part_ml: ptr(&|s| ws.part_ml.device_ptr(s).0),
            out: io.map_or_else(|| ws.out.device_ptr(st).0, |x| x.1),
            out16: io.map_or(0, |x| x.2),
            counters: if split_merge() {
                0
            } else {
                ws.counters.device_ptr(st).0
            },
            k_block_bytes: self.k_block_bytes as i64,
            v_block_bytes: self.v_block_bytes as i64,
            batch: ws.rows.len() as i32,
            hkv: hkv as i32,
            group: g as i32,
            max_pages: self.shape.max_pages as i32,
            pages_per_split: pps as i32,
            n_splits: splits as i32,
            win_cap: self.shape.win_cap as i32,
            scale: 1.0 / (d as f32).sqrt(),
            page_blocks: self.page_blocks as i32,
            stages: self.stages as i32,
            unit_tokens: unit as i32,
            fmt: KvqFmtArgs {
                i: ints,
                p: {
                    let [k, v] = self.table_ptrs(st);
                    let sk = ws.sketch.as_ref().map_or(0, |s| s.device_ptr(st).0);
                    [k, v, sk, 0]
                },
            },
        };
        let smem = Self::smem(self.stages * self.stage_bytes + self.extra_smem, d);
        if p.fmt.p[2] != 0 {
            let m = self.k_spec.query_sketch;
            let sketch = gpu.function(module, &kernel_name(module, "sketch", "f16", d))?;
            launch::sketch(gpu, &sketch, &p, (m, hkv, ws.rows.len()))?;
        }
        launch::decode(
            gpu,
            &decode,
            &merge,
            &p,
            (splits + 1, hkv, ws.rows.len()),
            (ws.hq, d),
            smem,
        )
    }

    /// Runs one attention call for `rows`: uploads `q` ([rows][Hq][D], rotated), returns [rows][Hq][D].
    pub fn attend(
        &self,
        gpu: &Gpu,
        rows: &[(usize, usize)],
        q: &[f32],
        hq: usize,
    ) -> Result<Vec<f32>> {
        let mut ws = self.workspace(gpu, rows, hq)?;
        if q.len() != rows.len() * hq * self.shape.d {
            return Err(GpuError::Shape(format!(
                "query has {} values, expected {}",
                q.len(),
                rows.len() * hq * self.shape.d
            )));
        }
        let st = gpu.stream();
        st.memcpy_htod(q, &mut ws.q)
            .map_err(drv("uploading queries"))?;
        // Poison the output: every element must be written by the kernels.
        st.memcpy_htod(&vec![f32::NAN; q.len()], &mut ws.out)
            .map_err(drv("poisoning output"))?;
        self.launch(gpu, &mut ws)?;
        st.clone_dtoh(&ws.out).map_err(drv("reading the output"))
    }
}

/// Fewest sealed tokens a decode split covers, for a longest row of `tokens` and warps that take `item`
/// tokens at a time (a page, or a tiled format's tile): tokens / 32 within [WARPS x item, 1024]
/// (`KVQ_SPLIT_TOKENS` fixes it, for measuring). Below it a split's fixed costs (CTA start, pipeline
/// fill, its term in the merge) outweigh its work: on the H100 (docs/BENCHMARKS.md, run 5) 256 was the
/// fastest of 1/256/1024 for 64-token pages at 4k and 1024 at 32k, batch 1; at batch 8 the one-wave
/// sizing gives longer splits anyway. The lower bound gives each warp of a split one item.
fn split_min_tokens(tokens: usize, item: usize) -> usize {
    static T: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let fixed = *T.get_or_init(|| {
        std::env::var("KVQ_SPLIT_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let lo = (WARPS * item).min(1024);
    fixed.unwrap_or((tokens / 32).clamp(lo, 1024))
}

/// (unit, splits, units per split) for a longest row of `longest` sealed tokens over `heads` (row, KV
/// head) pairs on `slots` resident CTAs (at most `most_splits` splits), starting from `unit` tokens and
/// halving it (not below `tile` tokens, and only while it stays a multiple of it; `tile` 0: never)
/// while a split holds fewer units than a CTA has warps; `item` is what a warp takes at a time.
fn plan_units(
    longest: usize,
    heads: usize,
    slots: usize,
    most_splits: usize,
    mut unit: usize,
    tile: usize,
    item: usize,
) -> (usize, usize, usize) {
    loop {
        let max_pages = longest.div_ceil(unit).max(1);
        let min_pps = split_min_tokens(max_pages * unit, item).div_ceil(unit);
        let (splits, pps) = DeviceKv::split_count(slots, heads, max_pages, min_pps);
        let splits = splits.min(most_splits).max(1);
        let pps = pps.max(max_pages.div_ceil(splits));
        let finer = unit / 2;
        if tile == 0 || pps >= WARPS || finer < tile || !finer.is_multiple_of(tile) {
            return (unit, splits, pps);
        }
        unit = finer;
    }
}

/// `KVQ_QUERY_SKETCH=0`: every split CTA forms its queries' sketch itself (QJL's S q) instead of
/// reading it from the one sketch launch before decode (kept to compare and to fall back on).
fn query_sketch() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVQ_QUERY_SKETCH").map_or(true, |v| v != "0"))
}

/// `KVQ_SPLIT_MERGE=1`: merge the splits in a kernel of its own after decode (the pre-fusion path,
/// kept to compare and to fall back on) instead of in the last CTA of each (row, KV head).
fn split_merge() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVQ_SPLIT_MERGE").is_ok_and(|v| v == "1"))
}

/// One layer's K/V of a batch of CPU-encoded sequences uploaded to the GPU (slot b = sequence b).
pub struct GpuBatch {
    /// The device cache.
    pub kv: DeviceKv,
    /// (slot, length) of every sequence: the rows of a full decode step.
    pub rows: Vec<(usize, usize)>,
    /// Bytes one attention call over `rows` reads from the cache (packed blocks + window).
    pub bytes_read: usize,
}

impl GpuBatch {
    /// Uploads the packed blocks and f16 windows of `caches` (one per sequence, same plan), placing
    /// pages in a shuffled order (`seed`) so tests exercise the page table. `repeat` tiles each
    /// sequence's sealed blocks that many times (benchmarks build long contexts from a few thousand
    /// really encoded tokens); tests use 1.
    pub fn upload(gpu: &Gpu, caches: &[&LayerCache], repeat: usize, seed: u64) -> Result<Self> {
        let first = caches
            .first()
            .ok_or_else(|| GpuError::Shape("empty batch".into()))?;
        let (kc, vc) = (first.keys().codec(), first.values().codec());
        let bt = kc.block_tokens();
        let d = first.decoded(Stream::Key, 0).len() / first.len().max(1);
        let hkv = first.bytes().elems / (2 * first.len().max(1) * d.max(1));
        let (page_blocks, ..) = gpu.layout(
            kc.kernel()
                .ok_or_else(|| {
                    GpuError::Shape(format!("{} has no CUDA kernel yet", kc.describe()))
                })?
                .module,
        )?;
        let nblk: Vec<usize> = caches
            .iter()
            .map(|c| c.keys().sealed() / bt * repeat)
            .collect();
        let npages: Vec<usize> = nblk.iter().map(|n| n.div_ceil(page_blocks)).collect();
        let win: Vec<usize> = caches.iter().map(|c| c.len() - c.keys().sealed()).collect();
        let shape = KvShape {
            slots: caches.len(),
            hkv,
            d,
            max_pages: npages.iter().copied().max().unwrap_or(0),
            pool_pages: npages.iter().sum(),
            win_cap: win.iter().copied().max().unwrap_or(0),
        };
        let mut kv = DeviceKv::new(gpu, kc, vc, shape)?;
        let (kbb, vbb) = (kv.k_block_bytes, kv.v_block_bytes);
        let (kreal, vreal) = (kv.k_block_real, kv.v_block_real);
        let (max_pages, win_cap) = (kv.shape.max_pages, kv.shape.win_cap);

        // Pages: a shuffled permutation; page p holds, per head, `page_blocks` consecutive blocks.
        let total_pages = shape.pool_pages.max(1);
        let mut order: Vec<usize> = (0..total_pages).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let mut table = vec![0i32; caches.len() * max_pages];
        let (kpb, vpb) = (page_blocks * kbb, page_blocks * vbb);
        let mut kp = vec![0u8; total_pages * hkv * kpb];
        let mut vp = vec![0u8; total_pages * hkv * vpb];
        let mut next = 0;
        for (b, c) in caches.iter().enumerate() {
            let own = c.keys().sealed() / bt;
            for pg in 0..npages[b] {
                let page = order[next];
                next += 1;
                table[b * max_pages + pg] = page as i32;
                for i in pg * page_blocks..((pg + 1) * page_blocks).min(nblk[b]) {
                    let (src, slot) = (i % own.max(1), i - pg * page_blocks);
                    for h in 0..hkv {
                        let ks = &c.keys().packed(h)[src * kreal..(src + 1) * kreal];
                        let vs = &c.values().packed(h)[src * vreal..(src + 1) * vreal];
                        let ko = (page * hkv + h) * kpb + slot * kbb;
                        let vo = (page * hkv + h) * vpb + slot * vbb;
                        kp[ko..ko + kreal].copy_from_slice(ks);
                        vp[vo..vo + vreal].copy_from_slice(vs);
                    }
                }
            }
        }
        // Windows: the f16 tokens after the sealed ones (keys rotated, as the mirror holds them), in
        // ring rows (absolute token index mod win_cap) as the GPU cache keeps them.
        let mut kw = vec![0u16; caches.len() * hkv * win_cap * d];
        let mut vw = vec![0u16; caches.len() * hkv * win_cap * d];
        for (b, c) in caches.iter().enumerate() {
            let s = c.keys().sealed();
            for h in 0..hkv {
                let (kd, vd) = (c.decoded(Stream::Key, h), c.decoded(Stream::Value, h));
                for t in 0..win[b] {
                    let row = (nblk[b] * bt + t) % win_cap;
                    for ch in 0..d {
                        let o = ((b * hkv + h) * win_cap + row) * d + ch;
                        kw[o] = half::f16::from_f32(kd[(s + t) * d + ch]).to_bits();
                        vw[o] = half::f16::from_f32(vd[(s + t) * d + ch]).to_bits();
                    }
                }
            }
        }
        let st = gpu.stream();
        let up = |what: &str| drv(format!("uploading {what}"));
        st.memcpy_htod(&kp, &mut kv.k_pages)
            .map_err(up("K pages"))?;
        st.memcpy_htod(&vp, &mut kv.v_pages)
            .map_err(up("V pages"))?;
        st.memcpy_htod(&table, &mut kv.page_table)
            .map_err(up("page table"))?;
        st.memcpy_htod(&kw, &mut kv.k_win).map_err(up("K window"))?;
        st.memcpy_htod(&vw, &mut kv.v_win).map_err(up("V window"))?;
        kv.host_sealed = nblk.iter().map(|&n| n * bt).collect();
        kv.host_win = win.clone();
        kv.sync_lengths(gpu)?;
        let rows: Vec<(usize, usize)> = (0..caches.len())
            .map(|b| (b, kv.host_sealed[b] + win[b]))
            .collect();
        let bytes_read = kv.bytes_read(&rows);
        Ok(Self {
            kv,
            rows,
            bytes_read,
        })
    }

    /// Buffers for one full decode step (every sequence, all its tokens) of `hq` query heads.
    pub fn workspace(&self, gpu: &Gpu, hq: usize) -> Result<Workspace> {
        self.kv.workspace(gpu, &self.rows, hq)
    }

    /// Launches decode attention on the queries in `ws.q`, result in `ws.out` (asynchronous).
    pub fn launch(&self, gpu: &Gpu, ws: &mut Workspace) -> Result<()> {
        self.kv.launch(gpu, ws)
    }

    /// Runs one attention call: uploads `q` ([B][Hq][D], rotated), returns [B][Hq][D].
    pub fn attend(&self, gpu: &Gpu, q: &[f32], hq: usize) -> Result<Vec<f32>> {
        self.kv.attend(gpu, &self.rows, q, hq)
    }

    /// Whether the format is read in tiles with work units the host may shrink (DecoQuant).
    pub(crate) fn tiled(&self) -> bool {
        self.kv.tile_tokens > 0
    }

    /// Tokens per block of this batch's format.
    pub fn block_tokens(&self) -> usize {
        self.kv.block_tokens
    }
}

/// Per-call device buffers of [`DeviceKv::launch`].
pub struct Workspace {
    /// Queries [rows][Hq][D] (f32, rotated).
    pub q: CudaSlice<f32>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    /// Output [rows][Hq][D].
    pub out: CudaSlice<f32>,
    seq_slot: CudaSlice<i32>,
    row_len: CudaSlice<i32>,
    /// [rows][Hkv] split CTAs done (zero between launches: the last CTA merges and re-zeroes).
    counters: CudaSlice<i32>,
    /// [rows][Hq][n] the queries' sketch (KernelSpec::query_sketch), formed once per launch.
    sketch: Option<CudaSlice<f32>>,
    rows: Vec<(usize, usize)>,
    hq: usize,
    most_splits: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizing_short_long_and_batched() {
        // KVQ_SPLIT_TOKENS unset in tests: tokens / 32 within [4 x item, 1024].
        assert_eq!(split_min_tokens(4096, 64), 256);
        assert_eq!(split_min_tokens(16384, 64), 512);
        assert_eq!(split_min_tokens(131072, 64), 1024);
        // One-block pages (QJL, RVQ): 128 tokens give each of the four warps a page.
        assert_eq!(split_min_tokens(4096, 32), 128);
        assert_eq!(split_min_tokens(1 << 20, 32), 1024);
    }

    #[test]
    fn work_units_shrink_until_every_warp_has_one() {
        // B=1, 4k, 8 KV heads, 132 SMs x 2 CTAs: 256-token units leave one per 256-token split.
        assert_eq!(plan_units(4096, 8, 264, 1 << 20, 256, 64, 64), (64, 16, 4));
        // Page formats (tile 0) and whole units keep their unit.
        assert_eq!(plan_units(4096, 8, 264, 1 << 20, 256, 0, 64).0, 256);
        // Long contexts already give every warp units: 256 stays.
        let (unit, splits, pps) = plan_units(131072, 64, 264, 1 << 20, 256, 64, 64);
        assert_eq!(unit, 256);
        assert!(pps >= WARPS && splits * pps * unit >= 131072);
        // Never below a tile, nor to a unit the tile does not divide (192-token blocks).
        assert_eq!(plan_units(100, 1, 264, 1 << 20, 64, 64, 64).0, 64);
        assert_eq!(plan_units(100, 1, 264, 1 << 20, 192, 64, 64).0, 192);
        // B=1, 4k, fp16 pages of 32 tokens, 3 KV heads, 528 resident CTAs: 16 splits of 8 pages.
        assert_eq!(DeviceKv::split_count(528, 3, 128, 8), (16, 8));
        // B=1, 32k: 32 splits of 32 pages (1024 tokens).
        assert_eq!(DeviceKv::split_count(528, 3, 1024, 32), (32, 32));
        // B=8, 128k, 8 KV heads: the one-wave sizing (8 splits) already exceeds the minimum.
        assert_eq!(DeviceKv::split_count(528, 64, 4096, 32), (8, 512));
        // A context shorter than the minimum: one split.
        assert_eq!(DeviceKv::split_count(528, 3, 3, 8), (1, 8));
    }
}
