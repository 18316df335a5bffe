/* Token embedding lookup: one row of E per token, converted (or dequantized) to real. */
#include "ops/real.h"

void embedding_forward(real *out, const int32_t *ids, int64_t T, const dt_weight *E) {
    int64_t H = E->cols;
#pragma omp parallel for schedule(static) if (T * H > PAR_MIN)
    for (int64_t t = 0; t < T; t++) weight_rows_real(out + t * H, E, ids[t], 1);
}

void embedding_backward(real *dE, const real *dout, const int32_t *ids, int64_t T, int64_t H) {
    /* serial: repeated ids add into the same row */
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < H; i++) dE[(int64_t)ids[t] * H + i] += dout[t * H + i];
}
