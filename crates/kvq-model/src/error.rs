//! The model crate's error type: every variant names the file, flag or tensor involved.

use thiserror::Error;

/// Errors of loading, tokenizing and running a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A model file or directory that cannot be read or is malformed.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    /// A tensor missing or of the wrong shape.
    #[error("{path}: tensor '{name}': {reason}")]
    Tensor {
        path: String,
        name: String,
        reason: String,
    },
    /// An architecture kvq does not run.
    #[error("{path}: unsupported architecture '{arch}' (kvq runs llama-family models)")]
    Architecture { path: String, arch: String },
    /// Tokenizer problems (missing, mismatched with the model).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A context that does not fit the model or the cache.
    #[error("context of {tokens} tokens exceeds {limit} ({what})")]
    Context {
        tokens: usize,
        limit: usize,
        what: String,
    },
    /// Bad user input (flags, text).
    #[error("{0}")]
    Input(String),
    /// KV format or cache errors.
    #[error(transparent)]
    Format(#[from] kvq_formats::FormatError),
    /// Numerical backend errors.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
