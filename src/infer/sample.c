#include "deltatune/sample.h"

#include <math.h>
#include <stdlib.h>

#include "deltatune/error.h"

int sampler_init(sampler *s, int vocab) {
    s->vocab = vocab;
    s->probs = malloc(sizeof(float) * vocab);
    s->order = malloc(sizeof(int32_t) * vocab);
    if (!s->probs || !s->order) {
        sampler_free(s);
        return dt_err("out of memory for a sampler over %d tokens", vocab);
    }
    return 0;
}

void sampler_free(sampler *s) {
    free(s->probs);
    free(s->order);
    s->probs = NULL;
    s->order = NULL;
}

static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static const float *sort_key;
static int by_prob_desc(const void *a, const void *b) {
    float x = sort_key[*(const int32_t *)a], y = sort_key[*(const int32_t *)b];
    return x < y ? 1 : x > y ? -1 : (*(const int32_t *)a > *(const int32_t *)b) - (*(const int32_t *)a < *(const int32_t *)b);
}

int32_t sampler_next(sampler *s, const float *logits, const sampler_opts *o, dt_rng *rng) {
    int V = s->vocab;
    if (o->temperature <= 0) return argmax(logits, V);
    /* softmax of logits / temperature */
    float mx = logits[argmax(logits, V)];
    for (int i = 0; i < V; i++) {
        s->probs[i] = expf((float)((logits[i] - mx) / o->temperature));
        s->order[i] = i;
    }
    /* candidates by decreasing probability; top-k and top-p cut the tail */
    sort_key = s->probs;
    qsort(s->order, (size_t)V, sizeof(int32_t), by_prob_desc);
    int keep = o->top_k > 0 && o->top_k < V ? o->top_k : V;
    double kept = 0;
    for (int i = 0; i < keep; i++) kept += s->probs[s->order[i]];
    if (o->top_p > 0 && o->top_p < 1) {
        /* the smallest prefix whose probability (within the top-k set) reaches top_p */
        double cum = 0;
        for (int i = 0; i < keep; i++) {
            cum += s->probs[s->order[i]] / kept;
            if (cum >= o->top_p) {
                keep = i + 1;
                break;
            }
        }
        kept = 0;
        for (int i = 0; i < keep; i++) kept += s->probs[s->order[i]];
    }
    double u = dt_rng_uniform_f64(rng) * kept, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += s->probs[s->order[i]];
        if (u < acc) return s->order[i];
    }
    return s->order[keep - 1];
}
