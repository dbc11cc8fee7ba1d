//! Compiles every top-level kernel (kernels/*.cu, kernels/formats/*.cu) with nvcc into a fatbin holding
//! an sm_90 cubin plus PTX for other GPUs, and embeds them in the library. Without nvcc the build
//! succeeds with a warning and the GPU backend reports how to get kernels at run time.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "KVQ_CUDA_ARCHS", "PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=.cuda/nvidia/cu13/bin/nvcc");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let sources = kernel_sources(&root.join("kernels"));
    let mut entries = Vec::new();
    let mut missing = None;
    match find_nvcc(&root) {
        None => {
            missing = Some(
                "nvcc not found (set NVCC or CUDA_HOME, or run scripts/setup-cuda.sh)".to_string(),
            );
            println!("cargo:warning=kvq: nvcc not found; building without CUDA kernels (run scripts/setup-cuda.sh or set NVCC)");
        }
        Some((nvcc, extra_inc)) => {
            let archs = env::var("KVQ_CUDA_ARCHS").unwrap_or_else(|_| "90".to_string());
            for src in &sources {
                let stem = kernel_name(&root, src);
                let fatbin = out.join(format!("{stem}.fatbin"));
                let mut cmd = Command::new(&nvcc);
                cmd.arg("-fatbin")
                    .arg("-O3")
                    .arg("-lineinfo")
                    .arg("-std=c++17");
                cmd.arg("-I").arg(root.join("kernels/include"));
                if let Some(inc) = &extra_inc {
                    cmd.arg("-I").arg(inc);
                }
                for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
                }
                // PTX of the lowest listed arch, so newer GPUs can JIT the kernels.
                let lowest = archs
                    .split(',')
                    .map(str::trim)
                    .filter_map(|a| a.parse::<u32>().ok())
                    .min()
                    .unwrap_or(90);
                cmd.arg(format!(
                    "-gencode=arch=compute_{lowest},code=compute_{lowest}"
                ));
                cmd.arg("-Xptxas=-v").arg("-o").arg(&fatbin).arg(src);
                let res = cmd
                    .output()
                    .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
                let log = String::from_utf8_lossy(&res.stderr).to_string();
                fs::write(out.join(format!("{stem}.ptxas.txt")), &log).expect("write ptxas report");
                if !res.status.success() {
                    panic!("nvcc failed on {}:\n{log}", src.display());
                }
                entries.push((stem, fatbin));
            }
        }
    }
    let mut gen = String::from("/// Embedded kernel images: (module name, fatbin bytes).\npub static MODULES: &[(&str, &[u8])] = &[\n");
    for (name, path) in &entries {
        gen.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    gen.push_str("];\n");
    gen.push_str(&format!(
        "/// Why no kernels were compiled, if none were.\npub static MISSING: Option<&str> = {missing:?};\n"
    ));
    fs::write(out.join("kernels.rs"), gen).expect("write kernels.rs");
}

/// Top-level translation units: kernels/*.cu and kernels/formats/*.cu (headers live in kernels/include).
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in [dir.to_path_buf(), dir.join("formats")] {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "cu") {
                    v.push(p);
                }
            }
        }
    }
    v.sort();
    v
}

/// Module name: the file stem (formats/fp16.cu -> fp16), the name a format's `KernelSpec` gives.
fn kernel_name(_root: &Path, src: &Path) -> String {
    src.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// nvcc from NVCC, CUDA_HOME/CUDA_PATH, PATH, then the project-local toolkit of scripts/setup-cuda.sh
/// (which also needs its cccl include directory).
fn find_nvcc(root: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    if let Ok(p) = env::var("NVCC") {
        return Some((PathBuf::from(p), None));
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = env::var(v) {
            let p = Path::new(&h).join("bin/nvcc");
            if p.exists() {
                return Some((p, None));
            }
        }
    }
    if let Ok(path) = env::var("PATH") {
        for d in env::split_paths(&path) {
            let p = d.join("nvcc");
            if p.exists() {
                return Some((p, None));
            }
        }
    }
    let local = root.join(".cuda/nvidia/cu13");
    let p = local.join("bin/nvcc");
    if p.exists() {
        return Some((p, Some(local.join("include/cccl"))));
    }
    None
}
