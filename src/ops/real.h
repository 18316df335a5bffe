/* The scalar type of the ops. The product builds them with real = float; the
 * gradient-check test builds the same sources again with real = double
 * (-DDT_OPS_DOUBLE), so finite differences run in double precision on the very
 * code that ships. <tgmath.h> picks expf or exp from the argument's type. */
#ifndef DT_OPS_REAL_H
#define DT_OPS_REAL_H

#include <stdlib.h>
#include <string.h>
#include <tgmath.h>

#include "deltatune/ops.h"
#include "deltatune/quant.h"
#include "ops/blas.h"

#ifdef DT_OPS_DOUBLE
#define REAL_DTYPE DT_F64
#define GEMM cblas_dgemm
#else
#define REAL_DTYPE DT_F32
#define GEMM cblas_sgemm
#endif

/* Stored weights to real: any float dtype (and F64 in the double build). */
static inline void to_real(real *dst, const void *src, dt_dtype t, size_t n) {
#ifdef DT_OPS_DOUBLE
    if (t == DT_F64) {
        memcpy(dst, src, n * sizeof(double));
        return;
    }
    for (size_t i = 0; i < n; i++) {
        float f;
        dt_to_f32(&f, (const char *)src + i * dt_dtype_size(t), t, 1);
        dst[i] = f;
    }
#else
    dt_to_f32(dst, src, t, n);
#endif
}

/* Rows [r0, r0 + nr) of a stored weight as real: converted, or dequantized when quantized (to
 * fp32, then widened in the double build). Serial: callers run it per row in parallel. */
static inline void weight_rows_real(real *dst, const dt_weight *w, int64_t r0, int64_t nr) {
    int64_t n = w->cols;
    if (w->qbits) {
#ifdef DT_OPS_DOUBLE
        float *f = malloc(sizeof(float) * n);
        for (int64_t r = 0; r < nr; r++) {
            quant_dequantize_rows(f, w, r0 + r, 1);
            for (int64_t i = 0; i < n; i++) dst[r * n + i] = f[i];
        }
        free(f);
#else
        quant_dequantize_rows(dst, w, r0, nr);
#endif
        return;
    }
    size_t es = dt_dtype_size(w->dtype);
    to_real(dst, (const char *)w->data + (size_t)(r0 * n) * es, w->dtype, (size_t)(nr * n));
}

/* Loops over fewer elements than this run on one thread: waking the team costs more than it
 * saves, and a lot more when the cores are busy (decoding runs one token at a time). */
#define PAR_MIN 32768

static inline real sigmoid_r(real x) { return 1 / (1 + exp(-x)); }
static inline real silu_r(real x) { return x / (1 + exp(-x)); }
/* d silu / dx = s (1 + x (1 - s)), s = sigmoid(x) */
static inline real silu_grad_r(real x) {
    real s = sigmoid_r(x);
    return s * (1 + x * (1 - s));
}
/* torch's softplus: x above 20 */
static inline real softplus_r(real x) { return x > 20 ? x : log1p(exp(x)); }

#endif
