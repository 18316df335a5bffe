/* The elementwise and normalisation ops of the CUDA backend against the CPU ops: conversions,
 * the residual add, the embedding, the RMSNorms, the q/k norm + rope, the attention gate,
 * SwiGLU and the conv1d + SiLU over packed sequences. Outputs the GPU overwrites are filled
 * with garbage first; rmsnorm1p's dx, which accumulates, starts from random values.
 * DT_CUDA_TIMING=1 also times each op at 2 x 2048 tokens of Qwen3.5-0.8B's sizes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_test.h"
#include "deltatune/ops.h"

static float *zeros(int64_t n) { return calloc(n > 0 ? n : 1, sizeof(float)); }


/* Packed positions: each sequence counts from 0. */
static int32_t *packed_pos(const int *lens, int n_seqs, int64_t *N) {
    int64_t n = 0;
    for (int s = 0; s < n_seqs; s++) n += lens[s];
    int32_t *p = malloc(sizeof(int32_t) * n);
    int64_t t = 0;
    for (int s = 0; s < n_seqs; s++)
        for (int i = 0; i < lens[s]; i++) p[t++] = i;
    *N = n;
    return p;
}

/* ---- misc.cu ---- */

static void test_convert_add(int64_t n, int off) {
    char name[96];
    float *x = test_rvec(n, 3.0f), *y0 = test_rvec(n, 1.0f);
    float *dx = test_dev_f32(x, n), *dy = test_dev_f32(y0, n), *dc = test_dev_f32(y0, n);
    dt_bf16 *db = test_dev_bf16(y0, n);
    int64_t m = n - off;
    /* off shifts the pointers off their 16-byte alignment: the scalar paths */
    cuda_f32_to_bf16(db + off, dx + off, m);
    cuda_add_f32(dy + off, dx + off, m);
    snprintf(name, sizeof name, "f32_to_bf16 n=%lld off=%d", (long long)m, off);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(db, n), *c = test_copy(x, n);
        test_round_bf16(c, n);
        test_expect_close(name, g + off, c + off, m, 0);
        free(g);
        free(c);
    }
    cuda_bf16_to_f32(dc + off, db + off, m);
    snprintf(name, sizeof name, "bf16_to_f32 n=%lld off=%d", (long long)m, off);
    if (!test_cuda_ok(name)) {
        float *g = test_host_f32(dc, n), *c = test_copy(x, n);
        test_round_bf16(c, n);
        test_expect_close(name, g + off, c + off, m, 0);
        free(g);
        free(c);
    }
    snprintf(name, sizeof name, "add_f32 n=%lld off=%d", (long long)m, off);
    if (!test_cuda_ok(name)) {
        float *g = test_host_f32(dy, n), *c = test_copy(y0, n);
        for (int64_t i = off; i < n; i++) c[i] += x[i];
        test_expect_close(name, g, c, n, 0);
        free(g);
        free(c);
    }
    cuda_free(dx), cuda_free(dy), cuda_free(dc), cuda_free(db);
    free(x), free(y0);
}

static void test_embedding(int64_t V, int H, int64_t T) {
    char name[96];
    snprintf(name, sizeof name, "embedding V=%lld H=%d T=%lld", (long long)V, H, (long long)T);
    float *E = test_rvec_bf16(V * H, 1.0f);
    int32_t *ids = malloc(sizeof(int32_t) * T);
    for (int64_t t = 0; t < T; t++) ids[t] = (int32_t)((test_urand() + 1) * 0.5 * V) % (int32_t)V;
    ids[0] = (int32_t)V - 1;
    uint16_t *Eb = malloc(sizeof(uint16_t) * V * H);
    for (int64_t i = 0; i < V * H; i++) Eb[i] = dt_f32_to_bf16(E[i]);
    dt_weight W = {.dtype = DT_BF16, .data = Eb, .rows = V, .cols = H};
    float *c = zeros(T * H);
    embedding_forward(c, ids, T, &W);
    dt_bf16 *dE = test_dev_bf16(E, V * H);
    int32_t *dids = test_dev_i32(ids, T);
    float *dout = test_dev_f32(c, T * H);
    cuda_zero(dout, sizeof(float) * T * H);
    embedding_forward_cuda(dout, dids, T, dE, H);
    if (!test_cuda_ok(name)) {
        float *g = test_host_f32(dout, T * H);
        test_expect_close(name, g, c, T * H, 0);
        free(g);
    }
    cuda_free(dE), cuda_free(dids), cuda_free(dout);
    free(E), free(ids), free(Eb), free(c);
}

/* ---- norm.cu ---- */

/* Rows of ld bf16 on the device, junk in every column (*junk: the same on the host), for an op that
 * writes rows of fewer columns with room after (a group's input and the LoRAs' u after it). */
static dt_bf16 *junk_rows(int64_t rows, int64_t ld, float **junk) {
    *junk = test_rvec_bf16(rows * ld, 1.0f);
    return test_dev_bf16(*junk, rows * ld);
}

/* d's rows hold want [rows, cols] in their first cols, and the junk after them untouched. */
static void expect_rows_with_room(const char *name, const dt_bf16 *d, const float *junk, const float *want,
                                  int64_t rows, int64_t cols, int64_t ld) {
    if (test_cuda_ok(name)) return;
    float *got = test_host_bf16(d, rows * ld), *all = test_copy(junk, rows * ld);
    for (int64_t r = 0; r < rows; r++) memcpy(all + r * ld, want + r * cols, sizeof(float) * cols);
    test_expect_close(name, got, all, rows * ld, 1e-2);
    free(got), free(all);
}

static void test_rmsnorm1p(int64_t rows, int D) {
    char name[96];
    int64_t n = rows * D;
    float eps = 1e-6f;
    float *x = test_rvec(n, 2.0f), *w = test_rvec(D, 0.5f), *dy = test_rvec(n, 1.0f), *dx0 = test_rvec(n, 1.0f);
    float *y = zeros(n), *dxc = test_copy(dx0, n);
    rmsnorm1p_forward(y, x, w, rows, D, eps);
    rmsnorm1p_backward(dxc, NULL, dy, x, w, rows, D, eps);
    float *d_x = test_dev_f32(x, n), *d_w = test_dev_f32(w, D), *d_dy = test_dev_f32(dy, n), *d_dx = test_dev_f32(dx0, n);
    dt_bf16 *d_y = test_dev_bf16(dy, n); /* garbage to be overwritten */
    rmsnorm1p_forward_cuda(d_y, D, d_x, d_w, rows, D, eps);
    snprintf(name, sizeof name, "rmsnorm1p_forward rows=%lld D=%d", (long long)rows, D);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_y, n);
        test_expect_close(name, g, y, n, 1e-2);
        free(g);
    }
    /* into rows longer than D (a group's input, with its LoRAs' u after D): the rest untouched */
    int64_t ld = D + 20;
    float *junk;
    dt_bf16 *d_yp = junk_rows(rows, ld, &junk);
    rmsnorm1p_forward_cuda(d_yp, ld, d_x, d_w, rows, D, eps);
    snprintf(name, sizeof name, "rmsnorm1p_forward rows=%lld D=%d into rows of %lld", (long long)rows, D, (long long)ld);
    expect_rows_with_room(name, d_yp, junk, y, rows, D, ld);
    cuda_free(d_yp);
    free(junk);
    /* the same from a separate dx_in, into a dx of garbage, and from none (dx_in NULL: the
     * gradient alone) */
    float *d_in = test_dev_f32(dx0, n), *d_out = test_dev_f32(dy, n), *d_alone = test_dev_f32(dy, n);
    dt_bf16 *d_out_bf = test_dev_bf16(dy, n);
    rmsnorm1p_backward_cuda(d_out, d_out_bf, D, d_in, d_dy, d_x, d_w, rows, D, eps);
    rmsnorm1p_backward_cuda(d_alone, NULL, D, NULL, d_dy, d_x, d_w, rows, D, eps);
    rmsnorm1p_backward_cuda(d_dx, NULL, D, d_dx, d_dy, d_x, d_w, rows, D, eps);
    snprintf(name, sizeof name, "rmsnorm1p_backward dx+= rows=%lld D=%d", (long long)rows, D);
    if (!test_cuda_ok(name)) {
        float *g = test_host_f32(d_dx, n), *g2 = test_host_f32(d_out, n), *g3 = test_host_f32(d_alone, n);
        float *g4 = test_host_bf16(d_out_bf, n);
        test_expect_close(name, g, dxc, n, 1e-4);
        snprintf(name, sizeof name, "rmsnorm1p_backward dx=dx_in+ rows=%lld D=%d", (long long)rows, D);
        test_expect_close(name, g2, dxc, n, 1e-4);
        snprintf(name, sizeof name, "rmsnorm1p_backward dx=dx_in+, bf16 copy rows=%lld D=%d", (long long)rows, D);
        test_expect_close(name, g4, dxc, n, 1e-2);
        /* the accumulated part alone, so the random start cannot hide an error in it */
        for (int64_t i = 0; i < n; i++) g[i] -= dx0[i], dxc[i] -= dx0[i];
        snprintf(name, sizeof name, "rmsnorm1p_backward increment rows=%lld D=%d", (long long)rows, D);
        test_expect_close(name, g, dxc, n, 1e-4);
        snprintf(name, sizeof name, "rmsnorm1p_backward dx_in=NULL rows=%lld D=%d", (long long)rows, D);
        test_expect_close(name, g3, dxc, n, 1e-4);
        free(g), free(g2), free(g3), free(g4);
    }
    cuda_free(d_in), cuda_free(d_out), cuda_free(d_alone), cuda_free(d_out_bf);
    cuda_free(d_x), cuda_free(d_w), cuda_free(d_dy), cuda_free(d_dx), cuda_free(d_y);
    free(x), free(w), free(dy), free(dx0), free(y), free(dxc);
}

static void test_rmsnorm_gated(int64_t rows, int D) {
    char name[96];
    int64_t n = rows * D;
    float eps = 1e-6f;
    float *x = test_rvec_bf16(n, 2.0f), *z = test_rvec_bf16(n, 3.0f), *w = test_rvec(D, 1.0f), *dy = test_rvec(n, 1.0f);
    float *y = zeros(n), *dxc = zeros(n), *dzc = zeros(n);
    rmsnorm_gated_forward(y, x, z, w, rows, D, eps);
    rmsnorm_gated_backward(dxc, dzc, NULL, dy, x, z, w, rows, D, eps);
    dt_bf16 *d_x = test_dev_bf16(x, n), *d_z = test_dev_bf16(z, n), *d_y = test_dev_bf16(dy, n),
            *d_dz = test_dev_bf16(dy, n);
    float *d_w = test_dev_f32(w, D), *d_dy = test_dev_f32(dy, n), *d_dx = test_dev_f32(dy, n);
    rmsnorm_gated_forward_cuda(d_y, 1, D, d_x, d_z, D, d_w, rows, D, eps);
    snprintf(name, sizeof name, "rmsnorm_gated_forward rows=%lld D=%d", (long long)rows, D);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_y, n);
        test_expect_close(name, g, y, n, 1e-2);
        free(g);
    }
    /* rows as a token's heads (rows / heads tokens when it divides), tokens' rows with room after:
     * y's (the output projection's u), z's (b and a) and dz's (db, da and g); the room untouched */
    int heads = rows % 16 == 0 ? 16 : 1;
    int64_t T = rows / heads, HD = (int64_t)heads * D, ld = HD + 12, ldz = HD + 20;
    float *junk, *zs = test_rvec_bf16(T * ldz, 1.0f);
    for (int64_t t = 0; t < T; t++) memcpy(zs + t * ldz, z + t * HD, sizeof(float) * HD);
    dt_bf16 *d_yp = junk_rows(T, ld, &junk), *d_zs = test_dev_bf16(zs, T * ldz);
    rmsnorm_gated_forward_cuda(d_yp, heads, ld, d_x, d_zs, ldz, d_w, rows, D, eps);
    snprintf(name, sizeof name, "rmsnorm_gated_forward rows=%lld D=%d as %d heads, z and y in rows of %lld, %lld",
             (long long)rows, D, heads, (long long)ldz, (long long)ld);
    expect_rows_with_room(name, d_yp, junk, y, T, HD, ld);
    cuda_free(d_yp);
    free(junk);
    d_yp = junk_rows(T, ld, &junk);
    rmsnorm_gated_backward_cuda(d_dx, d_yp, ld, heads, d_dy, d_x, d_zs, ldz, d_w, rows, D, eps);
    snprintf(name, sizeof name, "rmsnorm_gated_backward dz rows=%lld D=%d as %d heads, z and dz in rows of %lld, %lld",
             (long long)rows, D, heads, (long long)ldz, (long long)ld);
    expect_rows_with_room(name, d_yp, junk, dzc, T, HD, ld);
    cuda_free(d_yp), cuda_free(d_zs);
    free(junk), free(zs);
    rmsnorm_gated_backward_cuda(d_dx, d_dz, D, 1, d_dy, d_x, d_z, D, d_w, rows, D, eps);
    snprintf(name, sizeof name, "rmsnorm_gated_backward dx rows=%lld D=%d", (long long)rows, D);
    if (!test_cuda_ok(name)) {
        float *g = test_host_f32(d_dx, n);
        test_expect_close(name, g, dxc, n, 1e-4);
        free(g);
        g = test_host_bf16(d_dz, n);
        snprintf(name, sizeof name, "rmsnorm_gated_backward dz rows=%lld D=%d", (long long)rows, D);
        test_expect_close(name, g, dzc, n, 1e-2);
        free(g);
    }
    cuda_free(d_x), cuda_free(d_z), cuda_free(d_y), cuda_free(d_dz), cuda_free(d_w), cuda_free(d_dy), cuda_free(d_dx);
    free(x), free(z), free(w), free(dy), free(y), free(dxc), free(dzc);
}

/* ---- qk_rope.cu ---- */

/* q (gated = 1): heads read from [query | gate] rows as split_query_gate does; k: contiguous. */
static void test_qk_norm_rope(const int *lens, int n_seqs, int nh, int hd, int rot_dim, int gated) {
    char name[192], what[96];
    int64_t N;
    int32_t *pos = packed_pos(lens, n_seqs, &N);
    snprintf(what, sizeof what, "%s N=%lld nh=%d hd=%d rot=%d", gated ? "q" : "k", (long long)N, nh, hd, rot_dim);
    double theta = 1e7;
    float eps = 1e-6f;
    int64_t row_stride = (int64_t)(gated ? 2 : 1) * nh * hd, n = N * nh * hd, nx = N * row_stride;
    int head_stride = (gated ? 2 : 1) * hd;
    float *xs = test_rvec_bf16(nx, 2.0f), *w = test_rvec(hd, 0.5f), *dy = test_rvec(n, 1.0f), *fill = test_rvec_bf16(nx, 1.0f);
    /* the CPU path: split, rmsnorm1p per head, rope */
    float *x = zeros(n), *y = zeros(n), *dx = zeros(n);
    for (int64_t t = 0; t < N; t++)
        for (int h = 0; h < nh; h++)
            memcpy(x + (t * nh + h) * hd, xs + t * row_stride + (int64_t)h * head_stride, sizeof(float) * hd);
    rmsnorm1p_forward(y, x, w, N * nh, hd, eps);
    rope_forward(y, pos, N, nh, hd, rot_dim, theta);
    float *d = test_copy(dy, n);
    rope_backward(d, pos, N, nh, hd, rot_dim, theta);
    rmsnorm1p_backward(dx, NULL, d, x, w, N * nh, hd, eps);

    dt_bf16 *d_x = test_dev_bf16(xs, nx), *d_y = test_dev_bf16(dy, n), *d_dx = test_dev_bf16(fill, nx);
    float *d_w = test_dev_f32(w, hd), *d_dy = test_dev_f32(dy, n);
    int32_t *d_pos = test_dev_i32(pos, N);
    qk_norm_rope_forward_cuda(d_y, d_x, row_stride, head_stride, d_w, d_pos, N, nh, hd, rot_dim, theta, eps);
    snprintf(name, sizeof name, "qk_norm_rope_forward %s", what);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_y, n);
        test_expect_close(name, g, y, n, 1e-2);
        free(g);
    }
    qk_norm_rope_backward_cuda(d_dx, row_stride, head_stride, d_dy, d_x, d_w, d_pos, N, nh, hd, rot_dim, theta, eps);
    snprintf(name, sizeof name, "qk_norm_rope_backward %s", what);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_dx, nx), *gq = zeros(n);
        for (int64_t t = 0; t < N; t++)
            for (int h = 0; h < nh; h++) {
                int64_t o = t * row_stride + (int64_t)h * head_stride;
                memcpy(gq + (t * nh + h) * hd, g + o, sizeof(float) * hd);
                for (int i = 0; i < hd; i++) g[o + i] = fill[o + i]; /* what remains: the gate slots */
            }
        test_expect_close(name, gq, dx, n, 1e-2);
        if (gated) {
            snprintf(name, sizeof name, "qk_norm_rope_backward gate slots untouched %s", what);
            test_expect_close(name, g, fill, nx, 0);
        }
        free(g);
        free(gq);
    }
    cuda_free(d_x), cuda_free(d_y), cuda_free(d_dx), cuda_free(d_w), cuda_free(d_dy), cuda_free(d_pos);
    free(pos), free(xs), free(w), free(dy), free(fill), free(x), free(y), free(dx), free(d);
}

static void test_attn_gate(int64_t N, int nh, int hd) {
    char name[192], what[64];
    snprintf(what, sizeof what, "N=%lld nh=%d hd=%d", (long long)N, nh, hd);
    int64_t n = N * nh * hd;
    float *x = test_rvec_bf16(n, 2.0f), *qg = test_rvec_bf16(2 * n, 4.0f), *dy = test_rvec(n, 1.0f), *fill = test_rvec_bf16(2 * n, 1.0f);
    float *gate = zeros(n), *y = test_copy(x, n), *dx = zeros(n), *dgate = zeros(n);
    for (int64_t r = 0; r < N * nh; r++) memcpy(gate + r * hd, qg + r * 2 * hd + hd, sizeof(float) * hd);
    sigmoid_gate_forward(y, gate, n);
    sigmoid_gate_backward(dx, dgate, dy, x, gate, n);
    dt_bf16 *d_x = test_dev_bf16(x, n), *d_qg = test_dev_bf16(qg, 2 * n), *d_y = test_dev_bf16(dy, n),
            *d_dx = test_dev_bf16(dy, n), *d_dqg = test_dev_bf16(fill, 2 * n);
    float *d_dy = test_dev_f32(dy, n);
    attn_gate_forward_cuda(d_y, nh * hd, d_x, d_qg, N, nh, hd);
    snprintf(name, sizeof name, "attn_gate_forward %s", what);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_y, n);
        test_expect_close(name, g, y, n, 1e-2);
        free(g);
    }
    /* into rows with room after (the output projection's u): the room untouched */
    int64_t ld = (int64_t)nh * hd + 16;
    float *junk;
    dt_bf16 *d_yp = junk_rows(N, ld, &junk);
    attn_gate_forward_cuda(d_yp, ld, d_x, d_qg, N, nh, hd);
    snprintf(name, sizeof name, "attn_gate_forward %s into rows of %lld", what, (long long)ld);
    expect_rows_with_room(name, d_yp, junk, y, N, (int64_t)nh * hd, ld);
    cuda_free(d_yp);
    free(junk);
    attn_gate_backward_cuda(d_dx, d_dqg, d_dy, d_x, d_qg, N, nh, hd);
    snprintf(name, sizeof name, "attn_gate_backward dx %s", what);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_dx, n);
        test_expect_close(name, g, dx, n, 1e-2);
        free(g);
        g = test_host_bf16(d_dqg, 2 * n);
        float *gg = zeros(n);
        for (int64_t r = 0; r < N * nh; r++) {
            memcpy(gg + r * hd, g + r * 2 * hd + hd, sizeof(float) * hd);
            memcpy(g + r * 2 * hd + hd, fill + r * 2 * hd + hd, sizeof(float) * hd);
        }
        snprintf(name, sizeof name, "attn_gate_backward dgate %s", what);
        test_expect_close(name, gg, dgate, n, 1e-2);
        snprintf(name, sizeof name, "attn_gate_backward query slots untouched %s", what);
        test_expect_close(name, g, fill, 2 * n, 0);
        free(g);
        free(gg);
    }
    cuda_free(d_x), cuda_free(d_qg), cuda_free(d_y), cuda_free(d_dx), cuda_free(d_dqg), cuda_free(d_dy);
    free(x), free(qg), free(dy), free(fill), free(gate), free(y), free(dx), free(dgate);
}

/* ---- activations.cu ---- */

/* n - off values as rows of I (I divides n - off); off shifts the pointers off 16 bytes */
static void test_swiglu(int64_t n, int off, int64_t I) {
    char name[96];
    int64_t m = n - off, rows = m / I;
    float *g = test_rvec_bf16(n, 4.0f), *u = test_rvec_bf16(n, 2.0f), *dm = test_rvec(n, 1.0f);
    float *mc = zeros(n), *dgc = zeros(n), *duc = zeros(n);
    swiglu_forward(mc + off, g + off, u + off, m);
    swiglu_backward(dgc + off, duc + off, dm + off, g + off, u + off, m);
    dt_bf16 *d_g = test_dev_bf16(g, n), *d_u = test_dev_bf16(u, n), *d_m = test_dev_bf16(dm, n),
            *d_dg = test_dev_bf16(dm, n), *d_du = test_dev_bf16(dm, n);
    float *d_dm = test_dev_f32(dm, n);
    swiglu_forward_cuda(d_m + off, d_g + off, d_u + off, I, rows, I);
    snprintf(name, sizeof name, "swiglu_forward %lldx%lld off=%d", (long long)rows, (long long)I, off);
    if (!test_cuda_ok(name)) {
        float *h = test_host_bf16(d_m, n);
        test_expect_close(name, h + off, mc + off, m, 1e-2);
        free(h);
    }
    swiglu_backward_cuda(d_dg + off, d_du + off, I, d_dm + off, CUDA_F32, d_g + off, d_u + off, I, rows, I);
    snprintf(name, sizeof name, "swiglu_backward dgate %lldx%lld off=%d", (long long)rows, (long long)I, off);
    if (!test_cuda_ok(name)) {
        float *h = test_host_bf16(d_dg, n);
        test_expect_close(name, h + off, dgc + off, m, 1e-2);
        free(h);
        h = test_host_bf16(d_du, n);
        snprintf(name, sizeof name, "swiglu_backward dup %lldx%lld off=%d", (long long)rows, (long long)I, off);
        test_expect_close(name, h + off, duc + off, m, 1e-2);
        free(h);
    }
    cuda_free(d_g), cuda_free(d_u), cuda_free(d_m), cuda_free(d_dg), cuda_free(d_du), cuda_free(d_dm);
    free(g), free(u), free(dm), free(mc), free(dgc), free(duc);
}

/* swiglu_backward_lora_cuda: the gradient dm + g A (the down projection's LoRA part), against
 * the CPU's swiglu_backward of that sum; the fused kernel (I a multiple of 8, r <= 32), and the
 * product-then-backward path otherwise; g NULL: dm alone. joined: gate and up side by side in rows
 * of 2 I, dgate and dup in rows of 2 I + 16, and dm bf16, as the model's MLP keeps them. */
static void test_swiglu_lora(int64_t rows, int64_t I, int r, int with_g, int joined) {
    char name[128];
    int64_t n = rows * I, ldd = joined ? 2 * I + 16 : I;
    float *gt = test_rvec_bf16(n, 4.0f), *u = test_rvec_bf16(n, 2.0f), *dm = test_rvec(n, 1.0f);
    if (joined) test_round_bf16(dm, n);
    float *g = test_rvec_bf16(rows * r, 1.0f), *A = test_rvec_bf16((int64_t)r * I, 0.5f);
    float *sum = test_copy(dm, n), *dgc = zeros(n), *duc = zeros(n);
    for (int64_t t = 0; with_g && t < rows; t++)
        for (int j = 0; j < r; j++)
            for (int64_t i = 0; i < I; i++) sum[t * I + i] += g[t * r + j] * A[j * I + i];
    swiglu_backward(dgc, duc, sum, gt, u, n);
    float *junk = test_rvec(rows * 2 * ldd, 1.0f);
    int64_t ldg = joined ? 2 * I : I;
    float *gu = zeros(rows * 2 * I);  /* joined: [gate | up] rows; else gate's rows then up's */
    for (int64_t t = 0; t < rows; t++) {
        memcpy(gu + t * ldg, gt + t * I, sizeof(float) * I);
        memcpy(gu + (joined ? t * ldg + I : n + t * I), u + t * I, sizeof(float) * I);
    }
    dt_bf16 *d_gu = test_dev_bf16(gu, rows * 2 * I), *d_out = test_dev_bf16(junk, rows * 2 * ldd),
            *d_g = test_dev_bf16(g, rows * r), *d_A = test_dev_bf16(A, (int64_t)r * I);
    dt_bf16 *d_gt = d_gu, *d_u = joined ? d_gu + I : d_gu + n;
    dt_bf16 *d_dg = d_out, *d_du = joined ? d_out + I : d_out + rows * ldd;
    float *d_dm = test_dev_f32(dm, n);
    void *d_dm16 = joined ? (void *)test_dev_bf16(dm, n) : NULL;
    swiglu_backward_lora_cuda(d_dg, d_du, ldd, joined ? d_dm16 : (void *)d_dm, joined ? CUDA_BF16 : CUDA_F32, d_gt,
                              d_u, ldg, rows, I, with_g ? d_g : NULL, d_A, r);
    cuda_free(d_dm16);
    snprintf(name, sizeof name, "swiglu_backward_lora %lldx%lld r%d%s%s dgate", (long long)rows, (long long)I, r,
             with_g ? "" : " g=NULL", joined ? " joined" : "");
    if (!test_cuda_ok(name)) {
        float *h = test_host_bf16(d_out, rows * 2 * ldd), *hg = zeros(n), *hu = zeros(n);
        for (int64_t t = 0; t < rows; t++) {
            memcpy(hg + t * I, h + (d_dg - d_out) + t * ldd, sizeof(float) * I);
            memcpy(hu + t * I, h + (d_du - d_out) + t * ldd, sizeof(float) * I);
        }
        test_expect_close(name, hg, dgc, n, 1e-2);
        name[strlen(name) - 5] = 0;
        strcat(name, "dup");
        test_expect_close(name, hu, duc, n, 1e-2);
        free(h), free(hg), free(hu);
    }
    free(junk), free(gu);
    cuda_free(d_gu), cuda_free(d_out), cuda_free(d_g), cuda_free(d_A), cuda_free(d_dm);
    free(gt), free(u), free(dm), free(g), free(A), free(sum), free(dgc), free(duc);
}

/* ---- conv1d.cu ---- */

static void test_conv1d(const int *lens, int n_seqs, int C, int K) {
    char name[192], what[96];
    int64_t N;
    int32_t *pos = packed_pos(lens, n_seqs, &N);
    int64_t n = N * C;
    snprintf(what, sizeof what, "N=%lld seqs=%d C=%d K=%d", (long long)N, n_seqs, C, K);
    float *x = test_rvec_bf16(n, 2.0f), *w = test_rvec((int64_t)C * K, 0.7f), *dy = test_rvec(n, 1.0f);
    float *y = zeros(n), *dx = zeros(n);
    int64_t off = 0;
    for (int s = 0; s < n_seqs; s++) {
        conv1d_silu_forward(y + off * C, x + off * C, w, lens[s], C, K);
        conv1d_silu_backward(dx + off * C, NULL, dy + off * C, x + off * C, w, lens[s], C, K);
        off += lens[s];
    }
    dt_bf16 *d_x = test_dev_bf16(x, n), *d_y = test_dev_bf16(dy, n), *d_dx = test_dev_bf16(dy, n);
    float *d_w = test_dev_f32(w, (int64_t)C * K), *d_dy = test_dev_f32(dy, n);
    int32_t *d_pos = test_dev_i32(pos, N);
    conv1d_silu_forward_cuda(d_y, d_x, d_w, d_pos, N, C, K);
    snprintf(name, sizeof name, "conv1d_silu_forward %s", what);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_y, n);
        test_expect_close(name, g, y, n, 1e-2);
        free(g);
    }
    conv1d_silu_backward_cuda(d_dx, d_dy, d_x, d_w, d_pos, N, C, K);
    snprintf(name, sizeof name, "conv1d_silu_backward %s", what);
    if (!test_cuda_ok(name)) {
        float *g = test_host_bf16(d_dx, n);
        test_expect_close(name, g, dx, n, 1e-2);
        free(g);
    }
    cuda_free(d_x), cuda_free(d_y), cuda_free(d_dx), cuda_free(d_w), cuda_free(d_dy), cuda_free(d_pos);
    free(pos), free(x), free(w), free(dy), free(y), free(dx);
}

/* deltanet_conv_forward_cuda and deltanet_conv_backward_cuda (the conv + SiLU then q/k L2 norm,
 * and its backward, in one) against the CPU's ops: conv1d_silu_forward, l2norm_forward and
 * _backward (q scaled, k not, v passed through), conv1d_silu_backward. */
static void test_conv_l2norm(const int *lens, int n_seqs, int Hk, int dk, int vd, int K) {
    char name[192];
    int64_t N, C = 2 * (int64_t)Hk * dk + vd, kd = (int64_t)Hk * dk;
    int32_t *pos = packed_pos(lens, n_seqs, &N);
    int64_t n = N * C;
    float q_scale = 1.0f / sqrtf((float)dk), eps = 1e-6f;
    float *x = test_rvec_bf16(n, 2.0f), *w = test_rvec((int64_t)C * K, 0.7f), *dq = test_rvec(n, 1.0f);
    float *conv = zeros(n), *dconv = zeros(n), *dx = zeros(n);
    int64_t off = 0;
    for (int s = 0; s < n_seqs; s++) {
        conv1d_silu_forward(conv + off * C, x + off * C, w, lens[s], C, K);
        off += lens[s];
    }
    float *qkv = test_copy(conv, n);
    l2norm_forward(qkv, N, Hk, dk, C, eps, q_scale);
    l2norm_forward(qkv + kd, N, Hk, dk, C, eps, 1.0f);
    l2norm_backward(dconv, dq, conv, N, Hk, dk, C, eps, q_scale);
    l2norm_backward(dconv + kd, dq + kd, conv + kd, N, Hk, dk, C, eps, 1.0f);
    for (int64_t t = 0; t < N; t++)
        for (int64_t i = 2 * kd; i < C; i++) dconv[t * C + i] = dq[t * C + i];
    off = 0;
    for (int s = 0; s < n_seqs; s++) {
        conv1d_silu_backward(dx + off * C, NULL, dconv + off * C, x + off * C, w, lens[s], C, K);
        off += lens[s];
    }
    dt_bf16 *d_x = test_dev_bf16(x, n), *d_dx = test_dev_bf16(dq, n), *d_conv = test_dev_bf16(dq, n);
    float *d_w = test_dev_f32(w, (int64_t)C * K), *d_dq = test_dev_f32(dq, n);
    int32_t *d_pos = test_dev_i32(pos, N);
    dt_bf16 *d_qkv = test_dev_bf16(dq, n);  /* garbage to overwrite */
    deltanet_conv_forward_cuda(d_qkv, d_x, d_w, d_pos, N, K, Hk, dk, C, q_scale, eps, d_conv);
    deltanet_conv_backward_cuda(d_dx, d_dq, d_x, d_w, d_pos, N, K, Hk, dk, C, q_scale, eps, d_conv);
    const char *which[2] = {"forward", "backward"};
    dt_bf16 *got[2] = {d_qkv, d_dx};
    const float *want[2] = {qkv, dx};
    for (int i = 0; i < 2; i++) {
        snprintf(name, sizeof name, "deltanet_conv_%s N=%lld seqs=%d Hk=%d dk=%d vd=%d K=%d", which[i], (long long)N,
                 n_seqs, Hk, dk, vd, K);
        if (test_cuda_ok(name)) continue;
        float *g = test_host_bf16(got[i], n);
        test_expect_close(name, g, want[i], n, 1e-2);
        free(g);
    }
    cuda_free(d_x), cuda_free(d_dx), cuda_free(d_conv), cuda_free(d_w), cuda_free(d_dq), cuda_free(d_pos);
    cuda_free(d_qkv);
    free(pos), free(x), free(w), free(dq), free(conv), free(dconv), free(dx), free(qkv);
}

/* ---- timing (DT_CUDA_TIMING=1): printed, never asserted ---- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define REPS 50
/* Runs STMT REPS times after one warm-up; prints ms per call and the bandwidth of `bytes`. */
#define TIME(label, bytes, STMT)                                                                    \
    do {                                                                                            \
        STMT;                                                                                       \
        cuda_check("warm-up");                                                                      \
        double t0_ = now_s();                                                                       \
        for (int r_ = 0; r_ < REPS; r_++) STMT;                                                     \
        if (cuda_check(label)) printf("timing %s: error\n", label);                                 \
        double ms_ = (now_s() - t0_) * 1e3 / REPS;                                                  \
        printf("timing %-34s %8.4f ms  %7.1f GB/s\n", label, ms_, (double)(bytes) / (ms_ * 1e6));     \
    } while (0)

static void *dalloc(size_t bytes) {
    void *p = NULL;
    if (cuda_alloc(&p, bytes)) return NULL;
    cuda_zero(p, bytes);
    return p;
}

static void timing(void) {
    const int64_t N = 4096;
    const int H = 1024, I = 3584, C = 6144, K = 4, nh = 8, nkv = 2, hd = 256, rot = 64, Hv = 16, dv = 128;
    const int64_t big = N * C;  /* the largest activation */
    printf("timing: 2 x 2048 tokens, Qwen3.5-0.8B sizes, %d calls each\n", REPS);
    float *f1 = dalloc(4 * big), *f2 = dalloc(4 * big), *f3 = dalloc(4 * big), *w = dalloc(4 * (size_t)C * K);
    dt_bf16 *b1 = dalloc(2 * big), *b2 = dalloc(2 * big), *b3 = dalloc(2 * big), *b4 = dalloc(2 * big);
    int32_t *pos = dalloc(4 * N), *ids = dalloc(4 * N);
    dt_bf16 *E = dalloc(2 * (size_t)32000 * H);
    if (!f1 || !f2 || !f3 || !w || !b1 || !b2 || !b3 || !b4 || !pos || !ids || !E) {
        printf("timing: allocation failed\n");
        return;
    }
    {
        float *hw = test_rvec((int64_t)C * K, 0.5f), *hx = test_rvec(big, 1.0f);
        int32_t *hp = malloc(4 * N);
        for (int64_t t = 0; t < N; t++) hp[t] = (int32_t)(t % 2048);
        cuda_upload(w, hw, 4 * (size_t)C * K);
        cuda_upload(pos, hp, 4 * N);
        cuda_upload(f1, hx, 4 * big);
        cuda_upload(f2, hx, 4 * big);
        cuda_f32_to_bf16(b1, f1, big);
        cuda_f32_to_bf16(b2, f1, big);
        cuda_upload(ids, hp, 4 * N); /* ids t % 2048: distinct rows */
        free(hw), free(hx), free(hp);
    }
    TIME("f32_to_bf16 4096x1024", N * H * 6, cuda_f32_to_bf16(b3, f1, N * H));
    TIME("add_f32 4096x1024", N * H * 12, cuda_add_f32(f3, f1, N * H));
    TIME("embedding 4096x1024", N * H * 6, embedding_forward_cuda(f3, ids, N, E, H));
    TIME("rmsnorm1p_fwd 4096x1024", N * H * 6, rmsnorm1p_forward_cuda(b3, H, f1, w, N, H, 1e-6f));
    TIME("rmsnorm1p_bwd 4096x1024", N * H * 16, rmsnorm1p_backward_cuda(f3, NULL, H, f3, f2, f1, w, N, H, 1e-6f));
    TIME("rmsnorm_gated_fwd 65536x128", N * Hv * dv * 6,
         rmsnorm_gated_forward_cuda(b3, 1, dv, b1, b2, dv, w, N * Hv, dv, 1e-6f));
    TIME("rmsnorm_gated_bwd 65536x128", N * Hv * dv * 14,
         rmsnorm_gated_backward_cuda(f3, b3, dv, 1, f2, b1, b2, dv, w, N * Hv, dv, 1e-6f));
    TIME("qk_norm_rope_fwd q 4096x8x256", N * nh * hd * 4,
         qk_norm_rope_forward_cuda(b3, b1, 2 * nh * hd, 2 * hd, w, pos, N, nh, hd, rot, 1e7, 1e-6f));
    TIME("qk_norm_rope_bwd q 4096x8x256", N * nh * hd * 8,
         qk_norm_rope_backward_cuda(b3, 2 * nh * hd, 2 * hd, f2, b1, w, pos, N, nh, hd, rot, 1e7, 1e-6f));
    TIME("qk_norm_rope_fwd k 4096x2x256", N * nkv * hd * 4,
         qk_norm_rope_forward_cuda(b3, b1, nkv * hd, hd, w, pos, N, nkv, hd, rot, 1e7, 1e-6f));
    TIME("qk_norm_rope_bwd k 4096x2x256", N * nkv * hd * 8,
         qk_norm_rope_backward_cuda(b3, nkv * hd, hd, f2, b1, w, pos, N, nkv, hd, rot, 1e7, 1e-6f));
    TIME("attn_gate_fwd 4096x8x256", N * nh * hd * 6, attn_gate_forward_cuda(b3, nh * hd, b1, b2, N, nh, hd));
    TIME("attn_gate_bwd 4096x8x256", N * nh * hd * 12, attn_gate_backward_cuda(b3, b4, f2, b1, b2, N, nh, hd));
    TIME("swiglu_fwd 4096x3584", N * I * 6, swiglu_forward_cuda(b3, b1, b2, I, N, I));
    TIME("swiglu_bwd 4096x3584", N * I * 12, swiglu_backward_cuda(b3, b4, I, f2, CUDA_F32, b1, b2, I, N, I));
    TIME("swiglu_bwd_lora 4096x3584 r16", N * I * 12,
         swiglu_backward_lora_cuda(b3, b4, I, f2, CUDA_F32, b1, b2, I, N, I, b1, b2, 16));
    TIME("swiglu_bwd_lora 4096x3584 r32", N * I * 12,
         swiglu_backward_lora_cuda(b3, b4, I, f2, CUDA_F32, b1, b2, I, N, I, b1, b2, 32));
    TIME("conv1d_silu_fwd 4096x6144", big * 4, conv1d_silu_forward_cuda(b3, b1, w, pos, N, C, K));
    TIME("conv1d_silu_bwd 4096x6144", big * 8, conv1d_silu_backward_cuda(b3, f2, b1, w, pos, N, C, K));
    TIME("deltanet_conv_fwd 4096x6144", big * 4,
         deltanet_conv_forward_cuda(b3, b1, w, pos, N, K, 16, 128, C, 0.088f, 1e-6f, b4));
    TIME("deltanet_conv_bwd 4096x6144", big * 8,
         deltanet_conv_backward_cuda(b3, f2, b1, w, pos, N, K, 16, 128, C, 0.088f, 1e-6f, b4));
    cuda_free(f1), cuda_free(f2), cuda_free(f3), cuda_free(w), cuda_free(b1), cuda_free(b2), cuda_free(b3);
    cuda_free(b4), cuda_free(pos), cuda_free(ids), cuda_free(E);
}

void cuda_tests_elementwise(void) {
    test_convert_add(4096 * 1024 + 3, 0);
    test_convert_add(1001, 1);
    test_embedding(32000, 1024, 4096);
    test_embedding(50, 1001, 7);

    test_rmsnorm1p(4096, 1024);
    test_rmsnorm1p(5, 6144);
    test_rmsnorm1p(7, 37);
    test_rmsnorm_gated(4096 * 16, 128);
    test_rmsnorm_gated(3, 1000);
    test_rmsnorm_gated(9, 37);

    const int two[] = {2048, 2048}, ragged[] = {1, 63, 130}, odd[] = {5, 1, 17};
    test_qk_norm_rope(two, 2, 8, 256, 64, 1);
    test_qk_norm_rope(two, 2, 2, 256, 64, 0);
    test_qk_norm_rope(ragged, 3, 8, 256, 64, 1);
    test_qk_norm_rope(ragged, 3, 3, 36, 12, 1); /* half of rot_dim odd: the scalar path */
    test_qk_norm_rope(odd, 3, 1, 64, 64, 0);    /* rotary over the whole head */
    test_qk_norm_rope(ragged, 3, 4, 128, 32, 1);
    test_qk_norm_rope(odd, 3, 2, 256, 96, 0);   /* 48 pairs: more than a warp, the looped path */
    test_attn_gate(4096, 8, 256);
    test_attn_gate(5, 3, 6);

    test_swiglu(4096 * 3584, 0, 3584);
    test_swiglu(1001, 1, 1000);
    test_swiglu(27 * 37, 0, 37); /* aligned, rows of 37: the 8-wide path must not take it */
    test_swiglu_lora(37, 72, 8, 1, 0);
    test_swiglu_lora(100, 1032, 16, 1, 0);  /* a partial block of columns, several of rows */
    test_swiglu_lora(100, 1032, 16, 1, 1);
    test_swiglu_lora(100, 1032, 24, 1, 0);
    test_swiglu_lora(100003, 72, 16, 1, 1);  /* runs of rows (one wave of blocks) past 32, the last partial */
    test_swiglu_lora(37, 70, 8, 1, 0);      /* I not a multiple of 8: product, then the plain backward */
    test_swiglu_lora(37, 70, 8, 1, 1);
    test_swiglu_lora(64, 136, 40, 1, 0);    /* rank above 32: the same */
    test_swiglu_lora(33, 72, 8, 0, 0);
    test_swiglu_lora(4096, 3584, 16, 1, 1); /* Qwen3.5-0.8B's MLP at 2 x 2048 tokens, r16, as the model */

    const int tiny[] = {3, 20}, chunky[] = {1, 31, 33, 2, 70};
    test_conv1d(ragged, 3, 6144, 4);
    test_conv1d(two, 2, 6144, 4);
    test_conv1d(odd, 3, 37, 4); /* odd C: one channel per thread */
    test_conv1d(odd, 3, 38, 3);
    test_conv1d(tiny, 2, 10, 6); /* no specialised kernel for K = 6 */
    test_conv_l2norm(ragged, 3, 16, 128, 2048, 4); /* 0.8B's heads: the one-pass kernels */
    test_conv_l2norm(two, 2, 2, 128, 512, 4);
    test_conv_l2norm(chunky, 5, 1, 128, 128, 4);   /* sequences across the backward's tiles of 32 */
    test_conv_l2norm(odd, 3, 1, 128, 100, 4);      /* channels not a multiple of 128: the three ops */
    test_conv_l2norm(odd, 3, 3, 16, 40, 4);        /* heads of 16: the three ops */

    const char *tm = getenv("DT_CUDA_TIMING");
    if (tm && *tm == '1') timing();
}
