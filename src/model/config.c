#include "deltatune/config.h"

#include <string.h>

#include "deltatune/error.h"

typedef struct {
    const char *name;
    int vocab, hidden, layers, inter, heads, kv_heads, head_dim;
    int lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim;
    bool tie;
    int eos, max_pos;
} preset;

/* Sizes from qwen35.md §1.2. "tiny" keeps every structural feature of the real
 * models (GQA, value heads > key heads, partial RoPE, both layer kinds) at a size
 * a two-core laptop trains in seconds. */
static const preset presets[] = {
    {"tiny", 2048, 128, 4, 384, 4, 2, 64, 2, 4, 32, 32, true, -1, 4096},
    {"0.8b", 248320, 1024, 24, 3584, 8, 2, 256, 16, 16, 128, 128, true, 248044, 262144},
    {"2b", 248320, 2048, 24, 6144, 8, 2, 256, 16, 16, 128, 128, true, 248044, 262144},
    {"4b", 248320, 2560, 32, 9216, 16, 4, 256, 16, 32, 128, 128, true, 248044, 262144},
    {"9b", 248320, 4096, 32, 12288, 16, 4, 256, 16, 32, 128, 128, false, 248044, 262144},
};

int qwen35_preset(const char *name, qwen35_config *c) {
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        const preset *p = &presets[i];
        if (strcmp(name, p->name) != 0) continue;
        memset(c, 0, sizeof *c);
        c->vocab_size = p->vocab;
        c->hidden_size = p->hidden;
        c->n_layers = p->layers;
        c->intermediate_size = p->inter;
        c->n_heads = p->heads;
        c->n_kv_heads = p->kv_heads;
        c->head_dim = p->head_dim;
        c->lin_n_k_heads = p->lin_k_heads;
        c->lin_n_v_heads = p->lin_v_heads;
        c->lin_k_head_dim = p->lin_k_dim;
        c->lin_v_head_dim = p->lin_v_dim;
        c->conv_kernel = 4;
        c->rms_eps = 1e-6;
        c->rope_theta = 1e7;
        c->partial_rotary_factor = 0.25;
        c->rotary_dim = (int)(p->head_dim * 0.25);
        c->tie_word_embeddings = p->tie;
        c->eos_token_id = p->eos;
        c->max_position_embeddings = p->max_pos;
        for (int l = 0; l < p->layers; l++) c->layer_is_full[l] = (l + 1) % 4 == 0;
        return 0;
    }
    return dt_err("unknown model size \"%s\" (expected tiny, 0.8b, 2b, 4b or 9b)", name);
}

int qwen35_config_validate(const qwen35_config *c) {
    const struct { const char *name; int v; } pos[] = {
        {"vocab_size", c->vocab_size}, {"hidden_size", c->hidden_size},
        {"num_hidden_layers", c->n_layers}, {"intermediate_size", c->intermediate_size},
        {"num_attention_heads", c->n_heads}, {"num_key_value_heads", c->n_kv_heads},
        {"head_dim", c->head_dim}, {"linear_num_key_heads", c->lin_n_k_heads},
        {"linear_num_value_heads", c->lin_n_v_heads}, {"linear_key_head_dim", c->lin_k_head_dim},
        {"linear_value_head_dim", c->lin_v_head_dim}, {"linear_conv_kernel_dim", c->conv_kernel},
        {"max_position_embeddings", c->max_position_embeddings},
    };
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
        if (pos[i].v < 1) return dt_err("%s must be positive (got %d)", pos[i].name, pos[i].v);
    if (c->n_layers > QWEN35_MAX_LAYERS)
        return dt_err("num_hidden_layers %d exceeds the supported %d", c->n_layers, QWEN35_MAX_LAYERS);
    if (c->n_heads % c->n_kv_heads != 0)
        return dt_err("num_attention_heads %d is not a multiple of num_key_value_heads %d", c->n_heads,
                      c->n_kv_heads);
    if (c->lin_n_v_heads % c->lin_n_k_heads != 0)
        return dt_err("linear_num_value_heads %d is not a multiple of linear_num_key_heads %d",
                      c->lin_n_v_heads, c->lin_n_k_heads);
    /* Written as negated comparisons so that NaN fails too. */
    if (!(c->rms_eps > 0)) return dt_err("rms_norm_eps must be positive");
    if (!(c->rope_theta > 0)) return dt_err("rope_theta must be positive");
    if (!(c->partial_rotary_factor > 0 && c->partial_rotary_factor <= 1))
        return dt_err("partial_rotary_factor %g is outside (0, 1]", c->partial_rotary_factor);
    if (c->rotary_dim != (int)(c->head_dim * c->partial_rotary_factor))
        return dt_err("rotary_dim %d does not match head_dim %d x partial_rotary_factor %g", c->rotary_dim,
                      c->head_dim, c->partial_rotary_factor);
    if (c->rotary_dim < 2 || c->rotary_dim % 2 != 0 || c->rotary_dim > c->head_dim)
        return dt_err("rotary dimension %d (head_dim %d x partial_rotary_factor %g) must be even, "
                      "at least 2 and at most head_dim", c->rotary_dim, c->head_dim, c->partial_rotary_factor);
    if (c->eos_token_id < -1 || c->eos_token_id >= c->vocab_size)
        return dt_err("eos_token_id %d is outside the vocabulary (%d)", c->eos_token_id, c->vocab_size);
    for (int l = 0; l < c->n_layers; l++)
        if (c->layer_is_full[l] > 1) return dt_err("layer %d has an invalid type", l);
    return 0;
}

int64_t qwen35_param_count(const qwen35_config *c) {
    int64_t H = c->hidden_size, V = c->vocab_size, I = c->intermediate_size;
    int64_t key_dim = (int64_t)c->lin_n_k_heads * c->lin_k_head_dim;
    int64_t value_dim = (int64_t)c->lin_n_v_heads * c->lin_v_head_dim;
    int64_t conv_dim = 2 * key_dim + value_dim, Hv = c->lin_n_v_heads;
    int64_t hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;

    int64_t gdn = conv_dim * H + value_dim * H + 2 * Hv * H + conv_dim * c->conv_kernel + 2 * Hv +
                  c->lin_v_head_dim + H * value_dim;
    int64_t att = 2 * nh * hd * H + 2 * nkv * hd * H + H * nh * hd + 2 * hd;
    int64_t mlp = 3 * I * H;

    int64_t n = V * H + H;  /* embeddings, final norm */
    if (!c->tie_word_embeddings) n += V * H;
    for (int l = 0; l < c->n_layers; l++) n += 2 * H + mlp + (c->layer_is_full[l] ? att : gdn);
    return n;
}
