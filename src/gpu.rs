//! The device runtime: one context, one explicit stream, kernels loaded from the embedded fatbins.

use crate::error::{drv, GpuError, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
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
}

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
        self.module(module)?
            .load_function(name)
            .map_err(|_| GpuError::MissingKernel(name.to_string()))
    }

    /// A format module's page layout `(blocks per page, most pipeline stages, tokens per tile or 0 when
    /// a tile is a whole page)`, read from the module's `kvq_layout` global so the kernel's constants
    /// are stated once, in the .cu file.
    pub fn layout(&self, module: &'static str) -> Result<(usize, usize, usize)> {
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
        Ok((int(0, false)?, int(1, false)?, int(2, true)?))
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

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv("querying memory"))
    }
}

/// The derived kernel name `kvq_{fmt}_{op}_{dtype}_hd{D}` (kernels/include/kvq_params.cuh's KVQ_NAME).
pub fn kernel_name(fmt: &str, op: &str, dtype: &str, head_dim: usize) -> String {
    format!("kvq_{fmt}_{op}_{dtype}_hd{head_dim}")
}
