// Writing the cache: new tokens go to the f16 window rings (kvq_cache_append), and each block that
// leaves the window is packed by its format's encode kernel straight from the ring into its page.
// Both match the CPU reference byte for byte (crates/kvq-formats: LayerCache::append / Codec::encode):
// values are clamped to the f16 range (NaN -> 0) and rounded to f16 before anything else.
//
// A format's encoder is a policy `E` with
//   static void encode(const float* x /*[BT][D] in shared memory*/, uint8_t* out, bool key,
//                      const KvqFmtArgs& fa, uint8_t* scratch)
// run by a whole CTA (ENC_THREADS threads) for one block of one head.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>
#include "kvq_params.cuh"
#include "kvq_pdl.cuh"
#include "kvq_ring.cuh"

namespace kvq {

constexpr int ENC_THREADS = 128;


// grid = (rows, Hkv), block = D threads.
template <int D>
__device__ void append_kernel(const KvqEncodeParams& P) {
    const int r = blockIdx.x, h = blockIdx.y, c = threadIdx.x;
    const int64_t src = ((int64_t)r * P.hkv + h) * D + c;
    const int64_t row = P.row_tok[r] % P.win_cap;
    const int64_t dst = (((int64_t)P.row_slot[r] * P.hkv + h) * P.win_cap + row) * D + c;
    P.k_win[dst] = ring_half(P.k_new[src]);
    P.v_win[dst] = ring_half(P.v_new[src]);
}

// Pre-RoPE key codecs (P.k_pre set): keys arrive unrotated; k_pre keeps them (f16, what the encoder
// reads, as the CPU cache's pending tokens) and k_win gets them rotated to their position (as the CPU
// cache's mirror). The rope comes from the key table (P.fmt.p[0]), which for such codecs starts with
// [i32 style (0 interleaved pairs (2i, 2i+1), 1 rotate-half (i, i + D/2)), 0, 0, 0][f32 inv_freq; D/2].
// grid = (rows, Hkv), block = D threads.
template <int D>
__device__ void append_prerope_kernel(const KvqEncodeParams& P) {
    __shared__ float kx[D];
    const int r = blockIdx.x, h = blockIdx.y, c = threadIdx.x;
    const int pos = P.row_tok[r];
    const int64_t src = ((int64_t)r * P.hkv + h) * D + c;
    const int64_t base = (((int64_t)P.row_slot[r] * P.hkv + h) * P.win_cap + pos % P.win_cap) * D;
    const __half kh = __float2half_rn(sanitize(P.k_new[src]));
    P.k_pre[base + c] = __half_as_ushort(kh);
    P.v_win[base + c] = ring_half(P.v_new[src]);
    kx[c] = __half2float(kh);
    __syncthreads();
    if (c < D / 2) {
        const uint8_t* tab = static_cast<const uint8_t*>(P.fmt.p[0]);
        const int style = *reinterpret_cast<const int*>(tab);
        const float f = reinterpret_cast<const float*>(tab + 16)[c];
        const int a = style == 0 ? 2 * c : c, b = style == 0 ? 2 * c + 1 : c + D / 2;
        double sd, cd;
        sincos((double)pos * (double)f, &sd, &cd);  // f64 angle, as kvq_formats::Rope::rotate
        const float s = (float)sd, co = (float)cd, xa = kx[a], xb = kx[b];
        P.k_win[base + a] = __half_as_ushort(__float2half_rn(__fsub_rn(__fmul_rn(xa, co), __fmul_rn(xb, s))));
        P.k_win[base + b] = __half_as_ushort(__float2half_rn(__fadd_rn(__fmul_rn(xa, s), __fmul_rn(xb, co))));
    }
}

// grid = (jobs, Hkv), block = ENC_THREADS; dynamic shared memory: BT * D * 4 + scratch bytes.
template <int D, int BT, class E>
__device__ void encode_kernel(const KvqEncodeParams& P) {
    extern __shared__ __align__(16) uint8_t esm[];
    float* x = reinterpret_cast<float*>(esm);
    uint8_t* scratch = esm + BT * D * 4;
    const int j = blockIdx.x, h = blockIdx.y;
    const int slot = P.job_slot[j], t0 = P.job_tok[j];
    const int64_t page = P.job_page[j], blk = P.job_blk[j];
    for (int s = 0; s < 2; s++) {
        const uint16_t* keys = P.k_pre != nullptr ? P.k_pre : P.k_win;
        const uint16_t* ring = (s == 0 ? keys : P.v_win) + ((int64_t)slot * P.hkv + h) * P.win_cap * D;
        for (int i = threadIdx.x; i < BT * D; i += ENC_THREADS) {
            const int t = i / D, c = i % D;
            x[i] = __half2float(__ushort_as_half(ring[(int64_t)((t0 + t) % P.win_cap) * D + c]));
        }
        __syncthreads();
        const int64_t bb = s == 0 ? P.k_block_bytes : P.v_block_bytes;
        uint8_t* out = (s == 0 ? P.k_pages : P.v_pages) + ((page * P.hkv + h) * P.page_blocks + blk) * bb;
        E::encode(x, out, s == 0, P.fmt, scratch);
        __syncthreads();
    }
}

}  // namespace kvq

// The module's encoder dynamic shared memory {D = 64, D = 128} in bytes, read by the host
// (Gpu::encode_smem); 0 = the default (the block staged as f32 plus the default scratch). Every module
// states it, so the host's symbol lookup never fails (compute-sanitizer reports failed lookups).
#define KVQ_ENCODE_SMEM(d64, d128) extern "C" __device__ const int kvq_encode_smem[2] = {d64, d128};

#define KVQ_ENCODE_KERNEL(fmt, E, BT, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(kvq::ENC_THREADS)                                         \
        KVQ_NAME(fmt, encode, f16, D)(const KvqEncodeParams P) {                                           \
        KVQ_PDL_ENTER();                                                                                   \
        kvq::encode_kernel<D, BT, E>(P);                                                                   \
    }
