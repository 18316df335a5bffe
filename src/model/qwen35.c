/* The Qwen3.5 decoder wired from the ops: embedding, 3:1 Gated DeltaNet / gated
 * attention layers with SwiGLU MLPs, final norm, LM head (qwen35.md §2).
 * A batch is packed: sequences back to back, each with its own positions, conv
 * history and recurrent state, so no compute is spent on padding. */
#include "deltatune/qwen35.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"

/* The activations of one decoder layer for N packed tokens. The two mixer kinds
 * share one region (a layer is one or the other). The same struct, zeroed, holds
 * the gradients of these activations in the backward. */
typedef struct {
    float *xn1, *h_mid, *xn2;                        /* [N, H] */
    float *gate, *up, *m;                            /* [N, I] */
    /* Gated DeltaNet */
    float *mixed, *conv, *qkv;                       /* [N, conv_dim]: projection, conv+SiLU, L2-normed */
    float *z, *o_raw, *o_norm;                       /* [N, value_dim] */
    float *b, *a, *beta, *g;                         /* [N, Hv] */
    /* gated attention */
    float *qg;                                       /* [N, 2 q_dim]: per head [query | gate] */
    float *q_pre, *q, *att, *gate_a, *att_g;         /* [N, q_dim] */
    float *k_pre, *k, *v;                            /* [N, kv_dim] */
    float *block;                                    /* owns all of the above */
} layer_acts;

/* Buffers for one call, grown on demand: the eval path uses one layer_acts; training
 * adds the residual stream at every layer boundary, per-layer activations (one when
 * checkpointing, else one per layer) and their gradients. */
struct qwen35_workspace {
    int64_t cap_tokens, cap_seq;
    int n_acts;                 /* layer_acts allocated in acts[] */
    layer_acts *acts, grads;
    float *h;                   /* eval: [N, H] residual stream */
    float *hs;                  /* training: [n_layers + 1, N, H] residual stream */
    float *dh, *dh2;            /* training: [N, H] residual gradients */
    float *scores;              /* [2 T, T] attention probabilities and their gradient */
    float *ce;                  /* loss scratch, ce_cap floats */
    int64_t ce_cap;
    int32_t *pos, *targets;     /* [N] */
};

typedef struct {
    int64_t key_dim, value_dim, conv_dim, q_dim, kv_dim;
} layer_dims;

static layer_dims dims_of(const qwen35_config *c) {
    layer_dims d;
    d.key_dim = (int64_t)c->lin_n_k_heads * c->lin_k_head_dim;
    d.value_dim = (int64_t)c->lin_n_v_heads * c->lin_v_head_dim;
    d.conv_dim = 2 * d.key_dim + d.value_dim;
    d.q_dim = (int64_t)c->n_heads * c->head_dim;
    d.kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    return d;
}

/* Floats per token of a layer_acts: the common part and the larger mixer. */
static int64_t acts_floats_per_token(const qwen35_config *c) {
    layer_dims d = dims_of(c);
    int64_t common = 3 * (int64_t)c->hidden_size + 3 * (int64_t)c->intermediate_size;
    int64_t gdn = 3 * d.conv_dim + 3 * d.value_dim + 4 * (int64_t)c->lin_n_v_heads;
    int64_t att = 2 * d.q_dim + 5 * d.q_dim + 3 * d.kv_dim;
    return common + (gdn > att ? gdn : att);
}

static int acts_alloc(layer_acts *a, const qwen35_config *c, int64_t N) {
    layer_dims d = dims_of(c);
    int64_t H = c->hidden_size, I = c->intermediate_size, Hv = c->lin_n_v_heads;
    memset(a, 0, sizeof *a);
    float *p = a->block = malloc(sizeof(float) * N * acts_floats_per_token(c));
    if (!p) return dt_err("out of memory for the activations of %lld tokens", (long long)N);
    a->xn1 = p, p += N * H;
    a->h_mid = p, p += N * H;
    a->xn2 = p, p += N * H;
    a->gate = p, p += N * I;
    a->up = p, p += N * I;
    a->m = p, p += N * I;
    float *mixer = p;
    a->mixed = p, p += N * d.conv_dim;
    a->conv = p, p += N * d.conv_dim;
    a->qkv = p, p += N * d.conv_dim;
    a->z = p, p += N * d.value_dim;
    a->o_raw = p, p += N * d.value_dim;
    a->o_norm = p, p += N * d.value_dim;
    a->b = p, p += N * Hv;
    a->a = p, p += N * Hv;
    a->beta = p, p += N * Hv;
    a->g = p;
    p = mixer;
    a->qg = p, p += N * 2 * d.q_dim;
    a->q_pre = p, p += N * d.q_dim;
    a->q = p, p += N * d.q_dim;
    a->att = p, p += N * d.q_dim;
    a->gate_a = p, p += N * d.q_dim;
    a->att_g = p, p += N * d.q_dim;
    a->k_pre = p, p += N * d.kv_dim;
    a->k = p, p += N * d.kv_dim;
    a->v = p;
    return 0;
}

static void ws_free(qwen35_workspace *ws) {
    if (!ws) return;
    for (int i = 0; i < ws->n_acts; i++) free(ws->acts[i].block);
    free(ws->acts);
    free(ws->grads.block);
    free(ws->h);
    free(ws->hs);
    free(ws->dh);
    free(ws->dh2);
    free(ws->scores);
    free(ws->ce);
    free(ws->pos);
    free(ws);
}

static int64_t ce_chunk_of(const qwen35_model *m, int64_t N) {
    return m->ce_chunk > 0 && m->ce_chunk < N ? m->ce_chunk : N;
}

/* Sizes the workspace for N tokens, a longest sequence T, and the mode: n_acts layer
 * activations (1 for eval and checkpointed training), and training buffers or not. */
static int ws_reserve(qwen35_model *m, int64_t N, int64_t T, int n_acts, bool training) {
    qwen35_workspace *ws = m->ws;
    int64_t ce_need = training ? ce_chunk_of(m, N) * m->cfg.vocab_size : 0;  /* m->ce_chunk may have changed */
    if (ws && ws->cap_tokens >= N && ws->cap_seq >= T && ws->n_acts >= n_acts && (!training || ws->hs) &&
        ws->ce_cap >= ce_need)
        return 0;
    if (ws) {
        N = N > ws->cap_tokens ? N : ws->cap_tokens;
        T = T > ws->cap_seq ? T : ws->cap_seq;
        n_acts = n_acts > ws->n_acts ? n_acts : ws->n_acts;
        training = training || ws->hs;
    }
    ws_free(ws);
    m->ws = ws = calloc(1, sizeof *ws);
    if (!ws) return dt_err("out of memory");
    const qwen35_config *c = &m->cfg;
    int64_t H = c->hidden_size, V = c->vocab_size;
    int64_t ce = training ? ce_chunk_of(m, N) * V : 0;
    ce = N * LMHEAD_VOCAB_BLOCK > ce ? N * LMHEAD_VOCAB_BLOCK : ce;
    ws->ce_cap = ce;
    ws->cap_tokens = N;
    ws->cap_seq = T;
    ws->acts = calloc(n_acts, sizeof *ws->acts);
    ws->scores = malloc(sizeof(float) * 2 * T * T);
    ws->ce = malloc(sizeof(float) * ce);
    ws->pos = malloc(sizeof(int32_t) * 2 * N);
    ws->h = malloc(sizeof(float) * N * H);
    int ok = ws->acts && ws->scores && ws->ce && ws->pos && ws->h;
    for (int i = 0; ok && i < n_acts; i++, ws->n_acts++) ok = acts_alloc(&ws->acts[i], c, N) == 0;
    if (ok && training) {
        ws->hs = malloc(sizeof(float) * (c->n_layers + 1) * N * H);
        ws->dh = malloc(sizeof(float) * N * H);
        ws->dh2 = malloc(sizeof(float) * N * H);
        ok = ws->hs && ws->dh && ws->dh2 && acts_alloc(&ws->grads, c, N) == 0;
    }
    if (!ok) {
        ws_free(ws);
        m->ws = NULL;
        return dt_err("out of memory for the activations of %lld tokens", (long long)N);
    }
    ws->targets = ws->pos + N;
    return 0;
}

/* ---------------------------------------------------------------- binding */

static int copy_vector(float **dst, float **cursor, const dt_weight *w) {
    int64_t n = w->rows * w->cols;
    *dst = *cursor;
    *cursor += n;
    return dt_to_f32(*dst, w->data, w->dtype, (size_t)n);
}

int qwen35_model_init(qwen35_model *m, const qwen35_config *cfg, const qwen35_tensor_spec *specs,
                      const dt_weight *weights, int n) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    int64_t small = 0;
    for (int i = 0; i < n; i++) {
        qwen35_wkind k = specs[i].kind;
        if (k == W_FINAL_NORM || k == W_INPUT_NORM || k == W_POST_NORM || k == W_LIN_CONV ||
            k == W_LIN_DT_BIAS || k == W_LIN_A_LOG || k == W_LIN_NORM || k == W_ATT_QNORM ||
            k == W_ATT_KNORM)
            small += weights[i].rows * weights[i].cols;
    }
    m->layers = calloc(cfg->n_layers, sizeof *m->layers);
    m->small = malloc(sizeof(float) * (small > 0 ? small : 1));
    if (!m->layers || !m->small) {
        qwen35_model_free(m);
        return dt_err("out of memory binding the model");
    }
    float *cur = m->small;
    int rc = 0;
    bool have_lm_head = false;
    for (int i = 0; i < n && rc == 0; i++) {
        const dt_weight *w = &weights[i];
        qwen35_layer *L = specs[i].layer >= 0 ? &m->layers[specs[i].layer] : NULL;
        switch (specs[i].kind) {
        case W_EMBED: m->embed = *w; break;
        case W_LM_HEAD: m->lm_head = *w; have_lm_head = true; break;
        case W_FINAL_NORM: rc = copy_vector(&m->final_norm, &cur, w); break;
        case W_INPUT_NORM: rc = copy_vector(&L->input_norm, &cur, w); break;
        case W_POST_NORM: rc = copy_vector(&L->post_norm, &cur, w); break;
        case W_MLP_GATE: L->mlp_gate.w = *w; break;
        case W_MLP_UP: L->mlp_up.w = *w; break;
        case W_MLP_DOWN: L->mlp_down.w = *w; break;
        case W_LIN_QKV: L->lin_qkv.w = *w; break;
        case W_LIN_Z: L->lin_z.w = *w; break;
        case W_LIN_B: L->lin_b.w = *w; break;
        case W_LIN_A: L->lin_a.w = *w; break;
        case W_LIN_CONV: rc = copy_vector(&L->conv, &cur, w); break;
        case W_LIN_DT_BIAS: rc = copy_vector(&L->dt_bias, &cur, w); break;
        case W_LIN_A_LOG: rc = copy_vector(&L->a_log, &cur, w); break;
        case W_LIN_NORM: rc = copy_vector(&L->lin_norm, &cur, w); break;
        case W_LIN_OUT: L->lin_out.w = *w; break;
        case W_ATT_Q: L->att_q.w = *w; break;
        case W_ATT_K: L->att_k.w = *w; break;
        case W_ATT_V: L->att_v.w = *w; break;
        case W_ATT_O: L->att_o.w = *w; break;
        case W_ATT_QNORM: rc = copy_vector(&L->q_norm, &cur, w); break;
        case W_ATT_KNORM: rc = copy_vector(&L->k_norm, &cur, w); break;
        default: break;
        }
    }
    if (rc == 0 && !m->embed.data) rc = dt_err("model has no embed_tokens weight");
    if (rc) {
        qwen35_model_free(m);
        return -1;
    }
    if (!have_lm_head) m->lm_head = m->embed;
    m->ce_chunk = LMHEAD_TOKEN_CHUNK;
    return 0;
}

void qwen35_model_free(qwen35_model *m) {
    free(m->layers);
    free(m->small);
    ws_free(m->ws);
    memset(m, 0, sizeof *m);
}

static dt_linear *linear_of(qwen35_layer *L, qwen35_wkind kind) {
    switch (kind) {
    case W_MLP_GATE: return &L->mlp_gate;
    case W_MLP_UP: return &L->mlp_up;
    case W_MLP_DOWN: return &L->mlp_down;
    case W_LIN_QKV: return &L->lin_qkv;
    case W_LIN_Z: return &L->lin_z;
    case W_LIN_B: return &L->lin_b;
    case W_LIN_A: return &L->lin_a;
    case W_LIN_OUT: return &L->lin_out;
    case W_ATT_Q: return &L->att_q;
    case W_ATT_K: return &L->att_k;
    case W_ATT_V: return &L->att_v;
    case W_ATT_O: return &L->att_o;
    default: return NULL;
    }
}

int qwen35_model_set_lora(qwen35_model *m, qwen35_wkind kind, int layer, const dt_lora *lora) {
    if (layer < 0 || layer >= m->cfg.n_layers) return dt_err("LoRA for layer %d: model has %d layers", layer, m->cfg.n_layers);
    dt_linear *l = linear_of(&m->layers[layer], kind);
    if (!l || !l->w.data) return dt_err("layer %d has no linear of that kind for a LoRA", layer);
    if (lora && (lora->in != l->w.cols || lora->out != l->w.rows))
        return dt_err("LoRA on layer %d is [%lld -> %lld], the linear is [%lld -> %lld]", layer,
                      (long long)lora->in, (long long)lora->out, (long long)l->w.cols, (long long)l->w.rows);
    l->lora = lora;
    return 0;
}

/* ---------------------------------------------------------------- forward */

#define FOR_SEQS(b, s, off) for (int64_t s = 0, off = 0; s < (b)->n_seqs; off += (b)->seq_lens[s++])

static void add_inplace(float *h, const float *x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t i = 0; i < n; i++) h[i] += x[i];
}

/* out = the Gated DeltaNet mixer of a->xn1 (qwen35.md §2.2). */
/* The conv over this call's tokens continuing the held history, which it then advances. */
static void conv_with_history(const qwen35_config *c, const qwen35_layer *L, float *hist, const float *mixed,
                              float *conv, int64_t N, int64_t cd) {
    int K = c->conv_kernel;
    float *x = malloc(sizeof(float) * (K - 1 + N) * cd), *y = malloc(sizeof(float) * (K - 1 + N) * cd);
    memcpy(x, hist, sizeof(float) * (K - 1) * cd);
    memcpy(x + (K - 1) * cd, mixed, sizeof(float) * N * cd);
    conv1d_silu_forward(y, x, L->conv, K - 1 + N, (int)cd, K);
    memcpy(conv, y + (K - 1) * cd, sizeof(float) * N * cd);
    memcpy(hist, x + N * cd, sizeof(float) * (K - 1) * cd);
    free(x);
    free(y);
}

static void deltanet_mixer_forward(const qwen35_config *c, const qwen35_layer *L, const qwen35_batch *b,
                                   layer_acts *a, float *out, float *conv_hist, float *dn_state) {
    layer_dims d = dims_of(c);
    int64_t N = b->n_tokens, cd = d.conv_dim;
    int Hv = c->lin_n_v_heads, dk = c->lin_k_head_dim;
    linear_forward(a->mixed, a->xn1, &L->lin_qkv, N);
    linear_forward(a->z, a->xn1, &L->lin_z, N);
    linear_forward(a->b, a->xn1, &L->lin_b, N);
    linear_forward(a->a, a->xn1, &L->lin_a, N);
    if (conv_hist) conv_with_history(c, L, conv_hist, a->mixed, a->conv, N, cd);
    else FOR_SEQS(b, s, off)
        conv1d_silu_forward(a->conv + off * cd, a->mixed + off * cd, L->conv, b->seq_lens[s], (int)cd, c->conv_kernel);
    memcpy(a->qkv, a->conv, sizeof(float) * N * cd);
    l2norm_forward(a->qkv, N, c->lin_n_k_heads, dk, cd, 1e-6f, 1.0f / sqrtf((float)dk));
    l2norm_forward(a->qkv + d.key_dim, N, c->lin_n_k_heads, dk, cd, 1e-6f, 1.0f);
    deltanet_gates_forward(a->beta, a->g, a->b, a->a, L->a_log, L->dt_bias, N, Hv);
    deltanet_dims dd = {c->lin_n_k_heads, Hv, dk, c->lin_v_head_dim};
    FOR_SEQS(b, s, off) {
        const float *q = a->qkv + off * cd;
        deltanet_forward(a->o_raw + off * d.value_dim, q, q + d.key_dim, cd, q + 2 * d.key_dim, cd, a->beta + off * Hv,
                         a->g + off * Hv, b->seq_lens[s], dd, dn_state);
    }
    rmsnorm_gated_forward(a->o_norm, a->o_raw, a->z, L->lin_norm, N * Hv, c->lin_v_head_dim, (float)c->rms_eps);
    linear_forward(out, a->o_norm, &L->lin_out, N);
}

/* q_proj gives per head [query | gate]; split and join them. */
static void split_query_gate(float *q, float *gate, const float *qg, int64_t N, int nh, int hd) {
    for (int64_t t = 0; t < N; t++)
        for (int h = 0; h < nh; h++) {
            const float *src = qg + (t * nh + h) * 2 * (int64_t)hd;
            memcpy(q + (t * nh + h) * (int64_t)hd, src, sizeof(float) * hd);
            memcpy(gate + (t * nh + h) * (int64_t)hd, src + hd, sizeof(float) * hd);
        }
}

static void join_query_gate(float *qg, const float *q, const float *gate, int64_t N, int nh, int hd) {
    for (int64_t t = 0; t < N; t++)
        for (int h = 0; h < nh; h++) {
            float *dst = qg + (t * nh + h) * 2 * (int64_t)hd;
            memcpy(dst, q + (t * nh + h) * (int64_t)hd, sizeof(float) * hd);
            memcpy(dst + hd, gate + (t * nh + h) * (int64_t)hd, sizeof(float) * hd);
        }
}

/* out = the gated attention mixer of a->xn1 (qwen35.md §2.3). */
static void attention_mixer_forward(const qwen35_config *c, const qwen35_layer *L, const qwen35_batch *b,
                                    const int32_t *pos, float *scores, layer_acts *a, float *out, qwen35_state *st,
                                    int l) {
    layer_dims d = dims_of(c);
    int64_t N = b->n_tokens;
    int hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    linear_forward(a->qg, a->xn1, &L->att_q, N);
    split_query_gate(a->q_pre, a->gate_a, a->qg, N, nh, hd);
    linear_forward(a->k_pre, a->xn1, &L->att_k, N);
    linear_forward(a->v, a->xn1, &L->att_v, N);
    rmsnorm1p_forward(a->q, a->q_pre, L->q_norm, N * nh, hd, (float)c->rms_eps);
    rmsnorm1p_forward(a->k, a->k_pre, L->k_norm, N * nkv, hd, (float)c->rms_eps);
    rope_forward(a->q, pos, N, nh, hd, c->rotary_dim, c->rope_theta);
    rope_forward(a->k, pos, N, nkv, hd, c->rotary_dim, c->rope_theta);
    if (st) {  /* one sequence: append to the cache and attend over all of it */
        memcpy(st->k_cache[l] + st->n_past * d.kv_dim, a->k, sizeof(float) * N * d.kv_dim);
        memcpy(st->v_cache[l] + st->n_past * d.kv_dim, a->v, sizeof(float) * N * d.kv_dim);
        attention_forward(a->att, a->q, st->k_cache[l], st->v_cache[l], N, st->n_past + N, nh, nkv, hd,
                          1.0f / sqrtf((float)hd), st->scores);
    } else {
        FOR_SEQS(b, s, off)
        attention_forward(a->att + off * d.q_dim, a->q + off * d.q_dim, a->k + off * d.kv_dim, a->v + off * d.kv_dim,
                          b->seq_lens[s], b->seq_lens[s], nh, nkv, hd, 1.0f / sqrtf((float)hd), scores);
    }
    memcpy(a->att_g, a->att, sizeof(float) * N * d.q_dim);
    sigmoid_gate_forward(a->att_g, a->gate_a, N * d.q_dim);
    linear_forward(out, a->att_g, &L->att_o, N);
}

/* h_out = the decoder layer of h_in (h_out may be h_in); every intermediate lands in a.
 * With a decoding state st (one sequence), the layer continues from and updates its cache. */
static void layer_forward(qwen35_model *m, int l, const qwen35_batch *b, const float *h_in, float *h_out,
                          layer_acts *a, qwen35_state *st) {
    const qwen35_config *c = &m->cfg;
    const qwen35_layer *L = &m->layers[l];
    int64_t N = b->n_tokens, H = c->hidden_size, I = c->intermediate_size;
    float eps = (float)c->rms_eps;
    rmsnorm1p_forward(a->xn1, h_in, L->input_norm, N, (int)H, eps);
    if (c->layer_is_full[l]) attention_mixer_forward(c, L, b, m->ws->pos, m->ws->scores, a, a->h_mid, st, l);
    else deltanet_mixer_forward(c, L, b, a, a->h_mid, st ? st->conv_hist[l] : NULL, st ? st->dn_state[l] : NULL);
    add_inplace(a->h_mid, h_in, N * H);
    rmsnorm1p_forward(a->xn2, a->h_mid, L->post_norm, N, (int)H, eps);
    linear_forward(a->gate, a->xn2, &L->mlp_gate, N);
    linear_forward(a->up, a->xn2, &L->mlp_up, N);
    swiglu_forward(a->m, a->gate, a->up, N * I);
    linear_forward(h_out, a->m, &L->mlp_down, N);
    add_inplace(h_out, a->h_mid, N * H);
}

/* ---------------------------------------------------------------- backward */

/* Adds to g->xn1 the gradient of the Gated DeltaNet mixer, given dout. */
static void deltanet_mixer_backward(const qwen35_config *c, const qwen35_layer *L, const qwen35_batch *b,
                                    const layer_acts *a, layer_acts *g, const float *dout) {
    layer_dims d = dims_of(c);
    int64_t N = b->n_tokens, cd = d.conv_dim, kd = d.key_dim;
    int Hv = c->lin_n_v_heads, dk = c->lin_k_head_dim;
    linear_backward(g->o_norm, dout, a->o_norm, &L->lin_out, N);
    rmsnorm_gated_backward(g->o_raw, g->z, NULL, g->o_norm, a->o_raw, a->z, L->lin_norm, N * Hv, c->lin_v_head_dim,
                           (float)c->rms_eps);
    deltanet_dims dd = {c->lin_n_k_heads, Hv, dk, c->lin_v_head_dim};
    FOR_SEQS(b, s, off) {
        const float *q = a->qkv + off * cd;
        float *dq = g->qkv + off * cd;
        deltanet_backward(dq, dq + kd, dq + 2 * kd, g->beta + off * Hv, g->g + off * Hv, g->o_raw + off * d.value_dim,
                          q, q + kd, cd, q + 2 * kd, cd, a->beta + off * Hv, a->g + off * Hv, b->seq_lens[s], dd);
    }
    deltanet_gates_backward(g->b, g->a, NULL, NULL, g->beta, g->g, a->b, a->a, L->a_log, L->dt_bias, N, Hv);
    /* q and k went through the L2 norm; v went straight from the conv */
    l2norm_backward(g->conv, g->qkv, a->conv, N, c->lin_n_k_heads, dk, cd, 1e-6f, 1.0f / sqrtf((float)dk));
    l2norm_backward(g->conv + kd, g->qkv + kd, a->conv + kd, N, c->lin_n_k_heads, dk, cd, 1e-6f, 1.0f);
    for (int64_t t = 0; t < N; t++) add_inplace(g->conv + t * cd + 2 * kd, g->qkv + t * cd + 2 * kd, d.value_dim);
    FOR_SEQS(b, s, off)
    conv1d_silu_backward(g->mixed + off * cd, NULL, g->conv + off * cd, a->mixed + off * cd, L->conv, b->seq_lens[s],
                         (int)cd, c->conv_kernel);
    linear_backward(g->xn1, g->mixed, a->xn1, &L->lin_qkv, N);
    linear_backward(g->xn1, g->z, a->xn1, &L->lin_z, N);
    linear_backward(g->xn1, g->b, a->xn1, &L->lin_b, N);
    linear_backward(g->xn1, g->a, a->xn1, &L->lin_a, N);
}

/* Adds to g->xn1 the gradient of the gated attention mixer, given dout. */
static void attention_mixer_backward(const qwen35_config *c, const qwen35_layer *L, const qwen35_batch *b,
                                     const int32_t *pos, float *scores, const layer_acts *a, layer_acts *g,
                                     const float *dout) {
    layer_dims d = dims_of(c);
    int64_t N = b->n_tokens;
    int hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    float eps = (float)c->rms_eps;
    linear_backward(g->att_g, dout, a->att_g, &L->att_o, N);
    sigmoid_gate_backward(g->att, g->gate_a, g->att_g, a->att, a->gate_a, N * d.q_dim);
    FOR_SEQS(b, s, off)
    attention_backward(g->q + off * d.q_dim, g->k + off * d.kv_dim, g->v + off * d.kv_dim, g->att + off * d.q_dim,
                       a->q + off * d.q_dim, a->k + off * d.kv_dim, a->v + off * d.kv_dim, b->seq_lens[s], nh, nkv, hd,
                       1.0f / sqrtf((float)hd), scores);
    rope_backward(g->q, pos, N, nh, hd, c->rotary_dim, c->rope_theta);
    rope_backward(g->k, pos, N, nkv, hd, c->rotary_dim, c->rope_theta);
    rmsnorm1p_backward(g->q_pre, NULL, g->q, a->q_pre, L->q_norm, N * nh, hd, eps);
    rmsnorm1p_backward(g->k_pre, NULL, g->k, a->k_pre, L->k_norm, N * nkv, hd, eps);
    join_query_gate(g->qg, g->q_pre, g->gate_a, N, nh, hd);
    linear_backward(g->xn1, g->qg, a->xn1, &L->att_q, N);
    linear_backward(g->xn1, g->k_pre, a->xn1, &L->att_k, N);
    linear_backward(g->xn1, g->v, a->xn1, &L->att_v, N);
}

/* dh_in = d loss / d h_in given dh_out, from the layer's saved activations a; LoRA
 * gradients accumulate in the linears' dA/dB. g is scratch of the same shape as a. */
static void layer_backward(qwen35_model *m, int l, const qwen35_batch *b, const float *h_in, const layer_acts *a,
                           layer_acts *g, const float *dh_out, float *dh_in) {
    const qwen35_config *c = &m->cfg;
    const qwen35_layer *L = &m->layers[l];
    int64_t N = b->n_tokens, H = c->hidden_size, I = c->intermediate_size;
    float eps = (float)c->rms_eps;
    /* the fields are laid out for the workspace's capacity, not this batch: clear it all */
    memset(g->block, 0, sizeof(float) * m->ws->cap_tokens * acts_floats_per_token(c));
    linear_backward(g->m, dh_out, a->m, &L->mlp_down, N);
    swiglu_backward(g->gate, g->up, g->m, a->gate, a->up, N * I);
    linear_backward(g->xn2, g->gate, a->xn2, &L->mlp_gate, N);
    linear_backward(g->xn2, g->up, a->xn2, &L->mlp_up, N);
    memcpy(g->h_mid, dh_out, sizeof(float) * N * H);
    rmsnorm1p_backward(g->h_mid, NULL, g->xn2, a->h_mid, L->post_norm, N, (int)H, eps);
    if (c->layer_is_full[l]) attention_mixer_backward(c, L, b, m->ws->pos, m->ws->scores, a, g, g->h_mid);
    else deltanet_mixer_backward(c, L, b, a, g, g->h_mid);
    memcpy(dh_in, g->h_mid, sizeof(float) * N * H);
    rmsnorm1p_backward(dh_in, NULL, g->xn1, h_in, L->input_norm, N, (int)H, eps);
}

/* ---------------------------------------------------------------- batches */

int qwen35_batch_check(const qwen35_batch *b, int vocab_size, int64_t *longest) {
    int64_t total = 0;
    *longest = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        if (b->seq_lens[s] <= 0) return dt_err("sequence %d of the batch is empty", s);
        total += b->seq_lens[s];
        *longest = b->seq_lens[s] > *longest ? b->seq_lens[s] : *longest;
    }
    if (total != b->n_tokens || total == 0)
        return dt_err("batch lengths add to %lld, not %d tokens", (long long)total, b->n_tokens);
    const int32_t *labels = b->labels ? b->labels : b->ids;
    for (int64_t t = 0; t < total; t++) {
        if (b->ids[t] < 0 || b->ids[t] >= vocab_size)
            return dt_err("token id %d at position %lld is outside the vocabulary [0, %d)", b->ids[t], (long long)t,
                          vocab_size);
        if (labels[t] >= vocab_size)
            return dt_err("label %d at position %lld is outside the vocabulary [0, %d)", labels[t], (long long)t,
                          vocab_size);
    }
    return 0;
}

/* Checks the batch and fills positions (from 0 in every sequence) and targets (the
 * next position's label within the same sequence, -1 when ignored). */
static int prepare_batch(qwen35_model *m, const qwen35_batch *b, int n_acts, bool training) {
    int64_t total = b->n_tokens, longest = 0;
    if (qwen35_batch_check(b, m->cfg.vocab_size, &longest)) return -1;
    const int32_t *labels = b->labels ? b->labels : b->ids;
    if (ws_reserve(m, total, longest, n_acts, training)) return -1;
    qwen35_workspace *ws = m->ws;
    FOR_SEQS(b, s, off)
    for (int t = 0; t < b->seq_lens[s]; t++) {
        ws->pos[off + t] = t;
        int32_t y = t + 1 < b->seq_lens[s] ? labels[off + t + 1] : -1;
        ws->targets[off + t] = y < 0 ? -1 : y;
    }
    return 0;
}

/* Runs the decoder over a prepared batch (eval); returns the final-normed hidden states. */
static float *decoder_forward(qwen35_model *m, const qwen35_batch *b) {
    const qwen35_config *c = &m->cfg;
    qwen35_workspace *ws = m->ws;
    int64_t N = b->n_tokens, H = c->hidden_size;
    layer_acts *a = &ws->acts[0];
    float *hf = a->xn2;  /* free once the last layer is done */
    embedding_forward(ws->h, b->ids, N, &m->embed);
    for (int l = 0; l < c->n_layers; l++) layer_forward(m, l, b, ws->h, ws->h, a, NULL);
    rmsnorm1p_forward(hf, ws->h, m->final_norm, N, (int)H, (float)c->rms_eps);
    return hf;
}

int qwen35_eval_loss(qwen35_model *m, const qwen35_batch *b, double *loss_sum, int64_t *n_targets) {
    *loss_sum = 0;
    *n_targets = 0;
    if (prepare_batch(m, b, 1, false)) return -1;
    float *hf = decoder_forward(m, b);
    lmhead_ce_forward(loss_sum, n_targets, hf, m->ws->targets, b->n_tokens, &m->lm_head, m->ws->ce);
    return 0;
}

int qwen35_forward_logits(qwen35_model *m, const qwen35_batch *b, float *logits) {
    if (prepare_batch(m, b, 1, false)) return -1;
    float *hf = decoder_forward(m, b);
    dt_linear head = {m->lm_head, NULL};
    linear_forward(logits, hf, &head, b->n_tokens);
    return 0;
}

int qwen35_forward_backward(qwen35_model *m, const qwen35_batch *b, double grad_scale, bool grad_checkpoint,
                            double *loss_sum, int64_t *n_targets) {
    *loss_sum = 0;
    *n_targets = 0;
    const qwen35_config *c = &m->cfg;
    int n_layers = c->n_layers;
    if (prepare_batch(m, b, grad_checkpoint ? 1 : n_layers, true)) return -1;
    qwen35_workspace *ws = m->ws;
    int64_t N = b->n_tokens, H = c->hidden_size, NH = N * H;
    float eps = (float)c->rms_eps;
    /* forward, keeping the residual stream at every layer boundary */
    embedding_forward(ws->hs, b->ids, N, &m->embed);
    for (int l = 0; l < n_layers; l++)
        layer_forward(m, l, b, ws->hs + l * NH, ws->hs + (l + 1) * NH, &ws->acts[grad_checkpoint ? 0 : l], NULL);
    float *hf = ws->grads.xn1;  /* the gradient block is free until the first layer's backward */
    rmsnorm1p_forward(hf, ws->hs + n_layers * NH, m->final_norm, N, (int)H, eps);
    memset(ws->dh2, 0, sizeof(float) * NH);
    lmhead_ce_forward_backward(loss_sum, n_targets, ws->dh2, hf, ws->targets, N, &m->lm_head, (float)grad_scale,
                               ce_chunk_of(m, N), ws->ce);
    memset(ws->dh, 0, sizeof(float) * NH);
    rmsnorm1p_backward(ws->dh, NULL, ws->dh2, ws->hs + n_layers * NH, m->final_norm, N, (int)H, eps);
    /* backward, layer by layer; with checkpointing each layer is first recomputed from its input
     * (the recompute rewrites hs[l + 1] with the same values, no longer needed) */
    for (int l = n_layers - 1; l >= 0; l--) {
        layer_acts *a = &ws->acts[grad_checkpoint ? 0 : l];
        if (grad_checkpoint) layer_forward(m, l, b, ws->hs + l * NH, ws->hs + (l + 1) * NH, a, NULL);
        layer_backward(m, l, b, ws->hs + l * NH, a, &ws->grads, ws->dh, ws->dh2);
        float *t = ws->dh;
        ws->dh = ws->dh2;
        ws->dh2 = t;
    }
    return 0;
}

/* ---------------------------------------------------------------- incremental decoding */

int qwen35_state_init(qwen35_state *s, const qwen35_config *c, int64_t max_len) {
    memset(s, 0, sizeof *s);
    layer_dims d = dims_of(c);
    int64_t per_att = 2 * max_len * d.kv_dim, per_dn = (c->conv_kernel - 1) * d.conv_dim +
                                                      (int64_t)c->lin_n_v_heads * c->lin_k_head_dim * c->lin_v_head_dim;
    int64_t total = 0;
    for (int l = 0; l < c->n_layers; l++) total += c->layer_is_full[l] ? per_att : per_dn;
    s->max_len = max_len;
    size_t L = (size_t)(c->n_layers > 0 ? c->n_layers : 1);
    s->k_cache = calloc(L, sizeof(float *));
    s->v_cache = calloc(L, sizeof(float *));
    s->conv_hist = calloc(L, sizeof(float *));
    s->dn_state = calloc(L, sizeof(float *));
    s->block = calloc(total > 0 ? total : 1, sizeof(float));
    if (!s->k_cache || !s->v_cache || !s->conv_hist || !s->dn_state || !s->block) {
        qwen35_state_free(s);
        return dt_err("out of memory for a decoding cache of %lld tokens (%.1f MiB)", (long long)max_len,
                      total * 4.0 / (1 << 20));
    }
    float *p = s->block;
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_is_full[l]) {
            s->k_cache[l] = p, p += max_len * d.kv_dim;
            s->v_cache[l] = p, p += max_len * d.kv_dim;
        } else {
            s->conv_hist[l] = p, p += (c->conv_kernel - 1) * d.conv_dim;
            s->dn_state[l] = p, p += (int64_t)c->lin_n_v_heads * c->lin_k_head_dim * c->lin_v_head_dim;
        }
    }
    s->block_floats = total;
    return 0;
}

void qwen35_state_reset(qwen35_state *s) {
    memset(s->block, 0, sizeof(float) * (s->block_floats > 0 ? s->block_floats : 1));
    s->n_past = 0;
}

void qwen35_state_free(qwen35_state *s) {
    free(s->k_cache);
    free(s->v_cache);
    free(s->conv_hist);
    free(s->dn_state);
    free(s->scores);
    free(s->block);
    memset(s, 0, sizeof *s);
}

int qwen35_forward_cached(qwen35_model *m, qwen35_state *s, const int32_t *ids, int n, float *logits, bool last_only) {
    if (n <= 0) return dt_err("no tokens to run");
    if (s->n_past + n > s->max_len)
        return dt_err("%lld tokens exceed the decoding cache of %lld", (long long)(s->n_past + n), (long long)s->max_len);
    qwen35_batch b = {ids, NULL, &n, 1, n};
    if (prepare_batch(m, &b, 1, false)) return -1;
    int64_t need = (int64_t)n * (s->n_past + n);
    if (need > s->scores_cap) {
        float *p = realloc(s->scores, sizeof(float) * need);
        if (!p) return dt_err("out of memory for attention scores");
        s->scores = p;
        s->scores_cap = need;
    }
    const qwen35_config *c = &m->cfg;
    qwen35_workspace *ws = m->ws;
    int64_t H = c->hidden_size;
    for (int t = 0; t < n; t++) ws->pos[t] = (int32_t)(s->n_past + t);
    layer_acts *a = &ws->acts[0];
    embedding_forward(ws->h, ids, n, &m->embed);
    for (int l = 0; l < c->n_layers; l++) layer_forward(m, l, &b, ws->h, ws->h, a, s);
    s->n_past += n;
    const float *h = last_only ? ws->h + (int64_t)(n - 1) * H : ws->h;
    int64_t rows = last_only ? 1 : n;
    rmsnorm1p_forward(a->xn2, h, m->final_norm, rows, (int)H, (float)c->rms_eps);
    dt_linear head = {m->lm_head, NULL};
    linear_forward(logits, a->xn2, &head, rows);
    return 0;
}

/* ---------------------------------------------------------------- memory plan */

void qwen35_memory_estimate(const qwen35_config *c, int64_t weight_bytes, int batch, int seq_len, int lora_rank,
                            int grad_checkpoint, qwen35_memory *out) {
    memset(out, 0, sizeof *out);
    int64_t N = (int64_t)batch * seq_len, H = c->hidden_size, T = seq_len;
    int64_t acts = 4 * N * acts_floats_per_token(c);
    int64_t scratch = 4 * (2 * T * T + 2 * N);
    out->weights = weight_bytes;
    out->activations = acts + scratch + 4 * N * (H + LMHEAD_VOCAB_BLOCK);
    /* LoRA on the ten default targets: r * (in + out) per linear */
    layer_dims d = dims_of(c);
    int64_t lora = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_is_full[l]) lora += (H + 2 * d.q_dim) + 2 * (H + d.kv_dim) + (d.q_dim + H);
        else lora += (H + d.conv_dim) + (H + d.value_dim) + (d.value_dim + H);
        lora += 2 * (H + c->intermediate_size) + (c->intermediate_size + H);
    }
    out->lora_params = 4 * lora * lora_rank;
    out->optimizer = 3 * out->lora_params;  /* gradient + two AdamW moments */
    /* the residual stream at every layer boundary, the layer activations (one when
     * checkpointing) and their gradients, two residual gradients, the loss chunk */
    int64_t ce = 4 * (int64_t)LMHEAD_TOKEN_CHUNK * c->vocab_size;
    int64_t ce_eval = 4 * N * LMHEAD_VOCAB_BLOCK;
    out->train_activations = 4 * N * H * (c->n_layers + 1) + acts * (grad_checkpoint ? 2 : c->n_layers + 1) +
                             2 * 4 * N * H + (ce > ce_eval ? ce : ce_eval) + scratch;
    out->total_train = out->weights + out->lora_params + out->optimizer + out->train_activations;
}
