/* The CPU forward against Hugging Face transformers: logits and losses saved by
 * tools/make_fixtures.py for tiny random checkpoints (tests/fixtures/). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/qwen35.h"
#include "test.h"

#include <jansson.h>

typedef struct {
    checkpoint ck;
    qwen35_model m;
    dt_dataset data;
    lora_adapter ad;
    bool has_adapter;
} golden;

static void golden_close(golden *g) {
    qwen35_model_free(&g->m);
    if (g->has_adapter) adapter_free(&g->ad);
    dataset_free(&g->data);
    checkpoint_close(&g->ck);
}

static int golden_open(golden *g, const char *name, bool with_adapter) {
    char dir[512], path[600];
    memset(g, 0, sizeof *g);
    snprintf(dir, sizeof dir, "%s/%s", FIXTURES, name);
    snprintf(path, sizeof path, "%s/data.jsonl", dir);
    if (checkpoint_open(&g->ck, dir)) return -1;
    if (qwen35_model_init(&g->m, &g->ck.cfg, g->ck.specs, g->ck.weights, g->ck.n_specs)) return -1;
    if (dataset_load_tokenized(&g->data, path, g->ck.cfg.vocab_size)) return -1;
    if (with_adapter) {
        snprintf(path, sizeof path, "%s/adapter", dir);
        if (adapter_load(&g->ad, path, &g->ck)) return -1;
        g->has_adapter = true;
        for (int i = 0; i < g->ad.n_modules; i++) {
            lora_module *lm = &g->ad.modules[i];
            if (qwen35_model_set_lora(&g->m, lm->kind, lm->layer, &lm->lora)) return -1;
        }
    }
    return 0;
}

static qwen35_batch row_batch(const dt_row *r, int *len) {
    *len = r->len;
    return (qwen35_batch){r->input_ids, r->labels, len, 1, r->len};
}

/* Logits of every row, alone, against the reference. */
static void check_logits(const char *name, bool with_adapter, const char *logits_file) {
    golden g;
    char path[600];
    if (golden_open(&g, name, with_adapter)) {
        test_fail(__FILE__, __LINE__, "%s: %s", name, dt_errmsg());
        golden_close(&g);
        return;
    }
    snprintf(path, sizeof path, "%s/%s/%s", FIXTURES, name, logits_file);
    st_file ref;
    if (st_open(&ref, path)) {
        test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        golden_close(&g);
        return;
    }
    int V = g.ck.cfg.vocab_size;
    for (int i = 0; i < g.data.n_rows && !test_failed(); i++) {
        char key[64];
        snprintf(key, sizeof key, "logits.%d", i);
        const st_tensor *t = st_find(&ref, key);
        const dt_row *r = &g.data.rows[i];
        if (!t || t->dtype != DT_F32 || t->numel != (int64_t)r->len * V) {
            test_fail(__FILE__, __LINE__, "%s: %s missing or of the wrong shape", path, key);
            break;
        }
        float *logits = malloc(sizeof(float) * r->len * V);
        int len;
        qwen35_batch b = row_batch(r, &len);
        if (qwen35_forward_logits(&g.m, &b, logits)) {
            test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        } else {
            double e = rel_err(logits, t->data, (size_t)r->len * V);
            if (!(e <= 1e-4)) test_fail(__FILE__, __LINE__, "%s row %d (len %d): logits rel err %.3g > 1e-4", name, i, r->len, e);
        }
        free(logits);
    }
    st_close(&ref);
    golden_close(&g);
}

static int read_expected(const char *name, const char *file, double *loss, int64_t *tokens) {
    char path[600];
    snprintf(path, sizeof path, "%s/%s/%s", FIXTURES, name, file);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) return dt_err("%s:%d: %s", path, je.line, je.text);
    json_t *l = json_object_get(root, "loss"), *t = json_object_get(root, "tokens");
    int rc = 0;
    if (!json_is_number(l) || !json_is_integer(t)) rc = dt_err("%s: loss/tokens missing", path);
    else {
        *loss = json_number_value(l);
        *tokens = json_integer_value(t);
    }
    json_decref(root);
    return rc;
}

/* The file's loss, evaluated in packed batches of `batch` rows. */
static void check_loss(const char *name, bool with_adapter, const char *expected_file, int batch) {
    golden g;
    double want = 0;
    int64_t want_tokens = 0;
    if (read_expected(name, expected_file, &want, &want_tokens)) {
        test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
        return;
    }
    if (golden_open(&g, name, with_adapter)) {
        test_fail(__FILE__, __LINE__, "%s: %s", name, dt_errmsg());
        golden_close(&g);
        return;
    }
    double sum = 0;
    int64_t count = 0;
    for (int i0 = 0; i0 < g.data.n_rows; i0 += batch) {
        int n = g.data.n_rows - i0 < batch ? g.data.n_rows - i0 : batch, lens[64], total = 0;
        for (int j = 0; j < n; j++) total += lens[j] = g.data.rows[i0 + j].len;
        int32_t *ids = malloc(sizeof(int32_t) * total), *labels = malloc(sizeof(int32_t) * total);
        for (int j = 0, off = 0; j < n; off += lens[j++]) {
            memcpy(ids + off, g.data.rows[i0 + j].input_ids, sizeof(int32_t) * lens[j]);
            memcpy(labels + off, g.data.rows[i0 + j].labels, sizeof(int32_t) * lens[j]);
        }
        qwen35_batch b = {ids, labels, lens, n, total};
        double s;
        int64_t c;
        int rc = qwen35_eval_loss(&g.m, &b, &s, &c);
        free(ids);
        free(labels);
        if (rc) {
            test_fail(__FILE__, __LINE__, "%s", dt_errmsg());
            golden_close(&g);
            return;
        }
        sum += s;
        count += c;
    }
    double got = sum / count;
    if (count != want_tokens || !(fabs(got - want) <= 1e-5 * fabs(want)))
        test_fail(__FILE__, __LINE__, "%s batch %d: loss %.8f over %lld tokens, reference %.8f over %lld",
                  name, batch, got, (long long)count, want, (long long)want_tokens);
    golden_close(&g);
}

TEST(golden_text_tied_logits) { check_logits("text_tied", false, "expected_logits.safetensors"); }
TEST(golden_text_tied_loss_rows) { check_loss("text_tied", false, "expected.json", 1); }
TEST(golden_text_tied_loss_packed) { check_loss("text_tied", false, "expected.json", 4); }
TEST(golden_text_tied_adapter_logits) { check_logits("text_tied", true, "expected_adapter_logits.safetensors"); }
TEST(golden_text_tied_adapter_loss) { check_loss("text_tied", true, "expected_adapter.json", 3); }
TEST(golden_mm_untied_sharded_logits) { check_logits("mm_untied_sharded", false, "expected_logits.safetensors"); }
TEST(golden_mm_untied_sharded_loss) { check_loss("mm_untied_sharded", false, "expected.json", 6); }
TEST(golden_text_bf16_logits) { check_logits("text_bf16", false, "expected_logits.safetensors"); }
TEST(golden_text_bf16_loss) { check_loss("text_bf16", false, "expected.json", 2); }
