/* deltatune info: what a model folder holds and what running it will cost. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "deltatune/checkpoint.h"
#include "deltatune/config.h"
#include "deltatune/error.h"
#include "deltatune/quantize_ckpt.h"
#include "deltatune/qwen35.h"

#define CMD "info"
#define SUMMARY                                                                                       \
    "Prints a model's configuration (layers, sizes, vocabulary, RoPE), its layout, parameter count,\n"   \
    "weight dtypes and bytes as stored (quantized ones: packed words, scales and biases), the MLX\n"     \
    "quantization (bits, group size, tensors), the tensors skipped or unexpected, and the memory a\n"    \
    "run needs for the given batch shape (training estimated with gradient checkpointing).\n"           \
    "--preset NAME gives the same for a preset size without files, assuming BF16 weights; --quantize\n" \
    "sizes them as quantized on load."

typedef struct {
    const char *model, *preset;
    int batch, seq_len, rank;
    int quantize, group_size;  /* bits (0: as stored) */
    bool json;
} info_opts;

/* Per-dtype totals of the weights used (quantized ones under U32, with their scales and biases),
 * and of the quantized ones. */
typedef struct {
    int tensors[DT_DTYPE_COUNT];
    int64_t bytes[DT_DTYPE_COUNT];
    int q_tensors;
    int64_t q_bytes;
} dtype_tally;

static const char *layout_name(const checkpoint *ck) {
    return ck->mlx ? "mlx" : ck->layout == LAYOUT_MULTIMODAL ? "multimodal" : "text";
}

static const char *ordinal(int k) {
    if (k % 100 >= 11 && k % 100 <= 13) return "th";
    return k % 10 == 1 ? "st" : k % 10 == 2 ? "nd" : k % 10 == 3 ? "rd" : "th";
}

/* "24 layers: 18 Gated DeltaNet + 6 full attention (every 4th)", or the full layers listed
 * when they follow no interval. */
static void layer_summary(char *buf, size_t cap, const qwen35_config *c) {
    int n_full = 0, first = -1;
    for (int i = 0; i < c->n_layers; i++)
        if (c->layer_is_full[i]) {
            n_full++;
            if (first < 0) first = i;
        }
    int off = snprintf(buf, cap, "%d layers: %d Gated DeltaNet + %d full attention", c->n_layers,
                       c->n_layers - n_full, n_full);
    if (n_full == 0 || (size_t)off >= cap) return;
    int k = first + 1, regular = 1;
    for (int i = 0; i < c->n_layers; i++) regular &= c->layer_is_full[i] == ((i + 1) % k == 0);
    if (regular && k > 1) {
        snprintf(buf + off, cap - off, " (every %d%s)", k, ordinal(k));
        return;
    }
    if (regular) return;
    off += snprintf(buf + off, cap - off, " (at");
    for (int i = 0; i < c->n_layers && (size_t)off < cap; i++)
        if (c->layer_is_full[i]) off += snprintf(buf + off, cap - off, " %d", i);
    if ((size_t)off < cap) snprintf(buf + off, cap - off, ")");
}

static void print_text(const info_opts *o, const checkpoint *ck, const qwen35_config *c, int64_t params,
                       const dtype_tally *tally, int64_t weight_bytes, const qwen35_memory *mem) {
    char b1[64], b2[64], layers[1024];
    layer_summary(layers, sizeof layers, c);
    if (ck) {
        printf("model        %s\n", ck->dir ? ck->dir : o->model);
        printf("layout       %s (tensors under \"%s\"%s)\n", layout_name(ck), ck->file_prefix,
               ck->mlx ? "; norms stored +1, conv1d [C,K,1]" : "");
    } else {
        if (o->quantize)
            printf("model        preset %s (no files; weights quantized to %d bits, group %d, as --quantize would)\n",
                   o->preset, o->quantize, o->group_size);
        else
            printf("model        preset %s (no files; BF16 weights assumed)\n", o->preset);
    }
    printf("layers       %s\n", layers);
    printf("hidden       %d, MLP %d, RMSNorm eps %g\n", c->hidden_size, c->intermediate_size, c->rms_eps);
    printf("attention    %d heads, %d KV heads, head dim %d\n", c->n_heads, c->n_kv_heads, c->head_dim);
    printf("linear attn  %d key heads x %d, %d value heads x %d, conv kernel %d\n", c->lin_n_k_heads,
           c->lin_k_head_dim, c->lin_n_v_heads, c->lin_v_head_dim, c->conv_kernel);
    printf("vocab        %d, %s\n", c->vocab_size,
           c->tie_word_embeddings ? "tied (lm_head = embed_tokens)" : "untied (own lm_head)");
    printf("rope         theta %g, partial %g (rotary dim %d), max positions %d\n", c->rope_theta,
           c->partial_rotary_factor, c->rotary_dim, c->max_position_embeddings);
    printf("parameters   %s (%lld)\n", cli_human_count(b1, sizeof b1, (double)params), (long long)params);
    printf("weights      %s", cli_human_bytes(b1, sizeof b1, (double)weight_bytes));
    if (ck) {
        const char *sep = ": ";
        for (int t = 0; t < DT_DTYPE_COUNT; t++)
            if (tally->tensors[t]) {
                printf("%s%s %s (%d tensors)", sep, dt_dtype_name((dt_dtype)t),
                       cli_human_bytes(b2, sizeof b2, (double)tally->bytes[t]), tally->tensors[t]);
                sep = ", ";
            }
        printf("; %d file%s\n", ck->n_files, ck->n_files == 1 ? "" : "s");
        if (ck->n_quantized)
            printf("quantized    MLX affine %d-bit, group size %d: %d of %d tensors, %s with scales and biases\n",
                   ck->qbits, ck->qgroup, tally->q_tensors, ck->n_specs,
                   cli_human_bytes(b2, sizeof b2, (double)tally->q_bytes));
        else
            printf("quantized    no\n");
        printf("tensors      %d used, %d skipped (visual/mtp), %d unexpected\n", ck->n_specs, ck->n_skipped,
               ck->n_unexpected);
    } else if (o->quantize) {
        printf(" (linears and embeddings MLX affine %d-bit, group %d, bf16 scales and biases; the rest BF16)\n",
               o->quantize, o->group_size);
    } else {
        printf(" (BF16)\n");
    }
    printf("\nmemory, batch %d x %d tokens, LoRA rank %d, gradient checkpointing:\n", o->batch, o->seq_len,
           o->rank);
    const struct { const char *name; int64_t v; } rows[] = {
        {"weights", mem->weights},
        {"eval activations", mem->activations},
        {"total for eval", mem->weights + mem->activations},
        {"LoRA parameters", mem->lora_params},
        {"optimizer + grads", mem->optimizer},
        {"train activations", mem->train_activations},
        {"total for training", mem->total_train},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        printf("  %-20s %s\n", rows[i].name, cli_human_bytes(b1, sizeof b1, (double)rows[i].v));
}

static json_t *config_json(const qwen35_config *c) {
    json_t *types = json_array();
    for (int i = 0; i < c->n_layers; i++)
        json_array_append_new(types, json_string(c->layer_is_full[i] ? "full_attention" : "linear_attention"));
    return json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:f, s:i, s:b, "
                     "s:i, s:i, s:o}",
                     "vocab_size", c->vocab_size, "hidden_size", c->hidden_size, "num_hidden_layers", c->n_layers,
                     "intermediate_size", c->intermediate_size, "num_attention_heads", c->n_heads,
                     "num_key_value_heads", c->n_kv_heads, "head_dim", c->head_dim, "linear_num_key_heads",
                     c->lin_n_k_heads, "linear_num_value_heads", c->lin_n_v_heads, "linear_key_head_dim",
                     c->lin_k_head_dim, "linear_value_head_dim", c->lin_v_head_dim, "linear_conv_kernel_dim",
                     c->conv_kernel, "rms_norm_eps", c->rms_eps, "rope_theta", c->rope_theta,
                     "partial_rotary_factor", c->partial_rotary_factor, "rotary_dim", c->rotary_dim,
                     "tie_word_embeddings", (int)c->tie_word_embeddings, "eos_token_id", c->eos_token_id,
                     "max_position_embeddings", c->max_position_embeddings, "layer_types", types);
}

static int print_json(const info_opts *o, const checkpoint *ck, const qwen35_config *c, int64_t params,
                      const dtype_tally *tally, int64_t weight_bytes, const qwen35_memory *mem) {
    char layers[1024];
    layer_summary(layers, sizeof layers, c);
    int n_full = 0;
    for (int i = 0; i < c->n_layers; i++) n_full += c->layer_is_full[i];
    json_t *root = json_object();
    if (ck) {
        json_object_set_new(root, "model", json_string(ck->dir ? ck->dir : o->model));
        json_object_set_new(root, "layout", json_string(layout_name(ck)));
        json_object_set_new(root, "prefix", json_string(ck->file_prefix));
    } else {
        json_object_set_new(root, "preset", json_string(o->preset));
    }
    json_object_set_new(root, "config", config_json(c));
    json_object_set_new(root, "layers", json_pack("{s:i, s:i, s:s}", "linear_attention", c->n_layers - n_full,
                                                  "full_attention", n_full, "summary", layers));
    json_object_set_new(root, "params", json_integer(params));
    json_t *w = json_pack("{s:I}", "bytes", (json_int_t)weight_bytes);
    if (ck) {
        json_t *dt = json_object();
        for (int t = 0; t < DT_DTYPE_COUNT; t++)
            if (tally->tensors[t])
                json_object_set_new(dt, dt_dtype_name((dt_dtype)t),
                                    json_pack("{s:i, s:I}", "tensors", tally->tensors[t], "bytes",
                                              (json_int_t)tally->bytes[t]));
        json_object_set_new(w, "dtypes", dt);
        json_object_set_new(w, "files", json_integer(ck->n_files));
        json_object_set_new(w, "tensors", json_integer(ck->n_specs));
        json_object_set_new(w, "skipped", json_integer(ck->n_skipped));
        json_object_set_new(w, "unexpected", json_integer(ck->n_unexpected));
        json_object_set_new(w, "quantization",
                            ck->n_quantized ? json_pack("{s:s, s:i, s:i, s:i, s:I}", "mode", "affine", "bits", ck->qbits,
                                                        "group_size", ck->qgroup, "tensors", tally->q_tensors,
                                                        "bytes", (json_int_t)tally->q_bytes)
                                            : json_null());
    }
    json_object_set_new(root, "weights", w);
    json_object_set_new(root, "memory",
                        json_pack("{s:i, s:i, s:i, s:b, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "batch_size", o->batch,
                                  "seq_len", o->seq_len, "lora_rank", o->rank, "grad_checkpoint", 1, "weights",
                                  (json_int_t)mem->weights, "activations", (json_int_t)mem->activations,
                                  "total_eval", (json_int_t)(mem->weights + mem->activations), "lora_params",
                                  (json_int_t)mem->lora_params, "optimizer", (json_int_t)mem->optimizer,
                                  "train_activations", (json_int_t)mem->train_activations, "total_train",
                                  (json_int_t)mem->total_train));
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(root);
    if (!s) return dt_err("out of memory");
    printf("%s\n", s);
    free(s);
    return 0;
}

static int run(const info_opts *o) {
    checkpoint ck;
    qwen35_config pc;
    const checkpoint *ckp = NULL;
    const qwen35_config *c;
    dtype_tally tally = {0};
    int64_t weight_bytes;
    if (o->model) {
        if (checkpoint_open(&ck, o->model)) return cli_fail(CMD, EXIT_RUNTIME);
        ckp = &ck;
        c = &ck.cfg;
        if (o->quantize) {
            ckpt_quant_stats qs;
            if (checkpoint_quantize(&ck, o->quantize, o->group_size, &qs)) {
                checkpoint_close(&ck);
                return cli_fail(CMD, EXIT_RUNTIME);
            }
        }
        for (int i = 0; i < ck.n_specs; i++) {
            const dt_weight *w = &ck.weights[i];
            tally.tensors[w->dtype]++;
            tally.bytes[w->dtype] += dt_weight_bytes(w);
            if (w->qbits) {
                tally.q_tensors++;
                tally.q_bytes += dt_weight_bytes(w);
            }
        }
        weight_bytes = ck.weight_bytes;
    } else {
        if (qwen35_preset(o->preset, &pc)) return cli_fail(CMD, EXIT_USAGE);
        c = &pc;
        weight_bytes = qwen35_weight_bytes_quantized(c, o->quantize, o->group_size);
    }
    int64_t params = qwen35_param_count(c);
    qwen35_memory mem;
    qwen35_memory_estimate(c, weight_bytes, o->batch, o->seq_len, o->rank, 1, &mem);
    int rc = 0;
    if (o->json) rc = print_json(o, ckp, c, params, &tally, weight_bytes, &mem);
    else print_text(o, ckp, c, params, &tally, weight_bytes, &mem);
    fflush(stdout);
    if (ckp) checkpoint_close(&ck);
    return rc ? cli_fail(CMD, EXIT_RUNTIME) : EXIT_OK;
}

int cmd_info(int argc, char **argv) {
    info_opts o = {.batch = 2, .seq_len = 2048, .rank = 16, .group_size = 64};
    arg_spec specs[] = {
        ARG_STR("model", &o.model, "DIR", "model folder (config.json + safetensors)"),
        ARG_CHOICE("preset", &o.preset, cli_presets, "describe a preset size instead of a folder"),
        ARG_INT_RANGE("batch-size", &o.batch, 1, 65536, "N", "rows per batch for the memory estimate"),
        ARG_INT_RANGE("seq-len", &o.seq_len, 1, 1 << 24, "N", "tokens per row for the memory estimate"),
        ARG_INT_RANGE("lora-rank", &o.rank, 1, 4096, "N", "LoRA rank for the memory estimate"),
        ARG_FLAG("json", &o.json, "print one JSON object instead of text"),
        ARG_QUANTIZE(&o.quantize, &o.group_size),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    if (args_check_quantize(o.quantize, o.group_size)) return cli_usage_fail(CMD);
    if (!o.model == !o.preset) {
        dt_err(o.model ? "--model and --preset exclude each other" : "missing required flag --model DIR (or --preset)");
        return cli_usage_fail(CMD);
    }
    return run(&o);
}
