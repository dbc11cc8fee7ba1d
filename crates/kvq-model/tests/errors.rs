//! Bad input gives one clear error naming what was wrong, never a panic.
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use kvq_formats::KvPlan;
use kvq_model::testutil::{hf_to_gguf, rewrite_gguf, temp_dir, write_random_llama, TinySpec};
use kvq_model::{Model, ModelError};
use std::path::Path;

fn err_of(path: &Path) -> String {
    match Model::load(path.to_str().unwrap()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// GGUF metadata as `rewrite_gguf` hands it over.
type Meta = Vec<(String, Value)>;

fn set(md: &mut Meta, key: &str, v: Value) {
    md.retain(|(k, _)| k != key);
    md.push((key.to_string(), v));
}

#[test]
fn hostile_hf_directories() {
    let dir = temp_dir("errors-hf").unwrap();
    write_random_llama(&dir, &TinySpec::default()).unwrap();
    // Missing model.
    assert!(err_of(Path::new("/nonexistent/model.gguf")).contains("/nonexistent/model.gguf"));
    // Truncated safetensors.
    let st = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let e = err_of(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    // A safetensors header that lies: its length prefix points past the file, then a header that is
    // not JSON.
    let mut lie = st.clone();
    lie[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(dir.join("model.safetensors"), &lie).unwrap();
    let e = err_of(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let mut garbled = st.clone();
    garbled[8..8 + n].fill(b'{');
    std::fs::write(dir.join("model.safetensors"), &garbled).unwrap();
    let e = err_of(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(dir.join("model.safetensors"), &st).unwrap();
    // config.json that is not JSON, or lacks a field.
    let cfg0 = std::fs::read_to_string(dir.join("config.json")).unwrap();
    for bad in [
        &cfg0[..cfg0.len() / 2],
        "",
        "[1, 2, 3]",
        "{\"model_type\": \"llama\"}",
    ] {
        std::fs::write(dir.join("config.json"), bad).unwrap();
        let e = err_of(&dir);
        assert!(e.contains("config.json"), "{bad:?}: {e}");
    }
    std::fs::write(dir.join("config.json"), &cfg0).unwrap();
    // Unknown architecture.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
            .replace("\"llama\"", "\"gpt_neox\""),
    )
    .unwrap();
    let e = err_of(&dir);
    assert!(
        e.contains("GPTNeoXForCausalLM") && e.contains("config.json"),
        "{e}"
    );
    // Unsupported RoPE scaling.
    std::fs::write(
        dir.join("config.json"),
        cfg.replace(
            "\"rope_scaling\":null",
            "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4.0}",
        ),
    )
    .unwrap();
    let e = err_of(&dir);
    assert!(e.contains("yarn"), "{e}");
    // Tokenizer larger than the model's vocabulary: they do not match.
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"vocab_size\":96", "\"vocab_size\":50"),
    )
    .unwrap();
    let e = err_of(&dir);
    assert!(e.contains("tokenizer") && e.contains("do not match"), "{e}");
    // No tokenizer at all.
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    std::fs::rename(dir.join("tokenizer.json"), dir.join("tok.bak")).unwrap();
    let e = err_of(&dir);
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::rename(dir.join("tok.bak"), dir.join("tokenizer.json")).unwrap();
    // Contexts longer than the model or the cache.
    let m = Model::load(dir.to_str().unwrap()).unwrap();
    let plan = KvPlan::parse("fp16", m.config.n_layers).unwrap();
    assert!(matches!(
        m.new_sequence(&plan, 100_000),
        Err(ModelError::Context { .. })
    ));
    let mut seq = m.new_sequence(&plan, 4).unwrap();
    let e = m.forward(&mut seq, &[1, 2, 3, 4, 5], None).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::Context {
                tokens: 5,
                limit: 4,
                ..
            }
        ),
        "{e}"
    );
    // Token ids outside the vocabulary, an unparsable --kv, a plan for another depth.
    assert!(m.forward(&mut seq, &[4000], None).is_err());
    let e = KvPlan::parse("kivi:bits=7", 2).unwrap_err().to_string();
    assert!(e.contains("kivi:bits=7"), "{e}");
    assert!(KvPlan::parse("nonsense", 2).is_err());
    let other = KvPlan::parse("fp16", 3).unwrap();
    assert!(m.new_sequence(&other, 8).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_gguf_files() {
    let dir = temp_dir("errors-gguf").unwrap();
    let spec = TinySpec::default();
    write_random_llama(&dir, &spec).unwrap();
    let good = dir.join("good.gguf");
    hf_to_gguf(&dir, &good, &spec, GgmlDType::Q8_0).unwrap();
    assert!(Model::load(good.to_str().unwrap()).is_ok());
    let bytes = std::fs::read(&good).unwrap();
    // Truncated at several points: header, metadata, tensor data.
    for cut in [8, 100, bytes.len() / 3, bytes.len() - 10] {
        let p = dir.join("cut.gguf");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = err_of(&p);
        assert!(e.contains("cut.gguf"), "cut at {cut}: {e}");
    }
    // F16 weights take the loader's direct path (file bytes to the transposed matrix): cut inside
    // their data, the error names the file and the tensor, no panic.
    let g16 = dir.join("good16.gguf");
    hf_to_gguf(&dir, &g16, &spec, GgmlDType::F16).unwrap();
    assert!(Model::load(g16.to_str().unwrap()).is_ok());
    let b16 = std::fs::read(&g16).unwrap();
    for cut in [b16.len() / 2, b16.len() - 10] {
        let p = dir.join("cut16.gguf");
        std::fs::write(&p, &b16[..cut]).unwrap();
        let e = err_of(&p);
        assert!(
            e.contains("cut16.gguf") && e.contains("malformed tensor data"),
            "cut at {cut}: {e}"
        );
    }
    // Not a GGUF at all.
    let p = dir.join("text.gguf");
    std::fs::write(&p, b"hello, this is not a model").unwrap();
    assert!(err_of(&p).contains("GGUF"));
    let variant = |name: &str, edit: &dyn Fn(&mut Meta)| {
        let p = dir.join(name);
        rewrite_gguf(&good, &p, |md| edit(md)).unwrap();
        err_of(&p)
    };
    // general.alignment = 0: candle's reader divides by it (a cargo-fuzz finding); an error, no panic.
    let e = variant("align0.gguf", &|md| {
        set(md, "general.alignment", Value::U32(0))
    });
    assert!(
        e.contains("align0.gguf") && e.contains("malformed GGUF"),
        "{e}"
    );
    // The fuzzer's own input (fuzz/artifacts/gguf_load/crash-f19aea1b..., 2,670 bytes).
    let p = dir.join("fuzz-crash.gguf");
    std::fs::write(&p, include_bytes!("fuzz_regressions/gguf_load-alignment-0")).unwrap();
    let e = err_of(&p);
    assert!(e.contains("fuzz-crash.gguf"), "{e}");
    // Unknown architecture.
    let e = variant("arch.gguf", &|md| {
        set(md, "general.architecture", Value::String("mamba".into()))
    });
    assert!(e.contains("mamba") && e.contains("architecture"), "{e}");
    // Wrong tokenizer: a SentencePiece vocabulary, an unknown pre-tokenizer, fewer tokens than the embeddings.
    let e = variant("spm.gguf", &|md| {
        set(md, "tokenizer.ggml.model", Value::String("llama".into()))
    });
    assert!(e.contains("tokenizer") && e.contains("llama"), "{e}");
    let e = variant("pre.gguf", &|md| {
        set(md, "tokenizer.ggml.pre", Value::String("klingon".into()))
    });
    assert!(e.contains("klingon"), "{e}");
    let e = variant("vocab.gguf", &|md| {
        let toks: Vec<Value> = (0..90).map(|i| Value::String(format!("t{i}"))).collect();
        let types: Vec<Value> = (0..90).map(|_| Value::I32(1)).collect();
        set(md, "tokenizer.ggml.tokens", Value::Array(toks));
        set(md, "tokenizer.ggml.token_type", Value::Array(types));
    });
    assert!(e.contains("do not match") && e.contains("90"), "{e}");
    // Shapes that disagree with the architecture, and absurd header numbers.
    let e = variant("heads.gguf", &|md| {
        set(md, "llama.attention.head_count_kv", Value::U32(3))
    });
    assert!(e.contains("KV heads"), "{e}");
    let e = variant("layers.gguf", &|md| {
        set(md, "llama.block_count", Value::U32(3))
    });
    assert!(e.contains("blk.2") && e.contains("missing"), "{e}");
    let e = variant("huge.gguf", &|md| {
        set(md, "llama.block_count", Value::U64(u64::MAX))
    });
    assert!(e.contains("block_count") || e.contains("layers"), "{e}");
    let e = variant("neg.gguf", &|md| {
        set(md, "llama.embedding_length", Value::I32(-64))
    });
    assert!(e.contains("embedding_length"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
