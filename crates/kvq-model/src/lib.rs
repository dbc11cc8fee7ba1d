//! kvq-model: LLaMA-family models for kvq. Loading (GGUF through candle's reader, Q4/Q8 weights
//! dequantized on load; HF safetensors directories), the tokenizer (from GGUF metadata or
//! tokenizer.json), the CPU reference forward whose every attention read goes through the compressed
//! cache of `kvq-formats`, sampling, generation and perplexity.

pub mod config;
pub mod convert;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod load;
pub mod model;
pub mod sample;
pub mod sweep;
pub mod testutil;
pub mod tokenizer;
pub mod tune;

pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use model::{Model, Sequence};
