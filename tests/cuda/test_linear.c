/* The frozen linear with LoRA on the GPU against linear_forward / linear_backward (CPU), on
 * odd shapes and Qwen3.5-0.8B's projections at 2 x 2048 tokens. Outputs are prefilled with
 * random values: overwrite and accumulate both show. DT_CUDA_TIMING=1 adds a timing table
 * (DT_CUDA_TIMING=only: the table alone). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_test.h"
#include "deltatune/ops.h"

typedef struct {
    int64_t T, in, out;
    int rank;
    float dropout;
    cuda_dtype yt;
    int accumulate, with_dx, with_grads;
    int pieces;  /* the GPU calls in two pieces of rows (row0), as the model's chunked MLP backward */
    int keep_u;  /* the forward keeps u for the backward (u_keep, u_kept), as the model does */
} lcase;


static void run_case(const lcase *c) {
    int64_t T = c->T, in = c->in, out = c->out;
    int r = c->rank;
    char tag[128], name[256];
    snprintf(tag, sizeof tag, "T%lld %lld->%lld r%d p%g %s%s%s", (long long)T, (long long)in, (long long)out, r,
             c->dropout, c->yt == CUDA_BF16 ? "bf16" : "f32", c->accumulate ? " acc" : "",
             c->pieces ? (c->keep_u ? " in pieces, u kept" : " in pieces") : c->keep_u ? " u kept" : "");

    /* LoRA's term about as large as the base term, so a wrong LoRA path cannot hide */
    float *x = test_rvec_bf16(T * in, 1.f), *W = test_rvec_bf16(out * in, 1.f / sqrtf((float)in));
    float *A = test_rvec_bf16((int64_t)r * in, 1.f / sqrtf((float)in));
    float *B = test_rvec_bf16(out * r, r ? 1.f / sqrtf((float)r) : 1.f);
    float *dy = test_rvec_bf16(T * out, 1.f);
    float *y0 = test_rvec(T * out, 1.f);  /* the residual for accumulate, garbage otherwise */
    if (c->yt == CUDA_BF16) test_round_bf16(y0, T * out);
    float *dx0 = test_rvec(T * in, 1.f), *dA0 = test_rvec((int64_t)r * in, 1.f), *dB0 = test_rvec(out * r, 1.f);

    dt_lora lo = {.rank = r, .scale = 2.0f, .in = in, .out = out, .A = A, .B = B, .dropout = c->dropout,
                  .dropout_seed = 0x1234abcd5678ull + (uint64_t)T * 31 + (uint64_t)in};
    dt_linear L = {.w = {.dtype = DT_F32, .data = W, .rows = out, .cols = in}, .lora = r ? &lo : NULL};

    /* CPU reference */
    float *y_cpu = malloc(sizeof(float) * T * out);
    linear_forward(y_cpu, x, &L, T);
    if (c->accumulate)
        for (int64_t i = 0; i < T * out; i++) y_cpu[i] += y0[i];
    /* the backward accumulates into dx as the forward into y, or overwrites the garbage there */
    float *dx_cpu = test_copy(dx0, T * in), *dA_cpu = test_copy(dA0, (int64_t)r * in), *dB_cpu = test_copy(dB0, out * r);
    lo.dA = c->with_grads ? dA_cpu : NULL;
    lo.dB = c->with_grads ? dB_cpu : NULL;
    if (c->with_dx && !c->accumulate) memset(dx_cpu, 0, sizeof(float) * T * in);
    linear_backward(c->with_dx ? dx_cpu : NULL, dy, x, &L, T);

    /* GPU */
    dt_bf16 *d_x = test_dev_bf16(x, T * in), *d_W = test_dev_bf16(W, out * in);
    dt_bf16 *d_A = test_dev_bf16(A, (int64_t)r * in), *d_B = test_dev_bf16(B, out * r);
    dt_bf16 *d_dy = test_dev_bf16(dy, T * out);
    void *d_y = c->yt == CUDA_BF16 ? (void *)test_dev_bf16(y0, T * out) : (void *)test_dev_f32(y0, T * out);
    float *d_dx = test_dev_f32(dx0, T * in), *d_dA = test_dev_f32(dA0, (int64_t)r * in);
    float *d_dB = test_dev_f32(dB0, out * r);
    void *scratch = NULL;
    size_t sb = linear_scratch_bytes_cuda(T, in, r, c->dropout > 0);
    /* u's rows, garbage until the forward writes them */
    dt_bf16 *d_u = c->keep_u ? test_dev_bf16(dy, T * r) : NULL;
    if (!d_x || !d_W || !d_A || !d_B || !d_dy || !d_y || !d_dx || !d_dA || !d_dB || (c->keep_u && !d_u) ||
        cuda_alloc(&scratch, sb)) {
        snprintf(name, sizeof name, "linear %s: device buffers", tag);
        test_cuda_ok(name);
        cuda_tests_failed++;
        goto done;
    }
    cuda_linear l = {.W = d_W, .in = in, .out = out, .rank = r, .scale = lo.scale, .dropout = c->dropout,
                     .dropout_seed = lo.dropout_seed, .A = d_A, .B = d_B,
                     .dA = c->with_grads ? d_dA : NULL, .dB = c->with_grads ? d_dB : NULL};
    /* rows [0, cut) then [cut, T), each call told where its rows start */
    int64_t bounds[3] = {0, c->pieces ? T / 3 : T, T};
    size_t ysz = c->yt == CUDA_BF16 ? 2 : 4;
    for (int p = 0; p < 2; p++) {
        cuda_linear lp = l;
        lp.row0 = bounds[p];
        linear_forward_cuda((char *)d_y + bounds[p] * out * ysz, c->yt, c->accumulate, d_x + bounds[p] * in, &lp,
                            bounds[p + 1] - bounds[p], scratch, d_u ? d_u + bounds[p] * r : NULL);
    }
    snprintf(name, sizeof name, "linear_forward %s", tag);
    if (test_cuda_ok(name) == 0) {
        float *y = c->yt == CUDA_BF16 ? test_host_bf16(d_y, T * out) : test_host_f32(d_y, T * out);
        test_expect_close(name, y, y_cpu, T * out, 1e-2);
        free(y);
    }
    for (int p = 0; p < 2; p++) {
        cuda_linear lp = l;
        lp.row0 = bounds[p];
        linear_backward_cuda(c->with_dx ? d_dx + bounds[p] * in : NULL, c->accumulate, d_dy + bounds[p] * out, 0,
                             d_x + bounds[p] * in, &lp, bounds[p + 1] - bounds[p], scratch,
                             d_u ? d_u + bounds[p] * r : NULL);
    }
    snprintf(name, sizeof name, "linear_backward %s%s%s", tag, c->with_dx ? "" : " dx=NULL",
             c->with_grads ? "" : " dA,dB=NULL");
    if (test_cuda_ok(name) == 0) {
        test_expect_close_dev(name, "dx", d_dx, dx_cpu, T * in, 1e-2);  /* untouched (= dx0) when dx is NULL */
        if (r) {
            test_expect_close_dev(name, "dA", d_dA, dA_cpu, (int64_t)r * in, 1e-2);
            test_expect_close_dev(name, "dB", d_dB, dB_cpu, out * r, 1e-2);
        }
    }
done:
    cuda_free(d_x), cuda_free(d_W), cuda_free(d_A), cuda_free(d_B), cuda_free(d_dy), cuda_free(d_y);
    cuda_free(d_dx), cuda_free(d_dA), cuda_free(d_dB), cuda_free(scratch), cuda_free(d_u);
    free(x), free(W), free(A), free(B), free(dy), free(y0), free(dx0), free(dA0), free(dB0);
    free(y_cpu), free(dx_cpu), free(dA_cpu), free(dB_cpu);
}

/* A group of linears reading one x (linear_group_forward_cuda / linear_group_backward_cuda):
 * member i maps in -> outs[i] with a LoRA of rank ranks[i] (0: none), all the A (and dA) in one
 * block one after another, as the model lays them out; the last LoRA's scale is scale_last (the
 * others 2). Against linear_forward / linear_backward per member on the CPU, dx summed over the
 * members. The A products run stacked where the scales agree and nothing drops out, member by
 * member otherwise. mode: U_NONE, the backward recomputes u; U_KEPT, the forward keeps it [T, R]
 * for the backward; U_IN_X, as the model: x's rows hold u after in columns, and the bases lie in
 * one block with their B and A (cuda_linear_part), copied in by linear_wide_copy_cuda;
 * U_IN_X_JOINED, the same with every y and every dy in one buffer each, dy's with room for g (the
 * forward and the backward as one product each where nothing drops out); U_IN_X_TAIL, as the
 * model's DeltaNet in-projections: the first member's rows as long as its LoRA needs and its y, dy
 * on their own, the others joined so (their forward one product, their backward one with g). */
enum { U_NONE, U_KEPT, U_IN_X, U_IN_X_JOINED, U_IN_X_TAIL };
static void run_group(int64_t T, int64_t in, const int64_t *outs, const int *ranks, int n, float scale_last,
                      float dropout, int mode) {
    enum { MAXN = 4 };
    static const char *modes[] = {"", " u kept", " u in x, block", " u in x, block, dy joined",
                                  " u in x, block, the tail joined"};
    char tag[160], name[256];
    int R = 0, last = -1;
    int64_t S = 0;  /* the members' outputs */
    for (int i = 0; i < n; i++) R += ranks[i], last = ranks[i] ? i : last, S += outs[i];
    snprintf(tag, sizeof tag, "group of %d T%lld in %lld R%d p%g%s%s", n, (long long)T, (long long)in, R, dropout,
             scale_last != 2.0f ? " scales differ" : "", modes[mode]);
    bool in_x = mode >= U_IN_X, tail = mode == U_IN_X_TAIL, joined = mode == U_IN_X_JOINED || tail;
    float *x = test_rvec_bf16(T * in, 1.f), *A = test_rvec_bf16((int64_t)R * in, 1.f / sqrtf((float)in));
    /* in_x: x's rows padded past in + R (garbage there, which u overwrites or nothing reads) */
    int64_t ldx = in_x ? (in + R + 7) / 8 * 8 + 8 : in, ldw = in_x ? (in + R + 7) / 8 * 8 : in;
    int64_t S0 = tail ? outs[0] : 0, SJ = S - S0;  /* the joined members' outputs, from member 1 with tail */
    int64_t ldy = joined ? (SJ + R + 7) / 8 * 8 + 8 : 0;
    int64_t ldm[MAXN], off[MAXN + 1] = {0};  /* each member's rows in the block, and where they start */
    for (int i = 0; i < n; i++)
        ldm[i] = tail && i == 0 ? (in + ranks[0] + 7) / 8 * 8 : ldw, off[i + 1] = off[i] + outs[i] * ldm[i];
    float *xp = test_rvec_bf16(T * ldx, 1.f);
    for (int64_t t = 0; t < T; t++) memcpy(xp + t * ldx, x + t * in, sizeof(float) * in);
    /* the block: the members' rows [W | 0], then R rows of A's room; A and B copied in from src */
    float *blk = calloc((size_t)(off[n] + R * ldw), sizeof(float));
    float *src = malloc(sizeof(float) * (size_t)(R * in + S * (R > 0 ? R : 1) + 1));
    memcpy(src, A, sizeof(float) * R * in);
    int64_t src_n = R * in;
    cuda_wide_copy copies[2 * MAXN];
    int n_copies = 0;
    int64_t copy_rows = 0;
    float *dA0 = test_rvec((int64_t)R * in, 1.f), *dx_cpu = calloc((size_t)(T * in), sizeof(float));
    float *dA_cpu = test_copy(dA0, (int64_t)R * in);
    float *W[MAXN], *B[MAXN], *dy[MAXN], *y_cpu[MAXN], *dB0[MAXN], *dB_cpu[MAXN];
    dt_lora lo[MAXN];
    dt_bf16 *d_W[MAXN] = {0}, *d_B[MAXN], *d_dy[MAXN] = {0}, *d_y[MAXN];
    float *d_dB[MAXN], *d_dB_all = NULL;  /* the dB one after another, as the model's LoRA arrays */
    cuda_linear l[MAXN];
    cuda_linear_part parts[MAXN];
    dt_bf16 *d_x = test_dev_bf16(xp, T * ldx), *d_A = test_dev_bf16(A, (int64_t)R * in), *d_blk = NULL;
    dt_bf16 *d_dyj = NULL;
    float *garbage = test_rvec(T * in, 1.f);  /* in dx, which the backward overwrites */
    float *d_dA = test_dev_f32(dA0, (int64_t)R * in), *d_dx = test_dev_f32(garbage, T * in);
    dt_bf16 *d_u = mode == U_KEPT ? test_dev_bf16(x, T * R) : in_x ? d_x + in : NULL;
    int64_t ldu = in_x ? ldx : R;
    void *scratch = NULL;
    bool ok = d_x && d_A && d_dA && d_dx && (mode != U_KEPT || d_u) &&
              cuda_alloc(&scratch, linear_scratch_bytes_cuda(T, in, R, dropout > 0)) == 0;
    float *dyj = joined ? test_rvec_bf16(T * ldy, 1.f) : NULL;  /* garbage past the members' columns */
    int64_t db_n = 0;
    for (int i = 0; i < n; i++) db_n += outs[i] * (ranks[i] ? ranks[i] : 1);
    ok = ok && cuda_alloc((void **)&d_dB_all, sizeof(float) * db_n) == 0;
    int64_t db_off = 0;
    for (int i = 0, c = 0, row = 0; i < n; row += (int)outs[i], c += ranks[i], i++) {
        int64_t out = outs[i];
        int r = ranks[i];
        W[i] = test_rvec_bf16(out * in, 1.f / sqrtf((float)in));
        B[i] = test_rvec_bf16(out * (r ? r : 1), r ? 1.f / sqrtf((float)r) : 1.f);
        dy[i] = test_rvec_bf16(T * out, 1.f);
        dB0[i] = test_rvec(out * (r ? r : 1), 1.f);
        dB_cpu[i] = test_copy(dB0[i], out * (r ? r : 1));
        lo[i] = (dt_lora){.rank = r, .scale = i == last ? scale_last : 2.0f, .in = in, .out = out, .A = A + c * in,
                          .B = B[i], .dA = dA_cpu + c * in, .dB = dB_cpu[i], .dropout = dropout,
                          .dropout_seed = 0x5eedull + 977 * (uint64_t)i};
        dt_linear L = {.w = {.dtype = DT_F32, .data = W[i], .rows = out, .cols = in}, .lora = r ? &lo[i] : NULL};
        y_cpu[i] = malloc(sizeof(float) * T * out);
        linear_forward(y_cpu[i], x, &L, T);
        linear_backward(dx_cpu, dy[i], x, &L, T);
        if (in_x) {
            for (int64_t j = 0; j < out; j++) memcpy(blk + off[i] + j * ldm[i], W[i] + j * in, sizeof(float) * in);
            if (r) {
                memcpy(src + src_n, B[i], sizeof(float) * out * r);
                copies[n_copies++] = (cuda_wide_copy){src_n, NULL, out, ldm[i], r};  /* dst: once d_blk is known */
                copies[n_copies++] = (cuda_wide_copy){(int64_t)c * in, NULL, r, ldw, (int)in};
                src_n += out * r;
                copy_rows = out > copy_rows ? out : copy_rows;
            }
        } else {
            d_W[i] = test_dev_bf16(W[i], out * in);
        }
        bool own = !joined || (tail && i == 0);  /* y, dy on their own */
        if (own)
            d_dy[i] = test_dev_bf16(dy[i], T * out);
        else
            for (int64_t t = 0; t < T; t++) memcpy(dyj + t * ldy + row - S0, dy[i] + t * out, sizeof(float) * out);
        d_B[i] = test_dev_bf16(B[i], out * (r ? r : 1));
        d_y[i] = test_dev_bf16(dy[i], T * out);  /* garbage: the forward overwrites it */
        d_dB[i] = d_dB_all ? d_dB_all + db_off : NULL, db_off += out * (r ? r : 1);
        ok = ok && (in_x || d_W[i]) && d_B[i] && (!own || d_dy[i]) && d_y[i] && d_dB[i] &&
             cuda_upload(d_dB[i], dB0[i], sizeof(float) * out * (r ? r : 1)) == 0;
    }
    dt_bf16 *d_yj = NULL;
    if (joined) {
        float *garb = test_rvec_bf16(T * (SJ + 8), 1.f);
        d_dyj = test_dev_bf16(dyj, T * ldy), d_yj = test_dev_bf16(garb, T * (SJ + 8)), ok = ok && d_dyj && d_yj;
        free(garb);
    }
    if (in_x) d_blk = test_dev_bf16(blk, off[n] + R * ldw), ok = ok && d_blk;  /* B and A columns still zero */
    for (int i = 0, c = 0, row = 0, k = 0; ok && i < n; row += (int)outs[i], c += ranks[i], i++) {
        int r = ranks[i];
        bool own = !joined || (tail && i == 0);
        if (in_x) {
            d_W[i] = d_blk + off[i];
            if (r) {
                copies[k++].dst = d_W[i] + in + c;
                copies[k++].dst = d_blk + off[n] + c * ldw;
            }
        }
        if (!own) d_dy[i] = d_dyj + row - S0;
        l[i] = (cuda_linear){.W = d_W[i], .in = in, .out = outs[i], .rank = r, .scale = lo[i].scale,
                             .dropout = dropout, .dropout_seed = lo[i].dropout_seed, .A = r ? d_A + c * in : NULL,
                             .B = r ? d_B[i] : NULL, .dA = r ? d_dA + c * in : NULL, .dB = r ? d_dB[i] : NULL};
        if (in_x) {
            l[i].ldw = ldm[i];
            if (r)
                l[i].bcol = in + c, l[i].B = d_W[i] + in + c, l[i].A = d_blk + off[n] + c * ldw, l[i].ld_a = ldw;
        }
        parts[i] = (cuda_linear_part){d_y[i], CUDA_BF16, 0, d_dy[i], &l[i], 0};  /* y compact */
        if (!own) parts[i].y = d_yj + row - S0, parts[i].ld = SJ + 8;
    }
    snprintf(name, sizeof name, "linear_group %s: device buffers", tag);
    if (!ok) {
        test_cuda_ok(name);
        cuda_tests_failed++;
    } else {
        /* the block's B and A columns are zero until copied in; A and B are read from there */
        cuda_wide_copy *d_copies = NULL;
        float *d_src = n_copies ? test_dev_f32(src, src_n) : NULL;
        if (n_copies && (!d_src || cuda_alloc((void **)&d_copies, sizeof copies) ||
                         cuda_upload(d_copies, copies, sizeof copies)))
            cuda_tests_failed++;
        linear_wide_copy_cuda(d_copies, n_copies, copy_rows, d_src);
        linear_group_forward_cuda(parts, n, d_x, ldx, T, scratch, d_u, ldu);
        cuda_free(d_copies), cuda_free(d_src);
        snprintf(name, sizeof name, "linear_group_forward %s", tag);
        for (int i = 0; test_cuda_ok(name) == 0 && i < n; i++) {
            char n2[300];
            float *y = test_host_bf16(d_y[i], T * outs[i]);
            if (joined && !(tail && i == 0)) {  /* member i's columns of the joined y */
                float *yj = test_host_bf16(d_yj, T * (SJ + 8));
                int64_t col = -S0;
                for (int j = 0; j < i; j++) col += outs[j];
                for (int64_t t = 0; t < T; t++)
                    memcpy(y + t * outs[i], yj + t * (SJ + 8) + col, sizeof(float) * outs[i]);
                free(yj);
            }
            snprintf(n2, sizeof n2, "%s: y%d", name, i);
            test_expect_close(n2, y, y_cpu[i], T * outs[i], 1e-2);
            free(y);
        }
        for (int i = 0; i < n; i++) parts[i].ld = joined && !(tail && i == 0) ? ldy : 0;  /* dy's rows */
        linear_group_backward_cuda(d_dx, 0, parts, n, d_x, ldx, T, scratch, d_u, ldu);
        snprintf(name, sizeof name, "linear_group_backward %s", tag);
        if (test_cuda_ok(name) == 0) {
            test_expect_close_dev(name, "dx", d_dx, dx_cpu, T * in, 1e-2);
            test_expect_close_dev(name, "dA", d_dA, dA_cpu, (int64_t)R * in, 1e-2);
            for (int i = 0; i < n; i++) {
                char part[16];
                snprintf(part, sizeof part, "dB%d", i);
                if (ranks[i]) test_expect_close_dev(name, part, d_dB[i], dB_cpu[i], outs[i] * ranks[i], 1e-2);
            }
        }
    }
    for (int i = 0; i < n; i++) {
        free(W[i]), free(B[i]), free(dy[i]), free(y_cpu[i]), free(dB0[i]), free(dB_cpu[i]);
        if (!in_x) cuda_free(d_W[i]);
        if (!joined || (tail && i == 0)) cuda_free(d_dy[i]);
        cuda_free(d_B[i]), cuda_free(d_y[i]);
    }
    cuda_free(d_x), cuda_free(d_A), cuda_free(d_dA), cuda_free(d_dx), cuda_free(scratch), cuda_free(d_blk);
    cuda_free(d_dyj), cuda_free(d_yj), cuda_free(d_dB_all);
    if (mode == U_KEPT) cuda_free(d_u);
    free(x), free(xp), free(A), free(dA0), free(dx_cpu), free(dA_cpu), free(garbage), free(blk), free(src), free(dyj);
}

static float *zeros_f(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }

/* linear_backward_defer_lora_cuda: dx (overwritten; fp32, or bf16 with dx16) = dy W, with g
 * returned for dx + g A, and dA, dB as the whole backward's; against the CPU's linear_backward.
 * With dropout it runs the whole backward itself and returns NULL. */
static void run_defer(int64_t T, int64_t in, int64_t out, int r, float dropout, int keep_u, int dx16) {
    char name[160], n2[200];
    snprintf(name, sizeof name, "linear_backward_defer_lora T%lld %lld->%lld r%d p%g%s%s", (long long)T,
             (long long)in, (long long)out, r, dropout, keep_u ? " u kept" : "", dx16 ? " dx bf16" : "");
    float *x = test_rvec_bf16(T * in, 1.f), *W = test_rvec_bf16(out * in, 1.f / sqrtf((float)in));
    float *A = test_rvec_bf16((int64_t)r * in, 1.f / sqrtf((float)in)), *B = test_rvec_bf16(out * r, 1.f / sqrtf((float)r));
    float *dy = test_rvec_bf16(T * out, 1.f), *junk = test_rvec(T * in, 1.f);
    float *dx_cpu = zeros_f(T * in), *dA_cpu = zeros_f((int64_t)r * in), *dB_cpu = zeros_f(out * r);
    dt_lora lo = {.rank = r, .scale = 2.0f, .in = in, .out = out, .A = A, .B = B, .dA = dA_cpu, .dB = dB_cpu,
                  .dropout = dropout, .dropout_seed = 77};
    dt_linear L = {.w = {.dtype = DT_F32, .data = W, .rows = out, .cols = in}, .lora = &lo};
    dt_bf16 *d_x = test_dev_bf16(x, T * in), *d_W = test_dev_bf16(W, out * in), *d_A = test_dev_bf16(A, (int64_t)r * in);
    dt_bf16 *d_B = test_dev_bf16(B, out * r), *d_dy = test_dev_bf16(dy, T * out), *d_y = test_dev_bf16(dy, T * out);
    dt_bf16 *d_u = keep_u ? test_dev_bf16(dy, T * r) : NULL;
    void *d_dx = dx16 ? (void *)test_dev_bf16(junk, T * in) : (void *)test_dev_f32(junk, T * in);
    float *d_dA = test_dev_f32(dA_cpu, (int64_t)r * in);  /* zeros */
    float *d_dB = test_dev_f32(dB_cpu, out * r);
    linear_backward(dx_cpu, dy, x, &L, T);
    void *scratch = NULL;
    if (!d_x || !d_W || !d_A || !d_B || !d_dy || !d_y || !d_dx || !d_dA || !d_dB || (keep_u && !d_u) ||
        cuda_alloc(&scratch, linear_scratch_bytes_cuda(T, in, r, dropout > 0))) {
        test_cuda_ok(name);
        cuda_tests_failed++;
    } else {
        cuda_linear l = {.W = d_W, .in = in, .out = out, .rank = r, .scale = lo.scale, .dropout = dropout,
                         .dropout_seed = lo.dropout_seed, .A = d_A, .B = d_B, .dA = d_dA, .dB = d_dB};
        linear_forward_cuda(d_y, CUDA_BF16, 0, d_x, &l, T, scratch, d_u);
        const dt_bf16 *d_g = linear_backward_defer_lora_cuda(d_dx, dx16 ? CUDA_BF16 : CUDA_F32, d_dy, 0, d_x, &l, T,
                                                             scratch, d_u);
        if (test_cuda_ok(name) == 0) {
            float *dx = dx16 ? test_host_bf16(d_dx, T * in) : test_host_f32(d_dx, T * in);
            if ((d_g != NULL) != (dropout == 0)) {
                printf("FAIL cuda_%s: g %s, expected %s\n", name, d_g ? "returned" : "NULL", dropout == 0 ? "g" : "NULL");
                cuda_tests_failed++;
            }
            if (d_g) {  /* the caller's part: dx += g A */
                float *g = test_host_bf16(d_g, T * r);
                for (int64_t t = 0; t < T; t++)
                    for (int j = 0; j < r; j++)
                        for (int64_t i = 0; i < in; i++) dx[t * in + i] += g[t * r + j] * A[j * in + i];
                free(g);
            }
            snprintf(n2, sizeof n2, "%s: dx", name);
            test_expect_close(n2, dx, dx_cpu, T * in, 1e-2);
            free(dx);
            test_expect_close_dev(name, "dA", d_dA, dA_cpu, (int64_t)r * in, 1e-2);
            test_expect_close_dev(name, "dB", d_dB, dB_cpu, out * r, 1e-2);
        }
    }
    cuda_free(d_x), cuda_free(d_W), cuda_free(d_A), cuda_free(d_B), cuda_free(d_dy), cuda_free(d_y), cuda_free(d_u);
    cuda_free(d_dx), cuda_free(d_dA), cuda_free(d_dB), cuda_free(scratch);
    free(x), free(W), free(A), free(B), free(dy), free(junk), free(dx_cpu), free(dA_cpu), free(dB_cpu);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* Milliseconds per call and TFLOP/s of forward and backward at T tokens: printed, never asserted. */
static void time_shape(int64_t T, int64_t in, int64_t out, int r, float p, cuda_dtype yt, double *sum_ms, int want_dx,
                       int want_ab) {
    float *h = test_rvec(T * (in > out ? in : out), 1.f);
    dt_bf16 *d_x = test_dev_bf16(h, T * in), *d_W = test_dev_bf16(h, out * in), *d_dy = test_dev_bf16(h, T * out);
    dt_bf16 *d_A = test_dev_bf16(h, (int64_t)(r ? r : 1) * in), *d_B = test_dev_bf16(h, out * (r ? r : 1));
    float *d_dx = test_dev_f32(h, T * in), *d_dA = test_dev_f32(h, (int64_t)(r ? r : 1) * in);
    float *d_dB = test_dev_f32(h, out * (r ? r : 1));
    void *d_y = NULL, *scratch = NULL;
    free(h);
    if (!d_x || !d_W || !d_dy || !d_A || !d_B || !d_dx || !d_dA || !d_dB || cuda_alloc(&d_y, sizeof(float) * T * out) ||
        cuda_alloc(&scratch, linear_scratch_bytes_cuda(T, in, r, 1))) {
        printf("timing: no memory\n");
        goto done;
    }
    cuda_linear l = {.W = d_W, .in = in, .out = out, .rank = r, .scale = 2.f, .dropout = p, .dropout_seed = 7,
                     .A = d_A, .B = d_B, .dA = want_ab ? d_dA : NULL, .dB = want_ab ? d_dB : NULL};
    float *dxp = want_dx ? d_dx : NULL;
    const int iters = 30;
    for (int i = 0; i < 3; i++) linear_forward_cuda(d_y, yt, 0, d_x, &l, T, scratch, NULL);
    cuda_check("timing");
    double t0 = now_s();
    for (int i = 0; i < iters; i++) linear_forward_cuda(d_y, yt, 0, d_x, &l, T, scratch, NULL);
    double fenq = (now_s() - t0) / iters * 1e3;  /* the host's issue time: near the total when launch-bound */
    cuda_check("timing");
    double fwd = (now_s() - t0) / iters * 1e3;
    for (int i = 0; i < 3; i++) linear_backward_cuda(dxp, 1, d_dy, 0, d_x, &l, T, scratch, NULL);
    cuda_check("timing");
    t0 = now_s();
    for (int i = 0; i < iters; i++) linear_backward_cuda(dxp, 1, d_dy, 0, d_x, &l, T, scratch, NULL);
    double benq = (now_s() - t0) / iters * 1e3;
    cuda_check("timing");
    double bwd = (now_s() - t0) / iters * 1e3;
    double base = 2.0 * T * in * out, lora = 2.0 * T * r * (in + out);
    double ffl = base + lora, bfl = 0;  /* the products the backward runs: */
    if (want_dx) bfl += base + 2.0 * T * r * in;                     /* dy W, g A */
    if (r && (want_dx || want_ab)) bfl += 2.0 * T * r * out;         /* g = dy B */
    if (r && want_ab) bfl += 2.0 * T * r * in + 2.0 * T * r * (in + out);  /* u, dB, dA */
    printf("timing linear T%lld %5lld->%-5lld r%-2d p%-3g %s: fwd %7.3f ms (issue %.3f) %6.1f TFLOP/s | bwd%s%s %7.3f "
           "ms (issue %.3f) %6.1f TFLOP/s\n",
           (long long)T, (long long)in, (long long)out, r, p, yt == CUDA_BF16 ? "bf16" : "f32 ", fwd, fenq,
           ffl / fwd * 1e-9, want_dx ? "" : " dx=NULL", want_ab ? "" : " dA,dB=NULL", bwd, benq, bfl / bwd * 1e-9);
    sum_ms[0] += fwd;
    sum_ms[1] += bwd;
done:
    cuda_free(d_x), cuda_free(d_W), cuda_free(d_dy), cuda_free(d_A), cuda_free(d_B), cuda_free(d_dx);
    cuda_free(d_dA), cuda_free(d_dB), cuda_free(d_y), cuda_free(scratch);
}

static void timing(void) {
    /* one layer's linears of each kind: DeltaNet (qkv 6144, z 2048, b and a 16, out 2048->1024),
     * attention (q with gate 4096, k and v 512, o 2048->1024), MLP (gate, up 3584, down) */
    static const struct {
        int64_t in, out;
        cuda_dtype yt;
    } s[] = {{1024, 6144, CUDA_BF16}, {1024, 2048, CUDA_BF16}, {1024, 16, CUDA_BF16}, {2048, 1024, CUDA_F32},
             {1024, 4096, CUDA_BF16}, {1024, 512, CUDA_BF16},  {1024, 3584, CUDA_BF16}, {3584, 1024, CUDA_F32}};
    int64_t T = 4096;
    static const struct {
        int r;
        float p;
        int dx, ab;  /* which gradients the backward computes */
    } v[] = {{0, 0, 1, 1}, {16, 0, 1, 1}, {16, 0, 1, 0}, {16, 0, 0, 1}, {16, 0.1f, 1, 1}};
    for (size_t k = 0; k < sizeof v / sizeof v[0]; k++) {
        double sum[2] = {0, 0};
        for (size_t i = 0; i < sizeof s / sizeof s[0]; i++)
            time_shape(T, s[i].in, s[i].out, v[k].r, v[k].p, s[i].yt, sum, v[k].dx, v[k].ab);
        printf("timing linear r%d p%g dx%d dA,dB%d: sum of the shapes above: fwd %.3f ms, bwd %.3f ms\n", v[k].r,
               v[k].p, v[k].dx, v[k].ab, sum[0], sum[1]);
    }
}

void cuda_tests_linear(void) {
    const char *t = getenv("DT_CUDA_TIMING");
    if (t && !strcmp(t, "only")) {  /* the timing table alone */
        timing();
        return;
    }
    static const lcase cases[] = {
        /* odd shapes */
        {37, 70, 130, 0, 0.f, CUDA_F32, 0, 1, 1, 0, 0},
        {37, 70, 130, 0, 0.f, CUDA_BF16, 0, 0, 1, 0, 0},
        {37, 70, 130, 0, 0.f, CUDA_F32, 1, 1, 1, 0, 0},
        {37, 70, 130, 8, 0.f, CUDA_F32, 1, 1, 1, 0, 0},
        {37, 70, 130, 8, 0.f, CUDA_BF16, 0, 0, 1, 0, 0},
        {37, 70, 130, 8, 0.1f, CUDA_F32, 0, 1, 1, 0, 0},
        {37, 70, 130, 8, 0.1f, CUDA_F32, 0, 1, 1, 0, 1},
        {37, 70, 130, 8, 0.1f, CUDA_BF16, 0, 1, 0, 0, 0},
        {37, 70, 130, 5, 0.1f, CUDA_F32, 1, 0, 1, 0, 0},
        {37, 72, 130, 16, 0.1f, CUDA_F32, 1, 1, 1, 0, 0},
        {1, 64, 16, 16, 0.1f, CUDA_BF16, 0, 1, 1, 0, 0},
        {63, 130, 1, 3, 0.f, CUDA_F32, 1, 1, 1, 0, 0},
        /* in and out multiples of 8: the rank <= 16 projection kernel, with ragged T and r */
        {37, 72, 136, 5, 0.f, CUDA_F32, 1, 1, 1, 0, 0},
        {37, 72, 136, 16, 0.1f, CUDA_BF16, 0, 1, 1, 0, 0},
        /* in pieces of rows, the dropout mask following them */
        {37, 72, 136, 16, 0.1f, CUDA_F32, 1, 1, 1, 1, 0},
        {100, 70, 130, 8, 0.3f, CUDA_BF16, 0, 1, 1, 1, 0},
        {100, 70, 130, 8, 0.3f, CUDA_BF16, 0, 1, 1, 1, 1},
        {100, 264, 40, 16, 0.f, CUDA_F32, 1, 1, 1, 0, 0},
        {100, 264, 40, 16, 0.f, CUDA_F32, 1, 0, 1, 0, 0},
        {100, 264, 40, 16, 0.f, CUDA_F32, 1, 1, 0, 0, 0},
        {1, 64, 8, 3, 0.f, CUDA_F32, 0, 1, 1, 0, 0},
        /* rank above 16: cuBLAS throughout */
        {64, 128, 96, 32, 0.f, CUDA_F32, 1, 1, 1, 0, 0},
        /* Qwen3.5-0.8B at 2 x 2048 tokens, r16 */
        {4096, 1024, 6144, 0, 0.f, CUDA_BF16, 0, 1, 1, 0, 0},
        {4096, 1024, 6144, 16, 0.f, CUDA_BF16, 0, 1, 1, 0, 0},
        {4096, 1024, 6144, 16, 0.f, CUDA_BF16, 0, 1, 1, 0, 1},
        {4096, 1024, 2048, 16, 0.1f, CUDA_BF16, 0, 1, 1, 0, 0},
        {4096, 1024, 16, 16, 0.f, CUDA_BF16, 0, 1, 1, 0, 0},
        {4096, 1024, 3584, 16, 0.1f, CUDA_BF16, 0, 0, 1, 0, 0},
        {4096, 3584, 1024, 16, 0.f, CUDA_F32, 1, 1, 1, 0, 0},
        {4096, 2048, 1024, 16, 0.1f, CUDA_F32, 1, 1, 1, 0, 0},
        {4096, 1024, 4096, 16, 0.f, CUDA_BF16, 0, 1, 1, 0, 0},
        {4096, 1024, 512, 16, 0.1f, CUDA_BF16, 0, 1, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i]);
    /* groups: stacked (one scale, no dropout), with members without a LoRA, and member by member */
    static const int64_t outs3[] = {96, 40, 56}, outs4[] = {136, 64, 16, 16}, outs2[] = {40, 96};
    static const int r3[] = {16, 16, 16}, r4[] = {8, 8, 0, 0}, r4b[] = {0, 8, 0, 8}, r2[] = {8, 8};
    run_group(100, 72, outs3, r3, 3, 2.0f, 0.f, U_KEPT);
    run_group(100, 72, outs3, r3, 3, 2.0f, 0.f, U_IN_X);
    run_group(100, 72, outs3, r3, 3, 2.0f, 0.f, U_IN_X_JOINED);
    run_group(100, 72, outs4, r4, 4, 2.0f, 0.f, U_NONE);
    run_group(37, 72, outs4, r4b, 4, 2.0f, 0.f, U_KEPT);
    run_group(37, 72, outs4, r4b, 4, 2.0f, 0.f, U_IN_X);
    run_group(37, 72, outs4, r4b, 4, 2.0f, 0.f, U_IN_X_JOINED);
    run_group(100, 72, outs2, r2, 2, 0.5f, 0.f, U_KEPT);
    run_group(100, 72, outs2, r2, 2, 2.0f, 0.1f, U_KEPT);
    run_group(100, 72, outs2, r2, 2, 2.0f, 0.1f, U_NONE);
    run_group(100, 72, outs2, r2, 2, 2.0f, 0.1f, U_IN_X);
    run_group(100, 72, outs2, r2, 2, 2.0f, 0.1f, U_IN_X_JOINED);  /* dropout: the products one by one */
    run_group(100, 72, outs2, r2, 2, 0.5f, 0.f, U_IN_X_JOINED);   /* scales differ: the same */
    static const int64_t outs1[] = {72};  /* one linear (an output projection): dx = [dy | g] [W; A] */
    static const int r1[] = {16};
    run_group(100, 136, outs1, r1, 1, 2.0f, 0.f, U_IN_X_JOINED);
    static const int64_t gdn[] = {6144, 2048, 16, 16};  /* Qwen3.5-0.8B's DeltaNet in-projections */
    static const int rgdn[] = {16, 16, 0, 0};
    run_group(4096, 1024, gdn, rgdn, 4, 2.0f, 0.f, U_KEPT);
    run_group(4096, 1024, gdn, rgdn, 4, 2.0f, 0.f, U_IN_X);
    run_group(4096, 1024, gdn, rgdn, 4, 2.0f, 0.f, U_IN_X_TAIL);  /* as the model lays them out */
    run_group(37, 72, outs4, r4, 4, 2.0f, 0.f, U_IN_X_TAIL);
    run_group(37, 72, outs4, r4b, 4, 2.0f, 0.f, U_IN_X_TAIL);  /* no LoRA first: rows of in */
    run_group(37, 72, outs4, r4, 4, 2.0f, 0.1f, U_IN_X_TAIL);  /* dropout: the products one by one */
    static const int64_t outs2e[] = {40, 40};  /* one shape: the dB products batched */
    run_group(100, 72, outs2e, r2, 2, 2.0f, 0.f, U_IN_X_JOINED);
    run_group(100, 72, outs2e, r2, 2, 2.0f, 0.f, U_KEPT);
    static const int64_t mlp[] = {3584, 3584};  /* and its MLP's gate and up, as the model runs them */
    static const int rmlp[] = {16, 16};
    run_group(4096, 1024, mlp, rmlp, 2, 2.0f, 0.f, U_IN_X_JOINED);
    run_defer(100, 136, 72, 16, 0.f, 1, 0);
    run_defer(100, 136, 72, 16, 0.f, 1, 1);
    run_defer(37, 72, 40, 8, 0.f, 0, 0);
    run_defer(37, 72, 40, 8, 0.1f, 1, 0);
    if (t && atoi(t) == 1) timing();
}
