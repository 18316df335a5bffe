/* deltatune tokenize: a dataset in any format to the token ids and labels training would use. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/args.h"
#include "deltatune/chat.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"

#define CMD "tokenize"
#define SUMMARY                                                                                          \
    "Renders and tokenizes a JSONL dataset (chat, ShareGPT, Alpaca, prompt/completion, text or\n"        \
    "pre-tokenized rows) with the model folder's tokenizer and chat template, exactly as train and\n"    \
    "eval do, and prints one JSON object per row, in order: {\"input_ids\": [...]} for text rows,\n"      \
    "{\"input_ids\": [...], \"labels\": [...]} for the others (-100: not trained). DIR needs only\n"    \
    "tokenizer.json, tokenizer_config.json and the chat template. --show prints instead each row's\n"   \
    "text with the trained tokens marked ([[...]], or green on a terminal) and its counts."

typedef struct {
    const char *model, *data, *train_on;
    int max_seq_len;
    bool enable_thinking, show;
} tok_opts;

static void print_ids(const char *key, const int32_t *v, int n) {
    printf("\"%s\": [", key);
    for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", v[i]);
    printf("]");
}

static int show_row(const dt_chat *c, const dt_dataset *d, int r, bool color) {
    const dt_row *row = &d->rows[r];
    int trained = 0;
    for (int i = 0; i < row->len; i++) trained += row->labels[i] != DT_IGNORE_INDEX;
    printf("=== row %d (line %d): %d tokens, %d trained\n", r + 1, row->line, row->len, trained);
    const char *open = color ? "\x1b[32m" : "[[", *close = color ? "\x1b[0m" : "]]";
    for (int i = 0; i < row->len;) {
        bool t = row->labels[i] != DT_IGNORE_INDEX;
        int j = i;
        while (j < row->len && (row->labels[j] != DT_IGNORE_INDEX) == t) j++;
        char *text;
        size_t len;
        if (tokenizer_decode(chat_tokenizer(c), row->input_ids + i, j - i, false, &text, &len))
            return dt_err_wrap("%s:%d: decoding", d->path, row->line);
        if (t) fputs(open, stdout);
        fwrite(text, 1, len, stdout);
        if (t) fputs(close, stdout);
        free(text);
        i = j;
    }
    printf("\n");
    return 0;
}

static int run(const tok_opts *o) {
    dt_chat *chat = NULL;
    dt_dataset d;
    bool have_d = false;
    int rc = EXIT_RUNTIME;
    dt_data_opts dopts = {.model_dir = o->model, .max_seq_len = o->max_seq_len,
                          .enable_thinking = o->enable_thinking};
    if (chat_train_on_parse(o->train_on, &dopts.train_on)) goto out;
    if (chat_load(&chat, o->model)) goto out;
    dopts.chat = chat;
    if (dataset_load(&d, o->data, &dopts)) goto out;
    have_d = true;
    bool color = o->show && isatty(STDOUT_FILENO);
    for (int r = 0; r < d.n_rows; r++) {
        const dt_row *row = &d.rows[r];
        if (o->show) {
            if (show_row(chat, &d, r, color)) goto out;
            continue;
        }
        printf("{");
        print_ids("input_ids", row->input_ids, row->len);
        if (d.format != DT_FMT_TEXT) {
            printf(", ");
            print_ids("labels", row->labels, row->len);
        }
        printf("}\n");
    }
    if (fflush(stdout)) {
        dt_err("writing stdout failed");
        goto out;
    }
    fprintf(stderr, "tokenize: %d rows (%s), %lld tokens, %lld trained targets\n", d.n_rows,
            dataset_format_name(d.format), (long long)d.n_tokens, (long long)d.n_targets);
    if (d.n_truncated)
        fprintf(stderr, "tokenize: warning: %d of %d rows were longer than --max-seq-len %d and were truncated\n",
                d.n_truncated, d.n_rows, o->max_seq_len);
    rc = EXIT_OK;
out:
    if (have_d) dataset_free(&d);
    chat_free(chat);
    return rc == EXIT_OK ? rc : cli_fail(CMD, rc);
}

int cmd_tokenize(int argc, char **argv) {
    tok_opts o = {.train_on = "assistant"};
    arg_spec specs[] = {
        ARG_STR_REQ("model", &o.model, "DIR",
                    "folder with tokenizer.json, tokenizer_config.json (+ chat_template.jinja)"),
        ARG_STR_REQ("data", &o.data, "FILE",
                    "JSONL: messages, conversations, instruction/output, prompt/completion, text or input_ids"),
        ARG_CHOICE("train-on", &o.train_on, chat_train_on_names,
                   "which tokens train: assistant turns, all tokens, or the last assistant turn"),
        ARG_INT_RANGE("max-seq-len", &o.max_seq_len, 0, 1 << 24, "N",
                      "truncate longer rows, and say how many (0: no limit)"),
        ARG_FLAG("enable-thinking", &o.enable_thinking, "render with enable_thinking = true"),
        ARG_FLAG("show", &o.show, "print each row's text with the trained tokens marked, instead of JSONL"),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    return run(&o);
}
