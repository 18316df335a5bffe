// The LM head fused with cross-entropy, `chunk` tokens at a time: logits = h E^T by cuBLAS into
// fp32 scratch [chunk, ldV], one block per row for its log-sum-exp and, when training, the row's
// gradient grad_scale (softmax - onehot) written as bf16 over the first half of its own row,
// then dh += dlogits E by cuBLAS.
//
// The logits stay fp32: rounded to bf16, a logit of 40 moves by 0.08 and its probability by 8%,
// which measured as a 2.5% error in the LoRA gradients of a whole model. The target's logit is
// also recomputed as the fp32 dot h_t . E[target].
// Each row's loss goes to scratch and one block sums them in a fixed order, so the loss is the
// same from run to run (no atomics).
#include <stdio.h>

#include "cuda/cuda_internal.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace {

const int kThreads = 1024;

long long round8(long long x) { return (x + 7) & ~7LL; }
size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// One block per token of the chunk; row t of the fp32 logits is ldV (a multiple of 8) long,
// columns V .. ldV are padding. The bf16 gradient of row t lands in the first half of the same
// row: tile k of it (NT * 8 values) covers fp32 values [k NT 4, (k + 1) NT 4), all read by
// the time tile k is written, since each tile is loaded, then the block syncs, then stores.
template <int NT>
__global__ void __launch_bounds__(NT)
    ce_rows(float *logits, long long ldV, long long V, const int32_t *targets, const bf16 *h, const bf16 *E, int H,
            double *row_loss, float grad_scale, int want_grad) {
    int t = blockIdx.x;
    const float4 *z = (const float4 *)(logits + t * ldV);
    uint4 *gz = (uint4 *)(logits + t * ldV);  // 8 bf16 per uint4
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
        if (E) {
            const bf16 *ht = h + (long long)t * H, *et = E + (long long)tg * H;
            for (int c = threadIdx.x; c < H; c += NT) zt += ld(ht + c) * ld(et + c);
            zt = block_sum<NT>(zt);
        } else {
            zt = logits[t * ldV + tg];  // a quantized E: the product's own fp32 logit
        }
        if (threadIdx.x == 0) row_loss[t] = (double)lse - zt;
    } else if (threadIdx.x == 0) {
        row_loss[t] = 0;
    }
    if (!want_grad) return;
    for (long long c0 = 0; c0 < nv; c0 += NT) {  // uniform trip count: the syncs below
        long long c = c0 + threadIdx.x;
        float x[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (c < nv && !skip) {
            float4 a = z[2 * c], b = z[2 * c + 1];
            float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            long long j0 = c * 8;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                long long j = j0 + k;
                x[k] = j < V ? grad_scale * __expf(v[k] - lse) - (j == tg ? grad_scale : 0.f) : 0.f;
            }
        }
        __syncthreads();
        if (c < nv) stv<8>((bf16 *)(gz + c), x);
        __syncthreads();
    }
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

// The head's weight, bf16 or quantized (then dequantized slices of ebuf_rows rows into ebuf).
struct head_weight {
    const bf16 *E;
    const cuda_qweight *q;
    bf16 *ebuf;
    long long slice;
};

// logits[:, :V] = h E^T for nt tokens.
void head_logits(float *logits, long long ldV, const bf16 *h, int nt, const head_weight &w, long long V, int H) {
    if (!w.q) {
        cuda_gemm(false, true, nt, (int)V, H, 1.f, h, H, 0, w.E, H, 0, 0.f, logits, CUDA_R_32F, ldV, 0, 1);
        return;
    }
    for (long long v0 = 0; v0 < V; v0 += w.slice) {
        long long nv = V - v0 < w.slice ? V - v0 : w.slice;
        dequantize_rows_cuda((dt_bf16 *)w.ebuf, w.q, v0, nv);
        cuda_gemm(false, true, nt, (int)nv, H, 1.f, h, H, 0, w.ebuf, H, 0, 0.f, logits + v0, CUDA_R_32F, ldV, 0, 1);
    }
}

// dh += dlogits E, the bf16 gradient rows sitting 2 ldV bf16 apart (the first half of each fp32 row).
// cuBLAS splits the long reduction over V itself: a split-K of our own measured no faster.
void head_backward(float *dh, const bf16 *dlogits, long long ldV, int nt, const head_weight &w, long long V, int H) {
    if (!w.q) {
        cuda_gemm(false, false, nt, H, (int)V, 1.f, dlogits, 2 * ldV, 0, w.E, H, 0, 1.f, dh, CUDA_R_32F, H, 0, 1);
        return;
    }
    for (long long v0 = 0; v0 < V; v0 += w.slice) {
        long long nv = V - v0 < w.slice ? V - v0 : w.slice;
        dequantize_rows_cuda((dt_bf16 *)w.ebuf, w.q, v0, nv);
        cuda_gemm(false, false, nt, H, (int)nv, 1.f, dlogits + v0, 2 * ldV, 0, w.ebuf, H, 0, 1.f, dh, CUDA_R_32F, H, 0,
                  1);
    }
}

void lmhead_ce(double *loss, float *dh, const bf16 *h, const int32_t *targets, int64_t N, const head_weight &w,
               int64_t V, int H, float grad_scale, int64_t chunk, void *scratch) {
    if (N <= 0 || V <= 0) return;
    if (chunk <= 0 || chunk > N) chunk = N;
    long long ldV = round8(V);
    float *logits = (float *)scratch;
    double *row_loss = (double *)((char *)scratch + align256((size_t)chunk * ldV * sizeof(float)));
    for (int64_t t0 = 0; t0 < N; t0 += chunk) {
        int nt = (int)(N - t0 < chunk ? N - t0 : chunk);
        head_logits(logits, ldV, h + t0 * H, nt, w, V, H);
        ce_rows<kThreads><<<nt, kThreads, 0, cuda_stream()>>>(logits, ldV, V, targets + t0, h + t0 * H, w.E, H,
                                                              row_loss, grad_scale, dh != NULL);
        ce_sum<<<1, 256, 0, cuda_stream()>>>(loss, row_loss, nt);
        if (dh) head_backward(dh + t0 * H, (const bf16 *)logits, ldV, nt, w, V, H);
    }
}

}  // namespace

extern "C" void lmhead_ce_cuda(double *loss, float *dh, const dt_bf16 *h, const int32_t *targets, int64_t N,
                               const dt_bf16 *E, int64_t V, int H, float grad_scale, int64_t chunk, void *scratch) {
    head_weight w = {(const bf16 *)E, NULL, NULL, 0};
    lmhead_ce(loss, dh, (const bf16 *)h, targets, N, w, V, H, grad_scale, chunk, scratch);
}

extern "C" void lmhead_ce_q_cuda(double *loss, float *dh, const dt_bf16 *h, const int32_t *targets, int64_t N,
                                 const cuda_qweight *E, dt_bf16 *ebuf, int64_t ebuf_rows, float grad_scale,
                                 int64_t chunk, void *scratch) {
    // slices of whole 8-row steps keep each slice's logits columns 32-byte aligned
    head_weight w = {NULL, E, (bf16 *)ebuf, (long long)(ebuf_rows / 8 * 8)};
    if (w.slice <= 0) return;
    lmhead_ce(loss, dh, (const bf16 *)h, targets, N, w, E->rows, (int)E->cols, grad_scale, chunk, scratch);
}

extern "C" size_t lmhead_ce_scratch_bytes_cuda(int64_t chunk, int64_t V, int H) {
    (void)H;
    return align256((size_t)chunk * round8(V) * sizeof(float)) + align256((size_t)chunk * sizeof(double));
}
