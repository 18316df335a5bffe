/* Partial rotary embedding, half-split (NeoX) layout, on the first rot_dim dims of
 * each head (qwen35.md §5). The backward is the inverse rotation. */
#include "ops/real.h"

static void rope_rotate(real *x, const int32_t *pos, int64_t T, int n_heads, int head_dim, int rot_dim,
                        double theta, real sign) {
    int half = rot_dim / 2;
#pragma omp parallel for schedule(static) if (T * n_heads * head_dim > PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        real c[half > 0 ? half : 1], s[half > 0 ? half : 1];
        for (int i = 0; i < half; i++) {
            /* fp32 frequencies and angles, as transformers computes them */
            float inv_freq = (float)(1.0 / pow(theta, (double)(2 * i) / rot_dim));
            float ang = (float)pos[t] * inv_freq;
            c[i] = cosf(ang);
            s[i] = sign * sinf(ang);
        }
        for (int h = 0; h < n_heads; h++) {
            real *v = x + (t * n_heads + h) * (int64_t)head_dim;
            for (int i = 0; i < half; i++) {
                real a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

void rope_forward(real *x, const int32_t *pos, int64_t T, int n_heads, int head_dim, int rot_dim, double theta) {
    rope_rotate(x, pos, T, n_heads, head_dim, rot_dim, theta, 1);
}

void rope_backward(real *d, const int32_t *pos, int64_t T, int n_heads, int head_dim, int rot_dim, double theta) {
    rope_rotate(d, pos, T, n_heads, head_dim, rot_dim, theta, -1);
}
