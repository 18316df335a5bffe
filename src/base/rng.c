#include "deltatune/rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void dt_rng_seed(dt_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
    r->has_spare = 0;
    r->spare = 0;
}

void dt_rng_seed2(dt_rng *r, uint64_t seed, uint64_t stream) {
    /* Mixing the stream through splitmix first keeps (seed, stream) and (seed + 1, stream - 1)
     * apart, which a plain sum would not. */
    uint64_t x = stream;
    dt_rng_seed(r, seed ^ splitmix64(&x));
}

static inline uint64_t next(dt_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

uint64_t dt_rng_next(dt_rng *r) { return next(r); }

float dt_rng_uniform(dt_rng *r) { return (float)(next(r) >> 40) * 0x1.0p-24f; }

double dt_rng_uniform_f64(dt_rng *r) { return (double)(next(r) >> 11) * 0x1.0p-53; }

float dt_rng_range(dt_rng *r, float lo, float hi) {
    float x = lo + (hi - lo) * dt_rng_uniform(r);
    return x < hi ? x : lo;  /* rounding may land on hi */
}

float dt_rng_normal(dt_rng *r) {
    if (r->has_spare) {
        r->has_spare = 0;
        return (float)r->spare;
    }
    /* 1 - u lies in (0, 1], so the log is finite. */
    double u1 = 1.0 - dt_rng_uniform_f64(r), u2 = dt_rng_uniform_f64(r);
    double rad = sqrt(-2.0 * log(u1)), th = 2.0 * M_PI * u2;
    r->spare = rad * sin(th);
    r->has_spare = 1;
    return (float)(rad * cos(th));
}

void dt_rng_fill_normal(dt_rng *r, float *out, size_t n, float mean, float std) {
    for (size_t i = 0; i < n; i++) out[i] = mean + std * dt_rng_normal(r);
}

void dt_rng_fill_uniform(dt_rng *r, float *out, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) out[i] = dt_rng_range(r, lo, hi);
}

uint64_t dt_rng_below(dt_rng *r, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do x = next(r); while (x >= limit);
    return x % n;
}
