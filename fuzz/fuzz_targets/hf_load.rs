//! Arbitrary bytes as an HF model directory: the input is split into config.json text and a
//! model.safetensors file (first two bytes: the config's length, little-endian); a fixed valid
//! word-level tokenizer.json sits beside them so the loader reaches the weights. The loader returns
//! an error (or a model), never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A word-level tokenizer over `t0`..`t7`, written once.
fn dir() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kvq-fuzz-hf-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let vocab: Vec<String> = (0..8).map(|i| format!("\"t{i}\":{i}")).collect();
        let tok = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"t0"}}}}"#,
            vocab.join(",")
        );
        std::fs::write(d.join("tokenizer.json"), tok).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    let (cfg, st) = rest.split_at(n.min(rest.len()));
    let d = dir();
    std::fs::write(d.join("config.json"), cfg).unwrap();
    std::fs::write(d.join("model.safetensors"), st).unwrap();
    let _ = kvq_model::load::load(d.to_str().unwrap());
});
