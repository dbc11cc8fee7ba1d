//! The CPU reference forward of a LLaMA-family model. Linear layers run as candle CPU matmuls; every
//! attention read goes through the sequence's compressed caches (`kvq_formats::LayerCache`), which
//! take keys before RoPE and rotate them themselves.

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::load::{load, Weights};
use crate::tokenizer::Tok;
use candle_core::{Device, Tensor};
use kvq_formats::plan::total_bytes;
use kvq_formats::{CacheBytes, KvPlan, LayerCache, Rope, Stream};

/// A loaded model ready to run on the CPU.
pub struct Model {
    /// Architecture.
    pub config: LlamaConfig,
    /// Weights (f32).
    pub weights: Weights,
    /// Tokenizer.
    pub tokenizer: Tok,
    /// Rotary embedding of the heads.
    pub rope: Rope,
    /// Where it was loaded from.
    pub path: String,
}

/// One sequence's state: its per-layer compressed caches and how many tokens it may hold.
pub struct Sequence {
    /// Per-layer K/V caches.
    pub caches: Vec<LayerCache>,
    /// Tokens the caller allowed (the model's context at most).
    pub capacity: usize,
}

impl Sequence {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.caches.first().map(|c| c.len()).unwrap_or(0)
    }
    /// True when nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of the caches, all layers.
    pub fn bytes(&self) -> CacheBytes {
        total_bytes(&self.caches)
    }
}

/// Receives a layer's pre-RoPE queries ([token][head][d]), keys and values ([token][kv head][d]) during
/// a forward (calibration: KLT weighs key errors by the queries that will read them).
pub type Capture<'a> = &'a mut dyn FnMut(usize, &[f32], &[f32], &[f32]);

/// [`Model::capture`]'s receiver: (layer, the chunk's first position in its window, Q, K, V) as
/// [`Capture`] gets them.
pub type WindowCapture<'a> = &'a mut dyn FnMut(usize, usize, &[f32], &[f32], &[f32]);

impl Model {
    /// Loads a GGUF file or HF directory.
    pub fn load(path: &str) -> Result<Self> {
        let l = load(path)?;
        Ok(Self {
            rope: l.config.rope(),
            config: l.config,
            weights: l.weights,
            tokenizer: l.tokenizer,
            path: l.path,
        })
    }

    /// A new empty sequence with caches of `plan` for up to `capacity` tokens.
    pub fn new_sequence(&self, plan: &KvPlan, capacity: usize) -> Result<Sequence> {
        if capacity > self.config.max_ctx {
            return Err(ModelError::Context {
                tokens: capacity,
                limit: self.config.max_ctx,
                what: "the model's trained context".into(),
            });
        }
        if plan.n_layers() != self.config.n_layers {
            return Err(ModelError::Input(format!(
                "KV plan has {} layers, model {}",
                plan.n_layers(),
                self.config.n_layers
            )));
        }
        Ok(Sequence {
            caches: plan.build_caches(self.config.n_kv_heads, &self.rope)?,
            capacity,
        })
    }

    /// Runs `ids` after the tokens already in `seq` (one chunk: all its K/V are encoded into the cache
    /// before its attention reads them). Returns logits [ids.len(), vocab].
    pub fn forward(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
        capture: Option<Capture>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_hidden(seq, ids, capture)?
            .matmul(&self.weights.lm_head)?)
    }

    /// Runs `ids` through fresh fp16 sequences of at most `window` tokens each (chunks of 256) and hands
    /// every layer's pre-RoPE Q, K and V to `cb(layer, pos0, q, k, v)`, `pos0` being the chunk's first
    /// position in its window: the capture pass of calibration and `kvq inspect`.
    pub fn capture(&self, ids: &[u32], window: usize, cb: WindowCapture) -> Result<()> {
        let plan = KvPlan::parse("fp16", self.config.n_layers)?;
        for win in ids.chunks(window.max(1)) {
            let mut seq = self.new_sequence(&plan, win.len())?;
            let mut pos0 = 0;
            for ch in win.chunks(256) {
                self.forward(
                    &mut seq,
                    ch,
                    Some(&mut |l: usize, q: &[f32], k: &[f32], v: &[f32]| cb(l, pos0, q, k, v)),
                )?;
                pos0 += ch.len();
            }
        }
        Ok(())
    }

    /// [`Model::forward`] without the output head: the final-normed hidden states [ids.len(), hidden].
    /// Perplexity uses it for chunks whose predictions are not scored (the cache still fills).
    pub fn forward_hidden(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
        mut capture: Option<Capture>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (n, pos0) = (ids.len(), seq.len());
        if n == 0 {
            return Err(ModelError::Input("empty input".into()));
        }
        if pos0 + n > seq.capacity {
            return Err(ModelError::Context {
                tokens: pos0 + n,
                limit: seq.capacity,
                what: "the sequence's KV cache".into(),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} outside the vocabulary ({})",
                c.vocab
            )));
        }
        let (d, hq, hid) = (c.head_dim, c.n_heads, c.hidden);
        let idt = Tensor::from_vec(ids.to_vec(), n, &Device::Cpu)?;
        let mut x = self
            .weights
            .embed
            .index_select(&idt, 0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Elementwise work stays in plain Rust; candle runs the matmuls (gemm).
        let mm = |a: &[f32], cols: usize, w: &Tensor| -> Result<Vec<f32>> {
            let t = Tensor::from_slice(a, (a.len() / cols, cols), &Device::Cpu)?;
            Ok(t.matmul(w)?.flatten_all()?.to_vec1::<f32>()?)
        };
        for (l, w) in self.weights.layers.iter().enumerate() {
            let h = rmsnorm_rows(&x, hid, &w.attn_norm.to_vec1::<f32>()?, c.rms_eps);
            let mut q = mm(&h, hid, &w.wq)?;
            let k = mm(&h, hid, &w.wk)?;
            let v = mm(&h, hid, &w.wv)?;
            if let Some(cb) = capture.as_mut() {
                cb(l, &q, &k, &v);
            }
            for (i, qi) in q.chunks_exact_mut(hq * d).enumerate() {
                for head in qi.chunks_exact_mut(d) {
                    self.rope.rotate(head, pos0 + i, 1.0);
                }
            }
            seq.caches[l].append(&k, &v, n)?;
            let o = attend_chunk(&seq.caches[l], &q, pos0, n, (hq, c.n_kv_heads, d))?;
            for (xi, oi) in x.iter_mut().zip(mm(&o, hq * d, &w.wo)?) {
                *xi += oi;
            }
            let h = rmsnorm_rows(&x, hid, &w.ffn_norm.to_vec1::<f32>()?, c.rms_eps);
            let mut a = mm(&h, hid, &w.w_gate)?;
            for (ai, ui) in a.iter_mut().zip(mm(&h, hid, &w.w_up)?) {
                *ai = *ai / (1.0 + (-*ai).exp()) * ui;
            }
            for (xi, di) in x.iter_mut().zip(mm(&a, c.intermediate, &w.w_down)?) {
                *xi += di;
            }
        }
        let x = rmsnorm_rows(&x, hid, &self.weights.norm.to_vec1::<f32>()?, c.rms_eps);
        Ok(Tensor::from_vec(x, (n, hid), &Device::Cpu)?)
    }
}

/// RMSNorm of each `cols`-wide row of `x`, times `w`.
fn rmsnorm_rows(x: &[f32], cols: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, r) in out.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((oi, ri), wi) in o.iter_mut().zip(r).zip(w) {
            *oi = ri * inv * wi;
        }
    }
    out
}

/// Attention of the chunk's `n` rotated queries ([token][query head][d], positions `pos0..pos0+n`)
/// over the layer cache, causal. One query (decoding) goes through [`LayerCache::attend`]; a chunk
/// reads the same decoded mirror (`LayerCache::decoded`, what `attend` reads) with matrix products,
/// one per KV head for all its query heads and tokens, so prefill and perplexity run at gemm speed.
/// Tests hold the two paths equal.
pub fn attend_chunk(
    cache: &LayerCache,
    q: &[f32],
    pos0: usize,
    n: usize,
    (hq, hkv, d): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let mut o = vec![0f32; n * hq * d];
    if n == 1 {
        cache.attend(q, pos0 + 1, &mut o)?;
        return Ok(o);
    }
    let g = hq / hkv;
    let t = pos0 + n;
    let scale = 1.0 / (d as f32).sqrt();
    for kv in 0..hkv {
        let keys = cache.decoded(Stream::Key, kv);
        let vals = cache.decoded(Stream::Value, kv);
        if keys.len() < t * d || vals.len() < t * d {
            return Err(ModelError::Input(format!(
                "cache holds {} tokens, attention needs {t}",
                keys.len() / d
            )));
        }
        // Rows (token i, head j of the group).
        let mut qg = Vec::with_capacity(n * g * d);
        for i in 0..n {
            qg.extend_from_slice(&q[(i * hq + kv * g) * d..(i * hq + kv * g + g) * d]);
        }
        let qt = Tensor::from_vec(qg, (n * g, d), &Device::Cpu)?;
        let kt = Tensor::from_slice(&keys[..t * d], (t, d), &Device::Cpu)?;
        let mut s = qt.matmul(&kt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        for (r, row) in s.chunks_exact_mut(t).enumerate() {
            let visible = pos0 + r / g + 1;
            let m = row[..visible]
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
            let mut sum = 0f32;
            for x in row[..visible].iter_mut() {
                *x = (*x * scale - m).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            row[..visible].iter_mut().for_each(|x| *x *= inv);
            row[visible..].iter_mut().for_each(|x| *x = 0.0);
        }
        let pt = Tensor::from_vec(s, (n * g, t), &Device::Cpu)?;
        let vt = Tensor::from_slice(&vals[..t * d], (t, d), &Device::Cpu)?;
        let og = pt.matmul(&vt)?.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..n {
            o[(i * hq + kv * g) * d..(i * hq + kv * g + g) * d]
                .copy_from_slice(&og[i * g * d..(i + 1) * g * d]);
        }
    }
    Ok(o)
}
