#include "deltatune/files.h"
#include "deltatune/adapter.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"
#include "deltatune/rng.h"

#define PEFT_PREFIX "base_model.model."
#define PREFIX_MM "model.language_model."
#define PREFIX_TEXT "model."

/* ---------------------------------------------------------------- adapter_config.json */

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: case JSON_REAL: return "a number";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

static json_t *field(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_null(v) ? NULL : v;
}

static int get_number(json_t *o, const char *key, double def, double *out) {
    json_t *v = field(o, key);
    *out = def;
    if (!v) return 0;
    if (!json_is_number(v)) return dt_err("field %s: expected a number, found %s", key, json_type_name(v));
    *out = json_number_value(v);
    return 0;
}

static int get_flag(json_t *o, const char *key, bool *out) {
    json_t *v = field(o, key);
    *out = false;
    if (!v) return 0;
    if (!json_is_boolean(v)) return dt_err("field %s: expected true or false, found %s", key, json_type_name(v));
    *out = json_is_true(v);
    return 0;
}

/* Empty containers and null mean "not used", as PEFT writes them. */
static int is_set(json_t *v) {
    if (!v) return 0;
    if (json_is_object(v)) return json_object_size(v) > 0;
    if (json_is_array(v)) return json_array_size(v) > 0;
    return 1;
}

/* Options that change what the tensors mean; loading them as plain LoRA would be wrong. */
static int reject_unsupported(json_t *o) {
    const char *flags[][2] = {
        {"use_dora", "DoRA adapters are not supported"},
        {"fan_in_fan_out", "fan_in_fan_out (transposed weights) is not supported"},
        {"lora_bias", "a bias on lora_B is not supported"},
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        bool b;
        if (get_flag(o, flags[i][0], &b) != 0) return -1;
        if (b) return dt_err("field %s: %s", flags[i][0], flags[i][1]);
    }
    const char *maps[] = {"rank_pattern", "alpha_pattern", "modules_to_save"};
    for (size_t i = 0; i < sizeof maps / sizeof maps[0]; i++)
        if (is_set(field(o, maps[i])))
            return dt_err("field %s: per-module overrides and saved modules are not supported", maps[i]);
    json_t *bias = field(o, "bias");
    if (bias && (!json_is_string(bias) || strcmp(json_string_value(bias), "none") != 0))
        return dt_err("field bias: only \"none\" is supported");
    return 0;
}

static int parse_targets(lora_adapter *a, json_t *o) {
    json_t *t = field(o, "target_modules");
    /* A string is a regex over full module names; the tensors say what it matched. */
    if (!t || json_is_string(t)) return 0;
    if (!json_is_array(t))
        return dt_err("field target_modules: expected a list or a string, found %s", json_type_name(t));
    size_t n = json_array_size(t);
    a->targets = calloc(n + 1, sizeof *a->targets);
    if (!a->targets) return dt_err("out of memory");
    for (size_t i = 0; i < n; i++) {
        const char *s = json_string_value(json_array_get(t, i));
        if (!s) return dt_err("field target_modules[%zu]: expected a string", i);
        if (!(a->targets[a->n_targets] = strdup(s))) return dt_err("out of memory");
        a->n_targets++;
    }
    return 0;
}

static int parse_adapter_config(lora_adapter *a, json_t *o) {
    if (!json_is_object(o)) return dt_err("expected a JSON object");
    json_t *pt = field(o, "peft_type");
    if (!pt) return dt_err("missing required field peft_type");
    if (!json_is_string(pt) || strcmp(json_string_value(pt), "LORA") != 0)
        return dt_err("field peft_type: %s%s%s is not supported (LORA expected)", json_is_string(pt) ? "\"" : "",
                      json_is_string(pt) ? json_string_value(pt) : json_type_name(pt), json_is_string(pt) ? "\"" : "");
    if (reject_unsupported(o) != 0) return -1;
    double r;
    if (get_number(o, "r", 8, &r) != 0) return -1;
    if (!(r >= 1 && r <= 1 << 20 && r == floor(r))) return dt_err("field r: %g is not a positive integer", r);
    a->rank = (int)r;
    if (get_number(o, "lora_alpha", 8, &a->alpha) != 0) return -1;
    if (!isfinite(a->alpha)) return dt_err("field lora_alpha: not a finite number");
    if (get_number(o, "lora_dropout", 0, &a->dropout) != 0) return -1;
    if (!(a->dropout >= 0 && a->dropout < 1)) return dt_err("field lora_dropout: %g is outside [0, 1)", a->dropout);
    if (get_flag(o, "use_rslora", &a->rslora) != 0) return -1;
    return parse_targets(a, o);
}

static int load_config(lora_adapter *a, const char *dir) {
    char *path = io_path_join(dir, "adapter_config.json");
    if (!path) return dt_err("out of memory");
    json_t *o = io_load_json(path);
    int rc = o ? parse_adapter_config(a, o) : -1;
    if (o && rc != 0) dt_err_wrap("%s", path);
    json_decref(o);
    free(path);
    return rc;
}

/* ---------------------------------------------------------------- tensors */

typedef struct {
    const char *key;   /* the full safetensors name */
    qwen35_wkind kind;
    int layer;
    int is_b;
} lora_key;

/* The (kind, layer) of a module path like "layers.3.self_attn.q_proj", among the
 * linears this model has: a q_proj on a Gated DeltaNet layer names nothing. */
static int resolve_module(const char *path, size_t len, const checkpoint *ck, qwen35_wkind *kind, int *layer) {
    if (strncmp(path, "layers.", 7) != 0) return -1;
    char *end;
    long l = strtol(path + 7, &end, 10);
    if (end == path + 7 || l < 0 || l >= ck->cfg.n_layers) return -1;
    for (int k = 0; k < W_KIND_COUNT; k++) {
        if (!qwen35_lora_module_name((qwen35_wkind)k)) continue;
        char want[96];
        qwen35_module_path(want, sizeof want, (qwen35_wkind)k, (int)l);
        if (strlen(want) == len && strncmp(want, path, len) == 0 && checkpoint_weight(ck, (qwen35_wkind)k, (int)l)) {
            *kind = (qwen35_wkind)k;
            *layer = (int)l;
            return 0;
        }
    }
    return -1;
}

static int ends_with(const char *s, size_t n, const char *suffix) {
    size_t k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

/* Key layout (PEFT save_and_load): base_model.model. + model prefix + module path +
 * .lora_A.weight / .lora_B.weight. Both model prefixes are accepted: the tensors are
 * the same whichever class PEFT wrapped. */
static int parse_key(lora_key *k, const char *key, const checkpoint *ck) {
    k->key = key;
    if (strncmp(key, PEFT_PREFIX, strlen(PEFT_PREFIX)) != 0)
        return dt_err("tensor %s: expected a name starting with " PEFT_PREFIX, key);
    const char *p = key + strlen(PEFT_PREFIX);
    if (strncmp(p, PREFIX_MM, strlen(PREFIX_MM)) == 0) p += strlen(PREFIX_MM);
    else if (strncmp(p, PREFIX_TEXT, strlen(PREFIX_TEXT)) == 0) p += strlen(PREFIX_TEXT);
    else return dt_err("tensor %s: names no module of this model", key);
    size_t n = strlen(p);
    if (ends_with(p, n, ".lora_A.weight")) k->is_b = 0;
    else if (ends_with(p, n, ".lora_B.weight")) k->is_b = 1;
    else return dt_err("tensor %s: not a lora_A or lora_B weight (unsupported adapter tensor)", key);
    if (resolve_module(p, n - strlen(".lora_A.weight"), ck, &k->kind, &k->layer) != 0)
        return dt_err("tensor %s: names no LoRA-targetable module of this model", key);
    return 0;
}

static lora_module *module_for(lora_adapter *a, qwen35_wkind kind, int layer) {
    for (int i = 0; i < a->n_modules; i++)
        if (a->modules[i].kind == kind && a->modules[i].layer == layer) return &a->modules[i];
    lora_module *m = &a->modules[a->n_modules++];
    memset(m, 0, sizeof *m);
    m->kind = kind;
    m->layer = layer;
    return m;
}

/* PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA. */
static float lora_scale(const lora_adapter *a) {
    return (float)(a->rslora ? a->alpha / sqrt((double)a->rank) : a->alpha / a->rank);
}

static int load_tensor(lora_adapter *a, const st_tensor *t, const checkpoint *ck) {
    lora_key k = {0};
    if (parse_key(&k, t->name, ck) != 0) return -1;
    const dt_weight *w = checkpoint_weight(ck, k.kind, k.layer);
    int64_t want0 = k.is_b ? w->rows : a->rank, want1 = k.is_b ? a->rank : w->cols;
    if (t->ndim != 2 || t->shape[0] != want0 || t->shape[1] != want1) {
        char got[160];
        io_format_shape(got, sizeof got, t->shape, t->ndim);
        return dt_err("tensor %s has shape %s, expected [%lld, %lld] (rank %d, base weight [%lld, %lld])", t->name,
                      got, (long long)want0, (long long)want1, a->rank, (long long)w->rows, (long long)w->cols);
    }
    if (!dt_dtype_is_float(t->dtype))
        return dt_err("tensor %s has dtype %s; F32, F16 or BF16 expected", t->name, dt_dtype_name(t->dtype));
    lora_module *m = module_for(a, k.kind, k.layer);
    float **slot = k.is_b ? &m->lora.B : &m->lora.A;
    if (*slot) return dt_err("tensor %s: a second lora_%c for the same module", t->name, k.is_b ? 'B' : 'A');
    if (!(*slot = st_tensor_to_f32(t))) return dt_err("out of memory");
    m->lora.rank = a->rank;
    m->lora.in = w->cols;
    m->lora.out = w->rows;
    m->lora.scale = lora_scale(a);
    return 0;
}

static int by_position(const void *x, const void *y) {
    const lora_module *a = x, *b = y;
    if (a->layer != b->layer) return a->layer < b->layer ? -1 : 1;
    return (int)a->kind - (int)b->kind;
}

/* With a regex (or no) target_modules, the names of the modules actually present. */
static int targets_from_modules(lora_adapter *a) {
    a->targets = calloc(W_KIND_COUNT, sizeof *a->targets);
    if (!a->targets) return dt_err("out of memory");
    for (int k = 0; k < W_KIND_COUNT; k++) {
        int present = 0;
        for (int i = 0; i < a->n_modules && !present; i++) present = a->modules[i].kind == (qwen35_wkind)k;
        if (!present) continue;
        if (!(a->targets[a->n_targets] = strdup(qwen35_lora_module_name((qwen35_wkind)k)))) return dt_err("out of memory");
        a->n_targets++;
    }
    return 0;
}

static int load_tensors(lora_adapter *a, const st_file *f, const checkpoint *ck) {
    if (f->n == 0) return dt_err("no LoRA tensors");
    a->modules = calloc((size_t)f->n, sizeof *a->modules);
    if (!a->modules) return dt_err("out of memory");
    for (int i = 0; i < f->n; i++)
        if (load_tensor(a, &f->tensors[i], ck) != 0) return -1;
    for (int i = 0; i < a->n_modules; i++) {
        const lora_module *m = &a->modules[i];
        if (!m->lora.A || !m->lora.B) {
            char path[96];
            qwen35_module_path(path, sizeof path, m->kind, m->layer);
            return dt_err("module %s has lora_%c but no lora_%c", path, m->lora.A ? 'A' : 'B', m->lora.A ? 'B' : 'A');
        }
    }
    qsort(a->modules, (size_t)a->n_modules, sizeof *a->modules, by_position);
    return a->targets ? 0 : targets_from_modules(a);
}

static int load_weights(lora_adapter *a, const char *dir, const checkpoint *ck) {
    char *path = io_path_join(dir, "adapter_model.safetensors");
    if (!path) return dt_err("out of memory");
    if (!io_file_exists(path)) {
        char *bin = io_path_join(dir, "adapter_model.bin");
        int has_bin = bin && io_file_exists(bin);
        free(bin);
        if (has_bin) {
            dt_err("%s: missing; adapter_model.bin (PyTorch pickle) is not supported, save with "
                   "safe_serialization=True", path);
            free(path);
            return -1;
        }
    }
    st_file f;
    int rc = st_open(&f, path);
    if (rc == 0) {
        rc = load_tensors(a, &f, ck);
        if (rc != 0) dt_err_wrap("%s", path);
        st_close(&f);
    }
    free(path);
    return rc;
}

int adapter_load(lora_adapter *a, const char *dir, const checkpoint *ck) {
    memset(a, 0, sizeof *a);
    if (load_config(a, dir) != 0 || load_weights(a, dir, ck) != 0) {
        adapter_free(a);
        return -1;
    }
    return 0;
}

void adapter_free(lora_adapter *a) {
    if (!a) return;
    for (int i = 0; i < a->n_targets; i++) free(a->targets[i]);
    free(a->targets);
    for (int i = 0; i < a->n_modules; i++) {
        free(a->modules[i].lora.A);
        free(a->modules[i].lora.B);
        free(a->modules[i].lora.dA);
        free(a->modules[i].lora.dB);
    }
    free(a->modules);
    memset(a, 0, sizeof *a);
}

/* ---------------------------------------------------------------- new adapters */

/* The kind whose PEFT module name is `name`; -1 if no LoRA-targetable linear has it. */
static int kind_of_target(const char *name) {
    for (int k = 0; k < W_KIND_COUNT; k++) {
        const char *m = qwen35_lora_module_name((qwen35_wkind)k);
        if (m && strcmp(m, name) == 0) return k;
    }
    return -1;
}

static int unknown_target(const char *name) {
    char known[256];
    qwen35_lora_module_names(known, sizeof known);
    return dt_err("unknown LoRA target '%s' (known: %s)", name, known);
}

static int by_name(const void *x, const void *y) { return strcmp(*(char *const *)x, *(char *const *)y); }

/* a->targets: the names given, without repeats, sorted as adapter_config.json lists them. */
static int set_targets(lora_adapter *a, const char *const *targets, int n, bool wanted[W_KIND_COUNT]) {
    a->targets = calloc((size_t)n + 1, sizeof *a->targets);
    if (!a->targets) return dt_err("out of memory");
    for (int i = 0; i < n; i++) {
        int k = targets[i] ? kind_of_target(targets[i]) : -1;
        if (k < 0) return unknown_target(targets[i] ? targets[i] : "");
        if (wanted[k]) continue;
        wanted[k] = true;
        if (!(a->targets[a->n_targets] = strdup(targets[i]))) return dt_err("out of memory");
        a->n_targets++;
    }
    qsort(a->targets, (size_t)a->n_targets, sizeof *a->targets, by_name);
    return 0;
}

/* PEFT's default init: A Kaiming-uniform with a = sqrt(5), which is uniform in +-1/sqrt(in);
 * B zero, so the adapter starts as the identity. Each module draws from its own stream
 * (layer, kind), so adding a target leaves the other modules' A as they were. */
static int init_module(lora_module *m, const lora_adapter *a, const dt_weight *w, uint64_t seed) {
    dt_lora *l = &m->lora;
    l->rank = a->rank;
    l->in = w->cols;
    l->out = w->rows;
    l->scale = lora_scale(a);
    l->A = malloc((size_t)(a->rank * w->cols) * sizeof *l->A);
    l->B = calloc((size_t)(w->rows * a->rank), sizeof *l->B);
    if (!l->A || !l->B) return dt_err("out of memory");
    dt_rng r;
    dt_rng_seed2(&r, seed, (uint64_t)m->layer * W_KIND_COUNT + (uint64_t)m->kind);
    float bound = (float)(1.0 / sqrt((double)w->cols));
    dt_rng_fill_uniform(&r, l->A, (size_t)(a->rank * w->cols), -bound, bound);
    return 0;
}

static int init_modules(lora_adapter *a, const checkpoint *ck, const bool wanted[W_KIND_COUNT], uint64_t seed) {
    int n = 0;
    for (int l = 0; l < ck->cfg.n_layers; l++)
        for (int k = 0; k < W_KIND_COUNT; k++) n += wanted[k] && checkpoint_weight(ck, (qwen35_wkind)k, l);
    if (n == 0) return dt_err("none of the LoRA targets names a linear of this model");
    a->modules = calloc((size_t)n, sizeof *a->modules);
    if (!a->modules) return dt_err("out of memory");
    /* layer-major, then kind: the order adapter_load sorts into */
    for (int l = 0; l < ck->cfg.n_layers; l++)
        for (int k = 0; k < W_KIND_COUNT; k++) {
            const dt_weight *w = wanted[k] ? checkpoint_weight(ck, (qwen35_wkind)k, l) : NULL;
            if (!w) continue;
            lora_module *m = &a->modules[a->n_modules++];
            m->kind = (qwen35_wkind)k;
            m->layer = l;
            if (init_module(m, a, w, seed) != 0) return -1;
        }
    return 0;
}

int adapter_init(lora_adapter *a, const checkpoint *ck, int rank, double alpha, bool rslora,
                 double dropout, const char *const *targets, int n_targets, uint64_t seed) {
    memset(a, 0, sizeof *a);
    if (rank < 1) return dt_err("LoRA rank %d: must be at least 1", rank);
    if (!isfinite(alpha)) return dt_err("LoRA alpha is not a finite number");
    if (!(dropout >= 0 && dropout < 1)) return dt_err("LoRA dropout %g is outside [0, 1)", dropout);
    if (n_targets < 1) return dt_err("no LoRA target modules given");
    a->rank = rank;
    a->alpha = alpha;
    a->rslora = rslora;
    a->dropout = dropout;
    bool wanted[W_KIND_COUNT] = {0};
    if (set_targets(a, targets, n_targets, wanted) != 0 || init_modules(a, ck, wanted, seed) != 0) {
        adapter_free(a);
        return -1;
    }
    return 0;
}

int adapter_alloc_grads(lora_adapter *a) {
    for (int i = 0; i < a->n_modules; i++) {
        dt_lora *l = &a->modules[i].lora;
        if (!l->dA) l->dA = calloc((size_t)(l->rank * l->in), sizeof *l->dA);
        if (!l->dB) l->dB = calloc((size_t)(l->out * l->rank), sizeof *l->dB);
        if (!l->dA || !l->dB) return dt_err("out of memory for LoRA gradients");
    }
    return 0;
}

/* ---------------------------------------------------------------- saving */

/* Integers as integers (PEFT writes "lora_alpha": 16), other values as reals. */
static json_t *json_num(double x) {
    return x == floor(x) && fabs(x) < 1e15 ? json_integer((json_int_t)x) : json_real(x);
}

/* The fewest digits (15..17) that read back as the same doubles, so 0.05 is not written
 * as 0.050000000000000003. */
static int real_digits(const double *xs, int n) {
    for (int p = 15; p < 17; p++) {
        int ok = 1;
        for (int i = 0; i < n && ok; i++) {
            char buf[40];
            snprintf(buf, sizeof buf, "%.*g", p, xs[i]);
            ok = strtod(buf, NULL) == xs[i];
        }
        if (ok) return p;
    }
    return 17;
}

#define DT_PEFT_VERSION "0.19.1"

/* The fields formats.md §8.1 lists as the minimum a writer emits, plus the other LoraConfig
 * defaults a reader may look at. */
static json_t *config_json(const lora_adapter *a, const checkpoint *ck) {
    json_t *o = json_object(), *targets = json_array();
    if (!o || !targets) {
        json_decref(o);
        json_decref(targets);
        return NULL;
    }
    for (int i = 0; i < a->n_targets; i++) json_array_append_new(targets, json_string(a->targets[i]));
    json_object_set_new(o, "peft_type", json_string("LORA"));
    json_object_set_new(o, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(o, "base_model_name_or_path", json_string(ck->dir ? ck->dir : ""));
    json_object_set_new(o, "revision", json_null());
    json_object_set_new(o, "r", json_integer(a->rank));
    json_object_set_new(o, "lora_alpha", json_num(a->alpha));
    json_object_set_new(o, "lora_dropout", json_real(a->dropout));
    json_object_set_new(o, "target_modules", targets);
    json_object_set_new(o, "exclude_modules", json_null());
    json_object_set_new(o, "bias", json_string("none"));
    json_object_set_new(o, "lora_bias", json_false());
    json_object_set_new(o, "use_rslora", json_boolean(a->rslora));
    json_object_set_new(o, "use_dora", json_false());
    json_object_set_new(o, "fan_in_fan_out", json_false());
    json_object_set_new(o, "inference_mode", json_true());
    json_object_set_new(o, "init_lora_weights", json_true());
    json_object_set_new(o, "modules_to_save", json_null());
    json_object_set_new(o, "layers_to_transform", json_null());
    json_object_set_new(o, "layers_pattern", json_null());
    json_object_set_new(o, "rank_pattern", json_object());
    json_object_set_new(o, "alpha_pattern", json_object());
    json_object_set_new(o, "auto_mapping", json_null());
    json_object_set_new(o, "peft_version", json_string(DT_PEFT_VERSION));
    return o;
}

static int save_config(const lora_adapter *a, const checkpoint *ck, const char *path) {
    json_t *o = config_json(a, ck);
    if (!o) return dt_err("%s: out of memory", path);
    double reals[2] = {a->alpha, a->dropout};
    int rc = io_write_json_atomic(path, o, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(real_digits(reals, 2)));
    json_decref(o);
    return rc;
}

static int save_tensors(const lora_adapter *a, const checkpoint *ck, const char *path) {
    int n = 2 * a->n_modules;
    st_entry *e = calloc((size_t)n + 1, sizeof *e);
    char (*names)[192] = calloc((size_t)n + 1, sizeof *names);
    int rc = -1;
    if (!e || !names) {
        dt_err("%s: out of memory", path);
        goto out;
    }
    for (int i = 0; i < a->n_modules; i++) {
        const lora_module *m = &a->modules[i];
        char mod[96];
        qwen35_module_path(mod, sizeof mod, m->kind, m->layer);
        for (int b = 0; b < 2; b++) {
            int j = 2 * i + b;
            snprintf(names[j], sizeof names[j], PEFT_PREFIX "%s%s.lora_%c.weight", ck->prefix, mod, b ? 'B' : 'A');
            e[j] = (st_entry){.name = names[j], .dtype = DT_F32, .ndim = 2,
                              .shape = {b ? m->lora.out : m->lora.rank, b ? m->lora.rank : m->lora.in},
                              .data = b ? m->lora.B : m->lora.A};
        }
    }
    rc = st_write(path, e, n);
out:
    free(e);
    free(names);
    return rc;
}

int adapter_save(const lora_adapter *a, const checkpoint *ck, const char *dir) {
    if (a->n_modules == 0) return dt_err("%s: the adapter has no modules to save", dir);
    if (io_make_dirs(dir) != 0) return -1;
    char *st = io_path_join(dir, "adapter_model.safetensors"), *cfg = io_path_join(dir, "adapter_config.json");
    int rc = !st || !cfg ? dt_err("out of memory") : save_tensors(a, ck, st) != 0 ? -1 : save_config(a, ck, cfg);
    free(st);
    free(cfg);
    return rc;
}
