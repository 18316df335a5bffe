/* The CUDA backend's ops: the same families and semantics as ops.h (each tested against the
 * CPU op on random data by tests/cuda/test_cuda.c), on device pointers, fp32 for now.
 * Backward functions accumulate, as on the CPU. Errors are sticky until cuda_check(). */
#ifndef DELTATUNE_CUDA_OPS_H
#define DELTATUNE_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

/* Number of CUDA devices (0 without a driver or a GPU). */
int cuda_device_count(void);
/* The device's name, or "" */
const char *cuda_device_name(void);
int cuda_alloc(void **p, size_t bytes);
void cuda_free(void *p);
int cuda_upload(void *dst, const void *src, size_t bytes);
int cuda_download(void *dst, const void *src, size_t bytes);
int cuda_zero(void *p, size_t bytes);
/* Waits for the device and reports any error of the launches since the last check. */
int cuda_check(const char *what);

void rmsnorm1p_forward_cuda(float *y, const float *x, const float *w, int64_t rows, int D, float eps);
void rmsnorm1p_backward_cuda(float *dx, float *dw, const float *dy, const float *x, const float *w, int64_t rows,
                             int D, float eps);
void swiglu_forward_cuda(float *m, const float *gate, const float *up, int64_t n);
void swiglu_backward_cuda(float *dgate, float *dup, const float *dm, const float *gate, const float *up, int64_t n);

#endif
