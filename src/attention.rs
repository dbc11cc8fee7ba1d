//! Fused decode attention over compressed caches on the GPU: a batch of sequences' packed blocks is
//! uploaded into a page pool with a block table, and one launch (plus the split merge) computes one
//! query token per sequence and query head directly from the packed bytes.

use crate::error::{drv, GpuError, Result};
use crate::gpu::{kernel_name, Gpu};
use crate::launch;
use crate::params::{KvqDecodeParams, KvqFmtArgs};
use cudarc::driver::{CudaSlice, DevicePtr};
use kvq_formats::{KernelSpec, LayerCache, Stream};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Warps per decode CTA (kernels/include/kvq_decode.cuh's WARPS).
const WARPS: usize = 4;

/// One layer's K/V of a batch of sequences, resident on the GPU in the kernels' layout.
pub struct GpuBatch {
    k_pages: CudaSlice<u8>,
    v_pages: CudaSlice<u8>,
    page_table: CudaSlice<i32>,
    k_win: CudaSlice<u16>,
    v_win: CudaSlice<u16>,
    n_sealed: CudaSlice<i32>,
    n_win: CudaSlice<i32>,
    /// Sequences.
    pub batch: usize,
    /// KV heads.
    pub hkv: usize,
    /// Channels per head.
    pub d: usize,
    k_block_bytes: usize,
    v_block_bytes: usize,
    block_tokens: usize,
    page_blocks: usize,
    stages: usize,
    max_pages: usize,
    splits: usize,
    pages_per_split: usize,
    win_cap: usize,
    k_spec: KernelSpec,
    v_spec: KernelSpec,
    /// Bytes one attention call reads from the cache (packed blocks + window), all sequences.
    pub bytes_read: usize,
}

impl GpuBatch {
    /// Uploads the packed blocks and f16 windows of `caches` (one per sequence, same plan), placing
    /// logical blocks in pages in a shuffled order (`seed`) so tests exercise the block table.
    /// `repeat` tiles each sequence's sealed blocks that many times (benchmarks build long contexts
    /// from a few thousand really encoded tokens); tests use 1.
    pub fn upload(gpu: &Gpu, caches: &[&LayerCache], repeat: usize, seed: u64) -> Result<Self> {
        let first = caches
            .first()
            .ok_or_else(|| GpuError::Shape("empty batch".into()))?;
        let (kc, vc) = (first.keys().codec(), first.values().codec());
        let what = |s: &str| GpuError::Shape(format!("{s} has no CUDA kernel yet"));
        let k_spec = kc.kernel().ok_or_else(|| what(&kc.describe()))?;
        let v_spec = vc.kernel().ok_or_else(|| what(&vc.describe()))?;
        if k_spec.module != v_spec.module || kc.block_tokens() != vc.block_tokens() {
            return Err(GpuError::Shape(format!(
                "K ({}) and V ({}) must share one kernel and block size",
                kc.describe(),
                vc.describe()
            )));
        }
        let (kbb, vbb, bt) = (kc.block_bytes(), vc.block_bytes(), kc.block_tokens());
        if kbb % 16 != 0 || vbb % 16 != 0 {
            return Err(GpuError::Shape(format!(
                "block bytes {kbb}/{vbb} not a multiple of 16"
            )));
        }
        let d = first.decoded(Stream::Key, 0).len() / first.len().max(1);
        let hkv = first.bytes().elems / (2 * first.len().max(1) * d.max(1));
        let batch = caches.len();
        let (page_blocks, max_stages) = gpu.layout(k_spec.module)?;
        // As many pipeline stages as fit (large blocks, e.g. 8-bit codes, get fewer), 1 KiB kept for
        // the kernel's static shared memory.
        let per_stage = WARPS * page_blocks * (kbb + vbb);
        let limit = gpu.max_smem_per_block()?.saturating_sub(1024);
        let stages = max_stages.min(4).min(limit / per_stage);
        if stages == 0 {
            return Err(GpuError::Shape(format!(
                "{} / {}: one page stage needs {per_stage} bytes of shared memory, the GPU allows {limit}",
                kc.describe(),
                vc.describe()
            )));
        }
        let nblk: Vec<usize> = caches
            .iter()
            .map(|c| c.keys().sealed() / bt * repeat)
            .collect();
        let npages: Vec<usize> = nblk.iter().map(|n| n.div_ceil(page_blocks)).collect();
        let max_pages = npages.iter().copied().max().unwrap_or(0).max(1);
        let total_pages: usize = npages.iter().sum::<usize>().max(1);
        let win: Vec<usize> = caches.iter().map(|c| c.len() - c.keys().sealed()).collect();
        let win_cap = win.iter().copied().max().unwrap_or(0).max(1);

        // Pages: a shuffled permutation; page p holds, per head, `page_blocks` consecutive blocks.
        let mut order: Vec<usize> = (0..total_pages).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let mut table = vec![0i32; batch * max_pages];
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
                        let ks = &c.keys().packed(h)[src * kbb..(src + 1) * kbb];
                        let vs = &c.values().packed(h)[src * vbb..(src + 1) * vbb];
                        let ko = (page * hkv + h) * kpb + slot * kbb;
                        let vo = (page * hkv + h) * vpb + slot * vbb;
                        kp[ko..ko + kbb].copy_from_slice(ks);
                        vp[vo..vo + vbb].copy_from_slice(vs);
                    }
                }
            }
        }
        // Windows: the f16 tokens after the sealed ones (keys rotated, as the mirror holds them).
        let mut kw = vec![0u16; batch * hkv * win_cap * d];
        let mut vw = vec![0u16; batch * hkv * win_cap * d];
        for (b, c) in caches.iter().enumerate() {
            let s = c.keys().sealed();
            for h in 0..hkv {
                let (kd, vd) = (c.decoded(Stream::Key, h), c.decoded(Stream::Value, h));
                for t in 0..win[b] {
                    for ch in 0..d {
                        let o = ((b * hkv + h) * win_cap + t) * d + ch;
                        kw[o] = half::f16::from_f32(kd[(s + t) * d + ch]).to_bits();
                        vw[o] = half::f16::from_f32(vd[(s + t) * d + ch]).to_bits();
                    }
                }
            }
        }
        let st = gpu.stream();
        let need = kp.len() + vp.len() + 4 * (kw.len() + vw.len());
        let (free, _) = gpu.mem_info()?;
        if need > free {
            return Err(GpuError::OutOfMemory {
                what: "the KV cache upload".into(),
                need,
                free,
            });
        }
        let up = |what: &str| drv(format!("uploading {what}"));
        let n_sealed: Vec<i32> = nblk.iter().map(|&n| (n * bt) as i32).collect();
        let n_win: Vec<i32> = win.iter().map(|&w| w as i32).collect();
        let bytes_read: usize = nblk.iter().sum::<usize>() * hkv * (kbb + vbb)
            + win.iter().sum::<usize>() * hkv * d * 4;
        let smem = Self::smem(page_blocks, stages, kbb, vbb, d);
        let decode = gpu.function(k_spec.module, &Self::decode_name(&k_spec, &v_spec, d))?;
        let per_sm = decode
            .occupancy_max_active_blocks_per_multiprocessor(128, smem, None)
            .map_err(drv("querying the decode kernel's occupancy"))?
            .max(1) as usize;
        let (splits, pages_per_split) =
            Self::split_count(gpu.sm_count()? * per_sm, batch * hkv, max_pages);
        Ok(Self {
            k_pages: st.clone_htod(&kp).map_err(up("K pages"))?,
            v_pages: st.clone_htod(&vp).map_err(up("V pages"))?,
            page_table: st.clone_htod(&table).map_err(up("page table"))?,
            k_win: st.clone_htod(&kw).map_err(up("K window"))?,
            v_win: st.clone_htod(&vw).map_err(up("V window"))?,
            n_sealed: st.clone_htod(&n_sealed).map_err(up("lengths"))?,
            n_win: st.clone_htod(&n_win).map_err(up("lengths"))?,
            batch,
            hkv,
            d,
            k_block_bytes: kbb,
            v_block_bytes: vbb,
            block_tokens: bt,
            page_blocks,
            stages,
            max_pages,
            splits,
            pages_per_split,
            win_cap,
            k_spec,
            v_spec,
            bytes_read,
        })
    }

    /// Buffers for one attention call of `hq` query heads (queries, partials, output).
    pub fn workspace(&self, gpu: &Gpu, hq: usize) -> Result<Workspace> {
        let st = gpu.stream();
        let rows = self.batch * hq * (self.splits + 1);
        let a = |what: &str| drv(format!("allocating {what}"));
        Ok(Workspace {
            q: st
                .alloc_zeros::<f32>(self.batch * hq * self.d)
                .map_err(a("queries"))?,
            part_acc: st
                .alloc_zeros::<f32>(rows * self.d)
                .map_err(a("partials"))?,
            part_ml: st.alloc_zeros::<f32>(rows * 2).map_err(a("partials"))?,
            out: st
                .alloc_zeros::<f32>(self.batch * hq * self.d)
                .map_err(a("output"))?,
            hq,
        })
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
    fn smem(page_blocks: usize, stages: usize, kbb: usize, vbb: usize, d: usize) -> usize {
        let pages = WARPS * stages * page_blocks * (kbb + vbb);
        let window = WARPS * 2 * 16 * 2 * d;
        let merge = WARPS * 8 * d * 4;
        pages.max(window).max(merge)
    }

    /// (splits over sealed pages, pages per split) for `slots` resident CTAs: about one wave in all,
    /// the window CTA of each (sequence, head) aside, pages per split a multiple of the warps.
    fn split_count(slots: usize, heads: usize, max_pages: usize) -> (usize, usize) {
        let want = (slots / heads.max(1)).max(1);
        let mut pps = max_pages.div_ceil(want).max(1);
        if pps > WARPS {
            pps = pps.next_multiple_of(WARPS);
        }
        (max_pages.div_ceil(pps), pps)
    }

    /// Launches decode attention on the queries in `ws.q`, result in `ws.out` (asynchronous).
    pub fn launch(&self, gpu: &Gpu, ws: &mut Workspace) -> Result<()> {
        let g = ws.hq / self.hkv;
        if g == 0 || !ws.hq.is_multiple_of(self.hkv) || g > 8 {
            return Err(GpuError::Shape(format!(
                "{} query heads over {} KV heads (G <= 8)",
                ws.hq, self.hkv
            )));
        }
        let module = self.k_spec.module;
        let decode = gpu.function(
            module,
            &Self::decode_name(&self.k_spec, &self.v_spec, self.d),
        )?;
        let merge = gpu.function(module, &kernel_name(module, "merge", "f16", self.d))?;
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
            q: ptr(&|s| ws.q.device_ptr(s).0),
            part_acc: ptr(&|s| ws.part_acc.device_ptr(s).0),
            part_ml: ptr(&|s| ws.part_ml.device_ptr(s).0),
            out: ptr(&|s| ws.out.device_ptr(s).0),
            k_block_bytes: self.k_block_bytes as i64,
            v_block_bytes: self.v_block_bytes as i64,
            batch: self.batch as i32,
            hkv: self.hkv as i32,
            group: g as i32,
            max_pages: self.max_pages as i32,
            pages_per_split: self.pages_per_split as i32,
            n_splits: self.splits as i32,
            win_cap: self.win_cap as i32,
            scale: 1.0 / (self.d as f32).sqrt(),
            page_blocks: self.page_blocks as i32,
            stages: self.stages as i32,
            fmt: KvqFmtArgs { i: ints, p: [0; 4] },
        };
        let smem = Self::smem(
            self.page_blocks,
            self.stages,
            self.k_block_bytes,
            self.v_block_bytes,
            self.d,
        );
        launch::decode(
            gpu,
            &decode,
            &merge,
            &p,
            (self.splits + 1, self.hkv, self.batch),
            (ws.hq, self.d),
            smem,
        )
    }

    /// Runs one attention call: uploads `q` ([B][Hq][D], rotated), returns [B][Hq][D].
    pub fn attend(&self, gpu: &Gpu, q: &[f32], hq: usize) -> Result<Vec<f32>> {
        let mut ws = self.workspace(gpu, hq)?;
        if q.len() != self.batch * hq * self.d {
            return Err(GpuError::Shape(format!(
                "query has {} values, expected {}",
                q.len(),
                self.batch * hq * self.d
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

    /// Tokens per block of this batch's format.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }
}

/// Per-call device buffers of [`GpuBatch::launch`].
pub struct Workspace {
    /// Queries [B][Hq][D] (f32, rotated).
    pub q: CudaSlice<f32>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    /// Output [B][Hq][D].
    pub out: CudaSlice<f32>,
    hq: usize,
}
