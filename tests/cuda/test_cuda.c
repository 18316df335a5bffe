/* Every CUDA op against the CPU op (the reference) on random data: forward outputs and
 * accumulated gradients. Without a CUDA device it says so and passes nothing
 * ("make test-cuda" on the GPU machine runs it for real). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/cuda_ops.h"
#include "deltatune/error.h"
#include "deltatune/ops.h"

static int passed, failed;
static uint64_t rng = 0x2545f4914f6cdd1dull;

static float urand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}
static float *rvec(int64_t n, float scale) {
    float *v = malloc(sizeof(float) * n);
    for (int64_t i = 0; i < n; i++) v[i] = scale * urand();
    return v;
}
/* A device copy of a host array. */
static float *dev(const float *h, int64_t n) {
    void *d = NULL;
    if (cuda_alloc(&d, sizeof(float) * n) || cuda_upload(d, h, sizeof(float) * n)) return NULL;
    return d;
}
static float *host(const float *d, int64_t n) {
    float *h = malloc(sizeof(float) * n);
    cuda_download(h, d, sizeof(float) * n);
    return h;
}
static void expect_close(const char *name, const float *gpu, const float *cpu, int64_t n, double tol) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)gpu[i] - cpu[i]);
        if (d > num || d != d) num = d;
        if (fabs(cpu[i]) > den) den = fabs(cpu[i]);
    }
    double e = den > 0 ? num / den : num;
    int ok = e <= tol;
    printf("%s cuda_%s: rel err %.2e\n", ok ? "ok  " : "FAIL", name, e);
    if (ok) passed++;
    else failed++;
}

static void test_rmsnorm1p(int64_t rows, int D) {
    float *x = rvec(rows * D, 2), *w = rvec(D, 0.5f), *dy = rvec(rows * D, 1);
    float *dx = rvec(rows * D, 1), *dw = rvec(D, 1);  /* the backward adds onto these */
    float *y = malloc(sizeof(float) * rows * D);
    float *gx = dev(x, rows * D), *gw = dev(w, D), *gdy = dev(dy, rows * D), *gdx = dev(dx, rows * D),
          *gdw = dev(dw, D), *gy = dev(y, rows * D);
    rmsnorm1p_forward(y, x, w, rows, D, 1e-6f);
    rmsnorm1p_backward(dx, dw, dy, x, w, rows, D, 1e-6f);
    rmsnorm1p_forward_cuda(gy, gx, gw, rows, D, 1e-6f);
    rmsnorm1p_backward_cuda(gdx, gdw, gdy, gx, gw, rows, D, 1e-6f);
    if (cuda_check("rmsnorm1p")) {
        printf("FAIL cuda_rmsnorm1p: %s\n", dt_errmsg());
        failed++;
        return;
    }
    char name[64];
    float *hy = host(gy, rows * D), *hdx = host(gdx, rows * D), *hdw = host(gdw, D);
    snprintf(name, sizeof name, "rmsnorm1p_forward_%lldx%d", (long long)rows, D);
    expect_close(name, hy, y, rows * D, 1e-5);
    snprintf(name, sizeof name, "rmsnorm1p_backward_dx_%lldx%d", (long long)rows, D);
    expect_close(name, hdx, dx, rows * D, 1e-5);
    snprintf(name, sizeof name, "rmsnorm1p_backward_dw_%lldx%d", (long long)rows, D);
    expect_close(name, hdw, dw, D, 1e-4);  /* a sum over rows, in another order */
    float *bufs[] = {x, w, dy, dx, dw, y, hy, hdx, hdw};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    float *dbufs[] = {gx, gw, gdy, gdx, gdw, gy};
    for (size_t i = 0; i < sizeof dbufs / sizeof dbufs[0]; i++) cuda_free(dbufs[i]);
}

static void test_swiglu(int64_t n) {
    float *g = rvec(n, 4), *u = rvec(n, 2), *dm = rvec(n, 1), *dg = rvec(n, 1), *du = rvec(n, 1);
    float *m = malloc(sizeof(float) * n);
    float *gg = dev(g, n), *gu = dev(u, n), *gdm = dev(dm, n), *gdg = dev(dg, n), *gdu = dev(du, n), *gm = dev(m, n);
    swiglu_forward(m, g, u, n);
    swiglu_backward(dg, du, dm, g, u, n);
    swiglu_forward_cuda(gm, gg, gu, n);
    swiglu_backward_cuda(gdg, gdu, gdm, gg, gu, n);
    if (cuda_check("swiglu")) {
        printf("FAIL cuda_swiglu: %s\n", dt_errmsg());
        failed++;
        return;
    }
    float *hm = host(gm, n), *hdg = host(gdg, n), *hdu = host(gdu, n);
    expect_close("swiglu_forward", hm, m, n, 1e-5);
    expect_close("swiglu_backward_dgate", hdg, dg, n, 1e-5);
    expect_close("swiglu_backward_dup", hdu, du, n, 1e-5);
    float *bufs[] = {g, u, dm, dg, du, m, hm, hdg, hdu};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    float *dbufs[] = {gg, gu, gdm, gdg, gdu, gm};
    for (size_t i = 0; i < sizeof dbufs / sizeof dbufs[0]; i++) cuda_free(dbufs[i]);
}

int main(void) {
    if (cuda_device_count() == 0) {
        printf("cuda: skipped: no CUDA device here (make test-cuda runs these on a GPU machine)\n");
        return 0;
    }
    printf("cuda: %s\n", cuda_device_name());
    test_rmsnorm1p(7, 64);
    test_rmsnorm1p(300, 1024);  /* the 0.8B hidden size */
    test_rmsnorm1p(33, 256);    /* q/k norm rows */
    test_swiglu(3584 * 5 + 3);
    printf("cuda: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
