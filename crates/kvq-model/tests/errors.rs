//! Bad input gives one clear error naming what was wrong, never a panic.
mod common;
use kvq_formats::KvPlan;
use kvq_model::{Model, ModelError};

fn err_of(path: &str) -> String {
    match Model::load(path) {
        Ok(_) => panic!("{path} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_models_and_contexts() {
    let dir = common::write_random_llama("errors");
    let d = dir.to_str().unwrap();
    // Missing model.
    assert!(err_of("/nonexistent/model.gguf").contains("/nonexistent/model.gguf"));
    // Truncated GGUF.
    let g = dir.join("bad.gguf");
    std::fs::write(&g, b"GGUF\x03\x00\x00\x00").unwrap();
    let e = err_of(g.to_str().unwrap());
    assert!(e.contains("bad.gguf") && e.contains("GGUF"), "{e}");
    // Truncated safetensors.
    let st = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let e = err_of(d);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(dir.join("model.safetensors"), &st).unwrap();
    // Unknown architecture.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
            .replace("\"llama\"", "\"gpt_neox\""),
    )
    .unwrap();
    let e = err_of(d);
    assert!(
        e.contains("GPTNeoXForCausalLM") && e.contains("config.json"),
        "{e}"
    );
    // Tokenizer larger than the model's vocabulary: they do not match.
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"vocab_size\":96", "\"vocab_size\":50"),
    )
    .unwrap();
    let e = err_of(d);
    assert!(e.contains("tokenizer") && e.contains("do not match"), "{e}");
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    // Contexts longer than the model or the cache.
    let m = Model::load(d).unwrap();
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
    // Token ids outside the vocabulary, an unparsable --kv.
    assert!(m.forward(&mut seq, &[4000], None).is_err());
    let e = KvPlan::parse("kivi:bits=7", 2).unwrap_err().to_string();
    assert!(e.contains("kivi:bits=7"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
