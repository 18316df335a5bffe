#include "deltatune/weights.h"

#include <stdio.h>
#include <string.h>

/* Where each kind lives inside a decoder layer (or the text model), as HF names it.
 * leaf is the module name for linears and norms, the parameter name for the two
 * bare GDN parameters; has_weight says whether ".weight" follows. */
static const struct {
    const char *group;  /* NULL: directly under the text model */
    const char *leaf;
    int has_weight;
    int lora;           /* a linear LoRA may target */
} kinds[W_KIND_COUNT] = {
    [W_EMBED] = {NULL, "embed_tokens", 1, 0},
    [W_FINAL_NORM] = {NULL, "norm", 1, 0},
    [W_LM_HEAD] = {NULL, "lm_head", 1, 0},
    [W_INPUT_NORM] = {"", "input_layernorm", 1, 0},
    [W_POST_NORM] = {"", "post_attention_layernorm", 1, 0},
    [W_MLP_GATE] = {"mlp", "gate_proj", 1, 1},
    [W_MLP_UP] = {"mlp", "up_proj", 1, 1},
    [W_MLP_DOWN] = {"mlp", "down_proj", 1, 1},
    [W_LIN_QKV] = {"linear_attn", "in_proj_qkv", 1, 1},
    [W_LIN_Z] = {"linear_attn", "in_proj_z", 1, 1},
    [W_LIN_B] = {"linear_attn", "in_proj_b", 1, 1},
    [W_LIN_A] = {"linear_attn", "in_proj_a", 1, 1},
    [W_LIN_CONV] = {"linear_attn", "conv1d", 1, 0},
    [W_LIN_DT_BIAS] = {"linear_attn", "dt_bias", 0, 0},
    [W_LIN_A_LOG] = {"linear_attn", "A_log", 0, 0},
    [W_LIN_NORM] = {"linear_attn", "norm", 1, 0},
    [W_LIN_OUT] = {"linear_attn", "out_proj", 1, 1},
    [W_ATT_Q] = {"self_attn", "q_proj", 1, 1},
    [W_ATT_K] = {"self_attn", "k_proj", 1, 1},
    [W_ATT_V] = {"self_attn", "v_proj", 1, 1},
    [W_ATT_O] = {"self_attn", "o_proj", 1, 1},
    [W_ATT_QNORM] = {"self_attn", "q_norm", 1, 0},
    [W_ATT_KNORM] = {"self_attn", "k_norm", 1, 0},
};

const char *qwen35_lora_module_name(qwen35_wkind kind) {
    if ((unsigned)kind >= W_KIND_COUNT || !kinds[kind].lora) return NULL;
    return kinds[kind].leaf;
}

/* For kinds without a module of their own (dt_bias, A_log) this is the parameter path. */
void qwen35_module_path(char *buf, size_t cap, qwen35_wkind kind, int layer) {
    if (cap == 0) return;
    if ((unsigned)kind >= W_KIND_COUNT) {
        buf[0] = 0;
        return;
    }
    const char *g = kinds[kind].group, *leaf = kinds[kind].leaf;
    if (!g) snprintf(buf, cap, "%s", leaf);
    else if (!g[0]) snprintf(buf, cap, "layers.%d.%s", layer, leaf);
    else snprintf(buf, cap, "layers.%d.%s.%s", layer, g, leaf);
}

static const qwen35_wkind lin_kinds[] = {W_LIN_QKV, W_LIN_Z, W_LIN_B, W_LIN_A, W_LIN_CONV,
                                         W_LIN_DT_BIAS, W_LIN_A_LOG, W_LIN_NORM, W_LIN_OUT};
static const qwen35_wkind att_kinds[] = {W_ATT_Q, W_ATT_K, W_ATT_V, W_ATT_O, W_ATT_QNORM, W_ATT_KNORM};
static const qwen35_wkind mlp_kinds[] = {W_MLP_GATE, W_MLP_UP, W_MLP_DOWN};
#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

int qwen35_tensor_count(const qwen35_config *c) {
    int n = 2 + (c->tie_word_embeddings ? 0 : 1);  /* embed, final norm, lm_head */
    for (int l = 0; l < c->n_layers; l++)
        n += 2 + COUNT(mlp_kinds) + (c->layer_is_full[l] ? COUNT(att_kinds) : COUNT(lin_kinds));
    return n;
}

static int shape_of(const qwen35_config *c, qwen35_wkind kind, int64_t *s) {
    int64_t H = c->hidden_size, V = c->vocab_size, I = c->intermediate_size;
    int64_t key_dim = (int64_t)c->lin_n_k_heads * c->lin_k_head_dim;
    int64_t value_dim = (int64_t)c->lin_n_v_heads * c->lin_v_head_dim;
    int64_t conv_dim = 2 * key_dim + value_dim, Hv = c->lin_n_v_heads;
    int64_t hd = c->head_dim, q_dim = (int64_t)c->n_heads * hd, kv_dim = (int64_t)c->n_kv_heads * hd;
#define S1(a) (s[0] = (a), 1)
#define S2(a, b) (s[0] = (a), s[1] = (b), 2)
    switch (kind) {
    case W_EMBED: case W_LM_HEAD: return S2(V, H);
    case W_FINAL_NORM: case W_INPUT_NORM: case W_POST_NORM: return S1(H);
    case W_MLP_GATE: case W_MLP_UP: return S2(I, H);
    case W_MLP_DOWN: return S2(H, I);
    case W_LIN_QKV: return S2(conv_dim, H);
    case W_LIN_Z: return S2(value_dim, H);
    case W_LIN_B: case W_LIN_A: return S2(Hv, H);
    case W_LIN_CONV: s[0] = conv_dim; s[1] = 1; s[2] = c->conv_kernel; return 3;
    case W_LIN_DT_BIAS: case W_LIN_A_LOG: return S1(Hv);
    case W_LIN_NORM: return S1(c->lin_v_head_dim);
    case W_LIN_OUT: return S2(H, value_dim);
    case W_ATT_Q: return S2(2 * q_dim, H);  /* per head [query | output gate] */
    case W_ATT_K: case W_ATT_V: return S2(kv_dim, H);
    case W_ATT_O: return S2(H, q_dim);
    case W_ATT_QNORM: case W_ATT_KNORM: return S1(hd);
    default: return 0;
    }
#undef S1
#undef S2
}

static void fill_spec(qwen35_tensor_spec *s, const qwen35_config *c, qwen35_wkind kind, int layer) {
    memset(s, 0, sizeof *s);
    s->kind = kind;
    s->layer = layer;
    s->ndim = shape_of(c, kind, s->shape);
    char path[80];
    qwen35_module_path(path, sizeof path, kind, layer);
    snprintf(s->name, sizeof s->name, "%s%s", path, kinds[kind].has_weight ? ".weight" : "");
}

int qwen35_tensor_specs(const qwen35_config *c, qwen35_tensor_spec *specs) {
    int n = 0;
    fill_spec(&specs[n++], c, W_EMBED, -1);
    for (int l = 0; l < c->n_layers; l++) {
        fill_spec(&specs[n++], c, W_INPUT_NORM, l);
        fill_spec(&specs[n++], c, W_POST_NORM, l);
        if (c->layer_is_full[l])
            for (int i = 0; i < COUNT(att_kinds); i++) fill_spec(&specs[n++], c, att_kinds[i], l);
        else
            for (int i = 0; i < COUNT(lin_kinds); i++) fill_spec(&specs[n++], c, lin_kinds[i], l);
        for (int i = 0; i < COUNT(mlp_kinds); i++) fill_spec(&specs[n++], c, mlp_kinds[i], l);
    }
    fill_spec(&specs[n++], c, W_FINAL_NORM, -1);
    if (!c->tie_word_embeddings) fill_spec(&specs[n++], c, W_LM_HEAD, -1);
    return n;
}

int64_t qwen35_spec_numel(const qwen35_tensor_spec *s) {
    int64_t n = 1;
    for (int d = 0; d < s->ndim; d++) n *= s->shape[d];
    return n;
}

void qwen35_lora_module_names(char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = 0;
    for (int k = 0; k < W_KIND_COUNT; k++) {
        const char *m = qwen35_lora_module_name((qwen35_wkind)k);
        if (m && n < cap) n += (size_t)snprintf(buf + n, cap - n, "%s%s", n ? ", " : "", m);
    }
}
