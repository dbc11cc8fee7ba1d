//! The engine's GPU check (`kvq-gpu engine-check`, scripts/gpu-engine-check.sh): every model-op
//! kernel and the GEMM against a CPU computation on random data, then greedy generation through the
//! engine against kvq-model's CPU path on the same model, then a decode-speed line.

use crate::engine::{argmax, Engine, SeqId};
use crate::error::{drv, GpuError, Result};
use crate::gpu::Gpu;
use crate::launch_model::{Blas, GemvIn, Indices, Linear, ModelOps};
use cudarc::driver::CudaSlice;
use half::f16;
use kvq_formats::testutil::gaussian_with_outliers;
use kvq_formats::{KvPlan, Rope, RopeStyle};
use kvq_model::Model;
use std::sync::Arc;
use std::time::Instant;

/// One comparison's outcome.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// What was compared.
    pub name: String,
    /// The measured error (its meaning is in `name`/`detail`).
    pub err: f64,
    /// The largest error that passes.
    pub tol: f64,
    /// Extra facts (tokens, margins).
    pub detail: String,
}

impl CheckResult {
    /// Within tolerance (NaN never passes).
    pub fn pass(&self) -> bool {
        self.err <= self.tol
    }
}

/// max |a - b| / max(1, |b|), elementwise; NaN anywhere gives NaN.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let mut m = 0f64;
    for (x, y) in a.iter().zip(b) {
        let e = (*x as f64 - *y as f64).abs() / (*y as f64).abs().max(1.0);
        if e.is_nan() {
            return f64::NAN;
        }
        m = m.max(e);
    }
    m
}

fn up<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, v: &[T]) -> Result<CudaSlice<T>> {
    gpu.stream()
        .clone_htod(v)
        .map_err(drv("uploading check data"))
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
) -> Result<Vec<T>> {
    gpu.stream()
        .clone_dtoh(x)
        .map_err(drv("downloading check results"))
}

fn to16(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

fn from16(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Compares every model-op kernel and the cuBLAS GEMM with a CPU computation on random, non-zero data
/// (shapes not multiples of the block sizes, poisoned outputs where a kernel must write everything).
pub fn op_checks(gpu: &Arc<Gpu>) -> Result<Vec<CheckResult>> {
    let ops = ModelOps::new(gpu)?;
    let mut blas = Blas::new(gpu)?;
    let st = gpu.stream().clone();
    let mut out = Vec::new();
    let push = |out: &mut Vec<CheckResult>, name: &str, err: f64, tol: f64| {
        out.push(CheckResult {
            name: name.into(),
            err,
            tol,
            detail: String::new(),
        })
    };

    // Embedding gather: exact.
    let (vocab, hidden) = (1000usize, 72usize);
    let table = to16(&gaussian_with_outliers(vocab, hidden, 2, 11));
    let ids: Vec<u32> = (0..17u32).map(|i| (i * 397 + 5) % vocab as u32).collect();
    let mut o = up(gpu, &vec![f32::NAN; ids.len() * hidden])?;
    ops.embed(
        &up(gpu, &table)?,
        (vocab, hidden),
        &Indices::upload(&st, &ids)?,
        &mut o,
    )?;
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| from16(&table[i as usize * hidden..(i as usize + 1) * hidden]))
        .collect();
    push(
        &mut out,
        "embed (exact)",
        max_rel(&down(gpu, &o)?, &want),
        0.0,
    );
    // An id outside the table is refused before any launch.
    let refused = ops
        .embed(
            &up(gpu, &table)?,
            (vocab, hidden),
            &Indices::upload(&st, &[vocab as u32])?,
            &mut o,
        )
        .is_err();
    push(
        &mut out,
        "embed refuses an id >= vocab",
        if refused { 0.0 } else { 1.0 },
        0.0,
    );

    // RMSNorm, with and without a row map; f16 output.
    let (rows, cols, eps) = (5usize, 200usize, 1e-5f32);
    let x = gaussian_with_outliers(rows, cols, 3, 12);
    let w: Vec<f32> = gaussian_with_outliers(1, cols, 0, 13)
        .iter()
        .map(|v| 1.0 + 0.1 * v)
        .collect();
    let cpu_norm = |r: usize| -> Vec<f32> {
        let row = &x[r * cols..(r + 1) * cols];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        row.iter().zip(&w).map(|(a, b)| a * inv * b).collect()
    };
    let (xd, wd) = (up(gpu, &x)?, up(gpu, &w)?);
    let mut o16 = up(gpu, &vec![f16::NAN; rows * cols])?;
    ops.rmsnorm(&xd, rows, None, &wd, &mut o16, (rows, cols), eps)?;
    let want: Vec<f32> = (0..rows).flat_map(cpu_norm).collect();
    push(
        &mut out,
        "rmsnorm (f16 out, rel)",
        max_rel(&from16(&down(gpu, &o16)?), &want),
        2e-3,
    );
    let map = [4u32, 0, 2];
    let mut o16 = up(gpu, &vec![f16::NAN; map.len() * cols])?;
    ops.rmsnorm(
        &xd,
        rows,
        Some(&Indices::upload(&st, &map)?),
        &wd,
        &mut o16,
        (map.len(), cols),
        eps,
    )?;
    let want: Vec<f32> = map.iter().flat_map(|&r| cpu_norm(r as usize)).collect();
    push(
        &mut out,
        "rmsnorm with row map (f16 out, rel)",
        max_rel(&from16(&down(gpu, &o16)?), &want),
        2e-3,
    );

    // RoPE, both channel layouts, per-row positions up to 1e5, rows with padding left untouched.
    for style in [RopeStyle::Interleaved, RopeStyle::Half] {
        let (n, heads, d, pad) = (7usize, 3usize, 64usize, 16usize);
        let stride = heads * d + pad;
        let rope = Rope::new(d, 10000.0, style);
        let x = gaussian_with_outliers(n, stride, 0, 14);
        let pos: Vec<u32> = (0..n as u32).map(|i| i * i * 2011 + i).collect();
        let mut xd = up(gpu, &x)?;
        ops.rope(
            &mut xd,
            stride,
            &Indices::upload(&st, &pos)?,
            &up(gpu, &rope.inv_freq)?,
            (n, heads, d),
            style,
        )?;
        let mut want = x.clone();
        for (r, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                let o = r * stride + h * d;
                rope.rotate(&mut want[o..o + d], p as usize, 1.0);
            }
        }
        push(
            &mut out,
            &format!("rope {style:?} (positions to {}, rel)", pos[n - 1]),
            max_rel(&down(gpu, &xd)?, &want),
            1e-4,
        );
    }

    // QKV split: rotated q, k unrotated (CPU caches) or rotated (GPU caches), v copied.
    for (style, rotate_k) in [
        (RopeStyle::Interleaved, false),
        (RopeStyle::Half, false),
        (RopeStyle::Interleaved, true),
        (RopeStyle::Half, true),
    ] {
        let (n, hq, hkv, d) = (4usize, 6usize, 2usize, 64usize);
        let wd = (hq + 2 * hkv) * d;
        let rope = Rope::new(d, 100000.0, style);
        let qkv = gaussian_with_outliers(n, wd, 2, 15);
        let pos: Vec<u32> = vec![0, 1, 77, 4099];
        let (mut q, mut k, mut v) = (
            up(gpu, &vec![f32::NAN; n * hq * d])?,
            up(gpu, &vec![f32::NAN; n * hkv * d])?,
            up(gpu, &vec![f32::NAN; n * hkv * d])?,
        );
        ops.qkv_split(
            &up(gpu, &qkv)?,
            &Indices::upload(&st, &pos)?,
            &up(gpu, &rope.inv_freq)?,
            &mut q,
            &mut k,
            &mut v,
            (n, hq, hkv, d),
            style,
            rotate_k,
            None,
        )?;
        let (mut wq, mut wk, mut wv) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..n {
            let row = &qkv[r * wd..(r + 1) * wd];
            for h in 0..hq {
                let mut x = row[h * d..(h + 1) * d].to_vec();
                rope.rotate(&mut x, pos[r] as usize, 1.0);
                wq.extend(x);
            }
            for h in hq..hq + hkv {
                let mut x = row[h * d..(h + 1) * d].to_vec();
                if rotate_k {
                    rope.rotate(&mut x, pos[r] as usize, 1.0);
                }
                wk.extend(x);
            }
            wv.extend_from_slice(&row[(hq + hkv) * d..]);
        }
        let err = max_rel(&down(gpu, &q)?, &wq)
            .max(max_rel(&down(gpu, &k)?, &wk))
            .max(max_rel(&down(gpu, &v)?, &wv));
        push(
            &mut out,
            &format!("qkv split + rope {style:?}, keys rotated: {rotate_k} (rel)"),
            err,
            1e-4,
        );
    }

    // SwiGLU: f16 out.
    let (n, inter) = (3usize, 300usize);
    let gu = gaussian_with_outliers(n, 2 * inter, 0, 16);
    let mut o16 = up(gpu, &vec![f16::NAN; n * inter])?;
    ops.swiglu(&up(gpu, &gu)?, &mut o16, (n, inter))?;
    let want: Vec<f32> = (0..n * inter)
        .map(|e| {
            let (r, i) = (e / inter, e % inter);
            let (g, u) = (gu[r * 2 * inter + i], gu[r * 2 * inter + inter + i]);
            g / (1.0 + (-g).exp()) * u
        })
        .collect();
    push(
        &mut out,
        "swiglu (f16 out, rel)",
        max_rel(&from16(&down(gpu, &o16)?), &want),
        2e-3,
    );

    // Residual add and casts: exact.
    let a = gaussian_with_outliers(1, 1234, 0, 17);
    let b = gaussian_with_outliers(1, 1234, 0, 18);
    let mut ad = up(gpu, &a)?;
    ops.add(&mut ad, &up(gpu, &b)?, a.len())?;
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    push(
        &mut out,
        "add (exact)",
        max_rel(&down(gpu, &ad)?, &want),
        0.0,
    );
    let mut h16 = up(gpu, &vec![f16::NAN; a.len()])?;
    ops.f32_to_f16(&up(gpu, &a)?, &mut h16, a.len())?;
    let got16 = down(gpu, &h16)?;
    let exact16 = got16
        .iter()
        .zip(&a)
        .all(|(g, x)| g.to_bits() == f16::from_f32(*x).to_bits());
    push(
        &mut out,
        "f32 -> f16 (bit-exact)",
        if exact16 { 0.0 } else { 1.0 },
        0.0,
    );
    let mut f32s = up(gpu, &vec![f32::NAN; a.len()])?;
    ops.f16_to_f32(&h16, &mut f32s, a.len())?;
    push(
        &mut out,
        "f16 -> f32 (exact)",
        max_rel(&down(gpu, &f32s)?, &from16(&got16)),
        0.0,
    );

    // Greedy argmax: random rows, NaNs and a tie (the last maximum wins), an all-NaN row (0), an
    // all -inf row (the last index), as kvq_model's sampler picks.
    let vocab = 5003usize;
    let mut l = gaussian_with_outliers(5, vocab, 0, 19);
    for i in (0..vocab).step_by(7) {
        l[vocab + i] = f32::NAN;
    }
    l[vocab + 100] = 50.0;
    l[vocab + 4000] = 50.0;
    l[2 * vocab..3 * vocab].fill(f32::NAN);
    l[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
    let mut picks = up(gpu, &[-7i32; 5])?;
    ops.argmax(&up(gpu, &l)?, (5, vocab), &mut picks)?;
    let got = down(gpu, &picks)?;
    let want: Vec<i32> = l.chunks(vocab).map(|r| argmax(r) as i32).collect();
    let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    out.push(CheckResult {
        name: "argmax (rows mismatching the CPU pick)".into(),
        err: bad as f64,
        tol: 0.0,
        detail: format!("gpu {got:?} cpu {want:?}"),
    });

    // GEMM: f16 inputs, f32 accumulation, overwrite and accumulate: decode steps of 1-2 rows (the GEMV:
    // rows not a multiple of 256 inputs, several rows a warp with the last CTA cut short), 3-8 rows,
    // prefill shapes and inputs not a multiple of 8 (cuBLAS).
    for (case, &(n, inp, outf)) in [
        (5usize, 99usize, 70usize),
        (12, 64, 40),
        (1, 1000, 264),
        (3, 577, 960),
        (8, 4096, 512),
        (8, 100, 8),
        (2, 3000, 136),
        (6, 2500, 1000),
        (2, 304, 40_004),
        (1, 300, 64),
        (1, 5000, 4104),
    ]
    .iter()
    .enumerate()
    {
        let seed = 20 + 3 * case as u64;
        // f32 accumulation: rounding grows with the sum's length (cuBLAS may also split it), about
        // sqrt(k) for random signs; 1e-4 at k = 100.
        let tol = 1e-4 * (inp as f64 / 100.0).sqrt().max(1.0);
        let x = to16(&gaussian_with_outliers(n, inp, 0, seed));
        // [out][inp], as the engine keeps weights.
        let wv = to16(&gaussian_with_outliers(outf, inp, 0, seed + 1));
        let y0 = gaussian_with_outliers(n, outf, 0, seed + 2);
        let lin = Linear {
            w: up(gpu, &wv)?,
            inp,
            out: outf,
        };
        let xd = up(gpu, &x)?;
        let mut want = vec![0f32; n * outf];
        for r in 0..n {
            for c in 0..outf {
                let mut s = 0f64;
                for i in 0..inp {
                    s += x[r * inp + i].to_f64() * wv[c * inp + i].to_f64();
                }
                want[r * outf + c] = s as f32;
            }
        }
        let want_acc: Vec<f32> = want.iter().zip(&y0).map(|(a, b)| a + b).collect();
        // Shapes the GEMV takes are checked through it and through cuBLAS, whatever KVQ_GEMV says.
        for gemv in [true, false] {
            blas.set_gemv(gemv);
            if gemv && !blas.uses_gemv(&lin, n) {
                continue;
            }
            let path = if gemv { "gemv" } else { "cublas" };
            let mut yd = up(gpu, &vec![f32::NAN; n * outf])?;
            blas.matmul(&xd, &lin, &mut yd, n, false)?;
            push(
                &mut out,
                &format!("gemm {n}x{inp}x{outf} f16 x f16 -> f32 via {path} (rel)"),
                max_rel(&down(gpu, &yd)?, &want),
                tol,
            );
            let mut yd = up(gpu, &y0)?;
            blas.matmul(&xd, &lin, &mut yd, n, true)?;
            push(
                &mut out,
                &format!("gemm {n}x{inp}x{outf} accumulate y += x W via {path} (rel)"),
                max_rel(&down(gpu, &yd)?, &want_acc),
                tol,
            );
        }
    }
    // The decode-step GEMV with the RMSNorm / SwiGLU folded into it against the separate kernels and
    // the plain GEMV (expected equal: the same sums and expressions; 1e-6 allows an FMA contracted
    // differently).
    blas.set_gemv(true);
    for (case, &(n, inp, outf, swiglu)) in [
        (1usize, 576usize, 960usize, false),
        (2, 1000, 264, false),
        (1, 1536, 576, true),
        (2, 3000, 136, true),
    ]
    .iter()
    .enumerate()
    {
        let seed = 70 + 5 * case as u64;
        let width = if swiglu { 2 * inp } else { inp };
        let xf = up(gpu, &gaussian_with_outliers(n, width, 1, seed))?;
        let nw = up(gpu, &gaussian_with_outliers(1, inp, 0, seed + 1))?;
        let lin = Linear {
            w: up(gpu, &to16(&gaussian_with_outliers(outf, inp, 0, seed + 2)))?,
            inp,
            out: outf,
        };
        let y0 = gaussian_with_outliers(n, outf, 0, seed + 3);
        let mut x16 = up(gpu, &vec![f16::NAN; n * inp])?;
        let eps = 1e-5f32;
        let (input, name) = if swiglu {
            ops.swiglu(&xf, &mut x16, (n, inp))?;
            (GemvIn::SwiGlu(&xf), "swiglu")
        } else {
            ops.rmsnorm(&xf, n, None, &nw, &mut x16, (n, inp), eps)?;
            (
                GemvIn::RmsNorm {
                    x: &xf,
                    w: &nw,
                    eps,
                },
                "rmsnorm",
            )
        };
        let mut want = up(gpu, &y0)?;
        blas.matmul(&x16, &lin, &mut want, n, true)?;
        let mut got = up(gpu, &y0)?;
        blas.gemv_from(input, &lin, &mut got, n, true)?;
        push(
            &mut out,
            &format!("gemv {n}x{inp}x{outf} with the {name} folded in vs {name} + gemv (rel)"),
            max_rel(&down(gpu, &got)?, &down(gpu, &want)?),
            1e-6,
        );
    }
    st.synchronize().map_err(drv("finishing the op checks"))?;
    Ok(out)
}

/// Faults the engine must survive (issue 9), on the GPU-resident backend of `plan`: a cache larger than
/// the GPU (a clear out-of-memory error, then a smaller engine works), and on one engine a prompt past
/// its sequence's capacity, a token outside the vocabulary and a sequence past the slot limit, each an
/// error after which another sequence still gets exactly the logits of a fresh engine.
pub fn fault_checks(gpu: Arc<Gpu>, model: &Model, plan: &str) -> Result<Vec<CheckResult>> {
    use crate::engine::ResidentLimits;
    let parsed = KvPlan::parse(plan, model.config.n_layers)?;
    let mut out = Vec::new();
    let mut push = |name: String, ok: bool, detail: String| {
        out.push(CheckResult {
            name,
            err: if ok { 0.0 } else { 1.0 },
            tol: 0.0,
            detail,
        })
    };
    let huge = ResidentLimits {
        slots: 4096,
        max_tokens: 1 << 22,
        max_chunk: 64,
    };
    let e = Engine::from_model_resident(gpu.clone(), model, parsed.clone(), huge).err();
    let msg = e.as_ref().map(|e| e.to_string()).unwrap_or_default();
    push(
        format!("{plan}: a cache of 4096 x 4M tokens is a clear out-of-memory error"),
        msg.contains("out of GPU memory") && msg.contains("needs") && msg.contains("free"),
        msg,
    );
    let limits = ResidentLimits {
        slots: 2,
        max_tokens: 64,
        max_chunk: 16,
    };
    let prompt: Vec<u32> = (0..20u32)
        .map(|i| 3 + (i * 7) % (model.config.vocab as u32 - 3))
        .collect();
    let reference = {
        let mut fresh = Engine::from_model_resident(gpu.clone(), model, parsed.clone(), limits)?;
        let s = fresh.new_sequence(64)?;
        fresh.prefill(s, &prompt, 16)?
    };
    let mut eng = Engine::from_model_resident(gpu, model, parsed, limits)?;
    let bad = eng.new_sequence(24)?;
    let long: Vec<u32> = prompt.iter().cycle().take(25).copied().collect();
    let e1 = eng.prefill(bad, &long, 16).err().map(|e| e.to_string());
    let e2 = eng
        .prefill(bad, &[model.config.vocab as u32 + 5], 16)
        .err()
        .map(|e| e.to_string());
    let good = eng.new_sequence(64)?;
    let e3 = eng.new_sequence(64).err().map(|e| e.to_string());
    let logits = eng.prefill(good, &prompt, 16)?;
    push(
        format!("{plan}: 25 tokens into a 24-token sequence are refused, none kept"),
        e1.as_deref().is_some_and(|m| m.contains("capacity")) && eng.len(bad)? == 0,
        e1.unwrap_or_else(|| "accepted".into()),
    );
    push(
        format!("{plan}: a token id outside the vocabulary is refused"),
        e2.as_deref().is_some_and(|m| m.contains("vocabulary")),
        e2.unwrap_or_else(|| "accepted".into()),
    );
    push(
        format!("{plan}: a third sequence on a 2-slot cache is refused"),
        e3.is_some(),
        e3.unwrap_or_else(|| "accepted".into()),
    );
    let diff = logits
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = reference.iter().map(|x| x.abs()).fold(0f32, f32::max);
    push(
        format!("{plan}: after those errors another sequence's logits equal a fresh engine's"),
        logits.len() == reference.len() && diff <= 1e-5 * scale.max(1.0),
        format!(
            "max |diff| {diff:e} (logits up to {scale:.2}) over {} logits",
            logits.len()
        ),
    );
    Ok(out)
}

/// What [`prefill_and_step_pair`] leaves: the two sequences (still allocated), the prefills' last-row
/// logits, every decode step's logits (a's then b's), and a's last greedy pick.
struct PairRun {
    seqs: (SeqId, SeqId),
    prefill: [Vec<f32>; 2],
    steps: Vec<Vec<f32>>,
    last_a: u32,
}

/// Two new sequences of capacity `cap` prefilled with `pa` and `pb` (chunks of 32 tokens), then
/// `steps` batch-2 decode steps, each fed the greedy picks of the one before: the shared run of the
/// checks that compare two ways of executing the same steps.
fn prefill_and_step_pair(
    eng: &mut Engine,
    cap: usize,
    pa: &[u32],
    pb: &[u32],
    steps: usize,
) -> Result<PairRun> {
    let (a, b) = (eng.new_sequence(cap)?, eng.new_sequence(cap)?);
    let prefill = [eng.prefill(a, pa, 32)?, eng.prefill(b, pb, 32)?];
    let (mut ta, mut tb) = (argmax(&prefill[0]), argmax(&prefill[1]));
    let mut logits = Vec::with_capacity(2 * steps);
    for _ in 0..steps {
        let l = eng.step(&[(a, ta), (b, tb)])?;
        ta = argmax(&l[0]);
        tb = argmax(&l[1]);
        logits.extend(l);
    }
    Ok(PairRun {
        seqs: (a, b),
        prefill,
        steps: logits,
        last_a: ta,
    })
}

/// The QKV split writing new K/V into the resident cache's rings (the default) against the cache's own
/// append kernel: a prefill and batch-2 decode steps must give the same logits bit for bit (the ring
/// receives the same f16 of the same f32 values either way).
pub fn fused_append_checks(
    gpu: Arc<Gpu>,
    model: &Model,
    plan: &str,
    steps: usize,
) -> Result<Vec<CheckResult>> {
    use crate::engine::{backend::Heads, ResidentBackend, ResidentLimits};
    let c = &model.config;
    let heads = Heads::of(c);
    let limits = ResidentLimits {
        slots: 2,
        max_tokens: 64 + steps,
        max_chunk: 32,
    };
    let vocab = c.vocab as u32;
    let mut runs = Vec::new();
    for fused in [true, false] {
        let parsed = KvPlan::parse(plan, c.n_layers)?;
        let backend = ResidentBackend::new(&gpu, &parsed, &model.rope, heads, limits)?
            .with_fused_append(fused);
        let mut eng = Engine::with_backend(gpu.clone(), model, Box::new(backend))?;
        let pa: Vec<u32> = (0..45).map(|i| 3 + (i * 7 + 1) % (vocab - 3)).collect();
        let pb: Vec<u32> = (0..9).map(|i| 3 + (i * 11 + 5) % (vocab - 3)).collect();
        let pair = prefill_and_step_pair(&mut eng, limits.max_tokens, &pa, &pb, steps)?;
        let mut logits = pair.prefill.to_vec();
        logits.extend(pair.steps);
        runs.push(logits);
    }
    let diff = runs[0]
        .iter()
        .flatten()
        .zip(runs[1].iter().flatten())
        .map(|(x, y)| {
            if x == y {
                0.0
            } else {
                (x - y).abs().max(f32::MIN_POSITIVE)
            }
        })
        .fold(0f32, f32::max);
    let same_len = runs[0].len() == runs[1].len();
    Ok(vec![CheckResult {
        name: format!(
            "{plan}: K/V written by the QKV split vs the append kernel, max |logit diff|"
        ),
        err: if same_len { diff as f64 } else { f64::INFINITY },
        tol: 0.0,
        detail: format!(
            "{} logit rows (prefill 45 and 9 tokens, {steps} batch-2 steps)",
            runs[0].len()
        ),
    }])
}

/// Decode steps replayed from CUDA graphs give exactly the logits and greedy picks of steps issued
/// kernel by kernel (same kernels, same arguments), on the GPU-resident backend of `plan`: two
/// sequences of different lengths decoded together for `steps` steps (crossing block seals and page
/// boundaries), then on alone with GPU greedy picks. Also checks that graphs were captured and
/// replayed, not silently skipped.
pub fn graph_checks(
    gpu: Arc<Gpu>,
    model: &Model,
    plan: &str,
    steps: usize,
) -> Result<Vec<CheckResult>> {
    use crate::engine::ResidentLimits;
    let parsed = KvPlan::parse(plan, model.config.n_layers)?;
    let limits = ResidentLimits {
        slots: 2,
        max_tokens: 64 + 2 * steps,
        max_chunk: 32,
    };
    let mut eng = Engine::from_model_resident(gpu, model, parsed, limits)?;
    let vocab = model.config.vocab as u32;
    let prompt = |len: u32, salt: u32| -> Vec<u32> {
        (0..len)
            .map(|i| 3 + (i * 13 + salt) % (vocab - 3))
            .collect()
    };
    type Run = (Vec<Vec<f32>>, Vec<u32>);
    let run = |eng: &mut Engine, graphs: bool| -> Result<Run> {
        eng.set_graphs(graphs)?;
        let pair =
            prefill_and_step_pair(eng, limits.max_tokens, &prompt(5, 1), &prompt(37, 2), steps)?;
        let (logits, (a, b), mut ta) = (pair.steps, pair.seqs, pair.last_a);
        eng.free(b);
        let mut picks = Vec::new();
        for _ in 0..steps / 2 {
            ta = eng.step_greedy(&[(a, ta)])?[0];
            picks.push(ta);
        }
        eng.free(a);
        Ok((logits, picks))
    };
    let (graph_logits, graph_picks) = run(&mut eng, true)?;
    let (stats, failure) = eng.graph_stats();
    let (direct_logits, direct_picks) = run(&mut eng, false)?;
    let diff = graph_logits
        .iter()
        .flatten()
        .zip(direct_logits.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let mut out = vec![CheckResult {
        name: format!(
            "{plan}: {steps} batch-2 steps from graphs vs issued directly, max |logit diff|"
        ),
        err: diff as f64,
        tol: 0.0,
        detail: format!("{} logit rows", graph_logits.len()),
    }];
    let same = graph_picks == direct_picks && graph_logits.len() == direct_logits.len();
    out.push(CheckResult {
        name: format!("{plan}: greedy picks from graphs equal direct ones"),
        err: if same { 0.0 } else { 1.0 },
        tol: 0.0,
        detail: format!("{graph_picks:?} vs {direct_picks:?}"),
    });
    let used = stats.replayed > 0 && stats.captured > 0 && failure.is_none();
    out.push(CheckResult {
        name: format!("{plan}: steps were captured and replayed"),
        err: if used { 0.0 } else { 1.0 },
        tol: 0.0,
        detail: format!("{stats:?}, capture failure: {failure:?}"),
    });
    Ok(out)
}

/// The CPU reference of one prompt: greedy tokens and the logits before each of them.
struct CpuRun {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn cpu_greedy(model: &Model, plan: &KvPlan, prompt: &[u32], steps: usize) -> Result<CpuRun> {
    let mut seq = model.new_sequence(plan, prompt.len() + steps)?;
    let rows = |t: candle_core::Tensor| -> Result<Vec<f32>> {
        let n = t.dim(0).map_err(kvq_model::ModelError::from)?;
        Ok(t.narrow(0, n - 1, 1)
            .and_then(|x| x.flatten_all())
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(kvq_model::ModelError::from)?)
    };
    let mut l = rows(model.forward(&mut seq, prompt, None)?)?;
    let mut run = CpuRun {
        tokens: Vec::new(),
        logits: Vec::new(),
    };
    for i in 0..steps {
        let t = argmax(&l);
        run.tokens.push(t);
        let next = if i + 1 < steps {
            rows(model.forward(&mut seq, &[t], None)?)?
        } else {
            Vec::new()
        };
        run.logits.push(std::mem::replace(&mut l, next));
    }
    Ok(run)
}

/// Largest minus second-largest logit: how close a greedy pick was to a tie.
fn margin(l: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in l {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

/// Greedy generation through the engine vs kvq-model's CPU path on `model` with `plan`, for several
/// prompts decoded as one batch. Two comparisons:
/// - teacher-forced: the engine is fed the CPU's tokens; per-step logits must agree within
///   `LOGIT_TOL` x the step's largest |logit|;
/// - free-running: the engine's own greedy tokens must equal the CPU's, or first differ at a step
///   whose CPU top-2 margin is below twice the measured logit difference (a near tie, not a bug).
///
/// `chunk` is the engine's prefill chunk (small values exercise chunked prefill).
pub fn generation_check(
    gpu: Arc<Gpu>,
    model: &Model,
    plan: &str,
    prompts: &[Vec<u32>],
    steps: usize,
    chunk: usize,
    label: &str,
) -> Result<Vec<CheckResult>> {
    generation_check_on(
        gpu,
        model,
        plan,
        prompts,
        (steps, chunk),
        label,
        BackendChoice::Host,
    )
}

/// Which attention backend an engine check builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The host-cache reference backend.
    Host,
    /// The GPU-resident backend (formats with CUDA encoders and decoders).
    Resident,
}

/// An engine on `model` with `kv` and the chosen backend, sized for `slots` sequences of up to
/// `max_tokens` tokens appended in chunks of at most `chunk`.
pub fn build_engine(
    gpu: Arc<Gpu>,
    model: &Model,
    kv: KvPlan,
    choice: BackendChoice,
    (slots, max_tokens, chunk): (usize, usize, usize),
) -> Result<Engine> {
    match choice {
        BackendChoice::Host => Engine::from_model(gpu, model, kv),
        BackendChoice::Resident => Engine::from_model_resident(
            gpu,
            model,
            kv,
            crate::engine::ResidentLimits {
                slots,
                max_tokens,
                max_chunk: chunk,
            },
        ),
    }
}

/// [`generation_check`] with a chosen backend; `(steps, chunk)` as there.
pub fn generation_check_on(
    gpu: Arc<Gpu>,
    model: &Model,
    plan: &str,
    prompts: &[Vec<u32>],
    (steps, chunk): (usize, usize),
    label: &str,
    choice: BackendChoice,
) -> Result<Vec<CheckResult>> {
    let kv = KvPlan::parse(plan, model.config.n_layers)?;
    let cpu: Vec<CpuRun> = prompts
        .iter()
        .map(|p| cpu_greedy(model, &kv, p, steps))
        .collect::<Result<_>>()?;
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0) + steps + 1;
    let mut engine = build_engine(
        gpu,
        model,
        kv,
        choice,
        (2 * prompts.len().max(1), longest, chunk.max(1)),
    )?;
    eprintln!("  engine: {}", engine.describe());
    let mut res = Vec::new();

    // Teacher-forced, all prompts in one batch.
    let seqs: Vec<SeqId> = prompts
        .iter()
        .map(|p| engine.new_sequence(p.len() + steps))
        .collect::<Result<_>>()?;
    let mut logits: Vec<Vec<f32>> = seqs
        .iter()
        .zip(prompts)
        .map(|(&s, p)| engine.prefill(s, p, chunk))
        .collect::<Result<_>>()?;
    let (mut worst, mut worst_rel, mut disagree, mut near_ties) = (0f64, 0f64, 0usize, 0usize);
    let mut per_step = vec![0f64; steps];
    for (i, step_diff) in per_step.iter_mut().enumerate() {
        for (b, run) in cpu.iter().enumerate() {
            let want = &run.logits[i];
            let got = &logits[b];
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, c)| (*a as f64 - *c as f64).abs())
                .fold(0f64, |m, x| {
                    if x.is_nan() || m.is_nan() {
                        f64::NAN
                    } else {
                        m.max(x)
                    }
                });
            let scale = want.iter().map(|x| x.abs() as f64).fold(1f64, f64::max);
            *step_diff = step_diff.max(diff);
            worst = if diff.is_nan() {
                f64::NAN
            } else {
                worst.max(diff)
            };
            worst_rel = if diff.is_nan() {
                f64::NAN
            } else {
                worst_rel.max(diff / scale)
            };
            if argmax(got) != run.tokens[i] {
                if (margin(want) as f64) < 2.0 * diff {
                    near_ties += 1;
                } else {
                    disagree += 1;
                }
            }
        }
        if i + 1 < steps {
            let batch: Vec<(SeqId, u32)> = seqs
                .iter()
                .zip(&cpu)
                .map(|(&s, r)| (s, r.tokens[i]))
                .collect();
            logits = engine.step(&batch)?;
        }
    }
    for s in seqs {
        engine.free(s);
    }
    let steps_line: Vec<String> = per_step.iter().map(|x| format!("{x:.3}")).collect();
    res.push(CheckResult {
        name: format!("{label}: {TEACHER_FORCED_LOGITS}, max |gpu - cpu| / max |cpu logit| ({} prompts x {steps} steps, batched)", prompts.len()),
        err: worst_rel,
        tol: LOGIT_TOL,
        detail: format!("max abs diff {worst:.4}; per step: [{}]", steps_line.join(" ")),
    });
    res.push(CheckResult {
        name: format!(
            "{label}: teacher-forced greedy picks differing from the CPU's (near ties excluded)"
        ),
        err: disagree as f64,
        tol: 0.0,
        detail: format!("{near_ties} near ties"),
    });

    // Free-running greedy, batched, picks on the GPU.
    let seqs: Vec<SeqId> = prompts
        .iter()
        .map(|p| engine.new_sequence(p.len() + steps))
        .collect::<Result<_>>()?;
    let mut toks: Vec<Vec<u32>> = Vec::new();
    for (&s, p) in seqs.iter().zip(prompts) {
        toks.push(vec![argmax(&engine.prefill(s, p, chunk)?)]);
    }
    for _ in 1..steps {
        let batch: Vec<(SeqId, u32)> = seqs
            .iter()
            .zip(&toks)
            .map(|(&s, t)| (s, t[t.len() - 1]))
            .collect();
        for (t, n) in toks.iter_mut().zip(engine.step_greedy(&batch)?) {
            t.push(n);
        }
    }
    let mut bad = 0usize;
    let mut detail = Vec::new();
    for (b, (g, run)) in toks.iter().zip(&cpu).enumerate() {
        match g.iter().zip(&run.tokens).position(|(a, c)| a != c) {
            None => detail.push(format!("prompt {b}: {steps}/{steps} equal")),
            Some(i) => {
                let m = margin(&run.logits[i]) as f64;
                let ok = m < 2.0 * per_step[i].max(1e-6);
                bad += usize::from(!ok);
                detail.push(format!(
                    "prompt {b}: first difference at step {i} (gpu {} cpu {}, cpu top-2 margin {m:.4}, logit diff {:.4}: {})",
                    g[i],
                    run.tokens[i],
                    per_step[i],
                    if ok { "near tie" } else { "NOT a near tie" }
                ));
            }
        }
    }
    for s in seqs {
        engine.free(s);
    }
    res.push(CheckResult {
        name: format!(
            "{label}: free-running greedy tokens differing from the CPU's (beyond near ties)"
        ),
        err: bad as f64,
        tol: 0.0,
        detail: detail.join("; "),
    });

    // The same free-running greedy chained on the device (Engine::decode_greedy, each step's picks
    // fed to the next without the host): the same kernels on the same inputs, so the same tokens.
    let mut first = Vec::with_capacity(prompts.len());
    for p in prompts {
        let s = engine.new_sequence(p.len() + steps)?;
        first.push((s, argmax(&engine.prefill(s, p, chunk)?)));
    }
    let picks = engine.decode_greedy(&first, steps.saturating_sub(1))?;
    let (mut differ, mut where_) = (0usize, Vec::new());
    for (b, want) in toks.iter().enumerate() {
        let got: Vec<u32> = std::iter::once(first[b].1)
            .chain(picks.iter().map(|row| row[b]))
            .collect();
        if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
            differ += 1;
            where_.push(format!(
                "sequence {b} from token {i}: chained {:?} step-by-step {:?}",
                three_from(&got, i),
                three_from(want, i)
            ));
        }
    }
    for (s, _) in first {
        engine.free(s);
    }
    res.push(CheckResult {
        name: format!(
            "{label}: chained greedy decode (picks fed on the device) differing from step-by-step (sequences)"
        ),
        err: differ as f64,
        tol: 0.0,
        detail: format!("{} sequences x {steps} tokens; {}", toks.len(), where_.join("; ")),
    });

    // Engine::generate with a greedy sampler (chained on the device where the backend is resident):
    // the step-by-step tokens again, up to an end-of-sequence token if one comes first.
    let eos = model.config.eos.clone();
    let (mut differ, mut where_) = (0usize, Vec::new());
    for (b, (p, want)) in prompts.iter().zip(&toks).enumerate() {
        let mut sampler = kvq_model::sample::Sampler::new(0.0, 0, 1.0, 0);
        let (got, st) = engine.generate(p, steps, chunk, &mut sampler, &mut |_| {})?;
        let stop_ok = got.len() == steps
            || (matches!(st.stop, kvq_model::generate::Stop::Eos)
                && want.get(got.len()).is_some_and(|t| eos.contains(t)));
        let first = got.iter().zip(want).position(|(g, w)| g != w);
        if first.is_some() || !stop_ok {
            differ += 1;
            let i = first.unwrap_or(got.len());
            where_.push(format!(
                "sequence {b} from token {i}: generate {:?} step-by-step {:?} ({} tokens, stop {:?})",
                three_from(&got, i),
                three_from(want, i),
                got.len(),
                st.stop
            ));
        }
    }
    res.push(CheckResult {
        name: format!("{label}: greedy Engine::generate differing from step-by-step (sequences)"),
        err: differ as f64,
        tol: 0.0,
        detail: format!(
            "{} sequences x {steps} tokens; {}",
            toks.len(),
            where_.join("; ")
        ),
    });
    Ok(res)
}

/// Up to three tokens of `v` from position `i` (none past its end): where two token lists part.
fn three_from(v: &[u32], i: usize) -> &[u32] {
    &v[i.min(v.len())..(i + 3).min(v.len())]
}

/// Teacher-forced logits may differ from the f32 CPU path by this fraction of the step's largest
/// |logit|: weights and GEMM inputs are f16 on the GPU (about 3 significant digits), f32 on the CPU.
pub const LOGIT_TOL: f64 = 2e-2;

/// The words that name [`generation_check_on`]'s teacher-forced logit comparison in its result, for
/// callers that treat that line apart (kvq-gpu resident-check on the tiny random model).
pub const TEACHER_FORCED_LOGITS: &str = "teacher-forced logits";

/// Decode speed of the engine: `batch` sequences after a `prompt_len`-token prompt, `steps` greedy
/// steps timed (tokens/s counts all sequences' tokens).
pub fn decode_speed(
    gpu: Arc<Gpu>,
    model: &Model,
    plan: &str,
    batch: usize,
    prompt_len: usize,
    steps: usize,
) -> Result<(f64, String)> {
    decode_speed_on(
        gpu,
        model,
        plan,
        (batch, prompt_len, steps),
        BackendChoice::Host,
    )
}

/// [`decode_speed`] with a chosen backend; `(batch, prompt_len, steps)` as there.
pub fn decode_speed_on(
    gpu: Arc<Gpu>,
    model: &Model,
    plan: &str,
    (batch, prompt_len, steps): (usize, usize, usize),
    choice: BackendChoice,
) -> Result<(f64, String)> {
    let kv = KvPlan::parse(plan, model.config.n_layers)?;
    let mut engine = build_engine(
        gpu.clone(),
        model,
        kv,
        choice,
        (batch, prompt_len + steps + 1, 256),
    )?;
    let vocab = model.config.vocab as u32;
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut seqs = Vec::new();
    let mut last = Vec::new();
    for _ in 0..batch {
        let s = engine.new_sequence(prompt_len + steps + 1)?;
        last.push(argmax(&engine.prefill(s, &prompt, 256)?));
        seqs.push(s);
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        let b: Vec<(SeqId, u32)> = seqs.iter().copied().zip(last.iter().copied()).collect();
        last = engine.step_greedy(&b)?;
    }
    gpu.stream()
        .synchronize()
        .map_err(drv("finishing the timed steps"))?;
    let s = t0.elapsed().as_secs_f64();
    if s <= 0.0 {
        return Err(GpuError::Input("no time measured".into()));
    }
    Ok(((batch * steps) as f64 / s, engine.describe()))
}

/// One plan's perplexity through the GPU engine and through kvq-model's CPU path, same windows.
#[derive(Debug, Clone)]
pub struct PplPair {
    /// The plan.
    pub plan: String,
    /// Which engine backend served it.
    pub backend: BackendChoice,
    /// Perplexity, GPU engine.
    pub gpu: f64,
    /// Perplexity, CPU path.
    pub cpu: f64,
    /// Tokens scored (each path).
    pub scored: usize,
}

/// Perplexity of `plan` on `tokens` in `windows` windows of `ctx` tokens (stride ctx/2, the second half
/// scored, as `kvq eval ppl`), through the GPU engine (resident backend when every layer has CUDA
/// kernels, else the host-cache one) and through the CPU path.
pub fn ppl_pair(
    gpu: Arc<Gpu>,
    model: &Model,
    plan: &str,
    tokens: &[u32],
    (ctx, windows, chunk): (usize, usize, usize),
) -> Result<PplPair> {
    use kvq_model::eval::{perplexity, windows as count_windows, PplOpts};
    let kv = KvPlan::parse(plan, model.config.n_layers)?;
    let o = PplOpts {
        ctx,
        stride: ctx / 2,
        chunk,
        max_windows: windows,
    };
    let cpu = perplexity(model, &kv, tokens, &o, &mut |_, _| {})?;
    let (n_windows, body) = count_windows(model, tokens.len(), &o)?;
    let limits = (1, ctx, chunk);
    let (mut engine, backend) = match build_engine(
        gpu.clone(),
        model,
        kv.clone(),
        BackendChoice::Resident,
        limits,
    ) {
        Ok(e) => (e, BackendChoice::Resident),
        Err(_) => (
            build_engine(gpu, model, kv, BackendChoice::Host, limits)?,
            BackendChoice::Host,
        ),
    };
    let bos: Vec<u32> = model
        .config
        .bos
        .filter(|_| model.tokenizer.add_bos)
        .into_iter()
        .collect();
    let (mut nll, mut scored) = (0f64, 0usize);
    for w in 0..n_windows {
        let mut ids = bos.clone();
        ids.extend_from_slice(&tokens[w * o.stride..w * o.stride + body]);
        let (n, s, _) = engine.window_nll(&ids, ids.len() - o.stride, chunk)?;
        nll += n;
        scored += s;
    }
    Ok(PplPair {
        plan: plan.to_string(),
        backend,
        gpu: (nll / scored.max(1) as f64).exp(),
        cpu: cpu.ppl,
        scored,
    })
}
