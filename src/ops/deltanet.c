/* The Gated DeltaNet: its gates and the gated delta rule (qwen35.md §2.2, §3.2, §3.3).
 * The recurrence is exact and sequential per head, with the state S [dk][dv] in
 * floating point of the build's real type, starting at zero for every sequence.
 * The backward keeps the state only every DELTANET_CHUNK tokens and replays each
 * chunk from there, so its memory is O(T / 64 * dk * dv) per head, not O(T dk dv). */
#include <stdlib.h>
#include <string.h>

#include "ops/real.h"

#define DELTANET_CHUNK 64

void deltanet_gates_forward(real *beta, real *g, const real *b, const real *a, const real *a_log,
                            const real *dt_bias, int64_t T, int Hv) {
#pragma omp parallel for schedule(static) if (T * Hv > PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        for (int h = 0; h < Hv; h++) {
            int64_t i = t * Hv + h;
            beta[i] = sigmoid_r(b[i]);
            g[i] = -exp(a_log[h]) * softplus_r(a[i] + dt_bias[h]);
        }
    }
}

void deltanet_gates_backward(real *db, real *da, real *da_log, real *ddt_bias, const real *dbeta, const real *dg,
                             const real *b, const real *a, const real *a_log, const real *dt_bias, int64_t T,
                             int Hv) {
#pragma omp parallel for schedule(static)
    for (int h = 0; h < Hv; h++) {
        real e = exp(a_log[h]), sum_dt = 0, sum_alog = 0;
        for (int64_t t = 0; t < T; t++) {
            int64_t i = t * Hv + h;
            real s = sigmoid_r(b[i]), x = a[i] + dt_bias[h];
            db[i] += dbeta[i] * s * (1 - s);
            /* g = -e^A softplus(x): dg/dx = -e^A sigmoid(x) (1 above torch's threshold 20), dg/dA = g */
            real dx = dg[i] * -e * (x > 20 ? 1 : sigmoid_r(x));
            da[i] += dx;
            sum_dt += dx;
            sum_alog += dg[i] * -e * softplus_r(x);
        }
        if (ddt_bias) ddt_bias[h] += sum_dt;
        if (da_log) da_log[h] += sum_alog;
    }
}

/* Per-head views into the strided inputs of deltanet_forward/backward. */
typedef struct {
    const real *q, *k, *v, *beta, *g;
    int64_t qk_stride, v_stride, gate_stride;
    int dk, dv;
} head_in;

/* One step: S = e^g S; delta = beta (v - S^T k); S += k delta^T. Returns nothing; kv is
 * scratch of dv. */
static void step_state(real *S, real *kv, const head_in *in, int64_t t) {
    const real *kt = in->k + t * in->qk_stride, *vt = in->v + t * in->v_stride;
    real alpha = exp(in->g[t * in->gate_stride]), bt = in->beta[t * in->gate_stride];
    int dk = in->dk, dv = in->dv;
    for (int j = 0; j < dv; j++) kv[j] = 0;
    for (int i = 0; i < dk; i++) {
        real *Si = S + (int64_t)i * dv, ki = kt[i];
        for (int j = 0; j < dv; j++) {
            Si[j] *= alpha;
            kv[j] += Si[j] * ki;
        }
    }
    for (int j = 0; j < dv; j++) kv[j] = bt * (vt[j] - kv[j]);
    for (int i = 0; i < dk; i++) {
        real *Si = S + (int64_t)i * dv, ki = kt[i];
        for (int j = 0; j < dv; j++) Si[j] += ki * kv[j];
    }
}

static head_in head_view(const real *q, const real *k, int64_t qk_stride, const real *v, int64_t v_stride,
                         const real *beta, const real *g, int h, int kh, deltanet_dims d) {
    return (head_in){q + (int64_t)kh * d.dk, k + (int64_t)kh * d.dk, v + (int64_t)h * d.dv, beta + h, g + h,
                     qk_stride, v_stride, d.n_v_heads, d.dk, d.dv};
}

void deltanet_forward(real *o, const real *q, const real *k, int64_t qk_stride, const real *v, int64_t v_stride,
                      const real *beta, const real *g, int64_t T, deltanet_dims d, real *state) {
    int group = d.n_v_heads / d.n_k_heads;
    int64_t o_stride = (int64_t)d.n_v_heads * d.dv;
#pragma omp parallel if (T * d.n_v_heads * d.dk * d.dv > PAR_MIN)
    {
        real *S = malloc(sizeof(real) * ((size_t)d.dk * d.dv + d.dv)), *kv = S + (size_t)d.dk * d.dv;
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < d.n_v_heads; h++) {
            head_in in = head_view(q, k, qk_stride, v, v_stride, beta, g, h, h / group, d);
            real *start = state ? state + (size_t)h * d.dk * d.dv : NULL;
            if (start) memcpy(S, start, sizeof(real) * d.dk * d.dv);
            else memset(S, 0, sizeof(real) * d.dk * d.dv);
            for (int64_t t = 0; t < T; t++) {
                step_state(S, kv, &in, t);
                const real *qt = in.q + t * qk_stride;  /* o = S^T q, from the updated state */
                real *ot = o + t * o_stride + (int64_t)h * d.dv;
                for (int j = 0; j < d.dv; j++) ot[j] = 0;
                for (int i = 0; i < d.dk; i++) {
                    const real *Si = S + (int64_t)i * d.dv;
                    for (int j = 0; j < d.dv; j++) ot[j] += Si[j] * qt[i];
                }
            }
            if (start) memcpy(start, S, sizeof(real) * d.dk * d.dv);
        }
        free(S);
    }
}

/* Backward of one value head over the whole sequence (§3.2), accumulating into the
 * key head's dq/dk rows and this head's dv/dbeta/dg. states: (n_chunks + 1) x dk x dv for
 * the chunk-start states, chunk: DELTANET_CHUNK x dk x dv for the replayed states. */
static void deltanet_head_backward(real *dq, real *dk_, real *dv_, real *dbeta, real *dg, const real *dO,
                                   int64_t o_stride, const head_in *in, int64_t T, real *states, real *chunk,
                                   real *dS, real *tmp) {
    int dk = in->dk, dv = in->dv;
    size_t SS = (size_t)dk * dv;
    int64_t n_chunks = (T + DELTANET_CHUNK - 1) / DELTANET_CHUNK;
    real *kv = tmp, *delta = tmp + dv, *ddelta = tmp + 2 * dv, *dkv = tmp + 3 * dv;
    /* pass 1: the state at the start of every chunk */
    memset(states, 0, sizeof(real) * SS);
    for (int64_t c = 0; c < n_chunks - 1; c++) {
        memcpy(states + (c + 1) * SS, states + c * SS, sizeof(real) * SS);
        for (int64_t t = c * DELTANET_CHUNK; t < (c + 1) * DELTANET_CHUNK; t++) step_state(states + (c + 1) * SS, kv, in, t);
    }
    /* pass 2: chunks in reverse, each replayed from its start state */
    memset(dS, 0, sizeof(real) * SS);
    for (int64_t c = n_chunks - 1; c >= 0; c--) {
        int64_t t0 = c * DELTANET_CHUNK, t1 = t0 + DELTANET_CHUNK < T ? t0 + DELTANET_CHUNK : T;
        memcpy(chunk, states + c * SS, sizeof(real) * SS);
        for (int64_t t = t0; t < t1; t++) {
            if (t > t0) memcpy(chunk + (t - t0) * SS, chunk + (t - t0 - 1) * SS, sizeof(real) * SS);
            step_state(chunk + (t - t0) * SS, kv, in, t);
        }
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const real *S_t = chunk + (t - t0) * SS, *S_prev = t > t0 ? S_t - SS : states + c * SS;
            const real *qt = in->q + t * in->qk_stride, *kt = in->k + t * in->qk_stride;
            const real *vt = in->v + t * in->v_stride, *dOt = dO + t * o_stride;
            real *dqt = dq + t * in->qk_stride, *dkt = dk_ + t * in->qk_stride, *dvt = dv_ + t * in->v_stride;
            int64_t gi = t * in->gate_stride;
            real alpha = exp(in->g[gi]), bt = in->beta[gi];
            /* recompute kv = (alpha S_prev)^T k and delta = beta (v - kv) */
            for (int j = 0; j < dv; j++) kv[j] = 0;
            for (int i = 0; i < dk; i++)
                for (int j = 0; j < dv; j++) kv[j] += alpha * S_prev[(int64_t)i * dv + j] * kt[i];
            for (int j = 0; j < dv; j++) delta[j] = bt * (vt[j] - kv[j]);
            /* o = S_t^T q:  dS_tot = dS + q dO^T;  dq = S_t dO */
            for (int i = 0; i < dk; i++) {
                real acc = 0;
                for (int j = 0; j < dv; j++) {
                    acc += S_t[(int64_t)i * dv + j] * dOt[j];
                    dS[(int64_t)i * dv + j] += qt[i] * dOt[j];
                }
                dqt[i] += acc;
            }
            /* S_t = S' + k delta^T:  dk = dS_tot delta;  ddelta = dS_tot^T k */
            for (int j = 0; j < dv; j++) ddelta[j] = 0;
            for (int i = 0; i < dk; i++) {
                real acc = 0;
                for (int j = 0; j < dv; j++) {
                    acc += dS[(int64_t)i * dv + j] * delta[j];
                    ddelta[j] += dS[(int64_t)i * dv + j] * kt[i];
                }
                dkt[i] += acc;
            }
            /* delta = beta (v - kv) */
            real dbt = 0;
            for (int j = 0; j < dv; j++) {
                dvt[j] += bt * ddelta[j];
                dbt += ddelta[j] * (vt[j] - kv[j]);
                dkv[j] = -bt * ddelta[j];
            }
            dbeta[gi] += dbt;
            /* kv = S'^T k:  dS' = dS_tot + k dkv^T;  dk += S' dkv;  then S' = alpha S_prev */
            real dalpha = 0;
            for (int i = 0; i < dk; i++) {
                real acc = 0;
                for (int j = 0; j < dv; j++) {
                    int64_t ij = (int64_t)i * dv + j;
                    acc += alpha * S_prev[ij] * dkv[j];
                    dS[ij] += kt[i] * dkv[j];
                    dalpha += dS[ij] * S_prev[ij];
                    dS[ij] *= alpha;
                }
                dkt[i] += acc;
            }
            dg[gi] += dalpha * alpha;
        }
    }
}

void deltanet_backward(real *dq, real *dk, real *dv, real *dbeta, real *dg, const real *dO, const real *q,
                       const real *k, int64_t qk_stride, const real *v, int64_t v_stride, const real *beta,
                       const real *g, int64_t T, deltanet_dims d) {
    if (T == 0) return;
    int group = d.n_v_heads / d.n_k_heads;
    size_t SS = (size_t)d.dk * d.dv;
    int64_t n_chunks = (T + DELTANET_CHUNK - 1) / DELTANET_CHUNK;
    /* parallel over key heads: the value heads of one group add into the same dq/dk rows */
#pragma omp parallel
    {
        real *states = malloc(sizeof(real) * (SS * (n_chunks + DELTANET_CHUNK + 1) + 4 * d.dv));
        real *chunk = states + SS * n_chunks, *dS = chunk + SS * DELTANET_CHUNK, *tmp = dS + SS;
#pragma omp for schedule(dynamic, 1)
        for (int kh = 0; kh < d.n_k_heads; kh++) {
            for (int h = kh * group; h < (kh + 1) * group; h++) {
                head_in in = head_view(q, k, qk_stride, v, v_stride, beta, g, h, kh, d);
                deltanet_head_backward(dq + (int64_t)kh * d.dk, dk + (int64_t)kh * d.dk, dv + (int64_t)h * d.dv,
                                       dbeta + h, dg + h, dO + (int64_t)h * d.dv, (int64_t)d.n_v_heads * d.dv, &in,
                                       T, states, chunk, dS, tmp);
            }
        }
        free(states);
    }
}
