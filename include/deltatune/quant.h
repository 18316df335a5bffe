/* MLX's affine quantization (formats.md §7.1, mlx/ops.cpp affine_quantize), bit for bit: a row is
 * cut into groups of `group` consecutive values; per group
 *   n_bins = 2^bits - 1, scale = max((w_max - w_min) / n_bins, 1e-7),
 *   edge = the larger-magnitude end (w_min if |w_min| > |w_max|, scale then stays positive; else
 *   w_max with scale = -scale), q0 = rint(edge / scale), bias = 0,
 *   if q0 != 0: scale = edge / q0, bias = edge,
 *   q_i = clip(rint((w_i - bias) / scale), 0, n_bins);   dequantized: w_i = scale q_i + bias.
 * Packed LSB first into little-endian uint32 words: for bits 2, 4, 8 element i of a row is in word
 * i / (32 / bits) at bit bits * (i % (32 / bits)); for 3, 5, 6 the row is one little-endian bit
 * stream. A packed row has cols * bits / 32 words. */
#ifndef DELTATUNE_QUANT_H
#define DELTATUNE_QUANT_H

#include <stdint.h>

#include "deltatune/dtype.h"
#include "deltatune/weights.h"

/* 0 if (bits, group) is a supported affine setting for rows of `cols` values, else an error that
 * names `what` (a tensor name): unknown bits, a group size MLX does not use, a row the group size
 * does not divide, or a row that does not fill whole uint32 words. */
int quant_check(int bits, int group, int64_t cols, const char *what);
/* 0 for mode "affine" or NULL (older configs have no "mode": affine), else an error naming `what`
 * (mxfp4, nvfp4 and mxfp8 have no biases and are not supported). */
int quant_check_mode(const char *mode, const char *what);
/* Checks that w's packed data, scales and biases have the sizes its shape implies (the loader
 * calls this with the sizes found in the file), besides quant_check of its qbits/qgroup, data
 * dtype U32 and a float qdtype; errors name `what`. */
int quant_check_sizes(const dt_weight *w, int64_t data_bytes, int64_t scales_bytes, int64_t biases_bytes,
                      const char *what);

/* Quantizes rows x cols fp32 values: wq [rows, cols * bits / 32] words, scales and biases
 * [rows, cols / group] in fp32 (the caller stores them in the dtype it wants: MLX keeps the
 * model's dtype, bf16 for mlx-lm's converts; the values are then rounded, as MLX's are). */
void quant_quantize(uint32_t *wq, float *scales, float *biases, const float *w, int64_t rows, int64_t cols,
                    int bits, int group);
/* fp32 values of rows [r0, r0 + nr) of a quantized weight: out is [nr, w->cols]. Serial (callers
 * parallelise over rows); w = scale q + bias with scale and bias read in fp32 from qdtype. */
void quant_dequantize_rows(float *out, const dt_weight *w, int64_t r0, int64_t nr);

/* Rows [r0, r0 + nr) of any weight (quantized or F32/F16/BF16) in fp32. */
void dt_weight_rows_f32(float *out, const dt_weight *w, int64_t r0, int64_t nr);

#endif
