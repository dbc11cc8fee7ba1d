//! The GPU backend's error type.

use thiserror::Error;

/// Everything the GPU backend can report; each says what to do about it.
#[derive(Debug, Error)]
pub enum GpuError {
    /// The library was built without nvcc, so it holds no kernels.
    #[error("kvq was built without CUDA kernels ({0}); run scripts/setup-cuda.sh (or set NVCC) and rebuild")]
    NoKernels(&'static str),
    /// No driver or no device.
    #[error("no usable CUDA GPU: {0}")]
    NoGpu(String),
    /// A driver call failed.
    #[error("CUDA driver error in {what}: {err}")]
    Driver { what: String, err: String },
    /// A kernel this build does not contain.
    #[error("no kernel '{0}' in this build (format, head_dim or GQA ratio not compiled)")]
    MissingKernel(String),
    /// Shapes or sizes that the kernels cannot serve.
    #[error("{0}")]
    Shape(String),
    /// Not enough device memory.
    #[error("out of GPU memory: {what} needs {need} bytes, {free} free")]
    OutOfMemory {
        what: String,
        need: usize,
        free: usize,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {0}")]
    Blas(String),
    /// A model could not be loaded or run on the CPU side (files, tokenizer, shapes, context).
    #[error(transparent)]
    Model(#[from] kvq_model::ModelError),
    /// A request the engine cannot serve (bad token ids, unknown sequences, empty input).
    #[error("{0}")]
    Input(String),
    /// A format error from the CPU side (encoding, plans).
    #[error(transparent)]
    Format(#[from] kvq_formats::FormatError),
}

/// Result alias of the GPU backend.
pub type Result<T> = std::result::Result<T, GpuError>;

pub(crate) fn drv(what: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError {
    let what = what.into();
    move |e| GpuError::Driver {
        what,
        err: format!("{e:?}"),
    }
}
