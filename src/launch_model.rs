//! Every `unsafe` call of the GPU engine's model ops (kernels/model.cu) and GEMMs (cuBLAS), each behind
//! a typed safe wrapper that checks buffer sizes first. The SAFETY comments discharge cudarc's launch
//! obligations: argument types and order match the kernel, no aliasing of mutable buffers, in bounds.
//!
//! Device indices that address memory (token ids, row maps) only enter kernels as [`Indices`], whose
//! upper bound was measured on the host, so no wrapper can be handed an out-of-range gather.

use crate::cache::RingDst;
use crate::error::{drv, GpuError, Result};
use crate::gpu::Gpu;
use crate::graph::{KernelArgs, Work};
use cudarc::cublas::{result as cublas, sys as cublas_sys, CudaBlas};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use half::f16;
use std::sync::Arc;

/// The embedded module holding kernels/model.cu.
const MODULE: &str = "model";
/// Threads per block of the row kernels (a multiple of 32, as `block_sum` needs).
const THREADS: u32 = 256;

/// Integers uploaded to the GPU with their bound measured on the host: the only way token ids and
/// row maps reach a kernel, so gathers are checked against the table they index.
pub struct Indices {
    dev: CudaSlice<i32>,
    len: usize,
    upper: usize,
}

/// `host` as the i32s kernels take; a value that does not fit is an error.
fn to_i32s(host: &[u32]) -> Result<Vec<i32>> {
    host.iter()
        .map(|&x| i32::try_from(x).map_err(|_| GpuError::Shape(format!("index {x} exceeds i32"))))
        .collect()
}

/// One more than the largest value (0 when empty).
fn upper_of(host: &[u32]) -> usize {
    host.iter().map(|&x| x as usize + 1).max().unwrap_or(0)
}

impl Indices {
    /// Uploads `host`; fails when a value does not fit an `i32`.
    pub fn upload(stream: &Arc<CudaStream>, host: &[u32]) -> Result<Self> {
        Self::upload_with(stream, host, None)
    }

    /// [`Indices::upload`] through `gpu`'s page-locked staging (never waits for queued work).
    pub fn upload_staged(gpu: &Gpu, host: &[u32]) -> Result<Self> {
        Self::upload_with(gpu.stream(), host, Some(gpu))
    }

    fn upload_with(stream: &Arc<CudaStream>, host: &[u32], gpu: Option<&Gpu>) -> Result<Self> {
        let v = to_i32s(host)?;
        let upper = upper_of(host);
        // A zero-length allocation is not allowed: keep one slot.
        let dev = match gpu {
            Some(g) if !v.is_empty() => {
                let mut d = stream
                    .alloc_zeros::<i32>(v.len())
                    .map_err(drv("allocating indices"))?;
                g.upload(&v, &mut d.as_view_mut())?;
                d
            }
            _ if v.is_empty() => stream
                .alloc_zeros::<i32>(1)
                .map_err(drv("allocating indices"))?,
            _ => stream.clone_htod(&v).map_err(drv("uploading indices"))?,
        };
        Ok(Self {
            dev,
            len: host.len(),
            upper,
        })
    }

    /// Replaces the values with `host`, reusing the device buffer when it is large enough (a decode
    /// step then allocates nothing); the copy is stream-ordered after the kernels that read the old values.
    pub fn restage(&mut self, gpu: &Gpu, host: &[u32]) -> Result<()> {
        let v = to_i32s(host)?;
        self.reserve(gpu, v.len())?;
        if !v.is_empty() {
            gpu.upload(&v, &mut self.dev.slice_mut(..v.len()))?;
        }
        self.len = host.len();
        self.upper = upper_of(host);
        Ok(())
    }

    /// The device buffer, grown to hold `n` values (its contents are then undefined), for a kernel of
    /// this step to write the next step's indices into (a greedy pick feeding the next token).
    pub fn device_output(&mut self, gpu: &Gpu, n: usize) -> Result<&mut CudaSlice<i32>> {
        self.reserve(gpu, n)?;
        Ok(&mut self.dev)
    }

    /// Grows the device buffer to hold `n` values (a power of two, so a decode step allocates nothing).
    fn reserve(&mut self, gpu: &Gpu, n: usize) -> Result<()> {
        if n > self.dev.len() {
            self.dev = gpu
                .stream()
                .alloc_zeros::<i32>(n.next_power_of_two())
                .map_err(drv("allocating indices"))?;
        }
        Ok(())
    }

    /// The device buffer (the last values staged or written on the device).
    pub fn device(&self) -> &CudaSlice<i32> {
        &self.dev
    }

    /// Takes the first `n` values a kernel wrote through [`Indices::device_output`] as the indices,
    /// with no upload. The caller vouches that each is below `upper` (argmax picks: the vocabulary).
    pub fn assume_device_written(&mut self, n: usize, upper: usize) -> Result<()> {
        need("device-written indices", self.dev.len(), n)?;
        self.len = n;
        self.upper = upper;
        Ok(())
    }

    /// Number of indices.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One more than the largest value (0 when empty): the table size a gather needs.
    pub fn upper(&self) -> usize {
        self.upper
    }
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(GpuError::Shape(format!(
            "{what}: buffer of {have} elements, the launch needs {want}"
        )));
    }
    Ok(())
}

fn to_i32(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| GpuError::Shape(format!("{what} = {x} exceeds i32")))
}

/// Grid-stride launch configuration over `n` elements.
fn stride_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 8192) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The model-op kernels of kernels/model.cu, loaded once, with typed launchers (asynchronous, on the
/// GPU's one stream).
pub struct ModelOps {
    gpu: Arc<Gpu>,
    embed: CudaFunction,
    rmsnorm: CudaFunction,
    rope: CudaFunction,
    qkv_split: CudaFunction,
    swiglu: CudaFunction,
    add: CudaFunction,
    f32_to_f16: CudaFunction,
    f16_to_f32: CudaFunction,
    argmax: CudaFunction,
}

impl ModelOps {
    /// Loads the kernels; errors name the missing one.
    pub fn new(gpu: &Arc<Gpu>) -> Result<Self> {
        let f = |n: &str| gpu.function(MODULE, &format!("kvq_model_{n}"));
        Ok(Self {
            gpu: gpu.clone(),
            embed: f("embed")?,
            rmsnorm: f("rmsnorm")?,
            rope: f("rope")?,
            qkv_split: f("qkv_split")?,
            swiglu: f("swiglu")?,
            add: f("add")?,
            f32_to_f16: f("f32_to_f16")?,
            f16_to_f32: f("f16_to_f32")?,
            argmax: f("argmax")?,
        })
    }

    /// out[r] = table[ids[r]] for the `ids.len()` rows: table f16 [vocab][hidden], out f32.
    pub fn embed(
        &self,
        table: &CudaSlice<f16>,
        (vocab, hidden): (usize, usize),
        ids: &Indices,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = ids.len();
        if ids.upper() > vocab {
            return Err(GpuError::Shape(format!(
                "token id {} outside the vocabulary ({vocab})",
                ids.upper() - 1
            )));
        }
        need("embedding table", table.len(), vocab * hidden)?;
        need("embedding output", out.len(), n * hidden)?;
        if n == 0 {
            return Ok(());
        }
        let (n32, h32) = (to_i32("rows", n)?, to_i32("hidden", hidden)?);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let st = self.gpu.stream();
        let args = KernelArgs::default()
            .buf(table, st)
            .buf(&ids.dev, st)
            .buf(out, st)
            .val(&n32)
            .val(&h32);
        // SAFETY: (types/order) kvq_model_embed(const __half*, const int32_t*, float*, int, int) gets
        // CudaSlice<f16>, CudaSlice<i32>, CudaSlice<f32>, i32, i32. (aliasing) `out` is a &mut borrow,
        // distinct from the shared `table` and `ids`. (bounds) every id < upper <= vocab (measured at
        // upload), table holds vocab x hidden, out n x hidden, and the grid has one block per row.
        unsafe {
            self.gpu
                .launch(&self.embed, cfg, args, "launching kvq_model_embed")
        }?;
        Ok(())
    }

    /// RMSNorm of `n` rows of `cols` (row r reads x row `rows[r]`, or r), times `w`, written as f16.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        x_rows: usize,
        rows: Option<&Indices>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f16>,
        (n, cols): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        if let Some(r) = rows {
            if r.len() != n || r.upper() > x_rows {
                return Err(GpuError::Shape(format!(
                    "row map of {} rows up to {} for {n} output rows over {x_rows} input rows",
                    r.len(),
                    r.upper()
                )));
            }
        } else if n > x_rows {
            return Err(GpuError::Shape(format!(
                "{n} output rows from {x_rows} input rows"
            )));
        }
        need("rmsnorm input", x.len(), x_rows * cols)?;
        need("rmsnorm weight", w.len(), cols)?;
        need("rmsnorm output", out.len(), n * cols)?;
        if n == 0 {
            return Ok(());
        }
        let (n32, c32) = (to_i32("rows", n)?, to_i32("cols", cols)?);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let st = self.gpu.stream();
        let args = KernelArgs::default().buf(x, st);
        let args = match rows {
            Some(r) => args.buf(&r.dev, st),
            None => args.val(&0u64),
        };
        let args = args.buf(w, st).buf(out, st).val(&n32).val(&c32).val(&eps);
        // SAFETY: (types/order) kvq_model_rmsnorm(const float*, const int32_t* (nullable), const
        // float*, __half*, int, int, float) gets CudaSlice<f32>, CudaSlice<i32> or a null u64 (both
        // 8-byte device pointers), CudaSlice<f32>, CudaSlice<f16>, i32, i32, f32. (aliasing) `out` is a
        // &mut borrow of another type than every input. (bounds) rows < x_rows (measured at upload) or
        // r < n <= x_rows, x holds x_rows x cols, w cols, out n x cols; one block per output row and
        // 256 threads, a multiple of 32 as the block reduction needs.
        unsafe {
            self.gpu
                .launch(&self.rmsnorm, cfg, args, "launching kvq_model_rmsnorm")
        }?;
        Ok(())
    }

    /// In-place RoPE of `heads` heads of `d` channels in each of `n` rows of `row_stride` floats, row r
    /// rotated to position `pos[r]` with the per-pair inverse frequencies `inv_freq` (d/2 of them).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        row_stride: usize,
        pos: &Indices,
        inv_freq: &CudaSlice<f32>,
        (n, heads, d): (usize, usize, usize),
        style: kvq_formats::RopeStyle,
    ) -> Result<()> {
        if pos.len() != n || d % 2 != 0 || heads * d > row_stride {
            return Err(GpuError::Shape(format!(
                "rope of {n} rows x {heads} heads x {d} (row stride {row_stride}) with {} positions",
                pos.len()
            )));
        }
        need("rope input", x.len(), n * row_stride)?;
        need("rope frequencies", inv_freq.len(), d / 2)?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let (n32, h32, d32) = (to_i32("rows", n)?, to_i32("heads", heads)?, to_i32("d", d)?);
        let stride = row_stride as i64;
        let style_c = style.kernel_code();
        let cfg = LaunchConfig {
            grid_dim: (n as u32, heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let st = self.gpu.stream();
        let args = KernelArgs::default()
            .buf(x, st)
            .val(&stride)
            .buf(&pos.dev, st)
            .buf(inv_freq, st)
            .val(&n32)
            .val(&h32)
            .val(&d32)
            .val(&style_c);
        // SAFETY: (types/order) kvq_model_rope(float*, int64_t, const int32_t*, const float*, int, int,
        // int, int) gets CudaSlice<f32>, i64, CudaSlice<i32>, CudaSlice<f32>, i32 x 4. (aliasing) `x` is
        // the only buffer written, a &mut borrow distinct from pos and inv_freq. (bounds) rows < n and
        // heads * d <= row_stride, so every access is below n x row_stride <= x.len(); pair indices
        // < d/2 <= inv_freq.len(); positions are only multiplied, never used as addresses.
        unsafe {
            self.gpu
                .launch(&self.rope, cfg, args, "launching kvq_model_rope")
        }?;
        Ok(())
    }

    /// Splits the fused QKV GEMM output [n][(hq + 2 hkv) d] into q [n][hq][d] (rotated to `pos`) and
    /// k, v [n][hkv][d]; k rotated too when `rotate_k` (GPU caches store rotated keys), else unrotated
    /// (CPU caches take keys before RoPE). With `ring` (an append a GPU-resident cache staged), k and v
    /// also go into the cache's f16 window rings, in place of its append kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_split(
        &self,
        qkv: &CudaSlice<f32>,
        pos: &Indices,
        inv_freq: &CudaSlice<f32>,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        (n, hq, hkv, d): (usize, usize, usize, usize),
        style: kvq_formats::RopeStyle,
        rotate_k: bool,
        ring: Option<&RingDst>,
    ) -> Result<()> {
        if pos.len() != n || d % 2 != 0 {
            return Err(GpuError::Shape(format!(
                "qkv split of {n} rows (d = {d}) with {} positions",
                pos.len()
            )));
        }
        if let Some(r) = ring {
            if r.rows != n || r.hkv != hkv || r.d != d || !rotate_k || r.win_cap == 0 {
                return Err(GpuError::Shape(format!(
                    "qkv split of {n} rows x {hkv} heads x {d} (rotated keys: {rotate_k}) into rings staged for \
                     {} rows x {} heads x {} (ring rows {})",
                    r.rows, r.hkv, r.d, r.win_cap
                )));
            }
        }
        need("qkv input", qkv.len(), n * (hq + 2 * hkv) * d)?;
        need("q output", q.len(), n * hq * d)?;
        need("k output", k.len(), n * hkv * d)?;
        need("v output", v.len(), n * hkv * d)?;
        need("rope frequencies", inv_freq.len(), d / 2)?;
        if n == 0 {
            return Ok(());
        }
        let ints = [
            to_i32("rows", n)?,
            to_i32("hq", hq)?,
            to_i32("hkv", hkv)?,
            to_i32("d", d)?,
            style.kernel_code(),
            i32::from(rotate_k),
        ];
        let cfg = LaunchConfig {
            grid_dim: (n as u32, (hq + 2 * hkv) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let st = self.gpu.stream();
        let args = KernelArgs::default()
            .buf(qkv, st)
            .buf(&pos.dev, st)
            .buf(inv_freq, st)
            .buf(q, st)
            .buf(k, st)
            .buf(v, st)
            .val(&ints[0])
            .val(&ints[1])
            .val(&ints[2])
            .val(&ints[3])
            .val(&ints[4])
            .val(&ints[5])
            .val(&ring.map_or(0u64, |r| r.k))
            .val(&ring.map_or(0u64, |r| r.v))
            .val(&ring.map_or(0u64, |r| r.slot))
            .val(&ring.map_or(0u64, |r| r.tok))
            .val(&to_i32("ring rows", ring.map_or(0, |r| r.win_cap))?);
        // SAFETY: (types/order) kvq_model_qkv_split(const float*, const int32_t*, const float*, float*,
        // float*, float*, int, int, int, int, int, int, uint16_t*, uint16_t*, const int32_t*,
        // const int32_t*, int) gets CudaSlice<f32>, CudaSlice<i32>, CudaSlice<f32>, three
        // CudaSlice<f32>, six i32, four u64 device pointers (0 without a ring: the kernel then writes
        // none) and one i32. (aliasing) q, k, v are three distinct &mut borrows, none of them an input;
        // the rings and the plan are the cache's own buffers, which nothing else in this stream writes
        // until its staged append is finished. (bounds) checked above: qkv holds n x (hq + 2 hkv) x d,
        // q n x hq x d, k and v n x hkv x d; the grid is exactly n x (hq + 2 hkv); pair indices < d/2
        // <= inv_freq.len(); with a ring, GpuLayerCache::stage_ring_append planned exactly these n rows
        // (checked equal above, with hkv and d), its plan holds a slot < the rings' slot count and a
        // token per row, and the rings are [slots][hkv][win_cap][d] f16, indexed at token % win_cap.
        unsafe {
            self.gpu
                .launch(&self.qkv_split, cfg, args, "launching kvq_model_qkv_split")
        }?;
        Ok(())
    }

    /// out[r][i] = silu(gu[r][i]) * gu[r][inter + i] (gate then up halves of one GEMM output), f16.
    pub fn swiglu(
        &self,
        gu: &CudaSlice<f32>,
        out: &mut CudaSlice<f16>,
        (n, inter): (usize, usize),
    ) -> Result<()> {
        need("swiglu input", gu.len(), n * 2 * inter)?;
        need("swiglu output", out.len(), n * inter)?;
        if n * inter == 0 {
            return Ok(());
        }
        let (n32, i32_) = (to_i32("rows", n)?, to_i32("inter", inter)?);
        let st = self.gpu.stream();
        let args = KernelArgs::default()
            .buf(gu, st)
            .buf(out, st)
            .val(&n32)
            .val(&i32_);
        // SAFETY: (types/order) kvq_model_swiglu(const float*, __half*, int, int) gets CudaSlice<f32>,
        // CudaSlice<f16>, i32, i32. (aliasing) `out` is a &mut borrow of another type than `gu`.
        // (bounds) the grid-stride loop stops at n x inter (64-bit); reads are below n x 2 inter.
        unsafe {
            self.gpu.launch(
                &self.swiglu,
                stride_cfg(n * inter),
                args,
                "launching kvq_model_swiglu",
            )
        }?;
        Ok(())
    }

    /// x[..n] += y[..n].
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        need("add target", x.len(), n)?;
        need("add input", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        let st = self.gpu.stream();
        let args = KernelArgs::default().buf(x, st).buf(y, st).val(&n64);
        // SAFETY: (types/order) kvq_model_add(float*, const float*, int64_t) gets CudaSlice<f32>,
        // CudaSlice<f32>, i64. (aliasing) `x` is a &mut borrow, so `y` is another allocation. (bounds)
        // the grid-stride loop stops at n <= both lengths.
        unsafe {
            self.gpu
                .launch(&self.add, stride_cfg(n), args, "launching kvq_model_add")
        }?;
        Ok(())
    }

    /// y[..n] = f16(x[..n]).
    pub fn f32_to_f16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f16>, n: usize) -> Result<()> {
        need("cast input", x.len(), n)?;
        need("cast output", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        let st = self.gpu.stream();
        let args = KernelArgs::default().buf(x, st).buf(y, st).val(&n64);
        // SAFETY: (types/order) kvq_model_f32_to_f16(const float*, __half*, int64_t) gets
        // CudaSlice<f32>, CudaSlice<f16>, i64. (aliasing) `y` is a &mut borrow of another type.
        // (bounds) the grid-stride loop stops at n <= both lengths.
        unsafe {
            self.gpu.launch(
                &self.f32_to_f16,
                stride_cfg(n),
                args,
                "launching kvq_model_f32_to_f16",
            )
        }?;
        Ok(())
    }

    /// y[..n] = f32(x[..n]).
    pub fn f16_to_f32(&self, x: &CudaSlice<f16>, y: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        need("cast input", x.len(), n)?;
        need("cast output", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        let st = self.gpu.stream();
        let args = KernelArgs::default().buf(x, st).buf(y, st).val(&n64);
        // SAFETY: (types/order) kvq_model_f16_to_f32(const __half*, float*, int64_t) gets
        // CudaSlice<f16>, CudaSlice<f32>, i64. (aliasing) `y` is a &mut borrow of another type.
        // (bounds) the grid-stride loop stops at n <= both lengths.
        unsafe {
            self.gpu.launch(
                &self.f16_to_f32,
                stride_cfg(n),
                args,
                "launching kvq_model_f16_to_f32",
            )
        }?;
        Ok(())
    }

    /// out[r] = argmax of logits row r (NaN never wins; the last maximum on ties), `rows` rows.
    pub fn argmax(
        &self,
        logits: &CudaSlice<f32>,
        (rows, vocab): (usize, usize),
        out: &mut CudaSlice<i32>,
    ) -> Result<()> {
        need("argmax input", logits.len(), rows * vocab)?;
        need("argmax output", out.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let v32 = to_i32("vocab", vocab)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let st = self.gpu.stream();
        let args = KernelArgs::default().buf(logits, st).val(&v32).buf(out, st);
        // SAFETY: (types/order) kvq_model_argmax(const float*, int, int32_t*) gets CudaSlice<f32>, i32,
        // CudaSlice<i32>. (aliasing) `out` is a &mut borrow of another type than `logits`. (bounds) one
        // block per row r < rows reads row r's vocab values (rows x vocab <= logits.len()) and writes
        // out[r]; the kernel's static shared arrays are sized for its 1024 threads.
        unsafe {
            self.gpu
                .launch(&self.argmax, cfg, args, "launching kvq_model_argmax")
        }?;
        Ok(())
    }
}

/// A linear layer's weight on the GPU: f16, row-major [out][inp] (y = x W^T) as the model files store
/// it, so the decode GEMV streams each output's weights as one contiguous row.
pub struct Linear {
    /// The weight, out x inp halves (row o = the weights of output o).
    pub w: CudaSlice<f16>,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
}

/// The GEMMs of the engine on the GPU's stream: f16 inputs, f32 accumulation and f32 outputs, through
/// cuBLAS; decode steps of one or two rows go through kvq_model_gemv* (`KVQ_GEMV=0`: cuBLAS), which
/// streams the weight rows and starts loading them before the previous kernel ends.
pub struct Blas {
    handle: Arc<CudaBlas>,
    gpu: Arc<Gpu>,
    /// kvq_model_gemv{1,2}: one and two rows.
    gemv: [CudaFunction; 2],
    /// Dynamic shared memory the GEMVs may use on this GPU (<= [`GEMV_SMEM_MAX`]).
    gemv_smem: usize,
    /// Whether decode-step shapes take the GEMV (default; `KVQ_GEMV=0` or [`Blas::set_gemv`] turn it off).
    gemv_on: bool,
}

/// The input rows of a decode-step GEMV ([`Blas::gemv_from`]).
#[derive(Clone, Copy)]
pub enum GemvIn<'a> {
    /// f16 rows [n][inp], as [`Blas::matmul`] takes them.
    F16(&'a CudaSlice<f16>),
    /// RMSNorm of the f32 rows x [n][inp] with weight `w` [inp], as [`ModelOps::rmsnorm`] computes it.
    RmsNorm {
        /// The residual stream rows.
        x: &'a CudaSlice<f32>,
        /// The norm's weight.
        w: &'a CudaSlice<f32>,
        /// The norm's epsilon.
        eps: f32,
    },
    /// SwiGLU of the f32 gate/up rows [n][2 inp] (gate first), as [`ModelOps::swiglu`] computes it.
    SwiGlu(&'a CudaSlice<f32>),
}

/// Warps of a GEMV CTA (kernels/model.cu's GEMV_WARPS).
const GEMV_WARPS: usize = 8;
/// Dynamic shared memory a GEMV may stage its x rows in (n x inp halves), at most: up to 40,960 inputs
/// at two rows. Smaller where the GPU allows less per block (99 KB on sm_86/sm_89); larger inputs take
/// cuBLAS.
const GEMV_SMEM_MAX: usize = 160 * 1024;

/// Decode steps of one or two rows through kvq_model_gemv, with the RMSNorms and the SwiGLU folded
/// in (`KVQ_GEMV=0` sends them to cuBLAS and the separate kernels, to compare): on the H100 whole B=1
/// steps of the 135M shape ran 2-8% faster with it (docs/BENCHMARKS.md, run 5).
fn gemv_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVQ_GEMV").map_or(true, |v| v != "0"))
}

/// Suffixes of the one- and two-row GEMV kernels: their staging batch (input vectors a thread loads
/// before it stores any). Run 21 (H100): one row keeps 1 (4 CTAs per SM; the 8B shape's 32-layer
/// GEMV chain 4.773 ms against 4.994 with 2), two rows take 2 (3 CTAs per SM; whole B=2 steps of the
/// 1B shape 4.7% faster, the 8B chain 1% faster). `KVQ_GEMV_STAGE` = 1, 2 or 4 sets both, to compare.
fn gemv_stage_suffixes() -> [&'static str; 2] {
    match std::env::var("KVQ_GEMV_STAGE").as_deref() {
        Ok("1") => ["", ""],
        Ok("2") => ["_s2", "_s2"],
        Ok("4") => ["_s4", "_s4"],
        _ => ["", "_s2"],
    }
}

/// Weight rows each warp of a GEMV takes: one. Taking several one after another spreads each CTA's x
/// staging (and RMSNorm sum) over more rows, but measured slower on the H100 (run 20, 8B shape, B=1
/// 4k: 6.238 GPU ms per step with 3 rows a warp for gate/up and 5 for lm_head, 6.009 with one).
/// `KVQ_GEMV_RPW` sets it, to compare.
fn gemv_rows_per_warp() -> usize {
    static FIXED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FIXED.get_or_init(|| {
        std::env::var("KVQ_GEMV_RPW")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&r: &usize| r >= 1)
            .unwrap_or(1)
    })
}

impl Blas {
    /// Creates the handle on `gpu`'s stream; a missing libcublas is an error, not a panic.
    pub fn new(gpu: &Arc<Gpu>) -> Result<Self> {
        let stream = gpu.stream().clone();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let h = std::panic::catch_unwind(move || CudaBlas::new(stream));
        std::panic::set_hook(hook);
        let handle = h
            .map_err(|_| {
                GpuError::NoGpu("the cuBLAS library (libcublas.so) could not be loaded".into())
            })?
            .map_err(|e| GpuError::Blas(format!("creating the cuBLAS handle: {e:?}")))?;
        use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let gemv_smem = GEMV_SMEM_MAX.min(gpu.max_smem_per_block()?);
        let f = |n: &str| -> Result<CudaFunction> {
            let f = gpu.function(MODULE, &format!("kvq_model_gemv{n}"))?;
            f.set_attribute(
                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                gemv_smem as i32,
            )
            .map_err(drv("allowing the GEMV its shared memory"))?;
            Ok(f)
        };
        let [s1, s2] = gemv_stage_suffixes();
        let gemv = [f(&format!("1{s1}"))?, f(&format!("2{s2}"))?];
        Ok(Self {
            handle: Arc::new(handle),
            gpu: gpu.clone(),
            gemv,
            gemv_smem,
            gemv_on: gemv_enabled(),
        })
    }

    /// Routes decode-step shapes through the GEMV (true) or cuBLAS (false): benchmarks compare the two.
    pub fn set_gemv(&mut self, on: bool) {
        self.gemv_on = on;
    }

    /// True when an n-row GEMM over `w` goes through kvq_model_gemv (decode-step shapes).
    pub fn uses_gemv(&self, w: &Linear, n: usize) -> bool {
        self.gemv_on
            && (1..=2).contains(&n)
            && w.inp.is_multiple_of(8)
            && n * w.inp * 2 <= self.gemv_smem
    }

    /// y = f(input) · W (or y += ...) through kvq_model_gemv, where f is the RMSNorm or SwiGLU the
    /// input asks for: a decode step's norm and activation kernels folded into the GEMV that reads them.
    /// Only for shapes [`Blas::uses_gemv`] accepts ([`Blas::matmul_from`] picks for any shape).
    pub fn gemv_from(
        &self,
        input: GemvIn<'_>,
        w: &Linear,
        y: &mut CudaSlice<f32>,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        if !self.uses_gemv(w, n) {
            return Err(GpuError::Shape(format!(
                "a fused GEMV of {n} rows over {}x{} (the GEMV takes 1-2 rows, inp % 8 == 0, inp <= {}, KVQ_GEMV on)",
                w.inp,
                w.out,
                self.gemv_smem / (2 * n.max(1))
            )));
        }
        match input {
            GemvIn::F16(x) => need("gemv input", x.len(), n * w.inp)?,
            GemvIn::RmsNorm { x, w: nw, .. } => {
                need("gemv rmsnorm input", x.len(), n * w.inp)?;
                need("gemv rmsnorm weight", nw.len(), w.inp)?;
            }
            GemvIn::SwiGlu(gu) => need("gemv swiglu input", gu.len(), n * 2 * w.inp)?,
        }
        need("gemv weight", w.w.len(), w.inp * w.out)?;
        need("gemv output", y.len(), n * w.out)?;
        self.gemv(input, w, y, n, accumulate)
    }

    /// y = f(input) · W (or y += ...) for any row count: the fused GEMV where [`Blas::uses_gemv`]
    /// takes the shape, else `ops`' RMSNorm or SwiGLU into `scratch` (f16, n x w.inp) and
    /// [`Blas::matmul`]. The one place a forward picks between the two.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_from(
        &self,
        ops: &ModelOps,
        input: GemvIn<'_>,
        scratch: &mut CudaSlice<f16>,
        w: &Linear,
        y: &mut CudaSlice<f32>,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        if self.uses_gemv(w, n) {
            return self.gemv_from(input, w, y, n, accumulate);
        }
        match input {
            GemvIn::F16(x) => return self.matmul(x, w, y, n, accumulate),
            GemvIn::RmsNorm { x, w: nw, eps } => {
                ops.rmsnorm(x, n, None, nw, scratch, (n, w.inp), eps)?
            }
            GemvIn::SwiGlu(gu) => ops.swiglu(gu, scratch, (n, w.inp))?,
        }
        self.matmul(scratch, w, y, n, accumulate)
    }

    /// The GEMV path of [`Blas::matmul`] and [`Blas::gemv_from`] (sizes already checked).
    fn gemv(
        &self,
        input: GemvIn<'_>,
        w: &Linear,
        y: &mut CudaSlice<f32>,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        // n is 1 or 2 here (uses_gemv): kernel gemv{n}, which stages n x inp halves.
        let f = &self.gemv[n - 1];
        let rpw = gemv_rows_per_warp();
        let ctas = w.out.div_ceil(GEMV_WARPS * rpw);
        let cfg = LaunchConfig {
            grid_dim: (to_i32("gemv CTAs", ctas)? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (n * w.inp * 2) as u32,
        };
        let st = self.gpu.stream();
        let (x, xf, nw, eps, mode) = match input {
            GemvIn::F16(x) => (x.device_ptr(st).0, 0u64, 0u64, 0f32, 0i32),
            GemvIn::RmsNorm { x, w: nw, eps } => {
                (0, x.device_ptr(st).0, nw.device_ptr(st).0, eps, 1)
            }
            GemvIn::SwiGlu(gu) => (0, gu.device_ptr(st).0, 0, 0.0, 2),
        };
        let args = KernelArgs::default()
            .val(&x)
            .val(&xf)
            .val(&nw)
            .val(&eps)
            .val(&mode)
            .buf(&w.w, st)
            .buf(y, st)
            .val(&to_i32("gemv rows", n)?)
            .val(&to_i32("gemv in", w.inp)?)
            .val(&to_i32("gemv out", w.out)?)
            .val(&to_i32("gemv rows per warp", rpw)?)
            .val(&i32::from(accumulate));
        // SAFETY: (types/order) kvq_model_gemv{1,2}(const __half* x, const float* xf, const float* nw,
        // float eps, int mode, const __half* w, float* y, int n, int inp, int out, int rpw,
        // int accumulate) gets three device addresses (u64), f32, i32, then CudaSlice<f16>,
        // CudaSlice<f32> and five i32; the kernel reads only the input `mode` names (x for 0, xf and
        // nw for 1, xf for 2; the others are 0). (aliasing) `y` is a &mut borrow distinct from the
        // input slices and `w`. (bounds, checked by matmul and gemv_from) x or xf holds n x inp
        // (n x 2 inp for SwiGLU), nw inp, w out x inp, y n x out; n (1 or 2) = the rows of the kernel
        // picked, whose n x inp halves of staged x are the dynamic shared memory asked for (<=
        // gemv_smem, the limit set at creation, by uses_gemv); warps past `out` rows write
        // nothing. inp % 8 == 0 and W is its own allocation (256-byte aligned), so every row starts
        // 16-byte aligned and the kernel's 16-byte loads (k < inp, k % 8 == 0) stay in the row.
        // (dependent launch) every CTA reads only W (written by no kernel) before kvq_pdl_wait(),
        // everything else after.
        unsafe {
            self.gpu
                .launch_pdl(f, cfg, args, "launching kvq_model_gemv")
        }
    }

    /// y[n][out] = x[n][inp] · W (or y += x · W when `accumulate`): x f16, W f16, y f32.
    pub fn matmul(
        &self,
        x: &CudaSlice<f16>,
        w: &Linear,
        y: &mut CudaSlice<f32>,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        need("gemm input", x.len(), n * w.inp)?;
        need("gemm weight", w.w.len(), w.inp * w.out)?;
        need("gemm output", y.len(), n * w.out)?;
        if n == 0 {
            return Ok(());
        }
        if self.uses_gemv(w, n) {
            return self.gemv(GemvIn::F16(x), w, y, n, accumulate);
        }
        let (m, nn, k) = (
            to_i32("gemm out", w.out)?,
            to_i32("gemm rows", n)?,
            to_i32("gemm in", w.inp)?,
        );
        let stream: &CudaStream = self.gpu.stream();
        let (a, b, c) = (
            w.w.device_ptr(stream).0,
            x.device_ptr(stream).0,
            y.device_ptr(stream).0,
        );
        let key = vec![
            a,
            b,
            c,
            m as u64,
            nn as u64,
            k as u64,
            u64::from(accumulate),
        ];
        let handle = self.handle.clone();
        let (inp, out) = (w.inp, w.out);
        let run = move |_: &Gpu| -> Result<()> {
            let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
            // Row-major y[n][out] = x[n][inp] W^T (W row-major [out][inp], i.e. column-major inp x
            // out with ld inp) is, column-major, y^T (out x n, ld out) = op_T(W) x^T (inp x n, ld inp).
            // SAFETY: (types) A and B are CUDA_R_16F (CudaSlice<f16>), C is CUDA_R_32F
            // (CudaSlice<f32>), alpha/beta are f32 host scalars as CUBLAS_COMPUTE_32F requires in the
            // default host pointer mode (read during the call, so capturing them is fine). (aliasing)
            // `y` was a &mut borrow, distinct from `x` and `w`. (bounds) A reads inp x out = w.len()
            // halves, B inp x n <= x.len(), C writes out x n <= y.len() (checked when recorded).
            // (lifetime) issued now or from this step's record (crate::graph), while the buffers
            // live. (stream) the handle was bound to the GPU's one stream at creation, so the GEMM is
            // ordered after the launches that wrote x and before those that read y.
            unsafe {
                cublas::gemm_ex(
                    *handle.handle(),
                    cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m,
                    nn,
                    k,
                    (&alpha) as *const f32 as *const _,
                    a as *const _,
                    cublas_sys::cudaDataType_t::CUDA_R_16F,
                    k,
                    b as *const _,
                    cublas_sys::cudaDataType_t::CUDA_R_16F,
                    k,
                    (&beta) as *const f32 as *const _,
                    c as *mut _,
                    cublas_sys::cudaDataType_t::CUDA_R_32F,
                    m,
                    cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| GpuError::Blas(format!("GEMM {nn}x{inp}x{out}: {e:?}")))
        };
        self.gpu.submit(Work::Call {
            key,
            run: Box::new(run),
        })
    }
}
