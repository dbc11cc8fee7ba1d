// QJL keys (crates/kvq-formats/src/formats/qjl.rs) with KIVI values. A key block (32 tokens of one head):
//   [outlier channel ids u8, padded to 4][(|k_in|, |k_out|) f16 x 32][signs of S k_in: m bits/token]
//   [signs of S_o k_out: mo bits/token]
// score_t = a_in |k_in|_t <S q - g, sign_in_t> + a_out |k_out|_t <g[:mo], sign_out_t>, g = S P_out q.
// fmt.i = {m, mo, outliers, -, v_bits, v_group, -, -}; fmt.p[0] = S^T as f16 [D][m] (the layer's sketch).
// Per CTA, S q of its G heads goes to shared memory once. Per block, g comes from one tensor-core product
// (A = the query's outlier channels, hi/lo rows; B = those columns of S^T), lands in C fragments that are
// exactly the A fragments of the next product, and the sign bits become +-1 f16 B fragments, so both
// estimator sums run on the tensor cores. Values: KIVI's policy. Kernels kvq_qjl_decode_kq{M}v{VB},
// M (sketch rows) in {128, 256, 512}.
#include "kvq_decode.cuh"
#include "kvq_kivi.cuh"

namespace kvq {

// {+-1, +-1} as half2 from two sign bits (bit set = +1).
__device__ __forceinline__ uint32_t signs2(uint32_t two_bits) {
    const uint32_t n = ~two_bits;
    return 0x3C003C00u | ((n & 1u) << 15) | ((n & 2u) << 30);
}

template <int D, int M, int VB>
struct QjlPolicy {
    static constexpr int BT = 32;
    static constexpr int PAGE_BLOCKS = 2;
    static constexpr int STAGES = 2;
    static constexpr int MIN_CTAS = 3;
    static constexpr bool CUSTOM_SEALED = true;
    using V = KiviPolicy<D, 2, VB>;
    static __device__ __forceinline__ int stage_off(int byte) { return byte; }
    static __device__ __forceinline__ int out_chan(int mb, int row) { return V::out_chan(mb, row); }

    struct Body {
        const Ctx<D>& cx;
        const float (*sq)[M];  // S q per head, shared memory
        const float (*qs)[D];          // the queries, shared memory
        const __half* st;              // S^T [D][m], global
        int mo, outliers, kbb, off_norm, off_bits, off_obits;
        static constexpr int m = M;
        float a_in, a_out;

        __device__ __forceinline__ void scores(const uint8_t* ks, int, float (*s)[2]) const {
            const int r = cx.lane >> 2, q = cx.lane & 3;
#pragma unroll
            for (int blk = 0; blk < PAGE_BLOCKS; blk++) {
                const uint8_t* kb = ks + blk * kbb;
                // A of g = q_out S^T_out: k = outlier slot (2q, 2q+1 | 2q+8, 2q+9), rows = heads (hi | lo).
                uint32_t ga[4];
                int oc[4];
                {
                    float x[4];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int o = 2 * q + (e & 1) + 8 * (e >> 1);
                        oc[e] = o < outliers ? kb[o] : -1;
                        x[e] = oc[e] >= 0 ? qs[r][oc[e]] : 0.f;
                    }
                    split2(x[0], x[1], ga[0], ga[1]);
                    split2(x[2], x[3], ga[2], ga[3]);
                }
                float ci[BT / 8][4], co[BT / 8][4];
#pragma unroll
                for (int j = 0; j < BT / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) ci[j][e] = co[j][e] = 0.f;
                const uint8_t* sg = kb + off_bits;
                const uint8_t* osg = kb + off_obits;
                // S^T entries of the next k-step are loaded one step ahead (their latency hides behind
                // this step's MMAs).
                auto load_b = [&](int kbi, uint32_t (&bb)[2][2]) {
                    const __half z = __float2half(0.f);
#pragma unroll
                    for (int h2 = 0; h2 < 2; h2++) {
                        const int j = 16 * kbi + 8 * h2 + r;  // B column (sketch row) this lane loads
                        const __half b00 = oc[0] >= 0 ? st[oc[0] * m + j] : z, b01 = oc[1] >= 0 ? st[oc[1] * m + j] : z;
                        const __half b10 = oc[2] >= 0 ? st[oc[2] * m + j] : z, b11 = oc[3] >= 0 ? st[oc[3] * m + j] : z;
                        bb[h2][0] = h2_bits(__halves2half2(b00, b01));
                        bb[h2][1] = h2_bits(__halves2half2(b10, b11));
                    }
                };
                uint32_t bnext[2][2];
                load_b(0, bnext);
#pragma unroll 4
                for (int kbi = 0; kbi < m / 16; kbi++) {
                    // g for sketch rows 16 kbi + (0..7) and + (8..15): C fragments = A fragments below.
                    uint32_t bcur[2][2] = {{bnext[0][0], bnext[0][1]}, {bnext[1][0], bnext[1][1]}};
                    if (kbi + 1 < m / 16) load_b(kbi + 1, bnext);
                    float g[2][4];
#pragma unroll
                    for (int h2 = 0; h2 < 2; h2++) {
                        g[h2][0] = g[h2][1] = g[h2][2] = g[h2][3] = 0.f;
                        mma(g[h2], ga[0], ga[1], ga[2], ga[3], bcur[h2][0], bcur[h2][1]);
                    }
                    // g[r][16 kbi + 2q + {0,1}] = g[0][0..1] + g[0][2..3] (hi + lo rows); + 8: g[1].
                    const float g0 = g[0][0] + g[0][2], g1 = g[0][1] + g[0][3];
                    const float g8 = g[1][0] + g[1][2], g9 = g[1][1] + g[1][3];
                    const int jq = 16 * kbi + 2 * q;
                    uint32_t ah0, al0, ah1, al1;
                    split2(sq[r][jq] - g0, sq[r][jq + 1] - g1, ah0, al0);
                    split2(sq[r][jq + 8] - g8, sq[r][jq + 9] - g9, ah1, al1);
                    const bool out = 16 * kbi < mo;
                    uint32_t oh0 = 0, ol0 = 0, oh1 = 0, ol1 = 0;
                    if (out) {
                        split2(g0, g1, oh0, ol0);
                        split2(g8, g9, oh1, ol1);
                    }
#pragma unroll
                    for (int j = 0; j < BT / 8; j++) {
                        const int t = 8 * j + r;
                        const uint32_t w = reinterpret_cast<const uint16_t*>(sg + t * (m / 8))[kbi];
                        mma(ci[j], ah0, al0, ah1, al1, signs2((w >> (2 * q)) & 3u), signs2((w >> (2 * q + 8)) & 3u));
                        if (out) {
                            const uint32_t wo = reinterpret_cast<const uint16_t*>(osg + t * (mo / 8))[kbi];
                            mma(co[j], oh0, ol0, oh1, ol1, signs2((wo >> (2 * q)) & 3u),
                                signs2((wo >> (2 * q + 8)) & 3u));
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < BT / 8; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int t = 8 * j + 2 * q + e;
                        const float2 nrm = __half22float2(*reinterpret_cast<const __half2*>(kb + off_norm + 4 * t));
                        s[blk * (BT / 8) + j][e] =
                            a_in * nrm.x * (ci[j][e] + ci[j][e + 2]) + a_out * nrm.y * (co[j][e] + co[j][e + 2]);
                    }
            }
        }
        __device__ __forceinline__ void rescale(float, float, float) const {}
        __device__ __forceinline__ void pv(const uint8_t* vb, int, const uint32_t (*pa)[2], float (*acc)[4]) const {
            V::pv(vb, cx, pa, acc);
        }
        __device__ __forceinline__ void done(const uint8_t*, int, int, float (*)[4]) const {}
    };

    template <int DD>
    static __device__ __forceinline__ void run_sealed(const KvqDecodeParams& P, int slot, int h, int split, int warp,
                                                      int lane, int ns, uint8_t* smem, float scale_log2,
                                                      const Ctx<D>& cx, WarpState<D>& st) {
        __shared__ float sq_sh[MAX_G][M];
        __shared__ float q_sh[MAX_G][D];
        const KvqFmtArgs& fa = P.fmt;
        constexpr int m = M;
        const int mo = fa.i[1], outliers = fa.i[2];
        const __half* S = reinterpret_cast<const __half*>(fa.p[0]);
        const int G = P.group, b = blockIdx.z;
        for (int i = threadIdx.x; i < MAX_G * D; i += THREADS)
            q_sh[i / D][i % D] = i / D < G ? P.q[((int64_t)b * P.hkv * G + (int64_t)h * G) * D + i] : 0.f;
        __syncthreads();
        // S q for the G heads: thread per (head, sketch row), S^T read along rows (coalesced).
        for (int i = threadIdx.x; i < MAX_G * m; i += THREADS) {
            const int hh = i / m, j = i % m;
            float a = 0.f;
            if (hh < G)
                for (int c = 0; c < D; c++) a = fmaf(__half2float(S[c * m + j]), q_sh[hh][c], a);
            sq_sh[hh][j] = a;
        }
        __syncthreads();
        constexpr int TT = PAGE_BLOCKS * BT;
        const int kbb = (int)P.k_block_bytes, vbb = (int)P.v_block_bytes;
        const int kbytes = PAGE_BLOCKS * kbb, vbytes = PAGE_BLOCKS * vbb;
        const int npages = (ns + TT - 1) / TT;
        const int lo = split * P.pages_per_split;
        const int hi = min(npages, lo + P.pages_per_split);
        const int n_tiles = hi > lo + warp ? (hi - lo - warp + WARPS - 1) / WARPS : 0;
        const int32_t* table = P.page_table + (int64_t)slot * P.max_pages;
        auto count = [&](int i) { return min(TT, ns - (lo + warp + i * WARPS) * TT); };
        auto fill = [&](int i, uint8_t* kb, uint8_t* vb) {
            const int64_t page = table[lo + warp + i * WARPS];
            const int nblk = (count(i) + BT - 1) / BT;
            stage<QjlPolicy>(kb, P.k_pages + (page * P.hkv + h) * kbytes, kbytes, nblk * kbb, lane);
            stage<QjlPolicy>(vb, P.v_pages + (page * P.hkv + h) * vbytes, vbytes, nblk * vbb, lane);
        };
        const int off_norm = (outliers + 3) / 4 * 4;
        const int off_bits = off_norm + 4 * BT;
        const int off_obits = off_bits + BT * m / 8;
        Body body{cx, sq_sh, q_sh, S, mo, outliers, kbb, off_norm, off_bits, off_obits,
                  1.2533141373155003f / m, mo > 0 ? 1.2533141373155003f / mo : 0.f};
        warp_run<D, TT>(n_tiles, count, fill, body, smem + warp * P.stages * (kbytes + vbytes), kbytes, vbytes,
                        P.stages, scale_log2, lane, st);
    }
};

}  // namespace kvq

#define QJL_K(D, M, VB) \
    using Qjl_##D##_##M##_##VB = kvq::QjlPolicy<D, M, VB>; \
    KVQ_DECODE_KERNEL(qjl, decode_kq##M##v##VB, Qjl_##D##_##M##_##VB, D)
#define QJL_M(D, M) QJL_K(D, M, 0) QJL_K(D, M, 1) QJL_K(D, M, 2) QJL_K(D, M, 4)
#define QJL_D(D) QJL_M(D, 128) QJL_M(D, 256) QJL_M(D, 512) KVQ_MERGE_KERNEL(qjl, D)

using QjlLayout = kvq::QjlPolicy<128, 256, 2>;
KVQ_LAYOUT(QjlLayout)
QJL_D(64)
QJL_D(128)
