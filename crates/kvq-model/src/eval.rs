//! Perplexity in evaluation mode (FORMATS.md): windows of `ctx` tokens, each run in chunks whose K/V are
//! encoded into the compressed cache before the chunk's attention reads them; like llama-perplexity,
//! the second half of each window is scored.

use crate::error::{ModelError, Result};
use crate::model::Model;
use kvq_formats::{CacheBytes, KvPlan};

/// Options of one perplexity run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PplOpts {
    /// Tokens per window (bos included).
    pub ctx: usize,
    /// Tokens per forward chunk.
    pub chunk: usize,
    /// Windows to score at most (0 = all the text gives).
    pub max_windows: usize,
}

/// The result of one perplexity run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    /// KV plan, canonical.
    pub kv: String,
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Tokens scored.
    pub scored: usize,
    /// Windows run.
    pub windows: usize,
    /// KV bits per element at the end of a window (window counted).
    pub bits_per_elem: f64,
    /// KV bytes held at the end of a window.
    pub kv_bytes: CacheBytes,
}

/// Perplexity of `tokens` (the text, without bos) under `plan`; `progress(done, total)` per chunk.
pub fn perplexity(
    model: &Model,
    plan: &KvPlan,
    tokens: &[u32],
    o: &PplOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplResult> {
    if o.ctx < 4 || o.chunk == 0 {
        return Err(ModelError::Input(format!(
            "--ctx {} must be >= 4 and --chunk {} >= 1",
            o.ctx, o.chunk
        )));
    }
    if o.ctx > model.config.max_ctx {
        return Err(ModelError::Context {
            tokens: o.ctx,
            limit: model.config.max_ctx,
            what: "the model's trained context (--ctx)".into(),
        });
    }
    let bos: Vec<u32> = model.config.bos.into_iter().collect();
    let body = o.ctx - bos.len();
    let mut windows = tokens.len() / body;
    if o.max_windows > 0 {
        windows = windows.min(o.max_windows);
    }
    if windows == 0 {
        return Err(ModelError::Input(format!(
            "text has {} tokens, fewer than one window of {}",
            tokens.len(),
            o.ctx
        )));
    }
    let chunks_per = o.ctx.div_ceil(o.chunk);
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut last = CacheBytes::default();
    for w in 0..windows {
        let mut ids = bos.clone();
        ids.extend_from_slice(&tokens[w * body..(w + 1) * body]);
        let mut seq = model.new_sequence(plan, o.ctx)?;
        for (ci, ch) in ids.chunks(o.chunk).enumerate() {
            let start = ci * o.chunk;
            let logits = model.forward(&mut seq, ch, None)?;
            let rows = logits.to_vec2::<f32>()?;
            for (i, row) in rows.iter().enumerate() {
                let pos = start + i;
                if pos + 1 >= ids.len() || pos + 1 < o.ctx / 2 {
                    continue;
                }
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lse = m as f64
                    + row
                        .iter()
                        .map(|&x| ((x - m) as f64).exp())
                        .sum::<f64>()
                        .ln();
                nll += lse - row[ids[pos + 1] as usize] as f64;
                scored += 1;
            }
            progress(w * chunks_per + ci + 1, windows * chunks_per);
        }
        last = seq.bytes();
    }
    Ok(PplResult {
        kv: plan.describe(),
        ppl: (nll / scored.max(1) as f64).exp(),
        scored,
        windows,
        bits_per_elem: last.bits_per_elem(),
        kv_bytes: last,
    })
}
