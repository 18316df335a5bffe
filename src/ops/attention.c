/* Causal softmax attention with grouped KV heads, one sequence at a time
 * (qwen35.md §2.3, §4). The probabilities of one head ([T, T]) are built with BLAS
 * and rebuilt in the backward; the CUDA path is where they will never exist. */
#include "ops/real.h"

/* P = softmax(scale q_h k_h^T) [n_q, n_kv], causal with the queries the last n_q positions
 * (query i sees keys 0 .. n_kv - n_q + i), zero beyond. */
static void head_probs(real *P, const real *qh, int64_t q_ld, const real *kh, int64_t kv_ld, int64_t n_q,
                       int64_t n_kv, int hd, real scale) {
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n_q, (int)n_kv, hd, scale, qh, (int)q_ld, kh, (int)kv_ld, 0,
         P, (int)n_kv);
    int64_t past = n_kv - n_q;
#pragma omp parallel for schedule(static) if (n_q * n_kv > PAR_MIN)
    for (int64_t i = 0; i < n_q; i++) {
        real *row = P + i * n_kv, mx = -INFINITY;
        int64_t last = past + i;
        for (int64_t j = 0; j <= last; j++) mx = row[j] > mx ? row[j] : mx;
        double sum = 0;
        for (int64_t j = 0; j <= last; j++) {
            row[j] = exp(row[j] - mx);
            sum += row[j];
        }
        real inv = (real)(1 / sum);
        for (int64_t j = 0; j <= last; j++) row[j] *= inv;
        for (int64_t j = last + 1; j < n_kv; j++) row[j] = 0;
    }
}

void attention_forward(real *out, const real *q, const real *k, const real *v, int64_t n_q, int64_t n_kv, int nh,
                       int nkv, int hd, real scale, real *scratch) {
    int group = nh / nkv;
    int64_t q_ld = (int64_t)nh * hd, kv_ld = (int64_t)nkv * hd;
    for (int h = 0; h < nh; h++) {
        int kh = h / group;
        head_probs(scratch, q + (int64_t)h * hd, q_ld, k + (int64_t)kh * hd, kv_ld, n_q, n_kv, hd, scale);
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n_q, hd, (int)n_kv, 1, scratch, (int)n_kv,
             v + (int64_t)kh * hd, (int)kv_ld, 0, out + (int64_t)h * hd, (int)q_ld);
    }
}

void attention_backward(real *dq, real *dk, real *dv, const real *dout, const real *q, const real *k, const real *v,
                        int64_t T, int nh, int nkv, int hd, real scale, real *scratch) {
    int group = nh / nkv;
    int64_t q_ld = (int64_t)nh * hd, kv_ld = (int64_t)nkv * hd;
    real *P = scratch, *dP = scratch + T * T;
    for (int h = 0; h < nh; h++) {
        int kh = h / group;
        const real *qh = q + (int64_t)h * hd, *kk = k + (int64_t)kh * hd, *vh = v + (int64_t)kh * hd;
        const real *dOh = dout + (int64_t)h * hd;
        head_probs(P, qh, q_ld, kk, kv_ld, T, T, hd, scale);
        /* dV += P^T dO;  dP = dO V^T */
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)T, hd, (int)T, 1, P, (int)T, dOh, (int)q_ld, 1,
             dv + (int64_t)kh * hd, (int)kv_ld);
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)T, hd, 1, dOh, (int)q_ld, vh, (int)kv_ld, 0, dP,
             (int)T);
        /* softmax: dS = P (dP - sum_j P dP), row by row */
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < T; i++) {
            real *p = P + i * T, *dp = dP + i * T;
            double dot = 0;
            for (int64_t j = 0; j <= i; j++) dot += (double)p[j] * dp[j];
            for (int64_t j = 0; j <= i; j++) dp[j] = p[j] * (dp[j] - (real)dot);
            for (int64_t j = i + 1; j < T; j++) dp[j] = 0;
        }
        /* scores were scale q k^T:  dq += scale dS k;  dk += scale dS^T q */
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, hd, (int)T, scale, dP, (int)T, kk, (int)kv_ld, 1,
             dq + (int64_t)h * hd, (int)q_ld);
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)T, hd, (int)T, scale, dP, (int)T, qh, (int)q_ld, 1,
             dk + (int64_t)kh * hd, (int)kv_ld);
    }
}
