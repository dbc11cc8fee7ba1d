//! What entropy coding could buy the KLT format, measured on one window of real keys (the question
//! behind `klt:...,code=ec`, docs/QUALITY.md "Entropy-coded KLT"): in each head's calibrated KLT
//! domain, the fixed Lloyd-Max codes' squared error and index entropy at `bits`, against a uniform
//! grid with ideal entropy coding over a sweep of steps, and the lag-1 correlation of components
//! along the sequence (what temporal prediction could remove); then fixed-length codes with any number
//! of levels per component (fractional bits), and trellis codes at the fixed codes' widths
//! (`code=tcq`), both against the fixed codes.
//!
//! cargo run --release -p kvq-model --example klt_rate -- MODEL.gguf KLT.safetensors TEXT BITS [key|value]
use kvq_formats::tcq;
use kvq_formats::transform::{allocate, levels_len, levels_off, KltBooks};
use kvq_model::model::Model;
use std::collections::HashMap;

/// Tokens of the window (taken from token 5000 on, past the text's front matter) and sinks skipped.
const N: usize = 1024;
const FROM: usize = 5000;
const SKIP: usize = 4;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() >= 5,
        "usage: klt_rate MODEL KLT TEXT BITS [key|value]"
    );
    let model = Model::load(&a[1])?;
    let books = KltBooks::load(&a[2])?;
    let ids = model.tokenizer.encode(&std::fs::read_to_string(&a[3])?)?;
    let bits: f64 = a[4].parse()?;
    let key = a.get(5).is_none_or(|s| s == "key");
    anyhow::ensure!(
        ids.len() >= FROM + N,
        "{}: fewer than {} tokens",
        a[3],
        FROM + N
    );
    let ids = &ids[FROM..FROM + N];
    let c = &model.config;
    let (d, h, bmax) = (c.head_dim, c.n_kv_heads, books.bmax);
    let mut xs = vec![Vec::<f32>::new(); c.n_layers];
    model.capture(ids, N, &mut |l, _, _q, k, v| {
        xs[l].extend_from_slice(if key { k } else { v })
    })?;
    // Every head's components along the window ([component][token]) with its fixed-code tables.
    let (mut lm_err, mut lm_ent, mut count, mut pred) = (0f64, 0f64, 0f64, (0f64, 0usize));
    let mut comps: Vec<Vec<f64>> = Vec::new();
    // Per component its fixed-code width, and the fixed codes' error over the window's second half
    // (the trellis codes' test tokens).
    let (mut widths_all, mut lm_test) = (Vec::<u8>::new(), 0f64);
    for (l, x) in xs.iter().enumerate() {
        for (hh, hd) in books.layers[&(l, key)].iter().enumerate() {
            let widths = allocate(&hd.dist, d, bmax, (bits * d as f64).round() as usize);
            for (cc, &w) in widths.iter().enumerate() {
                let z: Vec<f64> = (SKIP..N)
                    .map(|t| {
                        let row = &x[(t * h + hh) * d..(t * h + hh + 1) * d];
                        (0..d)
                            .map(|j| hd.fwd[cc * d + j] as f64 * (row[j] - hd.mean[j]) as f64)
                            .sum()
                    })
                    .collect();
                let m = z.len() as f64;
                count += m;
                let half = z.len() / 2;
                if w == 0 {
                    lm_err += z.iter().map(|v| v * v).sum::<f64>();
                    lm_test += z[half..].iter().map(|v| v * v).sum::<f64>();
                } else {
                    let at = cc * levels_len(bmax) + levels_off(w as usize);
                    let lv = &hd.levels[at..at + (1 << w)];
                    let mut hist = vec![0f64; lv.len()];
                    for (t, &v) in z.iter().enumerate() {
                        let (i, e) = lv
                            .iter()
                            .map(|&q| (v - q as f64).powi(2))
                            .enumerate()
                            .min_by(|a, b| a.1.total_cmp(&b.1))
                            .expect("levels");
                        lm_err += e;
                        if t >= half {
                            lm_test += e;
                        }
                        hist[i] += 1.0;
                    }
                    lm_ent += entropy(hist.into_iter(), m);
                    let v0 = z.iter().map(|v| v * v).sum::<f64>() / m;
                    let c1 = z.windows(2).map(|p| p[0] * p[1]).sum::<f64>() / (m - 1.0);
                    let rho = (c1 / v0).clamp(-0.999, 0.999);
                    pred.0 += -0.5 * (1.0 - rho * rho).log2();
                    pred.1 += 1;
                }
                comps.push(z);
                widths_all.push(w);
            }
        }
    }
    println!(
        "{}: fixed codes at {bits} bits: mse {:.4e}, index entropy {:.3} bits; lag-1 prediction would save {:.3} bits a coded component",
        if key { "keys" } else { "values" },
        lm_err / count,
        lm_ent / count,
        pred.0 / pred.1 as f64
    );
    let counts: Vec<String> = (0..=bmax)
        .map(|b| {
            format!(
                "{b}:{}",
                widths_all.iter().filter(|&&w| w as usize == b).count()
            )
        })
        .collect();
    println!("components per width: {}", counts.join(" "));
    println!("uniform grid, ideal entropy code (centroid reconstruction): step, bits/elem, mse");
    for k in 0..24 {
        let step = 0.02 * 1.25f64.powi(k);
        let (mut err, mut ent) = (0f64, 0f64);
        for z in &comps {
            let mut bins: HashMap<i64, (f64, f64, f64)> = HashMap::new();
            for &v in z {
                let e = bins.entry((v / step).round() as i64).or_default();
                *e = (e.0 + 1.0, e.1 + v, e.2 + v * v);
            }
            err += bins
                .values()
                .map(|(n, s1, s2)| s2 - s1 * s1 / n)
                .sum::<f64>();
            ent += entropy(bins.values().map(|b| b.0), z.len() as f64);
        }
        println!("{step:.4} {:.3} {:.4e}", ent / count, err / count);
    }
    // Fixed-length codes with any number of levels per component (mixed radix: a token's indices as
    // one number, so a component of L levels costs log2 L bits, fractions included), each component's
    // levels fitted by Lloyd-Max on the window itself, the levels per head given out greedily by error
    // saved per bit; against the same in-sample fit restricted to whole bits (L a power of two).
    println!("fixed-length codes, in-sample Lloyd-Max levels per component: bits/elem, mse (any L | L = 2^b)");
    let per_head = comps.len() / d;
    let curves: Vec<Vec<f64>> = comps.iter().map(|z| lloyd_curve(z, 64)).collect();
    for target in [1.5, 2.0, 2.5, bits, 3.0, 3.5] {
        let (mut e_any, mut e_pow) = (0f64, 0f64);
        for hh in 0..per_head {
            let cs = &curves[hh * d..(hh + 1) * d];
            e_any += greedy(cs, target * d as f64, false);
            e_pow += greedy(cs, target * d as f64, true);
        }
        println!("{target:.3} {:.4e} {:.4e}", e_any / count, e_pow / count);
    }
    // Trellis codes at the fixed codes' widths (kvq_formats::tcq, `code=tcq`): each component's tokens
    // in trellises of a block's length, tables fitted on the window's first half (components in units
    // of their first-half deviation; one set for all layers here, per layer in the codec), errors on
    // the second half. TCQ_SPAN sets the trellis length (the codec's is 32) and TCQ_MIXED=1 runs one
    // trellis over a block's tokens and components together (token-major) instead.
    println!("trellis codes at the fixed widths (same bits), second half of the window: mse");
    let half = comps[0].len() / 2;
    let span: usize = std::env::var("TCQ_SPAN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tcq::SPAN);
    let mixed = std::env::var("TCQ_MIXED").is_ok_and(|v| v == "1");
    let mut sig: Vec<f64> = comps
        .iter()
        .map(|z| {
            (z[..half].iter().map(|v| v * v).sum::<f64>() / half as f64)
                .sqrt()
                .max(1e-9)
        })
        .collect();
    // The codec's trellis codes of every head, as `code=tcq` builds them per layer (tables and
    // deviations from the calibration quantiles); heads in `comps` order.
    let codecs: Vec<tcq::Tcq> = (0..c.n_layers)
        .flat_map(|l| {
            let hs = &books.layers[&(l, key)];
            let base = l * hs.len() * d;
            let widths: Vec<Vec<u8>> = (0..hs.len())
                .map(|hh| widths_all[base + hh * d..base + (hh + 1) * d].to_vec())
                .collect();
            let quant: Vec<&[f32]> = hs.iter().map(|h| h.quant.as_slice()).collect();
            tcq::Tcq::layer(&widths, &quant, d)
        })
        .collect();
    if std::env::var("TCQ_QUANT_SIGMA").is_ok_and(|v| v == "1") {
        // The deviations the codec takes from the calibration quantiles instead.
        for (sg, &cs) in sig
            .iter_mut()
            .zip(codecs.iter().flat_map(|code| code.sigma()))
        {
            *sg = cs as f64;
        }
    }
    // Trellises over `range`: (component of each element, (value in deviations, width) of each).
    let streams = |range: std::ops::Range<usize>| -> Vec<(Vec<usize>, Trellis)> {
        let ts: Vec<usize> = range.collect();
        let coded = |head: usize| (head * d..(head + 1) * d).filter(|&i| widths_all[i] > 0);
        let mut out = Vec::new();
        for head in 0..comps.len() / d {
            let groups: Vec<Vec<usize>> = if mixed {
                vec![coded(head).collect()]
            } else {
                coded(head).map(|i| vec![i]).collect()
            };
            for g in &groups {
                for chunk in ts.chunks(span) {
                    let ids: Vec<usize> = chunk.iter().flat_map(|_| g.iter().copied()).collect();
                    let x = chunk
                        .iter()
                        .flat_map(|&t| g.iter().map(move |&i| (t, i)))
                        .map(|(t, i)| (comps[i][t] / sig[i], widths_all[i] as usize))
                        .collect();
                    out.push((ids, x));
                }
            }
        }
        out
    };
    let train: Vec<Trellis> = streams(0..half).into_iter().map(|s| s.1).collect();
    let luts = tcq::fit(&train, bmax);
    let mut tcq_err = 0f64;
    for (ids, x) in streams(half..comps[0].len()) {
        for ((&(v, w), idx), i) in x.iter().zip(tcq::viterbi(&x, &luts)).zip(ids) {
            tcq_err += (v - luts[w][idx as usize] as f64).powi(2) * sig[i] * sig[i];
        }
    }
    let mut tcq_count = 0f64;
    for (i, z) in comps.iter().enumerate() {
        tcq_count += (z.len() - half) as f64;
        if widths_all[i] == 0 {
            tcq_err += z[half..].iter().map(|v| v * v).sum::<f64>();
        }
    }
    println!(
        "fixed codes {:.4e}, trellis codes {:.4e}",
        lm_test / tcq_count,
        tcq_err / tcq_count
    );
    // The codec's own trellis codes (tables and deviations from the calibration file's quantiles, as
    // `code=tcq` builds them) on the same second half, in whole 32-token blocks.
    let n_blocks = (comps[0].len() - half) / tcq::SPAN;
    let (mut codec_err, mut codec_count) = (0f64, 0f64);
    for (head, code) in codecs.iter().enumerate() {
        let at = |cc: usize, t: usize| comps[head * d + cc][t];
        let mut buf = vec![0u8; (tcq::SPAN * code.bits()).div_ceil(8) + 8];
        for blk in 0..n_blocks {
            let t0 = half + blk * tcq::SPAN;
            let z: Vec<f32> = (0..tcq::SPAN * d)
                .map(|i| at(i % d, t0 + i / d) as f32)
                .collect();
            buf.iter_mut().for_each(|b| *b = 0);
            code.put(&z, &mut buf, 0);
            let mut y = vec![0f32; z.len()];
            code.get(&buf, &mut y, 0);
            codec_err += z
                .iter()
                .zip(&y)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum::<f64>();
            codec_count += z.len() as f64;
        }
    }
    println!(
        "the codec's trellis codes (tables from the file's quantiles), {n_blocks} blocks a head: {:.4e}",
        codec_err / codec_count
    );
    Ok(())
}

/// A trellis's elements: (value in deviations, width).
type Trellis = Vec<(f64, usize)>;

/// Squared error sums of `z` quantized by Lloyd-Max with L = 1..=lmax levels (index L - 1).
fn lloyd_curve(z: &[f64], lmax: usize) -> Vec<f64> {
    let mut s = z.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let (mut p1, mut p2) = (vec![0f64; n + 1], vec![0f64; n + 1]);
    for (i, v) in s.iter().enumerate() {
        p1[i + 1] = p1[i] + v;
        p2[i + 1] = p2[i] + v * v;
    }
    let cost = |a: usize, b: usize| {
        if b <= a {
            0.0
        } else {
            let m = (b - a) as f64;
            let s1 = p1[b] - p1[a];
            (p2[b] - p2[a] - s1 * s1 / m).max(0.0)
        }
    };
    (1..=lmax)
        .map(|l| {
            // Start from equal-count cells, then Lloyd iterations on the sorted samples.
            let mut cuts: Vec<usize> = (0..=l).map(|i| i * n / l).collect();
            for _ in 0..30 {
                let cent: Vec<f64> = (0..l)
                    .map(|i| {
                        let (a, b) = (cuts[i], cuts[i + 1]);
                        if b > a {
                            (p1[b] - p1[a]) / (b - a) as f64
                        } else {
                            s[a.min(n - 1)]
                        }
                    })
                    .collect();
                for i in 1..l {
                    let mid = 0.5 * (cent[i - 1] + cent[i]);
                    cuts[i] = s.partition_point(|&v| v < mid);
                }
            }
            (0..l).map(|i| cost(cuts[i], cuts[i + 1])).sum()
        })
        .collect()
}

/// Greedy levels for one head's components under `budget` bits a token (sum of log2 L): the step with
/// the most error saved per bit first; `pow2` allows only doublings. Returns the error sum.
fn greedy(curves: &[Vec<f64>], budget: f64, pow2: bool) -> f64 {
    let mut l = vec![1usize; curves.len()];
    let mut used = 0f64;
    loop {
        let mut best: Option<(usize, usize, f64, f64)> = None;
        for (c, cv) in curves.iter().enumerate() {
            let next = if pow2 { 2 * l[c] } else { l[c] + 1 };
            if next > cv.len() {
                continue;
            }
            let db = (next as f64).log2() - (l[c] as f64).log2();
            if used + db > budget + 1e-9 {
                continue;
            }
            let gain = (cv[l[c] - 1] - cv[next - 1]) / db;
            if best.is_none_or(|b| gain > b.2) {
                best = Some((c, next, gain, db));
            }
        }
        let Some((c, next, _, db)) = best else { break };
        l[c] = next;
        used += db;
    }
    l.iter().zip(curves).map(|(&li, cv)| cv[li - 1]).sum()
}

/// Total bits of `m` samples coded by their empirical distribution (counts).
fn entropy(counts: impl Iterator<Item = f64>, m: f64) -> f64 {
    counts
        .filter(|&n| n > 0.0)
        .map(|n| -n * (n / m).log2())
        .sum()
}
