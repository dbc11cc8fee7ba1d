//! Writes a loaded model as an HF directory (config.json, model.safetensors in f32,
//! tokenizer.json, tokenizer_config.json), so that the safetensors loader can be checked against
//! the GGUF one on the same weights (`kvq convert`). GGUF's interleaved RoPE rows of Wq/Wk are put
//! back in rotate-half order.

use crate::config::RopeScaling;
use crate::error::{ModelError, Result};
use crate::model::Model;
use candle_core::Tensor;
use kvq_formats::RopeStyle;
use std::collections::HashMap;
use std::path::Path;

/// Reorders the rows of a q/k projection ([heads * d, in]) between the two RoPE channel orders:
/// `to_half` maps interleaved pairs (2i, 2i+1) to (i, i + d/2), otherwise the reverse.
pub fn permute_rope_rows(w: &Tensor, heads: usize, to_half: bool) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads.max(1);
    let t = if to_half {
        w.reshape((heads, d / 2, 2, cols))?.transpose(1, 2)?
    } else {
        w.reshape((heads, 2, d / 2, cols))?.transpose(1, 2)?
    };
    Ok(t.contiguous()?.reshape((rows, cols))?)
}

/// Writes `model` into `dir` as an HF llama directory.
pub fn write_hf(model: &Model, dir: &Path) -> Result<()> {
    let c = &model.config;
    let err = |reason: String| ModelError::File {
        path: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let scaling = match &c.rope_scaling {
        None => serde_json::Value::Null,
        Some(RopeScaling::Linear { factor }) => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_ctx,
        }) => serde_json::json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_ctx
        }),
        Some(RopeScaling::PerPair(_)) => {
            return Err(err(
                "per-pair RoPE frequency factors have no HF config equivalent".into(),
            ));
        }
    };
    let w = &model.weights;
    let tied = w.tied;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden, "intermediate_size": c.intermediate, "vocab_size": w.embed.dim(0)?,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
        "rope_scaling": scaling, "max_position_embeddings": c.max_ctx,
        "bos_token_id": c.bos, "eos_token_id": c.eos, "tie_word_embeddings": tied,
    });
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| err(format!("{name}: {e}")))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&config).map_err(|e| err(e.to_string()))?,
    )?;
    let tok_cfg = serde_json::json!({"add_bos_token": model.tokenizer.add_bos, "chat_template": model.tokenizer.chat_template});
    write("tokenizer_config.json", tok_cfg.to_string())?;
    let tok_path = dir.join("tokenizer.json");
    model
        .tokenizer
        .inner()
        .save(&tok_path, false)
        .map_err(|e| err(format!("tokenizer.json: {e}")))?;

    // Weights are held transposed ([in, out]); HF stores [out, in].
    let hf = |t: &Tensor| -> Result<Tensor> { Ok(t.t()?.contiguous()?) };
    let qk = |t: &Tensor, heads: usize| -> Result<Tensor> {
        let t = hf(t)?;
        if c.rope_style == RopeStyle::Interleaved {
            permute_rope_rows(&t, heads, true)
        } else {
            Ok(t)
        }
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert("model.embed_tokens.weight".into(), w.embed.clone());
    out.insert("model.norm.weight".into(), w.norm.clone());
    if !tied {
        out.insert("lm_head.weight".into(), hf(&w.lm_head)?);
    }
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.insert(format!("{p}.input_layernorm.weight"), l.attn_norm.clone());
        out.insert(
            format!("{p}.post_attention_layernorm.weight"),
            l.ffn_norm.clone(),
        );
        out.insert(
            format!("{p}.self_attn.q_proj.weight"),
            qk(&l.wq, c.n_heads)?,
        );
        out.insert(
            format!("{p}.self_attn.k_proj.weight"),
            qk(&l.wk, c.n_kv_heads)?,
        );
        out.insert(format!("{p}.self_attn.v_proj.weight"), hf(&l.wv)?);
        out.insert(format!("{p}.self_attn.o_proj.weight"), hf(&l.wo)?);
        out.insert(format!("{p}.mlp.gate_proj.weight"), hf(&l.w_gate)?);
        out.insert(format!("{p}.mlp.up_proj.weight"), hf(&l.w_up)?);
        out.insert(format!("{p}.mlp.down_proj.weight"), hf(&l.w_down)?);
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors"))
        .map_err(|e| err(format!("model.safetensors: {e}")))?;
    Ok(())
}
