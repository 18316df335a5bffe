/* The trainer against a training run of transformers + PEFT + torch AdamW
 * (tests/fixtures/train_tied, made by tools/make_fixtures.py), and its own promises:
 * exact resume, gradient accumulation that does not depend on the micro-batch split,
 * adapters that round-trip, bad data refused, non-finite steps stopped. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/qwen35.h"
#include "deltatune/train_state.h"
#include "deltatune/trainer.h"
#include "test.h"

int io_test_tmpdir(char *buf, size_t cap);
void io_test_rmdir(const char *dir);
int io_test_write_file(const char *path, const void *data, size_t n);

/* A test that runs body(dir) in a fresh temporary folder, removed afterwards. */
#define TMPDIR_TEST(name, body)                                                    \
    TEST(name) {                                                                   \
        char dir[64];                                                              \
        CHECK(io_test_tmpdir(dir, sizeof dir) == 0);                               \
        body(dir);                                                                 \
        io_test_rmdir(dir);                                                        \
    }

#define TIED FIXTURES "/text_tied"
#define TRAIN FIXTURES "/train_tied"

static const char *const default_targets[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj", "in_proj_qkv", "in_proj_z", "out_proj"};
#define N_DEFAULT_TARGETS 10

/* ---------------------------------------------------------------- a model with an adapter */

typedef struct {
    checkpoint ck;
    qwen35_model m;
    dt_dataset data;
    lora_adapter ad;
    bool has_ck, has_m, has_data, has_ad;
} rig;

static void rig_close(rig *r) {
    if (r->has_m) qwen35_model_free(&r->m);
    if (r->has_ad) adapter_free(&r->ad);
    if (r->has_data) dataset_free(&r->data);
    if (r->has_ck) checkpoint_close(&r->ck);
    memset(r, 0, sizeof *r);
}

static int rig_model(rig *r, const char *model_dir, const char *data) {
    memset(r, 0, sizeof *r);
    if (checkpoint_open(&r->ck, model_dir)) return -1;
    r->has_ck = true;
    if (qwen35_model_init(&r->m, &r->ck.cfg, r->ck.specs, r->ck.weights, r->ck.n_specs)) return -1;
    r->has_m = true;
    if (dataset_load_tokenized(&r->data, data, r->ck.cfg.vocab_size)) return -1;
    r->has_data = true;
    return 0;
}

static int rig_attach(rig *r) {
    r->has_ad = true;
    if (adapter_alloc_grads(&r->ad)) return -1;
    for (int i = 0; i < r->ad.n_modules; i++)
        if (qwen35_model_set_lora(&r->m, r->ad.modules[i].kind, r->ad.modules[i].layer, &r->ad.modules[i].lora))
            return -1;
    return 0;
}

/* text_tied with an adapter loaded from dir. */
static int rig_open(rig *r, const char *adapter_dir) {
    if (rig_model(r, TIED, TIED "/data.jsonl")) return -1;
    if (adapter_load(&r->ad, adapter_dir, &r->ck)) return -1;
    return rig_attach(r);
}

/* text_tied with a new adapter: the default targets, rank 4, alpha 8. */
static int rig_open_new(rig *r, double dropout, uint64_t seed) {
    if (rig_model(r, TIED, TIED "/data.jsonl")) return -1;
    if (adapter_init(&r->ad, &r->ck, 4, 8, false, dropout, default_targets, N_DEFAULT_TARGETS, seed)) return -1;
    return rig_attach(r);
}

/* ---------------------------------------------------------------- recording a run */

typedef struct {
    int n;
    train_step_log s[32];
    int n_eval;
    train_eval_log e[8];
    int64_t stop_at;                 /* raise *stop after this step (0: never) */
    volatile sig_atomic_t *stop;
    lora_adapter *poison;            /* once checkpoint poison_at is saved, set a weight to NaN */
    int64_t poison_at;
} recorder;

static void rec_step(const train_step_log *s, void *ctx) {
    recorder *r = ctx;
    if (r->n < 32) r->s[r->n++] = *s;
    if (r->stop_at && s->step == r->stop_at) *r->stop = 1;
}

static void rec_save(const char *dir, int64_t step, void *ctx) {
    recorder *r = ctx;
    if (r->poison && step == r->poison_at) r->poison->modules[0].lora.B[0] = NAN;
}

static void rec_eval(const train_eval_log *e, void *ctx) {
    recorder *r = ctx;
    if (r->n_eval < 8) r->e[r->n_eval++] = *e;
}

static trainer_hooks hooks_of(recorder *r) {
    return (trainer_hooks){.on_step = rec_step, .on_eval = rec_eval, .on_save = rec_save, .ctx = r};
}

/* The options of train_tied/expected_train.json's config. */
static int golden_opts(json_t *cfg, trainer_opts *o) {
    trainer_opts_default(o);
    o->batch_size = (int)json_integer_value(json_object_get(cfg, "batch_size"));
    o->grad_accum = (int)json_integer_value(json_object_get(cfg, "grad_accum"));
    o->epochs = (int)json_integer_value(json_object_get(cfg, "epochs"));
    o->lr = json_number_value(json_object_get(cfg, "lr"));
    o->adamw.beta1 = json_number_value(json_array_get(json_object_get(cfg, "betas"), 0));
    o->adamw.beta2 = json_number_value(json_array_get(json_object_get(cfg, "betas"), 1));
    o->adamw.eps = json_number_value(json_object_get(cfg, "eps"));
    o->adamw.weight_decay = json_number_value(json_object_get(cfg, "weight_decay"));
    json_t *clip = json_object_get(cfg, "max_grad_norm");
    o->max_grad_norm = json_is_number(clip) ? json_number_value(clip) : 0;  /* null: no clipping */
    o->warmup_steps = json_integer_value(json_object_get(cfg, "warmup_steps"));
    o->shuffle = json_is_true(json_object_get(cfg, "shuffle"));
    return schedule_parse(json_string_value(json_object_get(cfg, "schedule")), &o->schedule);
}

/* Worst per-tensor max|a - b| / max|b| between two adapters on the same modules. */
static double adapter_rel_err(const lora_adapter *a, const lora_adapter *b, char *worst, size_t cap) {
    if (a->n_modules != b->n_modules) return INFINITY;
    double w = 0;
    for (int i = 0; i < a->n_modules; i++) {
        const dt_lora *x = &a->modules[i].lora, *y = &b->modules[i].lora;
        if (a->modules[i].kind != b->modules[i].kind || a->modules[i].layer != b->modules[i].layer || x->rank != y->rank ||
            x->in != y->in || x->out != y->out)
            return INFINITY;
        double ea = rel_err(x->A, y->A, (size_t)(x->rank * x->in)), eb = rel_err(x->B, y->B, (size_t)(x->out * x->rank));
        double e = ea > eb ? ea : eb;
        if (!(e <= w)) {
            w = isnan(e) ? INFINITY : e;
            qwen35_module_path(worst, cap, a->modules[i].kind, a->modules[i].layer);
        }
    }
    return w;
}

static bool adapters_identical(const lora_adapter *a, const lora_adapter *b) {
    if (a->n_modules != b->n_modules) return false;
    for (int i = 0; i < a->n_modules; i++) {
        const dt_lora *x = &a->modules[i].lora, *y = &b->modules[i].lora;
        if (x->rank != y->rank || x->in != y->in || x->out != y->out || x->scale != y->scale) return false;
        if (memcmp(x->A, y->A, sizeof(real) * (size_t)(x->rank * x->in)) ||
            memcmp(x->B, y->B, sizeof(real) * (size_t)(x->out * x->rank)))
            return false;
    }
    return true;
}

static int rel_close(double a, double b, double tol) { return fabs(a - b) <= tol * fabs(b); }

static char *read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    if (buf) buf[n] = 0;
    fclose(f);
    return buf;
}

static bool streq(const char *a, const char *b) { return a && b && !strcmp(a, b); }

/* ---------------------------------------------------------------- the golden run */

static void run_golden(bool grad_checkpoint, const char *out) {
    rig r;
    json_error_t je;
    json_t *spec = json_load_file(TRAIN "/expected_train.json", 0, &je);
    CHECKF(spec, "expected_train.json: %s", je.text);
    trainer t = {0};
    lora_adapter want = {0}, saved = {0};
    bool have_t = false, have_want = false, have_saved = false;
    if (rig_open(&r, TRAIN "/init_adapter")) {
        test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        goto out;
    }
    json_t *cfg = json_object_get(spec, "config");
    trainer_opts o;
    CHECK_OK(golden_opts(cfg, &o));
    o.grad_checkpoint = grad_checkpoint;
    o.out_dir = out;
    CHECK(r.ad.rank == json_integer_value(json_object_get(cfg, "r")));
    CHECK(r.ad.alpha == json_number_value(json_object_get(cfg, "lora_alpha")) && r.ad.dropout == 0);
    if (trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL)) {
        test_fail(__FILE__, __LINE__, "trainer_init: %s", dt_errmsg());
        goto out;
    }
    have_t = true;
    json_t *steps = json_object_get(spec, "steps");
    CHECK(t.total_steps == (int64_t)json_array_size(steps) &&
          t.steps_per_epoch == json_integer_value(json_object_get(cfg, "steps_per_epoch")));
    recorder rec = {0};
    trainer_hooks h = hooks_of(&rec);
    if (trainer_run(&t, &h) != 0) {
        test_fail(__FILE__, __LINE__, "trainer_run: %s", dt_errmsg());
        goto out;
    }
    CHECK(rec.n == (int)json_array_size(steps));
    for (int i = 0; i < rec.n; i++) {
        json_t *st = json_array_get(steps, (size_t)i);
        const train_step_log *s = &rec.s[i];
        double loss = json_number_value(json_object_get(st, "loss")), lr = json_number_value(json_object_get(st, "lr"));
        double gn = json_number_value(json_object_get(st, "grad_norm"));
        CHECK(s->step == json_integer_value(json_object_get(st, "step")) && !s->skipped);
        CHECKF(s->tokens == json_integer_value(json_object_get(st, "tokens")), "step %d: %lld targets", i + 1,
               (long long)s->tokens);
        CHECKF(rel_close(s->loss, loss, 1e-4), "step %d (checkpointing %d): loss %.9g, PEFT %.9g", i + 1,
               grad_checkpoint, s->loss, loss);
        CHECKF(rel_close(s->lr, lr, 1e-9), "step %d: lr %.9g, transformers %.9g", i + 1, s->lr, lr);
        CHECKF(rel_close(s->grad_norm, gn, 1e-3), "step %d (checkpointing %d): grad_norm %.9g, torch %.9g", i + 1,
               grad_checkpoint, s->grad_norm, gn);
    }
    CHECK_OK(adapter_load(&want, TRAIN "/expected_adapter", &r.ck));
    have_want = true;
    char worst[96] = "";
    double e = adapter_rel_err(&r.ad, &want, worst, sizeof worst);
    CHECKF(e <= 1e-3, "trained adapter vs PEFT: rel err %.3g at %s", e, worst);
    /* the adapter written at the end is the one in memory, bit for bit */
    CHECK_OK(adapter_load(&saved, out, &r.ck));
    have_saved = true;
    CHECK(adapters_identical(&saved, &r.ad));
    char path[600];
    snprintf(path, sizeof path, "%s/train_log.jsonl", out);
    char *log = read_all(path);
    CHECK(log);
    int lines = 0;
    for (char *p = log; (p = strchr(p, '\n')); p++) lines++;
    bool fields = strstr(log, "\"step\": 4") && strstr(log, "\"grad_norm\"") && strstr(log, "\"tok_per_s\"") &&
                  strstr(log, "\"peak_mem_mb\"") && strstr(log, "\"tokens\": 73") && strstr(log, "\"epoch\"");
    free(log);
    CHECKF(lines == 4 && fields, "train_log.jsonl: %d lines", lines);
out:
    if (have_saved) adapter_free(&saved);
    if (have_want) adapter_free(&want);
    if (have_t) trainer_free(&t);
    rig_close(&r);
    json_decref(spec);
}

TEST(train_golden_matches_peft) {
    char dir[64], out[128];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    snprintf(out, sizeof out, "%s/ckpt", dir);
    run_golden(true, out);
    snprintf(out, sizeof out, "%s/stored", dir);
    if (!test_failed()) run_golden(false, out);
    io_test_rmdir(dir);
}

/* ---------------------------------------------------------------- resume */

/* The base options of the resume and accumulation tests. */
static trainer_opts small_opts(const char *out) {
    trainer_opts o;
    trainer_opts_default(&o);
    o.batch_size = 2;
    o.grad_accum = 1;
    o.max_steps = 5;     /* 3 steps per epoch: the run wraps into a second, reshuffled epoch */
    o.lr = 1e-3;
    o.warmup_steps = 1;
    o.schedule = SCHEDULE_COSINE;
    o.out_dir = out;
    return o;
}

/* train_log.jsonl without the timing fields, which differ from run to run. */
static char *log_without_timing(const char *out) {
    char path[600];
    snprintf(path, sizeof path, "%s/train_log.jsonl", out);
    char *text = read_all(path);
    if (!text) return NULL;
    const char *drop[] = {"tok_per_s", "peak_mem_mb", "seconds", "eval_seconds"};
    for (size_t k = 0; k < sizeof drop / sizeof drop[0]; k++) {
        char key[32];
        snprintf(key, sizeof key, ", \"%s\": ", drop[k]);
        for (char *p; (p = strstr(text, key));) {
            char *end = p + strlen(key);
            while (*end && *end != ',' && *end != '}') end++;
            memmove(p, end, strlen(end) + 1);
        }
    }
    return text;
}

/* A run of 5 steps (shuffled, LoRA dropout, evaluation every 2 steps) into out; stop_at > 0
 * interrupts it after that step as Ctrl-C does. Returns trainer_run's result. */
static int resume_run(const char *out, int64_t stop_at, const char *resume_from) {
    rig r;
    int rc = -1;
    trainer t = {0};
    bool have_t = false;
    volatile sig_atomic_t stop = 0;
    if (resume_from ? rig_open(&r, resume_from) : rig_open_new(&r, 0.1, 11)) goto out;
    trainer_opts o = small_opts(out);
    o.eval_every = 2;
    o.stop = &stop;
    if (trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, &r.data)) goto out;
    have_t = true;
    if (resume_from && trainer_resume(&t, resume_from)) goto out;
    recorder rec = {.stop_at = stop_at, .stop = &stop};
    trainer_hooks h = hooks_of(&rec);
    rc = trainer_run(&t, &h);
out:
    if (rc < 0) test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
    if (have_t) trainer_free(&t);
    rig_close(&r);
    return rc;
}

static void check_resume(const char *dir) {
    char a[128], b[128], ck[160], path[200];
    snprintf(a, sizeof a, "%s/straight", dir);
    snprintf(b, sizeof b, "%s/resumed", dir);
    char *la = NULL, *lb = NULL, *fa = NULL, *fb = NULL;
    if (resume_run(a, 0, NULL) != 0) goto out;
    /* interrupted after step 2: a checkpoint and the adapter are saved, the run says so */
    int rc = resume_run(b, 2, NULL);
    CHECKF(rc == 1, "interrupted run returned %d", rc);
    snprintf(ck, sizeof ck, "%s/checkpoint-2", b);
    snprintf(path, sizeof path, "%s/trainer_state.json", ck);
    CHECK(io_file_exists(path));
    snprintf(path, sizeof path, "%s/checkpoint-2.tmp", b);
    CHECK(!io_file_exists(path));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", b);
    CHECK(io_file_exists(path));
    /* steps 3 to 5 from the checkpoint */
    CHECK(resume_run(b, 0, ck) == 0);
    la = log_without_timing(a);
    lb = log_without_timing(b);
    CHECK(la && lb);
    CHECKF(!strcmp(la, lb), "train_log.jsonl differs:\n%s\nvs\n%s", la, lb);
    CHECK(strstr(la, "\"step\": 5") && strstr(la, "eval_loss"));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", a);
    fa = read_all(path);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", b);
    fb = read_all(path);
    struct stat sa, sb;
    CHECK(fa && fb && stat(path, &sb) == 0);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", a);
    CHECK(stat(path, &sa) == 0 && sa.st_size == sb.st_size);
    CHECKF(!memcmp(fa, fb, (size_t)sa.st_size), "the final adapters differ");
out:
    free(la);
    free(lb);
    free(fa);
    free(fb);
}

TMPDIR_TEST(train_resume_is_identical, check_resume)

/* A checkpoint refuses a run with other settings or other data, naming what differs. */
static void check_resume_refusals(const char *dir) {
    char out[128], ck[160];
    snprintf(out, sizeof out, "%s/run", dir);
    snprintf(ck, sizeof ck, "%s/checkpoint-1", out);
    rig r = {0};
    trainer t = {0};
    bool have_t = false;
    if (rig_open_new(&r, 0, 5)) goto fail;
    trainer_opts o = small_opts(out);
    o.save_every = 1;
    o.max_steps = 1;
    if (trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL) || trainer_run(&t, NULL)) goto fail;
    trainer_free(&t);
    rig_close(&r);
    if (rig_open(&r, ck)) goto fail;
    o.lr = 2e-3;
    if (trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL)) goto fail;
    have_t = true;
    CHECK_ERR(trainer_resume(&t, ck), "--lr");
    trainer_free(&t);
    have_t = false;
    o.lr = 1e-3;
    o.grad_accum = 2;
    if (trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL)) goto fail;
    have_t = true;
    CHECK_ERR(trainer_resume(&t, ck), "--grad-accum");
    trainer_free(&t);
    have_t = false;
    /* other data: one row fewer */
    o.grad_accum = 1;
    r.data.n_rows--;
    int rc = trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL);
    r.data.n_rows++;
    if (rc) goto fail;
    have_t = true;
    CHECK_ERR(trainer_resume(&t, ck), "training data differs");
    goto out;
fail:
    test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
out:
    if (have_t) trainer_free(&t);
    rig_close(&r);
}

TMPDIR_TEST(train_resume_refuses_other_settings, check_resume_refusals)

/* ---------------------------------------------------------------- gradient accumulation */

/* Rows 0-3 then 4-5 per step, whichever way they are split into micro-batches. */
TEST(train_grad_accum_split_does_not_matter) {
    const int splits[3][2] = {{4, 1}, {2, 2}, {1, 4}};
    train_step_log logs[3][8];
    lora_adapter trained[3];
    memset(trained, 0, sizeof trained);
    int n_ok = 0;
    for (int k = 0; k < 3; k++) {
        rig r;
        trainer t;
        if (rig_open_new(&r, 0, 21)) {
            test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
            rig_close(&r);
            break;
        }
        trainer_opts o = small_opts(NULL);
        o.batch_size = splits[k][0];
        o.grad_accum = splits[k][1];
        o.max_steps = 0;
        o.epochs = 2;
        o.shuffle = false;
        recorder rec = {0};
        trainer_hooks h = hooks_of(&rec);
        int ok = trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL) == 0;
        if (ok) {
            ok = trainer_run(&t, &h) == 0 && rec.n == 4;
            trainer_free(&t);
        }
        if (!ok) test_fail(__FILE__, __LINE__, "split %d x %d: %s", splits[k][0], splits[k][1], dt_errmsg());
        memcpy(logs[k], rec.s, sizeof rec.s[0] * 4);
        /* keep the trained adapter; the rig's copy is handed over */
        trained[k] = r.ad;
        r.has_ad = false;
        rig_close(&r);
        n_ok += ok;
        if (!ok) break;
    }
    for (int k = 1; k < 3 && n_ok == 3; k++) {
        for (int i = 0; i < 4; i++) {
            CHECKF(logs[k][i].tokens == logs[0][i].tokens, "step %d targets", i + 1);
            CHECKF(rel_close(logs[k][i].loss, logs[0][i].loss, 1e-5), "split %d step %d: loss %.9g vs %.9g", k, i + 1,
                   logs[k][i].loss, logs[0][i].loss);
            CHECKF(rel_close(logs[k][i].grad_norm, logs[0][i].grad_norm, 1e-4), "split %d step %d: grad %.9g vs %.9g",
                   k, i + 1, logs[k][i].grad_norm, logs[0][i].grad_norm);
        }
        char worst[96] = "";
        double e = adapter_rel_err(&trained[k], &trained[0], worst, sizeof worst);
        /* Adam divides by sqrt(v): on entries whose gradient is near 0, rounding differences of
         * the sums show up at 1e-4 of the largest weight after 4 steps */
        CHECKF(e <= 1e-3, "split %d: adapters differ by %.3g at %s", k, e, worst);
    }
    for (int k = 0; k < 3; k++) adapter_free(&trained[k]);
}

/* ---------------------------------------------------------------- adapters */

static void check_init_values(const lora_adapter *a) {
    for (int i = 0; i < a->n_modules; i++) {
        const dt_lora *l = &a->modules[i].lora;
        float bound = 1.0f / sqrtf((float)l->in), mx = 0;
        for (int64_t j = 0; j < l->rank * l->in; j++) mx = fabsf(l->A[j]) > mx ? fabsf(l->A[j]) : mx;
        CHECKF(mx <= bound && mx > 0.5f * bound, "module %d: max |A| %g, bound %g", i, mx, bound);
        for (int64_t j = 0; j < l->out * l->rank; j++) CHECK(l->B[j] == 0);
    }
}

TEST(adapter_init_follows_peft) {
    checkpoint ck;
    CHECK_OK(checkpoint_open(&ck, TIED));
    lora_adapter a = {0}, b = {0}, c = {0};
    CHECK_OK(adapter_init(&a, &ck, 4, 8, false, 0, default_targets, N_DEFAULT_TARGETS, 7));
    /* 6 modules on each of the 3 Gated DeltaNet layers, 7 on the attention layer */
    CHECK(a.n_modules == 25 && a.rank == 4 && a.n_targets == 10 && !strcmp(a.targets[0], "down_proj"));
    CHECK(a.modules[0].layer == 0 && a.modules[24].layer == 3 && a.modules[0].lora.scale == 2.0f);
    check_init_values(&a);
    CHECK_OK(adapter_init(&b, &ck, 4, 8, false, 0, default_targets, N_DEFAULT_TARGETS, 7));
    CHECK(adapters_identical(&a, &b));
    const char *more[] = {"q_proj", "in_proj_a", "in_proj_b", "q_proj"};
    CHECK_OK(adapter_init(&c, &ck, 16, 16, true, 0.1, more, 4, 8));
    CHECK(c.n_modules == 7 && c.n_targets == 3 && c.modules[0].lora.scale == 4.0f && c.rslora);
    CHECK(!adapters_identical(&a, &c));
    const char *bad[] = {"q_proj", "qkv_proj"};
    lora_adapter d;
    CHECK_ERR(adapter_init(&d, &ck, 4, 8, false, 0, bad, 2, 1), "'qkv_proj'");
    CHECK_ERR(adapter_init(&d, &ck, 0, 8, false, 0, default_targets, 1, 1), "rank");
    CHECK_ERR(adapter_init(&d, &ck, 4, 8, false, 1.0, default_targets, 1, 1), "dropout");
    adapter_free(&a);
    adapter_free(&b);
    adapter_free(&c);
    checkpoint_close(&ck);
}

static void round_trip(const char *model, const char *dir, const char *want_key) {
    checkpoint ck;
    CHECK_OK(checkpoint_open(&ck, model));
    lora_adapter a = {0}, b = {0};
    const char *all[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                         "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"};
    CHECK_OK(adapter_init(&a, &ck, 3, 5, true, 0.05, all, 12, 99));
    /* make B non-zero, so the round trip checks real values */
    for (int i = 0; i < a.n_modules; i++)
        for (int64_t j = 0; j < a.modules[i].lora.out * 3; j++) a.modules[i].lora.B[j] = (float)(j % 7) * 0.01f - 0.03f;
    CHECK_OK(adapter_save(&a, &ck, dir));
    CHECK_OK(adapter_load(&b, dir, &ck));
    CHECK(b.rank == 3 && b.alpha == 5 && b.dropout == 0.05 && b.rslora && b.n_targets == 12);
    CHECK(adapters_identical(&a, &b));
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_file f;
    CHECK_OK(st_open(&f, path));
    CHECKF(st_find(&f, want_key) && st_find(&f, want_key)->dtype == DT_F32, "%s missing", want_key);
    CHECK(f.n == 2 * a.n_modules);
    st_close(&f);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    CHECK(cfg);
    const char *strs[][2] = {{"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"bias", "none"}};
    for (int i = 0; i < 3; i++)
        CHECK(streq(json_string_value(json_object_get(cfg, strs[i][0])), strs[i][1]));
    CHECK(json_is_true(json_object_get(cfg, "use_rslora")) && json_is_false(json_object_get(cfg, "use_dora")));
    CHECK(json_is_true(json_object_get(cfg, "inference_mode")) && json_is_false(json_object_get(cfg, "fan_in_fan_out")));
    CHECK(json_is_null(json_object_get(cfg, "modules_to_save")) && json_object_size(json_object_get(cfg, "rank_pattern")) == 0);
    CHECK(json_string_value(json_object_get(cfg, "base_model_name_or_path")) && json_object_get(cfg, "peft_version"));
    json_t *tm = json_object_get(cfg, "target_modules");
    CHECK(json_array_size(tm) == 12);
    for (size_t i = 1; i < json_array_size(tm); i++)
        CHECK(strcmp(json_string_value(json_array_get(tm, i - 1)), json_string_value(json_array_get(tm, i))) < 0);
    json_decref(cfg);
    adapter_free(&a);
    adapter_free(&b);
    checkpoint_close(&ck);
}

TEST(adapter_save_load_round_trip) {
    char dir[64], sub[128];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    snprintf(sub, sizeof sub, "%s/text/nested", dir);  /* adapter_save creates the folders */
    round_trip(TIED, sub, "base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_A.weight");
    snprintf(sub, sizeof sub, "%s/mm", dir);
    if (!test_failed())
        round_trip(FIXTURES "/mm_untied_sharded", sub,
                   "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_B.weight");
    snprintf(sub, sizeof sub, "%s/mm/adapter_config.json.tmp", dir);
    CHECK(!io_file_exists(sub));
    io_test_rmdir(dir);
}

/* ---------------------------------------------------------------- bad input */

static void expect_init_refused(const char *dir, const char *rows, int max_seq_len, const char *needle) {
    char path[600];
    snprintf(path, sizeof path, "%s/data.jsonl", dir);
    CHECK(io_test_write_file(path, rows, strlen(rows)) == 0);
    rig r;
    if (rig_model(&r, TIED, path) || adapter_init(&r.ad, &r.ck, 2, 2, false, 0, default_targets, 1, 1) ||
        rig_attach(&r)) {
        test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        rig_close(&r);
        return;
    }
    trainer_opts o;
    trainer_opts_default(&o);
    o.max_seq_len = max_seq_len;
    trainer t;
    CHECK_ERR(trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL), needle);
    rig_close(&r);
}

TEST(train_refuses_data_without_targets) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    expect_init_refused(dir, "{\"input_ids\": [5]}\n{\"input_ids\": [1, 2], \"labels\": [1, -100]}\n", 2048,
                        "nothing to train on");
    /* the only target lies past --max-seq-len */
    expect_init_refused(dir, "{\"input_ids\": [1, 2, 3], \"labels\": [-100, -100, 3]}\n", 2, "max-seq-len");
    io_test_rmdir(dir);
}

/* A step whose rows are all masked is counted but changes nothing. */
static void check_empty_step(const char *dir) {
    char path[600];
    snprintf(path, sizeof path, "%s/data.jsonl", dir);
    const char *rows = "{\"input_ids\": [1, 2, 3], \"labels\": [-100, -100, -100]}\n"
                       "{\"input_ids\": [4, 5, 6, 7]}\n";
    CHECK(io_test_write_file(path, rows, strlen(rows)) == 0);
    rig r;
    trainer t;
    if (rig_model(&r, TIED, path) || adapter_init(&r.ad, &r.ck, 2, 2, false, 0, default_targets, 2, 1) || rig_attach(&r)) {
        test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        rig_close(&r);
        return;
    }
    trainer_opts o = small_opts(NULL);
    o.batch_size = 1;
    o.max_steps = 2;
    o.shuffle = false;
    recorder rec = {0};
    trainer_hooks h = hooks_of(&rec);
    CHECK_OK(trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL));
    int rc = trainer_run(&t, &h);
    CHECKF(rc == 0, "%s", dt_errmsg());
    CHECK(rec.n == 2 && rec.s[0].skipped && isnan(rec.s[0].loss) && rec.s[0].tokens == 0);
    CHECK(!rec.s[1].skipped && isfinite(rec.s[1].loss) && rec.s[1].tokens == 3);
    CHECK(t.step == 2 && t.adam_step == 1);
    trainer_free(&t);
    rig_close(&r);
}

TMPDIR_TEST(train_skips_an_empty_step, check_empty_step)

/* A NaN stops the run before the update; the checkpoint already written stays, nothing
 * else is written. */
static void check_non_finite(const char *dir) {
    char out[128], path[300];
    snprintf(out, sizeof out, "%s/run", dir);
    rig r;
    trainer t;
    if (rig_open_new(&r, 0, 3)) {
        test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        rig_close(&r);
        return;
    }
    trainer_opts o = small_opts(out);
    o.save_every = 1;
    recorder rec = {.poison = &r.ad, .poison_at = 1};
    trainer_hooks h = hooks_of(&rec);
    CHECK_OK(trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL));
    CHECK_ERR(trainer_run(&t, &h), "not finite");
    CHECK(strstr(dt_errmsg(), "step 2") && strstr(dt_errmsg(), "data.jsonl lines"));
    CHECK(t.step == 1 && t.last_saved == 1);
    snprintf(path, sizeof path, "%s/checkpoint-1/adapter_model.safetensors", out);
    CHECK(io_file_exists(path));
    snprintf(path, sizeof path, "%s/checkpoint-2", out);
    CHECK(!io_file_exists(path));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", out);
    CHECK(!io_file_exists(path));
    trainer_free(&t);
    rig_close(&r);
}

TMPDIR_TEST(train_stops_on_non_finite_loss, check_non_finite)

/* The checkpoint folder: what resume needs, in the documented files. */
static void check_checkpoint_contents(const char *dir) {
    char out[128], path[300];
    snprintf(out, sizeof out, "%s/run", dir);
    rig r;
    trainer t;
    if (rig_open_new(&r, 0, 3)) {
        test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        rig_close(&r);
        return;
    }
    trainer_opts o = small_opts(out);
    o.save_every = 2;
    o.max_steps = 4;
    CHECK_OK(trainer_init(&t, &o, &r.m, &r.ad, &r.ck, &r.data, NULL));
    CHECK_OK(trainer_run(&t, NULL));
    snprintf(path, sizeof path, "%s/checkpoint-4/trainer_state.json", out);
    json_error_t je;
    json_t *s = json_load_file(path, 0, &je);
    CHECKF(s, "%s: %s", path, je.text);
    CHECK(json_integer_value(json_object_get(s, "step")) == 4 && json_integer_value(json_object_get(s, "adam_step")) == 4);
    CHECK(json_integer_value(json_object_get(s, "epoch")) == 1 && json_integer_value(json_object_get(s, "step_in_epoch")) == 1);
    CHECK(json_integer_value(json_object_get(json_object_get(s, "rng"), "seed")) == 3407);
    CHECK(streq(json_string_value(json_object_get(json_object_get(s, "schedule"), "kind")), "cosine"));
    json_decref(s);
    snprintf(path, sizeof path, "%s/checkpoint-4/optimizer.safetensors", out);
    st_file f;
    CHECK_OK(st_open(&f, path));
    CHECK(f.n == 4 * r.ad.n_modules && st_find(&f, "layers.0.mlp.down_proj.lora_B.exp_avg_sq"));
    st_close(&f);
    snprintf(path, sizeof path, "%s/checkpoint-2/adapter_config.json", out);
    CHECK(io_file_exists(path));
    trainer_free(&t);
    rig_close(&r);
}

TMPDIR_TEST(train_checkpoint_contents, check_checkpoint_contents)
