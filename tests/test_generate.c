/* Greedy generation against transformers' model.generate (tests/fixtures/generate), with and
 * without a PEFT adapter: the same tokens, one for one. */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/error.h"
#include "deltatune/generate.h"
#include "deltatune/qwen35.h"
#include "test.h"

TEST(generate_greedy_matches_transformers) {
    checkpoint ck;
    qwen35_model m;
    lora_adapter ad;
    json_error_t je;
    json_t *root = json_load_file(FIXTURES "/generate/expected.json", 0, &je);
    CHECKF(root, "expected.json: %s", je.text);
    CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
    CHECK_OK(qwen35_model_init(&m, &ck.cfg, ck.specs, ck.weights, ck.n_specs));
    CHECK_OK(adapter_load(&ad, FIXTURES "/text_tied/adapter", &ck));
    json_t *cases = json_object_get(root, "cases");
    size_t ci;
    json_t *c;
    int checked = 0;
    json_array_foreach(cases, ci, c) {
        json_t *prompt = json_object_get(c, "prompt_ids"), *want = json_object_get(c, "generated_ids");
        bool with_adapter = json_is_true(json_object_get(c, "adapter"));
        for (int i = 0; i < ad.n_modules; i++)
            CHECK_OK(qwen35_model_set_lora(&m, ad.modules[i].kind, ad.modules[i].layer,
                                           with_adapter ? &ad.modules[i].lora : NULL));
        int n = (int)json_array_size(prompt), n_new = (int)json_array_size(want);
        int32_t *ids = malloc(sizeof(int32_t) * n);
        for (int i = 0; i < n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(prompt, i));
        decoder dec;
        CHECK_OK(decoder_init(&dec, &m, NULL, n + n_new));
        gen_opts o = {.max_new_tokens = n_new};  /* temperature 0: greedy; no stop ids */
        dt_ids out = {0};
        gen_stats stats;
        int rc = generate(&dec, ids, n, &o, &out, NULL, NULL, &stats);
        free(ids);
        decoder_free(&dec);
        CHECK_OK(rc);
        CHECKF(out.n == n_new, "case %zu: %d tokens, expected %d", ci, out.n, n_new);
        for (int i = 0; i < n_new; i++) {
            int32_t w = (int32_t)json_integer_value(json_array_get(want, i));
            CHECKF(out.v[i] == w, "case %zu (prompt %d tokens, adapter %d): token %d is %d, transformers %d", ci, n,
                   with_adapter, i, out.v[i], w);
        }
        dt_ids_free(&out);
        checked++;
    }
    CHECKF(checked >= 6, "only %d cases", checked);
    adapter_free(&ad);
    qwen35_model_free(&m);
    checkpoint_close(&ck);
    json_decref(root);
}
