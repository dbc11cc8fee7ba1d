// KIVI / AsymKV (crates/kvq-formats/src/formats/asymkv.rs): per-channel keys, per-token values, min-max
// b-bit codes, f16 scale and zero. fmt.i = {k_bits, group, -, -, v_bits, group, -, -}. Both K and V blocks are
//   [scale f16; n][zero f16; n][codes token-major, d*b bits per token]
// with n = D for keys (per channel) and n = group * D/group for values (per token and channel group).
#include "kvq_decode.cuh"

template <int D>
struct KiviPolicy {
    static constexpr int BT = 32;  // group = 32 (checked by the launcher)
    static constexpr int TILE_BLOCKS = 4;
    static constexpr int CPL = D / kvq::LANES_PER_TOKEN;
    static __device__ __forceinline__ void key_chunk(const uint8_t* blk, int t, int c0, const KvqFmtArgs& fa,
                                                     float* k) {
        const int bits = fa.i[0];
        const uint64_t w = kvq::bits64_at(blk + 4 * D, (t * D + c0) * bits, CPL * bits);
        const uint32_t mask = (1u << bits) - 1u;
        const __half2* s2 = reinterpret_cast<const __half2*>(blk + 2 * c0);
        const __half2* z2 = reinterpret_cast<const __half2*>(blk + 2 * (D + c0));
#pragma unroll
        for (int i = 0; i < CPL; i += 2) {
            const float2 s = __half22float2(s2[i / 2]), z = __half22float2(z2[i / 2]);
            k[i] = fmaf(s.x, (float)((w >> (i * bits)) & mask), z.x);
            k[i + 1] = fmaf(s.y, (float)((w >> ((i + 1) * bits)) & mask), z.y);
        }
    }
    static __device__ __forceinline__ void val_chunk(const uint8_t* blk, int t, int c0, const KvqFmtArgs& fa,
                                                     float* v) {
        const int bits = fa.i[4], group = fa.i[5];
        const int n = BT * (D / group);
        const int pi = t * (D / group) + c0 / group;  // CPL <= group: one (scale, zero) per chunk
        const float s = kvq::f16_at(blk + 2 * pi), z = kvq::f16_at(blk + 2 * (n + pi));
        const uint64_t w = kvq::bits64_at(blk + 4 * n, (t * D + c0) * bits, CPL * bits);
        const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
        for (int i = 0; i < CPL; i++) v[i] = fmaf(s, (float)((w >> (i * bits)) & mask), z);
    }
};

KVQ_DECODE_KERNELS(kivi, KiviPolicy<64>, 64)
KVQ_DECODE_KERNELS(kivi, KiviPolicy<128>, 128)
