#include "ops/real.h"

void conv1d_silu_forward(real *y, const real *x, const real *w, int64_t T, int C, int K) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int c = 0; c < C; c++) {
            real u = 0;
            for (int j = 0; j < K; j++) {
                int64_t src = t - (K - 1) + j;
                if (src >= 0) u += w[(int64_t)c * K + j] * x[src * C + c];
            }
            y[t * C + c] = silu_r(u);
        }
    }
}
