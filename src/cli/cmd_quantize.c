/* deltatune quantize: a bf16/f16/f32 checkpoint written as an MLX affine-quantized one, in the
 * layout mlx-community publishes (which deltatune and MLX tools load). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "deltatune/checkpoint.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/mem.h"
#include "deltatune/quant.h"
#include "deltatune/quantize_ckpt.h"

int cmd_quantize(int argc, char **argv);

#define CMD "quantize"
#define SUMMARY                                                                                            \
    "Quantizes every linear and the embedding of a bf16/f16/f32 checkpoint with MLX's affine scheme\n"    \
    "(per group of --group-size values along a row: uint32-packed codes, a scale and a bias) and\n"      \
    "writes OUT in the mlx-community layout: model.safetensors with language_model.model.* names,\n"     \
    ".weight/.scales/.biases per quantized module (scales and biases in bf16), the norms stored +1 and\n" \
    "conv1d as [C,K,1]; config.json with \"quantization\" and \"quantization_config\"; the tokenizer and\n" \
    "generation files copied. A linear whose row the group size does not divide stays unquantized (as\n" \
    "mlx-lm does; listed on stderr). Every file is written to a temporary name and renamed."

typedef struct {
    const char *model, *out;
    int bits, group_size;
    bool force;
} quantize_opts;

static int run(const quantize_opts *o) {
    if (args_check_out_model(o->out, o->force)) return cli_fail(CMD, EXIT_RUNTIME);
    checkpoint ck;
    if (checkpoint_open(&ck, o->model)) return cli_fail(CMD, EXIT_RUNTIME);
    double t0 = dt_seconds();
    ckpt_quant_stats qs;
    ckpt_write_stats ws;
    int rc = checkpoint_quantize(&ck, o->bits, o->group_size, &qs);
    double t1 = dt_seconds();
    if (rc == 0) rc = checkpoint_write_mlx(&ck, o->out, &ws);
    if (rc == 0) {
        char line[768];
        checkpoint_quant_summary(line, sizeof line, &ck, &qs);
        fprintf(stderr, "quantize: %s\n", line);
        fprintf(stderr, "quantize: wrote %s: %lld tensors, %.1f MiB (quantized in %.1f s, written in %.1f s)\n", o->out,
                (long long)ws.tensors, ws.bytes / 1048576.0, t1 - t0, dt_seconds() - t1);
    }
    checkpoint_close(&ck);
    return rc == 0 ? EXIT_OK : cli_fail(CMD, EXIT_RUNTIME);
}

int cmd_quantize(int argc, char **argv) {
    quantize_opts o = {.group_size = 64};
    arg_spec specs[] = {
        ARG_STR_REQ("model", &o.model, "DIR", "model folder (bf16/f16/f32 weights)"),
        ARG_STR_REQ("out", &o.out, "DIR", "folder for the quantized checkpoint (created if missing)"),
        {.name = "bits", .type = ARG_INT, .ptr = &o.bits, .min = 2, .max = 8, .metavar = "4|8", .required = true,
         .help = "bits per weight (4 or 8; 2, 3, 5 and 6 also load in deltatune and MLX)"},
        ARG_INT_RANGE("group-size", &o.group_size, 32, 128, "N", "values per quantization group: 32, 64 or 128"),
        ARG_FLAG("force", &o.force, "overwrite a model already in OUT"),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    if (quant_check(o.bits, o.group_size, 128, "--bits / --group-size")) return cli_usage_fail(CMD);
    return run(&o);
}
