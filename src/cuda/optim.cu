// The LoRA optimiser on the device: AdamW as src/train/optim.c computes it (double arithmetic per
// element, rounded once to fp32), and the sum of squares for the global gradient norm.
#include "cuda/cuda_internal.h"

namespace {

__global__ void adamw_kernel(float *p, float *g, float *m, float *v, bf16 *p16, int64_t n16, int64_t n, double decay,
                             double b1, double b2, double step_size, double bc2_sqrt, double eps, float grad_mul) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float gf = grad_mul == 1.0f ? g[i] : g[i] * grad_mul;  // clipping scales the fp32 gradient first
        double gi = gf;
        double mi = m[i] + (1.0 - b1) * (gi - m[i]);
        double vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        float mf = (float)mi, vf = (float)vi;
        m[i] = mf;
        v[i] = vf;
        double denom = sqrt((double)vf) / bc2_sqrt + eps;
        float pf = (float)((double)p[i] * decay - step_size * (double)mf / denom);
        p[i] = pf;
        if (i < n16) p16[i] = __float2bfloat16(pf);
        g[i] = 0.f;  // ready for the next step's accumulation
    }
}

__global__ void sum_squares_kernel(double *acc, const float *x, int64_t n) {
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    __shared__ double part[8];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) t += part[w];
        atomicAdd(acc, t);
    }
}

}  // namespace

extern "C" void adamw_update_cuda(float *p, float *g, float *m, float *v, dt_bf16 *p16, int64_t n16, int64_t n,
                                  int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                                  float grad_mul) {
    if (n <= 0) return;
    // the scalars exactly as adamw_update computes them
    double decay = 1.0 - lr * weight_decay;
    double step_size = lr / (1.0 - pow(beta1, (double)step));
    double bc2_sqrt = sqrt(1.0 - pow(beta2, (double)step));
    adamw_kernel<<<cuda_blocks(n, 256) < 4096 ? cuda_blocks(n, 256) : 4096, 256, 0, cuda_stream()>>>(
        p, g, m, v, (bf16 *)p16, n16, n, decay, beta1, beta2, step_size, bc2_sqrt, eps, grad_mul);
}

extern "C" void sum_squares_cuda(double *acc, const float *x, int64_t n) {
    if (n <= 0) return;
    unsigned b = cuda_blocks(n, 256);
    sum_squares_kernel<<<b < 1024 ? b : 1024, 256, 0, cuda_stream()>>>(acc, x, n);
}
