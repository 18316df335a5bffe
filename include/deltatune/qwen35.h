/* The Qwen3.5 text decoder on the CPU: fp32 arithmetic over weights kept in their
 * stored dtype. Knows nothing of files or tokens-as-text. */
#ifndef DELTATUNE_QWEN35_H
#define DELTATUNE_QWEN35_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "deltatune/config.h"
#include "deltatune/ops.h"
#include "deltatune/weights.h"

typedef struct {
    /* both kinds */
    dt_linear mlp_gate, mlp_up, mlp_down;
    float *input_norm, *post_norm;          /* [H], fp32 copies */
    /* Gated DeltaNet */
    dt_linear lin_qkv, lin_z, lin_b, lin_a, lin_out;
    float *conv;                            /* [conv_dim, K] */
    float *dt_bias, *a_log;                 /* [Hv] */
    float *lin_norm;                        /* [Dv] */
    /* gated attention */
    dt_linear att_q, att_k, att_v, att_o;
    float *q_norm, *k_norm;                 /* [head_dim] */
} qwen35_layer;

typedef struct qwen35_workspace qwen35_workspace;

typedef struct {
    qwen35_config cfg;
    dt_weight embed, lm_head;               /* lm_head = embed when tied */
    float *final_norm;
    qwen35_layer *layers;
    float *small;                           /* owns every fp32 vector above */
    int64_t ce_chunk;                       /* training loss: tokens per LM-head chunk; 0 = all at
                                               once (the full logits: only to measure what chunking saves) */
    qwen35_workspace *ws;
} qwen35_model;

/* A batch of sequences packed back to back, no padding: sequence i holds
 * seq_lens[i] tokens. labels (may be NULL) follow the Hugging Face convention. */
typedef struct {
    const int32_t *ids;
    const int32_t *labels;
    const int *seq_lens;
    int n_seqs;
    int n_tokens;
} qwen35_batch;

/* 0 if the batch is well formed for a model of vocab_size (no empty sequence, lengths adding to
 * n_tokens, ids and labels inside the vocabulary), with *longest its longest sequence; else an
 * error naming the sequence or position. */
int qwen35_batch_check(const qwen35_batch *b, int vocab_size, int64_t *longest);

/* weights[i] belongs to specs[i] (as produced by qwen35_tensor_specs). */
int qwen35_model_init(qwen35_model *m, const qwen35_config *cfg,
                      const qwen35_tensor_spec *specs, const dt_weight *weights, int n);
void qwen35_model_free(qwen35_model *m);
/* Attaches a LoRA to the linear (kind, layer); its shapes must match. NULL detaches. */
int qwen35_model_set_lora(qwen35_model *m, qwen35_wkind kind, int layer, const dt_lora *lora);

/* Sum of the cross-entropy over the counted targets (label of the next position,
 * not -100, within the same sequence) and their count. The LM head runs in chunks:
 * full [tokens x vocab] logits never exist. */
int qwen35_eval_loss(qwen35_model *m, const qwen35_batch *b, double *loss_sum, int64_t *n_targets);
/* Forward and backward of one micro-batch for LoRA training: adds
 * grad_scale * d(loss_sum)/d(A, B) into the dA and dB of every attached LoRA, and returns the
 * batch's loss sum and target count (as qwen35_eval_loss). The trainer passes
 * grad_scale = 1 / (targets in the whole optimiser step), so accumulated micro-batches give the
 * gradient of the step's token-mean loss. With grad_checkpoint each layer keeps only its input
 * and is recomputed during the backward; without, every layer's activations are kept. */
int qwen35_forward_backward(qwen35_model *m, const qwen35_batch *b, double grad_scale,
                            bool grad_checkpoint, double *loss_sum, int64_t *n_targets);
/* Every position's logits, [n_tokens, vocab] (for tests and small vocabularies). */
int qwen35_forward_logits(qwen35_model *m, const qwen35_batch *b, float *logits);

/* Incremental decoding of one sequence: attention layers keep their keys and values, Gated
 * DeltaNet layers their conv window and recurrent state, so a new token costs O(1) in those
 * layers and the prompt is never run again. */
typedef struct {
    int64_t max_len, n_past;
    float **k_cache, **v_cache;   /* per attention layer: [max_len, kv_dim], after norm and RoPE */
    float **conv_hist;            /* per DeltaNet layer: [K - 1, conv_dim], the last projected inputs */
    float **dn_state;             /* per DeltaNet layer: [Hv, dk, dv] */
    float *scores;                /* attention scratch, grown on demand */
    int64_t scores_cap;
    float *block;                 /* owns the caches */
    int64_t block_floats;
} qwen35_state;

int qwen35_state_init(qwen35_state *s, const qwen35_config *c, int64_t max_len);
void qwen35_state_reset(qwen35_state *s);   /* back to an empty sequence */
void qwen35_state_free(qwen35_state *s);
/* Runs n more tokens of the sequence held by s (positions n_past ..). logits receives
 * [n, vocab] (every new position) or, with last_only, the last position's [vocab]. Refuses
 * to go past max_len. */
int qwen35_forward_cached(qwen35_model *m, qwen35_state *s, const int32_t *ids, int n, float *logits,
                          bool last_only);

/* Bytes a run needs beyond the weights, planned from the shapes. */
typedef struct {
    int64_t weights;            /* as stored */
    int64_t activations;        /* forward (eval) working set */
    int64_t lora_params;        /* fp32 LoRA A and B */
    int64_t optimizer;          /* AdamW moments + gradients of LoRA */
    int64_t train_activations;  /* saved for backward (per-layer checkpointing if enabled) */
    int64_t total_train;
} qwen35_memory;
void qwen35_memory_estimate(const qwen35_config *c, int64_t weight_bytes, int batch, int seq_len,
                            int lora_rank, int grad_checkpoint, qwen35_memory *out);

#endif
