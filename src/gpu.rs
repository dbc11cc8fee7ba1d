//! The device runtime: one context, one explicit stream, kernels loaded from the embedded fatbins.

use crate::error::{drv, GpuError, Result};
use crate::graph::{KernelArgs, Recording, Work};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaViewMut, DevicePtrMut, DeviceRepr,
    LaunchConfig,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Names of the embedded kernel modules (empty when built without nvcc).
pub fn embedded_modules() -> Vec<&'static str> {
    embedded::MODULES.iter().map(|m| m.0).collect()
}

/// One GPU: context, stream and the kernel modules loaded so far.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels looked up so far, per module: a decode step asks for the same few hundred times
    /// (looked up by `&str`, so a hit allocates nothing).
    functions: Mutex<HashMap<&'static str, HashMap<String, CudaFunction>>>,
    staging: Mutex<Staging>,
    /// The step being recorded (crate::graph): launches and uploads are collected, not issued.
    recording: Mutex<Option<Recording>>,
}

/// Page-locked host memory that small per-step uploads go through (see [`Gpu::upload`]).
struct Staging {
    ptr: *mut u8,
    cap: usize,
    used: usize,
}

// SAFETY: the pointer is owned by the Gpu (freed in its Drop) and only touched under the Mutex.
unsafe impl Send for Staging {}

/// Bytes of page-locked staging memory per GPU.
const STAGING_BYTES: usize = 8 << 20;

impl Gpu {
    /// Opens GPU `ordinal`; errors clearly when kernels were not built or no driver/GPU is present.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(why) = embedded::MISSING {
            return Err(GpuError::NoKernels(why));
        }
        // cudarc panics when libcuda cannot be loaded: turn that into an error, without the panic text.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let n = std::panic::catch_unwind(CudaContext::device_count);
        std::panic::set_hook(hook);
        let n = n
            .map_err(|_| {
                GpuError::NoGpu("the CUDA driver library (libcuda.so) could not be loaded".into())
            })?
            .map_err(|e| GpuError::NoGpu(format!("{e:?}")))?;
        if ordinal as i32 >= n {
            return Err(GpuError::NoGpu(format!(
                "GPU {ordinal} requested, {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("opening the CUDA context"))?;
        // One stream: cudarc's cross-stream event tracking only costs time here.
        // SAFETY: every buffer of this context is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        Ok(Self {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            staging: Mutex::new(Staging {
                ptr: std::ptr::null_mut(),
                cap: 0,
                used: 0,
            }),
            recording: Mutex::new(None),
        })
    }

    /// The context.
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kvq launch and copy goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device name and compute capability, for logs and benchmark records.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = self
            .ctx
            .compute_capability()
            .map(|(a, b)| format!("sm_{a}{b}"))
            .unwrap_or_default();
        format!("{name} ({cc})")
    }

    /// The embedded module `module`, loaded on first use.
    fn module(&self, module: &'static str) -> Result<Arc<CudaModule>> {
        let mut mods = self
            .modules
            .lock()
            .map_err(|_| GpuError::Shape("module cache poisoned".into()))?;
        if let Some(m) = mods.get(module) {
            return Ok(m.clone());
        }
        let image = embedded::MODULES
            .iter()
            .find(|m| m.0 == module)
            .ok_or_else(|| GpuError::MissingKernel(format!("{module} (module)")))?
            .1;
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
            .map_err(drv(format!("loading kernel module {module}")))?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// Looks up kernel `name` in embedded module `module` (loaded once).
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let mut fns = self
            .functions
            .lock()
            .map_err(|_| GpuError::Shape("kernel cache poisoned".into()))?;
        let known = fns.entry(module).or_default();
        if let Some(f) = known.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module(module)?
            .load_function(name)
            .map_err(|_| GpuError::MissingKernel(name.to_string()))?;
        known.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// A format module's page layout `(blocks per page, most pipeline stages, tokens per tile or 0 when
    /// a tile is a whole page, dynamic shared memory per warp and head channel past the page stages)`,
    /// read from the module's `kvq_layout` global so the kernel's constants are stated once, in the .cu
    /// file.
    pub fn layout(&self, module: &'static str) -> Result<(usize, usize, usize, usize)> {
        let m = self.module(module)?;
        let sym = m
            .get_global("kvq_layout", &self.stream)
            .map_err(|_| GpuError::MissingKernel(format!("kvq_layout in module {module}")))?;
        let b = self
            .stream
            .clone_dtoh(&sym)
            .map_err(drv(format!("reading {module}'s layout")))?;
        let int = |i: usize, zero_ok: bool| -> Result<usize> {
            let v = b
                .get(4 * i..4 * i + 4)
                .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .ok_or_else(|| {
                    GpuError::Shape(format!("{module}'s kvq_layout is {} bytes", b.len()))
                })?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 || zero_ok)
                .ok_or_else(|| GpuError::Shape(format!("{module}'s kvq_layout holds {v}")))
        };
        Ok((int(0, false)?, int(1, false)?, int(2, true)?, int(3, true)?))
    }

    /// Dynamic shared memory (bytes) of a format's block encoder at head_dim `d`, from the module's
    /// `kvq_encode_smem` global ({D=64, D=128}), for encoders that do not stage the block as f32 (large
    /// blocks); `None` when it holds 0 or the module lacks it (the staging default applies). Every
    /// module states it, so the lookup never fails (compute-sanitizer reports failed lookups).
    pub fn encode_smem(&self, module: &'static str, d: usize) -> Result<Option<usize>> {
        let m = self.module(module)?;
        let Ok(sym) = m.get_global("kvq_encode_smem", &self.stream) else {
            return Ok(None);
        };
        let b = self
            .stream
            .clone_dtoh(&sym)
            .map_err(drv(format!("reading {module}'s encoder shared memory")))?;
        let i = match d {
            64 => 0,
            128 => 1,
            _ => return Ok(None),
        };
        let w = b.get(4 * i..4 * i + 4).ok_or_else(|| {
            GpuError::Shape(format!("{module}'s kvq_encode_smem is {} bytes", b.len()))
        })?;
        let v = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        usize::try_from(v)
            .map(|v| (v > 0).then_some(v))
            .map_err(|_| GpuError::Shape(format!("{module}'s kvq_encode_smem holds {v}")))
    }

    /// Largest dynamic shared memory one CTA may opt into (bytes).
    pub fn max_smem_per_block(&self) -> Result<usize> {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        self.ctx
            .attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map(|n| n.max(0) as usize)
            .map_err(drv("querying the shared memory limit"))
    }

    /// Streaming multiprocessors of the device (sizes the split count to one wave).
    pub fn sm_count(&self) -> Result<usize> {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        self.ctx
            .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|n| n.max(1) as usize)
            .map_err(drv("querying the SM count"))
    }

    /// Copies `src` to `dst` on the stream through page-locked staging memory. A copy from pageable
    /// memory may wait for the stream's earlier work; this one never does, so the host keeps queueing
    /// kernels while the GPU runs (the per-layer index uploads of a decode step go through here).
    /// The staging area is reused only after a stream synchronize, so queued copies never see it change.
    pub fn upload<T: DeviceRepr + Copy>(&self, src: &[T], dst: &mut CudaViewMut<T>) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        if src.len() > dst.len() {
            return Err(GpuError::Shape(format!(
                "upload of {} values into {}",
                src.len(),
                dst.len()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        if let Some(rec) = self.lock_recording()?.as_mut() {
            let (dptr, _sync) = dst.device_ptr_mut(&self.stream);
            // SAFETY: `src` is plain data (DeviceRepr + Copy) of `bytes` initialised bytes.
            let raw = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u8, bytes) };
            return rec.upload(raw, dptr);
        }
        let mut sg = self
            .staging
            .lock()
            .map_err(|_| GpuError::Shape("staging memory poisoned".into()))?;
        if bytes > STAGING_BYTES {
            drop(sg);
            return self
                .stream
                .memcpy_htod(src, dst)
                .map_err(drv("uploading to the GPU"));
        }
        if sg.ptr.is_null() {
            self.ctx
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            // SAFETY: a plain page-locked allocation of STAGING_BYTES, freed in Drop.
            let p = unsafe { cudarc::driver::result::malloc_host(STAGING_BYTES, 0) }
                .map_err(drv("allocating page-locked staging memory"))?;
            sg.ptr = p as *mut u8;
            sg.cap = STAGING_BYTES;
        }
        if sg.used + bytes > sg.cap {
            // Every copy queued from the area must finish before it is overwritten.
            self.stream
                .synchronize()
                .map_err(drv("waiting for staged uploads"))?;
            sg.used = 0;
        }
        let off = sg.used;
        // SAFETY: [off, off + bytes) lies inside the allocation and no queued copy reads it (the area
        // is only rewound after a synchronize); `src` is plain data (DeviceRepr + Copy).
        let staged = unsafe {
            let at = sg.ptr.add(off);
            std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, at, bytes);
            std::slice::from_raw_parts(at as *const T, src.len())
        };
        let (dptr, _sync) = dst.device_ptr_mut(&self.stream);
        // SAFETY: `dst` holds at least src.len() values (checked); the staged bytes stay untouched
        // until the stream has run this copy (see above).
        unsafe { cudarc::driver::result::memcpy_htod_async(dptr, staged, self.stream.cu_stream()) }
            .map_err(drv("uploading to the GPU"))?;
        sg.used = (off + bytes).next_multiple_of(256);
        Ok(())
    }

    fn lock_recording(&self) -> Result<std::sync::MutexGuard<'_, Option<Recording>>> {
        self.recording
            .lock()
            .map_err(|_| GpuError::Shape("step recording poisoned".into()))
    }

    /// Starts recording a step: launches and uploads are collected until [`Gpu::stop_recording`]
    /// (crate::graph issues them, from a CUDA graph when the same step was seen before).
    pub(crate) fn start_recording(&self) -> Result<()> {
        let mut r = self.lock_recording()?;
        if r.is_some() {
            return Err(GpuError::Shape("a step is already being recorded".into()));
        }
        *r = Some(Recording::default());
        Ok(())
    }

    /// Ends the recording and returns what it collected (empty when none was running).
    pub(crate) fn stop_recording(&self) -> Result<Recording> {
        Ok(self.lock_recording()?.take().unwrap_or_default())
    }

    /// Issues `work` now, or adds it to the step being recorded.
    pub(crate) fn submit(&self, work: Work) -> Result<()> {
        if let Some(rec) = self.lock_recording()?.as_mut() {
            rec.work.push(work);
            return Ok(());
        }
        work.issue(self)
    }

    /// Launches kernel `f` with `args` on the stream (or records the launch) as a programmatic dependent
    /// unless `KVQ_PDL_ALL=0` (every kvq kernel starts with KVQ_PDL_ENTER, tests/pdl_entry.rs).
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and types; the buffers they
    /// name must be alive and large enough for every access the kernel makes with `cfg`, with no
    /// buffer the kernel writes aliased by another argument, until the stream has run the launch.
    pub(crate) unsafe fn launch(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: KernelArgs,
        what: &'static str,
    ) -> Result<()> {
        self.submit(Work::Kernel {
            f: f.clone(),
            cfg,
            args,
            what,
            pdl: pdl_all(),
        })
    }

    /// [`Gpu::launch`] as a programmatic dependent launch (unless `KVQ_PDL=0`): the kernel may start
    /// while the previous one runs, so independent loads (weights) overlap that kernel's tail.
    ///
    /// # Safety
    /// As [`Gpu::launch`], and the kernel must execute kvq_pdl_wait() (kernels/include/kvq_pdl.cuh) in
    /// every CTA before it reads or writes memory that an earlier kernel on the stream reads or writes.
    pub(crate) unsafe fn launch_pdl(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: KernelArgs,
        what: &'static str,
    ) -> Result<()> {
        self.submit(Work::Kernel {
            f: f.clone(),
            cfg,
            args,
            what,
            pdl: pdl_enabled(),
        })
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv("querying memory"))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if let Ok(sg) = self.staging.get_mut() {
            if !sg.ptr.is_null() {
                // Queued copies may still read the staging area: finish them first. Errors here
                // cannot be reported from Drop; the memory goes with the process then.
                if self.stream.synchronize().is_ok() {
                    // SAFETY: allocated by malloc_host in `upload`, no copy reads it any more.
                    let _ = unsafe { cudarc::driver::result::free_host(sg.ptr as *mut _) };
                }
                sg.ptr = std::ptr::null_mut();
            }
        }
    }
}

/// The derived kernel name `kvq_{fmt}_{op}_{dtype}_hd{D}` (kernels/include/kvq_params.cuh's KVQ_NAME).
pub fn kernel_name(fmt: &str, op: &str, dtype: &str, head_dim: usize) -> String {
    format!("kvq_{fmt}_{op}_{dtype}_hd{head_dim}")
}

/// `KVQ_PDL=0`: launch every kernel in plain stream order (to measure what dependent launches buy).
fn pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVQ_PDL").map_or(true, |v| v != "0"))
}

/// Every kvq kernel, not only the GEMV, launched as a programmatic dependent, so each kernel's launch
/// overlaps the tail of the one before: 8B-shape B=1 steps 0.1-6% faster on the H100 (run 15), GPU
/// time per step 0.5% lower (run 16).
/// `KVQ_PDL_ALL=0` launches the others in plain stream order, to compare.
fn pdl_all() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| pdl_enabled() && std::env::var("KVQ_PDL_ALL").map_or(true, |v| v != "0"))
}
