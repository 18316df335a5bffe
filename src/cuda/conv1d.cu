// The causal depthwise conv + SiLU of the Gated DeltaNet over packed sequences. A thread owns
// VC adjacent channels (a warp reads contiguous channels) and CONV_TT consecutive tokens, so
// each input row is loaded once per thread for the K - 1 + CONV_TT outputs that use it. A token's
// sequence starts at t - pos[t]: rows before that are the zero history.
#include "cuda/cuda_internal.h"
#include "cuda/vec.cuh"

#define CONV_THREADS 128
#ifndef CONV_TT
#define CONV_TT 8  // tokens per thread
#endif
#ifndef CONV_VC
#define CONV_VC 2  // channels per thread on the fast path (4 and 8 measured slower: fewer warps)
#endif


// The approximate reciprocal (about 1 ulp) instead of an IEEE division: these kernels are short
// enough that instruction count shows. Past x < -87 the sum overflows and sigmoid is 0.
static __device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// The K taps of channels c0 .. c0 + VC - 1, in registers.
template <int K, int VC>
static __device__ __forceinline__ void load_taps(float wr[K][VC], const float *w, int c0) {
#pragma unroll
    for (int v = 0; v < VC; v++)
#pragma unroll
        for (int j = 0; j < K; j++) wr[j][v] = w[(int64_t)(c0 + v) * K + j];
}

// Rows first .. first + R - 1 of those channels, zero outside [0, N).
template <int R, int VC>
static __device__ __forceinline__ void load_window(float xw[R][VC], const bf16 *x, int64_t first, int64_t N, int C,
                                                   int c0) {
#pragma unroll
    for (int m = 0; m < R; m++) {
        int64_t s = first + m;
        if (s >= 0 && s < N) ldv<VC>(xw[m], x + s * C + c0);
        else
#pragma unroll
            for (int v = 0; v < VC; v++) xw[m][v] = 0;
    }
}

// The conv before SiLU of the token at window row q + K - 1: taps j >= jmin (the earlier ones
// fall before its sequence's start).
template <int K, int VC, int R>
static __device__ __forceinline__ void conv_at(float u[VC], const float wr[K][VC], const float xw[R][VC], int q,
                                               int jmin) {
#pragma unroll
    for (int v = 0; v < VC; v++) u[v] = 0;
#pragma unroll
    for (int j = 0; j < K; j++)
        if (j >= jmin)
#pragma unroll
            for (int v = 0; v < VC; v++) u[v] += wr[j][v] * xw[q + j][v];
}

// dx[s] = sum_j w[j] du[s + K - 1 - j] for the CONV_TT rows s = s0 .. of the thread's channels,
// over the tokens of each row's own sequence (token s0 + q's starts at row s0 + start[q]).
template <int K, int VC>
static __device__ __forceinline__ void store_dx(bf16 *dx, const float du[CONV_TT + K - 1][VC],
                                                const int start[CONV_TT + K - 1], const float wr[K][VC], int64_t s0,
                                                int64_t N, int C, int c0) {
#pragma unroll
    for (int q = 0; q < CONV_TT; q++) {
        int64_t s = s0 + q;
        if (s >= N) break;
        float o[VC];
#pragma unroll
        for (int v = 0; v < VC; v++) o[v] = 0;
#pragma unroll
        for (int j = 0; j < K; j++) {
            int qt = q + K - 1 - j;
            if (q >= start[qt])
#pragma unroll
                for (int v = 0; v < VC; v++) o[v] += wr[j][v] * du[qt][v];
        }
        stv<VC>(dx + s * C + c0, o);
    }
}

template <int K, int VC>
__global__ void __launch_bounds__(CONV_THREADS)
    conv1d_silu_fwd_kernel(bf16 *y, const bf16 *x, const float *w, const int32_t *pos, int64_t N, int C) {
    int c0 = (blockIdx.x * CONV_THREADS + threadIdx.x) * VC;
    if (c0 >= C) return;
    float wr[K][VC];
    load_taps<K, VC>(wr, w, c0);
    for (int64_t t0 = (int64_t)blockIdx.y * CONV_TT; t0 < N; t0 += (int64_t)gridDim.y * CONV_TT) {
        float xw[CONV_TT + K - 1][VC];  // rows t0 - K + 1 ..
        load_window<CONV_TT + K - 1, VC>(xw, x, t0 - K + 1, N, C, c0);
#pragma unroll
        for (int q = 0; q < CONV_TT; q++) {
            int64_t t = t0 + q;
            if (t >= N) break;
            float u[VC];
            conv_at<K, VC, CONV_TT + K - 1>(u, wr, xw, q, K - 1 - __ldg(pos + t));
#pragma unroll
            for (int v = 0; v < VC; v++) u[v] *= sigmoid_f(u[v]);
            stv<VC>(y + t * C + c0, u);
        }
    }
}

// du[t] = dy[t] silu'(u[t]) for the tokens t = s0 .. s0 + CONV_TT + K - 2 whose taps reach this
// thread's rows s; then dx[s] = sum_j w[j] du[s + K - 1 - j] over the t of the same sequence.
template <int K, int VC>
__global__ void __launch_bounds__(CONV_THREADS)
    conv1d_silu_bwd_kernel(bf16 *dx, const float *dy, const bf16 *x, const float *w, const int32_t *pos, int64_t N,
                           int C) {
    constexpr int NT = CONV_TT + K - 1;  // tokens whose du is needed
    int c0 = (blockIdx.x * CONV_THREADS + threadIdx.x) * VC;
    if (c0 >= C) return;
    float wr[K][VC];
    load_taps<K, VC>(wr, w, c0);
    for (int64_t s0 = (int64_t)blockIdx.y * CONV_TT; s0 < N; s0 += (int64_t)gridDim.y * CONV_TT) {
        float xw[NT + K - 1][VC];  // rows s0 - K + 1 ..
        load_window<NT + K - 1, VC>(xw, x, s0 - K + 1, N, C, c0);
        float du[NT][VC];
        int start[NT];  // token s0 + q's sequence starts at row s0 + start[q]
#pragma unroll
        for (int q = 0; q < NT; q++) {
            int64_t t = s0 + q;
            if (t >= N) {
                start[q] = q + 1;  // no row reaches a token past the end
#pragma unroll
                for (int v = 0; v < VC; v++) du[q][v] = 0;
                continue;
            }
            start[q] = q - __ldg(pos + t);
            float u[VC], g[VC];
            conv_at<K, VC, NT + K - 1>(u, wr, xw, q, K - 1 + start[q] - q);
            ldv<VC>(g, dy + t * C + c0);
#pragma unroll
            for (int v = 0; v < VC; v++) {
                float sg = sigmoid_f(u[v]);
                du[q][v] = g[v] * sg * (1.0f + u[v] * (1.0f - sg));
            }
        }
        store_dx<K, VC>(dx, du, start, wr, s0, N, C, c0);
    }
}

// The conv's output as the separate ops store it (and transformers' bf16 model has it): the
// fused kernels below norm the same values.
static __device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

// ---- the conv's backward with the q/k L2 norm's that follows it in the DeltaNet (deltanet.cu)
//
// dx from d(normed qkv) in one pass: each token's conv output c = silu(u) recomputed from x, the
// L2 norm's backward per head, dc = s' (dq - c s^2 (c . dq)) (s' = scale s, s = (|c|^2 + eps)^-1/2),
// then the conv's. Three passes before (the conv recomputed and stored, the norm's backward in
// place over fp32 dqkv, the conv's reading that back), 550 MB of traffic per 0.8B layer against 200.
// A warp owns one head's 128 channels (4 a lane; v's channels, not normed, in the same widths)
// and CL_TT consecutive tokens, which it walks from the last to the first with the K rows of x
// that the current token's conv reads and the K newest du (the current token's and the K - 1
// after it, which its dx row reads) in registers. Each row of x and dqkv is read once a tile, K - 1
// halo rows apart; the norm's sums are the warp's (shuffles, no barrier). (Tiles of 8 tokens by
// 256 channels a block, each thread recomputing the du of the K - 1 tokens after its tile and warp
// pairs meeting in shared memory, took 157 us a 0.8B layer of 4096 tokens against this one's 106.)
const int CL_HEAD = 128;  // head dim of the fused path (Qwen3.5's)
const int CL_TT = 32;  // tokens per warp
template <int K>
__global__ void __launch_bounds__(128)
    conv_l2norm_bwd_kernel(bf16 *__restrict__ dx, const float *__restrict__ dqkv, const bf16 *__restrict__ x,
                           const float *__restrict__ w, const int32_t *__restrict__ pos, int64_t N, int C,
                           int64_t qk_end, int64_t q_end, float q_scale, float eps) {
    constexpr int VC = 4;
    int lane = threadIdx.x & 31;
    int64_t head0 = ((int64_t)blockIdx.x * 4 + (threadIdx.x >> 5)) * CL_HEAD;
    if (head0 >= C) return;  // the whole warp: C is a multiple of CL_HEAD
    int c0 = (int)head0 + lane * VC;
    bool normed = head0 < qk_end;
    float scale = head0 < q_end ? q_scale : 1.0f;
    float wr[K][VC];
    load_taps<K, VC>(wr, w, c0);
    for (int64_t s0 = (int64_t)blockIdx.y * CL_TT; s0 < N; s0 += (int64_t)gridDim.y * CL_TT) {
        int64_t s1 = min(s0 + CL_TT, N), t_hi = min(s1 + K - 2, N - 1);
        float xw[K][VC];  // rows t - K + 1 .. t
        load_window<K, VC>(xw, x, t_hi - K + 1, N, C, c0);
        float du[K][VC];  // du of tokens t .. t + K - 1 (zero past t_hi)
        int st[K];        // their sequences' first rows, less s0
#pragma unroll
        for (int i = 0; i < K; i++) {
            st[i] = CL_TT + K;
#pragma unroll
            for (int v = 0; v < VC; v++) du[i][v] = 0;
        }
        float g[VC], xn[VC];  // the next token's dqkv row, the x row the window takes in next
        ldv<VC>(g, dqkv + t_hi * C + c0);
        int p = __ldg(pos + t_hi);
        for (int64_t t = t_hi; t >= s0; t--) {
            float gt[VC];
#pragma unroll
            for (int v = 0; v < VC; v++) gt[v] = g[v];
            int64_t start = t - p;  // the first row of t's sequence
            if (t > s0) {  // the next token's loads in flight while this one computes
                ldv<VC>(g, dqkv + (t - 1) * C + c0);
                p = __ldg(pos + t - 1);
            }
            if (t - K >= 0) ldv<VC>(xn, x + (t - K) * C + c0);
            else
#pragma unroll
                for (int v = 0; v < VC; v++) xn[v] = 0;
#pragma unroll
            for (int i = K - 1; i > 0; i--) {
                st[i] = st[i - 1];
#pragma unroll
                for (int v = 0; v < VC; v++) du[i][v] = du[i - 1][v];
            }
            st[0] = (int)(start > s0 - K ? start - s0 : -K);  // what is before the tile is all alike
            float u[VC], sg[VC], c[VC];
#pragma unroll
            for (int v = 0; v < VC; v++) u[v] = 0;
#pragma unroll
            for (int j = 0; j < K; j++)
                if (t - K + 1 + j >= start)
#pragma unroll
                    for (int v = 0; v < VC; v++) u[v] += wr[j][v] * xw[j][v];
            float a = 1.0f, b = 0.0f;  // dc = a dq - b c
            float ss = 0, dot = 0;
#pragma unroll
            for (int v = 0; v < VC; v++) {
                sg[v] = sigmoid_f(u[v]);
                c[v] = bf16_round(u[v] * sg[v]);
                ss += c[v] * c[v];
                dot += c[v] * gt[v];
            }
            if (normed) {
#pragma unroll
                for (int o = 16; o; o >>= 1) {
                    ss += __shfl_xor_sync(0xffffffffu, ss, o);
                    dot += __shfl_xor_sync(0xffffffffu, dot, o);
                }
                float rs = rsqrtf(ss + eps);
                a = scale * rs;
                b = a * rs * rs * dot;
            }
#pragma unroll
            for (int v = 0; v < VC; v++) du[0][v] = (a * gt[v] - b * c[v]) * sg[v] * (1.0f + u[v] * (1.0f - sg[v]));
            if (t < s1) {  // dx[t] = sum_j w[j] du[t + K - 1 - j], over the tokens of t's sequence
                float o[VC];
#pragma unroll
                for (int v = 0; v < VC; v++) o[v] = 0;
#pragma unroll
                for (int j = 0; j < K; j++)
                    if (st[K - 1 - j] <= t - s0)
#pragma unroll
                        for (int v = 0; v < VC; v++) o[v] += wr[j][v] * du[K - 1 - j][v];
                stv<VC>(dx + t * C + c0, o);
            }
#pragma unroll
            for (int j = K - 1; j > 0; j--)
#pragma unroll
                for (int v = 0; v < VC; v++) xw[j][v] = xw[j - 1][v];
#pragma unroll
            for (int v = 0; v < VC; v++) xw[0][v] = xn[v];
        }
    }
}

// The forward the same way: each token's conv output, then its L2 norm per q/k head, written as
// the normed qkv (v passed through); the conv output never reaches memory.
template <int K>
__global__ void __launch_bounds__(CONV_THREADS)
    conv_l2norm_fwd_kernel(bf16 *y, const bf16 *x, const float *w, const int32_t *pos, int64_t N, int C,
                           int64_t qk_end, int64_t q_end, float q_scale, float eps) {
    constexpr int VC = 2;
    __shared__ float red[CONV_THREADS / 32][CONV_TT];
    int c0 = (blockIdx.x * CONV_THREADS + threadIdx.x) * VC, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    bool normed = (int64_t)blockIdx.x * CONV_THREADS * VC < qk_end;
    float scale = c0 < q_end ? q_scale : 1.0f;
    float wr[K][VC];
    load_taps<K, VC>(wr, w, c0);
    for (int64_t t0 = (int64_t)blockIdx.y * CONV_TT; t0 < N; t0 += (int64_t)gridDim.y * CONV_TT) {
        float xw[CONV_TT + K - 1][VC];  // rows t0 - K + 1 ..
        load_window<CONV_TT + K - 1, VC>(xw, x, t0 - K + 1, N, C, c0);
        float cv[CONV_TT][VC];
#pragma unroll
        for (int q = 0; q < CONV_TT; q++) {
            int64_t t = t0 + q;
            conv_at<K, VC, CONV_TT + K - 1>(cv[q], wr, xw, q, t < N ? K - 1 - __ldg(pos + t) : K);
            float ss = 0;
#pragma unroll
            for (int v = 0; v < VC; v++) {
                cv[q][v] = bf16_round(cv[q][v] * sigmoid_f(cv[q][v]));
                ss += cv[q][v] * cv[q][v];
            }
            if (normed) {
#pragma unroll
                for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
                if (lane == 0) red[warp][q] = ss;
            }
        }
        if (normed) __syncthreads();
        int w0 = warp & ~1;
#pragma unroll
        for (int q = 0; q < CONV_TT; q++) {
            int64_t t = t0 + q;
            if (t >= N) break;
            float f = normed ? scale * rsqrtf(red[w0][q] + red[w0 + 1][q] + eps) : 1.0f;
#pragma unroll
            for (int v = 0; v < VC; v++) cv[q][v] *= f;
            stv<VC>(y + t * C + c0, cv[q]);
        }
        if (normed) __syncthreads();
    }
}

// Any other kernel size: one thread per (token, channel), straight from global memory.
static __device__ float conv_u(const bf16 *x, const float *w, int64_t t, int64_t start, int64_t c, int C, int K) {
    float u = 0;
    for (int j = 0; j < K; j++) {
        int64_t s = t - K + 1 + j;
        if (s >= start) u += w[c * K + j] * ld(x + s * C + c);
    }
    return u;
}

__global__ void conv1d_silu_fwd_generic(bf16 *y, const bf16 *x, const float *w, const int32_t *pos, int64_t N, int C,
                                        int K) {
    int64_t n = N * C, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        int64_t t = i / C, c = i - t * C;
        float u = conv_u(x, w, t, t - pos[t], c, C, K);
        st(y + i, u * sigmoid_f(u));
    }
}

__global__ void conv1d_silu_bwd_generic(bf16 *dx, const float *dy, const bf16 *x, const float *w,
                                        const int32_t *pos, int64_t N, int C, int K) {
    int64_t n = N * C, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        int64_t s = i / C, c = i - s * C;
        float o = 0;
        for (int j = 0; j < K; j++) {
            int64_t t = s + K - 1 - j;
            if (t >= N) continue;
            int64_t start = t - pos[t];
            if (s < start) continue;
            float u = conv_u(x, w, t, start, c, C, K), sg = sigmoid_f(u);
            o += w[c * K + j] * dy[t * C + c] * sg * (1.0f + u * (1.0f - sg));
        }
        st(dx + i, o);
    }
}

static dim3 conv_grid(int64_t N, int C, int VC) {
    int64_t tiles = (N + CONV_TT - 1) / CONV_TT;
    unsigned gx = (unsigned)(((int64_t)C / VC + CONV_THREADS - 1) / CONV_THREADS);
    return dim3(gx, (unsigned)(tiles < 65535 ? tiles : 65535));
}

#define CONV_DISPATCH(KERNEL, GENERIC, ...)                                                                 \
    do {                                                                                                    \
        cudaStream_t s_ = cuda_stream();                                                                    \
        if (K == 4 && vecw) KERNEL<4, CONV_VC><<<conv_grid(N, C, CONV_VC), CONV_THREADS, 0, s_>>>(__VA_ARGS__); \
        else if (K == 4 && vec2) KERNEL<4, 2><<<conv_grid(N, C, 2), CONV_THREADS, 0, s_>>>(__VA_ARGS__);    \
        else if (K == 4) KERNEL<4, 1><<<conv_grid(N, C, 1), CONV_THREADS, 0, s_>>>(__VA_ARGS__);            \
        else if (K == 3) KERNEL<3, 1><<<conv_grid(N, C, 1), CONV_THREADS, 0, s_>>>(__VA_ARGS__);            \
        else if (K == 2) KERNEL<2, 1><<<conv_grid(N, C, 1), CONV_THREADS, 0, s_>>>(__VA_ARGS__);            \
        else GENERIC<<<cuda_blocks(N * C, 256), 256, 0, s_>>>(__VA_ARGS__, K);                              \
    } while (0)

extern "C" void conv1d_silu_forward_cuda(dt_bf16 *y, const dt_bf16 *x, const float *w, const int32_t *pos, int64_t N,
                                         int C, int K) {
    if (N <= 0 || C <= 0 || K <= 0) return;
    bf16 *yb = (bf16 *)y;
    const bf16 *xb = (const bf16 *)x;
    bool vec2 = C % 2 == 0 && aligned_to(x, 4) && aligned_to(y, 4);
    bool vecw = C % CONV_VC == 0 && aligned_to(x, 2 * CONV_VC) && aligned_to(y, 2 * CONV_VC);
    CONV_DISPATCH(conv1d_silu_fwd_kernel, conv1d_silu_fwd_generic, yb, xb, w, pos, N, C);
}

extern "C" void conv1d_silu_backward_cuda(dt_bf16 *dx, const float *dy, const dt_bf16 *x, const float *w,
                                          const int32_t *pos, int64_t N, int C, int K) {
    if (N <= 0 || C <= 0 || K <= 0) return;
    bf16 *dxb = (bf16 *)dx;
    const bf16 *xb = (const bf16 *)x;
    bool vec2 = C % 2 == 0 && aligned_to(x, 4) && aligned_to(dx, 4) && aligned_to(dy, 8);
    bool vecw = C % CONV_VC == 0 && aligned_to(x, 2 * CONV_VC) && aligned_to(dx, 2 * CONV_VC) &&
                aligned_to(dy, 4 * CONV_VC);
    CONV_DISPATCH(conv1d_silu_bwd_kernel, conv1d_silu_bwd_generic, dxb, dy, xb, w, pos, N, C);
}

// Whether the one-pass forward takes these: K = 4, heads of 128, blocks of 256 channels, and
// aligned for its two-channel accesses.
static bool conv_l2norm_fused(int K, int dk, int64_t C, const void *x, const void *y) {
    return K == 4 && dk == CL_HEAD && C % (2 * CONV_THREADS) == 0 && aligned_to(x, 4) && aligned_to(y, 4);
}

static dim3 conv_l2norm_grid(int64_t N, int64_t C) {
    int64_t tiles = (N + CONV_TT - 1) / CONV_TT;
    return dim3((unsigned)(C / (2 * CONV_THREADS)), (unsigned)(tiles < 65535 ? tiles : 65535));
}

extern "C" void deltanet_conv_forward_cuda(dt_bf16 *qkv, const dt_bf16 *mixed, const float *w, const int32_t *pos,
                                           int64_t N, int K, int n_k_heads, int dk, int64_t C, float q_scale,
                                           float eps, dt_bf16 *conv) {
    if (N <= 0 || C <= 0 || K <= 0) return;
    int64_t qk_end = 2 * (int64_t)n_k_heads * dk;
    if (conv_l2norm_fused(K, dk, C, mixed, qkv)) {
        conv_l2norm_fwd_kernel<4><<<conv_l2norm_grid(N, C), CONV_THREADS, 0, cuda_stream()>>>(
            (bf16 *)qkv, (const bf16 *)mixed, w, pos, N, (int)C, qk_end, qk_end / 2, q_scale, eps);
        return;
    }
    conv1d_silu_forward_cuda(conv, mixed, w, pos, N, (int)C, K);
    deltanet_qk_l2norm_forward_cuda(qkv, conv, N, n_k_heads, dk, C, q_scale, eps);
}

extern "C" void deltanet_conv_backward_cuda(dt_bf16 *dmixed, float *dqkv, const dt_bf16 *mixed, const float *w,
                                            const int32_t *pos, int64_t N, int K, int n_k_heads, int dk, int64_t C,
                                            float q_scale, float eps, dt_bf16 *conv) {
    if (N <= 0 || C <= 0 || K <= 0) return;
    int64_t qk_end = 2 * (int64_t)n_k_heads * dk;
    // the one-pass kernel: heads of 128 (C a multiple of them), aligned for its 4-channel accesses
    if (K == 4 && dk == CL_HEAD && C % CL_HEAD == 0 && aligned_to(mixed, 8) && aligned_to(dmixed, 8) &&
        aligned_to(dqkv, 16)) {
        int64_t tiles = (N + CL_TT - 1) / CL_TT;
        dim3 grid((unsigned)((C / CL_HEAD + 3) / 4), (unsigned)(tiles < 65535 ? tiles : 65535));
        conv_l2norm_bwd_kernel<4><<<grid, 128, 0, cuda_stream()>>>((bf16 *)dmixed, dqkv, (const bf16 *)mixed, w, pos,
                                                                   N, (int)C, qk_end, qk_end / 2, q_scale, eps);
        return;
    }
    conv1d_silu_forward_cuda(conv, mixed, w, pos, N, (int)C, K);
    deltanet_qk_l2norm_backward_cuda(dqkv, dqkv, conv, N, n_k_heads, dk, C, q_scale, eps);
    conv1d_silu_backward_cuda(dmixed, dqkv, mixed, w, pos, N, (int)C, K);
}
