//! The CPU reference forward of a LLaMA-family model. Linear layers run as candle CPU matmuls; every
//! attention read goes through the sequence's compressed caches (`kvq_formats::LayerCache`), which
//! take keys before RoPE and rotate them themselves.

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::load::{load, Weights};
use crate::tokenizer::Tok;
use candle_core::{Device, Tensor};
use kvq_formats::plan::total_bytes;
use kvq_formats::{CacheBytes, KvPlan, LayerCache, Rope};

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

/// Receives a layer's pre-RoPE keys and values ([token][kv head][d]) during a forward (calibration).
pub type Capture<'a> = &'a mut dyn FnMut(usize, &[f32], &[f32]);

fn rmsnorm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(1)?;
    Ok(x.broadcast_div(&(ms + eps as f64)?.sqrt()?)?
        .broadcast_mul(w)?)
}

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
        let (d, hq) = (c.head_dim, c.n_heads);
        let idt = Tensor::from_vec(ids.to_vec(), n, &Device::Cpu)?;
        let mut x = self.weights.embed.index_select(&idt, 0)?;
        let threads = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
            .min(n);
        for (l, w) in self.weights.layers.iter().enumerate() {
            let h = rmsnorm(&x, &w.attn_norm, c.rms_eps)?;
            let mut q = h.matmul(&w.wq)?.flatten_all()?.to_vec1::<f32>()?;
            let k = h.matmul(&w.wk)?.flatten_all()?.to_vec1::<f32>()?;
            let v = h.matmul(&w.wv)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, qi) in q.chunks_exact_mut(hq * d).enumerate() {
                for head in qi.chunks_exact_mut(d) {
                    self.rope.rotate(head, pos0 + i, 1.0);
                }
            }
            if let Some(cb) = capture.as_mut() {
                cb(l, &k, &v);
            }
            let cache = &mut seq.caches[l];
            cache.append(&k, &v, n)?;
            let mut o = vec![0f32; n * hq * d];
            let cache = &seq.caches[l];
            let per = n.div_ceil(threads);
            std::thread::scope(|s| -> Result<()> {
                let jobs: Vec<_> = o
                    .chunks_mut(per * hq * d)
                    .zip(q.chunks(per * hq * d))
                    .enumerate()
                    .map(|(j, (oc, qc))| {
                        s.spawn(move || -> Result<()> {
                            for (i, (oi, qi)) in oc
                                .chunks_exact_mut(hq * d)
                                .zip(qc.chunks_exact(hq * d))
                                .enumerate()
                            {
                                cache.attend(qi, pos0 + j * per + i + 1, oi)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for j in jobs {
                    j.join()
                        .map_err(|_| ModelError::Input("attention worker panicked".into()))??;
                }
                Ok(())
            })?;
            let o = Tensor::from_vec(o, (n, hq * d), &Device::Cpu)?;
            x = (x + o.matmul(&w.wo)?)?;
            let h = rmsnorm(&x, &w.ffn_norm, c.rms_eps)?;
            let a = (h.matmul(&w.w_gate)?.silu()? * h.matmul(&w.w_up)?)?;
            x = (x + a.matmul(&w.w_down)?)?;
        }
        rmsnorm(&x, &self.weights.norm, c.rms_eps)
    }
}
