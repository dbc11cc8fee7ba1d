//! Decode steps as CUDA graphs. A small model's step is hundreds of tiny kernels, and issuing them one
//! by one costs the host more than the GPU spends running them. So a step is *recorded*: every launch
//! and library call becomes a [`Work`] item (function, grid, argument bytes: the whole description),
//! and every small upload is packed into one buffer. The recorded list is the step's key: a list seen
//! before is replayed from the CUDA graph captured from it, a new one is issued directly (and captured
//! the second time it is seen). The packed uploads go up in one copy and are scattered on the device
//! by the graph's first kernel, so a replayed step costs one copy and one graph launch.
//!
//! A replay is exactly the recorded list issued again: the graph is looked up by the full list
//! (pointers included), so it can only replay work the host code has just asked for, on buffers that
//! are alive now.

use crate::error::{drv, GpuError, Result};
use crate::gpu::Gpu;
use crate::params::{KvqDecodeParams, KvqEncodeParams};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
};
use std::collections::HashMap;

/// Values whose bytes are all defined (no padding): they can be copied as kernel arguments and
/// compared as keys.
///
/// # Safety
/// The type must be plain data with no padding bytes and a C layout the kernel side agrees with.
pub(crate) unsafe trait ArgBytes: Copy {}
// SAFETY: primitive numbers have no padding.
unsafe impl ArgBytes for i32 {}
// SAFETY: as above.
unsafe impl ArgBytes for u32 {}
// SAFETY: as above.
unsafe impl ArgBytes for i64 {}
// SAFETY: as above.
unsafe impl ArgBytes for u64 {}
// SAFETY: as above.
unsafe impl ArgBytes for f32 {}
// SAFETY: #[repr(C)], fields laid out without gaps (size and offsets asserted in src/params.rs).
unsafe impl ArgBytes for KvqDecodeParams {}
// SAFETY: as above.
unsafe impl ArgBytes for KvqEncodeParams {}

/// A kernel's arguments as the driver takes them: each value's bytes in its own 8-byte-aligned slot.
#[derive(Default)]
pub(crate) struct KernelArgs {
    words: Vec<u64>,
    starts: Vec<usize>,
}

impl KernelArgs {
    /// Appends a value argument.
    pub(crate) fn val<T: ArgBytes>(mut self, v: &T) -> Self {
        let size = std::mem::size_of::<T>();
        let start = self.words.len();
        self.words.resize(start + size.div_ceil(8), 0);
        // SAFETY: T has no padding (ArgBytes), so all `size` bytes are initialised; the destination
        // holds size.div_ceil(8) * 8 >= size bytes just reserved.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v as *const T as *const u8,
                self.words.as_mut_ptr().add(start) as *mut u8,
                size,
            );
        }
        self.starts.push(start);
        self
    }

    /// Appends a device buffer argument (its address; the kernel sees a pointer).
    pub(crate) fn buf<T>(self, s: &CudaSlice<T>, st: &CudaStream) -> Self {
        let p: u64 = s.device_ptr(st).0;
        self.val(&p)
    }
}

/// Launches `f` with the programmatic-stream-serialization attribute (cuLaunchKernelEx): it may start
/// while the stream's previous kernel runs, and waits for it on the device (griddepcontrol.wait).
fn launch_pdl(
    gpu: &Gpu,
    f: &CudaFunction,
    cfg: &LaunchConfig,
    ptrs: &mut [*mut std::ffi::c_void],
) -> std::result::Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    // SAFETY: a zeroed attribute value is a valid union (plain integers); only the field the id names
    // is read by the driver.
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let lc = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: gpu.stream().cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: as for launch_kernel in Work::issue (arguments packed by a typed wrapper whose SAFETY
    // comment covers them, each pointer in `ptrs` addresses one argument alive for the call); `lc` and
    // `attr` live across the call; the kernel calls kvq_pdl_wait() before touching memory an earlier
    // kernel uses (checked where Gpu::launch_pdl is called).
    unsafe {
        sys::cuLaunchKernelEx(
            &lc,
            f.cu_function(),
            ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// A device call that is not a plain kernel launch (cuBLAS, device copies), issued by a closure.
pub(crate) type CallFn = Box<dyn Fn(&Gpu) -> Result<()> + Send>;

/// One unit of device work of a step, as data.
pub(crate) enum Work {
    /// A kernel launch: function, shape, argument bytes.
    Kernel {
        f: CudaFunction,
        cfg: LaunchConfig,
        args: KernelArgs,
        what: &'static str,
        /// Launched as a programmatic dependent (may start before the previous kernel ends; the
        /// kernel waits for it with griddepcontrol.wait, kernels/include/kvq_pdl.cuh).
        pdl: bool,
    },
    /// A library call or copy, identified by `key` (every value it passes to the device).
    Call { key: Vec<u64>, run: CallFn },
}

impl Work {
    /// Issues the work on the GPU's stream now.
    pub(crate) fn issue(&self, gpu: &Gpu) -> Result<()> {
        match self {
            Work::Kernel {
                f,
                cfg,
                args,
                what,
                pdl,
            } => {
                let mut ptrs: Vec<*mut std::ffi::c_void> = args
                    .starts
                    .iter()
                    .map(|&s| args.words[s..].as_ptr() as *mut std::ffi::c_void)
                    .collect();
                if *pdl {
                    return launch_pdl(gpu, f, cfg, &mut ptrs).map_err(drv(*what));
                }
                // SAFETY: the arguments were packed by a typed wrapper in src/launch*.rs whose SAFETY
                // comment covers their types, order, aliasing and bounds for this function and shape;
                // the buffers they point to are alive (recorded this step, see the module docs); each
                // pointer in `ptrs` addresses one argument's bytes in `args`, alive for the call.
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        f.cu_function(),
                        cfg.grid_dim,
                        cfg.block_dim,
                        cfg.shared_mem_bytes,
                        gpu.stream().cu_stream(),
                        &mut ptrs,
                    )
                }
                .map_err(drv(*what))
            }
            Work::Call { run, .. } => run(gpu),
        }
    }

    /// Appends this item's identity to `key`: everything that decides what the device does.
    fn key(&self, key: &mut Vec<u64>) {
        match self {
            Work::Kernel {
                f, cfg, args, pdl, ..
            } => {
                let (g, b) = (cfg.grid_dim, cfg.block_dim);
                key.extend_from_slice(&[
                    1 + u64::from(*pdl),
                    f.cu_function() as usize as u64,
                    (g.0 as u64) << 32 | g.1 as u64,
                    (g.2 as u64) << 32 | b.0 as u64,
                    (b.1 as u64) << 32 | b.2 as u64,
                    cfg.shared_mem_bytes as u64,
                    args.words.len() as u64,
                ]);
                key.extend_from_slice(&args.words);
                key.extend(args.starts.iter().map(|&s| s as u64));
            }
            Work::Call { key: k, .. } => {
                key.extend_from_slice(&[2, k.len() as u64]);
                key.extend_from_slice(k);
            }
        }
    }
}

/// What a recorded step holds: its work in order and its packed uploads.
#[derive(Default)]
pub(crate) struct Recording {
    pub(crate) work: Vec<Work>,
    /// Upload bytes, each upload at a 16-byte-aligned offset.
    pub(crate) bytes: Vec<u8>,
    /// (destination address, offset in `bytes`, length in bytes) of each upload.
    pub(crate) segs: Vec<(u64, u32, u32)>,
}

impl Recording {
    /// Packs one upload of `src` to device address `dst`.
    pub(crate) fn upload(&mut self, src: &[u8], dst: u64) -> Result<()> {
        let off = self.bytes.len().next_multiple_of(16);
        let (o, n) = (u32::try_from(off), u32::try_from(src.len()));
        let (Ok(o), Ok(n)) = (o, n) else {
            return Err(GpuError::Shape(format!(
                "a recorded step's uploads exceed 4 GiB ({} + {} bytes)",
                off,
                src.len()
            )));
        };
        self.bytes.resize(off, 0);
        self.bytes.extend_from_slice(src);
        self.segs.push((dst, o, n));
        Ok(())
    }
}

/// Counts of how recorded steps ran (for benchmark records and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps replayed from a captured graph.
    pub replayed: u64,
    /// Steps captured into a new graph (then launched).
    pub captured: u64,
    /// Steps issued item by item (first sighting of their work list, or graphs off).
    pub direct: u64,
    /// Nodes (kernels, library kernels, copies) of the last captured graph: the device work one
    /// step is made of.
    pub nodes: u64,
}

/// Most graphs kept; a decode whose context grows makes a new work list every few hundred steps.
const MAX_GRAPHS: usize = 64;

/// The captured graphs of one engine, by work list, and the device buffer uploads are scattered from.
pub(crate) struct StepGraphs {
    enabled: bool,
    /// hash -> (full key, graph).
    graphs: HashMap<u64, (Vec<u64>, CudaGraph)>,
    /// Hashes of work lists seen once (captured when seen again).
    seen: HashMap<u64, ()>,
    arena: Option<CudaSlice<u8>>,
    stats: GraphStats,
    key: Vec<u64>,
    /// Why capturing failed (graphs are off from then on).
    failed: Option<String>,
    /// The GPU's span of each step, when a benchmark asks ([`StepSpans`]).
    pub(crate) spans: Option<StepSpans>,
}

/// CUDA events around each step's launch: the GPU's time for each step without the host's recording
/// and matching before each launch, which a synchronous decode loop leaves the GPU idle for.
#[derive(Default)]
pub(crate) struct StepSpans {
    pending: std::collections::VecDeque<(CudaEvent, CudaEvent)>,
    /// Each harvested step's time, in order (a block-sealing step stands out among the others).
    steps_ms: Vec<f64>,
}

impl StepSpans {
    /// Issues `launch` between two recorded events (first adding the time of the pairs before the
    /// last one: the last step may still run while a chained decode issues the next,
    /// [`crate::Engine::decode_greedy`], and reading its time would wait for it).
    pub(crate) fn around(&mut self, gpu: &Gpu, launch: impl FnOnce() -> Result<()>) -> Result<()> {
        self.harvest(1)?;
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let stream = gpu.stream();
        let a = stream
            .record_event(timing)
            .map_err(drv("recording a step event"))?;
        launch()?;
        let b = stream
            .record_event(timing)
            .map_err(drv("recording a step event"))?;
        self.pending.push_back((a, b));
        Ok(())
    }

    /// Each step's GPU milliseconds since the last call, in order (waits for the last step to finish).
    pub(crate) fn take_ms(&mut self) -> Result<Vec<f64>> {
        self.harvest(0)?;
        Ok(std::mem::take(&mut self.steps_ms))
    }

    /// Adds the time of every pending pair but the last `keep` (waiting for each to finish).
    fn harvest(&mut self, keep: usize) -> Result<()> {
        while self.pending.len() > keep {
            let Some((a, b)) = self.pending.pop_front() else {
                break;
            };
            let ms = a.elapsed_ms(&b).map_err(drv("reading step events"))?;
            self.steps_ms.push(f64::from(ms));
        }
        Ok(())
    }
}

/// `launch`, between step events when `spans` is on.
pub(crate) fn timed(
    spans: &mut Option<StepSpans>,
    gpu: &Gpu,
    launch: impl FnOnce() -> Result<()>,
) -> Result<()> {
    match spans {
        Some(s) => s.around(gpu, launch),
        None => launch(),
    }
}

/// Bytes of one scatter segment in the arena: destination u64, source offset u32, length u32.
const SEG_BYTES: usize = 16;

impl StepGraphs {
    /// Graphs on unless `KVQ_GRAPHS=0` (to compare with the direct path).
    pub(crate) fn new() -> Self {
        let off = std::env::var("KVQ_GRAPHS").is_ok_and(|v| v == "0");
        Self {
            enabled: !off,
            graphs: HashMap::new(),
            seen: HashMap::new(),
            arena: None,
            stats: GraphStats::default(),
            key: Vec::new(),
            failed: None,
            spans: None,
        }
    }

    /// Whether steps are recorded (and replayed from graphs).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns recording on or off (dropping the graphs when off).
    pub(crate) fn set_enabled(&mut self, gpu: &Gpu, on: bool) -> Result<()> {
        self.enabled = on;
        if !on {
            self.clear(gpu)?;
        }
        Ok(())
    }

    /// Counts since the engine was built.
    pub(crate) fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Why graph capture failed, if it did (the engine then issues steps directly).
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Issues a recorded step directly (uploads, then its work), caching nothing: for a step whose
    /// host side failed half way, so the device gets exactly what was asked before the failure.
    pub(crate) fn run_direct(&mut self, gpu: &Gpu, mut rec: Recording) -> Result<()> {
        if !rec.segs.is_empty() {
            let scatter = self.stage_uploads(gpu, &rec)?;
            rec.work.insert(0, scatter);
        }
        issue_all(gpu, &rec.work)
    }

    /// Drops every graph (after the stream has finished with them).
    pub(crate) fn clear(&mut self, gpu: &Gpu) -> Result<()> {
        if !self.graphs.is_empty() {
            gpu.stream()
                .synchronize()
                .map_err(drv("waiting before dropping graphs"))?;
        }
        self.graphs.clear();
        self.seen.clear();
        Ok(())
    }

    /// Runs a recorded step: uploads, then its work from a graph when this list was seen before.
    pub(crate) fn run(&mut self, gpu: &Gpu, mut rec: Recording) -> Result<()> {
        if !rec.segs.is_empty() {
            let scatter = self.stage_uploads(gpu, &rec)?;
            rec.work.insert(0, scatter);
        }
        if rec.work.is_empty() {
            return Ok(());
        }
        self.key.clear();
        for w in &rec.work {
            w.key(&mut self.key);
        }
        let h = hash(&self.key);
        if let Some((k, g)) = self.graphs.get(&h) {
            if *k == self.key {
                timed(&mut self.spans, gpu, || {
                    g.launch().map_err(drv("launching a step graph"))
                })?;
                self.stats.replayed += 1;
                return Ok(());
            }
        }
        if self.seen.remove(&h).is_none() {
            if self.seen.len() >= 4 * MAX_GRAPHS {
                self.seen.clear();
            }
            self.seen.insert(h, ());
            self.stats.direct += 1;
            return timed(&mut self.spans, gpu, || issue_all(gpu, &rec.work));
        }
        let g = match capture(gpu, &rec.work) {
            Ok(g) => g,
            Err(e) => {
                // The stream is usable again (capture ended); run this step directly, and the next
                // ones too: a step that cannot be captured once will not be the next time.
                self.enabled = false;
                self.failed = Some(e.to_string());
                self.stats.direct += 1;
                return timed(&mut self.spans, gpu, || issue_all(gpu, &rec.work));
            }
        };
        timed(&mut self.spans, gpu, || {
            g.launch().map_err(drv("launching a step graph"))
        })?;
        self.stats.captured += 1;
        self.stats.nodes = node_count(&g);
        if self.graphs.len() >= MAX_GRAPHS {
            self.clear(gpu)?;
        }
        self.graphs.insert(h, (std::mem::take(&mut self.key), g));
        Ok(())
    }

    /// Copies the packed uploads (segment table, then data) to the arena in one copy and returns the
    /// scatter kernel that moves them to their destinations.
    fn stage_uploads(&mut self, gpu: &Gpu, rec: &Recording) -> Result<Work> {
        let table = (rec.segs.len() * SEG_BYTES).next_multiple_of(16);
        let mut host = Vec::with_capacity(table + rec.bytes.len());
        for &(dst, off, len) in &rec.segs {
            host.extend_from_slice(&dst.to_le_bytes());
            host.extend_from_slice(&(off + table as u32).to_le_bytes());
            host.extend_from_slice(&len.to_le_bytes());
        }
        host.resize(table, 0);
        host.extend_from_slice(&rec.bytes);
        let have = self.arena.as_ref().map_or(0, |a| a.len());
        if have < host.len() {
            self.arena = None;
            self.arena = Some(
                gpu.stream()
                    .alloc_zeros::<u8>(host.len().next_power_of_two().max(4096))
                    .map_err(drv("allocating the step upload arena"))?,
            );
        }
        let arena = self
            .arena
            .as_mut()
            .ok_or_else(|| GpuError::Shape("no upload arena".into()))?;
        gpu.upload(&host, &mut arena.slice_mut(..host.len()))?;
        let f = gpu.function("model", "kvq_model_scatter")?;
        let n = i32::try_from(rec.segs.len())
            .map_err(|_| GpuError::Shape("too many uploads in one step".into()))?;
        // kvq_model_scatter(const uint8_t* arena, int n): block i copies segment i. Its SAFETY: each
        // segment's destination is a device view that Gpu::upload checked to hold its length when it
        // was recorded, and the arena holds the table and every segment's bytes (packed above).
        Ok(Work::Kernel {
            f,
            cfg: LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
            args: KernelArgs::default().buf(arena, gpu.stream()).val(&n),
            what: "launching kvq_model_scatter",
            pdl: false,
        })
    }
}

/// Issues every item in order.
fn issue_all(gpu: &Gpu, work: &[Work]) -> Result<()> {
    gpu.ctx()
        .bind_to_thread()
        .map_err(drv("binding the context"))?;
    work.iter().try_for_each(|w| w.issue(gpu))
}

/// Captures `work` into a graph (the stream is back to normal whatever happens).
fn capture(gpu: &Gpu, work: &[Work]) -> Result<CudaGraph> {
    let st = gpu.stream();
    st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(drv("starting a graph capture"))?;
    let issued = issue_all(gpu, work);
    let graph = st.end_capture(CUgraphInstantiate_flags(0));
    issued?;
    graph
        .map_err(drv("capturing a step graph"))?
        .ok_or_else(|| GpuError::Shape("a step capture gave no graph".into()))
}

/// Nodes of a captured graph (0 if the driver will not say).
fn node_count(g: &CudaGraph) -> u64 {
    let mut n = 0usize;
    // SAFETY: a null node array asks only for the count, written to `n`; the graph is alive (owned
    // by `g`) and not used concurrently (the engine is single-threaded over its graphs).
    let r =
        unsafe { cudarc::driver::sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) };
    if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        n as u64
    } else {
        0
    }
}

/// FxHash-style fold of the key words.
fn hash(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |h, &w| {
        (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95)
    })
}
