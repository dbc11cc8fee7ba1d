//! Arbitrary bytes as a `.gguf` file: the model loader returns an error (or a model), never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("kvq-fuzz-{}.gguf", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    std::fs::write(p, data).unwrap();
    let _ = kvq_model::load::load(p.to_str().unwrap());
});
