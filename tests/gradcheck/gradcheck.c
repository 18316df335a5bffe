/* Finite-difference gradient checks of every op, in double precision.
 *
 * This program is built from the same src/ops sources as the product, compiled with
 * real = double (-DDT_OPS_DOUBLE). For each op: random non-zero inputs, a random
 * upstream gradient G, L = sum(G * forward(inputs)); the op's backward (accumulating
 * onto random initial values, to check it adds rather than overwrites) must equal the
 * central differences of L for every input element. Forward outputs are poisoned with
 * NaN first, so an output the forward forgets to write fails the check.
 *
 * It also reads include/deltatune/ops.h: every X_forward needs X_backward (or
 * X_forward_backward), every X must be listed in DT_OP_FAMILIES, and every family
 * needs a check here. */
#include <math.h>
#include <regex.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/ops.h"

#ifndef DT_OPS_DOUBLE
#error "gradcheck must be built with -DDT_OPS_DOUBLE"
#endif

static uint64_t rng = 88172645463325252ull;
static double urand(void) {  /* uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 4503599627370496.0 - 1.0;
}
static double *vec(int64_t n, double lo, double hi) {
    double *v = malloc(sizeof(double) * (n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) v[i] = lo + (hi - lo) * (urand() * 0.5 + 0.5);
    return v;
}
static double *rvec(int64_t n) { return vec(n, -1, 1); }
static void poison(double *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) v[i] = NAN;
}

/* ---------------------------------------------------------------- harness */

typedef struct {
    const char *name;
    double *x;       /* the input, perturbed in place */
    int64_t n;
    double *grad;    /* where the backward accumulates */
} gc_input;

typedef struct {
    double (*loss)(void *ctx);      /* forward, then sum(G * y) */
    void (*backward)(void *ctx);    /* backward with dy = G, accumulating into the inputs' grads */
    void *ctx;
} gc_op;

static int n_passed, n_failed;

static void report(const char *op, int ok, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void report(const char *op, int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s gradcheck_%s: ", ok ? "ok  " : "FAIL", op);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) n_passed++;
    else n_failed++;
}

/* Compares the backward with central differences for every element of every input. */
static void gradcheck(const char *op, gc_input *in, int n_in, gc_op f, double tol) {
    double **init = malloc(sizeof(double *) * n_in);
    for (int i = 0; i < n_in; i++) {
        init[i] = rvec(in[i].n);
        memcpy(in[i].grad, init[i], sizeof(double) * in[i].n);
    }
    f.backward(f.ctx);
    double worst = 0;
    const char *worst_name = "";
    int64_t worst_at = -1;
    for (int i = 0; i < n_in; i++) {
        double scale = 1e-12;
        for (int64_t j = 0; j < in[i].n; j++) scale = fmax(scale, fabs(in[i].grad[j] - init[i][j]));
        for (int64_t j = 0; j < in[i].n; j++) {
            double x0 = in[i].x[j], h = 1e-6 * fmax(1.0, fabs(x0));
            in[i].x[j] = x0 + h;
            double lp = f.loss(f.ctx);
            in[i].x[j] = x0 - h;
            double lm = f.loss(f.ctx);
            in[i].x[j] = x0;
            double num = (lp - lm) / (2 * h), ana = in[i].grad[j] - init[i][j];
            double err = fabs(num - ana) / scale;
            if (!(err <= worst)) {  /* NaN counts as worst */
                worst = isnan(err) ? INFINITY : err;
                worst_name = in[i].name;
                worst_at = j;
            }
        }
        free(init[i]);
    }
    free(init);
    report(op, worst <= tol, "max error %.2e (relative to the largest gradient) at %s[%lld]", worst, worst_name,
           (long long)worst_at);
}

static double dot(const double *a, const double *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---------------------------------------------------------------- linear (+ LoRA, dropout) */

typedef struct {
    dt_linear l;
    dt_lora lo;
    double *x, *dx, *y, *G;
    int64_t T;
} linear_ctx;
static double linear_loss(void *p) {
    linear_ctx *c = p;
    poison(c->y, c->T * c->l.w.rows);
    linear_forward(c->y, c->x, &c->l, c->T);
    return dot(c->G, c->y, c->T * c->l.w.rows);
}
static void linear_bw(void *p) {
    linear_ctx *c = p;
    linear_backward(c->dx, c->G, c->x, &c->l, c->T);
}
static void check_linear(const char *name, double dropout) {
    int64_t T = 5, in = 7, out = 6;
    int r = 3;
    linear_ctx c = {.T = T};
    double *W = rvec(out * in);
    c.l.w = (dt_weight){.dtype = DT_F64, .data = W, .rows = out, .cols = in};
    c.lo = (dt_lora){.rank = r, .scale = 0.7, .in = in, .out = out, .A = rvec(r * in), .B = rvec(out * r),
                     .dA = rvec(r * in), .dB = rvec(out * r), .dropout = dropout, .dropout_seed = 1234};
    c.l.lora = &c.lo;
    c.x = rvec(T * in), c.dx = rvec(T * in), c.y = rvec(T * out), c.G = rvec(T * out);
    gc_input ins[] = {{"x", c.x, T * in, c.dx}, {"A", c.lo.A, r * in, c.lo.dA}, {"B", c.lo.B, out * r, c.lo.dB}};
    gradcheck(name, ins, 3, (gc_op){linear_loss, linear_bw, &c}, 1e-7);
    free(W), free(c.lo.A), free(c.lo.B), free(c.lo.dA), free(c.lo.dB), free(c.x), free(c.dx), free(c.y), free(c.G);
}

/* bf16 weights take the block-conversion path; the gradient to x must still be W^T dy. */
static void check_linear_bf16(void) {
    int64_t T = 4, in = 5, out = 300;
    linear_ctx c = {.T = T};
    uint16_t *Wb = malloc(2 * out * in);
    for (int64_t i = 0; i < out * in; i++) Wb[i] = dt_f32_to_bf16((float)urand());
    c.l.w = (dt_weight){.dtype = DT_BF16, .data = Wb, .rows = out, .cols = in};
    c.x = rvec(T * in), c.dx = rvec(T * in), c.y = rvec(T * out), c.G = rvec(T * out);
    gc_input ins[] = {{"x", c.x, T * in, c.dx}};
    gradcheck("linear_bf16_weights", ins, 1, (gc_op){linear_loss, linear_bw, &c}, 1e-7);
    free(Wb), free(c.x), free(c.dx), free(c.y), free(c.G);
}

/* ---------------------------------------------------------------- embedding */

typedef struct {
    double *E, *dE, *y, *G;
    int32_t ids[6];
    int64_t V, H;
} emb_ctx;
static double emb_loss(void *p) {
    emb_ctx *c = p;
    dt_weight w = {.dtype = DT_F64, .data = c->E, .rows = c->V, .cols = c->H};
    poison(c->y, 6 * c->H);
    embedding_forward(c->y, c->ids, 6, &w);
    return dot(c->G, c->y, 6 * c->H);
}
static void emb_bw(void *p) {
    emb_ctx *c = p;
    embedding_backward(c->dE, c->G, c->ids, 6, c->H);
}
static void check_embedding(void) {
    emb_ctx c = {.V = 9, .H = 4, .ids = {3, 0, 8, 3, 5, 3}};
    c.E = rvec(c.V * c.H), c.dE = rvec(c.V * c.H), c.y = rvec(6 * c.H), c.G = rvec(6 * c.H);
    gc_input ins[] = {{"E", c.E, c.V * c.H, c.dE}};
    gradcheck("embedding", ins, 1, (gc_op){emb_loss, emb_bw, &c}, 1e-7);
    free(c.E), free(c.dE), free(c.y), free(c.G);
}

/* ---------------------------------------------------------------- norms */

typedef struct {
    double *x, *z, *w, *dx, *dz, *dw, *y, *G;
    int64_t rows;
    int D, heads;
    int64_t stride;
    double eps, scale;
} norm_ctx;
static double rms1p_loss(void *p) {
    norm_ctx *c = p;
    poison(c->y, c->rows * c->D);
    rmsnorm1p_forward(c->y, c->x, c->w, c->rows, c->D, c->eps);
    return dot(c->G, c->y, c->rows * c->D);
}
static void rms1p_bw(void *p) {
    norm_ctx *c = p;
    rmsnorm1p_backward(c->dx, c->dw, c->G, c->x, c->w, c->rows, c->D, c->eps);
}
static double gated_loss(void *p) {
    norm_ctx *c = p;
    poison(c->y, c->rows * c->D);
    rmsnorm_gated_forward(c->y, c->x, c->z, c->w, c->rows, c->D, c->eps);
    return dot(c->G, c->y, c->rows * c->D);
}
static void gated_bw(void *p) {
    norm_ctx *c = p;
    rmsnorm_gated_backward(c->dx, c->dz, c->dw, c->G, c->x, c->z, c->w, c->rows, c->D, c->eps);
}
static double l2_loss(void *p) {  /* in place: work on a copy */
    norm_ctx *c = p;
    int64_t n = c->rows * c->stride;
    memcpy(c->y, c->x, sizeof(double) * n);
    l2norm_forward(c->y, c->rows, c->heads, c->D, c->stride, c->eps, c->scale);
    double s = 0;
    for (int64_t r = 0; r < c->rows; r++)  /* only the normalised slots count */
        s += dot(c->G + r * c->stride, c->y + r * c->stride, (int64_t)c->heads * c->D);
    return s;
}
static void l2_bw(void *p) {
    norm_ctx *c = p;
    l2norm_backward(c->dx, c->G, c->x, c->rows, c->heads, c->D, c->stride, c->eps, c->scale);
}
static void check_norms(void) {
    norm_ctx c = {.rows = 6, .D = 8, .eps = 1e-6};
    int64_t n = c.rows * c.D;
    c.x = rvec(n), c.z = vec(n, -3, 3), c.w = rvec(c.D), c.dx = rvec(n), c.dz = rvec(n), c.dw = rvec(c.D);
    c.y = rvec(n), c.G = rvec(n);
    gc_input a[] = {{"x", c.x, n, c.dx}, {"w", c.w, c.D, c.dw}};
    gradcheck("rmsnorm1p", a, 2, (gc_op){rms1p_loss, rms1p_bw, &c}, 1e-6);
    gc_input b[] = {{"x", c.x, n, c.dx}, {"z", c.z, n, c.dz}, {"w", c.w, c.D, c.dw}};
    gradcheck("rmsnorm_gated", b, 3, (gc_op){gated_loss, gated_bw, &c}, 1e-6);
    free(c.x), free(c.z), free(c.w), free(c.dx), free(c.dz), free(c.dw), free(c.y), free(c.G);

    /* L2 norm over 2 heads of 5 inside rows of stride 13 (like q inside the conv output) */
    norm_ctx l = {.rows = 4, .D = 5, .heads = 2, .stride = 13, .eps = 1e-6, .scale = 0.3};
    int64_t m = l.rows * l.stride;
    l.x = rvec(m), l.dx = rvec(m), l.y = rvec(m), l.G = rvec(m);
    double *dx0 = malloc(sizeof(double) * m);
    memcpy(dx0, l.dx, sizeof(double) * m);
    gc_input d[] = {{"x", l.x, m, l.dx}};
    gradcheck("l2norm", d, 1, (gc_op){l2_loss, l2_bw, &l}, 1e-6);
    free(dx0), free(l.x), free(l.dx), free(l.y), free(l.G);
}

/* ---------------------------------------------------------------- rope */

typedef struct {
    double *x, *dx, *y, *G, *tmp;
    int32_t pos[5];
    int64_t T;
    int nh, hd, rot;
} rope_ctx;
static double rope_loss(void *p) {
    rope_ctx *c = p;
    int64_t n = c->T * c->nh * c->hd;
    memcpy(c->y, c->x, sizeof(double) * n);
    rope_forward(c->y, c->pos, c->T, c->nh, c->hd, c->rot, 1e4);
    return dot(c->G, c->y, n);
}
static void rope_bw(void *p) {  /* in place on a copy of G, then accumulate */
    rope_ctx *c = p;
    int64_t n = c->T * c->nh * c->hd;
    memcpy(c->tmp, c->G, sizeof(double) * n);
    rope_backward(c->tmp, c->pos, c->T, c->nh, c->hd, c->rot, 1e4);
    for (int64_t i = 0; i < n; i++) c->dx[i] += c->tmp[i];
}
static void check_rope(void) {
    rope_ctx c = {.T = 5, .nh = 3, .hd = 12, .rot = 8, .pos = {0, 1, 7, 2, 40}};
    int64_t n = c.T * c.nh * c.hd;
    c.x = rvec(n), c.dx = rvec(n), c.y = rvec(n), c.G = rvec(n), c.tmp = rvec(n);
    gc_input ins[] = {{"x", c.x, n, c.dx}};
    gradcheck("rope", ins, 1, (gc_op){rope_loss, rope_bw, &c}, 1e-7);
    free(c.x), free(c.dx), free(c.y), free(c.G), free(c.tmp);
}

/* ---------------------------------------------------------------- conv1d + SiLU */

typedef struct {
    double *x, *w, *dx, *dw, *y, *G;
    int64_t T;
    int C, K;
} conv_ctx;
static double conv_loss(void *p) {
    conv_ctx *c = p;
    poison(c->y, c->T * c->C);
    conv1d_silu_forward(c->y, c->x, c->w, c->T, c->C, c->K);
    return dot(c->G, c->y, c->T * c->C);
}
static void conv_bw(void *p) {
    conv_ctx *c = p;
    conv1d_silu_backward(c->dx, c->dw, c->G, c->x, c->w, c->T, c->C, c->K);
}
static void check_conv(void) {
    conv_ctx c = {.T = 7, .C = 5, .K = 4};
    int64_t n = c.T * c.C;
    c.x = rvec(n), c.w = rvec(c.C * c.K), c.dx = rvec(n), c.dw = rvec(c.C * c.K), c.y = rvec(n), c.G = rvec(n);
    gc_input ins[] = {{"x", c.x, n, c.dx}, {"w", c.w, c.C * c.K, c.dw}};
    gradcheck("conv1d_silu", ins, 2, (gc_op){conv_loss, conv_bw, &c}, 1e-7);
    free(c.x), free(c.w), free(c.dx), free(c.dw), free(c.y), free(c.G);
}

/* ---------------------------------------------------------------- Gated DeltaNet */

typedef struct {
    double *b, *a, *a_log, *dt_bias, *db, *da, *da_log, *ddt, *beta, *g, *Gb, *Gg;
    int64_t T;
    int Hv;
} gates_ctx;
static double gates_loss(void *p) {
    gates_ctx *c = p;
    int64_t n = c->T * c->Hv;
    poison(c->beta, n), poison(c->g, n);
    deltanet_gates_forward(c->beta, c->g, c->b, c->a, c->a_log, c->dt_bias, c->T, c->Hv);
    return dot(c->Gb, c->beta, n) + dot(c->Gg, c->g, n);
}
static void gates_bw(void *p) {
    gates_ctx *c = p;
    deltanet_gates_backward(c->db, c->da, c->da_log, c->ddt, c->Gb, c->Gg, c->b, c->a, c->a_log, c->dt_bias, c->T,
                            c->Hv);
}
static void check_gates(void) {
    gates_ctx c = {.T = 6, .Hv = 3};
    int64_t n = c.T * c.Hv;
    c.b = vec(n, -3, 3), c.a = vec(n, -3, 3), c.a_log = vec(c.Hv, -1, 1.5), c.dt_bias = rvec(c.Hv);
    c.a[0] = 25;  /* above torch's softplus threshold */
    c.db = rvec(n), c.da = rvec(n), c.da_log = rvec(c.Hv), c.ddt = rvec(c.Hv);
    c.beta = rvec(n), c.g = rvec(n), c.Gb = rvec(n), c.Gg = rvec(n);
    gc_input ins[] = {{"b", c.b, n, c.db}, {"a", c.a, n, c.da}, {"A_log", c.a_log, c.Hv, c.da_log},
                      {"dt_bias", c.dt_bias, c.Hv, c.ddt}};
    gradcheck("deltanet_gates", ins, 4, (gc_op){gates_loss, gates_bw, &c}, 1e-6);
    free(c.b), free(c.a), free(c.a_log), free(c.dt_bias), free(c.db), free(c.da), free(c.da_log), free(c.ddt);
    free(c.beta), free(c.g), free(c.Gb), free(c.Gg);
}

typedef struct {
    double *q, *k, *v, *beta, *g, *dq, *dk, *dv, *dbeta, *dg, *o, *G;
    int64_t T, qk_stride, v_stride;
    deltanet_dims d;
} dn_ctx;
static double dn_loss(void *p) {
    dn_ctx *c = p;
    int64_t n = c->T * c->d.n_v_heads * c->d.dv;
    poison(c->o, n);
    deltanet_forward(c->o, c->q, c->k, c->qk_stride, c->v, c->v_stride, c->beta, c->g, c->T, c->d, NULL);
    return dot(c->G, c->o, n);
}
static void dn_bw(void *p) {
    dn_ctx *c = p;
    deltanet_backward(c->dq, c->dk, c->dv, c->dbeta, c->dg, c->G, c->q, c->k, c->qk_stride, c->v, c->v_stride,
                      c->beta, c->g, c->T, c->d);
}
/* q, k and v share strided rows, as in the model (q | k | v of the conv output); Hv = 2 Hk;
 * 150 tokens cross two chunk boundaries of the checkpointed backward. */
static void check_deltanet(void) {
    dn_ctx c = {.T = 150, .d = {.n_k_heads = 2, .n_v_heads = 4, .dk = 3, .dv = 2}};
    int64_t kd = c.d.n_k_heads * c.d.dk, vd = c.d.n_v_heads * c.d.dv, row = 2 * kd + vd;
    int64_t n = c.T * row, ng = c.T * c.d.n_v_heads;
    double *buf = rvec(n), *dbuf = rvec(n);
    for (int64_t t = 0; t < c.T; t++)  /* keys of norm ~1, as after the L2 norm, keep the state bounded */
        for (int64_t i = 0; i < kd; i++) buf[t * row + kd + i] *= 0.6;
    c.q = buf, c.k = buf + kd, c.v = buf + 2 * kd, c.qk_stride = row, c.v_stride = row;
    c.dq = dbuf, c.dk = dbuf + kd, c.dv = dbuf + 2 * kd;
    c.beta = vec(ng, 0.1, 0.9), c.g = vec(ng, -0.5, -0.01), c.dbeta = rvec(ng), c.dg = rvec(ng);
    c.o = rvec(c.T * vd), c.G = rvec(c.T * vd);
    /* the harness perturbs whole rows: q, k and v are the same buffer, checked once */
    gc_input ins[] = {{"qkv", buf, n, dbuf}, {"beta", c.beta, ng, c.dbeta}, {"g", c.g, ng, c.dg}};
    gradcheck("deltanet", ins, 3, (gc_op){dn_loss, dn_bw, &c}, 1e-6);
    free(buf), free(dbuf), free(c.beta), free(c.g), free(c.dbeta), free(c.dg), free(c.o), free(c.G);
}

/* ---------------------------------------------------------------- attention */

typedef struct {
    double *q, *k, *v, *dq, *dk, *dv, *o, *G, *scratch;
    int64_t T;
    int nh, nkv, hd;
} att_ctx;
static double att_loss(void *p) {
    att_ctx *c = p;
    int64_t n = c->T * c->nh * c->hd;
    poison(c->o, n);
    attention_forward(c->o, c->q, c->k, c->v, c->T, c->T, c->nh, c->nkv, c->hd, 0.4, c->scratch);
    return dot(c->G, c->o, n);
}
static void att_bw(void *p) {
    att_ctx *c = p;
    attention_backward(c->dq, c->dk, c->dv, c->G, c->q, c->k, c->v, c->T, c->nh, c->nkv, c->hd, 0.4, c->scratch);
}
static void check_attention(void) {
    att_ctx c = {.T = 9, .nh = 4, .nkv = 2, .hd = 6};
    int64_t nq = c.T * c.nh * c.hd, nk = c.T * c.nkv * c.hd;
    c.q = rvec(nq), c.k = rvec(nk), c.v = rvec(nk), c.dq = rvec(nq), c.dk = rvec(nk), c.dv = rvec(nk);
    c.o = rvec(nq), c.G = rvec(nq), c.scratch = rvec(2 * c.T * c.T);
    gc_input ins[] = {{"q", c.q, nq, c.dq}, {"k", c.k, nk, c.dk}, {"v", c.v, nk, c.dv}};
    gradcheck("attention", ins, 3, (gc_op){att_loss, att_bw, &c}, 1e-6);
    free(c.q), free(c.k), free(c.v), free(c.dq), free(c.dk), free(c.dv), free(c.o), free(c.G), free(c.scratch);
}

/* ---------------------------------------------------------------- activations */

typedef struct {
    double *a, *b, *da, *db, *y, *G;
    int64_t n;
} act_ctx;
static double swiglu_loss(void *p) {
    act_ctx *c = p;
    poison(c->y, c->n);
    swiglu_forward(c->y, c->a, c->b, c->n);
    return dot(c->G, c->y, c->n);
}
static void swiglu_bw(void *p) {
    act_ctx *c = p;
    swiglu_backward(c->da, c->db, c->G, c->a, c->b, c->n);
}
static double sgate_loss(void *p) {  /* in place on a copy of x */
    act_ctx *c = p;
    memcpy(c->y, c->a, sizeof(double) * c->n);
    sigmoid_gate_forward(c->y, c->b, c->n);
    return dot(c->G, c->y, c->n);
}
static void sgate_bw(void *p) {
    act_ctx *c = p;
    sigmoid_gate_backward(c->da, c->db, c->G, c->a, c->b, c->n);
}
static void check_activations(void) {
    act_ctx c = {.n = 17};
    c.a = vec(c.n, -4, 4), c.b = vec(c.n, -4, 4), c.da = rvec(c.n), c.db = rvec(c.n), c.y = rvec(c.n), c.G = rvec(c.n);
    gc_input ins[] = {{"gate", c.a, c.n, c.da}, {"up", c.b, c.n, c.db}};
    gradcheck("swiglu", ins, 2, (gc_op){swiglu_loss, swiglu_bw, &c}, 1e-7);
    gc_input ins2[] = {{"x", c.a, c.n, c.da}, {"gate", c.b, c.n, c.db}};
    gradcheck("sigmoid_gate", ins2, 2, (gc_op){sgate_loss, sgate_bw, &c}, 1e-7);
    free(c.a), free(c.b), free(c.da), free(c.db), free(c.y), free(c.G);
}

/* ---------------------------------------------------------------- LM head + cross-entropy */

typedef struct {
    double *h, *dh, *E, *scratch;
    int32_t *targets;
    int64_t T, H, V;
    double scale;
} ce_ctx;
static double ce_loss(void *p) {
    ce_ctx *c = p;
    dt_weight w = {.dtype = DT_F64, .data = c->E, .rows = c->V, .cols = c->H};
    double s = 0, s2 = 0;
    int64_t n = 0, n2 = 0;
    lmhead_ce_forward(&s, &n, c->h, c->targets, c->T, &w, c->scratch);
    /* the training path must report the same loss; its gradient is checked below */
    double *junk = calloc(c->T * c->H, sizeof(double));
    lmhead_ce_forward_backward(&s2, &n2, junk, c->h, c->targets, c->T, &w, c->scale, LMHEAD_TOKEN_CHUNK, c->scratch);
    free(junk);
    if (n != n2 || fabs(s - s2) > 1e-10 * fabs(s)) return NAN;
    return c->scale * s;
}
static void ce_bw(void *p) {
    ce_ctx *c = p;
    dt_weight w = {.dtype = DT_F64, .data = c->E, .rows = c->V, .cols = c->H};
    double s = 0;
    int64_t n = 0;
    lmhead_ce_forward_backward(&s, &n, c->dh, c->h, c->targets, c->T, &w, c->scale, LMHEAD_TOKEN_CHUNK, c->scratch);
}
static void check_lmhead_ce(void) {
    /* vocabulary of two blocks plus a partial one; 70 tokens: two token chunks */
    ce_ctx c = {.T = 70, .H = 5, .V = 2 * LMHEAD_VOCAB_BLOCK + 37, .scale = 1.0 / 50};
    c.h = rvec(c.T * c.H), c.dh = rvec(c.T * c.H), c.E = rvec(c.V * c.H);
    int64_t cap = c.T * LMHEAD_VOCAB_BLOCK > LMHEAD_TOKEN_CHUNK * c.V ? c.T * LMHEAD_VOCAB_BLOCK : LMHEAD_TOKEN_CHUNK * c.V;
    c.scratch = rvec(cap);
    c.targets = malloc(sizeof(int32_t) * c.T);
    for (int64_t t = 0; t < c.T; t++) c.targets[t] = t % 7 == 3 ? -1 : (int32_t)((t * 2654435761u) % c.V);
    gc_input ins[] = {{"h", c.h, c.T * c.H, c.dh}};
    gradcheck("lmhead_ce", ins, 1, (gc_op){ce_loss, ce_bw, &c}, 1e-6);
    free(c.h), free(c.dh), free(c.E), free(c.scratch), free(c.targets);
}

/* ---------------------------------------------------------------- the op table */

static const struct {
    const char *family;
    void (*check)(void);
} checks[] = {
    {"linear", NULL}, /* filled by run_linear below */
    {"embedding", check_embedding},   {"rmsnorm1p", check_norms},       {"rmsnorm_gated", check_norms},
    {"l2norm", check_norms},          {"rope", check_rope},             {"conv1d_silu", check_conv},
    {"deltanet_gates", check_gates},  {"deltanet", check_deltanet},     {"attention", check_attention},
    {"swiglu", check_activations},    {"sigmoid_gate", check_activations}, {"lmhead_ce", check_lmhead_ce},
};
#define N_CHECKS (int)(sizeof checks / sizeof checks[0])

static void run_linear(void) {
    check_linear("linear", 0);
    check_linear("linear_lora_dropout", 0.3);
    check_linear_bf16();
}

#define FAMILY_NAME(x) #x,
static const char *const families[] = {DT_OP_FAMILIES(FAMILY_NAME)};
#define N_FAMILIES (int)(sizeof families / sizeof families[0])

static int has_check(const char *family) {
    for (int i = 0; i < N_CHECKS; i++)
        if (!strcmp(checks[i].family, family)) return 1;
    return 0;
}
static int is_family(const char *name) {
    for (int i = 0; i < N_FAMILIES; i++)
        if (!strcmp(families[i], name)) return 1;
    return 0;
}

/* Every X_forward declared in ops.h has a backward, is a family, and has a check. */
static void check_op_table(void) {
    const char *path = DT_SOURCE_DIR "/include/deltatune/ops.h";
    FILE *f = fopen(path, "rb");
    if (!f) {
        report("op_table", 0, "cannot read %s", path);
        return;
    }
    static char text[1 << 16];
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;
    regex_t re;
    regcomp(&re, "([a-z0-9_]+)_forward\\(", REG_EXTENDED);
    regmatch_t m[2];
    int n_forward = 0, bad = 0;
    char missing[512] = "";
    for (const char *p = text; regexec(&re, p, 2, m, 0) == 0; p += m[0].rm_eo) {
        char name[64], want1[96], want2[96];
        int l = (int)(m[1].rm_eo - m[1].rm_so);
        if (l >= (int)sizeof name) continue;
        memcpy(name, p + m[1].rm_so, l);
        name[l] = 0;
        if (l > 9 && !strcmp(name + l - 9, "_backward")) continue;  /* X_forward_backward itself */
        n_forward++;
        snprintf(want1, sizeof want1, "%s_backward(", name);
        snprintf(want2, sizeof want2, "%s_forward_backward(", name);
        const char *why = !strstr(text, want1) && !strstr(text, want2) ? "no backward"
                          : !is_family(name)                            ? "not in DT_OP_FAMILIES"
                          : !has_check(name)                            ? "no gradient check"
                                                                        : NULL;
        if (why) {
            bad = 1;
            snprintf(missing + strlen(missing), sizeof missing - strlen(missing), " %s (%s)", name, why);
        }
    }
    regfree(&re);
    report("op_table", !bad && n_forward >= N_FAMILIES, "%d forwards in ops.h, %d families%s%s", n_forward,
           N_FAMILIES, bad ? "; missing:" : "", missing);
}

int main(void) {
    check_op_table();
    for (int i = 0; i < N_FAMILIES; i++)
        if (!has_check(families[i])) report(families[i], 0, "family without a gradient check");
    void (*done[N_CHECKS])(void);
    int n_done = 0;
    run_linear();
    for (int i = 0; i < N_CHECKS; i++) {  /* some checks cover several families: run each once */
        int seen = !checks[i].check;
        for (int j = 0; j < n_done; j++) seen |= done[j] == checks[i].check;
        if (seen) continue;
        done[n_done++] = checks[i].check;
        checks[i].check();
    }
    printf("gradcheck: %d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
