/* The Qwen3.5 decoder wired from the ops: embedding, 3:1 Gated DeltaNet / gated
 * attention layers with SwiGLU MLPs, final norm, LM head (qwen35.md §2).
 * A batch is packed: sequences back to back, each with its own positions, conv
 * history and recurrent state, so no compute is spent on padding. */
#include "deltatune/qwen35.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"

/* Activation buffers sized for a number of tokens and a longest sequence. */
struct qwen35_workspace {
    int64_t cap_tokens, cap_seq;
    float *h, *x;            /* [N, H] residual stream and normed input */
    float *proj, *mix;       /* [N, wide]: projections in, mixed activations */
    float *z, *o;            /* [N, narrow]: GDN gate and output / attention gate and output */
    float *b, *a, *beta, *g; /* [N, Hv] */
    float *up;               /* [N, I] */
    float *scores;           /* [T, T] attention scores of one head */
    float *ce;               /* [N, LMHEAD_VOCAB_BLOCK] */
    int32_t *pos, *targets;  /* [N] */
};

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

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

/* Floats per token in each buffer, so the estimate and the allocation agree. */
typedef struct {
    int64_t h, proj, mix, narrow, gates, up;
} ws_widths;

static ws_widths widths_of(const qwen35_config *c) {
    layer_dims d = dims_of(c);
    ws_widths w;
    w.h = c->hidden_size;
    w.proj = max3(d.conv_dim, 2 * d.q_dim, c->intermediate_size);
    w.mix = max3(d.conv_dim, d.q_dim + 2 * d.kv_dim, c->intermediate_size);
    w.narrow = d.value_dim > d.q_dim ? d.value_dim : d.q_dim;
    w.gates = c->lin_n_v_heads;
    w.up = c->intermediate_size;
    return w;
}

static int64_t ws_floats(const qwen35_config *c, int64_t N, int64_t T) {
    ws_widths w = widths_of(c);
    return N * (2 * w.h + w.proj + w.mix + 2 * w.narrow + 4 * w.gates + w.up + LMHEAD_VOCAB_BLOCK) + T * T;
}

static void ws_free(qwen35_workspace *ws) {
    if (!ws) return;
    free(ws->h);  /* one allocation holds every float buffer */
    free(ws->pos);
    free(ws);
}

static int ws_reserve(qwen35_model *m, int64_t N, int64_t T) {
    qwen35_workspace *ws = m->ws;
    if (ws && ws->cap_tokens >= N && ws->cap_seq >= T) return 0;
    if (ws) {
        N = N > ws->cap_tokens ? N : ws->cap_tokens;
        T = T > ws->cap_seq ? T : ws->cap_seq;
    }
    ws_free(ws);
    m->ws = ws = calloc(1, sizeof *ws);
    int64_t total = ws_floats(&m->cfg, N, T);
    float *p = ws ? malloc(sizeof(float) * total) : NULL;
    int32_t *ip = ws ? malloc(sizeof(int32_t) * 2 * N) : NULL;
    if (!p || !ip) {
        free(p);
        free(ip);
        free(ws);
        m->ws = NULL;
        return dt_err("out of memory for activations of %lld tokens (%.1f MiB)", (long long)N,
                      total * 4.0 / (1 << 20));
    }
    ws_widths w = widths_of(&m->cfg);
    ws->cap_tokens = N;
    ws->cap_seq = T;
    ws->h = p, p += N * w.h;
    ws->x = p, p += N * w.h;
    ws->proj = p, p += N * w.proj;
    ws->mix = p, p += N * w.mix;
    ws->z = p, p += N * w.narrow;
    ws->o = p, p += N * w.narrow;
    ws->b = p, p += N * w.gates;
    ws->a = p, p += N * w.gates;
    ws->beta = p, p += N * w.gates;
    ws->g = p, p += N * w.gates;
    ws->up = p, p += N * w.up;
    ws->ce = p, p += N * LMHEAD_VOCAB_BLOCK;
    ws->scores = p;
    ws->pos = ip;
    ws->targets = ip + N;
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

static void deltanet_layer_forward(qwen35_model *m, qwen35_layer *L, const qwen35_batch *b) {
    const qwen35_config *c = &m->cfg;
    qwen35_workspace *ws = m->ws;
    layer_dims d = dims_of(c);
    int64_t N = b->n_tokens;
    int Hv = c->lin_n_v_heads;
    linear_forward(ws->proj, ws->x, &L->lin_qkv, N);   /* mixed q|k|v before the conv */
    linear_forward(ws->z, ws->x, &L->lin_z, N);
    linear_forward(ws->b, ws->x, &L->lin_b, N);
    linear_forward(ws->a, ws->x, &L->lin_a, N);
    for (int64_t s = 0, off = 0; s < b->n_seqs; off += b->seq_lens[s++])
        conv1d_silu_forward(ws->mix + off * d.conv_dim, ws->proj + off * d.conv_dim, L->conv,
                            b->seq_lens[s], (int)d.conv_dim, c->conv_kernel);
    float *q = ws->mix, *k = ws->mix + d.key_dim, *v = ws->mix + 2 * d.key_dim;
    l2norm_forward(q, N, c->lin_n_k_heads, c->lin_k_head_dim, d.conv_dim, 1e-6f,
                   1.0f / sqrtf((float)c->lin_k_head_dim));
    l2norm_forward(k, N, c->lin_n_k_heads, c->lin_k_head_dim, d.conv_dim, 1e-6f, 1.0f);
    deltanet_gates_forward(ws->beta, ws->g, ws->b, ws->a, L->a_log, L->dt_bias, N, Hv);
    deltanet_dims dd = {c->lin_n_k_heads, Hv, c->lin_k_head_dim, c->lin_v_head_dim};
    for (int64_t s = 0, off = 0; s < b->n_seqs; off += b->seq_lens[s++])
        deltanet_forward(ws->o + off * d.value_dim, q + off * d.conv_dim, k + off * d.conv_dim, d.conv_dim,
                         v + off * d.conv_dim, d.conv_dim, ws->beta + off * Hv, ws->g + off * Hv,
                         b->seq_lens[s], dd);
    rmsnorm_gated_forward(ws->o, ws->o, ws->z, L->lin_norm, N * Hv, c->lin_v_head_dim, (float)c->rms_eps);
    linear_forward(ws->x, ws->o, &L->lin_out, N);
}

static void attention_layer_forward(qwen35_model *m, qwen35_layer *L, const qwen35_batch *b) {
    const qwen35_config *c = &m->cfg;
    qwen35_workspace *ws = m->ws;
    layer_dims d = dims_of(c);
    int64_t N = b->n_tokens;
    int hd = c->head_dim;
    float *q = ws->mix, *k = q + N * d.q_dim, *v = k + N * d.kv_dim, *gate = ws->z, *att = ws->o;
    linear_forward(ws->proj, ws->x, &L->att_q, N);  /* per head [query | gate] */
    for (int64_t t = 0; t < N; t++) {
        for (int h = 0; h < c->n_heads; h++) {
            const float *src = ws->proj + t * 2 * d.q_dim + (int64_t)h * 2 * hd;
            memcpy(q + t * d.q_dim + (int64_t)h * hd, src, sizeof(float) * hd);
            memcpy(gate + t * d.q_dim + (int64_t)h * hd, src + hd, sizeof(float) * hd);
        }
    }
    linear_forward(k, ws->x, &L->att_k, N);
    linear_forward(v, ws->x, &L->att_v, N);
    rmsnorm1p_forward(q, q, L->q_norm, N * c->n_heads, hd, (float)c->rms_eps);
    rmsnorm1p_forward(k, k, L->k_norm, N * c->n_kv_heads, hd, (float)c->rms_eps);
    rope_forward(q, ws->pos, N, c->n_heads, hd, c->rotary_dim, c->rope_theta);
    rope_forward(k, ws->pos, N, c->n_kv_heads, hd, c->rotary_dim, c->rope_theta);
    for (int64_t s = 0, off = 0; s < b->n_seqs; off += b->seq_lens[s++])
        attention_forward(att + off * d.q_dim, q + off * d.q_dim, k + off * d.kv_dim, v + off * d.kv_dim,
                          b->seq_lens[s], c->n_heads, c->n_kv_heads, hd, 1.0f / sqrtf((float)hd),
                          ws->scores);
    sigmoid_gate_forward(att, gate, N * d.q_dim);
    linear_forward(ws->x, att, &L->att_o, N);
}

static void mlp_forward(qwen35_model *m, qwen35_layer *L, int64_t N) {
    qwen35_workspace *ws = m->ws;
    int64_t I = m->cfg.intermediate_size;
    linear_forward(ws->proj, ws->x, &L->mlp_gate, N);
    linear_forward(ws->up, ws->x, &L->mlp_up, N);
    swiglu_forward(ws->mix, ws->proj, ws->up, N * I);
    linear_forward(ws->x, ws->mix, &L->mlp_down, N);
}

static void add_inplace(float *h, const float *x, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) h[i] += x[i];
}

static int check_batch(const qwen35_model *m, const qwen35_batch *b, int64_t *longest) {
    int64_t total = 0, mx = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        if (b->seq_lens[s] <= 0) return dt_err("sequence %d of the batch is empty", s);
        total += b->seq_lens[s];
        mx = b->seq_lens[s] > mx ? b->seq_lens[s] : mx;
    }
    if (total != b->n_tokens) return dt_err("batch lengths add to %lld, not %d tokens", (long long)total, b->n_tokens);
    for (int64_t t = 0; t < total; t++)
        if (b->ids[t] < 0 || b->ids[t] >= m->cfg.vocab_size)
            return dt_err("token id %d at position %lld is outside the vocabulary [0, %d)", b->ids[t],
                          (long long)t, m->cfg.vocab_size);
    *longest = mx;
    return 0;
}

/* Runs the decoder over the batch and leaves the final-normed hidden states in ws->x. */
static int decoder_forward(qwen35_model *m, const qwen35_batch *b) {
    int64_t longest = 0;
    if (check_batch(m, b, &longest) || ws_reserve(m, b->n_tokens, longest)) return -1;
    const qwen35_config *c = &m->cfg;
    qwen35_workspace *ws = m->ws;
    int64_t N = b->n_tokens, H = c->hidden_size;
    for (int64_t s = 0, off = 0; s < b->n_seqs; off += b->seq_lens[s++])
        for (int t = 0; t < b->seq_lens[s]; t++) ws->pos[off + t] = t;
    embedding_forward(ws->h, b->ids, N, &m->embed);
    for (int l = 0; l < c->n_layers; l++) {
        qwen35_layer *L = &m->layers[l];
        rmsnorm1p_forward(ws->x, ws->h, L->input_norm, N, (int)H, (float)c->rms_eps);
        if (c->layer_is_full[l]) attention_layer_forward(m, L, b);
        else deltanet_layer_forward(m, L, b);
        add_inplace(ws->h, ws->x, N * H);
        rmsnorm1p_forward(ws->x, ws->h, L->post_norm, N, (int)H, (float)c->rms_eps);
        mlp_forward(m, L, N);
        add_inplace(ws->h, ws->x, N * H);
    }
    rmsnorm1p_forward(ws->x, ws->h, m->final_norm, N, (int)H, (float)c->rms_eps);
    return 0;
}

int qwen35_eval_loss(qwen35_model *m, const qwen35_batch *b, double *loss_sum, int64_t *n_targets) {
    *loss_sum = 0;
    *n_targets = 0;
    if (decoder_forward(m, b)) return -1;
    qwen35_workspace *ws = m->ws;
    const int32_t *labels = b->labels ? b->labels : b->ids;
    /* position t predicts the label of t + 1 within its own sequence */
    for (int64_t s = 0, off = 0; s < b->n_seqs; off += b->seq_lens[s++]) {
        for (int t = 0; t < b->seq_lens[s]; t++) {
            int32_t y = t + 1 < b->seq_lens[s] ? labels[off + t + 1] : -1;
            if (y >= m->cfg.vocab_size) return dt_err("label %d at position %lld is outside the vocabulary", y, (long long)(off + t + 1));
            ws->targets[off + t] = y < 0 ? -1 : y;
        }
    }
    lmhead_ce_forward(loss_sum, n_targets, ws->x, ws->targets, b->n_tokens, &m->lm_head, ws->ce);
    return 0;
}

int qwen35_forward_logits(qwen35_model *m, const qwen35_batch *b, float *logits) {
    if (decoder_forward(m, b)) return -1;
    dt_linear head = {m->lm_head, NULL};
    linear_forward(logits, m->ws->x, &head, b->n_tokens);
    return 0;
}

/* ---------------------------------------------------------------- memory plan */

void qwen35_memory_estimate(const qwen35_config *c, int64_t weight_bytes, int batch, int seq_len,
                            int lora_rank, int grad_checkpoint, qwen35_memory *out) {
    memset(out, 0, sizeof *out);
    int64_t N = (int64_t)batch * seq_len, H = c->hidden_size;
    layer_dims d = dims_of(c);
    out->weights = weight_bytes;
    out->activations = 4 * ws_floats(c, N, seq_len);
    /* LoRA on the ten default targets: r * (in + out) per linear */
    int64_t lora = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_is_full[l])
            lora += (H + 2 * d.q_dim) + 2 * (H + d.kv_dim) + (d.q_dim + H);
        else
            lora += (H + d.conv_dim) + (H + d.value_dim) + (d.value_dim + H);
        lora += 2 * (H + c->intermediate_size) + (c->intermediate_size + H);
    }
    out->lora_params = 4 * lora * lora_rank;
    out->optimizer = 3 * out->lora_params;  /* gradient + two AdamW moments */
    /* Saved for backward: with checkpointing, each layer's input (the residual stream)
     * plus one layer's full activations while it is recomputed; without, every layer's. */
    int64_t per_layer = 4 * N * (2 * H + 2 * d.conv_dim + 3 * d.value_dim + 3 * c->intermediate_size);
    int64_t dn_states = 4 * (int64_t)batch * c->lin_n_v_heads * c->lin_k_head_dim * c->lin_v_head_dim *
                        ((seq_len + 63) / 64);
    out->train_activations = grad_checkpoint ? 4 * N * H * c->n_layers + per_layer + dn_states
                                             : (per_layer + dn_states) * c->n_layers;
    out->total_train = out->weights + out->activations + out->lora_params + out->optimizer +
                       out->train_activations;
}
