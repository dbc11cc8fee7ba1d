//! GPU parity through `cargo test` on a machine with a GPU; elsewhere it prints why it skipped.
//! (The GPU machine has no Rust: there, scripts/gpu-check.sh runs the same check from a carried binary.)

#[test]
fn gpu_kernels_match_cpu_reference() {
    let gpu = match kvq::Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let res = kvq::check::parity(&gpu, &["fp16", "kivi:bits=2", "asymkv:lk=1,lv=0,window=0"])
        .expect("parity run");
    for r in &res {
        assert!(
            r.rel_err < kvq::check::PARITY_TOL && r.non_finite == 0,
            "{r:?}"
        );
    }
}

#[test]
fn no_gpu_is_a_clear_error() {
    // Without a driver (CI) or kernels, the error says what to do; with a GPU this simply opens it.
    if let Err(e) = kvq::Gpu::new(0) {
        let s = e.to_string();
        assert!(s.contains("CUDA") || s.contains("setup-cuda.sh"), "{s}");
    }
    assert!(kvq::Gpu::new(99).is_err(), "GPU 99 does not exist");
}
