/* The Gated DeltaNet ops of src/cuda/deltanet.cu against the CPU ops (src/ops/deltanet.c,
 * src/ops/norm.c): the q/k L2 norm, the gates, and the gated delta rule over packed
 * sequences, forward and backward, by the default (chunked) path and by the selectable
 * others (DT_DELTANET=recurrent, DT_DELTANET_R=recurrent, DT_DELTANET_PREC=x3, DT_DELTANET_CW=64,
 * DT_DELTANET_WARPS=8).
 * DT_CUDA_TIMING=1 also times each at the Qwen3.5-0.8B and 4B sizes (2 x 2048 tokens, 16 or 32 value
 * heads of 128). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_test.h"
#include "deltatune/ops.h"

static void test_l2norm(int64_t N, int Hk, int dk, int64_t value_dim) {
    int64_t cd = 2 * (int64_t)Hk * dk + value_dim, n = N * cd;
    float q_scale = 1.0f / sqrtf((float)dk), eps = 1e-6f;
    char name[96];
    float *conv = test_rvec(n, 1.0f), *dqkv = test_rvec(n, 1.0f);
    test_round_bf16(conv, n);
    float *ref = malloc(sizeof(float) * n), *dref = calloc(n, sizeof(float));
    memcpy(ref, conv, sizeof(float) * n);
    l2norm_forward(ref, N, Hk, dk, cd, eps, q_scale);
    l2norm_forward(ref + (int64_t)Hk * dk, N, Hk, dk, cd, eps, 1.0f);
    l2norm_backward(dref, dqkv, conv, N, Hk, dk, cd, eps, q_scale);
    l2norm_backward(dref + (int64_t)Hk * dk, dqkv + (int64_t)Hk * dk, conv + (int64_t)Hk * dk, N, Hk, dk, cd, eps,
                    1.0f);
    for (int64_t t = 0; t < N; t++)
        for (int64_t i = 2 * (int64_t)Hk * dk; i < cd; i++) dref[t * cd + i] = dqkv[t * cd + i];

    dt_bf16 *d_conv = test_dev_bf16(conv, n), *d_qkv = test_dev_bf16(conv, n);  /* qkv: garbage to overwrite */
    float *d_dqkv = test_dev_f32(dqkv, n), *d_dconv = test_dev_f32(conv, n);
    deltanet_qk_l2norm_forward_cuda(d_qkv, d_conv, N, Hk, dk, cd, q_scale, eps);
    deltanet_qk_l2norm_backward_cuda(d_dconv, d_dqkv, d_conv, N, Hk, dk, cd, q_scale, eps);
    snprintf(name, sizeof name, "deltanet_l2norm N%lld Hk%d dk%d", (long long)N, Hk, dk);
    if (!test_cuda_ok(name)) {
        float *y = test_host_bf16(d_qkv, n), *dx = test_host_f32(d_dconv, n);
        snprintf(name, sizeof name, "deltanet_qk_l2norm_forward N%lld Hk%d dk%d", (long long)N, Hk, dk);
        test_expect_close(name, y, ref, n, 1e-2);
        snprintf(name, sizeof name, "deltanet_qk_l2norm_backward N%lld Hk%d dk%d", (long long)N, Hk, dk);
        test_expect_close(name, dx, dref, n, 1e-4);
        free(y);
        free(dx);
    }
    cuda_free(d_conv);
    cuda_free(d_qkv);
    cuda_free(d_dqkv);
    cuda_free(d_dconv);
    free(conv);
    free(dqkv);
    free(ref);
    free(dref);
}

/* b and a side by side in rows with room after them (the in-projections' one product writes
 * them so), db and da the same, the room untouched; the backward from the forward's beta, g. */
static void test_gates(int64_t N, int Hv) {
    int64_t n = N * Hv, ld = 2 * Hv + 3;
    char name[96];
    float *b = test_rvec(n, 6.0f), *a = test_rvec(n, 10.0f), *a_log = test_rvec(Hv, 2.0f),
          *dt_bias = test_rvec(Hv, 15.0f), *dbeta = test_rvec(n, 1.0f), *dg = test_rvec(n, 1.0f);
    test_round_bf16(b, n);
    test_round_bf16(a, n);
    float *beta = malloc(sizeof(float) * n), *g = malloc(sizeof(float) * n);
    float *db = calloc(n, sizeof(float)), *da = calloc(n, sizeof(float));
    deltanet_gates_forward(beta, g, b, a, a_log, dt_bias, N, Hv);
    deltanet_gates_backward(db, da, NULL, NULL, dbeta, dg, b, a, a_log, dt_bias, N, Hv);

    /* ba: [N, ld] rows [b | a | junk]; want: the backward's rows [db | da | the same junk] */
    float *ba = test_rvec_bf16(N * ld, 1.0f), *want = test_copy(ba, N * ld);
    for (int64_t t = 0; t < N; t++)
        for (int h = 0; h < Hv; h++) {
            ba[t * ld + h] = b[t * Hv + h], ba[t * ld + Hv + h] = a[t * Hv + h];
            want[t * ld + h] = db[t * Hv + h], want[t * ld + Hv + h] = da[t * Hv + h];
        }
    dt_bf16 *d_ba = test_dev_bf16(ba, N * ld), *d_dba = test_dev_bf16(ba, N * ld);
    float *d_alog = test_dev_f32(a_log, Hv), *d_dt = test_dev_f32(dt_bias, Hv), *d_beta = test_dev_f32(dg, n),
          *d_g = test_dev_f32(dbeta, n), *d_dbeta = test_dev_f32(dbeta, n), *d_dg = test_dev_f32(dg, n);
    deltanet_gates_forward_cuda(d_beta, d_g, d_ba, d_ba + Hv, ld, d_alog, d_dt, N, Hv);
    deltanet_gates_backward_cuda(d_dba, d_dba + Hv, ld, d_dbeta, d_dg, d_beta, d_g, d_alog, N, Hv);
    snprintf(name, sizeof name, "deltanet_gates N%lld Hv%d", (long long)N, Hv);
    if (!test_cuda_ok(name)) {
        float *hb = test_host_f32(d_beta, n), *hg = test_host_f32(d_g, n), *hdba = test_host_bf16(d_dba, N * ld);
        snprintf(name, sizeof name, "deltanet_gates_forward beta N%lld Hv%d", (long long)N, Hv);
        test_expect_close(name, hb, beta, n, 1e-4);
        snprintf(name, sizeof name, "deltanet_gates_forward g N%lld Hv%d", (long long)N, Hv);
        test_expect_close(name, hg, g, n, 1e-4);
        snprintf(name, sizeof name, "deltanet_gates_backward db, da N%lld Hv%d in rows of %lld", (long long)N, Hv,
                 (long long)ld);
        test_expect_close(name, hdba, want, N * ld, 1e-2);
        free(hb), free(hg), free(hdba);
    }
    cuda_free(d_ba), cuda_free(d_dba), cuda_free(d_alog), cuda_free(d_dt), cuda_free(d_beta), cuda_free(d_g);
    cuda_free(d_dbeta), cuda_free(d_dg);
    free(b), free(a), free(a_log), free(dt_bias), free(dbeta), free(dg), free(beta), free(g), free(db), free(da);
    free(ba), free(want);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* The recurrence over packed sequences of the given lengths, forward and backward. */
static void test_recurrence(const int *lens, int n_seqs, int Hk, int Hv, int dk, int dv, int timing) {
    int64_t N = 0, kd = (int64_t)Hk * dk, cd = 2 * kd + (int64_t)Hv * dv, od = (int64_t)Hv * dv;
    int max_len = 0;
    int32_t *starts = malloc(sizeof(int32_t) * (n_seqs + 1));
    starts[0] = 0;
    for (int s = 0; s < n_seqs; s++) {
        N += lens[s];
        starts[s + 1] = (int32_t)N;
        if (lens[s] > max_len) max_len = lens[s];
    }
    char tag[128], name[192];
    const char *m1 = getenv("DT_DELTANET"), *m2 = getenv("DT_DELTANET_R"), *m3 = getenv("DT_DELTANET_PREC"),
               *m4 = getenv("DT_DELTANET_CW"), *m5 = getenv("DT_DELTANET_WARPS");
    snprintf(tag, sizeof tag, "N%lld/%dseq Hk%d Hv%d dk%d dv%d%s%s%s%s%s%s%s%s%s%s", (long long)N, n_seqs, Hk, Hv, dk,
             dv, m1 ? " " : "", m1 ? m1 : "", m2 ? " R=" : "", m2 ? m2 : "", m3 ? " prec=" : "", m3 ? m3 : "",
             m4 ? " cw=" : "", m4 ? m4 : "", m5 ? " warps=" : "", m5 ? m5 : "");

    /* realistic inputs: q, k L2-normalised (q scaled), v free; beta in (0, 1); g < 0 with
     * a few very strong decays (e^g underflows toward 0) */
    float *qkv = test_rvec(N * cd, 1.0f);
    l2norm_forward(qkv, N, Hk, dk, cd, 1e-6f, 1.0f / sqrtf((float)dk));
    l2norm_forward(qkv + kd, N, Hk, dk, cd, 1e-6f, 1.0f);
    test_round_bf16(qkv, N * cd);
    float *beta = malloc(sizeof(float) * N * Hv), *g = malloc(sizeof(float) * N * Hv);
    for (int64_t i = 0; i < N * Hv; i++) {
        /* and a few betas near underflow: the chunked backward recovers v - S^T k as delta / beta */
        beta[i] = i % 89 == 7 ? 1e-30f : 1.0f / (1.0f + expf(-3.0f * test_urand()));
        g[i] = i % 97 == 5 ? -30.0f : -0.5f * expf(2.0f * test_urand());
    }
    float *dO = test_rvec(N * od, 1.0f);

    float *o_ref = calloc(N * od, sizeof(float)), *dqkv_ref = calloc(N * cd, sizeof(float)),
          *dbeta_ref = calloc(N * Hv, sizeof(float)), *dg_ref = calloc(N * Hv, sizeof(float));
    deltanet_dims dd = {Hk, Hv, dk, dv};
    for (int s = 0; s < n_seqs; s++) {
        int64_t off = starts[s];
        const float *q = qkv + off * cd;
        float *dq = dqkv_ref + off * cd;
        deltanet_forward(o_ref + off * od, q, q + kd, cd, q + 2 * kd, cd, beta + off * Hv, g + off * Hv, lens[s], dd,
                         NULL);
        deltanet_backward(dq, dq + kd, dq + 2 * kd, dbeta_ref + off * Hv, dg_ref + off * Hv, dO + off * od, q, q + kd,
                          cd, q + 2 * kd, cd, beta + off * Hv, g + off * Hv, lens[s], dd);
    }

    cuda_deltanet_dims d = {Hk, Hv, dk, dv};
    size_t scratch_bytes = deltanet_scratch_bytes_cuda(n_seqs, max_len, d);
    void *scratch = NULL;
    /* outputs start as garbage: the ops overwrite them */
    float *junk = test_rvec(N * cd, 100.0f);
    dt_bf16 *d_qkv = test_dev_bf16(qkv, N * cd), *d_o = test_dev_bf16(junk, N * od);
    float *d_beta = test_dev_f32(beta, N * Hv), *d_g = test_dev_f32(g, N * Hv), *d_dO = test_dev_f32(dO, N * od);
    float *d_dqkv = test_dev_f32(junk, N * cd), *d_dbeta = test_dev_f32(junk, N * Hv),
          *d_dg = test_dev_f32(junk, N * Hv);
    int32_t *d_starts = test_dev_i32(starts, n_seqs + 1);
    cuda_alloc(&scratch, scratch_bytes);
    deltanet_forward_cuda(d_o, d_qkv, d_beta, d_g, d_starts, n_seqs, max_len, d, scratch);
    deltanet_backward_cuda(d_dqkv, d_dbeta, d_dg, d_dO, d_qkv, d_beta, d_g, d_starts, n_seqs, max_len, d, scratch);
    snprintf(name, sizeof name, "deltanet %s", tag);
    if (!test_cuda_ok(name)) {
        float *o = test_host_bf16(d_o, N * od), *dqkv = test_host_f32(d_dqkv, N * cd),
              *dbeta = test_host_f32(d_dbeta, N * Hv), *dg = test_host_f32(d_dg, N * Hv);
        snprintf(name, sizeof name, "deltanet_forward o %s", tag);
        test_expect_close(name, o, o_ref, N * od, 1e-2);
        snprintf(name, sizeof name, "deltanet_backward dqkv %s", tag);
        test_expect_close(name, dqkv, dqkv_ref, N * cd, 1e-3);
        snprintf(name, sizeof name, "deltanet_backward dbeta %s", tag);
        test_expect_close(name, dbeta, dbeta_ref, N * Hv, 1e-3);
        snprintf(name, sizeof name, "deltanet_backward dg %s", tag);
        test_expect_close(name, dg, dg_ref, N * Hv, 1e-3);
        free(o);
        free(dqkv);
        free(dbeta);
        free(dg);
    }
    if (timing) {
        const int iters = 20;
        cuda_prof_enable(1);
        cuda_prof_reset();
        double t0 = now_ms();
        for (int i = 0; i < iters; i++) {
            cuda_prof_push("deltanet_fwd");
            deltanet_forward_cuda(d_o, d_qkv, d_beta, d_g, d_starts, n_seqs, max_len, d, scratch);
            cuda_prof_pop();
        }
        cuda_check("timing fwd");
        double t1 = now_ms();
        for (int i = 0; i < iters; i++) {
            cuda_prof_push("deltanet_bwd");
            deltanet_backward_cuda(d_dqkv, d_dbeta, d_dg, d_dO, d_qkv, d_beta, d_g, d_starts, n_seqs, max_len, d,
                                   scratch);
            cuda_prof_pop();
        }
        cuda_check("timing bwd");
        double t2 = now_ms();
        printf("timing %s: forward %.3f ms, backward %.3f ms per call (host clock, %d calls); scratch %.1f MB\n",
               tag, (t1 - t0) / iters, (t2 - t1) / iters, iters, scratch_bytes / 1048576.0);
        printf("cudaEvent sums over %d calls:\n", iters);
        cuda_prof_report(stdout);
        cuda_prof_reset();
        cuda_prof_enable(0);
    }
    cuda_free(scratch);
    cuda_free(d_qkv);
    cuda_free(d_o);
    cuda_free(d_beta);
    cuda_free(d_g);
    cuda_free(d_dO);
    cuda_free(d_dqkv);
    cuda_free(d_dbeta);
    cuda_free(d_dg);
    cuda_free(d_starts);
    free(starts);
    free(qkv);
    free(beta);
    free(g);
    free(dO);
    free(junk);
    free(o_ref);
    free(dqkv_ref);
    free(dbeta_ref);
    free(dg_ref);
}

void cuda_tests_deltanet(void) {
    const char *env = getenv("DT_CUDA_TIMING");
    int timing = env && atoi(env) == 1;
    test_l2norm(2 * 2048, 16, 128, 16 * 128);
    test_l2norm(37, 3, 17, 29);
    test_gates(2 * 2048, 16);
    test_gates(37, 3);
    static const int two[] = {2048, 2048}, ragged[] = {1, 63, 130}, odd[] = {5, 17, 40}, big_k[] = {300, 77},
                     one[] = {129};
    test_recurrence(two, 2, 16, 16, 128, 128, timing);  /* Qwen3.5-0.8B */
    test_recurrence(two, 2, 16, 32, 128, 128, timing);  /* Qwen3.5-4B: walk blocks of 64 columns */
    test_recurrence(ragged, 3, 8, 16, 128, 128, 0);     /* Hv = 2 Hk */
    test_recurrence(odd, 3, 2, 4, 18, 10, 0);           /* odd sizes: unaligned rows, padded columns */
    test_recurrence(big_k, 2, 1, 2, 256, 64, 0);        /* dk 256 */
    test_recurrence(one, 1, 3, 3, 64, 200, 0);          /* several column blocks, the last partial */
    static const int chunky[] = {32, 31, 33, 64, 95, 1000};
    test_recurrence(chunky, 6, 4, 8, 128, 96, 0);        /* chunk edges of the chunked form */
    /* the other paths stay selectable, so they stay tested: the recurrent kernels
     * (DT_DELTANET=recurrent), the chunked backward with the recurrent reverse pass
     * (DT_DELTANET_R=recurrent), dk's products in 3xTF32 (DT_DELTANET_PREC=x3), walk blocks of
     * 64 value columns where 32 would be chosen (DT_DELTANET_CW=64), the walks in 8 warps where
     * dk 128 takes 16 (DT_DELTANET_WARPS=8) */
    static const char *vars[] = {"DT_DELTANET", "DT_DELTANET_R", "DT_DELTANET_PREC", "DT_DELTANET_CW",
                                 "DT_DELTANET_WARPS"};
    static const char *vals[] = {"recurrent", "recurrent", "x3", "64", "8"};
    for (int k = 0; k < 5; k++) {
        const char *prev = getenv(vars[k]);
        char *saved = prev ? strdup(prev) : NULL;
        setenv(vars[k], vals[k], 1);
        test_recurrence(two, 2, 16, 16, 128, 128, timing);
        test_recurrence(ragged, 3, 8, 16, 128, 128, 0);
        test_recurrence(odd, 3, 2, 4, 18, 10, 0);
        if (saved) {
            setenv(vars[k], saved, 1);
            free(saved);
        } else {
            unsetenv(vars[k]);
        }
    }
}
