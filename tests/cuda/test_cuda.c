/* Every CUDA op against the CPU op (the reference) on random data, then the whole training
 * step against the CPU model. Without a CUDA device it says so and passes nothing
 * ("make test-cuda" on the GPU machine runs it for real). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_test.h"
#include "deltatune/dtype.h"
#include "deltatune/error.h"

int cuda_tests_passed, cuda_tests_failed;
static uint64_t rng = 0x2545f4914f6cdd1dull;

float test_urand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

float *test_rvec(int64_t n, float scale) {
    float *v = malloc(sizeof(float) * (n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) v[i] = scale * test_urand();
    return v;
}

float *test_rvec_bf16(int64_t n, float scale) {
    float *v = test_rvec(n, scale);
    test_round_bf16(v, n);
    return v;
}

float *test_copy(const float *h, int64_t n) {
    float *c = malloc(sizeof(float) * (n > 0 ? n : 1));
    memcpy(c, h, sizeof(float) * (n > 0 ? n : 0));
    return c;
}

void test_round_bf16(float *h, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = dt_bf16_to_f32(dt_f32_to_bf16(h[i]));
}

float *test_dev_f32(const float *h, int64_t n) {
    void *d = NULL;
    if (cuda_alloc(&d, sizeof(float) * (n > 0 ? n : 1)) || cuda_upload(d, h, sizeof(float) * n)) return NULL;
    return d;
}

dt_bf16 *test_dev_bf16(const float *h, int64_t n) {
    uint16_t *b = malloc(sizeof(uint16_t) * (n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) b[i] = dt_f32_to_bf16(h[i]);
    void *d = NULL;
    int rc = cuda_alloc(&d, sizeof(uint16_t) * (n > 0 ? n : 1)) || cuda_upload(d, b, sizeof(uint16_t) * n);
    free(b);
    return rc ? NULL : d;
}

int32_t *test_dev_i32(const int32_t *h, int64_t n) {
    void *d = NULL;
    if (cuda_alloc(&d, sizeof(int32_t) * (n > 0 ? n : 1)) || cuda_upload(d, h, sizeof(int32_t) * n)) return NULL;
    return d;
}

float *test_host_f32(const float *d, int64_t n) {
    float *h = calloc(n > 0 ? n : 1, sizeof(float));
    cuda_download(h, d, sizeof(float) * n);
    return h;
}

float *test_host_bf16(const dt_bf16 *d, int64_t n) {
    uint16_t *b = calloc(n > 0 ? n : 1, sizeof(uint16_t));
    float *h = malloc(sizeof(float) * (n > 0 ? n : 1));
    cuda_download(b, d, sizeof(uint16_t) * n);
    for (int64_t i = 0; i < n; i++) h[i] = dt_bf16_to_f32(b[i]);
    free(b);
    return h;
}

void test_expect_close(const char *name, const float *gpu, const float *cpu, int64_t n, double tol) {
    double num = 0, den = 0;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        if (gpu[i] != gpu[i] || cpu[i] != cpu[i]) nan = 1;
        double d = fabs((double)gpu[i] - cpu[i]);
        if (d > num) num = d;
        if (fabs(cpu[i]) > den) den = fabs(cpu[i]);
    }
    double e = den > 0 ? num / den : num;
    int ok = !nan && e <= tol;
    printf("%s cuda_%s: rel err %.2e (tol %.0e)%s\n", ok ? "ok  " : "FAIL", name, e, tol, nan ? " NaN" : "");
    if (ok) cuda_tests_passed++;
    else cuda_tests_failed++;
}

void test_expect_close_dev(const char *name, const char *part, const float *gpu_dev, const float *cpu, int64_t n,
                           double tol) {
    char full[512];
    snprintf(full, sizeof full, "%s: %s", name, part);
    float *g = test_host_f32(gpu_dev, n);
    test_expect_close(full, g, cpu, n, tol);
    free(g);
}

int test_cuda_ok(const char *name) {
    if (cuda_check(name) == 0) return 0;
    printf("FAIL cuda_%s: %s\n", name, dt_errmsg());
    cuda_tests_failed++;
    return -1;
}

int main(int argc, char **argv) {
    if (cuda_device_count() == 0) {
        printf("cuda: skipped: no CUDA device here (make test-cuda runs these on a GPU machine)\n");
        return 0;
    }
    if (cuda_init()) {
        printf("cuda: FAIL: %s\n", dt_errmsg());
        return 1;
    }
    printf("cuda: %s\n", cuda_device_name());
    /* an argument picks one group: elementwise, deltanet, attention, linear, quant, model */
    const char *only = argc > 1 ? argv[1] : "";
#define GROUP(name, fn) \
    if (fn && (!*only || !strcmp(only, name))) fn()
    GROUP("elementwise", cuda_tests_elementwise);
    GROUP("deltanet", cuda_tests_deltanet);
    GROUP("attention", cuda_tests_attention_loss);
    GROUP("linear", cuda_tests_linear);
    GROUP("quant", cuda_tests_quant);
    GROUP("model", cuda_tests_model);
    printf("cuda: %d passed, %d failed\n", cuda_tests_passed, cuda_tests_failed);
    return cuda_tests_failed ? 1 : 0;
}
