//! The `kvq` command line: generation, evaluation, GPU self-test and benchmarks, format inspection,
//! codebook calibration and the default model's download.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kvq_formats::calibrate::{learn_sets, table_name, Codebooks, LearnOpts};
use kvq_formats::formats::rvq::{channel_groups, group_vectors};
use kvq_formats::KvPlan;
use kvq_model::eval::{perplexity, PplOpts};
use kvq_model::sample::Sampler;
use kvq_model::Model;
use std::io::Write;
use std::time::Instant;

mod bench;
mod klt;
mod plot;
mod quality;

#[derive(Parser)]
#[command(
    name = "kvq",
    version,
    about = "LLM inference with a compressed KV cache read compressed by CUDA kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A .gguf file or an HF directory (config.json, *.safetensors, tokenizer.json); default: SmolLM2-135M-Instruct, fetched on first use.
    #[arg(long)]
    model: Option<String>,
    /// Where to run: cpu, cuda or auto (`generate` and `eval ppl`: auto = the GPU engine when a CUDA GPU is usable, else cpu; other commands run on cpu).
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streaming it; prints tokens/s and KV memory.
    Generate {
        /// The prompt.
        prompt: String,
        #[command(flatten)]
        m: ModelArgs,
        /// KV format, plan (`kivi:bits=2;k@0-3=fp16`) or JSON plan file.
        #[arg(long, default_value = "fp16")]
        kv: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Top-k (0 = off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Top-p.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template (ChatML), for instruct models.
        #[arg(long)]
        chat: bool,
        /// System turn for --chat (default: the one the model's template inserts, if any).
        #[arg(long)]
        system: Option<String>,
        /// Tokens per prefill chunk.
        #[arg(long, default_value_t = 256)]
        chunk: usize,
    },
    /// Write a model (e.g. the default GGUF) as an HF directory: config.json, f32 model.safetensors, tokenizer.json.
    Convert {
        #[command(flatten)]
        m: ModelArgs,
        /// Output directory.
        #[arg(long)]
        out: String,
    },
    /// Evaluate quality: `eval ppl --text FILE --kv A --kv B`.
    Eval {
        #[command(subcommand)]
        what: EvalCmd,
    },
    /// GPU benchmarks: `bench attention` (decode attention kernels), `bench decode` (the engine).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Learn RVQ codebooks from the model's keys and values over a text (never the evaluation text).
    Calibrate {
        #[command(flatten)]
        m: ModelArgs,
        /// Calibration text (UTF-8).
        #[arg(long)]
        text: String,
        /// Output safetensors file.
        #[arg(long)]
        out: String,
        /// Tokens of the text to run through the model.
        #[arg(long, default_value_t = 8192)]
        tokens: usize,
        /// Channels per group.
        #[arg(long, default_value_t = 32)]
        group: usize,
        /// Codewords per stage.
        #[arg(long, default_value_t = 2048)]
        codes: usize,
        /// Residual stages.
        #[arg(long, default_value_t = 8)]
        depth: usize,
        /// EMA passes per stage.
        #[arg(long, default_value_t = 4)]
        iters: usize,
        /// Key groups: strided (paper) or contiguous.
        #[arg(long, default_value = "strided")]
        groups: String,
        /// Codebooks: shared (one set per layer stream, every group position) or group (one set per
        /// group position, head_dim / group sets; RVQ's `books=group`).
        #[arg(long, default_value = "shared")]
        books: String,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// What to fit: rvq (codebooks, the options above) or klt (per-head transforms and
        /// quantizers for the `klt` format, the options below).
        #[arg(long, default_value = "rvq")]
        method: String,
        /// klt: widest per-component code with fitted levels (a `klt:bits=` rate may not exceed it).
        #[arg(long, default_value_t = 8)]
        bmax: usize,
        /// klt: keys fitted and stored before RoPE (pre) or after (post).
        #[arg(long, default_value = "pre")]
        key_rope: String,
        /// klt: weigh errors by what reads them (attention: queries for keys, rotated by query-key
        /// distances drawn uniformly, and W_o for values; scores: the same with each query's distance
        /// drawn from its own attention over the window's earlier tokens) or not (none).
        #[arg(long, default_value = "attention")]
        weight: String,
        /// klt: positions at the start of each window left out of the fit (attention sinks; read them
        /// from f16 with `sink=`).
        #[arg(long, default_value_t = 4)]
        skip: usize,
        /// klt, `--weight scores`: query-key distances drawn per query and head (more: less noise in
        /// the keys' weight, same cost of scores).
        #[arg(long, default_value_t = 1)]
        draws: usize,
        /// klt: streams coded with a per-token f16 gain (none, values, keys or both).
        #[arg(long, default_value = "values")]
        gain: String,
    },
    /// Show the formats, their settings and bytes per element for a head size.
    Inspect {
        /// Formats to show (default: every format at its default setting).
        #[arg(long)]
        kv: Vec<String>,
        /// Head dimension.
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        /// Measure each format's error on the model's real K/V over this text (first `--tokens`).
        #[arg(long)]
        text: Option<String>,
        /// Tokens of `--text` to capture.
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        #[command(flatten)]
        m: ModelArgs,
    },
    /// Pick per layer and for K and V the cheapest candidate format whose perplexity stays within
    /// `--budget` over fp16 (probes per layer and stream, greedy, verified); writes a JSON plan file.
    Tune {
        /// Verification text (the sweep's).
        #[arg(long)]
        text: String,
        /// Text for the per-layer probes (default: --text; a calibration text keeps tuning off the test text).
        #[arg(long)]
        probe_text: Option<String>,
        #[command(flatten)]
        m: ModelArgs,
        /// Allowed perplexity increase over fp16: `1%` or `0.01`.
        #[arg(long, default_value = "1%")]
        budget: String,
        /// Candidate formats (repeat; fp16 is always one).
        #[arg(long = "cand", default_values_t = ["kivi:bits=2,group=64,window=0".to_string(), "kivi:bits=4,group=64,window=0".to_string(), "kivi:bits=8,group=64,window=0".to_string()])]
        cand: Vec<String>,
        /// Plan file to write (accepted by --kv of generate and eval).
        #[arg(long, default_value = "out/tuned-plan.json")]
        out: String,
        /// Report JSON (probes, rounds); default: --out with .report.json.
        #[arg(long)]
        report: Option<String>,
        /// Probe window length.
        #[arg(long, default_value_t = 512)]
        probe_ctx: usize,
        /// Probe windows (sampled over the probe text with --seed).
        #[arg(long, default_value_t = 2)]
        probe_windows: usize,
        /// Verification window length.
        #[arg(long, default_value_t = 1024)]
        ctx: usize,
        /// Verification windows (the first ones of --text, as `eval sweep`).
        #[arg(long, default_value_t = 16)]
        max_windows: usize,
        /// Tokens per forward chunk.
        #[arg(long, default_value_t = 128)]
        chunk: usize,
        /// Seed of the probe windows.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Verification rounds at most.
        #[arg(long, default_value_t = 3)]
        max_rounds: usize,
        /// First round's nll target as a fraction of the budget's.
        #[arg(long, default_value_t = 0.8)]
        margin: f64,
    },
    /// Download and verify the default model into models/.
    FetchModel,
    /// Check the GPU kernels against the CPU reference (`--gpu`).
    Selftest {
        /// Run the GPU parity suite.
        #[arg(long)]
        gpu: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Decode attention per format (32/8 heads, d=128; B 1, 8; T 4k..128k), kvq kernels only.
    Attention {
        /// Formats to time (default fp16, kivi 2 and 4 bits).
        #[arg(long)]
        kv: Vec<String>,
    },
    /// End-to-end decode throughput of the GPU engine: KV plans x contexts x batch sizes, JSON + PNGs,
    /// with llama.cpp's llama-batched-bench results of the same run merged (`--peer`).
    Decode {
        #[command(flatten)]
        m: ModelArgs,
        /// KV plans (repeat); fp16 is added first if absent.
        #[arg(long)]
        kv: Vec<String>,
        /// Contexts, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "4096,16384,32768,65536,131072"
        )]
        ctx: Vec<usize>,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batch: Vec<usize>,
        /// Timed decode steps per point.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Untimed steps before them. The default, 130, lets the step shapes a long generation
        /// repeats have their CUDA graphs captured (on their second sight) before timing: with 4-8
        /// warm-up steps every 16-step timed window held one capture (run 22); with 130, 10 of 14
        /// 8B-shape points ran every timed step from a replayed graph (run 23; the others met a
        /// block seal, a shape seen for the first or second time).
        #[arg(long, default_value_t = 130)]
        warmup: usize,
        /// Tokens per synthetic cache append (per prefill chunk with --prefill).
        #[arg(long, default_value_t = 4096)]
        chunk: usize,
        /// Fill each context by prefilling seeded random tokens through the model (timed), not by
        /// appending synthetic K/V.
        #[arg(long)]
        prefill: bool,
        /// JSON results; PNGs are written beside it.
        #[arg(long, default_value = "out/bench-decode.json")]
        json: String,
        /// llama-batched-bench JSONL to merge, as LABEL=PATH (repeat), e.g. 'llama.cpp f16=f16.jsonl'.
        #[arg(long)]
        peer: Vec<String>,
        /// Model name in titles (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// Run nothing: merge --peer into --json's results and redraw the PNGs.
        #[arg(long)]
        replot: bool,
        /// Issue every kernel of a decode step on its own instead of replaying CUDA graphs (to
        /// measure what the graphs buy).
        #[arg(long)]
        no_graphs: bool,
        /// Time steps chained on the device (Engine::decode_greedy: each step's picks feed the next
        /// without the host, as greedy generation runs) instead of one at a time (docs/BENCHMARKS.md,
        /// runs 18-20).
        #[arg(long)]
        chained: bool,
        /// Run only the plans given, without the fp16 baseline the ratios need (a profiler's run of
        /// one plan, whose steps would otherwise follow fp16's).
        #[arg(long)]
        no_baseline: bool,
    },
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Perplexity on a text file, every attention read through the compressed cache.
    Ppl {
        /// Text file (UTF-8).
        #[arg(long)]
        text: String,
        #[command(flatten)]
        m: ModelArgs,
        /// KV formats or plans (several: one table).
        #[arg(long, default_values_t = ["fp16".to_string()])]
        kv: Vec<String>,
        /// Window length in tokens.
        #[arg(long, default_value_t = 1024)]
        ctx: usize,
        /// Tokens between window starts and tokens scored per window (default ctx/2: every scored token
        /// sees at least ctx/2 tokens of context).
        #[arg(long)]
        stride: Option<usize>,
        /// Tokens per forward chunk: each chunk's K/V are encoded into the cache before its attention reads them.
        #[arg(long, default_value_t = 128)]
        chunk: usize,
        /// Windows to score at most (0 = the whole text).
        #[arg(long, default_value_t = 0)]
        max_windows: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<String>,
    },
    /// Quality per bit: many KV plans over one text with the real model; writes JSON (after every
    /// plan), a Markdown table and a PNG plot of perplexity ratio to fp16 vs bits/elem (Pareto front),
    /// optionally with llama.cpp's column (`scripts/peer-ppl.sh` -> `--peer-json`).
    Sweep {
        /// Evaluation text (UTF-8).
        #[arg(long)]
        text: Option<String>,
        #[command(flatten)]
        m: ModelArgs,
        /// KV plans (repeat); fp16 is added first if absent (the reference).
        #[arg(long)]
        kv: Vec<String>,
        /// A file of KV plans, one a line (`#` comments).
        #[arg(long)]
        plans: Option<String>,
        /// Window length in tokens.
        #[arg(long, default_value_t = 1024)]
        ctx: usize,
        /// Tokens between window starts and scored per window (default ctx/2).
        #[arg(long)]
        stride: Option<usize>,
        /// Tokens per forward chunk.
        #[arg(long, default_value_t = 128)]
        chunk: usize,
        /// Windows to score (16 x 512 = 8192 scored tokens by default).
        #[arg(long, default_value_t = 16)]
        max_windows: usize,
        /// Sample the windows over the whole text with this seed (default: the first windows).
        #[arg(long)]
        seed: Option<u64>,
        /// JSON results (written after every plan).
        #[arg(long, default_value = "out/sweep.json")]
        json: String,
        /// Markdown table (default: the JSON's path with .md).
        #[arg(long)]
        md: Option<String>,
        /// PNG plot (default: the JSON's path with .png).
        #[arg(long)]
        png: Option<String>,
        /// llama.cpp results to merge (from scripts/peer-ppl.sh).
        #[arg(long)]
        peer_json: Option<String>,
        /// Keep the plans already measured in --json (same text and windows), run only the others.
        #[arg(long)]
        resume: bool,
        /// Run nothing: redraw the table and plot from --json (merging --peer-json).
        #[arg(long)]
        replot: bool,
        /// Upper end of the plot's ratio axis (points above are drawn on the edge).
        #[arg(long, default_value_t = 2.0)]
        y_max: f64,
        /// Plot title.
        #[arg(long)]
        title: Option<String>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // One line: the chain of causes joined, any newline inside a cause (pip's stderr) flattened.
        let msg = format!("{e:#}");
        let line: Vec<&str> = msg
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        eprintln!("kvq: error: {}", line.join(" "));
        std::process::exit(1);
    }
}

/// `kvq eval ppl` on the GPU engine: the CPU path's windows and scoring (kvq_model::eval), every
/// attention read through the GPU cache (resident when the plan's formats have CUDA encoders).
fn gpu_perplexity(
    gpu: std::sync::Arc<kvq::Gpu>,
    model: &Model,
    plan: &KvPlan,
    tokens: &[u32],
    o: &PplOpts,
    pb: &ProgressBar,
) -> Result<kvq_model::eval::PplResult> {
    let t0 = Instant::now();
    let (n_windows, body) = kvq_model::eval::windows(model, tokens.len(), o)?;
    let limits = kvq::engine::ResidentLimits {
        slots: 1,
        max_tokens: o.ctx,
        max_chunk: o.chunk.max(1),
    };
    let mut engine =
        match kvq::Engine::from_model_resident(gpu.clone(), model, plan.clone(), limits) {
            Ok(e) => e,
            Err(e) => {
                eprintln!(
                    "kvq: {}: host-cache attention backend ({e})",
                    plan.describe()
                );
                kvq::Engine::from_model(gpu, model, plan.clone())
                    .context("starting the GPU engine")?
            }
        };
    let bos: Vec<u32> = model
        .config
        .bos
        .filter(|_| model.tokenizer.add_bos)
        .into_iter()
        .collect();
    pb.set_length(n_windows as u64);
    let (mut nll, mut scored, mut bytes) = (0f64, 0usize, kvq_formats::CacheBytes::default());
    for w in 0..n_windows {
        let mut ids = bos.clone();
        ids.extend_from_slice(&tokens[w * o.stride..w * o.stride + body]);
        let (n, s, b) = engine.window_nll(&ids, ids.len() - o.stride, o.chunk)?;
        nll += n;
        scored += s;
        bytes = b;
        pb.set_position(w as u64 + 1);
    }
    let mean = nll / scored.max(1) as f64;
    if !mean.is_finite() {
        bail!(
            "perplexity under {} is not finite on the GPU",
            plan.describe()
        );
    }
    Ok(kvq_model::eval::PplResult {
        kv: plan.describe(),
        ppl: mean.exp(),
        nll: mean,
        scored,
        windows: n_windows,
        bits_per_elem: bytes.bits_per_elem(),
        // Not tracked per chunk on the GPU path; 0 means "not recorded" (tables print '-').
        bits_per_elem_scored: 0.0,
        kv_bytes: bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Loads the model on the CPU for commands that run there only (everything but `generate`).
fn load_model(m: &ModelArgs) -> Result<Model> {
    if m.device == "cuda" {
        bail!("--device cuda: only `generate` runs on the GPU engine; use --device cpu (or auto)");
    }
    load_cpu(m)
}

/// The GPU for `generate`: None for cpu; for cuda an error naming why no GPU can be used; for auto
/// the GPU when one is usable, else None with a note saying why.
fn pick_gpu(device: &str) -> Result<Option<kvq::Gpu>> {
    match device {
        "cpu" => Ok(None),
        "cuda" => match kvq::Gpu::new(0) {
            Ok(g) => Ok(Some(g)),
            Err(e) => bail!("--device cuda: no CUDA GPU found: {e}; use --device cpu"),
        },
        "auto" => match kvq::Gpu::new(0) {
            Ok(g) => Ok(Some(g)),
            Err(e) => {
                eprintln!("kvq: running on cpu ({e})");
                Ok(None)
            }
        },
        other => bail!("--device {other}: expected cpu, cuda or auto"),
    }
}

/// Loads the model's weights, tokenizer and config on the CPU (the GPU engine uploads from there).
fn load_cpu(m: &ModelArgs) -> Result<Model> {
    if !matches!(m.device.as_str(), "cpu" | "cuda" | "auto") {
        bail!("--device {}: expected cpu, cuda or auto", m.device);
    }
    let path = match &m.model {
        Some(p) => p.clone(),
        None => kvq_model::fetch::default_model(&mut |s| eprintln!("{s}"))?
            .display()
            .to_string(),
    };
    let t0 = Instant::now();
    let model = Model::load(&path).with_context(|| format!("loading --model {path}"))?;
    let c = &model.config;
    eprintln!(
        "kvq: {} ({} layers, {} heads / {} KV heads x {}, vocab {}, context {}) loaded in {:.1}s on cpu",
        path,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.vocab,
        c.max_ctx,
        t0.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// A progress bar with the CLI's style.
fn bar(total: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(total as u64);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}/{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(what.to_string());
    b
}

/// Runs the model over `tokens` of `text`, collects every layer's pre-RoPE K and V (normalized and
/// grouped as RVQ encodes them) and learns one codebook set per layer and stream.
fn calibrate(
    m: &ModelArgs,
    text: &str,
    out: &str,
    tokens: usize,
    o: LearnOpts,
    groups: &str,
    books: &str,
) -> Result<()> {
    let model = load_model(m)?;
    let c = model.config.clone();
    let strided = match groups {
        "strided" => true,
        "contiguous" => false,
        g => bail!("--groups {g}: expected strided or contiguous"),
    };
    let per_group = match books {
        "shared" => false,
        "group" => true,
        b => bail!("--books {b}: expected shared or group"),
    };
    if c.head_dim % o.group != 0 {
        bail!(
            "--group {} does not divide head_dim {}",
            o.group,
            c.head_dim
        );
    }
    let body = std::fs::read_to_string(text).with_context(|| format!("--text {text}"))?;
    let ids = model.tokenizer.encode_prompt(&body)?;
    let ctx = c.max_ctx.min(2048);
    let n = ids.len().min(tokens);
    if n < 64 {
        bail!("--text {text}: only {n} tokens; calibration needs more text");
    }
    let (d, h) = (c.head_dim, c.n_kv_heads);
    let mut keys: Vec<Vec<f32>> = vec![Vec::new(); c.n_layers];
    let mut vals: Vec<Vec<f32>> = vec![Vec::new(); c.n_layers];
    let pb = bar(n, "capturing K/V");
    let last = c.n_layers - 1;
    model.capture(&ids[..n], ctx, &mut |l, _, _q, k, v| {
        keys[l].extend_from_slice(k);
        vals[l].extend_from_slice(v);
        if l == last {
            pb.inc((k.len() / (d * h)) as u64);
        }
    })?;
    pb.finish_and_clear();
    let rope = model.rope.clone();
    let mut tables = std::collections::BTreeMap::new();
    let sets = if per_group { c.head_dim / o.group } else { 1 };
    let pb = bar(2 * c.n_layers * o.depth * sets, "learning codebooks");
    for l in 0..c.n_layers {
        for (key, x) in [(true, &keys[l]), (false, &vals[l])] {
            let stream = if key {
                kvq_formats::Stream::Key
            } else {
                kvq_formats::Stream::Value
            };
            let ctx = kvq_formats::StreamCtx {
                layer: l,
                n_layers: c.n_layers,
                stream,
                head_dim: d,
                n_kv_heads: h,
                rope: rope.clone(),
            };
            let ch = channel_groups(&ctx, o.group, key && strided);
            let mut sc = Vec::new();
            let samples = group_vectors(x, d, &ch, &mut sc);
            let t = learn_sets(&samples, sets, &o, &mut |_, _| pb.inc(1))?;
            tables.insert(table_name(l, key), t);
        }
    }
    pb.finish_and_clear();
    let books = Codebooks {
        group: o.group,
        codes: o.codes,
        depth: o.depth,
        sets,
        key_groups: groups.into(),
        tables,
    };
    books.save(out)?;
    eprintln!("kvq: wrote {out}: {} layers x K/V x {sets} set(s), {} stages x {} codes x {} dims, from {n} tokens of {text}", c.n_layers, o.depth, o.codes, o.group);
    println!(
        "rvq:group={},codes={},depth={},groups={groups},{}codebooks={out}",
        o.group,
        o.codes,
        o.depth,
        if per_group { "books=group," } else { "" }
    );
    Ok(())
}

/// `kvq calibrate --method klt`: fits the `klt` format's file from the model's Q/K/V over `tokens`
/// tokens of `text`.
fn calibrate_klt(
    m: &ModelArgs,
    text: &str,
    out: &str,
    tokens: usize,
    o: &klt::KltOpts,
) -> Result<()> {
    if !(1..=kvq_formats::transform::MAX_BMAX).contains(&o.bmax) {
        bail!(
            "--bmax {}: expected 1..={}",
            o.bmax,
            kvq_formats::transform::MAX_BMAX
        );
    }
    let model = load_model(m)?;
    let body = std::fs::read_to_string(text).with_context(|| format!("--text {text}"))?;
    let ids = model.tokenizer.encode_prompt(&body)?;
    let n = ids.len().min(tokens);
    let t0 = Instant::now();
    let c = &model.config;
    let pb = bar(
        2 * c.n_layers * c.n_kv_heads,
        "capturing Q/K/V, then fitting",
    );
    let books = klt::fit(&model, &ids[..n], o, &mut |done, _| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    books.save(out)?;
    eprintln!(
        "kvq: wrote {out}: {} layers x K/V x {} heads, levels up to {} bits, keys {}-RoPE, weight {}, from {n} tokens of {text} in {:.0}s",
        c.n_layers,
        c.n_kv_heads,
        o.bmax,
        if o.key_pre_rope { "pre" } else { "post" },
        books.weight,
        t0.elapsed().as_secs_f64()
    );
    println!("klt:bits=3,window=0,sink={},file={out}", o.skip);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate {
            prompt,
            m,
            kv,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            chat,
            system,
            chunk,
        } => {
            if !(temperature.is_finite() && temperature >= 0.0) {
                bail!("--temperature {temperature}: expected a number >= 0 (0 = greedy)");
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                bail!("--top-p {top_p}: expected a number in (0, 1]");
            }
            if max_tokens == 0 {
                bail!("--max-tokens 0: nothing to generate");
            }
            let gpu = pick_gpu(&m.device)?;
            let model = load_cpu(&m)?;
            let plan =
                KvPlan::parse(&kv, model.config.n_layers).with_context(|| format!("--kv {kv}"))?;
            let text = if chat {
                model.tokenizer.chat_prompt(&prompt, system.as_deref())?
            } else {
                if system.is_some() {
                    bail!("--system needs --chat");
                }
                prompt
            };
            let ids = model.tokenizer.encode_prompt(&text)?;
            let mut sampler = Sampler::new(temperature, top_k, top_p, seed);
            let mut stdout = std::io::stdout();
            let mut on_text = |t: &str| {
                print!("{t}");
                stdout.flush().ok();
            };
            let (st, dev) = match gpu {
                None => {
                    let (_, st) = kvq_model::generate::generate(
                        &model,
                        &plan,
                        &ids,
                        max_tokens,
                        chunk,
                        &mut sampler,
                        &mut on_text,
                    )?;
                    (st, "cpu")
                }
                Some(gpu) => {
                    let t0 = Instant::now();
                    // The GPU-resident cache when every layer's format has CUDA encoders, else the
                    // host-cache backend (said in the engine's description).
                    let gpu = std::sync::Arc::new(gpu);
                    let limits = kvq::engine::ResidentLimits {
                        slots: 1,
                        max_tokens: ids.len() + max_tokens + 1,
                        max_chunk: chunk.max(1),
                    };
                    let engine = match kvq::Engine::from_model_resident(
                        gpu.clone(),
                        &model,
                        plan.clone(),
                        limits,
                    ) {
                        Ok(e) => e,
                        Err(e) => {
                            eprintln!("kvq: host-cache attention backend ({e})");
                            kvq::Engine::from_model(gpu, &model, plan.clone())
                                .context("starting the GPU engine")?
                        }
                    };
                    let mut engine = engine.with_tokenizer(model.tokenizer);
                    eprintln!(
                        "kvq: GPU engine ready in {:.1}s: {}",
                        t0.elapsed().as_secs_f64(),
                        engine.describe()
                    );
                    let (_, st) =
                        engine.generate(&ids, max_tokens, chunk, &mut sampler, &mut on_text)?;
                    (st, "cuda")
                }
            };
            println!();
            let b = st.kv;
            eprintln!(
                "kvq: {} prompt tokens in {:.2}s; {} generated in {:.2}s = {:.1} tok/s ({dev}, stop: {:?}); KV {}: {} bytes ({} packed + {} full-precision window) for {} tokens, {:.3} bits/elem{}",
                st.prompt_tokens,
                st.prefill_s,
                st.generated,
                st.decode_s,
                st.tokens_per_s(),
                st.stop,
                plan.describe(),
                b.packed + b.window,
                b.packed,
                b.window,
                b.tokens,
                b.bits_per_elem(),
                if b.fixed > 0 { format!(" (+{} fixed bytes)", b.fixed) } else { String::new() }
            );
        }
        Cmd::Convert { m, out } => {
            let model = load_model(&m)?;
            kvq_model::convert::write_hf(&model, std::path::Path::new(&out))
                .with_context(|| format!("--out {out}"))?;
            println!("{out}");
        }
        Cmd::Eval {
            what:
                EvalCmd::Sweep {
                    text,
                    m,
                    kv,
                    plans,
                    ctx,
                    stride,
                    chunk,
                    max_windows,
                    seed,
                    json,
                    md,
                    png,
                    peer_json,
                    resume,
                    replot,
                    y_max,
                    title,
                },
        } => {
            let a = quality::SweepArgs {
                text,
                kv,
                plans,
                opts: PplOpts {
                    ctx,
                    stride: stride.unwrap_or(ctx / 2),
                    chunk,
                    max_windows,
                },
                seed,
                md: md.unwrap_or_else(|| quality::with_ext(&json, "md")),
                png: png.unwrap_or_else(|| quality::with_ext(&json, "png")),
                json,
                peer_json,
                resume,
                replot,
                y_max,
                title,
            };
            quality::sweep(&a, &|| load_model(&m))?;
        }
        Cmd::Tune {
            text,
            probe_text,
            m,
            budget,
            cand,
            out,
            report,
            probe_ctx,
            probe_windows,
            ctx,
            max_windows,
            chunk,
            seed,
            max_rounds,
            margin,
        } => {
            // Check what needs no model first.
            quality::parse_budget(&budget)?;
            let model = load_model(&m)?;
            let a = quality::TuneArgs {
                text,
                probe_text,
                budget,
                candidates: cand,
                report: report.unwrap_or_else(|| quality::with_ext(&out, "report.json")),
                out,
                probe: PplOpts {
                    ctx: probe_ctx,
                    stride: probe_ctx / 2,
                    chunk,
                    max_windows: probe_windows,
                },
                verify: PplOpts {
                    ctx,
                    stride: ctx / 2,
                    chunk,
                    max_windows,
                },
                seed,
                max_rounds,
                margin,
            };
            quality::tune_cmd(&a, &model)?;
        }
        Cmd::Eval {
            what:
                EvalCmd::Ppl {
                    text,
                    m,
                    kv,
                    ctx,
                    stride,
                    chunk,
                    max_windows,
                    json,
                },
        } => {
            let body = std::fs::read_to_string(&text).with_context(|| format!("--text {text}"))?;
            let gpu = pick_gpu(&m.device)?.map(std::sync::Arc::new);
            let model = load_cpu(&m)?;
            let plans = kv
                .iter()
                .map(|k| {
                    KvPlan::parse(k, model.config.n_layers).with_context(|| format!("--kv {k}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let tokens = model.tokenizer.encode(&body)?;
            let o = PplOpts {
                ctx,
                stride: stride.unwrap_or(ctx / 2),
                chunk,
                max_windows,
            };
            let (n_windows, _) = kvq_model::eval::windows(&model, tokens.len(), &o)?;
            eprintln!(
                "kvq: {text}: {} tokens; {n_windows} windows of {ctx} tokens every {} tokens, last {} of each scored, chunks of {chunk}",
                tokens.len(),
                o.stride,
                o.stride
            );
            let mut results = Vec::new();
            for plan in &plans {
                let pb = bar(1, &plan.describe());
                let r = match &gpu {
                    None => perplexity(&model, plan, &tokens, &o, &mut |d, t| {
                        pb.set_length(t as u64);
                        pb.set_position(d as u64);
                    })?,
                    Some(g) => gpu_perplexity(g.clone(), &model, plan, &tokens, &o, &pb)?,
                };
                pb.finish_and_clear();
                eprintln!(
                    "kvq: {:<40} ppl {:.4}  bits/elem {:.3}  ({:.0}s)",
                    r.kv, r.ppl, r.bits_per_elem, r.seconds
                );
                results.push(r);
            }
            let base = results.iter().find(|r| r.kv == "fp16").map(|r| r.ppl);
            println!("| KV plan | bits/elem | ppl | vs fp16 | scored tokens |");
            println!("|---|---|---|---|---|");
            for r in &results {
                let rel = base
                    .map(|b| format!("{:+.2}%", (r.ppl / b - 1.0) * 100.0))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "| `{}` | {:.3} | {:.4} | {} | {} |",
                    r.kv, r.bits_per_elem, r.ppl, rel, r.scored
                );
            }
            if let Some(j) = json {
                let doc = serde_json::json!({
                    "model": model.path, "text": text, "text_tokens": tokens.len(), "opts": o,
                    "add_bos": model.tokenizer.add_bos, "results": results
                });
                std::fs::write(&j, serde_json::to_string_pretty(&doc)?)
                    .with_context(|| format!("--json {j}"))?;
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Decode {
                    m,
                    kv,
                    ctx,
                    batch,
                    steps,
                    warmup,
                    chunk,
                    json,
                    peer,
                    name,
                    replot,
                    no_graphs,
                    chained,
                    prefill,
                    no_baseline,
                },
        } => {
            if replot {
                return bench::replot(&json, &peer, &batch);
            }
            if ctx.is_empty() || batch.is_empty() || ctx.contains(&0) || batch.contains(&0) {
                bail!("--ctx and --batch: expected comma-separated positive numbers");
            }
            if steps == 0 || chunk == 0 {
                bail!("--steps and --chunk: expected positive numbers");
            }
            let gpu = kvq::Gpu::new(0)
                .map_err(|e| anyhow::anyhow!("bench decode needs a CUDA GPU: {e}"))?;
            let model = load_cpu(&m)?;
            let model_name = name.unwrap_or_else(|| {
                m.model
                    .as_deref()
                    .and_then(|p| std::path::Path::new(p).file_name())
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_else(|| "SmolLM2-135M-Instruct".into())
            });
            if let Some(dir) = std::path::Path::new(&json).parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("--json {json}"))?;
            }
            bench::decode(
                gpu,
                &model,
                &bench::DecodeOpts {
                    plans: kv,
                    ctx,
                    batch,
                    steps,
                    warmup,
                    chunk,
                    json,
                    peers: peer,
                    model_name,
                    graphs: !no_graphs,
                    chained,
                    prefill,
                    baseline: !no_baseline,
                },
            )?;
        }
        Cmd::Bench {
            what: BenchCmd::Attention { kv },
        } => {
            let gpu = kvq::Gpu::new(0)?;
            eprintln!("GPU: {}", gpu.describe());
            let formats = if kv.is_empty() {
                vec![
                    "fp16".into(),
                    "kivi:bits=2,window=0".into(),
                    "kivi:bits=4,window=0".into(),
                ]
            } else {
                kv
            };
            println!("| format | B | T | ms | GB/s |");
            println!("|---|---|---|---|---|");
            for b in [1usize, 8] {
                for t in [4096usize, 16384, 65536, 131072] {
                    for f in &formats {
                        let p = kvq::check::bench(&gpu, f, b, t, (32, 8, 128), 50)?;
                        println!(
                            "| {} | {} | {} | {:.4} | {:.0} |",
                            p.format,
                            p.batch,
                            p.context,
                            p.ms,
                            p.bytes as f64 / p.ms / 1e6
                        );
                    }
                }
            }
        }
        Cmd::Calibrate {
            m,
            text,
            out,
            tokens,
            group,
            codes,
            depth,
            iters,
            groups,
            books,
            seed,
            method,
            bmax,
            key_rope,
            weight,
            skip,
            draws,
            gain,
        } => {
            if method == "klt" {
                let weight = match weight.as_str() {
                    "attention" => klt::Weight::Attention,
                    "scores" => klt::Weight::Scores,
                    "none" => klt::Weight::None,
                    w => bail!("--weight {w}: expected attention, scores or none"),
                };
                if weight == klt::Weight::Scores && draws == 0 {
                    bail!("--draws 0: expected at least 1 distance per query");
                }
                if weight == klt::Weight::Scores && key_rope != "pre" {
                    bail!("--weight scores draws query-key distances for pre-RoPE keys: it needs --key-rope pre");
                }
                let o = klt::KltOpts {
                    bmax,
                    key_pre_rope: match key_rope.as_str() {
                        "pre" => true,
                        "post" => false,
                        r => bail!("--key-rope {r}: expected pre or post"),
                    },
                    weight,
                    draws,
                    skip,
                    scaled: match gain.as_str() {
                        "none" => [false, false],
                        "values" => [false, true],
                        "keys" => [true, false],
                        "both" => [true, true],
                        g => bail!("--gain {g}: expected none, values, keys or both"),
                    },
                    seed,
                };
                return calibrate_klt(&m, &text, &out, tokens, &o);
            }
            if method != "rvq" {
                bail!("--method {method}: expected rvq or klt");
            }
            calibrate(
                &m,
                &text,
                &out,
                tokens,
                LearnOpts {
                    group,
                    codes,
                    depth,
                    iters,
                    seed,
                    ..Default::default()
                },
                &groups,
                &books,
            )?;
        }
        Cmd::Inspect {
            kv,
            text: Some(text),
            tokens,
            m,
            ..
        } => {
            let model = load_model(&m)?;
            let body = std::fs::read_to_string(&text).with_context(|| format!("--text {text}"))?;
            let mut ids = model.tokenizer.encode_prompt(&body)?;
            ids.truncate(tokens.min(model.config.max_ctx));
            let plans = if kv.is_empty() {
                vec!["fp16".to_string()]
            } else {
                kv
            };
            let rows = kvq_model::inspect::kv_errors(&model, &ids, &plans)?;
            println!(
                "| KV plan | bits/elem (window counted) | key rel. error | value rel. error |"
            );
            println!("|---|---|---|---|");
            for r in rows {
                println!(
                    "| `{}` | {:.3} | {:.4} | {:.4} |",
                    r.kv, r.bits_per_elem, r.key_err, r.value_err
                );
            }
        }
        Cmd::Inspect { kv, head_dim, .. } => {
            let list = if kv.is_empty() {
                vec![
                    "fp16",
                    "kivi:bits=2",
                    "kivi:bits=4",
                    "asymkv",
                    "qjl",
                    "decoquant:bits=4,chunk=256",
                ]
                .into_iter()
                .map(String::from)
                .collect()
            } else {
                kv
            };
            println!("| format | K block (tokens, bytes) | V block (tokens, bytes) | bits/elem K | bits/elem V | window |");
            println!("|---|---|---|---|---|---|");
            let rope = kvq_formats::Rope::new(head_dim, 10000.0, kvq_formats::RopeStyle::Half);
            for f in &list {
                let plan = KvPlan::parse(f, 1).with_context(|| format!("--kv {f}"))?;
                let c = plan.build_caches(1, &rope)?;
                let (k, v) = (c[0].keys().codec(), c[0].values().codec());
                let bits = |c: &dyn kvq_formats::Codec| {
                    c.block_bytes() as f64 * 8.0 / (c.block_tokens() * head_dim) as f64
                };
                println!(
                    "| `{}` | {}, {} | {}, {} | {:.3} | {:.3} | {} |",
                    plan.describe(),
                    k.block_tokens(),
                    k.block_bytes(),
                    v.block_tokens(),
                    v.block_bytes(),
                    bits(k),
                    bits(v),
                    k.window()
                );
            }
        }
        Cmd::FetchModel => {
            let p = kvq_model::fetch::fetch_default(&kvq_model::fetch::models_dir())?;
            println!("{}", p.display());
        }
        Cmd::Selftest { gpu } => {
            if !gpu {
                bail!("selftest: pass --gpu (the CPU tests run with `cargo test --workspace`)");
            }
            let g = kvq::Gpu::new(0)?;
            let res = kvq::check::parity(
                &g,
                &[
                    "fp16",
                    "kivi:bits=2,window=0",
                    "kivi:bits=2",
                    "kivi:bits=4,window=0",
                ],
            )?;
            let bad: Vec<_> = res
                .iter()
                .filter(|r| r.rel_err >= kvq::check::PARITY_TOL || r.non_finite > 0)
                .collect();
            for r in &bad {
                eprintln!(
                    "FAIL {} rel_err {:.2e} non_finite {}",
                    r.case, r.rel_err, r.non_finite
                );
            }
            println!("{} cases, {} failures", res.len(), bad.len());
            if !bad.is_empty() {
                bail!("GPU parity failed");
            }
        }
    }
    Ok(())
}
