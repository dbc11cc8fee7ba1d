//! The LLaMA-family configuration kvq needs, from GGUF metadata or an HF config.json.

use crate::error::{ModelError, Result};
use kvq_formats::{Rope, RopeStyle};

/// Shape and constants of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP inner size.
    pub intermediate: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (GQA when fewer than query heads).
    pub n_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// Llama-3 style RoPE scaling (factor, low_freq_factor, high_freq_factor, original context).
    pub rope_scaling: Option<(f32, f32, f32, usize)>,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Trained context length.
    pub max_ctx: usize,
    /// Channel order of the RoPE pairs in the q/k weights.
    pub rope_style: RopeStyle,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence tokens.
    pub eos: Vec<u32>,
}

impl LlamaConfig {
    /// The rotary embedding of one head, scaling folded into the frequencies.
    pub fn rope(&self) -> Rope {
        let mut r = Rope::new(self.head_dim, self.rope_theta, self.rope_style);
        if let Some((factor, low, high, orig)) = self.rope_scaling {
            // Llama 3.1 rule: long wavelengths scaled by 1/factor, short kept, smooth in between.
            let (lw, hw) = (orig as f32 / low, orig as f32 / high);
            for f in r.inv_freq.iter_mut() {
                let wl = 2.0 * std::f32::consts::PI / *f;
                if wl > lw {
                    *f /= factor;
                } else if wl >= hw {
                    let s = (orig as f32 / wl - low) / (high - low);
                    *f = (1.0 - s) * *f / factor + s * *f;
                }
            }
        }
        r
    }

    /// Checks the numbers are consistent before anything is allocated.
    pub fn validate(&self, path: &str) -> Result<()> {
        let bad = |reason: String| ModelError::File {
            path: path.into(),
            reason,
        };
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(bad(format!(
                "{} query heads not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.n_layers == 0
            || self.vocab == 0
        {
            return Err(bad(format!("implausible shape {self:?}")));
        }
        Ok(())
    }

    /// Reads an HF config.json (LlamaForCausalLM / MistralForCausalLM shapes).
    pub fn from_hf_json(text: &str, path: &str) -> Result<Self> {
        let bad = |reason: String| ModelError::File {
            path: path.into(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let arch = v["architectures"][0]
            .as_str()
            .unwrap_or(v["model_type"].as_str().unwrap_or(""))
            .to_string();
        if !arch.to_ascii_lowercase().contains("llama")
            && !arch.to_ascii_lowercase().contains("mistral")
        {
            return Err(ModelError::Architecture {
                path: path.into(),
                arch,
            });
        }
        let num = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("'{k}' missing or not an integer")))
        };
        let hidden = num("hidden_size")?;
        let n_heads = num("num_attention_heads")?;
        let scaling = v
            .get("rope_scaling")
            .filter(|s| s["rope_type"].as_str() == Some("llama3"))
            .map(|s| {
                (
                    s["factor"].as_f64().unwrap_or(8.0) as f32,
                    s["low_freq_factor"].as_f64().unwrap_or(1.0) as f32,
                    s["high_freq_factor"].as_f64().unwrap_or(4.0) as f32,
                    s["original_max_position_embeddings"]
                        .as_u64()
                        .unwrap_or(8192) as usize,
                )
            });
        let eos = match &v["eos_token_id"] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            x => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        };
        let c = Self {
            vocab: num("vocab_size")?,
            hidden,
            intermediate: num("intermediate_size")?,
            n_layers: num("num_hidden_layers")?,
            n_heads,
            n_kv_heads: v["num_key_value_heads"]
                .as_u64()
                .map(|x| x as usize)
                .unwrap_or(n_heads),
            head_dim: v["head_dim"]
                .as_u64()
                .map(|x| x as usize)
                .unwrap_or(hidden / n_heads.max(1)),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
            rope_scaling: scaling,
            rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
            max_ctx: v["max_position_embeddings"].as_u64().unwrap_or(4096) as usize,
            rope_style: RopeStyle::Half,
            bos: v["bos_token_id"].as_u64().map(|x| x as u32),
            eos,
        };
        c.validate(path)?;
        Ok(c)
    }
}
