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
// Decode: per chunk of a split, the K books go to shared memory and each warp decodes its 32-token
// tiles (blocks copied to shared memory by cp.async, the next one in flight) into f16 rows in shared memory (lane = token; a codeword is four 16-byte loads), keys rotated to
// their positions (the tile's base angle in f64 once per pair, the in-tile step from a per-CTA table),
// and runs the fp16 path's tensor-core product for the scores, which wait in shared memory; then the V
// books replace the K books and the warps run the online softmax and P V over decoded values. Nothing
// decoded leaves shared memory. The decode is per-token work (depth x D/32 codeword loads), not bytes:
// RVQ's cache is small, its kernel is not bandwidth-bound.
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
// rotated by base[i] (cos, sin of the tile's first position) times delta[i][t] (of the in-tile step;
// lane-contiguous, so conflict-free). Channels come from the layout, not the table's map: values in
// contiguous groups (channel 32 g + j: four 16-byte stores), keys in strided groups (HF channel
// g + j D/32, its pair partner 16 positions on: one 4-byte store per pair in the interleaved style).
// Books staged in shared memory (`swizzled`) hold codeword w's 16-byte chunk q at chunk q ^ ((w >> 1) & 3)
// (RvqPolicy::books_in): chunk q of a 64-byte row would otherwise start at bank 4q + 16 (w & 1) for every
// w, so the 8 lanes of a quarter-warp phase, reading 8 random codewords' chunk q, met in 2 bank groups
// (4-way conflicts or worse); with the swizzle w's low 3 bits pick one of 8. Books read from global memory
// keep the table's plain layout.
template <int D, bool KEY>
__device__ __forceinline__ void rvq_decode_row(const uint8_t* blk, int t, const RvqTab& tb, int depth, int cbits,
                                               int codes, const float2* base, const float2* delta, uint8_t* rows,
                                               bool swizzled) {
    constexpr int NG = D / RVQ_G;
    const int cpt = NG * depth;  // codes per token
    const float s = f16_at(blk + 2 * t);
    const uint8_t* cw = blk + 2 * 32;
#pragma unroll 1
    for (int g = 0; g < NG; g++) {
        float acc[RVQ_G];
#pragma unroll
        for (int j = 0; j < RVQ_G; j++) acc[j] = 0.f;
#pragma unroll 4
        for (int st = 0; st < depth; st++) {  // unrolled: several codewords' loads in flight
            const int ci = t * cpt + g * depth + st;
            const int code = cbits == 8 ? (int)cw[ci] : (int)bits_at(cw, ci * cbits, cbits);
            const int wi = st * codes + code;
            const uint4* w = reinterpret_cast<const uint4*>(tb.books16 + (int64_t)wi * RVQ_G);
            const int sw = swizzled ? (wi >> 1) & 3 : 0;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const uint4 u = w[q ^ sw];  // shared memory (swizzled), or global (books too large to stage)
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
                const float2 b = base[i], dl = delta[i * 32 + t];
                const float c = b.x * dl.x - b.y * dl.y, sn = b.y * dl.x + b.x * dl.y;
                const float xa = acc[j], xb = acc[j + RVQ_G / 2];
                acc[j] = xa * c - xb * sn;
                acc[j + RVQ_G / 2] = xa * sn + xb * c;
            }
        }
        if constexpr (KEY) {
#pragma unroll
            for (int j = 0; j < RVQ_G / 2; j++) {
                const int i = g + j * NG;  // HF channel i and i + D/2
                if (tb.style == 0) {       // model channels 2i, 2i + 1
                    *reinterpret_cast<uint32_t*>(rows + swz<D>(t, (2 * i) >> 3) + 2 * ((2 * i) & 7)) =
                        pack2(acc[j], acc[j + RVQ_G / 2]);
                } else {  // model channels i, i + D/2
                    const int i2 = i + D / 2;
                    *reinterpret_cast<__half*>(rows + swz<D>(t, i >> 3) + 2 * (i & 7)) = __float2half_rn(acc[j]);
                    *reinterpret_cast<__half*>(rows + swz<D>(t, i2 >> 3) + 2 * (i2 & 7)) =
                        __float2half_rn(acc[j + RVQ_G / 2]);
                }
            }
        } else {
#pragma unroll
            for (int q = 0; q < 4; q++) {
                uint4 u;
                u.x = pack2(acc[8 * q], acc[8 * q + 1]);
                u.y = pack2(acc[8 * q + 2], acc[8 * q + 3]);
                u.z = pack2(acc[8 * q + 4], acc[8 * q + 5]);
                u.w = pack2(acc[8 * q + 6], acc[8 * q + 7]);
                *reinterpret_cast<uint4*>(rows + swz<D>(t, 4 * g + q)) = u;
            }
        }
    }
}

template <int D>
struct RvqPolicy {
    static constexpr int BT = 32;
    static constexpr int PAGE_BLOCKS = 1;
    static constexpr int STAGES = 2;  // two block buffers per warp: the next tile's copy is in flight
    static constexpr int MIN_CTAS = 1;
    static constexpr bool CUSTOM_SEALED = true;
    static constexpr bool Q_PAIR8 = false;
    // Tokens per K/V phase: the chunk's raw scores wait in shared memory ([CHUNK][MAX_G] f32) while
    // the V books replace the K books.
    static constexpr int CHUNK = 4 * D;
    // Dynamic shared memory per warp and head channel: a tile's f16 rows (32 x 2 bytes), its base
    // angles (D/2 x 8 bytes) and a quarter of the chunk's scores (CHUNK x MAX_G x 4 / WARPS / D).
    static constexpr int ROWS_PER_CH = 2 * BT + 4 + CHUNK * MAX_G * 4 / WARPS / D;
    static __device__ __forceinline__ int stage_off(int byte) { return byte; }
    static __device__ __forceinline__ int out_chan(int mb, int row) { return 16 * mb + row; }

    // Copies one stream's f16 books into shared memory (whole CTA), or leaves them in global memory
    // when they do not fit the launch's dynamic shared memory (large codebooks): returns the pointer.
    static __device__ __forceinline__ const __half* books_in(const RvqTab& t, int depth, int codes, uint8_t* dst,
                                                             int room) {
        const int bytes = depth * codes * RVQ_G * 2;
        if (bytes > room) return t.books16;
        const uint8_t* src = reinterpret_cast<const uint8_t*>(t.books16);
        // Codeword w's chunk q lands at chunk q ^ ((w >> 1) & 3) of its row (rvq_decode_row's swizzle).
        for (int o = threadIdx.x * 16; o < bytes; o += THREADS * 16) {
            const int w = o >> 6, q = (o >> 4) & 3;
            cp_async16(dst + (w << 6) + ((q ^ ((w >> 1) & 3)) << 4), src + o, true);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        return reinterpret_cast<const __half*>(dst);
    }

    // Per split, in chunks of CHUNK tokens: K books to shared memory, every warp decodes its tiles'
    // keys (rotated) into f16 rows and writes the raw scores S = Q K^T to the chunk buffer; then V books
    // replace them and the warps run the online softmax over the buffered scores and P V on decoded
    // values. Each codeword load hits shared memory, not L1/L2 (run 8: gathering the books from L2 per
    // token made attention 8.5x slower than fp16 at B=8, 128k).
    template <int DD>
    static __device__ __forceinline__ void run_sealed(const KvqDecodeParams& P, int slot, int h, int split, int warp,
                                                      int lane, int ns, uint8_t* smem, float scale_log2,
                                                      const Ctx<D>& cx, WarpState<D>& st) {
        __shared__ float2 delta_sh[(D / 2) * BT];  // [i][t]: (cos, sin) of t * inv_freq[i], t < 32
        const KvqFmtArgs& fa = P.fmt;
        const RvqTab kt = rvq_tab<D>(fa.p[0], fa.i[0], fa.i[2]);
        const RvqTab vt = rvq_tab<D>(fa.p[1], fa.i[4], fa.i[6]);
        const int32_t* table = P.page_table + (int64_t)slot * P.max_pages;
        for (int idx = threadIdx.x; idx < BT * (D / 2); idx += THREADS) {
            const int i = idx / BT, t = idx % BT;
            float sn, c;
            sincosf((float)t * kt.inv_freq[i], &sn, &c);
            delta_sh[idx] = make_float2(c, sn);
        }
        uint32_t dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        const int kbb = (int)P.k_block_bytes, vbb = (int)P.v_block_bytes;
        // Dynamic shared memory: [block buffers: WARPS x stages x (kbb + vbb)][rows + base: WARPS x
        // WARP_BYTES][scores][books].
        const int stage_area = WARPS * P.stages * (kbb + vbb);
        constexpr int ROWS = 2 * BT * D, BASE = 4 * D, WARP_BYTES = ROWS + BASE;
        uint8_t* rows = smem + stage_area + warp * WARP_BYTES;
        float2* base = reinterpret_cast<float2*>(rows + ROWS);
        float* sc = reinterpret_cast<float*>(smem + stage_area + WARPS * WARP_BYTES);  // [CHUNK][MAX_G]
        uint8_t* books = smem + stage_area + WARPS * ROWS_PER_CH * D;
        const int room = (int)dyn - stage_area - WARPS * ROWS_PER_CH * D;
        // This warp's block buffers: two when they fit (the next tile's copy in flight), else one.
        uint8_t* buf = smem + warp * P.stages * (kbb + vbb);
        const int bb = max(kbb, vbb);
        const int nbuf = 2 * bb <= P.stages * (kbb + vbb) ? 2 : 1;
        // Copies page pg's block of one pool into buffer `slot` (one commit group per call).
        auto issue = [&](const uint8_t* pool, int bytes, int pg, int slot) {
            const uint8_t* src = pool + ((int64_t)table[pg] * P.hkv + h) * bytes;
            for (int o = lane * 16; o < bytes; o += 32 * 16) cp_async16(buf + slot * bb + o, src + o, true);
            cp_async_commit();
        };
        // Waits for tile i (page pg) of one pool, its successor's copy issued first when two buffers
        // take turns; returns the tile's block. `done` issues the successor after the tile when there
        // is one buffer.
        auto acquire = [&](const uint8_t* pool, int bytes, int pg, int i, int c1) -> const uint8_t* {
            const int cur = nbuf == 2 ? i & 1 : 0;
            if (nbuf == 2 && pg + WARPS < c1) {
                issue(pool, bytes, pg + WARPS, cur ^ 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncwarp();
            return buf + cur * bb;
        };
        auto done = [&](const uint8_t* pool, int bytes, int pg, int c1) {
            if (nbuf == 1 && pg + WARPS < c1) issue(pool, bytes, pg + WARPS, 0);
        };
        const int npages = (ns + BT - 1) / BT;
        const int lo = split * P.pages_per_split;
        const int hi = min(npages, lo + P.pages_per_split);
        const int r = lane >> 2, q4 = lane & 3;
        constexpr int CP = CHUNK / BT;  // pages per chunk
#pragma unroll 1
        for (int c0 = lo; c0 < hi; c0 += CP) {
            const int c1 = min(hi, c0 + CP);
            __syncthreads();  // the previous chunk's V books are no longer read
            const __half* kb16 = books_in(kt, fa.i[0], fa.i[2], books, room);
            if (c0 + warp < c1) issue(P.k_pages, kbb, c0 + warp, 0);
#pragma unroll 1
            for (int pg = c0 + warp, i = 0; pg < c1; pg += WARPS, i++) {
                const uint8_t* blk = acquire(P.k_pages, kbb, pg, i, c1);
                const double p0 = (double)pg * BT;
                for (int i = lane; i < D / 2; i += 32) {
                    double sd, cd;
                    sincos(p0 * (double)kt.inv_freq[i], &sd, &cd);
                    base[i] = make_float2((float)cd, (float)sd);
                }
                __syncwarp();
                RvqTab t = kt;
                t.books16 = kb16;
                rvq_decode_row<D, true>(blk, lane, t, fa.i[0], fa.i[1], fa.i[2], base, delta_sh, rows,
                                        kb16 != kt.books16);
                __syncwarp();
                float s[BT / 8][2];
                scores_f16rows<D, BT>(rows, cx, s);
                float* out = sc + (pg - c0) * BT * MAX_G;
#pragma unroll
                for (int j = 0; j < BT / 8; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) out[(8 * j + 2 * q4 + e) * MAX_G + r] = s[j][e];
                __syncwarp();  // rows, base and this buffer are rewritten by later tiles
                done(P.k_pages, kbb, pg, c1);
            }
            __syncthreads();  // scores complete, K books no longer read
            const __half* vb16 = books_in(vt, fa.i[4], fa.i[6], books, room);
            if (c0 + warp < c1) issue(P.v_pages, vbb, c0 + warp, 0);
#pragma unroll 1
            for (int pg = c0 + warp, i = 0; pg < c1; pg += WARPS, i++) {
                const uint8_t* blk = acquire(P.v_pages, vbb, pg, i, c1);
                const float* in = sc + (pg - c0) * BT * MAX_G;
                float s[BT / 8][2];
#pragma unroll
                for (int j = 0; j < BT / 8; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) s[j][e] = in[(8 * j + 2 * q4 + e) * MAX_G + r];
                uint32_t pa[BT / 16][2];
                float corr0, corr1;
                softmax_tile<D, BT>(s, min(BT, ns - pg * BT), scale_log2, q4, st, pa, corr0, corr1);
                RvqTab t = vt;
                t.books16 = vb16;
                rvq_decode_row<D, false>(blk, lane, t, fa.i[4], fa.i[5], fa.i[6], nullptr, nullptr, rows,
                                         vb16 != vt.books16);
                __syncwarp();
                pv_f16rows<D, BT>(rows, cx, pa, st.acc);
                __syncwarp();
                done(P.v_pages, vbb, pg, c1);
            }
        }
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
