// Dequantizing MLX affine-quantized weights on the device (quant.h has the format): the products
// of a quantized base read its rows back as bf16 just before each cuBLAS product, so the model
// stays in its packed bytes and only one matrix at a time exists in bf16.
//
// Eight consecutive values of a row take exactly `bits` bytes at byte offset 8 k bits / 8 of the
// row, whatever the width (a row is a little-endian bit stream; for 2, 4 and 8 bits that is the
// uint32 words' LSB-first packing), so one thread decodes eight values from one load.
#include "cuda/cuda_internal.h"
#include "cuda/vec.cuh"

namespace {

__device__ __forceinline__ float param(const void *p, cuda_dtype t, int64_t i) {
    switch (t) {
    case CUDA_BF16: return __bfloat162float(((const bf16 *)p)[i]);
    case CUDA_F16: return __half2float(((const __half *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

// The `bits` bytes of the 8-value pack at byte offset off of a row, as one little-endian word.
// Rows hold cols * bits / 8 bytes and cols is a multiple of 32, so a pack of 2, 4 or 8 bits is
// aligned to its own size.
__device__ __forceinline__ uint64_t load_pack(const uint8_t *row, int64_t off, int bits) {
    switch (bits) {
    case 8: {
        uint2 u = *(const uint2 *)(row + off);
        return (uint64_t)u.x | (uint64_t)u.y << 32;
    }
    case 4: return *(const uint32_t *)(row + off);
    case 2: return *(const uint16_t *)(row + off);
    default: {
        uint64_t v = 0;
        for (int j = 0; j < bits; j++) v |= (uint64_t)row[off + j] << (8 * j);
        return v;
    }
    }
}

// Values [c0, c0 + 8) of row r (c0 a multiple of 8), each rounded to bf16 as the host's upload
// of a dequantized weight rounds it.
__device__ __forceinline__ void decode8(float o[8], const cuda_qweight &w, int64_t r, int64_t c0) {
    const uint8_t *row = (const uint8_t *)w.q + r * (w.cols * w.bits / 8);
    uint64_t v = load_pack(row, c0 / 8 * w.bits, w.bits);
    int64_t gi = r * (w.cols / w.group) + c0 / w.group;
    float s = param(w.scales, w.stype, gi), b = param(w.biases, w.stype, gi);
    uint32_t mask = (1u << w.bits) - 1;
#pragma unroll
    for (int j = 0; j < 8; j++)
        o[j] = __bfloat162float(__float2bfloat16(fmaf(s, (float)((uint32_t)(v >> (w.bits * j)) & mask), b)));
}

// A block per row (grid-stride over rows), its threads over the row's 8-value packs: no 64-bit
// division per pack to find the row.
__global__ void dequantize_kernel(bf16 *out, cuda_qweight w, int64_t r0, int64_t nr) {
    int64_t per_row = w.cols / 8;
    for (int64_t r = blockIdx.x; r < nr; r += gridDim.x) {
        for (int64_t k = threadIdx.x; k < per_row; k += blockDim.x) {
            float x[8];
            decode8(x, w, r0 + r, 8 * k);
            stv<8>(out + r * w.cols + 8 * k, x);
        }
    }
}

// One block per token: its row of the table, dequantized, as fp32.
__global__ void embedding_q_kernel(float *out, const int32_t *ids, cuda_qweight E) {
    int64_t t = blockIdx.x, r = ids[t];
    float4 *o = (float4 *)(out + t * E.cols);
    for (int64_t c0 = threadIdx.x * 8; c0 < E.cols; c0 += blockDim.x * 8) {
        float x[8];
        decode8(x, E, r, c0);
        o[c0 / 4] = make_float4(x[0], x[1], x[2], x[3]);
        o[c0 / 4 + 1] = make_float4(x[4], x[5], x[6], x[7]);
    }
}

}  // namespace

extern "C" void dequantize_rows_cuda(dt_bf16 *out, const cuda_qweight *w, int64_t r0, int64_t nr) {
    if (nr <= 0 || w->cols <= 0) return;
    unsigned blocks = (unsigned)(nr < 65535 * 16 ? nr : 65535 * 16);
    dequantize_kernel<<<blocks, 128, 0, cuda_stream()>>>((bf16 *)out, *w, r0, nr);
}

extern "C" void embedding_forward_q_cuda(float *out, const int32_t *ids, int64_t T, const cuda_qweight *E) {
    if (T <= 0) return;
    embedding_q_kernel<<<(unsigned)T, 128, 0, cuda_stream()>>>(out, ids, *E);
}
