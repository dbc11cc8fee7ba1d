//! GPU self-check and micro-benchmark of decode attention: every kernel against the CPU reference of
//! kvq-formats on the same packed bytes, then timings with CUDA events. Used by `kvq-gpu` (and the
//! scripts/gpu-check.sh run on the GPU machine).

use crate::attention::GpuBatch;
use crate::error::{drv, Result};
use crate::gpu::Gpu;
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

/// Tolerance of GPU vs CPU reference on the same bytes: f32 arithmetic in a different order and
/// `__expf`; measured far below this (see docs/GPU.md).
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
                    let batch = GpuBatch::upload(gpu, &refs, 1, seed)?;
                    let q = gaussian_with_outliers(lens.len() * hq, d, 0, seed + 7);
                    let got = batch.attend(gpu, &q, hq)?;
                    let mut worst = 0f64;
                    for (b, c) in caches.iter().enumerate() {
                        let mut want = vec![0f32; hq * d];
                        c.attend_fused(&q[b * hq * d..(b + 1) * hq * d], c.len(), &mut want)?;
                        worst = worst.max(rel_err(&got[b * hq * d..(b + 1) * hq * d], &want));
                    }
                    out.push(ParityResult {
                        case,
                        rel_err: worst,
                        non_finite: got.iter().filter(|x| !x.is_finite()).count(),
                    });
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
