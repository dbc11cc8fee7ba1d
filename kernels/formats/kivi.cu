// KIVI / AsymKV (crates/kvq-formats/src/formats/asymkv.rs): per-channel keys, per-token values, min-max
// b-bit codes, f16 scale and zero. fmt.i = {k_bits, 32, -, -, v_bits, v_group, -, -}. K and V blocks are
//   [scale f16; D][zero f16; D][codes token-major, D*b bits per token]
// (keys: pair i = channel i; values: pair i = token i/(D/g), channel group i%(D/g)).
// Pages of 2 blocks (64 tokens), two cp.async stages per warp and registers capped for 4 CTAs per SM
// (more stages or registers cost residency, which measured slower). Kernels kvq_kivi_decode_k{KB}v{VB}:
// KB, VB in {1, 2, 4} decode with a few bit operations per code pair; 0 is any width (3, 8), slower.
//
// Keys: the block's scales are folded into the query once per block (A = q*s as f16 hi + lo), codes go
// to the tensor cores as exact small integers and sum_c q_c z_c is added per head:
//   q.k_t = sum_c (q_c s_c) code_{t,c} + sum_c q_c z_c.
// Code pairs become f16 with the 0x6400 trick ({1024 + a, 1024 + b} minus 1024, exact). The MMA's k
// order is free as long as A and B agree: lane q's B pairs are channels (2q, 2q+8) and (2q+1, 2q+9),
// which sit 8 codes apart in the packed row, so one mask extracts both.
// Values (O^T = V^T P^T): lane r owns channels [r D/8, (r+1) D/8) of every token (one code word per
// token, one scale group) as its rows of V^T, so output channels are permuted (out_chan); each pair of
// tokens decodes with one shift, one mask, one subtract and one fused multiply-add in half2.
#include "kvq_decode.cuh"
#include "kvq_encode.cuh"
#include "kvq_codes.cuh"
#include "kvq_kivi.cuh"

namespace kvq {

// Encoder (mirrors KiviCodec::encode): D (scale, zero) pairs - keys per channel over the block's
// tokens, values per (token, channel group) - then codes round((x - z) / s) clamped to [0, 2^b - 1],
// packed token-major, channel 0 first, LSB first. Scratch: D scales, D zeros (f32), BT*D codes (u8).
template <int D>
struct KiviEncode {
    static constexpr int BT = 32;
    static __device__ void encode(const float* x, uint8_t* out, bool key, const KvqFmtArgs& fa, uint8_t* scratch) {
        const int bits = key ? fa.i[0] : fa.i[4], group = key ? BT : fa.i[5];
        const int gpt = D / group;
        const float levels = (float)((1 << bits) - 1);
        float* ps = reinterpret_cast<float*>(scratch);
        float* pz = ps + D;
        uint8_t* codes = reinterpret_cast<uint8_t*>(pz + D);
        for (int i = threadIdx.x; i < D; i += ENC_THREADS) {
            float lo = INFINITY, hi = -INFINITY;
            if (key) {
                for (int t = 0; t < BT; t++) lo = fminf(lo, x[t * D + i]), hi = fmaxf(hi, x[t * D + i]);
            } else {
                const int t = i / gpt, g = i % gpt;
                for (int c = g * group; c < (g + 1) * group; c++) lo = fminf(lo, x[t * D + c]), hi = fmaxf(hi, x[t * D + c]);
            }
            float z = __half2float(__float2half_rn(lo));
            float s = (hi - z) / levels;
            if (s > 65504.f) {
                s = 65504.f;
                z = __half2float(__float2half_rn(0.5f * (lo + hi) - 0.5f * s * levels));
            }
            s = __half2float(__float2half_rn(fmaxf(s, 0.f)));
            ps[i] = s;
            pz[i] = z;
            reinterpret_cast<uint16_t*>(out)[i] = __half_as_ushort(__float2half_rn(s));
            reinterpret_cast<uint16_t*>(out)[D + i] = __half_as_ushort(__float2half_rn(z));
        }
        __syncthreads();
        for (int i = threadIdx.x; i < BT * D; i += ENC_THREADS) {
            const int t = i / D, c = i % D;
            const int pi = key ? c : t * gpt + c / group;
            const float s = ps[pi], z = pz[pi];
            codes[i] = s <= 0.f ? 0 : (uint8_t)fminf(fmaxf(roundf((x[i] - z) / s), 0.f), levels);
        }
        __syncthreads();
        const int row_words = D * bits / 32;  // d * bits is a multiple of 32 for kernel-read configs
        uint32_t* words = reinterpret_cast<uint32_t*>(out + 4 * D);
        for (int w = threadIdx.x; w < BT * row_words; w += ENC_THREADS) {
            const int t = w / row_words, wr = w % row_words;
            uint32_t word = 0;
            for (int jb = 0; jb < 32; jb++) {
                const int bit = wr * 32 + jb;
                word |= (uint32_t)((codes[t * D + bit / bits] >> (bit % bits)) & 1u) << jb;
            }
            words[w] = word;
        }
    }
};

}  // namespace kvq

#define KIVI_K(D, KB, VB) \
    using Kivi_##D##_##KB##_##VB = kvq::KiviPolicy<D, KB, VB>; \
    KVQ_DECODE_KERNEL(kivi, decode_k##KB##v##VB, Kivi_##D##_##KB##_##VB, D)
#define KIVI_V(D, KB) KIVI_K(D, KB, 0) KIVI_K(D, KB, 1) KIVI_K(D, KB, 2) KIVI_K(D, KB, 4)
#define KIVI_D(D) KIVI_V(D, 0) KIVI_V(D, 1) KIVI_V(D, 2) KIVI_V(D, 4) KVQ_MERGE_KERNEL(kivi, D)

using KiviLayout = kvq::KiviPolicy<128, 2, 2>;
KVQ_LAYOUT(KiviLayout)
KIVI_D(64)
KIVI_D(128)
KVQ_ENCODE_KERNEL(kivi, kvq::KiviEncode<64>, 32, 64)
KVQ_ENCODE_KERNEL(kivi, kvq::KiviEncode<128>, 32, 128)
