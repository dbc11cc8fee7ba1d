//! Trellis-coded quantization of KLT components at fixed widths (`klt:...,code=tcq`): a block spends
//! the fixed codes' bits (component c of width b_c > 0: b_c bits a token), but each component's bits
//! along the block's tokens form one trellis code (its stream: token t's b bits at t b), and an
//! element's value is a table entry named by its own b bits and the H stream bits before them (a
//! "bitshift" trellis, as QTIP codes weights; Tseng et al. 2024). The encoder (Viterbi over the H-bit
//! histories) picks every token's bits with its neighbours'; the reader needs, for token t of a
//! component, bits [t b - H, t b + b) of its stream (zeros before the stream's start) and one lookup,
//! `sigma_c lut_b[window]`: fixed length, no dependence between elements, which a GPU kernel can
//! afford (docs/GPU.md "Trellis-coded keys"), unlike an entropy code. (One trellis over a block's
//! tokens and components together, the fixed codes' token-major order, coded the default model's keys
//! worse: 3.00e-2 against 2.66e-2, docs/QUALITY.md "Trellis-coded KLT".)
//!
//! Tables, one per width b (2^(b + H) f32 in units of a component's deviation) and shared by a layer
//! stream's heads, are fitted when the codec is built, deterministically, from the calibration file's
//! quantiles: each component's quantile samples, in a hashed order, form synthetic streams of a block's
//! length, then three rounds of Viterbi and centroids.

/// History bits: an element's table index is its own bits and the H bits before them.
pub const H: usize = 6;

/// Quantile samples per component used to fit the tables (synthetic tokens).
const FIT_SAMPLES: usize = 256;
/// Tokens per block.
pub const SPAN: usize = 32;

/// One head's trellis codes.
#[derive(Debug, Clone)]
pub struct Tcq {
    widths: Vec<u8>,
    /// Per component, its deviation (the tables' unit).
    sigma: Vec<f32>,
    /// Per width b (index b), its table of 2^(b + H) values; empty for unused widths.
    luts: std::sync::Arc<Vec<Vec<f32>>>,
    /// The layer's first head: the one that counts the shared tables in [`Tcq::table_len`].
    first: bool,
}

/// A component's quantile samples at probabilities (i + 0.5) / n from its [`crate::transform::QUANT`]
/// + 1 stored quantiles (linear between them).
fn samples(q: &[f32], n: usize) -> Vec<f64> {
    let last = q.len() - 1;
    (0..n)
        .map(|i| {
            let p = (i as f64 + 0.5) / n as f64 * last as f64;
            let j = (p.floor() as usize).min(last - 1);
            let f = p - j as f64;
            q[j] as f64 * (1.0 - f) + q[j + 1] as f64 * f
        })
        .collect()
}

/// A fixed scrambling of integers (splitmix64's finalizer): the fitting data's order and the tables'
/// initial assignment of quantiles to entries.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// The least-error trellis code of the elements `x` (value in deviations, width b > 0), in order,
/// from a zero history: each element's table index W = history | bits << H (b + H bits), the next
/// history W >> b. Returns the indices; an element's bits are W >> H.
pub fn viterbi(x: &[(f64, usize)], luts: &[Vec<f32>]) -> Vec<u32> {
    const NH: usize = 1 << H;
    let mut cost = [f64::INFINITY; NH];
    cost[0] = 0.0;
    // Per element and new history: the index W that reached it (its old history is W's low H bits).
    let mut back = vec![0u32; x.len() * NH];
    for (i, &(v, b)) in x.iter().enumerate() {
        let lut = &luts[b];
        let mut next = [f64::INFINITY; NH];
        let row = &mut back[i * NH..(i + 1) * NH];
        for (h, &c) in cost.iter().enumerate() {
            if c == f64::INFINITY {
                continue;
            }
            for bits in 0..1usize << b {
                let w = h | bits << H;
                let e = c + (v - lut[w] as f64).powi(2);
                let nh = w >> b;
                // (A NaN input leaves later costs unset: those elements get zero bits.)
                if e < next[nh] {
                    next[nh] = e;
                    row[nh] = w as u32;
                }
            }
        }
        cost = next;
    }
    let mut h = (0..NH)
        .min_by(|&a, &b| cost[a].total_cmp(&cost[b]))
        .unwrap_or(0);
    let mut out = vec![0u32; x.len()];
    for i in (0..x.len()).rev() {
        let w = back[i * NH + h];
        out[i] = w;
        h = w as usize & (NH - 1);
    }
    out
}

/// Fits the tables (index = width) to `blocks`: sequences of (value in deviations, width) as
/// [`viterbi`] codes them; widths above `bmax` do not occur.
pub fn fit(blocks: &[Vec<(f64, usize)>], bmax: usize) -> Vec<Vec<f32>> {
    let mut luts = vec![Vec::new(); bmax + 1];
    for (b, lut) in luts.iter_mut().enumerate().skip(1) {
        let mut vals: Vec<f64> = blocks
            .iter()
            .flatten()
            .filter(|e| e.1 == b)
            .map(|e| e.0)
            .collect();
        if vals.is_empty() {
            continue;
        }
        vals.sort_by(f64::total_cmp);
        let n = 1usize << (b + H);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&w| mix(w as u64 ^ (b as u64) << 32));
        *lut = vec![0f32; n];
        for (r, &w) in order.iter().enumerate() {
            let at = ((r as f64 + 0.5) / n as f64 * vals.len() as f64) as usize;
            lut[w] = vals[at.min(vals.len() - 1)] as f32;
        }
    }
    for _ in 0..3 {
        let mut acc: Vec<Vec<(f64, usize)>> =
            luts.iter().map(|l| vec![(0.0, 0); l.len()]).collect();
        for x in blocks {
            for (&(v, b), w) in x.iter().zip(viterbi(x, &luts)) {
                let a = &mut acc[b][w as usize];
                a.0 += v;
                a.1 += 1;
            }
        }
        for (lut, acc) in luts.iter_mut().zip(acc) {
            for (l, (sum, c)) in lut.iter_mut().zip(acc) {
                if c > 0 {
                    *l = (sum / c as f64) as f32;
                }
            }
        }
    }
    luts
}

impl Tcq {
    /// The codes of one layer stream's heads: `widths[h]` and `quant[h]` ([d][QUANT + 1]) per head;
    /// the tables are shared by the heads (fitted on all of their components).
    pub fn layer(widths: &[Vec<u8>], quant: &[&[f32]], d: usize) -> Vec<Tcq> {
        let q1 = crate::transform::QUANT + 1;
        let bmax = widths.iter().flatten().copied().max().unwrap_or(0) as usize;
        let mut sigmas = Vec::new();
        let mut streams = Vec::new();
        for (h, (w, q)) in widths.iter().zip(quant).enumerate() {
            let mut sigma = vec![1f32; d];
            for c in 0..d {
                let s = samples(&q[c * q1..(c + 1) * q1], FIT_SAMPLES);
                let v = s.iter().map(|v| v * v).sum::<f64>() / s.len() as f64;
                sigma[c] = (v.sqrt() as f32).max(1e-20);
                if w[c] == 0 {
                    continue;
                }
                // The component's quantile samples in a hashed order, in streams of a block's length.
                let mut s: Vec<(u64, f64)> = s
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (mix(((h * d + c) * FIT_SAMPLES + i) as u64), v))
                    .collect();
                s.sort_by_key(|p| p.0);
                let x: Vec<(f64, usize)> = s
                    .into_iter()
                    .map(|p| (p.1 / sigma[c] as f64, w[c] as usize))
                    .collect();
                streams.extend(x.chunks(SPAN).map(<[_]>::to_vec));
            }
            sigmas.push(sigma);
        }
        let luts = std::sync::Arc::new(fit(&streams, bmax));
        widths
            .iter()
            .zip(sigmas)
            .enumerate()
            .map(|(h, (w, sigma))| Tcq {
                widths: w.clone(),
                sigma,
                luts: luts.clone(),
                first: h == 0,
            })
            .collect()
    }

    /// Each component's deviation, the tables' unit (from the calibration quantiles).
    pub fn sigma(&self) -> &[f32] {
        &self.sigma
    }

    /// Code bits a token (the same as fixed codes of these widths).
    pub fn bits(&self) -> usize {
        self.widths.iter().map(|&b| b as usize).sum()
    }

    /// Writes a block's components `z` ([SPAN][d]) from bit `pos`: each coded component's stream in
    /// turn, SPAN x b_c bits.
    pub fn put(&self, z: &[f32], out: &mut [u8], mut pos: usize) {
        let d = self.widths.len();
        for (c, &b) in self.widths.iter().enumerate() {
            let b = b as usize;
            if b == 0 {
                continue;
            }
            let x: Vec<(f64, usize)> = (0..SPAN)
                .map(|t| ((z[t * d + c] / self.sigma[c]) as f64, b))
                .collect();
            for w in viterbi(&x, &self.luts) {
                crate::bits::put_at(out, pos, w >> H, b as u32);
                pos += b;
            }
        }
    }

    /// Reads a block's components into `z` ([SPAN][d]; 0 where no bits) from bit `pos`.
    pub fn get(&self, block: &[u8], z: &mut [f32], mut pos: usize) {
        let d = self.widths.len();
        for (c, &b) in self.widths.iter().enumerate() {
            let b = b as usize;
            for t in 0..SPAN {
                z[t * d + c] = if b == 0 {
                    0.0
                } else {
                    // Token t's b bits and the H stream bits before them, in one read (zeros before
                    // the stream's start: the window is shifted up by the bits it lacks).
                    let (p, lo) = (pos + t * b, pos + (t * b).saturating_sub(H));
                    let w = crate::bits::get_at(block, lo, (p + b - lo) as u32) << (H - (p - lo));
                    self.sigma[c] * self.luts[b][w as usize]
                };
            }
            pos += SPAN * b;
        }
    }

    /// f32 entries this head adds to the stored tables: its deviations, and for the layer's first head
    /// the tables the heads share.
    pub fn table_len(&self) -> usize {
        let shared = if self.first {
            self.luts.iter().map(Vec::len).sum::<usize>()
        } else {
            0
        };
        shared + self.sigma.len()
    }
}
