// The LM head fused with cross-entropy, over slices of the vocabulary as flash attention goes over
// keys: for a chunk of tokens (all of them where the scratch allows) and each slice of E's rows in
// turn, logits = h E_s^T by cuBLAS into fp32 scratch [chunk, ld]; one block per token merges the
// slice into the row's running (max m, sum of exp s) and, when training, turns it into
// P = exp(z - m) (bf16, over the first half of its own row), rescales the row's accumulator where m
// grew and takes E[target] off dh where the target is in the slice; then acc += P E_s by cuBLAS.
// At the end dh += grad_scale acc / s, the softmax's part of the gradient. E is read once per
// chunk of tokens, and both products stay large however little scratch there is (chunks of
// tokens, the other way round, re-read all of E for each and were memory-bound at the lengths
// that fit).
//
// A quantized E (lmhead_ce_q_cuda) takes the same loop, each slice of its rows dequantized into
// a buffer first.
//
// The logits stay fp32: rounded to bf16, a logit of 40 moves by 0.08 and its probability by 8%,
// which measured as a 2.5% error in the LoRA gradients of a whole model. P is bf16 as the
// gradient rows were before (values in [0, 1]; the product accumulates in fp32). Each row's loss
// goes to scratch and one block sums them in a fixed order, so the loss is the same from run to
// run (no atomics).
#include "cuda/cuda_internal.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

extern "C" {
#include "deltatune/error.h"
}

namespace {

long long round8(long long x) { return (x + 7) & ~7LL; }
size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// A row of fp32 logits z (ld values, a multiple of 8; the first n real) into bf16 exp(z - m) over
// the first half of the same row (zero past n). Tile k of the bf16 row (NT * 8 values) covers fp32
// values [k NT 4, (k + 1) NT 4), all read by the time tile k is written, since each tile is
// loaded, then the block syncs, then stores.
template <int NT>
__device__ void row_exp(float *z, long long ld, long long n, float m) {
    long long nv = ld / 8;
    for (long long c0 = 0; c0 < nv; c0 += NT) {  // uniform trip count: the syncs below
        long long c = c0 + threadIdx.x;
        float x[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (c < nv) {
            float v[8];
            ldv<8>(v, z + 8 * c);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = 8 * c + k < n ? __expf(v[k] - m) : 0.f;
        }
        __syncthreads();
        if (c < nv) stv<8>((bf16 *)z + 8 * c, x);
        __syncthreads();
    }
}

// Per-row state over the slices: the running max and sum of exp, and the target's logit.
struct row_state {
    float *m, *s, *zt;
};

// One block per token: slice [v0, v0 + nv) of its logits (row t of z, ld apart) merged into the
// row's state (first: started). With acc (training): acc's row rescaled to the new max, E[target]
// (row tg - v0 of the slice Es) taken off dh times grad_scale when the target is here, and the
// logits turned into P = exp(z - m) in place.
template <int NT>
__global__ void __launch_bounds__(NT)
    slice_merge(float *logits, long long ld, long long nv, long long v0, long long V, const int32_t *targets,
                row_state r, int first, float *acc, float *dh, const bf16 *Es, int H, float grad_scale) {
    int t = blockIdx.x;
    float *z = logits + t * ld;
    float m_run = first ? -INFINITY : r.m[t], s_run = first ? 0.f : r.s[t];
    float m = -INFINITY, s = 0.f;  // the slice's
    for (long long c = threadIdx.x; c < (nv + 7) / 8; c += NT) {
        float x[8];
        ldv<8>(x, z + 8 * c);
        long long j0 = c * 8;
        float lm = -INFINITY;
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (j0 + k < nv) lm = fmaxf(lm, x[k]);
        if (lm > m) {
            s *= __expf(m - lm);
            m = lm;
        }
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (j0 + k < nv) s += __expf(x[k] - m);
    }
    block_max_sum<NT>(m, s);  // syncs: every thread has read m_run, s_run
    long long tg = targets[t];
    bool here = tg >= 0 && tg < V && tg >= v0 && tg < v0 + nv;
    float zt = here ? z[tg - v0] : 0.f;  // read before row_exp's first store, which follows a sync
    float m_new = m_run, s_new = s_run;
    ms_merge(m_new, s_new, m, s);
    if (acc) {
        float *a = acc + (long long)t * H;
        if (!first && m_new > m_run) {
            float f = __expf(m_run - m_new);
            for (int c = threadIdx.x; c < H; c += NT) a[c] *= f;
        }
        if (here) {
            float *d = dh + (long long)t * H;
            const bf16 *e = Es + (tg - v0) * H;
            for (int c = threadIdx.x; c < H; c += NT) d[c] -= grad_scale * __bfloat162float(e[c]);
        }
        row_exp<NT>(z, ld, nv, m_new);
    }
    if (threadIdx.x == 0) {
        r.m[t] = m_new, r.s[t] = s_new;
        if (here || first) r.zt[t] = zt;
    }
}

// One block per token: its loss (0 for an ignored target) and, with acc, dh += grad_scale acc / s.
template <int NT>
__global__ void __launch_bounds__(NT) rows_finish(row_state r, const int32_t *targets, long long V, double *row_loss,
                                                  const float *acc, float *dh, int H, float grad_scale) {
    int t = blockIdx.x;
    long long tg = targets[t];
    bool valid = tg >= 0 && tg < V;
    if (threadIdx.x == 0) row_loss[t] = valid ? (double)(r.m[t] + __logf(r.s[t])) - r.zt[t] : 0.0;
    if (!acc || !valid) return;
    float f = grad_scale / r.s[t];
    const float *a = acc + (long long)t * H;
    float *d = dh + (long long)t * H;
    for (int c = threadIdx.x; c < H; c += NT) d[c] += f * a[c];
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

struct ce_scratch {
    float *logits, *acc;
    row_state r;
    double *row_loss;
};

// Bytes of scratch for `chunk` tokens and slices ld wide (ld a multiple of 8).
size_t ce_scratch_bytes(long long chunk, long long ld, int H) {
    return align256((size_t)chunk * ld * sizeof(float)) + align256((size_t)chunk * H * sizeof(float)) +
           3 * align256((size_t)chunk * sizeof(float)) + align256((size_t)chunk * sizeof(double));
}

ce_scratch ce_carve(void *scratch, long long chunk, long long ld, int H) {
    char *p = (char *)scratch;
    ce_scratch c;
    c.logits = (float *)p;
    p += align256((size_t)chunk * ld * sizeof(float));
    c.acc = (float *)p;
    p += align256((size_t)chunk * H * sizeof(float));
    float **f[] = {&c.r.m, &c.r.s, &c.r.zt};
    for (int i = 0; i < 3; i++, p += align256((size_t)chunk * sizeof(float))) *f[i] = (float *)p;
    c.row_loss = (double *)p;
    return c;
}

// Slices narrower than this make the products small; fewer tokens at a time are the better trade.
const long long kMinSlice = 4096;

// The chunk of tokens and slice width for `bytes` of scratch and slices of at most max_slice rows
// of E: all N tokens where slices of kMinSlice (or max_slice) fit, else half as many, and so on.
// False when not even one token's slice of 8 fits.
bool ce_plan(long long N, long long max_slice, int H, size_t bytes, long long *chunk, long long *slice) {
    long long want = max_slice < kMinSlice ? max_slice : kMinSlice;
    for (long long c = N;; c = (c + 1) / 2) {
        size_t fixed = ce_scratch_bytes(c, 0, H) + 256;  // + 256: the logits' own alignment
        long long w = bytes > fixed ? (long long)((bytes - fixed) / ((size_t)c * sizeof(float))) : 0;
        if (w >= max_slice) w = max_slice;
        else w = w >= 128 ? w / 128 * 128 : w / 8 * 8;  // whole tiles of the products
        if (w >= want || (c == 1 && w > 0)) {
            *chunk = c, *slice = w;
            return true;
        }
        if (c == 1) return false;
    }
}

// E's rows [v0, v0 + n) as bf16: E itself, or dequantized into ebuf.
struct vocab_rows {
    const bf16 *E;
    const cuda_qweight *q;
    bf16 *ebuf;
    const bf16 *at(long long v0, long long n, int H) const {
        if (!q) return E + v0 * H;
        dequantize_rows_cuda((dt_bf16 *)ebuf, q, v0, n);
        return ebuf;
    }
};

int lmhead_ce(double *loss, float *dh, const bf16 *h, const int32_t *targets, long long N, const vocab_rows &E,
              long long V, int H, long long max_slice, float grad_scale, void *scratch, size_t scratch_bytes) {
    long long chunk, slice;
    if (!ce_plan(N, max_slice, H, scratch_bytes, &chunk, &slice))
        return dt_err("the LM head's scratch of %zu bytes holds not even one token's slice", scratch_bytes);
    long long ld = round8(slice);
    ce_scratch sc = ce_carve(scratch, chunk, ld, H);
    float *acc = dh ? sc.acc : NULL;
    const int NT = 512;
    for (long long t0 = 0; t0 < N; t0 += chunk) {
        int nt = (int)(N - t0 < chunk ? N - t0 : chunk);
        const bf16 *ht = h + t0 * H;
        float *dht = dh ? dh + t0 * H : NULL;
        for (long long v0 = 0; v0 < V; v0 += slice) {
            long long nv = V - v0 < slice ? V - v0 : slice;
            const bf16 *Es = E.at(v0, nv, H);
            cuda_gemm(false, true, nt, (int)nv, H, 1.f, ht, H, 0, Es, H, 0, 0.f, sc.logits, CUDA_R_32F, ld, 0, 1);
            slice_merge<NT><<<nt, NT, 0, cuda_stream()>>>(sc.logits, ld, nv, v0, V, targets + t0, sc.r, v0 == 0, acc,
                                                          dht, Es, H, grad_scale);
            // acc += P E_s, the bf16 P rows 2 ld bf16 apart (the first half of each fp32 row)
            if (acc)
                cuda_gemm(false, false, nt, H, (int)nv, 1.f, sc.logits, 2 * ld, 0, Es, H, 0, v0 == 0 ? 0.f : 1.f, acc,
                          CUDA_R_32F, H, 0, 1);
        }
        rows_finish<256><<<nt, 256, 0, cuda_stream()>>>(sc.r, targets + t0, V, sc.row_loss, acc, dht, H, grad_scale);
        ce_sum<<<1, 256, 0, cuda_stream()>>>(loss, sc.row_loss, nt);
    }
    return 0;
}

}  // namespace

extern "C" int lmhead_ce_cuda(double *loss, float *dh, const dt_bf16 *h, const int32_t *targets, int64_t N,
                              const dt_bf16 *E, int64_t V, int H, float grad_scale, void *scratch,
                              size_t scratch_bytes) {
    if (N <= 0 || V <= 0) return 0;
    vocab_rows rows = {(const bf16 *)E, NULL, NULL};
    return lmhead_ce(loss, dh, (const bf16 *)h, targets, N, rows, V, H, V, grad_scale, scratch, scratch_bytes);
}

extern "C" int lmhead_ce_q_cuda(double *loss, float *dh, const dt_bf16 *h, const int32_t *targets, int64_t N,
                                const cuda_qweight *E, dt_bf16 *ebuf, int64_t ebuf_rows, float grad_scale,
                                void *scratch, size_t scratch_bytes) {
    long long V = E->rows, max_slice = ebuf_rows / 8 * 8 < V ? ebuf_rows / 8 * 8 : V;
    if (N <= 0 || V <= 0) return 0;
    if (max_slice <= 0)
        return dt_err("the LM head's dequantizing buffer of %lld rows holds less than 8", (long long)ebuf_rows);
    vocab_rows rows = {NULL, E, (bf16 *)ebuf};
    return lmhead_ce(loss, dh, (const bf16 *)h, targets, N, rows, V, (int)E->cols, max_slice, grad_scale, scratch,
                     scratch_bytes);
}

extern "C" size_t lmhead_ce_scratch_bytes_cuda(int64_t chunk, int64_t V, int H) {
    return ce_scratch_bytes(chunk, round8(V), H) + 256;
}
