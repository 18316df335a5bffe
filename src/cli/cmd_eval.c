/* deltatune eval: token-weighted loss and perplexity over a tokenized JSONL file. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/device.h"
#include "deltatune/adapter.h"
#include "deltatune/chat.h"
#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/mem.h"
#include "deltatune/progress.h"
#include "deltatune/quantize_ckpt.h"
#include "deltatune/qwen35.h"

#define CMD "eval"
#define SUMMARY                                                                                    \
    "Computes the mean cross-entropy (token-weighted) and perplexity of a model, optionally with a\n" \
    "PEFT LoRA adapter, over a JSONL file in any format train reads (pre-tokenized rows need no tokenizer).\n" \
    "Consecutive rows are packed back to back into batches. Progress and a summary go to stderr;\n"   \
    "the last line of stdout is one JSON object:\n"                                                   \
    "  {\"loss\", \"ppl\", \"tokens\" (targets scored), \"rows\", \"input_tokens\", \"seconds\",\n"     \
    "   \"tok_per_s\", \"peak_mem_mb\"}"

typedef struct {
    const char *model, *data, *adapter, *train_on, *device;
    int batch_size, max_tokens;
    int quantize, group_size;  /* bits (0: as stored) */
    bool enable_thinking;
} eval_opts;

/* The end (exclusive) of the batch that starts at row `first`: at most batch_size rows and,
 * when max_tokens is set, at most max_tokens tokens, but never fewer than one row. */
static int batch_end(const dt_dataset *d, int first, const eval_opts *o) {
    int end = first;
    int64_t tokens = 0;
    while (end < d->n_rows && end - first < o->batch_size) {
        if (o->max_tokens > 0 && end > first && tokens + d->rows[end].len > o->max_tokens) break;
        tokens += d->rows[end].len;
        end++;
    }
    return end;
}

static int run(const eval_opts *o) {
    checkpoint ck;
    qwen35_model m;
    lora_adapter ad;
    dt_dataset d;
    qwen35_cuda *gpu = NULL;
    bool have_ck = false, have_m = false, have_ad = false, have_d = false;
    int32_t *ids = NULL, *labels = NULL;
    int *seq_lens = NULL;
    int rc = EXIT_RUNTIME;

    if (checkpoint_open(&ck, o->model)) goto out;
    have_ck = true;
    if (o->quantize) {
        ckpt_quant_stats qs;
        if (checkpoint_quantize(&ck, o->quantize, o->group_size, &qs)) goto out;
        char line[768];
        checkpoint_quant_summary(line, sizeof line, &ck, &qs);
        fprintf(stderr, CMD ": quantized on load: %s\n", line);
    }
    if (qwen35_model_init(&m, &ck.cfg, ck.specs, ck.weights, ck.n_specs)) {
        dt_err_wrap("%s", o->model);
        goto out;
    }
    have_m = true;
    if (o->adapter) {
        if (adapter_load(&ad, o->adapter, &ck)) goto out;
        have_ad = true;
        for (int i = 0; i < ad.n_modules; i++) {
            const lora_module *lm = &ad.modules[i];
            if (qwen35_model_set_lora(&m, lm->kind, lm->layer, &lm->lora)) {
                dt_err_wrap("%s", o->adapter);
                goto out;
            }
        }
    }
    if (cli_open_device(o->device, &m, &gpu)) goto out;
    /* Rows in a format other than tokenized need the model folder's tokenizer and template. */
    dt_chat *chat = NULL;
    dt_data_opts dopts = {.model_dir = o->model, .vocab_size = ck.cfg.vocab_size,
                          .enable_thinking = o->enable_thinking};
    if (chat_train_on_parse(o->train_on, &dopts.train_on) || chat_load_if_present(&chat, o->model)) goto out;
    dopts.chat = chat;
    int drc = dataset_load(&d, o->data, &dopts);
    chat_free(chat);
    if (drc) goto out;
    have_d = true;
    /* Rows of one token, or labels all -100, leave nothing to score. */
    if (d.n_targets == 0) {
        dt_err("%s: no targets to score (every row has one token or only -100 labels)", o->data);
        goto out;
    }

    int64_t max_batch_tokens = 0;
    for (int first = 0; first < d.n_rows;) {
        int end = batch_end(&d, first, o);
        int64_t t = 0;
        for (int r = first; r < end; r++) t += d.rows[r].len;
        if (t > max_batch_tokens) max_batch_tokens = t;
        first = end;
    }
    if (max_batch_tokens > INT32_MAX) {
        dt_err("a batch of %lld tokens is too large; lower --batch-size", (long long)max_batch_tokens);
        goto out;
    }
    ids = malloc((size_t)max_batch_tokens * sizeof *ids);
    labels = malloc((size_t)max_batch_tokens * sizeof *labels);
    seq_lens = malloc((size_t)o->batch_size * sizeof *seq_lens);
    if (!ids || !labels || !seq_lens) {
        dt_err("out of memory for a batch of %lld tokens", (long long)max_batch_tokens);
        goto out;
    }

    double loss_sum = 0, t0 = dt_seconds();
    int64_t n_targets = 0, tokens_done = 0;
    dt_progress prog;
    dt_progress_start(&prog, CMD, d.n_rows, "rows", "tok");
    for (int first = 0; first < d.n_rows;) {
        int end = batch_end(&d, first, o), n_tok = 0;
        for (int r = first; r < end; r++) {
            const dt_row *row = &d.rows[r];
            memcpy(ids + n_tok, row->input_ids, (size_t)row->len * sizeof *ids);
            memcpy(labels + n_tok, row->labels, (size_t)row->len * sizeof *labels);
            seq_lens[r - first] = row->len;
            n_tok += row->len;
        }
        qwen35_batch b = {.ids = ids, .labels = labels, .seq_lens = seq_lens, .n_seqs = end - first,
                          .n_tokens = n_tok};
        double ls = 0;
        int64_t nt = 0;
        int erc = gpu ? (first == 0 ? qwen35_cuda_sync_lora(gpu, &m) : 0) || qwen35_cuda_eval_loss(gpu, &m, &b, &ls, &nt)
                      : qwen35_eval_loss(&m, &b, &ls, &nt);
        if (erc) {
            dt_progress_finish(&prog);
            dt_err_wrap("%s:%d-%d", o->data, d.rows[first].line, d.rows[end - 1].line);
            goto out;
        }
        /* Name the rows, so a bad row or a numerical problem can be found again. */
        if (!isfinite(ls)) {
            dt_progress_finish(&prog);
            dt_err("%s:%d-%d: the loss is not finite (%g)", o->data, d.rows[first].line, d.rows[end - 1].line,
                   ls);
            goto out;
        }
        loss_sum += ls;
        n_targets += nt;
        tokens_done += n_tok;
        first = end;
        dt_progress_update(&prog, first, tokens_done);
    }
    dt_progress_finish(&prog);
    double secs = dt_seconds() - t0;

    if (n_targets == 0) {
        dt_err("%s: the model scored no targets", o->data);
        goto out;
    }
    double loss = loss_sum / (double)n_targets, ppl = exp(loss);
    double tps = secs > 0 ? (double)tokens_done / secs : 0;
    int64_t gpu_weights = 0, gpu_peak = 0;
    qwen35_cuda_memory(gpu, &gpu_weights, &gpu_peak);
    double peak_mb = (double)(gpu ? gpu_peak : dt_peak_rss()) / (1024.0 * 1024.0);
    fprintf(stderr, "eval: loss %.4f, ppl %.2f, %lld targets, %.0f tok/s, peak %.0f MiB\n", loss, ppl,
            (long long)n_targets, tps, peak_mb);
    /* %.17g keeps every bit of the doubles; JSON has no inf, so a huge ppl is printed as null. */
    printf("{\"loss\": %.17g, \"ppl\": ", loss);
    if (isfinite(ppl)) printf("%.17g", ppl);
    else printf("null");
    printf(", \"tokens\": %lld, \"rows\": %d, \"input_tokens\": %lld, \"seconds\": %.3f, \"tok_per_s\": %.1f, "
           "\"peak_mem_mb\": %.1f}\n",
           (long long)n_targets, d.n_rows, (long long)tokens_done, secs, tps, peak_mb);
    fflush(stdout);
    rc = EXIT_OK;
out:
    free(ids);
    free(labels);
    free(seq_lens);
    if (have_d) dataset_free(&d);
    qwen35_cuda_free(gpu);
    if (have_m) qwen35_model_free(&m);
    if (have_ad) adapter_free(&ad);
    if (have_ck) checkpoint_close(&ck);
    return rc == EXIT_OK ? rc : cli_fail(CMD, rc);
}

int cmd_eval(int argc, char **argv) {
    eval_opts o = {.batch_size = 4, .group_size = 64, .train_on = "assistant", .device = device_default()};
    arg_spec specs[] = {
        ARG_STR_REQ("model", &o.model, "DIR", "model folder (config.json + safetensors)"),
        ARG_STR_REQ("data", &o.data, "FILE",
                    "JSONL: input_ids/labels, or (with the model's tokenizer) messages, conversations, "
                    "instruction/output, prompt/completion, text"),
        ARG_CHOICE("train-on", &o.train_on, chat_train_on_names,
                   "which tokens are scored: assistant turns, all tokens, or the last assistant turn"),
        ARG_FLAG("enable-thinking", &o.enable_thinking, "render chat rows with enable_thinking = true"),
        ARG_STR("adapter", &o.adapter, "DIR", "PEFT LoRA adapter folder to apply"),
        ARG_INT_RANGE("batch-size", &o.batch_size, 1, 65536, "N", "rows per batch, packed back to back"),
        ARG_INT_RANGE("max-tokens-per-batch", &o.max_tokens, 0, 1e9, "N",
                      "also end a batch before it passes N tokens (0: no limit)"),
        ARG_QUANTIZE(&o.quantize, &o.group_size),
        ARG_CHOICE("device", &o.device, device_names, DEVICE_HELP),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    if (args_check_quantize(o.quantize, o.group_size)) return cli_usage_fail(CMD);
    return run(&o);
}
