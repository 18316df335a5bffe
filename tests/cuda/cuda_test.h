/* Shared by the CUDA op tests: random data, device copies, and the comparison against the
 * CPU op (the reference) by relative error: max |gpu - cpu| / max |cpu|. */
#ifndef DT_CUDA_TEST_H
#define DT_CUDA_TEST_H

#include <stdint.h>

#include "deltatune/cuda_ops.h"

extern int cuda_tests_passed, cuda_tests_failed;

float test_urand(void);                       /* uniform in [-1, 1) */
float *test_rvec(int64_t n, float scale);     /* malloc'd, scale * urand() */
float *test_rvec_bf16(int64_t n, float scale);  /* the same, rounded to bf16 */
float *test_copy(const float *h, int64_t n);  /* malloc'd copy */
/* Rounds h (n floats) to bf16 in place, so the CPU reference sees what the GPU sees. */
void test_round_bf16(float *h, int64_t n);
/* Device copies (NULL on failure): fp32, or bf16 of h (round h first for a fair reference). */
float *test_dev_f32(const float *h, int64_t n);
dt_bf16 *test_dev_bf16(const float *h, int64_t n);
int32_t *test_dev_i32(const int32_t *h, int64_t n);
/* Host copies (malloc'd floats) of device arrays. */
float *test_host_f32(const float *d, int64_t n);
float *test_host_bf16(const dt_bf16 *d, int64_t n);
/* Passes when the relative error is at most tol and nothing is NaN; prints one line. */
void test_expect_close(const char *name, const float *gpu, const float *cpu, int64_t n, double tol);
/* The same for a device fp32 array, named "name: part". */
void test_expect_close_dev(const char *name, const char *part, const float *gpu_dev, const float *cpu, int64_t n,
                           double tol);
/* cuda_check; on failure prints FAIL name with the error and counts a failure. Returns 0 if fine. */
int test_cuda_ok(const char *name);

/* Each file of tests/cuda/ runs its tests from one of these; test_cuda.c calls those that are
 * linked in (weak, so tests/cuda/quick.sh can build one group alone). */
__attribute__((weak)) void cuda_tests_elementwise(void);
__attribute__((weak)) void cuda_tests_deltanet(void);
__attribute__((weak)) void cuda_tests_attention_loss(void);
__attribute__((weak)) void cuda_tests_linear(void);
__attribute__((weak)) void cuda_tests_quant(void);
__attribute__((weak)) void cuda_tests_model(void);

#endif
