/* The Gated DeltaNet recurrence (qwen35.md §2.2), exact and sequential per head.
 * The state S is [dk][dv] in fp32 and starts at zero for every sequence. */
#include <stdlib.h>
#include <string.h>

#include "ops/real.h"

void deltanet_gates_forward(real *beta, real *g, const real *b, const real *a,
                            const real *a_log, const real *dt_bias, int64_t T, int Hv) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int h = 0; h < Hv; h++) {
            int64_t i = t * Hv + h;
            beta[i] = sigmoid_r(b[i]);
            g[i] = -exp(a_log[h]) * softplus_r(a[i] + dt_bias[h]);
        }
    }
}

/* One head: S' = e^g S; kv = S'^T k; delta = beta (v - kv); S = S' + k delta^T; o = S^T q. */
static void deltanet_head(real *o, int64_t o_stride, const real *q, const real *k,
                          int64_t qk_stride, const real *v, int64_t v_stride, const real *beta,
                          const real *g, int64_t gate_stride, int64_t T, int dk, int dv, real *S,
                          real *kv) {
    memset(S, 0, sizeof(real) * dk * dv);
    for (int64_t t = 0; t < T; t++) {
        const real *qt = q + t * qk_stride, *kt = k + t * qk_stride, *vt = v + t * v_stride;
        real alpha = exp(g[t * gate_stride]), bt = beta[t * gate_stride];
        for (int j = 0; j < dv; j++) kv[j] = 0;
        for (int i = 0; i < dk; i++) {
            real *Si = S + (int64_t)i * dv, ki = kt[i];
            for (int j = 0; j < dv; j++) {
                Si[j] *= alpha;
                kv[j] += Si[j] * ki;
            }
        }
        for (int j = 0; j < dv; j++) kv[j] = bt * (vt[j] - kv[j]);  /* now delta */
        real *ot = o + t * o_stride;
        for (int j = 0; j < dv; j++) ot[j] = 0;
        for (int i = 0; i < dk; i++) {
            real *Si = S + (int64_t)i * dv, ki = kt[i], qi = qt[i];
            for (int j = 0; j < dv; j++) {
                Si[j] += ki * kv[j];
                ot[j] += Si[j] * qi;
            }
        }
    }
}

void deltanet_forward(real *o, const real *q, const real *k, int64_t qk_stride, const real *v,
                      int64_t v_stride, const real *beta, const real *g, int64_t T,
                      deltanet_dims d) {
    int group = d.n_v_heads / d.n_k_heads;
#pragma omp parallel
    {
        real *S = malloc(sizeof(real) * ((size_t)d.dk * d.dv + d.dv));
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < d.n_v_heads; h++) {
            int kh = h / group;
            deltanet_head(o + (int64_t)h * d.dv, (int64_t)d.n_v_heads * d.dv, q + (int64_t)kh * d.dk,
                          k + (int64_t)kh * d.dk, qk_stride, v + (int64_t)h * d.dv, v_stride, beta + h,
                          g + h, d.n_v_heads, T, d.dk, d.dv, S, S + (int64_t)d.dk * d.dv);
        }
        free(S);
    }
}
