//! `kvq eval sweep` and `kvq tune`: the quality-per-bit commands of issue 12 (JSON, Markdown table,
//! PNG plot; the per-layer plan tuner). The measuring logic lives in `kvq_model::{eval, sweep, tune}`.

use crate::plot::{plot_png, PlotSpec};
use anyhow::{bail, Context, Result};
use kvq_formats::KvPlan;
use kvq_model::eval::{perplexity_at, window_starts, PplOpts};
use kvq_model::sweep::{parse_plans_file, PeerDoc, SweepDoc};
use kvq_model::tune::{tune, TuneOpts};
use kvq_model::Model;

/// The sweep's settings, as the command line gives them.
pub struct SweepArgs {
    /// Evaluation text (absent with `replot`).
    pub text: Option<String>,
    /// Plans from `--kv`.
    pub kv: Vec<String>,
    /// A plans file (one plan a line).
    pub plans: Option<String>,
    /// Window options.
    pub opts: PplOpts,
    /// Window sample seed.
    pub seed: Option<u64>,
    /// JSON output (and input with `resume` / `replot`).
    pub json: String,
    /// Markdown output.
    pub md: String,
    /// PNG output.
    pub png: String,
    /// A peer's JSON to merge.
    pub peer_json: Option<String>,
    /// Keep the results already in `json` (same text, model and windows) and run only the rest.
    pub resume: bool,
    /// Run nothing: redraw the table and plot from `json`.
    pub replot: bool,
    /// Upper end of the plot's ratio axis.
    pub y_max: f64,
    /// Plot title.
    pub title: Option<String>,
}

/// `path` with its extension replaced by `ext`.
pub fn with_ext(path: &str, ext: &str) -> String {
    std::path::Path::new(path)
        .with_extension(ext)
        .display()
        .to_string()
}

fn read_doc(path: &str) -> Result<SweepDoc> {
    let s = std::fs::read_to_string(path).with_context(|| format!("--json {path}"))?;
    serde_json::from_str(&s).with_context(|| format!("--json {path}: not a sweep JSON"))
}

fn write_doc(path: &str, doc: &SweepDoc) -> Result<()> {
    if let Some(dir) = std::path::Path::new(path).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("--json {path}"))?;
        }
    }
    std::fs::write(path, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("--json {path}"))
}

/// Writes the Markdown table and the plot of `doc`.
fn render(a: &SweepArgs, doc: &SweepDoc) -> Result<()> {
    let md = doc.markdown();
    std::fs::write(&a.md, &md).with_context(|| format!("--md {}", a.md))?;
    print!("{md}");
    let ours = doc.points();
    if ours.is_empty() {
        bail!("{}: no fp16 row, so no ratios to plot", a.json);
    }
    let peer = doc.peer_points();
    let o = doc.opts.clone().unwrap_or(PplOpts {
        ctx: 0,
        stride: 0,
        chunk: 0,
        max_windows: 0,
    });
    let scored = doc.results.first().map(|r| r.scored).unwrap_or(0);
    let title = a.title.clone().unwrap_or_else(|| {
        let name = std::path::Path::new(&doc.text)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        format!(
            "KV cache quality per bit: {name}, windows of {}, {scored} tokens scored",
            o.ctx
        )
    });
    plot_png(
        &a.png,
        &PlotSpec {
            title: &title,
            ours: &ours,
            peer: &peer,
            y_max: a.y_max,
        },
        1200,
        800,
    )
    .with_context(|| format!("--png {}", a.png))?;
    eprintln!("kvq: wrote {}, {} and {}", a.json, a.md, a.png);
    Ok(())
}

fn merge_peer(a: &SweepArgs, doc: &mut SweepDoc) -> Result<()> {
    if let Some(p) = &a.peer_json {
        let s = std::fs::read_to_string(p).with_context(|| format!("--peer-json {p}"))?;
        let peer: PeerDoc = serde_json::from_str(&s).with_context(|| {
            format!("--peer-json {p}: not a peer-ppl JSON (scripts/peer-ppl.sh)")
        })?;
        doc.peer = Some(peer);
    }
    Ok(())
}

/// Runs the sweep (or only redraws it), writing the JSON after every plan.
pub fn sweep(a: &SweepArgs, load: &dyn Fn() -> Result<Model>) -> Result<()> {
    if a.replot {
        let mut doc = read_doc(&a.json)?;
        merge_peer(a, &mut doc)?;
        write_doc(&a.json, &doc)?;
        return render(a, &doc);
    }
    let Some(text) = &a.text else {
        bail!("eval sweep needs --text FILE (or --replot to redraw --json)");
    };
    let mut wanted: Vec<String> = a.kv.clone();
    if let Some(f) = &a.plans {
        let s = std::fs::read_to_string(f).with_context(|| format!("--plans {f}"))?;
        wanted.extend(parse_plans_file(&s));
    }
    if wanted.is_empty() {
        bail!("eval sweep: no plan given (--kv PLAN, repeated, and/or --plans FILE)");
    }
    if a.opts.ctx < 1024 || a.opts.max_windows * a.opts.stride < 8192 {
        eprintln!(
            "kvq: note: windows of {} tokens and {} scored are below issue 12's setting (>= 1024, >= 8192)",
            a.opts.ctx,
            a.opts.max_windows * a.opts.stride
        );
    }
    let body = std::fs::read_to_string(text).with_context(|| format!("--text {text}"))?;
    let model = load()?;
    let n_layers = model.config.n_layers;
    // fp16 first: every ratio is taken against it.
    if !wanted.iter().any(|k| k.trim() == "fp16") {
        wanted.insert(0, "fp16".into());
    }
    let mut plans = Vec::new();
    for k in &wanted {
        let p = KvPlan::parse(k, n_layers).with_context(|| format!("--kv {k}"))?;
        p.supports(model.config.head_dim)
            .with_context(|| format!("--kv {k}"))?;
        plans.push(p);
    }
    let tokens = model.tokenizer.encode(&body)?;
    let starts = window_starts(&model, tokens.len(), &a.opts, a.seed)?;
    let mut doc = SweepDoc {
        model: model.path.clone(),
        text: text.clone(),
        text_tokens: tokens.len(),
        opts: Some(a.opts.clone()),
        seed: a.seed,
        window_starts: starts.clone(),
        results: Vec::new(),
        peer: None,
    };
    if a.resume && std::path::Path::new(&a.json).exists() {
        let old = read_doc(&a.json)?;
        let old_starts = if old.window_starts.is_empty() && old.seed.is_none() {
            // `eval ppl` JSON: the first windows of the text.
            match &old.opts {
                Some(o) => window_starts(&model, tokens.len(), o, None)?,
                None => Vec::new(),
            }
        } else {
            old.window_starts.clone()
        };
        if old.text != doc.text || old.opts != doc.opts || old_starts != starts {
            bail!(
                "--resume: {} was measured on another text or other windows ({} {:?}); drop --resume or change --json",
                a.json,
                old.text,
                old.opts
            );
        }
        doc.results = old.results;
        doc.peer = old.peer;
    }
    merge_peer(a, &mut doc)?;
    eprintln!(
        "kvq: {text}: {} tokens; {} windows of {} tokens (starts {}), last {} of each scored",
        tokens.len(),
        starts.len(),
        a.opts.ctx,
        match a.seed {
            Some(s) => format!("sampled with seed {s}"),
            None => "the first ones".into(),
        },
        a.opts.stride
    );
    // A result counts as measured when its plan is the same per layer and stream (older JSON may
    // describe the same plan differently); its description is brought up to date.
    let same = |a: &KvPlan, b: &KvPlan| {
        a.n_layers() == b.n_layers()
            && (0..a.n_layers()).all(|l| {
                let (x, y) = (a.layer(l), b.layer(l));
                x.0.canonical() == y.0.canonical() && x.1.canonical() == y.1.canonical()
            })
    };
    let mut todo: Vec<&KvPlan> = Vec::new();
    for p in &plans {
        let mut found = false;
        for r in doc.results.iter_mut() {
            if r.kv == p.describe() || KvPlan::parse(&r.kv, n_layers).is_ok_and(|old| same(&old, p))
            {
                r.kv = p.describe();
                found = true;
            }
        }
        if !found {
            todo.push(p);
        }
    }
    let mb = indicatif::MultiProgress::new();
    let overall = mb.add(crate::bar(todo.len(), "plans"));
    for plan in todo {
        let pb = mb.add(crate::bar(1, &plan.describe()));
        let r = perplexity_at(&model, plan, &tokens, &a.opts, &starts, &mut |d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        })?;
        pb.finish_and_clear();
        mb.remove(&pb);
        overall.inc(1);
        mb.println(format!(
            "kvq: {:<48} ppl {:.4}  bits/elem {:.3} (scored mean {:.3})  ({:.0}s)",
            r.kv, r.ppl, r.bits_per_elem, r.bits_per_elem_scored, r.seconds
        ))
        .ok();
        doc.results.push(r);
        write_doc(&a.json, &doc)?;
    }
    overall.finish_and_clear();
    write_doc(&a.json, &doc)?;
    render(a, &doc)
}

/// `kvq tune`'s settings, as the command line gives them.
pub struct TuneArgs {
    /// Verification text.
    pub text: String,
    /// Probe text (default: the verification text).
    pub probe_text: Option<String>,
    /// Budget, e.g. `1%` or `0.01`.
    pub budget: String,
    /// Candidate formats.
    pub candidates: Vec<String>,
    /// Plan file to write.
    pub out: String,
    /// Report JSON to write.
    pub report: String,
    /// Probe windows.
    pub probe: PplOpts,
    /// Verification windows.
    pub verify: PplOpts,
    /// Seed of the probe window sample.
    pub seed: u64,
    /// Verification rounds at most.
    pub max_rounds: usize,
    /// First target as a fraction of the budget.
    pub margin: f64,
}

/// Parses `1%` or `0.01` as a fraction.
pub fn parse_budget(s: &str) -> Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| {
        anyhow::anyhow!("--budget {s}: expected a percentage like 1% or a fraction like 0.01")
    })?;
    if !(v > 0.0 && v < 10.0) {
        bail!("--budget {s}: must be above 0 (and below 1000%)");
    }
    Ok(v)
}

/// Runs `kvq tune` and writes the plan file and the report.
pub fn tune_cmd(a: &TuneArgs, model: &Model) -> Result<()> {
    let budget = parse_budget(&a.budget)?;
    let body = std::fs::read_to_string(&a.text).with_context(|| format!("--text {}", a.text))?;
    let tokens = model.tokenizer.encode(&body)?;
    let probe_tokens = match &a.probe_text {
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| format!("--probe-text {p}"))?;
            model.tokenizer.encode(&s)?
        }
        None => tokens.clone(),
    };
    // Probes run on their own tokens; the verification windows are the sweep's (first ones).
    let probe_starts = window_starts(model, probe_tokens.len(), &a.probe, Some(a.seed))
        .context("probe windows (--probe-ctx, --probe-windows)")?;
    let verify_starts = window_starts(model, tokens.len(), &a.verify, None)
        .context("verification windows (--ctx, --max-windows)")?;
    let o = TuneOpts {
        budget,
        candidates: a.candidates.clone(),
        probe: a.probe.clone(),
        probe_starts,
        verify: a.verify.clone(),
        verify_starts,
        max_rounds: a.max_rounds,
        margin: a.margin,
    };
    // Probe and verification texts in one token stream, each window inside its own part.
    let (all, off) = match &a.probe_text {
        Some(_) => {
            let mut all = probe_tokens.clone();
            all.extend_from_slice(&tokens);
            (all, probe_tokens.len())
        }
        None => (tokens.clone(), 0),
    };
    let o = TuneOpts {
        verify_starts: o.verify_starts.iter().map(|s| s + off).collect(),
        ..o
    };
    let pb = crate::bar(1, "tune probes");
    let pb2 = pb.clone();
    let (plan, rep) = tune(
        model,
        &all,
        &o,
        &mut |l| pb.println(format!("kvq: {l}")),
        &mut |d, t| {
            pb2.set_length(t as u64);
            pb2.set_position(d as u64);
        },
    )?;
    pb.finish_and_clear();
    let file = plan.to_file();
    std::fs::write(&a.out, serde_json::to_string_pretty(&file)?)
        .with_context(|| format!("--out {}", a.out))?;
    std::fs::write(&a.report, serde_json::to_string_pretty(&rep)?)
        .with_context(|| format!("--report {}", a.report))?;
    let r = &rep.rounds[rep.chosen];
    eprintln!(
        "kvq: wrote {} ({} verification round(s)); chosen: {:.3} bits/elem, ppl {:.4} = {:.4} x fp16 {:.4} ({}); report {}",
        a.out,
        rep.rounds.len(),
        r.bits_per_elem,
        r.ppl,
        r.ratio,
        rep.fp16_ppl,
        if rep.met { "within the budget" } else { "NOT within the budget" },
        a.report
    );
    println!("{}", a.out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        assert_eq!(parse_budget("1%").unwrap(), 0.01);
        assert_eq!(parse_budget(" 0.5 % ").unwrap(), 0.005);
        assert_eq!(parse_budget("0.02").unwrap(), 0.02);
        assert!(parse_budget("abc").is_err());
        assert!(parse_budget("0").is_err());
        assert!(parse_budget("-1%").is_err());
        assert_eq!(with_ext("out/s.json", "png"), "out/s.png");
    }
}
