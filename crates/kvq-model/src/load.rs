//! Weight loading: GGUF files (architecture and tokenizer from the metadata, quantized weights
//! dequantized to f32 on load) and HF directories (config.json, *.safetensors possibly sharded,
//! tokenizer.json). Both give the same [`Weights`] in HF conventions except the RoPE pair order,
//! which the config records (GGUF llama q/k weights are permuted for interleaved pairs).

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tok;
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use kvq_formats::RopeStyle;
use std::collections::HashMap;
use std::path::Path;

/// One decoder layer's weights; linear weights stored transposed ([in, out]) for x W products.
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub attn_norm: Tensor,
    /// Q, K, V, O projections (transposed).
    pub wq: Tensor,
    /// K projection (transposed).
    pub wk: Tensor,
    /// V projection (transposed).
    pub wv: Tensor,
    /// Output projection (transposed).
    pub wo: Tensor,
    /// RMSNorm before the MLP.
    pub ffn_norm: Tensor,
    /// Gate projection (transposed).
    pub w_gate: Tensor,
    /// Up projection (transposed).
    pub w_up: Tensor,
    /// Down projection (transposed).
    pub w_down: Tensor,
}

/// All weights of a model, f32 on the CPU.
pub struct Weights {
    /// Token embeddings [vocab, hidden].
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm.
    pub norm: Tensor,
    /// Output head (transposed, [hidden, vocab]); tied models reuse the embeddings.
    pub lm_head: Tensor,
    /// The output head is the embedding matrix (no separate tensor in the file).
    pub tied: bool,
}

/// A loaded model: config, weights, tokenizer and where it came from.
pub struct Loaded {
    /// The architecture.
    pub config: LlamaConfig,
    /// The weights.
    pub weights: Weights,
    /// The tokenizer.
    pub tokenizer: Tok,
    /// Path it was loaded from.
    pub path: String,
}

/// Loads a `.gguf` file or an HF directory.
pub fn load(path: &str) -> Result<Loaded> {
    let p = Path::new(path);
    if !p.exists() {
        return Err(ModelError::File {
            path: path.into(),
            reason: "no such file or directory".into(),
        });
    }
    if p.is_dir() {
        load_hf(path)
    } else {
        load_gguf(path)
    }
}

fn meta_u(md: &HashMap<String, gguf_file::Value>, path: &str, key: &str) -> Result<usize> {
    let v = md.get(key).ok_or_else(|| ModelError::File {
        path: path.into(),
        reason: format!("metadata '{key}' missing"),
    })?;
    let x = v
        .to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| {
            v.to_i64().and_then(|x| {
                u64::try_from(x).map_err(|_| candle_core::Error::Msg("negative".into()))
            })
        })
        .or_else(|_| {
            v.to_i32().and_then(|x| {
                u64::try_from(x).map_err(|_| candle_core::Error::Msg("negative".into()))
            })
        })
        .map_err(|_| ModelError::File {
            path: path.into(),
            reason: format!("metadata '{key}' is not a non-negative integer"),
        })?;
    usize::try_from(x).map_err(|_| ModelError::File {
        path: path.into(),
        reason: format!("metadata '{key}' = {x} is too large"),
    })
}

/// Runs `f`, turning a panic inside it into an error message: candle's GGUF reader panics on some
/// malformed files (e.g. `general.alignment` = 0 divides by zero), and a bad file must be an error.
/// The panic message is not printed (the default hook is swapped out while `f` runs).
fn contained<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the reader panicked".into())
    })
}

/// Loads a GGUF llama model: architecture and tokenizer from the metadata, every tensor's shape
/// checked against the architecture before it is read, quantized weights dequantized to f32.
pub fn load_gguf(path: &str) -> Result<Loaded> {
    let file_err = |reason: String| ModelError::File {
        path: path.into(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
    let content = contained(|| gguf_file::Content::read(&mut f))
        .map_err(|reason| file_err(format!("malformed GGUF file ({reason})")))?
        .map_err(|e| file_err(format!("not a readable GGUF file: {e}")))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(ModelError::Architecture {
            path: path.into(),
            arch,
        });
    }
    let g = |k: &str| meta_u(md, path, &format!("llama.{k}"));
    let f32m = |k: &str, d: f32| md.get(k).and_then(|v| v.to_f32().ok()).unwrap_or(d);
    let hidden = g("embedding_length")?;
    let n_heads = g("attention.head_count")?;
    let tokenizer = Tok::from_gguf(md)?;
    let rope_scaling = match md
        .get("llama.rope.scaling.type")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
    {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: f32m("llama.rope.scaling.factor", 1.0),
        }),
        Some(other) => {
            return Err(file_err(format!(
                "RoPE scaling '{other}' is not supported (linear, or a rope_freqs tensor)"
            )))
        }
    };
    let mut config = LlamaConfig {
        vocab: tokenizer.vocab_size(),
        hidden,
        intermediate: g("feed_forward_length")?,
        n_layers: g("block_count")?,
        n_heads,
        n_kv_heads: if md.contains_key("llama.attention.head_count_kv") {
            g("attention.head_count_kv")?
        } else {
            n_heads
        },
        head_dim: if md.contains_key("llama.attention.key_length") {
            g("attention.key_length")?
        } else {
            hidden / n_heads.max(1)
        },
        rope_theta: f32m("llama.rope.freq_base", 10000.0),
        rope_scaling,
        rms_eps: f32m("llama.attention.layer_norm_rms_epsilon", 1e-5),
        max_ctx: if md.contains_key("llama.context_length") {
            g("context_length")?
        } else {
            4096
        },
        rope_style: RopeStyle::Interleaved,
        bos: tokenizer.bos,
        eos: tokenizer.eos.clone(),
    };
    config.validate(path)?;
    // Shapes first: a corrupt header must not make us allocate or read what the model cannot use.
    let c = &config;
    let (h, q, kv) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![c.vocab, h]),
        ("output_norm.weight".into(), vec![h]),
    ];
    for i in 0..c.n_layers {
        for (n, dims) in [
            ("attn_norm", vec![h]),
            ("attn_q", vec![q, h]),
            ("attn_k", vec![kv, h]),
            ("attn_v", vec![kv, h]),
            ("attn_output", vec![h, q]),
            ("ffn_norm", vec![h]),
            ("ffn_gate", vec![c.intermediate, h]),
            ("ffn_up", vec![c.intermediate, h]),
            ("ffn_down", vec![h, c.intermediate]),
        ] {
            want.push((format!("blk.{i}.{n}.weight"), dims));
        }
    }
    let tied = !content.tensor_infos.contains_key("output.weight");
    if !tied {
        want.push(("output.weight".into(), vec![c.vocab, h]));
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        want.push(("rope_freqs.weight".into(), vec![c.head_dim / 2]));
    }
    for (name, dims) in &want {
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::Tensor {
                path: path.into(),
                name: name.clone(),
                reason: "missing".into(),
            })?;
        if info.shape.dims() != dims.as_slice() {
            if name == "token_embd.weight" && info.shape.dims().get(1) == Some(&h) {
                return Err(ModelError::Tokenizer(format!(
                    "{path}: the tokenizer has {} tokens but token_embd has {} rows: tokenizer and model do not match",
                    c.vocab,
                    info.shape.dims()[0]
                )));
            }
            return Err(ModelError::Tensor {
                path: path.into(),
                name: name.clone(),
                reason: format!("shape {:?}, expected {dims:?}", info.shape.dims()),
            });
        }
    }
    let data_offset = content.tensor_data_offset;
    let file_len = f.metadata().map_err(|e| file_err(e.to_string()))?.len();
    let mut get = |name: &str, tr: bool| -> Result<Tensor> {
        let tensor_err = |reason: String| ModelError::Tensor {
            path: path.into(),
            name: name.into(),
            reason,
        };
        let info = content.tensor_infos.get(name);
        // Bytes per element of the matrices read directly (f16 / f32, transposed ones only).
        let plain = info.and_then(|i| match (i.ggml_dtype, i.shape.dims()) {
            (GgmlDType::F16, &[rows, cols]) if tr => Some((2, i.offset, rows, cols)),
            (GgmlDType::F32, &[rows, cols]) if tr => Some((4, i.offset, rows, cols)),
            _ => None,
        });
        if let Some((width, offset, rows, cols)) = plain {
            // Transposed straight from the file's f16 / f32 bytes (see transpose_into).
            use std::io::{Read, Seek, SeekFrom};
            let len = rows
                .checked_mul(cols)
                .and_then(|n| n.checked_mul(width))
                .filter(|&n| {
                    data_offset
                        .checked_add(offset)
                        .and_then(|o| o.checked_add(n as u64))
                        .is_some_and(|end| end <= file_len)
                })
                .ok_or_else(|| {
                    tensor_err(format!(
                        "malformed tensor data ({rows} x {cols} elements at offset {offset} of the data section run past the end of the {file_len}-byte file)"
                    ))
                })?;
            let mut bytes = vec![0u8; len];
            f.seek(SeekFrom::Start(data_offset + offset))
                .and_then(|_| f.read_exact(&mut bytes))
                .map_err(|e| tensor_err(format!("malformed tensor data ({e})")))?;
            let out = if width == 2 {
                let (words, _) = bytes.as_chunks::<2>();
                transpose_into(words, rows, cols, |w| half::f16::from_le_bytes(w).to_f32())
            } else {
                let (words, _) = bytes.as_chunks::<4>();
                transpose_into(words, rows, cols, f32::from_le_bytes)
            };
            return Ok(Tensor::from_vec(out, (cols, rows), &Device::Cpu)?);
        }
        let read = contained(|| {
            content
                .tensor(&mut f, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.to_dtype(DType::F32))
        })
        .map_err(|reason| tensor_err(format!("malformed tensor data ({reason})")))?;
        let t = read.map_err(|e| tensor_err(e.to_string()))?;
        Ok(if tr { t.t()?.contiguous()? } else { t })
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        config.rope_scaling = Some(RopeScaling::PerPair(
            get("rope_freqs.weight", false)?.to_vec1::<f32>()?,
        ));
        config.validate(path)?;
    }
    let embed = get("token_embd.weight", false)?;
    let mut layers = Vec::with_capacity(config.n_layers);
    for i in 0..config.n_layers {
        layers.push(layer_weights(&mut get, &format!("blk.{i}"), &GGUF_LAYER)?);
    }
    let norm = get("output_norm.weight", false)?;
    let lm_head = if tied {
        embed.t()?.contiguous()?
    } else {
        get("output.weight", true)?
    };
    let weights = Weights {
        lm_head,
        embed,
        layers,
        norm,
        tied,
    };
    check_shapes(&config, &weights, path)?;
    Ok(Loaded {
        config,
        weights,
        tokenizer,
        path: path.into(),
    })
}

/// Loads an HF directory: config.json, model.safetensors (or an index of shards), tokenizer.json.
pub fn load_hf(dir: &str) -> Result<Loaded> {
    let p = Path::new(dir);
    let read = |name: &str| {
        let f = p.join(name);
        std::fs::read_to_string(&f).map_err(|e| ModelError::File {
            path: f.display().to_string(),
            reason: e.to_string(),
        })
    };
    let cfg_path = p.join("config.json").display().to_string();
    let config = LlamaConfig::from_hf_json(&read("config.json")?, &cfg_path)?;
    let tok_path = p.join("tokenizer.json");
    let tokenizer = Tok::from_file(
        &tok_path.display().to_string(),
        config.bos,
        config.eos.clone(),
    )?;
    if tokenizer.vocab_size() > config.vocab {
        return Err(ModelError::Tokenizer(format!(
            "{} has {} tokens but the model's vocab_size is {}: tokenizer and model do not match",
            tok_path.display(),
            tokenizer.vocab_size(),
            config.vocab
        )));
    }
    let files: Vec<String> = if p.join("model.safetensors.index.json").exists() {
        let idx: serde_json::Value = serde_json::from_str(&read("model.safetensors.index.json")?)
            .map_err(|e| ModelError::File {
            path: format!("{dir}/model.safetensors.index.json"),
            reason: e.to_string(),
        })?;
        let mut v: Vec<String> = idx["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.dedup();
        v
    } else {
        vec!["model.safetensors".into()]
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let fp = p.join(f);
        let t =
            candle_core::safetensors::load(&fp, &Device::Cpu).map_err(|e| ModelError::File {
                path: fp.display().to_string(),
                reason: format!("not a readable safetensors file: {e}"),
            })?;
        tensors.extend(t);
    }
    let mut get = |name: &str, tr: bool| -> Result<Tensor> {
        let t = tensors.remove(name).ok_or_else(|| ModelError::Tensor {
            path: dir.into(),
            name: name.into(),
            reason: "missing".into(),
        })?;
        let t = t.to_dtype(DType::F32)?;
        Ok(if tr { t.t()?.contiguous()? } else { t })
    };
    let embed = get("model.embed_tokens.weight", false)?;
    let mut layers = Vec::with_capacity(config.n_layers);
    for i in 0..config.n_layers {
        layers.push(layer_weights(
            &mut get,
            &format!("model.layers.{i}"),
            &HF_LAYER,
        )?);
    }
    let norm = get("model.norm.weight", false)?;
    // Tied when the file has no output head (tie_word_embeddings), as transformers does.
    let (lm_head, tied) = match get("lm_head.weight", true) {
        Ok(t) => (t, false),
        Err(_) => (embed.t()?.contiguous()?, true),
    };
    let weights = Weights {
        lm_head,
        embed,
        layers,
        norm,
        tied,
    };
    check_shapes(&config, &weights, dir)?;
    Ok(Loaded {
        config,
        weights,
        tokenizer,
        path: dir.into(),
    })
}

fn check_shapes(c: &LlamaConfig, w: &Weights, path: &str) -> Result<()> {
    let want = |name: &str, t: &Tensor, dims: &[usize]| -> Result<()> {
        if t.dims() != dims {
            return Err(ModelError::Tensor {
                path: path.into(),
                name: name.into(),
                reason: format!("shape {:?}, expected {dims:?}", t.dims()),
            });
        }
        Ok(())
    };
    let (h, q, kv) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    want("embeddings", &w.embed, &[c.vocab, h])?;
    for (i, l) in w.layers.iter().enumerate() {
        want(&format!("layer {i} q"), &l.wq, &[h, q])?;
        want(&format!("layer {i} k"), &l.wk, &[h, kv])?;
        want(&format!("layer {i} v"), &l.wv, &[h, kv])?;
        want(&format!("layer {i} o"), &l.wo, &[q, h])?;
        want(&format!("layer {i} gate"), &l.w_gate, &[h, c.intermediate])?;
        want(&format!("layer {i} up"), &l.w_up, &[h, c.intermediate])?;
        want(&format!("layer {i} down"), &l.w_down, &[c.intermediate, h])?;
    }
    want("lm_head", &w.lm_head, &[h, c.vocab])
}

/// One layer's tensor names, in [`LayerWeights`] field order: GGUF's and HF's.
const GGUF_LAYER: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];
const HF_LAYER: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Reads one layer (`{prefix}.{name}.weight` for each name), linear weights transposed to [in, out].
fn layer_weights(
    get: &mut dyn FnMut(&str, bool) -> Result<Tensor>,
    prefix: &str,
    names: &[&str; 9],
) -> Result<LayerWeights> {
    let mut t = |i: usize, tr: bool| get(&format!("{prefix}.{}.weight", names[i]), tr);
    Ok(LayerWeights {
        attn_norm: t(0, false)?,
        wq: t(1, true)?,
        wk: t(2, true)?,
        wv: t(3, true)?,
        wo: t(4, true)?,
        ffn_norm: t(5, false)?,
        w_gate: t(6, true)?,
        w_up: t(7, true)?,
        w_down: t(8, true)?,
    })
}

/// Transposes row-major f32 [rows][cols] into [cols][rows], `conv` turning each stored element into
/// f32, in tiles of 32 x 32 over column blocks on all cores: one pass and one allocation from the
/// file's bytes. (The GGUF path through candle made a dequantized and a transposed copy on one core: the
/// 8B shape took about 105 s to load, and most of a 1B-shape load here was system time for those
/// copies' fresh pages; docs/BENCHMARKS.md run 14.)
fn transpose_into<T: Copy + Sync>(
    src: &[T],
    rows: usize,
    cols: usize,
    conv: impl Fn(T) -> f32 + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    const TB: usize = 32;
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(TB * rows)
        .enumerate()
        .for_each(|(cb, dst)| {
            let c0 = cb * TB;
            let nc = dst.len() / rows;
            for r0 in (0..rows).step_by(TB) {
                for r in r0..(r0 + TB).min(rows) {
                    let row = &src[r * cols + c0..r * cols + c0 + nc];
                    for (c, &x) in row.iter().enumerate() {
                        dst[c * rows + r] = conv(x);
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::transpose_into;

    #[test]
    fn transpose_into_matches_the_plain_transpose_off_the_tiles() {
        // Sizes below, at and past the 32-element tiles, none of them multiples of each other.
        for (rows, cols) in [(1, 1), (3, 70), (70, 3), (33, 65), (64, 32), (0, 5)] {
            let src: Vec<u32> = (0..rows * cols).map(|i| i as u32 * 7 + 1).collect();
            let out = transpose_into(&src, rows, cols, |x| x as f32);
            assert_eq!(out.len(), rows * cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        src[r * cols + c] as f32,
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
