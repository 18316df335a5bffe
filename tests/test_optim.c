/* AdamW, the schedules and gradient clipping against torch and transformers
 * (tests/fixtures/optim/, made by tools/make_fixtures.py). */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"
#include "deltatune/optim.h"
#include "test.h"

static json_t *load_fixture(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/optim/%s", FIXTURES, name);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) test_fail(__FILE__, __LINE__, "%s: %s", path, je.text);
    return root;
}

/* |a - b| <= tol |b|; an expected 0 must come out as 0. */
static int close_rel(double a, double b, double tol) { return fabs(a - b) <= tol * fabs(b); }

/* A JSON array of numbers into floats; returns the count (at most cap). */
static int read_floats(json_t *arr, real *out, int cap) {
    int n = (int)json_array_size(arr);
    for (int i = 0; i < n && i < cap; i++) out[i] = (real)json_number_value(json_array_get(arr, i));
    return n < cap ? n : cap;
}

TEST(optim_schedule_parse) {
    schedule_kind k;
    CHECK(schedule_parse("linear", &k) == 0 && k == SCHEDULE_LINEAR);
    CHECK(schedule_parse("cosine", &k) == 0 && k == SCHEDULE_COSINE);
    CHECK(schedule_parse("constant", &k) == 0 && k == SCHEDULE_CONSTANT);
    CHECK_ERR(schedule_parse("foo", &k), "'foo'");
    /* the names table (the --schedule choices) reads back as the kind it is indexed by */
    int n = 0;
    for (; schedule_names[n]; n++) CHECK(schedule_parse(schedule_names[n], &k) == 0 && (int)k == n);
    CHECK(n == 3);
}

TEST(optim_schedules_match_transformers) {
    json_t *root = load_fixture("schedules.json");
    if (!root) return;
    double base = json_number_value(json_object_get(root, "base_lr"));
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_array_size(cases) >= 18);
    int checked = 0;
    for (size_t i = 0; i < json_array_size(cases); i++) {
        json_t *c = json_array_get(cases, i);
        schedule_kind k;
        const char *name = json_string_value(json_object_get(c, "schedule"));
        CHECK_OK(schedule_parse(name, &k));
        int64_t warmup = json_integer_value(json_object_get(c, "warmup"));
        int64_t total = json_integer_value(json_object_get(c, "total"));
        json_t *lrs = json_object_get(c, "lrs");
        CHECK((int64_t)json_array_size(lrs) == total);
        for (int64_t s = 0; s < total; s++) {
            double want = json_number_value(json_array_get(lrs, (size_t)s));
            double got = schedule_lr(k, base, s, warmup, total);
            CHECKF(close_rel(got, want, 1e-6), "%s warmup %lld total %lld step %lld: %.17g, transformers %.17g", name,
                   (long long)warmup, (long long)total, (long long)s, got, want);
            checked++;
        }
    }
    CHECK(checked > 100);
    json_decref(root);
}

/* Each run of adamw.json: torch's params, exp_avg and exp_avg_sq after every step. */
TEST(optim_adamw_matches_torch) {
    json_t *root = load_fixture("adamw.json");
    if (!root) return;
    json_t *betas = json_object_get(root, "betas");
    adamw_config cfg = {.beta1 = json_number_value(json_array_get(betas, 0)),
                        .beta2 = json_number_value(json_array_get(betas, 1)),
                        .eps = json_number_value(json_object_get(root, "eps")),
                        .weight_decay = json_number_value(json_object_get(root, "weight_decay"))};
    json_t *runs = json_object_get(root, "runs");
    CHECK(json_array_size(runs) == 2);
    for (size_t r = 0; r < json_array_size(runs); r++) {
        json_t *run = json_array_get(runs, r);
        const char *name = json_string_value(json_object_get(run, "name"));
        enum { CAP = 64 };
        real p[CAP], g[CAP], m[CAP] = {0}, v[CAP] = {0}, want[CAP];
        int n = read_floats(json_object_get(run, "params_init"), p, CAP);
        CHECK(n > 0);
        json_t *steps = json_object_get(run, "steps");
        CHECK(json_array_size(steps) >= 5);
        for (size_t s = 0; s < json_array_size(steps); s++) {
            json_t *st = json_array_get(steps, s);
            int64_t t = json_integer_value(json_object_get(st, "step"));
            double lr = json_number_value(json_object_get(st, "lr"));
            CHECK(read_floats(json_object_get(st, "grad"), g, CAP) == n);
            adamw_update(p, g, m, v, n, t, lr, &cfg);
            const char *fields[] = {"params", "exp_avg", "exp_avg_sq"};
            const real *ours[] = {p, m, v};
            for (int f = 0; f < 3; f++) {
                CHECK(read_floats(json_object_get(st, fields[f]), want, CAP) == n);
                for (int i = 0; i < n; i++)
                    CHECKF(close_rel(ours[f][i], want[i], 1e-5), "%s step %lld %s[%d]: %.9g, torch %.9g", name,
                           (long long)t, fields[f], i, (double)ours[f][i], (double)want[i]);
            }
        }
    }
    json_decref(root);
}

/* Step 1 at lr 0 leaves the parameters alone but advances the moments and the step count. */
TEST(optim_adamw_zero_lr_keeps_params) {
    adamw_config cfg = {0.9, 0.999, 1e-8, 0.1};
    real p[3] = {1, -2, 3}, g[3] = {0.5f, 0.25f, -1}, m[3] = {0}, v[3] = {0};
    adamw_update(p, g, m, v, 3, 1, 0.0, &cfg);
    CHECK(p[0] == 1 && p[1] == -2 && p[2] == 3);
    CHECK(m[0] != 0 && v[2] != 0);
}

TEST(optim_clip_matches_torch) {
    json_t *root = load_fixture("clip_grad_norm.json");
    if (!root) return;
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_array_size(cases) >= 6);
    int clipped_cases = 0;
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c);
        json_t *grads = json_object_get(cs, "grads"), *clipped = json_object_get(cs, "clipped");
        int n = (int)json_array_size(grads);
        CHECK(n > 0 && n <= 8);
        real *g[8] = {0};
        int64_t sizes[8];
        for (int i = 0; i < n; i++) {
            sizes[i] = (int64_t)json_array_size(json_array_get(grads, i));
            g[i] = malloc(sizeof(real) * (size_t)sizes[i]);
            read_floats(json_array_get(grads, i), g[i], (int)sizes[i]);
        }
        double max_norm = json_number_value(json_object_get(cs, "max_norm"));
        double want_norm = json_number_value(json_object_get(cs, "norm"));
        double norm_before = grad_global_norm(g, sizes, n);
        double norm = grad_clip(g, sizes, n, max_norm);
        int bad = !close_rel(norm, want_norm, 1e-6) || norm != norm_before;
        for (int i = 0; i < n && !bad; i++)
            for (int64_t j = 0; j < sizes[i] && !bad; j++) {
                double want = json_number_value(json_array_get(json_array_get(clipped, i), (size_t)j));
                bad = !close_rel(g[i][j], want, 1e-5);
            }
        clipped_cases += json_is_true(json_object_get(cs, "clipped_expected"));
        for (int i = 0; i < n; i++) free(g[i]);
        CHECKF(!bad, "case %zu (max_norm %g): norm %.9g (torch %.9g) or clipped values differ", c, max_norm, norm,
               want_norm);
    }
    CHECK(clipped_cases >= 2);
    json_decref(root);
}

/* max_norm <= 0 means "no clipping": the norm is still returned, nothing changes. */
TEST(optim_clip_off) {
    real a[2] = {3, 4};
    real *g[1] = {a};
    int64_t n[1] = {2};
    CHECK(fabs(grad_clip(g, n, 1, 0) - 5) < 1e-12);
    CHECK(a[0] == 3 && a[1] == 4);
    CHECK(fabs(grad_clip(g, n, 1, 10) - 5) < 1e-12 && a[0] == 3);
    CHECK(fabs(grad_clip(g, n, 1, 1) - 5) < 1e-12);
    CHECK(fabs(a[0] - 3.0 / (5 + 1e-6)) < 1e-6 && fabs(a[1] - 4.0 / (5 + 1e-6)) < 1e-6);
}
