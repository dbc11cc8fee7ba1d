// The model ops of the GPU engine (src/engine/): everything of a LLaMA forward except the GEMMs (cuBLAS)
// and attention (an AttentionBackend). Every kernel is launched from src/launch_model.rs, whose SAFETY
// comments restate the argument lists below; kvq::engine::check compares each one with a CPU computation.
//
// Layouts: activations are row-major [rows][cols]; the residual stream and GEMM outputs are f32, GEMM
// inputs f16. Index arithmetic that scales with rows x cols is 64-bit.
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "kvq_pdl.cuh"
#include "kvq_ring.cuh"

namespace {

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x / 32) ? part[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// Rotates pair i of one head (channels a, b by `style`: 0 = interleaved (2i, 2i+1), 1 = rotate-half
// (i, i + d/2)) from `src` into `dst` (may alias). The angle is computed in double, as the CPU reference
// does (kvq_formats::Rope::rotate): positions reach 1e5+, where f32 angles lose digits.
// With `ring`, the rotated pair also goes there as f16 (kvq::ring_half of the same f32 values).
__device__ __forceinline__ void rope_pair(const float* src, float* dst, int i, int d, int style, int pos,
                                          const float* inv_freq, uint16_t* ring = nullptr) {
    const int a = style == 0 ? 2 * i : i;
    const int b = style == 0 ? 2 * i + 1 : i + d / 2;
    double sd, cd;
    sincos((double)pos * (double)inv_freq[i], &sd, &cd);
    const float s = (float)sd, c = (float)cd;
    const float xa = src[a], xb = src[b];
    const float ya = xa * c - xb * s, yb = xa * s + xb * c;
    dst[a] = ya;
    dst[b] = yb;
    if (ring != nullptr) {
        ring[a] = kvq::ring_half(ya);
        ring[b] = kvq::ring_half(yb);
    }
}

}  // namespace

// out[r][c] = table[ids[r]][c] (f16 table [vocab][hidden] -> f32). Grid (n), block 256.
// Callers check ids < vocab before the launch.
extern "C" __global__ void kvq_model_embed(const __half* table, const int32_t* ids, float* out, int n, int hidden) {
    KVQ_PDL_ENTER();
    const int r = blockIdx.x;
    if (r >= n) return;
    const __half* src = table + (int64_t)ids[r] * hidden;
    float* dst = out + (int64_t)r * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = __half2float(src[c]);
}

// RMSNorm: out[r] = x[rows ? rows[r] : r] / sqrt(mean(x^2) + eps) * w, written as f16 (a GEMM input).
// Grid (n), block 256. `rows` (nullable) selects input rows (the last token of each sequence).
extern "C" __global__ void kvq_model_rmsnorm(const float* x, const int32_t* rows, const float* w, __half* out,
                                             int n, int cols, float eps) {
    KVQ_PDL_ENTER();
    const int r = blockIdx.x;
    if (r >= n) return;
    const int64_t src_row = rows ? rows[r] : r;
    const float* src = x + src_row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += src[c] * src[c];
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / (float)cols + eps);
    __half* dst = out + (int64_t)r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = __float2half(src[c] * inv * w[c]);
}

// In-place RoPE of `heads` heads of d channels per row: x[r * row_stride + h * d + ...] rotated to
// position pos[r]. Grid (n, heads), block 256 (loops over the d/2 pairs).
extern "C" __global__ void kvq_model_rope(float* x, int64_t row_stride, const int32_t* pos, const float* inv_freq,
                                          int n, int heads, int d, int style) {
    KVQ_PDL_ENTER();
    const int r = blockIdx.x, h = blockIdx.y;
    if (r >= n || h >= heads) return;
    float* v = x + (int64_t)r * row_stride + (int64_t)h * d;
    for (int i = threadIdx.x; i < d / 2; i += blockDim.x) rope_pair(v, v, i, d, style, pos[r], inv_freq);
}

// Splits the fused QKV GEMM output qkv [n][(hq + 2 hkv) d] into q [n][hq][d] rotated to pos[r], and k, v
// [n][hkv][d]; k rotated too when rotate_k (GPU-resident caches store rotated keys: one kernel fewer per
// layer than a separate kvq_model_rope), else unrotated (CPU caches take keys before RoPE).
// With k_ring (a GPU-resident cache's append staged before the split, rotate_k set), row r's k and v
// also go to the f16 window rings [slots][hkv][win_cap][d] at slot ring_slot[r], row ring_tok[r] %
// win_cap, as kvq_cache_append would write them: the append kernel is not launched.
// Grid (n, hq + 2 hkv), block 256.
extern "C" __global__ void kvq_model_qkv_split(const float* qkv, const int32_t* pos, const float* inv_freq, float* q,
                                               float* k, float* v, int n, int hq, int hkv, int d, int style,
                                               int rotate_k, uint16_t* k_ring, uint16_t* v_ring,
                                               const int32_t* ring_slot, const int32_t* ring_tok, int win_cap) {
    KVQ_PDL_ENTER();
    const int r = blockIdx.x, h = blockIdx.y;
    if (r >= n || h >= hq + 2 * hkv) return;
    const float* src = qkv + (int64_t)r * (hq + 2 * hkv) * d + (int64_t)h * d;
    if (h < hq) {
        float* dst = q + ((int64_t)r * hq + h) * d;
        for (int i = threadIdx.x; i < d / 2; i += blockDim.x) rope_pair(src, dst, i, d, style, pos[r], inv_freq);
    } else {
        const int kh = h - hq;
        const bool is_k = kh < hkv;
        const int hh = is_k ? kh : kh - hkv;
        float* dst = (is_k ? k : v) + ((int64_t)r * hkv + hh) * d;
        uint16_t* ring = nullptr;
        if (k_ring != nullptr)
            ring = (is_k ? k_ring : v_ring) +
                   (((int64_t)ring_slot[r] * hkv + hh) * win_cap + ring_tok[r] % win_cap) * d;
        if (is_k && rotate_k) {
            for (int i = threadIdx.x; i < d / 2; i += blockDim.x)
                rope_pair(src, dst, i, d, style, pos[r], inv_freq, ring);
        } else {
            for (int c = threadIdx.x; c < d; c += blockDim.x) {
                dst[c] = src[c];
                if (ring != nullptr) ring[c] = kvq::ring_half(src[c]);
            }
        }
    }
}

// SwiGLU of the fused gate/up GEMM output gu [n][2 inter] (gate first): out[r][i] = silu(gate) * up, f16.
// Grid-stride over n * inter.
extern "C" __global__ void kvq_model_swiglu(const float* gu, __half* out, int n, int inter) {
    KVQ_PDL_ENTER();
    const int64_t total = (int64_t)n * inter;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / inter, i = e - r * inter;
        const float g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
        out[e] = __float2half(g / (1.f + expf(-g)) * u);
    }
}

// x[i] += y[i] for i < n (the residual add; the forward folds it into the GEMMs with beta = 1, this is
// for backends and tests). Grid-stride.
extern "C" __global__ void kvq_model_add(float* x, const float* y, int64_t n) {
    KVQ_PDL_ENTER();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        x[e] += y[e];
}

// f32 -> f16 (round to nearest even). Grid-stride.
extern "C" __global__ void kvq_model_f32_to_f16(const float* x, __half* y, int64_t n) {
    KVQ_PDL_ENTER();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        y[e] = __float2half(x[e]);
}

// f16 -> f32. Grid-stride.
extern "C" __global__ void kvq_model_f16_to_f32(const __half* x, float* y, int64_t n) {
    KVQ_PDL_ENTER();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        y[e] = __half2float(x[e]);
}

// Greedy pick per row of logits [rows][vocab]: the index of the largest non-NaN value, the last one on
// ties (as Rust's Iterator::max_by in kvq_model::sample), 0 when every value is NaN. Grid (rows), block
// 1024.
extern "C" __global__ void kvq_model_argmax(const float* logits, int vocab, int32_t* out) {
    KVQ_PDL_ENTER();
    __shared__ float sv[1024];
    __shared__ int si[1024];
    const float* row = logits + (int64_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = -1;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = row[i];
        if (!isnan(x) && (bi < 0 || x >= bv)) {  // i increases, so >= keeps the last maximum
            bv = x;
            bi = i;
        }
    }
    sv[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = sv[threadIdx.x + s];
            const int oi = si[threadIdx.x + s];
            const int mi = si[threadIdx.x];
            const bool take = oi >= 0 && (mi < 0 || ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi > mi));
            if (take) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = si[0] < 0 ? 0 : si[0];
}

// Moves a recorded step's packed uploads to their destinations (src/graph.rs): `arena` starts with n
// segments of {uint64 destination, uint32 source offset in arena, uint32 bytes}; block i copies segment
// i, by 4-byte words when everything is 4-byte aligned (the index arrays always are).
extern "C" __global__ void kvq_model_scatter(const uint8_t* arena, int n) {
    KVQ_PDL_ENTER();
    const int i = blockIdx.x;
    if (i >= n) return;
    const uint8_t* seg = arena + 16 * (int64_t)i;
    const uint64_t dst = *(const uint64_t*)seg;
    const uint32_t off = *(const uint32_t*)(seg + 8);
    const uint32_t len = *(const uint32_t*)(seg + 12);
    const uint8_t* src = arena + off;
    if (((dst | off | len) & 3u) == 0) {
        uint32_t* d = (uint32_t*)dst;
        const uint32_t* s = (const uint32_t*)src;
        for (uint32_t w = threadIdx.x; w < len / 4; w += blockDim.x) d[w] = s[w];
    } else {
        uint8_t* d = (uint8_t*)dst;
        for (uint32_t b = threadIdx.x; b < len; b += blockDim.x) d[b] = src[b];
    }
}

// ---- Small-batch GEMM (decode steps): y[n][out] (=|+=) x[n][inp] W^T, W [out][inp], n <= 2 ----------------
// A decode step's GEMMs read every weight once for a handful of rows: they are bound by the weight bytes.
// W is row-major [out][inp] as the model files store it, so one output is one contiguous weight row: a
// warp streams whole rows (a lane takes 8 consecutive k of every 256: one 16-byte non-caching load per
// row), GEMV_U loads per row in flight and the next group requested before the current one is summed;
// x (the n rows, f16) is staged once per CTA in shared memory. CTA = 8 warps; warp w of CTA b takes rows
// (b * 8 + w) * rpw .. + rpw one after another (the host passes 1: more rows a warp spread the staging
// but ran slower, run 20), so no K split, no partial sums and no atomics: each output is its warp's 32
// fixed-order lane sums and a fixed butterfly, the same in graph replays and direct launches. On the H100
// (docs/BENCHMARKS.md, runs 18 and 20) this layout streamed the Llama-3-8B layer GEMVs 7.6% faster
// than the earlier [inp][out] column-tile kernel in a lab kernel, and a whole B=1 4k step's GPU time
// went from 6.297 to 6.009 ms.
// Requires inp % 8 == 0, 16-byte aligned W and n * inp halves of dynamic shared memory (the wrapper,
// src/launch_model.rs, checks all three).
namespace {
constexpr int GEMV_THREADS = 256;
constexpr int GEMV_WARPS = GEMV_THREADS / 32;
constexpr int GEMV_U = 4;

__device__ __forceinline__ uint4 gemv_ld_stream(const __half* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// The GEMV's input rows (`mode`): 0 = x, f16 [n][inp]; 1 = RMSNorm of xf [n][inp] (f32) with weight nw
// and eps; 2 = SwiGLU of xf [n][2 inp] (gate first). Modes 1 and 2 fold the kernel that would have made
// x (kvq_model_rmsnorm, kvq_model_swiglu) into the staging, computing it exactly as those kernels do
// (the same per-row sum, the same expressions), so the fused and unfused steps agree.
// STAGE: input vectors (8 values) a thread loads before it converts and stores any when staging x (more
// loads in flight, more registers: 1 fits 4 CTAs per SM, 2 three; one row takes 1 and two rows 2, run 21;
// KVQ_GEMV_STAGE sets it, to compare).
template <int NP, int STAGE>
__device__ __forceinline__ void gemv(const __half* __restrict__ x, const float* __restrict__ xf,
                                     const float* __restrict__ nw, float eps, int mode,
                                     const __half* __restrict__ w, float* y, int n, int inp, int out, int rpw,
                                     int accumulate) {
    extern __shared__ __align__(16) __half xs[];  // [NP][inp]
    __shared__ float inv_sh[NP];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int row0 = (blockIdx.x * GEMV_WARPS + warp) * rpw;
    const int rows = max(0, min(rpw, out - row0));
    // Work items: (row, group of GEMV_U steps of 256 k), row-major, so the prefetch runs on across rows.
    const int groups = (inp + 256 * GEMV_U - 1) / (256 * GEMV_U);
    const int items = rows * groups;
    auto load = [&](uint4 (&buf)[GEMV_U], int item) {
        const int r = item / groups, g = item - r * groups;
        const __half* wr = w + (int64_t)(row0 + r) * inp;
#pragma unroll
        for (int u = 0; u < GEMV_U; ++u) {
            const int k = (g * GEMV_U + u) * 256 + lane * 8;
            buf[u] = k < inp ? gemv_ld_stream(wr + k) : make_uint4(0, 0, 0, 0);
        }
    };
    // Launched as a programmatic dependent: the first weights (which no kernel writes) are requested
    // while the kernel that writes x finishes; x and y only after the wait.
    uint4 cur[GEMV_U];
    if (items > 0) load(cur, 0);
    kvq_pdl_wait();
    kvq_pdl_trigger();
    // x is staged before any weight is summed, so its loads must not wait on one another: every
    // thread requests a batch (8 values of the norm's sum; each vector's 2-4 16-byte loads) before using any
    // (scalar loads one at a time cost about 10 us of L2 round trips per CTA at 4096 inputs: run 19).
    if (mode == 1) {
        // kvq_model_rmsnorm's sum (block of 256 threads, strided loop, block_sum), every row, in the
        // same order: thread t adds c = t, t + 256, ... one after another.
#pragma unroll
        for (int r = 0; r < NP; ++r) {
            float ss = 0.f;
            if (r < n) {
                const float* src = xf + (int64_t)r * inp;
                for (int c0 = tid; c0 < inp; c0 += 8 * GEMV_THREADS) {
                    float v[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const int c = c0 + j * GEMV_THREADS;
                        v[j] = c < inp ? src[c] : 0.f;
                    }
#pragma unroll
                    for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
                }
            }
            ss = block_sum(ss);
            if (tid == 0) inv_sh[r] = 1.f / sqrtf(ss / (float)inp + eps);
        }
    }
    // Vectors of 8 consecutive inputs (inp % 8 == 0, so a vector stays in its row and 16-byte aligned).
    const int vecs = inp / 8, total = NP * vecs;
    for (int v0 = tid; v0 < total; v0 += STAGE * GEMV_THREADS) {
        float in[STAGE][8], in2[STAGE][8];
        int at[STAGE];
#pragma unroll
        for (int j = 0; j < STAGE; ++j) {
            const int v = v0 + j * GEMV_THREADS;
            const int r = v / vecs, k = (v - r * vecs) * 8;
            at[j] = v < total && r < n ? r * inp + k : -1;
            if (at[j] < 0) continue;
            if (mode == 0) {
                const uint4 h = *reinterpret_cast<const uint4*>(x + at[j]);
                const __half2* h2 = reinterpret_cast<const __half2*>(&h);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 f = __half22float2(h2[i]);
                    in[j][2 * i] = f.x;
                    in[j][2 * i + 1] = f.y;
                }
            } else {
                // mode 1: xf and nw; mode 2: gate and up.
                const float* a = xf + (mode == 1 ? (int64_t)r * inp : (int64_t)r * 2 * inp) + k;
                const float* b = mode == 1 ? nw + k : a + inp;
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const float4 fa = reinterpret_cast<const float4*>(a)[i];
                    const float4 fb = reinterpret_cast<const float4*>(b)[i];
                    in[j][4 * i] = fa.x, in[j][4 * i + 1] = fa.y, in[j][4 * i + 2] = fa.z, in[j][4 * i + 3] = fa.w;
                    in2[j][4 * i] = fb.x, in2[j][4 * i + 1] = fb.y, in2[j][4 * i + 2] = fb.z, in2[j][4 * i + 3] = fb.w;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < STAGE; ++j) {
            const int v = v0 + j * GEMV_THREADS;
            if (v >= total) break;
            __half2 o[4];
            if (at[j] < 0) {
                // Padding rows (r >= n): zeros.
#pragma unroll
                for (int i = 0; i < 4; ++i) o[i] = __float2half2_rn(0.f);
            } else {
                const int r = v / vecs;
                float val[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (mode == 0) {
                        val[i] = in[j][i];
                    } else if (mode == 1) {
                        val[i] = in[j][i] * inv_sh[r] * in2[j][i];
                    } else {
                        const float g = in[j][i], u = in2[j][i];
                        val[i] = g / (1.f + expf(-g)) * u;
                    }
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) o[i] = __floats2half2_rn(val[2 * i], val[2 * i + 1]);
            }
            *reinterpret_cast<uint4*>(xs + (int64_t)v * 8) = *reinterpret_cast<const uint4*>(o);
        }
    }
    __syncthreads();
    float acc[NP];
#pragma unroll
    for (int p = 0; p < NP; ++p) acc[p] = 0.f;
    for (int it = 0; it < items; ++it) {
        uint4 nxt[GEMV_U];
        if (it + 1 < items) load(nxt, it + 1);
        const int r = it / groups, g = it - r * groups;
#pragma unroll
        for (int u = 0; u < GEMV_U; ++u) {
            const int k = (g * GEMV_U + u) * 256 + lane * 8;
            if (k < inp) {
                const __half2* wh = reinterpret_cast<const __half2*>(&cur[u]);
#pragma unroll
                for (int p = 0; p < NP; ++p) {
                    const uint4 xv = *reinterpret_cast<const uint4*>(xs + p * inp + k);
                    const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float2 wf = __half22float2(wh[j]), xf2 = __half22float2(xh[j]);
                        acc[p] = fmaf(wf.y, xf2.y, fmaf(wf.x, xf2.x, acc[p]));
                    }
                }
            }
        }
        if (g == groups - 1) {
            // The row is done: lanes' sums in a fixed butterfly, lane 0 writes.
#pragma unroll
            for (int p = 0; p < NP; ++p) {
                float v = acc[p];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0 && p < n) {
                    float* dst = y + (int64_t)p * out + row0 + r;
                    *dst = accumulate ? *dst + v : v;
                }
                acc[p] = 0.f;
            }
        }
        if (it + 1 < items) {
#pragma unroll
            for (int u = 0; u < GEMV_U; ++u) cur[u] = nxt[u];
        }
    }
}
}  // namespace

// One entry per padded row count (n <= NP; rows n..NP-1 are computed on zeros and not written) and
// staging batch (suffix _s2, _s4; with the fewest CTAs per SM that their registers allow).
#define KVQ_GEMV(NP, STAGE, SUFFIX, MINB)                                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, MINB)                                          \
        kvq_model_gemv##NP##SUFFIX(const __half* x, const float* xf, const float* nw, float eps, int mode,    \
                                   const __half* w, float* y, int n, int inp, int out, int rpw,             \
                                   int accumulate) {                                                        \
        gemv<NP, STAGE>(x, xf, nw, eps, mode, w, y, n, inp, out, rpw, accumulate);                           \
    }
KVQ_GEMV(1, 1, , 4)
KVQ_GEMV(2, 1, , 4)
KVQ_GEMV(1, 2, _s2, 3)
KVQ_GEMV(2, 2, _s2, 3)
KVQ_GEMV(1, 4, _s4, 2)
KVQ_GEMV(2, 4, _s4, 2)
