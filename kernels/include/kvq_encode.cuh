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

namespace kvq {

constexpr int ENC_THREADS = 128;

__device__ __forceinline__ float sanitize(float x) { return isnan(x) ? 0.f : fminf(fmaxf(x, -65504.f), 65504.f); }

// grid = (rows, Hkv), block = D threads.
template <int D>
__device__ void append_kernel(const KvqEncodeParams& P) {
    const int r = blockIdx.x, h = blockIdx.y, c = threadIdx.x;
    const int64_t src = ((int64_t)r * P.hkv + h) * D + c;
    const int64_t row = P.row_tok[r] % P.win_cap;
    const int64_t dst = (((int64_t)P.row_slot[r] * P.hkv + h) * P.win_cap + row) * D + c;
    P.k_win[dst] = __half_as_ushort(__float2half_rn(sanitize(P.k_new[src])));
    P.v_win[dst] = __half_as_ushort(__float2half_rn(sanitize(P.v_new[src])));
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
        const uint16_t* ring = (s == 0 ? P.k_win : P.v_win) + ((int64_t)slot * P.hkv + h) * P.win_cap * D;
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
