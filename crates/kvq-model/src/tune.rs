//! `kvq tune`: the cheapest per-layer, per-stream KV plan whose perplexity stays within a budget over
//! fp16. Each (layer, stream, candidate format) is probed alone (every other stream fp16) on a short
//! setting and its nll increase taken as that slot's cost; a greedy allocation then starts every slot
//! at its cheapest candidate and buys the upgrade with the most nll saved per bit until the summed
//! cost fits the target. The plan is verified on the full setting; if the measured increase exceeds
//! the budget (errors of many slots add up super-linearly), the target shrinks and it tries again.

use crate::error::{ModelError, Result};
use crate::eval::{log_sum_exp, perplexity_at, score_at, PplOpts};
use crate::model::Model;
use kvq_formats::codec::{FormatRef, Stream, StreamCtx};
use kvq_formats::formats::parse_format;
use kvq_formats::KvPlan;
use serde::{Deserialize, Serialize};

/// What `tune` needs besides the model and the text.
#[derive(Debug, Clone)]
pub struct TuneOpts {
    /// Allowed perplexity increase over fp16, as a fraction (0.01 = 1%).
    pub budget: f64,
    /// Candidate formats (fp16 is added if absent); their bits are measured per layer and stream.
    pub candidates: Vec<String>,
    /// The probes' window options.
    pub probe: PplOpts,
    /// The probes' window starts.
    pub probe_starts: Vec<usize>,
    /// The verification's window options (the sweep's setting).
    pub verify: PplOpts,
    /// The verification's window starts.
    pub verify_starts: Vec<usize>,
    /// Verifications at most.
    pub max_rounds: usize,
    /// The first round's target as a fraction of the budget's nll (a margin for interactions).
    pub margin: f64,
}

/// One probe: a single stream of a single layer in a candidate format, everything else fp16.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    /// Layer.
    pub layer: usize,
    /// `k` or `v`.
    pub stream: String,
    /// Candidate format (canonical).
    pub format: String,
    /// Bits/elem of this stream in this format at the verification context (window counted).
    pub bits: f64,
    /// nll increase over the all-fp16 probe (nats per token; may be slightly negative).
    pub dnll: f64,
    /// Mean KL divergence of the next-token distribution from fp16's (over its top tokens): the
    /// sensitivity the allocation uses, far less noisy than `dnll` on a short probe.
    #[serde(default)]
    pub kl: f64,
}

/// One verification round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// Target of the allocation: the sum of the chosen probes' KLs (nats per token), rescaled each
    /// round by how far the previous plan's measured nll increase missed the budget.
    pub target: f64,
    /// Summed probe cost of the allocation.
    pub predicted: f64,
    /// The plan (canonical description).
    pub plan: String,
    /// Bits/elem of the plan at the verification's end of window.
    pub bits_per_elem: f64,
    /// Verified perplexity.
    pub ppl: f64,
    /// Verified ratio to fp16.
    pub ratio: f64,
}

/// What `tune` did: its probes, rounds and the chosen plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneReport {
    /// The budget (fraction).
    pub budget: f64,
    /// fp16 perplexity on the probe setting.
    pub probe_fp16_ppl: f64,
    /// fp16 perplexity on the verification setting.
    pub fp16_ppl: f64,
    /// Every probe.
    pub probes: Vec<Probe>,
    /// Every verification.
    pub rounds: Vec<Round>,
    /// Index into `rounds` of the plan returned (the cheapest that met the budget, else the best).
    pub chosen: usize,
    /// Whether the chosen plan met the budget on the verification setting.
    pub met: bool,
}

/// One slot's options, cheapest first: (bits, cost).
pub type SlotCosts = Vec<(f64, f64)>;

/// Greedy allocation: every slot starts at its cheapest option; while the summed cost exceeds
/// `target`, the upgrade (any dearer option of any slot) that saves the most cost per added bit is
/// taken. Costs below zero count as zero. Returns each slot's option index.
pub fn allocate(slots: &[SlotCosts], target: f64) -> Vec<usize> {
    let cost = |s: &SlotCosts, i: usize| s[i].1.max(0.0);
    let mut pick = vec![0usize; slots.len()];
    let mut total: f64 = slots
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| cost(s, 0))
        .sum();
    while total > target {
        let mut best: Option<(f64, usize, usize)> = None;
        for (si, s) in slots.iter().enumerate() {
            let c = pick[si];
            for j in c + 1..s.len() {
                let gain = cost(s, c) - cost(s, j);
                let extra = (s[j].0 - s[c].0).max(1e-9);
                if gain <= 0.0 {
                    continue;
                }
                let rate = gain / extra;
                if best.is_none_or(|(r, _, _)| rate > r) {
                    best = Some((rate, si, j));
                }
            }
        }
        let Some((_, si, j)) = best else { break };
        total -= cost(&slots[si], pick[si]) - cost(&slots[si], j);
        pick[si] = j;
    }
    pick
}

/// Bits/elem of one stream of `layer` in format `f` after `ctx` tokens: sealed blocks (metadata
/// included) plus the f16 tokens of the window and of an unfinished block, as the cache counts them.
pub fn stream_bits(
    f: &FormatRef,
    model: &Model,
    layer: usize,
    stream: Stream,
    ctx: usize,
) -> Result<f64> {
    let c = &model.config;
    let codec = f.build(&StreamCtx {
        layer,
        n_layers: c.n_layers,
        stream,
        head_dim: c.head_dim,
        n_kv_heads: c.n_kv_heads,
        rope: model.rope.clone(),
    })?;
    let (bt, w, d) = (codec.block_tokens(), codec.window(), c.head_dim);
    let sealed = if ctx >= w + bt {
        (ctx - w) / bt * bt
    } else {
        0
    };
    let bytes = sealed / bt * codec.block_bytes() + (ctx - sealed) * d * 2;
    Ok(bytes as f64 * 8.0 / (ctx * d) as f64)
}

/// Top tokens of fp16's distribution kept per scored position for the probes' KL.
const KL_TOP: usize = 64;

/// The `k` most likely tokens of `logits` with their log-probabilities.
fn top_log_probs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize].total_cmp(&logits[a as usize])
    });
    idx[..k]
        .iter()
        .map(|&i| (i, (logits[i as usize] as f64 - lse) as f32))
        .collect()
}

/// KL(fp16 || plan) over fp16's top tokens: sum of p_ref (log p_ref - log p_plan).
fn truncated_kl(reference: &[(u32, f32)], logits: &[f32]) -> f64 {
    let lse = log_sum_exp(logits);
    reference
        .iter()
        .map(|&(i, lp)| {
            let lq = logits
                .get(i as usize)
                .map_or(f64::NEG_INFINITY, |&v| v as f64 - lse);
            (lp as f64).exp() * (lp as f64 - lq)
        })
        .sum()
}

/// Runs the probes, the allocation and the verification rounds; returns the plan and the report.
/// `log` receives one line per step.
pub fn tune(
    model: &Model,
    tokens: &[u32],
    o: &TuneOpts,
    log: &mut dyn FnMut(&str),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(KvPlan, TuneReport)> {
    if !(o.budget > 0.0 && o.budget.is_finite()) {
        return Err(ModelError::Input(format!(
            "budget {} must be a positive fraction",
            o.budget
        )));
    }
    let n_layers = model.config.n_layers;
    let fp16 = parse_format("fp16")?;
    let mut cands: Vec<FormatRef> = Vec::new();
    for s in &o.candidates {
        let f = parse_format(s)?;
        f.supports(model.config.head_dim)?;
        if f.canonical() != "fp16" && !cands.iter().any(|c| c.canonical() == f.canonical()) {
            cands.push(f);
        }
    }
    if cands.is_empty() {
        return Err(ModelError::Input(
            "tune needs at least one candidate format besides fp16".into(),
        ));
    }
    let base_plan = KvPlan::parse("fp16", n_layers)?;
    let total = 2 * n_layers * cands.len() + 1;
    let mut done = 0usize;
    // fp16's next-token distributions over the probe windows (their top tokens), the reference each
    // probe's KL is taken against: a far less noisy sensitivity than its perplexity difference.
    let mut reference: Vec<Vec<(u32, f32)>> = Vec::new();
    let base = score_at(
        model,
        &base_plan,
        tokens,
        &o.probe,
        &o.probe_starts,
        &mut |_, _| {},
        &mut |_, row| reference.push(top_log_probs(row, KL_TOP)),
    )?;
    done += 1;
    progress(done, total);
    log(&format!("probe fp16: ppl {:.4}", base.ppl));
    let mut probes = Vec::new();
    let mut slots: Vec<Vec<(f64, f64, FormatRef)>> = Vec::new();
    for layer in 0..n_layers {
        for stream in [Stream::Key, Stream::Value] {
            let sname = if stream == Stream::Key { "k" } else { "v" };
            let mut opts = vec![(
                stream_bits(&fp16, model, layer, stream, o.verify.ctx)?,
                0.0,
                fp16.clone(),
            )];
            for f in &cands {
                let mut plan = base_plan.clone();
                plan.set(layer, stream, f.clone());
                let mut kl_sum = 0f64;
                let r = score_at(
                    model,
                    &plan,
                    tokens,
                    &o.probe,
                    &o.probe_starts,
                    &mut |_, _| {},
                    &mut |i, row| {
                        if let Some(rf) = reference.get(i) {
                            kl_sum += truncated_kl(rf, row);
                        }
                    },
                )?;
                let kl = kl_sum / r.scored.max(1) as f64;
                let bits = stream_bits(f, model, layer, stream, o.verify.ctx)?;
                let dnll = r.nll - base.nll;
                done += 1;
                progress(done, total);
                log(&format!(
                    "probe layer {layer} {sname} {}: {bits:.3} bits, KL {kl:.6}, dnll {dnll:+.5}",
                    f.canonical()
                ));
                probes.push(Probe {
                    layer,
                    stream: sname.into(),
                    format: f.canonical(),
                    bits,
                    dnll,
                    kl,
                });
                opts.push((bits, kl, f.clone()));
            }
            opts.sort_by(|a, b| a.0.total_cmp(&b.0));
            slots.push(opts);
        }
    }
    let costs: Vec<SlotCosts> = slots
        .iter()
        .map(|s| s.iter().map(|(b, c, _)| (*b, *c)).collect())
        .collect();
    let fp = perplexity_at(
        model,
        &base_plan,
        tokens,
        &o.verify,
        &o.verify_starts,
        &mut |_, _| {},
    )?;
    log(&format!("verify fp16: ppl {:.4}", fp.ppl));
    let budget_nll = (1.0 + o.budget).ln();
    let mut target = budget_nll * o.margin;
    let mut rounds: Vec<Round> = Vec::new();
    let mut plans: Vec<KvPlan> = Vec::new();
    for _ in 0..o.max_rounds.max(1) {
        let pick = allocate(&costs, target);
        let mut plan = base_plan.clone();
        let mut predicted = 0.0;
        for (si, &j) in pick.iter().enumerate() {
            let stream = if si % 2 == 0 {
                Stream::Key
            } else {
                Stream::Value
            };
            plan.set(si / 2, stream, slots[si][j].2.clone());
            predicted += slots[si][j].1.max(0.0);
        }
        if let Some(prev) = plans.last() {
            if prev.describe() == plan.describe() {
                break; // the target no longer changes the allocation
            }
        }
        let r = perplexity_at(
            model,
            &plan,
            tokens,
            &o.verify,
            &o.verify_starts,
            &mut |_, _| {},
        )?;
        let ratio = r.ppl / fp.ppl;
        log(&format!(
            "round {}: target {target:.5} (sum of probe KLs), predicted {predicted:.5}: {:.3} bits/elem, ppl {:.4}, ratio {ratio:.4}",
            rounds.len() + 1,
            r.bits_per_elem,
            r.ppl
        ));
        rounds.push(Round {
            target,
            predicted,
            plan: plan.describe(),
            bits_per_elem: r.bits_per_elem,
            ppl: r.ppl,
            ratio,
        });
        plans.push(plan);
        let measured = r.nll - fp.nll;
        if ratio <= 1.0 + o.budget {
            break;
        }
        // Shrink the target by how much the sum under-predicted, with 10% to spare.
        let scale = if measured > 0.0 && predicted > 0.0 {
            (budget_nll / measured).min(0.9)
        } else {
            0.5
        };
        target = (predicted.min(target) * scale).max(0.0);
    }
    let ok: Vec<usize> = (0..rounds.len())
        .filter(|&i| rounds[i].ratio <= 1.0 + o.budget)
        .collect();
    let (chosen, met) = match ok
        .iter()
        .copied()
        .min_by(|&a, &b| rounds[a].bits_per_elem.total_cmp(&rounds[b].bits_per_elem))
    {
        Some(i) => (i, true),
        None => (
            (0..rounds.len())
                .min_by(|&a, &b| rounds[a].ratio.total_cmp(&rounds[b].ratio))
                .unwrap_or(0),
            false,
        ),
    };
    let plan = plans
        .get(chosen)
        .cloned()
        .ok_or_else(|| ModelError::Input("tune ran no verification".into()))?;
    Ok((
        plan,
        TuneReport {
            budget: o.budget,
            probe_fp16_ppl: base.ppl,
            fp16_ppl: fp.ppl,
            probes,
            rounds,
            chosen,
            met,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_kl_is_zero_for_the_same_logits_and_grows_with_change() {
        let a: Vec<f32> = (0..200).map(|i| ((i * 37) % 23) as f32 * 0.3).collect();
        let r = top_log_probs(&a, 16);
        assert_eq!(r.len(), 16);
        let best = a.iter().cloned().fold(f32::MIN, f32::max);
        assert!(r.iter().all(|&(i, _)| a[i as usize] <= best));
        assert!(r.iter().any(|&(i, _)| a[i as usize] == best));
        assert!(truncated_kl(&r, &a).abs() < 1e-6);
        let mut b = a.clone();
        b[r[0].0 as usize] -= 0.5;
        let small = truncated_kl(&r, &b);
        b[r[0].0 as usize] -= 2.0;
        assert!(small > 0.0 && truncated_kl(&r, &b) > small);
    }

    #[test]
    fn allocate_buys_the_cheapest_savings_first() {
        // Two slots, options (bits, cost): slot 0 is sensitive, slot 1 barely.
        let slots = vec![
            vec![(2.0, 0.05), (4.0, 0.001), (16.0, 0.0)],
            vec![(2.0, 0.004), (4.0, 0.0005), (16.0, 0.0)],
        ];
        // Everything cheap is fine under a loose target.
        assert_eq!(allocate(&slots, 0.1), vec![0, 0]);
        // Tighter: upgrade slot 0 to 4 bits (0.049 saved for 2 bits), keep slot 1 at 2.
        assert_eq!(allocate(&slots, 0.01), vec![1, 0]);
        // Tighter still: slot 1 to 4 bits next (0.0035 for 2 bits beats 0.001 for 12).
        assert_eq!(allocate(&slots, 0.002), vec![1, 1]);
        // Zero target: all the way to lossless.
        assert_eq!(allocate(&slots, 0.0), vec![2, 2]);
        // A dearer option that costs more than a cheaper one is never bought.
        let odd = vec![vec![(2.0, 0.01), (4.0, 0.02), (16.0, 0.0)]];
        assert_eq!(allocate(&odd, 0.005), vec![2]);
    }
}
