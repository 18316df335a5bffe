#include "ops/real.h"

void swiglu_forward(real *m, const real *gate, const real *up, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) m[i] = silu_r(gate[i]) * up[i];
}

void sigmoid_gate_forward(real *x, const real *gate, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] *= sigmoid_r(gate[i]);
}
