// Conversions, the residual add and the embedding lookup: memory-bound, so each thread moves
// 16-byte vectors when the pointers allow it, with a scalar path for odd sizes and offsets.
#include "cuda/cuda_internal.h"
#include "cuda/vec.cuh"

#define MISC_THREADS 256


// y = x, converting types; V-wide chunks, then the n % V tail one at a time.
template <int V, typename TO, typename TI> __global__ void convert_kernel(TO *y, const TI *x, int64_t n) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    int64_t nv = n / V;
    for (int64_t i = i0; i < nv; i += stride) {
        float v[V];
        ldv<V>(v, x + i * V);
        stv<V>(y + i * V, v);
    }
    for (int64_t i = nv * V + i0; i < n; i += stride) st(y + i, ld(x + i));
}

template <int V> __global__ void add_kernel(float *y, const float *x, int64_t n) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    int64_t nv = n / V;
    for (int64_t i = i0; i < nv; i += stride) {
        float a[V], b[V];
        ldv<V>(a, y + i * V);
        ldv<V>(b, x + i * V);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] += b[k];
        stv<V>(y + i * V, a);
    }
    for (int64_t i = nv * V + i0; i < n; i += stride) y[i] += x[i];
}

extern "C" void cuda_f32_to_bf16(dt_bf16 *y, const float *x, int64_t n) {
    if (n <= 0) return;
    bf16 *yb = (bf16 *)y;
    if (aligned_to(x, 16) && aligned_to(y, 8))
        convert_kernel<4><<<cuda_blocks(n / 4 + 1, MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(yb, x, n);
    else
        convert_kernel<1><<<cuda_blocks(n, MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(yb, x, n);
}

extern "C" void cuda_bf16_to_f32(float *y, const dt_bf16 *x, int64_t n) {
    if (n <= 0) return;
    const bf16 *xb = (const bf16 *)x;
    if (aligned_to(x, 8) && aligned_to(y, 16))
        convert_kernel<4><<<cuda_blocks(n / 4 + 1, MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(y, xb, n);
    else
        convert_kernel<1><<<cuda_blocks(n, MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(y, xb, n);
}

extern "C" void cuda_add_f32(float *y, const float *x, int64_t n) {
    if (n <= 0) return;
    if (aligned_to(x, 16) && aligned_to(y, 16))
        add_kernel<4><<<cuda_blocks(n / 4 + 1, MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(y, x, n);
    else
        add_kernel<1><<<cuda_blocks(n, MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(y, x, n);
}

// One V-wide chunk of a row per thread; the row's id is read once per chunk (cached).
template <int V> __global__ void embedding_kernel(float *out, const int32_t *ids, int64_t T, const bf16 *E, int H) {
    int64_t per_row = H / V, n = T * per_row;
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        int64_t t = i / per_row, c = (i - t * per_row) * V;
        float v[V];
        ldv<V>(v, E + (int64_t)__ldg(ids + t) * H + c);
        stv<V>(out + t * H + c, v);
    }
}

extern "C" void embedding_forward_cuda(float *out, const int32_t *ids, int64_t T, const dt_bf16 *E, int H) {
    if (T <= 0 || H <= 0) return;
    const bf16 *Eb = (const bf16 *)E;
    if (H % 8 == 0 && aligned_to(E, 16) && aligned_to(out, 16))
        embedding_kernel<8><<<cuda_blocks(T * (H / 8), MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(out, ids, T,
                                                                                                      Eb, H);
    else
        embedding_kernel<1><<<cuda_blocks(T * H, MISC_THREADS), MISC_THREADS, 0, cuda_stream()>>>(out, ids, T, Eb, H);
}
