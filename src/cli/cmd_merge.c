/* deltatune merge: a PEFT adapter folded into a standalone checkpoint. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "deltatune/adapter.h"
#include "deltatune/checkpoint.h"
#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/mem.h"
#include "deltatune/merge.h"

#define CMD "merge"
#define SUMMARY                                                                                        \
    "Writes OUT/model.safetensors with the model's tensors under their own names, each LoRA target\n" \
    "replaced by W + scale * B A, and copies config.json, the tokenizer and generation files and the\n" \
    "chat template, so OUT is a standalone checkpoint in the base's layout. --dtype converts the\n"    \
    "weight matrices (vectors keep their stored dtype); by default every tensor keeps its own.\n"       \
    "Every file is written to a temporary name and renamed."

typedef struct {
    const char *model, *adapter, *out, *dtype;
    bool force;
} merge_opts;

static int run(const merge_opts *o) {
    static const struct { const char *name; dt_dtype dt; } dtypes[] = {{"bf16", DT_BF16}, {"f16", DT_F16}, {"f32", DT_F32}};
    int out_dtype = -1;
    for (size_t i = 0; o->dtype && i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (!strcmp(o->dtype, dtypes[i].name)) out_dtype = (int)dtypes[i].dt;
    if (args_check_out_model(o->out, o->force)) return cli_fail(CMD, EXIT_RUNTIME);
    checkpoint ck;
    lora_adapter ad;
    if (checkpoint_open(&ck, o->model)) return cli_fail(CMD, EXIT_RUNTIME);
    if (ck.n_quantized) {
        /* folding a LoRA into 4-bit codes would round it away; the adapter fits the float original */
        dt_err("%s: the base is quantized (MLX affine %d-bit, %d tensors); merge needs a float (bf16/f16/f32) "
               "base: merge the adapter into the original the quantized one was made from",
               o->model, ck.qbits, ck.n_quantized);
        checkpoint_close(&ck);
        return cli_fail(CMD, EXIT_RUNTIME);
    }
    if (adapter_load(&ad, o->adapter, &ck)) {
        checkpoint_close(&ck);
        return cli_fail(CMD, EXIT_RUNTIME);
    }
    double t0 = dt_seconds();
    merge_stats st;
    int rc = checkpoint_merge(&ck, &ad, o->out, out_dtype, &st);
    if (rc == 0)
        fprintf(stderr, "merge: wrote %s: %lld tensors (%lld with the LoRA folded in), %.1f MiB in %.1f s\n", o->out,
                (long long)st.tensors, (long long)st.merged, st.bytes / 1048576.0, dt_seconds() - t0);
    adapter_free(&ad);
    checkpoint_close(&ck);
    return rc == 0 ? EXIT_OK : cli_fail(CMD, EXIT_RUNTIME);
}

int cmd_merge(int argc, char **argv) {
    static const char *const dtypes[] = {"bf16", "f16", "f32", NULL};
    merge_opts o = {0};
    arg_spec specs[] = {
        ARG_STR_REQ("model", &o.model, "DIR", "base model folder"),
        ARG_STR_REQ("adapter", &o.adapter, "DIR", "PEFT LoRA adapter folder"),
        ARG_STR_REQ("out", &o.out, "DIR", "folder for the merged checkpoint (created if missing)"),
        ARG_CHOICE("dtype", &o.dtype, dtypes, "dtype of the weight matrices (default: as stored)"),
        ARG_FLAG("force", &o.force, "overwrite a model already in OUT"),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    return run(&o);
}
