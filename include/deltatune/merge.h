/* Folding a LoRA adapter into its base checkpoint: W + scale * B A. */
#ifndef DELTATUNE_MERGE_H
#define DELTATUNE_MERGE_H

#include <stdbool.h>

#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"

typedef struct {
    int64_t tensors, merged;   /* tensors written; of them, LoRA-merged */
    int64_t bytes;
} merge_stats;

/* Writes out_dir/model.safetensors with every tensor of the checkpoint (all shards, the skipped
 * visual and MTP ones too) under its own name, the adapter's targets replaced by
 * W + scale * B A; out_dtype (DT_F32/DT_F16/DT_BF16, or -1 to keep each tensor's) applies to the
 * matrices, vectors keep their stored dtype. The side files of the model folder (config.json,
 * tokenizer and generation files, chat template) are copied. Every file via a temp name and a
 * rename. out_dir must differ from the model folder. */
int checkpoint_merge(const checkpoint *ck, const lora_adapter *a, const char *out_dir, int out_dtype,
                     merge_stats *stats);

#endif
