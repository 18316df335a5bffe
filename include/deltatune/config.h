/* The Qwen3.5 text-decoder configuration: plain numbers, no file knowledge. */
#ifndef DELTATUNE_CONFIG_H
#define DELTATUNE_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#define QWEN35_MAX_LAYERS 256

typedef struct {
    int vocab_size;
    int hidden_size;
    int n_layers;
    int intermediate_size;
    /* gated full attention */
    int n_heads, n_kv_heads, head_dim;
    /* Gated DeltaNet */
    int lin_n_k_heads, lin_n_v_heads, lin_k_head_dim, lin_v_head_dim, conv_kernel;
    double rms_eps;
    double rope_theta;
    double partial_rotary_factor;
    int rotary_dim;           /* head_dim * partial_rotary_factor, even */
    bool tie_word_embeddings;
    int eos_token_id;         /* -1 when absent */
    int max_position_embeddings;
    uint8_t layer_is_full[QWEN35_MAX_LAYERS];  /* 1 = full attention, 0 = Gated DeltaNet */
} qwen35_config;

/* Sizes presets by name: "tiny", "0.8b", "2b", "4b", "9b". Returns -1 if unknown. */
int qwen35_preset(const char *name, qwen35_config *c);
/* Every invariant the forward relies on (positive sizes, head divisibility, even rotary dim...). */
int qwen35_config_validate(const qwen35_config *c);
/* Parameters of the text model (embeddings once when tied). */
int64_t qwen35_param_count(const qwen35_config *c);

#endif
