// Causal GQA attention over packed sequences. For head dims 64, 128 and 256 (Qwen3.5's is 256)
// fused kernels, forward and backward (below); otherwise cuBLAS, a block of query rows at a time:
//
// For each block of mq query rows [i0, i0 + mq) of a sequence, the scores against the keys
// [0, i0 + mq) of every head go to an fp32 buffer [nh][mq][ldS]; our softmax kernel turns each
// row into bf16 probabilities IN PLACE (the bf16 row fits in the first half of the fp32 row, so
// P is read with a leading dimension of 2 ldS bf16) and keeps the row's log-sum-exp. The
// backward rebuilds P from the lse and the recomputed scores, and dS = P (dP - D) the same way
// in a second buffer. Scratch is thus two [nh][mq][round8(max_len)] fp32 buffers plus the
// block's q and dout gathered head-major, never T x T for all heads.
//
// Gathering the block's query heads head-major ([nh][mq][hd]) makes the heads of one kv group
// a plain [G mq, hd] matrix: the scores of a whole group are one GEMM against its shared K, and
// dK, dV (sums over the group's heads) are one GEMM with the reduction over G mq rows. Groups
// batch with a stride of hd through K and V's rows.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/async_copy.cuh"
#include "cuda/cuda_internal.h"
#include "cuda/reduce.cuh"

namespace {

// Query rows per block, at most, and score elements per head per block, beyond which rows
// shrink. At 2 x 2048 tokens, 8 heads (0.8B, H200), blocks of 256 / 512 / 1024 / 2048 rows
// took 11.8 / 9.0 / 7.9 / 8.2 ms per training step for the forward, recompute and backward of
// attention's core: larger products, fewer launches, against more of the causal mask's upper
// triangle computed and thrown away.
const int kQB = 1024;
const long long kCap = 1024LL * 2048;
const int kThreads = 256;

int round8(int x) { return (x + 7) & ~7; }
size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// Query rows per block for sequences of up to max_len: kQB, halved while a head's block of
// scores would pass kCap, but not below 64 (longer sequences then take more memory, not less work).
int query_block(int max_len) {
    long long r = round8(max_len);
    int qb = kQB;
    while (qb > 64 && qb * r > kCap) qb >>= 1;
    return qb;
}

// Score elements per head for any length up to max_len (nondecreasing in max_len, so the
// layout carved for the batch's longest sequence fits the scratch sized for max_len).
long long head_elems(int max_len) {
    long long r = round8(max_len), a = query_block(max_len) * r, b = kQB * r < kCap ? kQB * r : kCap;
    return a > b ? a : b;
}

struct Layout {
    float *S, *dP;   // [nh][mq][ldS] fp32; bf16 P and dS in place
    bf16 *Qp, *dOp;  // [nh][mq][hd]
};

Layout carve(void *scratch, int max_len, int nh, int hd) {
    size_t sb = align256((size_t)nh * head_elems(max_len) * sizeof(float));
    size_t qb = align256((size_t)nh * kQB * hd * sizeof(bf16));
    char *p = (char *)scratch;
    Layout l;
    l.S = (float *)p;
    l.dP = (float *)(p + sb);
    l.Qp = (bf16 *)(p + 2 * sb);
    l.dOp = (bf16 *)(p + 2 * sb + qb);
    return l;
}

// dst [nh][mq][hd] = the block's rows of src [*, nh * hd] (rows row0 ..), head-major.
__global__ void gather_heads(bf16 *dst, const bf16 *src, long long row0, int mq, int nh, int hd) {
    long long ld = (long long)nh * hd;
    if (hd % 8 == 0) {
        int hv = hd / 8;
        long long n = (long long)nh * mq * hv;
        for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
            int c = (int)(x % hv);
            long long hr = x / hv;
            int r = (int)(hr % mq), h = (int)(hr / mq);
            ((uint4 *)dst)[x] = *(const uint4 *)(src + (row0 + r) * ld + (long long)h * hd + c * 8);
        }
    } else {
        long long n = (long long)nh * mq * hd;
        for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
            int c = (int)(x % hd);
            long long hr = x / hd;
            int r = (int)(hr % mq), h = (int)(hr / mq);
            dst[x] = src[(row0 + r) * ld + (long long)h * hd + c];
        }
    }
}

void gather(bf16 *dst, const bf16 *src, long long row0, int mq, int nh, int hd) {
    long long n = (long long)nh * mq * (hd % 8 == 0 ? hd / 8 : hd);
    gather_heads<<<cuda_blocks(n, 256), 256, 0, cuda_stream()>>>(dst, src, row0, mq, nh, hd);
}

// One block per (row r, head h): the causal softmax of scores row i = i0 + r (keys 0 .. i),
// written as bf16 over the row's own fp32 storage, zero past the diagonal up to ldS.
// In place: chunk c's bf16 writes cover fp32 elements below (c + 1) NT / 2, all of which were
// read by the end of chunk c, so one barrier per chunk (between its reads and writes) suffices.
template <int NT>
__global__ void __launch_bounds__(NT)
    softmax_fwd(float *S, float *lse, int ldS, long long head_stride, int i0, long long row0, int nh) {
    int r = blockIdx.x, h = blockIdx.y, n = i0 + r + 1;
    float *row = S + h * head_stride + (long long)r * ldS;
    float m = -INFINITY, s = 0.f;
    for (int j = threadIdx.x; j < n; j += NT) {
        float x = row[j];
        if (x > m) {
            s = s * __expf(m - x) + 1.f;
            m = x;
        } else {
            s += __expf(x - m);
        }
    }
    block_max_sum<NT>(m, s);
    float l = m + __logf(s);
    if (threadIdx.x == 0) lse[(row0 + r) * nh + h] = l;
    bf16 *p = (bf16 *)row;
    for (int c = 0; c < ldS; c += NT) {
        int j = c + threadIdx.x;
        float v = j < n ? __expf(row[j] - l) : 0.f;
        __syncthreads();
        if (j < ldS) p[j] = __float2bfloat16(v);
    }
}

// The backward's row: P = exp(S - lse) and dS = P (dP - D) with D = dO_i . O_i, both bf16 in
// place over S and dP (same chunking as softmax_fwd).
template <int NT>
__global__ void __launch_bounds__(NT)
    softmax_bwd(float *S, float *dP, const float *lse, const bf16 *out, const bf16 *dout, int ldS,
                long long head_stride, int i0, long long row0, int nh, int hd) {
    int r = blockIdx.x, h = blockIdx.y, n = i0 + r + 1;
    long long tok = row0 + r, off = tok * nh * hd + (long long)h * hd;
    float d = 0.f;
    for (int c = threadIdx.x; c < hd; c += NT) d += ld(out + off + c) * ld(dout + off + c);
    d = block_sum<NT>(d);
    float l = lse[tok * nh + h];
    float *srow = S + h * head_stride + (long long)r * ldS, *prow = dP + h * head_stride + (long long)r * ldS;
    bf16 *P = (bf16 *)srow, *dS = (bf16 *)prow;
    for (int c = 0; c < ldS; c += NT) {
        int j = c + threadIdx.x;
        float p = 0.f, ds = 0.f;
        if (j < n) {
            p = __expf(srow[j] - l);
            ds = p * (prow[j] - d);
        }
        __syncthreads();
        if (j < ldS) {
            P[j] = __float2bfloat16(p);
            dS[j] = __float2bfloat16(ds);
        }
    }
}

int longest(const int *seq_lens, int n_seqs) {
    int ml = 0;
    for (int s = 0; s < n_seqs; s++) ml = seq_lens[s] > ml ? seq_lens[s] : ml;
    return ml;
}

// ---------------------------------------------------------------- the fused forward
//
// For head dims of 64, 128 and 256 (Qwen3.5's is 256) the forward is one kernel, in the manner
// of FlashAttention-2: a block of 4 warps owns 64 query rows of one head (16 a warp), walks the
// key tiles of 64 up to the diagonal with the scores and probabilities in registers (bf16
// mma.sync, fp32 accumulation), and keeps a running max and sum per row, so no score reaches
// memory. q, k and v tiles come into shared memory by cp.async (V's tile loading while QK^T is
// computed, the next K's while PV is), rows XOR-swizzled in 16-byte chunks so that ldmatrix reads
// no bank twice. Other head dims take the cuBLAS path above.

const int kFT = 64;  // query rows and key rows per tile

__device__ __forceinline__ void ldsm_x4(uint32_t *r, const void *smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t *r, const void *smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
// c += a b: one m16n8k16 tile, bf16 in, fp32 accumulate
__device__ __forceinline__ void mma_bf16(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// c[0] += a b[0..1], c[1] += a b[2..3]: the two n-tiles of one x4 B fragment
__device__ __forceinline__ void mma_bf16_x2(float (*c)[4], const uint32_t *a, const uint32_t *b) {
    mma_bf16(c[0], a, b[0], b[1]);
    mma_bf16(c[1], a, b[2], b[3]);
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// p[0..1] += (a, b), atomically (one vector atomic where Hopper has it)
__device__ __forceinline__ void add2(float *p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Element offset of 16-byte chunk c of row r in a [rows][HD] bf16 tile, swizzled.
template <int HD>
__device__ __forceinline__ int swz(int r, int c) {
    return r * HD + ((c ^ (r & 7)) << 3);
}

// rows [row0, row0 + kFT) of src (leading dimension ld) into a swizzled tile, rows at or past n
// zero, by a block of NT threads
template <int HD, int NT = 128>
__device__ __forceinline__ void load_tile(bf16 *dst, const bf16 *src, long long ld, int row0, int n) {
    const int CPR = HD / 8;
    for (int x = threadIdx.x; x < kFT * CPR; x += NT) {
        int r = x / CPR, c = x % CPR;
        bool ok = row0 + r < n;
        cp_async16z(dst + swz<HD>(r, c), src + (ok ? (long long)(row0 + r) * ld + c * 8 : 0), ok);
    }
}

const int kMaxSeqs = 64;  // sequences per launch
struct seq_table {
    int start[kMaxSeqs], len[kMaxSeqs];
    int drow[kMaxSeqs];  // the backward's: each sequence's first row of D, the launch's lengths summed
};

template <int HD>
__global__ void __launch_bounds__(128, HD >= 128 ? 2 : 3)
    flash_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, seq_table seqs, int nh,
                     int nkv, int n_tiles, float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Ks = Qs + kFT * HD, *Vs = Ks + kFT * HD;
    int sh = blockIdx.x, s = sh / nh, h = sh % nh;
    int qt = n_tiles - 1 - blockIdx.y;  // the longest rows first
    int len = seqs.len[s], i0 = qt * kFT;
    if (i0 >= len) return;
    long long start = seqs.start[s], qld = (long long)nh * HD, kvld = (long long)nkv * HD;
    int kvh = h / (nh / nkv);
    const bf16 *qh = q + start * qld + h * HD, *kh = k + start * kvld + kvh * HD, *vh = v + start * kvld + kvh * HD;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units: exp2 is one instruction

    load_tile<HD>(Qs, qh, qld, i0, len);
    load_tile<HD>(Ks, kh, kvld, 0, len);
    cp_async_commit();

    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8: max, partial sum
    int qrow = warp * 16;                                     // the warp's rows in the tile
    int row0 = i0 + qrow + g, row1 = row0 + 8;

    for (int j = 0; j <= qt; j++) {
        cp_async_wait_all();
        __syncthreads();  // K_j (and Q) in; every warp done with V_{j-1}
        load_tile<HD>(Vs, vh, kvld, j * kFT, len);
        cp_async_commit();

        float sc[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            uint32_t a[4];
            ldsm_x4(a, Qs + swz<HD>(qrow + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
            for (int p = 0; p < 4; p++) {
                uint32_t b[4];
                ldsm_x4(b, Ks + swz<HD>(16 * p + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
                mma_bf16_x2(&sc[2 * p], a, b);
            }
        }
        // scale, mask the diagonal tile's upper triangle, the running max and sum per row
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            int key = j * kFT + 8 * n + 2 * t;
#pragma unroll
            for (int e = 0; e < 2; e++) {
                sc[n][e] = key + e <= row0 ? sc[n][e] * sl2 : -INFINITY;
                sc[n][2 + e] = key + e <= row1 ? sc[n][2 + e] * sl2 : -INFINITY;
                mx0 = fmaxf(mx0, sc[n][e]);
                mx1 = fmaxf(mx1, sc[n][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // the first tile (key 0) leaves every row's max finite
        float al0 = exp2f(m0 - mx0), al1 = exp2f(m1 - mx1);
        m0 = mx0, m1 = mx1;
        l0 *= al0, l1 *= al1;
        uint32_t pa[4][4];  // P as the A fragments of the PV product, k-step by k-step
#pragma unroll
        for (int n = 0; n < 8; n++) {
            float p0 = exp2f(sc[n][0] - m0), p1 = exp2f(sc[n][1] - m0);
            float p2 = exp2f(sc[n][2] - m1), p3 = exp2f(sc[n][3] - m1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pa[n >> 1][(n & 1) * 2] = pack_bf16(p0, p1);
            pa[n >> 1][(n & 1) * 2 + 1] = pack_bf16(p2, p3);
        }
#pragma unroll
        for (int n = 0; n < HD / 8; n++) o[n][0] *= al0, o[n][1] *= al0, o[n][2] *= al1, o[n][3] *= al1;

        cp_async_wait_all();
        __syncthreads();  // V_j in; every warp done with K_j
        if (j < qt) load_tile<HD>(Ks, kh, kvld, (j + 1) * kFT, len);
        cp_async_commit();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int p = 0; p < HD / 16; p++) {
                uint32_t b[4];
                ldsm_x4_t(b, Vs + swz<HD>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * p + (lane >> 4)));
                mma_bf16_x2(&o[2 * p], pa[kk], b);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float r0 = 1.f / l0, r1 = 1.f / l1;
    bf16 *o0 = out + (start + row0) * qld + h * HD, *o1 = out + (start + row1) * qld + h * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        int c = 8 * n + 2 * t;
        if (row0 < len) *(uint32_t *)(o0 + c) = pack_bf16(o[n][0] * r0, o[n][1] * r0);
        if (row1 < len) *(uint32_t *)(o1 + c) = pack_bf16(o[n][2] * r1, o[n][3] * r1);
    }
    if (t == 0) {
        const float ln2 = 0.6931471805599453f;
        if (row0 < len) lse[(start + row0) * nh + h] = (m0 + __log2f(l0)) * ln2;
        if (row1 < len) lse[(start + row1) * nh + h] = (m1 + __log2f(l1)) * ln2;
    }
}

template <int HD>
void flash_forward(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, const int *seq_starts,
                   const int *seq_lens, int n_seqs, int nh, int nkv, float scale) {
    size_t smem = 3 * (size_t)kFT * HD * sizeof(bf16);
    static bool attr;
    if (!attr) {
        cudaFuncSetAttribute(flash_fwd_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        attr = true;
    }
    for (int s0 = 0; s0 < n_seqs; s0 += kMaxSeqs) {
        seq_table tab;
        int n = n_seqs - s0 < kMaxSeqs ? n_seqs - s0 : kMaxSeqs, tiles = 0;
        for (int s = 0; s < n; s++) {
            tab.start[s] = seq_starts[s0 + s];
            tab.len[s] = seq_lens[s0 + s];
            int nt = (tab.len[s] + kFT - 1) / kFT;
            tiles = nt > tiles ? nt : tiles;
        }
        if (tiles == 0) continue;
        flash_fwd_kernel<HD><<<dim3(n * nh, tiles), 128, smem, cuda_stream()>>>(out, lse, q, k, v, tab, nh, nkv,
                                                                                 tiles, scale);
    }
}

// ---------------------------------------------------------------- the fused backward
//
// FlashAttention-2's backward for the same head dims: a block of 8 warps owns one tile of 64 keys
// for one query head, keeps that tile's dK and dV in registers and walks the query tiles from the
// diagonal down, the next tile's Q and dO loading into a second buffer meanwhile. Per query tile:
// S = Q K^T and dP = dO V^T recomputed (a warp: 16 query rows by 32 keys), P = exp(scale S - lse)
// and dS = scale P (dP - D), D = rowsum(dO o O) (attn_delta), both into shared memory in bf16;
// then dV += P^T dO and dK += dS^T Q (a warp: 16 keys by half the head dim), and dQ's part dS K
// (16 query rows by half the head dim) added into dq by fp32 atomics, where the key tiles of a
// query row meet. dK and dV sum over the kv head's query heads: added the same way at the end. No
// score reaches global memory, and of the masked upper triangle only the diagonal tiles are
// computed (the cuBLAS path computes its query blocks' whole rectangles): at 0.8B's shape (2 x 2048
// tokens, 8 heads of 256) 0.61 ms against that path's 0.75.
const int kBT = 256;  // threads of the backward

// D[drow + t - t0, h] = dO[t, h, :] . O[t, h, :] for the tokens t of [t0, t0 + n), a warp per
// (token, head)
__global__ void attn_delta(float *D, long long drow, const bf16 *out, const bf16 *dout, long long t0, long long n,
                           int nh, int hd) {
    int lane = threadIdx.x & 31;
    long long nw = (long long)gridDim.x * blockDim.x >> 5;
    for (long long w = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; w < n * nh; w += nw) {
        long long tok = t0 + w / nh, off = tok * nh * hd + (w % nh) * (long long)hd;
        float d = 0.f;
        for (int c = lane; c < hd; c += 32) d += ld(out + off + c) * ld(dout + off + c);
#pragma unroll
        for (int o = 16; o; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (lane == 0) D[(drow + tok - t0) * nh + w % nh] = d;
    }
}

// lse and D of query rows [row0, row0 + kFT) of head h into LD[0 .. kFT), LD[kFT ..), zero past n,
// by the block's first 2 kFT threads
__device__ __forceinline__ void load_lse_delta(float *LD, const float *lse, const float *Dr, long long start,
                                               int row0, int n, int nh, int h) {
    int x = threadIdx.x, r = row0 + (x & (kFT - 1));
    bool ok = r < n;
    if (x < kFT) cp_async4z(LD + x, lse + ((ok ? start + r : start) * nh + h), ok);
    else if (x < 2 * kFT) cp_async4z(LD + x, Dr + (ok ? (long long)r * nh : 0), ok);
}

template <int HD>
__global__ void __launch_bounds__(kBT, 1)
    flash_bwd_kernel(float *dq, float *dk, float *dv, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,
                     const float *lse, const float *delta, seq_table seqs, int nh, int nkv, float scale) {
    constexpr int ND = HD / 16;  // 8-wide column tiles in half the head dim
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Ks = (bf16 *)smem_raw, *Vs = Ks + kFT * HD, *Qb = Vs + kFT * HD, *dOb = Qb + 2 * kFT * HD;  // Q, dO: 2 each
    bf16 *Ps = dOb + 2 * kFT * HD, *dSs = Ps + kFT * kFT;  // [query][key], swizzled as [kFT][kFT] tiles
    float *LDb = (float *)(dSs + kFT * kFT);                // per buffer: the tile's rows' lse, then D
    int sh = blockIdx.x, s = sh / nh, h = sh % nh, kt = blockIdx.y;  // the longest walks first
    int len = seqs.len[s], j0 = kt * kFT;
    if (j0 >= len) return;
    int n_q = (len + kFT - 1) / kFT;
    long long start = seqs.start[s], qld = (long long)nh * HD, kvld = (long long)nkv * HD;
    int kvh = h / (nh / nkv);
    const bf16 *qh = q + start * qld + h * HD, *doh = dout + start * qld + h * HD;
    const bf16 *kh = k + start * kvld + kvh * HD, *vh = v + start * kvld + kvh * HD;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = scale * 1.4426950408889634f, l2e = 1.4426950408889634f;
    // S, dP: query rows wr, keys wc; dV, dK: keys wr, columns wd; dQ: query rows wr, columns wd
    int wr = (warp & 3) * 16, wc = (warp >> 2) * 32, wd = (warp >> 2) * (HD / 2);

    load_tile<HD, kBT>(Ks, kh, kvld, j0, len);
    load_tile<HD, kBT>(Vs, vh, kvld, j0, len);
    const float *Dr = delta + (long long)seqs.drow[s] * nh + h;
    load_tile<HD, kBT>(Qb, qh, qld, j0, len);
    load_tile<HD, kBT>(dOb, doh, qld, j0, len);
    load_lse_delta(LDb, lse, Dr, start, j0, len, nh, h);
    cp_async_commit();

    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.f;

    for (int it = kt; it < n_q; it++) {
        int i0 = it * kFT, buf = (it - kt) & 1;
        bf16 *Qs = Qb + buf * kFT * HD, *dOs = dOb + buf * kFT * HD;
        const float *LD = LDb + buf * 2 * kFT;
        cp_async_wait_all();
        __syncthreads();  // tile i in; every warp done with the last tile's P, dS and its buffers
        if (it + 1 < n_q) {
            load_tile<HD, kBT>(Qb + (buf ^ 1) * kFT * HD, qh, qld, i0 + kFT, len);
            load_tile<HD, kBT>(dOb + (buf ^ 1) * kFT * HD, doh, qld, i0 + kFT, len);
            load_lse_delta(LDb + (buf ^ 1) * 2 * kFT, lse, Dr, start, i0 + kFT, len, nh, h);
        }
        cp_async_commit();
        float sc[4][4], dp[4][4];
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) sc[n][e] = dp[n][e] = 0.f;
#pragma unroll 4
        for (int kk = 0; kk < HD / 16; kk++) {
            uint32_t a[4], ad[4];
            ldsm_x4(a, Qs + swz<HD>(wr + (lane & 15), 2 * kk + (lane >> 4)));
            ldsm_x4(ad, dOs + swz<HD>(wr + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
            for (int p = 0; p < 2; p++) {
                uint32_t b[4], bv[4];
                int kr = wc + 16 * p + (lane & 7) + ((lane >> 4) << 3), kc = 2 * kk + ((lane >> 3) & 1);
                ldsm_x4(b, Ks + swz<HD>(kr, kc));
                ldsm_x4(bv, Vs + swz<HD>(kr, kc));
                mma_bf16_x2(&sc[2 * p], a, b);
                mma_bf16_x2(&dp[2 * p], ad, bv);
            }
        }
        // P and dS of rows r0, r1 (zero past the diagonal and past the sequence), in bf16
        int r0 = i0 + wr + g, r1 = r0 + 8;
        float L0 = LD[wr + g] * l2e, L1 = LD[wr + g + 8] * l2e, D0 = LD[kFT + wr + g], D1 = LD[kFT + wr + g + 8];
#pragma unroll
        for (int n = 0; n < 4; n++) {
            int key = j0 + wc + 8 * n + 2 * t;
            float p[4], d[4];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                p[e] = key + e <= r0 && r0 < len ? exp2f(sc[n][e] * sl2 - L0) : 0.f;
                p[2 + e] = key + e <= r1 && r1 < len ? exp2f(sc[n][2 + e] * sl2 - L1) : 0.f;
                d[e] = scale * p[e] * (dp[n][e] - D0);
                d[2 + e] = scale * p[2 + e] * (dp[n][2 + e] - D1);
            }
            int c = (wc >> 3) + n, row = wr + g;
            *(uint32_t *)(Ps + swz<kFT>(row, c) + 2 * t) = pack_bf16(p[0], p[1]);
            *(uint32_t *)(Ps + swz<kFT>(row + 8, c) + 2 * t) = pack_bf16(p[2], p[3]);
            *(uint32_t *)(dSs + swz<kFT>(row, c) + 2 * t) = pack_bf16(d[0], d[1]);
            *(uint32_t *)(dSs + swz<kFT>(row + 8, c) + 2 * t) = pack_bf16(d[2], d[3]);
        }
        __syncthreads();
        // dV += P^T dO, dK += dS^T Q: the A operands transposed out of [query][key]
#pragma unroll
        for (int kq = 0; kq < kFT / 16; kq++) {
            uint32_t a[4], as[4];
            int pr = 16 * kq + (lane & 7) + ((lane >> 4) << 3), pc = (wr >> 3) + ((lane >> 3) & 1);
            ldsm_x4_t(a, Ps + swz<kFT>(pr, pc));
            ldsm_x4_t(as, dSs + swz<kFT>(pr, pc));
#pragma unroll
            for (int p = 0; p < ND / 2; p++) {
                uint32_t b[4], bq[4];
                int br = 16 * kq + (lane & 7) + (((lane >> 3) & 1) << 3), bc = (wd >> 3) + 2 * p + (lane >> 4);
                ldsm_x4_t(b, dOs + swz<HD>(br, bc));
                ldsm_x4_t(bq, Qs + swz<HD>(br, bc));
                mma_bf16_x2(&dva[2 * p], a, b);
                mma_bf16_x2(&dka[2 * p], as, bq);
            }
        }
        // dQ's part of this key tile: dS K, added into dq
        float dqa[ND][4];
#pragma unroll
        for (int n = 0; n < ND; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dqa[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kFT / 16; kk++) {
            uint32_t a[4];
            ldsm_x4(a, dSs + swz<kFT>(wr + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
            for (int p = 0; p < ND / 2; p++) {
                uint32_t b[4];
                int br = 16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), bc = (wd >> 3) + 2 * p + (lane >> 4);
                ldsm_x4_t(b, Ks + swz<HD>(br, bc));
                mma_bf16_x2(&dqa[2 * p], a, b);
            }
        }
        float *q0 = dq + (start + r0) * qld + h * HD + wd + 2 * t, *q1 = q0 + 8 * qld;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            if (r0 < len) add2(q0 + 8 * n, dqa[n][0], dqa[n][1]);
            if (r1 < len) add2(q1 + 8 * n, dqa[n][2], dqa[n][3]);
        }
    }
    int k0 = j0 + wr + g, k1 = k0 + 8;
    long long o0 = (start + k0) * kvld + kvh * HD + wd + 2 * t, o1 = o0 + 8 * kvld;
#pragma unroll
    for (int n = 0; n < ND; n++) {
        if (k0 < len) add2(dk + o0 + 8 * n, dka[n][0], dka[n][1]), add2(dv + o0 + 8 * n, dva[n][0], dva[n][1]);
        if (k1 < len) add2(dk + o1 + 8 * n, dka[n][2], dka[n][3]), add2(dv + o1 + 8 * n, dva[n][2], dva[n][3]);
    }
}

template <int HD>
void flash_backward(float *dq, float *dk, float *dv, const bf16 *dout, const bf16 *out, const float *lse,
                    const bf16 *q, const bf16 *k, const bf16 *v, const int *seq_starts, const int *seq_lens,
                    int n_seqs, int nh, int nkv, float scale, float *delta) {
    size_t smem = (6 * (size_t)kFT * HD + 2 * kFT * kFT) * sizeof(bf16) + 2 * 2 * kFT * sizeof(float);
    static bool attr;
    if (!attr) {
        cudaFuncSetAttribute(flash_bwd_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        attr = true;
    }
    long long qld = (long long)nh * HD, kvld = (long long)nkv * HD;
    for (int s0 = 0; s0 < n_seqs; s0 += kMaxSeqs) {
        seq_table tab;
        int n = n_seqs - s0 < kMaxSeqs ? n_seqs - s0 : kMaxSeqs, tiles = 0;
        int drow = 0;  // D's rows: the sequences' one after another, whatever their starts
        for (int s = 0; s < n; s++) {
            tab.start[s] = seq_starts[s0 + s];
            tab.len[s] = seq_lens[s0 + s];
            tab.drow[s] = drow;
            int nt = (tab.len[s] + kFT - 1) / kFT;
            tiles = nt > tiles ? nt : tiles;
            if (tab.len[s] <= 0) continue;
            long long t0 = tab.start[s], len = tab.len[s];
            // the kernel adds into dq, dk, dv; D of the sequence's rows
            cudaMemsetAsync(dq + t0 * qld, 0, sizeof(float) * len * qld, cuda_stream());
            cudaMemsetAsync(dk + t0 * kvld, 0, sizeof(float) * len * kvld, cuda_stream());
            cudaMemsetAsync(dv + t0 * kvld, 0, sizeof(float) * len * kvld, cuda_stream());
            attn_delta<<<cuda_blocks(len * nh * 32, 256), 256, 0, cuda_stream()>>>(delta, drow, out, dout, t0, len, nh,
                                                                                 HD);
            drow += tab.len[s];
        }
        if (tiles == 0) continue;
        flash_bwd_kernel<HD><<<dim3(n * nh, tiles), kBT, smem, cuda_stream()>>>(dq, dk, dv, q, k, v, dout, lse, delta,
                                                                                tab, nh, nkv, scale);
    }
}

// Whether the fused forward takes this call: its head dims, and 16-byte rows for cp.async.
// DT_ATTENTION=unfused keeps the cuBLAS path (the tests' and timings' comparison).
bool flash_ok(const void *q, const void *k, const void *v, int hd) {
    if (hd != 64 && hd != 128 && hd != 256) return false;
    const char *e = getenv("DT_ATTENTION");
    if (e && strcmp(e, "unfused") == 0) return false;
    return ((uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 16 == 0;
}

}  // namespace

extern "C" size_t attention_scratch_bytes_cuda(int max_len, int nh, int nkv, int hd) {
    (void)nkv;
    if (max_len < 1) max_len = 1;
    return 2 * align256((size_t)nh * head_elems(max_len) * sizeof(float)) +
           2 * align256((size_t)nh * kQB * hd * sizeof(bf16));
}

extern "C" void attention_forward_cuda(dt_bf16 *out_, float *lse, const dt_bf16 *q_, const dt_bf16 *k_,
                                       const dt_bf16 *v_, const int *seq_starts, const int *seq_lens, int n_seqs,
                                       int nh, int nkv, int hd, float scale, void *scratch) {
    bf16 *out = (bf16 *)out_;
    const bf16 *q = (const bf16 *)q_, *k = (const bf16 *)k_, *v = (const bf16 *)v_;
    int ml = longest(seq_lens, n_seqs);
    if (ml <= 0) return;
    if (flash_ok(q, k, v, hd)) {
        if (hd == 64) flash_forward<64>(out, lse, q, k, v, seq_starts, seq_lens, n_seqs, nh, nkv, scale);
        else if (hd == 128) flash_forward<128>(out, lse, q, k, v, seq_starts, seq_lens, n_seqs, nh, nkv, scale);
        else flash_forward<256>(out, lse, q, k, v, seq_starts, seq_lens, n_seqs, nh, nkv, scale);
        return;
    }
    int qb = query_block(ml), G = nh / nkv;
    Layout L = carve(scratch, ml, nh, hd);
    long long qld = (long long)nh * hd, kvld = (long long)nkv * hd;
    for (int s = 0; s < n_seqs; s++) {
        long long start = seq_starts[s];
        int len = seq_lens[s];
        const bf16 *ks = k + start * kvld, *vs = v + start * kvld;
        for (int i0 = 0; i0 < len; i0 += qb) {
            int mq = len - i0 < qb ? len - i0 : qb, nk = i0 + mq, ldS = round8(nk);
            long long hs = (long long)mq * ldS;
            gather(L.Qp, q, start + i0, mq, nh, hd);
            // S = scale Q K^T, every group at once: [G mq, hd] x [nk, hd]^T per group
            cuda_gemm(false, true, G * mq, nk, hd, scale, L.Qp, hd, (long long)G * mq * hd, ks, (int)kvld, hd, 0.f, L.S,
                 CUDA_R_32F, ldS, G * hs, nkv);
            softmax_fwd<kThreads><<<dim3(mq, nh), kThreads, 0, cuda_stream()>>>(L.S, lse, ldS, hs, i0, start + i0, nh);
            // O_h = P_h V_g straight into out's head columns; the group's heads share V (stride 0)
            const bf16 *P = (const bf16 *)L.S;
            for (int g = 0; g < nkv; g++)
                cuda_gemm(false, false, mq, hd, nk, 1.f, P + 2 * g * G * hs, 2 * ldS, 2 * hs, vs + g * hd, kvld, 0, 0.f,
                     out + (start + i0) * qld + (long long)g * G * hd, CUDA_R_16BF, (int)qld, hd, G);
        }
    }
}

extern "C" void attention_backward_cuda(float *dq, float *dk, float *dv, const dt_bf16 *dout_, const dt_bf16 *out_,
                                        const float *lse, const dt_bf16 *q_, const dt_bf16 *k_, const dt_bf16 *v_,
                                        const int *seq_starts, const int *seq_lens, int n_seqs, int nh, int nkv,
                                        int hd, float scale, void *scratch) {
    const bf16 *dout = (const bf16 *)dout_, *out = (const bf16 *)out_;
    const bf16 *q = (const bf16 *)q_, *k = (const bf16 *)k_, *v = (const bf16 *)v_;
    int ml = longest(seq_lens, n_seqs);
    if (ml <= 0) return;
    if (flash_ok(q, k, v, hd) && ((uintptr_t)dout | (uintptr_t)dq | (uintptr_t)dk | (uintptr_t)dv) % 16 == 0) {
        // D of up to kMaxSeqs sequences at a time (at most kMaxSeqs x max_len rows, packed one after
        // another) fits the scratch: its first buffer alone holds nh x 64 x max_len floats
        // (query_block), and kMaxSeqs is 64
        static_assert(kMaxSeqs <= 64, "D of a launch's sequences must fit the scratch");
        float *delta = (float *)scratch;
        auto run = hd == 64 ? flash_backward<64> : hd == 128 ? flash_backward<128> : flash_backward<256>;
        run(dq, dk, dv, dout, out, lse, q, k, v, seq_starts, seq_lens, n_seqs, nh, nkv, scale, delta);
        return;
    }
    int qb = query_block(ml), G = nh / nkv;
    Layout L = carve(scratch, ml, nh, hd);
    long long qld = (long long)nh * hd, kvld = (long long)nkv * hd;
    for (int s = 0; s < n_seqs; s++) {
        long long start = seq_starts[s];
        int len = seq_lens[s];
        if (len <= 0) continue;
        const bf16 *ks = k + start * kvld, *vs = v + start * kvld;
        float *dks = dk + start * kvld, *dvs = dv + start * kvld;
        // dk, dv gather over query blocks; dq is written whole by each block
        cudaMemsetAsync(dks, 0, sizeof(float) * len * kvld, cuda_stream());
        cudaMemsetAsync(dvs, 0, sizeof(float) * len * kvld, cuda_stream());
        for (int i0 = 0; i0 < len; i0 += qb) {
            int mq = len - i0 < qb ? len - i0 : qb, nk = i0 + mq, ldS = round8(nk);
            long long hs = (long long)mq * ldS, gq = (long long)G * mq * hd;
            gather(L.Qp, q, start + i0, mq, nh, hd);
            gather(L.dOp, dout, start + i0, mq, nh, hd);
            cuda_gemm(false, true, G * mq, nk, hd, scale, L.Qp, hd, gq, ks, (int)kvld, hd, 0.f, L.S, CUDA_R_32F, ldS,
                 G * hs, nkv);
            // dP = dO V^T
            cuda_gemm(false, true, G * mq, nk, hd, 1.f, L.dOp, hd, gq, vs, (int)kvld, hd, 0.f, L.dP, CUDA_R_32F, ldS,
                 G * hs, nkv);
            softmax_bwd<kThreads><<<dim3(mq, nh), kThreads, 0, cuda_stream()>>>(L.S, L.dP, lse, out, dout, ldS, hs, i0,
                                                                               start + i0, nh, hd);
            const bf16 *P = (const bf16 *)L.S, *dS = (const bf16 *)L.dP;
            // dV_g += P_group^T dO_group and dK_g += scale dS_group^T Q_group: the group's heads
            // stacked make the sum over heads part of the GEMM's reduction
            cuda_gemm(true, false, nk, hd, G * mq, 1.f, P, 2 * ldS, 2 * G * hs, L.dOp, hd, gq, 1.f, dvs, CUDA_R_32F,
                 (int)kvld, hd, nkv);
            cuda_gemm(true, false, nk, hd, G * mq, scale, dS, 2 * ldS, 2 * G * hs, L.Qp, hd, gq, 1.f, dks, CUDA_R_32F,
                 (int)kvld, hd, nkv);
            // dQ_h = scale dS_h K_g, straight into dq's head columns
            for (int g = 0; g < nkv; g++)
                cuda_gemm(false, false, mq, hd, nk, scale, dS + 2 * g * G * hs, 2 * ldS, 2 * hs, ks + g * hd, kvld, 0,
                     0.f, dq + (start + i0) * qld + (long long)g * G * hd, CUDA_R_32F, (int)qld, hd, G);
        }
    }
}

// ---------------------------------------------------------------- decoding

namespace {

constexpr int kDecThreads = 128;  // keys a tile; head dims up to 2 * kDecThreads

// One block per (query, head): query t (position past + t) against the cached keys 0 .. past + t,
// a tile of keys at a time with a running max and sum (the online softmax), the output summed
// in registers (each thread two of the head's dims).
__global__ void __launch_bounds__(kDecThreads)
    attention_decode_kernel(bf16 *out, const bf16 *q, const bf16 *kc, const bf16 *vc, int64_t past, int nh, int nkv,
                            int hd, float scale) {
    __shared__ float qs[2 * kDecThreads], p[kDecThreads];
    int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd, hoff = (int64_t)(h / (nh / nkv)) * hd;
    for (int d = tid; d < hd; d += kDecThreads) qs[d] = __bfloat162float(q[t * qd + (int64_t)h * hd + d]);
    __syncthreads();
    int64_t n_keys = past + t + 1;
    float m = -INFINITY, l = 0.f, acc[2] = {0.f, 0.f};
    for (int64_t j0 = 0; j0 < n_keys; j0 += kDecThreads) {
        int64_t j = j0 + tid;
        float s = -INFINITY, one = 0.f;
        if (j < n_keys) {
            const bf16 *kr = kc + j * kvd + hoff;
            float dot = 0.f;
            for (int d = 0; d < hd; d++) dot = fmaf(qs[d], __bfloat162float(kr[d]), dot);
            s = dot * scale;
            one = 1.f;
        }
        float tm = s, ts = one;  // the tile's max and sum of exp(s - max)
        block_max_sum<kDecThreads>(tm, ts);
        float mn = fmaxf(m, tm), corr = __expf(m - mn);  // m = -inf at first: corr 0, acc and l are 0
        p[tid] = j < n_keys ? __expf(s - mn) : 0.f;
        l = l * corr + ts * __expf(tm - mn);
        m = mn;
        __syncthreads();
        int nj = (int)(n_keys - j0 < kDecThreads ? n_keys - j0 : kDecThreads);
        for (int i = 0; i < 2; i++) {
            int d = tid + i * kDecThreads;
            if (d >= hd) break;
            const bf16 *vr = vc + j0 * kvd + hoff + d;
            float a = acc[i] * corr;
            for (int jj = 0; jj < nj; jj++) a = fmaf(p[jj], __bfloat162float(vr[jj * kvd]), a);
            acc[i] = a;
        }
        __syncthreads();  // p is rewritten by the next tile
    }
    for (int i = 0; i < 2; i++) {
        int d = tid + i * kDecThreads;
        if (d < hd) out[t * qd + (int64_t)h * hd + d] = __float2bfloat16(acc[i] / l);
    }
}

}  // namespace

extern "C" void attention_decode_cuda(dt_bf16 *out, const dt_bf16 *q, const dt_bf16 *k_cache, const dt_bf16 *v_cache,
                                      int64_t n, int64_t past, int nh, int nkv, int hd, float scale) {
    if (n <= 0 || hd > 2 * kDecThreads) return;
    attention_decode_kernel<<<dim3((unsigned)n, (unsigned)nh), kDecThreads, 0, cuda_stream()>>>(
        (bf16 *)out, (const bf16 *)q, (const bf16 *)k_cache, (const bf16 *)v_cache, past, nh, nkv, hd, scale);
}
