//! Arbitrary text as a KV plan string and as a JSON plan file: an error or a plan, never a panic.
#![no_main]
use kvq_formats::KvPlan;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn plan_file() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        std::env::temp_dir().join(format!("kvq-fuzz-plan-{}.json", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // The layer count comes from the first byte, so plans for 0..=8 layers are explored.
    let n_layers = data.first().map_or(1, |b| (*b % 9) as usize);
    // A string ending in ".json" would be opened as a path; the file path is fuzzed below instead.
    if !s.trim().ends_with(".json") {
        if let Ok(p) = KvPlan::parse(s, n_layers) {
            assert_eq!(p.n_layers(), n_layers);
            let _ = p.describe();
            // A plan that parsed survives its own file form.
            let _ = p.to_file();
        }
    }
    // The same text as a plan file (there is no from-string JSON entry point: KvPlan::load reads a file).
    let path = plan_file();
    std::fs::write(path, data).unwrap();
    if let Ok(p) = KvPlan::load(path.to_str().unwrap(), n_layers) {
        assert_eq!(p.n_layers(), n_layers);
        let _ = p.describe();
    }
});
