/* RMSNorm with a zero-centred weight (1 + w), the gated RMSNorm of the Gated DeltaNet
 * output, and the L2 normalisation of its queries and keys (qwen35.md §2.1, §2.2, §4). */
#include <stdlib.h>

#include "ops/real.h"

static inline real inv_rms(const real *x, int D, real eps) {
    double ss = 0;
    for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
    return (real)(1 / sqrt(ss / D + eps));
}

/* dx += r (dn - n mean(n * dn)) for n = x r: the backward of x -> x / rms(x). */
static inline void rms_backward_row(real *dx, const real *dn, const real *x, real r, int D) {
    double dot = 0;
    for (int i = 0; i < D; i++) dot += (double)x[i] * r * dn[i];
    real m = (real)(dot / D);
    for (int i = 0; i < D; i++) dx[i] += r * (dn[i] - x[i] * r * m);
}

/* Weight gradients are sums over rows: each thread sums its rows, then adds once. */
static void add_locked(real *dst, const real *src, int D) {
#pragma omp critical(dt_norm_dw)
    for (int i = 0; i < D; i++) dst[i] += src[i];
}

void rmsnorm1p_forward(real *y, const real *x, const real *w, int64_t rows, int D, real eps) {
#pragma omp parallel for schedule(static) if (rows * D > PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const real *xr = x + r * D;
        real *yr = y + r * D;
        real s = inv_rms(xr, D, eps);
        for (int i = 0; i < D; i++) yr[i] = xr[i] * s * (1 + w[i]);
    }
}

void rmsnorm1p_backward(real *dx, real *dw, const real *dy, const real *x, const real *w, int64_t rows,
                        int D, real eps) {
#pragma omp parallel
    {
        real *dn = malloc(sizeof(real) * D), *dw_local = dw ? calloc(D, sizeof(real)) : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const real *xr = x + r * D, *dyr = dy + r * D;
            real s = inv_rms(xr, D, eps);
            for (int i = 0; i < D; i++) dn[i] = dyr[i] * (1 + w[i]);
            if (dw_local)
                for (int i = 0; i < D; i++) dw_local[i] += dyr[i] * xr[i] * s;
            rms_backward_row(dx + r * D, dn, xr, s, D);
        }
        if (dw_local) add_locked(dw, dw_local, D);
        free(dn);
        free(dw_local);
    }
}

void rmsnorm_gated_forward(real *y, const real *x, const real *z, const real *w, int64_t rows, int D,
                           real eps) {
#pragma omp parallel for schedule(static) if (rows * D > PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const real *xr = x + r * D, *zr = z + r * D;
        real *yr = y + r * D;
        real s = inv_rms(xr, D, eps);
        for (int i = 0; i < D; i++) yr[i] = w[i] * (xr[i] * s) * silu_r(zr[i]);
    }
}

void rmsnorm_gated_backward(real *dx, real *dz, real *dw, const real *dy, const real *x, const real *z,
                            const real *w, int64_t rows, int D, real eps) {
#pragma omp parallel
    {
        real *dn = malloc(sizeof(real) * D), *dw_local = dw ? calloc(D, sizeof(real)) : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const real *xr = x + r * D, *zr = z + r * D, *dyr = dy + r * D;
            real s = inv_rms(xr, D, eps);
            for (int i = 0; i < D; i++) {
                real n = xr[i] * s, g = silu_r(zr[i]);
                dz[r * D + i] += dyr[i] * w[i] * n * silu_grad_r(zr[i]);
                if (dw_local) dw_local[i] += dyr[i] * g * n;
                dn[i] = dyr[i] * g * w[i];
            }
            rms_backward_row(dx + r * D, dn, xr, s, D);
        }
        if (dw_local) add_locked(dw, dw_local, D);
        free(dn);
        free(dw_local);
    }
}

void l2norm_forward(real *x, int64_t rows, int n_heads, int D, int64_t row_stride, real eps, real scale) {
#pragma omp parallel for schedule(static) if (rows * n_heads * D > PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        for (int h = 0; h < n_heads; h++) {
            real *v = x + r * row_stride + (int64_t)h * D;
            double ss = 0;
            for (int i = 0; i < D; i++) ss += (double)v[i] * v[i];
            real s = (real)(scale / sqrt(ss + eps));
            for (int i = 0; i < D; i++) v[i] *= s;
        }
    }
}

void l2norm_backward(real *dx, const real *dy, const real *x, int64_t rows, int n_heads, int D,
                     int64_t row_stride, real eps, real scale) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int h = 0; h < n_heads; h++) {
            int64_t o = r * row_stride + (int64_t)h * D;
            const real *v = x + o, *g = dy + o;
            double ss = 0, dot = 0;
            for (int i = 0; i < D; i++) {
                ss += (double)v[i] * v[i];
                dot += (double)v[i] * g[i];
            }
            /* y = scale x s, s = (|x|^2 + eps)^-1/2:  dx = scale s (dy - x s^2 (x . dy)) */
            double s = 1 / sqrt(ss + eps);
            real a = (real)(scale * s), b = (real)(scale * s * s * s * dot);
            for (int i = 0; i < D; i++) dx[o + i] += a * g[i] - b * v[i];
        }
    }
}
