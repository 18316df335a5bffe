/* attention_{forward,backward}_cuda and lmhead_ce_cuda against the CPU ops on random data.
 * DT_CUDA_TIMING=1 adds timings at the 0.8B sizes (printed, never asserted). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_test.h"
#include "deltatune/dtype.h"
#include "deltatune/ops.h"


static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* ---- attention ---- */

static void attn_case(const char *name, const int *lens, int n_seqs, int nh, int nkv, int hd, int max_len_slack) {
    int starts[16], N = 0, ml = 0;
    for (int s = 0; s < n_seqs; s++) {
        starts[s] = N;
        N += lens[s];
        ml = lens[s] > ml ? lens[s] : ml;
    }
    int64_t qn = (int64_t)N * nh * hd, kn = (int64_t)N * nkv * hd, qld = (int64_t)nh * hd, kvld = (int64_t)nkv * hd;
    float scale = 1.0f / sqrtf((float)hd);
    /* q larger than k: scores of std ~1, so the softmax is neither flat nor one-hot */
    float *q = test_rvec_bf16(qn, 3.0f), *k = test_rvec_bf16(kn, 1.0f), *v = test_rvec_bf16(kn, 1.0f);
    float *dout = test_rvec_bf16(qn, 1.0f);
    float *out_c = calloc(qn, sizeof(float)), *dq_c = calloc(qn, sizeof(float));
    float *dk_c = calloc(kn, sizeof(float)), *dv_c = calloc(kn, sizeof(float));
    float *scr = malloc(sizeof(float) * 2 * (size_t)ml * ml);
    for (int s = 0; s < n_seqs; s++) {
        int64_t o = starts[s];
        attention_forward(out_c + o * qld, q + o * qld, k + o * kvld, v + o * kvld, lens[s], lens[s], nh, nkv, hd,
                          scale, scr);
        attention_backward(dq_c + o * qld, dk_c + o * kvld, dv_c + o * kvld, dout + o * qld, q + o * qld,
                           k + o * kvld, v + o * kvld, lens[s], nh, nkv, hd, scale, scr);
    }

    dt_bf16 *dq_ = test_dev_bf16(q, qn), *dk_ = test_dev_bf16(k, kn), *dv_ = test_dev_bf16(v, kn);
    dt_bf16 *ddo = test_dev_bf16(dout, qn), *dout_ = NULL;
    float *lse_d = NULL;
    /* garbage in the outputs: the op must overwrite, not accumulate */
    float *junk_q = test_rvec(qn, 5.0f), *junk_k = test_rvec(kn, 5.0f);
    float *gq = test_dev_f32(junk_q, qn), *gk = test_dev_f32(junk_k, kn), *gv = test_dev_f32(junk_k, kn);
    void *scratch = NULL;
    size_t sb = attention_scratch_bytes_cuda(ml + max_len_slack, nh, nkv, hd);
    cuda_alloc((void **)&dout_, sizeof(dt_bf16) * qn);
    cuda_alloc((void **)&lse_d, sizeof(float) * N * nh);
    cuda_alloc(&scratch, sb);
    char nm[128];

    attention_forward_cuda(dout_, lse_d, dq_, dk_, dv_, starts, lens, n_seqs, nh, nkv, hd, scale, scratch);
    snprintf(nm, sizeof nm, "attention_forward_%s", name);
    if (test_cuda_ok(nm) == 0) {
        float *o = test_host_bf16(dout_, qn);
        test_expect_close(nm, o, out_c, qn, 1e-2);
        free(o);
        /* lse on a sample of rows, from the same bf16 q, k in double */
        float *lg = test_host_f32(lse_d, (int64_t)N * nh);
        int64_t ns = 0;
        float *lc = malloc(sizeof(float) * N * nh), *lgs = malloc(sizeof(float) * N * nh);
        for (int s = 0; s < n_seqs; s++)
            for (int i = 0; i < lens[s]; i += (i % 5 == 0 ? 1 : 37)) {
                int64_t t = starts[s] + i;
                for (int h = 0; h < nh; h++) {
                    const float *qh = q + t * qld + h * hd;
                    int kh = h / (nh / nkv);
                    double mx = -INFINITY, sum = 0;
                    double *sc = malloc(sizeof(double) * (i + 1));
                    for (int j = 0; j <= i; j++) {
                        const float *kj = k + (starts[s] + j) * kvld + kh * hd;
                        double d = 0;
                        for (int c = 0; c < hd; c++) d += (double)qh[c] * kj[c];
                        sc[j] = d * scale;
                        mx = sc[j] > mx ? sc[j] : mx;
                    }
                    for (int j = 0; j <= i; j++) sum += exp(sc[j] - mx);
                    free(sc);
                    lc[ns] = (float)(mx + log(sum));
                    lgs[ns++] = lg[t * nh + h];
                }
            }
        snprintf(nm, sizeof nm, "attention_lse_%s", name);
        test_expect_close(nm, lgs, lc, ns, 1e-4);
        free(lg);
        free(lc);
        free(lgs);
    }

    attention_backward_cuda(gq, gk, gv, ddo, dout_, lse_d, dq_, dk_, dv_, starts, lens, n_seqs, nh, nkv, hd, scale,
                            scratch);
    snprintf(nm, sizeof nm, "attention_backward_%s", name);
    if (test_cuda_ok(nm) == 0) {
        float *a = test_host_f32(gq, qn), *b = test_host_f32(gk, kn), *c = test_host_f32(gv, kn);
        snprintf(nm, sizeof nm, "attention_dq_%s", name);
        test_expect_close(nm, a, dq_c, qn, 1e-2);
        snprintf(nm, sizeof nm, "attention_dk_%s", name);
        test_expect_close(nm, b, dk_c, kn, 1e-2);
        snprintf(nm, sizeof nm, "attention_dv_%s", name);
        test_expect_close(nm, c, dv_c, kn, 1e-2);
        free(a);
        free(b);
        free(c);
    }
    cuda_free(dq_);
    cuda_free(dk_);
    cuda_free(dv_);
    cuda_free(ddo);
    cuda_free(dout_);
    cuda_free(lse_d);
    cuda_free(gq);
    cuda_free(gk);
    cuda_free(gv);
    cuda_free(scratch);
    free(q), free(k), free(v), free(dout), free(out_c), free(dq_c), free(dk_c), free(dv_c), free(scr);
    free(junk_q), free(junk_k);
}

/* ---- LM head + cross-entropy ---- */

static void loss_case(const char *name, int64_t N, int64_t V, int H, int64_t chunk, int train) {
    float *h = test_rvec_bf16(N * H, 1.0f);
    /* logits of std ~2 whatever H */
    float *E = test_rvec_bf16(V * H, 0.2f * sqrtf(1024.0f / H));
    uint16_t *Eb = malloc(sizeof(uint16_t) * V * H);
    for (int64_t i = 0; i < V * H; i++) Eb[i] = dt_f32_to_bf16(E[i]);
    dt_weight Ew = {.dtype = DT_BF16, .data = Eb, .rows = V, .cols = H};
    int32_t *tg = malloc(sizeof(int32_t) * N);
    for (int64_t t = 0; t < N; t++) {
        tg[t] = (int32_t)((test_urand() * 0.5f + 0.5f) * (V - 1));
        if (t % 7 == 3 || t < 3) tg[t] = -1;  /* ignored, a few in a row */
    }
    float grad_scale = 0.75f / (float)N;
    double loss_c = 0.25;
    int64_t count = 0;
    float *dh0 = test_rvec(N * H, 0.2f * grad_scale), *dh_c = malloc(sizeof(float) * N * H);
    memcpy(dh_c, dh0, sizeof(float) * N * H);
    if (train) {
        float *scr = malloc(sizeof(float) * LMHEAD_TOKEN_CHUNK * V);
        lmhead_ce_forward_backward(&loss_c, &count, dh_c, h, tg, N, &Ew, grad_scale, LMHEAD_TOKEN_CHUNK, scr);
        free(scr);
    } else {
        float *scr = malloc(sizeof(float) * N * LMHEAD_VOCAB_BLOCK);
        lmhead_ce_forward(&loss_c, &count, h, tg, N, &Ew, scr);
        free(scr);
    }

    dt_bf16 *hd_ = test_dev_bf16(h, N * H), *Ed = test_dev_bf16(E, V * H);
    int32_t *tgd = test_dev_i32(tg, N);
    float *dhd = train ? test_dev_f32(dh0, N * H) : NULL;
    double loss_g = 0.25, *lossd = NULL;
    void *scratch = NULL;
    cuda_alloc((void **)&lossd, sizeof(double));
    cuda_upload(lossd, &loss_g, sizeof(double));
    size_t sb = lmhead_ce_scratch_bytes_cuda(chunk, V, H);
    cuda_alloc(&scratch, sb);
    lmhead_ce_cuda(lossd, dhd, hd_, tgd, N, Ed, V, H, grad_scale, scratch, sb);
    char nm[128];
    snprintf(nm, sizeof nm, "lmhead_ce_%s", name);
    if (test_cuda_ok(nm) == 0) {
        cuda_download(&loss_g, lossd, sizeof(double));
        float lg = (float)(loss_g - 0.25), lc = (float)(loss_c - 0.25);
        printf("     loss: gpu %.9g cpu %.9g (%lld tokens counted)\n", loss_g - 0.25, loss_c - 0.25, (long long)count);
        snprintf(nm, sizeof nm, "lmhead_ce_loss_%s", name);
        test_expect_close(nm, &lg, &lc, 1, 1e-3);
        if (train) {
            /* the added gradient alone, so the initial dh does not hide its error */
            float *g = test_host_f32(dhd, N * H);
            for (int64_t i = 0; i < N * H; i++) {
                g[i] -= dh0[i];
                dh_c[i] -= dh0[i];
            }
            snprintf(nm, sizeof nm, "lmhead_ce_dh_%s", name);
            test_expect_close(nm, g, dh_c, N * H, 1e-2);
            free(g);
        }
    }
    cuda_free(hd_);
    cuda_free(Ed);
    cuda_free(tgd);
    cuda_free(dhd);
    cuda_free(lossd);
    cuda_free(scratch);
    free(h), free(E), free(Eb), free(tg), free(dh0), free(dh_c);
}

/* ---- timing (DT_CUDA_TIMING=1) ---- */

static void attn_timing(int n_seqs, int len, int nh, int nkv, int hd) {
    int starts[8], lens[8], N = n_seqs * len;
    for (int s = 0; s < n_seqs; s++) starts[s] = s * len, lens[s] = len;
    int64_t qn = (int64_t)N * nh * hd, kn = (int64_t)N * nkv * hd;
    float *hq = test_rvec(qn, 3.0f), *hk = test_rvec(kn, 1.0f);
    dt_bf16 *q = test_dev_bf16(hq, qn), *k = test_dev_bf16(hk, kn), *v = test_dev_bf16(hk, kn);
    dt_bf16 *dout = test_dev_bf16(hq, qn), *out = NULL;
    float *lse = NULL, *dq = NULL, *dk = NULL, *dv = NULL;
    void *scratch = NULL;
    size_t sb = attention_scratch_bytes_cuda(len, nh, nkv, hd);
    cuda_alloc((void **)&out, 2 * qn);
    cuda_alloc((void **)&lse, 4 * (size_t)N * nh);
    cuda_alloc((void **)&dq, 4 * qn);
    cuda_alloc((void **)&dk, 4 * kn);
    cuda_alloc((void **)&dv, 4 * kn);
    cuda_alloc(&scratch, sb);
    float scale = 1.0f / sqrtf((float)hd);
    int it = 20;
    for (int w = 0; w < 3; w++) {
        attention_forward_cuda(out, lse, q, k, v, starts, lens, n_seqs, nh, nkv, hd, scale, scratch);
        attention_backward_cuda(dq, dk, dv, dout, out, lse, q, k, v, starts, lens, n_seqs, nh, nkv, hd, scale, scratch);
    }
    cuda_check("warm-up");
    double t0 = now_ms();
    for (int i = 0; i < it; i++)
        attention_forward_cuda(out, lse, q, k, v, starts, lens, n_seqs, nh, nkv, hd, scale, scratch);
    cuda_check("fwd");
    double t1 = now_ms();
    for (int i = 0; i < it; i++)
        attention_backward_cuda(dq, dk, dv, dout, out, lse, q, k, v, starts, lens, n_seqs, nh, nkv, hd, scale, scratch);
    cuda_check("bwd");
    double t2 = now_ms();
    /* the same on the GPU alone: queued behind ~10 ms of LM-head work (few launches), the
     * events see the device's time, not the host's launch rate */
    {
        int64_t bn = 4096, bv = 65536, bh = 1024;
        dt_bf16 *bh_ = NULL, *be = NULL;
        int32_t *bt = NULL;
        double *bl = NULL;
        void *bs = NULL;
        cuda_alloc((void **)&bh_, 2 * bn * bh);
        cuda_alloc((void **)&be, 2 * bv * bh);
        cuda_alloc((void **)&bt, 4 * bn);
        cuda_alloc((void **)&bl, 8);
        size_t bsb = lmhead_ce_scratch_bytes_cuda(bn, bv, (int)bh);
        cuda_alloc(&bs, bsb);
        cuda_zero(bh_, 2 * bn * bh), cuda_zero(be, 2 * bv * bh), cuda_zero(bt, 4 * bn), cuda_zero(bl, 8);
        cuda_check("busy setup");
        cuda_prof_enable(1);
        cuda_prof_reset();
        for (int i = 0; i < 12; i++) lmhead_ce_cuda(bl, NULL, bh_, bt, bn, be, bv, (int)bh, 1.0f, bs, bsb);
        cuda_prof_push("attention fwd");
        for (int i = 0; i < 2; i++)
            attention_forward_cuda(out, lse, q, k, v, starts, lens, n_seqs, nh, nkv, hd, scale, scratch);
        cuda_prof_pop();
        cuda_prof_push("attention bwd");
        for (int i = 0; i < 2; i++)
            attention_backward_cuda(dq, dk, dv, dout, out, lse, q, k, v, starts, lens, n_seqs, nh, nkv, hd, scale,
                                    scratch);
        cuda_prof_pop();
        double th = now_ms();
        printf("     GPU-only (2 iterations each, queued in %.2f ms of host time):\n", th - t2);
        cuda_prof_report(stdout);
        cuda_prof_reset();
        cuda_prof_enable(0);
        cuda_free(bh_), cuda_free(be), cuda_free(bt), cuda_free(bl), cuda_free(bs);
    }
    double f = (t1 - t0) / it, b = (t2 - t1) / it;
    /* causal FLOPs: 2 GEMMs forward, 5 backward, each 2 L^2/2 hd per head */
    double gf = (double)n_seqs * nh * len * (double)len * hd * 1e-9;
    printf("     timing attention %dx%d nh %d nkv %d hd %d: forward %.3f ms (%.0f TFLOP/s), backward %.3f ms "
           "(%.0f TFLOP/s), total %.3f ms, scratch %.1f MiB\n",
           n_seqs, len, nh, nkv, hd, f, 2 * gf / f, b, 5 * gf / b, f + b, sb / 1048576.0);
    cuda_free(q), cuda_free(k), cuda_free(v), cuda_free(dout), cuda_free(out), cuda_free(lse);
    cuda_free(dq), cuda_free(dk), cuda_free(dv), cuda_free(scratch);
    free(hq), free(hk);
}

static void loss_timing(int64_t N, int64_t V, int H, int64_t chunk) {
    float *hh = test_rvec(N * H, 1.0f);
    dt_bf16 *h = test_dev_bf16(hh, N * H);
    free(hh);
    float *he = test_rvec(V * H, 0.2f);
    dt_bf16 *E = test_dev_bf16(he, V * H);
    free(he);
    int32_t *tg = malloc(sizeof(int32_t) * N);
    for (int64_t t = 0; t < N; t++) tg[t] = (int32_t)(t * 7919 % V);
    int32_t *tgd = test_dev_i32(tg, N);
    free(tg);
    float *dh = NULL;
    double *loss = NULL;
    void *scratch = NULL;
    size_t sb = lmhead_ce_scratch_bytes_cuda(chunk, V, H);
    cuda_alloc((void **)&dh, 4 * N * H);
    cuda_alloc((void **)&loss, 8);
    cuda_alloc(&scratch, sb);
    cuda_zero(dh, 4 * N * H);
    cuda_zero(loss, 8);
    int it = 5;
    lmhead_ce_cuda(loss, dh, h, tgd, N, E, V, H, 1.0f / N, scratch, sb);
    lmhead_ce_cuda(loss, NULL, h, tgd, N, E, V, H, 1.0f / N, scratch, sb);
    cuda_check("warm-up");
    double t0 = now_ms();
    for (int i = 0; i < it; i++) lmhead_ce_cuda(loss, dh, h, tgd, N, E, V, H, 1.0f / N, scratch, sb);
    cuda_check("train");
    double t1 = now_ms();
    for (int i = 0; i < it; i++) lmhead_ce_cuda(loss, NULL, h, tgd, N, E, V, H, 1.0f / N, scratch, sb);
    cuda_check("eval");
    double t2 = now_ms();
    double tr = (t1 - t0) / it, ev = (t2 - t1) / it, tf = 2.0 * N * V * H * 1e-12;
    printf("     timing lmhead_ce N %lld V %lld H %d chunk %lld: train %.3f ms (%.0f TFLOP/s on its 2 GEMMs), eval "
           "%.3f ms (%.0f TFLOP/s), scratch %.1f MiB\n",
           (long long)N, (long long)V, H, (long long)chunk, tr, 2 * tf / tr * 1e3, ev, tf / ev * 1e3,
           sb / 1048576.0);
    cuda_free(h), cuda_free(E), cuda_free(tgd), cuda_free(dh), cuda_free(loss), cuda_free(scratch);
}

void cuda_tests_attention_loss(void) {
    /* DT_CUDA_TIMING=1: the tests, then timings; 2: the loss timing alone */
    const char *tm = getenv("DT_CUDA_TIMING");
    int timing = tm ? atoi(tm) : 0;
    if (timing != 2) {
        /* 0.8B: 8 query heads, 2 kv heads of 256; two full sequences */
        int two[2] = {2048, 2048};
        attn_case("0.8b_2x2048", two, 2, 8, 2, 256, 0);
        /* 4B-like heads, ragged (a 1-token sequence, several query blocks), scratch for a longer max */
        int ragged[4] = {1, 63, 130, 600};
        attn_case("4b_ragged", ragged, 4, 16, 4, 256, 100);
        /* odd small: hd not a multiple of 8, no grouping, and groups of 3 */
        int odd[3] = {5, 17, 290};
        attn_case("odd_hd20_g1", odd, 3, 2, 2, 20, 0);
        attn_case("odd_hd64_g3", odd, 3, 6, 2, 64, 0);
        attn_case("odd_hd128_g2", odd, 3, 4, 2, 128, 0);  /* the fused kernels at head dim 128 */

        loss_case("v32000_train", 300, 32000, 1024, 128, 1);
        loss_case("v32000_eval", 300, 32000, 1024, 128, 0);
        loss_case("odd_v1001_h72", 37, 1001, 72, 10, 1);
        loss_case("v248320_train", 512, 248320, 1024, 256, 1);
    }
    if (timing == 1) {
        attn_timing(2, 2048, 8, 2, 256);
        attn_timing(2, 2048, 16, 4, 256);
        attn_timing(1, 8192, 8, 2, 256);
    }
    if (timing) loss_timing(4096, 248320, 1024, 1024);
}
