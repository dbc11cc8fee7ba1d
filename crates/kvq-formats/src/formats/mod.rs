//! The formats, one module each, and the registry: adding a format is one module and one line here.

use crate::codec::FormatRef;
use crate::config::Params;
use crate::error::{parse_err, FormatError, Result};

pub mod asymkv;
pub mod decoquant;
pub mod fp16;
pub mod klt;
pub mod qjl;
pub mod rotate;
pub mod rvq;

/// A format's parser, from its `Params`.
type Parser = fn(Params) -> Result<FormatRef>;

/// The registry: name, parser, one-line summary (shown by `kvq inspect --formats`).
pub const REGISTRY: &[(&str, Parser, &str)] = &[
    ("fp16", fp16::parse, "uncompressed baseline, 16 bits/elem"),
    (
        "kivi",
        asymkv::parse_kivi,
        "KIVI: per-channel keys, per-token values, uniform bits (2 or 4)",
    ),
    (
        "asymkv",
        asymkv::parse,
        "AsymKV: layer-wise asymmetric K/V bits down to 1 (KIVI quantizer)",
    ),
    (
        "qjl",
        qjl::parse,
        "QJL: JL sign-bit keys with norms and outlier sketch, quantized values",
    ),
    (
        "decoquant",
        decoquant::parse,
        "DecoQuant: low-bit central tensor x f16 16x16 auxiliary tensor",
    ),
    (
        "rvq",
        rvq::parse,
        "RVQ: residual vector quantization with learned codebooks",
    ),
    (
        "klt",
        klt::parse,
        "KLT: calibrated per-head transform, Lloyd-Max codes with bits where they pay",
    ),
];

/// Parses one format string (`qjl:m=256`); the error names the string and the known formats.
pub fn parse_format(s: &str) -> Result<FormatRef> {
    let p = Params::parse(s)?;
    match REGISTRY.iter().find(|(n, _, _)| *n == p.name()) {
        Some((_, parse, _)) => parse(p),
        None => {
            let names: Vec<&str> = REGISTRY.iter().map(|r| r.0).collect();
            Err(parse_err(
                s,
                format!("unknown format '{}'; known: {}", p.name(), names.join(", ")),
            ))
        }
    }
}

/// Checks a block's length (every codec's first validation step).
pub fn check_len(format: &str, block: &[u8], want: usize) -> Result<()> {
    if block.len() != want {
        return Err(FormatError::Corrupt {
            format: format.to_string(),
            reason: format!("block is {} bytes, expected {want}", block.len()),
        });
    }
    Ok(())
}

/// Checks that the `n` little-endian f16s at byte `off` (scales, norms) are finite.
pub fn check_finite_f16(
    format: &str,
    block: &[u8],
    off: usize,
    n: usize,
    what: &str,
) -> Result<()> {
    if (0..n).any(|i| !crate::bits::f16_at(block, off + 2 * i).is_finite()) {
        return Err(FormatError::Corrupt {
            format: format.to_string(),
            reason: format!("non-finite {what}"),
        });
    }
    Ok(())
}
