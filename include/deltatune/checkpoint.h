/* A Hugging Face Qwen3.5 model folder: config.json plus model.safetensors or shards
 * listed in model.safetensors.index.json. Both layouts: the multimodal one
 * ("model.language_model." prefix, config under "text_config") and the text-only
 * one ("model." prefix, flat config). */
#ifndef DELTATUNE_CHECKPOINT_H
#define DELTATUNE_CHECKPOINT_H

#include <stdbool.h>

#include "deltatune/config.h"
#include "deltatune/safetensors.h"
#include "deltatune/weights.h"

typedef enum { LAYOUT_MULTIMODAL, LAYOUT_TEXT } qwen35_layout;

typedef struct {
    char *dir;
    qwen35_config cfg;
    qwen35_layout layout;     /* from the tensor names found */
    const char *prefix;       /* "model.language_model." or "model." */
    int n_files;
    st_file *files;
    int n_specs;
    qwen35_tensor_spec *specs;   /* qwen35_tensor_specs(cfg) */
    dt_weight *weights;          /* parallel to specs, pointing into the maps */
    bool lm_head_in_file;        /* an untied lm_head.weight was found */
    int n_skipped;               /* model.visual.* and mtp.* tensors */
    int n_unexpected;            /* other tensors, not used */
    int64_t weight_bytes;        /* bytes of the tensors used */
    int n_copies;
    void **copies;               /* aligned copies of tensors the file stored misaligned */
} checkpoint;

/* Reads config.json, opens every shard, finds every expected tensor and checks its
 * shape and dtype (F32/F16/BF16) before returning. A tied config with an
 * lm_head.weight in the file uses that tensor (cfg.tie_word_embeddings becomes false).
 * Errors name the file and the tensor. */
int checkpoint_open(checkpoint *ck, const char *dir);
void checkpoint_close(checkpoint *ck);
/* The weight of the given kind and layer (-1 for global ones); NULL if none. */
const dt_weight *checkpoint_weight(const checkpoint *ck, qwen35_wkind kind, int layer);

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

#endif
