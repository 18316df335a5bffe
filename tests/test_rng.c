#include <stdint.h>
#include <string.h>

#include "deltatune/error.h"
#include "deltatune/rng.h"
#include "test.h"

/* The integer stream fixes every random value deltatune makes (init-model weights, LoRA init,
 * shuffles), so it must be the same on every platform. Expected values from an independent
 * Python big-integer implementation of splitmix64 + xoshiro256**; 0xe220a8397b1dcdaf is the
 * published first splitmix64 output for state 0. */
TEST(rng_known_answers) {
    dt_rng r;
    dt_rng_seed(&r, 0);
    CHECK(dt_rng_next(&r) == 0x99ec5f36cb75f2b4ull);
    CHECK(dt_rng_next(&r) == 0xbf6e1f784956452aull);
    CHECK(dt_rng_next(&r) == 0x1a5f849d4933e6e0ull);
    dt_rng_seed(&r, 12345);
    CHECK(dt_rng_next(&r) == 0xbe6a36374160d49bull);
    CHECK(dt_rng_next(&r) == 0x214aaa0637a688c6ull);
    dt_rng_seed2(&r, 7, 3);
    CHECK(dt_rng_next(&r) == 0x7957c3b74b90459eull);
}

TEST(rng_streams_differ) {
    dt_rng a, b, c;
    dt_rng_seed2(&a, 1, 0);
    dt_rng_seed2(&b, 1, 1);
    dt_rng_seed2(&c, 2, 0);
    uint64_t x = dt_rng_next(&a);
    CHECK(x != dt_rng_next(&b));
    CHECK(x != dt_rng_next(&c));
}

TEST(rng_uniform_range_and_moments) {
    dt_rng r;
    dt_rng_seed(&r, 42);
    double sum = 0;
    int n = 200000;
    for (int i = 0; i < n; i++) {
        float u = dt_rng_uniform(&r);
        CHECKF(u >= 0 && u < 1, "uniform %g", u);
        float v = dt_rng_range(&r, -0.5f, 0.5f);
        CHECKF(v >= -0.5f && v < 0.5f, "range %g", v);
        sum += u;
    }
    CHECKF(fabs(sum / n - 0.5) < 0.005, "mean %g", sum / n);
    for (int i = 0; i < 1000; i++) {
        uint64_t k = dt_rng_below(&r, 7);
        CHECK(k < 7);
    }
}

TEST(rng_normal_moments_and_fill) {
    dt_rng r, s;
    dt_rng_seed(&r, 9);
    dt_rng_seed(&s, 9);
    enum { N = 200001 };  /* odd: the fill must carry the spare value like single calls */
    static float buf[N];
    dt_rng_fill_normal(&r, buf, N, 0, 1);
    double sum = 0, sq = 0;
    for (int i = 0; i < N; i++) {
        float x = dt_rng_normal(&s);
        CHECKF(memcmp(&x, &buf[i], sizeof x) == 0, "fill differs at %d: %g vs %g", i, buf[i], x);
        CHECK(isfinite(x));
        sum += x;
        sq += (double)x * x;
    }
    double mean = sum / N, var = sq / N - mean * mean;
    CHECKF(fabs(mean) < 0.01 && fabs(var - 1) < 0.02, "mean %g var %g", mean, var);
    /* Streams resume where they stopped, spare value included. */
    CHECK(dt_rng_normal(&r) == dt_rng_normal(&s));
}
