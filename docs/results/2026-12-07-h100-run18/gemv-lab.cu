// GEMV lab (device machine only; no Rust needed): the engine's decode GEMV (kernels/model.cu,
// kvq_model_gemv{1,2}, weights [inp][out]) against a row-major candidate (weights [out][inp] as the
// GGUF/HF files store them: one warp streams whole weight rows, R rows at a time, U 16-byte loads per row
// in flight, x staged once per CTA in shared memory) and cuBLAS, on the Llama-3-8B decode shapes.
// Checks every candidate against the engine kernel on random data first, then times each shape alone
// (weights rotated over copies so nothing is L2-resident) and a 32-layer chain of the four layer GEMVs
// (distinct weights, launched back to back as programmatic dependents, as the engine does).
// Build and run: scripts/gemv-lab.sh.
#if __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#define LAB_BLAS 1
#endif
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../kernels/model.cu"

#define CK(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e = (x);                                                                  \
        if (e != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

namespace lab {
constexpr int WARPS = 8;

// y[n][out] = x[n][inp] W^T, W [out][inp] (row-major, rows contiguous). CTA = 8 warps x R rows; a lane
// takes 8 consecutive k of every 256 (one 16-byte load per row), U such loads per row in flight.
template <int NP, int R, int U>
__global__ void __launch_bounds__(256) gemv_rows(const __half* __restrict__ x, const __half* __restrict__ w,
                                                 float* __restrict__ y, int n, int inp, int out) {
    extern __shared__ __align__(16) __half xs[];  // [NP][inp]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * WARPS + warp) * R;
    const int steps = (inp + 255) / 256;
    uint4 cur[U][R];
    auto load = [&](uint4 (&buf)[U][R], int s0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (s0 + u) * 256 + lane * 8;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (k < inp && row0 + r < out)
                    buf[u][r] = gemv_ld_stream(w + (int64_t)(row0 + r) * inp + k);
                else
                    buf[u][r] = make_uint4(0, 0, 0, 0);
            }
        }
    };
    load(cur, 0);
    kvq_pdl_wait();
    kvq_pdl_trigger();
    for (int e = threadIdx.x * 8; e < NP * inp; e += blockDim.x * 8) {
        const int r = e / inp;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < n) v = *reinterpret_cast<const uint4*>(x + e);
        *reinterpret_cast<uint4*>(xs + e) = v;
    }
    __syncthreads();
    float acc[R][NP];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int p = 0; p < NP; ++p) acc[r][p] = 0.f;
    for (int s = 0; s < steps; s += U) {
        uint4 nxt[U][R];
        if (s + U < steps) load(nxt, s + U);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (s + u) * 256 + lane * 8;
            if (k >= inp) break;
            float xf[NP][8];
#pragma unroll
            for (int p = 0; p < NP; ++p) {
                const uint4 xv = *reinterpret_cast<const uint4*>(xs + p * inp + k);
                const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __half22float2(xh[j]);
                    xf[p][2 * j] = f.x;
                    xf[p][2 * j + 1] = f.y;
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const __half2* wh = reinterpret_cast<const __half2*>(&cur[u][r]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __half22float2(wh[j]);
#pragma unroll
                    for (int p = 0; p < NP; ++p)
                        acc[r][p] = fmaf(f.y, xf[p][2 * j + 1], fmaf(f.x, xf[p][2 * j], acc[r][p]));
                }
            }
        }
        if (s + U < steps) {
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int r = 0; r < R; ++r) cur[u][r] = nxt[u][r];
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            float v = acc[r][p];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[r][p] = v;
        }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int p = 0; p < NP; ++p)
                if (p < n && row0 + r < out) y[(int64_t)p * out + row0 + r] = acc[r][p];
    }
}

__global__ void fill(__half* p, size_t len, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = __float2half(((h & 0xffff) / 65536.f - 0.5f) * 0.1f);
    }
}

// W [out][inp] -> Wt [inp][out].
__global__ void transpose(const __half* w, __half* wt, int out, int inp) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)out * inp; i += (size_t)gridDim.x * blockDim.x) {
        const size_t o = i / inp, k = i % inp;
        wt[k * out + o] = w[i];
    }
}
}  // namespace lab

struct Shape {
    const char* name;
    int inp, out;
};

using RowFn = void (*)(const __half*, const __half*, float*, int, int, int);
struct Variant {
    std::string name;
    RowFn fn;
    int rows_per_cta;
    int np;
};

template <int NP, int R, int U>
Variant row_variant() {
    char b[64];
    snprintf(b, sizeof b, "rows NP%d R%d U%d", NP, R, U);
    auto fn = lab::gemv_rows<NP, R, U>;
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
    return {b, fn, lab::WARPS * R, NP};
}

static int sms, per_sm_old;

// kvq's gemv_splits (src/launch_model.rs, waves rule).
static int old_splits(int n, int inp, int out) {
    const int tiles = (out + 63) / 64;
    if (tiles > 4096) return 1;
    int most = std::min(std::max(inp / 64, 1), 32);
    most = std::min(most, std::max((1 << 20) / (n * out), 1));
    const int slots = std::max(sms * per_sm_old, 1);
    most = std::min(most, (slots + tiles - 1) / tiles);
    auto fill = [&](int ks) {
        const int ctas = tiles * ks;
        return (double)ctas / (double)(((ctas + slots - 1) / slots) * slots);
    };
    double best = 0;
    for (int ks = 1; ks <= most; ++ks) best = std::max(best, fill(ks));
    for (int ks = 1; ks <= most; ++ks)
        if (fill(ks) >= best - 0.02) return ks;
    return 1;
}

static float* g_ws;
static int* g_counters;

static void launch_pdl(const void* fn, dim3 grid, dim3 block, size_t smem, void** args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelExC(&cfg, fn, args));
}

static void run_old(int n, const __half* x, const __half* wt, float* y, int inp, int out) {
    int ks = old_splits(n, inp, out);
    const float* xf = nullptr;
    const float* nw = nullptr;
    float eps = 0.f;
    int mode = 0, acc = 0;
    void* args[] = {&x, &xf, &nw, &eps, &mode, &wt, &y, &g_ws, &g_counters, &n, &inp, &out, &ks, &acc};
    const void* fn = n == 1 ? (const void*)kvq_model_gemv1 : (const void*)kvq_model_gemv2;
    launch_pdl(fn, dim3((out + 63) / 64, ks), dim3(256), 0, args);
}

static void run_row(const Variant& v, int n, const __half* x, const __half* w, float* y, int inp, int out) {
    void* args[] = {&x, &w, &y, &n, &inp, &out};
    launch_pdl((const void*)v.fn, dim3((out + v.rows_per_cta - 1) / v.rows_per_cta), dim3(256),
               (size_t)v.np * inp * 2, args);
}

#ifdef LAB_BLAS
static cublasHandle_t blas;
// cuBLAS on W [out][inp] (op T) or Wt [inp][out] (op N); f32 output.
static void run_blas(bool rowmajor, int n, const __half* x, const __half* w, float* y, int inp, int out) {
    const float one = 1.f, zero = 0.f;
    // Column-major: y^T (out x n) = op(A) (out x inp) x^T (inp x n).
    if (rowmajor)
        cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, inp, &one, w, CUDA_R_16F, inp, x, CUDA_R_16F, inp,
                     &zero, y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    else
        cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, out, n, inp, &one, w, CUDA_R_16F, out, x, CUDA_R_16F, inp,
                     &zero, y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
#else
// No cuBLAS headers on this machine: the cuBLAS columns repeat the engine kernel (marked in the output).
static void run_blas(bool, int n, const __half* x, const __half* w, float* y, int inp, int out) {
    run_old(n, x, w, y, inp, out);
}
#endif

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    sms = prop.multiProcessorCount;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_old, kvq_model_gemv1, 256, 0));
    printf("device %s, %d SMs, engine GEMV %d CTAs/SM\n", prop.name, sms, per_sm_old);
#ifdef LAB_BLAS
    cublasCreate(&blas);
#else
    printf("no cuBLAS headers: the cublas columns are NOT cuBLAS\n");
#endif
    CK(cudaMalloc(&g_ws, (1 << 20) * 4));
    CK(cudaMalloc(&g_counters, 4096 * 4));
    CK(cudaMemset(g_counters, 0, 4096 * 4));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);

    std::vector<Variant> vars1 = {row_variant<1, 1, 4>(), row_variant<1, 1, 8>(), row_variant<1, 1, 16>(),
                                  row_variant<1, 2, 4>(), row_variant<1, 2, 8>(), row_variant<1, 4, 4>()};
    std::vector<Variant> vars2 = {row_variant<2, 1, 8>(), row_variant<2, 2, 4>(), row_variant<2, 2, 8>()};
    const Shape shapes[] = {{"qkv", 4096, 6144}, {"o", 4096, 4096}, {"gate_up", 4096, 28672},
                            {"down", 14336, 4096}, {"lm_head", 4096, 128256}, {"135m_qkv", 576, 960},
                            {"135m_down", 1536, 576}};
    __half* x;
    CK(cudaMalloc(&x, 2 * 14336 * 2));
    lab::fill<<<64, 256>>>(x, 2 * 14336, 7);
    float *y0, *y1;
    CK(cudaMalloc(&y0, 2 * 128256 * 4));
    CK(cudaMalloc(&y1, 2 * 128256 * 4));

    // --- parity and per-shape timing ---
    for (const Shape& s : shapes) {
        const size_t elems = (size_t)s.inp * s.out, bytes = elems * 2;
        const int copies = (int)std::max<size_t>(1, (size_t)(400u << 20) / bytes);
        std::vector<__half*> w(copies), wt(copies);
        for (int c = 0; c < copies; ++c) {
            CK(cudaMalloc(&w[c], bytes));
            CK(cudaMalloc(&wt[c], bytes));
            lab::fill<<<1024, 256>>>(w[c], elems, 1234 + c);
            lab::transpose<<<2048, 256>>>(w[c], wt[c], s.out, s.inp);
        }
        CK(cudaDeviceSynchronize());
        for (int n = 1; n <= 2; ++n) {
            auto& vars = n == 1 ? vars1 : vars2;
            std::vector<float> ref(n * s.out), got(n * s.out);
            run_old(n, x, wt[0], y0, s.inp, s.out);
            CK(cudaMemcpy(ref.data(), y0, ref.size() * 4, cudaMemcpyDeviceToHost));
            auto time = [&](auto&& f) {
                for (int i = 0; i < 10; ++i) f(i % copies);
                const int reps = 200;
                cudaEventRecord(e0);
                for (int i = 0; i < reps; ++i) f(i % copies);
                cudaEventRecord(e1);
                CK(cudaEventSynchronize(e1));
                float ms;
                cudaEventElapsedTime(&ms, e0, e1);
                return ms * 1000.f / reps;
            };
            const float t_old = time([&](int c) { run_old(n, x, wt[c], y0, s.inp, s.out); });
            const float t_bn = time([&](int c) { run_blas(false, n, x, wt[c], y1, s.inp, s.out); });
            const float t_bt = time([&](int c) { run_blas(true, n, x, w[c], y1, s.inp, s.out); });
            auto tbs = [&](float us) { return bytes / (us * 1e-6) / 1e12; };
            printf("%-9s %5dx%-6d n=%d engine %7.2f us %.2f TB/s (ks %d) | cublas[in][out] %7.2f us %.2f | cublas[out][in] %7.2f us %.2f\n",
                   s.name, s.inp, s.out, n, t_old, tbs(t_old), old_splits(n, s.inp, s.out), t_bn, tbs(t_bn), t_bt,
                   tbs(t_bt));
            for (const Variant& v : vars) {
                CK(cudaMemset(y1, 0xff, n * s.out * 4));
                run_row(v, n, x, w[0], y1, s.inp, s.out);
                CK(cudaMemcpy(got.data(), y1, got.size() * 4, cudaMemcpyDeviceToHost));
                double worst = 0, scale = 0;
                for (size_t i = 0; i < ref.size(); ++i) scale = std::max(scale, (double)std::abs(ref[i]));
                for (size_t i = 0; i < ref.size(); ++i)
                    worst = std::max(worst, std::abs((double)got[i] - ref[i]) / scale);
                const bool ok = worst < 1e-4 && worst == worst;
                const float t = time([&](int c) { run_row(v, n, x, w[c], y1, s.inp, s.out); });
                printf("    %-16s %7.2f us %.2f TB/s  %.3fx engine  parity %s (max err / max |y| %.2e)\n",
                       v.name.c_str(), t, tbs(t), t_old / t, ok ? "ok" : "FAIL", worst);
            }
        }
        for (int c = 0; c < copies; ++c) {
            cudaFree(w[c]);
            cudaFree(wt[c]);
        }
    }

    // --- 32-layer chain: qkv, o, gate_up, down with distinct weights, each layer's kernels back to back ---
    const Shape layer[4] = {shapes[0], shapes[1], shapes[2], shapes[3]};
    const int L = 32;
    std::vector<__half*> lw(L * 4);
    size_t chain_bytes = 0;
    for (int l = 0; l < L; ++l)
        for (int j = 0; j < 4; ++j) {
            const size_t elems = (size_t)layer[j].inp * layer[j].out;
            CK(cudaMalloc(&lw[l * 4 + j], elems * 2));
            lab::fill<<<1024, 256>>>(lw[l * 4 + j], elems, 99 + l * 4 + j);
            chain_bytes += elems * 2;
        }
    CK(cudaDeviceSynchronize());
    printf("chain: 32 layers x (qkv, o, gate_up, down), %.2f GB of weights per pass (layouts differ by "
           "kernel; the same bytes)\n",
           chain_bytes / 1e9);
    for (int n = 1; n <= 2; ++n) {
        auto chain_time = [&](auto&& f) {
            for (int r = 0; r < 2; ++r)
                for (int i = 0; i < L * 4; ++i) f(i);
            float best = 1e9f, sum = 0;
            const int reps = 10;
            for (int r = 0; r < reps; ++r) {
                cudaEventRecord(e0);
                for (int i = 0; i < L * 4; ++i) f(i);
                cudaEventRecord(e1);
                CK(cudaEventSynchronize(e1));
                float ms;
                cudaEventElapsedTime(&ms, e0, e1);
                best = std::min(best, ms);
                sum += ms;
            }
            return std::make_pair(best, sum / reps);
        };
        // The engine kernel reads the same buffers as [inp][out]: same bytes, same grid as the engine.
        auto old_t = chain_time([&](int i) { run_old(n, x, lw[i], y0, layer[i % 4].inp, layer[i % 4].out); });
        printf("n=%d engine GEMV       best %.3f ms mean %.3f ms  %.2f TB/s\n", n, old_t.first, old_t.second,
               chain_bytes / (old_t.first * 1e-3) / 1e12);
        auto bl_t = chain_time([&](int i) { run_blas(true, n, x, lw[i], y1, layer[i % 4].inp, layer[i % 4].out); });
        printf("n=%d cublas [out][in]  best %.3f ms mean %.3f ms  %.2f TB/s  %.3fx engine\n", n, bl_t.first,
               bl_t.second, chain_bytes / (bl_t.first * 1e-3) / 1e12, old_t.first / bl_t.first);
        for (const Variant& v : n == 1 ? vars1 : vars2) {
            auto t = chain_time([&](int i) { run_row(v, n, x, lw[i], y1, layer[i % 4].inp, layer[i % 4].out); });
            printf("n=%d %-18s best %.3f ms mean %.3f ms  %.2f TB/s  %.3fx engine\n", n, v.name.c_str(), t.first,
                   t.second, chain_bytes / (t.first * 1e-3) / 1e12, old_t.first / t.first);
        }
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
