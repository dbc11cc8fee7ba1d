// fp16 KV: one token per block, D little-endian halves (crates/kvq-formats/src/formats/fp16.rs).
// Pages of 32 tokens, three cp.async stages per warp; keys and values reach the tensor cores through
// ldmatrix from XOR-swizzled rows, so the kernel's work per byte is a few instructions.
#include "kvq_decode.cuh"
#include "kvq_encode.cuh"

// A block is one token: its f16 row, already rounded by the window.
template <int D>
struct Fp16Encode {
    static __device__ void encode(const float* x, uint8_t* out, bool, const KvqFmtArgs&, uint8_t*) {
        for (int c = threadIdx.x; c < D; c += kvq::ENC_THREADS)
            reinterpret_cast<uint16_t*>(out)[c] = __half_as_ushort(__float2half_rn(x[c]));
    }
};

template <int D>
using Fp16Policy = kvq::F16Rows<D, 32, 3>;

KVQ_LAYOUT(Fp16Policy<128>)
KVQ_ENCODE_SMEM(0, 0)
KVQ_DECODE_KERNELS(fp16, Fp16Policy<64>, 64)
KVQ_DECODE_KERNELS(fp16, Fp16Policy<128>, 128)
KVQ_ENCODE_KERNEL(fp16, Fp16Encode<64>, 1, 64)
KVQ_ENCODE_KERNEL(fp16, Fp16Encode<128>, 1, 128)
