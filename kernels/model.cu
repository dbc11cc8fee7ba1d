// The model ops of the GPU engine (src/engine/): everything of a LLaMA forward except the GEMMs (cuBLAS)
// and attention (an AttentionBackend). Every kernel is launched from src/launch_model.rs, whose SAFETY
// comments restate the argument lists below; kvq::engine::check compares each one with a CPU computation.
//
// Layouts: activations are row-major [rows][cols]; the residual stream and GEMM outputs are f32, GEMM
// inputs f16. Index arithmetic that scales with rows x cols is 64-bit.
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

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
__device__ __forceinline__ void rope_pair(const float* src, float* dst, int i, int d, int style, int pos,
                                          const float* inv_freq) {
    const int a = style == 0 ? 2 * i : i;
    const int b = style == 0 ? 2 * i + 1 : i + d / 2;
    double sd, cd;
    sincos((double)pos * (double)inv_freq[i], &sd, &cd);
    const float s = (float)sd, c = (float)cd;
    const float xa = src[a], xb = src[b];
    dst[a] = xa * c - xb * s;
    dst[b] = xa * s + xb * c;
}

}  // namespace

// out[r][c] = table[ids[r]][c] (f16 table [vocab][hidden] -> f32). Grid (n), block 256.
// Callers check ids < vocab before the launch.
extern "C" __global__ void kvq_model_embed(const __half* table, const int32_t* ids, float* out, int n, int hidden) {
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
    const int r = blockIdx.x, h = blockIdx.y;
    if (r >= n || h >= heads) return;
    float* v = x + (int64_t)r * row_stride + (int64_t)h * d;
    for (int i = threadIdx.x; i < d / 2; i += blockDim.x) rope_pair(v, v, i, d, style, pos[r], inv_freq);
}

// Splits the fused QKV GEMM output qkv [n][(hq + 2 hkv) d] into q [n][hq][d] rotated to pos[r], and k, v
// [n][hkv][d]; k rotated too when rotate_k (GPU-resident caches store rotated keys: one kernel fewer per
// layer than a separate kvq_model_rope), else unrotated (CPU caches take keys before RoPE).
// Grid (n, hq + 2 hkv), block 256.
extern "C" __global__ void kvq_model_qkv_split(const float* qkv, const int32_t* pos, const float* inv_freq, float* q,
                                               float* k, float* v, int n, int hq, int hkv, int d, int style,
                                               int rotate_k) {
    const int r = blockIdx.x, h = blockIdx.y;
    if (r >= n || h >= hq + 2 * hkv) return;
    const float* src = qkv + (int64_t)r * (hq + 2 * hkv) * d + (int64_t)h * d;
    if (h < hq) {
        float* dst = q + ((int64_t)r * hq + h) * d;
        for (int i = threadIdx.x; i < d / 2; i += blockDim.x) rope_pair(src, dst, i, d, style, pos[r], inv_freq);
    } else {
        const int kh = h - hq;
        float* dst = kh < hkv ? k + ((int64_t)r * hkv + kh) * d : v + ((int64_t)r * hkv + kh - hkv) * d;
        if (kh < hkv && rotate_k) {
            for (int i = threadIdx.x; i < d / 2; i += blockDim.x) rope_pair(src, dst, i, d, style, pos[r], inv_freq);
        } else {
            for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
        }
    }
}

// SwiGLU of the fused gate/up GEMM output gu [n][2 inter] (gate first): out[r][i] = silu(gate) * up, f16.
// Grid-stride over n * inter.
extern "C" __global__ void kvq_model_swiglu(const float* gu, __half* out, int n, int inter) {
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
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        x[e] += y[e];
}

// f32 -> f16 (round to nearest even). Grid-stride.
extern "C" __global__ void kvq_model_f32_to_f16(const float* x, __half* y, int64_t n) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        y[e] = __float2half(x[e]);
}

// f16 -> f32. Grid-stride.
extern "C" __global__ void kvq_model_f16_to_f32(const __half* x, float* y, int64_t n) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        y[e] = __half2float(x[e]);
}

// Greedy pick per row of logits [rows][vocab]: the index of the largest non-NaN value, the last one on
// ties (as Rust's Iterator::max_by in kvq_model::sample), 0 when every value is NaN. Grid (rows), block
// 1024.
extern "C" __global__ void kvq_model_argmax(const float* logits, int vocab, int32_t* out) {
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
