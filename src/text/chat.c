/* Chat rendering and labels; the rule is described in chat.h. */
#include "deltatune/chat.h"

#include <stdlib.h>
#include <string.h>

#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/jinja.h"

const char *const chat_train_on_names[] = {"assistant", "all", "last", NULL};

int chat_train_on_parse(const char *s, dt_train_on *out) {
    for (int i = 0; chat_train_on_names[i]; i++)
        if (!strcmp(s, chat_train_on_names[i])) {
            *out = (dt_train_on)i;
            return 0;
        }
    return dt_err("--train-on: '%s' is not one of assistant, all, last", s);
}

struct dt_chat {
    dt_tokenizer *tok;
    jinja_template *tmpl;       /* NULL: no template in the folder */
    char *dir;
    char *bos, *eos;            /* token strings, or NULL */
    int32_t eos_id, im_start, im_end;
};

const dt_tokenizer *chat_tokenizer(const dt_chat *c) { return c->tok; }
int32_t chat_eos_id(const dt_chat *c) { return c->eos_id; }

void chat_free(dt_chat *c) {
    if (!c) return;
    if (c->tok) tokenizer_free(c->tok);
    if (c->tmpl) jinja_free(c->tmpl);
    free(c->dir);
    free(c->bos);
    free(c->eos);
    free(c);
}

/* "bos_token": "<s>" or {"content": "<s>", ...} or null. */
static char *special_token(const json_t *cfg, const char *key) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_is_string(v) ? strdup(json_string_value(v)) : NULL;
}

static int load_template(dt_chat *c, const json_t *cfg) {
    char *path = io_path_join(c->dir, "chat_template.jinja");
    if (!path) return dt_err("out of memory");
    int rc = 0;
    if (io_file_exists(path)) {
        char *src;
        size_t len;
        if (io_read_file(path, &src, &len)) {
            rc = dt_err_wrap("%s", path);
        } else {
            rc = jinja_parse(&c->tmpl, src, len, path);
            free(src);
        }
        free(path);
        return rc;
    }
    free(path);
    const json_t *t = cfg ? json_object_get(cfg, "chat_template") : NULL;
    const char *src = NULL;
    if (json_is_string(t)) {
        src = json_string_value(t);
    } else if (json_is_array(t)) {
        size_t i;
        const json_t *e;
        json_array_foreach(t, i, e) {
            const json_t *name = json_object_get(e, "name");
            if (json_is_string(name) && !strcmp(json_string_value(name), "default"))
                src = json_string_value(json_object_get(e, "template"));
        }
        if (!src) return dt_err("%s/tokenizer_config.json: chat_template is a list without a \"default\" entry", c->dir);
    }
    if (!src) return 0;
    return jinja_parse(&c->tmpl, src, strlen(src), "tokenizer_config.json chat_template");
}

int chat_load(dt_chat **out, const char *dir) {
    *out = NULL;
    dt_chat *c = calloc(1, sizeof *c);
    if (!c) return dt_err("out of memory");
    c->dir = strdup(dir);
    c->eos_id = c->im_start = c->im_end = -1;
    json_t *cfg = NULL;
    int rc = -1;
    if (!c->dir) {
        dt_err("out of memory");
        goto out;
    }
    if (tokenizer_load(&c->tok, dir)) goto out;
    char *path = io_path_join(dir, "tokenizer_config.json");
    if (!path) {
        dt_err("out of memory");
        goto out;
    }
    if (io_file_exists(path)) {
        json_error_t jerr;
        cfg = json_load_file(path, 0, &jerr);
        if (!cfg || !json_is_object(cfg)) {
            dt_err("%s:%d: invalid JSON: %s", path, jerr.line, cfg ? "not an object" : jerr.text);
            free(path);
            goto out;
        }
    }
    free(path);
    if (cfg) {
        c->bos = special_token(cfg, "bos_token");
        c->eos = special_token(cfg, "eos_token");
    }
    if (c->eos) c->eos_id = tokenizer_token_id(c->tok, c->eos);
    c->im_start = tokenizer_token_id(c->tok, "<|im_start|>");
    c->im_end = tokenizer_token_id(c->tok, "<|im_end|>");
    if (load_template(c, cfg)) goto out;
    rc = 0;
out:
    json_decref(cfg);
    if (rc) {
        chat_free(c);
        return -1;
    }
    *out = c;
    return 0;
}

int chat_load_if_present(dt_chat **out, const char *dir) {
    *out = NULL;
    char *path = io_path_join(dir, "tokenizer.json");
    if (!path) return dt_err("out of memory");
    int present = io_file_exists(path);
    free(path);
    return present ? chat_load(out, dir) : 0;
}

int chat_render(const dt_chat *c, const json_t *messages, const json_t *tools, bool add_generation_prompt,
                bool enable_thinking, char **out, size_t *len) {
    if (!c->tmpl)
        return dt_err("%s has no chat template (chat_template.jinja or tokenizer_config.json \"chat_template\")",
                      c->dir);
    json_t *ctx = json_pack("{s:O, s:b, s:b}", "messages", (json_t *)messages, "add_generation_prompt",
                            add_generation_prompt, "enable_thinking", enable_thinking);
    if (!ctx) return dt_err("out of memory");
    if (tools) json_object_set(ctx, "tools", (json_t *)tools);
    json_object_set_new(ctx, "bos_token", json_string(c->bos ? c->bos : ""));
    json_object_set_new(ctx, "eos_token", json_string(c->eos ? c->eos : ""));
    int rc = jinja_render(c->tmpl, ctx, out, len);
    json_decref(ctx);
    if (rc) return dt_err_wrap("chat template");
    return 0;
}

/* ---------------------------------------------------------------- helpers */

static int push_n(dt_ids *a, const int32_t *v, int n) {
    for (int i = 0; i < n; i++)
        if (dt_ids_push(a, v[i])) return dt_err("out of memory");
    return 0;
}

/* Appends the ids of text, with labels = the ids (train) or -100. */
static int encode_span(const dt_chat *c, const char *text, size_t len, bool train, dt_ids *ids, dt_ids *labels) {
    int from = ids->n;
    if (len && tokenizer_encode(c->tok, text, len, false, ids)) return -1;
    for (int i = from; i < ids->n; i++)
        if (dt_ids_push(labels, train ? ids->v[i] : DT_IGNORE_INDEX)) return dt_err("out of memory");
    return 0;
}

static int append_eos(const dt_chat *c, dt_ids *ids, dt_ids *labels) {
    if (c->eos_id < 0 || (ids->n > 0 && ids->v[ids->n - 1] == c->eos_id)) return 0;
    if (dt_ids_push(ids, c->eos_id) || dt_ids_push(labels, c->eos_id)) return dt_err("out of memory");
    return 0;
}

static bool known_role(const char *r) {
    return !strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant") || !strcmp(r, "tool");
}

/* Checks the messages and returns a copy in which an assistant message with tool_calls and no
 * content gets content "". */
static int check_messages(const json_t *messages, json_t **out, int *n_assistant) {
    *out = NULL;
    *n_assistant = 0;
    if (!json_is_array(messages)) return dt_err("messages is not an array");
    if (json_array_size(messages) == 0) return dt_err("messages is empty");
    json_t *copy = json_array();
    if (!copy) return dt_err("out of memory");
    size_t i;
    const json_t *m;
    json_array_foreach(messages, i, m) {
        if (!json_is_object(m)) {
            json_decref(copy);
            return dt_err("message %zu is not an object", i + 1);
        }
        const json_t *role = json_object_get(m, "role");
        if (!json_is_string(role)) {
            json_decref(copy);
            return dt_err("message %zu has no \"role\" string", i + 1);
        }
        const char *r = json_string_value(role);
        if (!known_role(r)) {
            json_decref(copy);
            return dt_err("message %zu: role '%s' is not one of system, user, assistant, tool", i + 1, r);
        }
        const json_t *content = json_object_get(m, "content");
        const json_t *calls = json_object_get(m, "tool_calls");
        bool has_calls = json_is_array(calls) && json_array_size(calls) > 0;
        json_t *mc = json_deep_copy(m);
        if (!mc) {
            json_decref(copy);
            return dt_err("out of memory");
        }
        if (!content || json_is_null(content)) {
            if (!(has_calls && !strcmp(r, "assistant"))) {
                json_decref(mc);
                json_decref(copy);
                return dt_err("message %zu (%s) has no content", i + 1, r);
            }
            json_object_set_new(mc, "content", json_string(""));
        } else if (!json_is_string(content) && !json_is_array(content)) {
            json_decref(mc);
            json_decref(copy);
            return dt_err("message %zu (%s): content is neither a string nor a list", i + 1, r);
        }
        if (!strcmp(r, "assistant")) ++*n_assistant;
        json_array_append_new(copy, mc);
    }
    *out = copy;
    return 0;
}

/* ChatML: spans found in the ids. */
static int label_chatml(const dt_chat *c, const dt_ids *ids, dt_train_on on, dt_ids *labels, int *n_spans) {
    dt_ids hdr = {0}, nl = {0};
    int rc = -1;
    *n_spans = 0;
    if (tokenizer_encode(c->tok, "<|im_start|>assistant", strlen("<|im_start|>assistant"), false, &hdr)) goto out;
    if (tokenizer_encode(c->tok, "\n", 1, false, &nl)) goto out;
    for (int i = 0; i < ids->n; i++)
        if (dt_ids_push(labels, DT_IGNORE_INDEX)) {
            dt_err("out of memory");
            goto out;
        }
    int last_from = -1, last_to = -1;
    for (int p = 0; p + hdr.n <= ids->n; p++) {
        if (memcmp(ids->v + p, hdr.v, (size_t)hdr.n * sizeof *hdr.v)) continue;
        int s = p + hdr.n;
        if (nl.n == 1 && s < ids->n && ids->v[s] == nl.v[0]) s++;
        int e = s;
        while (e < ids->n && ids->v[e] != c->im_end) e++;
        if (e < ids->n) e++;  /* the closing <|im_end|> trains */
        ++*n_spans;
        last_from = s;
        last_to = e;
        if (on != DT_TRAIN_ON_LAST)
            for (int k = s; k < e; k++) labels->v[k] = ids->v[k];
        p = e - 1;
    }
    if (on == DT_TRAIN_ON_LAST && last_from >= 0)
        for (int k = last_from; k < last_to; k++) labels->v[k] = ids->v[k];
    rc = 0;
out:
    dt_ids_free(&hdr);
    dt_ids_free(&nl);
    return rc;
}

/* messages[:n] as a JSON array sharing the elements. */
static json_t *prefix(const json_t *messages, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; a && i < n; i++) json_array_append(a, json_array_get(messages, i));
    return a;
}

/* Any template: spans by rendering prefixes; see chat.h. */
static int label_prefixes(const dt_chat *c, const json_t *msgs, const json_t *tools, dt_train_on on,
                          bool thinking, const char *full, size_t full_len, dt_ids *ids, dt_ids *labels) {
    size_t n = json_array_size(msgs), n_spans = 0, cap = n;
    size_t(*spans)[2] = malloc((cap ? cap : 1) * sizeof *spans);
    if (!spans) return dt_err("out of memory");
    int rc = -1;
    for (size_t i = 0; i < n; i++) {
        const char *role = json_string_value(json_object_get(json_array_get(msgs, i), "role"));
        if (strcmp(role, "assistant")) continue;
        char *p = NULL, *f = NULL;
        size_t pl = 0, fl = 0;
        json_t *pm = prefix(msgs, i), *fm = prefix(msgs, i + 1);
        int bad = !pm || !fm;
        /* An empty conversation may make the template raise; the span then starts at 0. */
        if (!bad && chat_render(c, pm, tools, true, thinking, &p, &pl)) {
            if (i > 0) bad = 2;
            else dt_err_clear();
            p = NULL;
            pl = 0;
        }
        if (!bad && chat_render(c, fm, tools, false, thinking, &f, &fl)) bad = 2;
        json_decref(pm);
        json_decref(fm);
        if (!bad && (pl > fl || fl > full_len || memcmp(f, full, fl) || (pl && memcmp(p, full, pl)))) {
            dt_err("message %zu (assistant): the template renders the conversation up to it differently from "
                   "the whole conversation, so its tokens cannot be located; use --train-on all",
                   i + 1);
            bad = 3;
        }
        free(p);
        free(f);
        if (bad) {
            if (bad == 1) dt_err("out of memory");
            else if (bad == 2) dt_err_wrap("message %zu", i + 1);
            goto out;
        }
        spans[n_spans][0] = pl;
        spans[n_spans][1] = fl;
        n_spans++;
    }
    size_t first = (on == DT_TRAIN_ON_LAST && n_spans) ? n_spans - 1 : 0, at = 0;
    for (size_t k = first; k < n_spans; k++) {
        size_t s = spans[k][0] < at ? at : spans[k][0], e = spans[k][1];
        if (e <= s) continue;
        if (encode_span(c, full + at, s - at, false, ids, labels)) goto out;
        if (encode_span(c, full + s, e - s, true, ids, labels)) goto out;
        at = e;
    }
    if (encode_span(c, full + at, full_len - at, false, ids, labels)) goto out;
    rc = 0;
out:
    free(spans);
    return rc;
}

int chat_encode_messages(const dt_chat *c, const json_t *messages, const json_t *tools, dt_train_on on,
                         bool enable_thinking, dt_ids *ids, dt_ids *labels) {
    json_t *msgs;
    int n_assistant;
    if (check_messages(messages, &msgs, &n_assistant)) return -1;
    if (tools && json_is_null(tools)) tools = NULL;
    if (tools && !json_is_array(tools)) {
        json_decref(msgs);
        return dt_err("tools is not a list");
    }
    char *text = NULL;
    size_t len = 0;
    int rc = -1;
    if (chat_render(c, msgs, tools, false, enable_thinking, &text, &len)) goto out;
    bool chatml = c->im_start >= 0 && c->im_end >= 0 && strstr(text, "<|im_start|>assistant");
    if (on == DT_TRAIN_ON_ALL || chatml) {
        if (tokenizer_encode(c->tok, text, len, false, ids)) goto out;
        if (on == DT_TRAIN_ON_ALL) {
            if (push_n(labels, ids->v, ids->n)) goto out;
        } else {
            int n_spans;
            if (label_chatml(c, ids, on, labels, &n_spans)) goto out;
        }
    } else {
        if (label_prefixes(c, msgs, tools, on, enable_thinking, text, len, ids, labels)) goto out;
    }
    rc = 0;
out:
    free(text);
    json_decref(msgs);
    return rc;
}

int chat_encode_completion(const dt_chat *c, const char *prompt, size_t prompt_len, const char *completion,
                           size_t completion_len, dt_train_on on, dt_ids *ids, dt_ids *labels) {
    if (encode_span(c, prompt, prompt_len, on == DT_TRAIN_ON_ALL, ids, labels)) return dt_err_wrap("prompt");
    if (encode_span(c, completion, completion_len, true, ids, labels)) return dt_err_wrap("completion");
    return append_eos(c, ids, labels);
}

int chat_encode_text(const dt_chat *c, const char *text, size_t len, dt_ids *ids, dt_ids *labels) {
    if (encode_span(c, text, len, true, ids, labels)) return dt_err_wrap("text");
    return append_eos(c, ids, labels);
}
