/* The Qwen3.5 decoder on a CUDA GPU: the same contract as qwen35_forward_backward and
 * qwen35_eval_loss (qwen35.h), computed from a device copy of the host model's weights in
 * bf16. LoRA masters, their gradients and the optimiser stay on the host in fp32: the
 * device gets bf16 copies of A and B at each qwen35_cuda_sync_lora and returns the fp32
 * gradients into the host dA and dB, so the trainer, its AdamW and its checkpoints are the
 * ones the CPU path uses. Builds without CUDA get versions that say so. */
#ifndef DELTATUNE_QWEN35_CUDA_H
#define DELTATUNE_QWEN35_CUDA_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "deltatune/optim.h"
#include "deltatune/qwen35.h"

typedef struct qwen35_cuda qwen35_cuda;

/* True when this build has the CUDA backend and a device is present. */
bool qwen35_cuda_available(void);
/* Uploads m's weights (as bf16) to the GPU. m must outlive g; its LoRAs are read at each
 * qwen35_cuda_sync_lora. */
int qwen35_cuda_create(qwen35_cuda **g, const qwen35_model *m);
void qwen35_cuda_free(qwen35_cuda *g);
/* Copies the A and B of every LoRA attached to m to the device (after each optimiser step).
 * The attached set must not change after the first call. */
int qwen35_cuda_sync_lora(qwen35_cuda *g, const qwen35_model *m);
/* The optimiser on the device: after qwen35_cuda_optim_upload the device keeps fp32 masters of
 * every LoRA's A and B (from loras[i]->A, B) and their AdamW moments (moments[4 i + 0..3]:
 * m_A, v_A, m_B, v_B, as the trainer stores them), the gradients stay on the device, and
 * a step moves nothing between host and device. qwen35_cuda_optim_download brings the masters
 * and moments back (before saving). */
int qwen35_cuda_optim_upload(qwen35_cuda *g, const qwen35_model *m, dt_lora *const *loras, float *const *moments,
                             int n);
int qwen35_cuda_optim_download(qwen35_cuda *g, dt_lora *const *loras, float *const *moments, int n);
/* The global L2 norm of the accumulated device gradients. */
int qwen35_cuda_grad_norm(qwen35_cuda *g, double *norm);
/* AdamW (optim.h's arithmetic) on every LoRA with its gradient times grad_mul (clipping); then
 * the bf16 copies follow and the gradients are zeroed. step is 1-based. */
int qwen35_cuda_adamw(qwen35_cuda *g, int64_t step, double lr, const adamw_config *c, double grad_mul);
/* As qwen35_forward_backward: the gradients are added into the host LoRAs' dA and dB, or, with
 * the optimiser on the device, into the device's. */
int qwen35_cuda_forward_backward(qwen35_cuda *g, const qwen35_model *m, const qwen35_batch *b, double grad_scale,
                                 bool grad_checkpoint, double *loss_sum, int64_t *n_targets);
/* How many training steps ran as a replayed CUDA graph: a step whose shapes, checkpointing and
 * gradient scale repeat those of the step before it is recorded once and replayed after. */
int64_t qwen35_cuda_graph_launches(const qwen35_cuda *g);
/* As qwen35_eval_loss. */
int qwen35_cuda_eval_loss(qwen35_cuda *g, const qwen35_model *m, const qwen35_batch *b, double *loss_sum,
                          int64_t *n_targets);
/* Incremental decoding of one sequence, as qwen35_forward_cached, with the caches on the device:
 * qwen35_cuda_decode_init makes them for max_len tokens; qwen35_cuda_forward_cached runs n more
 * tokens after the n_past it holds (n_past 0 starts a new sequence) and downloads the last one's
 * logits [vocab]. */
int qwen35_cuda_decode_init(qwen35_cuda *g, int64_t max_len);
int qwen35_cuda_forward_cached(qwen35_cuda *g, const qwen35_model *m, int64_t n_past, const int32_t *ids, int n,
                               float *logits);
/* Device bytes: the weights, and the most allocated at once since create (or the last reset). */
void qwen35_cuda_memory(const qwen35_cuda *g, int64_t *weight_bytes, int64_t *peak_bytes);
void qwen35_cuda_reset_peak(qwen35_cuda *g);
/* Per-op time of the steps since the last call, to f; profiling is on from the first call. */
void qwen35_cuda_profile(qwen35_cuda *g, FILE *f);
/* The device's name, or "" */
const char *qwen35_cuda_device_name(void);

#endif
