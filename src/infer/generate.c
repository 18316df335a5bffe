#include "deltatune/generate.h"

#include <stdlib.h>

#include "deltatune/error.h"
#include "deltatune/mem.h"

int generate(qwen35_model *m, qwen35_state *st, const int32_t *ids, int n_ids, const gen_opts *o, dt_ids *out,
             gen_token_fn on_token, void *ctx, gen_stats *stats) {
    *stats = (gen_stats){0};
    int V = m->cfg.vocab_size;
    if (n_ids <= st->n_past) return dt_err("nothing new to read: the prompt is empty");
    if (n_ids + (int64_t)o->max_new_tokens > st->max_len)
        return dt_err("the prompt (%d tokens) plus %d new tokens exceed the context of %lld", n_ids, o->max_new_tokens,
                      (long long)st->max_len);
    float *logits = malloc(sizeof(float) * V);
    sampler smp;
    if (!logits || sampler_init(&smp, V)) {
        free(logits);
        return dt_err("out of memory");
    }
    dt_rng rng;
    dt_rng_seed(&rng, o->seed);
    int rc = 0;
    double t0 = dt_seconds();
    int fresh = n_ids - (int)st->n_past;
    stats->prompt_tokens = fresh;
    rc = qwen35_forward_cached(m, st, ids + st->n_past, fresh, logits, true);
    stats->prefill_s = dt_seconds() - t0;
    t0 = dt_seconds();
    for (int i = 0; rc == 0 && i < o->max_new_tokens; i++) {
        int32_t next = sampler_next(&smp, logits, &o->sampling, &rng);
        if (dt_ids_push(out, next)) {
            rc = dt_err("out of memory");
            break;
        }
        stats->new_tokens++;
        if (on_token) on_token(ctx, next);
        for (int s = 0; s < o->n_stop; s++) stats->stopped |= next == o->stop_ids[s];
        if (stats->stopped || (o->cancel && *o->cancel) || i + 1 == o->max_new_tokens) break;
        rc = qwen35_forward_cached(m, st, &next, 1, logits, true);
    }
    stats->decode_s = dt_seconds() - t0;
    sampler_free(&smp);
    free(logits);
    return rc;
}
