#include "deltatune/generate.h"

#include <stdlib.h>

#include "deltatune/error.h"
#include "deltatune/mem.h"

int decoder_init(decoder *d, qwen35_model *m, qwen35_cuda *gpu, int64_t max_len) {
    *d = (decoder){.m = m, .gpu = gpu};
    if (!gpu) return qwen35_state_init(&d->st, &m->cfg, max_len);
    d->st.max_len = max_len;
    return qwen35_cuda_decode_init(gpu, max_len);
}

void decoder_reset(decoder *d) {
    if (d->gpu) d->st.n_past = 0;  /* the device's recurrent caches are cleared by the next run */
    else qwen35_state_reset(&d->st);
}

void decoder_free(decoder *d) {
    qwen35_state_free(&d->st);
    *d = (decoder){0};
}

int decoder_forward(decoder *d, const int32_t *ids, int n, float *logits) {
    if (!d->gpu) return qwen35_forward_cached(d->m, &d->st, ids, n, logits, true);
    if (qwen35_cuda_forward_cached(d->gpu, d->m, d->st.n_past, ids, n, logits)) {
        d->st.n_past = 0;  /* the device's caches may hold part of the failed run: read everything again */
        return -1;
    }
    d->st.n_past += n;
    return 0;
}

int generate(decoder *d, const int32_t *ids, int n_ids, const gen_opts *o, dt_ids *out, gen_token_fn on_token,
             void *ctx, gen_stats *stats) {
    *stats = (gen_stats){0};
    qwen35_state *st = &d->st;
    int V = d->m->cfg.vocab_size;
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
    rc = decoder_forward(d, ids + st->n_past, fresh, logits);
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
        rc = decoder_forward(d, &next, 1, logits);
    }
    stats->decode_s = dt_seconds() - t0;
    sampler_free(&smp);
    free(logits);
    return rc;
}
