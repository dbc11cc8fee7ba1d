// DecoQuant (crates/kvq-formats/src/formats/decoquant.rs): a block of C tokens of one head is
//   [T_S f16; sub*sub row-major (absent with svd=off)][scale f16; C][codes token-major, D*b bits each]
// and token t's piece p (channels p*sub ..) is x = u T_S with u = scale_t * (code - qmax).
// fmt.i = {k_bits, C, U, svd, v_bits, C, U, svd}, U = tokens per work unit (chosen by the codec). A page is one block; a warp reads its block in
// tiles of 64 tokens (T_S, the tile's scales and codes staged together) and never reconstructs x:
//   keys:   q.x_t = scale_t * (sum_c q'_c code_{t,c} - qmax sum_c q'_c), q' = T_S q per piece, formed
//           once per block and fed to the tensor cores as f16 hi + lo rows, codes as exact integers;
//   values: sum_t p_t x_t = (sum_t (p_t scale_t) code_t - qmax sum_t p_t scale_t) T_S, the codes
//           accumulated on the tensor cores with p*scale as the B operand, T_S applied once per block
//           (a lane owns whole pieces of its channels, or half a piece shared with lane ^ 4).
// Kernels kvq_decoquant_decode_k{KB}v{VB}, KB, VB in {2, 4, 8}, for sub = 16 (the default).
// Work is split in units of U = 256 tokens (or the block, if smaller): a warp folds q once per unit and
// applies T_S once per unit, so short contexts still spread over many warps.
#include "kvq_decode.cuh"
#include "kvq_codes.cuh"

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
    static __device__ __forceinline__ int stage_off(int byte) { return byte; }
    static __device__ __forceinline__ int out_chan(int mb, int row) {
        return (D / 8) * (row & 7) + (D / 16) * (row >> 3) + mb;
    }

    // Per-warp block state and per-tile work (see warp_run).
    struct Body {
        const Ctx<D>& cx;
        const float* qp;  // this lane's head's query (f32, shared memory), null for padding heads
        int tpu, kbytes, svd, kbits, vbits, kts, vts, krb, vrb;
        float kqmax, vqmax;
        uint32_t ahi[D / 16][2], alo[D / 16][2];
        float bias;
        float acc_u[D / 16][4];
        float psum;  // sum_t p_t scale_t of head r (this lane's share)

        // q' = T_S q per piece for this lane's A positions; bias = -qmax * sum_c q'_c.
        __device__ __forceinline__ void fold(const uint8_t* kb) {
            const int q = cx.lane & 3;
            const __half* ts = reinterpret_cast<const __half*>(kb);
            float part = 0.f;
#pragma unroll
            for (int kbi = 0; kbi < D / 16; kbi++) {
                float w[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = 16 * kbi + 2 * q + (e >> 1) + 8 * (e & 1);  // (2q, 2q+8, 2q+1, 2q+9)
                    float v = 0.f;
                    if (qp) {
                        if (svd) {
                            const int p = c / DECO_SUB, k = c % DECO_SUB;
#pragma unroll
                            for (int j = 0; j < DECO_SUB; j++)
                                v = fmaf(__half2float(ts[k * DECO_SUB + j]), qp[p * DECO_SUB + j], v);
                        } else {
                            v = qp[c];
                        }
                    }
                    w[e] = v;
                    part += v;
                }
                split2(w[0], w[1], ahi[kbi][0], alo[kbi][0]);
                split2(w[2], w[3], ahi[kbi][1], alo[kbi][1]);
            }
            part += __shfl_xor_sync(0xffffffffu, part, 1);
            part += __shfl_xor_sync(0xffffffffu, part, 2);
            bias = -kqmax * part;
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
                    key_codes<KB>(codes + (8 * j + r) * krb, kbi, q, kbits, b0, b1);
                    mma(c[j], ahi[kbi][0], alo[kbi][0], ahi[kbi][1], alo[kbi][1], b0, b1);
                }
#pragma unroll
            for (int j = 0; j < DECO_TT / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                    s[j][e] = __half2float(sc[8 * j + 2 * q + e]) * (c[j][e] + c[j][e + 2] + bias);
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
                        v01 = unbias(val_pair<VB>(w0, w1, i));
                        v89 = unbias(val_pair<VB>(w8, w9, i));
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

        // At the block's last tile: u = acc_u - qmax psum, x = u T_S per piece, into acc; reset.
        __device__ __forceinline__ void done(const uint8_t* buf, int i, int n_tiles, float (*acc)[4]) {
            if (i % tpu != tpu - 1 && i != n_tiles - 1) return;
            const int r = cx.lane >> 2, q = cx.lane & 3;
            const __half* ts = reinterpret_cast<const __half*>(buf + kbytes);
            float ps = psum;
            ps += __shfl_xor_sync(0xffffffffu, ps, 1);
            ps += __shfl_xor_sync(0xffffffffu, ps, 2);
            const float pse[2] = {__shfl_sync(0xffffffffu, ps, 8 * q), __shfl_sync(0xffffffffu, ps, 8 * q + 4)};
            constexpr int NC = D / 8;  // channels of this lane: NC * r + i
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float u[NC];
#pragma unroll
                for (int i2 = 0; i2 < NC; i2++) {
                    const float a = i2 < D / 16 ? acc_u[i2][e] : acc_u[i2 - D / 16][2 + e];
                    u[i2] = a - vqmax * pse[e];
                }
                float x[NC];
                if (svd) {
                    // A piece is DECO_SUB channels: NC = 16 (D = 128) holds one, NC = 8 (D = 64) half of
                    // one, the other half on lane ^ 4 (r ^ 1).
                    constexpr int HALVES = DECO_SUB / NC;  // 1 or 2
                    float piece[DECO_SUB];
#pragma unroll
                    for (int i2 = 0; i2 < NC; i2++) {
                        const float o = HALVES == 2 ? __shfl_xor_sync(0xffffffffu, u[i2], 4) : 0.f;
                        if (HALVES == 1) {
                            piece[i2] = u[i2];
                        } else {
                            const bool first = (r & 1) == 0;
                            piece[(first ? 0 : NC) + i2] = u[i2];
                            piece[(first ? NC : 0) + i2] = o;
                        }
                    }
                    const int k0 = HALVES == 2 ? (r & 1) * NC : 0;  // this lane's first column in the piece
#pragma unroll
                    for (int i2 = 0; i2 < NC; i2++) {
                        float v = 0.f;
#pragma unroll
                        for (int kk = 0; kk < DECO_SUB; kk++)
                            v = fmaf(piece[kk], __half2float(ts[kk * DECO_SUB + k0 + i2]), v);
                        x[i2] = v;
                    }
                } else {
#pragma unroll
                    for (int i2 = 0; i2 < NC; i2++) x[i2] = u[i2];
                }
#pragma unroll
                for (int i2 = 0; i2 < NC; i2++) {
                    if (i2 < D / 16) acc[i2][e] += x[i2];
                    else acc[i2 - D / 16][2 + e] += x[i2];
                }
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
        __shared__ float q_sh[MAX_G][D];
        const KvqFmtArgs& fa = P.fmt;
        const int C = fa.i[1], svd = fa.i[3];
        const int kbits = KB, vbits = VB;
        const int ts_bytes = svd ? 2 * DECO_SUB * DECO_SUB : 0;
        const int krb = D * kbits / 8, vrb = D * vbits / 8;
        const int kbytes = ts_bytes + 2 * DECO_TT + DECO_TT * krb;
        const int vbytes = ts_bytes + 2 * DECO_TT + DECO_TT * vrb;
        const int U = fa.i[2], tpu = U / DECO_TT;
        const int nunits = (ns + U - 1) / U;
        const int lo = split * P.pages_per_split;  // the host splits in units of U tokens
        const int hi = min(nunits, lo + P.pages_per_split);
        const int nu_w = hi > lo + warp ? (hi - lo - warp + WARPS - 1) / WARPS : 0;
        int n_tiles = 0;
        if (nu_w > 0) {
            const int last = lo + warp + (nu_w - 1) * WARPS;
            n_tiles = (nu_w - 1) * tpu + (min(ns - last * U, U) + DECO_TT - 1) / DECO_TT;
        }
        const int G = P.group, b = blockIdx.z;
        for (int i = threadIdx.x; i < G * D; i += THREADS)
            q_sh[i / D][i % D] = P.q[((int64_t)b * P.hkv * G + (int64_t)h * G) * D + i];
        __syncthreads();
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
        const int r = lane >> 2;
        Body body{cx, r < G ? q_sh[r] : nullptr, tpu, kbytes, svd, kbits, vbits, ts_bytes, ts_bytes, krb, vrb,
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
extern "C" __device__ const int kvq_layout[3] = {1, 2, kvq::DECO_TT};
DECO_D(64)
DECO_D(128)
