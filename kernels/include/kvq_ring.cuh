// How a new token's K/V value enters the f16 window ring: clamped to the f16 range (NaN -> 0), rounded
// to nearest, as the CPU cache stores it (kvq_formats::LayerCache::append). Shared by the cache's append
// kernels (kvq_encode.cuh) and the QKV split that writes the ring itself (kernels/model.cu).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace kvq {

__device__ __forceinline__ float sanitize(float x) { return isnan(x) ? 0.f : fminf(fmaxf(x, -65504.f), 65504.f); }

// The ring's bits of value x.
__device__ __forceinline__ uint16_t ring_half(float x) { return __half_as_ushort(__float2half_rn(sanitize(x))); }

}  // namespace kvq
