// Device memory and error reporting for the CUDA backend.
#include <cuda_runtime.h>

extern "C" {
#include "deltatune/cuda_ops.h"
#include "deltatune/error.h"
}

extern "C" int cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: not an error here
        return 0;
    }
    return n;
}

extern "C" const char *cuda_device_name(void) {
    static cudaDeviceProp prop;
    return cudaGetDeviceProperties(&prop, 0) == cudaSuccess ? prop.name : "";
}

static int fail(cudaError_t e, const char *what, size_t bytes) {
    return dt_err("CUDA %s of %zu bytes: %s", what, bytes, cudaGetErrorString(e));
}

extern "C" int cuda_alloc(void **p, size_t bytes) {
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    return e == cudaSuccess ? 0 : fail(e, "allocation", bytes);
}

extern "C" void cuda_free(void *p) { cudaFree(p); }

extern "C" int cuda_upload(void *dst, const void *src, size_t bytes) {
    cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? 0 : fail(e, "upload", bytes);
}

extern "C" int cuda_download(void *dst, const void *src, size_t bytes) {
    cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? 0 : fail(e, "download", bytes);
}

extern "C" int cuda_zero(void *p, size_t bytes) {
    cudaError_t e = cudaMemset(p, 0, bytes);
    return e == cudaSuccess ? 0 : fail(e, "memset", bytes);
}

extern "C" int cuda_check(const char *what) {
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaGetLastError();
    return e == cudaSuccess ? 0 : dt_err("CUDA %s: %s", what, cudaGetErrorString(e));
}
