//! GPU self-check and micro-benchmark of decode attention: every kernel against the CPU reference of
//! kvq-formats on the same packed bytes, then timings with CUDA events. Used by `kvq-gpu` (and the
//! scripts/gpu-check.sh run on the GPU machine).

use crate::attention::GpuBatch;
use crate::error::{drv, Result};
use crate::gpu::Gpu;
use cudarc::driver::CudaSlice;
use kvq_formats::testutil::{gaussian_with_outliers, rel_err};
use kvq_formats::{KvPlan, LayerCache, Rope, RopeStyle};

/// One parity case's outcome.
#[derive(Debug, Clone)]
pub struct ParityResult {
    /// Human-readable case.
    pub case: String,
    /// max over sequences of ||gpu - cpu|| / ||cpu||.
    pub rel_err: f64,
    /// Output elements that stayed NaN (unwritten) or became non-finite.
    pub non_finite: usize,
}

/// Builds one sequence's single-layer cache of `format` holding `t` random tokens (outlier channels).
pub fn random_cache(format: &str, t: usize, hkv: usize, d: usize, seed: u64) -> Result<LayerCache> {
    let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
    let mut c = KvPlan::parse(format, 1)?
        .build_caches(hkv, &rope)?
        .remove(0);
    let k = gaussian_with_outliers(t * hkv, d, 2, seed);
    let v = gaussian_with_outliers(t * hkv, d, 0, seed ^ 0x9e37);
    let chunk = 512;
    let mut done = 0;
    while done < t {
        let n = chunk.min(t - done);
        c.append(
            &k[done * hkv * d..(done + n) * hkv * d],
            &v[done * hkv * d..(done + n) * hkv * d],
            n,
        )?;
        done += n;
    }
    Ok(c)
}

/// Writes random RVQ codebooks for one layer (`codes` codewords of 32 channels, `depth` stages,
/// stage s scaled by 0.6^s like the shrinking residuals of learned books) to the temp directory and
/// returns the path: the parity checks need a codebook file and the real one does not travel.
pub fn synthetic_codebooks(codes: usize, depth: usize) -> Result<String> {
    let path = std::env::temp_dir().join(format!("kvq-check-rvq-{codes}x{depth}.safetensors"));
    let path = path.to_string_lossy().into_owned();
    write_synthetic_codebooks(&path, 1, codes, depth)?;
    Ok(path)
}

/// Random RVQ codebooks (see [`synthetic_codebooks`]) for `layers` layers at `path`: timings of RVQ on
/// random-weight models, whose own calibration would mean nothing.
pub fn write_synthetic_codebooks(
    path: &str,
    layers: usize,
    codes: usize,
    depth: usize,
) -> Result<()> {
    let mut tables = std::collections::BTreeMap::new();
    for l in 0..layers {
        for (i, key) in [true, false].into_iter().enumerate() {
            let seed = 4242 + i as u64 + 2 * l as u64;
            let mut t = gaussian_with_outliers(depth * codes, 32, 0, seed);
            for (s, stage) in t.chunks_mut(codes * 32).enumerate() {
                let f = 0.6f32.powi(s as i32) * 0.5;
                stage.iter_mut().for_each(|v| *v *= f);
            }
            tables.insert(kvq_formats::calibrate::table_name(l, key), t);
        }
    }
    kvq_formats::calibrate::Codebooks {
        group: 32,
        codes,
        depth,
        sets: 1,
        key_groups: "strided".into(),
        tables,
    }
    .save(path)?;
    Ok(())
}

/// RVQ settings of the parity checks, over synthetic codebooks: 8-bit codes (the paper's codebook
/// size class), 10-bit codes straddling words with an f16 window, 4-bit codes at the kernel's 16 stages.
pub fn rvq_check_formats() -> Result<Vec<String>> {
    Ok(vec![
        format!(
            "rvq:codes=256,depth=8,window=0,codebooks={}",
            synthetic_codebooks(256, 8)?
        ),
        format!(
            "rvq:codes=1000,depth=3,window=16,codebooks={}",
            synthetic_codebooks(1000, 3)?
        ),
        format!(
            "rvq:codes=16,depth=16,window=0,codebooks={}",
            synthetic_codebooks(16, 16)?
        ),
    ])
}

/// Tolerance of GPU vs CPU reference on the same bytes: f32 arithmetic in a different order, `exp2f`,
/// and dequantized keys/values rounded to f16 for the MMAs (worst measured 1.3e-3, docs/BENCHMARKS.md run 7).
pub const PARITY_TOL: f64 = 2e-3;

/// Runs the parity matrix: formats x head_dim {64,128} x GQA {1,4,8} x lengths (incl. 1, block-1,
/// block, block+1, thousands) x batch {1, 3 with different lengths}, random page order.
pub fn parity(gpu: &Gpu, formats: &[&str]) -> Result<Vec<ParityResult>> {
    let mut out = Vec::new();
    let mut seed = 1u64;
    for fmt in formats {
        for d in [64usize, 128] {
            for (hq, hkv) in [(2usize, 2usize), (8, 2), (16, 2)] {
                let lens: [&[usize]; 7] =
                    [&[1], &[31], &[32], &[33], &[300], &[4133], &[77, 1500, 640]];
                for lens in lens {
                    seed += 1;
                    let case = format!("{fmt} d={d} hq={hq} hkv={hkv} T={lens:?}");
                    if let Ok(f) = std::env::var("KVQ_CHECK_FILTER") {
                        if !case.contains(&f) {
                            continue;
                        }
                    }
                    let caches: Vec<LayerCache> = lens
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| random_cache(fmt, t, hkv, d, seed * 31 + i as u64))
                        .collect::<Result<_>>()?;
                    let refs: Vec<&LayerCache> = caches.iter().collect();
                    let mut batch = GpuBatch::upload(gpu, &refs, 1, seed)?;
                    let q = gaussian_with_outliers(lens.len() * hq, d, 0, seed + 7);
                    let mut wants = Vec::with_capacity(caches.len());
                    for (b, c) in caches.iter().enumerate() {
                        let mut want = vec![0f32; hq * d];
                        c.attend_fused(&q[b * hq * d..(b + 1) * hq * d], c.len(), &mut want)?;
                        wants.push(want);
                    }
                    // Tiled formats: the shrunken work units these short cases get, then the whole ones.
                    let passes: &[(bool, &str)] = if batch.tiled() {
                        &[(false, ""), (true, " whole-units")]
                    } else {
                        &[(false, "")]
                    };
                    for &(whole, tag) in passes {
                        batch.kv.whole_units = whole;
                        let got = batch.attend(gpu, &q, hq)?;
                        let worst = wants
                            .iter()
                            .enumerate()
                            .map(|(b, want)| rel_err(&got[b * hq * d..(b + 1) * hq * d], want))
                            .fold(0f64, f64::max);
                        out.push(ParityResult {
                            case: format!("{case}{tag}"),
                            rel_err: worst,
                            non_finite: got.iter().filter(|x| !x.is_finite()).count(),
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// One timing point.
#[derive(Debug, Clone)]
pub struct BenchPoint {
    /// Format string.
    pub format: String,
    /// Sequences.
    pub batch: usize,
    /// Context tokens per sequence.
    pub context: usize,
    /// Median milliseconds per attention call (decode + merge).
    pub ms: f64,
    /// Cache bytes read per call.
    pub bytes: usize,
}

/// Times decode attention for `(hq, hkv, d)` heads with CUDA events: `reps` timed calls after warm-up,
/// median. Long contexts tile 4096 really encoded tokens.
pub fn bench(
    gpu: &Gpu,
    format: &str,
    batch: usize,
    context: usize,
    (hq, hkv, d): (usize, usize, usize),
    reps: usize,
) -> Result<BenchPoint> {
    let base = 4096.min(context);
    let cache = random_cache(format, base, hkv, d, 42)?;
    // Long contexts repeat the base's sealed blocks.
    let repeat = (context / base).max(1);
    let refs: Vec<&LayerCache> = vec![&cache; batch];
    let gb = GpuBatch::upload(gpu, &refs, repeat, 1)?;
    let mut ws = gb.workspace(gpu, hq)?;
    let q = gaussian_with_outliers(batch * hq, d, 0, 3);
    let st = gpu.stream();
    st.memcpy_htod(&q, &mut ws.q)
        .map_err(drv("uploading queries"))?;
    for _ in 0..5 {
        gb.launch(gpu, &mut ws)?;
    }
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a = st.record_event(timing).map_err(drv("recording an event"))?;
        gb.launch(gpu, &mut ws)?;
        let b = st.record_event(timing).map_err(drv("recording an event"))?;
        b.synchronize().map_err(drv("waiting for the benchmark"))?;
        times.push(a.elapsed_ms(&b).map_err(drv("reading an event"))? as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(BenchPoint {
        format: format.to_string(),
        batch,
        context: repeat * base,
        ms: times[times.len() / 2],
        bytes: gb.bytes_read,
    })
}

/// Device-to-device copy bandwidth in bytes/s (read + written, median of 20 copies of 1 GiB, CUDA
/// events): the yardstick that benchmarks divide their bytes per second by.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let n = 1usize << 28; // 2^28 f32 = 1 GiB
    let st = gpu.stream();
    let a = st
        .alloc_zeros::<f32>(n)
        .map_err(drv("allocating 1 GiB for the copy benchmark"))?;
    let mut b = st
        .alloc_zeros::<f32>(n)
        .map_err(drv("allocating 1 GiB for the copy benchmark"))?;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::new();
    for i in 0..23 {
        let e0 = st.record_event(timing).map_err(drv("recording an event"))?;
        st.memcpy_dtod(&a, &mut b).map_err(drv("copying"))?;
        let e1 = st.record_event(timing).map_err(drv("recording an event"))?;
        e1.synchronize().map_err(drv("waiting for the copy"))?;
        if i >= 3 {
            times.push(e0.elapsed_ms(&e1).map_err(drv("reading an event"))? as f64);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(2.0 * (n * 4) as f64 / (times[times.len() / 2] / 1e3))
}

/// Encoder parity: tokens appended through the GPU cache (window rings + CUDA encoders, several slots,
/// uneven chunks) must give the CPU reference's bytes in every sealed block, and attention over the
/// GPU-written cache (full rows and causal prefixes) must match `attend_fused` on the CPU cache.
/// `rel_err` is the attention error; `non_finite` counts mismatched block bytes plus bad outputs.
pub fn encode_parity(gpu: &Gpu, formats: &[&str]) -> Result<Vec<ParityResult>> {
    use crate::cache::{CacheConfig, GpuLayerCache};
    let mut out = Vec::new();
    for fmt in formats {
        for d in [64usize, 128] {
            let (hq, hkv) = (8usize, 2usize);
            let case = format!("encode {fmt} d={d} hq={hq} hkv={hkv}");
            if let Ok(f) = std::env::var("KVQ_CHECK_FILTER") {
                if !case.contains(&f) {
                    continue;
                }
            }
            let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
            let plan = KvPlan::parse(fmt, 1)?;
            let lens = [37usize, 700, 1333];
            let mut cpu: Vec<LayerCache> = (0..lens.len())
                .map(|_| Ok(plan.build_caches(hkv, &rope)?.remove(0)))
                .collect::<Result<_>>()?;
            let mut gc = GpuLayerCache::new(
                gpu,
                cpu[0].keys().codec(),
                cpu[0].values().codec(),
                CacheConfig {
                    slots: lens.len(),
                    hkv,
                    d,
                    max_tokens: 2048,
                    pool_pages: None,
                    max_append: 256,
                },
            )?;
            // Appends in rounds: every slot that still has tokens takes a chunk (1 token in some
            // rounds, like decode steps).
            let data: Vec<(Vec<f32>, Vec<f32>)> = lens
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    (
                        gaussian_with_outliers(t * hkv, d, 2, 1000 + i as u64),
                        gaussian_with_outliers(t * hkv, d, 0, 2000 + i as u64),
                    )
                })
                .collect();
            let mut done = vec![0usize; lens.len()];
            let mut round = 0;
            while done.iter().zip(&lens).any(|(a, b)| a < b) {
                round += 1;
                let mut counts = Vec::new();
                let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
                for (i, &t) in lens.iter().enumerate() {
                    let n = if round % 3 == 0 { 1 } else { 97 + 40 * i }.min(t - done[i]);
                    if n == 0 {
                        continue;
                    }
                    let (k, v) = &data[i];
                    let (a, b) = (done[i] * hkv * d, (done[i] + n) * hkv * d);
                    cpu[i].append(&k[a..b], &v[a..b], n)?;
                    let mut kr = k[a..b].to_vec();
                    // Keys rotated as the engine hands them, unless the codec is pre-RoPE.
                    let rotations = if gc.wants_unrotated_keys() { 0 } else { n };
                    for tt in 0..rotations {
                        for h in 0..hkv {
                            let o = (tt * hkv + h) * d;
                            rope.rotate(&mut kr[o..o + d], done[i] + tt, 1.0);
                        }
                    }
                    kbuf.extend_from_slice(&kr);
                    vbuf.extend_from_slice(&v[a..b]);
                    counts.push((i, n));
                    done[i] += n;
                }
                let st = gpu.stream();
                let kd = st.clone_htod(&kbuf).map_err(drv("uploading keys"))?;
                let vd = st.clone_htod(&vbuf).map_err(drv("uploading values"))?;
                gc.append(gpu, &counts, &kd, &vd)?;
            }
            // Block bytes.
            let kv = gc.kv();
            let st = gpu.stream();
            let kp = st.clone_dtoh(&kv.k_pages).map_err(drv("reading K pages"))?;
            let vp = st.clone_dtoh(&kv.v_pages).map_err(drv("reading V pages"))?;
            let table = st
                .clone_dtoh(&kv.page_table)
                .map_err(drv("reading the page table"))?;
            let (kbb, vbb, bt, pb) = (
                kv.k_block_bytes,
                kv.v_block_bytes,
                kv.block_tokens,
                kv.page_blocks,
            );
            let mut bad_bytes = 0usize;
            for (i, c) in cpu.iter().enumerate() {
                if c.keys().sealed() != kv.host_sealed[i] {
                    bad_bytes += 1_000_000;
                }
                for blk in 0..c.keys().sealed() / bt {
                    let page = table[i * kv.shape.max_pages + blk / pb] as usize;
                    for h in 0..hkv {
                        let ko = ((page * hkv + h) * pb + blk % pb) * kbb;
                        let vo = ((page * hkv + h) * pb + blk % pb) * vbb;
                        let (kr, vr) = (kv.k_block_real, kv.v_block_real);
                        let (kc, vc) = (
                            &c.keys().packed(h)[blk * kr..(blk + 1) * kr],
                            &c.values().packed(h)[blk * vr..(blk + 1) * vr],
                        );
                        bad_bytes += kc
                            .iter()
                            .zip(&kp[ko..ko + kbb])
                            .filter(|(a, b)| a != b)
                            .count();
                        bad_bytes += vc
                            .iter()
                            .zip(&vp[vo..vo + vbb])
                            .filter(|(a, b)| a != b)
                            .count();
                    }
                }
            }
            // Attention: every slot in full, then causal prefixes of the longest.
            let mut rows: Vec<(usize, usize)> =
                lens.iter().enumerate().map(|(i, &t)| (i, t)).collect();
            rows.extend([(2usize, 1usize), (2, 31), (2, 640), (2, 1301)]);
            let q = gaussian_with_outliers(rows.len() * hq, d, 0, 77);
            let got = kv.attend(gpu, &rows, &q, hq)?;
            let mut worst = 0f64;
            for (r, &(slot, len)) in rows.iter().enumerate() {
                let mut want = vec![0f32; hq * d];
                cpu[slot].attend_fused(&q[r * hq * d..(r + 1) * hq * d], len, &mut want)?;
                worst = worst.max(rel_err(&got[r * hq * d..(r + 1) * hq * d], &want));
            }
            out.push(ParityResult {
                case,
                rel_err: worst,
                non_finite: bad_bytes + got.iter().filter(|x| !x.is_finite()).count(),
            });
        }
    }
    Ok(out)
}

/// One GEMM shape timed through the decode-step GEMV and through cuBLAS in the same process.
pub struct GemmPoint {
    /// Rows (the decode batch).
    pub n: usize,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// Median ms of kvq_model_gemv.
    pub gemv_ms: f64,
    /// Median ms of cuBLAS (gemm_ex, f16 in, f32 out).
    pub cublas_ms: f64,
}

impl GemmPoint {
    /// Weight bytes one call streams (what bounds a decode step's GEMM).
    pub fn weight_bytes(&self) -> usize {
        self.inp * self.out * 2
    }
}

/// Times the GEMMs of a decode step of shape (n rows, inp -> out) both ways: weights random f16, cycled
/// over copies totalling at least 512 MiB so that no call finds its weight in L2 (a real step reads
/// every layer's weights once). Medians over `reps` calls after a warm-up, CUDA events.
pub fn gemm_bench(
    gpu: &std::sync::Arc<Gpu>,
    shapes: &[(usize, usize, usize)],
    reps: usize,
) -> Result<Vec<GemmPoint>> {
    use crate::launch_model::{Blas, Linear};
    use half::f16;
    let mut blas = Blas::new(gpu)?;
    let st = gpu.stream();
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut out = Vec::new();
    for &(n, inp, outf) in shapes {
        let size = inp * outf;
        let copies = (1usize << 28).div_ceil(size).max(1);
        // A random pattern of 2^20 values repeated: the bytes streamed are what is timed.
        let pattern: Vec<f16> = gaussian_with_outliers(1, 1 << 20, 0, 7)
            .iter()
            .map(|&v| f16::from_f32(v * 0.02))
            .collect();
        let host: Vec<f16> = (0..size).map(|i| pattern[i % pattern.len()]).collect();
        let mut ws = Vec::with_capacity(copies);
        for _ in 0..copies {
            ws.push(Linear {
                w: st
                    .clone_htod(&host)
                    .map_err(drv("uploading a benchmark weight"))?,
                inp,
                out: outf,
            });
        }
        let x: Vec<f16> = gaussian_with_outliers(n, inp, 0, 8)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let xd = st
            .clone_htod(&x)
            .map_err(drv("uploading benchmark inputs"))?;
        let mut y = st
            .alloc_zeros::<f32>(n * outf)
            .map_err(drv("allocating benchmark outputs"))?;
        let mut time = |blas: &Blas| -> Result<f64> {
            for w in ws.iter().cycle().take(copies.max(3)) {
                blas.matmul(&xd, w, &mut y, n, false)?;
            }
            let mut t = Vec::with_capacity(reps);
            for w in ws.iter().cycle().take(reps) {
                let a = st.record_event(timing).map_err(drv("recording an event"))?;
                blas.matmul(&xd, w, &mut y, n, false)?;
                let b = st.record_event(timing).map_err(drv("recording an event"))?;
                b.synchronize().map_err(drv("waiting for the benchmark"))?;
                t.push(a.elapsed_ms(&b).map_err(drv("reading an event"))? as f64);
            }
            t.sort_by(|a, b| a.total_cmp(b));
            Ok(t[t.len() / 2])
        };
        blas.set_gemv(true);
        let gemv_ms = time(&blas)?;
        blas.set_gemv(false);
        let cublas_ms = time(&blas)?;
        blas.set_gemv(true);
        out.push(GemmPoint {
            n,
            inp,
            out: outf,
            gemv_ms,
            cublas_ms,
        });
    }
    Ok(out)
}

/// The GEMMs of whole decode steps of the Llama-3-8B shape at `n` rows: per layer qkv (4096 -> 6144),
/// O (4096 -> 4096, accumulated), gate+up (4096 -> 28672) and down (14336 -> 4096, accumulated), over
/// `layers` layers of distinct random weights, issued back to back as a step issues them. Returns the
/// median ms per step through the GEMV and through cuBLAS, and the weight bytes per step.
pub fn gemm_chain_bench(
    gpu: &std::sync::Arc<Gpu>,
    layers: usize,
    n: usize,
    reps: usize,
) -> Result<(f64, f64, usize)> {
    use crate::launch_model::{Blas, Linear};
    use half::f16;
    let shapes = [
        (4096usize, 6144usize),
        (4096, 4096),
        (4096, 28672),
        (14336, 4096),
    ];
    let mut blas = Blas::new(gpu)?;
    let st = gpu.stream();
    let pattern: Vec<f16> = gaussian_with_outliers(1, 1 << 20, 0, 9)
        .iter()
        .map(|&v| f16::from_f32(v * 0.02))
        .collect();
    let mut first: Vec<CudaSlice<f16>> = Vec::new();
    for &(i, o) in &shapes {
        let host: Vec<f16> = (0..i * o).map(|k| pattern[k % pattern.len()]).collect();
        first.push(
            st.clone_htod(&host)
                .map_err(drv("uploading a benchmark weight"))?,
        );
    }
    let mut w: Vec<Vec<Linear>> = Vec::with_capacity(layers);
    for _ in 0..layers {
        let mut l = Vec::new();
        for (s, &(i, o)) in first.iter().zip(&shapes) {
            let mut d = st
                .alloc_zeros::<f16>(i * o)
                .map_err(drv("allocating a benchmark weight"))?;
            st.memcpy_dtod(s, &mut d)
                .map_err(drv("copying a benchmark weight"))?;
            l.push(Linear {
                w: d,
                inp: i,
                out: o,
            });
        }
        w.push(l);
    }
    let bytes: usize = shapes.iter().map(|&(i, o)| i * o * 2).sum::<usize>() * layers;
    let x: Vec<f16> = gaussian_with_outliers(n, 14336, 0, 10)
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let xd = st
        .clone_htod(&x)
        .map_err(drv("uploading benchmark inputs"))?;
    let mut y = st
        .alloc_zeros::<f32>(n * 28672)
        .map_err(drv("allocating benchmark outputs"))?;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut time = |blas: &Blas| -> Result<f64> {
        let mut t = Vec::with_capacity(reps);
        for rep in 0..reps + 2 {
            let a = st.record_event(timing).map_err(drv("recording an event"))?;
            for l in &w {
                for (k, lin) in l.iter().enumerate() {
                    blas.matmul(&xd, lin, &mut y, n, k % 2 == 1)?;
                }
            }
            let b = st.record_event(timing).map_err(drv("recording an event"))?;
            b.synchronize().map_err(drv("waiting for the benchmark"))?;
            if rep >= 2 {
                t.push(a.elapsed_ms(&b).map_err(drv("reading an event"))? as f64);
            }
        }
        t.sort_by(|a, b| a.total_cmp(b));
        Ok(t[t.len() / 2])
    };
    blas.set_gemv(true);
    let g = time(&blas)?;
    blas.set_gemv(false);
    let c = time(&blas)?;
    Ok((g, c, bytes))
}
