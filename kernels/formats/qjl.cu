// QJL keys (crates/kvq-formats/src/formats/qjl.rs) with KIVI values. A key block (32 tokens of one head):
//   [outlier channel ids u8, padded to 4][(|k_in|, |k_out|) f16 x 32][signs of S k_in: m bits/token]
//   [signs of S_o k_out: mo bits/token]
// score_t = a_in |k_in|_t <S q - g, sign_in_t> + a_out |k_out|_t <g[:mo], sign_out_t>, g = S P_out q.
// fmt.i = {m, mo, outliers, -, v_bits, v_group, -, -}; fmt.p[0] = the layer's sketch as f16, S^T [D][m]
// then S [m][D]; fmt.p[2] = S q of every query head, [B][Hq][m] f32, from kvq_qjl_sketch (launched by
// the host just before), or null. Per CTA, S q of its G heads goes to shared memory once: copied from
// p[2], or (null) a tensor-core product with S's rows loaded from global memory while the first pages'
// copies are in flight. Per block, g comes from
// one tensor-core product (A = the query's outlier channels, hi/lo rows; B = those columns of S^T),
// lands in C fragments that are exactly the A fragments of the next product, and the sign bits become
// +-1 f16 B fragments, so both estimator sums run on the tensor cores. Values: KIVI's policy. Kernels
// kvq_qjl_decode_kq{M}v{VB}, M (sketch rows) in {128, 256, 512}.
//
// Encoder (kvq_qjl_encode_f16_hd{D}, QjlEncode): key blocks as QjlKeys::encode writes them, byte for
// byte; value blocks by KIVI's encoder (kvq_kivi.cuh). The CPU decides everything in f64 from f16 inputs
// (the window's keys, S rounded to f16), and the encoder repeats the same operations in the same order:
// - outliers: per-channel energy sum_t x^2 (thread per channel, tokens in order); channel c is chosen iff
//   fewer than `outliers` channels precede it in (energy descending by f64::total_cmp, index ascending),
//   the CPU's sort order; ids stored ascending, padding zero;
// - norms: thread per token, channels in order; sqrt in f64 (IEEE), then f32 (RNE), min 65504, f16 (RNE);
// - signs: p_in / p_out = sum_c S[j][c] x[t][c] over the inlier / outlier channels in channel order. The
//   x and S values have 11 significant bits, so each product is exact in f64 and fma(s, x, acc) rounds
//   exactly like the CPU's acc + s * x; inlier sums run over all D channels with the outliers' x set to
//   0.0, which adds a zero (leaves any nonzero sum unchanged, and only the sign of a zero could differ,
//   which `> 0` ignores). Bit j of a row is set iff the sum is > 0.
// Work: a warp item is 64 sketch rows (lane l: rows j0 + l and j0 + 32 + l, S^T read coalesced from
// global/L2) x 16 tokens (32 f64 accumulators per lane); x sits in shared memory as f64 (outliers zeroed,
// read as broadcast pairs), so the inner loop is 4 DFMAs per 16-byte shared load and 2 f16 -> f64
// conversions per 32 DFMAs. Each sign word comes from one __ballot_sync; lane L stores the word of token
// t0 + L/2, rows j0 + 32 (L & 1) .., so an item's 32 words go out in one store (outlier words as u16
// halves: mo is a multiple of 16, not always of 32). Shared memory: kvq_encode_smem (about 54 KiB at
// D = 128, 30 KiB at D = 64).
#include <type_traits>
#include "kvq_decode.cuh"
#include "kvq_encode.cuh"
#include "kvq_kivi.cuh"

namespace kvq {

// The B fragment pair of one token's 16 sign bits `w` of a k-step (bit j = sketch row j, set = +1):
// b0 = {+-1 of row 2q, of row 2q+1}, b1 = rows 2q+8, 2q+9, as half2. v = w | w << 15 puts row 2q + i
// 16 bits above row 2q + i - 1's copy, so one shift brings a pair to the sign bits 15 and 31, and one
// LOP3 (~x & 0x80008000) | 0x3C003C00 makes the two halves (for both pairs: 5 instructions a token).
__device__ __forceinline__ uint32_t sign_half2(uint32_t x) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xAE;" : "=r"(d) : "r"(x), "r"(0x80008000u), "r"(0x3C003C00u));
    return d;
}
__device__ __forceinline__ void sign_pairs(uint32_t w, int q, uint32_t& b0, uint32_t& b1) {
    const uint32_t v = w | (w << 15);
    b0 = sign_half2(v << (15 - 2 * q));
    b1 = sign_half2(v << (7 - 2 * q));
}

template <int D, int M, int VB>
struct QjlPolicy {
    static constexpr int BT = 32;
    static constexpr int PAGE_BLOCKS = 1;  // a warp's tile is one block: at batch 1, 4k twice the warps share the work
    static constexpr int STAGES = 2;
    static constexpr int MIN_CTAS = 3;
    static constexpr bool CUSTOM_SEALED = true;
    static constexpr bool Q_PAIR8 = false;
    using V = KiviPolicy<D, 2, VB, PAGE_BLOCKS>;
    // Outlier rows of S^T per warp in static shared memory (4 x 8 x 264 halves at m = 256); m = 512 would
    // pass the 48 KB static limit with S q, so it keeps the per-k-step global loads.
    static constexpr bool TBL_M = M <= 256;
    static __device__ __forceinline__ int stage_off(int byte) { return byte; }
    static __device__ __forceinline__ int out_chan(int mb, int row) { return V::out_chan(mb, row); }

    struct Body {
        const Ctx<D>& cx;
        const float (*sq)[M + 8];  // S q per head, shared memory (rows padded: the float2 reads of lanes
                                   // r = 0..3 and q = 0..3 fall in distinct bank pairs)
        const float (*qs)[D];          // the queries, shared memory
        const __half* st;              // S^T [D][m], global
        __half* tb;                    // this warp's outlier rows of S^T (TBL_M: [8][m + 8]), shared memory
        int mo, outliers, kbb, off_norm, off_bits, off_obits;
        static constexpr int m = M;
        float a_in, a_out;

        __device__ __forceinline__ void scores(const uint8_t* ks, int, float (*s)[2]) const {
            if (TBL_M && outliers <= 8) scores_impl<true>(ks, s);
            else scores_impl<false>(ks, s);
        }
        // TBL: the block's (<= 8) outlier rows of S^T are copied once into the warp's table `tb` (rows
        // padded by 8 halves: the 8 row reads of an ldmatrix fall in distinct banks), and each k-step's
        // B fragments of g come from one ldmatrix.x2.trans instead of 8 scalar global loads and their
        // address arithmetic; slots 8..15 are zero. Otherwise the loads go to global memory per k-step.
        template <bool TBL>
        __device__ __forceinline__ void scores_impl(const uint8_t* ks, float (*s)[2]) const {
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
                if constexpr (TBL) {
                    // Row o of the table = S^T row of outlier slot o (zeros past `outliers`), 16 bytes per
                    // lane and step; the warp's reads of the previous block's table are done (syncwarp).
                    constexpr int CPR = m / 8;  // 16-byte chunks per row
                    __syncwarp();
#pragma unroll 4
                    for (int i = cx.lane; i < 8 * CPR; i += 32) {
                        const int o = i / CPR, c = i % CPR;
                        uint4 v = make_uint4(0u, 0u, 0u, 0u);
                        if (o < outliers) v = __ldg(reinterpret_cast<const uint4*>(st + (int)kb[o] * m) + c);
                        *reinterpret_cast<uint4*>(tb + o * (m + 8) + 8 * c) = v;
                    }
                    __syncwarp();
                }
                // The B fragments of g for a k-step, loaded one step ahead (their latency hides behind
                // this step's MMAs).
                auto load_b = [&](int kbi, uint32_t (&bb)[2][2]) {
                    if constexpr (TBL) {
                        // matrix 0: slots 0..7 x sketch rows 16 kbi + 0..7; matrix 1: rows + 8..15 (lanes 8..15).
                        const int l = cx.lane & 15;
                        uint32_t x[2];
                        ldmatrix_x2_trans(x, reinterpret_cast<const uint8_t*>(tb + (l & 7) * (m + 8) + 16 * kbi + 8 * (l >> 3)));
                        bb[0][0] = x[0], bb[1][0] = x[1], bb[0][1] = bb[1][1] = 0u;
                    } else {
                        const __half z = __float2half(0.f);
#pragma unroll
                        for (int h2 = 0; h2 < 2; h2++) {
                            const int j = 16 * kbi + 8 * h2 + r;  // B column (sketch row) this lane loads
                            const __half b00 = oc[0] >= 0 ? st[oc[0] * m + j] : z, b01 = oc[1] >= 0 ? st[oc[1] * m + j] : z;
                            const __half b10 = oc[2] >= 0 ? st[oc[2] * m + j] : z, b11 = oc[3] >= 0 ? st[oc[3] * m + j] : z;
                            bb[h2][0] = h2_bits(__halves2half2(b00, b01));
                            bb[h2][1] = h2_bits(__halves2half2(b10, b11));
                        }
                    }
                };
                uint32_t bnext[2][2];
                load_b(0, bnext);
                // One k-step; OUT: its sketch rows also carry the outlier estimator (16 kbi < mo). The
                // k-steps with and without it run as two loops, so no lane-uniform branch (and its warp
                // syncs around the MMAs) sits in the loop body.
                auto kstep = [&](int kbi, auto out_tag) {
                    constexpr bool OUT = decltype(out_tag)::value;
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
                    const float2 s01 = *reinterpret_cast<const float2*>(&sq[r][jq]);
                    const float2 s89 = *reinterpret_cast<const float2*>(&sq[r][jq + 8]);
                    split2(s01.x - g0, s01.y - g1, ah0, al0);
                    split2(s89.x - g8, s89.y - g9, ah1, al1);
                    uint32_t oh0 = 0, ol0 = 0, oh1 = 0, ol1 = 0;
                    if constexpr (OUT) {
                        split2(g0, g1, oh0, ol0);
                        split2(g8, g9, oh1, ol1);
                    }
#pragma unroll
                    for (int j = 0; j < BT / 8; j++) {
                        const int t = 8 * j + r;
                        uint32_t b0, b1;
                        sign_pairs(reinterpret_cast<const uint16_t*>(sg + t * (m / 8))[kbi], q, b0, b1);
                        mma(ci[j], ah0, al0, ah1, al1, b0, b1);
                        if constexpr (OUT) {
                            sign_pairs(reinterpret_cast<const uint16_t*>(osg + t * (mo / 8))[kbi], q, b0, b1);
                            mma(co[j], oh0, ol0, oh1, ol1, b0, b1);
                        }
                    }
                };
                const int kout = mo / 16;  // mo: a multiple of 16, <= m
                int kbi = 0;
#pragma unroll 4
                for (; kbi < kout; kbi++) kstep(kbi, std::true_type{});
#pragma unroll 4
                for (; kbi < m / 16; kbi++) kstep(kbi, std::false_type{});
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
        __shared__ __align__(16) float sq_sh[MAX_G][M + 8];
        __shared__ float q_sh[MAX_G][D];
        __shared__ __align__(16) __half tb_sh[WARPS][8][TBL_M ? M + 8 : 8];
        const KvqFmtArgs& fa = P.fmt;
        constexpr int m = M;
        const int mo = fa.i[1], outliers = fa.i[2];
        const __half* S = reinterpret_cast<const __half*>(fa.p[0]);
        const int G = P.group, b = blockIdx.z;
        for (int i = threadIdx.x; i < MAX_G * D; i += THREADS)
            q_sh[i / D][i % D] = i / D < G ? P.q[((int64_t)b * P.hkv * G + (int64_t)h * G) * D + i] : 0.f;
        // S q for the G heads on the tensor cores (C = Q S^T, A = the query's hi/lo rows), straight from
        // global memory (every CTA of the layer reads the same S, so from L2) in a k order of the lane's
        // own channels: lane q takes channels [D/4 q, D/4 (q+1)), k-step kb's positions 2q, 2q+1 being
        // channels D/4 q + 4 kb + {0, 1} and 2q+8, 2q+9 being + {2, 3}. A lane's B fragments of a sketch
        // row are then D/2 contiguous bytes of S (row-major, after S^T in the table), loaded one column
        // pair ahead. It runs as warp_run's `pre`, after each warp's first cp.async stages are issued,
        // so the page loads land meanwhile; the barrier also publishes q_sh. (Was: S^T staged through
        // the dynamic shared memory in 64-column rounds, a cp.async round trip and two barriers each,
        // before any page load.)
        const float* sq_g = reinterpret_cast<const float*>(fa.p[2]);  // precomputed S q, or null
        auto sq_pre = [&]() {
            if (sq_g) {  // qjl_sketch's rows of this KV head's G query heads (zeros past G)
                const float4* src = reinterpret_cast<const float4*>(sq_g + ((int64_t)b * P.hkv + h) * G * m);
                for (int i = threadIdx.x; i < MAX_G * (m / 4); i += THREADS) {
                    const int g = i / (m / 4), c = i % (m / 4);
                    const float4 v = g < G ? src[g * (m / 4) + c] : make_float4(0.f, 0.f, 0.f, 0.f);
                    *reinterpret_cast<float4*>(&sq_sh[g][4 * c]) = v;
                }
                __syncthreads();  // S q and the queries are in shared memory for every warp
                return;
            }
            constexpr int KS = D / 16, LQ = D / 4, NU = D / 32;  // k-steps; channels, uint4 per lane
            const int r = lane >> 2, q = lane & 3;
            uint32_t ah[KS][2], al[KS][2];
            {
                const float* qp = P.q + ((int64_t)b * P.hkv * G + (int64_t)h * G + min(r, G - 1)) * D + LQ * q;
#pragma unroll
                for (int kb = 0; kb < KS; kb++) {
                    float2 a = *reinterpret_cast<const float2*>(qp + 4 * kb);
                    float2 c = *reinterpret_cast<const float2*>(qp + 4 * kb + 2);
                    if (r >= G) a = c = make_float2(0.f, 0.f);
                    split2(a.x, a.y, ah[kb][0], al[kb][0]);
                    split2(c.x, c.y, ah[kb][1], al[kb][1]);
                }
            }
            const __half* srow = S + (int64_t)m * D;  // S [m][D]
            auto ldb = [&](int pi, uint4 (&o)[2][NU]) {
                const uint4* p0 = reinterpret_cast<const uint4*>(srow + (int64_t)(16 * pi + r) * D + LQ * q);
                const uint4* p1 = reinterpret_cast<const uint4*>(srow + (int64_t)(16 * pi + 8 + r) * D + LQ * q);
#pragma unroll
                for (int u = 0; u < NU; u++) o[0][u] = __ldg(p0 + u), o[1][u] = __ldg(p1 + u);
            };
            uint4 nb[2][NU];
            if (warp < m / 16) ldb(warp, nb);
#pragma unroll 1
            for (int pi = warp; pi < m / 16; pi += WARPS) {  // column pairs: sketch rows 16 pi .. + 15
                uint4 cb[2][NU];
#pragma unroll
                for (int u = 0; u < NU; u++) cb[0][u] = nb[0][u], cb[1][u] = nb[1][u];
                if (pi + WARPS < m / 16) ldb(pi + WARPS, nb);
                float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int u = 0; u < NU; u++) {  // k-steps 2u (words x, y) and 2u + 1 (z, w)
                    mma(c0, ah[2 * u][0], al[2 * u][0], ah[2 * u][1], al[2 * u][1], cb[0][u].x, cb[0][u].y);
                    mma(c1, ah[2 * u][0], al[2 * u][0], ah[2 * u][1], al[2 * u][1], cb[1][u].x, cb[1][u].y);
                    mma(c0, ah[2 * u + 1][0], al[2 * u + 1][0], ah[2 * u + 1][1], al[2 * u + 1][1], cb[0][u].z, cb[0][u].w);
                    mma(c1, ah[2 * u + 1][0], al[2 * u + 1][0], ah[2 * u + 1][1], al[2 * u + 1][1], cb[1][u].z, cb[1][u].w);
                }
                const int jq = 16 * pi + 2 * q;
                sq_sh[r][jq] = c0[0] + c0[2];
                sq_sh[r][jq + 1] = c0[1] + c0[3];
                sq_sh[r][jq + 8] = c1[0] + c1[2];
                sq_sh[r][jq + 9] = c1[1] + c1[3];
            }
            __syncthreads();  // S q and the queries are in shared memory for every warp
        };
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
        Body body{cx, sq_sh, q_sh, S, &tb_sh[warp][0][0], mo, outliers, kbb, off_norm, off_bits, off_obits,
                  1.2533141373155003f / m, mo > 0 ? 1.2533141373155003f / mo : 0.f};
        warp_run<D, TT>(n_tiles, count, fill, body, smem + warp * P.stages * (kbytes + vbytes), kbytes, vbytes,
                        P.stages, scale_log2, lane, st, sq_pre);
    }
};

// The sketched queries S q, once per (row, query head) and step, for every split CTA to read instead of
// forming them itself (at B=1, 4k the layer's 256 CTAs each read all of S, 64 KB, through four
// dependent L2 round trips before their first score). Grid (m / 32, Hkv, B), 128 threads: thread t
// takes sketch row 32 blockIdx.x + t / 4 over channel quarter t % 4 (D / 4 f16 of S row-major, 16-byte
// loads), for the G heads of its KV head (queries in shared memory); the quarters add by shuffles.
// f32 products and sums (S is exact in f32): within f32 rounding of the CTA path's hi/lo MMAs.
// Writes out[b][h G + g][j] = sum_c S[j][c] q[b][h G + g][c] (P.fmt.p[2], [B][Hq][m] f32).
template <int D>
__device__ __forceinline__ void qjl_sketch(const KvqDecodeParams& P) {
    __shared__ float q_sh[MAX_G][D];
    const int G = P.group, h = blockIdx.y, b = blockIdx.z, m = P.fmt.i[0];
    const int64_t head0 = (int64_t)b * P.hkv * G + (int64_t)h * G;  // first query head of this KV head
    for (int i = threadIdx.x; i < G * D; i += THREADS) q_sh[i / D][i % D] = P.q[head0 * D + i];
    __syncthreads();
    constexpr int LQ = D / 4, NU = LQ / 8;  // channels per quarter, uint4 loads per thread
    const int j = 32 * blockIdx.x + threadIdx.x / 4, qd = threadIdx.x % 4;
    const __half* S = reinterpret_cast<const __half*>(P.fmt.p[0]) + (int64_t)m * D;  // S [m][D] after S^T
    const uint4* row = reinterpret_cast<const uint4*>(S + (int64_t)j * D + LQ * qd);
    float acc[MAX_G];
#pragma unroll
    for (int g = 0; g < MAX_G; g++) acc[g] = 0.f;
#pragma unroll
    for (int u = 0; u < NU; u++) {
        const uint4 w = __ldg(row + u);
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 s = __half22float2(*reinterpret_cast<const __half2*>(&ws[e]));
            const int c = LQ * qd + 8 * u + 2 * e;
#pragma unroll
            for (int g = 0; g < MAX_G; g++)
                if (g < G) acc[g] = fmaf(s.y, q_sh[g][c + 1], fmaf(s.x, q_sh[g][c], acc[g]));
        }
    }
    float* out = reinterpret_cast<float*>(const_cast<void*>(P.fmt.p[2]));
#pragma unroll
    for (int g = 0; g < MAX_G; g++) {
        float v = acc[g];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (g < G && qd == 0) out[(head0 + g) * m + j] = v;
    }
}

// The block encoder (see the top of the file). Scratch after the staged x: xd (f64 x, outlier channels
// 0.0, rows padded by 2 so the norm pass reads them at most 4-way conflicted), xo (f64 x of the outlier
// channels, slot order), energies, outlier ids, outlier flags. The value pass reuses it for KiviEncode.
template <int D>
struct QjlEncode {
    static constexpr int BT = 32;
    static constexpr int MAX_OUT = 16;  // QjlKeys::kernel(): outliers <= 16
    static constexpr int XS = D + 2;    // xd row stride (f64): 16-byte aligned rows
    static constexpr int OS = MAX_OUT + 1;
    static constexpr int TT = 16;       // tokens per warp item: 2 per lane of 32 sign words
    static constexpr int JW = 64;       // sketch rows per warp item (m is 128, 256 or 512)
    static constexpr int XO_OFF = BT * XS * 8;
    static constexpr int EN_OFF = XO_OFF + BT * OS * 8;
    static constexpr int IDX_OFF = EN_OFF + D * 8;
    static constexpr int FLAG_OFF = IDX_OFF + MAX_OUT * 4;
    static constexpr int SCRATCH = FLAG_OFF + D * 4;
    static constexpr int SMEM = BT * D * 4 + SCRATCH;  // the launch's whole dynamic shared memory
    static_assert(SCRATCH >= 8 * D + BT * D, "KiviEncode's scratch (the value blocks) fits");
    static_assert(2 * TT == 32 && JW == 64, "one sign word per lane per item");

    // Rust's f64::total_cmp as a signed integer order.
    static __device__ __forceinline__ long long total_key(double v) {
        long long b = __double_as_longlong(v);
        return b ^ (long long)((unsigned long long)(b >> 63) >> 1);
    }
    // An entry of S (f16, read-only for the whole launch), exactly, as f64.
    static __device__ __forceinline__ double sv(const __half* p) { return (double)__half2float(__ldg(p)); }
    // f16 of (sqrt(n) as f32).min(65504), as the CPU stores a norm.
    static __device__ __forceinline__ uint16_t norm_f16(double n) {
        return __half_as_ushort(__float2half_rn(fminf(__double2float_rn(__dsqrt_rn(n)), 65504.f)));
    }

    static __device__ void encode(const float* x, uint8_t* out, bool key, const KvqFmtArgs& fa, uint8_t* scratch) {
        if (!key) {
            KiviEncode<D>::encode(x, out, false, fa, scratch);
            return;
        }
        const int m = fa.i[0], mo = fa.i[1];
        const int outliers = min(fa.i[2], MAX_OUT);  // only keeps indices in range: kernel() checks it
        const __half* st = static_cast<const __half*>(fa.p[0]);
        const int off_norm = (outliers + 3) / 4 * 4, off_bits = off_norm + 4 * BT, off_obits = off_bits + BT * m / 8;
        double* xd = reinterpret_cast<double*>(scratch);
        double* xo = reinterpret_cast<double*>(scratch + XO_OFF);
        double* en = reinterpret_cast<double*>(scratch + EN_OFF);
        int* oidx = reinterpret_cast<int*>(scratch + IDX_OFF);
        int* is_out = reinterpret_cast<int*>(scratch + FLAG_OFF);
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

        // Channel energies over the block's tokens, in token order (products of f32s are exact in f64).
        for (int c = tid; c < D; c += ENC_THREADS) {
            double e = 0.0;
            for (int t = 0; t < BT; t++) {
                const double v = (double)x[t * D + c];
                e = __dadd_rn(e, __dmul_rn(v, v));
            }
            en[c] = e;
        }
        __syncthreads();
        // Outliers: the first `outliers` channels of the CPU's order (energy descending, index ascending).
        for (int c = tid; c < D; c += ENC_THREADS) {
            const long long kc = total_key(en[c]);
            int rank = 0;
            for (int c2 = 0; c2 < D; c2++) {
                const long long k2 = total_key(en[c2]);
                rank += (k2 > kc || (k2 == kc && c2 < c)) ? 1 : 0;
            }
            is_out[c] = rank < outliers ? 1 : 0;
        }
        __syncthreads();
        for (int c = tid; c < D; c += ENC_THREADS) {
            if (is_out[c]) {
                int slot = 0;
                for (int c2 = 0; c2 < c; c2++) slot += is_out[c2];
                oidx[slot] = c;  // slot < outliers <= MAX_OUT: exactly `outliers` channels are flagged
            }
        }
        __syncthreads();
        // Ids (ascending) and zero padding; x as f64, inliers in xd, outliers in xo.
        for (int i = tid; i < off_norm; i += ENC_THREADS) out[i] = i < outliers ? (uint8_t)oidx[i] : 0;
        for (int i = tid; i < BT * D; i += ENC_THREADS) {
            const int t = i / D, c = i % D;
            xd[t * XS + c] = is_out[c] ? 0.0 : (double)x[i];
        }
        for (int i = tid; i < BT * MAX_OUT; i += ENC_THREADS) {
            const int t = i / MAX_OUT, k = i % MAX_OUT;
            xo[t * OS + k] = k < outliers ? (double)x[t * D + oidx[k]] : 0.0;
        }
        __syncthreads();
        // Norms: warp 0, lane per token, channels in order (an outlier's 0.0 adds +0 to a sum >= +0).
        if (tid < BT) {
            double n_in = 0.0, n_out = 0.0;
            for (int c = 0; c < D; c++) {
                const double v = xd[tid * XS + c];
                n_in = __dadd_rn(n_in, __dmul_rn(v, v));
            }
            for (int k = 0; k < outliers; k++) {
                const double v = xo[tid * OS + k];
                n_out = __dadd_rn(n_out, __dmul_rn(v, v));
            }
            uint16_t* nrm = reinterpret_cast<uint16_t*>(out + off_norm + 4 * tid);
            nrm[0] = norm_f16(n_in);
            nrm[1] = norm_f16(n_out);
        }
        // Signs: warp items of JW sketch rows x TT tokens.
        const int items = (m / JW) * (BT / TT);
        for (int it = warp; it < items; it += ENC_THREADS / 32) {
            const int j0 = (it / (BT / TT)) * JW, t0 = (it % (BT / TT)) * TT;
            const __half* sp = st + j0 + lane;  // S^T[c][j0 + lane] at sp[c * m]; row j0 + 32 + lane at +32
            double a[TT][2];
#pragma unroll
            for (int tt = 0; tt < TT; tt++) a[tt][0] = a[tt][1] = 0.0;
#pragma unroll 2
            for (int c = 0; c < D; c += 2) {
                const __half* s0 = sp + (size_t)c * m;
                const double s00 = sv(s0), s01 = sv(s0 + 32), s10 = sv(s0 + m), s11 = sv(s0 + m + 32);
#pragma unroll
                for (int tt = 0; tt < TT; tt++) {
                    const double2 xv = *reinterpret_cast<const double2*>(xd + (t0 + tt) * XS + c);
                    // Exact products: each fma rounds once, like the CPU's acc + s * x.
                    a[tt][0] = __fma_rn(s00, xv.x, a[tt][0]);
                    a[tt][1] = __fma_rn(s01, xv.x, a[tt][1]);
                    a[tt][0] = __fma_rn(s10, xv.y, a[tt][0]);
                    a[tt][1] = __fma_rn(s11, xv.y, a[tt][1]);
                }
            }
            // Word (tt, r) = rows j0 + 32 r .. + 31 of token t0 + tt; lane 2 tt + r keeps it.
            uint32_t mine = 0;
#pragma unroll
            for (int tt = 0; tt < TT; tt++)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const uint32_t w = __ballot_sync(0xffffffffu, a[tt][r] > 0.0);
                    if (lane == 2 * tt + r) mine = w;
                }
            const int t = t0 + (lane >> 1), jw = j0 + 32 * (lane & 1);
            reinterpret_cast<uint32_t*>(out + off_bits + t * (m / 8))[jw / 32] = mine;
            if (j0 >= mo) continue;  // warp-uniform
            // Outlier sketch rows (j < mo): the outlier channels in ascending order.
#pragma unroll
            for (int tt = 0; tt < TT; tt++) a[tt][0] = a[tt][1] = 0.0;
            for (int k = 0; k < outliers; k++) {
                const __half* s0 = sp + (size_t)oidx[k] * m;
                const double s00 = sv(s0), s01 = sv(s0 + 32);
#pragma unroll
                for (int tt = 0; tt < TT; tt++) {
                    const double v = xo[(t0 + tt) * OS + k];
                    a[tt][0] = __fma_rn(s00, v, a[tt][0]);
                    a[tt][1] = __fma_rn(s01, v, a[tt][1]);
                }
            }
#pragma unroll
            for (int tt = 0; tt < TT; tt++)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const uint32_t w = __ballot_sync(0xffffffffu, a[tt][r] > 0.0);
                    if (lane == 2 * tt + r) mine = w;
                }
            // Rows are mo/8 bytes (mo a multiple of 16): 16-bit halves, those below mo.
            uint16_t* orow = reinterpret_cast<uint16_t*>(out + off_obits + t * (mo / 8));
            if (jw < mo) orow[jw / 16] = (uint16_t)(mine & 0xffffu);
            if (jw + 16 < mo) orow[jw / 16 + 1] = (uint16_t)(mine >> 16);
        }
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
#define QJL_SKETCH(D)                                                                          \
    extern "C" __global__ void __launch_bounds__(kvq::THREADS) KVQ_NAME(qjl, sketch, f16, D)( \
        const KvqDecodeParams P) {                                                             \
        KVQ_PDL_ENTER(); /* the queries come from the kernel before */                         \
        kvq::qjl_sketch<D>(P);                                                                 \
    }
QJL_SKETCH(64)
QJL_SKETCH(128)
KVQ_ENCODE_KERNEL(qjl, kvq::QjlEncode<64>, 32, 64)
KVQ_ENCODE_KERNEL(qjl, kvq::QjlEncode<128>, 32, 128)
KVQ_ENCODE_SMEM(kvq::QjlEncode<64>::SMEM, kvq::QjlEncode<128>::SMEM)  // staged x included
