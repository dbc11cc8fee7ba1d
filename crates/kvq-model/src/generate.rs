//! Text generation through the compressed cache: chunked prefill, then one token per step, streamed
//! as text as soon as it forms whole characters.

use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::sample::Sampler;
use kvq_formats::{CacheBytes, KvPlan};
use std::time::Instant;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Stop {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The sequence reached the model's context.
    Context,
}

/// What one generation did, for the tokens/s and memory line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenStats {
    /// Prompt tokens (bos included).
    pub prompt_tokens: usize,
    /// Tokens generated (eos not counted).
    pub generated: usize,
    /// Seconds of prefill.
    pub prefill_s: f64,
    /// Seconds of decoding.
    pub decode_s: f64,
    /// Cache memory at the end.
    pub kv: CacheBytes,
    /// Why it stopped.
    pub stop: Stop,
}

impl GenStats {
    /// Decode speed in tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.generated as f64 / self.decode_s.max(1e-9)
    }
}

/// Generates after `prompt` (token ids, bos included if wanted) under `plan`, calling `on_text` with
/// each new piece of text. Prefill runs in chunks of `chunk` tokens.
pub fn generate(
    model: &Model,
    plan: &KvPlan,
    prompt: &[u32],
    max_tokens: usize,
    chunk: usize,
    sampler: &mut Sampler,
    on_text: &mut dyn FnMut(&str),
) -> Result<(Vec<u32>, GenStats)> {
    if prompt.is_empty() {
        return Err(ModelError::Input("empty prompt".into()));
    }
    let max_ctx = model.config.max_ctx;
    if prompt.len() >= max_ctx {
        return Err(ModelError::Context {
            tokens: prompt.len() + 1,
            limit: max_ctx,
            what: "the model's trained context (prompt plus one generated token)".into(),
        });
    }
    let cap = (prompt.len() + max_tokens).min(max_ctx);
    let mut seq = model.new_sequence(plan, cap)?;
    let t0 = Instant::now();
    let mut hidden = None;
    for ch in prompt.chunks(chunk.max(1)) {
        hidden = Some(model.forward_hidden(&mut seq, ch, None)?);
    }
    let last_row = |h: candle_core::Tensor| -> Result<Vec<f32>> {
        let n = h.dim(0)?;
        Ok(h.narrow(0, n - 1, 1)?
            .matmul(&model.weights.lm_head)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let mut logits = last_row(hidden.ok_or_else(|| ModelError::Input("empty prompt".into()))?)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let stop = loop {
        if out.len() >= max_tokens {
            break Stop::MaxTokens;
        }
        let next = sampler.sample(&logits);
        if model.config.eos.contains(&next) {
            break Stop::Eos;
        }
        out.push(next);
        let text = model.tokenizer.decode(&out)?;
        // Hold back a trailing replacement character: a multi-byte character may be split over tokens.
        let ready = text.trim_end_matches('\u{FFFD}');
        if ready.len() > printed && ready.is_char_boundary(printed) {
            on_text(&ready[printed..]);
            printed = ready.len();
        }
        if out.len() >= max_tokens {
            break Stop::MaxTokens;
        }
        if seq.len() >= cap {
            break Stop::Context;
        }
        logits = model
            .forward(&mut seq, &[next], None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
    };
    let text = model.tokenizer.decode(&out)?;
    if text.len() > printed && text.is_char_boundary(printed) {
        on_text(&text[printed..]);
    }
    let stats = GenStats {
        prompt_tokens: prompt.len(),
        generated: out.len(),
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
        kv: seq.bytes(),
        stop,
    };
    Ok((out, stats))
}
