/* PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors. */
#ifndef DELTATUNE_ADAPTER_H
#define DELTATUNE_ADAPTER_H

#include <stdbool.h>

#include "deltatune/checkpoint.h"
#include "deltatune/ops.h"
#include "deltatune/weights.h"

typedef struct {
    qwen35_wkind kind;
    int layer;
    dt_lora lora;        /* A and B owned here, fp32 */
} lora_module;

typedef struct {
    int rank;
    double alpha;
    double dropout;
    bool rslora;
    int n_targets;
    char **targets;      /* PEFT module names, e.g. "q_proj" */
    int n_modules;
    lora_module *modules;
} lora_adapter;

/* Loads a PEFT adapter folder for the model in ck. Every lora_A/lora_B pair must name a
 * module of the model with shapes [r, in] / [out, r]; an adapter for another model is
 * refused naming the tensor. Key prefixes of both layouts are accepted. Unsupported
 * settings (DoRA, rank_pattern/alpha_pattern, bias, fan_in_fan_out) are refused by name. */
int adapter_load(lora_adapter *a, const char *dir, const checkpoint *ck);
void adapter_free(lora_adapter *a);

/* A new adapter on every linear of the model whose PEFT module name is in targets:
 * A Kaiming-uniform (uniform in +-1/sqrt(in), PEFT's default init) from seed, B zero.
 * Unknown target names are refused by name. */
int adapter_init(lora_adapter *a, const checkpoint *ck, int rank, double alpha, bool rslora,
                 double dropout, const char *const *targets, int n_targets, uint64_t seed);
/* Allocates (zeroed) dA/dB for every module, for training. */
int adapter_alloc_grads(lora_adapter *a);
/* Writes dir/adapter_config.json and dir/adapter_model.safetensors in PEFT's format, with
 * keys for the checkpoint's own layout ("base_model.model." + prefix + module path +
 * ".lora_A.weight"), F32; each file via a temp file and a rename. Creates dir if missing. */
int adapter_save(const lora_adapter *a, const checkpoint *ck, const char *dir);

#endif
