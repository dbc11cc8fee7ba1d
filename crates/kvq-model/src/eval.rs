//! Perplexity in evaluation mode (FORMATS.md): the text is cut into windows of `ctx` tokens that
//! start every `stride` tokens; each window runs from an empty cache in chunks of `chunk` tokens whose
//! K/V are encoded into the compressed cache before the chunk's attention reads them, and scores its
//! last `stride` tokens, so that every scored token sees between `ctx - stride` and `ctx - 1` tokens
//! of context through the cache. With the default stride `ctx / 2` each token after the first half
//! window is scored exactly once (llama-perplexity scores the second half of each window likewise).

use crate::error::{ModelError, Result};
use crate::model::Model;
use kvq_formats::{CacheBytes, KvPlan};

/// Options of one perplexity run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PplOpts {
    /// Tokens per window (bos included when the tokenizer adds one).
    pub ctx: usize,
    /// Tokens between window starts, and tokens scored per window.
    pub stride: usize,
    /// Tokens per forward chunk (encoded into the cache before the chunk's attention reads them).
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
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Tokens scored.
    pub scored: usize,
    /// Windows run.
    pub windows: usize,
    /// KV bits per element at the end of a full window (full-precision window counted).
    pub bits_per_elem: f64,
    /// KV bytes held at the end of a full window.
    pub kv_bytes: CacheBytes,
    /// Wall time of the run in seconds.
    pub seconds: f64,
}

/// How `tokens` is cut into windows under `o`: (number of windows, text tokens per window).
pub fn windows(model: &Model, n_tokens: usize, o: &PplOpts) -> Result<(usize, usize)> {
    if o.ctx < 2 || o.chunk == 0 || o.stride == 0 {
        return Err(ModelError::Input(format!(
            "--ctx {} must be >= 2, --stride {} and --chunk {} >= 1",
            o.ctx, o.stride, o.chunk
        )));
    }
    if o.ctx > model.config.max_ctx {
        return Err(ModelError::Context {
            tokens: o.ctx,
            limit: model.config.max_ctx,
            what: "the model's trained context (--ctx)".into(),
        });
    }
    let body = o.ctx - usize::from(model.tokenizer.add_bos);
    if o.stride >= body {
        return Err(ModelError::Input(format!(
            "--stride {} must be smaller than the {body} text tokens of a window (--ctx {})",
            o.stride, o.ctx
        )));
    }
    if n_tokens < body {
        return Err(ModelError::Input(format!(
            "the text has {n_tokens} tokens, fewer than one window of {body}"
        )));
    }
    let mut n = (n_tokens - body) / o.stride + 1;
    if o.max_windows > 0 {
        n = n.min(o.max_windows);
    }
    Ok((n, body))
}

/// Perplexity of `tokens` (the text, without bos) under `plan`; `progress(done, total)` per chunk.
pub fn perplexity(
    model: &Model,
    plan: &KvPlan,
    tokens: &[u32],
    o: &PplOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplResult> {
    let t0 = std::time::Instant::now();
    let (n_windows, body) = windows(model, tokens.len(), o)?;
    let bos: Vec<u32> = model
        .config
        .bos
        .filter(|_| model.tokenizer.add_bos)
        .into_iter()
        .collect();
    let chunks_per = o.ctx.div_ceil(o.chunk);
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut last = CacheBytes::default();
    for w in 0..n_windows {
        let mut ids = bos.clone();
        ids.extend_from_slice(&tokens[w * o.stride..w * o.stride + body]);
        // Predictions at positions >= first_scored - 1 are scored: the window's last `stride` tokens.
        let first_scored = ids.len() - o.stride;
        let mut seq = model.new_sequence(plan, o.ctx)?;
        for (ci, ch) in ids.chunks(o.chunk).enumerate() {
            let start = ci * o.chunk;
            if start + ch.len() < first_scored {
                // No scored prediction in this chunk: run it for the cache, skip the logits.
                model.forward_hidden(&mut seq, ch, None)?;
            } else {
                let logits = model.forward(&mut seq, ch, None)?;
                let rows = logits.to_vec2::<f32>()?;
                for (i, row) in rows.iter().enumerate() {
                    let pos = start + i;
                    if pos + 1 < first_scored || pos + 1 >= ids.len() {
                        continue;
                    }
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let lse = m as f64
                        + row
                            .iter()
                            .map(|&x| ((x - m) as f64).exp())
                            .sum::<f64>()
                            .ln();
                    let target = row.get(ids[pos + 1] as usize).copied().unwrap_or(f32::NAN);
                    nll += lse - target as f64;
                    scored += 1;
                }
            }
            progress(w * chunks_per + ci + 1, n_windows * chunks_per);
        }
        last = seq.bytes();
    }
    let mean = nll / scored.max(1) as f64;
    if !mean.is_finite() {
        return Err(ModelError::Input(format!(
            "perplexity under {} is not finite (NaN or Inf logits)",
            plan.describe()
        )));
    }
    Ok(PplResult {
        kv: plan.describe(),
        ppl: mean.exp(),
        nll: mean,
        scored,
        windows: n_windows,
        bits_per_elem: last.bits_per_elem(),
        kv_bytes: last,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
