#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "deltatune/rng.h"
#include "test.h"

#define MAX_TESTS 1024
static struct { const char *name; test_fn fn; } tests[MAX_TESTS];
static int n_tests, current_failed;
static char messages[8192];  /* failures of the running test, printed after its status line */

void test_register(const char *name, test_fn fn) {
    if (n_tests < MAX_TESTS) tests[n_tests++] = (typeof(tests[0])){name, fn};
}

void test_fail(const char *file, int line, const char *fmt, ...) {
    size_t used = strlen(messages);
    va_list ap;
    va_start(ap, fmt);
    used += snprintf(messages + used, sizeof messages - used, "    %s:%d: ", file, line);
    if (used < sizeof messages) used += vsnprintf(messages + used, sizeof messages - used, fmt, ap);
    if (used < sizeof messages - 1) strcat(messages, "\n");
    va_end(ap);
    current_failed = 1;
}

int test_failed(void) { return current_failed; }

static dt_rng test_rng = {0};
static int test_rng_ready;

float test_frand(void) {
    if (!test_rng_ready) dt_rng_seed(&test_rng, 0x2545f4914f6cdd1dull), test_rng_ready = 1;
    return dt_rng_range(&test_rng, -1.0f, 1.0f);
}

float *test_rand_vec(int64_t n, float scale) {
    float *v = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) v[i] = scale * test_frand();
    return v;
}

double rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > num || d != d) num = d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return den > 0 ? num / den : num;
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const typeof(tests[0]) *)a)->name, ((const typeof(tests[0]) *)b)->name);
}

/* Usage: deltatune_tests [substring]  -- runs the tests whose name contains it. */
int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : NULL;
    int passed = 0, failed = 0;
    qsort(tests, n_tests, sizeof tests[0], by_name);
    for (int i = 0; i < n_tests; i++) {
        if (filter && !strstr(tests[i].name, filter)) continue;
        current_failed = 0;
        messages[0] = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        tests[i].fn();
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
        printf("%s %s (%.0f ms)\n%s", current_failed ? "FAIL" : "ok  ", tests[i].name, ms, messages);
        fflush(stdout);
        if (current_failed) failed++; else passed++;
    }
    printf("unit: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
