// DecoQuant (crates/kvq-formats/src/formats/decoquant.rs): a block of C tokens of one head is
//   [T_S f16; sub*sub row-major (absent with svd=off)][scale f16; C][codes token-major, D*b bits each]
// and token t's piece p (channels p*sub ..) is x = u T_S with u = scale_t * (code - qmax).
// fmt.i = {k_bits, C, U, svd, v_bits, C, U, svd}, U = tokens per work unit (chosen by the codec). A page is one block; a warp reads its block in
// tiles of 64 tokens (T_S, the tile's scales and codes staged together) and never reconstructs x:
//   keys:   q.x_t = scale_t * (sum_c q'_c code_{t,c} - qmax sum_c q'_c), q' = T_S q per piece (on the tensor cores), formed
//           once per block and fed to the tensor cores as f16 hi + lo rows, codes as exact halves
//           (2/4-bit codes in the top form 1 + c / 2^b, kvq_codes.cuh, undone in f32; 8-bit as integers);
//   values: sum_t p_t x_t = (sum_t (p_t scale_t) code_t - qmax sum_t p_t scale_t) T_S, the codes
//           accumulated on the tensor cores with p*scale as the B operand, T_S applied once per block
//           (a lane owns whole pieces of its channels, or half a piece shared with lane ^ 4).
// Kernels kvq_decoquant_decode_k{KB}v{VB}, KB, VB in {2, 4, 8}, for sub = 16 (the default).
// Work is split in units of U = 256 tokens (or the block, if smaller; fmt.i[2]): a warp folds q once per
// unit and applies T_S once per unit. The launch's unit is P.unit_tokens: the host halves it, down to one
// 64-token tile, when a split would hold fewer units than warps (short contexts), so no warp idles.
//
// Encoder (kvq_decoquant_encode_f16_hd{D}, end of file): one CTA of 128 threads per (block, KV head),
// keys then values. A block is up to 4096 tokens, too big to stage as f32 (encode_kernel's scheme), so it
// reads the f16 window ring directly and keeps ~24 KiB of shared memory (kvq_encode_smem): a 16 KiB
// tile of the block for the Gram sums, the 16x16 f64 Jacobi state, T_S and one row of codes per warp.
//   1. Gram g = sum_r row_r^T row_r (rows of 16 channels, in row order): thread = two (i, j) entries,
//      each one sequential f64 sum over all rows of the block, as decompose's loop.
//   2. sym_eigen by warp 0: cyclic Jacobi, the same convergence sums in the same order (every lane sums
//      them itself, so branches agree), the same rotation formulas and per-element updates (lanes own k),
//      then the stable descending total_cmp sort by rank.
//   3. T_S = (sig_k V_jk) as f32, the alpha rescale over 30000, stored f16 (round to nearest even).
//   4. A warp per token: T_L's row recomputed from x and V (sum_j x_j V_jk in j order over the half-warp
//      of the piece, / sig_k, as f32, times alpha; x itself with svd=off), absmax scale as f16, codes
//      round(v / scale) clamped + qmax, packed LSB first as bits::pack.
// Byte-exact with DecoCodec::encode: the inputs are the same f16 values; every f64 and f32 operation
// whose rounding matters is an explicit _rn intrinsic (never contracted into an FMA), taken in the CPU's
// order; products of f32s are exact in f64 (so the Gram's mirrored half is equal); sqrt and division are
// IEEE-correct on both sides, and f32::round / clamp / max are mirrored (roundf, compares, fmaxf on
// non-negative values). The one value the CPU build leaves to codegen, l.max(0.0) for l = -0.0, is taken
// as the release build computes it (+0.0); an eigenvalue of exactly -0.0 needs an f64 underflow.
#include "kvq_decode.cuh"
#include "kvq_codes.cuh"
#include "kvq_encode.cuh"

namespace kvq {

constexpr int DECO_TT = 64;
constexpr int DECO_SUB = 16;

template <int D, int KB, int VB>
struct DecoPolicy {
    static constexpr int BT = DECO_TT;  // tokens per tile (the block is C tokens, a runtime multiple)
    static constexpr int PAGE_BLOCKS = 1;
    static constexpr int STAGES = 2;
    static constexpr int MIN_CTAS = 2;
    static constexpr bool CUSTOM_SEALED = true;
    static constexpr bool Q_PAIR8 = false;
    static __device__ __forceinline__ int stage_off(int byte) { return byte; }
    static __device__ __forceinline__ int out_chan(int mb, int row) {
        return (D / 8) * (row & 7) + (D / 16) * (row >> 3) + mb;
    }

    // Per-warp block state and per-tile work (see warp_run).
    struct Body {
        const Ctx<D>& cx;
        int tpu, kbytes, svd, kbits, vbits, kts, vts, krb, vrb;
        float kqmax, vqmax;
        uint32_t ahi[D / 16][2], alo[D / 16][2];
        float bias;
        float acc_u[D / 16][4];
        float psum;  // sum_t p_t scale_t of head r (this lane's share)
        // 2- and 4-bit codes enter the MMAs in the top form (kvq_codes.cuh: 1 + c / 2^b, no unbias
        // subtract per pair): keys undone in bias and scores(), values per unit in done()
        // (acc_u = sum p s + 2^-b sum p s c, so u = 2^b acc_u - (2^b + qmax) psum).
        static constexpr float KTOP = (KB == 2 || KB == 4) ? (float)(1 << KB) : 1.f;
        static constexpr float KTOP_OFF = (KB == 2 || KB == 4) ? (float)(1 << KB) : 0.f;
        static constexpr float VTOP = (VB == 2 || VB == 4) ? (float)(1 << VB) : 1.f;
        static constexpr float VTOP_OFF = (VB == 2 || VB == 4) ? (float)(1 << VB) : 0.f;

        // q' = T_S q per piece for this lane's A positions; bias = -qmax * sum_c q'_c (top form below).
        // On the tensor cores: per piece, C = Q B with A = the query's hi/lo rows (cx, channels of the
        // piece) and B = T_S^T (column n = output k': T_S row k', two MMAs for k' = 0..7 and 8..15, the
        // same B fragments for every piece), so C rows r and r + 8 sum to q'[r][k'] in f32.
        __device__ __forceinline__ void fold(const uint8_t* kb) {
            const int r = cx.lane >> 2, q = cx.lane & 3;
            const __half* ts = reinterpret_cast<const __half*>(kb);
            uint32_t tb[2][2] = {{0u, 0u}, {0u, 0u}};
            if (svd) {
#pragma unroll
                for (int nh = 0; nh < 2; nh++) {
                    tb[nh][0] = *reinterpret_cast<const uint32_t*>(ts + (8 * nh + r) * DECO_SUB + 2 * q);
                    tb[nh][1] = *reinterpret_cast<const uint32_t*>(ts + (8 * nh + r) * DECO_SUB + 2 * q + 8);
                }
            }
            float part = 0.f;
#pragma unroll
            for (int kbi = 0; kbi < D / 16; kbi++) {
                float w[4];  // q' at channels 16 kbi + (2q, 2q+8, 2q+1, 2q+9)
                if (svd) {
                    float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
                    mma(c0, cx.hi[kbi][0], cx.lo[kbi][0], cx.hi[kbi][1], cx.lo[kbi][1], tb[0][0], tb[0][1]);
                    mma(c1, cx.hi[kbi][0], cx.lo[kbi][0], cx.hi[kbi][1], cx.lo[kbi][1], tb[1][0], tb[1][1]);
                    w[0] = c0[0] + c0[2], w[1] = c1[0] + c1[2], w[2] = c0[1] + c0[3], w[3] = c1[1] + c1[3];
                } else {
                    w[0] = cx.x[kbi][0], w[1] = cx.x[kbi][2], w[2] = cx.x[kbi][1], w[3] = cx.x[kbi][3];
                }
                part += (w[0] + w[1]) + (w[2] + w[3]);
                split2(w[0], w[1], ahi[kbi][0], alo[kbi][0]);
                split2(w[2], w[3], ahi[kbi][1], alo[kbi][1]);
            }
            part += __shfl_xor_sync(0xffffffffu, part, 1);
            part += __shfl_xor_sync(0xffffffffu, part, 2);
            // Top-form key codes (1 + c / 2^b) make the MMA sum q' + 2^-b sum q' c: scores() scales
            // by 2^b, and bias takes sum q' off with the qmax term.
            bias = -(KTOP_OFF + kqmax) / KTOP * part;
        }

        __device__ __forceinline__ void scores(const uint8_t* kb, int i, float (*s)[2]) {
            if (i % tpu == 0) fold(kb);
            const int r = cx.lane >> 2, q = cx.lane & 3;
            const __half* sc = reinterpret_cast<const __half*>(kb + kts);
            const uint8_t* codes = kb + kts + 2 * DECO_TT;
            float c[DECO_TT / 8][4];
#pragma unroll
            for (int j = 0; j < DECO_TT / 8; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
            for (int kbi = 0; kbi < D / 16; kbi++)
#pragma unroll
                for (int j = 0; j < DECO_TT / 8; j++) {
                    uint32_t b0, b1;
                    if constexpr (KTOP_OFF != 0.f) key_codes_top<KB>(codes + (8 * j + r) * krb, kbi, q, b0, b1);
                    else key_codes<KB>(codes + (8 * j + r) * krb, kbi, q, kbits, b0, b1);
                    mma(c[j], ahi[kbi][0], alo[kbi][0], ahi[kbi][1], alo[kbi][1], b0, b1);
                }
#pragma unroll
            for (int j = 0; j < DECO_TT / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                    s[j][e] = __half2float(sc[8 * j + 2 * q + e]) * (KTOP * (c[j][e] + c[j][e + 2] + bias));
        }

        __device__ __forceinline__ void rescale(float corr, float corr0, float corr1) {
            psum *= corr;
#pragma unroll
            for (int mb = 0; mb < D / 16; mb++) {
                acc_u[mb][0] *= corr0;
                acc_u[mb][1] *= corr1;
                acc_u[mb][2] *= corr0;
                acc_u[mb][3] *= corr1;
            }
        }

        __device__ __forceinline__ void pv(const uint8_t* vb, int, const uint32_t (*pa)[2], float (*)[4]) {
            const int r = cx.lane >> 2, q = cx.lane & 3;
            const __half* sc = reinterpret_cast<const __half*>(vb + vts);
            const uint8_t* codes = vb + vts + 2 * DECO_TT;
#pragma unroll
            for (int kk = 0; kk < DECO_TT / 16; kk++) {
                const int t0 = 16 * kk + 2 * q;
                const int ts[4] = {t0, t0 + 1, t0 + 8, t0 + 9};
                __half2 p01 = *reinterpret_cast<const __half2*>(&pa[kk][0]);
                __half2 p89 = *reinterpret_cast<const __half2*>(&pa[kk][1]);
                p01 = __hmul2(p01, __halves2half2(sc[ts[0]], sc[ts[1]]));
                p89 = __hmul2(p89, __halves2half2(sc[ts[2]], sc[ts[3]]));
                const float2 f01 = __half22float2(p01), f89 = __half22float2(p89);
                psum += (f01.x + f01.y) + (f89.x + f89.y);
                const uint32_t b0 = h2_bits(p01), b1 = h2_bits(p89);
                auto pair = [&](int i, uint32_t& v01, uint32_t& v89) {
                    if constexpr (VB == 2 || VB == 4) {
                        const uint64_t w0 = val_word<VB, D>(codes + ts[0] * vrb, r);
                        const uint64_t w1 = val_word<VB, D>(codes + ts[1] * vrb, r);
                        const uint64_t w8 = val_word<VB, D>(codes + ts[2] * vrb, r);
                        const uint64_t w9 = val_word<VB, D>(codes + ts[3] * vrb, r);
                        v01 = val_pair_top<VB>(w0, w1, i);
                        v89 = val_pair_top<VB>(w8, w9, i);
                    } else {
                        const int c = (D / 8) * r + i;
                        v01 = halves(bits_at(codes + ts[0] * vrb, c * vbits, vbits),
                                     bits_at(codes + ts[1] * vrb, c * vbits, vbits));
                        v89 = halves(bits_at(codes + ts[2] * vrb, c * vbits, vbits),
                                     bits_at(codes + ts[3] * vrb, c * vbits, vbits));
                    }
                };
#pragma unroll
                for (int mb = 0; mb < D / 16; mb++) {
                    uint32_t a0, a1, a2, a3;
                    pair(mb, a0, a2);
                    pair(D / 16 + mb, a1, a3);
                    mma(acc_u[mb], a0, a1, a2, a3, b0, b1);
                }
            }
        }

        // At the block's last tile: u = acc_u - qmax psum (top form: 2^b acc_u - (2^b + qmax) psum),
        // x = u T_S per piece, into acc; reset.
        __device__ __forceinline__ void done(const uint8_t* buf, int i, int n_tiles, float (*acc)[4]) {
            if (i % tpu != tpu - 1 && i != n_tiles - 1) return;
            const int r = cx.lane >> 2, q = cx.lane & 3;
            const __half* ts = reinterpret_cast<const __half*>(buf + kbytes);
            float ps = psum;
            ps += __shfl_xor_sync(0xffffffffu, ps, 1);
            ps += __shfl_xor_sync(0xffffffffu, ps, 2);
            const float pse[2] = {__shfl_sync(0xffffffffu, ps, 8 * q), __shfl_sync(0xffffffffu, ps, 8 * q + 4)};
            constexpr int NC = D / 8;  // channels of this lane: NC * r + i
            float u[2][NC];
#pragma unroll
            for (int e = 0; e < 2; e++)
#pragma unroll
                for (int i2 = 0; i2 < NC; i2++) {
                    const float a = i2 < D / 16 ? acc_u[i2][e] : acc_u[i2 - D / 16][2 + e];
                    u[e][i2] = fmaf(VTOP, a, -(VTOP_OFF + vqmax) * pse[e]);
                }
            float x[2][NC];
            if (svd) {
                // A piece is DECO_SUB channels: NC = 16 (D = 128) holds one, NC = 8 (D = 64) half of
                // one, the other half on lane ^ 4 (r ^ 1). Both heads of the lane go through each row of
                // T_S together (16-byte loads, one conversion per element for both).
                constexpr int HALVES = DECO_SUB / NC;  // 1 or 2
                float piece[2][DECO_SUB];
#pragma unroll
                for (int e = 0; e < 2; e++)
#pragma unroll
                    for (int i2 = 0; i2 < NC; i2++) {
                        const float o = HALVES == 2 ? __shfl_xor_sync(0xffffffffu, u[e][i2], 4) : 0.f;
                        if (HALVES == 1) {
                            piece[e][i2] = u[e][i2];
                        } else {  // selects, not a lane-dependent index (that would put piece in local memory)
                            const bool first = (r & 1) == 0;
                            piece[e][i2] = first ? u[e][i2] : o;
                            piece[e][(HALVES - 1) * NC + i2] = first ? o : u[e][i2];
                        }
                    }
                const int k0 = HALVES == 2 ? (r & 1) * NC : 0;  // this lane's first column in the piece
#pragma unroll
                for (int i2 = 0; i2 < NC; i2++) x[0][i2] = x[1][i2] = 0.f;
#pragma unroll
                for (int kk = 0; kk < DECO_SUB; kk++) {
                    float t[NC];
#pragma unroll
                    for (int c8 = 0; c8 < NC / 8; c8++) {
                        const uint4 w = *reinterpret_cast<const uint4*>(ts + kk * DECO_SUB + k0 + 8 * c8);
                        const uint32_t ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                        for (int h2 = 0; h2 < 4; h2++) {
                            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&ww[h2]));
                            t[8 * c8 + 2 * h2] = f.x, t[8 * c8 + 2 * h2 + 1] = f.y;
                        }
                    }
                    // x[e][i2] = sum_kk piece[e][kk] T_S[kk][k0 + i2], kk in order (as before)
#pragma unroll
                    for (int i2 = 0; i2 < NC; i2++) {
                        x[0][i2] = fmaf(piece[0][kk], t[i2], x[0][i2]);
                        x[1][i2] = fmaf(piece[1][kk], t[i2], x[1][i2]);
                    }
                }
            } else {
#pragma unroll
                for (int e = 0; e < 2; e++)
#pragma unroll
                    for (int i2 = 0; i2 < NC; i2++) x[e][i2] = u[e][i2];
            }
#pragma unroll
            for (int e = 0; e < 2; e++)
#pragma unroll
                for (int i2 = 0; i2 < NC; i2++) {
                    if (i2 < D / 16) acc[i2][e] += x[e][i2];
                    else acc[i2 - D / 16][2 + e] += x[e][i2];
                }
            psum = 0.f;
#pragma unroll
            for (int mb = 0; mb < D / 16; mb++) acc_u[mb][0] = acc_u[mb][1] = acc_u[mb][2] = acc_u[mb][3] = 0.f;
        }
    };

    template <int DD>
    static __device__ __forceinline__ void run_sealed(const KvqDecodeParams& P, int slot, int h, int split, int warp,
                                                      int lane, int ns, uint8_t* smem, float scale_log2,
                                                      const Ctx<D>& cx, WarpState<D>& st) {
        const KvqFmtArgs& fa = P.fmt;
        const int C = fa.i[1], svd = fa.i[3];
        const int kbits = KB, vbits = VB;
        const int ts_bytes = svd ? 2 * DECO_SUB * DECO_SUB : 0;
        const int krb = D * kbits / 8, vrb = D * vbits / 8;
        const int kbytes = ts_bytes + 2 * DECO_TT + DECO_TT * krb;
        const int vbytes = ts_bytes + 2 * DECO_TT + DECO_TT * vrb;
        const int U = P.unit_tokens, tpu = U / DECO_TT;  // the host's unit: fa.i[2] or a divisor of it
        if (U < DECO_TT || U % DECO_TT != 0 || C % U != 0) __trap();
        const int nunits = (ns + U - 1) / U;
        const int lo = split * P.pages_per_split;  // the host splits in units of U tokens
        const int hi = min(nunits, lo + P.pages_per_split);
        const int nu_w = hi > lo + warp ? (hi - lo - warp + WARPS - 1) / WARPS : 0;
        int n_tiles = 0;
        if (nu_w > 0) {
            const int last = lo + warp + (nu_w - 1) * WARPS;
            n_tiles = (nu_w - 1) * tpu + (min(ns - last * U, U) + DECO_TT - 1) / DECO_TT;
        }
        const int32_t* table = P.page_table + (int64_t)slot * P.max_pages;
        auto tok0 = [&](int i) { return (lo + warp + (i / tpu) * WARPS) * U + (i % tpu) * DECO_TT; };
        auto count = [&](int i) { return min(DECO_TT, ns - tok0(i)); };
        auto fill = [&](int i, uint8_t* kb, uint8_t* vb) {
            const int t0 = tok0(i), n = count(i);
            const int64_t page = table[t0 / C];
            const int j = (t0 % C) / DECO_TT;
            const uint8_t* ks = P.k_pages + (page * P.hkv + h) * P.k_block_bytes;
            const uint8_t* vs = P.v_pages + (page * P.hkv + h) * P.v_block_bytes;
            stage<DecoPolicy>(kb, ks, ts_bytes, ts_bytes, lane);
            stage<DecoPolicy>(kb + ts_bytes, ks + ts_bytes + 2 * j * DECO_TT, 2 * DECO_TT, 2 * n, lane);
            stage<DecoPolicy>(kb + ts_bytes + 2 * DECO_TT, ks + ts_bytes + 2 * C + (int64_t)j * DECO_TT * krb,
                              DECO_TT * krb, n * krb, lane);
            stage<DecoPolicy>(vb, vs, ts_bytes, ts_bytes, lane);
            stage<DecoPolicy>(vb + ts_bytes, vs + ts_bytes + 2 * j * DECO_TT, 2 * DECO_TT, 2 * n, lane);
            stage<DecoPolicy>(vb + ts_bytes + 2 * DECO_TT, vs + ts_bytes + 2 * C + (int64_t)j * DECO_TT * vrb,
                              DECO_TT * vrb, n * vrb, lane);
        };
        Body body{cx, tpu, kbytes, svd, kbits, vbits, ts_bytes, ts_bytes, krb, vrb,
                  (float)((1 << (kbits - 1)) - 1), (float)((1 << (vbits - 1)) - 1)};
        body.psum = 0.f;
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++)
            body.acc_u[mb][0] = body.acc_u[mb][1] = body.acc_u[mb][2] = body.acc_u[mb][3] = 0.f;
        warp_run<D, DECO_TT>(n_tiles, count, fill, body, smem + warp * P.stages * (kbytes + vbytes), kbytes, vbytes,
                             P.stages, scale_log2, lane, st);
    }
};

}  // namespace kvq

#define DECO_K(D, KB, VB) \
    using Deco_##D##_##KB##_##VB = kvq::DecoPolicy<D, KB, VB>; \
    KVQ_DECODE_KERNEL(decoquant, decode_k##KB##v##VB, Deco_##D##_##KB##_##VB, D)
#define DECO_V(D, KB) DECO_K(D, KB, 2) DECO_K(D, KB, 4) DECO_K(D, KB, 8)
#define DECO_D(D) DECO_V(D, 2) DECO_V(D, 4) DECO_V(D, 8) KVQ_MERGE_KERNEL(decoquant, D)

// Layout: one block per page, 2 stages, tiles of 64 tokens (the host splits sealed tokens in units of
// U tokens, KernelSpec::tile of the codec).
extern "C" __device__ const int kvq_layout[4] = {1, 2, kvq::DECO_TT, 0};
DECO_D(64)
DECO_D(128)

// ---------------------------------------------------------------------------------------------------
// The encoder: kvq_decoquant_encode_f16_hd{D}, grid = (seal jobs, Hkv), ENC_THREADS = 128 threads, the
// dynamic shared memory stated in kvq_encode_smem (DecoEncode<D>::SMEM). It reads its block straight
// from the f16 window ring (token t of the block is ring row (t0 + t) % win_cap), since a block of
// C = 1024 tokens as f32 would not fit in shared memory, and repeats DecoCodec::encode's arithmetic
// operation for operation (see the comment at the top of this file).
namespace kvq {

__device__ __forceinline__ long long deco_total_key(double x) {  // f64::total_cmp as a signed compare
    const long long b = __double_as_longlong(x);
    return b ^ (long long)((unsigned long long)(b >> 63) >> 1);
}

template <int D>
struct DecoEncode {
    static constexpr int S = DECO_SUB;           // channels per row of the reshaped block
    static constexpr int NW = ENC_THREADS / 32;  // warps
    static constexpr int TT = 4096 / D;          // tokens per Gram tile (16 KiB of f32)
    static constexpr int M = D / 32;             // channels of a token per lane
    static_assert(ENC_THREADS == 128 && S == 16 && D % 32 == 0, "DecoEncode assumes 128 threads, sub 16");
    // Shared memory (bytes): the Jacobi matrix A and its rotations V (f64, S x S, row-major), V with its
    // columns in eigenvalue order, the sorted singular values, the order, T_S as f32, a per-warp
    // reduction slot, one Gram tile of the block as f32 and a per-warp row of codes.
    static constexpr int OFF_A = 0;
    static constexpr int OFF_V = OFF_A + 8 * S * S;
    static constexpr int OFF_VS = OFF_V + 8 * S * S;
    static constexpr int OFF_SIG = OFF_VS + 8 * S * S;
    static constexpr int OFF_ORD = OFF_SIG + 8 * S;
    static constexpr int OFF_TS = OFF_ORD + 4 * S;
    static constexpr int OFF_RED = OFF_TS + 4 * S * S;
    static constexpr int OFF_X = OFF_RED + 16;
    static constexpr int OFF_CODES = OFF_X + 4 * TT * D;
    static constexpr int SMEM = OFF_CODES + NW * D;
    static_assert(OFF_X % 16 == 0 && NW * 4 <= 16, "DecoEncode layout");

    // Gram matrix g = sum over rows r of row_r^T row_r (rows of S channels, in row order), f64; thread
    // `tid` owns entries (i, j) = (tid / S, tid % S) and (i + 8, j), each a sequential sum over rows, as
    // decompose's `g[i * s + j] += row[i] as f64 * row[j] as f64` (products of f32s are exact in f64,
    // so row[i] * row[j] = row[j] * row[i] and the lower triangle equals decompose's mirrored upper one).
    static __device__ void gram(const uint16_t* ring, int t0, int win_cap, int C, uint8_t* sm) {
        double* A = reinterpret_cast<double*>(sm + OFF_A);
        float* xs = reinterpret_cast<float*>(sm + OFF_X);
        const int tid = threadIdx.x, i0 = tid / S, j0 = tid % S;
        double g0 = 0.0, g1 = 0.0;
        for (int tile = 0; tile < C; tile += TT) {
            const int n = min(TT, C - tile);
            for (int e = tid; e < n * D / 8; e += ENC_THREADS) {
                const int tt = (8 * e) / D, c = (8 * e) % D;
                const uint4 w = *reinterpret_cast<const uint4*>(ring + (int64_t)((t0 + tile + tt) % win_cap) * D + c);
                const uint32_t u[4] = {w.x, w.y, w.z, w.w};
                float* dst = xs + tt * D + c;
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u[k]));
                    dst[2 * k] = f.x;
                    dst[2 * k + 1] = f.y;
                }
            }
            __syncthreads();
            const int rows = n * (D / S);
#pragma unroll 4
            for (int r = 0; r < rows; r++) {
                const float* row = xs + r * S;
                const double xj = (double)row[j0];
                g0 = __dadd_rn(g0, __dmul_rn((double)row[i0], xj));
                g1 = __dadd_rn(g1, __dmul_rn((double)row[i0 + 8], xj));
            }
            __syncthreads();
        }
        A[i0 * S + j0] = g0;
        A[(i0 + 8) * S + j0] = g1;
    }

    // sym_eigen (crates/kvq-formats/src/linalg.rs) by one warp: the same cyclic Jacobi sweeps, the same
    // convergence test (every lane sums `off` and `scale` itself, in the CPU's order, so all lanes take
    // the same branches), the same rotation formulas, and the three k-loops with the same expression per
    // element; the first and third loops touch disjoint entries (A's columns p, q and V), so lanes 0-15
    // run the first and lanes 16-31 the third, then lanes 0-15 the second, which reads the first's
    // results. Every f64 operation is an explicit _rn intrinsic: nothing is contracted into an FMA.
    static __device__ void jacobi(uint8_t* sm, int lane) {
        double* A = reinterpret_cast<double*>(sm + OFF_A);
        double* V = reinterpret_cast<double*>(sm + OFF_V);
        for (int sweep = 0; sweep < 64; sweep++) {
            double off = -0.0, scale = -0.0;  // Rust's f64 sum folds from -0.0
            for (int i = 0; i < S; i++)
                for (int j = 0; j < S; j++)
                    if (j != i) off = __dadd_rn(off, __dmul_rn(A[i * S + j], A[i * S + j]));
            for (int i = 0; i < S; i++) scale = __dadd_rn(scale, __dmul_rn(A[i * S + i], A[i * S + i]));
            scale = fmax(scale, 1e-300);
            if (off <= __dmul_rn(1e-30, scale)) break;
            for (int p = 0; p < S; p++)
                for (int q = p + 1; q < S; q++) {
                    const double apq = A[p * S + q];
                    if (fabs(apq) < 1e-300) continue;
                    const double app = A[p * S + p], aqq = A[q * S + q];
                    __syncwarp();  // every lane has read the pivot entries before any is rewritten
                    const double theta = __ddiv_rn(__dsub_rn(aqq, app), __dmul_rn(2.0, apq));
                    const double sgn = isnan(theta) ? theta : copysign(1.0, theta);  // f64::signum
                    double t = __ddiv_rn(sgn, __dadd_rn(fabs(theta), __dsqrt_rn(__dadd_rn(__dmul_rn(theta, theta), 1.0))));
                    if (theta == 0.0) t = 1.0;
                    const double c = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(__dmul_rn(t, t), 1.0)));
                    const double s = __dmul_rn(t, c);
                    if (lane < S) {
                        const int k = lane;
                        const double akp = A[k * S + p], akq = A[k * S + q];
                        A[k * S + p] = __dsub_rn(__dmul_rn(c, akp), __dmul_rn(s, akq));
                        A[k * S + q] = __dadd_rn(__dmul_rn(s, akp), __dmul_rn(c, akq));
                    } else {
                        const int k = lane - S;
                        const double vkp = V[k * S + p], vkq = V[k * S + q];
                        V[k * S + p] = __dsub_rn(__dmul_rn(c, vkp), __dmul_rn(s, vkq));
                        V[k * S + q] = __dadd_rn(__dmul_rn(s, vkp), __dmul_rn(c, vkq));
                    }
                    __syncwarp();
                    if (lane < S) {
                        const int k = lane;
                        const double apk = A[p * S + k], aqk = A[q * S + k];
                        A[p * S + k] = __dsub_rn(__dmul_rn(c, apk), __dmul_rn(s, aqk));
                        A[q * S + k] = __dadd_rn(__dmul_rn(s, apk), __dmul_rn(c, aqk));
                    }
                    __syncwarp();
                }
        }
        // Stable sort by eigenvalue, descending in f64::total_cmp order (ties keep index order): the
        // rank of i is the number of j before it.
        int* ord = reinterpret_cast<int*>(sm + OFF_ORD);
        if (lane < S) {
            const long long ki = deco_total_key(A[lane * S + lane]);
            int rank = 0;
            for (int j = 0; j < S; j++) {
                const long long kj = deco_total_key(A[j * S + j]);
                rank += (kj > ki) || (kj == ki && j < lane);
            }
            ord[rank] = lane;
        }
        __syncwarp();
        double* Vs = reinterpret_cast<double*>(sm + OFF_VS);
        double* sig = reinterpret_cast<double*>(sm + OFF_SIG);
        for (int e = lane; e < S * S; e += 32) Vs[e] = V[(e / S) * S + ord[e % S]];
        if (lane < S) {
            // l.max(0.0).sqrt() as the release build computes it: negatives, -0.0 (and NaN) give +0.0.
            const double l = A[ord[lane] * S + ord[lane]];
            sig[lane] = __dsqrt_rn(l > 0.0 ? l : 0.0);
        }
    }

    // One block (C tokens) of one stream, `bits`, `C`, `svd` from its codec's ints {bits, C, U, svd};
    // `stride` = the pool's block stride (>= the block's bytes).
    static __device__ void encode(const uint16_t* ring, int t0, int win_cap, int bits, int C, int svd,
                                  uint8_t* out, int64_t stride, uint8_t* sm) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int ts_bytes = svd ? 2 * S * S : 0;
        const int tb = D * bits / 8;  // code bytes per token (a multiple of 8: bits in {2, 4, 8})
        const int64_t real = ts_bytes + 2 * (int64_t)C + (int64_t)C * tb;
        bool resc = false;
        float alpha = 1.f;
        const double* Vs = reinterpret_cast<const double*>(sm + OFF_VS);
        const double* sig = reinterpret_cast<const double*>(sm + OFF_SIG);
        if (svd) {
            double* V = reinterpret_cast<double*>(sm + OFF_V);
            for (int e = tid; e < S * S; e += ENC_THREADS) V[e] = (e / S == e % S) ? 1.0 : 0.0;
            gram(ring, t0, win_cap, C, sm);
            __syncthreads();
            if (warp == 0) jacobi(sm, lane);
            __syncthreads();
            // T_S = S V^T: ts[k][j] = (sig[k] * V[j][k]) as f32; its absmax decides the rescale.
            float* tsf = reinterpret_cast<float*>(sm + OFF_TS);
            float* red = reinterpret_cast<float*>(sm + OFF_RED);
            float mx = 0.f;
            for (int e = tid; e < S * S; e += ENC_THREADS) {
                const int k = e / S, j = e % S;
                const float v = __double2float_rn(__dmul_rn(sig[k], Vs[j * S + k]));
                tsf[e] = v;
                mx = fmaxf(mx, fabsf(v));
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            if (lane == 0) red[warp] = mx;
            __syncthreads();
            float m = 0.f;
            for (int w = 0; w < NW; w++) m = fmaxf(m, red[w]);
            resc = m > 30000.f;
            if (resc) alpha = __fdiv_rn(m, 30000.f);
            for (int e = tid; e < S * S; e += ENC_THREADS) {
                const float v = resc ? __fdiv_rn(tsf[e], alpha) : tsf[e];
                reinterpret_cast<uint16_t*>(out)[e] = __half_as_ushort(__float2half_rn(v));
            }
        }
        // Per token (a warp each): T_L's row (svd: tl = (x V / sig) as f32, times alpha; else x), its
        // absmax scale as f16, the codes, packed LSB first in 32-bit words.
        const int k = lane & (S - 1);
        double vcol[S];
        double sigk = 1.0;
        bool skip = false;
        if (svd) {
#pragma unroll
            for (int j = 0; j < S; j++) vcol[j] = Vs[j * S + k];
            sigk = sig[k];
            skip = sigk <= __dmul_rn(1e-7, sig[0]) || sigk == 0.0;
        }
        const float qmax = (float)((1 << (bits - 1)) - 1);
        const int cpw = 32 / bits, words = tb / 4;
        uint8_t* cb = sm + OFF_CODES + warp * D;
        uint16_t* scales = reinterpret_cast<uint16_t*>(out + ts_bytes);
        uint8_t* codes = out + ts_bytes + 2 * (int64_t)C;
        auto load = [&](int t, float* xv) {
            const uint16_t* src = ring + (int64_t)((t0 + t) % win_cap) * D;
#pragma unroll
            for (int m = 0; m < M; m++) xv[m] = __half2float(__ushort_as_half(src[lane + 32 * m]));
        };
        float xv[M];
        if (warp < C) load(warp, xv);
        for (int t = warp; t < C; t += NW) {
            float nx[M];
            if (t + NW < C) load(t + NW, nx);
            float tl[M];
#pragma unroll
            for (int m = 0; m < M; m++) {
                // Element lane + 32 m is channel k of piece (lane + 32 m) / S, whose S values sit on
                // lanes (lane & S) | j at the same m.
                if (svd) {
                    double acc = -0.0;
#pragma unroll
                    for (int j = 0; j < S; j++) {
                        const float xj = __shfl_sync(0xffffffffu, xv[m], (lane & S) | j);
                        acc = __dadd_rn(acc, __dmul_rn((double)xj, vcol[j]));
                    }
                    float v = skip ? 0.f : __double2float_rn(__ddiv_rn(acc, sigk));
                    if (resc) v = __fmul_rn(v, alpha);
                    tl[m] = v;
                } else {
                    tl[m] = xv[m];
                }
            }
            float amax = 0.f;
#pragma unroll
            for (int m = 0; m < M; m++) amax = fmaxf(amax, fabsf(tl[m]));
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            const __half sch = __float2half_rn(fminf(__fdiv_rn(amax, qmax), 65504.f));
            const float sc = __half2float(sch);
#pragma unroll
            for (int m = 0; m < M; m++) {
                float q = 0.f;
                if (sc > 0.f) {
                    q = roundf(__fdiv_rn(tl[m], sc));  // f32::round: half away from zero
                    if (q < -qmax) q = -qmax;          // f32::clamp
                    if (q > qmax) q = qmax;
                }
                cb[lane + 32 * m] = (uint8_t)(uint32_t)__fadd_rn(q, qmax);
            }
            if (lane == 0) scales[t] = __half_as_ushort(sch);
            __syncwarp();
            if (lane < words) {
                uint32_t w = 0;
                for (int i = 0; i < cpw; i++) w |= (uint32_t)cb[lane * cpw + i] << (i * bits);
                *reinterpret_cast<uint32_t*>(codes + (int64_t)t * tb + 4 * lane) = w;
            }
            __syncwarp();
#pragma unroll
            for (int m = 0; m < M; m++) xv[m] = nx[m];
        }
        // The pool's stride padding (none for these sizes), zero like the CPU's fresh block.
        for (int64_t i = real + tid; i < stride; i += ENC_THREADS) out[i] = 0;
    }
};

// grid = (jobs, Hkv), block = ENC_THREADS, dynamic shared memory DecoEncode<D>::SMEM: the key block
// (fmt.i[0..4]) then the value block (fmt.i[4..8]) of job blockIdx.x, head blockIdx.y.
template <int D>
__device__ void deco_encode_kernel(const KvqEncodeParams& P) {
    extern __shared__ __align__(16) uint8_t esm[];
    const int j = blockIdx.x, h = blockIdx.y;
    const int slot = P.job_slot[j], t0 = P.job_tok[j];
    const int64_t page = P.job_page[j], blk = P.job_blk[j];
    for (int s = 0; s < 2; s++) {
        const uint16_t* ring = (s == 0 ? P.k_win : P.v_win) + ((int64_t)slot * P.hkv + h) * P.win_cap * D;
        const int64_t bb = s == 0 ? P.k_block_bytes : P.v_block_bytes;
        uint8_t* out = (s == 0 ? P.k_pages : P.v_pages) + ((page * P.hkv + h) * P.page_blocks + blk) * bb;
        const int bits = s == 0 ? P.fmt.i[0] : P.fmt.i[4], C = s == 0 ? P.fmt.i[1] : P.fmt.i[5];
        const int svd = s == 0 ? P.fmt.i[3] : P.fmt.i[7];
        DecoEncode<D>::encode(ring, t0, P.win_cap, bits, C, svd, out, bb, esm);
        __syncthreads();
    }
}

}  // namespace kvq

KVQ_ENCODE_SMEM(kvq::DecoEncode<64>::SMEM, kvq::DecoEncode<128>::SMEM)
extern "C" __global__ void __launch_bounds__(kvq::ENC_THREADS) KVQ_NAME(decoquant, encode, f16, 64)(const KvqEncodeParams P) {
    KVQ_PDL_ENTER();
    kvq::deco_encode_kernel<64>(P);
}
extern "C" __global__ void __launch_bounds__(kvq::ENC_THREADS) KVQ_NAME(decoquant, encode, f16, 128)(const KvqEncodeParams P) {
    KVQ_PDL_ENTER();
    kvq::deco_encode_kernel<128>(P);
}
