#include "cli/args.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/quant.h"

#define ARGS_MAX 64

const char *const cli_presets[] = {"tiny", "0.8b", "2b", "4b", "9b", NULL};

static bool has_range(const arg_spec *s) { return s->min <= s->max; }

static const char *metavar(const arg_spec *s) {
    if (s->metavar) return s->metavar;
    switch (s->type) {
    case ARG_INT: return "N";
    case ARG_FLOAT: return "X";
    case ARG_STRING: return s->choices ? "NAME" : "VALUE";
    case ARG_BOOL: return "";
    }
    return "";
}

static const char *join_choices(char *buf, size_t cap, const arg_spec *s, const char *sep) {
    buf[0] = 0;
    for (const char *const *c = s->choices; *c; c++) {
        if (c != s->choices) strncat(buf, sep, cap - strlen(buf) - 1);
        strncat(buf, *c, cap - strlen(buf) - 1);
    }
    return buf;
}

static const arg_spec *find(const arg_spec *specs, int n, const char *name, size_t len) {
    for (int i = 0; i < n; i++)
        if (strlen(specs[i].name) == len && strncmp(specs[i].name, name, len) == 0) return &specs[i];
    return NULL;
}

static int set_value(const arg_spec *s, const char *v) {
    switch (s->type) {
    case ARG_INT: {
        char *end;
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (*v == 0 || *end != 0) return dt_err("--%s: '%s' is not an integer", s->name, v);
        double lo = has_range(s) ? s->min : INT_MIN, hi = has_range(s) ? s->max : INT_MAX;
        if (errno == ERANGE || x < lo || x > hi)
            return dt_err("--%s: %s is out of range [%.0f, %.0f]", s->name, v, lo, hi);
        *(int *)s->ptr = (int)x;
        return 0;
    }
    case ARG_FLOAT: {
        char *end;
        errno = 0;
        double x = strtod(v, &end);
        if (*v == 0 || *end != 0 || !isfinite(x)) return dt_err("--%s: '%s' is not a number", s->name, v);
        if (has_range(s) && (x < s->min || x > s->max))
            return dt_err("--%s: %s is out of range [%g, %g]", s->name, v, s->min, s->max);
        *(double *)s->ptr = x;
        return 0;
    }
    case ARG_STRING:
        if (*v == 0) return dt_err("--%s: empty value", s->name);
        if (s->choices) {
            int ok = 0;
            for (const char *const *c = s->choices; *c; c++) ok |= strcmp(*c, v) == 0;
            if (!ok) {
                char list[256];
                return dt_err("--%s: '%s' is not one of %s", s->name, v, join_choices(list, sizeof list, s, ", "));
            }
        }
        *(const char **)s->ptr = v;
        return 0;
    case ARG_BOOL:
        if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes")) *(bool *)s->ptr = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no")) *(bool *)s->ptr = false;
        else return dt_err("--%s: '%s' is not true or false", s->name, v);
        return 0;
    }
    return dt_err("--%s: bad flag type", s->name);
}

int args_parse(const arg_spec *specs, int n, int argc, char **argv) {
    bool seen[ARGS_MAX] = {0};
    if (n > ARGS_MAX) return dt_err("too many flags in the table");
    /* Help wins over every other problem, so "--help" always works even on a broken line. */
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return 1;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0 || a[2] == 0) return dt_err("unexpected argument '%s'", a);
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const arg_spec *s = find(specs, n, name, len);
        if (!s) return dt_err("unknown flag --%.*s", (int)len, name);
        const char *v;
        if (eq) {
            v = eq + 1;
        } else if (s->type == ARG_BOOL) {
            v = "true";
        } else {
            /* A following "--x" is the next flag, not a value; negative numbers still pass. */
            if (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0) {
                if (s->choices) {
                    char list[256];
                    return dt_err("--%s needs a value: one of %s", s->name, join_choices(list, sizeof list, s, ", "));
                }
                return dt_err("--%s needs a value (%s)", s->name, metavar(s));
            }
            v = argv[++i];
        }
        if (set_value(s, v)) return -1;
        seen[s - specs] = true;
    }
    for (int i = 0; i < n; i++)
        if (specs[i].required && !seen[i])
            return dt_err("missing required flag --%s %s", specs[i].name, metavar(&specs[i]));
    return 0;
}

void args_usage(FILE *f, const char *cmd, const char *summary, const arg_spec *specs, int n) {
    fprintf(f, "usage: deltatune %s", cmd);
    for (int i = 0; i < n; i++)
        if (specs[i].required) fprintf(f, " --%s %s", specs[i].name, metavar(&specs[i]));
    fprintf(f, " [flags]\n\n%s\n\nflags:\n", summary);
    for (int i = 0; i < n; i++) {
        const arg_spec *s = &specs[i];
        char left[128], list[256];
        if (s->choices) {
            snprintf(left, sizeof left, "--%s {%s}", s->name, join_choices(list, sizeof list, s, ","));
        } else {
            snprintf(left, sizeof left, "--%s%s%s", s->name, s->type == ARG_BOOL ? "" : " ", metavar(s));
        }
        fprintf(f, "  %-30s %s", left, s->help);
        if (s->required) fprintf(f, " (required)");
        switch (s->type) {
        case ARG_INT:
            if (!s->required) fprintf(f, " (default %d)", *(int *)s->ptr);
            break;
        case ARG_FLOAT:
            if (!s->required) fprintf(f, " (default %g)", *(double *)s->ptr);
            break;
        case ARG_STRING:
            if (!s->required && *(const char **)s->ptr) fprintf(f, " (default %s)", *(const char **)s->ptr);
            break;
        case ARG_BOOL: break;
        }
        fputc('\n', f);
    }
    fprintf(f, "  %-30s %s\n", "-h, --help", "show this help");
}

int cli_fail(const char *cmd, int code) {
    fprintf(stderr, "deltatune %s: %s\n", cmd, dt_errmsg());
    return code;
}

int cli_usage_fail(const char *cmd) {
    fprintf(stderr, "deltatune %s: %s\n(\"deltatune %s --help\" lists the flags)\n", cmd, dt_errmsg(), cmd);
    return EXIT_USAGE;
}

const char *cli_human_bytes(char *buf, size_t cap, double b) {
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (fabs(b) >= 1024 && u < 4) { b /= 1024; u++; }
    if (u == 0) snprintf(buf, cap, "%.0f B", b);
    else snprintf(buf, cap, "%.*f %s", fabs(b) < 10 ? 2 : fabs(b) < 100 ? 1 : 0, b, units[u]);
    return buf;
}

const char *cli_human_count(char *buf, size_t cap, double n) {
    static const char *units[] = {"", "K", "M", "B", "T"};
    int u = 0;
    while (fabs(n) >= 1000 && u < 4) { n /= 1000; u++; }
    if (u == 0) snprintf(buf, cap, "%.0f", n);
    else snprintf(buf, cap, "%.*f%s", fabs(n) < 10 ? 2 : 1, n, units[u]);
    return buf;
}

int args_parse_command(const arg_spec *specs, int n, int argc, char **argv, const char *cmd,
                       const char *summary) {
    int r = args_parse(specs, n, argc, argv);
    if (r == 1) {
        args_usage(stdout, cmd, summary, specs, n);
        return EXIT_OK;
    }
    return r ? cli_usage_fail(cmd) : -1;
}

int args_check_out_model(const char *out, bool force) {
    char *config = io_path_join(out, "config.json");
    bool occupied = config && io_file_exists(config);
    free(config);
    if (occupied && !force) return dt_err("%s already holds a model (config.json); pass --force to overwrite it", out);
    return 0;
}

int args_check_quantize(int bits, int group) {
    if (group != 64 && !bits) return dt_err("--group-size needs --quantize");
    if (bits && bits != 4 && bits != 8) return dt_err("--quantize: %d bits is not supported (4 or 8)", bits);
    return bits ? quant_check(bits, group, 128, "--group-size") : 0;
}
