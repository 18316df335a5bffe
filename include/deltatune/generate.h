/* Autoregressive generation over a decoding state: prefill, then one token at a time. */
#ifndef DELTATUNE_GENERATE_H
#define DELTATUNE_GENERATE_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "deltatune/qwen35.h"
#include "deltatune/sample.h"
#include "deltatune/tokenizer.h"

typedef struct {
    int max_new_tokens;
    sampler_opts sampling;
    uint64_t seed;
    const int32_t *stop_ids;   /* generation ends after any of these (it is kept in the output) */
    int n_stop;
    volatile sig_atomic_t *cancel; /* set (e.g. by SIGINT) to stop after the current token; may be NULL */
} gen_opts;

typedef struct {
    int prompt_tokens, new_tokens;
    double prefill_s, decode_s;
    bool stopped;              /* ended on a stop id */
} gen_stats;

/* Called with each new token as it is chosen. */
typedef void (*gen_token_fn)(void *ctx, int32_t id);

/* Feeds the tokens of `ids` that the state has not seen (ids must extend what it holds: the
 * first st->n_past are taken as already processed), then generates into out. */
int generate(qwen35_model *m, qwen35_state *st, const int32_t *ids, int n_ids, const gen_opts *o, dt_ids *out,
             gen_token_fn on_token, void *ctx, gen_stats *stats);

#endif
