/* deltatune merge: the merged checkpoint's logits equal the base's with the adapter. */
#include <stdlib.h>
#include <string.h>

#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/merge.h"
#include "deltatune/qwen35.h"
#include "test.h"

/* Logits of the fixture's longest row through a model folder (and an adapter, or NULL). */
static int row_logits(const char *dir, const lora_adapter *ad, float **out, int *n_out) {
    checkpoint ck;
    qwen35_model m;
    dt_dataset d;
    char data[512];
    snprintf(data, sizeof data, "%s/text_tied/data.jsonl", FIXTURES);
    if (checkpoint_open(&ck, dir)) return -1;
    int rc = qwen35_model_init(&m, &ck.cfg, ck.specs, ck.weights, ck.n_specs);
    if (rc == 0) rc = dataset_load_tokenized(&d, data, ck.cfg.vocab_size);
    if (rc == 0) {
        for (int i = 0; ad && rc == 0 && i < ad->n_modules; i++)
            rc = qwen35_model_set_lora(&m, ad->modules[i].kind, ad->modules[i].layer, &ad->modules[i].lora);
        const dt_row *r = &d.rows[5];
        int len = r->len;
        *n_out = len * ck.cfg.vocab_size;
        *out = malloc(sizeof(float) * *n_out);
        qwen35_batch b = {r->input_ids, NULL, &len, 1, len};
        if (rc == 0) rc = qwen35_forward_logits(&m, &b, *out);
        dataset_free(&d);
    }
    qwen35_model_free(&m);
    checkpoint_close(&ck);
    return rc;
}

static void check_merge(int out_dtype, double tol) {
    char out[] = "/tmp/deltatune_merge_XXXXXX";
    CHECK(mkdtemp(out));
    checkpoint ck;
    lora_adapter ad;
    merge_stats st;
    CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
    CHECK_OK(adapter_load(&ad, FIXTURES "/text_tied/adapter", &ck));
    CHECK_OK(checkpoint_merge(&ck, &ad, out, out_dtype, &st));
    CHECKF(st.merged == ad.n_modules, "merged %lld of %d modules", (long long)st.merged, ad.n_modules);
    float *want = NULL, *got = NULL;
    int n = 0, n2 = 0;
    CHECK_OK(row_logits(FIXTURES "/text_tied", &ad, &want, &n));
    CHECK_OK(row_logits(out, NULL, &got, &n2));
    CHECK(n == n2);
    double e = rel_err(got, want, n);
    char path[600];
    snprintf(path, sizeof path, "%s/generation_config.json", out);
    CHECKF(io_file_exists(path), "generation_config.json not copied");
    /* the output folder may not be the model folder */
    CHECK_ERR(checkpoint_merge(&ck, &ad, FIXTURES "/text_tied", out_dtype, &st), "is the model folder");
    free(want);
    free(got);
    adapter_free(&ad);
    checkpoint_close(&ck);
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", out);
    CHECK(system(cmd) == 0);
    CHECKF(e <= tol, "merged logits rel err %.3g > %.3g", e, tol);
}

TEST(merge_f32_equals_base_plus_adapter) { check_merge(-1, 1e-5); }
/* bf16 rounds every weight of these deliberately large random matrices: a loose bound */
TEST(merge_bf16_close_to_base_plus_adapter) { check_merge(DT_BF16, 0.1); }
