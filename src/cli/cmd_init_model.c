/* deltatune init-model: a randomly initialised Qwen3.5 of a preset size, in the Hugging Face
 * folder layout, for tests and benchmarks without downloading weights. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/args.h"
#include "deltatune/checkpoint.h"
#include "deltatune/config.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/mem.h"
#include "deltatune/progress.h"
#include "deltatune/rng.h"
#include "deltatune/safetensors.h"
#include "deltatune/weights.h"

#define CMD "init-model"
#define SUMMARY                                                                                        \
    "Writes DIR/config.json and DIR/model.safetensors for a preset size with random weights from the\n"  \
    "seed, initialised as transformers does: linears and embeddings normal(0, --init-std), RMSNorm weights 0\n" \
    "(zero-centred), the gated norm 1, conv1d uniform(+-1/sqrt(K)), dt_bias 1, A_log = log(U(1, 16))\n"  \
    "(kept F32). The same seed gives the same values whatever the dtype or thread count. Files are\n"     \
    "written to temporary names and renamed, so a failed run leaves nothing behind."

/* Each run of STREAM elements has its own RNG stream, so a block can be filled by any number of
 * threads with the same result; BLOCK elements are generated, then written, at a time. */
#define STREAM ((int64_t)1 << 16)
#define BLOCK (STREAM * 256)
#define SUB 1024

static const char *const dtypes[] = {"bf16", "f32", "f16", NULL};
static const char *const layouts[] = {"multimodal", "text", NULL};

typedef struct {
    const char *preset, *out, *dtype, *layout;
    int seed, vocab_size;
    double init_std;
    bool force;
} init_opts;

/* Set by SIGINT/SIGTERM: the write loop stops between blocks and removes its temp file, so an
 * interrupted run leaves nothing behind either. */
static volatile sig_atomic_t interrupted;
static void on_signal(int sig) { interrupted = sig; }

typedef enum { INIT_NORMAL, INIT_ZERO, INIT_ONE, INIT_CONV, INIT_A_LOG } init_kind;

static init_kind init_of(qwen35_wkind k) {
    switch (k) {
    case W_FINAL_NORM: case W_INPUT_NORM: case W_POST_NORM: case W_ATT_QNORM: case W_ATT_KNORM:
        return INIT_ZERO;  /* these norms scale by (1 + w) */
    case W_LIN_NORM: case W_LIN_DT_BIAS: return INIT_ONE;
    case W_LIN_CONV: return INIT_CONV;
    case W_LIN_A_LOG: return INIT_A_LOG;
    default: return INIT_NORMAL;
    }
}

/* Fills elements [start, start + n) of tensor t, converted to dtype, into out. */
static void fill_block(void *out, dt_dtype dtype, int64_t start, int64_t n, int t, init_kind kind, int conv_k,
                       float std, uint64_t seed) {
    size_t esz = dt_dtype_size(dtype);
    int64_t first = start / STREAM, last = (start + n + STREAM - 1) / STREAM;
    float bound = conv_k > 0 ? 1.0f / sqrtf((float)conv_k) : 0;
#pragma omp parallel for schedule(dynamic)
    for (int64_t s = first; s < last; s++) {
        float tmp[SUB];
        dt_rng r;
        dt_rng_seed2(&r, seed, ((uint64_t)t << 32) | (uint64_t)s);
        int64_t lo = s * STREAM, hi = lo + STREAM;
        if (lo < start) lo = start;  /* never happens while BLOCK is a multiple of STREAM */
        if (hi > start + n) hi = start + n;
        for (int64_t i = lo; i < hi; i += SUB) {
            int m = (int)(hi - i < SUB ? hi - i : SUB);
            switch (kind) {
            case INIT_NORMAL: dt_rng_fill_normal(&r, tmp, (size_t)m, 0, std); break;
            case INIT_ZERO: for (int j = 0; j < m; j++) tmp[j] = 0; break;
            case INIT_ONE: for (int j = 0; j < m; j++) tmp[j] = 1; break;
            case INIT_CONV: dt_rng_fill_uniform(&r, tmp, (size_t)m, -bound, bound); break;
            case INIT_A_LOG:
                dt_rng_fill_uniform(&r, tmp, (size_t)m, 1, 16);
                for (int j = 0; j < m; j++) tmp[j] = logf(tmp[j]);
                break;
            }
            dt_from_f32((char *)out + (size_t)(i - start) * esz, dtype, tmp, (size_t)m);
        }
    }
}

/* The directories this run made, removed again (deepest first) if it fails. */
typedef struct {
    int n;
    char *paths[64];
} made_dirs;

static void unmake_dirs(made_dirs *m) {
    for (int i = m->n - 1; i >= 0; i--) {
        rmdir(m->paths[i]);
        free(m->paths[i]);
    }
    m->n = 0;
}

static void keep_dirs(made_dirs *m) {
    for (int i = 0; i < m->n; i++) free(m->paths[i]);
    m->n = 0;
}

/* mkdir -p, recording what it created. */
static int make_dirs(const char *dir, made_dirs *m) {
    char path[PATH_MAX];
    if (strlen(dir) >= sizeof path) return dt_err("%s: path too long", dir);
    strcpy(path, dir);
    size_t len = strlen(path);
    for (size_t i = 1; i <= len; i++) {
        if (path[i] != '/' && path[i] != 0) continue;
        if (path[i - 1] == '/') continue;
        char c = path[i];
        path[i] = 0;
        struct stat st;
        if (stat(path, &st) == 0) {
            if (!S_ISDIR(st.st_mode)) return dt_err("%s: not a directory", path);
        } else if (errno != ENOENT) {
            return dt_err("%s: %s", path, strerror(errno));
        } else if (mkdir(path, 0777) != 0) {
            return dt_err("%s: cannot create: %s", path, strerror(errno));
        } else if (m->n < 64) {
            m->paths[m->n++] = strdup(path);
        }
        path[i] = c;
    }
    return 0;
}

static bool exists(const char *dir, const char *name) {
    char *p = io_path_join(dir, name);
    bool found = p && io_file_exists(p);
    free(p);
    return found;
}

static int write_model(const init_opts *o, const qwen35_config *c, dt_dtype dtype, qwen35_layout layout,
                       int64_t *params_out, int64_t *bytes_out) {
    int n = qwen35_tensor_count(c), rc = -1;
    qwen35_tensor_spec *specs = calloc((size_t)n, sizeof *specs);
    st_entry *entries = calloc((size_t)n, sizeof *entries);
    char (*names)[160] = calloc((size_t)n, sizeof *names);
    void *buf = NULL;
    st_writer *w = NULL;
    if (!specs || !entries || !names) {
        dt_err("out of memory");
        goto out;
    }
    n = qwen35_tensor_specs(c, specs);
    const char *prefix = layout == LAYOUT_MULTIMODAL ? "model.language_model." : "model.";
    int64_t params = 0, total_bytes = 0, max_numel = 0;
    for (int i = 0; i < n; i++) {
        const qwen35_tensor_spec *s = &specs[i];
        if (s->kind == W_LM_HEAD) snprintf(names[i], sizeof names[i], "%s", s->name);
        else snprintf(names[i], sizeof names[i], "%s%s", prefix, s->name);
        st_entry *e = &entries[i];
        e->name = names[i];
        e->dtype = s->kind == W_LIN_A_LOG ? DT_F32 : dtype;  /* HF keeps A_log in fp32 */
        e->ndim = s->ndim;
        for (int d = 0; d < s->ndim; d++) e->shape[d] = s->shape[d];
        int64_t numel = qwen35_spec_numel(s);
        params += numel;
        total_bytes += numel * (int64_t)dt_dtype_size(e->dtype);
        if (numel > max_numel) max_numel = numel;
    }
    int64_t block = max_numel < BLOCK ? max_numel : BLOCK;
    buf = malloc((size_t)(block > 0 ? block : 1) * 4);
    if (!buf) {
        dt_err("out of memory");
        goto out;
    }

    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/model.safetensors", o->out);
    if (st_writer_open(&w, path, entries, n)) goto out;
    dt_progress prog;
    dt_progress_start(&prog, CMD, total_bytes, NULL, NULL);
    int64_t written = 0;
    for (int i = 0; i < n; i++) {
        const qwen35_tensor_spec *s = &specs[i];
        int64_t numel = qwen35_spec_numel(s);
        init_kind kind = init_of(s->kind);
        int conv_k = s->kind == W_LIN_CONV ? (int)s->shape[s->ndim - 1] : 0;
        size_t esz = dt_dtype_size(entries[i].dtype);
        for (int64_t start = 0; start < numel; start += block) {
            int64_t m = numel - start < block ? numel - start : block;
            if (interrupted) {
                dt_progress_finish(&prog);
                dt_err("interrupted; nothing written");
                goto out;
            }
            fill_block(buf, entries[i].dtype, start, m, i, kind, conv_k, (float)o->init_std, (uint64_t)(uint32_t)o->seed);
            if (st_writer_write(w, buf, (size_t)m * esz)) {
                dt_progress_finish(&prog);
                goto out;
            }
            written += m * (int64_t)esz;
            dt_progress_update(&prog, written, 0);
        }
    }
    dt_progress_finish(&prog);
    int crc = st_writer_close(w);
    w = NULL;
    if (crc) goto out;
    *params_out = params;
    *bytes_out = total_bytes;
    rc = 0;
out:
    if (w) st_writer_abort(w);
    free(buf);
    free(names);
    free(entries);
    free(specs);
    return rc;
}

static int run(const init_opts *o) {
    qwen35_config c;
    if (qwen35_preset(o->preset, &c)) return cli_fail(CMD, EXIT_USAGE);
    if (o->vocab_size > 0) c.vocab_size = o->vocab_size;
    dt_dtype dtype = !strcmp(o->dtype, "f32") ? DT_F32 : !strcmp(o->dtype, "f16") ? DT_F16 : DT_BF16;
    qwen35_layout layout = !strcmp(o->layout, "text") ? LAYOUT_TEXT : LAYOUT_MULTIMODAL;

    struct stat st;
    if (stat(o->out, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) {
            dt_err("%s: exists and is not a directory", o->out);
            return cli_fail(CMD, EXIT_RUNTIME);
        }
        /* Shards and an index would shadow the new single file when the folder is read. */
        if (exists(o->out, "model.safetensors.index.json")) {
            dt_err("%s holds a sharded checkpoint (model.safetensors.index.json); remove it first", o->out);
            return cli_fail(CMD, EXIT_RUNTIME);
        }
        if (!o->force && (exists(o->out, "config.json") || exists(o->out, "model.safetensors"))) {
            dt_err("%s already holds a model; pass --force to overwrite it", o->out);
            return cli_fail(CMD, EXIT_RUNTIME);
        }
    }
    made_dirs made = {0};
    if (make_dirs(o->out, &made)) {
        unmake_dirs(&made);
        return cli_fail(CMD, EXIT_RUNTIME);
    }

    double t0 = dt_seconds();
    int64_t params = 0, bytes = 0;
    char path[PATH_MAX];
    struct sigaction sa = {.sa_handler = on_signal}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    int wrc = write_model(o, &c, dtype, layout, &params, &bytes);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (wrc) {
        unmake_dirs(&made);
        return cli_fail(CMD, interrupted ? 128 + interrupted : EXIT_RUNTIME);
    }
    /* config.json last: a folder with a config is a complete model. */
    snprintf(path, sizeof path, "%s/config.json", o->out);
    if (qwen35_config_save_dtype(&c, layout, dtype, path)) {
        char st_path[PATH_MAX];
        snprintf(st_path, sizeof st_path, "%s/model.safetensors", o->out);
        unlink(st_path);
        unmake_dirs(&made);
        return cli_fail(CMD, EXIT_RUNTIME);
    }
    keep_dirs(&made);
    double secs = dt_seconds() - t0;
    char pb[32], bb[32];
    fprintf(stderr, "init-model: wrote %s: preset %s, %s params (%lld), %s %s layout, %s in %.1f s (seed %d)\n",
            o->out, o->preset, cli_human_count(pb, sizeof pb, (double)params), (long long)params,
            dt_dtype_name(dtype), o->layout, cli_human_bytes(bb, sizeof bb, (double)bytes), secs, o->seed);
    return EXIT_OK;
}

int cmd_init_model(int argc, char **argv) {
    init_opts o = {.dtype = "bf16", .layout = "multimodal", .init_std = 0.02};
    arg_spec specs[] = {
        ARG_CHOICE_REQ("preset", &o.preset, cli_presets, "model size"),
        ARG_STR_REQ("out", &o.out, "DIR", "folder to write (created if missing)"),
        ARG_INT_RANGE("seed", &o.seed, 0, INT_MAX, "N", "random seed"),
        ARG_INT_RANGE("vocab-size", &o.vocab_size, 0, 1 << 22, "N",
                      "override the preset's vocabulary size, e.g. to fit a real tokenizer (0: the preset's)"),
        ARG_CHOICE("dtype", &o.dtype, dtypes, "weight dtype (A_log stays F32)"),
        ARG_FLOAT_RANGE("init-std", &o.init_std, 1e-6, 10, "X",
                        "std of the normal init of linears and embeddings (transformers: 0.02)"),
        ARG_CHOICE("layout", &o.layout, layouts, "tensor names model.language_model.* (official) or model.*"),
        ARG_FLAG("force", &o.force, "overwrite a model already in DIR"),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    return run(&o);
}
