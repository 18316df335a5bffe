/* Checkpoints of a training run and resuming from them (train_state.h). */
#include "deltatune/train_state.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "deltatune/error.h"
#include "deltatune/files.h"

#define STATE_FORMAT "deltatune-trainer-state"
#define STATE_VERSION 1
#define STATE_FILE "trainer_state.json"
#define OPTIM_FILE "optimizer.safetensors"

static const char *schedule_name(schedule_kind k) {
    return k >= SCHEDULE_LINEAR && k <= SCHEDULE_CONSTANT ? schedule_names[k] : "?";
}

void train_fmt_double(char *buf, size_t cap, double x) {
    for (int p = 15; p <= 17; p++) {
        snprintf(buf, cap, "%.*g", p, x);
        if (strtod(buf, NULL) == x) return;
    }
}

/* ---------------------------------------------------------------- files and folders */

/* Removes a checkpoint folder this trainer wrote: plain files only, so a path that is not
 * one of ours (it holds a sub-folder) is refused rather than emptied. */
static int remove_checkpoint_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : dt_err("%s: cannot open: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = io_path_join(dir, e->d_name);
        struct stat st;
        if (!p) rc = dt_err("out of memory");
        else if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) rc = dt_err("%s: holds a folder; not removing it", dir);
        else if (unlink(p) != 0 && errno != ENOENT) rc = dt_err("%s: cannot remove: %s", p, strerror(errno));
        free(p);
    }
    closedir(d);
    if (rc == 0 && rmdir(dir) != 0 && errno != ENOENT) rc = dt_err("%s: cannot remove: %s", dir, strerror(errno));
    return rc;
}

static void fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

static void parent_of(char *buf, size_t cap, const char *path) {
    snprintf(buf, cap, "%s", path);
    char *slash = strrchr(buf, '/');
    if (!slash) snprintf(buf, cap, ".");
    else if (slash == buf) buf[1] = 0;
    else *slash = 0;
}

/* The folder's files are complete (each fsync'ed); the rename publishes them at once. */
static int publish_dir(const char *tmp, const char *dir) {
    if (rename(tmp, dir) != 0) {
        if (errno != ENOTEMPTY && errno != EEXIST) return dt_err("%s: cannot rename to %s: %s", tmp, dir, strerror(errno));
        /* An older checkpoint of the same step (a rerun into the same --out): replace it. */
        if (remove_checkpoint_dir(dir) != 0) return -1;
        if (rename(tmp, dir) != 0) return dt_err("%s: cannot rename to %s: %s", tmp, dir, strerror(errno));
    }
    char parent[4096];
    parent_of(parent, sizeof parent, dir);
    fsync_dir(parent);
    return 0;
}

/* ---------------------------------------------------------------- the state as JSON */

static json_t *state_json(const trainer *t) {
    const trainer_opts *o = &t->o;
    int64_t epoch = t->step / t->steps_per_epoch, in_epoch = t->step % t->steps_per_epoch;
    int64_t rows_done = in_epoch * o->grad_accum * o->batch_size;
    if (rows_done > t->train.d->n_rows) rows_done = t->train.d->n_rows;
    char hash[24];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)t->data_hash);
    json_t *targets = json_array();
    for (int i = 0; targets && i < t->a->n_targets; i++) json_array_append_new(targets, json_string(t->a->targets[i]));
    /* Every random choice is a function of the seed and the position (the row order of an
     * epoch, the dropout masks of a micro-batch), so the seed and the step are the whole RNG
     * state. */
    return json_pack(
        "{s:s, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:o,"
        " s:{s:I, s:I, s:s},"
        " s:{s:s, s:f, s:I, s:I},"
        " s:{s:i, s:i, s:i, s:i, s:I, s:b, s:f, s:f, s:f, s:f, s:f},"
        " s:{s:i, s:f, s:f, s:b, s:o},"
        " s:{s:i, s:I, s:I, s:s}}",
        "format", STATE_FORMAT, "version", STATE_VERSION, "step", (json_int_t)t->step, "epoch", (json_int_t)epoch,
        "step_in_epoch", (json_int_t)in_epoch, "rows_done_in_epoch", (json_int_t)rows_done, "steps_per_epoch",
        (json_int_t)t->steps_per_epoch, "total_steps", (json_int_t)t->total_steps, "adam_step",
        (json_int_t)t->adam_step, "tokens_trained", (json_int_t)t->tokens_trained, "last_loss",
        isfinite(t->last_loss) ? json_real(t->last_loss) : json_null(),
        "rng", "seed", (json_int_t)o->seed, "data_order_seed", (json_int_t)o->seed, "kind",
        "stateless: row order from (seed, epoch), dropout masks from (seed, step, micro-batch)",
        "schedule", "kind", schedule_name(o->schedule), "lr", o->lr, "warmup_steps", (json_int_t)o->warmup_steps,
        "total_steps", (json_int_t)t->total_steps,
        "options", "batch_size", o->batch_size, "grad_accum", o->grad_accum, "max_seq_len", o->max_seq_len, "epochs",
        o->epochs, "max_steps", (json_int_t)o->max_steps, "shuffle", o->shuffle, "weight_decay", o->adamw.weight_decay,
        "beta1", o->adamw.beta1, "beta2", o->adamw.beta2, "eps", o->adamw.eps, "max_grad_norm", o->max_grad_norm,
        "lora", "r", t->a->rank, "lora_alpha", t->a->alpha, "lora_dropout", t->a->dropout, "use_rslora", t->a->rslora,
        "target_modules", targets ? targets : json_null(),
        "data", "rows", t->train.d->n_rows, "tokens", (json_int_t)t->train.d->n_tokens, "targets",
        (json_int_t)t->train.d->n_targets, "hash", hash);
}

/* ---------------------------------------------------------------- AdamW moments */

static const char *moment_suffix[4] = {"lora_A.exp_avg", "lora_A.exp_avg_sq", "lora_B.exp_avg", "lora_B.exp_avg_sq"};

static void moment_name(char *buf, size_t cap, const lora_module *m, int which) {
    char mod[96];
    qwen35_module_path(mod, sizeof mod, m->kind, m->layer);
    snprintf(buf, cap, "%s.%s", mod, moment_suffix[which]);
}

static void moment_shape(const lora_module *m, int which, int64_t shape[2]) {
    shape[0] = which < 2 ? m->lora.rank : m->lora.out;
    shape[1] = which < 2 ? m->lora.in : m->lora.rank;
}

static int save_moments(const trainer *t, const char *path) {
    int n = 4 * t->a->n_modules;
    st_entry *e = calloc((size_t)n + 1, sizeof *e);
    char (*names)[160] = calloc((size_t)n + 1, sizeof *names);
    int rc = -1;
    if (!e || !names) {
        dt_err("out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        const lora_module *m = &t->a->modules[i / 4];
        moment_name(names[i], sizeof names[i], m, i % 4);
        e[i] = (st_entry){.name = names[i], .dtype = DT_F32, .ndim = 2, .data = t->moments[i]};
        moment_shape(m, i % 4, e[i].shape);
    }
    rc = st_write(path, e, n);
out:
    free(e);
    free(names);
    return rc;
}

static int load_moments(trainer *t, const char *path) {
    st_file f;
    if (st_open(&f, path) != 0) return -1;
    int rc = 0, n = 4 * t->a->n_modules;
    if (f.n != n) rc = dt_err("%d tensors, expected %d (4 per LoRA module of the adapter)", f.n, n);
    for (int i = 0; i < n && rc == 0; i++) {
        const lora_module *m = &t->a->modules[i / 4];
        char name[160];
        int64_t shape[2];
        moment_name(name, sizeof name, m, i % 4);
        moment_shape(m, i % 4, shape);
        const st_tensor *x = st_find(&f, name);
        if (!x) rc = dt_err("missing tensor %s", name);
        else if (x->dtype != DT_F32 || x->ndim != 2 || x->shape[0] != shape[0] || x->shape[1] != shape[1])
            rc = dt_err("tensor %s: expected F32 [%lld, %lld]", name, (long long)shape[0], (long long)shape[1]);
        else memcpy(t->moments[i], x->data, x->nbytes);
    }
    st_close(&f);
    return rc ? dt_err_wrap("%s", path) : 0;
}

/* ---------------------------------------------------------------- save */

int train_state_save(const trainer *t, const char *dir) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    /* A .tmp left by a run killed while saving is incomplete by construction. */
    if (remove_checkpoint_dir(tmp) != 0) return -1;
    if (io_make_dirs(tmp) != 0) return -1;
    int rc = adapter_save(t->a, t->ck, tmp);
    if (rc == 0) {
        char *p = io_path_join(tmp, OPTIM_FILE);
        rc = p ? save_moments(t, p) : dt_err("out of memory");
        free(p);
    }
    if (rc == 0) {
        char *p = io_path_join(tmp, STATE_FILE);
        json_t *o = state_json(t);
        rc = !p || !o ? dt_err("out of memory") : io_write_json_atomic(p, o, JSON_INDENT(2) | JSON_REAL_PRECISION(17));
        json_decref(o);
        free(p);
    }
    if (rc == 0) rc = publish_dir(tmp, dir);
    if (rc != 0) {
        dt_err_wrap("checkpoint %s", dir);
        char keep[2048];
        snprintf(keep, sizeof keep, "%s", dt_errmsg());
        remove_checkpoint_dir(tmp);
        dt_err("%s", keep);
    }
    return rc;
}

/* ---------------------------------------------------------------- load */

/* trainer_state.json: a JSON object. */
static json_t *load_json(const char *path) {
    json_t *o = io_load_json(path);
    if (o && !json_is_object(o)) {
        json_decref(o);
        o = NULL;
        dt_err("%s: expected a JSON object", path);
    }
    return o;
}

/* The value at a dotted path ("options.batch_size"); NULL if absent. */
static json_t *lookup(json_t *root, const char *path) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", path);
    json_t *v = root;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ".", &save); tok && v; tok = strtok_r(NULL, ".", &save)) v = json_object_get(v, tok);
    return v;
}

/* The errors name the field. */
static int get_num(json_t *root, const char *path, double *out) {
    json_t *v = lookup(root, path);
    if (!v || !json_is_number(v)) return dt_err("field %s: missing or not a number", path);
    *out = json_number_value(v);
    return 0;
}

static int get_int(json_t *root, const char *path, int64_t *out) {
    json_t *v = lookup(root, path);
    if (!v || !json_is_integer(v)) return dt_err("field %s: missing or not an integer", path);
    *out = (int64_t)json_integer_value(v);
    return 0;
}

static const char *get_str(json_t *root, const char *obj, const char *key) {
    json_t *o = obj ? json_object_get(root, obj) : root;
    return json_string_value(json_object_get(o, key));
}

/* A setting that must be the same: the checkpoint's value against this run's. */
typedef struct {
    const char *field;   /* in trainer_state.json */
    const char *flag;    /* how the user sets it */
    double now;
} setting;

static int check_settings(json_t *root, const setting *s, int n) {
    for (int i = 0; i < n; i++) {
        double was = 0;
        if (get_num(root, s[i].field, &was) != 0) return -1;
        if (was != s[i].now) {
            char a[32], b[32];
            train_fmt_double(a, sizeof a, s[i].now);
            train_fmt_double(b, sizeof b, was);
            return dt_err("%s is %s here but %s in the checkpoint; resume with the settings of the run that "
                          "wrote it", s[i].flag, a, b);
        }
    }
    return 0;
}

static int check_state(trainer *t, json_t *root) {
    const char *fmt = get_str(root, NULL, "format");
    int64_t version = 0;
    if (!fmt || strcmp(fmt, STATE_FORMAT) != 0) return dt_err("field format: expected \"" STATE_FORMAT "\"");
    if (get_int(root, "version", &version) != 0) return -1;
    if (version != STATE_VERSION)
        return dt_err("version %lld is not supported (this build reads version %d)", (long long)version, STATE_VERSION);
    const trainer_opts *o = &t->o;
    const char *sched = get_str(root, "schedule", "kind");
    if (!sched || strcmp(sched, schedule_name(o->schedule)) != 0)
        return dt_err("--schedule is %s here but %s in the checkpoint; resume with the settings of the run that "
                      "wrote it", schedule_name(o->schedule), sched ? sched : "missing");
    json_t *shuffle = json_object_get(json_object_get(root, "options"), "shuffle");
    if (!json_is_boolean(shuffle)) return dt_err("field options.shuffle: missing or not a boolean");
    if (json_is_true(shuffle) != o->shuffle)
        return dt_err("the row order differs: the checkpoint's run was %sshuffled; %s--no-shuffle",
                      o->shuffle ? "not " : "", o->shuffle ? "add " : "drop ");
    const char *hash = get_str(root, "data", "hash");
    char now_hash[24];
    snprintf(now_hash, sizeof now_hash, "%016llx", (unsigned long long)t->data_hash);
    if (!hash || strcmp(hash, now_hash) != 0)
        return dt_err("the training data differs from the checkpoint's (fingerprint %s, now %s)",
                      hash ? hash : "missing", now_hash);
    int64_t seed = 0;
    if (get_int(root, "rng.seed", &seed) != 0) return -1;
    if ((uint64_t)seed != o->seed)
        return dt_err("--seed is %llu here but %llu in the checkpoint; resume with the settings of the run that "
                      "wrote it", (unsigned long long)o->seed, (unsigned long long)seed);
    setting s[] = {
        {"options.batch_size", "--batch-size", o->batch_size},
        {"options.grad_accum", "--grad-accum", o->grad_accum},
        {"options.max_seq_len", "--max-seq-len", o->max_seq_len},
        {"options.max_steps", "--steps", (double)o->max_steps},
        {"schedule.lr", "--lr", o->lr},
        {"schedule.warmup_steps", "--warmup-steps", (double)o->warmup_steps},
        {"total_steps", "the number of steps", (double)t->total_steps},
        {"options.weight_decay", "--weight-decay", o->adamw.weight_decay},
        {"options.beta1", "AdamW beta1", o->adamw.beta1},
        {"options.beta2", "AdamW beta2", o->adamw.beta2},
        {"options.eps", "AdamW eps", o->adamw.eps},
        {"options.max_grad_norm", "--max-grad-norm", o->max_grad_norm},
        {"lora.r", "the LoRA rank", t->a->rank},
        {"lora.lora_alpha", "the LoRA alpha", t->a->alpha},
        {"lora.lora_dropout", "the LoRA dropout", t->a->dropout},
    };
    if (check_settings(root, s, (int)(sizeof s / sizeof s[0])) != 0) return -1;
    /* --steps decides the length when set; the epochs count only without it */
    setting epochs = {"options.epochs", "--epochs", o->epochs};
    return o->max_steps > 0 ? 0 : check_settings(root, &epochs, 1);
}

static int read_position(trainer *t, json_t *root) {
    int64_t step = 0, adam_step = 0, tokens = 0, epoch = 0, in_epoch = 0;
    if (get_int(root, "step", &step) || get_int(root, "adam_step", &adam_step) ||
        get_int(root, "tokens_trained", &tokens) || get_int(root, "epoch", &epoch) ||
        get_int(root, "step_in_epoch", &in_epoch))
        return -1;
    if (step < 0 || step > t->total_steps) return dt_err("field step: %lld is outside [0, %lld]", (long long)step,
                                                         (long long)t->total_steps);
    if (epoch != step / t->steps_per_epoch || in_epoch != step % t->steps_per_epoch)
        return dt_err("fields epoch/step_in_epoch (%lld/%lld) do not match step %lld", (long long)epoch,
                      (long long)in_epoch, (long long)step);
    if (adam_step < 0 || adam_step > step) return dt_err("field adam_step: %lld is outside [0, %lld]",
                                                         (long long)adam_step, (long long)step);
    t->step = step;
    t->adam_step = adam_step;
    t->tokens_trained = tokens;
    json_t *last = json_object_get(root, "last_loss");
    if (json_is_number(last)) t->last_loss = json_number_value(last);
    return 0;
}

int train_state_load(trainer *t, const char *dir) {
    char *sp = io_path_join(dir, STATE_FILE), *op = io_path_join(dir, OPTIM_FILE);
    int rc = -1;
    json_t *root = NULL;
    if (!sp || !op) {
        dt_err("out of memory");
        goto out;
    }
    if (!(root = load_json(sp))) goto out;
    if (check_state(t, root) != 0 || read_position(t, root) != 0) {
        dt_err_wrap("%s", sp);
        goto out;
    }
    rc = load_moments(t, op);
out:
    json_decref(root);
    free(sp);
    free(op);
    return rc;
}
