/* A Hugging Face Qwen3.5 model folder: config.json plus model.safetensors or shards
 * listed in model.safetensors.index.json. Both layouts: the multimodal one
 * ("model.language_model." prefix, config under "text_config") and the text-only
 * one ("model." prefix, flat config). Also MLX checkpoints as mlx-community publishes them
 * (formats.md §7): "language_model.model." prefix, the five zero-centred norms stored +1,
 * conv1d stored [C,K,1], and affine-quantized linears and embeddings (packed uint32 .weight with
 * .scales and .biases; bits and group size from config.json's "quantization" and its per-module
 * entries; a module is quantized when its .scales exists). The loader undoes the layout changes, so
 * every weight has Hugging Face semantics. */
#ifndef DELTATUNE_CHECKPOINT_H
#define DELTATUNE_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>

#include "deltatune/config.h"
#include "deltatune/safetensors.h"
#include "deltatune/weights.h"

typedef enum { LAYOUT_MULTIMODAL, LAYOUT_TEXT } qwen35_layout;

typedef struct {
    char *dir;
    qwen35_config cfg;
    qwen35_layout layout;     /* from the tensor names found */
    const char *prefix;       /* "model.language_model." or "model." (an MLX checkpoint: the first, the
                                 names its Hugging Face twin and PEFT adapters use) */
    const char *file_prefix;  /* of the names in the files: prefix, or "language_model.model." (MLX) */
    bool mlx;                 /* MLX layout: norms were stored +1 (owned fp32 copies here hold the HF
                                 values), conv1d [C,K,1] (same bytes as [C,1,K]), lm_head under
                                 language_model.lm_head */
    int n_files;
    st_file *files;
    int n_specs;
    qwen35_tensor_spec *specs;   /* qwen35_tensor_specs(cfg) */
    dt_weight *weights;          /* parallel to specs, pointing into the maps */
    bool lm_head_in_file;        /* an untied lm_head.weight was found */
    int n_skipped;               /* model.visual.* and mtp.* tensors */
    int n_unexpected;            /* other tensors, not used */
    int64_t weight_bytes;        /* bytes of the weights as held (dt_weight_bytes: packed words, scales
                                    and biases for quantized ones; after checkpoint_quantize, the new ones) */
    int qbits, qgroup;           /* config.json's quantization (or checkpoint_quantize's); 0 when none */
    int n_quantized;             /* weights held quantized */
    int n_copies;
    void **copies;               /* owned buffers: aligned copies of tensors the file stored misaligned,
                                    unshifted MLX norms, checkpoint_quantize's words, scales and biases */
} checkpoint;

/* Reads config.json, opens every shard, finds every expected tensor and checks its
 * shape and dtype (F32/F16/BF16; quantized: U32 words and scales/biases of the sizes bits and group
 * size imply, quant_check_sizes) before returning. A tied config with an lm_head.weight in the file
 * uses that tensor (cfg.tie_word_embeddings becomes false). Errors name the file and the tensor;
 * a quantization mode other than affine, unknown bits or a group size that does not divide a row
 * is an error naming the mode or the tensor. */
int checkpoint_open(checkpoint *ck, const char *dir);
void checkpoint_close(checkpoint *ck);
/* The weight of the given kind and layer (-1 for global ones); NULL if none. */
const dt_weight *checkpoint_weight(const checkpoint *ck, qwen35_wkind kind, int layer);
/* A buffer the checkpoint owns (freed by checkpoint_close); NULL when out of memory. */
void *checkpoint_own(checkpoint *ck, size_t bytes);
/* The five zero-centred RMSNorms MLX stores +1 (not linear_attn.norm). */
int checkpoint_norm_is_shifted(qwen35_wkind kind);
/* The files of a model folder besides config.json and the weights (generation config, tokenizer,
 * chat template) that a checkpoint written from it carries over; NULL-terminated. */
extern const char *const checkpoint_side_files[];
/* The kinds MLX quantizes: every Linear and the embedding (not norms, conv1d, A_log, dt_bias). */
int checkpoint_kind_is_quantizable(qwen35_wkind kind);

/* config.json <-> qwen35_config. Parsing reads text_config when present, else the top level;
 * layer_types, else full_attention_interval (default 4); rope settings from rope_parameters
 * or the top level. path is used in error messages only. */
int qwen35_config_parse(qwen35_config *c, const char *json_text, size_t len, const char *path);
int qwen35_config_load(qwen35_config *c, const char *path);
/* Writes config.json atomically in the given layout (multimodal: Qwen3_5ForConditionalGeneration
 * with text_config, no vision tensors needed; text: Qwen3_5ForCausalLM, flat). */
int qwen35_config_save(const qwen35_config *c, qwen35_layout layout, const char *path);
/* The same, recording the dtype the weights are stored in ("dtype": "float32", ...);
 * qwen35_config_save writes bfloat16. */
int qwen35_config_save_dtype(const qwen35_config *c, qwen35_layout layout, dt_dtype dtype, const char *path);
/* The same with MLX's quantization record: "quantization" and "quantization_config", each
 * {"group_size", "bits", "mode": "affine"}, at the top level (bits 0: none). */
int qwen35_config_save_quant(const qwen35_config *c, qwen35_layout layout, dt_dtype dtype, int bits, int group,
                             const char *path);

/* config.json's MLX quantization record ("quantization", else "quantization_config" with bits and
 * group_size; a quantization_config with a quant_method, or a mode other than "affine", is an error
 * naming it). *bits = *group = 0 when the config has none. root is the parsed config.json. */
struct json_t;
int qwen35_quant_record(const struct json_t *root, int *bits, int *group);

#endif
