/* A frozen linear with an optional LoRA: y = x W^T + s (drop(x) A^T) B^T.
 * W keeps its stored dtype (bf16, or MLX-quantized) and is converted a block of rows
 * at a time, so the model is never expanded; only LoRA's A and B receive gradients. */
#include <stdlib.h>

#include "ops/real.h"

/* Rows of W converted per block: large enough for an efficient GEMM, small enough
 * (about 4 MiB) that the weights are never expanded in full. */
static int64_t block_rows(int64_t in) {
    int64_t r = (1 << 20) / (in > 0 ? in : 1);
    return r < 64 ? 64 : r;
}

/* Calls fn(block, r0, nr) over W in blocks of rows converted (or dequantized) to real, or
 * W itself when it is already real. */
typedef void (*block_fn)(void *ctx, const real *Wb, int64_t r0, int64_t nr);
static void for_weight_blocks(const dt_weight *w, block_fn fn, void *ctx) {
    int64_t out = w->rows, in = w->cols;
    if (w->dtype == REAL_DTYPE && !w->qbits) {
        fn(ctx, w->data, 0, out);
        return;
    }
    int64_t br = block_rows(in);
    real *buf = malloc(sizeof(real) * br * in);
    for (int64_t r0 = 0; r0 < out; r0 += br) {
        int64_t nr = out - r0 < br ? out - r0 : br;
#pragma omp parallel for schedule(static) if (nr * in > PAR_MIN)
        for (int64_t r = 0; r < nr; r++) weight_rows_real(buf + r * in, w, r0 + r, 1);
        fn(ctx, buf, r0, nr);
    }
    free(buf);
}

typedef struct {
    real *y;
    real *dx;
    const real *x, *dy;
    int64_t T, out, in;
} gemm_ctx;

static void forward_block(void *p, const real *Wb, int64_t r0, int64_t nr) {
    gemm_ctx *c = p;  /* y[:, r0:r0+nr] = x Wb^T */
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c->T, (int)nr, (int)c->in, 1, c->x, (int)c->in, Wb,
         (int)c->in, 0, c->y + r0, (int)c->out);
}

static void backward_block(void *p, const real *Wb, int64_t r0, int64_t nr) {
    gemm_ctx *c = p;  /* dx += dy[:, r0:r0+nr] Wb */
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)c->T, (int)c->in, (int)nr, 1, c->dy + r0,
         (int)c->out, Wb, (int)c->in, 1, c->dx, (int)c->in);
}

/* PEFT's dropout (nn.Dropout: zero with probability p, scale the rest by 1/(1-p)) as a
 * pure function of (seed, element), so a recomputed forward and the backward agree. */
static inline real dropout_factor(const dt_lora *lo, int64_t idx) {
    uint64_t z = lo->dropout_seed + 0x9e3779b97f4a7c15ull * (uint64_t)(idx + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    double u = (double)(z >> 11) * (1.0 / 9007199254740992.0);
    return u < lo->dropout ? 0 : 1 / (1 - lo->dropout);
}

/* The input of the A branch: x itself, or a dropped-out copy (caller frees if != x). */
static const real *lora_input(const dt_lora *lo, const real *x, int64_t T) {
    if (lo->dropout <= 0) return x;
    real *xd = malloc(sizeof(real) * T * lo->in);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < T * lo->in; i++) xd[i] = x[i] * dropout_factor(lo, i);
    return xd;
}

void linear_forward(real *y, const real *x, const dt_linear *l, int64_t T) {
    gemm_ctx c = {.y = y, .x = x, .T = T, .out = l->w.rows, .in = l->w.cols};
    for_weight_blocks(&l->w, forward_block, &c);
    const dt_lora *lo = l->lora;
    if (!lo || T == 0) return;
    const real *xd = lora_input(lo, x, T);
    real *h = malloc(sizeof(real) * T * lo->rank);
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, lo->rank, (int)lo->in, 1, xd, (int)lo->in, lo->A,
         (int)lo->in, 0, h, lo->rank);
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)lo->out, lo->rank, lo->scale, h, lo->rank,
         lo->B, lo->rank, 1, y, (int)lo->out);
    free(h);
    if (xd != x) free((void *)xd);
}

void linear_backward(real *dx, const real *dy, const real *x, const dt_linear *l, int64_t T) {
    if (T == 0) return;
    if (dx) {
        gemm_ctx c = {.dx = dx, .dy = dy, .T = T, .out = l->w.rows, .in = l->w.cols};
        for_weight_blocks(&l->w, backward_block, &c);
    }
    const dt_lora *lo = l->lora;
    if (!lo) return;
    int r = lo->rank, in = (int)lo->in, out = (int)lo->out;
    const real *xd = lora_input(lo, x, T);
    real *h = malloc(sizeof(real) * T * r), *dh = malloc(sizeof(real) * T * r);
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, r, in, 1, xd, in, lo->A, in, 0, h, r);
    /* dB += s dy^T h;  dh = s dy B;  dA += dh^T drop(x) */
    if (lo->dB) GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, r, (int)T, lo->scale, dy, out, h, r, 1, lo->dB, r);
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, r, out, lo->scale, dy, out, lo->B, r, 0, dh, r);
    if (lo->dA) GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, r, in, (int)T, 1, dh, r, xd, in, 1, lo->dA, in);
    if (dx) {
        if (lo->dropout <= 0) {
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, in, r, 1, dh, r, lo->A, in, 1, dx, in);
        } else {  /* through the same mask */
            real *t = malloc(sizeof(real) * T * in);
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, in, r, 1, dh, r, lo->A, in, 0, t, in);
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < T * in; i++) dx[i] += t[i] * dropout_factor(lo, i);
            free(t);
        }
    }
    free(h);
    free(dh);
    if (xd != x) free((void *)xd);
}
