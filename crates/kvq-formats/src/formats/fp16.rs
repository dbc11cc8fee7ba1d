//! fp16: the uncompressed baseline. 16 bits/elem; a block is one token, `d` little-endian f16s.
//!
//! Layout of a block (one token of one head): `[f16; d]`, 2*d bytes.

use crate::codec::{Codec, Format, FormatRef, KernelSpec, StreamCtx};
use crate::config::Params;
use crate::error::{FormatError, Result};
use half::f16;
use std::sync::Arc;

/// The fp16 baseline format (no parameters).
#[derive(Debug, Clone)]
pub struct Fp16;

/// Parses `fp16` (no keys).
pub fn parse(p: Params) -> Result<FormatRef> {
    p.finish(&[])?;
    Ok(Arc::new(Fp16))
}

impl Format for Fp16 {
    fn canonical(&self) -> String {
        "fp16".into()
    }
    fn supports(&self, head_dim: usize) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(FormatError::Unsupported {
                format: self.canonical(),
                what: format!("head_dim {head_dim}"),
            });
        }
        Ok(())
    }
    fn build(&self, ctx: &StreamCtx) -> Result<Box<dyn Codec>> {
        self.supports(ctx.head_dim)?;
        Ok(Box::new(Fp16Codec { d: ctx.head_dim }))
    }
}

struct Fp16Codec {
    d: usize,
}

impl Codec for Fp16Codec {
    fn describe(&self) -> String {
        "fp16".into()
    }
    fn block_tokens(&self) -> usize {
        1
    }
    fn block_bytes(&self) -> usize {
        2 * self.d
    }
    fn kernel(&self) -> Option<KernelSpec> {
        Some(KernelSpec {
            module: "fp16",
            ints: [0; 4],
            tag: "",
            tile: (0, 0, 0),
            pre_rope: false,
            smem_table: 0,
            query_sketch: 0,
        })
    }
    fn encode(&self, x: &[f32], out: &mut [u8]) {
        for (o, &v) in out.chunks_exact_mut(2).zip(x) {
            o.copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    fn validate(&self, block: &[u8]) -> Result<()> {
        crate::formats::check_len("fp16", block, self.block_bytes())?;
        // The cache stores only finite halves (NaN -> 0, overflow -> +-65504 before encode): an
        // all-ones exponent (Inf or NaN) means the bytes are not a block this codec wrote.
        if let Some(i) = block
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00)
        {
            return Err(crate::error::FormatError::Corrupt {
                format: "fp16".into(),
                reason: format!("value {i} is Inf or NaN, expected a finite f16"),
            });
        }
        Ok(())
    }
    fn decode(&self, block: &[u8], out: &mut [f32]) -> Result<()> {
        self.validate(block)?;
        for (o, b) in out.iter_mut().zip(block.chunks_exact(2)) {
            *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
        }
        Ok(())
    }
}
