//! `kvq bench decode`: end-to-end decode throughput of the GPU engine across KV plans, contexts and
//! batch sizes, with llama.cpp's `llama-batched-bench` results of the same run merged in, written as
//! one JSON and drawn as PNGs (tokens/s vs context per batch size, KV memory vs context).
//!
//! Each point fills B sequences to the context with synthetic K/V (`Engine::fill_synthetic`: the
//! decode kernels' work does not depend on the values) and times full decode steps of the model:
//! embedding, every layer's GEMMs, the compressed cache's append and fused attention, logits and the
//! greedy pick, one host sync per step (the picked tokens). With `--prefill` the context is instead
//! prefilled from seeded random tokens through the whole model (timed as prefill tokens/s).

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvq_formats::KvPlan;
use kvq_model::Model;
use plotters::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// What `kvq bench decode` runs.
pub struct DecodeOpts {
    /// KV plans (fp16 first if absent and `baseline`).
    pub plans: Vec<String>,
    /// Contexts (tokens per sequence before the timed steps).
    pub ctx: Vec<usize>,
    /// Batch sizes.
    pub batch: Vec<usize>,
    /// Timed steps per point, after `warmup` untimed ones.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Tokens per synthetic append.
    pub chunk: usize,
    /// JSON output; the PNGs go beside it.
    pub json: String,
    /// llama-batched-bench JSONL files, each `LABEL=PATH` (label e.g. `llama.cpp f16`).
    pub peers: Vec<String>,
    /// Model name for titles.
    pub model_name: String,
    /// Decode steps replayed as CUDA graphs (else every kernel issued on its own).
    pub graphs: bool,
    /// Timed steps chained on the device (`--chained`, Engine::decode_greedy: the host issues a step
    /// while the GPU runs the one before) instead of one synchronous step at a time.
    pub chained: bool,
    /// Fill the context by prefilling seeded random tokens through the model (timed) instead of
    /// appending synthetic K/V: the whole prompt path, chunk by chunk.
    pub prefill: bool,
    /// Add the fp16 plan when absent (the reference every ratio divides by).
    pub baseline: bool,
}

impl DecodeOpts {
    /// The warm-up before the timed steps, as (runs, steps each): one run of `warmup` steps, or when
    /// chained three chained runs of a third as many, at least 3 each (each run's first step is fed
    /// from the host, a step list of its own; run 22 timed one graph capture per chained run after
    /// two warm-up runs, so the third makes sure every list the timed run starts with was captured).
    fn warmup_runs(&self) -> (usize, usize) {
        if self.chained {
            (3, (self.warmup / 3).max(3))
        } else {
            (1, self.warmup)
        }
    }

    /// Steps each sequence takes before the timed ones.
    fn untimed_steps(&self) -> usize {
        let (runs, steps) = self.warmup_runs();
        runs * steps
    }
}

/// One measured (or skipped) point.
fn point(plan: &str, ctx: usize, batch: usize, status: &str, extra: Value) -> Value {
    let mut p =
        json!({"runtime": "kvq", "plan": plan, "ctx": ctx, "batch": batch, "status": status});
    if let (Some(o), Value::Object(e)) = (p.as_object_mut(), extra) {
        o.extend(e);
    }
    p
}

/// Bytes per token of a plan's packed cache, all layers (K and V), for the fit check.
fn packed_bytes_per_token(plan: &KvPlan, model: &Model) -> Result<f64> {
    let caches = plan.build_caches(model.config.n_kv_heads, &model.rope)?;
    Ok(caches
        .iter()
        .map(|c| {
            let (k, v) = (c.keys().codec(), c.values().codec());
            (k.block_bytes() as f64 / k.block_tokens() as f64
                + v.block_bytes() as f64 / v.block_tokens() as f64)
                * model.config.n_kv_heads as f64
        })
        .sum())
}

/// Runs the benchmark (see the module docs) and writes JSON + PNGs.
pub fn decode(gpu: kvq::Gpu, model: &Model, o: &DecodeOpts) -> Result<()> {
    let gpu = Arc::new(gpu);
    let c = &model.config;
    eprintln!("kvq bench decode: {}", gpu.describe());
    let bw = kvq::check::copy_bandwidth(&gpu)?;
    eprintln!("device copy bandwidth: {:.0} GB/s (read + write)", bw / 1e9);
    let max_ctx = o.ctx.iter().copied().max().unwrap_or(4096);
    let first_plan = KvPlan::parse("fp16", c.n_layers)?;
    let limits0 = kvq::engine::ResidentLimits {
        slots: 1,
        max_tokens: 64,
        max_chunk: 16,
    };
    let mut engine = kvq::Engine::from_model_resident(gpu.clone(), model, first_plan, limits0)
        .context("starting the GPU engine")?;
    engine.extend_context(max_ctx + o.untimed_steps() + o.steps + 1);
    engine.set_graphs(o.graphs)?;
    let weight_bytes = engine.weight_bytes();
    eprintln!("{}", engine.describe());
    let mut plans = o.plans.clone();
    if o.baseline && !plans.iter().any(|p| p == "fp16") {
        plans.insert(0, "fp16".into());
    }
    let total = plans.len() * o.ctx.len() * o.batch.len();
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut points = Vec::new();
    let mut fits = Vec::new();
    // What fits next to the weights: the free memory with no cache held (measured once, after a
    // synchronize so that asynchronously freed buffers have gone back), over each plan's packed
    // bytes per token; 8% is left for rings, workspaces and activations.
    let free_once = free_after_sync(&gpu)?;
    let usable = free_once as f64 * 0.92;
    for spec in &plans {
        let plan = KvPlan::parse(spec, c.n_layers).with_context(|| format!("--kv {spec}"))?;
        let bpt = packed_bytes_per_token(&plan, model)?;
        let desc = plan.describe();
        fits.push(json!({
            "plan": desc, "packed_bytes_per_token": bpt,
            "max_ctx_b1": (usable / bpt) as u64, "max_ctx_b8": (usable / bpt / 8.0) as u64,
            "max_batch_32k": (usable / bpt / 32768.0) as u64,
        }));
        for &t in &o.ctx {
            for &b in &o.batch {
                pb.set_message(format!("{desc} T={t} B={b}"));
                let cap = t + o.untimed_steps() + o.steps + 1;
                let need = bpt * (b * cap) as f64;
                // Free the previous point's caches before asking what is free.
                engine.set_resident(plan.clone(), &model.rope, limits0)?;
                let free = free_after_sync(&gpu)?;
                // Leave room for the rings, workspaces and activations.
                let budget = free as f64 * 0.92 - 512e6;
                if need > budget {
                    points.push(point(&desc, t, b, "skipped", json!({
                        "note": format!("needs {:.1} GiB of KV, {:.1} GiB free", need / 1073741824.0, free as f64 / 1073741824.0)
                    })));
                    pb.inc(1);
                    continue;
                }
                let r = measure(&mut engine, model, &plan, t, b, o);
                match r {
                    Ok(Measured {
                        ms,
                        host_ms,
                        gpu_ms,
                        gpu_ms_each,
                        kv,
                        graphs,
                        fill,
                    }) => {
                        let kv_bytes = (kv.packed + kv.window) as f64 * b as f64;
                        let step_bytes = weight_bytes as f64 + kv_bytes;
                        let tok_s = b as f64 * 1e3 / ms;
                        let frac = step_bytes / (ms / 1e3) / bw;
                        let line = format!(
                            "{desc:<48} T={t:>6} B={b:>2}: {ms:8.3} ms/step ({host_ms:.3} issuing, {} on the GPU, {} graph nodes) {tok_s:9.1} tok/s  KV {:.2} GiB  {:.2} bits/elem  {:.0}% of copy BW",
                            gpu_ms.map_or("-".to_string(), |g| format!("{g:.3}")),
                            graphs["nodes_per_step"],
                            kv_bytes / 1073741824.0,
                            kv.bits_per_elem(),
                            frac * 100.0
                        );
                        let line = match fill["prefill_s"].as_f64() {
                            Some(p) => format!(
                                "{line}  (prefill {p:.1} s, {:.0} tok/s)",
                                fill["prefill_tok_s"].as_f64().unwrap_or(0.0)
                            ),
                            None => line,
                        };
                        pb.suspend(|| eprintln!("{line}"));
                        let mut extra = json!({
                            "ms_per_step": ms, "host_ms_per_step": host_ms, "gpu_ms_per_step": gpu_ms, "gpu_ms_each_step": gpu_ms_each, "graphs": graphs, "tok_s": tok_s, "kv_gib": kv_bytes / 1073741824.0,
                            "bits_per_elem": kv.bits_per_elem(), "kv_bytes_read": kv_bytes,
                            "weight_bytes": weight_bytes, "bw_fraction": frac,
                        });
                        if let (Some(e), Value::Object(f)) = (extra.as_object_mut(), fill) {
                            e.extend(f);
                        }
                        points.push(point(&desc, t, b, "ok", extra));
                    }
                    Err(e) => {
                        pb.suspend(|| eprintln!("{desc} T={t} B={b}: {e:#}"));
                        points.push(point(
                            &desc,
                            t,
                            b,
                            "error",
                            json!({"note": format!("{e:#}")}),
                        ));
                    }
                }
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    let mut peers = Vec::new();
    for p in &o.peers {
        peers.extend(read_peer(p)?);
    }
    add_ratios(&mut points, &peers);
    let doc = json!({
        "model": o.model_name, "gpu": gpu.describe(), "copy_bandwidth_bytes_s": bw,
        "weight_bytes": weight_bytes, "steps": o.steps, "warmup": o.warmup,
        "fill": if o.prefill {
            "prefill of seeded random tokens through the model (prefill_s per point); timed steps are full model decode steps"
        } else {
            "synthetic K/V (seeded normal) appended through the GPU encoders; timed steps are full model decode steps"
        },
        "points": points, "peers": peers, "fits": fits, "free_bytes_without_cache": free_once,
    });
    std::fs::write(&o.json, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("--json {}", o.json))?;
    eprintln!("wrote {}", o.json);
    eprintln!("wrote {}", write_markdown(&doc, &o.json)?);
    for path in plot_all(&doc, &o.json, &o.model_name, &o.batch)? {
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// Free device memory once the stream's queued frees have completed.
fn free_after_sync(gpu: &kvq::Gpu) -> Result<usize> {
    gpu.stream()
        .synchronize()
        .context("waiting for the GPU before measuring free memory")?;
    Ok(gpu.mem_info()?.0)
}

/// Merges llama-batched-bench files into an existing results JSON (`--replot`): recomputes the ratios
/// and redraws the PNGs, running nothing on the GPU.
pub fn replot(json_path: &str, peers: &[String], batches: &[usize]) -> Result<()> {
    let text = std::fs::read_to_string(json_path).with_context(|| format!("--json {json_path}"))?;
    let mut doc: Value =
        serde_json::from_str(&text).with_context(|| format!("--json {json_path}: not JSON"))?;
    let mut all = doc["peers"].as_array().cloned().unwrap_or_default();
    for p in peers {
        let new = read_peer(p)?;
        // A label given again replaces its earlier points.
        if let Some(label) = new
            .first()
            .and_then(|v| v["runtime"].as_str())
            .map(String::from)
        {
            all.retain(|v| v["runtime"].as_str() != Some(label.as_str()));
        }
        all.extend(new);
    }
    let Some(points) = doc["points"].as_array_mut() else {
        bail!("--json {json_path}: no `points` (not a bench decode result)");
    };
    add_ratios(points, &all);
    doc["peers"] = Value::Array(all);
    std::fs::write(json_path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("--json {json_path}"))?;
    let model = doc["model"].as_str().unwrap_or("model").to_string();
    eprintln!("wrote {}", write_markdown(&doc, json_path)?);
    for path in plot_all(&doc, json_path, &model, batches)? {
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// One point's timings and what it held.
struct Measured {
    /// Wall milliseconds per decode step (one host sync per step for the picked tokens).
    ms: f64,
    /// Host milliseconds per step spent recording and issuing it.
    host_ms: f64,
    /// GPU milliseconds per step between events around its launch: `ms - gpu_ms` is the time the GPU
    /// waited for the host.
    gpu_ms: Option<f64>,
    /// Each timed step's GPU milliseconds, in order (a block seal's step stands out).
    gpu_ms_each: Vec<f64>,
    /// One sequence's cache bytes.
    kv: kvq_formats::CacheBytes,
    /// How the timed steps ran (graphs replayed, captured, direct).
    graphs: Value,
    /// Prefill timings (with `--prefill`).
    fill: Value,
}

/// Fills `b` sequences to `t` tokens under `plan` and times decode steps of all of them.
fn measure(
    engine: &mut kvq::Engine,
    model: &Model,
    plan: &KvPlan,
    t: usize,
    b: usize,
    o: &DecodeOpts,
) -> Result<Measured> {
    let cap = t + o.untimed_steps() + o.steps + 1;
    let limits = kvq::engine::ResidentLimits {
        slots: b,
        max_tokens: cap,
        max_chunk: o.chunk,
    };
    engine.set_resident(plan.clone(), &model.rope, limits)?;
    let mut seqs = Vec::with_capacity(b);
    let t_fill = Instant::now();
    for i in 0..b {
        let s = engine.new_sequence(cap)?;
        if o.prefill {
            engine.prefill(s, &random_tokens(t, model.config.vocab, i as u64), o.chunk)?;
        } else {
            engine.fill_synthetic(s, t, o.chunk, i as u64)?;
        }
        seqs.push(s);
    }
    let fill_s = t_fill.elapsed().as_secs_f64();
    let mut batch: Vec<(kvq::engine::SeqId, u32)> = seqs.iter().map(|&s| (s, 1)).collect();
    let (runs, steps) = o.warmup_runs();
    for _ in 0..runs {
        greedy_steps(engine, &mut batch, steps, o.chained)?;
    }
    engine.take_enqueue_time();
    engine.set_step_timing(true);
    let (before, _) = engine.graph_stats();
    let t0 = Instant::now();
    greedy_steps(engine, &mut batch, o.steps, o.chained)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3 / o.steps.max(1) as f64;
    let host_ms = engine.take_enqueue_time().as_secs_f64() * 1e3 / o.steps.max(1) as f64;
    let gpu_ms_each = engine.take_step_gpu_ms()?;
    let gpu_ms = gpu_ms_each
        .as_ref()
        .map(|e| e.iter().sum::<f64>() / o.steps.max(1) as f64);
    let gpu_ms_each = gpu_ms_each.unwrap_or_default();
    engine.set_step_timing(false);
    let (after, failure) = engine.graph_stats();
    // How the timed steps ran: replayed from a CUDA graph, captured, or issued kernel by kernel.
    let graphs = json!({
        "on": engine.graphs_enabled(),
        "replayed": after.replayed - before.replayed,
        "captured": after.captured - before.captured,
        "direct": after.direct - before.direct,
        "nodes_per_step": after.nodes,
        "chained": o.chained,
        "capture_failure": failure,
    });
    let kv = engine.kv_bytes(seqs[0])?;
    for s in seqs {
        engine.free(s);
    }
    let fill = if o.prefill {
        json!({"prefill_s": fill_s, "prefill_tok_s": (b * t) as f64 / fill_s})
    } else {
        json!({})
    };
    Ok(Measured {
        ms,
        host_ms,
        gpu_ms,
        gpu_ms_each,
        kv,
        graphs,
        fill,
    })
}

/// `steps` greedy decode steps of `batch`, chained on the device or one at a time; each sequence's
/// token becomes its last pick.
fn greedy_steps(
    engine: &mut kvq::Engine,
    batch: &mut [(kvq::engine::SeqId, u32)],
    steps: usize,
    chained: bool,
) -> Result<()> {
    let set = |batch: &mut [(kvq::engine::SeqId, u32)], picks: Vec<u32>| {
        for (x, n) in batch.iter_mut().zip(picks) {
            x.1 = n;
        }
    };
    if chained {
        if let Some(last) = engine.decode_greedy(batch, steps)?.pop() {
            set(batch, last);
        }
    } else {
        for _ in 0..steps {
            let next = engine.step_greedy(batch)?;
            set(batch, next);
        }
    }
    Ok(())
}

/// `n` token ids in `[0, vocab)` from a seeded generator: a prompt whose content does not matter
/// (random weights) but whose every position runs the model.
fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Reads `LABEL=PATH`, a llama-batched-bench `--output-format jsonl` file: one point per line.
fn read_peer(arg: &str) -> Result<Vec<Value>> {
    let (label, path) = arg.split_once('=').with_context(|| {
        format!("--peer {arg}: expected LABEL=PATH (e.g. 'llama.cpp f16=out/f16.jsonl')")
    })?;
    let text = std::fs::read_to_string(path).with_context(|| format!("--peer {path}"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("--peer {path}: line {} is not JSON", i + 1))?;
        let get = |k: &str| v.get(k).and_then(Value::as_f64);
        let (Some(pp), Some(pl), Some(tg)) = (get("pp"), get("pl"), get("speed_tg")) else {
            bail!("--peer {path}: line {} lacks pp / pl / speed_tg (llama-batched-bench --output-format jsonl)", i + 1);
        };
        out.push(
            json!({"runtime": label, "ctx": pp as usize, "batch": pl as usize, "tok_s": tg,
                        "ms_per_step": pl * 1e3 / tg, "status": "ok"}),
        );
    }
    if out.is_empty() {
        bail!("--peer {path}: no llama-batched-bench JSONL lines");
    }
    Ok(out)
}

/// Adds `vs_<peer>` speed ratios to every kvq point that a peer measured at the same (ctx, batch).
fn add_ratios(points: &mut [Value], peers: &[Value]) {
    for p in points.iter_mut() {
        let (Some(t), Some(b), Some(tps)) =
            (p["ctx"].as_u64(), p["batch"].as_u64(), p["tok_s"].as_f64())
        else {
            continue;
        };
        let mut ratios = serde_json::Map::new();
        for q in peers {
            if q["ctx"].as_u64() == Some(t) && q["batch"].as_u64() == Some(b) {
                if let (Some(name), Some(qt)) = (q["runtime"].as_str(), q["tok_s"].as_f64()) {
                    ratios.insert(name.to_string(), json!(tps / qt));
                }
            }
        }
        p["vs_peer"] = Value::Object(ratios);
    }
}

/// Writes `<stem>.md` beside the JSON: one row per point (kvq plans and peers) with tokens/s, the
/// fraction of the bandwidth limit and the ratios to each peer, then what each plan fits; returns its path.
fn write_markdown(doc: &Value, json_path: &str) -> Result<String> {
    use std::fmt::Write as _;
    let stem = json_path.strip_suffix(".json").unwrap_or(json_path);
    let path = format!("{stem}.md");
    let empty = Vec::new();
    let points = doc["points"].as_array().unwrap_or(&empty);
    let peers = doc["peers"].as_array().unwrap_or(&empty);
    let mut labels: Vec<&str> = peers.iter().filter_map(|p| p["runtime"].as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    let mut md = String::new();
    let bw = doc["copy_bandwidth_bytes_s"].as_f64().unwrap_or(0.0);
    let _ = writeln!(
        md,
        "{} on {}: device copy bandwidth {:.0} GB/s; weights {:.2} GB; {} timed steps after {} warm-up per point.\n",
        doc["model"].as_str().unwrap_or("?"),
        doc["gpu"].as_str().unwrap_or("?"),
        bw / 1e9,
        doc["weight_bytes"].as_f64().unwrap_or(0.0) / 1e9,
        doc["steps"],
        doc["warmup"],
    );
    let mut head = String::from("| runtime / KV plan | B | context | bits/elem | KV GiB | ms/step | host ms | GPU ms | tok/s | % of BW limit |");
    let mut rule = String::from("|---|---|---|---|---|---|---|---|---|---|");
    for l in &labels {
        let _ = write!(head, " vs {l} |");
        rule.push_str("---|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    let mut rows: Vec<&Value> = points.iter().chain(peers.iter()).collect();
    let key = |p: &Value| {
        (
            p["batch"].as_u64().unwrap_or(0),
            p["ctx"].as_u64().unwrap_or(0),
            p["runtime"] != "kvq",
        )
    };
    rows.sort_by_key(|p| key(p));
    let num =
        |v: &Value, f: &dyn Fn(f64) -> String| v.as_f64().map(f).unwrap_or_else(|| "-".into());
    for p in rows {
        let name = match p["runtime"].as_str() {
            Some("kvq") => format!("kvq `{}`", p["plan"].as_str().unwrap_or("?")),
            Some(r) => r.to_string(),
            None => "?".into(),
        };
        let status = p["status"].as_str().unwrap_or("?");
        let tok = if status == "ok" {
            num(&p["tok_s"], &|x| format!("{x:.1}"))
        } else {
            format!("{status}: {}", p["note"].as_str().unwrap_or(""))
        };
        let _ = write!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {tok} | {} |",
            p["batch"],
            p["ctx"],
            num(&p["bits_per_elem"], &|x| format!("{x:.2}")),
            num(&p["kv_gib"], &|x| format!("{x:.2}")),
            num(&p["ms_per_step"], &|x| format!("{x:.3}")),
            num(&p["host_ms_per_step"], &|x| format!("{x:.3}")),
            num(&p["gpu_ms_per_step"], &|x| format!("{x:.3}")),
            num(&p["bw_fraction"], &|x| format!("{:.0}%", x * 100.0)),
        );
        for l in &labels {
            let _ = write!(md, " {} |", num(&p["vs_peer"][*l], &|x| format!("{x:.2}x")));
        }
        md.push('\n');
    }
    if let Some(fits) = doc["fits"].as_array().filter(|f| !f.is_empty()) {
        let fp16 = fits
            .iter()
            .find(|f| f["plan"] == "fp16")
            .and_then(|f| f["max_ctx_b1"].as_f64());
        md.push_str("\n| KV plan | packed bytes/token | longest context, B=1 | x fp16 | longest context, B=8 | largest batch at 32k |\n|---|---|---|---|---|---|\n");
        for f in fits {
            let x = match (f["max_ctx_b1"].as_f64(), fp16) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let _ = writeln!(
                md,
                "| `{}` | {} | {} | {x} | {} | {} |",
                f["plan"].as_str().unwrap_or("?"),
                num(&f["packed_bytes_per_token"], &|x| format!("{x:.0}")),
                f["max_ctx_b1"],
                f["max_ctx_b8"],
                f["max_batch_32k"],
            );
        }
    }
    std::fs::write(&path, md).with_context(|| format!("writing {path}"))?;
    Ok(path)
}

/// Draws tokens/s vs context (one PNG per batch size, kvq plans and peers) and KV GiB vs context
/// (B=1 points); returns the paths written.
fn plot_all(doc: &Value, json_path: &str, model: &str, batches: &[usize]) -> Result<Vec<String>> {
    let stem = json_path.strip_suffix(".json").unwrap_or(json_path);
    let mut all: Vec<&Value> = doc["points"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    all.extend(doc["peers"].as_array().into_iter().flatten());
    let series_name = |p: &Value| -> String {
        match p["runtime"].as_str() {
            Some("kvq") => format!(
                "kvq {}",
                kvq_model::sweep::short_label(p["plan"].as_str().unwrap_or("?"))
            ),
            Some(r) => r.to_string(),
            None => "?".into(),
        }
    };
    let mut written = Vec::new();
    for &b in batches {
        let pts: Vec<(String, f64, f64)> = all
            .iter()
            .filter(|p| p["status"] == "ok" && p["batch"].as_u64() == Some(b as u64))
            .filter_map(|p| Some((series_name(p), p["ctx"].as_f64()?, p["tok_s"].as_f64()?)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path = format!("{stem}-tps-b{b}.png");
        line_plot(
            &path,
            &format!("{model}: decode tokens/s, batch {b}"),
            "context (tokens, log2)",
            "generated tokens/s (all sequences)",
            &pts,
        )?;
        written.push(path);
    }
    let mem: Vec<(String, f64, f64)> = all
        .iter()
        .filter(|p| p["runtime"] == "kvq" && p["status"] == "ok" && p["batch"].as_u64() == Some(1))
        .filter_map(|p| Some((series_name(p), p["ctx"].as_f64()?, p["kv_gib"].as_f64()?)))
        .collect();
    if !mem.is_empty() {
        let path = format!("{stem}-mem.png");
        line_plot(
            &path,
            &format!("{model}: KV cache memory per sequence"),
            "context (tokens, log2)",
            "KV GiB (packed + f16 window)",
            &mem,
        )?;
        written.push(path);
    }
    Ok(written)
}

/// One log2-x line chart of named series of (x, y) points.
fn line_plot(
    path: &str,
    title: &str,
    xd: &str,
    yd: &str,
    pts: &[(String, f64, f64)],
) -> Result<()> {
    let mut names: Vec<&str> = pts.iter().map(|p| p.0.as_str()).collect();
    names.dedup();
    let mut uniq = Vec::new();
    for n in names {
        if !uniq.contains(&n) {
            uniq.push(n);
        }
    }
    let lx = |x: f64| x.log2();
    let x0 = pts.iter().map(|p| lx(p.1)).fold(f64::INFINITY, f64::min) - 0.3;
    let x1 = pts
        .iter()
        .map(|p| lx(p.1))
        .fold(f64::NEG_INFINITY, f64::max)
        + 0.3;
    let y1 = pts.iter().map(|p| p.2).fold(0.0, f64::max) * 1.1;
    let text = crate::plot::font_ok();
    let root = BitMapBackend::new(path, (1100, 700)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("{e}");
    root.fill(&WHITE).map_err(e)?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if text {
        b.caption(title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut chart = b.build_cartesian_2d(x0..x1, 0f64..y1.max(1.0)).map_err(e)?;
    if text {
        chart
            .configure_mesh()
            .x_desc(xd)
            .y_desc(yd)
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|x| format!("{}k", (2f64.powf(*x) / 1024.0).round()))
            .draw()
            .map_err(e)?;
    } else {
        chart.configure_mesh().draw().map_err(e)?;
    }
    for (i, name) in uniq.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut s: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.0 == *name)
            .map(|p| (lx(p.1), p.2))
            .collect();
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let dashed = !name.starts_with("kvq");
        let style = ShapeStyle::from(&color).stroke_width(if dashed { 1 } else { 2 });
        let series = chart
            .draw_series(LineSeries::new(s.clone(), style))
            .map_err(e)?;
        if text {
            series
                .label(name.to_string())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
        chart
            .draw_series(
                s.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(e)?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
    }
    root.present()
        .map_err(e)
        .with_context(|| format!("writing the plot {path}"))?;
    Ok(())
}
