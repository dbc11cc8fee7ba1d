//! The GPU engine through `cargo test` on a machine with a GPU; elsewhere it prints why it skipped.
//! (The GPU machine has no Rust: there, scripts/gpu-engine-check.sh runs the same checks and more.)

use kvq::engine::check::{generation_check, op_checks};
use kvq_model::testutil::{temp_dir, write_random_llama, TinySpec};
use std::sync::Arc;

fn gpu() -> Option<Arc<kvq::Gpu>> {
    match kvq::Gpu::new(0) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[test]
fn model_ops_match_cpu() {
    let Some(gpu) = gpu() else { return };
    for r in op_checks(&gpu).expect("op checks run") {
        assert!(r.pass(), "{r:?}");
    }
}

#[test]
fn engine_greedy_matches_cpu_on_a_tiny_model() {
    let Some(gpu) = gpu() else { return };
    let dir = temp_dir("engine-test").unwrap();
    let spec = TinySpec {
        hidden: 256,
        intermediate: 512,
        heads: 4,
        kv_heads: 2,
        ..TinySpec::default()
    };
    write_random_llama(&dir, &spec).unwrap();
    let m = kvq_model::Model::load(dir.to_str().unwrap()).unwrap();
    let prompts = vec![vec![5u32, 9, 27], (3..40).collect::<Vec<u32>>()];
    for r in generation_check(gpu, &m, "fp16", &prompts, 12, 8, "tiny").unwrap() {
        assert!(r.pass(), "{r:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn engine_without_gpu_is_a_clear_error() {
    if kvq::Gpu::new(0).is_ok() {
        return;
    }
    let dir = temp_dir("engine-nogpu").unwrap();
    write_random_llama(&dir, &TinySpec::default()).unwrap();
    let e = kvq::Engine::load(dir.to_str().unwrap(), "fp16")
        .err()
        .expect("no GPU: loading fails")
        .to_string();
    assert!(e.contains("CUDA") || e.contains("setup-cuda.sh"), "{e}");
    // The resident entry point fails the same way, before sizing any cache.
    let limits = kvq::engine::ResidentLimits {
        slots: 1,
        max_tokens: 64,
        max_chunk: 16,
    };
    let e = kvq::Engine::load_resident(dir.to_str().unwrap(), "kivi:bits=2", limits)
        .err()
        .expect("no GPU: loading fails")
        .to_string();
    assert!(e.contains("CUDA") || e.contains("setup-cuda.sh"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
