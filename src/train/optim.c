/* AdamW, learning-rate schedules and global-norm clipping, written to give the numbers of
 * torch.optim.AdamW, transformers' get_*_schedule_with_warmup and torch's clip_grad_norm_. */
#include "deltatune/optim.h"

#include <math.h>
#include <string.h>

#include "deltatune/error.h"

void adamw_update(real *p, const real *g, real *m, real *v, int64_t n, int64_t step, double lr,
                  const adamw_config *c) {
    /* torch computes these scalars in Python (double) and applies them to fp32 tensors; the
     * element arithmetic below runs in double and rounds once, which stays within an ulp of
     * torch's fp32 result. */
    double decay = 1.0 - lr * c->weight_decay;
    double b1 = c->beta1, b2 = c->beta2;
    double step_size = lr / (1.0 - pow(b1, (double)step));
    double bc2_sqrt = sqrt(1.0 - pow(b2, (double)step));
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        double gi = g[i];
        /* torch: exp_avg.lerp_(grad, 1 - beta1), i.e. m + (1 - b1) (g - m) */
        double mi = m[i] + (1.0 - b1) * (gi - m[i]);
        double vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        m[i] = (real)mi;
        v[i] = (real)vi;
        double denom = sqrt((double)v[i]) / bc2_sqrt + c->eps;
        p[i] = (real)((double)p[i] * decay - step_size * (double)m[i] / denom);
    }
}

const char *const schedule_names[] = {
    [SCHEDULE_LINEAR] = "linear", [SCHEDULE_COSINE] = "cosine", [SCHEDULE_CONSTANT] = "constant", NULL};

int schedule_parse(const char *name, schedule_kind *out) {
    for (int k = 0; name && schedule_names[k]; k++)
        if (strcmp(name, schedule_names[k]) == 0) {
            *out = (schedule_kind)k;
            return 0;
        }
    return dt_err("unknown schedule '%s' (linear, cosine or constant)", name ? name : "");
}

/* The lambdas of transformers.optimization, term for term (max(1, ...) guards included), so
 * the edge cases (warmup 0, warmup >= total, step past total) give the same values. */
double schedule_lr(schedule_kind k, double base_lr, int64_t step, int64_t warmup, int64_t total) {
    double s = (double)step, w = (double)warmup, t = (double)total;
    if (step < warmup) return base_lr * (s / fmax(1.0, w));
    switch (k) {
    case SCHEDULE_LINEAR: return base_lr * fmax(0.0, (t - s) / fmax(1.0, t - w));
    case SCHEDULE_COSINE: {
        double progress = (s - w) / fmax(1.0, t - w);
        /* num_cycles = 0.5: cos(pi * 0.5 * 2 * progress) */
        return base_lr * fmax(0.0, 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress)));
    }
    case SCHEDULE_CONSTANT: return base_lr;
    }
    return base_lr;
}

double grad_global_norm(real *const *grads, const int64_t *sizes, int n) {
    double sum = 0;
    for (int i = 0; i < n; i++) {
        const real *g = grads[i];
        for (int64_t j = 0; j < sizes[i]; j++) sum += (double)g[j] * g[j];
    }
    return sqrt(sum);
}

double grad_clip(real *const *grads, const int64_t *sizes, int n, double max_norm) {
    double norm = grad_global_norm(grads, sizes, n);
    /* A non-finite norm is the caller's to report; scaling by NaN would only hide where it began. */
    if (max_norm <= 0 || !isfinite(norm)) return norm;
    double coef = max_norm / (norm + 1e-6);
    if (coef >= 1.0) return norm;  /* torch clamps the coefficient at 1: no change */
    real c = (real)coef;
    for (int i = 0; i < n; i++) {
        real *g = grads[i];
        for (int64_t j = 0; j < sizes[i]; j++) g[j] *= c;
    }
    return norm;
}
