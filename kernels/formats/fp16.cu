// fp16 KV: one token per block, D little-endian halves (crates/kvq-formats/src/formats/fp16.rs).
#include "kvq_decode.cuh"

template <int D>
struct Fp16Policy {
    static constexpr int BT = 1;
    static constexpr int TILE_BLOCKS = 32;
    static constexpr int CPL = D / kvq::LANES_PER_TOKEN;
    static __device__ __forceinline__ void key_chunk(const uint8_t* blk, int, int c0, const KvqFmtArgs&, float* k) {
        kvq::WindowFmt<D>::chunk(blk, c0, k);
    }
    static __device__ __forceinline__ void val_chunk(const uint8_t* blk, int, int c0, const KvqFmtArgs&, float* v) {
        kvq::WindowFmt<D>::chunk(blk, c0, v);
    }
};

KVQ_DECODE_KERNELS(fp16, Fp16Policy<64>, 64)
KVQ_DECODE_KERNELS(fp16, Fp16Policy<128>, 128)
