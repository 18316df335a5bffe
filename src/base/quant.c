/* MLX affine quantization (quant.h, formats.md §7.1): checks, the quantizer (bit for bit MLX's CPU
 * kernel, float32 throughout) and the dequantization of blocks of rows that the ops compute through.
 * The packed words are read as little-endian bytes, which is what the host is (x86-64, arm64). */
#include "deltatune/quant.h"

#include <math.h>
#include <string.h>

#include "deltatune/error.h"

static int bits_ok(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8; }
static int group_ok(int group) { return group == 32 || group == 64 || group == 128; }

int quant_check(int bits, int group, int64_t cols, const char *what) {
    if (!bits_ok(bits)) return dt_err("%s: unsupported quantization bits %d (affine: 2, 3, 4, 5, 6 or 8)", what, bits);
    if (!group_ok(group)) return dt_err("%s: unsupported quantization group size %d (affine: 32, 64 or 128)", what, group);
    if (cols <= 0 || cols % group != 0)
        return dt_err("%s: quantization group size %d does not divide the row of %lld values", what, group,
                      (long long)cols);
    if (cols * bits % 32 != 0)
        return dt_err("%s: a row of %lld %d-bit values does not fill whole uint32 words", what, (long long)cols, bits);
    return 0;
}

int quant_check_mode(const char *mode, const char *what) {
    if (!mode || strcmp(mode, "affine") == 0) return 0;
    return dt_err("%s: unsupported quantization mode \"%s\" (only \"affine\")", what, mode);
}

int quant_check_sizes(const dt_weight *w, int64_t data_bytes, int64_t scales_bytes, int64_t biases_bytes,
                      const char *what) {
    if (w->rows <= 0) return dt_err("%s: quantized weight with %lld rows", what, (long long)w->rows);
    if (quant_check(w->qbits, w->qgroup, w->cols, what)) return -1;
    if (w->dtype != DT_U32)
        return dt_err("%s: quantized weight stored as %s, expected U32", what, dt_dtype_name(w->dtype));
    if (!dt_dtype_is_float(w->qdtype))
        return dt_err("%s: quantization scales/biases stored as %s, expected F32, F16 or BF16", what,
                      dt_dtype_name(w->qdtype));
    int64_t words = w->cols * w->qbits / 32, groups = w->cols / w->qgroup, es = (int64_t)dt_dtype_size(w->qdtype);
    if (data_bytes != w->rows * words * 4)
        return dt_err("%s: packed weight has %lld bytes, expected %lld ([%lld, %lld] uint32 for %d-bit rows of %lld)",
                      what, (long long)data_bytes, (long long)(w->rows * words * 4), (long long)w->rows,
                      (long long)words, w->qbits, (long long)w->cols);
    if (scales_bytes != w->rows * groups * es)
        return dt_err("%s: scales have %lld bytes, expected %lld ([%lld, %lld] %s for group size %d)", what,
                      (long long)scales_bytes, (long long)(w->rows * groups * es), (long long)w->rows,
                      (long long)groups, dt_dtype_name(w->qdtype), w->qgroup);
    if (biases_bytes != w->rows * groups * es)
        return dt_err("%s: biases have %lld bytes, expected %lld ([%lld, %lld] %s for group size %d)", what,
                      (long long)biases_bytes, (long long)(w->rows * groups * es), (long long)w->rows,
                      (long long)groups, dt_dtype_name(w->qdtype), w->qgroup);
    if (!w->data || !w->scales || !w->biases) return dt_err("%s: quantized weight without data, scales or biases", what);
    return 0;
}

int64_t dt_weight_bytes(const dt_weight *w) {
    if (!w->qbits) return w->rows * w->cols * (int64_t)dt_dtype_size(w->dtype);
    int64_t groups = w->qgroup > 0 ? w->cols / w->qgroup : 0;
    return w->rows * w->cols * w->qbits / 8 + 2 * w->rows * groups * (int64_t)dt_dtype_size(w->qdtype);
}

/* ---- quantize: MLX's CPU kernel (mlx/backend/cpu/quantized.cpp `quantize`), every step in float ---- */

/* One group: its scale and bias, and its codes q[0..group). */
static void quantize_group(uint8_t *q, float *scale_out, float *bias_out, const float *w, int bits, int group) {
    const float n_bins = (float)((1 << bits) - 1);
    const float eps = 1e-7f;
    float w_min = INFINITY, w_max = -INFINITY;
    for (int j = 0; j < group; j++) {  /* std::max, std::min */
        w_max = w_max < w[j] ? w[j] : w_max;
        w_min = w[j] < w_min ? w[j] : w_min;
    }
    int mask = fabsf(w_min) > fabsf(w_max);
    float d = (w_max - w_min) / n_bins;
    float scale = d < eps ? eps : d;
    scale = mask ? scale : -scale;
    float edge = mask ? w_min : w_max;
    float q0 = rintf(edge / scale);
    float bias = 0;
    if (q0 != 0) {
        scale = edge / q0;
        bias = edge;
    }
    for (int j = 0; j < group; j++) {
        float v = rintf((w[j] - bias) / scale);
        v = v < 0 ? 0 : v;  /* std::max(v, 0.0f), then std::min(v, n_bins) */
        v = n_bins < v ? n_bins : v;
        q[j] = v == v ? (uint8_t)v : 0;  /* NaN (a non-finite group) would be undefined: 0 */
    }
    *scale_out = scale;
    *bias_out = bias;
}

/* codes q[0..cols) into the packed row (cols * bits / 8 bytes): LSB first, a little-endian bit stream
 * (for bits 2, 4, 8 that is element i in word i / (32/bits) at bit bits * (i % (32/bits))). */
static void pack_row(uint8_t *dst, const uint8_t *q, int64_t cols, int bits) {
    memset(dst, 0, (size_t)(cols * bits / 8));
    for (int64_t i = 0; i < cols; i++) {
        uint64_t bit = (uint64_t)i * bits;
        uint32_t v = (uint32_t)q[i] << (bit & 7);
        dst[bit >> 3] |= (uint8_t)v;
        if ((bit & 7) + bits > 8) dst[(bit >> 3) + 1] |= (uint8_t)(v >> 8);
    }
}

void quant_quantize(uint32_t *wq, float *scales, float *biases, const float *w, int64_t rows, int64_t cols,
                    int bits, int group) {
    int64_t groups = cols / group, row_bytes = cols * bits / 8;
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
    for (int64_t r = 0; r < rows; r++) {
        uint8_t q[128 * 1024];  /* codes of one row, in pieces */
        uint8_t *dst = (uint8_t *)wq + r * row_bytes;
        /* rows up to 128K values in one go; longer rows in pieces of whole groups and whole bytes */
        const int64_t piece = 128 * 1024;
        for (int64_t c0 = 0; c0 < cols; c0 += piece) {
            int64_t nc = cols - c0 < piece ? cols - c0 : piece;
            for (int64_t g = 0; g < nc / group; g++) {
                int64_t gi = r * groups + c0 / group + g;
                quantize_group(q + g * group, &scales[gi], &biases[gi], w + r * cols + c0 + g * group, bits, group);
            }
            pack_row(dst + c0 * bits / 8, q, nc, bits);
        }
    }
}

/* ---- dequantize: w = scale q + bias, a group at a time, one loop per bit width ---- */

static inline float param(const void *p, dt_dtype t, int64_t i) {
    switch (t) {
    case DT_BF16: return dt_bf16_to_f32(((const uint16_t *)p)[i]);
    case DT_F16: return dt_f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* Each decodes one group of n values from its packed bytes p. */
static inline void deq8(float *restrict o, const uint8_t *restrict p, int n, float s, float b) {
    for (int i = 0; i < n; i++) o[i] = s * (float)p[i] + b;
}
static inline void deq4(float *restrict o, const uint8_t *restrict p, int n, float s, float b) {
    for (int i = 0; i < n / 2; i++) {
        o[2 * i] = s * (float)(p[i] & 15) + b;
        o[2 * i + 1] = s * (float)(p[i] >> 4) + b;
    }
}
static inline void deq2(float *restrict o, const uint8_t *restrict p, int n, float s, float b) {
    for (int i = 0; i < n / 4; i++) {
        o[4 * i] = s * (float)(p[i] & 3) + b;
        o[4 * i + 1] = s * (float)((p[i] >> 2) & 3) + b;
        o[4 * i + 2] = s * (float)((p[i] >> 4) & 3) + b;
        o[4 * i + 3] = s * (float)(p[i] >> 6) + b;
    }
}
/* bits 3, 5, 6: packs of 8 values in 3 or 5 bytes, or 4 values in 3 bytes (MLX's packs) */
static inline void deq_stream(float *restrict o, const uint8_t *restrict p, int n, float s, float b, const int bits) {
    const int per = bits == 6 ? 4 : 8, bytes = per * bits / 8;
    const uint32_t mask = (1u << bits) - 1;
    for (int k = 0; k < n / per; k++) {
        const uint8_t *pk = p + k * bytes;
        uint64_t v = 0;
        for (int j = 0; j < bytes; j++) v |= (uint64_t)pk[j] << (8 * j);
        for (int j = 0; j < per; j++) o[k * per + j] = s * (float)((uint32_t)(v >> (bits * j)) & mask) + b;
    }
}

/* Rows of one (bits, group): both constants once inlined, so each group's loop has a fixed trip count
 * and the compiler vectorises it (GCC's -O2 cost model only takes such loops). */
static inline __attribute__((always_inline)) void deq_rows(float *out, const dt_weight *w, int64_t r0, int64_t nr,
                                                           const int bits, const int group) {
    const int64_t cols = w->cols, groups = cols / group, row_bytes = cols * bits / 8;
    const int gbytes = group * bits / 8;
    for (int64_t r = 0; r < nr; r++) {
        const uint8_t *p = (const uint8_t *)w->data + (r0 + r) * row_bytes;
        float *o = out + r * cols;
        for (int64_t g = 0; g < groups; g++, p += gbytes, o += group) {
            int64_t gi = (r0 + r) * groups + g;
            float sc = param(w->scales, w->qdtype, gi), bi = param(w->biases, w->qdtype, gi);
            switch (bits) {
            case 8: deq8(o, p, group, sc, bi); break;
            case 4: deq4(o, p, group, sc, bi); break;
            case 2: deq2(o, p, group, sc, bi); break;
            default: deq_stream(o, p, group, sc, bi, bits); break;
            }
        }
    }
}

#define DEQ_GROUPS(bits)                                                                  \
    switch (w->qgroup) {                                                                  \
    case 32: deq_rows(out, w, r0, nr, bits, 32); return;                                  \
    case 64: deq_rows(out, w, r0, nr, bits, 64); return;                                  \
    case 128: deq_rows(out, w, r0, nr, bits, 128); return;                                \
    default: break;                                                                       \
    }                                                                                     \
    break

void quant_dequantize_rows(float *out, const dt_weight *w, int64_t r0, int64_t nr) {
    switch (w->qbits) {
    case 8: DEQ_GROUPS(8);
    case 4: DEQ_GROUPS(4);
    case 2: DEQ_GROUPS(2);
    case 3: DEQ_GROUPS(3);
    case 5: DEQ_GROUPS(5);
    case 6: DEQ_GROUPS(6);
    default: break;
    }
    memset(out, 0, sizeof(float) * (size_t)(nr * w->cols));  /* a setting quant_check refuses */
}

void dt_weight_rows_f32(float *out, const dt_weight *w, int64_t r0, int64_t nr) {
    if (w->qbits) {
        quant_dequantize_rows(out, w, r0, nr);
        return;
    }
    size_t es = dt_dtype_size(w->dtype);
    dt_to_f32(out, (const char *)w->data + (size_t)(r0 * w->cols) * es, w->dtype, (size_t)(nr * w->cols));
}
