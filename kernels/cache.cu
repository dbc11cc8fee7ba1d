// Format-independent cache kernels: appending new tokens (f32, keys rotated; unrotated for pre-RoPE
// key codecs) to the f16 window rings.
#include "kvq_encode.cuh"

extern "C" __global__ void KVQ_NAME(cache, append, f32, 64)(const KvqEncodeParams P) {
    KVQ_PDL_ENTER();
    kvq::append_kernel<64>(P);
}
extern "C" __global__ void KVQ_NAME(cache, append, f32, 128)(const KvqEncodeParams P) {
    KVQ_PDL_ENTER();
    kvq::append_kernel<128>(P);
}
extern "C" __global__ void KVQ_NAME(cache, append_prerope, f32, 64)(const KvqEncodeParams P) {
    KVQ_PDL_ENTER();
    kvq::append_prerope_kernel<64>(P);
}
extern "C" __global__ void KVQ_NAME(cache, append_prerope, f32, 128)(const KvqEncodeParams P) {
    KVQ_PDL_ENTER();
    kvq::append_prerope_kernel<128>(P);
}
