/* The tensors a Qwen3.5 text decoder needs, by name and shape, from its config.
 * Names are relative to the text model ("layers.3.self_attn.q_proj.weight",
 * "embed_tokens.weight", "norm.weight"), except "lm_head.weight" which is top-level. */
#ifndef DELTATUNE_WEIGHTS_H
#define DELTATUNE_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "deltatune/config.h"
#include "deltatune/dtype.h"

typedef enum {
    W_EMBED, W_FINAL_NORM, W_LM_HEAD,
    W_INPUT_NORM, W_POST_NORM, W_MLP_GATE, W_MLP_UP, W_MLP_DOWN,
    W_LIN_QKV, W_LIN_Z, W_LIN_B, W_LIN_A, W_LIN_CONV, W_LIN_DT_BIAS, W_LIN_A_LOG, W_LIN_NORM, W_LIN_OUT,
    W_ATT_Q, W_ATT_K, W_ATT_V, W_ATT_O, W_ATT_QNORM, W_ATT_KNORM,
    W_KIND_COUNT
} qwen35_wkind;

typedef struct {
    char name[96];
    qwen35_wkind kind;
    int layer;           /* -1 for embed, final norm, lm_head */
    int ndim;
    int64_t shape[3];
} qwen35_tensor_spec;

/* A read-only weight in its stored dtype (mapped from disk or owned elsewhere). A quantized one
 * (qbits > 0, MLX's affine scheme, quant.h) keeps its packed uint32 words in data and its per-group
 * scales and biases beside them; rows and cols are always the logical (dequantized) shape. */
typedef struct {
    dt_dtype dtype;      /* of data; DT_U32 when quantized */
    const void *data;
    int64_t rows, cols;  /* 1-D tensors: rows = 1, cols = length; conv1d [C,1,K]: rows = C, cols = K */
    int qbits;           /* 0: not quantized; else 2, 3, 4, 5, 6 or 8 */
    int qgroup;          /* values per group along a row (32, 64 or 128) */
    dt_dtype qdtype;     /* of scales and biases: F32, F16 or BF16 */
    const void *scales, *biases;  /* [rows, cols / qgroup] each */
} dt_weight;

/* Bytes the weight occupies as stored (packed words, scales and biases included). */
int64_t dt_weight_bytes(const dt_weight *w);

/* Fills specs (caller-owned array of at least qwen35_tensor_count()) in a fixed order;
 * lm_head is included only when the config is untied. Returns the count. */
/* Which kinds are linears LoRA can target, and their PEFT module names
 * ("q_proj", "in_proj_qkv", ...); NULL for the other kinds. */
const char *qwen35_lora_module_name(qwen35_wkind kind);
/* "q_proj, k_proj, ..." : the names qwen35_lora_module_name knows, for messages. */
void qwen35_lora_module_names(char *buf, size_t cap);
/* The module path under the text model: "layers.3.self_attn.q_proj". */
void qwen35_module_path(char *buf, size_t cap, qwen35_wkind kind, int layer);

int qwen35_tensor_count(const qwen35_config *c);
int qwen35_tensor_specs(const qwen35_config *c, qwen35_tensor_spec *specs);
int64_t qwen35_spec_numel(const qwen35_tensor_spec *s);

#endif
