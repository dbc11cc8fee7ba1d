// KIVI / AsymKV (crates/kvq-formats/src/formats/asymkv.rs): per-channel keys, per-token values, min-max
// b-bit codes, f16 scale and zero. fmt.i = {k_bits, 32, -, -, v_bits, v_group, -, -}. K and V blocks are
//   [scale f16; D][zero f16; D][codes token-major, D*b bits per token]
// (keys: pair i = channel i; values: pair i = token i/(D/g), channel group i%(D/g)).
// Pages of 2 blocks (64 tokens), two cp.async stages per warp and registers capped for 4 CTAs per SM
// (more stages or registers cost residency, which measured slower), except k2v2 at d=128: 3 CTAs, whose
// 159 registers end its spills (run 28: 7% faster at B=8, 128k). Kernels kvq_kivi_decode_k{KB}v{VB}:
// KB, VB in {1, 2, 4} decode with a few bit operations per code pair; 0 is any width (3, 8), slower.
//
// Keys: decoded straight into f16 B fragments, k = s * code + z as one half2 FMA per exact code pair
// (rounded once, like the values), against the query's hi/lo A fragments built once per CTA (folding
// each block's scales into the query instead cost about a third of the key work). The MMA's k order is
// free as long as A and B agree: lane q's B pairs are channels (2q, 2q+8) and (2q+1, 2q+9), which sit
// 8 codes apart in the packed row, so one shift and one mask extract both; the query is split in that
// order (Q_PAIR8).
// Values (O^T = V^T P^T): lane r owns channels [r D/8, (r+1) D/8) of every token (one code word per
// token, one scale group) as its rows of V^T, so output channels are permuted (out_chan); each pair of
// tokens decodes with one shift, one mask, one subtract and one fused multiply-add in half2.
#include "kvq_decode.cuh"
#include "kvq_encode.cuh"
#include "kvq_codes.cuh"
#include "kvq_kivi.cuh"

// The encoder (KiviEncode) is in kvq_kivi.cuh, shared with QJL's value stream.

#define KIVI_K(D, KB, VB) \
    using Kivi_##D##_##KB##_##VB = kvq::KiviPolicy<D, KB, VB>; \
    KVQ_DECODE_KERNEL(kivi, decode_k##KB##v##VB, Kivi_##D##_##KB##_##VB, D)
#define KIVI_V(D, KB) KIVI_K(D, KB, 0) KIVI_K(D, KB, 1) KIVI_K(D, KB, 2) KIVI_K(D, KB, 4)
#define KIVI_D(D) KIVI_V(D, 0) KIVI_V(D, 1) KIVI_V(D, 2) KIVI_V(D, 4) KVQ_MERGE_KERNEL(kivi, D)

using KiviLayout = kvq::KiviPolicy<128, 2, 2>;
KVQ_LAYOUT(KiviLayout)
KVQ_ENCODE_SMEM(0, 0)
KIVI_D(64)
KIVI_D(128)
KVQ_ENCODE_KERNEL(kivi, kvq::KiviEncode<64>, 32, 64)
KVQ_ENCODE_KERNEL(kivi, kvq::KiviEncode<128>, 32, 128)
