/* The LM head fused with cross-entropy: the vocabulary is walked in blocks, each
 * block's logits for all tokens are made, folded into a running max and sum of
 * exponentials per token, then dropped. */
#include <stdlib.h>

#include "ops/real.h"

void lmhead_ce_forward(double *loss_sum, int64_t *count, const real *h, const int32_t *targets,
                       int64_t T, const dt_weight *E, real *scratch) {
    int64_t V = E->rows, H = E->cols;
    size_t es = dt_dtype_size(E->dtype);
    real *run_max = malloc(sizeof(real) * T), *target_logit = malloc(sizeof(real) * T);
    double *run_sum = malloc(sizeof(double) * T);
    real *wbuf = E->dtype == REAL_DTYPE ? NULL : malloc(sizeof(real) * LMHEAD_VOCAB_BLOCK * H);
    for (int64_t t = 0; t < T; t++) {
        run_max[t] = -INFINITY;
        run_sum[t] = 0;
        target_logit[t] = 0;
    }
    for (int64_t v0 = 0; v0 < V; v0 += LMHEAD_VOCAB_BLOCK) {
        int64_t nv = V - v0 < LMHEAD_VOCAB_BLOCK ? V - v0 : LMHEAD_VOCAB_BLOCK;
        const real *W;
        if (wbuf) {
            const char *src = (const char *)E->data + (size_t)v0 * H * es;
#pragma omp parallel for schedule(static)
            for (int64_t r = 0; r < nv; r++) to_real(wbuf + r * H, src + (size_t)r * H * es, E->dtype, H);
            W = wbuf;
        } else {
            W = (const real *)E->data + v0 * H;
        }
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)nv, (int)H, 1.0, h, (int)H, W,
                    (int)H, 0.0, scratch, (int)nv);
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (targets[t] < 0) continue;
            const real *row = scratch + t * nv;
            real mx = run_max[t];
            for (int64_t j = 0; j < nv; j++) mx = row[j] > mx ? row[j] : mx;
            real block_sum = 0;
            for (int64_t j = 0; j < nv; j++) block_sum += exp(row[j] - mx);
            double s = run_sum[t] * exp((double)run_max[t] - mx) + block_sum;
            run_max[t] = mx;
            run_sum[t] = s;
            if (targets[t] >= v0 && targets[t] < v0 + nv) target_logit[t] = row[targets[t] - v0];
        }
    }
    double total = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++) {
        if (targets[t] < 0) continue;
        total += (double)run_max[t] + log(run_sum[t]) - target_logit[t];
        n++;
    }
    *loss_sum += total;
    *count += n;
    free(run_max);
    free(target_logit);
    free(run_sum);
    free(wbuf);
}
