// SwiGLU, elementwise: 16-byte bf16 vectors (8 values) per thread when the pointers allow.
// Its backward can also take the down projection's LoRA part of dm (swiglu_backward_lora_cuda).
#include "cuda/cuda_internal.h"
#include "cuda/vec.cuh"


// The approximate reciprocal (about 1 ulp) instead of an IEEE division: these kernels are short
// enough that instruction count shows. Past x < -87 the sum overflows and sigmoid is 0.
static __device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// m [rows, I] compact, gate and up in rows ldg long; V divides I
template <int V>
__global__ void swiglu_fwd_kernel(bf16 *m, const bf16 *g, const bf16 *u, int64_t ldg, int64_t rows, int64_t I) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t i = i0; i < rows * I / V; i += stride) {
        int64_t e = i * V, t = e / I, o = t * ldg + (e - t * I);
        float a[V], b[V];
        ldv<V>(a, g + o);
        ldv<V>(b, u + o);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] = a[k] * sigmoid_f(a[k]) * b[k];
        stv<V>(m + e, a);
    }
}

// dgate = dm up silu'(gate), dup = dm silu(gate), silu'(x) = s (1 + x (1 - s))
static __device__ __forceinline__ void swiglu_grad(float &dg, float &du, float d, float g, float u) {
    float s = sigmoid_f(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
}

// [rows, I], dg and du in rows ldd long, g and u in rows ldg long; V divides I; dm fp32 or bf16
template <int V, typename DM>
__global__ void swiglu_bwd_kernel(bf16 *dg, bf16 *du, int64_t ldd, const DM *dm, const bf16 *g, const bf16 *u,
                                  int64_t ldg, int64_t rows, int64_t I) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    int64_t nv = rows * I / V;
    for (int64_t i = i0; i < nv; i += stride) {
        int64_t e = i * V, t = e / I, o = t * ldd + (e - t * I), og = t * ldg + (e - t * I);
        float a[V], b[V], d[V];
        ldv<V>(a, g + og);
        ldv<V>(b, u + og);
        ldv<V>(d, dm + e);
#pragma unroll
        for (int k = 0; k < V; k++) swiglu_grad(a[k], b[k], d[k], a[k], b[k]);
        stv<V>(dg + o, a);
        stv<V>(du + o, b);
    }
}

extern "C" void swiglu_forward_cuda(dt_bf16 *m, const dt_bf16 *gate, const dt_bf16 *up, int64_t ldg, int64_t rows,
                                    int64_t I) {
    int64_t n = rows * I;
    if (n <= 0) return;
    bf16 *mb = (bf16 *)m;
    const bf16 *gb = (const bf16 *)gate, *ub = (const bf16 *)up;
    if (I % 8 == 0 && ldg % 8 == 0 && aligned_to(m, 16) && aligned_to(gate, 16) && aligned_to(up, 16))
        swiglu_fwd_kernel<8><<<cuda_blocks(n / 8 + 1, 256), 256, 0, cuda_stream()>>>(mb, gb, ub, ldg, rows, I);
    else
        swiglu_fwd_kernel<1><<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(mb, gb, ub, ldg, rows, I);
}

template <typename DM>
static void swiglu_backward(bf16 *dg, bf16 *du, int64_t ldd, const DM *dm, const bf16 *g, const bf16 *u, int64_t ldg,
                            int64_t rows, int64_t I) {
    int64_t n = rows * I;
    if (I % 8 == 0 && ldd % 8 == 0 && ldg % 8 == 0 && aligned_to(dg, 16) && aligned_to(du, 16) && aligned_to(g, 16) &&
        aligned_to(u, 16) && aligned_to(dm, 16))
        swiglu_bwd_kernel<8><<<cuda_blocks(n / 8 + 1, 256), 256, 0, cuda_stream()>>>(dg, du, ldd, dm, g, u, ldg, rows,
                                                                                     I);
    else
        swiglu_bwd_kernel<1><<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(dg, du, ldd, dm, g, u, ldg, rows, I);
}

extern "C" void swiglu_backward_cuda(dt_bf16 *dgate, dt_bf16 *dup, int64_t ldd, const void *dm, cuda_dtype dmt,
                                     const dt_bf16 *gate, const dt_bf16 *up, int64_t ldg, int64_t rows, int64_t I) {
    if (rows <= 0 || I <= 0) return;
    bf16 *dgb = (bf16 *)dgate, *dub = (bf16 *)dup;
    const bf16 *gb = (const bf16 *)gate, *ub = (const bf16 *)up;
    if (dmt == CUDA_BF16) swiglu_backward(dgb, dub, ldd, (const bf16 *)dm, gb, ub, ldg, rows, I);
    else swiglu_backward(dgb, dub, ldd, (const float *)dm, gb, ub, ldg, rows, I);
}

// dm + g A, with g [rows, r] and A [r, I], then the backward as swiglu_bwd_kernel: LoRA's part of
// the down projection's input gradient, added here instead of by a product that writes and reads
// all of fp32 dm once more. A block owns LW_COLS columns (8 a thread) of a run of rows: the A slice
// [r][LW_COLS] in shared memory, read there once per row, and the g rows LW_ROWS at a time. The
// runs are as long as makes one wave of blocks that all stay resident: with a block per 32 rows,
// 0.8B's 512 blocks kept 13 warps an SM of the 24 that fit (ncu: 73 us, 54% of DRAM's rate), and
// 4B's 936 took a second, short wave (bwd.mlp 7.25 -> 7.10 ms a step at 0.8B, 39.0 -> 37.6 at 4B).
constexpr int LW_THREADS = 128, LW_COLS = 8 * LW_THREADS, LW_ROWS = 32, LW_MAX_RANK = 32;

template <typename DM>
__global__ void __launch_bounds__(LW_THREADS)
    swiglu_bwd_lora_kernel(bf16 *dg, bf16 *du, int64_t ldd, const DM *dm, const bf16 *gate, const bf16 *up,
                           int64_t ldg, int64_t rows, int64_t I, const bf16 *g, const bf16 *A, int r,
                           int64_t run) {
    extern __shared__ float4 lw_smem[];
    bf16 *As = reinterpret_cast<bf16 *>(lw_smem);             // [r][LW_COLS]
    float *gs = reinterpret_cast<float *>(As + r * LW_COLS);  // [LW_ROWS][r]
    int64_t c0 = (int64_t)blockIdx.x * LW_COLS, r0 = (int64_t)blockIdx.y * run, r1 = min(rows, r0 + run);
    for (int e = threadIdx.x; e < r * LW_THREADS; e += LW_THREADS) {
        int j = e / LW_THREADS;
        int64_t c = c0 + 8 * (e % LW_THREADS);
        uint4 v = c < I ? *reinterpret_cast<const uint4 *>(A + j * I + c) : make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4 *>(As + j * LW_COLS + 8 * (e % LW_THREADS)) = v;
    }
    int64_t c = c0 + 8 * threadIdx.x;
    for (int64_t t0 = r0; t0 < r1; t0 += LW_ROWS) {
        int n = (int)min((int64_t)LW_ROWS, r1 - t0);
        __syncthreads();  // the last rows' g read by all
        for (int e = threadIdx.x; e < n * r; e += LW_THREADS) gs[e] = ld(g + (t0 + e / r) * r + e % r);
        __syncthreads();
        if (c >= I) continue;
        // each row's three loads issued a row ahead: a row's wait for memory overlaps the one before's work
        float a[8], b[8], d[8], an[8], bn[8], dn[8];
        ldv<8>(d, dm + t0 * I + c);
        ldv<8>(a, gate + t0 * ldg + c);
        ldv<8>(b, up + t0 * ldg + c);
        for (int i = 0; i < n; i++) {
            int64_t t = t0 + i;
            if (i + 1 < n) {
                ldv<8>(dn, dm + (t + 1) * I + c);
                ldv<8>(an, gate + (t + 1) * ldg + c);
                ldv<8>(bn, up + (t + 1) * ldg + c);
            }
            for (int j = 0; j < r; j++) {
                float gj = gs[i * r + j], w[8];
                ldv<8>(w, As + j * LW_COLS + 8 * threadIdx.x);
#pragma unroll
                for (int k = 0; k < 8; k++) d[k] = fmaf(gj, w[k], d[k]);
            }
#pragma unroll
            for (int k = 0; k < 8; k++) swiglu_grad(a[k], b[k], d[k], a[k], b[k]);
            stv<8>(dg + t * ldd + c, a);
            stv<8>(du + t * ldd + c, b);
#pragma unroll
            for (int k = 0; k < 8; k++) a[k] = an[k], b[k] = bn[k], d[k] = dn[k];
        }
    }
}

template <typename DM>
static void launch_bwd_lora(bf16 *dg, bf16 *du, int64_t ldd, const DM *dm, const bf16 *gate, const bf16 *up,
                            int64_t ldg, int64_t rows, int64_t I, const bf16 *g, const bf16 *A, int r) {
    size_t smem = sizeof(bf16) * r * LW_COLS + sizeof(float) * LW_ROWS * r;
    cudaFuncSetAttribute(swiglu_bwd_lora_kernel<DM>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, swiglu_bwd_lora_kernel<DM>, LW_THREADS, smem);
    int64_t cols = (I + LW_COLS - 1) / LW_COLS, wave = (int64_t)(per_sm > 0 ? per_sm : 1) * cuda_sm_count();
    int64_t runs = wave / cols < 1 ? 1 : wave / cols;
    runs = runs < rows ? runs : rows;
    int64_t run = (rows + runs - 1) / runs;
    dim3 grid((unsigned)cols, (unsigned)((rows + run - 1) / run));
    swiglu_bwd_lora_kernel<DM><<<grid, LW_THREADS, smem, cuda_stream()>>>(dg, du, ldd, dm, gate, up, ldg, rows, I, g,
                                                                          A, r, run);
}

extern "C" void swiglu_backward_lora_cuda(dt_bf16 *dgate, dt_bf16 *dup, int64_t ldd, void *dm, cuda_dtype dmt,
                                          const dt_bf16 *gate, const dt_bf16 *up, int64_t ldg, int64_t rows, int64_t I,
                                          const dt_bf16 *g, const dt_bf16 *A, int r) {
    if (rows <= 0 || I <= 0) return;
    bool fused = g && r > 0 && r <= LW_MAX_RANK && I % 8 == 0 && ldd % 8 == 0 && ldg % 8 == 0 &&
                 aligned_to(dgate, 16) && aligned_to(dup, 16) && aligned_to(gate, 16) && aligned_to(up, 16) &&
                 aligned_to(dm, 16) && aligned_to(A, 16);
    bf16 *dgb = (bf16 *)dgate, *dub = (bf16 *)dup;
    const bf16 *gb = (const bf16 *)gate, *ub = (const bf16 *)up, *g16 = (const bf16 *)g, *A16 = (const bf16 *)A;
    if (fused) {
        if (dmt == CUDA_BF16) launch_bwd_lora(dgb, dub, ldd, (const bf16 *)dm, gb, ub, ldg, rows, I, g16, A16, r);
        else launch_bwd_lora(dgb, dub, ldd, (const float *)dm, gb, ub, ldg, rows, I, g16, A16, r);
        return;
    }
    // otherwise the LoRA part by a product into dm, then the plain backward
    if (g && r > 0)
        cuda_gemm(false, false, (int)rows, (int)I, r, 1.f, g, r, 0, A, I, 0, 1.f, dm,
                  dmt == CUDA_BF16 ? CUDA_R_16BF : CUDA_R_32F, I, 0, 1);
    swiglu_backward_cuda(dgate, dup, ldd, dm, dmt, gate, up, ldg, rows, I);
}
