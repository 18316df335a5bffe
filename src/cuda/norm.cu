// The RMSNorms: one group of G threads per row (G from 32 to 256, so short rows such as the
// 128 values of a DeltaNet head do not idle most of a block), V-wide loads when the row
// length and pointers allow, the row's sums reduced by warp shuffles (and shared memory
// across the warps of a group). Each op reads its row twice; the second pass hits L1.
#include "cuda/cuda_internal.h"
#include "cuda/vec.cuh"

#define NORM_THREADS 256


// The approximate reciprocal (about 1 ulp) instead of an IEEE division: these kernels are short
// enough that instruction count shows. Past x < -87 the sum overflows and sigmoid is 0.
static __device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// Sums NS values over each group of G threads (consecutive in the block); every thread of
// the group gets the totals. Every thread of the block must call it (it may synchronise).
template <int G, int NS> static __device__ __forceinline__ void group_sum(float (&v)[NS]) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int k = 0; k < NS; k++) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    if constexpr (G > 32) {
        __shared__ float part[NS][NORM_THREADS / 32];
        int warp = threadIdx.x / 32, first = (threadIdx.x / G) * (G / 32);
        if (threadIdx.x % 32 == 0)
#pragma unroll
            for (int k = 0; k < NS; k++) part[k][warp] = v[k];
        __syncthreads();
#pragma unroll
        for (int k = 0; k < NS; k++) {
            float s = 0;
#pragma unroll
            for (int w = 0; w < G / 32; w++) s += part[k][first + w];
            v[k] = s;
        }
    }
}

// The chunks of a row a thread visits: chunk c starts at i = (lane + c G) V. With NC > 0 the
// row fits in NC chunks per thread and everything the second pass needs stays in registers
// (one trip to memory per row); NC = 0 takes any D and reads the row again (from L1).
#define ROW_CHUNKS                                                                       \
    _Pragma("unroll") for (int c = 0, i = lane * V; NC > 0 ? c < NC : i < D; c++, i += G * V) \
        if (NC > 0 && i >= D) break;                                                     \
        else
// Register slot of chunk c (slot 0, reloaded each time, when NC = 0).
#define SLOT (NC > 0 ? c : 0)

// y = x r (1 + w), r = 1 / rms(x)
template <int G, int V, int NC>
__global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm1p_fwd_kernel(bf16 *y, int64_t ldy, const float *x, const float *w, int64_t rows, int D, float eps) {
    constexpr int NR = NC > 0 ? NC : 1;
    int64_t row = (int64_t)blockIdx.x * (NORM_THREADS / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    bool live = row < rows;
    const float *xr = x + row * D;
    float a[NR][V], b[NR][V], s[1] = {0};
    if (live) ROW_CHUNKS {
            ldv<V>(a[SLOT], xr + i);
            if (NC > 0) ldv<V>(b[SLOT], w + i);
#pragma unroll
            for (int k = 0; k < V; k++) s[0] += a[SLOT][k] * a[SLOT][k];
        }
    group_sum<G, 1>(s);
    if (!live) return;
    float r = rsqrtf(s[0] / D + eps);
    ROW_CHUNKS {
        if (NC == 0) ldv<V>(a[SLOT], xr + i), ldv<V>(b[SLOT], w + i);
        float o[V];
#pragma unroll
        for (int k = 0; k < V; k++) o[k] = a[SLOT][k] * r * (1.0f + b[SLOT][k]);
        stv<V>(y + row * ldy + i, o);
    }
}

// v = p[i .. i + V), or zeros when p is NULL
template <int V>
__device__ __forceinline__ void load_or_zero(float *v, const float *p, int64_t i) {
    if (p) ldv<V>(v, p + i);
    else
#pragma unroll
        for (int k = 0; k < V; k++) v[k] = 0.0f;
}

// dx = res + r (dn - n mean(n dn)), n = x r, dn = dy (1 + w); res NULL: zero, res may be dx;
// dxb (when not NULL) = dx as bf16
template <int G, int V, int NC>
__global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm1p_bwd_kernel(float *dx, bf16 *dxb, int64_t ldb, const float *res, const float *dy, const float *x,
                         const float *w, int64_t rows, int D, float eps) {
    constexpr int NR = NC > 0 ? NC : 1;
    int64_t row = (int64_t)blockIdx.x * (NORM_THREADS / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    bool live = row < rows;
    const float *xr = x + row * D, *dyr = dy + row * D;
    float *dxr = dx + row * D;
    const float *rr = res ? res + row * D : NULL;
    float a[NR][V], g[NR][V], b[NR][V], o[NR][V];
    float s[2] = {0, 0};  // sum x^2, sum x dn
    if (live) ROW_CHUNKS {
            ldv<V>(a[SLOT], xr + i);
            ldv<V>(g[SLOT], dyr + i);
            ldv<V>(b[SLOT], w + i);
            if (NC > 0) load_or_zero<V>(o[SLOT], rr, i);
#pragma unroll
            for (int k = 0; k < V; k++) {
                s[0] += a[SLOT][k] * a[SLOT][k];
                s[1] += a[SLOT][k] * g[SLOT][k] * (1.0f + b[SLOT][k]);
            }
        }
    group_sum<G, 2>(s);
    if (!live) return;
    float r = rsqrtf(s[0] / D + eps);
    float cc = r * r * r * s[1] / D;  // dx += r dn - x r^3 mean(x dn)
    ROW_CHUNKS {
        if (NC == 0) {
            ldv<V>(a[SLOT], xr + i), ldv<V>(g[SLOT], dyr + i), ldv<V>(b[SLOT], w + i);
            load_or_zero<V>(o[SLOT], rr, i);
        }
#pragma unroll
        for (int k = 0; k < V; k++) o[SLOT][k] += r * g[SLOT][k] * (1.0f + b[SLOT][k]) - a[SLOT][k] * cc;
        stv<V>(dxr + i, o[SLOT]);
        if (dxb) stv<V>(dxb + row * ldb + i, o[SLOT]);
    }
}

// y = w x r silu(z)
template <int G, int V, int NC>
__global__ void __launch_bounds__(NORM_THREADS) rmsnorm_gated_fwd_kernel(bf16 *y, int heads, int64_t ldy,
                                                                         const bf16 *x, const bf16 *z, int64_t ldz,
                                                                         const float *w, int64_t rows, int D,
                                                                         float eps) {
    constexpr int NR = NC > 0 ? NC : 1;
    int64_t row = (int64_t)blockIdx.x * (NORM_THREADS / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    bool live = row < rows;
    const bf16 *xr = x + row * D, *zr = z + row / heads * ldz + row % heads * D;
    float a[NR][V], zz[NR][V], b[NR][V], s[1] = {0};
    if (live) ROW_CHUNKS {
            ldv<V>(a[SLOT], xr + i);
            if (NC > 0) ldv<V>(zz[SLOT], zr + i), ldv<V>(b[SLOT], w + i);
#pragma unroll
            for (int k = 0; k < V; k++) s[0] += a[SLOT][k] * a[SLOT][k];
        }
    group_sum<G, 1>(s);
    if (!live) return;
    float r = rsqrtf(s[0] / D + eps);
    ROW_CHUNKS {
        if (NC == 0) ldv<V>(a[SLOT], xr + i), ldv<V>(zz[SLOT], zr + i), ldv<V>(b[SLOT], w + i);
        float o[V];
#pragma unroll
        for (int k = 0; k < V; k++) o[k] = b[SLOT][k] * a[SLOT][k] * r * zz[SLOT][k] * sigmoid_f(zz[SLOT][k]);
        stv<V>(y + row / heads * ldy + row % heads * D + i, o);
    }
}

// dz = dy w n silu'(z); dx = r (dn - n mean(n dn)), n = x r, dn = dy w silu(z); both overwritten
template <int G, int V, int NC>
__global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm_gated_bwd_kernel(float *dx, bf16 *dz, int64_t lddz, int heads, const float *dy, const bf16 *x,
                             const bf16 *z, int64_t ldz, const float *w, int64_t rows, int D, float eps) {
    constexpr int NR = NC > 0 ? NC : 1;
    int64_t row = (int64_t)blockIdx.x * (NORM_THREADS / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    bool live = row < rows;
    const bf16 *xr = x + row * D, *zr = z + row / heads * ldz + row % heads * D;
    const float *dyr = dy + row * D;
    float a[NR][V], zz[NR][V], g[NR][V], b[NR][V];
    float s[2] = {0, 0};  // sum x^2, sum x dn
    if (live) ROW_CHUNKS {
            ldv<V>(a[SLOT], xr + i);
            ldv<V>(zz[SLOT], zr + i);
            ldv<V>(g[SLOT], dyr + i);
            ldv<V>(b[SLOT], w + i);
#pragma unroll
            for (int k = 0; k < V; k++)
                s[1] += a[SLOT][k] * g[SLOT][k] * b[SLOT][k] * zz[SLOT][k] * sigmoid_f(zz[SLOT][k]),
                    s[0] += a[SLOT][k] * a[SLOT][k];
        }
    group_sum<G, 2>(s);
    if (!live) return;
    float r = rsqrtf(s[0] / D + eps);
    float cc = r * r * r * s[1] / D;
    ROW_CHUNKS {
        if (NC == 0) ldv<V>(a[SLOT], xr + i), ldv<V>(zz[SLOT], zr + i), ldv<V>(g[SLOT], dyr + i), ldv<V>(b[SLOT], w + i);
        float ox[V], oz[V];
#pragma unroll
        for (int k = 0; k < V; k++) {
            float z1 = zz[SLOT][k], sg = sigmoid_f(z1), gw = g[SLOT][k] * b[SLOT][k];
            oz[k] = gw * a[SLOT][k] * r * sg * (1.0f + z1 * (1.0f - sg));
            ox[k] = r * gw * z1 * sg - a[SLOT][k] * cc;
        }
        stv<V>(dx + row * D + i, ox);
        stv<V>(dz + row / heads * lddz + row % heads * D + i, oz);
    }
}

// Group size: about four V-chunks per thread, at least a warp, at most the block.
static int group_for(int D, int V) {
    int chunks = (D + V - 1) / V, g = 32;
    while (g < NORM_THREADS && g * 4 < chunks) g *= 2;
    return g;
}

// Chunks per thread rounded up to 1, 2, 4 or 8 (registers), or 0 (loop) beyond.
static int chunks_for(int D, int V, int G) {
    int per = ((D + V - 1) / V + G - 1) / G;
    return per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : per <= 8 ? 8 : 0;
}

// Launches KERNEL<G, V, NC> over rows with the G and NC the row length asks for. Below 256
// threads a group never needs more than 4 chunks (group_for).
#define NORM_CASE(KERNEL, G, V, NC, ...) \
    if (g_ == G && nc_ == NC) KERNEL<G, V, NC><<<(unsigned)((rows_ + NORM_THREADS / G - 1) / (NORM_THREADS / G)), NORM_THREADS, 0, s_>>>(__VA_ARGS__)
#define NORM_LAUNCH(KERNEL, V, rows, D, ...)                                                              \
    do {                                                                                                  \
        int64_t rows_ = rows;                                                                             \
        int g_ = group_for(D, V), nc_ = chunks_for(D, V, g_);                                             \
        cudaStream_t s_ = cuda_stream();                                                                  \
        NORM_CASE(KERNEL, 32, V, 1, __VA_ARGS__);                                                         \
        else NORM_CASE(KERNEL, 32, V, 2, __VA_ARGS__);                                                    \
        else NORM_CASE(KERNEL, 32, V, 4, __VA_ARGS__);                                                    \
        else NORM_CASE(KERNEL, 64, V, 4, __VA_ARGS__);                                                    \
        else NORM_CASE(KERNEL, 128, V, 4, __VA_ARGS__);                                                   \
        else NORM_CASE(KERNEL, 256, V, 4, __VA_ARGS__);                                                   \
        else NORM_CASE(KERNEL, 256, V, 8, __VA_ARGS__);                                                   \
        else KERNEL<256, V, 0><<<(unsigned)rows_, NORM_THREADS, 0, s_>>>(__VA_ARGS__);         \
    } while (0)

extern "C" void rmsnorm1p_forward_cuda(dt_bf16 *y, int64_t ldy, const float *x, const float *w, int64_t rows, int D,
                                       float eps) {
    if (rows <= 0 || D <= 0) return;
    bf16 *yb = (bf16 *)y;
    if (D % 4 == 0 && ldy % 4 == 0 && aligned_to(x, 16) && aligned_to(w, 16) && aligned_to(y, 8))
        NORM_LAUNCH(rmsnorm1p_fwd_kernel, 4, rows, D, yb, ldy, x, w, rows, D, eps);
    else
        NORM_LAUNCH(rmsnorm1p_fwd_kernel, 1, rows, D, yb, ldy, x, w, rows, D, eps);
}

extern "C" void rmsnorm1p_backward_cuda(float *dx, dt_bf16 *dx_bf, int64_t ld_bf, const float *dx_in, const float *dy,
                                        const float *x, const float *w, int64_t rows, int D, float eps) {
    if (rows <= 0 || D <= 0) return;
    bf16 *dxb = (bf16 *)dx_bf;
    if (D % 4 == 0 && ld_bf % 4 == 0 && aligned_to(dx, 16) && aligned_to(dxb, 8) && aligned_to(dx_in, 16) &&
        aligned_to(dy, 16) &&
        aligned_to(x, 16) && aligned_to(w, 16))
        NORM_LAUNCH(rmsnorm1p_bwd_kernel, 4, rows, D, dx, dxb, ld_bf, dx_in, dy, x, w, rows, D, eps);
    else
        NORM_LAUNCH(rmsnorm1p_bwd_kernel, 1, rows, D, dx, dxb, ld_bf, dx_in, dy, x, w, rows, D, eps);
}

extern "C" void rmsnorm_gated_forward_cuda(dt_bf16 *y, int heads, int64_t ldy, const dt_bf16 *x, const dt_bf16 *z,
                                           int64_t ldz, const float *w, int64_t rows, int D, float eps) {
    if (rows <= 0 || D <= 0) return;
    bf16 *yb = (bf16 *)y;
    const bf16 *xb = (const bf16 *)x, *zb = (const bf16 *)z;
    if (D % 4 == 0 && ldy % 4 == 0 && ldz % 4 == 0 && aligned_to(x, 8) && aligned_to(z, 8) && aligned_to(y, 8) &&
        aligned_to(w, 16))
        NORM_LAUNCH(rmsnorm_gated_fwd_kernel, 4, rows, D, yb, heads, ldy, xb, zb, ldz, w, rows, D, eps);
    else
        NORM_LAUNCH(rmsnorm_gated_fwd_kernel, 1, rows, D, yb, heads, ldy, xb, zb, ldz, w, rows, D, eps);
}

extern "C" void rmsnorm_gated_backward_cuda(float *dx, dt_bf16 *dz, int64_t lddz, int heads, const float *dy,
                                            const dt_bf16 *x, const dt_bf16 *z, int64_t ldz, const float *w,
                                            int64_t rows, int D, float eps) {
    if (rows <= 0 || D <= 0) return;
    bf16 *dzb = (bf16 *)dz;
    const bf16 *xb = (const bf16 *)x, *zb = (const bf16 *)z;
    if (D % 4 == 0 && ldz % 4 == 0 && lddz % 4 == 0 && aligned_to(x, 8) && aligned_to(z, 8) && aligned_to(dz, 8) &&
        aligned_to(w, 16) && aligned_to(dx, 16) && aligned_to(dy, 16))
        NORM_LAUNCH(rmsnorm_gated_bwd_kernel, 4, rows, D, dx, dzb, lddz, heads, dy, xb, zb, ldz, w, rows, D, eps);
    else
        NORM_LAUNCH(rmsnorm_gated_bwd_kernel, 1, rows, D, dx, dzb, lddz, heads, dy, xb, zb, ldz, w, rows, D, eps);
}
