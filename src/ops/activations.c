/* SwiGLU and the sigmoid output gate of the attention block. */
#include "ops/real.h"

void swiglu_forward(real *m, const real *gate, const real *up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (int64_t i = 0; i < n; i++) m[i] = silu_r(gate[i]) * up[i];
}

void swiglu_backward(real *dgate, real *dup, const real *dm, const real *gate, const real *up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        dgate[i] += dm[i] * up[i] * silu_grad_r(gate[i]);
        dup[i] += dm[i] * silu_r(gate[i]);
    }
}

void sigmoid_gate_forward(real *x, const real *gate, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (int64_t i = 0; i < n; i++) x[i] *= sigmoid_r(gate[i]);
}

void sigmoid_gate_backward(real *dx, real *dgate, const real *dy, const real *x, const real *gate, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        real s = sigmoid_r(gate[i]);
        dx[i] += dy[i] * s;
        dgate[i] += dy[i] * x[i] * s * (1 - s);
    }
}
