#include "ops/real.h"

static inline real inv_rms(const real *x, int D, real eps) {
    double ss = 0;
    for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
    return (real)(1.0 / sqrt(ss / D + eps));
}

void rmsnorm1p_forward(real *y, const real *x, const real *w, int64_t rows, int D, real eps) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const real *xr = x + r * D;
        real *yr = y + r * D;
        real s = inv_rms(xr, D, eps);
        for (int i = 0; i < D; i++) yr[i] = xr[i] * s * (1 + w[i]);
    }
}

void rmsnorm_gated_forward(real *y, const real *x, const real *z, const real *w, int64_t rows,
                           int D, real eps) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const real *xr = x + r * D, *zr = z + r * D;
        real *yr = y + r * D;
        real s = inv_rms(xr, D, eps);
        for (int i = 0; i < D; i++) yr[i] = w[i] * (xr[i] * s) * silu_r(zr[i]);
    }
}

void l2norm_forward(real *x, int64_t rows, int n_heads, int D, int64_t row_stride, real eps,
                    real scale) {
#pragma omp parallel for schedule(static)
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
