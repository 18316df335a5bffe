#include <stdlib.h>

#include "ops/real.h"

/* Rows of W converted per block: large enough for an efficient GEMM, small enough
 * (about 4 MiB of fp32) that a bf16 model is never expanded. */
static int64_t block_rows(int64_t in) {
    int64_t r = (1 << 20) / (in > 0 ? in : 1);
    return r < 64 ? 64 : r;
}

/* y[T, out] (leading dimension ldy) = x[T, in] W^T for a dense fp32 W. */
static void gemm_xwt(real *y, int64_t ldy, const real *x, const real *W, int64_t T, int64_t out,
                     int64_t in, real beta) {
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)out, (int)in, 1.0, x, (int)in,
                W, (int)in, beta, y, (int)ldy);
}

static void frozen_forward(real *y, const real *x, const dt_weight *w, int64_t T) {
    int64_t out = w->rows, in = w->cols;
    if (w->dtype == REAL_DTYPE) {
        gemm_xwt(y, out, x, w->data, T, out, in, 0.0);
        return;
    }
    int64_t br = block_rows(in);
    real *buf = malloc(sizeof(real) * br * in);
    size_t es = dt_dtype_size(w->dtype);
    for (int64_t r0 = 0; r0 < out; r0 += br) {
        int64_t nr = out - r0 < br ? out - r0 : br;
        const char *src = (const char *)w->data + (size_t)r0 * in * es;
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < nr; r++) to_real(buf + r * in, src + (size_t)r * in * es, w->dtype, in);
        gemm_xwt(y + r0, out, x, buf, T, nr, in, 0.0);
    }
    free(buf);
}

void linear_forward(real *y, const real *x, const dt_linear *l, int64_t T) {
    frozen_forward(y, x, &l->w, T);
    const dt_lora *lo = l->lora;
    if (!lo || T == 0) return;
    real *h = malloc(sizeof(real) * T * lo->rank);
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, lo->rank, (int)lo->in, 1.0, x,
                (int)lo->in, lo->A, (int)lo->in, 0.0, h, lo->rank);
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)lo->out, lo->rank, lo->scale, h,
                lo->rank, lo->B, lo->rank, 1.0, y, (int)lo->out);
    free(h);
}
