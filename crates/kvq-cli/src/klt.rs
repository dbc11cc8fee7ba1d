//! `kvq calibrate --method klt`: captures the model's queries, keys and values over a text and fits
//! the KLT format's per-head weighted transforms and Lloyd-Max quantizers
//! ([`kvq_formats::transform`]).

use anyhow::{bail, Result};
use kvq_formats::transform::{fit_head, KltBooks, KltHead};
use kvq_model::Model;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// What the transforms' squared error is weighted by (`kvq calibrate --weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    /// Plain PCA: every channel alike (`none`).
    None,
    /// What reads the stream: queries for keys, rotated by query-key distances drawn uniformly from
    /// the window (pre-RoPE keys), W_o for values (`attention`).
    Attention,
    /// `Attention`, each query's distance drawn from its own softmax over the window's earlier
    /// tokens past the sinks: the distances whose score errors attention passes on (`scores`;
    /// pre-RoPE keys only).
    Scores,
}

impl Weight {
    /// The name the file's metadata records (and `--weight` takes).
    pub fn name(self) -> &'static str {
        match self {
            Weight::None => "none",
            Weight::Attention => "attention",
            Weight::Scores => "scores",
        }
    }
}

/// Settings of one KLT fit.
pub struct KltOpts {
    /// Widest per-component code with fitted levels.
    pub bmax: usize,
    /// Keys fitted (and later stored) before RoPE.
    pub key_pre_rope: bool,
    /// What errors are weighted by ([`Weight::Scores`] needs `key_pre_rope` and `draws >= 1`,
    /// which the caller checks against its flags).
    pub weight: Weight,
    /// Distances drawn per query and head with [`Weight::Scores`] (their outer products averaged).
    pub draws: usize,
    /// Positions at the start of each window left out of the samples (attention sinks, kept in f16).
    pub skip: usize,
    /// Keys / values coded with a per-token gain.
    pub scaled: [bool; 2],
    /// Seed of the relative positions drawn for the pre-RoPE key weighting.
    pub seed: u64,
}

/// Window of one calibration forward, and the range of query-key distances the pre-RoPE weighting
/// draws from.
const CTX: usize = 2048;

/// Fits every layer, stream and KV head of `model` on `ids`; `progress(done, total)` after each fit.
pub fn fit(
    model: &Model,
    ids: &[u32],
    o: &KltOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<KltBooks> {
    let c = &model.config;
    let (d, h, hq, nl) = (c.head_dim, c.n_kv_heads, c.n_heads, c.n_layers);
    if hq % h != 0 {
        bail!("{hq} query heads not a multiple of {h} KV heads");
    }
    let g = hq / h;
    let ctx = c.max_ctx.min(CTX);
    let rope = model.rope.clone();
    let mut keys = vec![vec![Vec::<f32>::new(); h]; nl];
    let mut vals = vec![vec![Vec::<f32>::new(); h]; nl];
    // Keys' weight: E[a a^T] over the vectors a a key error is dotted with (pre-RoPE: the query
    // rotated by a query-key distance drawn from 0..ctx; post-RoPE: the rotated query itself).
    let mut mk = vec![vec![0f64; h * d * d]; nl];
    let mut nq = 0usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let weighted = o.weight != Weight::None;
    // Weight::Scores: the window's keys so far after RoPE, per layer and KV head.
    let by_scores = o.weight == Weight::Scores;
    let mut seen = vec![vec![Vec::<f32>::new(); h]; nl];
    let mut p = Vec::<f32>::new();
    let mut bys = Vec::<usize>::new();
    let inv_sqrt_d = 1.0 / (d as f32).sqrt();
    model.capture(ids, ctx, &mut |l, pos0, q, k, v| {
        if by_scores {
            for (kv, s) in seen[l].iter_mut().enumerate() {
                if pos0 == 0 {
                    s.clear();
                }
                for t in 0..k.len() / (h * d) {
                    let mut kk = k[(t * h + kv) * d..(t * h + kv + 1) * d].to_vec();
                    rope.rotate(&mut kk, pos0 + t, 1.0);
                    s.extend_from_slice(&kk);
                }
            }
        }
        for t in 0..k.len() / (h * d) {
            let pos = pos0 + t;
            if pos < o.skip {
                continue;
            }
            for kv in 0..h {
                let at = (t * h + kv) * d;
                let mut kk = k[at..at + d].to_vec();
                if !o.key_pre_rope {
                    rope.rotate(&mut kk, pos, 1.0);
                }
                keys[l][kv].extend_from_slice(&kk);
                vals[l][kv].extend_from_slice(&v[at..at + d]);
            }
            // Every other token's queries are plenty for a d x d second moment.
            if !weighted || t % 2 == 1 {
                continue;
            }
            if l == 0 {
                nq += 1;
            }
            for qh in 0..hq {
                let at = (t * hq + qh) * d;
                let q0 = &q[at..at + d];
                bys.clear();
                if by_scores {
                    // Softmax of this query over positions 0..=pos, then distances to positions
                    // past the sinks, drawn with those weights.
                    let mut qr = q0.to_vec();
                    rope.rotate(&mut qr, pos, 1.0);
                    let keys_seen = &seen[l][qh / g][..(pos + 1) * d];
                    p.clear();
                    p.extend(keys_seen.chunks_exact(d).map(|kr| {
                        inv_sqrt_d * kr.iter().zip(&qr).map(|(x, y)| x * y).sum::<f32>()
                    }));
                    let m = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    p.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let mass: f32 = p[o.skip..].iter().sum();
                    for _ in 0..o.draws {
                        let mut u = rng.random_range(0.0..1.0f32) * mass;
                        let mut j = pos;
                        for (i, &w) in p.iter().enumerate().skip(o.skip) {
                            if u < w {
                                j = i;
                                break;
                            }
                            u -= w;
                        }
                        bys.push(pos - j);
                    }
                } else if o.key_pre_rope {
                    bys.push(rng.random_range(0..ctx));
                } else {
                    bys.push(pos);
                }
                let share = 1.0 / bys.len() as f64;
                let m = &mut mk[l][(qh / g) * d * d..(qh / g + 1) * d * d];
                for &by in bys.iter() {
                    let mut a = q0.to_vec();
                    rope.rotate(&mut a, by, 1.0);
                    for i in 0..d {
                        let ai = a[i] as f64 * share;
                        for j in 0..d {
                            m[i * d + j] += ai * a[j] as f64;
                        }
                    }
                }
            }
        }
    })?;
    let n = keys[0][0].len() / d;
    if n < 4 * d {
        bail!("only {n} samples per head after skipping {} positions a window; calibration needs at least {}", o.skip, 4 * d);
    }
    let mut layers = BTreeMap::new();
    let (total, mut done) = (2 * nl * h, 0);
    for l in 0..nl {
        let wo = model.weights.layers[l].wo.flatten_all()?.to_vec1::<f32>()?;
        let hid = wo.len() / (hq * d);
        for key in [true, false] {
            let mut heads: Vec<KltHead> = Vec::with_capacity(h);
            for kv in 0..h {
                let weight = if !weighted {
                    identity(d)
                } else if key {
                    mk[l][kv * d * d..(kv + 1) * d * d]
                        .iter()
                        .map(|x| x / (nq * g).max(1) as f64)
                        .collect()
                } else {
                    // Values reach the residual stream through W_o: sum over the group's query heads
                    // of W_h W_h^T (W_h: the head's d rows of W_o).
                    let mut m = vec![0f64; d * d];
                    for qh in kv * g..(kv + 1) * g {
                        let w = &wo[qh * d * hid..(qh + 1) * d * hid];
                        for i in 0..d {
                            for j in i..d {
                                let s: f64 = (0..hid)
                                    .map(|c| w[i * hid + c] as f64 * w[j * hid + c] as f64)
                                    .sum();
                                m[i * d + j] += s;
                                if j != i {
                                    m[j * d + i] += s;
                                }
                            }
                        }
                    }
                    m
                };
                let x = if key { &keys[l][kv] } else { &vals[l][kv] };
                heads.push(fit_head(x, d, &weight, o.bmax, o.scaled[!key as usize])?);
                done += 1;
                progress(done, total);
            }
            layers.insert((l, key), heads);
        }
    }
    Ok(KltBooks {
        head_dim: d,
        heads: h,
        bmax: o.bmax,
        key_pre_rope: o.key_pre_rope,
        weight: o.weight.name().into(),
        scaled: o.scaled,
        layers,
    })
}

fn identity(d: usize) -> Vec<f64> {
    (0..d * d)
        .map(|i| (i % (d + 1) == 0) as u8 as f64)
        .collect()
}
