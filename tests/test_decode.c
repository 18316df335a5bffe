/* Incremental decoding (KV cache, conv window and recurrent state) against the full
 * forward: the logits of every position must agree, however the sequence is split. */
#include <stdlib.h>
#include <string.h>

#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/qwen35.h"
#include "test.h"

/* Feeds the row in pieces of the given sizes (cycled) and compares each piece's logits. */
static void check_split(const char *fixture, int row, const int *pieces, int n_pieces) {
    char dir[512], data_path[600];
    snprintf(dir, sizeof dir, "%s/%s", FIXTURES, fixture);
    snprintf(data_path, sizeof data_path, "%s/data.jsonl", dir);
    checkpoint ck = {0};
    qwen35_model m = {0};
    dt_dataset data = {0};
    qwen35_state st = {0};
    CHECK_OK(checkpoint_open(&ck, dir));
    CHECK_OK(qwen35_model_init(&m, &ck.cfg, ck.specs, ck.weights, ck.n_specs));
    CHECK_OK(dataset_load_tokenized(&data, data_path, ck.cfg.vocab_size));
    const dt_row *r = &data.rows[row];
    int V = ck.cfg.vocab_size, len = r->len;
    float *full = malloc(sizeof(float) * len * V), *part = malloc(sizeof(float) * len * V);
    qwen35_batch b = {r->input_ids, NULL, &len, 1, len};
    CHECK_OK(qwen35_forward_logits(&m, &b, full));
    CHECK_OK(qwen35_state_init(&st, &ck.cfg, len));
    for (int pass = 0; pass < 2; pass++) {  /* the second pass checks reset */
        int done = 0;
        for (int i = 0; done < len; i++) {
            int n = pieces[i % n_pieces] < len - done ? pieces[i % n_pieces] : len - done;
            CHECK_OK(qwen35_forward_cached(&m, &st, r->input_ids + done, n, part + (int64_t)done * V, false));
            done += n;
        }
        double e = rel_err(part, full, (size_t)len * V);
        CHECKF(e < 1e-5, "%s row %d (len %d), pass %d: cached logits rel err %.3g", fixture, row, len, pass, e);
        qwen35_state_reset(&st);
    }
    CHECK_ERR(qwen35_forward_cached(&m, &st, r->input_ids, len, part, false) ||
                  qwen35_forward_cached(&m, &st, r->input_ids, 1, part, true),
              "exceed the decoding cache");
    free(full);
    free(part);
    qwen35_state_free(&st);
    dataset_free(&data);
    qwen35_model_free(&m);
    checkpoint_close(&ck);
}

static const int one_at_a_time[] = {1};
static const int prefill_then_steps[] = {70, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                         1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
static const int uneven[] = {3, 64, 5, 1, 30};

TEST(decode_one_token_at_a_time) { check_split("text_tied", 5, one_at_a_time, 1); }
TEST(decode_prefill_then_steps) { check_split("text_tied", 5, prefill_then_steps, 41); }
TEST(decode_uneven_pieces_sharded_untied) { check_split("mm_untied_sharded", 5, uneven, 5); }
TEST(decode_bf16) { check_split("text_bf16", 4, uneven, 5); }
