/* Checkpoints of a training run. checkpoint-<step>/ holds
 *   adapter_config.json + adapter_model.safetensors  the adapter (a PEFT folder: eval and PEFT read it)
 *   optimizer.safetensors                            AdamW's exp_avg / exp_avg_sq per LoRA tensor, F32
 *   trainer_state.json                               step, epoch, position in the epoch, AdamW's step,
 *                                                    seeds, schedule, the settings and data fingerprint
 *                                                    that must match on resume
 * The folder is built as checkpoint-<step>.tmp/ and renamed, so it is whole or absent. */
#ifndef DELTATUNE_TRAIN_STATE_H
#define DELTATUNE_TRAIN_STATE_H

#include "deltatune/trainer.h"

/* Writes the trainer's current state to dir (through dir.tmp, replacing an older dir). */
int train_state_save(const trainer *t, const char *dir);
/* Reads dir's trainer_state.json and optimizer.safetensors into t: the step, AdamW's moments
 * and step. Refuses, naming the setting, a checkpoint of another run configuration or data. */
int train_state_load(trainer *t, const char *dir);

/* The shortest decimal that reads back as x (0.0002, not 0.00020000000000000001). */
void train_fmt_double(char *buf, size_t cap, double x);

#endif
