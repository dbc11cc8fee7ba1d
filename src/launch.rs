//! Every `unsafe` kernel launch of kvq, each with its safety argument (cudarc's launch obligations:
//! argument types and order match the kernel, no aliasing of mutable buffers, indices in bounds).

use crate::error::{drv, GpuError, Result};
use crate::gpu::Gpu;
use crate::graph::KernelArgs;
use crate::params::{KvqDecodeParams, KvqEncodeParams};
use cudarc::driver::{CudaFunction, LaunchConfig};

/// Decode attention (grid = splits+1 x Hkv x B), whose last CTA per (row, KV head) merges the splits
/// when `p.counters` is set, else a separate merge launch ((Hq, D) per sequence).
pub(crate) fn decode(
    gpu: &Gpu,
    decode: &CudaFunction,
    merge: &CudaFunction,
    p: &KvqDecodeParams,
    grid: (usize, usize, usize),
    (hq, d): (usize, usize),
    smem: usize,
) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    decode
        .set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(drv("setting the decode kernel's shared memory"))?;
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: (types/order) both kernels take exactly one `KvqDecodeParams` by value, whose #[repr(C)]
    // layout is asserted equal to the CUDA struct (src/params.rs, kvq_params.cuh). (aliasing) the only
    // buffers written are part_acc/part_ml and the counters (decode, the Workspace's: counters are
    // B x Hkv zeros, each incremented once per CTA of its (row, head) and zeroed by the last) and
    // out/out16 (the merge, fused or not: the Workspace's, or the caller's &mut buffers checked in
    // DeviceKv::launch_into to hold B x Hq x D), distinct from the queries and unused by any
    // concurrent launch (one stream). (bounds) GpuBatch::upload sized
    // the pages from the block table it wrote, the window as [B][Hkv][win_cap][D] with n_win <= win_cap,
    // and Workspace sized the partials for grid.0 = n_splits + 1 rows per query head; the kernel reads
    // blocks < n_sealed / BT only, and the grid covers exactly B x Hkv x (n_splits + 1). (tables)
    // fmt.p[0] / p[1] are DeviceKv's uploads of the K / V codec's kernel_table, whose sizes follow from
    // the same codecs' KernelSpec ints the kernel reads (QJL: S^T then S, 2 x m x D f16; RVQ: header +
    // channel map + depth x codes x 32 books as f32 and f16). (shared memory) the dynamic size covers
    // the stages, the module's kvq_layout[3] rows and, only when DeviceKv counted them, the books;
    // RVQ's kernel copies books only when %dynamic_smem_size leaves room for them.
    unsafe {
        gpu.launch(
            decode,
            cfg,
            KernelArgs::default().val(p),
            "launching decode attention",
        )
    }?;
    if p.counters != 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (hq as u32, grid.2 as u32, 1),
        block_dim: (d as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above; the merge reads the partials just written (same stream, ordered) and writes
    // out[B][Hq][D] with grid (Hq, B) x D threads.
    unsafe {
        gpu.launch(
            merge,
            cfg,
            KernelArgs::default().val(p),
            "launching the split merge",
        )
    }
}

/// The queries' sketch before decode (QJL's S q): grid (n / 32, Hkv, B), 128 threads, into fmt.p[2].
pub(crate) fn sketch(
    gpu: &Gpu,
    f: &CudaFunction,
    p: &KvqDecodeParams,
    (n, hkv, b): (usize, usize, usize),
) -> Result<()> {
    if n == 0 || !n.is_multiple_of(32) || p.fmt.p[2] == 0 {
        return Err(GpuError::Shape(format!(
            "a query sketch of {n} rows (a multiple of 32, with its buffer)"
        )));
    }
    let cfg = LaunchConfig {
        grid_dim: ((n / 32) as u32, hkv as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (types/order) one `KvqDecodeParams` by value, as decode. (aliasing) it writes only
    // fmt.p[2], the Workspace's sketch buffer, which no other buffer of the launch aliases and which
    // only the decode launch after it (same stream) reads. (bounds) Workspace sized that buffer as
    // rows x Hq x n with n = KernelSpec::query_sketch = fmt.i[0] (QJL's m, the rows of S in fmt.p[0],
    // the key codec's table: S^T then S, 2 x m x D f16); the grid covers rows 32 blockIdx.x + t/4 < n,
    // KV heads < Hkv and batch rows < B, reading q[B][Hq][D] as decode does.
    unsafe {
        gpu.launch(
            f,
            cfg,
            KernelArgs::default().val(p),
            "launching the query sketch",
        )
    }
}

/// Appends `rows` tokens to the window rings (grid rows x Hkv, D threads).
pub(crate) fn append(gpu: &Gpu, f: &CudaFunction, p: &KvqEncodeParams, d: usize) -> Result<()> {
    if p.rows == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (p.rows as u32, p.hkv as u32, 1),
        block_dim: (d as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (types/order) the kernel takes one `KvqEncodeParams` by value, layout asserted equal on
    // both sides. (aliasing) it writes only k_win/v_win (and k_pre, the pre-RoPE variant), which no
    // concurrent launch touches (one stream). (rope) the pre-RoPE variant reads fmt.p[0]'s header,
    // 16 + 2 D bytes, which every pre-RoPE codec's table starts with (KernelSpec::pre_rope). (bounds) GpuLayerCache allocated k_new/v_new as [rows][Hkv][D], row_slot/row_tok with
    // `rows` entries, slots < its slot count and rings [slots][Hkv][win_cap][D]; rows index by
    // blockIdx.x < rows, channels by threadIdx.x < D, ring rows by tok % win_cap.
    unsafe {
        gpu.launch(
            f,
            cfg,
            KernelArgs::default().val(p),
            "launching the window append",
        )
    }
}

/// Seals `jobs` blocks from the rings into their pages (grid jobs x Hkv, 128 threads).
pub(crate) fn encode(gpu: &Gpu, f: &CudaFunction, p: &KvqEncodeParams, smem: usize) -> Result<()> {
    if p.jobs == 0 {
        return Ok(());
    }
    use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(drv("setting the encode kernel's shared memory"))?;
    let cfg = LaunchConfig {
        grid_dim: (p.jobs as u32, p.hkv as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: (types/order) one `KvqEncodeParams` by value, layout asserted. (aliasing) writes only the
    // pages named by its jobs, each (page, block, head) by exactly one CTA, and reads the rings, which
    // no launch writes concurrently (one stream). (bounds) GpuLayerCache gives job pages < its pool
    // size, blocks < page_blocks, tokens inside the ring's live window; shared memory holds the
    // block's BT x D floats plus the format's scratch (`smem`: the default scratch, computed from the
    // same constants, or the total the module states in `kvq_encode_smem` from the encoder's own
    // layout constants, e.g. QJL's f64 copies of the block); QJL's encoder reads fmt.p[0], the key
    // codec's uploaded table (S^T, D x m f16, with m = fmt.i[0] from the same codec's KernelSpec;
    // S row-major follows, read by decode only);
    // RVQ's encoder reads fmt.p[0] (keys) or p[1] (values): the channel map and the f32 books sized by
    // the codec's own depth and codes (fmt.i), and writes codes for depth <= 16 into its stated scratch.
    // DecoQuant's encoder stages no block: it reads ring rows (t0 + t) % win_cap for t < C = fmt.i[1]
    // (fmt.i[5] for values; both the block's tokens), and its shared memory (Gram tile, Jacobi state,
    // codes) is exactly what its `kvq_encode_smem` states; it writes the block's bytes and zeroes the
    // rest of the stride.
    unsafe {
        gpu.launch(
            f,
            cfg,
            KernelArgs::default().val(p),
            "launching the block encoder",
        )
    }
}
