// RVQ (crates/kvq-formats/src/formats/rvq.rs): per token and head the vector is divided by its std over
// D, split into groups of 32 channels, and each group is the sum of `depth` codewords, one per stage of
// the layer stream's codebooks. Keys are quantized before RoPE (strided groups: position j < 16 of
// group g and position j + 16 are the rotary pair of HF channel g + j D/32, its frequency index).
// A block (32 tokens of one head):
//   [std f16; 32][codes, token-major: (D/32) groups x depth stages x cbits bits per token]
// fmt.i = {depth, cbits, codes, -} for K, the same at i[4..8] for V; fmt.p[0] / p[1] = the K / V stream's
// table (RvqCodec::kernel_table):
//   [i32 rope style (0 interleaved, 1 rotate-half), 0, 0, 0][f32 inv_freq; D/2][i32 chan; D]
//   [f32 books; depth x codes x 32][f16 books; the same]
// where chan[g * 32 + j] is the model channel of position j of group g.
//
// Decode: each warp decodes its 32-token tile into f16 rows in shared memory (lane = token; a
// codeword is four 16-byte loads of the f16 books, which stay in L1/L2: every token reads them), keys
// rotated to their positions (the tile's base angle in f64 once per pair, the in-tile step from a
// per-CTA table), then runs the fp16 path's tensor-core products on those rows. Nothing decoded leaves
// shared memory. The decode is per-token work (depth x D/32 codeword loads), not bytes: RVQ's cache is
// small, its kernel is not bandwidth-bound.
//
// Encoder (RvqEncode): matches RvqCodec::encode byte for byte. The CPU's f32 operations are repeated in
// its order with the rounding intrinsics (no contraction into FMAs): std over channels in order (thread
// per token), then, thread per (token, group), each stage's nearest codeword by the sum of squared
// differences over the group in order, the first minimum winning (strict <), over the f32 books.
#include "kvq_decode.cuh"
#include "kvq_encode.cuh"

namespace kvq {

constexpr int RVQ_G = 32;       // channels per group (the only group size with a kernel)
constexpr int RVQ_MAX_DEPTH = 16;

struct RvqTab {
    int style;
    const float* inv_freq;
    const int* chan;
    const float* books32;
    const __half* books16;
};

template <int D>
__device__ __forceinline__ RvqTab rvq_tab(const void* p, int depth, int codes) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    RvqTab t;
    t.style = *reinterpret_cast<const int*>(b);
    t.inv_freq = reinterpret_cast<const float*>(b + 16);
    t.chan = reinterpret_cast<const int*>(b + 16 + 2 * D);
    t.books32 = reinterpret_cast<const float*>(b + 16 + 6 * D);
    t.books16 = reinterpret_cast<const __half*>(b + 16 + 6 * D + (int64_t)depth * codes * RVQ_G * 4);
    return t;
}

// Decodes token `t` (this lane's) of block `blk` into row t of `rows` (f16, swz<D> layout); keys are
// rotated by base[i] (cos, sin of the tile's first position) times delta[t][i] (of the in-tile step).
template <int D, bool KEY>
__device__ __forceinline__ void rvq_decode_row(const uint8_t* blk, int t, const RvqTab& tb, int depth, int cbits,
                                               int codes, const float2* base, const float2* delta, uint8_t* rows) {
    constexpr int NG = D / RVQ_G;
    const float s = f16_at(blk + 2 * t);
    const uint8_t* cw = blk + 2 * 32;
#pragma unroll 1
    for (int g = 0; g < NG; g++) {
        float acc[RVQ_G];
#pragma unroll
        for (int j = 0; j < RVQ_G; j++) acc[j] = 0.f;
#pragma unroll 1
        for (int st = 0; st < depth; st++) {
            const int code = (int)bits_at(cw, ((t * NG + g) * depth + st) * cbits, cbits);
            const uint4* w = reinterpret_cast<const uint4*>(tb.books16 + ((int64_t)st * codes + code) * RVQ_G);
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const uint4 u = __ldg(w + q);
                const uint32_t uu[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&uu[e]));
                    acc[8 * q + 2 * e] += f.x;
                    acc[8 * q + 2 * e + 1] += f.y;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < RVQ_G; j++) acc[j] *= s;
        if constexpr (KEY) {
#pragma unroll
            for (int j = 0; j < RVQ_G / 2; j++) {
                const int i = g + j * NG;
                const float2 b = base[i], dl = delta[t * (D / 2) + i];
                const float c = b.x * dl.x - b.y * dl.y, sn = b.y * dl.x + b.x * dl.y;
                const float xa = acc[j], xb = acc[j + RVQ_G / 2];
                acc[j] = xa * c - xb * sn;
                acc[j + RVQ_G / 2] = xa * sn + xb * c;
            }
        }
#pragma unroll
        for (int j = 0; j < RVQ_G; j++) {
            const int c = __ldg(tb.chan + g * RVQ_G + j);
            *reinterpret_cast<__half*>(rows + swz<D>(t, c >> 3) + 2 * (c & 7)) = __float2half_rn(acc[j]);
        }
    }
}

template <int D>
struct RvqPolicy {
    static constexpr int BT = 32;
    static constexpr int PAGE_BLOCKS = 1;
    static constexpr int STAGES = 3;
    static constexpr int MIN_CTAS = 1;
    static constexpr bool CUSTOM_SEALED = true;
    static constexpr bool Q_PAIR8 = false;
    // Dynamic shared memory per warp past the page stages, per head channel: K and V rows of a tile
    // (2 x 32 x 2 bytes) and the tile's base angles (D/2 x 8 bytes).
    static constexpr int ROWS_PER_CH = 2 * BT * 2 + 4;
    static __device__ __forceinline__ int stage_off(int byte) { return byte; }
    static __device__ __forceinline__ int out_chan(int mb, int row) { return 16 * mb + row; }

    struct Body {
        const Ctx<D>& cx;
        RvqTab kt, vt;
        int kdepth, kcbits, kcodes, vdepth, vcbits, vcodes;
        uint8_t* krows;
        uint8_t* vrows;
        float2* base;
        const float2* delta;
        int first_page;  // the warp's first page (tile i is page first_page + i * WARPS)

        __device__ __forceinline__ void scores(const uint8_t* ks, int i, float (*s)[2]) const {
            const int lane = cx.lane;
            const double p0 = (double)((first_page + i * WARPS) * BT);
            for (int ii = lane; ii < D / 2; ii += 32) {
                double sd, cd;
                sincos(p0 * (double)kt.inv_freq[ii], &sd, &cd);
                base[ii] = make_float2((float)cd, (float)sd);
            }
            __syncwarp();
            rvq_decode_row<D, true>(ks, lane, kt, kdepth, kcbits, kcodes, base, delta, krows);
            __syncwarp();
            scores_f16rows<D, BT>(krows, cx, s);
        }
        __device__ __forceinline__ void rescale(float, float, float) const {}
        __device__ __forceinline__ void pv(const uint8_t* vb, int, const uint32_t (*pa)[2], float (*acc)[4]) const {
            rvq_decode_row<D, false>(vb, cx.lane, vt, vdepth, vcbits, vcodes, nullptr, nullptr, vrows);
            __syncwarp();
            pv_f16rows<D, BT>(vrows, cx, pa, acc);
        }
        __device__ __forceinline__ void done(const uint8_t*, int, int, float (*)[4]) const {}
    };

    template <int DD>
    static __device__ __forceinline__ void run_sealed(const KvqDecodeParams& P, int slot, int h, int split, int warp,
                                                      int lane, int ns, uint8_t* smem, float scale_log2,
                                                      const Ctx<D>& cx, WarpState<D>& st) {
        __shared__ float2 delta_sh[BT * (D / 2)];  // (cos, sin) of t * inv_freq[i], t < 32
        const KvqFmtArgs& fa = P.fmt;
        const RvqTab kt = rvq_tab<D>(fa.p[0], fa.i[0], fa.i[2]);
        const RvqTab vt = rvq_tab<D>(fa.p[1], fa.i[4], fa.i[6]);
        for (int idx = threadIdx.x; idx < BT * (D / 2); idx += THREADS) {
            const int t = idx / (D / 2), i = idx % (D / 2);
            float sn, c;
            sincosf((float)t * kt.inv_freq[i], &sn, &c);
            delta_sh[idx] = make_float2(c, sn);
        }
        __syncthreads();
        const int kbb = (int)P.k_block_bytes, vbb = (int)P.v_block_bytes;
        const int npages = (ns + BT - 1) / BT;
        const int lo = split * P.pages_per_split;
        const int hi = min(npages, lo + P.pages_per_split);
        const int n_tiles = hi > lo + warp ? (hi - lo - warp + WARPS - 1) / WARPS : 0;
        const int32_t* table = P.page_table + (int64_t)slot * P.max_pages;
        auto count = [&](int i) { return min(BT, ns - (lo + warp + i * WARPS) * BT); };
        auto fill = [&](int i, uint8_t* kb, uint8_t* vb) {
            const int64_t page = table[lo + warp + i * WARPS];
            stage<RvqPolicy>(kb, P.k_pages + (page * P.hkv + h) * kbb, kbb, kbb, lane);
            stage<RvqPolicy>(vb, P.v_pages + (page * P.hkv + h) * vbb, vbb, vbb, lane);
        };
        uint8_t* extra = smem + WARPS * P.stages * (kbb + vbb) + warp * ROWS_PER_CH * D;
        Body body{cx,    kt,      vt,      fa.i[0], fa.i[1],         fa.i[2],
                  fa.i[4], fa.i[5], fa.i[6], extra,  extra + 2 * BT * D, reinterpret_cast<float2*>(extra + 4 * BT * D),
                  delta_sh, lo + warp};
        warp_run<D, BT>(n_tiles, count, fill, body, smem + warp * P.stages * (kbb + vbb), kbb, vbb, P.stages,
                        scale_log2, lane, st);
    }
};

// The block encoder (see the top of the file). Scratch: std f32 [32], codes u16 [32][D/32][depth].
template <int D>
struct RvqEncode {
    static constexpr int NG = D / RVQ_G;
    static constexpr int SMEM = 32 * D * 4 + 128 + 32 * NG * RVQ_MAX_DEPTH * 2;

    static __device__ void encode(const float* x, uint8_t* out, bool key, const KvqFmtArgs& fa, uint8_t* scratch) {
        const int o = key ? 0 : 4;
        const int depth = min(fa.i[o], RVQ_MAX_DEPTH), cbits = fa.i[o + 1], codes = fa.i[o + 2];
        const RvqTab tb = rvq_tab<D>(fa.p[key ? 0 : 1], depth, codes);
        float* sc = reinterpret_cast<float*>(scratch);
        uint16_t* cd = reinterpret_cast<uint16_t*>(scratch + 128);
        const int tid = threadIdx.x;
        if (tid < 32) {
            const float* row = x + tid * D;
            float sum = 0.f;
            for (int c = 0; c < D; c++) sum = __fadd_rn(sum, row[c]);
            const float mean = __fdiv_rn(sum, (float)D);
            float var = 0.f;
            for (int c = 0; c < D; c++) {
                const float a = __fsub_rn(row[c], mean);
                var = __fadd_rn(var, __fmul_rn(a, a));
            }
            var = __fdiv_rn(var, (float)D);
            const __half h = __float2half_rn(fminf(__fsqrt_rn(var), 65504.f));
            float s = __half2float(h);
            if (!(s > 0.f)) s = 1.f;
            sc[tid] = s;
            reinterpret_cast<uint16_t*>(out)[tid] = __half_as_ushort(__float2half_rn(s));
        }
        __syncthreads();
        for (int item = tid; item < 32 * NG; item += ENC_THREADS) {
            const int t = item / NG, g = item % NG;
            float r[RVQ_G];
#pragma unroll
            for (int j = 0; j < RVQ_G; j++) r[j] = __fdiv_rn(x[t * D + __ldg(tb.chan + g * RVQ_G + j)], sc[t]);
#pragma unroll 1
            for (int st = 0; st < depth; st++) {
                const float* cb = tb.books32 + (int64_t)st * codes * RVQ_G;
                float best = INFINITY;
                int bk = 0;
#pragma unroll 1
                for (int k = 0; k < codes; k++) {
                    const float4* w = reinterpret_cast<const float4*>(cb + (int64_t)k * RVQ_G);
                    float dd = 0.f;
#pragma unroll
                    for (int q = 0; q < RVQ_G / 4; q++) {
                        const float4 c = __ldg(w + q);
                        const float t0 = __fsub_rn(r[4 * q], c.x), t1 = __fsub_rn(r[4 * q + 1], c.y);
                        const float t2 = __fsub_rn(r[4 * q + 2], c.z), t3 = __fsub_rn(r[4 * q + 3], c.w);
                        dd = __fadd_rn(dd, __fmul_rn(t0, t0));
                        dd = __fadd_rn(dd, __fmul_rn(t1, t1));
                        dd = __fadd_rn(dd, __fmul_rn(t2, t2));
                        dd = __fadd_rn(dd, __fmul_rn(t3, t3));
                    }
                    if (dd < best) {
                        best = dd;
                        bk = k;
                    }
                }
                const float* win = cb + (int64_t)bk * RVQ_G;
#pragma unroll
                for (int j = 0; j < RVQ_G; j++) r[j] = __fsub_rn(r[j], __ldg(win + j));
                cd[item * depth + st] = (uint16_t)bk;
            }
        }
        __syncthreads();
        // Little-endian bit stream of the codes (bits::pack), one 32-bit word per thread.
        const int n = 32 * NG * depth;
        const int words = (n * cbits + 31) / 32;
        uint32_t* ow = reinterpret_cast<uint32_t*>(out + 2 * 32);
        for (int w = tid; w < words; w += ENC_THREADS) {
            uint32_t v = 0;
            for (int i = (32 * w) / cbits; i < n && i * cbits < 32 * (w + 1); i++) {
                const int sh = i * cbits - 32 * w;
                const uint32_t c = cd[i];
                v |= sh >= 0 ? (c << sh) : (c >> -sh);
            }
            ow[w] = v;
        }
    }
};

}  // namespace kvq

using RvqLayout = kvq::RvqPolicy<128>;
KVQ_LAYOUT_ROWS(RvqLayout, RvqLayout::ROWS_PER_CH)
KVQ_DECODE_KERNELS(rvq, kvq::RvqPolicy<64>, 64)
KVQ_DECODE_KERNELS(rvq, kvq::RvqPolicy<128>, 128)
KVQ_ENCODE_KERNEL(rvq, kvq::RvqEncode<64>, 32, 64)
KVQ_ENCODE_KERNEL(rvq, kvq::RvqEncode<128>, 32, 128)
KVQ_ENCODE_SMEM(kvq::RvqEncode<64>::SMEM, kvq::RvqEncode<128>::SMEM)  // staged x included
