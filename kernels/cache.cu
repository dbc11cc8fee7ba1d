// Format-independent cache kernels: appending new tokens (f32, keys rotated; unrotated for pre-RoPE
// key codecs) to the f16 window rings.
#include "kvq_encode.cuh"

#define KVQ_APPEND_KERNEL(op, fn, D)                                                   \
    extern "C" __global__ void KVQ_NAME(cache, op, f32, D)(const KvqEncodeParams P) { \
        KVQ_PDL_ENTER();                                                                \
        kvq::fn<D>(P);                                                                  \
    }

KVQ_APPEND_KERNEL(append, append_kernel, 64)
KVQ_APPEND_KERNEL(append, append_kernel, 128)
KVQ_APPEND_KERNEL(append_prerope, append_prerope_kernel, 64)
KVQ_APPEND_KERNEL(append_prerope, append_prerope_kernel, 128)
