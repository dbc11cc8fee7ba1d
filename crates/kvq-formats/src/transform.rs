//! Transform-coding calibration for the KLT format ([`crate::formats::klt`]): per layer, stream and
//! KV head, a weighted Karhunen-Loeve transform (PCA in the space where squared error is what
//! attention pays: queries' second moment for keys, the output projection's for values) and, per
//! transformed component, 1-D Lloyd-Max quantizers at every width up to `bmax` with their measured
//! distortions, so a codec can give each component the bits it is worth (reverse water-filling,
//! greedy) at any rate without re-calibrating. Saved and loaded as one safetensors file.

use crate::calibrate::{f32_tensor, meta_usize, read_with_meta, save_f32_tensors};
use crate::error::{FormatError, Result};
use crate::linalg::sym_eigen;
use std::collections::{BTreeMap, HashMap};

/// Lloyd iterations per component and width (1-D k-means converges in a few dozen).
const LLOYD_ITERS: usize = 40;

/// Widest code a calibration file may hold levels for (2^bmax levels per component).
pub const MAX_BMAX: usize = 10;

/// Levels stored per component for widths 1..=bmax: 2 + 4 + ... + 2^bmax.
pub fn levels_len(bmax: usize) -> usize {
    (1 << (bmax + 1)) - 2
}

/// Offset of width `b`'s levels (b >= 1) inside one component's level list.
pub fn levels_off(b: usize) -> usize {
    debug_assert!(b >= 1, "width 0 has no levels");
    (1 << b) - 2
}

/// One KV head's fitted transform and quantizers.
#[derive(Debug, Clone, PartialEq)]
pub struct KltHead {
    /// Mean removed before the transform (d).
    pub mean: Vec<f32>,
    /// Forward transform, row-major d x d: z = fwd (x - mean).
    pub fwd: Vec<f32>,
    /// Inverse transform, row-major d x d: x = mean + inv z.
    pub inv: Vec<f32>,
    /// Per component, sorted Lloyd-Max levels for widths 1..=bmax back to back ([d][levels_len]).
    pub levels: Vec<f32>,
    /// Per component, mean squared error of z at widths 0..=bmax ([d][bmax + 1]; width 0 reads 0).
    pub dist: Vec<f32>,
    /// Per component, the calibration samples' quantiles at probabilities j / [`QUANT`], j = 0..=QUANT
    /// ([d][QUANT + 1]): the distribution that entropy-coded components ([`crate::ecsq`]) are modelled
    /// by. Empty in files written before it existed.
    pub quant: Vec<f32>,
}

/// Quantile intervals stored per component (the entropy coder's model resolution).
pub const QUANT: usize = 256;

/// Symmetric square root and inverse square root of a PSD matrix (n x n, f64), after adding
/// `ridge * trace / n` to the diagonal so that directions no query or output reads stay invertible.
pub fn sqrt_and_inv_sqrt(m: &[f64], n: usize, ridge: f64) -> (Vec<f64>, Vec<f64>) {
    let tr: f64 = (0..n).map(|i| m[i * n + i]).sum::<f64>().max(1e-30);
    let mut a = m.to_vec();
    for i in 0..n {
        a[i * n + i] += ridge * tr / n as f64;
    }
    let (w, u) = sym_eigen(&a, n);
    let floor = ridge * tr / n as f64;
    let mut s = vec![0f64; n * n];
    let mut si = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            let (mut x, mut y) = (0f64, 0f64);
            for (k, &wk) in w.iter().enumerate() {
                let wk = wk.max(floor);
                let p = u[i * n + k] * u[j * n + k];
                x += p * wk.sqrt();
                y += p / wk.sqrt();
            }
            s[i * n + j] = x;
            si[i * n + j] = y;
        }
    }
    (s, si)
}

/// A token's gain under `scale`: the RMS of its transformed components (1 where that is 0), what
/// the codec stores per token and divides the components by before quantizing.
pub fn token_gain(z: &[f32]) -> f32 {
    let g = (z.iter().map(|v| v * v).sum::<f32>() / z.len().max(1) as f32).sqrt();
    let g = half::f16::from_f32(g.min(65504.0)).to_f32();
    if g > 0.0 {
        g
    } else {
        1.0
    }
}

/// Fits one head: `x` is n samples of d (token-major), `weight` the d x d PSD matrix whose quadratic
/// form is the error that matters (identity: plain PCA). With `scaled`, the quantizers are fitted to
/// the components divided by each token's [`token_gain`] (gain-shape coding, as RVQ's per-token std).
pub fn fit_head(x: &[f32], d: usize, weight: &[f64], bmax: usize, scaled: bool) -> Result<KltHead> {
    if d == 0 || x.is_empty() || !x.len().is_multiple_of(d) || weight.len() != d * d {
        return Err(FormatError::Shape(format!(
            "klt fit: {} samples values for d={d}, weight of {} values",
            x.len(),
            weight.len()
        )));
    }
    if !(1..=MAX_BMAX).contains(&bmax) {
        return Err(FormatError::Shape(format!(
            "klt fit: bmax {bmax} outside 1..={MAX_BMAX}"
        )));
    }
    let n = x.len() / d;
    let mut mean = vec![0f64; d];
    for r in x.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0f64; d * d];
    let mut c = vec![0f64; d];
    for r in x.chunks_exact(d) {
        for (ci, (&v, &m)) in c.iter_mut().zip(r.iter().zip(&mean)) {
            *ci = v as f64 - m;
        }
        for i in 0..d {
            let ci = c[i];
            for j in i..d {
                cov[i * d + j] += ci * c[j];
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / n as f64;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    let (a, ai) = sqrt_and_inv_sqrt(weight, d, 1e-4);
    // C = A cov A in the weighted space; its eigenvectors V give z = V^T A (x - mean).
    let ac = matmul(&a, &cov, d);
    let cw = matmul(&ac, &a, d);
    let (_, v) = sym_eigen(&cw, d);
    let mut fwd = vec![0f32; d * d];
    let mut inv = vec![0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            // fwd[i][j] = sum_k V[k][i] A[k][j]; inv[i][j] = sum_k Ai[i][k] V[k][j].
            fwd[i * d + j] = (0..d).map(|k| v[k * d + i] * a[k * d + j]).sum::<f64>() as f32;
            inv[i * d + j] = (0..d).map(|k| ai[i * d + k] * v[k * d + j]).sum::<f64>() as f32;
        }
    }
    let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let lv = levels_len(bmax);
    let mut levels = Vec::with_capacity(d * lv);
    let mut dist = Vec::with_capacity(d * (bmax + 1));
    let mut quant = Vec::with_capacity(d * (QUANT + 1));
    // Every token's components ([token][component]), divided by its gain when scaled.
    let mut zall = vec![0f32; n * d];
    let mut xc = vec![0f32; d];
    for (zt, r) in zall.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        for ((c, &v), &m) in xc.iter_mut().zip(r).zip(&mean) {
            *c = v - m;
        }
        for (i, zi) in zt.iter_mut().enumerate() {
            *zi = crate::codec::dot(&fwd[i * d..(i + 1) * d], &xc);
        }
        if scaled {
            let g = token_gain(zt);
            zt.iter_mut().for_each(|v| *v /= g);
        }
    }
    for i in 0..d {
        let mut s: Vec<f64> = zall.iter().skip(i).step_by(d).map(|&v| v as f64).collect();
        s.sort_by(f64::total_cmp);
        quant.extend((0..=QUANT).map(|j| s[j * (n - 1) / QUANT] as f32));
        let q = Sorted::new(&s);
        dist.push((q.p2[n] / n as f64) as f32);
        for b in 1..=bmax {
            let (l, e) = q.lloyd(1 << b);
            levels.extend(l.iter().map(|&v| v as f32));
            dist.push(e as f32);
        }
    }
    Ok(KltHead {
        mean,
        fwd,
        inv,
        levels,
        dist,
        quant,
    })
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                c[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    c
}

/// Sorted 1-D samples with prefix sums: a Lloyd step is a binary search per level.
struct Sorted<'a> {
    s: &'a [f64],
    p1: Vec<f64>,
    p2: Vec<f64>,
}

impl<'a> Sorted<'a> {
    fn new(s: &'a [f64]) -> Self {
        let mut p1 = vec![0f64; s.len() + 1];
        let mut p2 = vec![0f64; s.len() + 1];
        for (i, &v) in s.iter().enumerate() {
            p1[i + 1] = p1[i] + v;
            p2[i + 1] = p2[i] + v * v;
        }
        Self { s, p1, p2 }
    }

    /// Squared error of the samples in [lo, hi) read as `l`.
    fn err(&self, lo: usize, hi: usize, l: f64) -> f64 {
        let cnt = (hi - lo) as f64;
        (self.p2[hi] - self.p2[lo] - 2.0 * l * (self.p1[hi] - self.p1[lo]) + l * l * cnt).max(0.0)
    }

    /// `k` Lloyd-Max levels (sorted; started at the equal-mass bins' means) and their mean squared error.
    fn lloyd(&self, k: usize) -> (Vec<f64>, f64) {
        let n = self.s.len();
        let mut l: Vec<f64> = (0..k)
            .map(|j| {
                let (lo, hi) = (j * n / k, ((j + 1) * n / k).max(j * n / k + 1).min(n));
                (self.p1[hi] - self.p1[lo]) / (hi - lo) as f64
            })
            .collect();
        let mut cuts = vec![0usize; k + 1];
        for _ in 0..LLOYD_ITERS {
            self.cuts(&l, &mut cuts);
            let mut moved = false;
            for j in 0..k {
                let (lo, hi) = (cuts[j], cuts[j + 1]);
                if hi > lo {
                    let m = (self.p1[hi] - self.p1[lo]) / (hi - lo) as f64;
                    moved |= (m - l[j]).abs() > 1e-12 * (1.0 + m.abs());
                    l[j] = m;
                }
            }
            l.sort_by(f64::total_cmp);
            if !moved {
                break;
            }
        }
        self.cuts(&l, &mut cuts);
        let e = (0..k)
            .map(|j| self.err(cuts[j], cuts[j + 1], l[j]))
            .sum::<f64>()
            / n as f64;
        (l, e)
    }

    /// Sample index ranges nearest to each level: cuts[j]..cuts[j+1] read as level j.
    fn cuts(&self, l: &[f64], cuts: &mut [usize]) {
        let k = l.len();
        cuts[0] = 0;
        cuts[k] = self.s.len();
        for j in 1..k {
            let t = 0.5 * (l[j - 1] + l[j]);
            cuts[j] = self.s.partition_point(|&v| v < t);
        }
    }
}

/// A model's KLT calibration: per layer and stream, every KV head's [`KltHead`].
#[derive(Debug, Clone, PartialEq)]
pub struct KltBooks {
    /// Channels per head.
    pub head_dim: usize,
    /// KV heads per layer.
    pub heads: usize,
    /// Widest code with fitted levels.
    pub bmax: usize,
    /// Keys were fitted before RoPE (the codec then stores pre-RoPE keys).
    pub key_pre_rope: bool,
    /// How the transform was weighted (`attention`, `scores`: attention with key distances drawn from
    /// the queries' softmax, or `none`), recorded for the reader.
    pub weight: String,
    /// Keys / values coded with a per-token gain (f16 per token and head, see [`token_gain`]).
    pub scaled: [bool; 2],
    /// (layer, key?) -> heads.
    pub layers: BTreeMap<(usize, bool), Vec<KltHead>>,
}

fn tensor_name(layer: usize, key: bool, part: &str) -> String {
    format!("layer.{layer}.{}.{part}", if key { "k" } else { "v" })
}

const PARTS: [&str; 6] = ["mean", "fwd", "inv", "levels", "dist", "quant"];

impl KltBooks {
    fn shape(&self, part: &str) -> Vec<usize> {
        let (h, d) = (self.heads, self.head_dim);
        match part {
            "mean" => vec![h, d],
            "fwd" | "inv" => vec![h, d, d],
            "levels" => vec![h, d, levels_len(self.bmax)],
            "quant" => vec![h, d, QUANT + 1],
            _ => vec![h, d, self.bmax + 1],
        }
    }

    /// Writes the file: f32 tensors `layer.{l}.{k|v}.{mean,fwd,inv,levels,dist,quant}` with heads leading,
    /// shape metadata and `format=klt`.
    pub fn save(&self, path: &str) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (&(l, key), heads) in &self.layers {
            for part in PARTS {
                if part == "quant" && heads.iter().any(|h| h.quant.is_empty()) {
                    continue;
                }
                let v: Vec<f32> = heads
                    .iter()
                    .flat_map(|h| match part {
                        "mean" => h.mean.iter(),
                        "fwd" => h.fwd.iter(),
                        "inv" => h.inv.iter(),
                        "levels" => h.levels.iter(),
                        "quant" => h.quant.iter(),
                        _ => h.dist.iter(),
                    })
                    .copied()
                    .collect();
                tensors.push((tensor_name(l, key, part), self.shape(part), v));
            }
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "klt".to_string());
        meta.insert("head_dim".to_string(), self.head_dim.to_string());
        meta.insert("heads".to_string(), self.heads.to_string());
        meta.insert("bmax".to_string(), self.bmax.to_string());
        meta.insert(
            "key_rope".to_string(),
            if self.key_pre_rope { "pre" } else { "post" }.to_string(),
        );
        meta.insert("weight".to_string(), self.weight.clone());
        for (k, on) in ["key_scale", "value_scale"].iter().zip(self.scaled) {
            meta.insert(k.to_string(), if on { "on" } else { "off" }.to_string());
        }
        save_f32_tensors(path, &tensors, meta)
    }

    /// Reads a file written by [`Self::save`], checking metadata, shapes and finiteness.
    pub fn load(path: &str) -> Result<Self> {
        let err = |reason: String| FormatError::File {
            path: path.into(),
            reason,
        };
        let (data, md) = read_with_meta(path)?;
        if md.get("format").map(String::as_str) != Some("klt") {
            return Err(err(
                "not a KLT calibration (metadata format=klt missing); write one with `kvq calibrate --method klt`".into(),
            ));
        }
        let num = |k: &str| meta_usize(&md, k, path);
        let (head_dim, heads, bmax) = (num("head_dim")?, num("heads")?, num("bmax")?);
        if head_dim == 0 || heads == 0 || !(1..=MAX_BMAX).contains(&bmax) {
            return Err(err(format!(
                "metadata head_dim={head_dim} heads={heads} bmax={bmax} out of range"
            )));
        }
        let key_pre_rope = match md.get("key_rope").map(String::as_str) {
            Some("pre") => true,
            Some("post") => false,
            other => {
                return Err(err(format!(
                    "metadata key_rope={other:?}: expected pre or post"
                )))
            }
        };
        let mut scaled = [false; 2];
        for (k, on) in ["key_scale", "value_scale"].iter().zip(scaled.iter_mut()) {
            *on = match md.get(*k).map(String::as_str) {
                Some("on") => true,
                Some("off") | None => false,
                Some(v) => return Err(err(format!("metadata {k}={v}: expected on or off"))),
            };
        }
        let mut books = Self {
            head_dim,
            heads,
            bmax,
            key_pre_rope,
            weight: md.get("weight").cloned().unwrap_or_default(),
            scaled,
            layers: BTreeMap::new(),
        };
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| err(e.to_string()))?;
        let mut parts: BTreeMap<(usize, bool), HashMap<&str, Vec<f32>>> = BTreeMap::new();
        for (name, view) in st.tensors() {
            let bits: Vec<&str> = name.split('.').collect();
            // `part` is taken from PARTS, so the map below can key on the 'static name.
            let parsed = match bits.as_slice() {
                ["layer", l, s @ ("k" | "v"), part] => PARTS
                    .iter()
                    .find(|p| *p == part)
                    .and_then(|&part| l.parse::<usize>().ok().map(|l| (l, *s == "k", part))),
                _ => None,
            };
            let (l, key, part) =
                parsed.ok_or_else(|| err(format!("unexpected tensor '{name}'")))?;
            let v = f32_tensor(&name, &view, &books.shape(part)).map_err(err)?;
            parts.entry((l, key)).or_default().insert(part, v);
        }
        for (at, mut p) in parts {
            let mut take = |part: &str| {
                p.remove(part).ok_or_else(|| {
                    err(format!(
                        "tensor '{}' missing",
                        tensor_name(at.0, at.1, part)
                    ))
                })
            };
            let (mean, fwd, inv, levels, dist) = (
                take("mean")?,
                take("fwd")?,
                take("inv")?,
                take("levels")?,
                take("dist")?,
            );
            // Quantiles are optional: files from before entropy coding lack them.
            let quant = p.remove("quant");
            let (d, lv, nd) = (head_dim, levels_len(bmax), bmax + 1);
            let heads = (0..heads)
                .map(|h| KltHead {
                    mean: mean[h * d..(h + 1) * d].to_vec(),
                    fwd: fwd[h * d * d..(h + 1) * d * d].to_vec(),
                    inv: inv[h * d * d..(h + 1) * d * d].to_vec(),
                    levels: levels[h * d * lv..(h + 1) * d * lv].to_vec(),
                    dist: dist[h * d * nd..(h + 1) * d * nd].to_vec(),
                    quant: quant.as_ref().map_or_else(Vec::new, |q| {
                        q[h * d * (QUANT + 1)..(h + 1) * d * (QUANT + 1)].to_vec()
                    }),
                })
                .collect();
            books.layers.insert(at, heads);
        }
        Ok(books)
    }
}

/// Bits per component for one head at `total` bits per token: greedy reverse water-filling on the
/// fitted distortions (each next bit to the component whose error it lowers most), capped at `bmax`.
pub fn allocate(dist: &[f32], d: usize, bmax: usize, total: usize) -> Vec<u8> {
    let mut b = vec![0u8; d];
    let gain = |i: usize, bi: u8| -> f32 {
        let at = i * (bmax + 1) + bi as usize;
        dist[at] - dist[at + 1]
    };
    for _ in 0..total.min(d * bmax) {
        let best = (0..d)
            .filter(|&i| (b[i] as usize) < bmax)
            .max_by(|&i, &j| gain(i, b[i]).total_cmp(&gain(j, b[j])).then(j.cmp(&i)));
        match best {
            Some(i) => b[i] += 1,
            None => break,
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn correlated(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mix: Vec<f32> = (0..d * d).map(|_| r.random_range(-1.0..1.0)).collect();
        let mut x = vec![0f32; n * d];
        for t in 0..n {
            // Latent scales fall geometrically: a steep spectrum, like real K/V.
            let l: Vec<f32> = (0..d)
                .map(|i| r.random_range(-1.0f32..1.0) * 0.7f32.powi(i as i32) * 4.0)
                .collect();
            for j in 0..d {
                x[t * d + j] = 0.5 + (0..d).map(|i| mix[j * d + i] * l[i]).sum::<f32>();
            }
        }
        x
    }

    #[test]
    fn transform_inverts_and_distortions_fall_with_bits() {
        let d = 8;
        let x = correlated(2000, d, 1);
        let mut w = vec![0f64; d * d];
        (0..d).for_each(|i| w[i * d + i] = 1.0 + i as f64);
        let h = fit_head(&x, d, &w, 4, false).unwrap();
        // inv * fwd = identity (to f32 rounding of a well-conditioned weight).
        for i in 0..d {
            for j in 0..d {
                let v: f32 = (0..d).map(|k| h.inv[i * d + k] * h.fwd[k * d + j]).sum();
                assert!((v - (i == j) as u8 as f32).abs() < 1e-3, "{i},{j}: {v}");
            }
        }
        for c in 0..d {
            let dc = &h.dist[c * 5..c * 5 + 5];
            assert!(dc.windows(2).all(|p| p[1] <= p[0] * 1.0001), "{dc:?}");
            let l = &h.levels[c * levels_len(4)..(c + 1) * levels_len(4)];
            for b in 1..=4 {
                let lb = &l[levels_off(b)..levels_off(b) + (1 << b)];
                assert!(lb.windows(2).all(|p| p[0] <= p[1]));
            }
        }
        // Components come out by decreasing weighted variance.
        let var0: Vec<f32> = (0..d).map(|c| h.dist[c * 5]).collect();
        assert!(var0.windows(2).all(|p| p[0] >= p[1] * 0.999), "{var0:?}");
    }

    #[test]
    fn lloyd_beats_even_steps_on_gaussian() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut s: Vec<f64> = (0..20000)
            .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut r))
            .collect();
        s.sort_by(f64::total_cmp);
        let q = Sorted::new(&s);
        let (l, e) = q.lloyd(4);
        // Max (1960): 4 levels of a unit normal at +-0.4528, +-1.5104, error 0.1175.
        assert!((e - 0.1175).abs() < 0.01, "{e}");
        assert!(
            (l[3] - 1.5104).abs() < 0.08 && (l[2] - 0.4528).abs() < 0.05,
            "{l:?}"
        );
    }

    #[test]
    fn allocation_spends_exactly_the_budget_on_the_largest_components() {
        let (d, bmax) = (4, 3);
        // dist per component at 0..=3 bits: variances 16, 4, 1, 0.25, each bit quarters the error.
        let dist: Vec<f32> = [16f32, 4.0, 1.0, 0.25]
            .iter()
            .flat_map(|&v| (0..=bmax).map(move |b| v / 4f32.powi(b as i32)))
            .collect();
        let b = allocate(&dist, d, bmax, 6);
        assert_eq!(b.iter().map(|&x| x as usize).sum::<usize>(), 6);
        assert_eq!(b, vec![3, 2, 1, 0]);
        assert_eq!(allocate(&dist, d, bmax, 100), vec![3, 3, 3, 3]);
    }

    #[test]
    fn save_load_roundtrip_and_bad_files() {
        let d = 4;
        let x = correlated(300, d, 2);
        let w: Vec<f64> = (0..d * d)
            .map(|i| (i % (d + 1) == 0) as u8 as f64)
            .collect();
        let head = fit_head(&x, d, &w, 3, true).unwrap();
        let mut layers = BTreeMap::new();
        layers.insert((0, true), vec![head.clone(), head.clone()]);
        layers.insert((0, false), vec![head.clone(), head]);
        let b = KltBooks {
            head_dim: d,
            heads: 2,
            bmax: 3,
            key_pre_rope: true,
            weight: "attention".into(),
            scaled: [false, true],
            layers,
        };
        let dir = std::env::temp_dir().join(format!("kvq-klt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("b.safetensors");
        let ps = p.to_str().unwrap();
        b.save(ps).unwrap();
        assert_eq!(KltBooks::load(ps).unwrap(), b);
        std::fs::write(&p, b"junk").unwrap();
        let e = KltBooks::load(ps).unwrap_err().to_string();
        assert!(e.contains("b.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
