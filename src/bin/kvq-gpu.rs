//! GPU self-check and attention micro-benchmark, run on the GPU machine by scripts/gpu-check.sh.
//! `kvq-gpu check` : parity of every kernel against the CPU reference (exit 1 on any failure).
//! `kvq-gpu bench` : decode attention timings as JSON lines on stdout.

use kvq::check::{bench, encode_parity, parity, PARITY_TOL};
use kvq::Gpu;

const FORMATS: &[&str] = &[
    "fp16",
    "kivi:bits=2,window=0",
    "kivi:bits=2",
    "kivi:bits=4,window=0",
    "kivi:bits=1,window=0",
    "kivi:bits=3,window=0",
    "kivi:bits=8",
    "asymkv:lk=1,lv=0,window=0",
    "asymkv:lk=1,lv=0,hi=4,lo=2",
    "asymkv:lk=1,lv=0,hi=3,lo=4,window=0",
    "decoquant:bits=4,chunk=256",
    "decoquant:bits=2,chunk=64",
    "decoquant:bits=8,chunk=128,svd=off",
    "decoquant:bits=4,chunk=1024",
    "decoquant:bits=4,chunk=192",
    "k=decoquant:bits=4,chunk=256;v=decoquant:bits=2,chunk=256",
];

/// Formats whose CUDA encoder is checked (GPU cache vs CPU cache, byte for byte).
const ENCODE_FORMATS: &[&str] = &[
    "fp16",
    "kivi:bits=2",
    "kivi:bits=4,window=0",
    "kivi:bits=1,window=16",
    "kivi:bits=3,window=0",
    "asymkv:lk=1,lv=0",
];

fn main() {
    if let Err(e) = run() {
        eprintln!("kvq-gpu: {e}");
        std::process::exit(1);
    }
}

fn run() -> kvq::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "check".into());
    let gpu = Gpu::new(0)?;
    eprintln!("GPU: {}", gpu.describe());
    match mode.as_str() {
        "check" => {
            let mut res = parity(&gpu, FORMATS)?;
            res.extend(encode_parity(&gpu, ENCODE_FORMATS)?);
            let mut bad = 0;
            for r in &res {
                let ok = r.rel_err < PARITY_TOL && r.non_finite == 0;
                bad += usize::from(!ok);
                println!(
                    "{} {:<60} rel_err={:.2e} non_finite={}",
                    if ok { "PASS" } else { "FAIL" },
                    r.case,
                    r.rel_err,
                    r.non_finite
                );
            }
            let worst = res.iter().map(|r| r.rel_err).fold(0.0, f64::max);
            println!("parity: {} cases, {bad} failures, worst rel_err {worst:.2e} (tolerance {PARITY_TOL:.0e})", res.len());
            if bad > 0 {
                std::process::exit(1);
            }
        }
        "bench" => {
            let formats: Vec<String> = std::env::args().skip(2).collect();
            let formats: Vec<&str> = if formats.is_empty() {
                vec!["fp16", "kivi:bits=2,window=0", "kivi:bits=4,window=0"]
            } else {
                formats.iter().map(|s| s.as_str()).collect()
            };
            for b in [1usize, 8] {
                for t in [4096usize, 16384, 65536, 131072] {
                    for f in &formats {
                        let p = bench(&gpu, f, b, t, (32, 8, 128), 50)?;
                        println!(
                            "{{\"format\":\"{}\",\"batch\":{},\"context\":{},\"ms\":{:.4},\"bytes\":{},\"gbps\":{:.1}}}",
                            p.format, p.batch, p.context, p.ms, p.bytes, p.bytes as f64 / p.ms / 1e6
                        );
                    }
                }
            }
        }
        other => {
            eprintln!("kvq-gpu: unknown mode '{other}' (check | bench)");
            std::process::exit(2);
        }
    }
    Ok(())
}
