#include "cli/gen_session.h"

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/quantize_ckpt.h"

static void add_stop(gen_session *s, json_int_t id) {
    if (id < 0 || id >= s->ck.cfg.vocab_size) return;
    for (int i = 0; i < s->n_stop; i++)
        if (s->stop[i] == id) return;
    if (s->n_stop < (int)(sizeof s->stop / sizeof s->stop[0])) s->stop[s->n_stop++] = (int32_t)id;
}

/* eos_token_id of generation_config.json: an id or a list of ids. */
static void add_generation_config_stops(gen_session *s, const char *dir) {
    char *path = io_path_join(dir, "generation_config.json");
    json_t *root = path ? json_load_file(path, 0, NULL) : NULL;
    json_t *eos = root ? json_object_get(root, "eos_token_id") : NULL;
    if (json_is_integer(eos)) add_stop(s, json_integer_value(eos));
    size_t i;
    json_t *v;
    if (json_is_array(eos)) json_array_foreach(eos, i, v) if (json_is_integer(v)) add_stop(s, json_integer_value(v));
    json_decref(root);
    free(path);
}

int gen_session_open(gen_session *s, const char *model_dir, const char *adapter_dir) {
    return gen_session_open_quantized(s, model_dir, adapter_dir, 0, 0, NULL);
}

int gen_session_open_quantized(gen_session *s, const char *model_dir, const char *adapter_dir, int qbits, int qgroup,
                               const char *cmd) {
    memset(s, 0, sizeof *s);
    if (checkpoint_open(&s->ck, model_dir)) return -1;
    s->have_ck = true;
    if (qbits) {
        ckpt_quant_stats qs;
        if (checkpoint_quantize(&s->ck, qbits, qgroup, &qs)) return -1;
        char line[768];
        checkpoint_quant_summary(line, sizeof line, &s->ck, &qs);
        fprintf(stderr, "%s: quantized on load: %s\n", cmd ? cmd : "deltatune", line);
    }
    if (qwen35_model_init(&s->m, &s->ck.cfg, s->ck.specs, s->ck.weights, s->ck.n_specs))
        return dt_err_wrap("%s", model_dir);
    s->have_m = true;
    if (adapter_dir) {
        if (adapter_load(&s->ad, adapter_dir, &s->ck)) return -1;
        s->have_ad = true;
        for (int i = 0; i < s->ad.n_modules; i++)
            if (qwen35_model_set_lora(&s->m, s->ad.modules[i].kind, s->ad.modules[i].layer, &s->ad.modules[i].lora))
                return dt_err_wrap("%s", adapter_dir);
    }
    if (chat_load_if_present(&s->chat, model_dir)) return -1;
    add_generation_config_stops(s, model_dir);
    add_stop(s, s->ck.cfg.eos_token_id);
    if (s->chat) {
        const dt_tokenizer *t = chat_tokenizer(s->chat);
        add_stop(s, tokenizer_token_id(t, "<|im_end|>"));
        add_stop(s, tokenizer_token_id(t, "<|endoftext|>"));
        add_stop(s, chat_eos_id(s->chat));
    }
    return 0;
}

void gen_session_close(gen_session *s) {
    if (s->chat) chat_free(s->chat);
    if (s->have_ad) adapter_free(&s->ad);
    if (s->have_m) qwen35_model_free(&s->m);
    if (s->have_ck) checkpoint_close(&s->ck);
    memset(s, 0, sizeof *s);
}

static bool is_stop(const text_stream *ts, int32_t id) {
    for (int i = 0; i < ts->n_stop; i++)
        if (ts->stop[i] == id) return true;
    return false;
}

char *text_stream_text(const text_stream *ts) {
    int n = ts->ids.n;
    while (n > 0 && is_stop(ts, ts->ids.v[n - 1])) n--;
    char *text = NULL;
    size_t len;
    if (tokenizer_decode(ts->tok, ts->ids.v, n, false, &text, &len)) return NULL;
    return text;
}

void text_stream_token(void *ctx, int32_t id) {
    text_stream *ts = ctx;
    if (!ts->tok) {
        fprintf(ts->f, "%s%d", ts->ids.n ? " " : "", id);
        dt_ids_push(&ts->ids, id);
        fflush(ts->f);
        return;
    }
    if (dt_ids_push(&ts->ids, id) || is_stop(ts, id)) return;
    char *text = text_stream_text(ts);
    if (!text) return;
    size_t len = strlen(text);
    /* a trailing U+FFFD may be a character whose bytes have not all come yet */
    if (len >= 3 && !memcmp(text + len - 3, "\xEF\xBF\xBD", 3)) len -= 3;
    if (len > ts->printed) {
        fwrite(text + ts->printed, 1, len - ts->printed, ts->f);
        fflush(ts->f);
        ts->printed = len;
    }
    free(text);
}
