// What the .cu files share: the stream, the cuBLAS handle, bf16 helpers and launch sizes.
#ifndef DT_CUDA_INTERNAL_H
#define DT_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "deltatune/cuda_ops.h"
}

// The one stream every launch uses, and the cuBLAS handle bound to it (cuda_init made them).
cudaStream_t cuda_stream(void);
cublasHandle_t cuda_cublas(void);

typedef __nv_bfloat16 bf16;

// The device's multiprocessors (asked once).
int cuda_sm_count(void);

// Row-major C[M, N] (+)= alpha op(A)[M, K] op(B)[K, N], batched with strides (elements), bf16 in,
// fp32 accumulate, C of type ct; a failure is recorded as the error (linear.cu).
void cuda_gemm(bool ta, bool tb, int M, int N, int K, float alpha, const void *A, long long lda, long long sA,
               const void *B, long long ldb, long long sB, float beta, void *C, cudaDataType ct, long long ldc,
               long long sC, int batch);

static __device__ __forceinline__ float ld(const bf16 *p) { return __bfloat162float(*p); }
static __device__ __forceinline__ float ld(const float *p) { return *p; }
static __device__ __forceinline__ void st(bf16 *p, float v) { *p = __float2bfloat16(v); }
static __device__ __forceinline__ void st(float *p, float v) { *p = v; }

static inline unsigned cuda_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : b > 65535 * 16 ? 65535 * 16 : b);
}

#endif
