//! asymkv: not built yet (placeholder so the registry compiles; replaced by the format's module).

use crate::codec::FormatRef;
use crate::config::Params;
use crate::error::{FormatError, Result};

/// Parses a `asymkv` config.
pub fn parse(p: Params) -> Result<FormatRef> {
    Err(FormatError::Unsupported { format: p.input().to_string(), what: "anything yet: asymkv is not built".into() })
}

/// Parses a `kivi` config.
pub fn parse_kivi(p: Params) -> Result<FormatRef> {
    parse(p)
}
