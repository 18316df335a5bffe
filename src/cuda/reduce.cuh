// Block-wide reductions: a sum, and the online softmax's (max, sum of exp(x - max)) pairs merged
// across a block, for the attention's and the LM head's rows.
#ifndef DT_CUDA_REDUCE_CUH
#define DT_CUDA_REDUCE_CUH

#include <math.h>

#include "cuda/cuda_internal.h"

static __device__ __forceinline__ void ms_merge(float &m, float &s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;  // both empty: -inf - -inf would be NaN
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

// (max, sum of exp(x - max)) over the block; every thread gets the result.
template <int NT>
static __device__ void block_max_sum(float &m, float &s) {
    __shared__ float sm[32], ss[32];
    for (int o = 16; o; o >>= 1) ms_merge(m, s, __shfl_xor_sync(~0u, m, o), __shfl_xor_sync(~0u, s, o));
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sm[w] = m, ss[w] = s;
    __syncthreads();
    if (w == 0) {
        m = l < NT / 32 ? sm[l] : -INFINITY;
        s = l < NT / 32 ? ss[l] : 0.f;
        for (int o = 16; o; o >>= 1) ms_merge(m, s, __shfl_xor_sync(~0u, m, o), __shfl_xor_sync(~0u, s, o));
        if (l == 0) sm[0] = m, ss[0] = s;
    }
    __syncthreads();
    m = sm[0];
    s = ss[0];
    __syncthreads();  // the arrays may be reused
}

// The sum over the block; every thread gets it.
template <int NT>
static __device__ float block_sum(float v) {
    __shared__ float sh[32];
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = l < NT / 32 ? sh[l] : 0.f;
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
        if (l == 0) sh[0] = v;
    }
    __syncthreads();
    v = sh[0];
    __syncthreads();  // sh may be reused
    return v;
}

#endif
