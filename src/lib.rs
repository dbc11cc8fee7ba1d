//! kvq: the embeddable GPU backend. Device runtime over cudarc (driver loaded at run time), kernels
//! compiled by build.rs and embedded, typed launchers, fused decode attention over compressed caches.
//!
//! | format | GPU decode attention | GPU encoder |
//! |---|---|---|
//! | fp16 | yes (`kernels/formats/fp16.cu`) | yes |
//! | KIVI / AsymKV (group 32) | yes (`kernels/formats/kivi.cu`) | yes |
//! | DecoQuant (sub 16, chunk a multiple of 64) | yes (`kernels/formats/decoquant.cu`) | yes |
//! | QJL (group 32, m in {128, 256, 512}) | yes (`kernels/formats/qjl.cu`) | yes |
//! | RVQ (group 32, <= 16 stages, strided key groups; keys pre-RoPE, rotated in the kernel) | yes (`kernels/formats/rvq.cu`) | yes |
//!
//! The GPU engine ([`engine`]) runs whole LLaMA-family models: f16 weights, cuBLAS GEMMs, the
//! model-op kernels of kernels/model.cu, attention behind [`engine::AttentionBackend`].

pub mod attention;
pub mod cache;
pub mod check;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod graph;
mod launch;
mod launch_model;
pub mod params;

pub use engine::Engine;
pub use error::{GpuError, Result};
pub use gpu::Gpu;
pub use launch_model::{Blas, GemvIn, Indices, Linear, ModelOps};
