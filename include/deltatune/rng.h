/* A small seeded PRNG: xoshiro256** seeded through splitmix64.
 *
 * Same seed, same integers on every platform. Floats are derived from them (uniforms from the
 * top 24/53 bits; normals through libm's log/sin/cos in double, rounded to float), so a
 * last-bit difference between libms almost never shows. Independent streams (one per thread,
 * tensor or chunk) come from dt_rng_seed2(seed, stream), so a parallel fill does not depend on
 * the thread count. */
#ifndef DELTATUNE_RNG_H
#define DELTATUNE_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t s[4];
    double spare;     /* second Box-Muller value */
    int has_spare;
} dt_rng;

void dt_rng_seed(dt_rng *r, uint64_t seed);
/* A stream of its own for (seed, stream): different streams do not overlap in practice. */
void dt_rng_seed2(dt_rng *r, uint64_t seed, uint64_t stream);
uint64_t dt_rng_next(dt_rng *r);
/* Uniform in [0, 1). */
float dt_rng_uniform(dt_rng *r);
double dt_rng_uniform_f64(dt_rng *r);
/* Uniform in [lo, hi). */
float dt_rng_range(dt_rng *r, float lo, float hi);
/* Standard normal (Box-Muller, the second value kept for the next call). */
float dt_rng_normal(dt_rng *r);
/* out[i] = mean + std * normal, or uniform in [lo, hi): the same values as calling
 * dt_rng_normal / dt_rng_range n times, without a call per value. */
void dt_rng_fill_normal(dt_rng *r, float *out, size_t n, float mean, float std);
void dt_rng_fill_uniform(dt_rng *r, float *out, size_t n, float lo, float hi);
/* Uniform integer in [0, n), n > 0, without modulo bias. */
uint64_t dt_rng_below(dt_rng *r, uint64_t n);

#endif
