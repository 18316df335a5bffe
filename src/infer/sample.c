#include "deltatune/sample.h"

#include <math.h>
#include <stdlib.h>

#include "deltatune/error.h"

int sampler_init(sampler *s, int vocab) {
    s->vocab = vocab;
    s->cand = malloc(sizeof *s->cand * (size_t)(vocab > 0 ? vocab : 1));
    return s->cand ? 0 : dt_err("out of memory for a sampler over %d tokens", vocab);
}

void sampler_free(sampler *s) {
    free(s->cand);
    s->cand = NULL;
}

static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Decreasing probability; ties by increasing id, so the order does not depend on qsort. */
static int by_prob_desc(const void *a, const void *b) {
    const sample_cand *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

int32_t sampler_next(sampler *s, const float *logits, const sampler_opts *o, dt_rng *rng) {
    int V = s->vocab;
    if (o->temperature <= 0) return argmax(logits, V);
    float mx = logits[argmax(logits, V)];
    for (int i = 0; i < V; i++) s->cand[i] = (sample_cand){expf((float)((logits[i] - mx) / o->temperature)), i};
    int keep = V;
    bool top_k = o->top_k > 0 && o->top_k < V, top_p = o->top_p > 0 && o->top_p < 1;
    if (top_k || top_p) {  /* candidates by decreasing probability; top-k, then top-p, cut the tail */
        qsort(s->cand, (size_t)V, sizeof *s->cand, by_prob_desc);
        if (top_k) keep = o->top_k;
        if (top_p) {
            double kept = 0, cum = 0;
            for (int i = 0; i < keep; i++) kept += s->cand[i].p;
            for (int i = 0; i < keep; i++) {  /* the smallest prefix reaching top_p */
                cum += s->cand[i].p / kept;
                if (cum >= o->top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
    }
    double total = 0;
    for (int i = 0; i < keep; i++) total += s->cand[i].p;
    double u = dt_rng_uniform_f64(rng) * total, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += s->cand[i].p;
        if (u < acc) return s->cand[i].id;
    }
    return s->cand[keep - 1].id;
}
