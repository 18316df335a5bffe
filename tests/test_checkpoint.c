#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "deltatune/checkpoint.h"
#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "deltatune/quant.h"
#include "deltatune/quantize_ckpt.h"
#include "deltatune/qwen35.h"
#include "test.h"

int io_test_tmpdir(char *buf, size_t cap);
void io_test_rmdir(const char *dir);
int io_test_write_file(const char *path, const void *data, size_t n);

/* ---------------------------------------------------------------- presets, specs */

TEST(config_presets_validate) {
    const char *names[] = {"tiny", "0.8b", "2b", "4b", "9b"};
    for (int i = 0; i < 5; i++) {
        qwen35_config c;
        CHECK_OK(qwen35_preset(names[i], &c));
        CHECK_OK(qwen35_config_validate(&c));
        CHECK(c.rotary_dim == c.head_dim / 4);
    }
    qwen35_config c;
    CHECK_ERR(qwen35_preset("70b", &c), "unknown model size \"70b\"");
    CHECK_OK(qwen35_preset("0.8b", &c));
    CHECK(c.vocab_size == 248320 && c.hidden_size == 1024 && c.n_layers == 24 && c.intermediate_size == 3584);
    CHECK(c.n_heads == 8 && c.n_kv_heads == 2 && c.head_dim == 256 && c.rotary_dim == 64);
    CHECK(c.lin_n_k_heads == 16 && c.lin_n_v_heads == 16 && c.lin_k_head_dim == 128 && c.conv_kernel == 4);
    CHECK(c.tie_word_embeddings && c.eos_token_id == 248044 && c.max_position_embeddings == 262144);
    for (int l = 0; l < 24; l++) CHECK(c.layer_is_full[l] == (l % 4 == 3));
    CHECK_OK(qwen35_preset("9b", &c));
    CHECK(!c.tie_word_embeddings && c.lin_n_v_heads == 32 && c.hidden_size == 4096);
    CHECK_OK(qwen35_preset("tiny", &c));
    CHECK(c.lin_n_v_heads > c.lin_n_k_heads && c.n_heads > c.n_kv_heads);
    int full = 0;
    for (int l = 0; l < c.n_layers; l++) full += c.layer_is_full[l];
    CHECK(full >= 1 && full < c.n_layers);
}

TEST(config_validate_rejects) {
    qwen35_config c, base;
    CHECK_OK(qwen35_preset("tiny", &base));
    c = base; c.n_kv_heads = 3;
    CHECK_ERR(qwen35_config_validate(&c), "num_key_value_heads");
    c = base; c.lin_n_v_heads = 3;
    CHECK_ERR(qwen35_config_validate(&c), "linear_num_value_heads");
    c = base; c.n_layers = QWEN35_MAX_LAYERS + 1;
    CHECK_ERR(qwen35_config_validate(&c), "num_hidden_layers");
    c = base; c.hidden_size = 0;
    CHECK_ERR(qwen35_config_validate(&c), "hidden_size must be positive");
    c = base; c.conv_kernel = 0;
    CHECK_ERR(qwen35_config_validate(&c), "linear_conv_kernel_dim");
    c = base; c.head_dim = 10; c.partial_rotary_factor = 0.3; c.rotary_dim = 3;
    CHECK_ERR(qwen35_config_validate(&c), "even");
    c = base; c.rotary_dim = 8;
    CHECK_ERR(qwen35_config_validate(&c), "does not match");
    c = base; c.rms_eps = 0;
    CHECK_ERR(qwen35_config_validate(&c), "rms_norm_eps");
    c = base; c.eos_token_id = c.vocab_size;
    CHECK_ERR(qwen35_config_validate(&c), "eos_token_id");
}

static int64_t spec_total(const qwen35_config *c) {
    int n = qwen35_tensor_count(c);
    qwen35_tensor_spec *s = calloc((size_t)n, sizeof *s);
    if (!s || qwen35_tensor_specs(c, s) != n) {
        free(s);
        return -1;
    }
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += qwen35_spec_numel(&s[i]);
    free(s);
    return total;
}

/* The counts transformers 5.17 gives for these sizes (Qwen3_5ForCausalLM built on the meta
 * device by tools/param_counts.py, tied embeddings counted once). */
TEST(config_param_count) {
    const struct { const char *name; int64_t n; } want[] = {
        {"0.8b", 752393024LL}, {"2b", 1881825088LL}, {"4b", 4205751296LL}, {"9b", 8953803264LL}};
    for (int i = 0; i < 4; i++) {
        qwen35_config c;
        CHECK_OK(qwen35_preset(want[i].name, &c));
        CHECKF(qwen35_param_count(&c) == want[i].n, "%s: %lld != %lld", want[i].name,
               (long long)qwen35_param_count(&c), (long long)want[i].n);
        CHECK(spec_total(&c) == want[i].n);
    }
    qwen35_config c;
    CHECK_OK(qwen35_preset("tiny", &c));
    CHECK(spec_total(&c) == qwen35_param_count(&c));
    c.tie_word_embeddings = false;
    CHECK(spec_total(&c) == qwen35_param_count(&c));
}

TEST(weights_specs_order_and_shapes) {
    qwen35_config c;
    CHECK_OK(qwen35_preset("0.8b", &c));
    int n = qwen35_tensor_count(&c);
    CHECK(n == 1 + 24 * 5 + 18 * 9 + 6 * 6 + 1);
    qwen35_tensor_spec *s = calloc((size_t)n, sizeof *s);
    CHECK(s);
    CHECK(qwen35_tensor_specs(&c, s) == n);
    CHECK(!strcmp(s[0].name, "embed_tokens.weight") && s[0].kind == W_EMBED && s[0].layer == -1);
    CHECK(s[0].ndim == 2 && s[0].shape[0] == 248320 && s[0].shape[1] == 1024);
    const char *layer0[] = {
        "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
        "layers.0.linear_attn.in_proj_qkv.weight", "layers.0.linear_attn.in_proj_z.weight",
        "layers.0.linear_attn.in_proj_b.weight", "layers.0.linear_attn.in_proj_a.weight",
        "layers.0.linear_attn.conv1d.weight", "layers.0.linear_attn.dt_bias", "layers.0.linear_attn.A_log",
        "layers.0.linear_attn.norm.weight", "layers.0.linear_attn.out_proj.weight",
        "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"};
    for (int i = 0; i < 14; i++) CHECKF(!strcmp(s[1 + i].name, layer0[i]), "%d: %s", i, s[1 + i].name);
    CHECK(s[3].kind == W_LIN_QKV && s[3].shape[0] == 6144 && s[3].shape[1] == 1024);
    CHECK(s[4].shape[0] == 2048 && s[5].shape[0] == 16 && s[6].kind == W_LIN_A && s[6].shape[0] == 16);
    CHECK(s[7].ndim == 3 && s[7].shape[0] == 6144 && s[7].shape[1] == 1 && s[7].shape[2] == 4);
    CHECK(s[8].ndim == 1 && s[8].shape[0] == 16 && s[10].shape[0] == 128);
    CHECK(s[11].shape[0] == 1024 && s[11].shape[1] == 2048);
    CHECK(s[14].kind == W_MLP_DOWN && s[14].shape[0] == 1024 && s[14].shape[1] == 3584);
    int q = -1;
    for (int i = 0; i < n; i++)
        if (s[i].kind == W_ATT_Q) { q = i; break; }
    CHECK(q > 0 && s[q].layer == 3 && !strcmp(s[q].name, "layers.3.self_attn.q_proj.weight"));
    CHECK(s[q].shape[0] == 4096 && s[q].shape[1] == 1024);
    CHECK(!strcmp(s[q + 1].name, "layers.3.self_attn.k_proj.weight") && s[q + 1].shape[0] == 512);
    CHECK(!strcmp(s[q + 3].name, "layers.3.self_attn.o_proj.weight") && s[q + 3].shape[1] == 2048);
    CHECK(!strcmp(s[q + 4].name, "layers.3.self_attn.q_norm.weight") && s[q + 4].shape[0] == 256);
    CHECK(!strcmp(s[q + 5].name, "layers.3.self_attn.k_norm.weight"));
    CHECK(!strcmp(s[n - 1].name, "norm.weight") && s[n - 1].kind == W_FINAL_NORM);
    free(s);

    CHECK_OK(qwen35_preset("9b", &c));
    n = qwen35_tensor_count(&c);
    s = calloc((size_t)n, sizeof *s);
    CHECK(s);
    qwen35_tensor_specs(&c, s);
    CHECK(!strcmp(s[n - 1].name, "lm_head.weight") && s[n - 1].kind == W_LM_HEAD && s[n - 1].shape[0] == 248320);
    CHECK(s[3].shape[0] == 8192 && s[3].shape[1] == 4096);
    free(s);
}

TEST(weights_module_names) {
    CHECK(!strcmp(qwen35_lora_module_name(W_ATT_Q), "q_proj"));
    CHECK(!strcmp(qwen35_lora_module_name(W_ATT_O), "o_proj"));
    CHECK(!strcmp(qwen35_lora_module_name(W_MLP_DOWN), "down_proj"));
    CHECK(!strcmp(qwen35_lora_module_name(W_LIN_QKV), "in_proj_qkv"));
    CHECK(!strcmp(qwen35_lora_module_name(W_LIN_A), "in_proj_a"));
    CHECK(!strcmp(qwen35_lora_module_name(W_LIN_B), "in_proj_b"));
    CHECK(!strcmp(qwen35_lora_module_name(W_LIN_OUT), "out_proj"));
    CHECK(qwen35_lora_module_name(W_LIN_CONV) == NULL && qwen35_lora_module_name(W_EMBED) == NULL);
    CHECK(qwen35_lora_module_name(W_LM_HEAD) == NULL && qwen35_lora_module_name(W_ATT_QNORM) == NULL);
    int n = 0;
    for (int k = 0; k < W_KIND_COUNT; k++) n += qwen35_lora_module_name((qwen35_wkind)k) != NULL;
    CHECK(n == 12);
    char b[96];
    qwen35_module_path(b, sizeof b, W_ATT_Q, 3);
    CHECK(!strcmp(b, "layers.3.self_attn.q_proj"));
    qwen35_module_path(b, sizeof b, W_LIN_QKV, 0);
    CHECK(!strcmp(b, "layers.0.linear_attn.in_proj_qkv"));
    qwen35_module_path(b, sizeof b, W_MLP_UP, 0);
    CHECK(!strcmp(b, "layers.0.mlp.up_proj"));
    qwen35_module_path(b, sizeof b, W_INPUT_NORM, 12);
    CHECK(!strcmp(b, "layers.12.input_layernorm"));
    qwen35_module_path(b, sizeof b, W_EMBED, -1);
    CHECK(!strcmp(b, "embed_tokens"));
    qwen35_module_path(b, 8, W_ATT_Q, 3);
    CHECK(strlen(b) == 7);
}

/* ---------------------------------------------------------------- config.json */

/* formats.md §3.1, Qwen/Qwen3.5-0.8B */
static const char *official_08b =
    "{\n"
    "  \"architectures\": [\"Qwen3_5ForConditionalGeneration\"],\n"
    "  \"image_token_id\": 248056,\n"
    "  \"model_type\": \"qwen3_5\",\n"
    "  \"text_config\": {\n"
    "    \"attention_bias\": false, \"attention_dropout\": 0.0, \"attn_output_gate\": true,\n"
    "    \"dtype\": \"bfloat16\", \"eos_token_id\": 248044, \"full_attention_interval\": 4,\n"
    "    \"head_dim\": 256, \"hidden_act\": \"silu\", \"hidden_size\": 1024, \"initializer_range\": 0.02,\n"
    "    \"intermediate_size\": 3584,\n"
    "    \"layer_types\": [\n"
    "      \"linear_attention\", \"linear_attention\", \"linear_attention\", \"full_attention\",\n"
    "      \"linear_attention\", \"linear_attention\", \"linear_attention\", \"full_attention\",\n"
    "      \"linear_attention\", \"linear_attention\", \"linear_attention\", \"full_attention\",\n"
    "      \"linear_attention\", \"linear_attention\", \"linear_attention\", \"full_attention\",\n"
    "      \"linear_attention\", \"linear_attention\", \"linear_attention\", \"full_attention\",\n"
    "      \"linear_attention\", \"linear_attention\", \"linear_attention\", \"full_attention\"\n"
    "    ],\n"
    "    \"linear_conv_kernel_dim\": 4, \"linear_key_head_dim\": 128, \"linear_num_key_heads\": 16,\n"
    "    \"linear_num_value_heads\": 16, \"linear_value_head_dim\": 128, \"max_position_embeddings\": 262144,\n"
    "    \"mlp_only_layers\": [], \"model_type\": \"qwen3_5_text\", \"mtp_num_hidden_layers\": 1,\n"
    "    \"mtp_use_dedicated_embeddings\": false, \"num_attention_heads\": 8, \"num_hidden_layers\": 24,\n"
    "    \"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-06, \"tie_word_embeddings\": true, \"use_cache\": true,\n"
    "    \"vocab_size\": 248320, \"mamba_ssm_dtype\": \"float32\",\n"
    "    \"rope_parameters\": {\n"
    "      \"mrope_interleaved\": true, \"mrope_section\": [11, 11, 10], \"rope_type\": \"default\",\n"
    "      \"rope_theta\": 10000000, \"partial_rotary_factor\": 0.25\n"
    "    }\n"
    "  },\n"
    "  \"tie_word_embeddings\": true,\n"
    "  \"transformers_version\": \"4.57.0.dev0\",\n"
    "  \"video_token_id\": 248057,\n"
    "  \"vision_config\": {\n"
    "    \"deepstack_visual_indexes\": [], \"depth\": 12, \"hidden_act\": \"gelu_pytorch_tanh\",\n"
    "    \"hidden_size\": 768, \"in_channels\": 3, \"initializer_range\": 0.02, \"intermediate_size\": 3072,\n"
    "    \"model_type\": \"qwen3_5\", \"num_heads\": 12, \"num_position_embeddings\": 2304,\n"
    "    \"out_hidden_size\": 1024, \"patch_size\": 16, \"spatial_merge_size\": 2, \"temporal_patch_size\": 2\n"
    "  },\n"
    "  \"vision_end_token_id\": 248054,\n"
    "  \"vision_start_token_id\": 248053\n"
    "}\n";

static int parse_str(qwen35_config *c, const char *text) {
    return qwen35_config_parse(c, text, strlen(text), "dir/config.json");
}

/* text with the first occurrence of from replaced by to (caller frees). */
static char *replaced(const char *text, const char *from, const char *to) {
    const char *at = strstr(text, from);
    if (!at) return NULL;
    size_t a = (size_t)(at - text), f = strlen(from), t = strlen(to), n = strlen(text);
    char *out = malloc(n - f + t + 1);
    memcpy(out, text, a);
    memcpy(out + a, to, t);
    memcpy(out + a + t, at + f, n - a - f + 1);
    return out;
}

static void expect_parse_err(const char *from, const char *to, const char *needle) {
    char *text = replaced(official_08b, from, to);
    CHECKF(text, "pattern %s not found", from);
    qwen35_config c;
    dt_err_clear();
    int rc = parse_str(&c, text);
    free(text);
    CHECKF(rc != 0, "replacing %s with %s parsed", from, to);
    CHECKF(strstr(dt_errmsg(), needle) && strstr(dt_errmsg(), "dir/config.json"), "error \"%s\" lacks \"%s\"",
           dt_errmsg(), needle);
}

static int configs_equal(const qwen35_config *a, const qwen35_config *b) {
    int same = a->vocab_size == b->vocab_size && a->hidden_size == b->hidden_size && a->n_layers == b->n_layers &&
               a->intermediate_size == b->intermediate_size && a->n_heads == b->n_heads &&
               a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim && a->lin_n_k_heads == b->lin_n_k_heads &&
               a->lin_n_v_heads == b->lin_n_v_heads && a->lin_k_head_dim == b->lin_k_head_dim &&
               a->lin_v_head_dim == b->lin_v_head_dim && a->conv_kernel == b->conv_kernel &&
               a->rms_eps == b->rms_eps && a->rope_theta == b->rope_theta &&
               a->partial_rotary_factor == b->partial_rotary_factor && a->rotary_dim == b->rotary_dim &&
               a->tie_word_embeddings == b->tie_word_embeddings && a->eos_token_id == b->eos_token_id &&
               a->max_position_embeddings == b->max_position_embeddings;
    return same && memcmp(a->layer_is_full, b->layer_is_full, sizeof a->layer_is_full) == 0;
}

TEST(config_parse_official_multimodal) {
    qwen35_config c, want;
    CHECK_OK(parse_str(&c, official_08b));
    CHECK_OK(qwen35_preset("0.8b", &want));
    CHECK(c.vocab_size == 248320 && c.hidden_size == 1024 && c.n_layers == 24 && c.intermediate_size == 3584);
    CHECK(c.n_heads == 8 && c.n_kv_heads == 2 && c.head_dim == 256);
    CHECK(c.lin_n_k_heads == 16 && c.lin_n_v_heads == 16 && c.lin_k_head_dim == 128 && c.lin_v_head_dim == 128);
    CHECK(c.conv_kernel == 4 && c.rms_eps == 1e-6 && c.rope_theta == 1e7 && c.partial_rotary_factor == 0.25);
    CHECK(c.rotary_dim == 64 && c.tie_word_embeddings && c.eos_token_id == 248044);
    CHECK(c.max_position_embeddings == 262144);
    for (int l = 0; l < 24; l++) CHECK(c.layer_is_full[l] == (l % 4 == 3));
    CHECK(configs_equal(&c, &want));
}

TEST(config_parse_variants) {
    /* tie only at the top level (the MLX 9B config): text_config lacks it */
    char *t = replaced(official_08b, "\"tie_word_embeddings\": true, \"use_cache\"", "\"use_cache\"");
    char *t2 = replaced(t, "\"tie_word_embeddings\": true,\n  \"transformers", "\"tie_word_embeddings\": false,\n  \"transformers");
    qwen35_config c;
    CHECK_OK(parse_str(&c, t2));
    CHECK(!c.tie_word_embeddings);
    free(t);
    free(t2);

    /* layer_types absent: full_attention_interval decides */
    const char *flat =
        "{\"architectures\": [\"Qwen3_5ForCausalLM\"], \"model_type\": \"qwen3_5_text\",\n"
        " \"vocab_size\": 512, \"hidden_size\": 64, \"num_hidden_layers\": 6, \"intermediate_size\": 96,\n"
        " \"num_attention_heads\": 4, \"num_key_value_heads\": 1, \"head_dim\": 32,\n"
        " \"linear_num_key_heads\": 2, \"linear_num_value_heads\": 2, \"linear_key_head_dim\": 16,\n"
        " \"linear_value_head_dim\": 16, \"full_attention_interval\": 3, \"rope_theta\": 5000.0,\n"
        " \"partial_rotary_factor\": 0.5, \"eos_token_id\": [7, 9], \"tie_word_embeddings\": false,\n"
        " \"rms_norm_eps\": 1e-5}";
    CHECK_OK(parse_str(&c, flat));
    CHECK(c.vocab_size == 512 && c.n_layers == 6 && c.head_dim == 32 && c.rotary_dim == 16);
    CHECK(c.rope_theta == 5000 && c.partial_rotary_factor == 0.5 && c.eos_token_id == 7 && c.rms_eps == 1e-5);
    CHECK(!c.tie_word_embeddings && c.conv_kernel == 4 && c.max_position_embeddings == 32768);
    const uint8_t want[6] = {0, 0, 1, 0, 0, 1};
    CHECK(memcmp(c.layer_is_full, want, 6) == 0);

    /* defaults: interval 4, rope 1e7 / 0.25, untied, no eos */
    const char *bare =
        "{\"model_type\": \"qwen3_5_text\", \"vocab_size\": 512, \"hidden_size\": 64, \"num_hidden_layers\": 8,\n"
        " \"intermediate_size\": 96, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": 32,\n"
        " \"linear_num_key_heads\": 2, \"linear_num_value_heads\": 4, \"linear_key_head_dim\": 16,\n"
        " \"linear_value_head_dim\": 16, \"eos_token_id\": null}";
    CHECK_OK(parse_str(&c, bare));
    CHECK(c.rope_theta == 1e7 && c.partial_rotary_factor == 0.25 && c.rotary_dim == 8);
    CHECK(!c.tie_word_embeddings && c.eos_token_id == -1 && c.rms_eps == 1e-6);
    for (int l = 0; l < 8; l++) CHECK(c.layer_is_full[l] == (l % 4 == 3));
}

TEST(config_parse_errors) {
    expect_parse_err("\"hidden_size\": 1024, ", "", "missing required field text_config.hidden_size");
    expect_parse_err("\"hidden_size\": 1024", "\"hidden_size\": \"1024\"", "text_config.hidden_size: expected an integer, found a string");
    expect_parse_err("\"hidden_size\": 1024", "\"hidden_size\": 1024.5", "text_config.hidden_size");
    expect_parse_err("\"num_hidden_layers\": 24", "\"num_hidden_layers\": 23", "layer_types: 24 entries for 23 layers");
    expect_parse_err("\"linear_attention\", \"full_attention\",\n      \"linear", "\"linear_attention\", \"sliding_attention\",\n      \"linear", "layer_types[3]");
    expect_parse_err("\"model_type\": \"qwen3_5\"", "\"model_type\": \"llama\"", "\"llama\" is not supported");
    expect_parse_err("\"model_type\": \"qwen3_5_text\"", "\"model_type\": \"qwen3_next\"", "text_config.model_type");
    expect_parse_err("\"attn_output_gate\": true", "\"attn_output_gate\": false", "attn_output_gate");
    expect_parse_err("\"attention_bias\": false", "\"attention_bias\": true", "attention_bias");
    expect_parse_err("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"", "rope_type: \"yarn\"");
    expect_parse_err("\"rope_theta\": 10000000", "\"rope_theta\": \"big\"", "rope_parameters.rope_theta");
    expect_parse_err("\"head_dim\": 256", "\"head_dim\": 20", "rotary dimension 5");
    /* a factor whose product with head_dim overflows an int is refused, not cast */
    expect_parse_err("\"partial_rotary_factor\": 0.25", "\"partial_rotary_factor\": 1e300",
                     "partial_rotary_factor 1e+300 is outside (0, 1]");
    expect_parse_err("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": 1", "tie_word_embeddings: expected true or false");
    expect_parse_err("\"image_token_id\"", "\"quantization\": {\"bits\": 8}, \"image_token_id\"",
                     "missing required field quantization.group_size");
    expect_parse_err("\"image_token_id\"",
                     "\"quantization\": {\"bits\": 4, \"group_size\": 32, \"mode\": \"mxfp4\"}, \"image_token_id\"",
                     "quantization mode \"mxfp4\" is not supported");
    expect_parse_err("\"image_token_id\"", "\"quantization\": {\"bits\": 7, \"group_size\": 64}, \"image_token_id\"",
                     "unsupported quantization bits 7");
    expect_parse_err("\"image_token_id\"", "\"quantization\": {\"bits\": 4, \"group_size\": 48}, \"image_token_id\"",
                     "unsupported quantization group size 48");
    expect_parse_err("\"image_token_id\"", "\"quantization_config\": {\"quant_method\": \"fp8\"}, \"image_token_id\"",
                     "quantization_config.quant_method: \"fp8\" is not supported");
    expect_parse_err("\"image_token_id\"",
                     "\"quantization\": {\"bits\": 4, \"group_size\": 64, \"language_model.lm_head\": {\"bits\": 9, "
                     "\"group_size\": 64}}, \"image_token_id\"",
                     "quantization.language_model.lm_head: unsupported quantization bits 9");
    expect_parse_err("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", "num_key_value_heads");
    expect_parse_err("\"text_config\": {", "\"text_config\": {\"num_experts\": 64, ", "num_experts");
    expect_parse_err("\"model_type\": \"qwen3_5\",", "", "missing required field model_type");
    expect_parse_err("\"vocab_size\": 248320", "\"vocab_size\": 99999999999", "out of range");
    expect_parse_err("\"head_dim\": 256,", "\"head_dim\": 256,,", "invalid JSON at line");
    qwen35_config c;
    CHECK_ERR(parse_str(&c, "[1]"), "expected a JSON object");
    CHECK_ERR(parse_str(&c, ""), "dir/config.json: invalid JSON");
    CHECK_ERR(qwen35_config_load(&c, "/nonexistent/config.json"), "/nonexistent/config.json: cannot open");
}

static void run_config_save(const char *dir) {
    const char *names[] = {"tiny", "0.8b", "9b"};
    char path[512];
    snprintf(path, sizeof path, "%s/config.json", dir);
    for (int i = 0; i < 3; i++) {
        for (int layout = 0; layout < 2; layout++) {
            qwen35_config c, back;
            CHECK_OK(qwen35_preset(names[i], &c));
            CHECK_OK(qwen35_config_save(&c, (qwen35_layout)layout, path));
            CHECK_OK(qwen35_config_load(&back, path));
            CHECKF(configs_equal(&c, &back), "%s layout %d does not round-trip", names[i], layout);
        }
    }
    /* an irregular layer pattern survives through layer_types */
    qwen35_config c, back;
    CHECK_OK(qwen35_preset("tiny", &c));
    c.layer_is_full[0] = 1;
    c.layer_is_full[3] = 0;
    c.rms_eps = 1.0 / 3.0;
    CHECK_OK(qwen35_config_save_dtype(&c, LAYOUT_TEXT, DT_F32, path));
    CHECK_OK(qwen35_config_load(&back, path));
    CHECK(configs_equal(&c, &back));

    /* what transformers reads */
    CHECK_OK(qwen35_preset("0.8b", &c));
    CHECK_OK(qwen35_config_save(&c, LAYOUT_MULTIMODAL, path));
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    CHECK(j);
    json_t *tc = json_object_get(j, "text_config");
    CHECK(!strcmp(json_string_value(json_array_get(json_object_get(j, "architectures"), 0)),
                  "Qwen3_5ForConditionalGeneration"));
    CHECK(!strcmp(json_string_value(json_object_get(j, "model_type")), "qwen3_5"));
    CHECK(json_is_true(json_object_get(j, "tie_word_embeddings")) && json_is_true(json_object_get(tc, "tie_word_embeddings")));
    CHECK(!strcmp(json_string_value(json_object_get(tc, "model_type")), "qwen3_5_text"));
    CHECK(!strcmp(json_string_value(json_object_get(tc, "dtype")), "bfloat16"));
    CHECK(!strcmp(json_string_value(json_object_get(j, "dtype")), "bfloat16"));
    CHECK(json_integer_value(json_object_get(tc, "eos_token_id")) == 248044);
    CHECK(json_integer_value(json_object_get(tc, "full_attention_interval")) == 4);
    json_t *rp = json_object_get(tc, "rope_parameters");
    CHECK(json_integer_value(json_object_get(rp, "rope_theta")) == 10000000);
    CHECK(json_real_value(json_object_get(rp, "partial_rotary_factor")) == 0.25);
    CHECK(!strcmp(json_string_value(json_object_get(rp, "rope_type")), "default"));
    CHECK(json_is_true(json_object_get(rp, "mrope_interleaved")));
    json_t *ms = json_object_get(rp, "mrope_section");
    CHECK(json_integer_value(json_array_get(ms, 0)) == 11 && json_integer_value(json_array_get(ms, 1)) == 11 &&
          json_integer_value(json_array_get(ms, 2)) == 10);
    CHECK(json_array_size(json_object_get(tc, "layer_types")) == 24);
    json_t *vc = json_object_get(j, "vision_config");
    CHECK(json_is_object(vc) && json_integer_value(json_object_get(vc, "out_hidden_size")) == 1024);
    json_decref(j);
    FILE *fp = fopen(path, "rb");
    char buf[8192] = {0};
    CHECK(fp);
    size_t got = fread(buf, 1, sizeof buf - 1, fp);
    fclose(fp);
    CHECK(got > 0 && strstr(buf, "\"rms_norm_eps\": 1e-6"));

    CHECK_OK(qwen35_config_save_dtype(&c, LAYOUT_TEXT, DT_F32, path));
    j = json_load_file(path, 0, &je);
    CHECK(j);
    CHECK(!strcmp(json_string_value(json_array_get(json_object_get(j, "architectures"), 0)), "Qwen3_5ForCausalLM"));
    CHECK(!strcmp(json_string_value(json_object_get(j, "model_type")), "qwen3_5_text"));
    CHECK(!strcmp(json_string_value(json_object_get(j, "dtype")), "float32"));
    CHECK(json_object_get(j, "text_config") == NULL && json_object_get(j, "vision_config") == NULL);
    json_decref(j);

    char tmp[520];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0);
    c.n_kv_heads = 3;
    CHECK_ERR(qwen35_config_save(&c, LAYOUT_TEXT, path), "num_key_value_heads");
    snprintf(path, sizeof path, "%s/no/such/config.json", dir);
    CHECK_OK(qwen35_preset("tiny", &c));
    CHECK_ERR(qwen35_config_save(&c, LAYOUT_TEXT, path), "cannot create");
}

TEST(config_save_round_trip) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_config_save(dir);
    io_test_rmdir(dir);
}

/* ---------------------------------------------------------------- checkpoint folders */

typedef struct {
    qwen35_layout layout;
    int shards;             /* 0: model.safetensors; else that many shards and an index */
    int extras;             /* add model.visual.*, mtp.* and one unexpected tensor */
    int lm_head;            /* write lm_head.weight even when the config is tied */
    int misalign;           /* an odd-sized tensor first, so the rest start at odd offsets */
    const char *drop;       /* full name not to write */
    const char *bad_shape;  /* full name written with a different shape */
    const char *bad_dtype;  /* full name written as I32 */
} ck_opts;

/* Deterministic contents: value j of tensor i. */
static float val(int i, int64_t j) { return (float)((i * 31 + j * 7) % 97) / 97.0f - 0.5f; }

typedef struct {
    st_entry *e;
    void **data;
    int n, cap;
} entry_list;

static int add_entry(entry_list *l, const char *name, dt_dtype dt, int ndim, const int64_t *shape, int seed) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->e = realloc(l->e, (size_t)l->cap * sizeof *l->e);
        l->data = realloc(l->data, (size_t)l->cap * sizeof *l->data);
        if (!l->e || !l->data) return -1;
    }
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) numel *= shape[d];
    size_t sz = dt_dtype_size(dt);
    void *buf = malloc((size_t)numel * sz + 1);
    if (!buf) return -1;
    for (int64_t j = 0; j < numel; j++) {
        float v = val(seed, j);
        if (dt == DT_I32) ((int32_t *)buf)[j] = (int32_t)j;
        else dt_from_f32((char *)buf + j * (int64_t)sz, dt, &v, 1);
    }
    st_entry *e = &l->e[l->n];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    e->dtype = dt;
    e->ndim = ndim;
    memcpy(e->shape, shape, (size_t)ndim * sizeof *shape);
    e->data = buf;
    l->data[l->n++] = buf;
    return 0;
}

static void free_entries(entry_list *l) {
    for (int i = 0; i < l->n; i++) {
        free((void *)l->e[i].name);
        free(l->data[i]);
    }
    free(l->e);
    free(l->data);
}

static int build_entries(entry_list *l, const qwen35_config *cfg, const ck_opts *o) {
    const char *prefix = o->layout == LAYOUT_MULTIMODAL ? "model.language_model." : "model.";
    if (o->misalign) {
        int64_t s[1] = {3};
        if (add_entry(l, "model.aaa_odd", DT_BF16, 1, s, 999) != 0) return -1;
    }
    qwen35_config c = *cfg;
    if (o->lm_head) c.tie_word_embeddings = false;
    int n = qwen35_tensor_count(&c);
    qwen35_tensor_spec *specs = calloc((size_t)n, sizeof *specs);
    if (!specs) return -1;
    qwen35_tensor_specs(&c, specs);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        char name[160];
        if (specs[i].kind == W_LM_HEAD) snprintf(name, sizeof name, "lm_head.weight");
        else snprintf(name, sizeof name, "%s%s", prefix, specs[i].name);
        if (o->drop && !strcmp(name, o->drop)) continue;
        int64_t shape[3];
        memcpy(shape, specs[i].shape, sizeof shape);
        if (o->bad_shape && !strcmp(name, o->bad_shape)) shape[0] += 1;
        /* as in the official files: A_log in F32, the rest BF16 */
        dt_dtype dt = specs[i].kind == W_LIN_A_LOG ? DT_F32 : DT_BF16;
        if (o->bad_dtype && !strcmp(name, o->bad_dtype)) dt = DT_I32;
        rc = add_entry(l, name, dt, specs[i].ndim, shape, i);
    }
    free(specs);
    if (rc == 0 && o->extras) {
        int64_t s2[2] = {8, 4}, s1[1] = {4};
        rc |= add_entry(l, "model.visual.blocks.0.attn.qkv.weight", DT_BF16, 2, s2, 1);
        rc |= add_entry(l, "model.visual.merger.norm.weight", DT_BF16, 1, s1, 2);
        rc |= add_entry(l, "mtp.fc.weight", DT_BF16, 2, s2, 3);
        rc |= add_entry(l, "mtp.norm.weight", DT_F32, 1, s1, 4);
        rc |= add_entry(l, "model.language_model.rotary_emb.inv_freq", DT_F32, 1, s1, 5);
    }
    return rc;
}

static int write_index(const char *dir, const entry_list *l, const int *shard_of, int shards) {
    json_t *wm = json_object();
    for (int i = 0; i < l->n; i++) {
        char f[64];
        snprintf(f, sizeof f, "model-%05d-of-%05d.safetensors", shard_of[i] + 1, shards);
        json_object_set_new(wm, l->e[i].name, json_string(f));
    }
    json_t *root = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 0, "weight_map", wm);
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    int rc = json_dump_file(root, path, JSON_INDENT(2));
    json_decref(root);
    return rc;
}

static int write_shards(const char *dir, const entry_list *l, int shards) {
    int *shard_of = calloc((size_t)l->n + 1, sizeof *shard_of);
    st_entry *part = calloc((size_t)l->n + 1, sizeof *part);
    int rc = shard_of && part ? 0 : -1;
    for (int s = 0; s < shards && rc == 0; s++) {
        int k = 0;
        for (int i = 0; i < l->n; i++) {
            shard_of[i] = (int)((int64_t)i * shards / l->n);
            if (shard_of[i] == s) part[k++] = l->e[i];
        }
        char path[512];
        snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", dir, s + 1, shards);
        rc = st_write(path, part, k);
    }
    if (rc == 0) rc = write_index(dir, l, shard_of, shards);
    free(shard_of);
    free(part);
    return rc;
}

static int write_checkpoint(const char *dir, const qwen35_config *cfg, const ck_opts *o) {
    entry_list l = {0};
    int rc = build_entries(&l, cfg, o);
    char path[512];
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (rc == 0) rc = qwen35_config_save(cfg, o->layout, path);
    if (rc == 0 && o->shards == 0) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        rc = st_write(path, l.e, l.n);
    } else if (rc == 0) {
        rc = write_shards(dir, &l, o->shards);
    }
    free_entries(&l);
    return rc;
}

/* For the adapter tests: a plain tiny checkpoint. */
int io_test_write_checkpoint(const char *dir, const qwen35_config *cfg, qwen35_layout layout) {
    ck_opts o = {.layout = layout};
    return write_checkpoint(dir, cfg, &o);
}

/* Every weight checked against what write_checkpoint stored for it. */
static int weights_match(const checkpoint *ck) {
    for (int i = 0; i < ck->n_specs; i++) {
        const dt_weight *w = &ck->weights[i];
        const qwen35_tensor_spec *s = &ck->specs[i];
        if (w->rows * w->cols != qwen35_spec_numel(s)) return 0;
        if ((uintptr_t)w->data % dt_dtype_size(w->dtype) != 0) return 0;
        int64_t n = w->rows * w->cols;
        for (int64_t j = 0; j < n; j += 1 + n / 7) {
            float got, want = val(i, j);
            dt_to_f32(&got, (const char *)w->data + j * (int64_t)dt_dtype_size(w->dtype), w->dtype, 1);
            uint16_t b = dt_f32_to_bf16(want);
            if (w->dtype == DT_BF16) want = dt_bf16_to_f32(b);
            if (got != want) return 0;
        }
    }
    return 1;
}

static void run_checkpoint_ok(const char *root) {
    qwen35_config cfg;
    CHECK_OK(qwen35_preset("tiny", &cfg));
    char dir[512];
    checkpoint ck;

    /* text layout, single file */
    snprintf(dir, sizeof dir, "%s/text", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){.layout = LAYOUT_TEXT}));
    CHECK_OK(checkpoint_open(&ck, dir));
    CHECK(ck.layout == LAYOUT_TEXT && !strcmp(ck.prefix, "model.") && ck.n_files == 1);
    CHECK(ck.n_specs == qwen35_tensor_count(&cfg) && ck.cfg.tie_word_embeddings && !ck.lm_head_in_file);
    CHECK(ck.n_skipped == 0 && ck.n_unexpected == 0 && ck.n_copies == 0);
    CHECK(weights_match(&ck));
    int64_t bytes = 0;
    for (int i = 0; i < ck.n_specs; i++) bytes += qwen35_spec_numel(&ck.specs[i]) * (ck.specs[i].kind == W_LIN_A_LOG ? 4 : 2);
    CHECK(ck.weight_bytes == bytes);
    const dt_weight *w = checkpoint_weight(&ck, W_ATT_Q, 3);
    CHECK(w && w->rows == 2 * cfg.n_heads * cfg.head_dim && w->cols == cfg.hidden_size && w->dtype == DT_BF16);
    CHECK(checkpoint_weight(&ck, W_ATT_Q, 0) == NULL && checkpoint_weight(&ck, W_LM_HEAD, -1) == NULL);
    w = checkpoint_weight(&ck, W_LIN_CONV, 1);
    int conv_dim = 2 * cfg.lin_n_k_heads * cfg.lin_k_head_dim + cfg.lin_n_v_heads * cfg.lin_v_head_dim;
    CHECK(w && w->rows == conv_dim && w->cols == cfg.conv_kernel);
    w = checkpoint_weight(&ck, W_LIN_A_LOG, 2);
    CHECK(w && w->dtype == DT_F32 && w->rows == 1 && w->cols == cfg.lin_n_v_heads);
    w = checkpoint_weight(&ck, W_FINAL_NORM, -1);
    CHECK(w && w->rows == 1 && w->cols == cfg.hidden_size);
    checkpoint_close(&ck);
    CHECK(ck.files == NULL && ck.dir == NULL);
    checkpoint_close(&ck);

    /* multimodal layout, three shards, vision/MTP tensors skipped, one unexpected */
    snprintf(dir, sizeof dir, "%s/mm", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){.layout = LAYOUT_MULTIMODAL, .shards = 3, .extras = 1}));
    CHECK_OK(checkpoint_open(&ck, dir));
    CHECK(ck.layout == LAYOUT_MULTIMODAL && !strcmp(ck.prefix, "model.language_model.") && ck.n_files == 3);
    CHECK(ck.n_skipped == 4 && ck.n_unexpected == 1);
    CHECK(weights_match(&ck));
    checkpoint_close(&ck);

    /* a tied config with an lm_head in the file uses it */
    snprintf(dir, sizeof dir, "%s/head", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){.layout = LAYOUT_MULTIMODAL, .lm_head = 1}));
    CHECK_OK(checkpoint_open(&ck, dir));
    CHECK(ck.lm_head_in_file && !ck.cfg.tie_word_embeddings && ck.n_specs == qwen35_tensor_count(&cfg) + 1);
    w = checkpoint_weight(&ck, W_LM_HEAD, -1);
    CHECK(w && w->rows == cfg.vocab_size && w->cols == cfg.hidden_size && w != checkpoint_weight(&ck, W_EMBED, -1));
    CHECK(weights_match(&ck));
    checkpoint_close(&ck);

    /* untied config */
    qwen35_config untied = cfg;
    untied.tie_word_embeddings = false;
    snprintf(dir, sizeof dir, "%s/untied", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &untied, &(ck_opts){.layout = LAYOUT_TEXT, .shards = 2}));
    CHECK_OK(checkpoint_open(&ck, dir));
    CHECK(ck.lm_head_in_file && checkpoint_weight(&ck, W_LM_HEAD, -1));
    checkpoint_close(&ck);

    /* tensors at odd offsets get aligned copies */
    snprintf(dir, sizeof dir, "%s/odd", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){.layout = LAYOUT_TEXT, .misalign = 1}));
    CHECK_OK(checkpoint_open(&ck, dir));
    CHECK(ck.n_copies > 0 && ck.n_unexpected == 1);
    CHECK(weights_match(&ck));
    checkpoint_close(&ck);
}

TEST(checkpoint_open_layouts) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_checkpoint_ok(dir);
    io_test_rmdir(dir);
}

static void expect_open_err(const char *root, const char *sub, const qwen35_config *cfg, ck_opts o,
                            const char *needle, const char *needle2) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", root, sub);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, cfg, &o));
    checkpoint ck;
    CHECK_ERR(checkpoint_open(&ck, dir), needle);
    CHECKF(!needle2 || strstr(dt_errmsg(), needle2), "error \"%s\" lacks \"%s\"", dt_errmsg(), needle2);
    CHECK(ck.dir == NULL && ck.files == NULL && ck.specs == NULL && ck.n_files == 0);
}

static void run_checkpoint_errors(const char *root) {
    qwen35_config cfg, untied;
    CHECK_OK(qwen35_preset("tiny", &cfg));
    untied = cfg;
    untied.tie_word_embeddings = false;
    checkpoint ck;
    char dir[512], path[600];

    expect_open_err(root, "nomiss", &cfg, (ck_opts){.layout = LAYOUT_TEXT, .drop = "model.layers.2.linear_attn.A_log"},
                    "nomiss: tensor model.layers.2.linear_attn.A_log missing", NULL);
    expect_open_err(root, "shape", &cfg, (ck_opts){.layout = LAYOUT_TEXT, .bad_shape = "model.layers.1.mlp.up_proj.weight"},
                    "tensor model.layers.1.mlp.up_proj.weight has shape [385, 128], expected [384, 128]",
                    "model.safetensors");
    expect_open_err(root, "dtype", &cfg,
                    (ck_opts){.layout = LAYOUT_MULTIMODAL, .bad_dtype = "model.language_model.norm.weight"},
                    "tensor model.language_model.norm.weight has dtype I32", NULL);
    expect_open_err(root, "nohead", &untied, (ck_opts){.layout = LAYOUT_TEXT, .drop = "lm_head.weight"}, "lm_head.weight is missing", NULL);
    /* config and tensors disagree about a layer's kind */
    qwen35_config other = cfg;
    other.layer_is_full[0] = 1;
    other.layer_is_full[3] = 0;
    snprintf(dir, sizeof dir, "%s/kinds", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){.layout = LAYOUT_TEXT}));
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK_OK(qwen35_config_save(&other, LAYOUT_TEXT, path));
    CHECK_ERR(checkpoint_open(&ck, dir), "tensor model.layers.0.self_attn.q_proj.weight missing");

    /* missing config.json */
    snprintf(dir, sizeof dir, "%s/noconfig", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){0}));
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    CHECK_ERR(checkpoint_open(&ck, dir), "noconfig/config.json: cannot open");

    /* no weights at all */
    CHECK_OK(qwen35_config_save(&cfg, LAYOUT_TEXT, path));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    CHECK_ERR(checkpoint_open(&ck, dir), "no model.safetensors or model.safetensors.index.json");

    /* a missing shard */
    snprintf(dir, sizeof dir, "%s/shard", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){.layout = LAYOUT_MULTIMODAL, .shards = 3}));
    snprintf(path, sizeof path, "%s/model-00002-of-00003.safetensors", dir);
    unlink(path);
    CHECK_ERR(checkpoint_open(&ck, dir), "model-00002-of-00003.safetensors: cannot open");

    /* the index lists a tensor its shard lacks */
    snprintf(dir, sizeof dir, "%s/index", root);
    CHECK(mkdir(dir, 0700) == 0);
    CHECK_OK(write_checkpoint(dir, &cfg, &(ck_opts){.layout = LAYOUT_TEXT, .shards = 2}));
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_error_t je;
    json_t *idx = json_load_file(path, 0, &je);
    CHECK(idx);
    json_object_set_new(json_object_get(idx, "weight_map"), "model.layers.0.extra.weight",
                        json_string("model-00001-of-00002.safetensors"));
    CHECK(json_dump_file(idx, path, 0) == 0);
    json_decref(idx);
    CHECK_ERR(checkpoint_open(&ck, dir), "tensor model.layers.0.extra.weight, listed in model.safetensors.index.json, is absent");
    CHECK(strstr(dt_errmsg(), "model-00001-of-00002.safetensors"));

    /* a shard name pointing outside the folder */
    CHECK(io_test_write_file(path, "{\"weight_map\": {\"x\": \"../x.safetensors\"}}", 41) == 0);
    CHECK_ERR(checkpoint_open(&ck, dir), "is not a file name in this folder");
    CHECK(io_test_write_file(path, "{\"weight_map\": [1]}", 19) == 0);
    CHECK_ERR(checkpoint_open(&ck, dir), "weight_map");
    CHECK(io_test_write_file(path, "{oops", 5) == 0);
    CHECK_ERR(checkpoint_open(&ck, dir), "model.safetensors.index.json: invalid JSON");

    /* names of neither layout */
    snprintf(dir, sizeof dir, "%s/foreign", root);
    CHECK(mkdir(dir, 0700) == 0);
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK_OK(qwen35_config_save(&cfg, LAYOUT_TEXT, path));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    float x = 1;
    st_entry e[] = {{"language_model.model.norm.weight", DT_F32, 1, {1}, &x}};
    CHECK_OK(st_write(path, e, 1));
    /* an MLX name layout, but not a whole model */
    CHECK_ERR(checkpoint_open(&ck, dir), "tensor language_model.model.embed_tokens.weight missing");
    e[0].name = "transformer.h.0.weight";
    CHECK_OK(st_write(path, e, 1));
    CHECK_ERR(checkpoint_open(&ck, dir), "not a Qwen3.5 checkpoint");

    memset(&ck, 0, sizeof ck);
    checkpoint_close(&ck);
}

TEST(checkpoint_open_errors) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_checkpoint_errors(dir);
    io_test_rmdir(dir);
}

/* ---------------------------------------------------------------- MLX quantized checkpoints */

/* Mean loss of the tokenized rows of data.jsonl, each row alone (as test_golden). */
static int fixture_loss(checkpoint *ck, const char *dir, double *loss) {
    char path[600];
    snprintf(path, sizeof path, "%s/data.jsonl", dir);
    qwen35_model m;
    dt_dataset d;
    if (qwen35_model_init(&m, &ck->cfg, ck->specs, ck->weights, ck->n_specs)) return -1;
    if (dataset_load_tokenized(&d, path, ck->cfg.vocab_size)) {
        qwen35_model_free(&m);
        return -1;
    }
    double sum = 0;
    int64_t n = 0;
    int rc = 0;
    for (int i = 0; rc == 0 && i < d.n_rows; i++) {
        const dt_row *r = &d.rows[i];
        int len = r->len;
        qwen35_batch b = {r->input_ids, r->labels, &len, 1, r->len};
        double s1 = 0;
        int64_t n1 = 0;
        rc = qwen35_eval_loss(&m, &b, &s1, &n1);
        sum += s1;
        n += n1;
    }
    dataset_free(&d);
    qwen35_model_free(&m);
    *loss = n ? sum / (double)n : 0;
    return rc;
}

/* Every weight of b against a: quantized ones word for word, scale for scale; all dequantized
 * values equal (the five MLX norms, stored +1 in a's dtype, within half an ulp of [1, 2)). */
static int ck_same_weights(const checkpoint *a, const checkpoint *b, char *why, size_t cap) {
    if (a->n_specs != b->n_specs) return snprintf(why, cap, "%d vs %d specs", a->n_specs, b->n_specs), 0;
    for (int i = 0; i < a->n_specs; i++) {
        const dt_weight *x = &a->weights[i], *y = &b->weights[i];
        const char *name = a->specs[i].name;
        if (x->rows != y->rows || x->cols != y->cols || x->qbits != y->qbits || x->qgroup != y->qgroup)
            return snprintf(why, cap, "%s: shape or quantization differs", name), 0;
        if (x->qbits) {
            size_t wb = (size_t)(x->rows * x->cols * x->qbits / 8);
            size_t sb = (size_t)(x->rows * (x->cols / x->qgroup)) * dt_dtype_size(x->qdtype);
            if (x->qdtype != y->qdtype || memcmp(x->data, y->data, wb) || memcmp(x->scales, y->scales, sb) ||
                memcmp(x->biases, y->biases, sb))
                return snprintf(why, cap, "%s: words, scales or biases differ", name), 0;
        }
        int64_t n = x->rows * x->cols;
        float *fx = malloc((size_t)n * sizeof *fx), *fy = malloc((size_t)n * sizeof *fy);
        if (!fx || !fy) return free(fx), free(fy), snprintf(why, cap, "out of memory"), 0;
        dt_weight_rows_f32(fx, x, 0, x->rows);
        dt_weight_rows_f32(fy, y, 0, y->rows);
        /* w + 1 is rounded to the stored dtype: half an ulp of [1, 2) */
        float tol = !checkpoint_norm_is_shifted(a->specs[i].kind) ? 0
                    : x->dtype == DT_BF16 ? 1.0f / 256 : x->dtype == DT_F16 ? 1.0f / 2048 : 1.2e-7f;
        int64_t bad = -1;
        for (int64_t j = 0; j < n && bad < 0; j++)
            if (!(fabsf(fx[j] - fy[j]) <= tol)) bad = j;
        if (bad >= 0) snprintf(why, cap, "%s[%lld]: %g vs %g", name, (long long)bad, fx[bad], fy[bad]);
        free(fx);
        free(fy);
        if (bad >= 0) return 0;
    }
    return 1;
}

/* quantize -> write -> load gives the same words, scales, biases and dequantized weights, and the
 * loss on the golden fixtures stays within 1% (8-bit) and 5% (4-bit) of the unquantized one. */
static void run_quant_round_trip(const char *root) {
    const char *fixtures[] = {"text_tied", "text_bf16", "mm_untied_sharded"};
    const struct { int bits, group; double tol; } q[] = {{8, 64, 0.01}, {4, 32, 0.05}, {4, 64, 0.05}, {8, 32, 0.01}};
    for (int f = 0; f < 3; f++) {
        char src[512];
        snprintf(src, sizeof src, "%s/%s", FIXTURES, fixtures[f]);
        checkpoint ref;
        double l0;
        CHECK_OK(checkpoint_open(&ref, src));
        CHECK_OK(fixture_loss(&ref, src, &l0));
        for (int k = 0; k < 4; k++) {
            checkpoint ck, back;
            ckpt_quant_stats qs;
            ckpt_write_stats ws;
            double lq, lb;
            char out[600], why[256] = "";
            snprintf(out, sizeof out, "%s/%s_q%d_%d", root, fixtures[f], q[k].bits, q[k].group);
            CHECK_OK(checkpoint_open(&ck, src));
            CHECK_OK(checkpoint_quantize(&ck, q[k].bits, q[k].group, &qs));
            /* text_*: every linear's row (64 or 128 values) is divided by 32 and 64; mm_untied_sharded's
             * down_proj (96) and out_proj (32) rows only by 32, and are skipped at 64 */
            CHECKF(qs.n_skipped == 0 || (f == 2 && q[k].group == 64), "%s: skipped %s", fixtures[f], qs.skipped);
            CHECK(qs.n_quantized == ck.n_quantized && ck.qbits == q[k].bits && ck.qgroup == q[k].group);
            CHECK(qs.bytes_after < qs.bytes_before && ck.weight_bytes == qs.bytes_after);
            for (int i = 0; i < ck.n_specs; i++) {
                bool want = checkpoint_kind_is_quantizable(ck.specs[i].kind) && ck.weights[i].cols % q[k].group == 0;
                CHECKF(!ck.weights[i].qbits == !want, "%s", ck.specs[i].name);
            }
            CHECK_ERR(checkpoint_quantize(&ck, 8, 64, &qs), "already quantized");
            CHECK_OK(fixture_loss(&ck, src, &lq));
            CHECKF(fabs(lq - l0) <= q[k].tol * l0, "%s %d-bit/%d: loss %.6f vs %.6f unquantized", fixtures[f],
                   q[k].bits, q[k].group, lq, l0);
            CHECK_OK(checkpoint_write_mlx(&ck, out, &ws));
            CHECK(ws.tensors == ck.n_specs + 2 * ck.n_quantized);
            CHECK_OK(checkpoint_open(&back, out));
            CHECK(back.mlx && back.layout == LAYOUT_MULTIMODAL && !strcmp(back.file_prefix, "language_model.model."));
            CHECK(back.n_quantized == ck.n_quantized && back.qbits == q[k].bits && back.qgroup == q[k].group);
            CHECK(back.n_unexpected == 0 && back.cfg.tie_word_embeddings == ck.cfg.tie_word_embeddings);
            CHECK(back.weight_bytes < ck.weight_bytes * 11 / 10 && back.weight_bytes > ck.weight_bytes * 9 / 10);
            CHECKF(ck_same_weights(&ck, &back, why, sizeof why), "%s: %s", out, why);
            CHECK_OK(fixture_loss(&back, src, &lb));
            /* only the norms moved (bf16 ones by their rounding at +1) */
            double ltol = checkpoint_weight(&ref, W_FINAL_NORM, -1)->dtype == DT_F32 ? 1e-5 : 1e-3;
            CHECKF(fabs(lb - lq) <= ltol * lq, "%s: loss %.9f after the round trip, %.9f before", out, lb, lq);
            checkpoint_close(&back);
            checkpoint_close(&ck);
        }
        checkpoint_close(&ref);
    }
}

TEST(quant_checkpoint_round_trip) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_quant_round_trip(dir);
    io_test_rmdir(dir);
}

/* What the written files hold: MLX names, shifted norms, [C,K,1] conv, the config record. */
static void run_quant_layout(const char *root) {
    const char *src = FIXTURES "/text_bf16";
    checkpoint ck, back;
    ckpt_write_stats ws;
    char out[512], path[600], why[256] = "";
    /* unquantized: an MLX bf16 checkpoint */
    snprintf(out, sizeof out, "%s/plain", root);
    CHECK_OK(checkpoint_open(&ck, src));
    CHECK_ERR(checkpoint_write_mlx(&ck, src, &ws), "the output folder is the model folder");
    CHECK_OK(checkpoint_write_mlx(&ck, out, &ws));
    CHECK(ws.tensors == ck.n_specs);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    st_file f;
    CHECK_OK(st_open(&f, path));
    const st_tensor *conv = st_find(&f, "language_model.model.layers.0.linear_attn.conv1d.weight");
    const st_tensor *norm = st_find(&f, "language_model.model.layers.0.input_layernorm.weight");
    const st_tensor *lnorm = st_find(&f, "language_model.model.layers.0.linear_attn.norm.weight");
    CHECK(conv && conv->ndim == 3 && conv->shape[1] == ck.cfg.conv_kernel && conv->shape[2] == 1);
    CHECK(st_find(&f, "language_model.lm_head.weight") && !st_find(&f, "lm_head.weight"));
    const dt_weight *w = checkpoint_weight(&ck, W_INPUT_NORM, 0), *lw = checkpoint_weight(&ck, W_LIN_NORM, 0);
    CHECK(norm && norm->dtype == w->dtype && lnorm && lnorm->dtype == lw->dtype);
    for (int j = 0; j < (int)w->cols; j++) {
        float v, o, lv, lo;
        dt_to_f32(&v, (const char *)norm->data + 2 * j, norm->dtype, 1);
        dt_to_f32(&o, (const char *)w->data + 2 * j, w->dtype, 1);
        dt_to_f32(&lv, (const char *)lnorm->data + 2 * (j % lw->cols), lnorm->dtype, 1);
        dt_to_f32(&lo, (const char *)lw->data + 2 * (j % lw->cols), lw->dtype, 1);
        CHECKF(v == dt_bf16_to_f32(dt_f32_to_bf16(o + 1.0f)), "norm[%d] %g, source %g", j, v, o);
        CHECK(lv == lo);  /* linear_attn.norm is not shifted */
    }
    st_close(&f);
    CHECK_OK(checkpoint_open(&back, out));
    CHECK(back.mlx && back.n_quantized == 0 && back.qbits == 0 && !strcmp(back.prefix, "model.language_model."));
    /* bf16 norms: (w + 1) rounded to bf16, minus 1, is w up to bf16's rounding near 1 */
    for (int i = 0; i < ck.n_specs; i++) {
        const dt_weight *x = &ck.weights[i], *y = &back.weights[i];
        int64_t n = x->rows * x->cols;
        float *fx = malloc((size_t)n * sizeof *fx), *fy = malloc((size_t)n * sizeof *fy);
        CHECK(fx && fy);
        dt_weight_rows_f32(fx, x, 0, x->rows);
        dt_weight_rows_f32(fy, y, 0, y->rows);
        float tol = checkpoint_norm_is_shifted(ck.specs[i].kind) ? 1.0f / 128 : 0;
        int ok = 1;
        for (int64_t j = 0; j < n && ok; j++) ok = fabsf(fx[j] - fy[j]) <= tol;
        free(fx);
        free(fy);
        CHECKF(ok, "%s differs after the MLX round trip", ck.specs[i].name);
        CHECK(y->dtype == (checkpoint_norm_is_shifted(ck.specs[i].kind) ? DT_F32 : x->dtype));
    }
    checkpoint_close(&back);

    /* quantized: the config record, and a write over an existing folder replaces it */
    ckpt_quant_stats qs;
    CHECK_OK(checkpoint_quantize(&ck, 4, 64, &qs));
    CHECK_OK(checkpoint_write_mlx(&ck, out, &ws));
    snprintf(path, sizeof path, "%s/config.json", out);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    CHECK(cfg);
    const char *keys[] = {"quantization", "quantization_config"};
    for (int i = 0; i < 2; i++) {
        json_t *r = json_object_get(cfg, keys[i]);
        CHECK(json_integer_value(json_object_get(r, "bits")) == 4);
        CHECK(json_integer_value(json_object_get(r, "group_size")) == 64);
        CHECK(!strcmp(json_string_value(json_object_get(r, "mode")), "affine"));
    }
    CHECK(json_is_object(json_object_get(cfg, "text_config")));
    json_decref(cfg);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    CHECK_OK(st_open(&f, path));
    const st_tensor *t = st_find(&f, "language_model.model.layers.1.mlp.down_proj.weight");
    const st_tensor *sc = st_find(&f, "language_model.model.layers.1.mlp.down_proj.scales");
    const st_tensor *bi = st_find(&f, "language_model.model.layers.1.mlp.down_proj.biases");
    CHECK(t && t->dtype == DT_U32 && t->shape[0] == ck.cfg.hidden_size && t->shape[1] == ck.cfg.intermediate_size / 8);
    CHECK(sc && sc->dtype == DT_BF16 && sc->shape[1] == ck.cfg.intermediate_size / 64 && bi && bi->dtype == DT_BF16);
    CHECK(!st_find(&f, "language_model.model.layers.0.linear_attn.conv1d.scales"));
    CHECK(st_find(&f, "language_model.lm_head.scales"));
    st_close(&f);
    CHECK_OK(checkpoint_open(&back, out));
    CHECKF(ck_same_weights(&ck, &back, why, sizeof why), "%s", why);
    checkpoint_close(&back);
    checkpoint_close(&ck);

    /* group size 128: rows of 64 values stay unquantized, as mlx-lm leaves them */
    snprintf(out, sizeof out, "%s/g128", root);
    CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
    CHECK_OK(checkpoint_quantize(&ck, 8, 128, &qs));
    CHECK(qs.n_skipped > 0 && qs.n_quantized > 0 && strstr(qs.skipped, "embed_tokens.weight"));
    CHECK(!checkpoint_weight(&ck, W_EMBED, -1)->qbits && checkpoint_weight(&ck, W_MLP_DOWN, 0)->qbits == 8);
    char line[768];
    checkpoint_quant_summary(line, sizeof line, &ck, &qs);
    CHECKF(strstr(line, "left unquantized") && strstr(line, "8-bit"), "%s", line);
    CHECK_OK(checkpoint_write_mlx(&ck, out, &ws));
    CHECK_OK(checkpoint_open(&back, out));
    CHECK(back.n_quantized == qs.n_quantized);
    CHECKF(ck_same_weights(&ck, &back, why, sizeof why), "%s", why);
    checkpoint_close(&back);
    checkpoint_close(&ck);
    CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
    CHECK_ERR(checkpoint_quantize(&ck, 5, 48, &qs), "group size 48");
    CHECK_ERR(checkpoint_quantize(&ck, 7, 64, &qs), "bits 7");
    checkpoint_close(&ck);
}

TEST(quant_checkpoint_layout) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_quant_layout(dir);
    io_test_rmdir(dir);
}

/* A mixed recipe: one module at other settings, written with its own config entry and read back. */
static void run_quant_mixed(const char *root) {
    checkpoint ck, src, back;
    ckpt_quant_stats qs;
    ckpt_write_stats ws;
    char out[512], path[600], why[256] = "";
    snprintf(out, sizeof out, "%s/mixed", root);
    CHECK_OK(checkpoint_open(&src, FIXTURES "/text_tied"));
    CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
    CHECK_OK(checkpoint_quantize(&ck, 8, 64, &qs));
    const dt_weight *s = checkpoint_weight(&src, W_MLP_DOWN, 1);
    dt_weight *w = (dt_weight *)checkpoint_weight(&ck, W_MLP_DOWN, 1);
    int64_t n = s->rows * s->cols, ng = s->rows * s->cols / 32;
    float *f = malloc((size_t)n * sizeof *f), *fs = malloc((size_t)ng * sizeof *fs), *fb = malloc((size_t)ng * sizeof *fb);
    uint32_t *wq = checkpoint_own(&ck, (size_t)(n / 8) * 4);
    uint16_t *sc = checkpoint_own(&ck, (size_t)ng * 2), *bi = checkpoint_own(&ck, (size_t)ng * 2);
    CHECK(f && fs && fb && wq && sc && bi);
    dt_weight_rows_f32(f, s, 0, s->rows);
    quant_quantize(wq, fs, fb, f, s->rows, s->cols, 4, 32);
    for (int64_t j = 0; j < ng; j++) sc[j] = dt_f32_to_bf16(fs[j]), bi[j] = dt_f32_to_bf16(fb[j]);
    free(f);
    free(fs);
    free(fb);
    *w = (dt_weight){.dtype = DT_U32, .data = wq, .rows = s->rows, .cols = s->cols, .qbits = 4, .qgroup = 32,
                     .qdtype = DT_BF16, .scales = sc, .biases = bi};
    CHECK_OK(checkpoint_write_mlx(&ck, out, &ws));
    snprintf(path, sizeof path, "%s/config.json", out);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    CHECK(cfg);
    json_t *e = json_object_get(json_object_get(cfg, "quantization"), "language_model.model.layers.1.mlp.down_proj");
    CHECK(json_integer_value(json_object_get(e, "bits")) == 4 && json_integer_value(json_object_get(e, "group_size")) == 32);
    json_decref(cfg);
    CHECK_OK(checkpoint_open(&back, out));
    CHECK(checkpoint_weight(&back, W_MLP_DOWN, 1)->qbits == 4 && checkpoint_weight(&back, W_MLP_DOWN, 0)->qbits == 8);
    CHECKF(ck_same_weights(&ck, &back, why, sizeof why), "%s", why);
    checkpoint_close(&back);
    checkpoint_close(&ck);
    checkpoint_close(&src);
}

TEST(quant_checkpoint_mixed_bits) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_quant_mixed(dir);
    io_test_rmdir(dir);
}

/* ---- bad quantized checkpoints: a clear error naming the tensor or the setting */

typedef struct {
    const char *name;     /* tensor to change */
    int drop;             /* leave it out */
    int shape1;           /* new shape[1] (0: keep) */
    int dtype;            /* new dtype (-1: keep) */
} tensor_edit;

/* dir/model.safetensors rewritten with one tensor changed. */
static int rewrite_tensor(const char *dir, tensor_edit ed) {
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    st_file f;
    if (st_open(&f, path)) return -1;
    st_entry *e = calloc((size_t)f.n, sizeof *e);
    int n = 0;
    for (int i = 0; e && i < f.n; i++) {
        const st_tensor *t = &f.tensors[i];
        if (!strcmp(t->name, ed.name) && ed.drop) continue;
        e[n] = (st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim, .data = t->data};
        memcpy(e[n].shape, t->shape, sizeof t->shape);
        if (!strcmp(t->name, ed.name)) {
            if (ed.shape1) e[n].shape[1] = ed.shape1;
            if (ed.dtype >= 0) e[n].dtype = (dt_dtype)ed.dtype;
        }
        n++;
    }
    int rc = e ? st_write(path, e, n) : -1;
    free(e);
    st_close(&f);
    return rc;
}

/* dir/config.json with its quantization record replaced (NULL: removed). */
static int rewrite_record(const char *dir, const char *record_json) {
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    if (!cfg) return -1;
    json_object_del(cfg, "quantization");
    json_object_del(cfg, "quantization_config");
    if (record_json) json_object_set_new(cfg, "quantization", json_loads(record_json, 0, &je));
    int rc = json_dump_file(cfg, path, JSON_INDENT(2));
    json_decref(cfg);
    return rc;
}

static void run_quant_errors(const char *root) {
    checkpoint ck;
    ckpt_quant_stats qs;
    ckpt_write_stats ws;
    char good[512], bad[512];
    snprintf(good, sizeof good, "%s/good", root);
    CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
    CHECK_OK(checkpoint_quantize(&ck, 8, 64, &qs));
    CHECK_OK(checkpoint_write_mlx(&ck, good, &ws));
    checkpoint_close(&ck);
    const struct {
        tensor_edit ed;
        const char *record;  /* NULL: keep the file's */
        const char *needle, *needle2;
    } cases[] = {
        {{"language_model.model.layers.1.mlp.up_proj.scales", 0, 3, -1}, NULL,
         "tensor language_model.model.layers.1.mlp.up_proj.scales has shape [128, 3], expected [128, 1]", "8-bit, group size 64"},
        {{"language_model.model.layers.2.mlp.down_proj.biases", 0, 1, -1}, NULL,
         "tensor language_model.model.layers.2.mlp.down_proj.biases has shape [64, 1], expected [64, 2]", NULL},
        {{"language_model.model.layers.0.linear_attn.in_proj_qkv.weight", 0, 8, -1}, NULL,
         "tensor language_model.model.layers.0.linear_attn.in_proj_qkv.weight has shape [", "expected ["},
        {{"language_model.model.layers.0.linear_attn.in_proj_qkv.biases", 1, 0, -1}, NULL,
         "tensor language_model.model.layers.0.linear_attn.in_proj_qkv.biases missing", NULL},
        {{"language_model.model.layers.3.self_attn.o_proj.weight", 0, 0, DT_I32}, NULL,
         "tensor language_model.model.layers.3.self_attn.o_proj.weight has dtype I32", "must be U32"},
        {{"language_model.model.embed_tokens.biases", 0, 0, DT_F16}, NULL, "embed_tokens.scales and", "F16"},
        {{"none", 0, 0, -1}, "{\"group_size\": 64, \"bits\": 4, \"mode\": \"mxfp4\"}", "mode \"mxfp4\" is not supported",
         NULL},
        {{"none", 0, 0, -1}, "{\"group_size\": 64, \"bits\": 7}", "unsupported quantization bits 7", NULL},
        {{"none", 0, 0, -1}, "{\"group_size\": 128, \"bits\": 8}",
         "embed_tokens.weight: quantization group size 128 does not divide the row of 64", NULL},
        {{"none", 0, 0, -1}, "{\"group_size\": 64, \"bits\": 4}",
         "tensor language_model.model.embed_tokens.weight has shape [384, 16], expected [384, 8] (4-bit, group size 64)",
         NULL},
        {{"none", 0, 0, -1}, "{\"group_size\": 64, \"bits\": 8, \"language_model.model.layers.0.mlp.up_proj\": "
                             "{\"group_size\": 32, \"bits\": 8}}",
         "tensor language_model.model.layers.0.mlp.up_proj.scales has shape [128, 1], expected [128, 2]", NULL},
        {{"none", 0, 0, -1}, "{\"group_size\": 64, \"bits\": 8, \"language_model.model.layers.0.mlp.up_proj\": false}",
         "quantization does not cover language_model.model.layers.0.mlp.up_proj", NULL},
        {{"none", 0, 0, -1}, "", "quantization does not cover language_model.model.embed_tokens", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(bad, sizeof bad, "%s/bad%zu", root, i);
        CHECK_OK(checkpoint_open(&ck, FIXTURES "/text_tied"));
        CHECK_OK(checkpoint_quantize(&ck, 8, 64, &qs));
        CHECK_OK(checkpoint_write_mlx(&ck, bad, &ws));
        checkpoint_close(&ck);
        if (strcmp(cases[i].ed.name, "none")) CHECK(rewrite_tensor(bad, cases[i].ed) == 0);
        if (cases[i].record) CHECK(rewrite_record(bad, cases[i].record[0] ? cases[i].record : NULL) == 0);
        dt_err_clear();
        CHECKF(checkpoint_open(&ck, bad) != 0, "case %zu loaded", i);
        CHECKF(strstr(dt_errmsg(), cases[i].needle), "case %zu: \"%s\" lacks \"%s\"", i, dt_errmsg(), cases[i].needle);
        CHECKF(!cases[i].needle2 || strstr(dt_errmsg(), cases[i].needle2), "case %zu: \"%s\" lacks \"%s\"", i,
               dt_errmsg(), cases[i].needle2);
        CHECK(ck.dir == NULL && ck.files == NULL && ck.copies == NULL);
    }
    /* the untouched one loads, and a tensor without .scales in a quantized checkpoint is plain */
    CHECK_OK(checkpoint_open(&ck, good));
    CHECK(ck.n_quantized == 32 && checkpoint_weight(&ck, W_LIN_CONV, 0)->qbits == 0);
    checkpoint_close(&ck);
}

TEST(quant_checkpoint_errors) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_quant_errors(dir);
    io_test_rmdir(dir);
}
