//! `kvq eval sweep` and `kvq tune` end to end on a small random model: the sweep's JSON, table and
//! plot, resuming, merging a peer's column; the tuned plan file accepted by `eval ppl`.
use kvq_model::testutil::{temp_dir, write_random_llama, write_word_text, TinySpec};
use std::process::{Command, Output};

fn kvq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvq"))
        .args(args)
        .env("KVQ_MODELS", "/nonexistent-kvq-models")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = kvq(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn read_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn sweep_writes_json_table_plot_and_resumes() {
    let dir = temp_dir("cli-sweep").unwrap();
    write_random_llama(&dir, &TinySpec::default()).unwrap();
    let m = dir.to_str().unwrap();
    let text = dir.join("text.txt");
    write_word_text(&text, 400, 7, 3, 96).unwrap();
    let t = text.to_str().unwrap();
    let plans = dir.join("plans.txt");
    std::fs::write(
        &plans,
        "# a comment\nkivi:bits=4,group=16,window=0\n\nkivi:bits=2,group=16,window=0\n",
    )
    .unwrap();
    let json = dir.join("s.json");
    let j = json.to_str().unwrap();
    let base = [
        "eval",
        "sweep",
        "--model",
        m,
        "--text",
        t,
        "--ctx",
        "64",
        "--chunk",
        "16",
        "--max-windows",
        "3",
        "--seed",
        "7",
        "--json",
        j,
    ];
    let mut args = base.to_vec();
    args.extend(["--plans", plans.to_str().unwrap()]);
    let md = ok(&args);
    let doc = read_json(&json);
    let r = doc["results"].as_array().unwrap();
    // fp16 is added first as the reference, then the file's plans in order.
    let kvs: Vec<&str> = r.iter().map(|x| x["kv"].as_str().unwrap()).collect();
    assert_eq!(
        kvs,
        [
            "fp16",
            "kivi:bits=4,group=16,window=0",
            "kivi:bits=2,group=16,window=0"
        ]
    );
    // Three seeded windows out of (400 - 64) / 32 + 1 = 11, ascending, 32 scored each.
    let starts: Vec<u64> = doc["window_starts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(starts.len(), 3);
    assert!(starts.windows(2).all(|w| w[0] < w[1]) && starts.iter().all(|s| s % 32 == 0));
    assert_eq!(r[0]["scored"], 3 * 32);
    // bits/elem: 64 tokens (head_dim 16), 4-bit KIVI with groups of 16 and f16 scale and zero per
    // group: 4 + 32/16 = 6 bits per element, nothing left in f16.
    assert!((r[1]["bits_per_elem"].as_f64().unwrap() - 6.0).abs() < 1e-9);
    assert_eq!(r[0]["bits_per_elem"], 16.0);
    assert!(md.contains("| kvq | `fp16` | 16.000 | 16.000 |"), "{md}");
    assert!(md.contains("ratio <= 1.01 at <= 4.5 bits/elem"), "{md}");
    let png = std::fs::read(dir.join("s.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(std::fs::read_to_string(dir.join("s.md")).unwrap() == md);

    // Resume: the measured plans are kept as they are, only the new one runs.
    let ppl_before = r[1]["ppl"].clone();
    let mut args = base.to_vec();
    args.extend([
        "--resume",
        "--kv",
        "kivi:bits=4,group=16,window=0",
        "--kv",
        "kivi:bits=8,group=16,window=0",
    ]);
    ok(&args);
    let doc = read_json(&json);
    let r = doc["results"].as_array().unwrap();
    assert_eq!(r.len(), 4);
    assert_eq!(r[1]["ppl"], ppl_before);
    assert_eq!(r[3]["kv"], "kivi:bits=8,group=16,window=0");
    // Resuming with other windows is refused.
    let mut args = base.to_vec();
    let n = args.len();
    args[n - 3] = "8";
    args.extend(["--resume", "--kv", "fp16"]);
    let o = kvq(&args);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));

    // Replot with a peer's column.
    let peer = dir.join("peer.json");
    std::fs::write(
        &peer,
        r#"{"peer":"llama.cpp","ctx":64,"chunks":3,"scored_tokens":96,"results":[
          {"kv":"llama.cpp -ctk f16 -ctv f16","bits_per_elem":16.0,"ppl":50.0,"ratio":1.0},
          {"kv":"llama.cpp -ctk q4_0 -ctv q4_0","bits_per_elem":4.5,"ppl":52.5,"ratio":1.05}]}"#,
    )
    .unwrap();
    let md = ok(&[
        "eval",
        "sweep",
        "--replot",
        "--json",
        j,
        "--peer-json",
        peer.to_str().unwrap(),
    ]);
    assert!(
        md.contains("| llama.cpp | `-ctk q4_0 -ctv q4_0` | 4.500 | 4.500 | 52.5000 | 1.0500 |"),
        "{md}"
    );
    assert_eq!(
        read_json(&json)["peer"]["results"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tune_writes_a_plan_that_eval_accepts() {
    let dir = temp_dir("cli-tune").unwrap();
    write_random_llama(&dir, &TinySpec::default()).unwrap();
    let m = dir.to_str().unwrap();
    let text = dir.join("text.txt");
    write_word_text(&text, 300, 5, 1, 96).unwrap();
    let t = text.to_str().unwrap();
    let plan = dir.join("plan.json");
    let p = plan.to_str().unwrap();
    ok(&[
        "tune",
        "--model",
        m,
        "--text",
        t,
        "--budget",
        "50%",
        "--cand",
        "kivi:bits=2,group=16,window=0",
        "--cand",
        "kivi:bits=4,group=16,window=0",
        "--probe-ctx",
        "64",
        "--probe-windows",
        "1",
        "--ctx",
        "64",
        "--max-windows",
        "2",
        "--chunk",
        "16",
        "--out",
        p,
    ]);
    let rep = read_json(&dir.join("plan.report.json"));
    // 2 layers x (K, V) x 2 candidates probed.
    assert_eq!(rep["probes"].as_array().unwrap().len(), 8);
    let chosen = &rep["rounds"][rep["chosen"].as_u64().unwrap() as usize];
    // A random model barely notices 4-bit KIVI: a 50% budget is met.
    assert_eq!(rep["met"], true, "{rep}");
    assert!(chosen["ratio"].as_f64().unwrap() <= 1.5);
    // The plan file loads in eval and reproduces the verified perplexity (same windows).
    let json = dir.join("e.json");
    ok(&[
        "eval",
        "ppl",
        "--model",
        m,
        "--text",
        t,
        "--ctx",
        "64",
        "--chunk",
        "16",
        "--max-windows",
        "2",
        "--kv",
        p,
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = &read_json(&json)["results"][0];
    assert_eq!(r["ppl"], chosen["ppl"]);
    assert_eq!(r["kv"], chosen["plan"]);
    let _ = std::fs::remove_dir_all(&dir);
}
