/* The causal depthwise convolution (kernel K, zero history) + SiLU applied to the
 * mixed q|k|v channels of a Gated DeltaNet layer, one sequence at a time. */
#include <stdlib.h>

#include "ops/real.h"

static inline real conv_at(const real *x, const real *w, int64_t t, int c, int C, int K) {
    real u = 0;
    for (int j = 0; j < K; j++) {
        int64_t src = t - (K - 1) + j;
        if (src >= 0) u += w[(int64_t)c * K + j] * x[src * C + c];
    }
    return u;
}

void conv1d_silu_forward(real *y, const real *x, const real *w, int64_t T, int C, int K) {
#pragma omp parallel for schedule(static) if (T * C > PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int c = 0; c < C; c++) y[t * C + c] = silu_r(conv_at(x, w, t, c, C, K));
}

void conv1d_silu_backward(real *dx, real *dw, const real *dy, const real *x, const real *w, int64_t T, int C,
                          int K) {
    real *du = malloc(sizeof(real) * T * C);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int c = 0; c < C; c++) du[t * C + c] = dy[t * C + c] * silu_grad_r(conv_at(x, w, t, c, C, K));
    /* x[s] feeds outputs t = s .. s + K - 1 through tap j = s - t + K - 1 */
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < T; s++)
        for (int c = 0; c < C; c++) {
            real acc = 0;
            for (int j = 0; j < K; j++) {
                int64_t t = s + (K - 1) - j;
                if (t < T) acc += w[(int64_t)c * K + j] * du[t * C + c];
            }
            dx[s * C + c] += acc;
        }
    if (dw) {
#pragma omp parallel for schedule(static)
        for (int c = 0; c < C; c++)
            for (int j = 0; j < K; j++) {
                real acc = 0;
                for (int64_t t = 0; t < T; t++) {
                    int64_t src = t - (K - 1) + j;
                    if (src >= 0) acc += du[t * C + c] * x[src * C + c];
                }
                dw[(int64_t)c * K + j] += acc;
            }
    }
    free(du);
}
