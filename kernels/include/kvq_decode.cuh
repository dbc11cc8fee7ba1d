// The decode-attention skeleton every format shares: split over the sequence (flash-decoding), GQA on
// tensor cores (the G <= 8 query heads of one KV head are the rows of an m16n8k16 MMA, so one pass over
// a KV head serves all of them), online softmax per warp, the f16 window, the merge of splits.
//
// Work split: grid = (n_splits + 1, Hkv, B). A CTA of WARPS warps owns `pages_per_split` pages of one
// (sequence, KV head); its warps take pages round-robin and run independently (own cp.async pipeline of
// F::STAGES stages, own softmax state), meeting only once at the end to merge. No CTA barrier per tile.
//
// A format is a policy struct `F` (see formats/*.cu) with:
//   MIN_CTAS                                   CTAs per SM the registers must allow (launch bounds)
//   CUSTOM_SEALED                              true: the policy runs its sealed pages itself (run_sealed)
//   Q_PAIR8                                    true: on sealed pages cx.hi/lo hold channel pairs
//                                              {c, c+8} | {c+1, c+9} (c = 16 kb + 2q) instead of
//                                              {c, c+1} | {c+8, c+9}: the MMA's k order of packed codes
//   BT, PAGE_BLOCKS, STAGES                   tokens per block, blocks per page (= one warp tile), most
//                                              stages (the host may run fewer when pages are large)
//   stage_off(byte)                            where staged byte `byte` of a page goes in shared memory
//   scores(ks, cx, s)                          S = Q K^T for the page's tokens (C fragments, see below)
//   pv(vs, cx, pa, acc)                        acc += P V for the page's tokens
//   VALUE_ZEROS                                true (run_pages policies): pv_z(vs, cx, pa, acc, zacc)
//                                              instead of pv, with the rows' zero terms sum_t z P kept
//                                              apart in zacc (one C fragment, the same for every m-block);
//                                              after the warp's last page acc = VALUE_UP acc + zacc
//   out_chan(mb, row)                          the channel of row `row` of V^T m-block `mb`
// reading the page's raw bytes from shared memory, so nothing dequantized ever touches global memory.
//
// Fragment conventions (PTX m16n8k16, lane l, r = l / 4, q = l % 4).
// Scores S = Q K^T: A rows 0..7 are the query heads' f16 "hi" parts, rows 8..15 the "lo" residuals of
// the same heads (q = hi + lo to ~2^-22), so one MMA gives c0 + c2 = S exactly as f32 would.
// Values O^T = V^T P^T: A = V^T (16 channels x 16 tokens), B = P^T (16 tokens x 8 heads), so all
// 8 columns are heads and no MMA row is padding. A thread holds
//   Q:   x[kb][0..1] = q[r][16kb + 2q + {0,1}],  x[kb][2..3] = q[r][16kb + 2q + 8 + {0,1}]
//   S:   s[j][e]     = S[r][8j + 2q + e]            (token 8j + 2q + e of the page)
//   P:   pa[kk][0]   = half2 P[r][16kk + 2q + {0,1}],  pa[kk][1] = half2 P[r][16kk + 2q + 8 + {0,1}]
//        (exactly the B fragment of P^T for k-step kk)
//   acc: acc[mb][e]  = O[head 2q + (e & 1)][out_chan(mb, r + 8 * (e >> 1))]
// (a policy may permute channels: the MMA's k order in S and the row order of V^T are free).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>
#include "kvq_params.cuh"
#include "kvq_pdl.cuh"

namespace kvq {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int MAX_G = 8;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float f16_at(const uint8_t* p) {
    return half_bits_to_float(*reinterpret_cast<const uint16_t*>(p));
}
__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ uint32_t pack2(float a, float b) { return h2_bits(__floats2half2_rn(a, b)); }

// `n` (<= 16) bits at bit `pos` of a 4-byte aligned little-endian bit stream.
__device__ __forceinline__ uint32_t bits_at(const uint8_t* p, int pos, int n) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p);
    const int i = pos >> 5, o = pos & 31;
    uint32_t v = w[i] >> o;
    if (o + n > 32) v |= w[i + 1] << (32 - o);
    return v & ((1u << n) - 1u);
}

// C += A B on tensor cores (m16n8k16, f16 inputs, f32 accumulate).
__device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const uint8_t* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const uint8_t* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const uint8_t* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// 16-byte asynchronous global -> shared copy (L2 only: the cache is read once); `valid` false writes
// zeros instead (tokens past the end of a page), so no uninitialized bytes are ever decoded.
__device__ __forceinline__ void cp_async16(uint8_t* dst, const uint8_t* src, bool valid) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// Waits until at most `n` (0..3) groups are pending.
__device__ __forceinline__ void cp_async_wait_n(int n) {
    switch (n) {
        case 0: cp_async_wait<0>(); break;
        case 1: cp_async_wait<1>(); break;
        case 2: cp_async_wait<2>(); break;
        default: cp_async_wait<3>(); break;
    }
}

// What a policy sees of the query: the thread's f32 channels (for formats that fold per-block scales
// into it) and the same split into f16 hi + lo parts (two MMAs give ~f32 accuracy on exact f16 keys).
template <int D>
struct Ctx {
    float x[D / 16][4];
    uint32_t hi[D / 16][2], lo[D / 16][2];
    int lane;
    const KvqFmtArgs* fa;
    int64_t k_block_bytes, v_block_bytes;
};

// Splits f32 values into hi + lo f16 pairs: a = {x0, x1}.
__device__ __forceinline__ void split2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 hf = __half22float2(h);
    hi = h2_bits(h);
    lo = pack2(x0 - hf.x, x1 - hf.y);
}

// Exact f16 keys (fp16 pages, the window): S += Q K^T with K B-fragments loaded by ldmatrix from rows
// of D halves stored with 16-byte chunks XOR-swizzled by (token & 7) (conflict-free).
template <int D>
__device__ __forceinline__ int swz(int tok, int chunk) {
    return tok * (2 * D) + ((chunk ^ (tok & 7)) << 4);
}
template <int D, int TT>
__device__ __forceinline__ void scores_f16rows(const uint8_t* ks, const Ctx<D>& cx, float (*s)[2]) {
    const int l = cx.lane;
    float c[TT / 8][4];  // one MMA chain per token block of 8
#pragma unroll
    for (int j = 0; j < TT / 8; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
    for (int p = 0; p < D / 32; p++) {
#pragma unroll
        for (int j = 0; j < TT / 8; j++) {
            uint32_t b[4];
            ldmatrix_x4(b, ks + swz<D>(8 * j + (l & 7), 4 * p + (l >> 3)));
            mma(c[j], cx.hi[2 * p][0], cx.lo[2 * p][0], cx.hi[2 * p][1], cx.lo[2 * p][1], b[0], b[1]);
            mma(c[j], cx.hi[2 * p + 1][0], cx.lo[2 * p + 1][0], cx.hi[2 * p + 1][1], cx.lo[2 * p + 1][1], b[2], b[3]);
        }
    }
#pragma unroll
    for (int j = 0; j < TT / 8; j++) {
        s[j][0] = c[j][0] + c[j][2];
        s[j][1] = c[j][1] + c[j][3];
    }
}
template <int D, int TT>
__device__ __forceinline__ void pv_f16rows(const uint8_t* vs, const Ctx<D>& cx, const uint32_t (*pa)[2],
                                           float (*acc)[4]) {
    const int l = cx.lane, m = l >> 3;
#pragma unroll
    for (int kk = 0; kk < TT / 16; kk++) {
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++) {
            uint32_t a[4];  // V^T: (ch 0-7, tok 0-7), (ch 8-15, tok 0-7), (ch 0-7, tok 8-15), (ch 8-15, tok 8-15)
            ldmatrix_x4_trans(a, vs + swz<D>(16 * kk + 8 * (m >> 1) + (l & 7), 2 * mb + (m & 1)));
            mma(acc[mb], a[0], a[1], a[2], a[3], pa[kk][0], pa[kk][1]);
        }
    }
}

// The f16 window (and the fp16 format) as a policy: one token per block, TT tokens per tile.
template <int D, int TT, int NSTAGES>
struct F16Rows {
    static constexpr int BT = 1;
    static constexpr int PAGE_BLOCKS = TT;
    static constexpr int STAGES = NSTAGES;
    static constexpr int MIN_CTAS = 1;
    static constexpr bool CUSTOM_SEALED = false;
    static constexpr bool Q_PAIR8 = false;
    static constexpr bool VALUE_ZEROS = false;
    static __device__ __forceinline__ int out_chan(int mb, int row) { return 16 * mb + row; }
    static __device__ __forceinline__ int stage_off(int byte) {
        const int tok = byte / (2 * D), chunk = (byte % (2 * D)) >> 4;
        return swz<D>(tok, chunk);
    }
    static __device__ __forceinline__ void scores(const uint8_t* ks, const Ctx<D>& cx, float (*s)[2]) {
        scores_f16rows<D, TT>(ks, cx, s);
    }
    static __device__ __forceinline__ void pv(const uint8_t* vs, const Ctx<D>& cx, const uint32_t (*pa)[2],
                                              float (*acc)[4]) {
        pv_f16rows<D, TT>(vs, cx, pa, acc);
    }
};

// One warp's online-softmax state: m (log2 units, identical over a quad) and l (partial per thread,
// summed over the quad at the end) of head r = lane / 4; acc in the O^T layout above.
template <int D>
struct WarpState {
    float m, l;
    float acc[D / 16][4];
};

// Copies `bytes` (a multiple of 16) from `src` into the staging buffer at the policy's positions;
// bytes at or past `valid` become zeros.
template <class F>
__device__ __forceinline__ void stage(uint8_t* dst, const uint8_t* src, int bytes, int valid, int lane) {
    for (int o = lane * 16; o < bytes; o += 32 * 16) cp_async16(dst + F::stage_off(o), src + o, o < valid);
}

// Online-softmax update of one tile: scales and masks the scores (tokens >= n), updates m and l, packs
// P^T B-fragments into `pa` and rescales acc. Returns this lane's correction (head r); corr0/corr1 are
// those of the acc columns (heads 2q, 2q+1), for policies that keep more accumulators.
template <int D, int TT>
__device__ __forceinline__ float softmax_tile(float (*s)[2], int n, float scale_log2, int q4, WarpState<D>& st,
                                              uint32_t (*pa)[2], float& corr0, float& corr1) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < TT / 8; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int t = 8 * j + 2 * q4 + e;
            s[j][e] = t < n ? s[j][e] * scale_log2 : -INFINITY;
            mx = fmaxf(mx, s[j][e]);
        }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(st.m, mx);     // finite: every tile holds >= 1 valid token
    const float corr = exp2f(st.m - m_new);  // 0 when st.m = -inf
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < TT / 8; j += 2) {
        const float p0 = exp2f(s[j][0] - m_new), p1 = exp2f(s[j][1] - m_new);
        const float p2 = exp2f(s[j + 1][0] - m_new), p3 = exp2f(s[j + 1][1] - m_new);
        sum += (p0 + p1) + (p2 + p3);
        pa[j / 2][0] = pack2(p0, p1);
        pa[j / 2][1] = pack2(p2, p3);
    }
    st.l = st.l * corr + sum;
    st.m = m_new;
    // acc columns are heads 2q and 2q+1: their corrections live on lanes 8q and 8q + 4.
    corr0 = __shfl_sync(0xffffffffu, corr, 8 * q4);
    corr1 = __shfl_sync(0xffffffffu, corr, 8 * q4 + 4);
#pragma unroll
    for (int mb = 0; mb < D / 16; mb++) {
        st.acc[mb][0] *= corr0;
        st.acc[mb][1] *= corr1;
        st.acc[mb][2] *= corr0;
        st.acc[mb][3] *= corr1;
    }
    return corr;
}

// A policy's per-tile work seen by warp_run: scores, extra rescaling, values, end-of-tile hook.
template <int D, class F>
struct PagedBody {
    const Ctx<D>& cx;
    __device__ __forceinline__ void scores(const uint8_t* kb, int, float (*s)[2]) const { F::scores(kb, cx, s); }
    __device__ __forceinline__ void rescale(float, float, float) const {}
    __device__ __forceinline__ void pv(const uint8_t* vb, int, const uint32_t (*pa)[2], float (*acc)[4]) const {
        F::pv(vb, cx, pa, acc);
    }
    __device__ __forceinline__ void done(const uint8_t*, int, int, float (*)[4]) const {}
};

// PagedBody for VALUE_ZEROS policies: the zero terms' accumulator zacc is rescaled with acc and folded
// into every m-block of acc (scaled by F::VALUE_UP) after the warp's last tile (no rescale follows).
template <int D, class F>
struct ZeroAccBody {
    const Ctx<D>& cx;
    float zacc[4] = {0.f, 0.f, 0.f, 0.f};
    __device__ __forceinline__ void scores(const uint8_t* kb, int, float (*s)[2]) const { F::scores(kb, cx, s); }
    __device__ __forceinline__ void rescale(float, float corr0, float corr1) {
        zacc[0] *= corr0;
        zacc[1] *= corr1;
        zacc[2] *= corr0;
        zacc[3] *= corr1;
    }
    __device__ __forceinline__ void pv(const uint8_t* vb, int, const uint32_t (*pa)[2], float (*acc)[4]) {
        F::pv_z(vb, cx, pa, acc, zacc);
    }
    __device__ __forceinline__ void done(const uint8_t*, int i, int n_tiles, float (*acc)[4]) const {
        if (i != n_tiles - 1) return;
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mb][e] = fmaf(F::VALUE_UP, acc[mb][e], zacc[e]);
    }
};

struct NoPre {
    __device__ __forceinline__ void operator()() const {}
};

// One warp runs its tiles: `count(i)` is tile i's valid token count, `fill(i, kbuf, vbuf)` issues the
// cp.async copies of its K and V bytes into a stage (tokens past the count zero-filled). `pre()` runs
// once after the first stages are issued (per-CTA setup that overlaps their loads; every warp calls it,
// so it may hold a CTA barrier).
template <int D, int TT, class CountFn, class FillFn, class Body, class Pre = NoPre>
__device__ __forceinline__ void warp_run(int n_tiles, const CountFn& count, const FillFn& fill, Body& body,
                                         uint8_t* wsm, int kbytes, int vbytes, int S, float scale_log2, int lane,
                                         WarpState<D>& st, const Pre& pre = Pre{}) {
    const int q4 = lane & 3;
    const int stage_bytes = kbytes + vbytes;
    auto load = [&](int i) {
        uint8_t* buf = wsm + (i % S) * stage_bytes;
        fill(i, buf, buf + kbytes);
    };
#pragma unroll 1
    for (int i = 0; i < S - 1; i++) {
        if (i < n_tiles) load(i);
        cp_async_commit();
    }
    pre();
#pragma unroll 1
    for (int i = 0; i < n_tiles; i++) {
        if (i + S - 1 < n_tiles) load(i + S - 1);
        cp_async_commit();
        cp_async_wait_n(S - 1);
        __syncwarp();
        const int n = count(i);
        const uint8_t* buf = wsm + (i % S) * stage_bytes;
        float s[TT / 8][2];
        body.scores(buf, i, s);
        uint32_t pa[TT / 16][2];
        float corr0, corr1;
        const float corr = softmax_tile<D, TT>(s, n, scale_log2, q4, st, pa, corr0, corr1);
        body.rescale(corr, corr0, corr1);
        body.pv(buf + kbytes, i, pa, st.acc);
        body.done(buf, i, n_tiles, st.acc);
        __syncwarp();  // every lane is done with this stage before it is refilled
    }
    cp_async_wait<0>();
}

// The sealed pages of one CTA, for policies whose pages are single tiles (fp16, KIVI): warps take pages
// round-robin; `ns` tokens of the row are sealed and visible.
template <int D, class F>
__device__ __forceinline__ void run_pages(const KvqDecodeParams& P, int slot, int h, int split, int warp, int lane,
                                          int ns, uint8_t* smem, float scale_log2, const Ctx<D>& cx,
                                          WarpState<D>& st) {
    constexpr int TT = F::PAGE_BLOCKS * F::BT;
    const int kbb = (int)P.k_block_bytes, vbb = (int)P.v_block_bytes;
    const int kbytes = F::PAGE_BLOCKS * kbb, vbytes = F::PAGE_BLOCKS * vbb;
    const int npages = (ns + TT - 1) / TT;
    const int lo = split * P.pages_per_split;
    const int hi = min(npages, lo + P.pages_per_split);
    const int n_tiles = hi > lo + warp ? (hi - lo - warp + WARPS - 1) / WARPS : 0;
    const int32_t* table = P.page_table + (int64_t)slot * P.max_pages;
    auto count = [&](int i) { return min(TT, ns - (lo + warp + i * WARPS) * TT); };
    auto fill = [&](int i, uint8_t* kb, uint8_t* vb) {
        const int64_t page = table[lo + warp + i * WARPS];
        const int nblk = (count(i) + F::BT - 1) / F::BT;
        stage<F>(kb, P.k_pages + (page * P.hkv + h) * kbytes, kbytes, nblk * kbb, lane);
        stage<F>(vb, P.v_pages + (page * P.hkv + h) * vbytes, vbytes, nblk * vbb, lane);
    };
    uint8_t* wsm = smem + warp * P.stages * (kbytes + vbytes);
    if constexpr (F::VALUE_ZEROS) {
        ZeroAccBody<D, F> body{cx};
        warp_run<D, TT>(n_tiles, count, fill, body, wsm, kbytes, vbytes, P.stages, scale_log2, lane, st);
    } else {
        PagedBody<D, F> body{cx};
        warp_run<D, TT>(n_tiles, count, fill, body, wsm, kbytes, vbytes, P.stages, scale_log2, lane, st);
    }
}

// Output channel c of query head hq of row b from the S partials (loads past L1: in the fused merge
// other CTAs wrote them).
template <int D>
__device__ __forceinline__ void merge_one(const KvqDecodeParams& P, int b, int hq, int c) {
    const int S = P.n_splits + 1;
    const int64_t row0 = ((int64_t)b * P.hkv * P.group + hq) * S;
    float m = -INFINITY;
    for (int s = 0; s < S; s++) m = fmaxf(m, __ldcg(P.part_ml + (row0 + s) * 2));
    float l = 0.f, a = 0.f;
    for (int s = 0; s < S; s++) {
        const float ms = __ldcg(P.part_ml + (row0 + s) * 2);
        if (ms == -INFINITY) continue;
        const float w = exp2f(ms - m);
        l += w * __ldcg(P.part_ml + (row0 + s) * 2 + 1);
        a += w * __ldcg(P.part_acc + (row0 + s) * D + c);
    }
    const int64_t o = ((int64_t)b * P.hkv * P.group + hq) * D + c;
    P.out[o] = a / l;
    if (P.out16 != nullptr) P.out16[o] = __float2half(a / l);
}

// The fused merge of the G query heads of (row b, KV head h) by one CTA: the splits' softmax weights
// once per head into shared memory `wsh` ([G][S] + [MAX_G] floats), then each thread sums the S
// partials of four adjacent output channels as float4s, eight loads in flight (a merge that waits on
// one L2 round trip per few loads is the longest serial part of a short-context launch).
template <int D>
__device__ void merge_cta(const KvqDecodeParams& P, int b, int h, float* wsh) {
    const int S = P.n_splits + 1, G = P.group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* lsum = wsh + G * S;
    const float2* ml = reinterpret_cast<const float2*>(P.part_ml);
    for (int g = warp; g < G; g += WARPS) {
        const int64_t row0 = ((int64_t)b * P.hkv * G + (int64_t)h * G + g) * S;
        // (m, l) of split `lane` stays in registers between the two passes (S <= 32 is the common case).
        const float2 own = lane < S ? __ldcg(ml + row0 + lane) : make_float2(-INFINITY, 0.f);
        float m = own.x;
        for (int s = lane + 32; s < S; s += 32) m = fmaxf(m, __ldcg(ml + row0 + s).x);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float l = 0.f;
        for (int s = lane; s < S; s += 32) {
            const float2 v = s == lane ? own : __ldcg(ml + row0 + s);
            const float w = v.x == -INFINITY ? 0.f : exp2f(v.x - m);
            wsh[g * S + s] = w;
            l += w * v.y;
        }
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) lsum[g] = l;
    }
    __syncthreads();
    constexpr int V = D / 4, BATCH = 8;
    for (int idx = threadIdx.x; idx < G * V; idx += THREADS) {
        const int g = idx / V, c4 = idx % V;
        const int64_t row0 = ((int64_t)b * P.hkv * G + (int64_t)h * G + g) * S;
        const float4* pa = reinterpret_cast<const float4*>(P.part_acc + row0 * D) + c4;
        const float* w = wsh + g * S;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s0 = 0; s0 < S; s0 += BATCH) {
            float4 v[BATCH];
#pragma unroll
            for (int j = 0; j < BATCH; j++)
                v[j] = s0 + j < S ? __ldcg(pa + (int64_t)(s0 + j) * V) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int j = 0; j < BATCH; j++) {
                const float ws = s0 + j < S ? w[s0 + j] : 0.f;
                a.x += ws * v[j].x;
                a.y += ws * v[j].y;
                a.z += ws * v[j].z;
                a.w += ws * v[j].w;
            }
        }
        const float inv = 1.f / lsum[g];
        const float o[4] = {a.x * inv, a.y * inv, a.z * inv, a.w * inv};
        const int64_t oi = ((int64_t)b * P.hkv * G + (int64_t)h * G + g) * D + 4 * c4;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            P.out[oi + j] = o[j];
            if (P.out16 != nullptr) P.out16[oi + j] = __float2half(o[j]);
        }
    }
}

// grid = (n_splits + 1, Hkv, B), block = THREADS.
// Dynamic shared memory: max(WARPS * P.stages * page bytes (K+V), WARPS * window stage, merge scratch).
template <int D, class F>
__device__ void decode_kernel(const KvqDecodeParams& P) {
    using W = F16Rows<D, 16, 1>;  // the f16 window: contiguous rows, tiles of 16 tokens, one stage
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ float ml_sh[WARPS][MAX_G][2];
    if (P.page_blocks != F::PAGE_BLOCKS || P.stages < 1 || P.stages > F::STAGES || P.stages > 4 || P.group > MAX_G)
        __trap();

    const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int slot = P.seq_slot[b], len = P.row_len[b];
    // Row b sees tokens [0, len) of its slot: a prefix of the sealed blocks, then of the window.
    const int ns = min(P.n_sealed[slot], len);
    const int nw = max(0, min(P.n_win[slot], len - P.n_sealed[slot]));
    const int G = P.group, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane >> 2, q4 = lane & 3;

    Ctx<D> cx;
    cx.lane = lane;
    cx.fa = &P.fmt;
    cx.k_block_bytes = P.k_block_bytes;
    cx.v_block_bytes = P.v_block_bytes;
    {
        const float* qp = P.q + ((int64_t)b * P.hkv * G + (int64_t)h * G + min(r, G - 1)) * D;
        const bool live = r < G;
        const bool pair8 = F::Q_PAIR8 && split < P.n_splits;  // the window CTA reads f16 rows
#pragma unroll
        for (int kb = 0; kb < D / 16; kb++) {
            const float2 a = *reinterpret_cast<const float2*>(qp + 16 * kb + 2 * q4);
            const float2 c = *reinterpret_cast<const float2*>(qp + 16 * kb + 2 * q4 + 8);
            cx.x[kb][0] = live ? a.x : 0.f;
            cx.x[kb][1] = live ? a.y : 0.f;
            cx.x[kb][2] = live ? c.x : 0.f;
            cx.x[kb][3] = live ? c.y : 0.f;
            split2(cx.x[kb][0], pair8 ? cx.x[kb][2] : cx.x[kb][1], cx.hi[kb][0], cx.lo[kb][0]);
            split2(pair8 ? cx.x[kb][1] : cx.x[kb][2], cx.x[kb][3], cx.hi[kb][1], cx.lo[kb][1]);
        }
    }
    WarpState<D> st;
    st.m = -INFINITY;
    st.l = 0.f;
#pragma unroll
    for (int mb = 0; mb < D / 16; mb++) st.acc[mb][0] = st.acc[mb][1] = st.acc[mb][2] = st.acc[mb][3] = 0.f;
    const float scale_log2 = P.scale * LOG2E;

    if (split < P.n_splits) {
        if constexpr (F::CUSTOM_SEALED) {
            F::template run_sealed<D>(P, slot, h, split, warp, lane, ns, smem, scale_log2, cx, st);
        } else {
            run_pages<D, F>(P, slot, h, split, warp, lane, ns, smem, scale_log2, cx, st);
        }
    } else {
        // The f16 window: a ring of win_cap rows per (sequence, head); token t (absolute index) sits in
        // row t % win_cap. Tiles of 16 tokens, one stage per warp.
        const int t_first = P.n_sealed[slot];
        const int64_t base = ((int64_t)slot * P.hkv + h) * P.win_cap * D;
        const uint8_t* kw = reinterpret_cast<const uint8_t*>(P.k_win + base);
        const uint8_t* vw = reinterpret_cast<const uint8_t*>(P.v_win + base);
        const int ntiles_all = (nw + 15) / 16;
        const int n_tiles = ntiles_all > warp ? (ntiles_all - warp + WARPS - 1) / WARPS : 0;
        constexpr int RB = 2 * D, CH = RB / 16;
        auto count = [&](int i) { return min(16, nw - (warp + i * WARPS) * 16); };
        auto fill = [&](int i, uint8_t* kb, uint8_t* vb) {
            const int t0 = (warp + i * WARPS) * 16, n = count(i);
            for (int c = lane; c < 16 * CH; c += 32) {
                const int tok = c / CH, chunk = c % CH;
                const int64_t row = (int64_t)((t_first + t0 + min(tok, n - 1)) % P.win_cap) * RB + chunk * 16;
                cp_async16(kb + swz<D>(tok, chunk), kw + row, tok < n);
                cp_async16(vb + swz<D>(tok, chunk), vw + row, tok < n);
            }
        };
        PagedBody<D, W> body{cx};
        warp_run<D, 16>(n_tiles, count, fill, body, smem + warp * 2 * 16 * RB, 16 * RB, 16 * RB, 1, scale_log2, lane,
                        st);
    }

    // Merge the warps: (m, l) per row through ml_sh, acc through the (now free) dynamic shared memory.
    float l = st.l;
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    __syncthreads();  // all warps are done with their staging buffers
    float* red = reinterpret_cast<float*>(smem);  // [WARPS][MAX_G][D]
    if (r < G && q4 == 0) {
        ml_sh[warp][r][0] = st.m;
        ml_sh[warp][r][1] = l;
    }
    const bool win = split >= P.n_splits;
#pragma unroll
    for (int mb = 0; mb < D / 16; mb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int g = 2 * q4 + (e & 1), row = r + 8 * (e >> 1);
            const int c = win ? W::out_chan(mb, row) : F::out_chan(mb, row);
            if (g < G) red[(warp * MAX_G + g) * D + c] = st.acc[mb][e];
        }
    __syncthreads();
    const int S = P.n_splits + 1;
    for (int idx = threadIdx.x; idx < G * D; idx += THREADS) {
        const int g = idx / D, c = idx % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, ml_sh[w][g][0]);
        float a = 0.f, L = 0.f;
        if (M != -INFINITY) {
#pragma unroll
            for (int w = 0; w < WARPS; w++) {
                const float f = exp2f(ml_sh[w][g][0] - M);
                a += f * red[(w * MAX_G + g) * D + c];
                L += f * ml_sh[w][g][1];
            }
        }
        const int64_t row = ((int64_t)b * P.hkv * G + (int64_t)h * G + g) * S + split;
        P.part_acc[row * D + c] = a;
        if (c == 0) {
            P.part_ml[row * 2] = M;
            P.part_ml[row * 2 + 1] = L;
        }
    }
    if (P.counters == nullptr) return;
    // The last of the S CTAs of (row b, KV head h) to finish merges the splits of its G query heads
    // (no separate merge launch): partials are made visible device-wide before the CTA is counted,
    // and the last one reads them past L1 (__ldcg in merge_one), then zeroes the counter for the next
    // launch (the same graph replays with the same counters).
    __shared__ int last_sh;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_sh = atomicAdd(P.counters + (b * P.hkv + h), 1) == S - 1;
    __syncthreads();
    if (!last_sh) return;
    __threadfence();
    uint32_t smem_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
    if ((G * S + MAX_G) * 4 <= (int)smem_bytes) {
        merge_cta<D>(P, b, h, reinterpret_cast<float*>(smem));
    } else {
        for (int idx = threadIdx.x; idx < G * D; idx += THREADS) merge_one<D>(P, b, h * G + idx / D, idx % D);
    }
    if (threadIdx.x == 0) P.counters[b * P.hkv + h] = 0;
}

// Merge of the splits: grid = (Hq, B), block = D threads.
template <int D>
__device__ void merge_kernel(const KvqDecodeParams& P) {
    merge_one<D>(P, blockIdx.y, blockIdx.x, threadIdx.x);
}

}  // namespace kvq

// The module's page layout (blocks per page, most stages, tokens per tile or 0 when a tile is a whole
// page, dynamic shared memory per warp and head channel past the page stages), read by the host
// (Gpu::layout) so these constants are stated once, here.
#define KVQ_LAYOUT(F) extern "C" __device__ const int kvq_layout[4] = {F::PAGE_BLOCKS, F::STAGES, 0, 0};
#define KVQ_LAYOUT_ROWS(F, per_ch) \
    extern "C" __device__ const int kvq_layout[4] = {F::PAGE_BLOCKS, F::STAGES, 0, per_ch};

// Instantiates decode kernel `op` of format policy F for head_dim D, and the split merge, under derived
// names (kvq_{fmt}_{op}_f16_hd{D}, kvq_{fmt}_merge_f16_hd{D}).
#define KVQ_DECODE_KERNEL(fmt, op, F, D)                                                       \
    extern "C" __global__ void __launch_bounds__(kvq::THREADS, F::MIN_CTAS)                    \
        KVQ_NAME(fmt, op, f16, D)(const KvqDecodeParams P) {                                   \
        KVQ_PDL_ENTER(); /* the O projection's GEMV may start loading weights */               \
        kvq::decode_kernel<D, F>(P);                                                           \
    }
#define KVQ_MERGE_KERNEL(fmt, D) \
    extern "C" __global__ void KVQ_NAME(fmt, merge, f16, D)(const KvqDecodeParams P) { \
        KVQ_PDL_ENTER();                                                                 \
        kvq::merge_kernel<D>(P);                                                         \
    }
#define KVQ_DECODE_KERNELS(fmt, F, D) KVQ_DECODE_KERNEL(fmt, decode, F, D) KVQ_MERGE_KERNEL(fmt, D)
