// Programmatic dependent launch (sm_90+). A kernel launched with the PDL attribute (src/graph.rs,
// Work::Kernel { pdl: true }) may start while the kernel before it still runs: it must call
// kvq_pdl_wait() before it reads or writes anything an earlier kernel touches, and may do independent
// work (loading weights) before that. kvq_pdl_trigger() lets such a dependent start early; it is a no-op
// for dependents launched without the attribute, as the wait is for kernels launched without it. Both
// compile to nothing below sm_90. tests/pdl_entry.rs checks that every kernel starts with the wait.
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

// The first statement of every kernel that an earlier kernel's output feeds (all but kvq_model_gemv*,
// which loads weights first): wait for the previous kernel, then let the next one launch.
#define KVQ_PDL_ENTER() \
    do {                 \
        kvq_pdl_wait();  \
        kvq_pdl_trigger(); \
    } while (0)
