// The gated attention's elementwise parts: the per-head q/k RMSNorm fused with the partial
// rotary embedding (one warp per token-head, reading q straight out of q_proj's interleaved
// [query | gate] rows), and the sigmoid output gate.
#include "cuda/cuda_internal.h"
#include "cuda/vec.cuh"

#define QK_WARPS 8  // token-heads per block
// Rotary frequencies come from the host (computed as the CPU op does, so the angles match it
// bit for bit); pairs beyond this many compute theirs on the device.
#define QK_MAX_FREQ 256


// The approximate reciprocal (about 1 ulp) instead of an IEEE division: these kernels are short
// enough that instruction count shows. Past x < -87 the sum overflows and sigmoid is 0.
static __device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

struct rope_freqs {
    float f[QK_MAX_FREQ];
};

// The block's inverse frequencies in shared memory, as the CPU's rope_rotate computes them.
static __device__ __forceinline__ void load_freqs(float *sf, const rope_freqs &rf, int half, int rot_dim,
                                                  double theta) {
    for (int i = threadIdx.x; i < half; i += blockDim.x)
        sf[i] = i < QK_MAX_FREQ ? rf.f[i] : (float)(1.0 / pow(theta, (double)(2 * i) / rot_dim));
    __syncthreads();
}

// Rows: token t, head h (row t * n_heads + h). Pairs (i, i + half) of the first rot_dim dims
// rotate by pos * inv_freq[i]; the rest of the head only normalises. V-wide chunks throughout
// (the host picks V = 4 only when hd, half and the strides allow it).
template <int V>
__global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_fwd_kernel(bf16 *y, const bf16 *x, int64_t row_stride, int head_stride, const float *w,
                            const int32_t *pos, int64_t N, int n_heads, int hd, int rot_dim, double theta, float eps,
                            rope_freqs rf) {
    extern __shared__ float sf[];
    int half = rot_dim / 2;
    load_freqs(sf, rf, half, rot_dim, theta);
    int64_t row = (int64_t)blockIdx.x * QK_WARPS + threadIdx.x / 32;
    if (row >= N * n_heads) return;
    int lane = threadIdx.x % 32;
    int64_t t = row / n_heads;
    int h = (int)(row - t * n_heads);
    const bf16 *xr = x + t * row_stride + (int64_t)h * head_stride;
    bf16 *yr = y + row * hd;
    float ss = 0;
    for (int i = lane * V; i < hd; i += 32 * V) {
        float a[V];
        ldv<V>(a, xr + i);
#pragma unroll
        for (int k = 0; k < V; k++) ss += a[k] * a[k];
    }
    float r = rsqrtf(warp_sum(ss) / hd + eps);
    float p = (float)__ldg(pos + t);
    for (int i = lane * V; i < half; i += 32 * V) {
        float a[V], b[V], wa[V], wb[V];
        ldv<V>(a, xr + i);
        ldv<V>(b, xr + i + half);
        ldv<V>(wa, w + i);
        ldv<V>(wb, w + i + half);
#pragma unroll
        for (int k = 0; k < V; k++) {
            float s, c;
            sincosf(p * sf[i + k], &s, &c);
            float na = a[k] * r * (1.0f + wa[k]), nb = b[k] * r * (1.0f + wb[k]);
            a[k] = na * c - nb * s;
            b[k] = nb * c + na * s;
        }
        stv<V>(yr + i, a);
        stv<V>(yr + i + half, b);
    }
    for (int i = 2 * half + lane * V; i < hd; i += 32 * V) {
        float a[V], b[V];
        ldv<V>(a, xr + i);
        ldv<V>(b, w + i);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] = a[k] * r * (1.0f + b[k]);
        stv<V>(yr + i, a);
    }
}

// Values i .. i + V - 1 of a head's rotated pairs: x's halves (a, b), the norm weight's (wa, wb),
// and dy turned back by the rotation (da, db) at position p.
template <int V>
static __device__ __forceinline__ void rotated_pair(float *a, float *b, float *wa, float *wb, float *da, float *db,
                                                    const bf16 *xr, const float *w, const float *dyr, const float *sf,
                                                    int i, int half, float p) {
    float ga[V], gb[V];
    ldv<V>(a, xr + i);
    ldv<V>(b, xr + i + half);
    ldv<V>(wa, w + i);
    ldv<V>(wb, w + i + half);
    ldv<V>(ga, dyr + i);
    ldv<V>(gb, dyr + i + half);
#pragma unroll
    for (int k = 0; k < V; k++) {
        float s, c;
        sincosf(p * sf[i + k], &s, &c);
        da[k] = ga[k] * c + gb[k] * s;
        db[k] = gb[k] * c - ga[k] * s;
    }
}

// The inverse rotation of dy gives the gradient g of the normed values; then the RMSNorm's
// backward: dx = r (dn - n mean(n dn)), n = x r, dn = g (1 + w).
template <int V>
__global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_bwd_kernel(bf16 *dx, int64_t row_stride, int head_stride, const float *dy, const bf16 *x,
                            const float *w, const int32_t *pos, int64_t N, int n_heads, int hd, int rot_dim,
                            double theta, float eps, rope_freqs rf) {
    extern __shared__ float sf[];
    int half = rot_dim / 2;
    load_freqs(sf, rf, half, rot_dim, theta);
    int64_t row = (int64_t)blockIdx.x * QK_WARPS + threadIdx.x / 32;
    if (row >= N * n_heads) return;
    int lane = threadIdx.x % 32;
    int64_t t = row / n_heads;
    int h = (int)(row - t * n_heads);
    int64_t xo = t * row_stride + (int64_t)h * head_stride;
    const bf16 *xr = x + xo;
    const float *dyr = dy + row * hd;
    float p = (float)__ldg(pos + t);
    float ss = 0, dot = 0;  // sum x^2, sum x dn
    for (int i = lane * V; i < half; i += 32 * V) {
        float a[V], b[V], wa[V], wb[V], da[V], db[V];
        rotated_pair<V>(a, b, wa, wb, da, db, xr, w, dyr, sf, i, half, p);
#pragma unroll
        for (int k = 0; k < V; k++) {
            ss += a[k] * a[k] + b[k] * b[k];
            dot += a[k] * da[k] * (1.0f + wa[k]) + b[k] * db[k] * (1.0f + wb[k]);
        }
    }
    for (int i = 2 * half + lane * V; i < hd; i += 32 * V) {
        float a[V], b[V], g[V];
        ldv<V>(a, xr + i);
        ldv<V>(b, w + i);
        ldv<V>(g, dyr + i);
#pragma unroll
        for (int k = 0; k < V; k++) {
            ss += a[k] * a[k];
            dot += a[k] * g[k] * (1.0f + b[k]);
        }
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    float r = rsqrtf(ss / hd + eps), cc = r * r * r * dot / hd;
    bf16 *dxr = dx + xo;
    for (int i = lane * V; i < half; i += 32 * V) {
        float a[V], b[V], wa[V], wb[V], da[V], db[V];
        rotated_pair<V>(a, b, wa, wb, da, db, xr, w, dyr, sf, i, half, p);
#pragma unroll
        for (int k = 0; k < V; k++) {
            a[k] = r * da[k] * (1.0f + wa[k]) - a[k] * cc;
            b[k] = r * db[k] * (1.0f + wb[k]) - b[k] * cc;
        }
        stv<V>(dxr + i, a);
        stv<V>(dxr + i + half, b);
    }
    for (int i = 2 * half + lane * V; i < hd; i += 32 * V) {
        float a[V], b[V], g[V];
        ldv<V>(a, xr + i);
        ldv<V>(b, w + i);
        ldv<V>(g, dyr + i);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] = r * g[k] * (1.0f + b[k]) - a[k] * cc;
        stv<V>(dxr + i, a);
    }
}

// The common shapes (hd = 32 V, at most 32 rotated pairs, each lane's V values all on one side
// of the halves): each lane holds V values of the head in registers, lane i computes pair i's
// angle, and a value's partner in the rotation comes from lane +- half / V by a shuffle.
template <int V>
__global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_fwd_fast(bf16 *y, const bf16 *x, int64_t row_stride, int head_stride, const float *w,
                          const int32_t *pos, int64_t N, int n_heads, int rot_dim, double theta, float eps,
                          rope_freqs rf) {
    constexpr int hd = 32 * V;
    extern __shared__ float sf[];
    int half = rot_dim / 2;
    load_freqs(sf, rf, half, rot_dim, theta);
    int64_t row = (int64_t)blockIdx.x * QK_WARPS + threadIdx.x / 32;
    if (row >= N * n_heads) return;
    int lane = threadIdx.x % 32, e0 = lane * V;
    int64_t t = row / n_heads;
    int h = (int)(row - t * n_heads);
    float a[V], b[V];
    ldv<V>(a, x + t * row_stride + (int64_t)h * head_stride + e0);
    ldv<V>(b, w + e0);
    float c = 1, s = 0;
    if (lane < half) sincosf((float)__ldg(pos + t) * sf[lane], &s, &c);
    float ss = 0;
#pragma unroll
    for (int k = 0; k < V; k++) ss += a[k] * a[k];
    float r = rsqrtf(warp_sum(ss) / hd + eps);
    bool lo = e0 < half, rot = e0 < 2 * half;
    int src = lo ? lane + half / V : rot ? lane - half / V : lane, pair = lo ? e0 : e0 - half;
#pragma unroll
    for (int k = 0; k < V; k++) {
        a[k] = a[k] * r * (1.0f + b[k]);
        float p = __shfl_sync(0xffffffffu, a[k], src);
        float ck = __shfl_sync(0xffffffffu, c, (pair + k) & 31), sk = __shfl_sync(0xffffffffu, s, (pair + k) & 31);
        if (lo) a[k] = a[k] * ck - p * sk;
        else if (rot) a[k] = a[k] * ck + p * sk;
    }
    stv<V>(y + row * hd + e0, a);
}

template <int V>
__global__ void __launch_bounds__(QK_WARPS * 32)
    qk_norm_rope_bwd_fast(bf16 *dx, int64_t row_stride, int head_stride, const float *dy, const bf16 *x,
                          const float *w, const int32_t *pos, int64_t N, int n_heads, int rot_dim, double theta,
                          float eps, rope_freqs rf) {
    constexpr int hd = 32 * V;
    extern __shared__ float sf[];
    int half = rot_dim / 2;
    load_freqs(sf, rf, half, rot_dim, theta);
    int64_t row = (int64_t)blockIdx.x * QK_WARPS + threadIdx.x / 32;
    if (row >= N * n_heads) return;
    int lane = threadIdx.x % 32, e0 = lane * V;
    int64_t t = row / n_heads;
    int h = (int)(row - t * n_heads);
    int64_t xo = t * row_stride + (int64_t)h * head_stride + e0;
    float a[V], b[V], g[V];
    ldv<V>(a, x + xo);
    ldv<V>(b, w + e0);
    ldv<V>(g, dy + row * hd + e0);
    float c = 1, s = 0;
    if (lane < half) sincosf((float)__ldg(pos + t) * sf[lane], &s, &c);
    bool lo = e0 < half, rot = e0 < 2 * half;
    int src = lo ? lane + half / V : rot ? lane - half / V : lane, pair = lo ? e0 : e0 - half;
    float ss = 0, dot = 0;  // sum x^2, sum x dn
#pragma unroll
    for (int k = 0; k < V; k++) {
        // the inverse rotation: g becomes the gradient of the normed value
        float p = __shfl_sync(0xffffffffu, g[k], src);
        float ck = __shfl_sync(0xffffffffu, c, (pair + k) & 31), sk = __shfl_sync(0xffffffffu, s, (pair + k) & 31);
        if (lo) g[k] = g[k] * ck + p * sk;
        else if (rot) g[k] = g[k] * ck - p * sk;
        g[k] *= 1.0f + b[k];
        ss += a[k] * a[k];
        dot += a[k] * g[k];
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    float r = rsqrtf(ss / hd + eps), cc = r * r * r * dot / hd;
#pragma unroll
    for (int k = 0; k < V; k++) a[k] = r * g[k] - a[k] * cc;
    stv<V>(dx + xo, a);
}

static rope_freqs host_freqs(int rot_dim, double theta) {
    rope_freqs rf;
    int half = rot_dim / 2;
    for (int i = 0; i < QK_MAX_FREQ; i++)
        rf.f[i] = i < half ? (float)(1.0 / pow(theta, (double)(2 * i) / rot_dim)) : 0.0f;
    return rf;
}

// V = 4 needs every chunk (of the rotated halves and of the rest) to start on a multiple of 4
// and the pointers to allow 8-byte bf16 and 16-byte fp32 loads.
static bool qk_vec4(const void *x, int64_t row_stride, int head_stride, const void *other_bf16, const float *f32a,
                    const float *f32b, int hd, int rot_dim) {
    return hd % 4 == 0 && rot_dim % 8 == 0 && row_stride % 4 == 0 && head_stride % 4 == 0 && aligned_to(x, 8) &&
           aligned_to(other_bf16, 8) && aligned_to(f32a, 16) && aligned_to(f32b, 16);
}

// The V of the register path (hd = 32 V) when the shape and the pointers allow it, else 0.
static int qk_fast_v(const void *x, int64_t row_stride, int head_stride, const void *other_bf16, const float *f32a,
                     const float *f32b, int hd, int rot_dim) {
    int V = hd == 256 ? 8 : hd == 128 ? 4 : hd == 64 ? 2 : 0;
    int half = rot_dim / 2;
    if (!V || half > 32 || half % V || rot_dim > hd || row_stride % V || head_stride % V) return 0;
    unsigned fa = V >= 4 ? 16 : 8;
    if (!aligned_to(x, 2 * V) || !aligned_to(other_bf16, 2 * V) || !aligned_to(f32a, fa) || !aligned_to(f32b, fa))
        return 0;
    return V;
}

extern "C" void qk_norm_rope_forward_cuda(dt_bf16 *y, const dt_bf16 *x, int64_t row_stride, int head_stride,
                                          const float *w, const int32_t *pos, int64_t N, int n_heads, int hd,
                                          int rot_dim, double theta, float eps) {
    if (N <= 0 || n_heads <= 0 || hd <= 0) return;
    rot_dim &= ~1;
    rope_freqs rf = host_freqs(rot_dim, theta);
    int64_t rows = N * n_heads;
    unsigned nb = (unsigned)((rows + QK_WARPS - 1) / QK_WARPS);
    size_t smem = sizeof(float) * (rot_dim / 2 + 1);
    bf16 *yb = (bf16 *)y;
    const bf16 *xb = (const bf16 *)x;
    int fv = qk_fast_v(x, row_stride, head_stride, y, w, w, hd, rot_dim);
    if (fv == 8)
        qk_norm_rope_fwd_fast<8><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(yb, xb, row_stride, head_stride, w, pos,
                                                                            N, n_heads, rot_dim, theta, eps, rf);
    else if (fv == 4)
        qk_norm_rope_fwd_fast<4><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(yb, xb, row_stride, head_stride, w, pos,
                                                                            N, n_heads, rot_dim, theta, eps, rf);
    else if (fv == 2)
        qk_norm_rope_fwd_fast<2><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(yb, xb, row_stride, head_stride, w, pos,
                                                                            N, n_heads, rot_dim, theta, eps, rf);
    else if (qk_vec4(x, row_stride, head_stride, y, w, w, hd, rot_dim))
        qk_norm_rope_fwd_kernel<4><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(
            yb, xb, row_stride, head_stride, w, pos, N, n_heads, hd, rot_dim, theta, eps, rf);
    else
        qk_norm_rope_fwd_kernel<1><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(
            yb, xb, row_stride, head_stride, w, pos, N, n_heads, hd, rot_dim, theta, eps, rf);
}

extern "C" void qk_norm_rope_backward_cuda(dt_bf16 *dx, int64_t row_stride, int head_stride, const float *dy,
                                           const dt_bf16 *x, const float *w, const int32_t *pos, int64_t N,
                                           int n_heads, int hd, int rot_dim, double theta, float eps) {
    if (N <= 0 || n_heads <= 0 || hd <= 0) return;
    rot_dim &= ~1;
    rope_freqs rf = host_freqs(rot_dim, theta);
    int64_t rows = N * n_heads;
    unsigned nb = (unsigned)((rows + QK_WARPS - 1) / QK_WARPS);
    size_t smem = sizeof(float) * (rot_dim / 2 + 1);
    bf16 *dxb = (bf16 *)dx;
    const bf16 *xb = (const bf16 *)x;
    int fv = qk_fast_v(x, row_stride, head_stride, dx, w, dy, hd, rot_dim);
    if (fv == 8)
        qk_norm_rope_bwd_fast<8><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(dxb, row_stride, head_stride, dy, xb, w,
                                                                            pos, N, n_heads, rot_dim, theta, eps, rf);
    else if (fv == 4)
        qk_norm_rope_bwd_fast<4><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(dxb, row_stride, head_stride, dy, xb, w,
                                                                            pos, N, n_heads, rot_dim, theta, eps, rf);
    else if (fv == 2)
        qk_norm_rope_bwd_fast<2><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(dxb, row_stride, head_stride, dy, xb, w,
                                                                            pos, N, n_heads, rot_dim, theta, eps, rf);
    else if (qk_vec4(x, row_stride, head_stride, dx, w, dy, hd, rot_dim))
        qk_norm_rope_bwd_kernel<4><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(
            dxb, row_stride, head_stride, dy, xb, w, pos, N, n_heads, hd, rot_dim, theta, eps, rf);
    else
        qk_norm_rope_bwd_kernel<1><<<nb, QK_WARPS * 32, smem, cuda_stream()>>>(
            dxb, row_stride, head_stride, dy, xb, w, pos, N, n_heads, hd, rot_dim, theta, eps, rf);
}

// Element e of head-row r (r = t nh + h) is x[r hd + e]; its gate is qg[r 2 hd + hd + e]. y's rows
// (of d = nh hd) are ldy long.
template <int V>
__global__ void attn_gate_fwd_kernel(bf16 *y, int64_t ldy, const bf16 *x, const bf16 *qg, int64_t n, int64_t d,
                                     int hd) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V; i < n; i += stride * V) {
        int64_t r = i / hd, t = i / d;
        float a[V], g[V];
        ldv<V>(a, x + i);
        ldv<V>(g, qg + i + r * hd + hd);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] *= sigmoid_f(g[k]);
        stv<V>(y + t * ldy + (i - t * d), a);
    }
}

template <int V>
__global__ void attn_gate_bwd_kernel(bf16 *dx, bf16 *dqg, const float *dy, const bf16 *x, const bf16 *qg, int64_t n,
                                     int hd) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V; i < n; i += stride * V) {
        int64_t go = i + (i / hd) * hd + hd;
        float a[V], g[V], d[V];
        ldv<V>(a, x + i);
        ldv<V>(g, qg + go);
        ldv<V>(d, dy + i);
#pragma unroll
        for (int k = 0; k < V; k++) {
            float s = sigmoid_f(g[k]);
            g[k] = d[k] * a[k] * s * (1.0f - s);
            a[k] = d[k] * s;
        }
        stv<V>(dx + i, a);
        stv<V>(dqg + go, g);
    }
}

extern "C" void attn_gate_forward_cuda(dt_bf16 *y, int64_t ldy, const dt_bf16 *x, const dt_bf16 *qg, int64_t N, int nh,
                                       int hd) {
    int64_t d = (int64_t)nh * hd, n = N * d;
    if (n <= 0) return;
    bf16 *yb = (bf16 *)y;
    const bf16 *xb = (const bf16 *)x, *qb = (const bf16 *)qg;
    if (hd % 4 == 0 && ldy % 4 == 0 && aligned_to(x, 8) && aligned_to(y, 8) && aligned_to(qg, 8))
        attn_gate_fwd_kernel<4><<<cuda_blocks(n / 4, 256), 256, 0, cuda_stream()>>>(yb, ldy, xb, qb, n, d, hd);
    else
        attn_gate_fwd_kernel<1><<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(yb, ldy, xb, qb, n, d, hd);
}

extern "C" void attn_gate_backward_cuda(dt_bf16 *dx, dt_bf16 *dqg, const float *dy, const dt_bf16 *x,
                                        const dt_bf16 *qg, int64_t N, int nh, int hd) {
    int64_t n = N * nh * hd;
    if (n <= 0) return;
    bf16 *dxb = (bf16 *)dx, *dqb = (bf16 *)dqg;
    const bf16 *xb = (const bf16 *)x, *qb = (const bf16 *)qg;
    if (hd % 4 == 0 && aligned_to(x, 8) && aligned_to(dx, 8) && aligned_to(qg, 8) && aligned_to(dqg, 8) &&
        aligned_to(dy, 16))
        attn_gate_bwd_kernel<4><<<cuda_blocks(n / 4, 256), 256, 0, cuda_stream()>>>(dxb, dqb, dy, xb, qb, n, hd);
    else
        attn_gate_bwd_kernel<1><<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(dxb, dqb, dy, xb, qb, n, hd);
}
