//! A small random LLaMA written as an HF directory (config.json, model.safetensors, tokenizer.json).
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub const VOCAB: usize = 96;

/// Writes the model into a fresh temp directory and returns it.
pub fn write_random_llama(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvq-model-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (h, inter, layers, heads, kv) = (64usize, 128usize, 2usize, 4usize, 2usize);
    let d = h / heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": inter, "vocab_size": VOCAB,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let dev = Device::Cpu;
    let mut seed = 0u64;
    let mut rnd = |shape: &[usize], scale: f64| {
        seed += 1;
        // Deterministic pseudo-random values (no RNG dependency needed for a fixture).
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let x = ((i as u64 + 1)
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(seed * 1442695040888963407)
                    >> 33) as f64;
                ((x / (1u64 << 31) as f64) * 2.0 - 1.0) as f32 * scale as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rnd(&[VOCAB, h], 1.0));
    t.insert("lm_head.weight".into(), rnd(&[VOCAB, h], 0.2));
    t.insert("model.norm.weight".into(), (rnd(&[h], 0.1) + 1.0).unwrap());
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.insert(
            format!("{p}.input_layernorm.weight"),
            (rnd(&[h], 0.1) + 1.0).unwrap(),
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (rnd(&[h], 0.1) + 1.0).unwrap(),
        );
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rnd(&[heads * d, h], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rnd(&[kv * d, h], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rnd(&[kv * d, h], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rnd(&[h, heads * d], 0.2),
        );
        t.insert(format!("{p}.mlp.gate_proj.weight"), rnd(&[inter, h], 0.2));
        t.insert(format!("{p}.mlp.up_proj.weight"), rnd(&[inter, h], 0.2));
        t.insert(format!("{p}.mlp.down_proj.weight"), rnd(&[h, inter], 0.2));
    }
    let t: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    // A word-level tokenizer over "t0".."t95".
    let vocab: HashMap<String, u32> = (0..VOCAB as u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    dir
}
