#include "deltatune/dataset.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"
#include "text/utf8.h"

/* Reads one integer array into a fresh int32 buffer; the check of each value against
 * [0, vocab) (plus -100 for labels) is done here so the message can give the index. */
static int read_ids(const json_t *arr, const char *key, int vocab, int allow_ignore, int32_t **out) {
    size_t n = json_array_size(arr);
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids) return dt_err("out of memory");
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v)) {
            free(ids);
            return dt_err("%s[%zu] is not an integer", key, i);
        }
        json_int_t x = json_integer_value(v);
        if (!(allow_ignore && x == DT_IGNORE_INDEX) && (x < 0 || x >= vocab)) {
            free(ids);
            return dt_err("%s[%zu] = %lld is outside the vocabulary [0, %d)%s", key, i, (long long)x, vocab,
                          allow_ignore ? " and is not -100" : "");
        }
        ids[i] = (int32_t)x;
    }
    *out = ids;
    return 0;
}

/* A pre-tokenized row from its JSON object. */
static int parse_tokenized(dt_row *row, const json_t *obj, int vocab) {
    const json_t *ids = json_object_get(obj, "input_ids"), *labels = json_object_get(obj, "labels");
    if (!ids) return dt_err("missing input_ids");
    if (!json_is_array(ids)) return dt_err("input_ids is not an array");
    size_t n = json_array_size(ids);
    if (n == 0) return dt_err("input_ids is empty");
    if (n > INT32_MAX) return dt_err("input_ids has %zu entries, more than supported", n);
    if (labels && !json_is_null(labels)) {
        if (!json_is_array(labels)) return dt_err("labels is not an array");
        if (json_array_size(labels) != n)
            return dt_err("labels has %zu entries, input_ids has %zu", json_array_size(labels), n);
    } else {
        labels = NULL;
    }
    if (read_ids(ids, "input_ids", vocab, 0, &row->input_ids)) return -1;
    if (read_ids(labels ? labels : ids, labels ? "labels" : "input_ids", vocab, 1, &row->labels)) {
        free(row->input_ids);
        row->input_ids = NULL;
        return -1;
    }
    row->len = (int)n;
    return 0;
}

static json_t *parse_json(const char *text, size_t len) {
    json_error_t jerr;
    json_t *obj = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    /* jansson gives column 0 for errors at the end of the text; the byte offset is clearer there. */
    if (!obj) dt_err("invalid JSON at column %d: %s", jerr.column > 0 ? jerr.column : jerr.position + 1, jerr.text);
    return obj;
}

static int parse_row(dt_row *row, const char *text, size_t len, int vocab) {
    json_t *obj = parse_json(text, len);
    if (!obj) return -1;
    int rc = json_is_object(obj) ? parse_tokenized(row, obj, vocab) : dt_err("expected a JSON object with input_ids");
    json_decref(obj);
    return rc;
}

/* ---------------------------------------------------------------- formats */

static const char *const format_names[] = {"tokenized", "chat", "sharegpt", "alpaca", "completion", "text"};

const char *dataset_format_name(dt_format f) { return format_names[f]; }

static int detect_format(const json_t *obj, dt_format *f) {
    if (json_object_get(obj, "input_ids")) *f = DT_FMT_TOKENIZED;
    else if (json_object_get(obj, "messages")) *f = DT_FMT_CHAT;
    else if (json_object_get(obj, "conversations")) *f = DT_FMT_SHAREGPT;
    else if (json_object_get(obj, "instruction") || json_object_get(obj, "output")) *f = DT_FMT_ALPACA;
    else if (json_object_get(obj, "prompt") || json_object_get(obj, "completion")) *f = DT_FMT_COMPLETION;
    else if (json_object_get(obj, "text")) *f = DT_FMT_TEXT;
    else {
        char keys[160] = "";
        const char *k;
        const json_t *v;
        size_t at = 0;
        json_object_foreach((json_t *)obj, k, v) {
            (void)v;
            int w = snprintf(keys + at, sizeof keys - at, "%s\"%s\"", at ? ", " : "", k);
            if (w < 0 || (size_t)w >= sizeof keys - at) break;
            at += (size_t)w;
        }
        return dt_err("unknown format (keys: %s): expected \"input_ids\", \"messages\", \"conversations\", "
                      "\"instruction\"+\"output\", \"prompt\"+\"completion\" or \"text\"",
                      at ? keys : "none");
    }
    return 0;
}

static const char *str_field(const json_t *obj, const char *key, bool required, int *bad) {
    const json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required) *bad = dt_err("missing \"%s\"", key);
        return NULL;
    }
    if (!json_is_string(v)) {
        *bad = dt_err("\"%s\" is not a string", key);
        return NULL;
    }
    return json_string_value(v);
}

static const char *sharegpt_role(const char *from) {
    static const char *const map[][2] = {
        {"system", "system"},  {"human", "user"},         {"user", "user"},
        {"gpt", "assistant"},  {"assistant", "assistant"}, {"model", "assistant"},
        {"bot", "assistant"},  {"tool", "tool"},           {"function", "tool"},
        {"observation", "tool"}, {"function_response", "tool"}, {"ipython", "tool"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(from, map[i][0])) return map[i][1];
    return NULL;
}

static json_t *msg(const char *role, const char *content) {
    return json_pack("{s:s, s:s}", "role", role, "content", content);
}

/* ShareGPT and Alpaca rows as a messages array. */
static int to_messages(const json_t *obj, dt_format f, json_t **out) {
    int bad = 0;
    json_t *m = json_array();
    if (!m) return dt_err("out of memory");
    if (f == DT_FMT_SHAREGPT) {
        const json_t *conv = json_object_get(obj, "conversations");
        if (!json_is_array(conv)) {
            json_decref(m);
            return dt_err("\"conversations\" is not a list");
        }
        size_t i;
        const json_t *t;
        json_array_foreach(conv, i, t) {
            if (!json_is_object(t)) {
                bad = dt_err("conversations[%zu] is not an object", i);
                break;
            }
            const char *from = str_field(t, "from", true, &bad), *value = from ? str_field(t, "value", true, &bad) : NULL;
            if (bad) {
                dt_err_wrap("conversations[%zu]", i);
                break;
            }
            const char *role = sharegpt_role(from);
            if (!role) {
                bad = dt_err("conversations[%zu]: unknown \"from\" '%s' (expected system, human, user, gpt, "
                             "assistant, model, bot, tool, function, observation)",
                             i, from);
                break;
            }
            json_array_append_new(m, msg(role, value));
        }
    } else {
        const char *sys = str_field(obj, "system", false, &bad);
        const char *ins = bad ? NULL : str_field(obj, "instruction", true, &bad);
        const char *in = bad ? NULL : str_field(obj, "input", false, &bad);
        const char *outp = bad ? NULL : str_field(obj, "output", true, &bad);
        if (!bad) {
            size_t a = strlen(ins), b = in ? strlen(in) : 0;
            char *user = malloc(a + b + 3);
            if (!user) {
                bad = dt_err("out of memory");
            } else {
                memcpy(user, ins, a);
                if (b) {
                    memcpy(user + a, "\n\n", 2);
                    memcpy(user + a + 2, in, b);
                    a += b + 2;
                }
                user[a] = 0;
                if (sys && *sys) json_array_append_new(m, msg("system", sys));
                json_array_append_new(m, msg("user", user));
                json_array_append_new(m, msg("assistant", outp));
                free(user);
            }
        }
    }
    if (bad) {
        json_decref(m);
        return -1;
    }
    *out = m;
    return 0;
}

/* A row in any format but tokenized, through the tokenizer. */
static int encode_row(dt_row *row, const json_t *obj, dt_format f, const dt_data_opts *o) {
    dt_ids ids = {0}, labels = {0};
    int rc = -1, bad = 0;
    json_t *conv = NULL;
    switch (f) {
    case DT_FMT_CHAT:
        rc = chat_encode_messages(o->chat, json_object_get(obj, "messages"), json_object_get(obj, "tools"),
                                  o->train_on, o->enable_thinking, &ids, &labels);
        break;
    case DT_FMT_SHAREGPT:
    case DT_FMT_ALPACA:
        if (to_messages(obj, f, &conv) == 0)
            rc = chat_encode_messages(o->chat, conv, json_object_get(obj, "tools"), o->train_on, o->enable_thinking,
                                      &ids, &labels);
        break;
    case DT_FMT_COMPLETION: {
        const json_t *p = json_object_get(obj, "prompt"), *c = json_object_get(obj, "completion");
        if (json_is_array(p) || json_is_array(c)) {
            /* Conversational prompt/completion (TRL): messages = prompt + completion; the last
             * assistant turn (the completion) trains, or everything with --train-on all. */
            if (!json_is_array(p) || !json_is_array(c)) {
                dt_err("\"prompt\" and \"completion\" must both be strings or both be message lists");
                break;
            }
            conv = json_array();
            if (!conv || json_array_extend(conv, (json_t *)p) || json_array_extend(conv, (json_t *)c)) {
                dt_err("out of memory");
                break;
            }
            rc = chat_encode_messages(o->chat, conv, json_object_get(obj, "tools"),
                                      o->train_on == DT_TRAIN_ON_ALL ? DT_TRAIN_ON_ALL : DT_TRAIN_ON_LAST,
                                      o->enable_thinking, &ids, &labels);
            break;
        }
        const char *ps = str_field(obj, "prompt", true, &bad);
        const char *cs = bad ? NULL : str_field(obj, "completion", true, &bad);
        if (!bad)
            rc = chat_encode_completion(o->chat, ps, strlen(ps), cs, strlen(cs), o->train_on, &ids, &labels);
        break;
    }
    case DT_FMT_TEXT: {
        const char *t = str_field(obj, "text", true, &bad);
        if (!bad) rc = chat_encode_text(o->chat, t, strlen(t), &ids, &labels);
        break;
    }
    case DT_FMT_TOKENIZED:
        break;
    }
    json_decref(conv);
    if (rc == 0 && ids.n == 0) rc = dt_err("the row gives no tokens");
    if (rc == 0 && ids.n != labels.n) rc = dt_err("internal error: %d ids, %d labels", ids.n, labels.n);
    for (int i = 0; rc == 0 && i < ids.n; i++)
        if (ids.v[i] < 0 || ids.v[i] >= o->vocab_size)
            rc = dt_err("token %d has id %d, outside the model's vocabulary [0, %d): the tokenizer does not match "
                        "the model",
                        i, ids.v[i], o->vocab_size);
    if (rc) {
        dt_ids_free(&ids);
        dt_ids_free(&labels);
        return -1;
    }
    row->input_ids = ids.v;
    row->labels = labels.v;
    row->len = ids.n;
    return 0;
}

/* One row of any format; the first row fixes the file's format. */
static int parse_any(dt_dataset *d, dt_row *row, const char *text, size_t len, int vocab, const dt_data_opts *o,
                     int lineno, int *first_line) {
    /* jansson rejects it too, but without saying where. */
    size_t bad = utf8_invalid_at((const unsigned char *)text, len);
    if (bad < len) return dt_err("invalid UTF-8 at byte %zu of the line", bad + 1);
    json_t *obj = parse_json(text, len);
    if (!obj) return -1;
    int rc = -1;
    dt_format f = DT_FMT_TOKENIZED;
    if (!json_is_object(obj)) {
        dt_err("expected a JSON object");
        goto out;
    }
    if (detect_format(obj, &f)) goto out;
    if (!*first_line) {
        *first_line = lineno;
        d->format = f;
    } else if (f != d->format) {
        dt_err("a %s row, but the file's first row (line %d) is %s; every row must be in one format",
               format_names[f], *first_line, format_names[d->format]);
        goto out;
    }
    if (f == DT_FMT_TOKENIZED) {
        rc = parse_tokenized(row, obj, vocab);
        goto out;
    }
    if (!o->chat) {
        dt_err("%s rows need the model's tokenizer, and %s has no tokenizer.json", format_names[f],
               o->model_dir ? o->model_dir : "the model folder");
        goto out;
    }
    rc = encode_row(row, obj, f, &(dt_data_opts){.chat = o->chat, .vocab_size = vocab, .train_on = o->train_on,
                                                .enable_thinking = o->enable_thinking});
out:
    json_decref(obj);
    return rc;
}

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

/* o NULL: tokenized rows only (dataset_load_tokenized). */
static int load(dt_dataset *d, const char *path, int vocab_size, const dt_data_opts *o) {
    memset(d, 0, sizeof *d);
    if (vocab_size <= 0) return dt_err("%s: vocabulary size %d", path, vocab_size);
    FILE *f = fopen(path, "rb");
    if (!f) return dt_err("%s: %s", path, strerror(errno));
    d->path = strdup(path);
    char *line = NULL;
    size_t cap = 0, rows_cap = 0;
    ssize_t len;
    int lineno = 0, rc = -1, first_line = 0;
    if (!d->path) {
        dt_err("out of memory");
        goto out;
    }
    errno = 0;
    while ((len = getline(&line, &cap, f)) != -1) {
        lineno++;
        const char *text = line;
        /* Editors on Windows write a byte-order mark; jansson would reject it. */
        if (lineno == 1 && len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) {
            text += 3;
            len -= 3;
        }
        if (blank(text, (size_t)len)) continue;
        while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == '\r')) len--;
        if ((size_t)d->n_rows == rows_cap) {
            size_t nc = rows_cap ? rows_cap * 2 : 256;
            dt_row *r = realloc(d->rows, nc * sizeof *r);
            if (!r) {
                dt_err("%s:%d: out of memory", path, lineno);
                goto out;
            }
            d->rows = r;
            rows_cap = nc;
        }
        if (d->n_rows == INT32_MAX) {
            dt_err("%s:%d: too many rows", path, lineno);
            goto out;
        }
        dt_row *row = &d->rows[d->n_rows];
        memset(row, 0, sizeof *row);
        if (o ? parse_any(d, row, text, (size_t)len, vocab_size, o, lineno, &first_line)
              : parse_row(row, text, (size_t)len, vocab_size)) {
            dt_err_wrap("%s:%d", path, lineno);
            goto out;
        }
        if (o && o->max_seq_len > 0 && row->len > o->max_seq_len) {
            row->len = o->max_seq_len;
            d->n_truncated++;
        }
        row->line = lineno;
        d->n_rows++;
        d->n_tokens += row->len;
        for (int i = 1; i < row->len; i++) d->n_targets += row->labels[i] != DT_IGNORE_INDEX;
    }
    if (ferror(f)) {
        dt_err("%s:%d: read error: %s", path, lineno + 1, strerror(errno));
        goto out;
    }
    if (d->n_rows == 0) {
        dt_err("%s: no rows (the file is empty or holds only blank lines)", path);
        goto out;
    }
    if (o && d->n_targets == 0) {
        dt_err("%s: nothing to train on (no targets: every label is -100 or rows have one token)%s", path,
               d->format == DT_FMT_TOKENIZED || o->train_on == DT_TRAIN_ON_ALL
                   ? ""
                   : "; do the rows have assistant turns or completions? (--train-on all trains every token)");
        goto out;
    }
    rc = 0;
out:
    free(line);
    fclose(f);
    if (rc) dataset_free(d);
    return rc;
}

int dataset_load_tokenized(dt_dataset *d, const char *path, int vocab_size) {
    return load(d, path, vocab_size, NULL);
}

int dataset_load(dt_dataset *d, const char *path, const dt_data_opts *o) {
    int vocab = o->vocab_size;
    if (vocab <= 0 && o->chat) vocab = tokenizer_n_ids(chat_tokenizer(o->chat));
    return load(d, path, vocab, o);
}

void dataset_free(dt_dataset *d) {
    for (int i = 0; i < d->n_rows; i++) {
        free(d->rows[i].input_ids);
        free(d->rows[i].labels);
    }
    free(d->rows);
    free(d->path);
    memset(d, 0, sizeof *d);
}
