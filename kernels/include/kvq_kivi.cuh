// The KIVI / AsymKV decode policy and block encoder (see kernels/formats/kivi.cu for the format and the
// method), in a header because QJL's kernels read and write its values (a KIVI stream) with the same code.
#pragma once
#include "kvq_codes.cuh"
#include "kvq_encode.cuh"

#ifndef KVQ_KIVI_MIN_CTAS
#define KVQ_KIVI_MIN_CTAS 4
#endif

namespace kvq {

// PB: blocks per page (QJL, whose value stream this is too, reads pages of one block).
template <int D, int KB, int VB, int PB = 2>
struct KiviPolicy {
    static constexpr int BT = 32;
    static constexpr int PAGE_BLOCKS = PB;
    static constexpr int STAGES = 2;
    // k2v2 at d=128 spills 28 bytes under the 4-CTA cap (128 registers); capped for 3 it takes 159 and
    // none, and runs 7% faster at B=8, 128k (docs/BENCHMARKS.md, run 28). The other widths fit in 128.
    static constexpr int MIN_CTAS = (D == 128 && KB == 2 && VB == 2) ? 3 : KVQ_KIVI_MIN_CTAS;
    static constexpr bool CUSTOM_SEALED = false;
    // 1/2-bit values take pv_z: 2-bit codes in the top form, 1-bit ones as masks (kvq_codes.cuh: s c
    // exactly, nothing to undo), zeros through one MMA per k-step into zacc. (4-bit too measured 6%
    // slower on the H100 at B=8, 128k: register spills; run 11.)
    static constexpr bool VALUE_ZEROS = VB == 1 || VB == 2;
    static constexpr float VALUE_UP = VB == 2 ? 4.f : 1.f;
    static __device__ __forceinline__ int stage_off(int byte) { return byte; }
    static __device__ __forceinline__ int out_chan(int mb, int row) {
        return (D / 8) * (row & 7) + (D / 16) * (row >> 3) + mb;
    }

    // S = Q K^T with keys decoded straight into f16 B fragments: per block and k-step the lane's scale
    // and zero pairs {c, c+8}, {c+1, c+9} (c = 16 kb + 2q), then one half2 FMA per exact code pair.
    // 2-bit codes come in the top form (kvq_codes.cuh: h = 1 + c / 2^b), so s h - s = s code / 2^b
    // rounded once with no unbias subtract (the 2^b undone in f32 on the score: no f16 overflow); the
    // zeros, the same for every token of the block, enter through one more MMA chain per block (q . z
    // in f32, added to each token's score); 1-bit codes are masks instead (mask & s = s code exactly,
    // zeros likewise by MMA). Other widths: k = s code + z rounded once. The
    // query's A fragments are cx's hi/lo rows in the same channel order (Q_PAIR8), so nothing is
    // refolded per block.
    static constexpr bool Q_PAIR8 = true;
    static __device__ __forceinline__ void scores(const uint8_t* ks, const Ctx<D>& cx, float (*s)[2]) {
        constexpr bool TOP = KB == 2, MASK = KB == 1;
        const int bits = KB ? KB : cx.fa->i[0];
        const int kbb = (int)cx.k_block_bytes, row_bytes = D * bits / 8;
        const int r = cx.lane >> 2, q = cx.lane & 3;
#pragma unroll
        for (int blk = 0; blk < PAGE_BLOCKS; blk++) {
            const uint8_t* kb = ks + blk * kbb;
            const uint8_t* codes = kb + 4 * D;
            // Independent MMA chains, one per token block of 8 (and cz for the zeros); A rows 8..15
            // carry the lo halves.
            float c[BT / 8][4], cz[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < BT / 8; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
            for (int kbi = 0; kbi < D / 16; kbi++) {
                const int ch = 16 * kbi + 2 * q;
                const uint32_t s01 = *reinterpret_cast<const uint32_t*>(kb + 2 * ch);
                const uint32_t s89 = *reinterpret_cast<const uint32_t*>(kb + 2 * (ch + 8));
                const uint32_t z01 = *reinterpret_cast<const uint32_t*>(kb + 2 * (D + ch));
                const uint32_t z89 = *reinterpret_cast<const uint32_t*>(kb + 2 * (D + ch + 8));
                const uint32_t sa = __byte_perm(s01, s89, 0x5410u), sb = __byte_perm(s01, s89, 0x7632u);
                const uint32_t za = __byte_perm(z01, z89, 0x5410u), zb = __byte_perm(z01, z89, 0x7632u);
                __half2 ha = *reinterpret_cast<const __half2*>(&sa), hb = *reinterpret_cast<const __half2*>(&sb);
                __half2 oa = *reinterpret_cast<const __half2*>(&za), ob = *reinterpret_cast<const __half2*>(&zb);
                if constexpr (TOP || MASK) mma(cz, cx.hi[kbi][0], cx.lo[kbi][0], cx.hi[kbi][1], cx.lo[kbi][1], za, zb);
                if constexpr (TOP) oa = __hneg2(ha), ob = __hneg2(hb);
#pragma unroll
                for (int j = 0; j < BT / 8; j++) {
                    uint32_t x0, x1, b0, b1;
                    if constexpr (MASK) {
                        key_masks1(codes + (8 * j + r) * row_bytes, kbi, q, x0, x1);
                        b0 = x0 & sa;
                        b1 = x1 & sb;
                    } else {
                        if constexpr (TOP) key_codes_top<2>(codes + (8 * j + r) * row_bytes, kbi, q, x0, x1);
                        else key_codes<KB>(codes + (8 * j + r) * row_bytes, kbi, q, bits, x0, x1);
                        b0 = h2_bits(__hfma2(*reinterpret_cast<const __half2*>(&x0), ha, oa));
                        b1 = h2_bits(__hfma2(*reinterpret_cast<const __half2*>(&x1), hb, ob));
                    }
                    mma(c[j], cx.hi[kbi][0], cx.lo[kbi][0], cx.hi[kbi][1], cx.lo[kbi][1], b0, b1);
                }
            }
            constexpr float UP = TOP ? 4.f : 1.f;  // the top-form codes' 2^-b, undone
            const float z0 = cz[0] + cz[2], z1 = cz[1] + cz[3];
#pragma unroll
            for (int j = 0; j < BT / 8; j++) {
                s[blk * (BT / 8) + j][0] = fmaf(UP, c[j][0] + c[j][2], z0);
                s[blk * (BT / 8) + j][1] = fmaf(UP, c[j][1] + c[j][3], z1);
            }
        }
    }

    // O^T += V^T P^T: lane r's rows of m-block mb are its channels mb (row r) and D/16 + mb (row r+8).
    static __device__ __forceinline__ void pv(const uint8_t* vs, const Ctx<D>& cx, const uint32_t (*pa)[2],
                                              float (*acc)[4]) {
        const int bits = VB ? VB : cx.fa->i[4], group = cx.fa->i[5];
        const int vbb = (int)cx.v_block_bytes, row_bytes = D * bits / 8;
        const int gpt = D / group;
        const int r = cx.lane >> 2, q = cx.lane & 3;
        const int g = (D / 8) * r / group;  // lane r's channels lie in one scale group
#pragma unroll
        for (int kk = 0; kk < PAGE_BLOCKS * BT / 16; kk++) {
            const uint8_t* vb = vs + (kk / 2) * vbb;
            const uint8_t* codes = vb + 4 * D;
            const int t0 = 16 * (kk % 2) + 2 * q;
            const int ts[4] = {t0, t0 + 1, t0 + 8, t0 + 9};
            __half sc[4], z[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                sc[e] = *reinterpret_cast<const __half*>(vb + 2 * (ts[e] * gpt + g));
                z[e] = *reinterpret_cast<const __half*>(vb + 2 * (D + ts[e] * gpt + g));
            }
            const __half2 s01 = __halves2half2(sc[0], sc[1]), s89 = __halves2half2(sc[2], sc[3]);
            const __half2 z01 = __halves2half2(z[0], z[1]), z89 = __halves2half2(z[2], z[3]);
            // v01[i] / v89[i]: tokens (t0, t0+1) / (t0+8, t0+9) at lane channel i, as half2.
            auto pair = [&](int i, uint32_t& v01, uint32_t& v89) {
                if constexpr (VB != 0) {
                    const uint64_t w0 = val_word<VB, D>(codes + ts[0] * row_bytes, r);
                    const uint64_t w1 = val_word<VB, D>(codes + ts[1] * row_bytes, r);
                    const uint64_t w8 = val_word<VB, D>(codes + ts[2] * row_bytes, r);
                    const uint64_t w9 = val_word<VB, D>(codes + ts[3] * row_bytes, r);
                    const uint32_t u01 = unbias(val_pair<VB>(w0, w1, i)), u89 = unbias(val_pair<VB>(w8, w9, i));
                    v01 = h2_bits(__hfma2(*reinterpret_cast<const __half2*>(&u01), s01, z01));
                    v89 = h2_bits(__hfma2(*reinterpret_cast<const __half2*>(&u89), s89, z89));
                } else {
                    const int c = (D / 8) * r + i;
                    float v[4];
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        v[e] = fmaf(__half2float(sc[e]), (float)bits_at(codes + ts[e] * row_bytes, c * bits, bits),
                                    __half2float(z[e]));
                    v01 = pack2(v[0], v[1]);
                    v89 = pack2(v[2], v[3]);
                }
            };
#pragma unroll
            for (int mb = 0; mb < D / 16; mb++) {
                uint32_t a0, a1, a2, a3;
                pair(mb, a0, a2);           // row r:     channel mb of the lane
                pair(D / 16 + mb, a1, a3);  // row r + 8: channel D/16 + mb
                mma(acc[mb], a0, a1, a2, a3, pa[kk][0], pa[kk][1]);
            }
        }
    }

    // pv for VALUE_ZEROS: a token's values are s code + z per (token, channel group), and lane r's
    // channels (both A rows it supplies) lie in one group, so V^T = S o C + Z with Z's rows constant
    // per group: S o C / 2^b from 2-bit top-form codes (s h - s rounded once, no unbias subtract per
    // pair; ZeroAccBody::done scales acc by VALUE_UP = 2^b in f32) or S o C exactly from 1-bit masks,
    // Z P^T by one MMA per k-step into zacc (its rows equal for every m-block).
    static __device__ __forceinline__ void pv_z(const uint8_t* vs, const Ctx<D>& cx, const uint32_t (*pa)[2],
                                                float (*acc)[4], float (&zacc)[4]) {
        constexpr int VT = VALUE_ZEROS ? VB : 1;
        const int group = cx.fa->i[5];
        const int vbb = (int)cx.v_block_bytes, row_bytes = D * VT / 8;
        const int gpt = D / group;
        const int r = cx.lane >> 2, q = cx.lane & 3;
        const int g = (D / 8) * r / group;
#pragma unroll
        for (int kk = 0; kk < PAGE_BLOCKS * BT / 16; kk++) {
            const uint8_t* vb = vs + (kk / 2) * vbb;
            const uint8_t* codes = vb + 4 * D;
            const int t0 = 16 * (kk % 2) + 2 * q;
            const int ts[4] = {t0, t0 + 1, t0 + 8, t0 + 9};
            __half sc[4], z[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                sc[e] = *reinterpret_cast<const __half*>(vb + 2 * (ts[e] * gpt + g));
                z[e] = *reinterpret_cast<const __half*>(vb + 2 * (D + ts[e] * gpt + g));
            }
            const __half2 s01 = __halves2half2(sc[0], sc[1]), s89 = __halves2half2(sc[2], sc[3]);
            const uint32_t z01 = h2_bits(__halves2half2(z[0], z[1])), z89 = h2_bits(__halves2half2(z[2], z[3]));
            mma(zacc, z01, z01, z89, z89, pa[kk][0], pa[kk][1]);
            const uint64_t w0 = val_word<VT, D>(codes + ts[0] * row_bytes, r);
            const uint64_t w1 = val_word<VT, D>(codes + ts[1] * row_bytes, r);
            const uint64_t w8 = val_word<VT, D>(codes + ts[2] * row_bytes, r);
            const uint64_t w9 = val_word<VT, D>(codes + ts[3] * row_bytes, r);
            auto pair = [&](int i, uint32_t& v01, uint32_t& v89) {
                if constexpr (VT == 1) {
                    v01 = val_mask1((uint32_t)w0 | (uint32_t)w1 << 16, i) & h2_bits(s01);
                    v89 = val_mask1((uint32_t)w8 | (uint32_t)w9 << 16, i) & h2_bits(s89);
                } else {
                    const uint32_t u01 = val_pair_top<VT>(w0, w1, i), u89 = val_pair_top<VT>(w8, w9, i);
                    v01 = h2_bits(__hfma2(*reinterpret_cast<const __half2*>(&u01), s01, __hneg2(s01)));
                    v89 = h2_bits(__hfma2(*reinterpret_cast<const __half2*>(&u89), s89, __hneg2(s89)));
                }
            };
#pragma unroll
            for (int mb = 0; mb < D / 16; mb++) {
                uint32_t a0, a1, a2, a3;
                pair(mb, a0, a2);           // row r:     channel mb of the lane
                pair(D / 16 + mb, a1, a3);  // row r + 8: channel D/16 + mb
                mma(acc[mb], a0, a1, a2, a3, pa[kk][0], pa[kk][1]);
            }
        }
    }
};

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
