#include "deltatune/dataset.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"

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

static int parse_row(dt_row *row, const char *text, size_t len, int vocab) {
    json_error_t jerr;
    json_t *obj = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    /* jansson gives column 0 for errors at the end of the text; the byte offset is clearer there. */
    if (!obj) return dt_err("invalid JSON at column %d: %s", jerr.column > 0 ? jerr.column : jerr.position + 1, jerr.text);
    int rc = -1;
    if (!json_is_object(obj)) {
        dt_err("expected a JSON object with input_ids");
        goto out;
    }
    const json_t *ids = json_object_get(obj, "input_ids"), *labels = json_object_get(obj, "labels");
    if (!ids) {
        dt_err("missing input_ids");
        goto out;
    }
    if (!json_is_array(ids)) {
        dt_err("input_ids is not an array");
        goto out;
    }
    size_t n = json_array_size(ids);
    if (n == 0) {
        dt_err("input_ids is empty");
        goto out;
    }
    if (n > INT32_MAX) {
        dt_err("input_ids has %zu entries, more than supported", n);
        goto out;
    }
    if (labels && !json_is_null(labels)) {
        if (!json_is_array(labels)) {
            dt_err("labels is not an array");
            goto out;
        }
        if (json_array_size(labels) != n) {
            dt_err("labels has %zu entries, input_ids has %zu", json_array_size(labels), n);
            goto out;
        }
    } else {
        labels = NULL;
    }
    if (read_ids(ids, "input_ids", vocab, 0, &row->input_ids)) goto out;
    if (read_ids(labels ? labels : ids, labels ? "labels" : "input_ids", vocab, 1, &row->labels)) {
        free(row->input_ids);
        row->input_ids = NULL;
        goto out;
    }
    row->len = (int)n;
    rc = 0;
out:
    json_decref(obj);
    return rc;
}

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

int dataset_load_tokenized(dt_dataset *d, const char *path, int vocab_size) {
    memset(d, 0, sizeof *d);
    if (vocab_size <= 0) return dt_err("%s: vocabulary size %d", path, vocab_size);
    FILE *f = fopen(path, "rb");
    if (!f) return dt_err("%s: %s", path, strerror(errno));
    d->path = strdup(path);
    char *line = NULL;
    size_t cap = 0, rows_cap = 0;
    ssize_t len;
    int lineno = 0, rc = -1;
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
        if (parse_row(row, text, (size_t)len, vocab_size)) {
            dt_err_wrap("%s:%d", path, lineno);
            goto out;
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
    rc = 0;
out:
    free(line);
    fclose(f);
    if (rc) dataset_free(d);
    return rc;
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
