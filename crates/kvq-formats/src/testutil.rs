//! Test data shared by the formats' tests and the GPU parity checks: seeded Gaussian K/V with the
//! outlier channels real keys have, exact attention in f64, and relative errors.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// `n` vectors of `d` channels, N(0,1), with `outliers` channels scaled by 10 (fixed per seed) and a
/// per-channel offset, like real pre-RoPE keys.
pub fn gaussian_with_outliers(n: usize, d: usize, outliers: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).expect("unit normal");
    let mut scale = vec![1.0f32; d];
    for _ in 0..outliers {
        scale[rng.random_range(0..d)] = 10.0;
    }
    let offset: Vec<f32> = (0..d).map(|_| normal.sample(&mut rng) * 0.5).collect();
    (0..n * d)
        .map(|i| normal.sample(&mut rng) * scale[i % d] + offset[i % d])
        .collect()
}

/// Relative L2 error ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Exact attention of one query over `t` keys/values ([t][d]) in f64, scale 1/sqrt(d).
pub fn exact_attention(q: &[f32], k: &[f32], v: &[f32], d: usize) -> Vec<f32> {
    let t = k.len() / d;
    let scale = 1.0 / (d as f64).sqrt();
    let s: Vec<f64> = (0..t)
        .map(|i| {
            (0..d)
                .map(|c| q[c] as f64 * k[i * d + c] as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    (0..d)
        .map(|c| ((0..t).map(|i| e[i] * v[i * d + c] as f64).sum::<f64>() / z) as f32)
        .collect()
}

/// What [`attention_check`] measured for one format on one random cache.
#[derive(Debug, Clone, Copy)]
pub struct AttentionCheck {
    /// Relative error of the mirror attention against exact f64 attention on the unquantized K/V.
    pub vs_exact: f64,
    /// Relative difference between the fused (per-block) reader and the mirror reader.
    pub fused_vs_mirror: f64,
    /// Relative error of the decoded (rotated) keys against the exact rotated keys.
    pub key_err: f64,
    /// Relative error of the decoded values.
    pub value_err: f64,
    /// Bits per element held, window counted.
    pub bits_per_elem: f64,
}

/// Builds a one-layer cache of `format` with `kv_heads` heads of `d` channels, appends `t` random
/// tokens in chunks of `chunk`, and compares both readers with exact attention for `q_heads` queries.
pub fn attention_check(
    format: &str,
    t: usize,
    d: usize,
    kv_heads: usize,
    q_heads: usize,
    chunk: usize,
    seed: u64,
) -> crate::Result<AttentionCheck> {
    use crate::rope::{Rope, RopeStyle};
    let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
    let plan = crate::KvPlan::parse(format, 1)?;
    let mut cache = plan.build_caches(kv_heads, &rope)?.remove(0);
    let k = gaussian_with_outliers(t * kv_heads, d, 2, seed);
    let v = gaussian_with_outliers(t * kv_heads, d, 0, seed + 1);
    let mut done = 0;
    while done < t {
        let n = chunk.min(t - done);
        let r = done * kv_heads * d..(done + n) * kv_heads * d;
        cache.append(&k[r.clone()], &v[r], n)?;
        done += n;
    }
    let q = gaussian_with_outliers(q_heads, d, 0, seed + 2);
    let mut out = vec![0f32; q_heads * d];
    let mut fused = vec![0f32; q_heads * d];
    cache.attend(&q, t, &mut out)?;
    cache.attend_fused(&q, t, &mut fused)?;
    // Exact reference on the original (f16-rounded, rotated) K/V, head by head.
    let g = q_heads / kv_heads;
    let mut exact = vec![0f32; q_heads * d];
    let (mut kd, mut ke, mut vd, mut ve) = (vec![], vec![], vec![], vec![]);
    for h in 0..kv_heads {
        let mut kh = vec![0f32; t * d];
        let mut vh = vec![0f32; t * d];
        for i in 0..t {
            for c in 0..d {
                kh[i * d + c] = half::f16::from_f32(k[(i * kv_heads + h) * d + c]).to_f32();
                vh[i * d + c] = half::f16::from_f32(v[(i * kv_heads + h) * d + c]).to_f32();
            }
            rope.rotate(&mut kh[i * d..(i + 1) * d], i, 1.0);
        }
        for qi in h * g..(h + 1) * g {
            let o = exact_attention(&q[qi * d..(qi + 1) * d], &kh, &vh, d);
            exact[qi * d..(qi + 1) * d].copy_from_slice(&o);
        }
        kd.extend_from_slice(cache.decoded(crate::Stream::Key, h));
        vd.extend_from_slice(cache.decoded(crate::Stream::Value, h));
        ke.extend(kh);
        ve.extend(vh);
    }
    Ok(AttentionCheck {
        vs_exact: rel_err(&out, &exact),
        fused_vs_mirror: rel_err(&fused, &out),
        key_err: rel_err(&kd, &ke),
        value_err: rel_err(&vd, &ve),
        bits_per_elem: cache.bytes().bits_per_elem(),
    })
}
