// Zero-centred RMSNorm on the GPU: one block per row, the sum of squares reduced in the block.
#include <cuda_runtime.h>

extern "C" {
#include "deltatune/cuda_ops.h"
}

#define NORM_THREADS 256

// Sum of v over the block (every thread gets it).
__device__ float block_sum(float v) {
    __shared__ float part[NORM_THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();  // part[] may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < NORM_THREADS / 32 ? part[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ void rmsnorm1p_forward_kernel(float *y, const float *x, const float *w, int D, float eps) {
    const float *xr = x + (int64_t)blockIdx.x * D;
    float *yr = y + (int64_t)blockIdx.x * D;
    float ss = 0;
    for (int i = threadIdx.x; i < D; i += NORM_THREADS) ss += xr[i] * xr[i];
    float r = rsqrtf(block_sum(ss) / D + eps);
    for (int i = threadIdx.x; i < D; i += NORM_THREADS) yr[i] = xr[i] * r * (1.0f + w[i]);
}

// dx += r (dn - n mean(n dn)), dn = dy (1 + w), n = x r;  dw += sum over rows of dy n.
__global__ void rmsnorm1p_backward_kernel(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                          int D, float eps) {
    const float *xr = x + (int64_t)blockIdx.x * D, *dyr = dy + (int64_t)blockIdx.x * D;
    float *dxr = dx + (int64_t)blockIdx.x * D;
    float ss = 0;
    for (int i = threadIdx.x; i < D; i += NORM_THREADS) ss += xr[i] * xr[i];
    float r = rsqrtf(block_sum(ss) / D + eps);
    float dot = 0;
    for (int i = threadIdx.x; i < D; i += NORM_THREADS) dot += xr[i] * r * dyr[i] * (1.0f + w[i]);
    float m = block_sum(dot) / D;
    for (int i = threadIdx.x; i < D; i += NORM_THREADS) {
        float n = xr[i] * r;
        dxr[i] += r * (dyr[i] * (1.0f + w[i]) - n * m);
        if (dw) atomicAdd(&dw[i], dyr[i] * n);
    }
}

extern "C" void rmsnorm1p_forward_cuda(float *y, const float *x, const float *w, int64_t rows, int D, float eps) {
    if (rows > 0) rmsnorm1p_forward_kernel<<<(unsigned)rows, NORM_THREADS>>>(y, x, w, D, eps);
}

extern "C" void rmsnorm1p_backward_cuda(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                        int64_t rows, int D, float eps) {
    if (rows > 0) rmsnorm1p_backward_kernel<<<(unsigned)rows, NORM_THREADS>>>(dx, dw, dy, x, w, D, eps);
}
