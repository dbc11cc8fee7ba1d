//! RVQ codebook learning (Kumar, arXiv 2410.15704): per stage, k-means initialization from samples,
//! then EMA updates (decay, Laplace-smoothed counts) over mini-batches of residuals; stage s+1 learns on
//! what stage s leaves. Codebooks of a model are saved and loaded as one safetensors file.

use crate::error::{FormatError, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap};

/// Settings of one codebook learning run.
#[derive(Debug, Clone)]
pub struct LearnOpts {
    /// Dimensions per vector (the RVQ group).
    pub group: usize,
    /// Codewords per stage.
    pub codes: usize,
    /// Residual stages.
    pub depth: usize,
    /// Passes over the samples per stage.
    pub iters: usize,
    /// EMA decay of the codeword sums and counts.
    pub decay: f32,
    /// Mini-batch of samples per EMA update.
    pub batch: usize,
    /// Seed of initialization and batch order.
    pub seed: u64,
}

impl Default for LearnOpts {
    fn default() -> Self {
        Self {
            group: 32,
            codes: 2048,
            depth: 8,
            iters: 4,
            decay: 0.99,
            batch: 1024,
            seed: 0,
        }
    }
}

/// Index of the codeword nearest to `x` (squared L2) among `codes` rows of `cb`.
pub fn nearest(cb: &[f32], x: &[f32]) -> usize {
    let g = x.len();
    let mut best = (f32::INFINITY, 0);
    for (i, c) in cb.chunks_exact(g).enumerate() {
        let mut d = 0f32;
        for j in 0..g {
            let t = x[j] - c[j];
            d += t * t;
        }
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

/// Learns `depth` codebooks ([depth][codes][group], flat) from `samples` (n x group).
/// `progress(stage, depth)` is called after each stage.
pub fn learn(
    samples: &[f32],
    o: &LearnOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let g = o.group;
    if g == 0 || samples.is_empty() || !samples.len().is_multiple_of(g) {
        return Err(FormatError::Shape(format!(
            "{} samples values not a non-empty multiple of group {g}",
            samples.len()
        )));
    }
    let n = samples.len() / g;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed);
    let mut resid = samples.to_vec();
    let mut out = Vec::with_capacity(o.depth * o.codes * g);
    for stage in 0..o.depth {
        // k-means++-free init: distinct random samples (cycled with a small jitter if too few).
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut cb = vec![0f32; o.codes * g];
        for c in 0..o.codes {
            let s = order[c % n];
            let jitter = if c >= n { 1e-3 * (c / n) as f32 } else { 0.0 };
            for j in 0..g {
                cb[c * g + j] = resid[s * g + j] + jitter * ((c * 31 + j) % 7) as f32;
            }
        }
        let mut sums: Vec<f32> = cb.clone();
        let mut counts = vec![1f32; o.codes];
        for _ in 0..o.iters {
            order.shuffle(&mut rng);
            for batch in order.chunks(o.batch.max(1)) {
                let mut bs = vec![0f32; o.codes * g];
                let mut bc = vec![0f32; o.codes];
                for &s in batch {
                    let x = &resid[s * g..(s + 1) * g];
                    let k = nearest(&cb, x);
                    bc[k] += 1.0;
                    for j in 0..g {
                        bs[k * g + j] += x[j];
                    }
                }
                for c in 0..o.codes {
                    counts[c] = o.decay * counts[c] + (1.0 - o.decay) * bc[c];
                    for j in 0..g {
                        sums[c * g + j] =
                            o.decay * sums[c * g + j] + (1.0 - o.decay) * bs[c * g + j];
                    }
                }
                // Laplace smoothing of the counts (as in VQ-VAE EMA updates) keeps rare codes finite.
                let ctot: f32 = counts.iter().sum();
                let eps = 1e-5;
                for c in 0..o.codes {
                    let cnt = (counts[c] + eps) / (ctot + o.codes as f32 * eps) * ctot;
                    if cnt > 1e-6 {
                        for j in 0..g {
                            cb[c * g + j] = sums[c * g + j] / cnt;
                        }
                    }
                }
            }
        }
        for s in 0..n {
            let x = &mut resid[s * g..(s + 1) * g];
            let k = nearest(&cb, x);
            for j in 0..g {
                x[j] -= cb[k * g + j];
            }
        }
        out.extend_from_slice(&cb);
        progress(stage + 1, o.depth);
    }
    Ok(out)
}

/// Learns one codebook set per channel group position: `samples` (n x group) are the group vectors of
/// tokens with `sets` groups each (vector `i` belongs to group `i % sets`, the order of
/// [`crate::formats::rvq::group_vectors`]); returns `[sets][depth][codes][group]`, flat. `sets = 1` is
/// [`learn`]. `progress(stage, depth)` is called after each stage of each set.
pub fn learn_sets(
    samples: &[f32],
    sets: usize,
    o: &LearnOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let g = o.group;
    if sets == 0 || g == 0 || !samples.len().is_multiple_of(g * sets) {
        return Err(FormatError::Shape(format!(
            "{} samples values not a multiple of {sets} groups of {g}",
            samples.len()
        )));
    }
    if sets == 1 {
        return learn(samples, o, progress);
    }
    let mut out = Vec::with_capacity(sets * o.depth * o.codes * g);
    for s in 0..sets {
        let mine: Vec<f32> = samples
            .chunks_exact(g)
            .skip(s)
            .step_by(sets)
            .flatten()
            .copied()
            .collect();
        let o = LearnOpts {
            seed: o.seed.wrapping_add(s as u64),
            ..o.clone()
        };
        out.extend(learn(&mine, &o, progress)?);
    }
    Ok(out)
}

/// A model's codebooks: one [depth][codes][group] set per layer and stream (or, with `sets` > 1, one
/// per channel group position of the layer stream: [sets][depth][codes][group]), plus their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebooks {
    /// Dimensions per codeword.
    pub group: usize,
    /// Codewords per stage.
    pub codes: usize,
    /// Stages stored.
    pub depth: usize,
    /// Codebook sets per layer stream: 1 (every group shares one) or head_dim / group (one per group
    /// position, shared by the heads; RVQ's `books=group`).
    pub sets: usize,
    /// Key grouping the codebooks were learned with (`strided` or `contiguous`).
    pub key_groups: String,
    /// `layer.{l}.k` / `layer.{l}.v` -> flat codebooks.
    pub tables: BTreeMap<String, Vec<f32>>,
}

/// Writes f32 tensors (name, shape, values) and metadata as one safetensors file: the form of every
/// calibration file (RVQ codebooks, KLT transforms).
pub fn save_f32_tensors(
    path: &str,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let err = |e: safetensors::SafeTensorError| FormatError::File {
        path: path.into(),
        reason: e.to_string(),
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, shape, _), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(err)
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(meta), std::path::Path::new(path)).map_err(err)
}

/// A calibration file's bytes and its safetensors metadata (empty when it has none); errors name the
/// path.
pub fn read_with_meta(path: &str) -> Result<(Vec<u8>, HashMap<String, String>)> {
    let err = |reason: String| FormatError::File {
        path: path.into(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data)
        .map_err(|e| err(format!("not a safetensors file: {e}")))?;
    let md = meta.metadata().clone().unwrap_or_default();
    Ok((data, md))
}

/// The unsigned integer stored under `key` in a calibration file's metadata; the error names `path`.
pub fn meta_usize(md: &HashMap<String, String>, key: &str, path: &str) -> Result<usize> {
    md.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| FormatError::File {
            path: path.into(),
            reason: format!("metadata '{key}' missing or not a number"),
        })
}

/// One calibration tensor's values, or why it cannot be one: not F32 of `shape`, or non-finite.
pub fn f32_tensor(
    name: &str,
    view: &safetensors::tensor::TensorView,
    shape: &[usize],
) -> std::result::Result<Vec<f32>, String> {
    if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
        return Err(format!(
            "tensor '{name}' is {:?} {:?}, expected F32 {shape:?}",
            view.dtype(),
            view.shape()
        ));
    }
    let v: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(format!("tensor '{name}' has non-finite values"));
    }
    Ok(v)
}

/// Name of one layer stream's tensor in a codebook file.
pub fn table_name(layer: usize, key: bool) -> String {
    format!("layer.{layer}.{}", if key { "k" } else { "v" })
}

/// [depth, codes, group], with a leading `sets` when `sets` > 1: the file form of one table.
fn tensor_shape(sets: usize, depth: usize, codes: usize, group: usize) -> Vec<usize> {
    let s = vec![depth, codes, group];
    if sets > 1 {
        [vec![sets], s].concat()
    } else {
        s
    }
}

impl Codebooks {
    /// Shape of every tensor: [depth, codes, group], with a leading `sets` when `sets` > 1.
    pub fn shape(&self) -> Vec<usize> {
        tensor_shape(self.sets, self.depth, self.codes, self.group)
    }

    /// Writes the codebooks as safetensors (f32 tensors of [`Self::shape`] and shape metadata; `sets`
    /// is written only when > 1, so shared files keep their old form).
    pub fn save(&self, path: &str) -> Result<()> {
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = self
            .tables
            .iter()
            .map(|(k, v)| (k.clone(), self.shape(), v.clone()))
            .collect();
        let mut meta = HashMap::new();
        meta.insert("group".to_string(), self.group.to_string());
        meta.insert("codes".to_string(), self.codes.to_string());
        meta.insert("depth".to_string(), self.depth.to_string());
        meta.insert("key_groups".to_string(), self.key_groups.clone());
        if self.sets > 1 {
            meta.insert("sets".to_string(), self.sets.to_string());
        }
        save_f32_tensors(path, &tensors, meta)
    }

    /// Reads a codebook file, checking every tensor's dtype and shape against the metadata.
    pub fn load(path: &str) -> Result<Self> {
        let err = |reason: String| FormatError::File {
            path: path.into(),
            reason,
        };
        let (data, md) = read_with_meta(path)?;
        let num = |k: &str| meta_usize(&md, k, path);
        let (group, codes, depth) = (num("group")?, num("codes")?, num("depth")?);
        let sets = if md.contains_key("sets") {
            num("sets")?
        } else {
            1
        };
        if sets == 0 {
            return Err(err("metadata 'sets' is 0".into()));
        }
        let shape = tensor_shape(sets, depth, codes, group);
        let key_groups = md
            .get("key_groups")
            .cloned()
            .unwrap_or_else(|| "strided".into());
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| err(e.to_string()))?;
        let mut tables = BTreeMap::new();
        for (name, view) in st.tensors() {
            let v = f32_tensor(&name, &view, &shape).map_err(err)?;
            tables.insert(name, v);
        }
        Ok(Self {
            group,
            codes,
            depth,
            sets,
            key_groups,
            tables,
        })
    }
}
