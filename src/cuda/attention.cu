// Causal GQA attention over packed sequences with cuBLAS, a block of query rows at a time.
//
// For each block of mq query rows [i0, i0 + mq) of a sequence, the scores against the keys
// [0, i0 + mq) of every head go to an fp32 buffer [nh][mq][ldS]; our softmax kernel turns each
// row into bf16 probabilities IN PLACE (the bf16 row fits in the first half of the fp32 row, so
// P is read with a leading dimension of 2 ldS bf16) and keeps the row's log-sum-exp. The
// backward rebuilds P from the lse and the recomputed scores, and dS = P (dP - D) the same way
// in a second buffer. Scratch is thus two [nh][mq][round8(max_len)] fp32 buffers plus the
// block's q and dout gathered head-major, never T x T for all heads.
//
// Gathering the block's query heads head-major ([nh][mq][hd]) makes the heads of one kv group
// a plain [G mq, hd] matrix: the scores of a whole group are one GEMM against its shared K, and
// dK, dV (sums over the group's heads) are one GEMM with the reduction over G mq rows. Groups
// batch with a stride of hd through K and V's rows.
#include <stdio.h>

#include "cuda/cuda_internal.h"
#include "cuda/reduce.cuh"

namespace {

// Query rows per block, at most, and score elements per head per block, beyond which rows
// shrink. At 2 x 2048 tokens, 8 heads (0.8B, H200), blocks of 256 / 512 / 1024 / 2048 rows
// took 11.8 / 9.0 / 7.9 / 8.2 ms per training step for the forward, recompute and backward of
// attention's core: larger products, fewer launches, against more of the causal mask's upper
// triangle computed and thrown away.
const int kQB = 1024;
const long long kCap = 1024LL * 2048;
const int kThreads = 256;

int round8(int x) { return (x + 7) & ~7; }
size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// Query rows per block for sequences of up to max_len: kQB, halved while a head's block of
// scores would pass kCap, but not below 64 (longer sequences then take more memory, not less work).
int query_block(int max_len) {
    long long r = round8(max_len);
    int qb = kQB;
    while (qb > 64 && qb * r > kCap) qb >>= 1;
    return qb;
}

// Score elements per head for any length up to max_len (nondecreasing in max_len, so the
// layout carved for the batch's longest sequence fits the scratch sized for max_len).
long long head_elems(int max_len) {
    long long r = round8(max_len), a = query_block(max_len) * r, b = kQB * r < kCap ? kQB * r : kCap;
    return a > b ? a : b;
}

struct Layout {
    float *S, *dP;   // [nh][mq][ldS] fp32; bf16 P and dS in place
    bf16 *Qp, *dOp;  // [nh][mq][hd]
};

Layout carve(void *scratch, int max_len, int nh, int hd) {
    size_t sb = align256((size_t)nh * head_elems(max_len) * sizeof(float));
    size_t qb = align256((size_t)nh * kQB * hd * sizeof(bf16));
    char *p = (char *)scratch;
    Layout l;
    l.S = (float *)p;
    l.dP = (float *)(p + sb);
    l.Qp = (bf16 *)(p + 2 * sb);
    l.dOp = (bf16 *)(p + 2 * sb + qb);
    return l;
}

// dst [nh][mq][hd] = the block's rows of src [*, nh * hd] (rows row0 ..), head-major.
__global__ void gather_heads(bf16 *dst, const bf16 *src, long long row0, int mq, int nh, int hd) {
    long long ld = (long long)nh * hd;
    if (hd % 8 == 0) {
        int hv = hd / 8;
        long long n = (long long)nh * mq * hv;
        for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
            int c = (int)(x % hv);
            long long hr = x / hv;
            int r = (int)(hr % mq), h = (int)(hr / mq);
            ((uint4 *)dst)[x] = *(const uint4 *)(src + (row0 + r) * ld + (long long)h * hd + c * 8);
        }
    } else {
        long long n = (long long)nh * mq * hd;
        for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
            int c = (int)(x % hd);
            long long hr = x / hd;
            int r = (int)(hr % mq), h = (int)(hr / mq);
            dst[x] = src[(row0 + r) * ld + (long long)h * hd + c];
        }
    }
}

void gather(bf16 *dst, const bf16 *src, long long row0, int mq, int nh, int hd) {
    long long n = (long long)nh * mq * (hd % 8 == 0 ? hd / 8 : hd);
    gather_heads<<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(dst, src, row0, mq, nh, hd);
}

// One block per (row r, head h): the causal softmax of scores row i = i0 + r (keys 0 .. i),
// written as bf16 over the row's own fp32 storage, zero past the diagonal up to ldS.
// In place: chunk c's bf16 writes cover fp32 elements below (c + 1) NT / 2, all of which were
// read by the end of chunk c, so one barrier per chunk (between its reads and writes) suffices.
template <int NT>
__global__ void __launch_bounds__(NT)
    softmax_fwd(float *S, float *lse, int ldS, long long head_stride, int i0, long long row0, int nh) {
    int r = blockIdx.x, h = blockIdx.y, n = i0 + r + 1;
    float *row = S + h * head_stride + (long long)r * ldS;
    float m = -INFINITY, s = 0.f;
    for (int j = threadIdx.x; j < n; j += NT) {
        float x = row[j];
        if (x > m) {
            s = s * __expf(m - x) + 1.f;
            m = x;
        } else {
            s += __expf(x - m);
        }
    }
    block_max_sum<NT>(m, s);
    float l = m + __logf(s);
    if (threadIdx.x == 0) lse[(row0 + r) * nh + h] = l;
    bf16 *p = (bf16 *)row;
    for (int c = 0; c < ldS; c += NT) {
        int j = c + threadIdx.x;
        float v = j < n ? __expf(row[j] - l) : 0.f;
        __syncthreads();
        if (j < ldS) p[j] = __float2bfloat16(v);
    }
}

// The backward's row: P = exp(S - lse) and dS = P (dP - D) with D = dO_i . O_i, both bf16 in
// place over S and dP (same chunking as softmax_fwd).
template <int NT>
__global__ void __launch_bounds__(NT)
    softmax_bwd(float *S, float *dP, const float *lse, const bf16 *out, const bf16 *dout, int ldS,
                long long head_stride, int i0, long long row0, int nh, int hd) {
    int r = blockIdx.x, h = blockIdx.y, n = i0 + r + 1;
    long long tok = row0 + r, off = tok * nh * hd + (long long)h * hd;
    float d = 0.f;
    for (int c = threadIdx.x; c < hd; c += NT) d += ld(out + off + c) * ld(dout + off + c);
    d = block_sum<NT>(d);
    float l = lse[tok * nh + h];
    float *srow = S + h * head_stride + (long long)r * ldS, *prow = dP + h * head_stride + (long long)r * ldS;
    bf16 *P = (bf16 *)srow, *dS = (bf16 *)prow;
    for (int c = 0; c < ldS; c += NT) {
        int j = c + threadIdx.x;
        float p = 0.f, ds = 0.f;
        if (j < n) {
            p = __expf(srow[j] - l);
            ds = p * (prow[j] - d);
        }
        __syncthreads();
        if (j < ldS) {
            P[j] = __float2bfloat16(p);
            dS[j] = __float2bfloat16(ds);
        }
    }
}

int longest(const int *seq_lens, int n_seqs) {
    int ml = 0;
    for (int s = 0; s < n_seqs; s++) ml = seq_lens[s] > ml ? seq_lens[s] : ml;
    return ml;
}

}  // namespace

extern "C" size_t attention_scratch_bytes_cuda(int max_len, int nh, int nkv, int hd) {
    (void)nkv;
    if (max_len < 1) max_len = 1;
    return 2 * align256((size_t)nh * head_elems(max_len) * sizeof(float)) +
           2 * align256((size_t)nh * kQB * hd * sizeof(bf16));
}

extern "C" void attention_forward_cuda(dt_bf16 *out_, float *lse, const dt_bf16 *q_, const dt_bf16 *k_,
                                       const dt_bf16 *v_, const int *seq_starts, const int *seq_lens, int n_seqs,
                                       int nh, int nkv, int hd, float scale, void *scratch) {
    bf16 *out = (bf16 *)out_;
    const bf16 *q = (const bf16 *)q_, *k = (const bf16 *)k_, *v = (const bf16 *)v_;
    int ml = longest(seq_lens, n_seqs);
    if (ml <= 0) return;
    int qb = query_block(ml), G = nh / nkv;
    Layout L = carve(scratch, ml, nh, hd);
    long long qld = (long long)nh * hd, kvld = (long long)nkv * hd;
    for (int s = 0; s < n_seqs; s++) {
        long long start = seq_starts[s];
        int len = seq_lens[s];
        const bf16 *ks = k + start * kvld, *vs = v + start * kvld;
        for (int i0 = 0; i0 < len; i0 += qb) {
            int mq = len - i0 < qb ? len - i0 : qb, nk = i0 + mq, ldS = round8(nk);
            long long hs = (long long)mq * ldS;
            gather(L.Qp, q, start + i0, mq, nh, hd);
            // S = scale Q K^T, every group at once: [G mq, hd] x [nk, hd]^T per group
            cuda_gemm(false, true, G * mq, nk, hd, scale, L.Qp, hd, (long long)G * mq * hd, ks, (int)kvld, hd, 0.f, L.S,
                 CUDA_R_32F, ldS, G * hs, nkv);
            softmax_fwd<kThreads><<<dim3(mq, nh), kThreads, 0, cuda_stream()>>>(L.S, lse, ldS, hs, i0, start + i0, nh);
            // O_h = P_h V_g straight into out's head columns; the group's heads share V (stride 0)
            const bf16 *P = (const bf16 *)L.S;
            for (int g = 0; g < nkv; g++)
                cuda_gemm(false, false, mq, hd, nk, 1.f, P + 2 * g * G * hs, 2 * ldS, 2 * hs, vs + g * hd, kvld, 0, 0.f,
                     out + (start + i0) * qld + (long long)g * G * hd, CUDA_R_16BF, (int)qld, hd, G);
        }
    }
}

extern "C" void attention_backward_cuda(float *dq, float *dk, float *dv, const dt_bf16 *dout_, const dt_bf16 *out_,
                                        const float *lse, const dt_bf16 *q_, const dt_bf16 *k_, const dt_bf16 *v_,
                                        const int *seq_starts, const int *seq_lens, int n_seqs, int nh, int nkv,
                                        int hd, float scale, void *scratch) {
    const bf16 *dout = (const bf16 *)dout_, *out = (const bf16 *)out_;
    const bf16 *q = (const bf16 *)q_, *k = (const bf16 *)k_, *v = (const bf16 *)v_;
    int ml = longest(seq_lens, n_seqs);
    if (ml <= 0) return;
    int qb = query_block(ml), G = nh / nkv;
    Layout L = carve(scratch, ml, nh, hd);
    long long qld = (long long)nh * hd, kvld = (long long)nkv * hd;
    for (int s = 0; s < n_seqs; s++) {
        long long start = seq_starts[s];
        int len = seq_lens[s];
        if (len <= 0) continue;
        const bf16 *ks = k + start * kvld, *vs = v + start * kvld;
        float *dks = dk + start * kvld, *dvs = dv + start * kvld;
        // dk, dv gather over query blocks; dq is written whole by each block
        cudaMemsetAsync(dks, 0, sizeof(float) * len * kvld, cuda_stream());
        cudaMemsetAsync(dvs, 0, sizeof(float) * len * kvld, cuda_stream());
        for (int i0 = 0; i0 < len; i0 += qb) {
            int mq = len - i0 < qb ? len - i0 : qb, nk = i0 + mq, ldS = round8(nk);
            long long hs = (long long)mq * ldS, gq = (long long)G * mq * hd;
            gather(L.Qp, q, start + i0, mq, nh, hd);
            gather(L.dOp, dout, start + i0, mq, nh, hd);
            cuda_gemm(false, true, G * mq, nk, hd, scale, L.Qp, hd, gq, ks, (int)kvld, hd, 0.f, L.S, CUDA_R_32F, ldS,
                 G * hs, nkv);
            // dP = dO V^T
            cuda_gemm(false, true, G * mq, nk, hd, 1.f, L.dOp, hd, gq, vs, (int)kvld, hd, 0.f, L.dP, CUDA_R_32F, ldS,
                 G * hs, nkv);
            softmax_bwd<kThreads><<<dim3(mq, nh), kThreads, 0, cuda_stream()>>>(L.S, L.dP, lse, out, dout, ldS, hs, i0,
                                                                               start + i0, nh, hd);
            const bf16 *P = (const bf16 *)L.S, *dS = (const bf16 *)L.dP;
            // dV_g += P_group^T dO_group and dK_g += scale dS_group^T Q_group: the group's heads
            // stacked make the sum over heads part of the GEMM's reduction
            cuda_gemm(true, false, nk, hd, G * mq, 1.f, P, 2 * ldS, 2 * G * hs, L.dOp, hd, gq, 1.f, dvs, CUDA_R_32F,
                 (int)kvld, hd, nkv);
            cuda_gemm(true, false, nk, hd, G * mq, scale, dS, 2 * ldS, 2 * G * hs, L.Qp, hd, gq, 1.f, dks, CUDA_R_32F,
                 (int)kvld, hd, nkv);
            // dQ_h = scale dS_h K_g, straight into dq's head columns
            for (int g = 0; g < nkv; g++)
                cuda_gemm(false, false, mq, hd, nk, scale, dS + 2 * g * G * hs, 2 * ldS, 2 * hs, ks + g * hd, kvld, 0,
                     0.f, dq + (start + i0) * qld + (long long)g * G * hd, CUDA_R_32F, (int)qld, hd, G);
        }
    }
}
