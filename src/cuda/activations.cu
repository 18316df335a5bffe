// SwiGLU, elementwise: 16-byte bf16 vectors (8 values) per thread when the pointers allow.
#include "cuda/cuda_internal.h"
#include "cuda/vec.cuh"


// The approximate reciprocal (about 1 ulp) instead of an IEEE division: these kernels are short
// enough that instruction count shows. Past x < -87 the sum overflows and sigmoid is 0.
static __device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

template <int V> __global__ void swiglu_fwd_kernel(bf16 *m, const bf16 *g, const bf16 *u, int64_t n) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    int64_t nv = n / V;
    for (int64_t i = i0; i < nv; i += stride) {
        float a[V], b[V];
        ldv<V>(a, g + i * V);
        ldv<V>(b, u + i * V);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] = a[k] * sigmoid_f(a[k]) * b[k];
        stv<V>(m + i * V, a);
    }
    for (int64_t i = nv * V + i0; i < n; i += stride) {
        float a = ld(g + i);
        st(m + i, a * sigmoid_f(a) * ld(u + i));
    }
}

// dgate = dm up silu'(gate), dup = dm silu(gate), silu'(x) = s (1 + x (1 - s))
static __device__ __forceinline__ void swiglu_grad(float &dg, float &du, float d, float g, float u) {
    float s = sigmoid_f(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
}

template <int V>
__global__ void swiglu_bwd_kernel(bf16 *dg, bf16 *du, const float *dm, const bf16 *g, const bf16 *u, int64_t n) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    int64_t nv = n / V;
    for (int64_t i = i0; i < nv; i += stride) {
        float a[V], b[V], d[V];
        ldv<V>(a, g + i * V);
        ldv<V>(b, u + i * V);
        ldv<V>(d, dm + i * V);
#pragma unroll
        for (int k = 0; k < V; k++) swiglu_grad(a[k], b[k], d[k], a[k], b[k]);
        stv<V>(dg + i * V, a);
        stv<V>(du + i * V, b);
    }
    for (int64_t i = nv * V + i0; i < n; i += stride) {
        float a, b;
        swiglu_grad(a, b, dm[i], ld(g + i), ld(u + i));
        st(dg + i, a);
        st(du + i, b);
    }
}

extern "C" void swiglu_forward_cuda(dt_bf16 *m, const dt_bf16 *gate, const dt_bf16 *up, int64_t n) {
    if (n <= 0) return;
    bf16 *mb = (bf16 *)m;
    const bf16 *gb = (const bf16 *)gate, *ub = (const bf16 *)up;
    if (aligned_to(m, 16) && aligned_to(gate, 16) && aligned_to(up, 16))
        swiglu_fwd_kernel<8><<<cuda_blocks(n / 8 + 1, 256), 256, 0, cuda_stream()>>>(mb, gb, ub, n);
    else
        swiglu_fwd_kernel<1><<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(mb, gb, ub, n);
}

extern "C" void swiglu_backward_cuda(dt_bf16 *dgate, dt_bf16 *dup, const float *dm, const dt_bf16 *gate,
                                     const dt_bf16 *up, int64_t n) {
    if (n <= 0) return;
    bf16 *dgb = (bf16 *)dgate, *dub = (bf16 *)dup;
    const bf16 *gb = (const bf16 *)gate, *ub = (const bf16 *)up;
    if (aligned_to(dgate, 16) && aligned_to(dup, 16) && aligned_to(gate, 16) && aligned_to(up, 16) &&
        aligned_to(dm, 16))
        swiglu_bwd_kernel<8><<<cuda_blocks(n / 8 + 1, 256), 256, 0, cuda_stream()>>>(dgb, dub, dm, gb, ub, n);
    else
        swiglu_bwd_kernel<1><<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(dgb, dub, dm, gb, ub, n);
}
