/* Sampling: frequencies follow softmax(logits / temperature), cut by top-k and top-p as
 * transformers' warpers do; temperature 0 is argmax. */
#include <math.h>

#include "deltatune/error.h"
#include "deltatune/sample.h"
#include "test.h"

/* Frequencies of n draws. */
static void draw(const float *logits, int V, sampler_opts o, int n, double *freq) {
    sampler s;
    dt_rng rng;
    dt_rng_seed(&rng, 42);
    for (int i = 0; i < V; i++) freq[i] = 0;
    if (sampler_init(&s, V)) return;
    for (int i = 0; i < n; i++) freq[sampler_next(&s, logits, &o, &rng)] += 1.0 / n;
    sampler_free(&s);
}

TEST(sample_follows_the_warpers) {
    /* probabilities 1/15, 2/15, 4/15, 8/15 at temperature 1 */
    const float logits[4] = {0, logf(2), logf(4), logf(8)};
    double f[4];
    draw(logits, 4, (sampler_opts){0, 0, 1}, 1000, f);
    CHECK(fabs(f[3] - 1) < 1e-9);  /* greedy */
    draw(logits, 4, (sampler_opts){1, 0, 1}, 40000, f);
    for (int i = 0; i < 4; i++) CHECKF(fabs(f[i] - (1 << i) / 15.0) < 0.01, "p[%d] = %.3f", i, f[i]);
    draw(logits, 4, (sampler_opts){2, 0, 1}, 40000, f);  /* temperature 2: sqrt of the ratios */
    double z = 1 + sqrt(2) + 2 + sqrt(8);
    for (int i = 0; i < 4; i++) CHECKF(fabs(f[i] - sqrt(1 << i) / z) < 0.01, "T=2: p[%d] = %.3f", i, f[i]);
    draw(logits, 4, (sampler_opts){1, 2, 1}, 40000, f);  /* top-k 2: the two largest, renormalised */
    CHECKF(f[0] == 0 && f[1] == 0 && fabs(f[2] - 1 / 3.0) < 0.01, "top-k: %.3f %.3f %.3f", f[0], f[1], f[2]);
    draw(logits, 4, (sampler_opts){1, 0, 0.7}, 40000, f);  /* top-p 0.7: 8/15 < 0.7 <= 12/15 */
    CHECKF(f[0] == 0 && f[1] == 0 && fabs(f[2] - 1 / 3.0) < 0.01, "top-p: %.3f %.3f %.3f", f[0], f[1], f[2]);
    draw(logits, 4, (sampler_opts){1, 0, 0.5}, 1000, f);  /* the top token alone reaches 0.5 */
    CHECK(fabs(f[3] - 1) < 1e-9);
}
