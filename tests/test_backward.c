/* The model's backward against PEFT: LoRA gradients of the first training step of
 * tests/fixtures/train_tied (made by tools/make_fixtures.py with transformers + PEFT). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/qwen35.h"
#include "test.h"

/* Packs rows [r0, r1) of the dataset into a batch (caller frees ids/labels). */
static qwen35_batch pack_rows(const dt_dataset *d, int r0, int r1, int *lens) {
    int total = 0;
    for (int i = r0; i < r1; i++) total += lens[i - r0] = d->rows[i].len;
    int32_t *ids = malloc(sizeof(int32_t) * total), *labels = malloc(sizeof(int32_t) * total);
    for (int i = r0, off = 0; i < r1; off += d->rows[i++].len) {
        memcpy(ids + off, d->rows[i].input_ids, sizeof(int32_t) * d->rows[i].len);
        memcpy(labels + off, d->rows[i].labels, sizeof(int32_t) * d->rows[i].len);
    }
    return (qwen35_batch){ids, labels, lens, r1 - r0, total};
}

static void check_step1_grads(bool grad_checkpoint, bool warm_up_larger, int64_t ce_chunk) {
    checkpoint ck = {0};
    qwen35_model m = {0};
    dt_dataset data = {0};
    lora_adapter ad = {0};
    st_file ref = {0};
    json_t *spec = NULL;
    CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
    CHECK_OK(qwen35_model_init(&m, &ck.cfg, ck.specs, ck.weights, ck.n_specs));
    CHECK_OK(dataset_load_tokenized(&data, FIXTURES "/text_tied/data.jsonl", ck.cfg.vocab_size));
    CHECK_OK(adapter_load(&ad, FIXTURES "/train_tied/init_adapter", &ck));
    CHECK_OK(st_open(&ref, FIXTURES "/train_tied/expected_grads_step1.safetensors"));
    json_error_t je;
    spec = json_load_file(FIXTURES "/train_tied/expected_train.json", 0, &je);
    CHECK(spec);
    json_t *step = json_array_get(json_object_get(spec, "steps"), 0);
    double want_loss = json_number_value(json_object_get(step, "loss"));
    int64_t want_tokens = json_integer_value(json_object_get(step, "tokens"));
    CHECK_OK(adapter_alloc_grads(&ad));
    for (int i = 0; i < ad.n_modules; i++)
        CHECK_OK(qwen35_model_set_lora(&m, ad.modules[i].kind, ad.modules[i].layer, &ad.modules[i].lora));
    if (warm_up_larger) {  /* a bigger batch first grows the workspace; the gradients must not care */
        int lens[2];
        qwen35_batch b = pack_rows(&data, 4, 6, lens);
        double s;
        int64_t n;
        int rc = qwen35_forward_backward(&m, &b, 1.0, grad_checkpoint, &s, &n);
        free((void *)b.ids);
        free((void *)b.labels);
        CHECK_OK(rc);
        for (int i = 0; i < ad.n_modules; i++) {
            dt_lora *l = &ad.modules[i].lora;
            memset(l->dA, 0, sizeof(float) * l->rank * l->in);
            memset(l->dB, 0, sizeof(float) * l->out * l->rank);
        }
    }
    m.ce_chunk = ce_chunk;  /* after the warm-up: the workspace must follow */
    /* step 1: micro-batches of rows [0, 1] and [2, 3], loss normalised by the step's targets */
    double loss = 0;
    int64_t tokens = 0;
    for (int r0 = 0; r0 < 4; r0 += 2) {
        int lens[2];
        qwen35_batch b = pack_rows(&data, r0, r0 + 2, lens);
        double s;
        int64_t n;
        int rc = qwen35_forward_backward(&m, &b, 1.0 / (double)want_tokens, grad_checkpoint, &s, &n);
        free((void *)b.ids);
        free((void *)b.labels);
        CHECK_OK(rc);
        loss += s;
        tokens += n;
    }
    CHECKF(tokens == want_tokens, "targets %lld, reference %lld", (long long)tokens, (long long)want_tokens);
    CHECKF(fabs(loss / tokens - want_loss) <= 1e-5 * want_loss, "loss %.8f, reference %.8f", loss / tokens, want_loss);
    double worst = 0;
    char worst_key[256] = "";
    for (int i = 0; i < ad.n_modules; i++) {
        char path[128], key[256];
        qwen35_module_path(path, sizeof path, ad.modules[i].kind, ad.modules[i].layer);
        for (int ab = 0; ab < 2; ab++) {
            snprintf(key, sizeof key, "base_model.model.%s%s.lora_%c.weight", ck.prefix, path, ab ? 'B' : 'A');
            const st_tensor *t = st_find(&ref, key);
            const dt_lora *l = &ad.modules[i].lora;
            int64_t n = ab ? l->out * l->rank : l->rank * l->in;
            CHECKF(t && t->dtype == DT_F32 && t->numel == n, "%s missing or misshapen in the reference", key);
            double e = rel_err(ab ? l->dB : l->dA, t->data, n);
            if (!(e <= worst)) {
                worst = isnan(e) ? INFINITY : e;
                snprintf(worst_key, sizeof worst_key, "%s", key);
            }
        }
    }
    CHECKF(worst <= 1e-4, "LoRA gradient rel err %.3g at %s", worst, worst_key);
    json_decref(spec);
    st_close(&ref);
    adapter_free(&ad);
    dataset_free(&data);
    qwen35_model_free(&m);
    checkpoint_close(&ck);
}

TEST(backward_lora_grads_match_peft_checkpointed) { check_step1_grads(true, false, LMHEAD_TOKEN_CHUNK); }
TEST(backward_lora_grads_match_peft_stored) { check_step1_grads(false, false, LMHEAD_TOKEN_CHUNK); }
TEST(backward_lora_grads_after_a_larger_batch) { check_step1_grads(true, true, LMHEAD_TOKEN_CHUNK); }
/* the loss over all tokens at once (the full logits) and in chunks of 5 give the same gradients */
TEST(backward_lora_grads_unchunked_loss) { check_step1_grads(true, true, 0); }
TEST(backward_lora_grads_small_loss_chunks) { check_step1_grads(true, false, 5); }
