/* Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with the
 * semantics of transformers' logits warpers (temperature, then top-k, then top-p). */
#ifndef DELTATUNE_SAMPLE_H
#define DELTATUNE_SAMPLE_H

#include <stdbool.h>
#include <stdint.h>

#include "deltatune/rng.h"

typedef struct {
    double temperature;   /* 0: greedy */
    int top_k;            /* 0: off */
    double top_p;         /* 1: off */
} sampler_opts;

typedef struct {
    float p;
    int32_t id;
} sample_cand;

typedef struct {
    sample_cand *cand;    /* [V] scratch */
    int vocab;
} sampler;

int sampler_init(sampler *s, int vocab);
void sampler_free(sampler *s);
/* The next token; logits are not modified. */
int32_t sampler_next(sampler *s, const float *logits, const sampler_opts *o, dt_rng *rng);

#endif
