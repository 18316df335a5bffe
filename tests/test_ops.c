/* Forward ops against plain double-precision loops on random data. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/dtype.h"
#include "deltatune/ops.h"
#include "deltatune/rng.h"
#include "test.h"


/* bf16 weights through the block conversion equal fp32 weights holding the same values. */
TEST(ops_linear_bf16_matches_f32) {
    int64_t T = 3, in = 4096, out = 600;  /* 256 rows per conversion block: three blocks, one partial */
    float *x = test_rand_vec(T * in, 1), *wf = test_rand_vec(out * in, 1);
    uint16_t *wb = malloc(2 * out * in);
    dt_from_f32(wb, DT_BF16, wf, out * in);
    dt_to_f32(wf, wb, DT_BF16, out * in);  /* fp32 copy of the rounded values */
    dt_linear lf = {{.dtype = DT_F32, .data = wf, .rows = out, .cols = in}, NULL}, lb = {{.dtype = DT_BF16, .data = wb, .rows = out, .cols = in}, NULL};
    float *yf = malloc(sizeof(float) * T * out), *yb = malloc(sizeof(float) * T * out);
    linear_forward(yf, x, &lf, T);
    linear_forward(yb, x, &lb, T);
    double e = rel_err(yb, yf, T * out);
    free(x); free(wf); free(wb); free(yf); free(yb);
    CHECKF(e < 1e-6, "rel err %g", e);
}

TEST(ops_linear_lora_matches_naive) {
    int64_t T = 4, in = 9, out = 7;
    int r = 3;
    float *x = test_rand_vec(T * in, 1), *w = test_rand_vec(out * in, 1), *A = test_rand_vec(r * in, 1), *B = test_rand_vec(out * r, 1);
    dt_lora lo = {.rank = r, .scale = 0.75f, .in = in, .out = out, .A = A, .B = B};
    dt_linear l = {{.dtype = DT_F32, .data = w, .rows = out, .cols = in}, &lo};
    float y[4 * 7], ref[4 * 7];
    linear_forward(y, x, &l, T);
    for (int t = 0; t < T; t++)
        for (int o = 0; o < out; o++) {
            double s = 0;
            for (int i = 0; i < in; i++) {
                double d = w[o * in + i];
                for (int k = 0; k < r; k++) d += 0.75 * B[o * r + k] * A[k * in + i];
                s += d * x[t * in + i];
            }
            ref[t * out + o] = (float)s;
        }
    double e = rel_err(y, ref, T * out);
    free(x); free(w); free(A); free(B);
    CHECKF(e < 1e-5, "rel err %g", e);
}

/* The fused, vocabulary-blocked LM-head loss equals log-softmax of full logits. */
TEST(ops_lmhead_ce_matches_full_softmax) {
    int64_t T = 6, H = 16, V = 2 * LMHEAD_VOCAB_BLOCK + 123;  /* three blocks, the last partial */
    float *h = test_rand_vec(T * H, 1), *E = test_rand_vec(V * H, 2);
    int32_t targets[6] = {0, 5000, -1, (int32_t)V - 1, 4096, 17};
    float *scratch = malloc(sizeof(float) * T * LMHEAD_VOCAB_BLOCK);
    dt_weight w = {.dtype = DT_F32, .data = E, .rows = V, .cols = H};
    double sum = 0;
    int64_t count = 0;
    lmhead_ce_forward(&sum, &count, h, targets, T, &w, scratch);
    double ref = 0;
    for (int t = 0; t < T; t++) {
        if (targets[t] < 0) continue;
        double mx = -INFINITY, *lg = malloc(sizeof(double) * V), se = 0;
        for (int64_t v = 0; v < V; v++) {
            double s = 0;
            for (int i = 0; i < H; i++) s += (double)h[t * H + i] * E[v * H + i];
            lg[v] = s;
            mx = s > mx ? s : mx;
        }
        for (int64_t v = 0; v < V; v++) se += exp(lg[v] - mx);
        ref += mx + log(se) - lg[targets[t]];
        free(lg);
    }
    free(h); free(E); free(scratch);
    CHECKF(count == 5, "count %lld", (long long)count);
    CHECKF(fabs(sum - ref) <= 1e-5 * fabs(ref), "loss %.9g, reference %.9g", sum, ref);
}

/* The recurrence against the closed form S_t = a_t (I - b_t k k^T) S_{t-1} + b_t k v^T in double. */
TEST(ops_deltanet_matches_closed_form) {
    int T = 70, Hk = 1, Hv = 2, dk = 5, dv = 3;
    float *q = test_rand_vec(T * Hk * dk, 1), *k = test_rand_vec(T * Hk * dk, 1), *v = test_rand_vec(T * Hv * dv, 1);
    float *beta = malloc(sizeof(float) * T * Hv), *g = malloc(sizeof(float) * T * Hv);
    for (int i = 0; i < T * Hv; i++) {
        beta[i] = 0.5f + 0.4f * test_frand();
        g[i] = -0.3f + 0.25f * test_frand();
    }
    for (int t = 0; t < T; t++) {  /* unit keys, as after the L2 norm */
        double n = 0;
        for (int i = 0; i < dk; i++) n += k[t * dk + i] * k[t * dk + i];
        for (int i = 0; i < dk; i++) k[t * dk + i] /= sqrt(n);
    }
    float *o = malloc(sizeof(float) * T * Hv * dv), *ref = malloc(sizeof(float) * T * Hv * dv);
    deltanet_forward(o, q, k, dk, v, Hv * dv, beta, g, T, (deltanet_dims){Hk, Hv, dk, dv}, NULL);
    for (int h = 0; h < Hv; h++) {
        double S[5][3] = {{0}};
        for (int t = 0; t < T; t++) {
            const float *kt = k + t * dk, *qt = q + t * dk, *vt = v + (t * Hv + h) * dv;
            double a = exp(g[t * Hv + h]), b = beta[t * Hv + h], kS[3] = {0};
            for (int j = 0; j < dv; j++)
                for (int i = 0; i < dk; i++) kS[j] += kt[i] * S[i][j];
            for (int i = 0; i < dk; i++)
                for (int j = 0; j < dv; j++) S[i][j] = a * (S[i][j] - b * kt[i] * kS[j]) + b * kt[i] * vt[j];
            for (int j = 0; j < dv; j++) {
                double s = 0;
                for (int i = 0; i < dk; i++) s += S[i][j] * qt[i];
                ref[(t * Hv + h) * dv + j] = (float)s;
            }
        }
    }
    double e = rel_err(o, ref, T * Hv * dv);
    free(q); free(k); free(v); free(beta); free(g); free(o); free(ref);
    CHECKF(e < 1e-5, "rel err %g", e);
}

TEST(ops_attention_matches_naive) {
    int T = 9, nh = 4, nkv = 2, hd = 8;
    float *q = test_rand_vec(T * nh * hd, 1), *k = test_rand_vec(T * nkv * hd, 1), *v = test_rand_vec(T * nkv * hd, 1);
    float *out = malloc(sizeof(float) * T * nh * hd), *ref = malloc(sizeof(float) * T * nh * hd);
    float *scratch = malloc(sizeof(float) * T * T);
    attention_forward(out, q, k, v, T, T, nh, nkv, hd, 0.35f, scratch);
    for (int h = 0; h < nh; h++) {
        int kh = h / (nh / nkv);
        for (int i = 0; i < T; i++) {
            double p[9], mx = -INFINITY, z = 0;
            for (int j = 0; j <= i; j++) {
                double s = 0;
                for (int d = 0; d < hd; d++) s += q[(i * nh + h) * hd + d] * k[(j * nkv + kh) * hd + d];
                p[j] = 0.35 * s;
                mx = p[j] > mx ? p[j] : mx;
            }
            for (int j = 0; j <= i; j++) z += p[j] = exp(p[j] - mx);
            for (int d = 0; d < hd; d++) {
                double s = 0;
                for (int j = 0; j <= i; j++) s += p[j] / z * v[(j * nkv + kh) * hd + d];
                ref[(i * nh + h) * hd + d] = (float)s;
            }
        }
    }
    double e = rel_err(out, ref, T * nh * hd);
    free(q); free(k); free(v); free(out); free(ref); free(scratch);
    CHECKF(e < 1e-5, "rel err %g", e);
}

/* Floats to test conversions on: random bit patterns of every exponent, and edge cases. */
static float conversion_input(int i) {
    static const float edges[] = {0.0f, -0.0f, 1.0f, 65504.0f, 65520.0f, 1e-7f, 6.1e-5f, 5.96e-8f, 2.98e-8f,
                                  1e30f, -1e-40f, 1.00390625f, 1.01171875f, INFINITY, -INFINITY};
    if (i < (int)(sizeof edges / sizeof edges[0])) return edges[i];
    static dt_rng r;
    if (i == (int)(sizeof edges / sizeof edges[0])) dt_rng_seed(&r, 0x9e3779b97f4a7c15ull);
    uint32_t u = (uint32_t)(dt_rng_next(&r) >> 16);
    if ((u & 0x7f800000u) == 0x7f800000u) u ^= 0x40000000u;  /* keep NaN out of the comparisons */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#ifdef __FLT16_MAX__
/* f16 against the compiler's own conversions (IEEE round to nearest even). */
TEST(ops_f16_matches_the_compiler) {
    for (uint32_t h = 0; h < 65536; h++) {
        _Float16 ref;
        uint16_t bits = (uint16_t)h;
        memcpy(&ref, &bits, 2);
        float want = (float)ref, got = dt_f16_to_f32(bits);
        CHECKF(memcmp(&want, &got, 4) == 0 || (isnan(want) && isnan(got)), "f16 0x%04x -> %g, expected %g", h, got, want);
    }
    for (int i = 0; i < 200000; i++) {
        float x = conversion_input(i);
        _Float16 ref = (_Float16)x;
        uint16_t want;
        memcpy(&want, &ref, 2);
        CHECKF(dt_f32_to_f16(x) == want, "f32 %.9g -> f16 0x%04x, expected 0x%04x", x, dt_f32_to_f16(x), want);
    }
}
#endif

/* bf16: the nearest of the two bf16 values around x, ties to the even one, found in double. */
TEST(ops_bf16_rounds_to_nearest_even) {
    for (int i = 0; i < 200000; i++) {
        float x = conversion_input(i);
        if (isinf(x)) continue;
        uint32_t u;
        memcpy(&u, &x, 4);
        uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1), want;
        double dlo = dt_bf16_to_f32(lo), dhi = dt_bf16_to_f32(hi), d = x;
        if (isinf(dhi) || isnan(dhi)) continue;  /* next to the largest finite value */
        double elo = fabs(d - dlo), ehi = fabs(dhi - d);
        want = elo < ehi ? lo : ehi < elo ? hi : (lo & 1 ? hi : lo);
        CHECKF(dt_f32_to_bf16(x) == want, "f32 %.9g -> bf16 0x%04x, expected 0x%04x", x, dt_f32_to_bf16(x), want);
    }
    CHECK(isnan(dt_bf16_to_f32(dt_f32_to_bf16(NAN))));
}
