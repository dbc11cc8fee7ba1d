// fp16 KV: one token per block, D little-endian halves (crates/kvq-formats/src/formats/fp16.rs).
// Pages of 32 tokens, three cp.async stages per warp; keys and values reach the tensor cores through
// ldmatrix from XOR-swizzled rows, so the kernel's work per byte is a few instructions.
#include "kvq_decode.cuh"

template <int D>
using Fp16Policy = kvq::F16Rows<D, 32, 3>;

KVQ_LAYOUT(Fp16Policy<128>)
KVQ_DECODE_KERNELS(fp16, Fp16Policy<64>, 64)
KVQ_DECODE_KERNELS(fp16, Fp16Policy<128>, 128)
