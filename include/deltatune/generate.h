/* Autoregressive generation over a decoding state: prefill, then one token at a time. */
#ifndef DELTATUNE_GENERATE_H
#define DELTATUNE_GENERATE_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "deltatune/qwen35.h"
#include "deltatune/qwen35_cuda.h"
#include "deltatune/sample.h"
#include "deltatune/tokenizer.h"

/* One sequence being decoded: on the CPU with the model's caches in st, or on the GPU (gpu not
 * NULL) with its caches on the device, st then holding only n_past and max_len. */
typedef struct {
    qwen35_model *m;
    qwen35_cuda *gpu;
    qwen35_state st;
} decoder;

int decoder_init(decoder *d, qwen35_model *m, qwen35_cuda *gpu, int64_t max_len);
void decoder_reset(decoder *d);  /* back to an empty sequence */
void decoder_free(decoder *d);   /* the GPU model stays the caller's */
/* Runs n more tokens of the sequence (positions st.n_past ..); logits [vocab] receives the last
 * one's. Refuses to go past max_len. */
int decoder_forward(decoder *d, const int32_t *ids, int n, float *logits);

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

/* Feeds the tokens of `ids` that the decoder has not seen (ids must extend what it holds: the
 * first d->st.n_past are taken as already processed), then generates into out. */
int generate(decoder *d, const int32_t *ids, int n_ids, const gen_opts *o, dt_ids *out, gen_token_fn on_token,
             void *ctx, gen_stats *stats);

#endif
