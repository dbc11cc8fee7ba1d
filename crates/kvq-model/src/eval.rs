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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// KV bits per element of the cache each scored prediction read, averaged over the scored tokens
    /// (higher than `bits_per_elem` for formats with a full-precision window; 0 in older JSON files).
    #[serde(default)]
    pub bits_per_elem_scored: f64,
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
/// Windows start every `o.stride` tokens from the text's start (see [`perplexity_at`]).
pub fn perplexity(
    model: &Model,
    plan: &KvPlan,
    tokens: &[u32],
    o: &PplOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplResult> {
    let (n_windows, _) = windows(model, tokens.len(), o)?;
    let starts: Vec<usize> = (0..n_windows).map(|w| w * o.stride).collect();
    perplexity_at(model, plan, tokens, o, &starts, progress)
}

/// Window start positions for `o` over `n_tokens`: every window the text gives, or with `seed`, a
/// seeded sample of `o.max_windows` of them (ascending), so a short sweep covers the whole text
/// reproducibly instead of only its beginning.
pub fn window_starts(
    model: &Model,
    n_tokens: usize,
    o: &PplOpts,
    seed: Option<u64>,
) -> Result<Vec<usize>> {
    let all = PplOpts {
        max_windows: 0,
        ..o.clone()
    };
    let (n_all, _) = windows(model, n_tokens, &all)?;
    let mut idx: Vec<usize> = (0..n_all).collect();
    let want = if o.max_windows == 0 {
        n_all
    } else {
        o.max_windows.min(n_all)
    };
    if let Some(s) = seed {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
        idx.shuffle(&mut rng);
        idx.truncate(want);
        idx.sort_unstable();
    } else {
        idx.truncate(want);
    }
    Ok(idx.into_iter().map(|w| w * o.stride).collect())
}

/// Perplexity over the windows that start at `starts` (text positions; each window is `o.ctx` tokens,
/// bos included, and scores its last `o.stride`). `progress(done, total)` is called per chunk.
pub fn perplexity_at(
    model: &Model,
    plan: &KvPlan,
    tokens: &[u32],
    o: &PplOpts,
    starts: &[usize],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplResult> {
    score_at(model, plan, tokens, o, starts, progress, &mut |_, _| {})
}

/// log(sum(exp(row))), shifted by the row's maximum: the normaliser of a row of logits.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    m as f64
        + row
            .iter()
            .map(|&x| ((x - m) as f64).exp())
            .sum::<f64>()
            .ln()
}

/// [`perplexity_at`] that also hands every scored row's logits to `visit` (in scoring order, the
/// same for every plan over the same windows): for measures beside perplexity, e.g. the divergence
/// from fp16's next-token distribution that `kvq tune` probes with.
pub fn score_at(
    model: &Model,
    plan: &KvPlan,
    tokens: &[u32],
    o: &PplOpts,
    starts: &[usize],
    progress: &mut dyn FnMut(usize, usize),
    visit: &mut dyn FnMut(usize, &[f32]),
) -> Result<PplResult> {
    let t0 = std::time::Instant::now();
    let (_, body) = windows(model, tokens.len(), o)?;
    if starts.is_empty() {
        return Err(ModelError::Input("no window to score".into()));
    }
    if let Some(&bad) = starts.iter().find(|&&s| s + body > tokens.len()) {
        return Err(ModelError::Input(format!(
            "a window at token {bad} runs past the text's {} tokens",
            tokens.len()
        )));
    }
    let n_windows = starts.len();
    let bos: Vec<u32> = model
        .config
        .bos
        .filter(|_| model.tokenizer.add_bos)
        .into_iter()
        .collect();
    let chunks_per = o.ctx.div_ceil(o.chunk);
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut bits_sum = 0f64;
    let mut last = CacheBytes::default();
    for (w, &s0) in starts.iter().enumerate() {
        let mut ids = bos.clone();
        ids.extend_from_slice(&tokens[s0..s0 + body]);
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
                // The chunk's predictions read the cache as it is after the chunk was appended.
                let bits = seq.bytes().bits_per_elem();
                for (i, row) in rows.iter().enumerate() {
                    let pos = start + i;
                    if pos + 1 < first_scored || pos + 1 >= ids.len() {
                        continue;
                    }
                    let lse = log_sum_exp(row);
                    let target = row.get(ids[pos + 1] as usize).copied().unwrap_or(f32::NAN);
                    nll += lse - target as f64;
                    visit(scored, row);
                    scored += 1;
                    bits_sum += bits;
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
        bits_per_elem_scored: bits_sum / scored.max(1) as f64,
        kv_bytes: last,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
