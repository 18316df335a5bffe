// SwiGLU, elementwise: 16-byte bf16 vectors (8 values) per thread when the pointers allow.
#include "cuda/cuda_internal.h"

static inline bool aligned_to(const void *p, unsigned bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }

// V consecutive values to and from fp32 registers.
template <int V> static __device__ __forceinline__ void ldv(float *o, const float *p) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int k = 0; k < V / 4; k++) {
            float4 f = reinterpret_cast<const float4 *>(p)[k];
            o[4 * k] = f.x, o[4 * k + 1] = f.y, o[4 * k + 2] = f.z, o[4 * k + 3] = f.w;
        }
    } else if constexpr (V == 2) {
        float2 f = *reinterpret_cast<const float2 *>(p);
        o[0] = f.x, o[1] = f.y;
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) o[k] = p[k];
    }
}
template <int V> static __device__ __forceinline__ void stv(float *p, const float *o) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int k = 0; k < V / 4; k++)
            reinterpret_cast<float4 *>(p)[k] = make_float4(o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]);
    } else if constexpr (V == 2) {
        *reinterpret_cast<float2 *>(p) = make_float2(o[0], o[1]);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) p[k] = o[k];
    }
}
// bf16 vectors move as one 16- or 8-byte access (the caller guarantees the alignment).
static __device__ __forceinline__ void unpack2(float *o, unsigned u) {
    float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
    o[0] = f.x, o[1] = f.y;
}
static __device__ __forceinline__ unsigned pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned *>(&h);
}
template <int V> static __device__ __forceinline__ void ldv(float *o, const bf16 *p) {
    if constexpr (V % 8 == 0) {
#pragma unroll
        for (int k = 0; k < V / 8; k++) {
            uint4 u = reinterpret_cast<const uint4 *>(p)[k];
            unpack2(o + 8 * k, u.x), unpack2(o + 8 * k + 2, u.y), unpack2(o + 8 * k + 4, u.z);
            unpack2(o + 8 * k + 6, u.w);
        }
    } else if constexpr (V % 4 == 0) {
#pragma unroll
        for (int k = 0; k < V / 4; k++) {
            uint2 u = reinterpret_cast<const uint2 *>(p)[k];
            unpack2(o + 4 * k, u.x), unpack2(o + 4 * k + 2, u.y);
        }
    } else if constexpr (V % 2 == 0) {
#pragma unroll
        for (int k = 0; k < V / 2; k++) unpack2(o + 2 * k, reinterpret_cast<const unsigned *>(p)[k]);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) o[k] = __bfloat162float(p[k]);
    }
}
template <int V> static __device__ __forceinline__ void stv(bf16 *p, const float *o) {
    if constexpr (V % 8 == 0) {
#pragma unroll
        for (int k = 0; k < V / 8; k++)
            reinterpret_cast<uint4 *>(p)[k] = make_uint4(pack2(o[8 * k], o[8 * k + 1]), pack2(o[8 * k + 2], o[8 * k + 3]),
                                                         pack2(o[8 * k + 4], o[8 * k + 5]),
                                                         pack2(o[8 * k + 6], o[8 * k + 7]));
    } else if constexpr (V % 4 == 0) {
#pragma unroll
        for (int k = 0; k < V / 4; k++)
            reinterpret_cast<uint2 *>(p)[k] = make_uint2(pack2(o[4 * k], o[4 * k + 1]), pack2(o[4 * k + 2], o[4 * k + 3]));
    } else if constexpr (V % 2 == 0) {
#pragma unroll
        for (int k = 0; k < V / 2; k++) reinterpret_cast<unsigned *>(p)[k] = pack2(o[2 * k], o[2 * k + 1]);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) p[k] = __float2bfloat16(o[k]);
    }
}

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
