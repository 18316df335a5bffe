/* deltatune train: LoRA fine-tuning on a tokenized JSONL file. */
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/args.h"
#include "cli/device.h"
#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/chat.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/mem.h"
#include "deltatune/progress.h"
#include "deltatune/quantize_ckpt.h"
#include "deltatune/qwen35.h"
#include "deltatune/trainer.h"

#define CMD "train"
#define SUMMARY                                                                                           \
    "Trains a LoRA adapter on a JSONL file (chat, ShareGPT, Alpaca, completions, text, or pre-tokenized\n"   \
    "{\"input_ids\", \"labels\"} rows; see --train-on) and writes it to --out in PEFT's format\n"            \
    "(adapter_config.json + adapter_model.safetensors), with train_log.jsonl (one JSON object per\n"        \
    "optimiser step) and, with\n"                                                                            \
    "--save-every, checkpoint-<step>/ folders that --resume continues from exactly. Ctrl-C finishes the\n"  \
    "current step, saves a checkpoint and the adapter, and exits with status 130. The last line of\n"        \
    "stdout is one JSON object: {\"steps\", \"loss\", \"eval_loss\", \"tokens\", \"input_tokens\",\n"        \
    "\"seconds\", \"tok_per_s\", \"peak_mem_mb\", \"adapter\"}."

#define DEFAULT_TARGETS "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,in_proj_qkv,in_proj_z,out_proj"
#define EXIT_INTERRUPTED 130

typedef struct {
    const char *model, *data, *out, *adapter, *targets, *schedule, *valid, *resume, *train_on, *device;
    bool enable_thinking;
    int rank;
    double alpha, dropout;
    bool rslora;
    int batch, accum, max_seq_len;
    double lr;
    int warmup;
    double weight_decay, max_grad_norm;
    int epochs, steps, seed;
    bool no_shuffle, no_grad_checkpoint;
    int eval_every, save_every, log_every;
    int quantize, group_size;  /* bits (0: as stored) */
    int ce_chunk;
} train_cli;

static volatile sig_atomic_t interrupted;
static void on_signal(int sig) { interrupted = sig; }

/* The first Ctrl-C asks for a clean stop; SA_RESETHAND makes a second one end the process. */
static void catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ---------------------------------------------------------------- targets */

typedef struct {
    int n;
    char *names[W_KIND_COUNT];
} target_list;

static void targets_free(target_list *t) {
    for (int i = 0; i < t->n; i++) free(t->names[i]);
    t->n = 0;
}

static bool is_target_name(const char *s) {
    for (int k = 0; k < W_KIND_COUNT; k++) {
        const char *m = qwen35_lora_module_name((qwen35_wkind)k);
        if (m && !strcmp(m, s)) return true;
    }
    return false;
}

static int add_target(target_list *t, const char *s, size_t len) {
    for (int i = 0; i < t->n; i++)
        if (strlen(t->names[i]) == len && !strncmp(t->names[i], s, len)) return 0;
    if (t->n == W_KIND_COUNT || !(t->names[t->n] = strndup(s, len))) return dt_err("out of memory");
    if (!is_target_name(t->names[t->n])) {
        char known[256];
        qwen35_lora_module_names(known, sizeof known);
        dt_err("--lora-targets: unknown module '%s' (known: %s, or all-linear)", t->names[t->n], known);
        free(t->names[t->n]);
        return -1;
    }
    t->n++;
    return 0;
}

/* "q_proj, v_proj" or "all-linear" (every linear of the decoder, as PEFT's shorthand). */
static int parse_targets(target_list *t, const char *spec) {
    memset(t, 0, sizeof *t);
    if (!strcmp(spec, "all-linear")) {
        for (int k = 0; k < W_KIND_COUNT; k++) {
            const char *m = qwen35_lora_module_name((qwen35_wkind)k);
            if (m && add_target(t, m, strlen(m)) != 0) return -1;
        }
        return 0;
    }
    for (const char *p = spec; *p;) {
        while (*p == ',' || *p == ' ') p++;
        size_t n = strcspn(p, ", ");
        if (n && add_target(t, p, n) != 0) {
            targets_free(t);
            return -1;
        }
        p += n;
    }
    if (t->n == 0) return dt_err("--lora-targets: no module named");
    return 0;
}

/* ---------------------------------------------------------------- checks before loading */

static int check_flags(const train_cli *o, target_list *targets) {
    if (o->eval_every > 0 && !o->valid) return dt_err("--eval-every needs --valid FILE");
    return parse_targets(targets, o->targets);
}

static bool is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int check_resume_dir(const char *dir) {
    if (!is_dir(dir)) return dt_err("--resume %s: no such folder", dir);
    char *p = io_path_join(dir, "trainer_state.json");
    if (!p) return dt_err("out of memory");
    bool found = io_file_exists(p);
    free(p);
    if (!found)
        return dt_err("--resume %s: not a training checkpoint (no trainer_state.json; checkpoints are the "
                      "checkpoint-<step> folders that --save-every writes)", dir);
    return 0;
}

/* With --resume the adapter comes from the checkpoint; LoRA flags that say otherwise are a
 * mistake worth naming rather than silently ignoring. */
static int check_lora_flags(const train_cli *o, const target_list *t, const lora_adapter *a) {
    char what[160] = "";
    if (o->rank != a->rank) snprintf(what, sizeof what, "--lora-rank is %d here but %d", o->rank, a->rank);
    else if (o->alpha != a->alpha) snprintf(what, sizeof what, "--lora-alpha is %g here but %g", o->alpha, a->alpha);
    else if (o->dropout != a->dropout)
        snprintf(what, sizeof what, "--lora-dropout is %g here but %g", o->dropout, a->dropout);
    else if (o->rslora != a->rslora) snprintf(what, sizeof what, "--rslora is %s here but %s", o->rslora ? "on" : "off",
                                              a->rslora ? "on" : "off");
    bool same = t->n == a->n_targets;
    for (int i = 0; same && i < t->n; i++) {
        bool found = false;
        for (int j = 0; j < a->n_targets; j++) found |= !strcmp(t->names[i], a->targets[j]);
        same = found;
    }
    if (!what[0] && !same) snprintf(what, sizeof what, "--lora-targets differs from the target modules");
    if (!what[0]) return 0;
    return dt_err("%s in the checkpoint %s; resume with the flags of the run that wrote it (with --adapter, "
                  "its settings are the checkpoint's)", what, o->resume);
}

/* ---------------------------------------------------------------- reporting */

typedef struct {
    const train_cli *o;
    dt_progress prog;   /* over the steps this process runs, so a resumed run's ETA is right */
    int64_t first_step, work;
} reporter;

static void fmt_bytes(char *buf, size_t cap, double mb) { cli_human_bytes(buf, cap, mb * 1024.0 * 1024.0); }

/* On a terminal the progress bar owns the last line: clear it, print, and let it redraw. */
static void print_line(reporter *r, const char *line) {
    if (r->prog.tty) fputs("\r\033[K", stderr);
    fputs(line, stderr);
    fputc('\n', stderr);
    r->prog.last_draw = 0;
}

static void on_step(const train_step_log *s, void *ctx) {
    reporter *r = ctx;
    r->work += s->input_tokens;
    if (s->step % r->o->log_every == 0 || s->step == s->total_steps || s->skipped) {
        char line[256], peak[32];
        fmt_bytes(peak, sizeof peak, s->peak_mem_mb);
        if (s->skipped)
            snprintf(line, sizeof line, "step %lld/%lld | skipped: no targets in this step, no update | lr %.2e",
                     (long long)s->step, (long long)s->total_steps, s->lr);
        else
            snprintf(line, sizeof line, "step %lld/%lld | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | peak %s",
                     (long long)s->step, (long long)s->total_steps, s->loss, s->lr, s->grad_norm, s->tok_per_s, peak);
        print_line(r, line);
    }
    dt_progress_update(&r->prog, s->step - r->first_step, r->work);
}

static void on_eval(const train_eval_log *e, void *ctx) {
    reporter *r = ctx;
    char line[256];
    snprintf(line, sizeof line, "eval after step %lld | eval_loss %.4f | ppl %.2f | %lld targets | %.1f s",
             (long long)e->step, e->loss, exp(e->loss), (long long)e->tokens, e->seconds);
    print_line(r, line);
}

static void on_save(const char *dir, int64_t step, void *ctx) {
    reporter *r = ctx;
    char line[4200];
    snprintf(line, sizeof line, "saved checkpoint %s (step %lld)", dir, (long long)step);
    print_line(r, line);
}

static void print_banner(const train_cli *o, const checkpoint *ck, const lora_adapter *a, const trainer *t,
                         const dt_dataset *d, const char *adapter_from) {
    char params[32], lora[32], tok[32];
    int64_t total = qwen35_param_count(&ck->cfg);
    cli_human_count(params, sizeof params, (double)total);
    cli_human_count(lora, sizeof lora, (double)t->n_params);
    const dt_weight *e = checkpoint_weight(ck, W_EMBED, -1);
    fprintf(stderr, "train: model %s (Qwen3.5, %d layers, hidden %d, %s params, %s weights)\n", o->model,
            ck->cfg.n_layers, ck->cfg.hidden_size, params, e ? dt_dtype_name(e->dtype) : "?");
    fprintf(stderr, "train: LoRA r %d, alpha %g (scale %g%s), dropout %g, %d modules on ", a->rank, a->alpha,
            a->n_modules ? (double)a->modules[0].lora.scale : 0.0, a->rslora ? ", rsLoRA" : "", a->dropout,
            a->n_modules);
    for (int i = 0; i < a->n_targets; i++) fprintf(stderr, "%s%s", i ? "," : "", a->targets[i]);
    fprintf(stderr, ": %s trainable params (%.3f%% of %s)%s%s\n", lora, 100.0 * (double)t->n_params / (double)total,
            params, adapter_from ? ", from " : "", adapter_from ? adapter_from : "");
    cli_human_count(tok, sizeof tok, (double)t->train.n_tokens);
    fprintf(stderr, "train: data %s: %d rows, %s tokens, %lld targets\n", o->data, d->n_rows, tok,
            (long long)t->train.n_targets);
    if (t->train.n_truncated)
        fprintf(stderr, "train: warning: %d of %d rows are longer than --max-seq-len %d and were truncated\n",
                t->train.n_truncated, d->n_rows, o->max_seq_len);
    if (t->has_valid && t->valid.n_truncated)
        fprintf(stderr, "train: warning: %d validation rows are longer than --max-seq-len %d and were truncated\n",
                t->valid.n_truncated, o->max_seq_len);
    if (o->steps > 0)
        fprintf(stderr, "train: %lld steps (%lld per epoch)", (long long)t->total_steps, (long long)t->steps_per_epoch);
    else
        fprintf(stderr, "train: %lld steps (%d epoch%s x %lld)", (long long)t->total_steps, o->epochs,
                o->epochs == 1 ? "" : "s", (long long)t->steps_per_epoch);
    fprintf(stderr, ", batch %d x accum %d, seq len <= %d, %s order (seed %d)\n", o->batch, o->accum,
            o->max_seq_len, o->no_shuffle ? "file" : "shuffled", o->seed);
    fprintf(stderr, "train: AdamW lr %.2e, %s schedule, warmup %d, weight decay %g, clip %s", o->lr, o->schedule,
            o->warmup, o->weight_decay, o->max_grad_norm > 0 ? "" : "off");
    if (o->max_grad_norm > 0) fprintf(stderr, "%g", o->max_grad_norm);
    fprintf(stderr, "\ntrain: features: gradient checkpointing %s, fused CE (chunked LM head, no [tokens x vocab] "
                    "logits), packed rows\n",
            o->no_grad_checkpoint ? "off" : "on");
    if (t->step > 0)
        fprintf(stderr, "train: resuming from %s at step %lld/%lld\n", o->resume, (long long)t->step,
                (long long)t->total_steps);
}

/* ---------------------------------------------------------------- run */

typedef struct {
    checkpoint ck;
    qwen35_model m;
    lora_adapter ad;
    dt_dataset data, valid;
    trainer t;
    qwen35_cuda *gpu;
    bool have_ck, have_m, have_ad, have_data, have_valid, have_t;
} session;

static void session_close(session *s) {
    if (s->have_t) trainer_free(&s->t);
    qwen35_cuda_free(s->gpu);
    if (s->have_valid) dataset_free(&s->valid);
    if (s->have_data) dataset_free(&s->data);
    if (s->have_m) qwen35_model_free(&s->m);
    if (s->have_ad) adapter_free(&s->ad);
    if (s->have_ck) checkpoint_close(&s->ck);
}

static int make_adapter(session *s, const train_cli *o, const target_list *tl, const char **from) {
    *from = NULL;
    if (o->resume) {
        if (adapter_load(&s->ad, o->resume, &s->ck) != 0) return dt_err_wrap("--resume %s", o->resume);
        s->have_ad = true;
        if (!o->adapter && check_lora_flags(o, tl, &s->ad) != 0) return -1;
        *from = o->resume;
    } else if (o->adapter) {
        if (adapter_load(&s->ad, o->adapter, &s->ck) != 0) return dt_err_wrap("--adapter %s", o->adapter);
        s->have_ad = true;
        *from = o->adapter;
    } else {
        if (adapter_init(&s->ad, &s->ck, o->rank, o->alpha, o->rslora, o->dropout, (const char *const *)tl->names,
                         tl->n, (uint64_t)o->seed) != 0)
            return dt_err_wrap("--lora-targets");
        s->have_ad = true;
    }
    if (adapter_alloc_grads(&s->ad) != 0) return -1;
    for (int i = 0; i < s->ad.n_modules; i++) {
        const lora_module *lm = &s->ad.modules[i];
        if (qwen35_model_set_lora(&s->m, lm->kind, lm->layer, &lm->lora) != 0)
            return dt_err_wrap("%s", *from ? *from : "--lora-targets");
    }
    return 0;
}

static void trainer_options(const train_cli *o, trainer_opts *to) {
    trainer_opts_default(to);
    to->batch_size = o->batch;
    to->grad_accum = o->accum;
    to->max_seq_len = o->max_seq_len;
    to->epochs = o->epochs;
    to->max_steps = o->steps;
    to->lr = o->lr;
    schedule_parse(o->schedule, &to->schedule);  /* the flag's choices are exactly the names */
    to->warmup_steps = o->warmup;
    to->adamw.weight_decay = o->weight_decay;
    to->max_grad_norm = o->max_grad_norm;
    to->seed = (uint64_t)o->seed;
    to->shuffle = !o->no_shuffle;
    to->grad_checkpoint = !o->no_grad_checkpoint;
    to->eval_every = o->eval_every;
    to->save_every = o->save_every;
    to->out_dir = o->out;
    to->stop = &interrupted;
}

static int open_all(session *s, const train_cli *o, const target_list *tl) {
    if (o->resume && check_resume_dir(o->resume) != 0) return -1;
    if (checkpoint_open(&s->ck, o->model) != 0) return -1;
    s->have_ck = true;
    if (o->quantize) {
        ckpt_quant_stats qs;
        if (checkpoint_quantize(&s->ck, o->quantize, o->group_size, &qs)) return -1;
        char line[768];
        checkpoint_quant_summary(line, sizeof line, &s->ck, &qs);
        fprintf(stderr, CMD ": quantized on load: %s\n", line);
    }
    if (qwen35_model_init(&s->m, &s->ck.cfg, s->ck.specs, s->ck.weights, s->ck.n_specs) != 0)
        return dt_err_wrap("%s", o->model);
    s->have_m = true;
    s->m.ce_chunk = o->ce_chunk;
    const char *from;
    if (make_adapter(s, o, tl, &from) != 0) return -1;
    /* Rows in a format other than tokenized need the model folder's tokenizer and template; the
     * trainer truncates to --max-seq-len and reports it. */
    dt_chat *chat = NULL;
    dt_data_opts dopts = {.model_dir = o->model, .vocab_size = s->ck.cfg.vocab_size,
                          .enable_thinking = o->enable_thinking};
    if (chat_train_on_parse(o->train_on, &dopts.train_on) != 0 || chat_load_if_present(&chat, o->model) != 0)
        return -1;
    dopts.chat = chat;
    int drc = dataset_load(&s->data, o->data, &dopts);
    s->have_data = drc == 0;
    if (drc == 0 && o->valid) {
        drc = dataset_load(&s->valid, o->valid, &dopts);
        s->have_valid = drc == 0;
    }
    chat_free(chat);
    if (drc != 0) return -1;
    trainer_opts to;
    trainer_options(o, &to);
    if (cli_open_device(o->device, &s->m, &s->gpu) != 0) return -1;
    to.gpu = s->gpu;
    if (trainer_init(&s->t, &to, &s->m, &s->ad, &s->ck, &s->data, o->valid ? &s->valid : NULL) != 0) return -1;
    s->have_t = true;
    if (o->resume && trainer_resume(&s->t, o->resume) != 0) return dt_err_wrap("--resume %s", o->resume);
    print_banner(o, &s->ck, &s->ad, &s->t, &s->data, from);
    return 0;
}

static void print_result(const train_cli *o, const trainer *t, const reporter *r, double secs) {
    int64_t gpu_weights = 0, gpu_peak = 0;
    qwen35_cuda_memory(t->o.gpu, &gpu_weights, &gpu_peak);
    double tps = secs > 0 ? (double)r->work / secs : 0;
    double peak = (double)(t->o.gpu ? gpu_peak : dt_peak_rss()) / (1024.0 * 1024.0);
    char pk[32];
    fmt_bytes(pk, sizeof pk, peak);
    fprintf(stderr, "train: %lld steps, %lld targets trained, %.1f s, %.0f tok/s, peak %s", (long long)t->step,
            (long long)t->tokens_trained, secs, tps, pk);
    if (isfinite(t->last_loss)) fprintf(stderr, ", final loss %.4f", t->last_loss);
    if (isfinite(t->last_eval_loss)) fprintf(stderr, ", eval loss %.4f", t->last_eval_loss);
    fprintf(stderr, "\ntrain: adapter saved to %s (adapter_model.safetensors, adapter_config.json); log %s/train_log.jsonl\n",
            o->out, o->out);
    printf("{\"steps\": %lld, \"loss\": ", (long long)t->step);
    if (isfinite(t->last_loss)) printf("%.17g", t->last_loss);
    else printf("null");
    printf(", \"eval_loss\": ");
    if (isfinite(t->last_eval_loss)) printf("%.17g", t->last_eval_loss);
    else printf("null");
    printf(", \"tokens\": %lld, \"input_tokens\": %lld, \"seconds\": %.3f, \"tok_per_s\": %.1f, \"peak_mem_mb\": %.1f, "
           "\"adapter\": ",
           (long long)t->tokens_trained, (long long)r->work, secs, tps, peak);
    json_t *path = json_string(o->out);
    char *quoted = path ? json_dumps(path, JSON_ENCODE_ANY) : NULL;
    printf("%s}\n", quoted ? quoted : "null");
    free(quoted);
    json_decref(path);
    fflush(stdout);
}

static int run(const train_cli *o, const target_list *tl) {
    session s;
    memset(&s, 0, sizeof s);
    int rc = EXIT_RUNTIME;
    catch_signals();
    if (open_all(&s, o, tl) != 0) goto out;

    reporter r = {.o = o, .first_step = s.t.step};
    trainer_hooks h = {.on_step = on_step, .on_eval = on_eval, .on_save = on_save, .ctx = &r};
    double t0 = dt_seconds();
    dt_progress_start(&r.prog, CMD, s.t.total_steps - s.t.step, "steps", "tok");
    int res = trainer_run(&s.t, &h);
    dt_progress_finish(&r.prog);
    double secs = dt_seconds() - t0;
    if (res < 0) {
        char msg[2048];
        snprintf(msg, sizeof msg, "%s", dt_errmsg());
        if (s.t.last_saved >= 0) dt_err("%s; the last checkpoint is %s", msg, s.t.saved_dir);
        else dt_err("%s; no checkpoint was written%s", msg, o->save_every ? "" : " (--save-every N writes them)");
        goto out;
    }
    if (res == 1) {
        fprintf(stderr, "train: interrupted after step %lld/%lld: checkpoint saved in %s, adapter in %s; continue "
                        "with the same command and --resume %s\n",
                (long long)s.t.step, (long long)s.t.total_steps, s.t.saved_dir, o->out, s.t.saved_dir);
        rc = EXIT_INTERRUPTED;
        goto out;
    }
    if (s.gpu) qwen35_cuda_profile(s.gpu, stderr);  /* with DT_CUDA_PROFILE=1: where the GPU's time went */
    print_result(o, &s.t, &r, secs);
    rc = EXIT_OK;
out:
    session_close(&s);
    return rc == EXIT_RUNTIME ? cli_fail(CMD, rc) : rc;
}

int cmd_train(int argc, char **argv) {
    train_cli o = {.targets = DEFAULT_TARGETS, .train_on = "assistant", .schedule = "linear", .rank = 16,
                   .alpha = 16, .batch = 2,
                   .accum = 4, .max_seq_len = 2048, .lr = 2e-4, .weight_decay = 0.01, .max_grad_norm = 1.0,
                   .epochs = 1, .seed = 3407, .log_every = 1, .ce_chunk = LMHEAD_TOKEN_CHUNK,
                   .device = device_default(), .group_size = 64};
    arg_spec specs[] = {
        ARG_STR_REQ("model", &o.model, "DIR", "model folder (config.json + safetensors)"),
        ARG_STR_REQ("data", &o.data, "FILE",
                    "JSONL: input_ids/labels, or (with the model's tokenizer) messages, conversations, "
                    "instruction/output, prompt/completion, text"),
        ARG_CHOICE("train-on", &o.train_on, chat_train_on_names,
                   "which tokens train: assistant turns, all tokens, or the last assistant turn"),
        ARG_FLAG("enable-thinking", &o.enable_thinking, "render chat rows with enable_thinking = true"),
        ARG_STR_REQ("out", &o.out, "DIR", "where the adapter, train_log.jsonl and checkpoints go"),
        ARG_STR("adapter", &o.adapter, "DIR", "start from this PEFT LoRA adapter (its r, alpha, dropout, targets)"),
        ARG_INT_RANGE("lora-rank", &o.rank, 1, 65536, "N", "LoRA rank r"),
        ARG_FLOAT_RANGE("lora-alpha", &o.alpha, 1e-6, 1e6, "X", "LoRA alpha: scale alpha/r"),
        ARG_FLOAT_RANGE("lora-dropout", &o.dropout, 0, 0.99, "P", "dropout on the LoRA input, as PEFT"),
        ARG_STR("lora-targets", &o.targets, "LIST", "comma-separated module names, or all-linear"),
        ARG_FLAG("rslora", &o.rslora, "rank-stabilised scale alpha/sqrt(r)"),
        ARG_INT_RANGE("batch-size", &o.batch, 1, 65536, "N", "rows per micro-batch, packed back to back"),
        ARG_INT_RANGE("grad-accum", &o.accum, 1, 65536, "N", "micro-batches per optimiser step"),
        ARG_INT_RANGE("max-seq-len", &o.max_seq_len, 2, 1 << 24, "N", "longer rows are truncated"),
        ARG_FLOAT_RANGE("lr", &o.lr, 0, 10, "X", "peak learning rate"),
        ARG_CHOICE("schedule", &o.schedule, schedule_names, "learning-rate schedule after the warm-up"),
        ARG_INT_RANGE("warmup-steps", &o.warmup, 0, 1e9, "N", "linear warm-up from 0"),
        ARG_FLOAT_RANGE("weight-decay", &o.weight_decay, 0, 10, "X", "AdamW decoupled weight decay"),
        ARG_FLOAT_RANGE("max-grad-norm", &o.max_grad_norm, 0, 1e9, "X", "clip the global gradient norm (0: off)"),
        ARG_INT_RANGE("epochs", &o.epochs, 1, 1e6, "N", "passes over the data"),
        ARG_INT_RANGE("steps", &o.steps, 0, 1e9, "N", "stop after N optimiser steps, wrapping epochs (0: use --epochs)"),
        ARG_INT_RANGE("seed", &o.seed, 0, 2147483647, "N", "seed of the LoRA init, row order and dropout"),
        ARG_FLAG("no-shuffle", &o.no_shuffle, "keep the file's row order (default: shuffled per epoch)"),
        ARG_STR("valid", &o.valid, "FILE", "JSONL (any format) to evaluate on (at the end, and every --eval-every)"),
        ARG_INT_RANGE("eval-every", &o.eval_every, 0, 1e9, "N", "evaluate on --valid every N steps (0: at the end)"),
        ARG_INT_RANGE("save-every", &o.save_every, 0, 1e9, "N", "write --out/checkpoint-<step>/ every N steps (0: none)"),
        ARG_STR("resume", &o.resume, "DIR", "continue from a checkpoint-<step> folder (same flags as its run)"),
        ARG_FLAG("no-grad-checkpoint", &o.no_grad_checkpoint, "keep every layer's activations (faster, more memory)"),
        ARG_INT_RANGE("log-every", &o.log_every, 1, 1e9, "N", "print a step line every N steps"),
        ARG_INT_RANGE("ce-chunk", &o.ce_chunk, 0, 1 << 24, "N",
                      "tokens per chunk of the fused LM-head loss (0: all at once, the full logits; for measuring); "
                      "on a GPU, the loss's scratch: that many tokens' rows of logits"),
        ARG_QUANTIZE(&o.quantize, &o.group_size),
        ARG_CHOICE("device", &o.device, device_names, DEVICE_HELP),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    if (args_check_quantize(o.quantize, o.group_size)) return cli_usage_fail(CMD);
    target_list tl = {0};
    if (check_flags(&o, &tl) != 0) return cli_usage_fail(CMD);
    rc = run(&o, &tl);
    targets_free(&tl);
    return rc;
}
