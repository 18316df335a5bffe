/* The LM head fused with cross-entropy (qwen35.md §2.5, §4): the [tokens x vocab]
 * logits never exist in full. Evaluation walks the vocabulary in blocks with an
 * online log-sum-exp; training walks the tokens in chunks, each chunk's logits row
 * becoming its gradient in place. */
#include <stdlib.h>

#include "ops/real.h"

/* Whether E is used as it is stored (real and not quantized) rather than a block at a time. */
static int direct(const dt_weight *E) { return E->dtype == REAL_DTYPE && !E->qbits; }

/* Rows [v0, v0 + nv) of E as real: E itself, or converted (dequantized if quantized) into buf. */
static const real *vocab_block(const dt_weight *E, int64_t v0, int64_t nv, real *buf) {
    int64_t H = E->cols;
    if (direct(E)) return (const real *)E->data + v0 * H;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < nv; r++) weight_rows_real(buf + r * H, E, v0 + r, 1);
    return buf;
}

void lmhead_ce_forward(double *loss_sum, int64_t *count, const real *h, const int32_t *targets, int64_t T,
                       const dt_weight *E, real *scratch) {
    int64_t V = E->rows, H = E->cols;
    real *run_max = malloc(sizeof(real) * T), *target_logit = malloc(sizeof(real) * T);
    double *run_sum = malloc(sizeof(double) * T);
    real *wbuf = direct(E) ? NULL : malloc(sizeof(real) * LMHEAD_VOCAB_BLOCK * H);
    for (int64_t t = 0; t < T; t++) {
        run_max[t] = -INFINITY;
        run_sum[t] = 0;
        target_logit[t] = 0;
    }
    for (int64_t v0 = 0; v0 < V; v0 += LMHEAD_VOCAB_BLOCK) {
        int64_t nv = V - v0 < LMHEAD_VOCAB_BLOCK ? V - v0 : LMHEAD_VOCAB_BLOCK;
        const real *W = vocab_block(E, v0, nv, wbuf);
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)nv, (int)H, 1, h, (int)H, W, (int)H, 0, scratch,
             (int)nv);
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (targets[t] < 0) continue;
            const real *row = scratch + t * nv;
            real mx = run_max[t];
            for (int64_t j = 0; j < nv; j++) mx = row[j] > mx ? row[j] : mx;
            real block_sum = 0;
            for (int64_t j = 0; j < nv; j++) block_sum += exp(row[j] - mx);
            run_sum[t] = run_sum[t] * exp((double)run_max[t] - mx) + block_sum;
            run_max[t] = mx;
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

void lmhead_ce_forward_backward(double *loss_sum, int64_t *count, real *dh, const real *h, const int32_t *targets,
                                int64_t T, const dt_weight *E, real grad_scale, int64_t chunk, real *scratch) {
    int64_t V = E->rows, H = E->cols;
    real *wbuf = direct(E) ? NULL : malloc(sizeof(real) * LMHEAD_VOCAB_BLOCK * H);
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
        int64_t nt = T - t0 < chunk ? T - t0 : chunk;
        const int32_t *tg = targets + t0;
        int any = 0;
        for (int64_t t = 0; t < nt; t++) any |= tg[t] >= 0;
        if (!any) continue;
        /* logits [nt, V] of the chunk, a vocabulary block at a time */
        for (int64_t v0 = 0; v0 < V; v0 += LMHEAD_VOCAB_BLOCK) {
            int64_t nv = V - v0 < LMHEAD_VOCAB_BLOCK ? V - v0 : LMHEAD_VOCAB_BLOCK;
            const real *W = vocab_block(E, v0, nv, wbuf);
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nt, (int)nv, (int)H, 1, h + t0 * H, (int)H, W, (int)H,
                 0, scratch + v0, (int)V);
        }
        /* loss, then dlogits = grad_scale (softmax - onehot) in place; ignored rows zero */
        double chunk_loss = 0;
        int64_t chunk_count = 0;
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss, chunk_count)
        for (int64_t t = 0; t < nt; t++) {
            real *row = scratch + t * V;
            if (tg[t] < 0) {
                for (int64_t j = 0; j < V; j++) row[j] = 0;
                continue;
            }
            real mx = -INFINITY;
            for (int64_t j = 0; j < V; j++) mx = row[j] > mx ? row[j] : mx;
            double sum = 0;
            for (int64_t j = 0; j < V; j++) sum += exp(row[j] - mx);
            double lse = mx + log(sum);
            chunk_loss += lse - row[tg[t]];
            chunk_count++;
            for (int64_t j = 0; j < V; j++) row[j] = grad_scale * (real)exp(row[j] - lse);
            row[tg[t]] -= grad_scale;
        }
        *loss_sum += chunk_loss;
        *count += chunk_count;
        /* dh += dlogits E, a vocabulary block at a time */
        for (int64_t v0 = 0; v0 < V; v0 += LMHEAD_VOCAB_BLOCK) {
            int64_t nv = V - v0 < LMHEAD_VOCAB_BLOCK ? V - v0 : LMHEAD_VOCAB_BLOCK;
            const real *W = vocab_block(E, v0, nv, wbuf);
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nt, (int)H, (int)nv, 1, scratch + v0, (int)V, W,
                 (int)H, 1, dh + t0 * H, (int)H);
        }
    }
    free(wbuf);
}
