//! The one error type of the formats crate.

use thiserror::Error;

/// Everything that can go wrong when parsing, building or decoding a KV format; each names its input.
#[derive(Debug, Error)]
pub enum FormatError {
    /// A format or plan string that does not parse; `input` is the offending text.
    #[error("cannot parse KV format '{input}': {reason}")]
    Parse { input: String, reason: String },
    /// A format that cannot serve this model shape (checked before anything is allocated).
    #[error("KV format '{format}' does not support {what}")]
    Unsupported { format: String, what: String },
    /// Packed bytes that are not a valid block of the format.
    #[error("corrupt {format} block: {reason}")]
    Corrupt { format: String, reason: String },
    /// Inputs of the wrong shape handed to a codec or cache.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A file (codebooks, plan) that could not be read or written.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, FormatError>;

pub(crate) fn parse_err(input: &str, reason: impl Into<String>) -> FormatError {
    FormatError::Parse {
        input: input.to_string(),
        reason: reason.into(),
    }
}
