/* AdamW, learning-rate schedules and gradient clipping, with the semantics of
 * torch.optim.AdamW and transformers' get_{linear,cosine,constant}_schedule_with_warmup. */
#ifndef DELTATUNE_OPTIM_H
#define DELTATUNE_OPTIM_H

#include <stdint.h>

#include "deltatune/ops.h"

typedef struct {
    double beta1, beta2, eps, weight_decay;   /* torch defaults: 0.9, 0.999, 1e-8; decay set by the user */
} adamw_config;

/* One AdamW update of n parameters at learning rate lr, as torch.optim.AdamW (foreach=False,
 * amsgrad=False, maximize=False): p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps). step is 1-based (t). m, v start at 0. */
void adamw_update(real *p, const real *g, real *m, real *v, int64_t n, int64_t step, double lr,
                  const adamw_config *c);

typedef enum { SCHEDULE_LINEAR, SCHEDULE_COSINE, SCHEDULE_CONSTANT } schedule_kind;
/* The names, indexed by schedule_kind and NULL-terminated (a --schedule flag's choices). */
extern const char *const schedule_names[];
/* "linear" | "cosine" | "constant" -> kind; -1 with an error for anything else. */
int schedule_parse(const char *name, schedule_kind *out);
/* The learning rate used for optimiser step `step` (0-based, as the scheduler's
 * last_epoch when the step runs) out of `total` steps with `warmup` warm-up steps. */
double schedule_lr(schedule_kind k, double base_lr, int64_t step, int64_t warmup, int64_t total);

/* sqrt of the sum of squares over several gradient arrays (in double). */
double grad_global_norm(real *const *grads, const int64_t *sizes, int n);
/* Scales every gradient by max_norm / (norm + 1e-6) when that is below 1 (torch's
 * clip_grad_norm_); max_norm <= 0 does nothing. Returns the norm before clipping. */
double grad_clip(real *const *grads, const int64_t *sizes, int n, double max_norm);

#endif
