//! The GPU inference engine and its embeddable API: load a LLaMA-family model onto the GPU (f16
//! weights, cuBLAS GEMMs, the model-op kernels of kernels/model.cu), choose a KV plan, create
//! sequences, prefill prompts in chunks, decode batches of sequences step by step, read logits or
//! greedy tokens, free sequences.
//!
//! Attention sits behind [`AttentionBackend`]; the engine never branches on the cache format. Two
//! backends exist: [`ResidentBackend`] keeps every layer's compressed cache on the GPU and runs the
//! fused CUDA encode/attention kernels (what [`Engine::load_resident`] gives: the fast path), and
//! [`HostCacheBackend`], a *reference* that round-trips K/V through the host and encodes them on the
//! CPU (correct, slow; [`Engine::load`]), for checking the other and for plans without kernels.
//!
//! ```no_run
//! use kvq::engine::{Engine, ResidentLimits};
//! # fn main() -> kvq::Result<()> {
//! let limits = ResidentLimits { slots: 1, max_tokens: 4096, max_chunk: 256 };
//! let mut engine =
//!     Engine::load_resident("models/SmolLM2-135M-Instruct.Q4_1.gguf", "kivi:bits=4", limits)?;
//! let prompt = engine.tokenizer()?.encode_prompt("The capital of France is")?;
//! let seq = engine.new_sequence(prompt.len() + 16)?;
//! let logits = engine.prefill(seq, &prompt, 256)?;
//! let mut next = kvq::engine::argmax(&logits);
//! for _ in 0..16 {
//!     next = engine.step_greedy(&[(seq, next)])?[0];
//! }
//! engine.free(seq);
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod check;
pub mod resident;
pub mod weights;

pub use backend::{AttentionBackend, Heads, HostCacheBackend, SeqId, SeqRows};
pub use resident::{ResidentBackend, ResidentLimits};

use crate::error::{drv, GpuError, Result};
use crate::gpu::Gpu;
use crate::graph::{GraphStats, StepGraphs};
use crate::launch_model::{Blas, GemvIn, Indices, ModelOps};
use cudarc::driver::CudaSlice;
use half::f16;
use kvq_formats::{CacheBytes, KvPlan, Rope, RopeStyle};
use kvq_model::generate::{GenStats, Stop};
use kvq_model::sample::Sampler;
use kvq_model::tokenizer::Tok;
use kvq_model::{LlamaConfig, Model};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use weights::GpuWeights;

/// Per-forward device buffers, grown on demand (rows = tokens of one forward).
struct Scratch {
    rows: usize,
    logit_rows: usize,
    x: CudaSlice<f32>,
    hn: CudaSlice<f16>,
    qkv: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    att16: CudaSlice<f16>,
    gu: CudaSlice<f32>,
    act16: CudaSlice<f16>,
    last16: CudaSlice<f16>,
    logits: CudaSlice<f32>,
    picks: CudaSlice<i32>,
    /// Token ids, positions and logit rows of the current forward (reused across steps).
    ids: Indices,
    pos: Indices,
    last: Indices,
}

impl Scratch {
    fn new(gpu: &Gpu, c: &LlamaConfig, rows: usize, logit_rows: usize) -> Result<Self> {
        let st = gpu.stream();
        let (h, d) = (c.hidden, c.head_dim);
        let (wq, wkv) = (c.n_heads * d, c.n_kv_heads * d);
        let a = |what: &str| drv(format!("allocating {what} for {rows} rows"));
        let rows1 = rows.max(1);
        let lr = logit_rows.max(1);
        Ok(Self {
            rows,
            logit_rows,
            x: st
                .alloc_zeros(rows1 * h)
                .map_err(a("the residual stream"))?,
            hn: st
                .alloc_zeros(rows1 * h.max(wq))
                .map_err(a("normed activations"))?,
            qkv: st.alloc_zeros(rows1 * (wq + 2 * wkv)).map_err(a("QKV"))?,
            q: st.alloc_zeros(rows1 * wq).map_err(a("queries"))?,
            k: st.alloc_zeros(rows1 * wkv).map_err(a("keys"))?,
            v: st.alloc_zeros(rows1 * wkv).map_err(a("values"))?,
            att: st.alloc_zeros(rows1 * wq).map_err(a("attention output"))?,
            att16: st.alloc_zeros(rows1 * wq).map_err(a("attention output"))?,
            gu: st
                .alloc_zeros(rows1 * 2 * c.intermediate)
                .map_err(a("gate/up"))?,
            act16: st
                .alloc_zeros(rows1 * c.intermediate)
                .map_err(a("MLP activations"))?,
            last16: st.alloc_zeros(lr * h).map_err(a("final norm"))?,
            logits: st.alloc_zeros(lr * c.vocab).map_err(a("logits"))?,
            picks: st.alloc_zeros(lr).map_err(a("token picks"))?,
            ids: Indices::upload_staged(gpu, &[])?,
            pos: Indices::upload_staged(gpu, &[])?,
            last: Indices::upload_staged(gpu, &[])?,
        })
    }
}

/// The backend held while [`Engine::set_resident`] swaps caches: no sequences, nothing to attend.
struct NoBackend;

impl AttentionBackend for NoBackend {
    fn describe(&self) -> String {
        "no attention backend (being replaced)".into()
    }
    fn add_sequence(&mut self, _id: SeqId, _capacity: usize) -> Result<()> {
        Err(GpuError::Input(self.describe()))
    }
    fn remove_sequence(&mut self, _id: SeqId) {}
    fn append_and_attend(
        &mut self,
        _gpu: &Gpu,
        _layer: usize,
        _rows: &[SeqRows],
        _q: &CudaSlice<f32>,
        _k: &CudaSlice<f32>,
        _v: &CudaSlice<f32>,
        _out: &mut CudaSlice<f32>,
        _out16: &mut CudaSlice<f16>,
    ) -> Result<bool> {
        Err(GpuError::Input(self.describe()))
    }
    fn kv_bytes(&self, _id: SeqId) -> Option<CacheBytes> {
        None
    }
}

/// Where a sequence stands.
struct SeqState {
    len: usize,
    capacity: usize,
}

/// Index of the largest logit (NaN never wins; the last maximum on ties), as greedy sampling picks.
pub fn argmax(logits: &[f32]) -> u32 {
    Sampler::new(0.0, 0, 1.0, 0).sample(logits)
}

/// A model on the GPU with its sequences: the embeddable entry point of kvq.
pub struct Engine {
    gpu: Arc<Gpu>,
    ops: ModelOps,
    blas: Blas,
    config: LlamaConfig,
    rope_style: RopeStyle,
    weights: GpuWeights,
    backend: Box<dyn AttentionBackend>,
    tokenizer: Option<Tok>,
    seqs: HashMap<SeqId, SeqState>,
    next_id: u64,
    scratch: Option<Scratch>,
    plan: String,
    /// Host time spent issuing forwards (kernels, copies, bookkeeping) since the last
    /// [`Engine::take_enqueue_time`]: tells host-bound steps from GPU-bound ones.
    enqueue: std::time::Duration,
    /// Decode steps recorded and replayed as CUDA graphs (crate::graph).
    graphs: StepGraphs,
    /// The step being enqueued takes its tokens from the previous step's greedy picks on the device
    /// ([`Engine::decode_greedy`]), not from the host.
    chained: bool,
    /// The step being enqueued writes its greedy picks into the token-id buffer (for a chained next
    /// step) instead of the picks buffer.
    feed_picks: bool,
}

impl Engine {
    /// Loads a `.gguf` file or HF directory onto GPU 0 with KV plan `kv` (a format such as `fp16` or
    /// `kivi:bits=2`, a mixed plan, or a JSON plan file) and the host-cache reference backend.
    pub fn load(path: &str, kv: &str) -> Result<Self> {
        let gpu = Arc::new(Gpu::new(0)?);
        let model = Model::load(path)?;
        let plan = KvPlan::parse(kv, model.config.n_layers)?;
        let mut e = Self::from_model(gpu, &model, plan)?;
        e.tokenizer = Some(model.tokenizer);
        Ok(e)
    }

    /// Loads like [`Engine::load`] but onto the GPU-resident backend sized by `limits` (sequences,
    /// tokens each, prefill chunk): the fused compressed-attention kernels, for programs that want speed.
    /// Fails with the reason when a layer's format has no CUDA kernels or the caches do not fit.
    pub fn load_resident(path: &str, kv: &str, limits: ResidentLimits) -> Result<Self> {
        let gpu = Arc::new(Gpu::new(0)?);
        let model = Model::load(path)?;
        let plan = KvPlan::parse(kv, model.config.n_layers)?;
        let mut e = Self::from_model_resident(gpu, &model, plan, limits)?;
        e.tokenizer = Some(model.tokenizer);
        Ok(e)
    }

    /// Uploads an already loaded CPU model (kept by the caller, e.g. to compare with) with `plan`
    /// and the host-cache reference backend. The engine has no tokenizer then.
    pub fn from_model(gpu: Arc<Gpu>, model: &Model, plan: KvPlan) -> Result<Self> {
        let c = &model.config;
        let heads = Heads::of(c);
        let desc = plan.describe();
        let backend = HostCacheBackend::new(plan, model.rope.clone(), heads)?;
        let mut e = Self::with_backend(gpu, model, Box::new(backend))?;
        e.plan = desc;
        Ok(e)
    }

    /// Uploads an already loaded CPU model with `plan` and the GPU-resident backend (every layer's
    /// format needs CUDA kernels: fp16, KIVI/AsymKV), sized by `limits`.
    pub fn from_model_resident(
        gpu: Arc<Gpu>,
        model: &Model,
        plan: KvPlan,
        limits: ResidentLimits,
    ) -> Result<Self> {
        let c = &model.config;
        let heads = Heads::of(c);
        let backend = ResidentBackend::new(&gpu, &plan, &model.rope, heads, limits)?;
        let mut e = Self::with_backend(gpu, model, Box::new(backend))?;
        e.plan = plan.describe();
        Ok(e)
    }

    /// Swaps the attention backend for a GPU-resident one of `plan` sized by `limits`, freeing every
    /// sequence: one upload of the weights then serves many cache shapes (benchmarks, re-planning).
    /// `rope` is the model's (the plan's caches are built for its head size).
    pub fn set_resident(
        &mut self,
        plan: KvPlan,
        rope: &Rope,
        limits: ResidentLimits,
    ) -> Result<()> {
        let c = &self.config;
        let heads = Heads::of(c);
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.free(id);
        }
        // Free the old caches before allocating the new ones (and the graphs that name them).
        self.graphs.clear(&self.gpu)?;
        self.backend = Box::new(NoBackend);
        self.backend = Box::new(ResidentBackend::new(&self.gpu, &plan, rope, heads, limits)?);
        self.plan = plan.describe();
        Ok(())
    }

    /// Appends `n` tokens of synthetic K/V (seeded standard normal values, `chunk` tokens per
    /// append) to every layer of `seq` without running the model. For benchmarks: a decode step costs
    /// the same whatever the cached values, and a long context is filled in milliseconds instead of
    /// a prefill. Needs a backend that supports it (the GPU-resident one).
    pub fn fill_synthetic(&mut self, seq: SeqId, n: usize, chunk: usize, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let st = self.state(seq)?;
        if st.len + n > st.capacity {
            return Err(GpuError::Input(format!(
                "sequence {seq:?}: {n} synthetic tokens after {} exceed its capacity {}",
                st.len, st.capacity
            )));
        }
        let c = &self.config;
        let width = c.n_kv_heads * c.head_dim;
        let chunk = chunk.clamp(1, n.max(1));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut host = |len: usize| -> Vec<f32> {
            (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
        };
        let st = self.gpu.stream();
        let k = st
            .clone_htod(&host(chunk * width))
            .map_err(drv("uploading synthetic keys"))?;
        let v = st
            .clone_htod(&host(chunk * width))
            .map_err(drv("uploading synthetic values"))?;
        let mut done = 0;
        while done < n {
            let m = chunk.min(n - done);
            for l in 0..c.n_layers {
                self.backend.append_only(&self.gpu, l, seq, m, &k, &v)?;
            }
            done += m;
        }
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.len += n;
        }
        Ok(())
    }

    /// Uploads `model` and serves attention with `backend` (which owns the KV caches and their plan).
    pub fn with_backend(
        gpu: Arc<Gpu>,
        model: &Model,
        backend: Box<dyn AttentionBackend>,
    ) -> Result<Self> {
        let ops = ModelOps::new(&gpu)?;
        let blas = Blas::new(&gpu)?;
        let weights =
            GpuWeights::upload(&gpu, &model.config, &model.weights, &model.rope.inv_freq)?;
        Ok(Self {
            gpu,
            ops,
            blas,
            config: model.config.clone(),
            rope_style: model.rope.style,
            weights,
            backend,
            tokenizer: None,
            seqs: HashMap::new(),
            next_id: 0,
            scratch: None,
            plan: String::new(),
            enqueue: std::time::Duration::ZERO,
            graphs: StepGraphs::new(),
            chained: false,
            feed_picks: false,
        })
    }

    /// Gives the engine a tokenizer (for [`Engine::generate`]'s text and [`Engine::tokenizer`]).
    pub fn with_tokenizer(mut self, tok: Tok) -> Self {
        self.tokenizer = Some(tok);
        self
    }

    /// The model's architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The GPU the engine runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The tokenizer (engines made by [`Engine::load`] or [`Engine::load_resident`] have one).
    pub fn tokenizer(&self) -> Result<&Tok> {
        self.tokenizer.as_ref().ok_or_else(|| {
            GpuError::Input("this engine was built from a borrowed model and holds no tokenizer; use the model's".into())
        })
    }

    /// One line on what runs where (device, weights, attention backend), for logs.
    pub fn describe(&self) -> String {
        format!(
            "{}: f16 weights ({:.1} MB), cuBLAS GEMMs; attention: {}",
            self.gpu.describe(),
            self.weights.bytes as f64 / 1e6,
            self.backend.describe()
        )
    }

    /// Bytes of the weights on the GPU (what every step reads once).
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes
    }

    /// Lets sequences grow to `tokens` even past the model's trained context (RoPE positions are
    /// extrapolated, quality is not promised): throughput benchmarks at long contexts need it.
    pub fn extend_context(&mut self, tokens: usize) {
        self.config.max_ctx = self.config.max_ctx.max(tokens);
    }

    /// The KV plan's description (empty for engines built with a custom backend).
    pub fn plan(&self) -> &str {
        &self.plan
    }

    /// Creates an empty sequence that may hold up to `capacity` tokens (the model's context at most).
    pub fn new_sequence(&mut self, capacity: usize) -> Result<SeqId> {
        if capacity == 0 || capacity > self.config.max_ctx {
            return Err(GpuError::Input(format!(
                "sequence capacity {capacity}: expected 1..={} (the model's trained context)",
                self.config.max_ctx
            )));
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.backend.add_sequence(id, capacity)?;
        self.seqs.insert(id, SeqState { len: 0, capacity });
        Ok(id)
    }

    /// Frees a sequence and its caches (unknown ids are ignored).
    pub fn free(&mut self, id: SeqId) {
        self.seqs.remove(&id);
        self.backend.remove_sequence(id);
    }

    /// Tokens a sequence holds.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        self.state(id).map(|s| s.len)
    }

    /// Cache memory of a sequence, all layers.
    pub fn kv_bytes(&self, id: SeqId) -> Result<CacheBytes> {
        self.backend
            .kv_bytes(id)
            .ok_or_else(|| GpuError::Input(format!("unknown sequence {id:?}")))
    }

    fn state(&self, id: SeqId) -> Result<&SeqState> {
        self.seqs.get(&id).ok_or_else(|| {
            GpuError::Input(format!(
                "unknown sequence {id:?} (freed, or from another engine)"
            ))
        })
    }

    /// Runs `tokens` through `seq` in chunks of `chunk` tokens (each chunk's K/V enter the cache before
    /// its attention reads them) and returns the logits after the last token (vocab values).
    pub fn prefill(&mut self, seq: SeqId, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(GpuError::Input("prefill of an empty prompt".into()));
        }
        // Refuse the whole prompt up front: no chunk enters the cache of a prompt that cannot fit.
        let st = self.state(seq)?;
        if st.len + tokens.len() > st.capacity {
            return Err(GpuError::Input(format!(
                "sequence {seq:?}: a prompt of {} tokens after {} exceeds its capacity {}",
                tokens.len(),
                st.len,
                st.capacity
            )));
        }
        self.check_vocab(tokens)?;
        let mut last = Vec::new();
        for ch in tokens.chunks(chunk.max(1)) {
            let pos = self.state(seq)?.len;
            self.forward(
                &[SeqRows {
                    id: seq,
                    pos,
                    n: ch.len(),
                }],
                ch,
            )?;
            last = self.read_logits(1)?;
        }
        Ok(last)
    }

    /// Runs `tokens` through `seq` like [`Engine::prefill`] and returns the logits after every token
    /// (one vocab-sized row per token): what perplexity needs.
    pub fn prefill_all(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(tokens.len());
        for ch in tokens.chunks(chunk.max(1)) {
            let pos = self.state(seq)?.len;
            self.forward_logits(
                &[SeqRows {
                    id: seq,
                    pos,
                    n: ch.len(),
                }],
                ch,
                true,
            )?;
            let flat = self.read_logits(ch.len())?;
            out.extend(flat.chunks_exact(self.config.vocab).map(|r| r.to_vec()));
        }
        Ok(out)
    }

    /// Negative log-likelihood of window `ids` in a fresh sequence (freed after): the sum over the
    /// tokens after position `first_scored - 1` of -log p(next token), how many were scored, and the
    /// cache's bytes at the end. This is
    /// `kvq eval ppl`'s per-window work (kvq_model::eval), every attention read through the GPU cache.
    pub fn window_nll(
        &mut self,
        ids: &[u32],
        first_scored: usize,
        chunk: usize,
    ) -> Result<(f64, usize, CacheBytes)> {
        let seq = self.new_sequence(ids.len())?;
        let logits = self.prefill_all(seq, ids, chunk);
        let bytes = self.kv_bytes(seq).unwrap_or_default();
        self.free(seq);
        let (mut nll, mut scored) = (0f64, 0usize);
        for (pos, row) in logits?.iter().enumerate() {
            if pos + 1 < first_scored || pos + 1 >= ids.len() {
                continue;
            }
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m as f64
                + row
                    .iter()
                    .map(|&x| ((x - m) as f64).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[ids[pos + 1] as usize] as f64;
            scored += 1;
        }
        Ok((nll, scored, bytes))
    }

    /// One decode step: appends one token to each listed sequence (each at most once) and returns
    /// each one's next-token logits, in order.
    pub fn step(&mut self, batch: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>> {
        self.step_rows(batch, false)?;
        let flat = self.read_logits(batch.len())?;
        Ok(flat
            .chunks_exact(self.config.vocab)
            .map(|r| r.to_vec())
            .collect())
    }

    /// [`Engine::step`] with greedy picks made on the GPU: only the chosen token ids come back.
    pub fn step_greedy(&mut self, batch: &[(SeqId, u32)]) -> Result<Vec<u32>> {
        self.step_rows(batch, true)?;
        let s = self.scratch.as_ref().ok_or_else(no_forward)?;
        let n = batch.len();
        let mut h = vec![0i32; n];
        self.gpu
            .stream()
            .memcpy_dtoh(&s.picks.slice(0..n), &mut h)
            .map_err(drv("reading the picked tokens"))?;
        Ok(h.into_iter().map(|x| x as u32).collect())
    }

    /// `steps` greedy decode steps of `batch` ((sequence, its next input token) pairs, each sequence
    /// once), each step's picks written by its argmax kernel into the next step's token ids, so that
    /// the host can record and launch step t + 1 while the GPU runs step t instead of waiting for every
    /// pick as [`Engine::step_greedy`] does: on the H100 a B=1 8B-shape step ran 0.09 ms above its GPU
    /// time this way, 0.2-0.4 ms one step at a time, with tokens equal to step-by-step greedy for
    /// every plan (runs 19-20). Returns the picks of every step, `steps` rows in `batch`'s order.
    pub fn decode_greedy(&mut self, batch: &[(SeqId, u32)], steps: usize) -> Result<Vec<Vec<u32>>> {
        let mut out = Vec::with_capacity(steps);
        self.decode_greedy_with(batch, steps, &mut |picks| {
            out.push(picks.to_vec());
            true
        })?;
        Ok(out)
    }

    /// [`Engine::decode_greedy`] handing each step's picks (in `batch`'s order) to `on_picks` as they
    /// arrive, one step behind the GPU; `on_picks` returning false stops it. The step after the one
    /// that stopped it is already issued by then: it still runs, so each sequence ends one token
    /// longer than the picks accepted (its input is the last pick handed over). Returns the steps
    /// whose picks were handed over.
    pub fn decode_greedy_with(
        &mut self,
        batch: &[(SeqId, u32)],
        steps: usize,
        on_picks: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<usize> {
        let n = batch.len();
        if steps == 0 {
            return Ok(0);
        }
        let ctx = self.gpu.stream().context().clone();
        let mut host = Vec::with_capacity(2);
        for _ in 0..2 {
            // SAFETY: plain page-locked memory for n i32s, written only by the stream's copies below
            // and read by the host only after the event recorded behind the copy has completed
            // (`read`; the slice's own event is never recorded, as the context tracks no events);
            // freed only after every recorded copy has completed (the end of this function).
            host.push(
                unsafe { ctx.alloc_pinned_with_flags::<i32>(n.max(1), 0) }
                    .map_err(drv("allocating page-locked memory for picks"))?,
            );
        }
        // The context does not track events (src/gpu.rs), so a pinned slice's own wait is a no-op:
        // each copy gets an event of its own, waited for before its buffer is read (run 18 read
        // stale picks without it).
        let mut copied: [Option<cudarc::driver::CudaEvent>; 2] = [None, None];
        let r = self.chain_steps(batch, steps, &mut host, &mut copied, on_picks);
        // No copy may still be writing into the buffers when they are freed, error or not.
        for e in copied.iter().flatten() {
            e.synchronize()
                .map_err(drv("waiting for the last picks' copy"))?;
        }
        r
    }

    /// The loop of [`Engine::decode_greedy_with`] over its two page-locked buffers and their events.
    fn chain_steps(
        &mut self,
        batch: &[(SeqId, u32)],
        steps: usize,
        host: &mut [cudarc::driver::PinnedHostSlice<i32>],
        copied: &mut [Option<cudarc::driver::CudaEvent>; 2],
        on_picks: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<usize> {
        let n = batch.len();
        let read = |h: &cudarc::driver::PinnedHostSlice<i32>,
                    e: &Option<cudarc::driver::CudaEvent>|
         -> Result<Vec<u32>> {
            e.as_ref()
                .ok_or_else(|| GpuError::Input("picked tokens read before their copy".into()))?
                .synchronize()
                .map_err(drv("waiting for the picked tokens"))?;
            let v = h.as_slice().map_err(drv("reading the picked tokens"))?;
            Ok(v[..n].iter().map(|&x| x as u32).collect())
        };
        let mut rows: Vec<(SeqId, u32)> = batch.to_vec();
        for t in 0..steps {
            (self.chained, self.feed_picks) = (t > 0, true);
            let r = self.step_rows(&rows, true);
            (self.chained, self.feed_picks) = (false, false);
            r?;
            let s = self.scratch.as_ref().ok_or_else(no_forward)?;
            // Stream-ordered before the next step's argmax overwrites the ids.
            self.gpu
                .stream()
                .memcpy_dtoh(&s.ids.device().slice(0..n), &mut host[t % 2])
                .map_err(drv("copying the picked tokens"))?;
            copied[t % 2] = Some(
                self.gpu
                    .stream()
                    .record_event(None)
                    .map_err(drv("recording the picks' copy"))?,
            );
            if t > 0 && !on_picks(&read(&host[(t - 1) % 2], &copied[(t - 1) % 2])?) {
                return Ok(t);
            }
            // The host's ids are placeholders from here on (checked against the vocabulary, then
            // replaced on the device by the picks).
            for r in rows.iter_mut() {
                r.1 = 0;
            }
        }
        on_picks(&read(&host[(steps - 1) % 2], &copied[(steps - 1) % 2])?);
        Ok(steps)
    }

    /// Turns CUDA graphs of decode steps on or off (on by default unless `KVQ_GRAPHS=0`): off, every
    /// kernel of a step is issued on its own, as benchmarks compare.
    pub fn set_graphs(&mut self, on: bool) -> Result<()> {
        self.graphs.set_enabled(&self.gpu, on)
    }

    /// Whether decode steps are recorded and replayed as CUDA graphs.
    pub fn graphs_enabled(&self) -> bool {
        self.graphs.enabled()
    }

    /// How decode steps ran so far (replayed from a graph, captured, issued directly), and why
    /// capture failed if it did.
    pub fn graph_stats(&self) -> (GraphStats, Option<String>) {
        (self.graphs.stats(), self.graphs.failure().map(String::from))
    }

    /// A decode step's forward (and greedy picks), recorded and replayed from a CUDA graph when
    /// graphs are on; the host time it takes is added to the enqueue time.
    fn step_rows(&mut self, batch: &[(SeqId, u32)], greedy: bool) -> Result<()> {
        if batch.is_empty() {
            return Err(GpuError::Input("decode step of an empty batch".into()));
        }
        let mut rows = Vec::with_capacity(batch.len());
        for (i, &(id, _)) in batch.iter().enumerate() {
            if batch[..i].iter().any(|(o, _)| *o == id) {
                return Err(GpuError::Input(format!(
                    "sequence {id:?} appears twice in one decode step"
                )));
            }
            rows.push(SeqRows {
                id,
                pos: self.state(id)?.len,
                n: 1,
            });
        }
        let ids: Vec<u32> = batch.iter().map(|b| b.1).collect();
        let t0 = Instant::now();
        let r = if self.graphs.enabled() && self.backend.device_only() {
            self.gpu.start_recording()?;
            let r = self.step_enqueue(&rows, &ids, greedy);
            let rec = self.gpu.stop_recording()?;
            match r {
                Ok(()) => self.graphs.run(&self.gpu, rec),
                Err(e) => {
                    // Issue what was asked before the failure, as the direct path would have.
                    let _ = self.graphs.run_direct(&self.gpu, rec);
                    Err(e)
                }
            }
        } else {
            let (mut spans, gpu) = (self.graphs.spans.take(), self.gpu.clone());
            let r =
                crate::graph::timed(&mut spans, &gpu, || self.step_enqueue(&rows, &ids, greedy));
            self.graphs.spans = spans;
            r
        };
        self.enqueue += t0.elapsed();
        r
    }

    fn step_enqueue(&mut self, rows: &[SeqRows], ids: &[u32], greedy: bool) -> Result<()> {
        self.forward_enqueue(rows, ids, false)?;
        if greedy {
            let s = self.scratch.as_mut().ok_or_else(no_forward)?;
            let dims = (rows.len(), self.config.vocab);
            if self.feed_picks {
                // A kernel (not a copy) writes the next step's ids: the next step's first kernel
                // waits for it like for any kernel before it, dependent launch or not.
                let ids = s.ids.device_output(&self.gpu, rows.len())?;
                self.ops.argmax(&s.logits, dims, ids)?;
            } else {
                self.ops.argmax(&s.logits, dims, &mut s.picks)?;
            }
        }
        Ok(())
    }

    /// Downloads the logits of the last forward's first `n` logit rows.
    fn read_logits(&self, n: usize) -> Result<Vec<f32>> {
        let s = self.scratch.as_ref().ok_or_else(no_forward)?;
        let len = n * self.config.vocab;
        let mut h = vec![0f32; len];
        self.gpu
            .stream()
            .memcpy_dtoh(&s.logits.slice(0..len), &mut h)
            .map_err(drv("reading logits"))?;
        Ok(h)
    }

    /// The forward over `rows` (token `ids` back to back); leaves the logits of each group's last row
    /// in the scratch's logit rows (one per group, in order).
    fn forward(&mut self, rows: &[SeqRows], ids: &[u32]) -> Result<()> {
        self.forward_logits(rows, ids, false)
    }

    /// [`Engine::forward`]; with `every_row` the logits of every row are kept (in row order), not only
    /// each group's last.
    fn forward_logits(&mut self, rows: &[SeqRows], ids: &[u32], every_row: bool) -> Result<()> {
        let t0 = std::time::Instant::now();
        let r = self.forward_enqueue(rows, ids, every_row);
        self.enqueue += t0.elapsed();
        r
    }

    /// Refuses a token id the embedding table does not have.
    fn check_vocab(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.config.vocab;
        match ids.iter().find(|&&i| i as usize >= vocab) {
            Some(&bad) => Err(GpuError::Input(format!(
                "token id {bad} outside the vocabulary ({vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// Times each decode step's GPU work with CUDA events (for benchmarks): the GPU's span of a step
    /// without the host's recording before it, to set against the wall time per step.
    pub fn set_step_timing(&mut self, on: bool) {
        self.graphs.spans = on.then(crate::graph::StepSpans::default);
    }

    /// Each decode step's GPU milliseconds since the last call, in order (waiting for the last one), or
    /// None when [`Engine::set_step_timing`] is off: their sum against wall time shows host waits, their
    /// spread whether a cost comes every step or with block seals.
    pub fn take_step_gpu_ms(&mut self) -> Result<Option<Vec<f64>>> {
        self.graphs.spans.as_mut().map(|s| s.take_ms()).transpose()
    }

    /// Host time spent issuing forwards since the last call (asynchronous work not waited for):
    /// when it is close to the step time, the step is bound by the host, not the GPU.
    pub fn take_enqueue_time(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.enqueue)
    }

    fn forward_enqueue(&mut self, rows: &[SeqRows], ids: &[u32], every_row: bool) -> Result<()> {
        let c = self.config.clone();
        let n: usize = rows.iter().map(|r| r.n).sum();
        if n != ids.len() || n == 0 {
            return Err(GpuError::Input(format!(
                "{} token ids for {n} rows",
                ids.len()
            )));
        }
        self.check_vocab(ids)?;
        for r in rows {
            let s = self.state(r.id)?;
            if r.pos != s.len || s.len + r.n > s.capacity {
                return Err(GpuError::Input(format!(
                    "sequence {:?}: {} tokens after {} exceed its capacity {}",
                    r.id, r.n, s.len, s.capacity
                )));
            }
        }
        let m = if every_row { n } else { rows.len() };
        let grow = match &self.scratch {
            Some(s) => s.rows < n || s.logit_rows < m,
            None => true,
        };
        if grow {
            let (r0, l0) = self
                .scratch
                .as_ref()
                .map(|s| (s.rows, s.logit_rows))
                .unwrap_or((0, 0));
            self.scratch = None; // free before allocating the larger set
            self.scratch = Some(Scratch::new(&self.gpu, &c, n.max(r0), m.max(l0))?);
        }
        let pos: Vec<u32> = rows
            .iter()
            .flat_map(|r| (r.pos..r.pos + r.n).map(|p| p as u32))
            .collect();
        let mut last = Vec::with_capacity(m);
        let mut off = 0u32;
        for r in rows {
            if every_row {
                last.extend(off..off + r.n as u32);
            }
            off += r.n as u32;
            if !every_row {
                last.push(off - 1);
            }
        }
        let s = self.scratch.as_mut().ok_or_else(no_forward)?;
        if self.chained {
            // One row per sequence, in the order of the step before, whose greedy picks (written
            // into the id buffer by its argmax kernel, step_enqueue) are these tokens.
            s.ids.assume_device_written(n, c.vocab)?;
        } else {
            s.ids.restage(&self.gpu, ids)?;
        }
        s.pos.restage(&self.gpu, &pos)?;
        s.last.restage(&self.gpu, &last)?;
        let (h, d, hq, hkv) = (c.hidden, c.head_dim, c.n_heads, c.n_kv_heads);
        let (ops, blas, w) = (&self.ops, &self.blas, &self.weights);
        ops.embed(&w.embed, (c.vocab, h), &s.ids, &mut s.x)?;
        // Decode steps of 1-2 rows fold each RMSNorm and the SwiGLU into the GEMV that reads them
        // (Blas::matmul_from); larger batches run them as kernels of their own before cuBLAS.
        let eps = c.rms_eps;
        for (l, lw) in w.layers.iter().enumerate() {
            let attn_in = GemvIn::RmsNorm {
                x: &s.x,
                w: &lw.attn_norm,
                eps,
            };
            blas.matmul_from(ops, attn_in, &mut s.hn, &lw.wqkv, &mut s.qkv, n, false)?;
            let rotate_k = self.backend.wants_rotated_keys(l);
            // GPU-resident caches take this layer's K/V from the split itself (no append kernel);
            // the backend says None where it appends itself (host caches, pre-RoPE keys).
            let ring = self
                .backend
                .stage_ring_append(&self.gpu, l, rows, &s.k, &s.v)?;
            ops.qkv_split(
                &s.qkv,
                &s.pos,
                &w.inv_freq,
                &mut s.q,
                &mut s.k,
                &mut s.v,
                (n, hq, hkv, d),
                self.rope_style,
                rotate_k,
                ring.as_ref(),
            )?;
            let has16 = self.backend.append_and_attend(
                &self.gpu,
                l,
                rows,
                &s.q,
                &s.k,
                &s.v,
                &mut s.att,
                &mut s.att16,
            )?;
            if !has16 {
                ops.f32_to_f16(&s.att, &mut s.att16, n * hq * d)?;
            }
            blas.matmul(&s.att16, &lw.wo, &mut s.x, n, true)?;
            let ffn_in = GemvIn::RmsNorm {
                x: &s.x,
                w: &lw.ffn_norm,
                eps,
            };
            blas.matmul_from(ops, ffn_in, &mut s.hn, &lw.wgu, &mut s.gu, n, false)?;
            let act_in = GemvIn::SwiGlu(&s.gu);
            blas.matmul_from(ops, act_in, &mut s.act16, &lw.wdown, &mut s.x, n, true)?;
        }
        ops.rmsnorm(
            &s.x,
            n,
            Some(&s.last),
            &w.norm,
            &mut s.last16,
            (m, h),
            c.rms_eps,
        )?;
        blas.matmul(&s.last16, &w.lm_head, &mut s.logits, m, false)?;
        for r in rows {
            if let Some(state) = self.seqs.get_mut(&r.id) {
                state.len += r.n;
            }
        }
        Ok(())
    }

    /// Generates after `prompt` in a new sequence (freed at the end), calling `on_text` with each new
    /// piece of text: greedy picks on the GPU when `sampler` is greedy, else sampling on the host.
    /// Mirrors `kvq_model::generate::generate` (same stopping rules and statistics).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        chunk: usize,
        sampler: &mut Sampler,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(Vec<u32>, GenStats)> {
        if prompt.is_empty() {
            return Err(GpuError::Input("empty prompt".into()));
        }
        let max_ctx = self.config.max_ctx;
        if prompt.len() >= max_ctx {
            return Err(GpuError::Input(format!(
                "a prompt of {} tokens leaves no room in the model's context of {max_ctx}",
                prompt.len()
            )));
        }
        let cap = (prompt.len() + max_tokens).min(max_ctx);
        let seq = self.new_sequence(cap)?;
        let r = self.generate_in(seq, prompt, max_tokens, chunk, sampler, on_text);
        self.free(seq);
        r
    }

    fn generate_in(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        max_tokens: usize,
        chunk: usize,
        sampler: &mut Sampler,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(Vec<u32>, GenStats)> {
        let cap = self.state(seq)?.capacity;
        let greedy = sampler.temperature <= 0.0;
        let t0 = Instant::now();
        let logits = self.prefill(seq, prompt, chunk)?;
        let mut next = sampler.sample(&logits);
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut text = TextOut {
            out: Vec::new(),
            printed: 0,
        };
        let eos = self.config.eos.clone();
        let stop = loop {
            if text.out.len() >= max_tokens {
                break Stop::MaxTokens;
            }
            if eos.contains(&next) {
                break Stop::Eos;
            }
            text.push(self.tokenizer.as_ref(), next, on_text)?;
            if text.out.len() >= max_tokens {
                break Stop::MaxTokens;
            }
            let len = self.state(seq)?.len;
            if len >= cap {
                break Stop::Context;
            }
            if greedy && self.backend.device_only() {
                // The rest chained on the device (decode_greedy_with): the host issues step t + 1
                // before it reads step t's pick. Both limits are known up front; only an EOS stops
                // early (leaving one extra token in the sequence, which is freed after).
                let steps = (max_tokens - text.out.len()).min(cap - len);
                let (tok, mut failed, mut saw_eos) = (self.tokenizer.take(), None, false);
                let r = self.decode_greedy_with(&[(seq, next)], steps, &mut |p| {
                    if eos.contains(&p[0]) {
                        saw_eos = true;
                        return false;
                    }
                    match text.push(tok.as_ref(), p[0], on_text) {
                        Ok(()) => true,
                        Err(e) => {
                            failed = Some(e);
                            false
                        }
                    }
                });
                self.tokenizer = tok;
                r?;
                if let Some(e) = failed {
                    return Err(e);
                }
                break if saw_eos {
                    Stop::Eos
                } else if text.out.len() >= max_tokens {
                    Stop::MaxTokens
                } else {
                    Stop::Context
                };
            }
            next = if greedy {
                self.step_greedy(&[(seq, next)])?[0]
            } else {
                let l = self.step(&[(seq, next)])?;
                sampler.sample(&l[0])
            };
        };
        let out = text.finish(self.tokenizer.as_ref(), on_text)?;
        let stats = GenStats {
            prompt_tokens: prompt.len(),
            generated: out.len(),
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
            kv: self.kv_bytes(seq)?,
            stop,
        };
        Ok((out, stats))
    }
}

/// Generated tokens and how much of their text has been handed out: text is printed as soon as it
/// decodes to whole characters.
struct TextOut {
    out: Vec<u32>,
    printed: usize,
}

impl TextOut {
    /// Appends `t` and hands out the new whole characters of the text so far.
    fn push(&mut self, tok: Option<&Tok>, t: u32, on_text: &mut dyn FnMut(&str)) -> Result<()> {
        self.out.push(t);
        if let Some(tok) = tok {
            let text = tok.decode(&self.out)?;
            let ready = text.trim_end_matches('\u{FFFD}');
            if ready.len() > self.printed && ready.is_char_boundary(self.printed) {
                on_text(&ready[self.printed..]);
                self.printed = ready.len();
            }
        }
        Ok(())
    }

    /// Hands out the rest of the text (an incomplete character included) and returns the tokens.
    fn finish(self, tok: Option<&Tok>, on_text: &mut dyn FnMut(&str)) -> Result<Vec<u32>> {
        if let Some(tok) = tok {
            let text = tok.decode(&self.out)?;
            if text.len() > self.printed && text.is_char_boundary(self.printed) {
                on_text(&text[self.printed..]);
            }
        }
        Ok(self.out)
    }
}

fn no_forward() -> GpuError {
    GpuError::Input("no forward has run yet".into())
}
