/* The training loop: rows -> micro-batches -> optimiser steps (trainer.h). */
#include "deltatune/trainer.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/mem.h"
#include "deltatune/rng.h"
#include "deltatune/train_state.h"

/* Salts that keep the row-order and dropout streams apart for the same seed. */
#define SALT_ORDER 0x6f72646572ull    /* "order" */
#define SALT_DROPOUT 0x64726f70ull    /* "drop" */

void trainer_opts_default(trainer_opts *o) {
    *o = (trainer_opts){
        .batch_size = 2, .grad_accum = 4, .max_seq_len = 2048, .epochs = 1, .lr = 2e-4,
        .schedule = SCHEDULE_LINEAR, .adamw = {.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01},
        .max_grad_norm = 1.0, .seed = 3407, .shuffle = true, .grad_checkpoint = true,
    };
}

void trainer_checkpoint_dir(char *buf, size_t cap, const char *out_dir, int64_t step) {
    snprintf(buf, cap, "%s%scheckpoint-%lld", out_dir, out_dir[0] && out_dir[strlen(out_dir) - 1] == '/' ? "" : "/",
             (long long)step);
}

/* ---------------------------------------------------------------- setup */

static int check_opts(const trainer_opts *o) {
    if (o->batch_size < 1) return dt_err("batch size %d: must be at least 1", o->batch_size);
    if (o->grad_accum < 1) return dt_err("gradient accumulation %d: must be at least 1", o->grad_accum);
    if (o->max_seq_len < 2) return dt_err("max sequence length %d: must be at least 2", o->max_seq_len);
    if (o->max_steps < 0) return dt_err("steps %lld: must not be negative", (long long)o->max_steps);
    if (o->max_steps == 0 && o->epochs < 1) return dt_err("epochs %d: must be at least 1", o->epochs);
    if (!(o->lr >= 0) || !isfinite(o->lr)) return dt_err("learning rate %g: must be a finite number >= 0", o->lr);
    if (o->warmup_steps < 0) return dt_err("warm-up steps %lld: must not be negative", (long long)o->warmup_steps);
    const adamw_config *a = &o->adamw;
    if (!(a->beta1 >= 0 && a->beta1 < 1) || !(a->beta2 >= 0 && a->beta2 < 1))
        return dt_err("AdamW betas (%g, %g): must be in [0, 1)", a->beta1, a->beta2);
    if (!(a->eps > 0)) return dt_err("AdamW eps %g: must be positive", a->eps);
    if (!(a->weight_decay >= 0) || !isfinite(a->weight_decay))
        return dt_err("weight decay %g: must be a finite number >= 0", a->weight_decay);
    if (!(o->max_grad_norm >= 0) || !isfinite(o->max_grad_norm))
        return dt_err("max grad norm %g: must be a finite number >= 0 (0: no clipping)", o->max_grad_norm);
    if (o->eval_every < 0 || o->save_every < 0) return dt_err("eval and save intervals must not be negative");
    /* room for "/checkpoint-<step>.tmp/optimizer.safetensors" in the fixed path buffers */
    if (o->out_dir && strlen(o->out_dir) > 3800) return dt_err("output folder path too long");
    return 0;
}

/* Cut every row to max_len and count what is left to train on: position t predicts
 * labels[t + 1] unless it is -100 (HF's shift, as qwen35_eval_loss counts). */
static int rows_cut(train_rows *r, const dt_dataset *d, int max_len) {
    memset(r, 0, sizeof *r);
    r->d = d;
    r->len = malloc(sizeof *r->len * (size_t)(d->n_rows > 0 ? d->n_rows : 1));
    r->targets = malloc(sizeof *r->targets * (size_t)(d->n_rows > 0 ? d->n_rows : 1));
    if (!r->len || !r->targets) return dt_err("out of memory");
    for (int i = 0; i < d->n_rows; i++) {
        const dt_row *row = &d->rows[i];
        int n = row->len < max_len ? row->len : max_len, k = 0;
        r->n_truncated += row->len > max_len;
        for (int t = 1; t < n; t++) k += row->labels[t] != DT_IGNORE_INDEX;
        r->len[i] = n;
        r->targets[i] = k;
        r->n_tokens += n;
        r->n_targets += k;
    }
    return 0;
}

static void rows_free(train_rows *r) {
    free(r->len);
    free(r->targets);
    memset(r, 0, sizeof *r);
}

/* FNV-1a over every row's length, ids and labels: resume refuses other data. */
static uint64_t data_hash(const dt_dataset *d) {
    uint64_t h = 0xcbf29ce484222325ull;
#define MIX(v) (h = (h ^ (uint64_t)(uint32_t)(v)) * 0x100000001b3ull)
    MIX(d->n_rows);
    for (int i = 0; i < d->n_rows; i++) {
        const dt_row *r = &d->rows[i];
        MIX(r->len);
        for (int t = 0; t < r->len; t++) {
            MIX(r->input_ids[t]);
            MIX(r->labels[t]);
        }
    }
#undef MIX
    return h;
}

static int max_len_of(const train_rows *r) {
    int mx = 0;
    for (int i = 0; r->d && i < r->d->n_rows; i++) mx = r->len[i] > mx ? r->len[i] : mx;
    return mx;
}

static int alloc_state(trainer *t) {
    const lora_adapter *a = t->a;
    int64_t n = 0;
    for (int i = 0; i < a->n_modules; i++) {
        const dt_lora *l = &a->modules[i].lora;
        if (!l->dA || !l->dB) return dt_err("the adapter has no gradients (adapter_alloc_grads was not called)");
        n += l->rank * (l->in + l->out);
    }
    t->n_params = n;
    t->moments = calloc((size_t)(4 * a->n_modules) + 1, sizeof *t->moments);
    t->moment_store = calloc((size_t)(2 * n) + 1, sizeof *t->moment_store);
    t->grads = calloc((size_t)(2 * a->n_modules) + 1, sizeof *t->grads);
    t->grad_sizes = calloc((size_t)(2 * a->n_modules) + 1, sizeof *t->grad_sizes);
    if (!t->moments || !t->moment_store || !t->grads || !t->grad_sizes)
        return dt_err("out of memory for the AdamW state (%lld parameters)", (long long)n);
    real *p = t->moment_store;
    for (int i = 0; i < a->n_modules; i++) {
        const dt_lora *l = &a->modules[i].lora;
        int64_t na = l->rank * l->in, nb = l->out * l->rank;
        t->moments[4 * i + 0] = p, p += na;
        t->moments[4 * i + 1] = p, p += na;
        t->moments[4 * i + 2] = p, p += nb;
        t->moments[4 * i + 3] = p, p += nb;
        t->grads[2 * i] = l->dA, t->grad_sizes[2 * i] = na;
        t->grads[2 * i + 1] = l->dB, t->grad_sizes[2 * i + 1] = nb;
    }
    int cap = max_len_of(&t->train);
    int vcap = max_len_of(&t->valid);
    int64_t tokens = (int64_t)t->o.batch_size * (cap > vcap ? cap : vcap);
    t->ids = malloc(sizeof *t->ids * (size_t)tokens);
    t->labels = malloc(sizeof *t->labels * (size_t)tokens);
    t->seq_lens = malloc(sizeof *t->seq_lens * (size_t)t->o.batch_size);
    t->order = malloc(sizeof *t->order * (size_t)t->train.d->n_rows);
    if (!t->ids || !t->labels || !t->seq_lens || !t->order) return dt_err("out of memory for batches");
    return 0;
}

int trainer_init(trainer *t, const trainer_opts *o, qwen35_model *m, lora_adapter *a, const checkpoint *ck,
                 const dt_dataset *train, const dt_dataset *valid) {
    memset(t, 0, sizeof *t);
    t->o = *o;
    t->m = m;
    t->a = a;
    t->ck = ck;
    t->order_epoch = -1;
    t->last_saved = -1;
    t->last_eval_step = -1;
    t->last_loss = t->last_eval_loss = NAN;
    if (check_opts(o) != 0) return -1;
    if (a->n_modules == 0) return dt_err("the adapter has no modules to train");
    if (rows_cut(&t->train, train, o->max_seq_len) != 0) goto fail;
    if (train->n_rows == 0 || t->train.n_targets == 0) {
        dt_err("%s: nothing to train on: no row has a target (a label other than -100 after the first "
               "token%s)", train->path ? train->path : "training data",
               t->train.n_truncated ? " within --max-seq-len" : "");
        goto fail;
    }
    if (valid) {
        t->has_valid = true;
        if (rows_cut(&t->valid, valid, o->max_seq_len) != 0) goto fail;
        if (t->valid.n_targets == 0) {
            dt_err("%s: no targets to evaluate (every row has one token or only -100 labels)",
                   valid->path ? valid->path : "validation data");
            goto fail;
        }
    }
    t->micro_per_epoch = (train->n_rows + o->batch_size - 1) / o->batch_size;
    t->steps_per_epoch = (t->micro_per_epoch + o->grad_accum - 1) / o->grad_accum;
    t->total_steps = o->max_steps > 0 ? o->max_steps : (int64_t)o->epochs * t->steps_per_epoch;
    t->data_hash = data_hash(train);
    if (alloc_state(t) != 0) goto fail;
    if (o->out_dir && io_make_dirs(o->out_dir) != 0) goto fail;
    return 0;
fail:
    trainer_free(t);
    return -1;
}

void trainer_free(trainer *t) {
    if (t->log) fclose(t->log);
    rows_free(&t->train);
    rows_free(&t->valid);
    free(t->moments);
    free(t->moment_store);
    free(t->grads);
    free(t->grad_sizes);
    free(t->order);
    free(t->ids);
    free(t->labels);
    free(t->seq_lens);
    memset(t, 0, sizeof *t);
}

int trainer_resume(trainer *t, const char *dir) {
    if (train_state_load(t, dir) != 0) return -1;
    snprintf(t->saved_dir, sizeof t->saved_dir, "%s", dir);
    t->last_saved = t->step;
    return 0;
}

/* ---------------------------------------------------------------- batches */

/* Fisher-Yates over the rows, from a stream of (seed, epoch): resuming in the middle of an
 * epoch rebuilds the same order with nothing stored. */
static void make_order(trainer *t, int64_t epoch) {
    int n = t->train.d->n_rows;
    for (int i = 0; i < n; i++) t->order[i] = i;
    if (t->o.shuffle) {
        dt_rng r;
        dt_rng_seed2(&r, t->o.seed ^ SALT_ORDER, (uint64_t)epoch);
        for (int i = n - 1; i > 0; i--) {
            int j = (int)dt_rng_below(&r, (uint64_t)i + 1);
            int tmp = t->order[i];
            t->order[i] = t->order[j];
            t->order[j] = tmp;
        }
    }
    t->order_epoch = epoch;
}

/* Rows [first, end) of the list `rows` (indices into r), cut and packed back to back. */
static qwen35_batch pack(trainer *t, const train_rows *r, const int *rows, int first, int end) {
    int n_tok = 0;
    for (int i = first; i < end; i++) {
        int k = rows ? rows[i] : i, len = r->len[k];
        const dt_row *row = &r->d->rows[k];
        memcpy(t->ids + n_tok, row->input_ids, sizeof *t->ids * (size_t)len);
        memcpy(t->labels + n_tok, row->labels, sizeof *t->labels * (size_t)len);
        t->seq_lens[i - first] = len;
        n_tok += len;
    }
    return (qwen35_batch){.ids = t->ids, .labels = t->labels, .seq_lens = t->seq_lens, .n_seqs = end - first,
                          .n_tokens = n_tok};
}

/* The rows of micro-batch mb of the current epoch: [*first, *end) of t->order. */
static void micro_rows(const trainer *t, int64_t mb, int *first, int *end) {
    int64_t n = t->train.d->n_rows, f = mb * t->o.batch_size, e = f + t->o.batch_size;
    *first = (int)f;
    *end = (int)(e < n ? e : n);
}

/* Every LoRA module draws its own dropout mask per micro-batch, from (seed, step,
 * micro-batch): masks do not depend on what ran before, so a resumed run draws the same. */
static void set_dropout(trainer *t, int64_t step, int64_t micro) {
    dt_rng r;
    dt_rng_seed2(&r, t->o.seed ^ SALT_DROPOUT, ((uint64_t)step << 24) ^ (uint64_t)micro);
    for (int i = 0; i < t->a->n_modules; i++) {
        dt_lora *l = &t->a->modules[i].lora;
        l->dropout = (real)t->a->dropout;
        l->dropout_seed = dt_rng_next(&r);
    }
}

static void set_dropout_off(trainer *t) {
    for (int i = 0; i < t->a->n_modules; i++) t->a->modules[i].lora.dropout = 0;
}

/* "lines 3, 7, 12" of the step's rows, for messages that must let the user find the data. */
static void step_lines(const trainer *t, int64_t mb0, int64_t mb1, char *buf, size_t cap) {
    size_t k = (size_t)snprintf(buf, cap, "%s lines", t->train.d->path ? t->train.d->path : "data");
    int shown = 0;
    for (int64_t mb = mb0; mb < mb1 && k < cap; mb++) {
        int first, end;
        micro_rows(t, mb, &first, &end);
        for (int i = first; i < end && k < cap; i++, shown++) {
            if (shown == 16) {
                k += (size_t)snprintf(buf + k, cap - k, ", ...");
                return;
            }
            k += (size_t)snprintf(buf + k, cap - k, "%s %d", shown ? "," : "", t->train.d->rows[t->order[i]].line);
        }
    }
}

/* ---------------------------------------------------------------- one step */

/* With the model on a GPU the LoRA's optimiser runs there too; the host copies of the weights and
 * moments are brought up to date only when something reads them (a save). */
static dt_lora **module_loras(trainer *t) {
    dt_lora **l = malloc(sizeof *l * (size_t)(t->a->n_modules > 0 ? t->a->n_modules : 1));
    for (int i = 0; l && i < t->a->n_modules; i++) l[i] = &t->a->modules[i].lora;
    return l;
}

static int gpu_state_transfer(trainer *t, bool to_device) {
    if (!t->o.gpu) return 0;
    dt_lora **l = module_loras(t);
    if (!l) return dt_err("out of memory");
    int rc = to_device ? qwen35_cuda_optim_upload(t->o.gpu, t->m, l, t->moments, t->a->n_modules)
                       : qwen35_cuda_optim_download(t->o.gpu, l, t->moments, t->a->n_modules);
    free(l);
    return rc;
}

static void zero_grads(trainer *t) {
    for (int i = 0; i < 2 * t->a->n_modules; i++) memset(t->grads[i], 0, sizeof(real) * (size_t)t->grad_sizes[i]);
}

static void apply_adamw(trainer *t, double lr) {
    t->adam_step++;
    for (int i = 0; i < t->a->n_modules; i++) {
        dt_lora *l = &t->a->modules[i].lora;
        real **mv = t->moments + 4 * i;
        adamw_update(l->A, l->dA, mv[0], mv[1], l->rank * l->in, t->adam_step, lr, &t->o.adamw);
        adamw_update(l->B, l->dB, mv[2], mv[3], l->out * l->rank, t->adam_step, lr, &t->o.adamw);
    }
}

/* Forward and backward of every micro-batch of the step, each scaled by 1 / (targets of the
 * whole step), so the accumulated gradient is that of the step's token-mean loss. */
static int accumulate(trainer *t, int64_t mb0, int64_t mb1, int64_t targets, double *loss_sum, int64_t *input_tokens) {
    int64_t counted = 0;
    bool synced = false;
    *loss_sum = 0;
    *input_tokens = 0;
    for (int64_t mb = mb0; mb < mb1; mb++) {
        int first, end, mb_targets = 0;
        micro_rows(t, mb, &first, &end);
        for (int i = first; i < end; i++) mb_targets += t->train.targets[t->order[i]];
        if (mb_targets == 0) continue;  /* adds nothing to the loss or the gradient */
        qwen35_batch b = pack(t, &t->train, t->order, first, end);
        set_dropout(t, t->step, mb - mb0);
        double ls = 0;
        int64_t n = 0;
        int rc;
        if (t->o.gpu) {
            /* the host LoRA changed at the last update: the device copies follow once per step */
            rc = synced ? 0 : qwen35_cuda_sync_lora(t->o.gpu, t->m);
            synced = true;
            if (rc == 0)
                rc = qwen35_cuda_forward_backward(t->o.gpu, t->m, &b, 1.0 / (double)targets, t->o.grad_checkpoint,
                                                  &ls, &n);
        } else {
            rc = qwen35_forward_backward(t->m, &b, 1.0 / (double)targets, t->o.grad_checkpoint, &ls, &n);
        }
        set_dropout_off(t);
        if (rc != 0) return -1;
        *loss_sum += ls;
        counted += n;
        *input_tokens += b.n_tokens;
    }
    if (counted != targets)
        return dt_err("the model counted %lld targets where the trainer counted %lld", (long long)counted,
                      (long long)targets);
    return 0;
}

static int run_step(trainer *t, train_step_log *out) {
    double t0 = dt_seconds();
    int64_t s = t->step, epoch = s / t->steps_per_epoch, k = s % t->steps_per_epoch;
    if (t->order_epoch != epoch) make_order(t, epoch);
    int64_t mb0 = k * t->o.grad_accum, mb1 = mb0 + t->o.grad_accum;
    if (mb1 > t->micro_per_epoch) mb1 = t->micro_per_epoch;
    int64_t targets = 0;
    for (int64_t mb = mb0; mb < mb1; mb++) {
        int first, end;
        micro_rows(t, mb, &first, &end);
        for (int i = first; i < end; i++) targets += t->train.targets[t->order[i]];
    }
    double lr = schedule_lr(t->o.schedule, t->o.lr, s, t->o.warmup_steps, t->total_steps);
    *out = (train_step_log){.step = s + 1, .total_steps = t->total_steps, .lr = lr, .tokens = targets,
                            .loss = NAN, .grad_norm = NAN};
    if (!t->o.gpu) zero_grads(t);  /* the device zeroes its own after each update */
    double loss_sum = 0;
    int64_t input_tokens = 0;
    if (targets == 0) {
        /* Every row of this step is masked: nothing to learn, so no update; the step still
         * counts, so the schedule and the epochs stay where they would be. */
        out->skipped = true;
    } else {
        char where[512];
        if (accumulate(t, mb0, mb1, targets, &loss_sum, &input_tokens) != 0) {
            step_lines(t, mb0, mb1, where, sizeof where);
            return dt_err_wrap("step %lld (%s)", (long long)(s + 1), where);
        }
        out->loss = loss_sum / (double)targets;
        if (!isfinite(out->loss)) {
            step_lines(t, mb0, mb1, where, sizeof where);
            return dt_err("step %lld (%s): the loss is not finite (%g); stopped before updating the weights",
                          (long long)(s + 1), where, out->loss);
        }
        double grad_mul = 1;
        if (t->o.gpu) {
            /* clip as grad_clip does, by scaling the gradient inside the device's update */
            if (qwen35_cuda_grad_norm(t->o.gpu, &out->grad_norm) != 0) return dt_err_wrap("step %lld", (long long)(s + 1));
            double coef = t->o.max_grad_norm / (out->grad_norm + 1e-6);
            if (t->o.max_grad_norm > 0 && isfinite(out->grad_norm) && coef < 1.0) grad_mul = (float)coef;
        } else {
            out->grad_norm = grad_clip(t->grads, t->grad_sizes, 2 * t->a->n_modules, t->o.max_grad_norm);
        }
        if (!isfinite(out->grad_norm)) {
            step_lines(t, mb0, mb1, where, sizeof where);
            return dt_err("step %lld (%s): the gradient norm is not finite (%g); stopped before updating the "
                          "weights", (long long)(s + 1), where, out->grad_norm);
        }
        if (t->o.gpu) {
            if (qwen35_cuda_adamw(t->o.gpu, ++t->adam_step, lr, &t->o.adamw, grad_mul) != 0)
                return dt_err_wrap("step %lld", (long long)(s + 1));
        } else {
            apply_adamw(t, lr);
        }
        t->tokens_trained += targets;
        t->last_loss = out->loss;
    }
    t->step++;
    out->epoch = (double)t->step / (double)t->steps_per_epoch;
    out->input_tokens = input_tokens;
    out->seconds = dt_seconds() - t0;
    out->tok_per_s = out->seconds > 0 ? (double)input_tokens / out->seconds : 0;
    int64_t gpu_weights = 0, gpu_peak = 0;
    if (t->o.gpu) qwen35_cuda_memory(t->o.gpu, &gpu_weights, &gpu_peak);
    out->peak_mem_mb = (double)(t->o.gpu ? gpu_peak : dt_peak_rss()) / (1024.0 * 1024.0);
    return 0;
}

/* ---------------------------------------------------------------- evaluation */

int trainer_eval(trainer *t, double *loss, int64_t *tokens) {
    if (!t->has_valid) return dt_err("no validation data");
    set_dropout_off(t);
    const train_rows *v = &t->valid;
    double sum = 0;
    int64_t n = 0;
    for (int first = 0; first < v->d->n_rows; first += t->o.batch_size) {
        int end = first + t->o.batch_size < v->d->n_rows ? first + t->o.batch_size : v->d->n_rows;
        qwen35_batch b = pack(t, v, NULL, first, end);
        double ls = 0;
        int64_t k = 0;
        int rc = t->o.gpu ? (first == 0 ? qwen35_cuda_sync_lora(t->o.gpu, t->m) : 0) ||
                                qwen35_cuda_eval_loss(t->o.gpu, t->m, &b, &ls, &k)
                          : qwen35_eval_loss(t->m, &b, &ls, &k);
        if (rc != 0)
            return dt_err_wrap("%s:%d-%d", v->d->path ? v->d->path : "valid", v->d->rows[first].line,
                               v->d->rows[end - 1].line);
        sum += ls;
        n += k;
    }
    *tokens = n;
    *loss = n > 0 ? sum / (double)n : NAN;
    if (!isfinite(*loss)) return dt_err("the evaluation loss is not finite (%g)", *loss);
    return 0;
}

/* ---------------------------------------------------------------- train_log.jsonl */

static void put_num(FILE *f, const char *key, double x) {
    char buf[32] = "null";
    if (isfinite(x)) train_fmt_double(buf, sizeof buf, x);
    fprintf(f, ", \"%s\": %s", key, buf);
}

/* One line per record, flushed, so a crash keeps everything logged before it. */
static void log_step(trainer *t, const train_step_log *s) {
    if (!t->log) return;
    fprintf(t->log, "{\"step\": %lld", (long long)s->step);
    put_num(t->log, "epoch", s->epoch);
    put_num(t->log, "loss", s->loss);
    put_num(t->log, "lr", s->lr);
    put_num(t->log, "grad_norm", s->grad_norm);
    fprintf(t->log, ", \"tokens\": %lld, \"input_tokens\": %lld", (long long)s->tokens, (long long)s->input_tokens);
    fprintf(t->log, ", \"tok_per_s\": %.1f, \"peak_mem_mb\": %.1f, \"seconds\": %.4f", s->tok_per_s, s->peak_mem_mb,
            s->seconds);
    if (s->skipped) fprintf(t->log, ", \"skipped\": true");
    fprintf(t->log, "}\n");
    fflush(t->log);
}

static void log_eval(trainer *t, const train_eval_log *e) {
    if (!t->log) return;
    fprintf(t->log, "{\"step\": %lld", (long long)e->step);
    put_num(t->log, "epoch", e->epoch);
    put_num(t->log, "eval_loss", e->loss);
    fprintf(t->log, ", \"eval_tokens\": %lld, \"eval_seconds\": %.4f}\n", (long long)e->tokens, e->seconds);
    fflush(t->log);
}

/* A resumed run keeps the records up to its checkpoint and drops the later ones (they are
 * about to be made again), so the log reads as one uninterrupted run. */
static int trim_log(const char *path, int64_t upto) {
    FILE *in = fopen(path, "rb");
    if (!in) return errno == ENOENT ? 0 : dt_err("%s: cannot open: %s", path, strerror(errno));
    char tmp[4208];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *out = fopen(tmp, "wb");
    if (!out) {
        fclose(in);
        return dt_err("%s: cannot create: %s", tmp, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, in)) > 0) {
        json_t *o = json_loadb(line, (size_t)n, 0, NULL);
        json_t *st = o ? json_object_get(o, "step") : NULL;
        bool keep = st && json_is_integer(st) && json_integer_value(st) <= upto;
        json_decref(o);
        if (keep) fwrite(line, 1, (size_t)n, out);
    }
    free(line);
    fclose(in);
    /* errno as it was at the failure, not after the cleanup */
    int e = 0;
    if (ferror(out) || fflush(out) != 0 || fsync(fileno(out)) != 0) e = errno ? errno : EIO;
    if (fclose(out) != 0 && !e) e = errno;
    if (!e && rename(tmp, path) != 0) e = errno;
    if (e) {
        unlink(tmp);
        return dt_err("%s: cannot rewrite: %s", path, strerror(e));
    }
    return 0;
}

static int open_log(trainer *t) {
    if (!t->o.out_dir) return 0;
    char *path = io_path_join(t->o.out_dir, "train_log.jsonl");
    if (!path) return dt_err("out of memory");
    int rc = t->step > 0 ? trim_log(path, t->step) : 0;
    if (rc == 0 && !(t->log = fopen(path, t->step > 0 ? "ab" : "wb")))
        rc = dt_err("%s: cannot open: %s", path, strerror(errno));
    free(path);
    return rc;
}

/* ---------------------------------------------------------------- the loop */

static bool adapter_finite(const lora_adapter *a) {
    for (int i = 0; i < a->n_modules; i++) {
        const dt_lora *l = &a->modules[i].lora;
        for (int64_t j = 0; j < l->rank * l->in; j++)
            if (!isfinite(l->A[j])) return false;
        for (int64_t j = 0; j < l->out * l->rank; j++)
            if (!isfinite(l->B[j])) return false;
    }
    return true;
}

static int save_checkpoint(trainer *t, const trainer_hooks *h) {
    if (!t->o.out_dir || t->last_saved == t->step) return 0;
    if (gpu_state_transfer(t, false) != 0) return -1;
    if (!adapter_finite(t->a))
        return dt_err("after step %lld the adapter holds non-finite weights; not saved", (long long)t->step);
    char dir[4096];
    trainer_checkpoint_dir(dir, sizeof dir, t->o.out_dir, t->step);
    if (train_state_save(t, dir) != 0) return -1;
    snprintf(t->saved_dir, sizeof t->saved_dir, "%s", dir);
    t->last_saved = t->step;
    if (h && h->on_save) h->on_save(dir, t->step, h->ctx);
    return 0;
}

static int evaluate(trainer *t, const trainer_hooks *h) {
    train_eval_log e = {.step = t->step, .epoch = (double)t->step / (double)t->steps_per_epoch};
    double t0 = dt_seconds();
    if (trainer_eval(t, &e.loss, &e.tokens) != 0) return dt_err_wrap("evaluation after step %lld", (long long)t->step);
    e.seconds = dt_seconds() - t0;
    t->last_eval_loss = e.loss;
    t->last_eval_step = t->step;
    log_eval(t, &e);
    if (h && h->on_eval) h->on_eval(&e, h->ctx);
    return 0;
}

static int save_final(trainer *t) {
    if (gpu_state_transfer(t, false) != 0) return -1;  /* the caller reads the adapter, saved or not */
    if (!t->o.out_dir) return 0;
    if (!adapter_finite(t->a))
        return dt_err("after step %lld the adapter holds non-finite weights; not saved", (long long)t->step);
    return adapter_save(t->a, t->ck, t->o.out_dir);
}

static int loop(trainer *t, const trainer_hooks *h) {
    while (t->step < t->total_steps) {
        train_step_log s;
        if (run_step(t, &s) != 0) return -1;
        log_step(t, &s);
        if (h && h->on_step) h->on_step(&s, h->ctx);
        if (t->has_valid && t->o.eval_every > 0 && t->step % t->o.eval_every == 0 && evaluate(t, h) != 0) return -1;
        if (t->o.save_every > 0 && t->step % t->o.save_every == 0 && save_checkpoint(t, h) != 0) return -1;
        if (t->o.stop && *t->o.stop && t->step < t->total_steps) {
            if (save_checkpoint(t, h) != 0 || save_final(t) != 0) return -1;
            return 1;
        }
    }
    if (t->has_valid && t->last_eval_step != t->step && evaluate(t, h) != 0) return -1;
    return save_final(t);
}

int trainer_run(trainer *t, const trainer_hooks *h) {
    if (open_log(t) != 0 || gpu_state_transfer(t, true) != 0) return -1;
    int rc = loop(t, h);
    if (t->log) {
        fclose(t->log);
        t->log = NULL;
    }
    return rc;
}
