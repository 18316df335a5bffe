/* LoRA training: micro-batches packed from a tokenized dataset, gradient accumulation over
 * the token mean of a whole optimiser step, global-norm clipping, AdamW with a warm-up
 * schedule, evaluation, checkpoints and exact resume.
 *
 * The trainer drives a model that already has the adapter attached (qwen35_model_set_lora
 * for every module, adapter_alloc_grads done). Everything random is derived from the seed
 * and the position in the run (the epoch for the row order; step and micro-batch for the
 * dropout masks), so a run resumed from a checkpoint repeats the uninterrupted one bit for
 * bit. Nothing is printed: progress goes to the hooks, records to out_dir/train_log.jsonl. */
#ifndef DELTATUNE_TRAINER_H
#define DELTATUNE_TRAINER_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/optim.h"
#include "deltatune/qwen35.h"
#include "deltatune/qwen35_cuda.h"

typedef struct {
    int batch_size;          /* rows per micro-batch, packed back to back */
    int grad_accum;          /* micro-batches per optimiser step */
    int max_seq_len;         /* longer rows are truncated */
    int epochs;              /* passes over the data, when max_steps is 0 */
    int64_t max_steps;       /* > 0: exactly this many steps, wrapping epochs as needed */
    double lr;
    schedule_kind schedule;
    int64_t warmup_steps;
    adamw_config adamw;      /* betas, eps, weight decay */
    double max_grad_norm;    /* global-norm clipping; 0: off */
    uint64_t seed;           /* row order and dropout masks */
    bool shuffle;            /* a seeded permutation per epoch; false: file order */
    bool grad_checkpoint;
    int eval_every;          /* steps between evaluations on the valid set; 0: at the end only */
    int save_every;          /* steps between checkpoints; 0: none (besides an interrupt) */
    const char *out_dir;     /* train_log.jsonl, checkpoint-N/ and the final adapter; NULL: none */
    volatile sig_atomic_t *stop;  /* when it turns non-zero: finish the step, save, return */
    qwen35_cuda *gpu;        /* run the model there (the LoRA and AdamW stay on the host); NULL: CPU */
} trainer_opts;

/* Fills the defaults of the command line (batch 2 x 4, lr 2e-4 linear, torch's AdamW betas,
 * weight decay 0.01, clipping at 1.0, seed 3407, shuffled, checkpointing on). */
void trainer_opts_default(trainer_opts *o);

/* One optimiser step, as logged. */
typedef struct {
    int64_t step;            /* 1-based */
    int64_t total_steps;
    double epoch;            /* steps done / steps per epoch */
    double loss;             /* sum of token losses / targets of the whole step; NAN if skipped */
    double lr;
    double grad_norm;        /* global norm before clipping; NAN if skipped */
    int64_t tokens;          /* targets of the step */
    int64_t input_tokens;    /* tokens run through the model */
    double seconds, tok_per_s;  /* input tokens per second of this step */
    double peak_mem_mb;
    bool skipped;            /* no target in the step: no update */
} train_step_log;

typedef struct {
    int64_t step;
    double epoch;
    double loss;             /* token mean over the valid set */
    int64_t tokens;
    double seconds;
} train_eval_log;

typedef struct {
    void (*on_step)(const train_step_log *s, void *ctx);
    void (*on_eval)(const train_eval_log *e, void *ctx);
    void (*on_save)(const char *dir, int64_t step, void *ctx);  /* a checkpoint was written */
    void *ctx;
} trainer_hooks;

/* A view of the data with rows cut to max_seq_len. */
typedef struct {
    const dt_dataset *d;
    int *len;                /* per row, <= max_seq_len */
    int *targets;            /* per row, counted after the cut */
    int64_t n_tokens, n_targets;
    int n_truncated;         /* rows that were longer than max_seq_len */
} train_rows;

typedef struct {
    trainer_opts o;
    qwen35_model *m;
    lora_adapter *a;
    const checkpoint *ck;    /* for writing adapters in the checkpoint's own layout */
    train_rows train, valid;
    bool has_valid;

    /* the plan */
    int64_t micro_per_epoch, steps_per_epoch, total_steps;
    int64_t n_params;        /* LoRA parameters trained */
    uint64_t data_hash;      /* of the training rows, checked on resume */

    /* where the run stands */
    int64_t step;            /* optimiser steps done */
    int64_t adam_step;       /* updates applied (a step without targets applies none) */
    int64_t tokens_trained;
    int64_t last_saved;      /* step of the newest checkpoint written or resumed from; -1: none */
    double last_loss, last_eval_loss;
    int64_t last_eval_step;

    /* AdamW moments, 4 per module: m_A, v_A, m_B, v_B */
    real **moments;
    real *moment_store;
    /* every LoRA gradient (dA, dB per module) and its length, for the global norm */
    real **grads;
    int64_t *grad_sizes;

    int *order;              /* row order of order_epoch */
    int64_t order_epoch;
    int32_t *ids, *labels;   /* one packed micro-batch */
    int *seq_lens;
    FILE *log;
    char saved_dir[4096];    /* the last checkpoint written or resumed from */
} trainer;

/* Checks the options, cuts the rows, refuses a training set without any target (and a valid
 * set, when given, without one), plans the steps, allocates the optimiser state. valid may
 * be NULL. Creates out_dir when set. */
int trainer_init(trainer *t, const trainer_opts *o, qwen35_model *m, lora_adapter *a, const checkpoint *ck,
                 const dt_dataset *train, const dt_dataset *valid);
/* Continues from a checkpoint folder written by this trainer: AdamW moments, step and
 * position. The adapter attached to the model must be the one loaded from that folder.
 * Refuses a checkpoint whose settings or data differ, naming the setting. */
int trainer_resume(trainer *t, const char *checkpoint_dir);
/* Runs the remaining steps. Returns 0 when done (the adapter saved to out_dir), 1 when
 * stopped through o.stop (a checkpoint and the adapter saved; t->saved_dir says where),
 * -1 on an error: a non-finite loss or gradient stops before the update, leaving the
 * checkpoints already written as they are. */
int trainer_run(trainer *t, const trainer_hooks *h);
/* Token-mean loss of the adapted model over the valid set (dropout off). */
int trainer_eval(trainer *t, double *loss, int64_t *tokens);
void trainer_free(trainer *t);

/* "checkpoint-<step>" under out_dir. */
void trainer_checkpoint_dir(char *buf, size_t cap, const char *out_dir, int64_t step);

#endif
