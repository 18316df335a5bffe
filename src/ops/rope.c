#include "ops/real.h"

void rope_forward(real *x, const int32_t *pos, int64_t T, int n_heads, int head_dim, int rot_dim,
                  double theta) {
    int half = rot_dim / 2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        real c[half > 0 ? half : 1], s[half > 0 ? half : 1];
        for (int i = 0; i < half; i++) {
            /* fp32 frequencies and angles, as transformers computes them */
            real inv_freq = (real)(1.0 / pow(theta, (double)(2 * i) / rot_dim));
            real ang = (real)pos[t] * inv_freq;
            c[i] = cos(ang);
            s[i] = sin(ang);
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
