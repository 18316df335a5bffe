/* A small test harness: TEST(name) registers a function; CHECK fails it with the
 * file, line and condition. The runner prints one line per test and a summary
 * "N passed, N failed". */
#ifndef DT_TEST_H
#define DT_TEST_H

#include <math.h>
#include <stdio.h>

typedef void (*test_fn)(void);
void test_register(const char *name, test_fn fn);
void test_fail(const char *file, int line, const char *fmt, ...);
int test_failed(void);

#define TEST(name)                                                                 \
    static void name(void);                                                        \
    __attribute__((constructor)) static void register_##name(void) {              \
        test_register(#name, name);                                                \
    }                                                                              \
    static void name(void)

#define CHECK(cond)                                                                \
    do {                                                                           \
        if (!(cond)) { test_fail(__FILE__, __LINE__, "%s", #cond); return; }      \
    } while (0)

#define CHECKF(cond, ...)                                                          \
    do {                                                                           \
        if (!(cond)) { test_fail(__FILE__, __LINE__, __VA_ARGS__); return; }      \
    } while (0)

/* Fails unless the call returned 0; shows dt_errmsg(). */
#define CHECK_OK(call)                                                             \
    do {                                                                           \
        if ((call) != 0) { test_fail(__FILE__, __LINE__, "%s: %s", #call, dt_errmsg()); return; } \
    } while (0)

/* Fails unless the call returned non-zero with an error message containing needle. */
#define CHECK_ERR(call, needle)                                                    \
    do {                                                                           \
        dt_err_clear();                                                            \
        if ((call) == 0) { test_fail(__FILE__, __LINE__, "%s succeeded, expected error with \"%s\"", #call, needle); return; } \
        if (!strstr(dt_errmsg(), needle)) { test_fail(__FILE__, __LINE__, "%s: error \"%s\" lacks \"%s\"", #call, dt_errmsg(), needle); return; } \
    } while (0)

/* max|a-b| / max|b| over n values (b the reference). */
double rel_err(const float *a, const float *b, size_t n);
/* Deterministic random data for the op tests: uniform in [-1, 1), and a malloc'd vector of it times scale. */
float test_frand(void);
float *test_rand_vec(int64_t n, float scale);

#define FIXTURES DT_SOURCE_DIR "/tests/fixtures"

#endif
