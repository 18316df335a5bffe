/* MLX affine quantization of a whole checkpoint: on load (train/eval/generate --quantize) and
 * written out in the mlx-community layout (deltatune quantize). formats.md §7. */
#ifndef DELTATUNE_QUANTIZE_CKPT_H
#define DELTATUNE_QUANTIZE_CKPT_H

#include <stdint.h>

#include "deltatune/checkpoint.h"

typedef struct {
    int n_quantized;       /* weights quantized */
    int n_skipped;         /* linears left as they were: the group size does not divide their rows */
    char skipped[512];     /* their names, comma-separated (cut short with "..." when long) */
    int64_t bytes_before, bytes_after;  /* ck->weight_bytes before and after */
} ckpt_quant_stats;

/* Quantizes the linears MLX quantizes (every Linear, the embedding, an untied lm_head; not norms,
 * conv1d, A_log, dt_bias) to bits / group with MLX's affine scheme, into buffers the checkpoint
 * owns, scales and biases in BF16 (as mlx-lm's convert of a bf16 model); nothing mapped is freed.
 * A linear whose row the group size does not divide is skipped and counted, as mlx-lm does.
 * An already quantized checkpoint, or bits / group size MLX does not use, is an error. */
int checkpoint_quantize(checkpoint *ck, int bits, int group, ckpt_quant_stats *st);

/* "4-bit, group 64: 23 weights quantized (1 skipped: layers.0.mlp.down_proj), 1.2 GiB -> 360 MiB"
 * style summary into buf, for the commands' stderr. */
void checkpoint_quant_summary(char *buf, size_t cap, const checkpoint *ck, const ckpt_quant_stats *st);

/* Bytes of a checkpoint of config c with BF16 weights, quantized as checkpoint_quantize would
 * (bits 0: not quantized): for sizing presets without files (deltatune info --preset). */
int64_t qwen35_weight_bytes_quantized(const qwen35_config *c, int bits, int group);

typedef struct {
    int64_t tensors, bytes;   /* written to model.safetensors */
} ckpt_write_stats;

/* Writes the checkpoint's weights to out_dir in the mlx-community layout: model.safetensors with
 * language_model.model.* (and language_model.lm_head.* when untied), quantized modules as .weight
 * (U32), .scales and .biases, the five zero-centred norms stored +1, conv1d as [C,K,1], other
 * tensors in their stored dtype (the model's own norms and conv: the source dtype); config.json with
 * "quantization" and "quantization_config" {"group_size", "bits", "mode": "affine"}; the tokenizer
 * and generation files copied when present. Every file through a temporary name and a rename; the
 * weights are removed again when a later file fails. out_dir must differ from the model folder. */
int checkpoint_write_mlx(const checkpoint *ck, const char *out_dir, ckpt_write_stats *st);

#endif
