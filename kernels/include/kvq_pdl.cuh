// Programmatic dependent launch (sm_90+). A kernel launched with the PDL attribute (src/graph.rs,
// Work::Kernel { pdl: true }) may start while the kernel before it still runs: it must call
// kvq_pdl_wait() before it reads or writes anything an earlier kernel touches, and may do independent
// work (loading weights) before that. kvq_pdl_trigger() lets such a dependent start early; it is a no-op
// for dependents launched without the attribute. Both compile to nothing below sm_90.
#pragma once

__device__ __forceinline__ void kvq_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void kvq_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
