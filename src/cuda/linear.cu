// The frozen linear with its optional LoRA (PEFT semantics), bf16 GEMMs through cuBLAS with
// fp32 accumulation. Everything here is row-major; cuBLAS is column-major, so a row-major
// C[m, n] = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: the operands
// swap places, m and n swap, and each keeps its own transpose flag and leading dimension.
#include <stdio.h>

#include "cuda/cuda_internal.h"

extern "C" {
#include "deltatune/error.h"
}

// cuBLAS's workspace, from cuda_alloc so the memory counter sees it; made once and kept.
// 32 MiB is what cuBLAS asks for on Hopper; without it larger split-K choices are refused.
static const size_t WORKSPACE_BYTES = (size_t)32 << 20;
static void *workspace;

static void ensure_workspace(void) {
    if (workspace) return;
    if (cuda_alloc(&workspace, WORKSPACE_BYTES)) {
        workspace = NULL;  // cuBLAS keeps its own default pool then
        return;
    }
    if (cublasSetWorkspace(cuda_cublas(), workspace, WORKSPACE_BYTES) != CUBLAS_STATUS_SUCCESS) {
        cuda_free(workspace);
        workspace = NULL;
    }
}

// cuBLAS statuses never reach cudaGetLastError, so cuda_check cannot see them: record the
// message (dt_errmsg) and say it once on stderr, since the ops themselves return nothing.
static void check_cublas(cublasStatus_t s, const char *what) {
    static int told;
    if (s == CUBLAS_STATUS_SUCCESS) return;
    dt_err("cuBLAS %s: %s", what, cublasGetStatusString(s));
    if (!told++) fprintf(stderr, "deltatune: cuBLAS %s failed: %s\n", what, cublasGetStatusString(s));
}

// Row-major C[m, n] (ct: bf16 or fp32) = alpha op(A) op(B) + beta C; A, B bf16.
// lda, ldb, ldc: the row-major leading dimensions (elements per stored row).
static void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16 *A, int64_t lda,
                    const bf16 *B, int64_t ldb, float beta, void *C, cudaDataType_t ct, int64_t ldc,
                    const char *what) {
    if (m <= 0 || n <= 0) return;
    check_cublas(cublasGemmEx(cuda_cublas(), tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                              (int)n, (int)m, (int)k, &alpha, B, CUDA_R_16BF, (int)ldb, A, CUDA_R_16BF,
                              (int)lda, &beta, C, ct, (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 what);
}

// cuBLAS is column-major: a row-major matrix is its transpose there, so C = op(A) op(B) is
// C^T = op(B)^T op(A)^T with the operands swapped and the same transpose flags.
void cuda_gemm(bool ta, bool tb, int M, int N, int K, float alpha, const void *A, long long lda, long long sA,
               const void *B, long long ldb, long long sB, float beta, void *C, cudaDataType ct, long long ldc,
               long long sC, int batch) {
    if (M <= 0 || N <= 0) return;
    ensure_workspace();
    cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    check_cublas(cublasGemmStridedBatchedEx(cuda_cublas(), ob, oa, N, M, K, &alpha, B, CUDA_R_16BF, (int)ldb, sB, A,
                                            CUDA_R_16BF, (int)lda, sA, &beta, C, ct, (int)ldc, sC, batch,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "batched product");
}

// ---- the CPU's hash dropout (ops/linear.c), bit for bit
// It keeps element idx when u = (z >> 11) 2^-53 >= p (u compared in double against the
// float p). Both sides are exact multiples of 2^-53, so the test is the integer
// (z >> 11) >= ceil(p 2^53): no doubles on the device.
struct dropout_mask {
    uint64_t seed, threshold;
    int64_t base;      // the element index of this call's first element (row0 * in)
    float keep_scale;  // 1 / (1 - p), as the CPU computes it in float
};

static dropout_mask make_mask(const cuda_linear *l) {
    dropout_mask m;
    m.seed = l->dropout_seed;
    m.base = l->row0 * l->in;
    double t = (double)l->dropout * 9007199254740992.0;
    uint64_t c = (uint64_t)t;
    m.threshold = (double)c < t ? c + 1 : c;
    float one = 1;
    m.keep_scale = one / (one - l->dropout);
    return m;
}

static __device__ __forceinline__ float dropout_factor(const dropout_mask &m, int64_t idx) {
    uint64_t z = m.seed + 0x9e3779b97f4a7c15ull * (uint64_t)(m.base + idx + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (z >> 11) < m.threshold ? 0.f : m.keep_scale;
}

// xd = drop(x), the A branch's input, stored bf16 for the GEMMs that read it. The hash's
// 64-bit multiplies cost more than the memory traffic, so 8 elements a thread with 16-byte
// accesses keep the loads in flight while it computes.
// x's rows are ldx long; xd's in (compact): element i of the mask is row i / in, column i % in.
__global__ void dropout_copy_kernel(bf16 *xd, const bf16 *x, int64_t n, int64_t in, int64_t ldx, dropout_mask m) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        st(xd + i, ld(x + i / in * ldx + i % in) * dropout_factor(m, i));
}

__global__ void dropout_copy8_kernel(bf16 *xd, const bf16 *x, int64_t n8, int64_t in, int64_t ldx, dropout_mask m) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t e = 8 * i;
        uint4 raw = *(const uint4 *)(x + e / in * ldx + e % in);
        __nv_bfloat162 *h = (__nv_bfloat162 *)&raw;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            f.x *= dropout_factor(m, e + 2 * k);
            f.y *= dropout_factor(m, e + 2 * k + 1);
            h[k] = __float22bfloat162_rn(f);
        }
        ((uint4 *)xd)[i] = raw;
    }
}

// dx[t, i] (+)= factor(t in + i) sum_j g[t, j] A[j, i] (added when acc, else written): LoRA's
// part of dx through the dropout mask (A's rows lda long). With rank r small this is memory-bound on
// dx: one pass over it, rather than a GEMM into scratch and a masking pass. V consecutive columns
// per thread. (Without dropout, cuBLAS's product measured a little faster than this kernel, so it
// keeps that.)
template <int V>
__global__ void lora_dx_dropout_kernel(float *dx, bool acc, const bf16 *g, const bf16 *A, int64_t lda, int64_t in,
                                       int r, dropout_mask m) {
    extern __shared__ float gs[];
    int64_t t = blockIdx.x;
    for (int j = threadIdx.x; j < r; j += blockDim.x) gs[j] = ld(g + t * r + j);
    __syncthreads();
    int64_t i0 = ((int64_t)blockIdx.y * blockDim.x + threadIdx.x) * V;
    if (i0 >= in) return;
    float *d = dx + t * in + i0;
    int64_t idx = t * in + i0;
    if constexpr (V == 4) {
        float4 sum = make_float4(0, 0, 0, 0);
        for (int j = 0; j < r; j++) {
            float gj = gs[j];
            uint2 raw = *(const uint2 *)(A + (int64_t)j * lda + i0);  // 4 bf16
            float2 lo = __bfloat1622float2(*(const __nv_bfloat162 *)&raw.x);
            float2 hi = __bfloat1622float2(*(const __nv_bfloat162 *)&raw.y);
            sum.x += gj * lo.x;
            sum.y += gj * lo.y;
            sum.z += gj * hi.x;
            sum.w += gj * hi.y;
        }
        float4 o = acc ? *(float4 *)d : make_float4(0, 0, 0, 0);
        o.x += sum.x * dropout_factor(m, idx);
        o.y += sum.y * dropout_factor(m, idx + 1);
        o.z += sum.z * dropout_factor(m, idx + 2);
        o.w += sum.w * dropout_factor(m, idx + 3);
        *(float4 *)d = o;
    } else {
        float sum = 0;
        for (int j = 0; j < r; j++) sum += gs[j] * ld(A + (int64_t)j * lda + i0);
        *d = (acc ? *d : 0.f) + sum * dropout_factor(m, idx);
    }
}

static void lora_dx_dropout(float *dx, bool acc, const bf16 *g, const bf16 *A, int64_t lda, int64_t T, int64_t in,
                            int r, dropout_mask m) {
    size_t smem = sizeof(float) * r;
    // float4 / 4-bf16 accesses need every row 16 / 8-byte aligned
    if (in % 4 == 0 && lda % 4 == 0 && (uintptr_t)dx % 16 == 0 && (uintptr_t)A % 8 == 0) {
        dim3 grid((unsigned)T, (unsigned)((in / 4 + 127) / 128));
        lora_dx_dropout_kernel<4><<<grid, 128, smem, cuda_stream()>>>(dx, acc, g, A, lda, in, r, m);
    } else {
        dim3 grid((unsigned)T, (unsigned)((in + 127) / 128));
        lora_dx_dropout_kernel<1><<<grid, 128, smem, cuda_stream()>>>(dx, acc, g, A, lda, in, r, m);
    }
}

// ---- scratch: [u: T r bf16 | g: T r bf16 | xd: T in bf16, with dropout], each region 256-byte aligned
static size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

extern "C" size_t linear_scratch_bytes_cuda(int64_t T, int64_t in, int rank, int dropout) {
    if (rank <= 0 || T <= 0) return 0;
    return 2 * align256((size_t)T * rank * sizeof(bf16)) + (dropout ? align256((size_t)T * in * sizeof(bf16)) : 0);
}

struct lora_scratch {
    bf16 *xd, *u, *g;
};

static lora_scratch carve(void *scratch, int64_t T, int rank) {
    char *p = (char *)scratch;
    lora_scratch s;
    s.u = (bf16 *)p;
    p += align256((size_t)T * rank * sizeof(bf16));
    s.g = (bf16 *)p;
    p += align256((size_t)T * rank * sizeof(bf16));
    s.xd = (bf16 *)p;
    return s;
}

static bool has_lora(const cuda_linear *l) { return l->rank > 0 && l->A && l->B; }

// The lengths of the rows of A, of B (a wide base's), of W, and of a part's y or dy.
static int64_t a_ld(const cuda_linear *l) { return l->ld_a > 0 ? l->ld_a : l->in; }
static int64_t b_ld(const cuda_linear *l) { return l->bcol > 0 ? l->ldw : l->rank; }
static int64_t base_ld(const cuda_linear *l) { return l->wq.bits <= 0 && l->ldw > 0 ? l->ldw : l->in; }
static int64_t part_ld(const cuda_linear_part *p) { return p->ld > 0 ? p->ld : p->l->out; }

// The base weight as bf16: W itself, or a quantized base dequantized into the shared wbuf.
static const bf16 *base_weight(const cuda_linear *l) {
    if (l->wq.bits <= 0) return (const bf16 *)l->W;
    dequantize_rows_cuda(l->wbuf, &l->wq, 0, l->out);
    return (const bf16 *)l->wbuf;
}

// The A branch's input: x itself, or its dropped-out copy in scratch (compact: rows in long).
static const bf16 *lora_input(const cuda_linear *l, const bf16 *x, int64_t ldx, int64_t T, bf16 *xd, int64_t *lda) {
    *lda = ldx;
    if (l->dropout <= 0) return x;
    int64_t n = T * l->in;
    if (l->in % 8 == 0 && ldx % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)xd % 16 == 0)
        dropout_copy8_kernel<<<cuda_blocks(n / 8, 256), 256, 0, cuda_stream()>>>(xd, x, n / 8, l->in, ldx,
                                                                                  make_mask(l));
    else
        dropout_copy_kernel<<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(xd, x, n, l->in, ldx, make_mask(l));
    *lda = l->in;
    return xd;
}

// The rank a member adds to its group's u and g: its LoRA's, or 0.
static int lora_rank(const cuda_linear *l) { return has_lora(l) ? l->rank : 0; }

static int group_rank(const cuda_linear_part *p, int n) {
    int R = 0;
    for (int i = 0; i < n; i++) R += lora_rank(p[i].l);
    return R;
}

// Whether the group's LoRA members can run their A products as one, on the stacked A [R, in]:
// two or more of them (one, with one_ok), one scale, no dropout (each member's mask differs), each
// A (and dA, when grads) right after the one before, A's rows of one length.
static bool stacked(const cuda_linear_part *p, int n, bool grads, bool one_ok = false) {
    const cuda_linear *prev = NULL;
    int members = 0;
    for (int i = 0; i < n; i++) {
        const cuda_linear *l = p[i].l;
        if (!has_lora(l)) continue;
        if (l->dropout > 0) return false;
        if (prev) {
            if (l->in != prev->in || l->scale != prev->scale || a_ld(l) != a_ld(prev) ||
                l->A != prev->A + (int64_t)prev->rank * a_ld(prev))
                return false;
            int64_t step = (int64_t)prev->rank * prev->in;
            if (grads && (!l->dA != !prev->dA || (l->dA && l->dA != prev->dA + step))) return false;
        }
        prev = l;
        members++;
    }
    return members > (one_ok ? 0 : 1);
}

// The first member with a LoRA (the stacked A starts at its A).
static const cuda_linear *first_lora(const cuda_linear_part *p, int n) {
    for (int i = 0; i < n; i++)
        if (has_lora(p[i].l)) return p[i].l;
    return NULL;
}

// One member's products once its u (rows ldu long) is in place. A wide base whose B columns meet
// u in x's rows: y (+)= [x | .. | u] [W | 0 | B]^T, one product; otherwise y (+)= u B^T, then the
// base with beta 1.
static void member_forward(const cuda_linear_part *m, const bf16 *x, int64_t ldx, int64_t T, const bf16 *u,
                           int64_t ldu) {
    const cuda_linear *l = m->l;
    cudaDataType_t ct = m->yt == CUDA_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    float beta = m->accumulate ? 1.f : 0.f;
    if (has_lora(l) && l->bcol > 0 && l->wq.bits <= 0 && ldu == ldx && u == x + l->bcol) {
        gemm_rm(false, true, T, l->out, l->bcol + l->rank, 1.f, x, ldx, (const bf16 *)l->W, l->ldw, beta, m->y, ct,
                part_ld(m), "linear forward (wide)");
        return;
    }
    if (has_lora(l)) {
        // LoRA first, then the base product with beta = 1: its epilogue reads y while the tensor
        // cores are busy, where the other order costs a whole extra read and write of y
        // (measured 0.109 against 0.120 ms at 4096 x 1024 -> 6144)
        gemm_rm(false, true, T, l->out, l->rank, 1.f, u, ldu, (const bf16 *)l->B, b_ld(l), beta, m->y, ct,
                part_ld(m), "lora up");
        beta = 1.f;
    }
    // y = x W^T (+ y): the residual add for free when accumulating into the fp32 stream
    gemm_rm(false, true, T, l->out, l->in, 1.f, x, ldx, base_weight(l), base_ld(l), beta, m->y, ct, part_ld(m),
            "linear forward");
}

// The group's trailing run of members whose forward is one product (linear_group_forward_cuda):
// their bf16 bases in one block (rows of one length, each member's after the one before), their y
// in one buffer (each member's columns after the one before, one type) and each LoRA's u in x's
// rows where its B's columns are. Returns the run's first member (n: no run of two or more);
// *K: the columns of x's rows the product reads, *cols: the run's outputs.
static int forward_run(const cuda_linear_part *p, int n, const bf16 *x, int64_t ldx, const bf16 *u, int64_t ldu,
                       int64_t *K, int64_t *cols) {
    if (ldu != ldx) return n;
    int first = n;
    for (int i = n - 1; i >= 0; i--) {
        const cuda_linear *l = p[i].l;
        if (l->out <= 0 || l->wq.bits > 0 || l->ldw <= 0 || (has_lora(l) && l->bcol <= 0)) break;
        if (i < n - 1) {  // right before member i + 1, in the block and in y
            const cuda_linear_part *q = &p[i + 1];
            int64_t esz = p[i].yt == CUDA_BF16 ? 2 : 4;
            if (l->ldw != q->l->ldw || l->in != q->l->in || part_ld(&p[i]) != part_ld(q) || p[i].yt != q->yt ||
                p[i].accumulate != q->accumulate || q->l->W != l->W + l->out * l->ldw ||
                (const char *)q->y != (const char *)p[i].y + l->out * esz)
                break;
        }
        first = i;
    }
    if (n - first < 2) return n;
    int64_t c = 0;  // u's column of each LoRA: after those of all the members before it
    for (int i = 0; i < first; i++) c += lora_rank(p[i].l);
    *K = p[first].l->in;
    *cols = 0;
    for (int i = first; i < n; c += lora_rank(p[i].l), i++) {
        const cuda_linear *l = p[i].l;
        if (has_lora(l)) {
            if (u + c != x + l->bcol) return n;
            *K = l->bcol + l->rank > *K ? l->bcol + l->rank : *K;
        }
        *cols += l->out;
    }
    return part_ld(&p[first]) >= *cols ? first : n;
}

extern "C" void linear_group_forward_cuda(const cuda_linear_part *p, int n, const dt_bf16 *x_, int64_t ldx, int64_t T,
                                          void *scratch, dt_bf16 *u_, int64_t ldu) {
    if (T <= 0 || n <= 0) return;
    ensure_workspace();
    const bf16 *x = (const bf16 *)x_;
    int R = group_rank(p, n);
    lora_scratch s = carve(scratch, T, R);
    // u = scale drop(x) A^T for every member, side by side in [T, R], rounded once to bf16 to feed
    // the next product (and kept for the backward where it says where)
    bf16 *u = u_ ? (bf16 *)u_ : s.u;
    if (!u_) ldu = R;
    if (stacked(p, n, false)) {
        const cuda_linear *l = first_lora(p, n);
        gemm_rm(false, true, T, R, l->in, l->scale, x, ldx, (const bf16 *)l->A, a_ld(l), 0.f, u, CUDA_R_16BF, ldu,
                "lora down (stacked)");
    } else {
        for (int i = 0, c = 0; i < n; c += lora_rank(p[i].l), i++) {
            const cuda_linear *l = p[i].l;
            if (!has_lora(l)) continue;
            int64_t lda;
            const bf16 *xa = lora_input(l, x, ldx, T, s.xd, &lda);
            gemm_rm(false, true, T, l->rank, l->in, l->scale, xa, lda, (const bf16 *)l->A, a_ld(l), 0.f, u + c,
                    CUDA_R_16BF, ldu, "lora down");
        }
    }
    int64_t K = 0, cols = 0;
    int run = forward_run(p, n, x, ldx, u, ldu, &K, &cols);
    for (int i = 0, c = 0; i < run; c += lora_rank(p[i].l), i++)
        if (p[i].l->out > 0) member_forward(&p[i], x, ldx, T, u + c, ldu);
    if (run < n) {
        // [y_run .. y_n] = [x | u] [W_run | 0 | B_run ..; ..; W_n | .. B_n]^T: the block's zeros keep
        // each member's rows off the other LoRAs' u
        const cuda_linear_part *r = &p[run];
        gemm_rm(false, true, T, cols, K, 1.f, x, ldx, (const bf16 *)r->l->W, r->l->ldw, r->accumulate ? 1.f : 0.f,
                r->y, r->yt == CUDA_BF16 ? CUDA_R_16BF : CUDA_R_32F, part_ld(r), "linear forward (one for the run)");
    }
}

extern "C" void linear_forward_cuda(void *y, cuda_dtype yt, int accumulate, const dt_bf16 *x, const cuda_linear *l,
                                    int64_t T, void *scratch, dt_bf16 *u_keep) {
    cuda_linear_part p = {y, yt, accumulate, NULL, l, 0};
    linear_group_forward_cuda(&p, 1, x, l->in, T, scratch, u_keep, lora_rank(l));
}

// A member's whole LoRA backward on its own (with its own dropout mask): dB += dy^T u, g = scale
// dy B (into s.g; also when want_g), dA += g^T drop(x), dx (+)= the mask times g A. u: kept (rows
// ldu long) or NULL (recomputed). Returns whether it wrote dx.
static bool member_lora_backward(float *dx, bool acc, const bf16 *dy, int64_t ldy, const bf16 *x, int64_t ldx,
                                 const cuda_linear *l, int64_t T, lora_scratch s, const bf16 *u, int64_t ldu,
                                 bool want_g = false) {
    int r = l->rank;
    int64_t in = l->in, out = l->out, lda = ldx;
    const bf16 *A = (const bf16 *)l->A, *B = (const bf16 *)l->B;
    if (!(l->dA || l->dB || dx || want_g)) return false;
    const bf16 *xa = l->dA || l->dB ? lora_input(l, x, ldx, T, s.xd, &lda) : x;
    if (l->dB) {
        // dB += scale dy^T u, with the forward's u or u recomputed (with the same mask)
        if (!u) {
            gemm_rm(false, true, T, r, in, l->scale, xa, lda, A, a_ld(l), 0.f, s.u, CUDA_R_16BF, r,
                    "lora down (recompute)");
            u = s.u;
            ldu = r;
        }
        gemm_rm(true, false, out, r, T, 1.f, dy, ldy, u, ldu, 1.f, l->dB, CUDA_R_32F, r, "lora dB");
    }
    if (!l->dA && !dx && !want_g) return false;
    // g = scale dy B: the gradient of u before its scale, scaled once here for dA and dx
    gemm_rm(false, false, T, r, out, l->scale, dy, ldy, B, b_ld(l), 0.f, s.g, CUDA_R_16BF, r, "lora dy B");
    if (l->dA) gemm_rm(true, false, r, in, T, 1.f, s.g, r, xa, lda, 1.f, l->dA, CUDA_R_32F, in, "lora dA");
    if (!dx) return false;
    if (l->dropout > 0) lora_dx_dropout(dx, acc, s.g, A, a_ld(l), T, in, r, make_mask(l));
    else gemm_rm(false, false, T, in, r, 1.f, s.g, r, A, a_ld(l), acc ? 1.f : 0.f, dx, CUDA_R_32F, in, "lora dx");
    return true;
}

// The group's trailing run of members whose backward, with the LoRAs' part of dx, is one product
// over [dy | g] (linear_group_backward_cuda): their bf16 bases in one block (rows of one length,
// each member's right after the one before, then the group's stacked A), their dy in one buffer
// (each member's columns after the one before) whose rows have room after them for the group's g,
// and the group's LoRAs stacked (stacked, one allowed). Returns the run's first member (n: none);
// *cols: the run's dy columns.
static int backward_run(const cuda_linear_part *p, int n, int R, int64_t *cols) {
    const cuda_linear *last = p[n - 1].l, *a0 = first_lora(p, n);
    if (R <= 0 || !stacked(p, n, true, true) || last->ldw <= 0 || last->wq.bits > 0 || last->out <= 0 ||
        a0->A != last->W + last->out * last->ldw || a_ld(a0) != last->ldw)
        return n;
    int first = n - 1;
    *cols = last->out;
    for (int i = n - 2; i >= 0; i--) {
        const cuda_linear *l = p[i].l;
        const cuda_linear_part *q = &p[i + 1];
        if (l->out <= 0 || l->wq.bits > 0 || l->ldw != last->ldw || l->in != last->in ||
            part_ld(&p[i]) != part_ld(q) || q->l->W != l->W + l->out * l->ldw || q->dy != p[i].dy + l->out)
            break;
        first = i;
        *cols += l->out;
    }
    return part_ld(&p[first]) >= *cols + R ? first : n;
}

// Whether every member has a LoRA of one shape, each dy and dB right after the one before (and so
// each u, g in its columns): their dB products as one batched product.
static bool db_batched(const cuda_linear_part *p, int n) {
    if (n < 2) return false;
    for (int i = 0; i < n; i++) {
        const cuda_linear *l = p[i].l, *l0 = p[0].l;
        if (!has_lora(l) || !l->dB || l->out != l0->out || l->rank != l0->rank || part_ld(&p[i]) != part_ld(&p[0]) ||
            p[i].dy != p[0].dy + i * l0->out || l->dB != l0->dB + i * l0->out * l0->rank)
            return false;
    }
    return true;
}

// Whether every LoRA's B is in the block's rows at its u's column (bcol), all the members' dy side
// by side and their bases one after another in the block: then the block's columns from the first
// LoRA's bcol on, over all the members' rows, are the LoRAs' B side by side, zeros elsewhere, and
// g = scale [dy_1 .. dy_n] [those columns] is one product.
static bool g_in_block(const cuda_linear_part *p, int n, const cuda_linear *l0) {
    for (int i = 0, c = 0; i < n; c += lora_rank(p[i].l), i++) {
        const cuda_linear *l = p[i].l;
        if (l->out <= 0 || l->wq.bits > 0 || l->ldw <= 0 || l->ldw != p[0].l->ldw ||
            part_ld(&p[i]) != part_ld(&p[0]) || (has_lora(l) && (l->bcol <= 0 || l->bcol != l0->bcol + c)))
            return false;
        if (i > 0 && (l->W != p[i - 1].l->W + p[i - 1].l->out * l->ldw || p[i].dy != p[i - 1].dy + p[i - 1].l->out))
            return false;
    }
    return true;
}

// The stacked LoRAs' backward but their part of dx: dB += dy^T u per member (u: the forward's, or
// recomputed at once), g = scale dy B into g's columns (rows ldg long) where dA or dx want it, then
// every member's dA += g^T x in one product on the stacked dA.
static void stacked_lora_backward(const cuda_linear_part *p, int n, int R, const bf16 *x, int64_t ldx, int64_t T,
                                  lora_scratch s, const bf16 *u, int64_t ldu, bf16 *g, int64_t ldg, bool want_dx) {
    const cuda_linear *l0 = first_lora(p, n);
    int64_t in = l0->in;
    bool want_db = false, want_g = want_dx || l0->dA;
    for (int i = 0; i < n; i++) want_db |= has_lora(p[i].l) && p[i].l->dB;
    if (want_db && !u) {  // every member's u at once, as the forward made them
        gemm_rm(false, true, T, R, in, l0->scale, x, ldx, (const bf16 *)l0->A, a_ld(l0), 0.f, s.u, CUDA_R_16BF, R,
                "lora down (stacked, recompute)");
        u = s.u;
        ldu = R;
    }
    bool db_one = db_batched(p, n), g_one = want_g && g_in_block(p, n, l0);
    if (db_one) {
        const cuda_linear *m = p[0].l;
        cuda_gemm(true, false, (int)m->out, m->rank, (int)T, 1.f, p[0].dy, part_ld(&p[0]), m->out, u, ldu, m->rank,
                  1.f, m->dB, CUDA_R_32F, m->rank, m->out * m->rank, n);
    }
    if (g_one) {
        int64_t cols = 0;
        for (int i = 0; i < n; i++) cols += p[i].l->out;
        gemm_rm(false, false, T, R, cols, l0->scale, (const bf16 *)p[0].dy, part_ld(&p[0]),
                (const bf16 *)p[0].l->W + l0->bcol, p[0].l->ldw, 0.f, g, CUDA_R_16BF, ldg, "lora dy B (one)");
    }
    for (int i = 0, c = 0; i < n; c += lora_rank(p[i].l), i++) {
        const cuda_linear *l = p[i].l;
        if (!has_lora(l)) continue;
        const bf16 *dy = (const bf16 *)p[i].dy;
        int64_t ldy = part_ld(&p[i]);
        if (l->dB && !db_one)
            gemm_rm(true, false, l->out, l->rank, T, 1.f, dy, ldy, u + c, ldu, 1.f, l->dB, CUDA_R_32F, l->rank,
                    "lora dB");
        if (want_g && !g_one)
            gemm_rm(false, false, T, l->rank, l->out, l->scale, dy, ldy, (const bf16 *)l->B, b_ld(l), 0.f, g + c,
                    CUDA_R_16BF, ldg, "lora dy B");
    }
    if (l0->dA) gemm_rm(true, false, R, in, T, 1.f, g, ldg, x, ldx, 1.f, l0->dA, CUDA_R_32F, in, "lora dA (stacked)");
}

// dx (+)= dy W, member by member (dx NULL: nothing); returns whether dx has been written.
static bool bases_backward(float *dx, bool acc, const cuda_linear_part *p, int n, int64_t T) {
    for (int i = 0; dx && i < n; i++) {
        const cuda_linear *l = p[i].l;
        if (l->out <= 0) continue;
        gemm_rm(false, false, T, l->in, l->out, 1.f, (const bf16 *)p[i].dy, part_ld(&p[i]), base_weight(l),
                base_ld(l), acc ? 1.f : 0.f, dx, CUDA_R_32F, l->in, "linear backward");
        acc = true;
    }
    return acc;
}

extern "C" void linear_group_backward_cuda(float *dx, int accumulate, const cuda_linear_part *p, int n,
                                           const dt_bf16 *x_, int64_t ldx, int64_t T, void *scratch,
                                           const dt_bf16 *u_, int64_t ldu) {
    if (T <= 0 || n <= 0) return;
    ensure_workspace();
    const bf16 *x = (const bf16 *)x_, *u = (const bf16 *)u_;
    int R = group_rank(p, n);
    lora_scratch s = carve(scratch, T, R);
    bool acc = accumulate != 0;  // dx's, until something has been written to it
    int64_t cols = 0;
    int run = backward_run(p, n, R, &cols);
    if (run < n) {
        // dx (+)= [dy_run .. dy_n | g] [W_run; ..; W_n; A] after the members before the run: their
        // base products, the LoRAs' part of dx and the run's as one product, g written into the
        // run's dy rows after its members'
        const cuda_linear_part *r = &p[run];
        stacked_lora_backward(p, n, R, x, ldx, T, s, u, ldu, (bf16 *)r->dy + cols, part_ld(r), dx != NULL);
        acc = bases_backward(dx, acc, p, run, T);
        if (dx) gemm_rm(false, false, T, r->l->in, cols + R, 1.f, (const bf16 *)r->dy, part_ld(r),
                        (const bf16 *)r->l->W, r->l->ldw, acc ? 1.f : 0.f, dx, CUDA_R_32F, r->l->in,
                        "linear backward (with the LoRAs)");
        return;
    }
    // LoRA's part of dx first, so that the base products below add onto it in their epilogue
    // while the tensor cores are busy (as in the forward), and a dx that is not accumulated into
    // needs no zeroing pass
    if (stacked(p, n, true)) {
        const cuda_linear *l0 = first_lora(p, n);
        stacked_lora_backward(p, n, R, x, ldx, T, s, u, ldu, s.g, R, dx != NULL);
        if (dx) {
            gemm_rm(false, false, T, l0->in, R, 1.f, s.g, R, (const bf16 *)l0->A, a_ld(l0), acc ? 1.f : 0.f, dx,
                    CUDA_R_32F, l0->in, "lora dx (stacked)");
            acc = true;
        }
    } else {
        for (int i = 0, c = 0; i < n; c += lora_rank(p[i].l), i++) {
            const cuda_linear *l = p[i].l;
            if (has_lora(l) && member_lora_backward(dx, acc, (const bf16 *)p[i].dy, part_ld(&p[i]), x, ldx, l, T, s,
                                                    u ? u + c : NULL, ldu))
                acc = true;
        }
    }
    bases_backward(dx, acc, p, n, T);
}

extern "C" void linear_backward_cuda(float *dx, int accumulate, const dt_bf16 *dy, int64_t ldy, const dt_bf16 *x,
                                     const cuda_linear *l, int64_t T, void *scratch, const dt_bf16 *u_kept) {
    cuda_linear_part p = {NULL, CUDA_F32, 0, dy, l, ldy};
    linear_group_backward_cuda(dx, accumulate, &p, 1, x, l->in, T, scratch, u_kept, lora_rank(l));
}

extern "C" const dt_bf16 *linear_backward_defer_lora_cuda(void *dx, cuda_dtype dxt, const dt_bf16 *dy_, int64_t ldy,
                                                          const dt_bf16 *x_, const cuda_linear *l, int64_t T,
                                                          void *scratch, const dt_bf16 *u_kept) {
    if (T <= 0) return NULL;
    if (has_lora(l) && l->dropout > 0) {  // g A goes through the mask: the whole backward, in fp32
        if (dxt == CUDA_F32) linear_backward_cuda((float *)dx, 0, dy_, ldy, x_, l, T, scratch, u_kept);
        else dt_err("linear_backward_defer_lora_cuda: a LoRA with dropout needs an fp32 dx");
        return NULL;
    }
    ensure_workspace();
    const bf16 *dy = (const bf16 *)dy_;
    if (ldy <= 0) ldy = l->out;
    lora_scratch s = carve(scratch, T, l->rank);
    if (has_lora(l))
        member_lora_backward(NULL, false, dy, ldy, (const bf16 *)x_, l->in, l, T, s, (const bf16 *)u_kept, l->rank,
                             true);
    gemm_rm(false, false, T, l->in, l->out, 1.f, dy, ldy, base_weight(l), base_ld(l), 0.f, dx,
            dxt == CUDA_BF16 ? CUDA_R_16BF : CUDA_R_32F, l->in, "linear backward");
    return has_lora(l) ? (const dt_bf16 *)s.g : NULL;
}

// ---- the bf16 copies of A and B in the bases' blocks

__global__ void wide_copy_kernel(const cuda_wide_copy *table, int64_t rows_per_block, const float *src) {
    cuda_wide_copy e = table[blockIdx.y];
    bf16 *dst = (bf16 *)e.dst;
    int64_t r0 = blockIdx.x * rows_per_block, r1 = min(e.rows, r0 + rows_per_block);
    for (int64_t i = r0 * e.cols + threadIdx.x; i < r1 * e.cols; i += blockDim.x) {
        int64_t r = i / e.cols, c = i - r * e.cols;
        dst[r * e.ld + c] = __float2bfloat16(src[e.src_off + i]);
    }
}

extern "C" void linear_wide_copy_cuda(const cuda_wide_copy *table, int n, int64_t max_rows, const float *src) {
    if (n <= 0 || max_rows <= 0) return;
    const int64_t rows_per_block = 64;
    dim3 grid((unsigned)((max_rows + rows_per_block - 1) / rows_per_block), (unsigned)n);
    wide_copy_kernel<<<grid, 256, 0, cuda_stream()>>>(table, rows_per_block, src);
}
