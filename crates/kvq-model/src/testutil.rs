//! Test fixtures shared by this crate's and the CLI's tests: a small LLaMA with random weights written
//! as an HF directory, and the same model converted to GGUF the way llama.cpp's converter does it
//! (Wq/Wk rows permuted for interleaved RoPE, weights optionally quantized).

use crate::convert::permute_rope_rows;
use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The shape of a random test model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// Vocabulary (word-level tokens `t0`..).
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP size.
    pub intermediate: usize,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Trained context.
    pub max_pos: usize,
    /// No lm_head tensor: the output reuses the embeddings.
    pub tied: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// HF `rope_scaling` object, if any.
    pub rope_scaling: Option<serde_json::Value>,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            vocab: 96,
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            max_pos: 256,
            tied: false,
            rope_theta: 10000.0,
            rope_scaling: None,
            seed: 1,
        }
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Deterministic uniform values in [-scale, scale) from a 64-bit LCG (no RNG needed for a fixture).
fn uniform(shape: &[usize], scale: f32, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Writes a random LLaMA as an HF directory: config.json, model.safetensors (f32) and a word-level
/// tokenizer.json over `t0`..`t{vocab-1}` (bos 1, eos 2).
pub fn write_random_llama(dir: &Path, s: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let d = s.hidden / s.heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "vocab_size": s.vocab,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": s.rope_theta, "max_position_embeddings": s.max_pos,
        "rope_scaling": s.rope_scaling, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": s.tied
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(|e| io(dir, e))?;
    let mut k = s.seed * 1000;
    let mut rnd = |shape: &[usize], scale: f32| {
        k += 1;
        uniform(shape, scale, k)
    };
    let (h, inter) = (s.hidden, s.intermediate);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rnd(&[s.vocab, h], 1.0)?);
    if !s.tied {
        t.insert("lm_head.weight".into(), rnd(&[s.vocab, h], 0.2)?);
    }
    t.insert("model.norm.weight".into(), (rnd(&[h], 0.1)? + 1.0)?);
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        t.insert(
            format!("{p}.input_layernorm.weight"),
            (rnd(&[h], 0.1)? + 1.0)?,
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (rnd(&[h], 0.1)? + 1.0)?,
        );
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rnd(&[s.heads * d, h], 0.3)?,
        );
        t.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rnd(&[s.kv_heads * d, h], 0.3)?,
        );
        t.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rnd(&[s.kv_heads * d, h], 0.3)?,
        );
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rnd(&[h, s.heads * d], 0.2)?,
        );
        t.insert(format!("{p}.mlp.gate_proj.weight"), rnd(&[inter, h], 0.2)?);
        t.insert(format!("{p}.mlp.up_proj.weight"), rnd(&[inter, h], 0.2)?);
        t.insert(format!("{p}.mlp.down_proj.weight"), rnd(&[h, inter], 0.2)?);
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&t, &path).map_err(|e| io(&path, e))?;
    let vocab: HashMap<String, u32> = (0..s.vocab as u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    let tp = dir.join("tokenizer.json");
    tok.save(&tp, false).map_err(|e| io(&tp, e))?;
    Ok(())
}

/// Converts the HF directory written by [`write_random_llama`] into a GGUF file as llama.cpp does:
/// GGUF tensor names, Wq/Wk rows permuted for interleaved RoPE, 2-D weights stored as `dtype`
/// (norms stay f32), metadata for the architecture and a gpt2-type tokenizer over the same tokens.
pub fn hf_to_gguf(hf: &Path, out: &Path, s: &TinySpec, dtype: GgmlDType) -> Result<()> {
    let st = hf.join("model.safetensors");
    let t = candle_core::safetensors::load(&st, &Device::Cpu).map_err(|e| io(&st, e))?;
    let get = |n: &str| -> Result<Tensor> {
        Ok(t.get(n)
            .ok_or_else(|| io(&st, format!("no tensor {n}")))?
            .to_dtype(DType::F32)?)
    };
    let q = |x: &Tensor| QTensor::quantize(x, dtype);
    let f = |x: &Tensor| QTensor::quantize(x, GgmlDType::F32);
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(&get("model.embed_tokens.weight")?)?,
        ),
        ("output_norm.weight".into(), f(&get("model.norm.weight")?)?),
    ];
    if !s.tied {
        tensors.push(("output.weight".into(), q(&get("lm_head.weight")?)?));
    }
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        let perm = |n: &str, heads: usize| -> Result<Tensor> {
            permute_rope_rows(&get(&format!("{p}.{n}"))?, heads, false)
        };
        tensors.push((
            format!("{b}.attn_norm.weight"),
            f(&get(&format!("{p}.input_layernorm.weight"))?)?,
        ));
        tensors.push((
            format!("{b}.ffn_norm.weight"),
            f(&get(&format!("{p}.post_attention_layernorm.weight"))?)?,
        ));
        tensors.push((
            format!("{b}.attn_q.weight"),
            q(&perm("self_attn.q_proj.weight", s.heads)?)?,
        ));
        tensors.push((
            format!("{b}.attn_k.weight"),
            q(&perm("self_attn.k_proj.weight", s.kv_heads)?)?,
        ));
        tensors.push((
            format!("{b}.attn_v.weight"),
            q(&get(&format!("{p}.self_attn.v_proj.weight"))?)?,
        ));
        tensors.push((
            format!("{b}.attn_output.weight"),
            q(&get(&format!("{p}.self_attn.o_proj.weight"))?)?,
        ));
        tensors.push((
            format!("{b}.ffn_gate.weight"),
            q(&get(&format!("{p}.mlp.gate_proj.weight"))?)?,
        ));
        tensors.push((
            format!("{b}.ffn_up.weight"),
            q(&get(&format!("{p}.mlp.up_proj.weight"))?)?,
        ));
        tensors.push((
            format!("{b}.ffn_down.weight"),
            q(&get(&format!("{p}.mlp.down_proj.weight"))?)?,
        ));
    }
    let tokens: Vec<Value> = (0..s.vocab)
        .map(|i| Value::String(format!("t{i}")))
        .collect();
    let types: Vec<Value> = (0..s.vocab)
        .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(s.layers as u32)),
        ("llama.context_length", Value::U32(s.max_pos as u32)),
        ("llama.embedding_length", Value::U32(s.hidden as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(s.intermediate as u32),
        ),
        ("llama.attention.head_count", Value::U32(s.heads as u32)),
        (
            "llama.attention.head_count_kv",
            Value::U32(s.kv_heads as u32),
        ),
        ("llama.rope.freq_base", Value::F32(s.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).map_err(|e| io(out, e))?;
    gguf_file::write(&mut file, &md_refs, &t_refs).map_err(|e| io(out, e))?;
    Ok(())
}

/// Copies a GGUF file with its metadata edited by `edit` (tests make hostile variants this way).
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>),
) -> Result<()> {
    let mut f = std::fs::File::open(src).map_err(|e| io(src, e))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| io(src, e))?;
    let mut md: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut md);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for n in names {
        tensors.push((
            n.clone(),
            content
                .tensor(&mut f, n, &Device::Cpu)
                .map_err(|e| io(src, e))?,
        ));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).map_err(|e| io(dst, e))?;
    gguf_file::write(&mut out, &md_refs, &t_refs).map_err(|e| io(dst, e))?;
    Ok(())
}

/// Writes `n` words of the tiny models' vocabulary (`t{(i * step + offset) % vocab}`, space-separated)
/// to `path`: a text every tokenizer of [`write_random_llama`] reads without unknown words.
pub fn write_word_text(
    path: &Path,
    n: usize,
    step: usize,
    offset: usize,
    vocab: usize,
) -> Result<()> {
    let words: Vec<String> = (0..n)
        .map(|i| format!("t{}", (i * step + offset) % vocab))
        .collect();
    std::fs::write(path, words.join(" ")).map_err(|e| io(path, e))
}

/// A fresh empty directory under the system temp dir, unique per process and tag.
pub fn temp_dir(tag: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kvq-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    Ok(dir)
}
