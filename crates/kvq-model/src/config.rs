//! The LLaMA-family configuration kvq needs, from GGUF metadata or an HF config.json.

use crate::error::{ModelError, Result};
use kvq_formats::{Rope, RopeStyle};

/// RoPE frequency scaling: long-context models stretch the rotary wavelengths.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, smooth in between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_ctx: usize,
    },
    /// Linear position interpolation: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// One divisor per rotary pair (a GGUF `rope_freqs.weight` tensor, llama.cpp's freq factors).
    PerPair(Vec<f32>),
}

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
    /// RoPE frequency scaling from the config, folded into the frequencies by [`LlamaConfig::rope`].
    pub rope_scaling: Option<RopeScaling>,
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
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_ctx,
            }) => {
                let orig = *original_ctx as f32;
                let (lw, hw) = (orig / low, orig / high);
                for f in r.inv_freq.iter_mut() {
                    let wl = 2.0 * std::f32::consts::PI / *f;
                    if wl > lw {
                        *f /= factor;
                    } else if wl >= hw {
                        let s = (orig / wl - low) / (high - low);
                        *f = (1.0 - s) * *f / factor + s * *f;
                    }
                }
            }
            Some(RopeScaling::Linear { factor }) => {
                r.inv_freq.iter_mut().for_each(|f| *f /= factor)
            }
            Some(RopeScaling::PerPair(d)) => {
                r.inv_freq.iter_mut().zip(d).for_each(|(f, d)| *f /= d)
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
            || self.hidden == 0
        {
            return Err(bad(format!(
                "implausible shape: hidden {}, head_dim {}, layers {}, vocab {}",
                self.hidden, self.head_dim, self.n_layers, self.vocab
            )));
        }
        // Bounds far above any real model, so that a corrupt header cannot make us loop or allocate.
        let limits = [
            (self.n_layers, 4096, "layers"),
            (self.n_heads, 4096, "query heads"),
            (self.head_dim, 4096, "head_dim"),
            (self.hidden, 1 << 20, "hidden size"),
            (self.intermediate, 1 << 22, "MLP size"),
            (self.vocab, 1 << 24, "vocabulary"),
        ];
        for (v, max, what) in limits {
            if v > max {
                return Err(bad(format!("implausible {what} {v} (more than {max})")));
            }
        }
        if self.intermediate == 0 || self.max_ctx == 0 {
            return Err(bad(format!(
                "implausible MLP size {} or context {}",
                self.intermediate, self.max_ctx
            )));
        }
        if !(self.rope_theta.is_finite()
            && self.rope_theta > 1.0
            && self.rms_eps.is_finite()
            && self.rms_eps >= 0.0)
        {
            return Err(bad(format!(
                "implausible RoPE base {} or RMSNorm epsilon {}",
                self.rope_theta, self.rms_eps
            )));
        }
        let divisors: Vec<f32> = match &self.rope_scaling {
            None => vec![],
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                ..
            }) => {
                if high_freq_factor <= low_freq_factor {
                    return Err(bad(
                        "llama3 rope_scaling needs high_freq_factor > low_freq_factor".into(),
                    ));
                }
                vec![*factor]
            }
            Some(RopeScaling::Linear { factor }) => vec![*factor],
            Some(RopeScaling::PerPair(d)) => {
                if d.len() != self.head_dim / 2 {
                    return Err(bad(format!(
                        "{} RoPE frequency factors for head_dim {}",
                        d.len(),
                        self.head_dim
                    )));
                }
                d.clone()
            }
        };
        if divisors.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            return Err(bad(
                "RoPE scaling factors must be finite and positive".into()
            ));
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
        let scaling = match v.get("rope_scaling").filter(|s| !s.is_null()) {
            None => None,
            Some(sc) => {
                let kind = sc["rope_type"]
                    .as_str()
                    .or(sc["type"].as_str())
                    .unwrap_or("");
                let f = |k: &str, d: f64| sc[k].as_f64().unwrap_or(d) as f32;
                match kind {
                    "default" => None,
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f("factor", 8.0),
                        low_freq_factor: f("low_freq_factor", 1.0),
                        high_freq_factor: f("high_freq_factor", 4.0),
                        original_ctx: sc["original_max_position_embeddings"]
                            .as_u64()
                            .unwrap_or(8192) as usize,
                    }),
                    "linear" => Some(RopeScaling::Linear {
                        factor: f("factor", 1.0),
                    }),
                    other => {
                        return Err(bad(format!(
                            "rope_scaling type '{other}' is not supported (llama3, linear)"
                        )))
                    }
                }
            }
        };
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
