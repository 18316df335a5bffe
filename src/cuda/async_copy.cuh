// Asynchronous copies from global to shared memory (cp.async, sm_80 and later), shared by the
// kernels that stage their tiles while they compute.
#ifndef DT_CUDA_ASYNC_COPY_CUH
#define DT_CUDA_ASYNC_COPY_CUH

#include "cuda/cuda_internal.h"

// 16 bytes, both addresses 16-byte aligned
static __device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
// the same, or 16 zero bytes when !ok (gmem must still be a valid address; nothing is read)
static __device__ __forceinline__ void cp_async16z(void *smem, const void *gmem, bool ok) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int bytes = ok ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
// one float, or a zero when !ok (for columns such as the gates' beta, [N, Hv], that no wider copy lines up with)
static __device__ __forceinline__ void cp_async4z(void *smem, const void *gmem, bool ok) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int bytes = ok ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
static __device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#endif
