//! Every CUDA kernel may be launched as a programmatic dependent (src/gpu.rs, `KVQ_PDL_ALL`), which is
//! only safe when its first statement waits for the previous kernel: this test reads kernels/ and
//! fails on any `__global__` entry point whose body does not start with `KVQ_PDL_ENTER()`, except the
//! GEMV, which requests its weights first and waits before touching anything else.

use std::path::Path;

/// Kernels that wait later than their first statement, with where they do.
const WAIT_INSIDE: &[&str] = &["kvq_model_gemv"];

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).expect("kernels/ is readable") {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if matches!(p.extension().and_then(|x| x.to_str()), Some("cu" | "cuh")) {
            let text = std::fs::read_to_string(&p).expect("kernel source is UTF-8");
            out.push((p.display().to_string(), text));
        }
    }
}

#[test]
fn every_kernel_waits_for_its_predecessor_first() {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels"),
        &mut files,
    );
    let mut kernels = 0;
    let mut bad = Vec::new();
    for (path, text) in &files {
        for (at, _) in text.match_indices("__global__") {
            let head = &text[at..];
            let open = head.find('{').expect("a kernel has a body");
            let signature = &head[..open];
            let first = head[open + 1..]
                .trim_start_matches(|c: char| c.is_whitespace() || c == '\\')
                .split(';')
                .next()
                .unwrap_or("");
            kernels += 1;
            let waits = first.trim_start().starts_with("KVQ_PDL_ENTER()");
            if !waits && !WAIT_INSIDE.iter().any(|k| signature.contains(k)) {
                bad.push(format!("{path}: {}", signature.trim()));
            }
        }
    }
    assert!(kernels >= 15, "found only {kernels} kernels under kernels/");
    assert!(
        bad.is_empty(),
        "kernels not starting with KVQ_PDL_ENTER():\n{}",
        bad.join("\n")
    );
}
