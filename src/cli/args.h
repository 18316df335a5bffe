/* Command-line flags, declared as one table per command.
 *
 * A command lists its flags ({name, type, pointer, range, help}); args_parse fills the
 * pointers from argv ("--flag value" or "--flag=value"), checks types, ranges, choices and
 * required flags, and records an error naming the flag ("unknown flag --foo",
 * "--batch-size: 'abc' is not an integer"). The same table generates the help text, so the
 * help cannot drift from what is parsed. */
#ifndef DELTATUNE_CLI_ARGS_H
#define DELTATUNE_CLI_ARGS_H

#include <stdbool.h>
#include <stdio.h>

/* Exit codes shared by every command. */
enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2 };

typedef enum { ARG_INT, ARG_FLOAT, ARG_STRING, ARG_BOOL } arg_type;

typedef struct {
    const char *name;        /* without the leading "--" */
    arg_type type;
    void *ptr;               /* int *, double *, const char **, bool *; holds the default */
    double min, max;         /* ARG_INT / ARG_FLOAT: inclusive range; ignored when min > max */
    const char *help;
    const char *metavar;     /* "N", "DIR", ...; NULL: from the type */
    bool required;
    const char *const *choices;  /* ARG_STRING: NULL-terminated allowed values, or NULL */
} arg_spec;

/* Table rows, so every command spells its flags the same way. */
#define ARG_STR(n, p, meta, h) {.name = n, .type = ARG_STRING, .ptr = p, .min = 1, .help = h, .metavar = meta}
#define ARG_STR_REQ(n, p, meta, h) \
    {.name = n, .type = ARG_STRING, .ptr = p, .min = 1, .help = h, .metavar = meta, .required = true}
#define ARG_CHOICE(n, p, list, h) {.name = n, .type = ARG_STRING, .ptr = p, .min = 1, .help = h, .choices = list}
#define ARG_CHOICE_REQ(n, p, list, h) \
    {.name = n, .type = ARG_STRING, .ptr = p, .min = 1, .help = h, .choices = list, .required = true}
#define ARG_INT_RANGE(n, p, lo, hi, meta, h) \
    {.name = n, .type = ARG_INT, .ptr = p, .min = lo, .max = hi, .help = h, .metavar = meta}
/* --quantize BITS and --group-size N, as train, eval, generate and info take them (group default 64);
 * args_check_quantize then refuses what MLX's affine scheme does not offer. */
#define ARG_QUANTIZE(bits, group)                                                                   \
    ARG_INT_RANGE("quantize", bits, 4, 8, "BITS",                                                   \
                  "quantize the weights on load, MLX's affine scheme: 8 or 4 bits (0: as stored)"), \
    ARG_INT_RANGE("group-size", group, 32, 128, "N", "values per quantization group with --quantize: 32, 64 or 128")
#define ARG_FLOAT_RANGE(n, p, lo, hi, meta, h) \
    {.name = n, .type = ARG_FLOAT, .ptr = p, .min = lo, .max = hi, .help = h, .metavar = meta}
#define ARG_FLAG(n, p, h) {.name = n, .type = ARG_BOOL, .ptr = p, .min = 1, .help = h}

/* Returns 0 when parsed, 1 when -h/--help was given (nothing else checked), -1 on a usage
 * error (message in dt_errmsg(), without the "deltatune <cmd>: " prefix). */
int args_parse(const arg_spec *specs, int n, int argc, char **argv);

/* "usage: deltatune <cmd> <synopsis>\n\n<summary>\n\nflags:\n  --name VALUE  help (default ...)" */
void args_usage(FILE *f, const char *cmd, const char *summary, const arg_spec *specs, int n);

/* args_parse for a command: prints the help (-h) or reports a usage error. Returns -1 when
 * the command should go on, else the exit code to return. */
int args_parse_command(const arg_spec *specs, int n, int argc, char **argv, const char *cmd,
                       const char *summary);

/* Prints "deltatune <cmd>: <dt_errmsg()>" to stderr and returns code. */
int cli_fail(const char *cmd, int code);
/* A usage error: the message, a pointer to --help, and EXIT_USAGE. */
int cli_usage_fail(const char *cmd);

/* Bytes as "1.50 GiB", "12.0 MiB", "512 B". */
const char *cli_human_bytes(char *buf, size_t cap, double bytes);
/* Counts as "752.4M", "1.20B", "950". */
const char *cli_human_count(char *buf, size_t cap, double n);

/* The preset names qwen35_preset knows, NULL-terminated, for --preset flags. */
extern const char *const cli_presets[];

/* The commands; each takes its own argv (argv[0] = command name) and returns an exit code. */
int cmd_eval(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_init_model(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_merge(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_train(int argc, char **argv);

/* 0, or an error (a usage error for the caller) for --quantize / --group-size values out of the scheme. */
int args_check_quantize(int bits, int group);
/* 0, or an error when --out already holds a model (its config.json) and force is off. */
int args_check_out_model(const char *out, bool force);

#endif
