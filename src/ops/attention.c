/* Causal softmax attention with grouped KV heads, one sequence at a time. The
 * scores of one head ([T, T]) are built with BLAS; the CUDA path will avoid them. */

#include "ops/real.h"

void attention_forward(real *out, const real *q, const real *k, const real *v, int64_t T,
                       int nh, int nkv, int hd, real scale, real *scratch) {
    int group = nh / nkv;
    int64_t q_ld = (int64_t)nh * hd, kv_ld = (int64_t)nkv * hd;
    for (int h = 0; h < nh; h++) {
        int kh = h / group;
        const real *qh = q + (int64_t)h * hd, *kh_ = k + (int64_t)kh * hd, *vh = v + (int64_t)kh * hd;
        real *P = scratch;
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)T, hd, scale, qh, (int)q_ld,
                    kh_, (int)kv_ld, 0.0, P, (int)T);
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < T; i++) {
            real *row = P + i * T, mx = -INFINITY;
            for (int64_t j = 0; j <= i; j++) mx = row[j] > mx ? row[j] : mx;
            double sum = 0;
            for (int64_t j = 0; j <= i; j++) {
                row[j] = exp(row[j] - mx);
                sum += row[j];
            }
            real inv = (real)(1.0 / sum);
            for (int64_t j = 0; j <= i; j++) row[j] *= inv;
            for (int64_t j = i + 1; j < T; j++) row[j] = 0;
        }
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, hd, (int)T, 1.0, P, (int)T, vh,
                    (int)kv_ld, 0.0, out + (int64_t)h * hd, (int)q_ld);
    }
}
