/* The products through MLX affine-quantized weights on the GPU: dequantize_rows_cuda and the
 * quantized embedding against the CPU's quant_dequantize_rows (every bit width, group size and
 * scale type), then the linear and the LM-head loss through a quantized weight against the same
 * ops given the dequantized weight in bf16 (the ops the other groups test against the CPU). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_test.h"
#include "deltatune/error.h"
#include "deltatune/dtype.h"
#include "deltatune/mem.h"
#include "deltatune/quant.h"

/* A random rows x cols weight quantized on the host (scales and biases stored as st), and its
 * device copy. */
typedef struct {
    dt_weight w;
    uint32_t *q;
    void *scales, *biases;
    cuda_qweight d;
} qcase;

static void *params_as(const float *v, int64_t n, dt_dtype st) {
    void *p = malloc(dt_dtype_size(st) * (size_t)n);
    dt_from_f32(p, st, v, (size_t)n);
    return p;
}

static int qcase_make(qcase *c, int64_t rows, int64_t cols, int bits, int group, dt_dtype st, float scale) {
    memset(c, 0, sizeof *c);
    int64_t groups = rows * (cols / group), words = rows * cols * bits / 32;
    float *v = test_rvec(rows * cols, scale), *s = malloc(sizeof(float) * groups), *b = malloc(sizeof(float) * groups);
    c->q = malloc(sizeof(uint32_t) * words);
    quant_quantize(c->q, s, b, v, rows, cols, bits, group);
    c->scales = params_as(s, groups, st);
    c->biases = params_as(b, groups, st);
    free(v);
    free(s);
    free(b);
    c->w = (dt_weight){.dtype = DT_U32, .data = c->q, .rows = rows, .cols = cols, .qbits = bits, .qgroup = group,
                       .qdtype = st, .scales = c->scales, .biases = c->biases};
    size_t pb = dt_dtype_size(st) * (size_t)groups;
    void *d[3] = {NULL, NULL, NULL};
    if (cuda_alloc(&d[0], sizeof(uint32_t) * words) || cuda_alloc(&d[1], pb) || cuda_alloc(&d[2], pb) ||
        cuda_upload(d[0], c->q, sizeof(uint32_t) * words) || cuda_upload(d[1], c->scales, pb) ||
        cuda_upload(d[2], c->biases, pb))
        return -1;
    c->d = (cuda_qweight){d[0], d[1], d[2], bits, group, st == DT_BF16 ? CUDA_BF16 : st == DT_F16 ? CUDA_F16 : CUDA_F32,
                          rows, cols};
    return 0;
}

static void qcase_free(qcase *c) {
    free(c->q);
    free(c->scales);
    free(c->biases);
    cuda_free((void *)c->d.q);
    cuda_free((void *)c->d.scales);
    cuda_free((void *)c->d.biases);
}

/* Device copies of scale * urand() values (bf16: rounded once). */
static dt_bf16 *dev_rand_bf16(int64_t n, float scale) {
    float *v = test_rvec(n, scale);
    dt_bf16 *d = test_dev_bf16(v, n);
    free(v);
    return d;
}

static float *dev_rand_f32(int64_t n, float scale) {
    float *v = test_rvec(n, scale);
    float *d = test_dev_f32(v, n);
    free(v);
    return d;
}

/* The CPU's dequantized rows [r0, r0 + nr), rounded to bf16 as the GPU keeps them. */
static float *host_rows(const qcase *c, int64_t r0, int64_t nr) {
    float *f = malloc(sizeof(float) * nr * c->w.cols);
    quant_dequantize_rows(f, &c->w, r0, nr);
    test_round_bf16(f, nr * c->w.cols);
    return f;
}

static void test_dequantize(void) {
    static const int bits[] = {2, 3, 4, 5, 6, 8}, groups[] = {32, 64, 128};
    static const dt_dtype types[] = {DT_F32, DT_BF16, DT_F16};
    for (size_t bi = 0; bi < 6; bi++)
        for (size_t gi = 0; gi < 3; gi++)
            for (size_t ti = 0; ti < 3; ti++) {
                int64_t rows = 37, cols = 384, r0 = 5, nr = 29;
                qcase c;
                char name[96];
                snprintf(name, sizeof name, "dequantize_b%d_g%d_%s", bits[bi], groups[gi], dt_dtype_name(types[ti]));
                dt_bf16 *out = NULL;
                if (qcase_make(&c, rows, cols, bits[bi], groups[gi], types[ti], 0.1f) ||
                    cuda_alloc((void **)&out, sizeof(dt_bf16) * nr * cols)) {
                    test_cuda_ok(name);
                    qcase_free(&c);
                    continue;
                }
                dequantize_rows_cuda(out, &c.d, r0, nr);
                if (test_cuda_ok(name) == 0) {
                    float *gpu = test_host_bf16(out, nr * cols), *cpu = host_rows(&c, r0, nr);
                    test_expect_close(name, gpu, cpu, nr * cols, 1e-2);
                    free(gpu);
                    free(cpu);
                }
                cuda_free(out);
                qcase_free(&c);
            }
}

static void test_embedding(void) {
    for (int bits = 4; bits <= 8; bits += 4) {
        int64_t V = 500, H = 256, T = 77;
        qcase c;
        char name[64];
        snprintf(name, sizeof name, "embedding_q%d", bits);
        int32_t *ids = malloc(sizeof(int32_t) * T);
        for (int64_t t = 0; t < T; t++) ids[t] = (int32_t)((test_urand() * 0.5f + 0.5f) * (V - 1));
        ids[0] = 0;
        ids[1] = (int32_t)V - 1;
        int32_t *idd = test_dev_i32(ids, T);
        float *out = dev_rand_f32(T * H, 1.f);  /* junk first: every value is written */
        if (qcase_make(&c, V, H, bits, 64, DT_BF16, 1.f) == 0 && idd && out) {
            embedding_forward_q_cuda(out, idd, T, &c.d);
            if (test_cuda_ok(name) == 0) {
                float *gpu = test_host_f32(out, T * H), *cpu = malloc(sizeof(float) * T * H);
                for (int64_t t = 0; t < T; t++) {
                    float *row = host_rows(&c, ids[t], 1);
                    memcpy(cpu + t * H, row, sizeof(float) * H);
                    free(row);
                }
                test_expect_close(name, gpu, cpu, T * H, 1e-6);
                free(gpu);
                free(cpu);
            }
        } else {
            test_cuda_ok(name);
        }
        cuda_free(idd);
        cuda_free(out);
        free(ids);
        qcase_free(&c);
    }
}

/* linear_forward_cuda and linear_backward_cuda through the quantized W, with LoRA and dropout,
 * against the same calls with W dequantized to bf16: the same products, so equal. */
static void test_linear(void) {
    int64_t T = 100, in = 256, out = 192;
    int r = 8;
    qcase c;
    if (qcase_make(&c, out, in, 4, 64, DT_BF16, 0.1f)) {
        test_cuda_ok("linear_q4");
        return;
    }
    float *Wf = host_rows(&c, 0, out);
    dt_bf16 *W = test_dev_bf16(Wf, out * in), *wbuf = NULL, *x = dev_rand_bf16(T * in, 1.f);
    dt_bf16 *A = dev_rand_bf16(r * in, 0.1f), *B = dev_rand_bf16(out * r, 0.3f);
    dt_bf16 *dy = dev_rand_bf16(T * out, 1.f);
    cuda_alloc((void **)&wbuf, sizeof(dt_bf16) * out * in);
    void *scratch = NULL;
    cuda_alloc(&scratch, linear_scratch_bytes_cuda(T, in, r, 1));
    float *y[2], *dx[2], *dA[2], *dB[2];
    for (int k = 0; k < 2; k++) {
        y[k] = dev_rand_f32(T * out, 1.f);
        dx[k] = dev_rand_f32(T * in, 0.f);
        dA[k] = dev_rand_f32(r * in, 0.f);
        dB[k] = dev_rand_f32(out * r, 0.f);
        cuda_linear l = {.W = k ? NULL : W, .in = in, .out = out, .rank = r, .scale = 2.f, .dropout = 0.1f,
                         .dropout_seed = 99, .A = A, .B = B, .dA = dA[k], .dB = dB[k]};
        if (k) l.wq = c.d, l.wbuf = wbuf;
        linear_forward_cuda(y[k], CUDA_F32, 0, x, &l, T, scratch, NULL);
        linear_backward_cuda(dx[k], 1, dy, 0, x, &l, T, scratch, NULL);
    }
    if (test_cuda_ok("linear_q4") == 0) {
        const char *names[] = {"linear_q4_y", "linear_q4_dx", "linear_q4_dA", "linear_q4_dB"};
        float **d[] = {y, dx, dA, dB};
        int64_t n[] = {T * out, T * in, r * in, out * r};
        for (int i = 0; i < 4; i++) {
            float *q = test_host_f32(d[i][1], n[i]), *ref = test_host_f32(d[i][0], n[i]);
            test_expect_close(names[i], q, ref, n[i], 1e-6);
            free(q);
            free(ref);
        }
    }
    for (int k = 0; k < 2; k++) {
        cuda_free(y[k]);
        cuda_free(dx[k]);
        cuda_free(dA[k]);
        cuda_free(dB[k]);
    }
    void *dev[] = {W, wbuf, x, A, B, dy, scratch};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) cuda_free(dev[i]);
    free(Wf);
    qcase_free(&c);
}

/* lmhead_ce_q_cuda in slices of 296 rows (a ragged last one) and chunks of tokens (its scratch
 * too small for all 96: it takes 12 at a time) against lmhead_ce_cuda on the dequantized E (24
 * tokens at a time, one slice). The two round different P to bf16 (each relative to its own
 * running max), so dh agrees to bf16's precision, not fp32's. */
static void test_lmhead(void) {
    int64_t N = 96, V = 1003, H = 256, chunk = 40, slice = 300;
    size_t qscratch = (size_t)chunk * 296 * 4 + 4 * 1024;
    qcase c;
    if (qcase_make(&c, V, H, 8, 64, DT_BF16, 1.f)) {
        test_cuda_ok("lmhead_q8");
        return;
    }
    float *Ef = host_rows(&c, 0, V);
    dt_bf16 *E = test_dev_bf16(Ef, V * H), *h = dev_rand_bf16(N * H, 1.f), *ebuf = NULL;
    int32_t *tg = malloc(sizeof(int32_t) * N);
    for (int64_t t = 0; t < N; t++) tg[t] = t % 9 == 4 ? -100 : (int32_t)((test_urand() * 0.5f + 0.5f) * (V - 1));
    int32_t *tgd = test_dev_i32(tg, N);
    cuda_alloc((void **)&ebuf, sizeof(dt_bf16) * slice * H);
    void *scratch = NULL;
    size_t sb = lmhead_ce_scratch_bytes_cuda(chunk, V, (int)H);
    cuda_alloc(&scratch, sb);
    double zero = 0, loss[2];
    double *ld[2] = {NULL, NULL};
    float *dh[2];
    for (int k = 0; k < 2; k++) {
        cuda_alloc((void **)&ld[k], sizeof(double));
        cuda_upload(ld[k], &zero, sizeof(double));
        dh[k] = dev_rand_f32(N * H, 0.f);
        if (k)
            lmhead_ce_q_cuda(ld[k], dh[k], h, tgd, N, &c.d, ebuf, slice, 1.f / N, scratch, qscratch);
        else
            lmhead_ce_cuda(ld[k], dh[k], h, tgd, N, E, V, (int)H, 1.f / N, scratch, sb);
    }
    if (test_cuda_ok("lmhead_q8") == 0) {
        cuda_download(&loss[0], ld[0], sizeof(double));
        cuda_download(&loss[1], ld[1], sizeof(double));
        float lq = (float)loss[1], lr = (float)loss[0];
        test_expect_close("lmhead_q8_loss", &lq, &lr, 1, 1e-5);
        float *q = test_host_f32(dh[1], N * H), *ref = test_host_f32(dh[0], N * H);
        test_expect_close("lmhead_q8_dh", q, ref, N * H, 2e-3);
        free(q);
        free(ref);
    }
    /* below the scratch contract, or a dequantizing buffer of fewer than 8 rows: an error that says
     * which, before anything is launched (the loss stays as it was) */
    struct {
        const char *name, *says;
        int rc;
    } bad[2] = {{"lmhead_scratch_too_small", "scratch", 0}, {"lmhead_q_ebuf_too_small", "dequantizing buffer", 0}};
    double before[2] = {0, 0}, after[2] = {0, 0};
    for (int k = 0; k < 2; k++) cuda_download(&before[k], ld[k], sizeof(double));
    bad[0].rc = lmhead_ce_cuda(ld[0], dh[0], h, tgd, N, E, V, (int)H, 1.f / N, scratch, 64);
    const char *msg0 = bad[0].rc ? strdup(dt_errmsg()) : NULL;
    bad[1].rc = lmhead_ce_q_cuda(ld[1], dh[1], h, tgd, N, &c.d, ebuf, 4, 1.f / N, scratch, qscratch);
    const char *msgs[2] = {msg0, bad[1].rc ? dt_errmsg() : NULL};
    for (int k = 0; k < 2; k++) cuda_download(&after[k], ld[k], sizeof(double));
    for (int i = 0; i < 2; i++) {
        int ok = bad[i].rc == -1 && msgs[i] && strstr(msgs[i], bad[i].says) && after[i] == before[i];
        printf("%s cuda_%s: rc %d, \"%s\"\n", ok ? "ok  " : "FAIL", bad[i].name, bad[i].rc, msgs[i] ? msgs[i] : "");
        if (ok) cuda_tests_passed++;
        else cuda_tests_failed++;
    }
    free((void *)msg0);
    for (int k = 0; k < 2; k++) {
        cuda_free(ld[k]);
        cuda_free(dh[k]);
    }
    void *dev[] = {E, h, ebuf, tgd, scratch};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) cuda_free(dev[i]);
    free(Ef);
    free(tg);
    qcase_free(&c);
}

/* DT_CUDA_TIMING=1: dequantizing Qwen3.5's LM head (248320 x 1024), printed, never asserted. */
static void time_dequantize(void) {
    for (int bits = 4; bits <= 8; bits += 4) {
        int64_t rows = 248320, cols = 1024, reps = 20;
        qcase c;
        dt_bf16 *out = NULL;
        if (qcase_make(&c, rows, cols, bits, 64, DT_BF16, 0.1f) == 0 &&
            cuda_alloc((void **)&out, sizeof(dt_bf16) * rows * cols) == 0) {
            dequantize_rows_cuda(out, &c.d, 0, rows);
            cuda_check("warm-up");
            double t0 = dt_seconds();
            for (int i = 0; i < reps; i++) dequantize_rows_cuda(out, &c.d, 0, rows);
            cuda_check("timing");
            double ms = (dt_seconds() - t0) * 1e3 / reps;
            double bytes = (double)rows * cols * (2 + bits / 8.0) + 4.0 * rows * cols / 64;
            printf("timing dequantize %d-bit %lldx%lld  %8.4f ms  %7.1f GB/s\n", bits, (long long)rows,
                   (long long)cols, ms, bytes / (ms * 1e6));
        }
        cuda_free(out);
        qcase_free(&c);
    }
}

void cuda_tests_quant(void) {
    if (getenv("DT_CUDA_TIMING")) time_dequantize();
    test_dequantize();
    test_embedding();
    test_linear();
    test_lmhead();
}
