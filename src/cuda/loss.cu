// The LM head fused with cross-entropy, `chunk` tokens at a time: logits = h E^T by cuBLAS into
// fp32 scratch [chunk, ldV], one block per row for its log-sum-exp and, when training, the row's
// gradient grad_scale (softmax - onehot) written as bf16 over the first half of its own row,
// then dh += dlogits E by cuBLAS.
//
// A quantized E (lmhead_ce_q_cuda) turns the loops around, so that each slice of its rows is
// dequantized once per pass rather than once per chunk of tokens: for every slice, the logits of
// a whole chunk of tokens against it, merged into each row's running log-sum-exp; then, when
// training, a second pass recomputes each slice's logits, turns them into the gradient and adds
// its product with the slice into dh. One more product than the bf16 path, against a fraction of
// the dequantizing.
//
// The logits stay fp32: rounded to bf16, a logit of 40 moves by 0.08 and its probability by 8%,
// which measured as a 2.5% error in the LoRA gradients of a whole model. The target's logit is
// also recomputed as the fp32 dot h_t . E[target] (the quantized path takes the product's own).
// Each row's loss goes to scratch and one block sums them in a fixed order, so the loss is the
// same from run to run (no atomics).
#include <stdio.h>

#include "cuda/cuda_internal.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

extern "C" {
#include "deltatune/error.h"
}

namespace {

const int kThreads = 1024;

long long round8(long long x) { return (x + 7) & ~7LL; }
size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// A row of fp32 logits z (ld values, a multiple of 8; the first n real) into its bf16 gradient
// grad_scale (softmax - onehot(tg)) over the first half of the same row; zero when skip. Tile k
// of the bf16 row (NT * 8 values) covers fp32 values [k NT 4, (k + 1) NT 4), all read by the
// time tile k is written, since each tile is loaded, then the block syncs, then stores.
template <int NT>
__device__ void row_grad(float *z, long long ld, long long n, float lse, long long tg, float grad_scale, bool skip) {
    long long nv = ld / 8;
    for (long long c0 = 0; c0 < nv; c0 += NT) {  // uniform trip count: the syncs below
        long long c = c0 + threadIdx.x;
        float x[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (c < nv && !skip) {
            float v[8];
            ldv<8>(v, z + 8 * c);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                long long j = 8 * c + k;
                x[k] = j < n ? grad_scale * __expf(v[k] - lse) - (j == tg ? grad_scale : 0.f) : 0.f;
            }
        }
        __syncthreads();
        if (c < nv) stv<8>((bf16 *)z + 8 * c, x);
        __syncthreads();
    }
}

// One block per token of the chunk; row t of the fp32 logits is ldV (a multiple of 8) long,
// columns V .. ldV are padding; its gradient (row_grad) replaces it.
template <int NT>
__global__ void __launch_bounds__(NT)
    ce_rows(float *logits, long long ldV, long long V, const int32_t *targets, const bf16 *h, const bf16 *E, int H,
            double *row_loss, float grad_scale, int want_grad) {
    int t = blockIdx.x;
    const float4 *z = (const float4 *)(logits + t * ldV);
    long long nv = ldV / 8;
    int tg = targets[t];
    bool skip = tg < 0 || tg >= V;
    float m = -INFINITY, s = 0.f;
    for (long long c = threadIdx.x; !skip && c < nv; c += NT) {
        float4 a = z[2 * c], b = z[2 * c + 1];
        float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        long long j0 = c * 8;
        float lm = -INFINITY;
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (j0 + k < V) lm = fmaxf(lm, x[k]);
        if (lm > m) {
            s *= __expf(m - lm);
            m = lm;
        }
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (j0 + k < V) s += __expf(x[k] - m);
    }
    float lse = 0.f;
    if (!skip) {
        block_max_sum<NT>(m, s);
        lse = m + __logf(s);
        float zt = 0.f;
        const bf16 *ht = h + (long long)t * H, *et = E + (long long)tg * H;
        for (int c = threadIdx.x; c < H; c += NT) zt += ld(ht + c) * ld(et + c);
        zt = block_sum<NT>(zt);
        if (threadIdx.x == 0) row_loss[t] = (double)lse - zt;
    } else if (threadIdx.x == 0) {
        row_loss[t] = 0;
    }
    if (want_grad) row_grad<NT>(logits + t * ldV, ldV, V, lse, tg, grad_scale, skip);
}

// *loss += the chunk's row losses, in a fixed order.
__global__ void ce_sum(double *loss, const double *row_loss, int n) {
    __shared__ double sh[256];
    double a = 0;
    for (int i = threadIdx.x; i < n; i += 256) a += row_loss[i];
    sh[threadIdx.x] = a;
    __syncthreads();
    for (int o = 128; o; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) *loss += sh[0];
}

// The quantized path's per-row state over the slices: the running (max, sum of exp) and the
// target's logit, then the log-sum-exp in m.
struct row_state {
    float *m, *s, *zt;
};

// One block per token: the slice's logits z [nv of ld] merged into the row's running state; the
// first slice (first) starts it. The target's logit is taken when it falls in the slice.
template <int NT>
__global__ void __launch_bounds__(NT)
    slice_stats(const float *logits, long long ld, long long nv, long long v0, const int32_t *targets, row_state r,
                int first) {
    int t = blockIdx.x;
    const float *z = logits + t * ld;
    float m = -INFINITY, s = 0.f;
    for (long long j = threadIdx.x; j < nv; j += NT) {
        float x = z[j];
        if (x > m) {
            s *= __expf(m - x);
            m = x;
        }
        s += __expf(x - m);
    }
    block_max_sum<NT>(m, s);
    if (threadIdx.x != 0) return;
    if (first) {
        r.m[t] = m, r.s[t] = s, r.zt[t] = 0.f;
    } else {
        ms_merge(r.m[t], r.s[t], m, s);
    }
    long long tg = targets[t];
    if (tg >= v0 && tg < v0 + nv) r.zt[t] = z[tg - v0];
}

// Each row's loss from its state (0 for an ignored target), and m turned into the log-sum-exp.
__global__ void slice_finish(row_state r, const int32_t *targets, long long V, double *row_loss, int n) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n; t += gridDim.x * blockDim.x) {
        float lse = r.m[t] + __logf(r.s[t]);
        r.m[t] = lse;
        int tg = targets[t];
        row_loss[t] = tg < 0 || tg >= V ? 0.0 : (double)lse - r.zt[t];
    }
}

// One block per token: the slice's logits into their bf16 gradient, in place.
template <int NT>
__global__ void __launch_bounds__(NT)
    slice_grad(float *logits, long long ld, long long nv, long long v0, long long V, const int32_t *targets,
               const float *lse, float grad_scale) {
    int t = blockIdx.x;
    long long tg = targets[t];
    row_grad<NT>(logits + t * ld, ld, nv, lse[t], tg - v0, grad_scale, tg < 0 || tg >= V);
}

struct slice_scratch {
    float *logits;
    row_state r;
    double *row_loss;
};

size_t slice_scratch_bytes(long long chunk, long long slice) {
    return align256((size_t)chunk * round8(slice) * sizeof(float)) + 3 * align256((size_t)chunk * sizeof(float)) +
           align256((size_t)chunk * sizeof(double));
}

slice_scratch slice_carve(void *scratch, long long chunk, long long slice) {
    char *p = (char *)scratch;
    slice_scratch s;
    s.logits = (float *)p;
    p += align256((size_t)chunk * round8(slice) * sizeof(float));
    float **f[] = {&s.r.m, &s.r.s, &s.r.zt};
    for (int i = 0; i < 3; i++, p += align256((size_t)chunk * sizeof(float))) *f[i] = (float *)p;
    s.row_loss = (double *)p;
    return s;
}

}  // namespace

extern "C" void lmhead_ce_cuda(double *loss, float *dh, const dt_bf16 *h_, const int32_t *targets, int64_t N,
                               const dt_bf16 *E_, int64_t V, int H, float grad_scale, int64_t chunk, void *scratch) {
    const bf16 *h = (const bf16 *)h_, *E = (const bf16 *)E_;
    if (N <= 0 || V <= 0) return;
    if (chunk <= 0 || chunk > N) chunk = N;
    long long ldV = round8(V);
    float *logits = (float *)scratch;
    double *row_loss = (double *)((char *)scratch + align256((size_t)chunk * ldV * sizeof(float)));
    for (int64_t t0 = 0; t0 < N; t0 += chunk) {
        int nt = (int)(N - t0 < chunk ? N - t0 : chunk);
        cuda_gemm(false, true, nt, (int)V, H, 1.f, h + t0 * H, H, 0, E, H, 0, 0.f, logits, CUDA_R_32F, ldV, 0, 1);
        ce_rows<kThreads><<<nt, kThreads, 0, cuda_stream()>>>(logits, ldV, V, targets + t0, h + t0 * H, E, H,
                                                              row_loss, grad_scale, dh != NULL);
        ce_sum<<<1, 256, 0, cuda_stream()>>>(loss, row_loss, nt);
        // dh += dlogits E, the bf16 gradient rows 2 ldV bf16 apart (the first half of each fp32
        // row); cuBLAS splits the long reduction over V itself (a split-K of ours was no faster)
        if (dh)
            cuda_gemm(false, false, nt, H, (int)V, 1.f, logits, 2 * ldV, 0, E, H, 0, 1.f, dh + t0 * H, CUDA_R_32F, H,
                      0, 1);
    }
}

extern "C" void lmhead_ce_q_cuda(double *loss, float *dh, const dt_bf16 *h_, const int32_t *targets, int64_t N,
                                 const cuda_qweight *E, dt_bf16 *ebuf_, int64_t ebuf_rows, float grad_scale,
                                 void *scratch, size_t scratch_bytes) {
    const bf16 *h = (const bf16 *)h_;
    bf16 *ebuf = (bf16 *)ebuf_;
    long long V = E->rows, H = E->cols;
    // slices of whole 8-row steps keep each slice's logits 32-byte aligned; chunks of tokens as
    // long as the scratch allows
    long long slice = ebuf_rows / 8 * 8 < V ? ebuf_rows / 8 * 8 : V;
    if (N <= 0 || V <= 0 || slice <= 0) return;
    long long chunk = N;
    while (slice_scratch_bytes(chunk, slice) > scratch_bytes) {  // fewer tokens, then narrower slices
        if (chunk > 1) {
            chunk = (chunk + 1) / 2;
        } else if (slice > 8) {
            slice = slice / 16 * 8 > 8 ? slice / 16 * 8 : 8;
        } else {
            dt_err("the LM head's scratch of %zu bytes holds not even one token's slice", scratch_bytes);
            fprintf(stderr, "deltatune: %s\n", dt_errmsg());
            return;
        }
    }
    long long ld = round8(slice);
    slice_scratch sc = slice_carve(scratch, chunk, slice);
    for (long long t0 = 0; t0 < N; t0 += chunk) {
        int nt = (int)(N - t0 < chunk ? N - t0 : chunk);
        const bf16 *ht = h + t0 * H;
        for (long long v0 = 0; v0 < V; v0 += slice) {
            long long nv = V - v0 < slice ? V - v0 : slice;
            dequantize_rows_cuda((dt_bf16 *)ebuf, E, v0, nv);
            cuda_gemm(false, true, nt, (int)nv, (int)H, 1.f, ht, H, 0, ebuf, H, 0, 0.f, sc.logits, CUDA_R_32F, ld, 0,
                      1);
            slice_stats<kThreads><<<nt, kThreads, 0, cuda_stream()>>>(sc.logits, ld, nv, v0, targets + t0, sc.r,
                                                                      v0 == 0);
        }
        slice_finish<<<cuda_blocks(nt, 256), 256, 0, cuda_stream()>>>(sc.r, targets + t0, V, sc.row_loss, nt);
        ce_sum<<<1, 256, 0, cuda_stream()>>>(loss, sc.row_loss, nt);
        for (long long v0 = 0; dh && v0 < V; v0 += slice) {
            long long nv = V - v0 < slice ? V - v0 : slice;
            dequantize_rows_cuda((dt_bf16 *)ebuf, E, v0, nv);
            cuda_gemm(false, true, nt, (int)nv, (int)H, 1.f, ht, H, 0, ebuf, H, 0, 0.f, sc.logits, CUDA_R_32F, ld, 0,
                      1);
            slice_grad<kThreads><<<nt, kThreads, 0, cuda_stream()>>>(sc.logits, ld, nv, v0, V, targets + t0, sc.r.m,
                                                                     grad_scale);
            cuda_gemm(false, false, nt, (int)H, (int)nv, 1.f, sc.logits, 2 * ld, 0, ebuf, H, 0, 1.f, dh + t0 * H,
                      CUDA_R_32F, H, 0, 1);
        }
    }
}

extern "C" size_t lmhead_ce_scratch_bytes_cuda(int64_t chunk, int64_t V, int H) {
    (void)H;
    return align256((size_t)chunk * round8(V) * sizeof(float)) + align256((size_t)chunk * sizeof(double));
}
