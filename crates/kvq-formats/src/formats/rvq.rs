//! rvq: not built yet (placeholder so the registry compiles; replaced by the format's module).

use crate::codec::FormatRef;
use crate::config::Params;
use crate::error::{FormatError, Result};

/// Parses a `rvq` config.
pub fn parse(p: Params) -> Result<FormatRef> {
    Err(FormatError::Unsupported { format: p.input().to_string(), what: "anything yet: rvq is not built".into() })
}
