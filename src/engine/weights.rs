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

/// Output rows a transposing task writes at once: [`OUT_BLOCK`] x inp halves stay in cache while
/// each input row contributes one contiguous run of [`OUT_BLOCK`] values.
const OUT_BLOCK: usize = 64;

/// Row-major [inp][out_i] f32 matrices (kvq-model's transposed layout) as one f16 [sum out_i][inp]
/// matrix, the parts' rows stacked: the GPU keeps the files' [out][inp] layout, where the decode GEMV
/// streams each output's weights contiguously. Each part is read in place (see [`with_f32`]) and
/// transposed in blocks of output rows on all cores.
fn stack_rows(parts: &[(&Tensor, &str)]) -> Result<(Vec<f16>, usize, usize)> {
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
    let mut rest = w.as_mut_slice();
    for ((t, what), &o) in parts.iter().zip(&dims) {
        let (part, tail) = rest.split_at_mut(o * inp);
        rest = tail;
        if inp == 0 {
            continue;
        }
        with_f32(t, what, |m| {
            part.par_chunks_mut(OUT_BLOCK * inp)
                .enumerate()
                .for_each(|(b, block)| {
                    let (o0, rows) = (b * OUT_BLOCK, block.len() / inp);
                    for (k, src) in m.chunks(o).enumerate() {
                        for (j, &x) in src[o0..o0 + rows].iter().enumerate() {
                            block[j * inp + k] = f16::from_f32(x);
                        }
                    }
                });
        })?;
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
            let (qkv, qi, qo) = stack_rows(&[
                (&l.wq, &name("q")),
                (&l.wk, &name("k")),
                (&l.wv, &name("v")),
            ])?;
            let (gu, gi, go) = stack_rows(&[(&l.w_gate, &name("gate")), (&l.w_up, &name("up"))])?;
            let (wo, oi, oo) = stack_rows(&[(&l.wo, &name("o"))])?;
            let (wd, di, dout) = stack_rows(&[(&l.w_down, &name("down"))])?;
            layers.push(GpuLayer {
                attn_norm: up32(host(&l.attn_norm, &name("attn_norm"))?, &name("attn_norm"))?,
                wqkv: Linear {
                    w: up16(qkv, &name("qkv"))?,
                    inp: qi,
                    out: qo,
                },
                wo: Linear {
                    w: up16(wo, &name("o"))?,
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
                    w: up16(wd, &name("down"))?,
                    inp: di,
                    out: dout,
                },
            });
        }
        let (head, hi, ho) = stack_rows(&[(&w.lm_head, "lm_head")])?;
        let lm_head = Linear {
            w: up16(head, "lm_head")?,
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
    fn stack_rows_transposes_each_part_and_stacks_them() {
        // [3][2] and [3][70] (a part wider than one output block, not a multiple of it) as f16
        // [72][3]: output row o = column o of a, then of b.
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..210).map(|i| 100.0 + i as f32).collect();
        let ta = Tensor::from_vec(a.clone(), (3, 2), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), (3, 70), &Device::Cpu).unwrap();
        let (w, inp, out) = stack_rows(&[(&ta, "a"), (&tb, "b")]).unwrap();
        assert_eq!((inp, out), (3, 72));
        for o in 0..out {
            for k in 0..inp {
                let want = if o < 2 {
                    a[k * 2 + o]
                } else {
                    b[k * 70 + o - 2]
                };
                assert_eq!(w[o * inp + k], f16::from_f32(want), "row {o} col {k}");
            }
        }
        // Parts must share their input rows.
        let tc = Tensor::from_vec(vec![0f32; 8], (4, 2), &Device::Cpu).unwrap();
        assert!(stack_rows(&[(&ta, "a"), (&tc, "c")]).is_err());
        assert_eq!(host16(&tb, "b").unwrap()[7], f16::from_f32(107.0));
        // A strided view (no contiguous storage to borrow) goes through a copy, same result.
        let view = tb.t().unwrap();
        let copy = view.contiguous().unwrap();
        assert_eq!(
            stack_rows(&[(&view, "view")]).unwrap(),
            stack_rows(&[(&copy, "copy")]).unwrap()
        );
        assert_eq!(
            host16(&view, "view").unwrap(),
            host16(&copy, "copy").unwrap()
        );
    }
}
