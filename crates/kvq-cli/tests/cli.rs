//! The `kvq` binary on bad input: one clear error line, a non-zero exit code, no panic; and on a small
//! random model, `generate` and `eval ppl` run end to end.
use candle_core::quantized::GgmlDType;
use kvq_model::testutil::{hf_to_gguf, temp_dir, write_random_llama, write_word_text, TinySpec};
use std::process::{Command, Output};

fn kvq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvq"))
        .args(args)
        .env("KVQ_MODELS", "/nonexistent-kvq-models") // never fetch the default model in tests
        .output()
        .unwrap()
}

/// Asserts a clean failure and returns its one error line.
fn fails(args: &[&str]) -> String {
    let o = kvq(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{args:?} succeeded: {err}");
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {err}"
    );
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("kvq: error: "))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: expected one error line, got: {err}"
    );
    // Informational lines (model loaded) may precede the error; nothing may follow it.
    assert!(err.trim_end().ends_with(errors[0]), "{args:?}: {err}");
    errors[0].to_string()
}

#[test]
fn bad_input_gives_one_error_line() {
    let dir = temp_dir("cli-bad").unwrap();
    let spec = TinySpec::default();
    write_random_llama(&dir, &spec).unwrap();
    let m = dir.to_str().unwrap();
    let text = dir.join("text.txt");
    std::fs::write(&text, "t3 t4 t5 ".repeat(100)).unwrap();
    let t = text.to_str().unwrap();

    // Missing and truncated models.
    let e = fails(&["generate", "--model", "/nonexistent/m.gguf", "hi"]);
    assert!(e.contains("/nonexistent/m.gguf"), "{e}");
    let g = dir.join("m.gguf");
    hf_to_gguf(&dir, &g, &spec, GgmlDType::Q8_0).unwrap();
    let bytes = std::fs::read(&g).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["generate", "--model", cut.to_str().unwrap(), "t3"]);
    assert!(e.contains("cut.gguf"), "{e}");
    // The default model absent and not fetchable is not tested here (it would download).

    // Wrong tokenizer: the tokenizer has more tokens than the model's vocabulary.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"vocab_size\":96", "\"vocab_size\":50"),
    )
    .unwrap();
    let e = fails(&["generate", "--model", m, "t3"]);
    assert!(e.contains("tokenizer") && e.contains("do not match"), "{e}");
    // Unknown architecture.
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("LlamaForCausalLM", "BertModel")
            .replace("\"llama\"", "\"bert\""),
    )
    .unwrap();
    let e = fails(&["eval", "ppl", "--model", m, "--text", t]);
    assert!(e.contains("BertModel"), "{e}");
    std::fs::write(dir.join("config.json"), &cfg).unwrap();

    // Contexts longer than the model (256) or the cache.
    let e = fails(&["eval", "ppl", "--model", m, "--text", t, "--ctx", "100000"]);
    assert!(e.contains("100000") && e.contains("256"), "{e}");
    let long = "t7 ".repeat(300);
    let e = fails(&["generate", "--model", m, &long]);
    assert!(e.contains("256"), "{e}");
    let e = fails(&[
        "eval", "ppl", "--model", m, "--text", t, "--ctx", "64", "--stride", "64",
    ]);
    assert!(e.contains("--stride"), "{e}");
    let short = dir.join("short.txt");
    std::fs::write(&short, "t3 t4").unwrap();
    let e = fails(&[
        "eval",
        "ppl",
        "--model",
        m,
        "--text",
        short.to_str().unwrap(),
        "--ctx",
        "64",
    ]);
    assert!(e.contains("fewer than one window"), "{e}");

    // Unparsable --kv (format, key, value, layer range), and flags out of range.
    for kv in ["nonsense", "fp16:bits=2", "kivi:bits=7", "k@0-9=fp16", ""] {
        let e = fails(&["generate", "--model", m, "--kv", kv, "t3"]);
        assert!(e.contains("--kv"), "{kv}: {e}");
    }
    let e = fails(&[
        "eval",
        "ppl",
        "--model",
        m,
        "--text",
        t,
        "--kv",
        "fp16",
        "--kv",
        "bogus:x=1",
    ]);
    assert!(e.contains("bogus"), "{e}");
    let e = fails(&["generate", "--model", m, "--top-p", "0", "t3"]);
    assert!(e.contains("--top-p"), "{e}");
    let e = fails(&["generate", "--model", m, "--temperature=-1", "t3"]);
    assert!(e.contains("--temperature"), "{e}");
    let e = fails(&["generate", "--model", m, "--chat", "t3"]);
    assert!(e.contains("ChatML"), "{e}");

    // Missing text file, devices, commands not built yet.
    let e = fails(&["eval", "ppl", "--model", m, "--text", "/nonexistent/t.txt"]);
    assert!(e.contains("/nonexistent/t.txt"), "{e}");
    // Without a usable GPU the error names why; with one, generation runs on the GPU engine.
    let o = kvq(&["generate", "--model", m, "--device", "cuda", "t3"]);
    if !o.status.success() {
        let e = fails(&["generate", "--model", m, "--device", "cuda", "t3"]);
        assert!(
            e.contains("--device cuda: no CUDA GPU found") && e.contains("--device cpu"),
            "{e}"
        );
    }
    // eval ppl runs on the GPU engine too: without a usable GPU, --device cuda names why.
    let txt = std::env::temp_dir().join(format!("kvq-cli-ppl-{}.txt", std::process::id()));
    std::fs::write(&txt, "one two three four five six seven eight nine ten").unwrap();
    let tp = txt.to_str().unwrap();
    let o = kvq(&[
        "eval", "ppl", "--model", m, "--device", "cuda", "--text", tp,
    ]);
    if !o.status.success() {
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            e.contains("--device cuda: no CUDA GPU found") || e.contains("tokens"),
            "{e}"
        );
    }
    let _ = std::fs::remove_file(&txt);
    let e = fails(&["generate", "--model", m, "--device", "tpu", "t3"]);
    assert!(e.contains("tpu"), "{e}");
    let e = fails(&[
        "calibrate",
        "--model",
        m,
        "--text",
        "/nonexistent/c.txt",
        "--out",
        "x.st",
        "--group",
        "16",
    ]);
    assert!(e.contains("/nonexistent/c.txt"), "{e}");
    let e = fails(&["eval", "sweep"]);
    assert!(e.contains("--text"), "{e}");
    let e = fails(&[
        "eval",
        "sweep",
        "--model",
        m,
        "--text",
        t,
        "--kv",
        "kivi:bits=7",
    ]);
    assert!(e.contains("--kv kivi:bits=7"), "{e}");
    let e = fails(&["eval", "sweep", "--replot", "--json", "/nonexistent/s.json"]);
    assert!(e.contains("/nonexistent/s.json"), "{e}");
    let e = fails(&["tune", "--model", m, "--text", t, "--budget", "lots"]);
    assert!(e.contains("--budget lots"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_and_eval_run_on_a_small_model() {
    let dir = temp_dir("cli-ok").unwrap();
    write_random_llama(&dir, &TinySpec::default()).unwrap();
    let m = dir.to_str().unwrap();
    let o = kvq(&[
        "generate",
        "--model",
        m,
        "--max-tokens",
        "5",
        "--device",
        "auto",
        "t3 t9 t27",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("tok/s") && err.contains("bits/elem"), "{err}");
    // KV bytes = tokens held x 2 layers x 2 KV heads x 16 channels x (K and V) x 2 bytes (f16).
    let line = err.lines().find(|l| l.contains("tok/s")).unwrap();
    let num_before = |pat: &str| -> usize {
        let i = line.find(pat).unwrap();
        line[..i]
            .trim_end()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (bytes, tokens) = (num_before(" bytes ("), num_before(" tokens, "));
    assert!((3..=3 + 5).contains(&tokens), "{line}");
    assert_eq!(bytes, tokens * 2 * 2 * 16 * 2 * 2, "{line}");
    assert!(line.contains("16.000 bits/elem"), "{line}");

    let text = dir.join("text.txt");
    write_word_text(&text, 400, 7, 3, 96).unwrap();
    let json = dir.join("out.json");
    let o = kvq(&[
        "eval",
        "ppl",
        "--model",
        m,
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunk",
        "16",
        "--kv",
        "fp16",
        "--kv",
        "fp16;k@0=fp16",
        "--json",
        json.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("| `")).count(),
        2,
        "{out}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = doc["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    // 400 tokens, windows of 64 every 32: (400 - 64) / 32 + 1 = 11 windows, 32 scored each.
    assert_eq!(r[0]["windows"], 11);
    assert_eq!(r[0]["scored"], 11 * 32);
    let ppl = r[0]["ppl"].as_f64().unwrap();
    // A random model is near-uniform over 96 tokens, far from a trained one: ppl within (10, 1000).
    assert!(ppl > 10.0 && ppl < 1000.0, "{ppl}");
    // The same plan written two ways gives the same numbers.
    assert_eq!(r[0]["ppl"], r[1]["ppl"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench decode --replot` merges llama-batched-bench JSONL into a GPU result file without a GPU:
/// ratios at matching points, a Markdown table and the PNGs; bad peer files are one clear error.
#[test]
fn bench_decode_replot_merges_peer_results() {
    let dir = temp_dir("cli-bench").unwrap();
    let json = dir.join("bench.json");
    let doc = serde_json::json!({
        "model": "test model", "gpu": "none", "copy_bandwidth_bytes_s": 3.0e12,
        "weight_bytes": 1.0e9, "steps": 4, "warmup": 1, "fill": "synthetic",
        "points": [
            {"runtime": "kvq", "plan": "fp16", "ctx": 4096, "batch": 1, "status": "ok",
             "ms_per_step": 2.0, "host_ms_per_step": 0.3, "gpu_ms_per_step": 1.7,
             "tok_s": 500.0, "kv_gib": 0.1, "bits_per_elem": 16.0,
             "kv_bytes_read": 1.0e8, "weight_bytes": 1.0e9, "bw_fraction": 0.18},
            {"runtime": "kvq", "plan": "fp16", "ctx": 8192, "batch": 1, "status": "skipped",
             "note": "needs 90 GiB"}
        ],
        "peers": [],
        "fits": [{"plan": "fp16", "packed_bytes_per_token": 1000.0, "max_ctx_b1": 100000,
                  "max_ctx_b8": 12500, "max_batch_32k": 3}]
    });
    std::fs::write(&json, serde_json::to_string(&doc).unwrap()).unwrap();
    let peer = dir.join("f16.jsonl");
    std::fs::write(
        &peer,
        "{\"pp\": 4096, \"tg\": 64, \"pl\": 1, \"speed_tg\": 250.0}\n",
    )
    .unwrap();
    let j = json.to_str().unwrap();
    let arg = format!("llama.cpp f16={}", peer.to_str().unwrap());
    let o = kvq(&[
        "bench", "decode", "--replot", "--json", j, "--peer", &arg, "--batch", "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = out["points"][0]["vs_peer"]["llama.cpp f16"]
        .as_f64()
        .unwrap();
    assert!((r - 2.0).abs() < 1e-9, "{r}");
    let md = std::fs::read_to_string(dir.join("bench.md")).unwrap();
    assert!(md.contains("| kvq `fp16` | 1 | 4096 |"), "{md}");
    assert!(md.contains("2.00x"), "{md}");
    // Wall, host and GPU time per step side by side (GPU ms from events around each step's launch).
    assert!(md.contains("| 2.000 | 0.300 | 1.700 |"), "{md}");
    assert!(md.contains("skipped: needs 90 GiB"), "{md}");
    assert!(dir.join("bench-tps-b1.png").exists());
    // A peer file that is not llama-batched-bench output.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"x\": 1}\n").unwrap();
    let arg = format!("llama.cpp f16={}", bad.to_str().unwrap());
    let e = fails(&["bench", "decode", "--replot", "--json", j, "--peer", &arg]);
    assert!(e.contains("bad.jsonl"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The JSON header of a safetensors file's bytes (8-byte little-endian length, then the header) and
/// where its data starts (tensors' `data_offsets` count from there).
fn safetensors_header(b: &[u8]) -> (serde_json::Value, usize) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&b[8..8 + n]).unwrap(), 8 + n)
}

/// `calibrate --method klt --weight scores` (key distances drawn from each query's own attention)
/// writes a file that says so and whose key transforms differ from the uniform draw's, values equal;
/// `eval ppl` reads it.
#[test]
fn klt_calibration_with_score_distances_runs_end_to_end() {
    let dir = temp_dir("cli-klt").unwrap();
    write_random_llama(&dir, &TinySpec::default()).unwrap();
    let m = dir.to_str().unwrap();
    let text = dir.join("text.txt");
    write_word_text(&text, 600, 11, 5, 96).unwrap();
    let t = text.to_str().unwrap();
    let mut files = Vec::new();
    for weight in ["attention", "scores"] {
        let out = dir.join(format!("klt-{weight}.safetensors"));
        let o = kvq(&[
            "calibrate",
            "--method",
            "klt",
            "--weight",
            weight,
            "--model",
            m,
            "--text",
            t,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let b = std::fs::read(&out).unwrap();
        assert_eq!(safetensors_header(&b).0["__metadata__"]["weight"], weight);
        files.push(b);
    }
    // Each file's own header locates a tensor's bytes (the headers differ in length with the metadata).
    let tensor = |f: usize, name: &str| -> &[u8] {
        let (hdr, data) = safetensors_header(&files[f]);
        let o = &hdr[name]["data_offsets"];
        &files[f][data + o[0].as_u64().unwrap() as usize..data + o[1].as_u64().unwrap() as usize]
    };
    assert_ne!(tensor(0, "layer.0.k.fwd"), tensor(1, "layer.0.k.fwd"));
    assert_eq!(tensor(0, "layer.0.v.fwd"), tensor(1, "layer.0.v.fwd"));
    // The components' quantiles (for `code=ec`) are written with the transforms.
    assert_eq!(
        tensor(1, "layer.0.k.quant").len(),
        tensor(1, "layer.0.k.mean").len() * (kvq_formats::transform::QUANT + 1)
    );
    // Bad options are refused by name: an unknown weight, no draws, scores for post-RoPE keys.
    for (opts, says) in [
        (&["--weight", "softmax"][..], "--weight softmax"),
        (&["--weight", "scores", "--draws", "0"][..], "--draws 0"),
        (
            &["--weight", "scores", "--key-rope", "post"][..],
            "--key-rope pre",
        ),
    ] {
        let mut args = vec!["calibrate", "--method", "klt", "--model", m, "--text", t];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["--out", "x.st"]);
        let e = fails(&args);
        assert!(e.contains(says), "{opts:?}: {e}");
    }
    let f = dir.join("klt-scores.safetensors");
    let kv = format!("k=klt:bits=2,sink=4,file={};v=fp16", f.to_str().unwrap());
    let o = kvq(&[
        "eval", "ppl", "--model", m, "--text", t, "--ctx", "64", "--chunk", "16", "--kv", &kv,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
