//! GPU self-check and attention micro-benchmark, run on the GPU machine by scripts/gpu-check.sh.
//! `kvq-gpu check` : parity of every kernel against the CPU reference (exit 1 on any failure).
//! `kvq-gpu bench` : decode attention timings as JSON lines on stdout.
//! `kvq-gpu engine-check [--model PATH]` : the GPU engine's op kernels vs CPU, greedy generation vs the
//! CPU path on tiny random models and the real model, decode tokens/s (exit 1 on any failure).
//! `kvq-gpu resident-check` : the GPU-resident cache backend vs the CPU path (generation, perplexity).

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
    "qjl:buffer=0",
    "qjl:m=128,m0=128,mo=32,outliers=4,v=4",
    "qjl:m=512,m0=512,mo=256,outliers=16,v=1,buffer=16",
    "qjl:outliers=0,v=3,buffer=0",
];

/// Formats whose CUDA encoder is checked (GPU cache vs CPU cache, byte for byte).
const ENCODE_FORMATS: &[&str] = &[
    "fp16",
    "kivi:bits=2",
    "kivi:bits=4,window=0",
    "kivi:bits=1,window=16",
    "kivi:bits=3,window=0",
    "asymkv:lk=1,lv=0",
    // One layer: layer 0 takes m0 rows (l0 is clamped to the depth), hence m0 = m.
    "qjl:m=128,m0=128,mo=48,outliers=5,v=4,buffer=0",
    "qjl:m=256,m0=256,mo=96,outliers=16,v=2,buffer=128",
    "qjl:m=512,m0=512,outliers=0,v=3,buffer=16",
    // DecoQuant: chunk 1024 seals one block (of the 1333-token sequence).
    "decoquant:bits=4,chunk=256",
    "decoquant:bits=2,chunk=1024",
    "decoquant:bits=8,chunk=192,svd=off",
    "k=decoquant:bits=4,chunk=64;v=decoquant:bits=2,chunk=64",
];

fn main() {
    if let Err(e) = run() {
        eprintln!("kvq-gpu: {e}");
        std::process::exit(1);
    }
}

fn run() -> kvq::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "check".into());
    if mode == "random-model" {
        // SmolLM2-135M's shape with random weights, for step timings where the real model cannot
        // travel (weights do not change a step's time; its shape does).
        use kvq_model::testutil::{write_random_llama, TinySpec};
        let dir = std::env::args()
            .nth(2)
            .unwrap_or_else(|| "/tmp/kvq-random-135m".into());
        let spec = TinySpec {
            vocab: 49152,
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            max_pos: 131072,
            tied: true,
            rope_theta: 100000.0,
            seed: 5,
            ..TinySpec::default()
        };
        write_random_llama(std::path::Path::new(&dir), &spec)?;
        println!("wrote {dir} (SmolLM2-135M shape, random weights)");
        return Ok(());
    }
    if mode == "rvq-books" {
        // kvq-gpu rvq-books LAYERS CODES DEPTH PATH: random RVQ codebooks for a random-weight model.
        let a: Vec<String> = std::env::args().skip(2).collect();
        let usage =
            || kvq::GpuError::Input("usage: kvq-gpu rvq-books LAYERS CODES DEPTH PATH".into());
        let num = |i: usize| -> kvq::Result<usize> {
            a.get(i).and_then(|s| s.parse().ok()).ok_or_else(usage)
        };
        let path = a.get(3).ok_or_else(usage)?;
        kvq::check::write_synthetic_codebooks(path, num(0)?, num(1)?, num(2)?)?;
        println!("wrote {path}");
        return Ok(());
    }
    let gpu = Gpu::new(0)?;
    eprintln!("GPU: {}", gpu.describe());
    match mode.as_str() {
        "check" => {
            // RVQ needs codebook files: synthetic ones, written now.
            let rvq = kvq::check::rvq_check_formats()?;
            let with_rvq = |base: &[&'static str]| -> Vec<String> {
                base.iter()
                    .map(|s| s.to_string())
                    .chain(rvq.iter().cloned())
                    .collect()
            };
            let (formats, encode_formats) = (with_rvq(FORMATS), with_rvq(ENCODE_FORMATS));
            let formats: Vec<&str> = formats.iter().map(|s| s.as_str()).collect();
            let encode_formats: Vec<&str> = encode_formats.iter().map(|s| s.as_str()).collect();
            let mut res = parity(&gpu, &formats)?;
            res.extend(encode_parity(&gpu, &encode_formats)?);
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
            // KVQ_BENCH_POINTS="1x4096,8x131072" (batch x context) narrows the grid.
            let points: Vec<(usize, usize)> = match std::env::var("KVQ_BENCH_POINTS") {
                Ok(v) => v
                    .split(',')
                    .filter_map(|p| {
                        let (b, t) = p.split_once('x')?;
                        Some((b.trim().parse().ok()?, t.trim().parse().ok()?))
                    })
                    .collect(),
                Err(_) => [1usize, 8]
                    .iter()
                    .flat_map(|&b| [4096usize, 16384, 65536, 131072].map(|t| (b, t)))
                    .collect(),
            };
            for &(b, t) in &points {
                for f in &formats {
                    let p = bench(&gpu, f, b, t, (32, 8, 128), 50)?;
                    println!(
                        "{{\"format\":\"{}\",\"batch\":{},\"context\":{},\"ms\":{:.4},\"bytes\":{},\"gbps\":{:.1}}}",
                        p.format, p.batch, p.context, p.ms, p.bytes, p.bytes as f64 / p.ms / 1e6
                    );
                }
            }
        }
        "engine-check" => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            let model = match args.as_slice() {
                [] => None,
                [flag, path] if flag == "--model" => Some(path.clone()),
                _ => {
                    eprintln!("kvq-gpu: usage: kvq-gpu engine-check [--model PATH]");
                    std::process::exit(2);
                }
            };
            if !engine_check(gpu, model)? {
                std::process::exit(1);
            }
        }
        "gemm-bench" => {
            // The GEMMs of a Llama-3-8B decode step (qkv, o, gate+up, down, lm_head) at batch 1 and 2.
            let gpu = std::sync::Arc::new(gpu);
            let bw = kvq::check::copy_bandwidth(&gpu)?;
            println!("copy bandwidth {:.0} GB/s (read + write)", bw / 1e9);
            println!("| n | inp x out | weight MB | gemv ms | gemv GB/s | cuBLAS ms | cuBLAS GB/s | gemv speedup |");
            println!("|---|---|---|---|---|---|---|---|");
            let mut shapes = Vec::new();
            for n in [1usize, 2] {
                for (i, o) in [
                    (4096usize, 6144usize),
                    (4096, 4096),
                    (4096, 28672),
                    (14336, 4096),
                    (4096, 128256),
                ] {
                    shapes.push((n, i, o));
                }
            }
            for p in kvq::check::gemm_bench(&gpu, &shapes, 60)? {
                let mb = p.weight_bytes() as f64 / 1e6;
                println!(
                    "| {} | {}x{} | {:.0} | {:.4} | {:.0} | {:.4} | {:.0} | {:.2}x |",
                    p.n,
                    p.inp,
                    p.out,
                    mb,
                    p.gemv_ms,
                    mb / p.gemv_ms,
                    p.cublas_ms,
                    mb / p.cublas_ms,
                    p.cublas_ms / p.gemv_ms
                );
            }
            // Whole steps' GEMMs back to back (32 layers, as a step issues them; KVQ_PDL=0 turns the
            // dependent launches off, to compare in the same run).
            for n in [1usize, 2] {
                let (g, c, bytes) = kvq::check::gemm_chain_bench(&gpu, 32, n, 20)?;
                let gb = bytes as f64 / 1e9;
                println!(
                    "chain n={n}: 32 layers x 4 GEMMs ({gb:.2} GB of weights): gemv {g:.3} ms ({:.0} GB/s), cuBLAS {c:.3} ms ({:.0} GB/s), gemv speedup {:.3}x",
                    gb / g * 1e3,
                    gb / c * 1e3,
                    c / g
                );
            }
        }
        "resident-check" => {
            if !resident_check(gpu)? {
                std::process::exit(1);
            }
        }
        other => {
            eprintln!(
                "kvq-gpu: unknown mode '{other}' (check | bench | engine-check | resident-check | gemm-bench | random-model)"
            );
            std::process::exit(2);
        }
    }
    Ok(())
}

/// The GPU-resident backend (caches written by the CUDA encoders, read by the fused kernels) against
/// the CPU path: greedy generation on a tiny random model (and the real model when present) for every
/// format with CUDA kernels, then decode tokens/s of both backends. True when everything passed.
fn resident_check(gpu: kvq::Gpu) -> kvq::Result<bool> {
    use kvq::engine::check::{decode_speed_on, generation_check_on, BackendChoice};
    use kvq_model::testutil::{temp_dir, write_random_llama, TinySpec};
    use std::sync::Arc;
    let gpu = Arc::new(gpu);
    let (mut n, mut bad) = (0usize, 0usize);
    let mut tally = |rs: &[kvq::engine::check::CheckResult]| {
        for r in rs {
            n += 1;
            bad += usize::from(!report(r));
        }
    };
    let dir = temp_dir("resident-check")?;
    let spec = TinySpec {
        vocab: 300,
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        max_pos: 2048,
        seed: 11,
        ..TinySpec::default()
    };
    let hf = dir.join("hf");
    write_random_llama(&hf, &spec)?;
    let tiny = kvq_model::Model::load(&hf.display().to_string())?;
    let prompts: Vec<Vec<u32>> = [5usize, 70, 300]
        .iter()
        .enumerate()
        .map(|(p, &len)| {
            (0..len as u32)
                .map(|i| 3 + (i * 31 + p as u32 * 101 + 7) % (spec.vocab as u32 - 3))
                .collect()
        })
        .collect();
    let plans = [
        "fp16",
        "kivi:bits=4,window=0",
        "kivi:bits=2,window=16",
        "asymkv:lk=1,lv=0,window=32",
        "kivi:bits=3,window=0",
    ];
    println!("== tiny random model: GPU-resident backend vs kvq-model CPU path");
    for plan in plans {
        let label = format!("tiny, {plan}, resident");
        let mut rs = generation_check_on(
            gpu.clone(),
            &tiny,
            plan,
            &prompts,
            (32, 64),
            &label,
            BackendChoice::Resident,
        )?;
        if plan != "fp16" {
            logits_as_information(&mut rs);
        }
        tally(&rs);
    }
    println!("== decode steps as CUDA graphs vs issued kernel by kernel (exact)");
    for plan in ["fp16", "kivi:bits=2", "asymkv:lk=1,lv=0,window=32"] {
        tally(&kvq::engine::check::graph_checks(
            gpu.clone(),
            &tiny,
            plan,
            150,
        )?);
    }
    println!("== K/V into the rings by the QKV split vs by the append kernel (exact)");
    for plan in [
        "fp16",
        "kivi:bits=2,window=16",
        "asymkv:lk=1,lv=0,window=0",
        "decoquant:bits=4,chunk=64",
        "qjl:m=128,m0=128,buffer=0",
    ] {
        tally(&kvq::engine::check::fused_append_checks(
            gpu.clone(),
            &tiny,
            plan,
            40,
        )?);
    }
    println!("== faults: out of memory, capacity, vocabulary, slots; the engine stays usable");
    for plan in ["fp16", "kivi:bits=2"] {
        tally(&kvq::engine::check::fault_checks(gpu.clone(), &tiny, plan)?);
    }
    if std::env::var("KVQ_HOST_TOO").is_ok() {
        for plan in &plans[1..3] {
            let label = format!("tiny, {plan}, host");
            tally(&generation_check_on(
                gpu.clone(),
                &tiny,
                plan,
                &prompts,
                (32, 64),
                &label,
                BackendChoice::Host,
            )?);
        }
    }
    let path = std::env::var("KVQ_MODEL")
        .unwrap_or_else(|_| format!("models/{}", kvq_model::fetch::DEFAULT_MODEL));
    if std::path::Path::new(&path).exists() {
        println!("== real model {path}: GPU-resident backend vs kvq-model CPU path");
        let m = kvq_model::Model::load(&path)?;
        let prompts: Vec<Vec<u32>> = ["The capital of France is", "def fibonacci(n):"]
            .iter()
            .map(|t| m.tokenizer.encode_prompt(t))
            .collect::<kvq_model::Result<_>>()?;
        for plan in ["fp16", "kivi:bits=4", "kivi:bits=2"] {
            let label = format!("real model, {plan}, resident");
            tally(&generation_check_on(
                gpu.clone(),
                &m,
                plan,
                &prompts,
                (32, 8),
                &label,
                BackendChoice::Resident,
            )?);
        }
        if let Ok(text) = std::env::var("KVQ_PPL_TEXT") {
            use kvq::engine::check::ppl_pair;
            let body = std::fs::read_to_string(&text)
                .map_err(|e| kvq::GpuError::Input(format!("reading KVQ_PPL_TEXT {text}: {e}")))?;
            let tokens = m.tokenizer.encode(&body)?;
            let windows: usize = std::env::var("KVQ_PPL_WINDOWS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(4);
            println!("== perplexity, {text}, {windows} windows of 1024 (stride 512): GPU engine vs CPU path");
            for plan in [
                "fp16",
                "kivi:bits=4",
                "kivi:bits=2",
                "kivi:bits=2,window=0",
                "asymkv",
                "decoquant:bits=4,chunk=256",
                "qjl",
            ] {
                let p = ppl_pair(gpu.clone(), &m, plan, &tokens, (1024, windows, 256))?;
                let rel = p.gpu / p.cpu - 1.0;
                let ok = rel.abs() <= 0.01;
                n += 1;
                bad += usize::from(!ok);
                println!(
                    "{} ppl {plan} ({:?} backend): gpu {:.4} cpu {:.4} ({:+.2}%, tolerance 1%) over {} tokens",
                    if ok { "PASS" } else { "FAIL" },
                    p.backend,
                    p.gpu,
                    p.cpu,
                    100.0 * rel,
                    p.scored
                );
            }
        }
    } else {
        println!("SKIPPED real model: {path} not found (set KVQ_MODEL)");
    }
    println!("== decode speed, tiny model, batch 8 after 1024 prompt tokens, 64 steps");
    for plan in ["fp16", "kivi:bits=2"] {
        for choice in [BackendChoice::Host, BackendChoice::Resident] {
            let (tps, _) = decode_speed_on(gpu.clone(), &tiny, plan, (8, 1024, 64), choice)?;
            println!("decode {plan} {choice:?}: {tps:.1} tokens/s");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("resident-check: {n} checks, {bad} failures");
    Ok(bad == 0)
}

/// Quantized caches on the tiny random model: the GPU quantizes K/V computed from f16 GEMM inputs, the
/// CPU from f32 ones, so codes flip and this model's teacher-forced logits move by 0.4-1.2 of the largest
/// logit (runs 2-15, greedy picks equal beyond near ties). Their logit line is reported, not checked
/// (NaN still fails); the picks stay checked, and the real model's logits are checked at 2e-2.
fn logits_as_information(rs: &mut [kvq::engine::check::CheckResult]) {
    for r in rs
        .iter_mut()
        .filter(|r| r.name.contains(kvq::engine::check::TEACHER_FORCED_LOGITS))
    {
        r.tol = f64::INFINITY;
    }
}

/// Prints one check line (INFO for a reported value with no tolerance); returns whether it passed.
fn report(r: &kvq::engine::check::CheckResult) -> bool {
    let ok = r.pass();
    println!(
        "{} {}: {:.3e} (tolerance {:.1e}){}",
        match (ok, r.tol.is_infinite()) {
            (true, true) => "INFO",
            (true, false) => "PASS",
            (false, _) => "FAIL",
        },
        r.name,
        r.err,
        r.tol,
        if r.detail.is_empty() {
            String::new()
        } else {
            format!(" [{}]", r.detail)
        }
    );
    ok
}

/// The engine check; true when everything passed.
fn engine_check(gpu: kvq::Gpu, model: Option<String>) -> kvq::Result<bool> {
    use kvq::engine::check::{decode_speed, generation_check, op_checks};
    use kvq_model::testutil::{hf_to_gguf, temp_dir, write_random_llama, TinySpec};
    use std::sync::Arc;
    let gpu = Arc::new(gpu);
    let (mut n, mut bad) = (0usize, 0usize);
    let mut tally = |rs: &[kvq::engine::check::CheckResult]| {
        for r in rs {
            n += 1;
            bad += usize::from(!report(r));
        }
    };
    println!("== model-op kernels vs CPU (random data)");
    tally(&op_checks(&gpu)?);

    println!("== tiny random models: engine (fp16 cache) vs kvq-model CPU path");
    let dir = temp_dir("engine-check")?;
    let spec = TinySpec {
        vocab: 300,
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        max_pos: 512,
        seed: 7,
        ..TinySpec::default()
    };
    let hf = dir.join("hf");
    write_random_llama(&hf, &spec)?;
    let gguf_spec = TinySpec {
        tied: true,
        ..spec.clone()
    };
    let hf_tied = dir.join("hf-tied");
    write_random_llama(&hf_tied, &gguf_spec)?;
    let gguf = dir.join("tiny.gguf");
    hf_to_gguf(
        &hf_tied,
        &gguf,
        &gguf_spec,
        candle_core::quantized::GgmlDType::F32,
    )?;
    let prompts: Vec<Vec<u32>> = [5usize, 37, 70]
        .iter()
        .enumerate()
        .map(|(p, &len)| {
            (0..len as u32)
                .map(|i| 3 + (i * 31 + p as u32 * 101 + 7) % (spec.vocab as u32 - 3))
                .collect()
        })
        .collect();
    for (label, path) in [
        ("tiny HF (rotate-half RoPE, untied)", hf.clone()),
        ("tiny GGUF (interleaved RoPE, tied)", gguf.clone()),
    ] {
        let m = kvq_model::Model::load(&path.display().to_string())?;
        tally(&generation_check(
            gpu.clone(),
            &m,
            "fp16",
            &prompts,
            32,
            16,
            label,
        )?);
    }

    let path = model.unwrap_or_else(|| {
        let dir = std::env::var("KVQ_MODELS").unwrap_or_else(|_| "models".into());
        format!("{dir}/{}", kvq_model::fetch::DEFAULT_MODEL)
    });
    let speed_model = if std::path::Path::new(&path).exists() {
        println!("== real model {path}: engine (fp16 cache) vs kvq-model CPU path");
        let m = kvq_model::Model::load(&path)?;
        let texts = [
            "The capital of France is",
            "Once upon a time, in a small village by the sea, there lived an old fisherman who",
            "def fibonacci(n):",
        ];
        let prompts: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| m.tokenizer.encode_prompt(t))
            .collect::<kvq_model::Result<_>>()?;
        tally(&generation_check(
            gpu.clone(),
            &m,
            "fp16",
            &prompts,
            32,
            8,
            "real model",
        )?);
        m
    } else {
        println!("SKIPPED real model: {path} not found (pass --model PATH or set KVQ_MODELS)");
        kvq_model::Model::load(&hf.display().to_string())?
    };
    let _ = std::fs::remove_dir_all(&dir);

    println!("== decode speed ({})", speed_model.path);
    for batch in [1usize, 8] {
        let (tps, desc) = decode_speed(gpu.clone(), &speed_model, "fp16", batch, 128, 64)?;
        println!("decode: {tps:.1} tokens/s at batch {batch} after a 128-token prompt, 64 steps ({desc})");
    }
    println!(
        "engine-check: {} ({n} checks, {bad} failures)",
        if bad == 0 { "PASS" } else { "FAIL" }
    );
    Ok(bad == 0)
}

#[cfg(test)]
mod tests {
    use super::ENCODE_FORMATS;
    use kvq_formats::{KvPlan, Rope, RopeStyle};

    /// Every encoder-checked format has CUDA kernels for its keys and values at both head dims (as
    /// one layer, which encode_parity builds), so `check` exercises its encoder rather than stopping at
    /// GpuLayerCache::new.
    #[test]
    fn encode_formats_have_cuda_kernels() {
        for fmt in ENCODE_FORMATS {
            for d in [64usize, 128] {
                let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
                let c = KvPlan::parse(fmt, 1)
                    .unwrap()
                    .build_caches(2, &rope)
                    .unwrap()
                    .remove(0);
                let (k, v) = (c.keys().codec(), c.values().codec());
                assert!(k.kernel().is_some(), "{fmt} d={d}: {}", k.describe());
                assert!(v.kernel().is_some(), "{fmt} d={d}: {}", v.describe());
                assert_eq!(k.block_tokens(), v.block_tokens(), "{fmt} d={d}");
            }
        }
    }

    /// The RVQ settings `check` adds have CUDA kernels at both head dims, the keys' kernel rotating
    /// them (pre-RoPE), and tables of the size kernels/formats/rvq.cu reads.
    #[test]
    fn rvq_check_formats_have_cuda_kernels() {
        for fmt in kvq::check::rvq_check_formats().unwrap() {
            for d in [64usize, 128] {
                let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
                let c = KvPlan::parse(&fmt, 1)
                    .unwrap()
                    .build_caches(2, &rope)
                    .unwrap()
                    .remove(0);
                let (k, v) = (c.keys().codec(), c.values().codec());
                let (ks, vs) = (k.kernel().unwrap(), v.kernel().unwrap());
                assert!(ks.pre_rope && !vs.pre_rope, "{fmt}");
                let [depth, _, codes, _] = ks.ints;
                let books = (depth * codes * 32) as usize;
                let want = 16 + 2 * d + 4 * d + books * 6;
                assert_eq!(k.kernel_table().unwrap().len(), want, "{fmt} d={d}");
                assert_eq!(v.kernel_table().unwrap().len(), want, "{fmt} d={d}");
            }
        }
    }
}
