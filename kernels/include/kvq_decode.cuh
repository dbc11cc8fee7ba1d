// The decode-attention skeleton every format shares: split over the sequence (flash-decoding), GQA (one
// pass over a KV head serves its G query heads), online softmax, the f16 window, the merge of splits.
//
// A format is a policy struct `F` (see formats/*.cu) with:
//   static constexpr int BT;                      tokens per format block
//   static constexpr int TILE_BLOCKS;             blocks staged in shared memory per step
//   static __device__ void key_chunk(const uint8_t* blk, int t, int c0, const KvqFmtArgs&, float k[CPL]);
//   static __device__ void val_chunk(const uint8_t* blk, int t, int c0, const KvqFmtArgs&, float v[CPL]);
// which decode channels [c0, c0+CPL) of token t of one staged block into registers. Raw block bytes are
// staged into shared memory with 16-byte loads by the skeleton, so the format's layout never decides
// how well global memory is read; nothing dequantized is ever written to global memory.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>
#include "kvq_params.cuh"

namespace kvq {

constexpr int THREADS = 128;  // 4 warps per CTA
constexpr int LANES_PER_TOKEN = 16;
constexpr int MAX_G = 8;      // query heads per KV head handled by one CTA

__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ float f16_at(const uint8_t* p) {
    return half_bits_to_float(*reinterpret_cast<const uint16_t*>(p));
}

// Reads `n` (<= 25) bits starting at bit `pos` of a little-endian bit stream.
__device__ __forceinline__ uint32_t bits_at(const uint8_t* p, int pos, int n) {
    const uint8_t* b = p + (pos >> 3);
    uint32_t w = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
    return (w >> (pos & 7)) & ((1u << n) - 1u);
}

// Reads up to 57 bits starting at bit `pos` (whole code chunks at once: one read, then shifts).
__device__ __forceinline__ uint64_t bits64_at(const uint8_t* p, int pos, int nbits) {
    const uint8_t* b = p + (pos >> 3);
    const int nbytes = ((pos & 7) + nbits + 7) >> 3;
    uint64_t w = 0;
    for (int i = 0; i < nbytes; i++) w |= (uint64_t)b[i] << (8 * i);
    return w >> (pos & 7);
}

// 16-byte asynchronous global -> shared copy (bypasses L1; the cache is read once).
__device__ __forceinline__ void cp_async16(uint8_t* dst, const uint8_t* src) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Issues the copies of `nb` blocks (pages from the block table) of one head's K and V into shared
// memory, every thread copying independent 16-byte pieces so all loads are in flight at once.
__device__ __forceinline__ void stage_tile(uint8_t* kdst, uint8_t* vdst, const KvqDecodeParams& P, int b, int h,
                                           int blk, int nb) {
    const int kch = (int)(P.k_block_bytes / 16), vch = (int)(P.v_block_bytes / 16);
    const int32_t* table = P.block_table + (int64_t)b * P.max_blocks + blk;
    for (int idx = threadIdx.x; idx < nb * kch; idx += THREADS) {
        const int i = idx / kch, j = idx - i * kch;
        const int64_t page = table[i];
        cp_async16(kdst + (int64_t)idx * 16, P.k_pages + (page * P.hkv + h) * P.k_block_bytes + j * 16);
    }
    for (int idx = threadIdx.x; idx < nb * vch; idx += THREADS) {
        const int i = idx / vch, j = idx - i * vch;
        const int64_t page = table[i];
        cp_async16(vdst + (int64_t)idx * 16, P.v_pages + (page * P.hkv + h) * P.v_block_bytes + j * 16);
    }
    cp_async_commit();
}

// The f16 window viewed as a format: one token per block, D halves.
template <int D>
struct WindowFmt {
    static constexpr int BT = 1;
    static constexpr int CPL = D / LANES_PER_TOKEN;
    static __device__ __forceinline__ void chunk(const uint8_t* blk, int c0, float* x) {
        const __half* h = reinterpret_cast<const __half*>(blk) + c0;
#pragma unroll
        for (int i = 0; i < CPL; i++) x[i] = __half2float(h[i]);
    }
};

// Running online-softmax state of one CTA: each thread owns channels [c0, c0+CPL) of token lane r.
template <int D, int GM>
struct State {
    static constexpr int CPL = D / LANES_PER_TOKEN;
    float acc[GM][CPL];
};

// Processes `n_tok` tokens staged in shared memory (`ks`, `vs` point at the staged K/V of block 0 of
// the tile; block i at +i*bytes), updating m/l in shared memory and acc in registers.
template <int D, int GM, class KF, class VF>
__device__ void attend_tile(const uint8_t* ks, int64_t kbb, const uint8_t* vs, int64_t vbb, int bt, int n_tok,
                            const float (*qreg)[D / LANES_PER_TOKEN], int G, float scale, const KvqFmtArgs& fa,
                            float* s_sh, float* m_sh, float* l_sh, float* corr_sh, State<D, GM>& st) {
    constexpr int CPL = D / LANES_PER_TOKEN;
    const int lane16 = threadIdx.x % LANES_PER_TOKEN;
    const int tok_lane = threadIdx.x / LANES_PER_TOKEN;  // 0..7
    constexpr int TOK_LANES = THREADS / LANES_PER_TOKEN;
    const int c0 = lane16 * CPL;
    // 1. scores s[g][t] = scale * q_g . k_t
    // Warp-uniform trip count: the 16-lane shuffles below need both half-warps present.
    for (int t0 = 0; t0 < n_tok; t0 += TOK_LANES) {
        const int t = t0 + tok_lane;
        const bool valid = t < n_tok;
        float k[CPL];
        if (valid) {
            KF::key_chunk(ks + (t / bt) * kbb, t % bt, c0, fa, k);
        } else {
#pragma unroll
            for (int i = 0; i < CPL; i++) k[i] = 0.f;
        }
#pragma unroll
        for (int g = 0; g < GM; g++) {
            if (g >= G) break;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < CPL; i++) s = fmaf(qreg[g][i], k[i], s);
#pragma unroll
            for (int o = LANES_PER_TOKEN / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane16 == 0 && valid) s_sh[g * 128 + t] = s * scale;
        }
    }
    __syncthreads();
    // 2. online softmax update, one warp per query head.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int g = warp; g < G; g += THREADS / 32) {
        float mx = -INFINITY;
        for (int t = lane; t < n_tok; t += 32) mx = fmaxf(mx, s_sh[g * 128 + t]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float m_old = m_sh[g];
        float m_new = fmaxf(m_old, mx);
        float sum = 0.f;
        for (int t = lane; t < n_tok; t += 32) {
            float p = __expf(s_sh[g * 128 + t] - m_new);
            s_sh[g * 128 + t] = p;
            sum += p;
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        __syncwarp();  // every lane has read m_sh[g] before lane 0 replaces it
        if (lane == 0) {
            float corr = (m_old == -INFINITY) ? 0.f : __expf(m_old - m_new);
            corr_sh[g] = corr;
            l_sh[g] = l_sh[g] * corr + sum;
            m_sh[g] = m_new;
        }
    }
    __syncthreads();
    // 3. acc[g] = acc[g] * corr[g] + sum_t p[g][t] v_t (this thread's tokens and channels)
#pragma unroll
    for (int g = 0; g < GM; g++) {
        float c = g < G ? corr_sh[g] : 0.f;
#pragma unroll
        for (int i = 0; i < CPL; i++) st.acc[g][i] *= c;
    }
    for (int t = tok_lane; t < n_tok; t += TOK_LANES) {
        float v[CPL];
        VF::val_chunk(vs + (t / bt) * vbb, t % bt, c0, fa, v);
#pragma unroll
        for (int g = 0; g < GM; g++) {
            if (g >= G) break;
            float p = s_sh[g * 128 + t];
#pragma unroll
            for (int i = 0; i < CPL; i++) st.acc[g][i] = fmaf(p, v[i], st.acc[g][i]);
        }
    }
    __syncthreads();
}

template <int D>
struct WindowPolicy {
    static constexpr int CPL = D / LANES_PER_TOKEN;
    static __device__ __forceinline__ void key_chunk(const uint8_t* blk, int, int c0, const KvqFmtArgs&, float* k) {
        WindowFmt<D>::chunk(blk, c0, k);
    }
    static __device__ __forceinline__ void val_chunk(const uint8_t* blk, int, int c0, const KvqFmtArgs&, float* v) {
        WindowFmt<D>::chunk(blk, c0, v);
    }
};

// grid = (n_splits + 1, Hkv, B); block = THREADS; dynamic smem = max(2 K+V tiles, 8*GM*D*4 bytes).
// Tiles hold at most 128 tokens (s_sh rows are 128 long).
template <int D, int GM, class F>
__device__ void decode_kernel(const KvqDecodeParams& P) {
    constexpr int CPL = D / LANES_PER_TOKEN;
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float s_sh[MAX_G * 128];
    __shared__ float m_sh[MAX_G], l_sh[MAX_G], corr_sh[MAX_G];

    const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int G = P.group;
    const int lane16 = threadIdx.x % LANES_PER_TOKEN;
    const int c0 = lane16 * CPL;

    // Query of the G heads: this thread's CPL channels, in registers.
    float qreg[GM][CPL];
#pragma unroll
    for (int g = 0; g < GM; g++) {
        if (g >= G) break;
        const float* qp = P.q + ((int64_t)b * P.hkv * G + (int64_t)h * G + g) * D + c0;
#pragma unroll
        for (int i = 0; i < CPL; i++) qreg[g][i] = qp[i];
    }
    if (threadIdx.x < MAX_G) {
        m_sh[threadIdx.x] = -INFINITY;
        l_sh[threadIdx.x] = 0.f;
    }
    State<D, GM> st;
#pragma unroll
    for (int g = 0; g < GM; g++)
#pragma unroll
        for (int i = 0; i < CPL; i++) st.acc[g][i] = 0.f;
    __syncthreads();

    if (split < P.n_splits) {
        const int nblk = P.n_sealed[b] / F::BT;
        const int lo = split * P.blocks_per_split;
        const int hi = min(nblk, lo + P.blocks_per_split);
        // Two tile buffers: the next tile's copies are in flight while this one is computed.
        const int64_t tile_bytes = F::TILE_BLOCKS * (P.k_block_bytes + P.v_block_bytes);
        if (lo < hi) stage_tile(smem, smem + F::TILE_BLOCKS * P.k_block_bytes, P, b, h, lo, min(F::TILE_BLOCKS, hi - lo));
        for (int blk = lo, buf = 0; blk < hi; blk += F::TILE_BLOCKS, buf ^= 1) {
            const int nb = min(F::TILE_BLOCKS, hi - blk);
            uint8_t* ktile = smem + buf * tile_bytes;
            uint8_t* vtile = ktile + F::TILE_BLOCKS * P.k_block_bytes;
            const int next = blk + F::TILE_BLOCKS;
            if (next < hi) {
                uint8_t* kn = smem + (buf ^ 1) * tile_bytes;
                stage_tile(kn, kn + F::TILE_BLOCKS * P.k_block_bytes, P, b, h, next, min(F::TILE_BLOCKS, hi - next));
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            attend_tile<D, GM, F, F>(ktile, P.k_block_bytes, vtile, P.v_block_bytes, F::BT, nb * F::BT, qreg, G,
                                     P.scale, P.fmt, s_sh, m_sh, l_sh, corr_sh, st);
        }
    } else {
        // The f16 window, read in tiles of 64 tokens straight from global memory.
        const int nw = P.n_win[b];
        const int64_t base = ((int64_t)b * P.hkv + h) * P.win_cap * D;
        const uint8_t* kw = reinterpret_cast<const uint8_t*>(P.k_win + base);
        const uint8_t* vw = reinterpret_cast<const uint8_t*>(P.v_win + base);
        for (int t0 = 0; t0 < nw; t0 += 64) {
            const int n = min(64, nw - t0);
            attend_tile<D, GM, WindowPolicy<D>, WindowPolicy<D>>(kw + (int64_t)t0 * D * 2, D * 2, vw + (int64_t)t0 * D * 2,
                                                             D * 2, 1, n, qreg, G, P.scale, P.fmt, s_sh, m_sh, l_sh,
                                                             corr_sh, st);
        }
    }

    // Reduce acc over the token lanes (in the dynamic shared memory, free again), write the partial.
    const int tok_lane = threadIdx.x / LANES_PER_TOKEN;
    float* red = reinterpret_cast<float*>(smem);  // [token lane][GM][D]
#pragma unroll
    for (int g = 0; g < GM; g++)
#pragma unroll
        for (int i = 0; i < CPL; i++)
            if (g < G) red[(tok_lane * GM + g) * D + c0 + i] = st.acc[g][i];
    __syncthreads();
    const int S = P.n_splits + 1;
    for (int idx = threadIdx.x; idx < G * D; idx += THREADS) {
        const int g = idx / D, c = idx % D;
        float a = 0.f;
        for (int r = 0; r < THREADS / LANES_PER_TOKEN; r++) a += red[(r * GM + g) * D + c];
        const int64_t row = ((int64_t)b * P.hkv * G + (int64_t)h * G + g) * S + split;
        P.part_acc[row * D + c] = a;
        if (c == 0) {
            P.part_ml[row * 2] = m_sh[g];
            P.part_ml[row * 2 + 1] = l_sh[g];
        }
    }
}

// Merge of the splits: grid = (Hq, B), block = D threads.
template <int D>
__device__ void merge_kernel(const KvqDecodeParams& P) {
    const int hq = blockIdx.x, b = blockIdx.y, c = threadIdx.x;
    const int S = P.n_splits + 1;
    const int64_t row0 = ((int64_t)b * P.hkv * P.group + hq) * S;
    float m = -INFINITY;
    for (int s = 0; s < S; s++) m = fmaxf(m, P.part_ml[(row0 + s) * 2]);
    float l = 0.f, a = 0.f;
    for (int s = 0; s < S; s++) {
        const float ms = P.part_ml[(row0 + s) * 2];
        if (ms == -INFINITY) continue;
        const float w = __expf(ms - m);
        l += w * P.part_ml[(row0 + s) * 2 + 1];
        a += w * P.part_acc[(row0 + s) * D + c];
    }
    P.out[((int64_t)b * P.hkv * P.group + hq) * D + c] = a / l;
}

}  // namespace kvq

// Instantiates the decode kernels (up to 4 and up to 8 query heads per KV head) and the merge kernel of
// format policy F for head_dim D under derived names.
#define KVQ_DECODE_KERNELS(fmt, F, D)                                                        \
    extern "C" __global__ void __launch_bounds__(kvq::THREADS)                               \
        KVQ_NAME(fmt, decode_g4, f16, D)(const KvqDecodeParams P) {                          \
        kvq::decode_kernel<D, 4, F>(P);                                                      \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(kvq::THREADS)                               \
        KVQ_NAME(fmt, decode_g8, f16, D)(const KvqDecodeParams P) {                          \
        kvq::decode_kernel<D, 8, F>(P);                                                      \
    }                                                                                        \
    extern "C" __global__ void KVQ_NAME(fmt, merge, f16, D)(const KvqDecodeParams P) {       \
        kvq::merge_kernel<D>(P);                                                             \
    }
