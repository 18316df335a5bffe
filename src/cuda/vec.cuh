// Vector loads and stores between memory and fp32 registers, shared by the elementwise kernels:
// V consecutive values move as 16-, 8- or 4-byte accesses where the caller guarantees alignment.
#ifndef DT_CUDA_VEC_CUH
#define DT_CUDA_VEC_CUH

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

#endif
