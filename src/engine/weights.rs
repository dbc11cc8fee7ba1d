//! The model's weights on the GPU, uploaded once as f16 from kvq-model's loaded (f32) weights, with
//! Q/K/V fused into one GEMM and gate/up into another.

use crate::error::{drv, GpuError, Result};
use crate::gpu::Gpu;
use crate::launch_model::Linear;
use candle_core::Tensor;
use cudarc::driver::CudaSlice;
use half::f16;
use kvq_model::load::Weights;
use kvq_model::LlamaConfig;

/// One decoder layer on the GPU.
pub struct GpuLayer {
    /// RMSNorm before attention (f32).
    pub attn_norm: CudaSlice<f32>,
    /// [Wq | Wk | Wv]: hidden -> (hq + 2 hkv) d.
    pub wqkv: Linear,
    /// Output projection: hq d -> hidden.
    pub wo: Linear,
    /// RMSNorm before the MLP (f32).
    pub ffn_norm: CudaSlice<f32>,
    /// [W_gate | W_up]: hidden -> 2 intermediate.
    pub wgu: Linear,
    /// Down projection: intermediate -> hidden.
    pub wdown: Linear,
}

/// All weights on the GPU.
pub struct GpuWeights {
    /// Token embeddings, f16 [vocab][hidden].
    pub embed: CudaSlice<f16>,
    /// Decoder layers.
    pub layers: Vec<GpuLayer>,
    /// Final RMSNorm (f32).
    pub norm: CudaSlice<f32>,
    /// Output head: hidden -> vocab.
    pub lm_head: Linear,
    /// RoPE inverse frequencies (d/2, scaling folded in).
    pub inv_freq: CudaSlice<f32>,
    /// Bytes uploaded.
    pub bytes: usize,
}

fn host(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    let v = t
        .flatten_all()
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(|e| GpuError::Shape(format!("reading weight {what}: {e}")))?;
    Ok(v)
}

/// Runs `f` on `t`'s f32 elements in row-major order: borrowed from the tensor's own CPU storage
/// when it is contiguous (no copy: the 8B shape's weights are 32 GB as f32), else from a copy.
fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let Ok(v) = cpu.as_slice::<f32>() {
                return Ok(f(&v[a..b]));
            }
        }
    }
    Ok(f(&host(t, what)?))
}

/// `t`'s f32 elements as f16 in row-major order, converted on all cores (the 8B shape has 8 G of
/// them).
fn host16(t: &Tensor, what: &str) -> Result<Vec<f16>> {
    use rayon::prelude::*;
    with_f32(t, what, |v| {
        v.par_iter().map(|&x| f16::from_f32(x)).collect()
    })
}

fn dims2(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    t.dims2()
        .map_err(|e| GpuError::Shape(format!("weight {what}: {e}")))
}

/// Concatenates row-major [inp][out_i] matrices along their columns into [inp][sum out_i], as f16,
/// reading each part in place (see [`with_f32`]) one output row per task on all cores.
fn concat_cols(parts: &[(&Tensor, &str)]) -> Result<(Vec<f16>, usize, usize)> {
    use rayon::prelude::*;
    let mut inp = None;
    let mut dims = Vec::new();
    for (t, what) in parts {
        let (i, o) = dims2(t, what)?;
        if *inp.get_or_insert(i) != i {
            return Err(GpuError::Shape(format!(
                "weight {what}: {i} input rows, expected {}",
                inp.unwrap_or(0)
            )));
        }
        dims.push(o);
    }
    let inp = inp.unwrap_or(0);
    let out: usize = dims.iter().sum();
    let mut w = vec![f16::ZERO; inp * out];
    let mut c = 0;
    for ((t, what), &o) in parts.iter().zip(&dims) {
        with_f32(t, what, |m| {
            w.par_chunks_mut(out.max(1))
                .zip(m.par_chunks(o.max(1)))
                .for_each(|(row, src)| {
                    for (d, &x) in row[c..c + o].iter_mut().zip(src) {
                        *d = f16::from_f32(x);
                    }
                });
        })?;
        c += o;
    }
    Ok((w, inp, out))
}

impl GpuWeights {
    /// Uploads `w` (shapes as kvq-model checked them against `c`) and the RoPE table `inv_freq`.
    pub fn upload(gpu: &Gpu, c: &LlamaConfig, w: &Weights, inv_freq: &[f32]) -> Result<Self> {
        let st = gpu.stream();
        let mut bytes = 0usize;
        let mut up16 = |v: Vec<f16>, what: &str| -> Result<CudaSlice<f16>> {
            bytes += v.len() * 2;
            st.clone_htod(&v).map_err(drv(format!("uploading {what}")))
        };
        let up32 = |v: Vec<f32>, what: &str| -> Result<CudaSlice<f32>> {
            st.clone_htod(&v).map_err(drv(format!("uploading {what}")))
        };
        // Everything at once must fit: f16 weights plus a margin for activations and caches.
        let params = w.embed.elem_count()
            + w.lm_head.elem_count()
            + w.layers
                .iter()
                .map(|l| {
                    l.wq.elem_count()
                        + l.wk.elem_count()
                        + l.wv.elem_count()
                        + l.wo.elem_count()
                        + l.w_gate.elem_count()
                        + l.w_up.elem_count()
                        + l.w_down.elem_count()
                })
                .sum::<usize>();
        let (free, _) = gpu.mem_info()?;
        if params * 2 > free {
            return Err(GpuError::OutOfMemory {
                what: "the model's f16 weights".into(),
                need: params * 2,
                free,
            });
        }
        let embed = up16(host16(&w.embed, "embeddings")?, "embeddings")?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for (i, l) in w.layers.iter().enumerate() {
            let name = |s: &str| format!("layer {i} {s}");
            let (qkv, qi, qo) = concat_cols(&[
                (&l.wq, &name("q")),
                (&l.wk, &name("k")),
                (&l.wv, &name("v")),
            ])?;
            let (gu, gi, go) = concat_cols(&[(&l.w_gate, &name("gate")), (&l.w_up, &name("up"))])?;
            let (oi, oo) = dims2(&l.wo, &name("o"))?;
            let (di, dout) = dims2(&l.w_down, &name("down"))?;
            layers.push(GpuLayer {
                attn_norm: up32(host(&l.attn_norm, &name("attn_norm"))?, &name("attn_norm"))?,
                wqkv: Linear {
                    w: up16(qkv, &name("qkv"))?,
                    inp: qi,
                    out: qo,
                },
                wo: Linear {
                    w: up16(host16(&l.wo, &name("o"))?, &name("o"))?,
                    inp: oi,
                    out: oo,
                },
                ffn_norm: up32(host(&l.ffn_norm, &name("ffn_norm"))?, &name("ffn_norm"))?,
                wgu: Linear {
                    w: up16(gu, &name("gate/up"))?,
                    inp: gi,
                    out: go,
                },
                wdown: Linear {
                    w: up16(host16(&l.w_down, &name("down"))?, &name("down"))?,
                    inp: di,
                    out: dout,
                },
            });
        }
        let (hi, ho) = dims2(&w.lm_head, "lm_head")?;
        let lm_head = Linear {
            w: up16(host16(&w.lm_head, "lm_head")?, "lm_head")?,
            inp: hi,
            out: ho,
        };
        let norm = up32(host(&w.norm, "norm")?, "final norm")?;
        let inv_freq = up32(inv_freq.to_vec(), "RoPE frequencies")?;
        let g = Self {
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            bytes,
        };
        g.check(c)?;
        Ok(g)
    }

    /// The shapes the forward relies on, checked once.
    fn check(&self, c: &LlamaConfig) -> Result<()> {
        let (h, d) = (c.hidden, c.head_dim);
        let qkv = (c.n_heads + 2 * c.n_kv_heads) * d;
        let bad = |what: String| Err(GpuError::Shape(format!("uploaded weights: {what}")));
        for (i, l) in self.layers.iter().enumerate() {
            let shapes = [
                (&l.wqkv, h, qkv, "qkv"),
                (&l.wo, c.n_heads * d, h, "o"),
                (&l.wgu, h, 2 * c.intermediate, "gate/up"),
                (&l.wdown, c.intermediate, h, "down"),
            ];
            for (lin, inp, out, what) in shapes {
                if lin.inp != inp || lin.out != out {
                    return bad(format!(
                        "layer {i} {what} is {}x{}, expected {inp}x{out}",
                        lin.inp, lin.out
                    ));
                }
            }
        }
        if self.lm_head.inp != h || self.lm_head.out != c.vocab {
            return bad(format!(
                "lm_head {}x{}, expected {h}x{}",
                self.lm_head.inp, self.lm_head.out, c.vocab
            ));
        }
        if self.layers.len() != c.n_layers || self.embed.len() != c.vocab * h {
            return bad(format!(
                "{} layers and {} embedding values for {} layers x {} x {h}",
                self.layers.len(),
                self.embed.len(),
                c.n_layers,
                c.vocab
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn concat_cols_places_each_part_beside_the_last_row_by_row() {
        // [3][2] | [3][5] (no tile-friendly sizes): row r = a's row r then b's row r, as f16.
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..15).map(|i| 100.0 + i as f32).collect();
        let ta = Tensor::from_vec(a.clone(), (3, 2), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), (3, 5), &Device::Cpu).unwrap();
        let (w, inp, out) = concat_cols(&[(&ta, "a"), (&tb, "b")]).unwrap();
        assert_eq!((inp, out), (3, 7));
        for r in 0..3 {
            let want: Vec<f16> = a[2 * r..2 * r + 2]
                .iter()
                .chain(&b[5 * r..5 * r + 5])
                .map(|&x| f16::from_f32(x))
                .collect();
            assert_eq!(&w[7 * r..7 * r + 7], want.as_slice(), "row {r}");
        }
        // Parts must share their input rows.
        let tc = Tensor::from_vec(vec![0f32; 8], (4, 2), &Device::Cpu).unwrap();
        assert!(concat_cols(&[(&ta, "a"), (&tc, "c")]).is_err());
        assert_eq!(host16(&tb, "b").unwrap()[7], f16::from_f32(107.0));
        // A strided view (no contiguous storage to borrow) goes through a copy, same result.
        let view = tb.t().unwrap();
        let copy = view.contiguous().unwrap();
        assert_eq!(
            concat_cols(&[(&view, "view")]).unwrap(),
            concat_cols(&[(&copy, "copy")]).unwrap()
        );
        assert_eq!(
            host16(&view, "view").unwrap(),
            host16(&copy, "copy").unwrap()
        );
    }
}
