// SwiGLU on the GPU, elementwise.
#include <cuda_runtime.h>

extern "C" {
#include "deltatune/cuda_ops.h"
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + __expf(-x)); }

__global__ void swiglu_forward_kernel(float *m, const float *g, const float *u, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        m[i] = g[i] * sigmoidf_(g[i]) * u[i];
}

__global__ void swiglu_backward_kernel(float *dg, float *du, const float *dm, const float *g, const float *u,
                                       int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float s = sigmoidf_(g[i]);
        dg[i] += dm[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        du[i] += dm[i] * g[i] * s;
    }
}

static unsigned blocks_for(int64_t n) {
    int64_t b = (n + 255) / 256;
    return (unsigned)(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

extern "C" void swiglu_forward_cuda(float *m, const float *gate, const float *up, int64_t n) {
    if (n > 0) swiglu_forward_kernel<<<blocks_for(n), 256>>>(m, gate, up, n);
}

extern "C" void swiglu_backward_cuda(float *dgate, float *dup, const float *dm, const float *gate, const float *up,
                                     int64_t n) {
    if (n > 0) swiglu_backward_kernel<<<blocks_for(n), 256>>>(dgate, dup, dm, gate, up, n);
}
