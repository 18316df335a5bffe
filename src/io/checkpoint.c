#include "deltatune/files.h"
#include "deltatune/checkpoint.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"
#include "deltatune/quant.h"

#define PREFIX_MM "model.language_model."
#define PREFIX_TEXT "model."
#define PREFIX_MLX "language_model.model."
#define LM_HEAD_MLX "language_model.lm_head.weight"

/* ---------------------------------------------------------------- files */

static json_t *parse_json(const char *text, size_t len) {
    json_error_t jerr;
    json_t *root = json_loadb(text, len, 0, &jerr);
    if (!root) dt_err("invalid JSON at line %d, column %d: %s", jerr.line, jerr.column, jerr.text);
    return root;
}

/* ---------------------------------------------------------------- config fields */

/* A config object and how to name its fields in messages ("text_config.hidden_size"). */
typedef struct {
    json_t *obj;
    const char *scope;
} jscope;

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number with a fraction";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* A present, non-null field or NULL. */
static json_t *field(jscope s, const char *key) {
    json_t *v = json_object_get(s.obj, key);
    return json_is_null(v) ? NULL : v;
}

static int int_value(json_t *v, jscope s, const char *key, int *out) {
    double d;
    if (json_is_integer(v)) d = (double)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v))) d = json_real_value(v);
    else return dt_err("field %s%s: expected an integer, found %s", s.scope, key, json_type_name(v));
    if (d < INT_MIN || d > INT_MAX) return dt_err("field %s%s: %.0f is out of range", s.scope, key, d);
    *out = (int)d;
    return 0;
}

/* Required fields ignore def. */
static int get_int(jscope s, const char *key, int required, int def, int *out) {
    json_t *v = field(s, key);
    if (!v) {
        if (required) return dt_err("missing required field %s%s", s.scope, key);
        *out = def;
        return 0;
    }
    return int_value(v, s, key, out);
}

static int get_num(jscope s, const char *key, int *found, double *out) {
    json_t *v = field(s, key);
    *found = v != NULL;
    if (!v) return 0;
    if (!json_is_number(v))
        return dt_err("field %s%s: expected a number, found %s", s.scope, key, json_type_name(v));
    *out = json_number_value(v);
    return 0;
}

static int get_bool(jscope s, const char *key, int *found, bool *out) {
    json_t *v = field(s, key);
    *found = v != NULL;
    if (!v) return 0;
    if (!json_is_boolean(v))
        return dt_err("field %s%s: expected true or false, found %s", s.scope, key, json_type_name(v));
    *out = json_is_true(v);
    return 0;
}

static int get_string(jscope s, const char *key, const char **out) {
    json_t *v = field(s, key);
    *out = NULL;
    if (!v) return 0;
    if (!json_is_string(v))
        return dt_err("field %s%s: expected a string, found %s", s.scope, key, json_type_name(v));
    *out = json_string_value(v);
    return 0;
}

static int model_type_ok(const char *t) { return strcmp(t, "qwen3_5") == 0 || strcmp(t, "qwen3_5_text") == 0; }

/* ---------------------------------------------------------------- MLX quantization record */

static int is_record_key(const char *k) {
    return !strcmp(k, "group_size") || !strcmp(k, "bits") || !strcmp(k, "mode") || !strcmp(k, "quant_method");
}

/* {"group_size", "bits", "mode"} of the record or of a per-module entry; scope names it in errors
 * ("quantization.", "quantization.language_model.lm_head."). */
static int parse_quant_entry(jscope s, int *bits, int *group) {
    const char *method, *mode;
    if (get_string(s, "quant_method", &method) != 0) return -1;
    if (method)
        return dt_err("field %squant_method: \"%s\" is not supported (MLX affine quantization only)", s.scope,
                      method);
    if (get_string(s, "mode", &mode) != 0) return -1;
    if (mode && strcmp(mode, "affine") != 0)
        return dt_err("field %smode: quantization mode \"%s\" is not supported (affine only)", s.scope, mode);
    if (get_int(s, "bits", 1, 0, bits) != 0 || get_int(s, "group_size", 1, 0, group) != 0) return -1;
    char what[160];
    snprintf(what, sizeof what, "field %.*s", (int)strlen(s.scope) - 1, s.scope);
    /* a row of one group: checks bits and group size alone */
    return quant_check(*bits, *group, *group, what);
}

/* The record object (NULL when none) and its field name. */
static json_t *quant_object(const json_t *root, const char **key) {
    *key = "quantization";
    json_t *q = json_object_get(root, *key);
    if (!q || json_is_null(q)) {
        *key = "quantization_config";
        q = json_object_get(root, *key);
    }
    return json_is_null(q) ? NULL : q;
}

int qwen35_quant_record(const json_t *root, int *bits, int *group) {
    *bits = *group = 0;
    const char *key;
    json_t *q = quant_object(root, &key);
    if (!q) return 0;
    if (!json_is_object(q)) return dt_err("field %s: expected an object, found %s", key, json_type_name(q));
    char scope[64];
    snprintf(scope, sizeof scope, "%s.", key);
    if (parse_quant_entry((jscope){q, scope}, bits, group) != 0) return -1;
    /* per-module entries: {"group_size", "bits"}, or true / false */
    const char *k;
    json_t *v;
    json_object_foreach(q, k, v) {
        if (is_record_key(k) || json_is_boolean(v)) continue;
        char sub[256];
        snprintf(sub, sizeof sub, "%s.%s.", key, k);
        if (!json_is_object(v)) return dt_err("field %s.%s: expected an object, found %s", key, k, json_type_name(v));
        int b, g;
        if (parse_quant_entry((jscope){v, sub}, &b, &g) != 0) return -1;
    }
    return 0;
}

/* Bits and group size of a module ("language_model.model.layers.0.mlp.up_proj"): its own entry in
 * the record, else the global ones. 0 bits: the record says it is not quantized. */
static void module_quant(const json_t *root, const char *module, int *bits, int *group) {
    const char *key;
    json_t *q = quant_object(root, &key);
    int gb, gg;
    if (qwen35_quant_record(root, &gb, &gg) != 0) gb = gg = 0;
    *bits = gb;
    *group = gg;
    json_t *v = q ? json_object_get(q, module) : NULL;
    if (json_is_false(v)) *bits = *group = 0;
    else if (json_is_object(v)) parse_quant_entry((jscope){v, ""}, bits, group);
}

/* ---------------------------------------------------------------- unsupported settings */

/* Settings this trainer cannot honour; accepting them would compute a different model. */
static int reject_unsupported(jscope root, jscope t) {
    int qb, qg;
    if (qwen35_quant_record(root.obj, &qb, &qg) != 0) return -1;
    if (t.obj != root.obj && (field(t, "quantization") || field(t, "quantization_config")))
        return dt_err("field %squantization: expected at the top level of config.json (MLX's record)", t.scope);
    int found, experts = 0;
    bool b;
    if (get_int(t, "num_experts", 0, 0, &experts) != 0) return -1;
    if (experts > 0) return dt_err("field %snum_experts: mixture-of-experts models are not supported", t.scope);
    if (get_bool(t, "attn_output_gate", &found, &b) != 0) return -1;
    if (found && !b)
        return dt_err("field %sattn_output_gate: false is not supported (Qwen3.5 gates attention output)", t.scope);
    if (get_bool(t, "attention_bias", &found, &b) != 0) return -1;
    if (found && b) return dt_err("field %sattention_bias: true is not supported", t.scope);
    const char *act;
    if (get_string(t, "hidden_act", &act) != 0) return -1;
    if (act && strcmp(act, "silu") != 0)
        return dt_err("field %shidden_act: \"%s\" is not supported (silu expected)", t.scope, act);
    return 0;
}

static int parse_layer_types(qwen35_config *c, jscope t) {
    json_t *lt = field(t, "layer_types");
    if (lt) {
        if (!json_is_array(lt))
            return dt_err("field %slayer_types: expected an array, found %s", t.scope, json_type_name(lt));
        if ((int)json_array_size(lt) != c->n_layers)
            return dt_err("field %slayer_types: %zu entries for %d layers", t.scope, json_array_size(lt),
                          c->n_layers);
        for (int l = 0; l < c->n_layers; l++) {
            const char *s = json_string_value(json_array_get(lt, (size_t)l));
            /* "attention" and "mamba" are the legacy names transformers still remaps. */
            if (s && (strcmp(s, "full_attention") == 0 || strcmp(s, "attention") == 0)) c->layer_is_full[l] = 1;
            else if (s && (strcmp(s, "linear_attention") == 0 || strcmp(s, "mamba") == 0)) c->layer_is_full[l] = 0;
            else return dt_err("field %slayer_types[%d]: expected \"linear_attention\" or \"full_attention\"",
                               t.scope, l);
        }
        return 0;
    }
    int interval;
    if (get_int(t, "full_attention_interval", 0, 4, &interval) != 0) return -1;
    if (interval < 1) return dt_err("field %sfull_attention_interval: must be at least 1", t.scope);
    for (int l = 0; l < c->n_layers; l++) c->layer_is_full[l] = (l + 1) % interval == 0;
    return 0;
}

/* rope_parameters (transformers 5), rope_scaling (older writers), then the text
 * config itself; HF's defaults for this model type otherwise. */
static int parse_rope(qwen35_config *c, jscope t) {
    jscope rp = {NULL, ""};
    const char *keys[] = {"rope_parameters", "rope_scaling"};
    for (int i = 0; i < 2 && !rp.obj; i++) {
        json_t *v = field(t, keys[i]);
        if (!v) continue;
        if (!json_is_object(v))
            return dt_err("field %s%s: expected an object, found %s", t.scope, keys[i], json_type_name(v));
        rp.obj = v;
        rp.scope = i == 0 ? (t.scope[0] ? "text_config.rope_parameters." : "rope_parameters.")
                          : (t.scope[0] ? "text_config.rope_scaling." : "rope_scaling.");
    }
    c->rope_theta = 1e7;
    c->partial_rotary_factor = 0.25;
    int found = 0;
    if (rp.obj) {
        const char *type;
        if (get_string(rp, "rope_type", &type) != 0) return -1;
        if (type && strcmp(type, "default") != 0)
            return dt_err("field %srope_type: \"%s\" is not supported (default expected)", rp.scope, type);
        if (get_num(rp, "rope_theta", &found, &c->rope_theta) != 0) return -1;
    }
    if (!found && get_num(t, "rope_theta", &found, &c->rope_theta) != 0) return -1;
    found = 0;
    if (rp.obj && get_num(rp, "partial_rotary_factor", &found, &c->partial_rotary_factor) != 0) return -1;
    if (!found && get_num(t, "partial_rotary_factor", &found, &c->partial_rotary_factor) != 0) return -1;
    /* Out of (0, 1] the product may not fit an int; 0 lets validate name the factor. */
    int in_range = c->partial_rotary_factor > 0 && c->partial_rotary_factor <= 1;
    c->rotary_dim = in_range ? (int)(c->head_dim * c->partial_rotary_factor) : 0;
    return 0;
}

static int parse_eos(qwen35_config *c, jscope t, jscope root) {
    json_t *v = field(t, "eos_token_id");
    jscope s = t;
    if (!v) {
        v = field(root, "eos_token_id");
        s = root;
    }
    c->eos_token_id = -1;
    if (!v) return 0;
    if (json_is_array(v)) {
        if (json_array_size(v) == 0) return 0;
        v = json_array_get(v, 0);
    }
    return int_value(v, s, "eos_token_id", &c->eos_token_id);
}

static int parse_text_sizes(qwen35_config *c, jscope t) {
    const struct { const char *key; int *dst; } req[] = {
        {"vocab_size", &c->vocab_size}, {"hidden_size", &c->hidden_size},
        {"num_hidden_layers", &c->n_layers}, {"intermediate_size", &c->intermediate_size},
        {"num_attention_heads", &c->n_heads}, {"num_key_value_heads", &c->n_kv_heads},
        {"linear_num_key_heads", &c->lin_n_k_heads}, {"linear_num_value_heads", &c->lin_n_v_heads},
        {"linear_key_head_dim", &c->lin_k_head_dim}, {"linear_value_head_dim", &c->lin_v_head_dim},
    };
    for (size_t i = 0; i < sizeof req / sizeof req[0]; i++)
        if (get_int(t, req[i].key, 1, 0, req[i].dst) != 0) return -1;
    if (c->n_layers < 1 || c->n_layers > QWEN35_MAX_LAYERS)
        return dt_err("field %snum_hidden_layers: %d is outside 1..%d", t.scope, c->n_layers, QWEN35_MAX_LAYERS);
    /* hidden / heads is the generic HF fallback; Qwen3.5 files always carry head_dim. */
    int fallback = c->n_heads > 0 ? c->hidden_size / c->n_heads : 0;
    if (get_int(t, "head_dim", 0, fallback, &c->head_dim) != 0) return -1;
    if (get_int(t, "linear_conv_kernel_dim", 0, 4, &c->conv_kernel) != 0) return -1;
    if (get_int(t, "max_position_embeddings", 0, 32768, &c->max_position_embeddings) != 0) return -1;
    int found;
    c->rms_eps = 1e-6;
    return get_num(t, "rms_norm_eps", &found, &c->rms_eps);
}

static int parse_config_object(qwen35_config *c, json_t *json) {
    if (!json_is_object(json)) return dt_err("expected a JSON object");
    jscope root = {json, ""}, t = root;
    const char *mt;
    if (get_string(root, "model_type", &mt) != 0) return -1;
    if (!mt) return dt_err("missing required field model_type");
    if (!model_type_ok(mt))
        return dt_err("field model_type: \"%s\" is not supported (qwen3_5 or qwen3_5_text expected)", mt);
    json_t *tc = field(root, "text_config");
    if (tc) {
        if (!json_is_object(tc)) return dt_err("field text_config: expected an object, found %s", json_type_name(tc));
        t = (jscope){tc, "text_config."};
        if (get_string(t, "model_type", &mt) != 0) return -1;
        if (mt && !model_type_ok(mt))
            return dt_err("field text_config.model_type: \"%s\" is not supported (qwen3_5_text expected)", mt);
    }
    if (reject_unsupported(root, t) != 0) return -1;
    if (parse_text_sizes(c, t) != 0 || parse_layer_types(c, t) != 0 || parse_rope(c, t) != 0 ||
        parse_eos(c, t, root) != 0)
        return -1;
    int found;
    c->tie_word_embeddings = false;
    if (get_bool(t, "tie_word_embeddings", &found, &c->tie_word_embeddings) != 0) return -1;
    if (!found && get_bool(root, "tie_word_embeddings", &found, &c->tie_word_embeddings) != 0) return -1;
    return qwen35_config_validate(c);
}

int qwen35_config_parse(qwen35_config *c, const char *json_text, size_t len, const char *path) {
    memset(c, 0, sizeof *c);
    json_t *root = parse_json(json_text, len);
    int rc = root ? parse_config_object(c, root) : -1;
    json_decref(root);
    if (rc != 0) return dt_err_wrap("%s", path);
    return 0;
}

int qwen35_config_load(qwen35_config *c, const char *path) {
    char *text;
    size_t len;
    if (io_read_file(path, &text, &len) != 0) return dt_err_wrap("%s", path);
    int rc = qwen35_config_parse(c, text, len, path);
    free(text);
    return rc;
}

/* ---------------------------------------------------------------- config writing */

static const char *torch_dtype_name(dt_dtype t) {
    switch (t) {
    case DT_F32: return "float32";
    case DT_F16: return "float16";
    default: return "bfloat16";
    }
}

/* The interval when layer_types follows the (i + 1) % k rule, else 0. */
static int layer_interval(const qwen35_config *c) {
    for (int k = 1; k <= c->n_layers + 1; k++) {
        int ok = 1;
        for (int l = 0; l < c->n_layers && ok; l++) ok = c->layer_is_full[l] == ((l + 1) % k == 0);
        if (ok) return k;
    }
    return 0;
}

/* MRoPE splits rotary_dim / 2 frequencies over (t, h, w); for text the three position
 * rows are equal, so only the sum matters. [11, 11, 10] for the real models. */
static json_t *mrope_section(int rotary_dim) {
    int h = rotary_dim / 2, a = (h + 2) / 3, b = (h - a + 1) / 2;
    return json_pack("[i, i, i]", a, b, h - a - b);
}

/* A number JSON readers get back exactly: integral values as integers (rope_theta
 * 10000000 as the official files write it), others as reals. */
static json_t *json_num(double v) {
    if (v == floor(v) && fabs(v) < 9e15) return json_integer((json_int_t)v);
    return json_real(v);
}

static json_t *text_config_json(const qwen35_config *c, const char *dtype, const char *model_type,
                                const char *arch) {
    json_t *layer_types = json_array(), *o = json_object();
    for (int l = 0; l < c->n_layers; l++)
        json_array_append_new(layer_types, json_string(c->layer_is_full[l] ? "full_attention" : "linear_attention"));
    json_t *rope = json_pack("{s:b, s:o, s:s, s:o, s:o}", "mrope_interleaved", 1, "mrope_section",
                             mrope_section(c->rotary_dim), "rope_type", "default", "rope_theta",
                             json_num(c->rope_theta), "partial_rotary_factor",
                             json_num(c->partial_rotary_factor));
    if (!layer_types || !o || !rope) {
        json_decref(layer_types);
        json_decref(o);
        json_decref(rope);
        return NULL;
    }
    /* Keys sorted, as transformers writes them. */
    if (arch) json_object_set_new(o, "architectures", json_pack("[s]", arch));
    json_object_set_new(o, "attention_bias", json_false());
    json_object_set_new(o, "attention_dropout", json_real(0.0));
    json_object_set_new(o, "attn_output_gate", json_true());
    json_object_set_new(o, "dtype", json_string(dtype));
    if (c->eos_token_id >= 0) json_object_set_new(o, "eos_token_id", json_integer(c->eos_token_id));
    int interval = layer_interval(c);
    if (interval > 0) json_object_set_new(o, "full_attention_interval", json_integer(interval));
    json_object_set_new(o, "head_dim", json_integer(c->head_dim));
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(o, "layer_types", layer_types);
    json_object_set_new(o, "linear_conv_kernel_dim", json_integer(c->conv_kernel));
    json_object_set_new(o, "linear_key_head_dim", json_integer(c->lin_k_head_dim));
    json_object_set_new(o, "linear_num_key_heads", json_integer(c->lin_n_k_heads));
    json_object_set_new(o, "linear_num_value_heads", json_integer(c->lin_n_v_heads));
    json_object_set_new(o, "linear_value_head_dim", json_integer(c->lin_v_head_dim));
    json_object_set_new(o, "mamba_ssm_dtype", json_string("float32"));
    json_object_set_new(o, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(o, "mlp_only_layers", json_array());
    json_object_set_new(o, "model_type", json_string(model_type));
    json_object_set_new(o, "num_attention_heads", json_integer(c->n_heads));
    json_object_set_new(o, "num_hidden_layers", json_integer(c->n_layers));
    json_object_set_new(o, "num_key_value_heads", json_integer(c->n_kv_heads));
    json_object_set_new(o, "rms_norm_eps", json_num(c->rms_eps));
    json_object_set_new(o, "rope_parameters", rope);
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(o, "use_cache", json_true());
    json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
    return o;
}

/* Qwen3_5ForConditionalGeneration always builds a vision tower; this smallest valid one
 * keeps that cheap. Its weights are absent from our files, so transformers initialises
 * them (and says so); text generation never uses them. */
static json_t *vision_config_json(const qwen35_config *c) {
    return json_pack("{s:[], s:i, s:s, s:i, s:i, s:f, s:i, s:s, s:i, s:i, s:i, s:i, s:i, s:i}",
                     "deepstack_visual_indexes", "depth", 1, "hidden_act", "gelu_pytorch_tanh", "hidden_size",
                     64, "in_channels", 3, "initializer_range", 0.02, "intermediate_size", 128, "model_type",
                     "qwen3_5", "num_heads", 2, "num_position_embeddings", 2304, "out_hidden_size",
                     c->hidden_size, "patch_size", 16, "spatial_merge_size", 2, "temporal_patch_size", 2);
}

static json_t *config_json(const qwen35_config *c, qwen35_layout layout, const char *dtype) {
    if (layout == LAYOUT_TEXT) return text_config_json(c, dtype, "qwen3_5_text", "Qwen3_5ForCausalLM");
    json_t *text = text_config_json(c, dtype, "qwen3_5_text", NULL);
    json_t *vision = vision_config_json(c);
    if (!text || !vision) {
        json_decref(text);
        json_decref(vision);
        return NULL;
    }
    /* dtype at the top as well: from_pretrained(dtype="auto") reads the outer config. */
    return json_pack("{s:[s], s:s, s:s, s:o, s:b, s:o}", "architectures", "Qwen3_5ForConditionalGeneration",
                     "dtype", dtype, "model_type", "qwen3_5", "text_config", text, "tie_word_embeddings",
                     (int)c->tie_word_embeddings, "vision_config", vision);
}

/* 15 significant digits print 1e-6 as "1e-6" rather than "9.9999999999999995e-7";
 * fall back to 17 when that would lose a bit. */
static int real_precision(const qwen35_config *c) {
    const double v[] = {c->rms_eps, c->rope_theta, c->partial_rotary_factor};
    for (int i = 0; i < 3; i++) {
        char buf[64];
        snprintf(buf, sizeof buf, "%.15g", v[i]);
        if (strtod(buf, NULL) != v[i]) return 17;
    }
    return 15;
}

int qwen35_config_save_dtype(const qwen35_config *c, qwen35_layout layout, dt_dtype dtype, const char *path) {
    if (qwen35_config_validate(c) != 0) return dt_err_wrap("%s", path);
    json_t *root = config_json(c, layout, torch_dtype_name(dtype));
    if (!root) return dt_err("%s: out of memory", path);
    int rc = io_write_json_atomic(path, root, JSON_INDENT(2) | JSON_REAL_PRECISION(real_precision(c)));
    json_decref(root);
    return rc;
}

int qwen35_config_save(const qwen35_config *c, qwen35_layout layout, const char *path) {
    return qwen35_config_save_dtype(c, layout, DT_BF16, path);
}

int qwen35_config_save_quant(const qwen35_config *c, qwen35_layout layout, dt_dtype dtype, int bits, int group,
                             const char *path) {
    if (qwen35_config_validate(c) != 0) return dt_err_wrap("%s", path);
    json_t *root = config_json(c, layout, torch_dtype_name(dtype));
    if (!root) return dt_err("%s: out of memory", path);
    if (bits > 0) {
        json_object_set_new(root, "quantization", json_pack("{s:i, s:i, s:s}", "group_size", group, "bits", bits,
                                                            "mode", "affine"));
        json_object_set_new(root, "quantization_config", json_pack("{s:i, s:i, s:s}", "group_size", group, "bits",
                                                                   bits, "mode", "affine"));
    }
    int rc = io_write_json_atomic(path, root, JSON_INDENT(2) | JSON_REAL_PRECISION(real_precision(c)));
    json_decref(root);
    return rc;
}

/* ---------------------------------------------------------------- checkpoint folder */

/* One tensor visible through the folder: from the index's weight_map, or every
 * tensor of the single file. */
typedef struct {
    const st_tensor *t;
    int file;
    int used;
} ck_entry;

typedef struct {
    ck_entry *v;
    int n;
} ck_entries;

static int entry_by_name(const void *a, const void *b) {
    return strcmp(((const ck_entry *)a)->t->name, ((const ck_entry *)b)->t->name);
}

static ck_entry *find_entry(ck_entries *es, const char *name) {
    int lo = 0, hi = es->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(es->v[mid].t->name, name);
        if (c == 0) return &es->v[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

static int open_shard(checkpoint *ck, const char *file) {
    char *p = io_path_join(ck->dir, file);
    if (!p) return dt_err("out of memory");
    int rc = st_open(&ck->files[ck->n_files], p);
    free(p);
    if (rc == 0) ck->n_files++;
    return rc;
}

static int open_single(checkpoint *ck, ck_entries *es) {
    ck->files = calloc(1, sizeof *ck->files);
    if (!ck->files) return dt_err("out of memory");
    if (open_shard(ck, "model.safetensors") != 0) return -1;
    const st_file *f = &ck->files[0];
    es->v = calloc((size_t)f->n + 1, sizeof *es->v);
    if (!es->v) return dt_err("out of memory");
    for (int i = 0; i < f->n; i++) es->v[i] = (ck_entry){&f->tensors[i], 0, 0};
    es->n = f->n;
    return 0;
}

/* A shard name from the index is joined to the folder: refuse anything that could
 * point outside it. */
static int shard_name_ok(const char *s) {
    return s[0] && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static int open_sharded(checkpoint *ck, ck_entries *es, const char *index_path) {
    json_t *root = io_load_json(index_path);
    if (!root) return -1;
    int rc = -1;
    json_t *wm = json_object_get(root, "weight_map");
    const char **shards = NULL;
    if (!json_is_object(wm)) {
        dt_err("%s: missing or invalid \"weight_map\"", index_path);
        goto done;
    }
    size_t n = json_object_size(wm);
    shards = calloc(n + 1, sizeof *shards);
    ck->files = calloc(n + 1, sizeof *ck->files);
    es->v = calloc(n + 1, sizeof *es->v);
    if (!shards || !ck->files || !es->v) {
        dt_err("out of memory");
        goto done;
    }
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        const char *file = json_string_value(v);
        if (!file || !shard_name_ok(file)) {
            dt_err("%s: weight_map[\"%s\"] is not a file name in this folder", index_path, name);
            goto done;
        }
        int k = 0;
        while (k < ck->n_files && strcmp(shards[k], file) != 0) k++;
        if (k == ck->n_files) {
            shards[k] = file;
            if (open_shard(ck, file) != 0) goto done;
        }
        const st_tensor *t = st_find(&ck->files[k], name);
        if (!t) {
            dt_err("%s: tensor %s, listed in model.safetensors.index.json, is absent", ck->files[k].path, name);
            goto done;
        }
        es->v[es->n++] = (ck_entry){t, k, 0};
    }
    qsort(es->v, (size_t)es->n, sizeof *es->v, entry_by_name);
    rc = 0;
done:
    free(shards);
    json_decref(root);
    return rc;
}

static int open_files(checkpoint *ck, ck_entries *es) {
    char *index = io_path_join(ck->dir, "model.safetensors.index.json");
    char *single = io_path_join(ck->dir, "model.safetensors");
    int rc;
    if (!index || !single) rc = dt_err("out of memory");
    else if (io_file_exists(index)) rc = open_sharded(ck, es, index);
    else if (io_file_exists(single)) rc = open_single(ck, es);
    else rc = dt_err("%s: no model.safetensors or model.safetensors.index.json", ck->dir);
    free(index);
    free(single);
    return rc;
}

static int starts_with(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

static int is_skipped(const char *name) {
    return starts_with(name, "model.visual.") || starts_with(name, "mtp.") || starts_with(name, "vision_tower.") ||
           starts_with(name, "language_model.vision_tower.");
}

static int detect_layout(checkpoint *ck, const ck_entries *es) {
    int mm = 0, text = 0, mlx = 0;
    for (int i = 0; i < es->n; i++) {
        const char *n = es->v[i].t->name;
        if (is_skipped(n)) continue;
        if (starts_with(n, PREFIX_MM)) mm++;
        else if (starts_with(n, PREFIX_TEXT)) text++;
        else if (starts_with(n, "language_model.model.")) mlx++;
    }
    if (mm) {
        ck->layout = LAYOUT_MULTIMODAL;
        ck->prefix = ck->file_prefix = PREFIX_MM;
    } else if (text) {
        ck->layout = LAYOUT_TEXT;
        ck->prefix = ck->file_prefix = PREFIX_TEXT;
    } else if (mlx) {
        /* mlx-lm's sanitize renamed model.language_model.* and stored the norms +1 */
        ck->layout = LAYOUT_MULTIMODAL;
        ck->prefix = PREFIX_MM;
        ck->file_prefix = PREFIX_MLX;
        ck->mlx = true;
    } else {
        return dt_err("%s: no tensor named " PREFIX_MM "* or " PREFIX_TEXT "* (not a Qwen3.5 checkpoint?)",
                      ck->dir);
    }
    return 0;
}

static int same_shape(const st_tensor *t, const int64_t *shape, int ndim) {
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
    return same;
}

/* mlx: conv1d may be stored [C,K,1] (the same bytes as [C,1,K]). */
static int check_tensor(const qwen35_tensor_spec *s, const st_tensor *t, const char *file, bool mlx) {
    int same = same_shape(t, s->shape, s->ndim);
    if (!same && mlx && s->kind == W_LIN_CONV) {
        int64_t kc1[3] = {s->shape[0], s->shape[2], s->shape[1]};
        same = same_shape(t, kc1, 3);
    }
    if (!same) {
        char want[96], got[96];
        io_format_shape(want, sizeof want, s->shape, s->ndim);
        io_format_shape(got, sizeof got, t->shape, t->ndim);
        return dt_err("%s: tensor %s has shape %s, expected %s", file, t->name, got, want);
    }
    if (!dt_dtype_is_float(t->dtype))
        return dt_err("%s: tensor %s has dtype %s; weights must be F32, F16 or BF16", file, t->name,
                      dt_dtype_name(t->dtype));
    return 0;
}

void *checkpoint_own(checkpoint *ck, size_t bytes) {
    void **grown = realloc(ck->copies, (size_t)(ck->n_copies + 1) * sizeof *grown);
    if (!grown) return NULL;
    ck->copies = grown;
    void *copy = malloc(bytes ? bytes : 1);
    if (copy) ck->copies[ck->n_copies++] = copy;
    return copy;
}

/* Consumers read weights as float / uint16_t arrays; safetensors only aligns the
 * buffer start, so a tensor after an odd-sized one gets an aligned private copy. */
static const void *aligned_data(checkpoint *ck, const st_tensor *t) {
    if ((uintptr_t)t->data % dt_dtype_size(t->dtype) == 0) return t->data;
    void *copy = checkpoint_own(ck, t->nbytes);
    if (copy) memcpy(copy, t->data, t->nbytes);
    return copy;
}

const char *const checkpoint_side_files[] = {
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja",    "vocab.json",     "merges.txt",            "added_tokens.json",
    NULL,
};

int checkpoint_norm_is_shifted(qwen35_wkind kind) {
    return kind == W_INPUT_NORM || kind == W_POST_NORM || kind == W_FINAL_NORM || kind == W_ATT_QNORM ||
           kind == W_ATT_KNORM;
}

int checkpoint_kind_is_quantizable(qwen35_wkind kind) {
    return kind == W_EMBED || kind == W_LM_HEAD || kind == W_MLP_GATE || kind == W_MLP_UP || kind == W_MLP_DOWN ||
           kind == W_LIN_QKV || kind == W_LIN_Z || kind == W_LIN_B || kind == W_LIN_A || kind == W_LIN_OUT ||
           kind == W_ATT_Q || kind == W_ATT_K || kind == W_ATT_V || kind == W_ATT_O;
}

/* An MLX norm stored +1: an owned fp32 copy holding the Hugging Face value. */
static int unshift_norm(checkpoint *ck, dt_weight *w, const st_tensor *t) {
    float *f = checkpoint_own(ck, (size_t)t->numel * sizeof *f);
    if (!f) return dt_err("out of memory");
    if (dt_to_f32(f, t->data, t->dtype, (size_t)t->numel) != 0) return dt_err("%s: not a float tensor", t->name);
    for (int64_t j = 0; j < t->numel; j++) f[j] -= 1.0f;
    w->dtype = DT_F32;
    w->data = f;
    return 0;
}

static int shape_err(const char *file, const char *name, const st_tensor *t, const int64_t *want, int ndim,
                     const char *why) {
    char ws[96], gs[96];
    io_format_shape(ws, sizeof ws, want, ndim);
    io_format_shape(gs, sizeof gs, t->shape, t->ndim);
    return dt_err("%s: tensor %s has shape %s, expected %s (%s)", file, name, gs, ws, why);
}

/* A quantized module: name.weight (U32 words), name.scales, name.biases. */
static int bind_quantized(checkpoint *ck, ck_entries *es, const json_t *cfg_root, const qwen35_tensor_spec *s,
                          ck_entry *e, ck_entry *se, dt_weight *w) {
    const st_tensor *t = e->t, *st = se->t;
    const char *file = ck->files[e->file].path;
    char module[160], bname[176];
    snprintf(module, sizeof module, "%.*s", (int)(strlen(t->name) - strlen(".weight")), t->name);
    snprintf(bname, sizeof bname, "%s.biases", module);
    ck_entry *be = find_entry(es, bname);
    if (!checkpoint_kind_is_quantizable(s->kind) || s->ndim != 2)
        return dt_err("%s: tensor %s.scales: only linears and embeddings can be quantized", file, module);
    if (!be) return dt_err("%s: tensor %s missing (%s.scales exists)", ck->dir, bname, module);
    int bits, group;
    module_quant(cfg_root, module, &bits, &group);
    if (bits == 0)
        return dt_err("%s: tensor %s.scales exists but config.json's quantization does not cover %s", ck->dir,
                      module, module);
    int64_t rows = s->shape[0], cols = s->shape[1];
    char what[200];
    snprintf(what, sizeof what, "%s: tensor %s", file, t->name);
    if (quant_check(bits, group, cols, what) != 0) return -1;
    if (t->dtype != DT_U32)
        return dt_err("%s: tensor %s has dtype %s; a quantized weight (%s.scales exists) must be U32", file, t->name,
                      dt_dtype_name(t->dtype), module);
    const st_tensor *bt = be->t;
    if (!dt_dtype_is_float(st->dtype) || bt->dtype != st->dtype)
        return dt_err("%s: tensors %s.scales and %s.biases have dtypes %s and %s; expected one of F32, F16, BF16",
                      file, module, module, dt_dtype_name(st->dtype), dt_dtype_name(bt->dtype));
    char why[96];
    snprintf(why, sizeof why, "%d-bit, group size %d", bits, group);
    int64_t wshape[2] = {rows, cols * bits / 32}, sshape[2] = {rows, cols / group};
    if (!same_shape(t, wshape, 2)) return shape_err(file, t->name, t, wshape, 2, why);
    if (!same_shape(st, sshape, 2)) return shape_err(file, st->name, st, sshape, 2, why);
    if (!same_shape(bt, sshape, 2)) return shape_err(file, bt->name, bt, sshape, 2, why);
    w->dtype = DT_U32;
    w->rows = rows;
    w->cols = cols;
    w->qbits = bits;
    w->qgroup = group;
    w->qdtype = st->dtype;
    w->data = aligned_data(ck, t);
    w->scales = aligned_data(ck, st);
    w->biases = aligned_data(ck, bt);
    if (!w->data || !w->scales || !w->biases) return dt_err("out of memory");
    if (quant_check_sizes(w, (int64_t)t->nbytes, (int64_t)st->nbytes, (int64_t)bt->nbytes, what) != 0) return -1;
    e->used = se->used = be->used = 1;
    ck->n_quantized++;
    return 0;
}

static int bind_weights(checkpoint *ck, ck_entries *es, const json_t *cfg_root) {
    ck->n_specs = qwen35_tensor_count(&ck->cfg);
    ck->specs = calloc((size_t)ck->n_specs, sizeof *ck->specs);
    ck->weights = calloc((size_t)ck->n_specs, sizeof *ck->weights);
    if (!ck->specs || !ck->weights) return dt_err("out of memory");
    qwen35_tensor_specs(&ck->cfg, ck->specs);
    for (int i = 0; i < ck->n_specs; i++) {
        const qwen35_tensor_spec *s = &ck->specs[i];
        char full[160], sname[176];
        if (s->kind == W_LM_HEAD) snprintf(full, sizeof full, "%s", ck->mlx ? LM_HEAD_MLX : s->name);
        else snprintf(full, sizeof full, "%s%s", ck->file_prefix, s->name);
        ck_entry *e = find_entry(es, full);
        if (!e) return dt_err("%s: tensor %s missing", ck->dir, full);
        const st_tensor *t = e->t;
        dt_weight *w = &ck->weights[i];
        /* a module is quantized iff its .scales exists (mlx-lm's rule) */
        size_t fl = strlen(full);
        ck_entry *se = NULL;
        if (fl > 7 && !strcmp(full + fl - 7, ".weight")) {
            snprintf(sname, sizeof sname, "%.*s.scales", (int)(fl - 7), full);
            se = find_entry(es, sname);
        }
        if (se) {
            if (bind_quantized(ck, es, cfg_root, s, e, se, w) != 0) return -1;
        } else {
            if (check_tensor(s, t, ck->files[e->file].path, ck->mlx) != 0) return -1;
            e->used = 1;
            w->dtype = t->dtype;
            w->rows = s->ndim == 1 ? 1 : s->shape[0];
            w->cols = s->shape[s->ndim - 1];
            if (ck->mlx && checkpoint_norm_is_shifted(s->kind)) {
                if (unshift_norm(ck, w, t) != 0) return dt_err_wrap("%s", ck->files[e->file].path);
            } else {
                w->data = aligned_data(ck, t);
                if (!w->data) return dt_err("out of memory");
            }
        }
        ck->weight_bytes += dt_weight_bytes(w);
    }
    for (int i = 0; i < es->n; i++) {
        if (es->v[i].used) continue;
        if (is_skipped(es->v[i].t->name)) ck->n_skipped++;
        else ck->n_unexpected++;
    }
    return 0;
}

static int open_checkpoint(checkpoint *ck, ck_entries *es, json_t **cfg_root) {
    char *cfg_path = io_path_join(ck->dir, "config.json");
    if (!cfg_path) return dt_err("out of memory");
    int rc = qwen35_config_load(&ck->cfg, cfg_path);
    if (rc == 0) *cfg_root = io_load_json(cfg_path);
    free(cfg_path);
    if (rc != 0 || !*cfg_root) return -1;
    if (qwen35_quant_record(*cfg_root, &ck->qbits, &ck->qgroup) != 0) return -1;
    if (open_files(ck, es) != 0 || detect_layout(ck, es) != 0) return -1;
    if (find_entry(es, ck->mlx ? LM_HEAD_MLX : "lm_head.weight")) {
        ck->lm_head_in_file = true;
        ck->cfg.tie_word_embeddings = false;
    } else if (!ck->cfg.tie_word_embeddings) {
        return dt_err("%s: config.json says tie_word_embeddings is false but %s is missing", ck->dir,
                      ck->mlx ? LM_HEAD_MLX : "lm_head.weight");
    }
    return bind_weights(ck, es, *cfg_root);
}

int checkpoint_open(checkpoint *ck, const char *dir) {
    memset(ck, 0, sizeof *ck);
    ck->dir = strdup(dir);
    if (!ck->dir) return dt_err("%s: out of memory", dir);
    ck_entries es = {0};
    json_t *cfg_root = NULL;
    int rc = open_checkpoint(ck, &es, &cfg_root);
    json_decref(cfg_root);
    free(es.v);
    if (rc != 0) checkpoint_close(ck);
    return rc;
}

void checkpoint_close(checkpoint *ck) {
    if (!ck) return;
    for (int i = 0; i < ck->n_files; i++) st_close(&ck->files[i]);
    free(ck->files);
    for (int i = 0; i < ck->n_copies; i++) free(ck->copies[i]);
    free(ck->copies);
    free(ck->specs);
    free(ck->weights);
    free(ck->dir);
    memset(ck, 0, sizeof *ck);
}

const dt_weight *checkpoint_weight(const checkpoint *ck, qwen35_wkind kind, int layer) {
    for (int i = 0; i < ck->n_specs; i++)
        if (ck->specs[i].kind == kind && ck->specs[i].layer == layer) return &ck->weights[i];
    return NULL;
}
