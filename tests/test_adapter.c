#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "deltatune/adapter.h"
#include "deltatune/error.h"
#include "test.h"

int io_test_tmpdir(char *buf, size_t cap);
void io_test_rmdir(const char *dir);
int io_test_write_file(const char *path, const void *data, size_t n);
int io_test_write_checkpoint(const char *dir, const qwen35_config *cfg, qwen35_layout layout);

#define MAX_T 16

/* An adapter under construction: tensors named relative to the text model
 * ("layers.0.mlp.up_proj.lora_A.weight") with a prefix choice each. */
typedef struct {
    st_entry e[MAX_T];
    char names[MAX_T][160];
    float *data[MAX_T];
    int n;
} adapter_files;

static void add(adapter_files *a, const char *prefix, const char *rel, dt_dtype dt, int64_t rows, int64_t cols) {
    int i = a->n++;
    snprintf(a->names[i], sizeof a->names[i], "base_model.model.%s%s", prefix, rel);
    size_t n = (size_t)(rows * cols);
    a->data[i] = malloc(n * 4 + 4);
    float *tmp = malloc(n * 4 + 4);
    for (size_t j = 0; j < n; j++) tmp[j] = (float)((int)(j % 13) - 6) * 0.125f + (float)i;
    dt_from_f32(a->data[i], dt, tmp, n);
    free(tmp);
    a->e[i] = (st_entry){a->names[i], dt, 2, {rows, cols}, a->data[i]};
}

static void free_files(adapter_files *a) {
    for (int i = 0; i < a->n; i++) free(a->data[i]);
    a->n = 0;
}

static int write_adapter(const char *dir, const char *config_json, adapter_files *a) {
    char p[512];
    mkdir(dir, 0700);
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    if (io_test_write_file(p, config_json, strlen(config_json)) != 0) return -1;
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    return a ? st_write(p, a->e, a->n) : 0;
}

static const char *cfg_r4 =
    "{\"peft_type\": \"LORA\", \"task_type\": \"CAUSAL_LM\", \"r\": 4, \"lora_alpha\": 8, \"lora_dropout\": 0.05,\n"
    " \"bias\": \"none\", \"use_rslora\": false, \"use_dora\": false, \"fan_in_fan_out\": false,\n"
    " \"rank_pattern\": {}, \"alpha_pattern\": {}, \"modules_to_save\": null, \"unknown_future_key\": 1,\n"
    " \"target_modules\": [\"in_proj_qkv\", \"q_proj\", \"up_proj\"]}";

/* The standard valid adapter on the tiny model: three modules, both key prefixes. */
static void standard(adapter_files *a, const qwen35_config *c) {
    int64_t H = c->hidden_size, conv = 2 * c->lin_n_k_heads * c->lin_k_head_dim + c->lin_n_v_heads * c->lin_v_head_dim;
    add(a, "model.", "layers.0.linear_attn.in_proj_qkv.lora_A.weight", DT_F32, 4, H);
    add(a, "model.", "layers.0.linear_attn.in_proj_qkv.lora_B.weight", DT_BF16, conv, 4);
    add(a, "model.language_model.", "layers.3.self_attn.q_proj.lora_A.weight", DT_F16, 4, H);
    add(a, "model.language_model.", "layers.3.self_attn.q_proj.lora_B.weight", DT_F32, 2 * c->n_heads * c->head_dim, 4);
    add(a, "model.", "layers.1.mlp.up_proj.lora_A.weight", DT_F32, 4, H);
    add(a, "model.", "layers.1.mlp.up_proj.lora_B.weight", DT_F32, c->intermediate_size, 4);
}

static void run_adapter_ok(const char *root, const checkpoint *ck) {
    const qwen35_config *c = &ck->cfg;
    char dir[512];
    adapter_files f = {0};
    lora_adapter ad;

    snprintf(dir, sizeof dir, "%s/ok", root);
    standard(&f, c);
    CHECK_OK(write_adapter(dir, cfg_r4, &f));
    CHECK_OK(adapter_load(&ad, dir, ck));
    CHECK(ad.rank == 4 && ad.alpha == 8 && fabs(ad.dropout - 0.05) < 1e-12 && !ad.rslora);
    CHECK(ad.n_targets == 3 && !strcmp(ad.targets[0], "in_proj_qkv") && !strcmp(ad.targets[2], "up_proj"));
    CHECK(ad.n_modules == 3);
    /* sorted by layer */
    CHECK(ad.modules[0].kind == W_LIN_QKV && ad.modules[0].layer == 0);
    CHECK(ad.modules[1].kind == W_MLP_UP && ad.modules[1].layer == 1);
    CHECK(ad.modules[2].kind == W_ATT_Q && ad.modules[2].layer == 3);
    const dt_lora *l = &ad.modules[2].lora;
    CHECK(l->rank == 4 && l->scale == 2.0f && l->in == c->hidden_size && l->out == 2 * c->n_heads * c->head_dim);
    /* F16 A and BF16 B converted exactly (the values are representable) */
    CHECK(l->A[0] == -6 * 0.125f + 2 && l->A[5] == -1 * 0.125f + 2);
    CHECK(l->B[0] == -6 * 0.125f + 3);
    const dt_lora *q = &ad.modules[0].lora;
    CHECK(q->B[1] == -5 * 0.125f + 1 && q->A[12] == 6 * 0.125f);
    adapter_free(&ad);
    CHECK(ad.modules == NULL && ad.targets == NULL);
    adapter_free(&ad);

    /* rsLoRA scale; a regex target list is resolved from the tensors */
    snprintf(dir, sizeof dir, "%s/rs", root);
    CHECK_OK(write_adapter(dir,
                           "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 16, \"use_rslora\": true,"
                           " \"target_modules\": \"all-linear\"}",
                           &f));
    CHECK_OK(adapter_load(&ad, dir, ck));
    CHECK(ad.modules[0].lora.scale == 8.0f && ad.rslora);
    CHECK(ad.n_targets == 3);
    int seen = 0;
    for (int i = 0; i < ad.n_targets; i++)
        seen += !strcmp(ad.targets[i], "q_proj") + !strcmp(ad.targets[i], "up_proj") + !strcmp(ad.targets[i], "in_proj_qkv");
    CHECK(seen == 3);
    adapter_free(&ad);
    free_files(&f);
}

static void expect_cfg_err(const char *root, const char *sub, const char *json, const checkpoint *ck,
                           const char *needle) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", root, sub);
    adapter_files f = {0};
    standard(&f, &ck->cfg);
    int rc = write_adapter(dir, json, &f);
    free_files(&f);
    CHECK(rc == 0);
    lora_adapter ad;
    CHECK_ERR(adapter_load(&ad, dir, ck), needle);
    CHECKF(strstr(dt_errmsg(), "adapter_config.json"), "error lacks the file: %s", dt_errmsg());
    CHECK(ad.modules == NULL && ad.targets == NULL);
}

/* The standard adapter with tensor i replaced by (rel, rows, cols), or dropped when rel is NULL. */
static void expect_tensor_err(const char *root, const char *sub, const checkpoint *ck, int i, const char *prefix,
                              const char *rel, int64_t rows, int64_t cols, const char *needle) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", root, sub);
    adapter_files f = {0}, g = {0};
    standard(&f, &ck->cfg);
    for (int k = 0; k < f.n; k++) {
        if (k != i) {
            add(&g, "", f.names[k] + strlen("base_model.model."), f.e[k].dtype, f.e[k].shape[0], f.e[k].shape[1]);
        } else if (rel) {
            add(&g, prefix, rel, DT_F32, rows, cols);
        }
    }
    int rc = write_adapter(dir, cfg_r4, &g);
    free_files(&f);
    free_files(&g);
    CHECK(rc == 0);
    lora_adapter ad;
    CHECK_ERR(adapter_load(&ad, dir, ck), needle);
    CHECKF(strstr(dt_errmsg(), "adapter_model.safetensors"), "error lacks the file: %s", dt_errmsg());
    CHECK(ad.modules == NULL);
}

static void run_adapter_errors(const char *root, const checkpoint *ck) {
    int64_t H = ck->cfg.hidden_size;
    expect_cfg_err(root, "dora", "{\"peft_type\": \"LORA\", \"r\": 4, \"use_dora\": true}", ck, "use_dora");
    expect_cfg_err(root, "rp", "{\"peft_type\": \"LORA\", \"r\": 4, \"rank_pattern\": {\"q_proj\": 8}}", ck,
                   "rank_pattern");
    expect_cfg_err(root, "ap", "{\"peft_type\": \"LORA\", \"r\": 4, \"alpha_pattern\": {\"q_proj\": 8}}", ck,
                   "alpha_pattern");
    expect_cfg_err(root, "bias", "{\"peft_type\": \"LORA\", \"r\": 4, \"bias\": \"all\"}", ck, "field bias");
    expect_cfg_err(root, "fifo", "{\"peft_type\": \"LORA\", \"r\": 4, \"fan_in_fan_out\": true}", ck, "fan_in_fan_out");
    expect_cfg_err(root, "mts", "{\"peft_type\": \"LORA\", \"r\": 4, \"modules_to_save\": [\"lm_head\"]}", ck,
                   "modules_to_save");
    expect_cfg_err(root, "ia3", "{\"peft_type\": \"IA3\"}", ck, "peft_type: \"IA3\" is not supported");
    expect_cfg_err(root, "nopt", "{\"r\": 4}", ck, "missing required field peft_type");
    expect_cfg_err(root, "rstr", "{\"peft_type\": \"LORA\", \"r\": \"4\"}", ck, "field r: expected a number");
    expect_cfg_err(root, "r0", "{\"peft_type\": \"LORA\", \"r\": 0}", ck, "field r");
    expect_cfg_err(root, "tm", "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": 5}", ck, "target_modules");
    expect_cfg_err(root, "json", "{\"peft_type\": \"LORA\",", ck, "invalid JSON");

    /* rank from the config disagrees with the tensors */
    expect_tensor_err(root, "shapeA", ck, 0, "model.", "layers.0.linear_attn.in_proj_qkv.lora_A.weight", 4, H + 1,
                      "tensor base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_A.weight has shape");
    expect_tensor_err(root, "shapeB", ck, 5, "model.", "layers.1.mlp.up_proj.lora_B.weight", 10, 4,
                      "lora_B.weight has shape [10, 4], expected [384, 4]");
    /* q_proj on a Gated DeltaNet layer, a layer past the end, a module LoRA cannot target */
    expect_tensor_err(root, "unk1", ck, 0, "model.", "layers.0.self_attn.q_proj.lora_A.weight", 4, H,
                      "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: names no LoRA-targetable module");
    expect_tensor_err(root, "unk2", ck, 0, "model.", "layers.99.mlp.up_proj.lora_A.weight", 4, H, "names no LoRA-targetable");
    expect_tensor_err(root, "unk3", ck, 0, "model.", "layers.0.linear_attn.conv1d.lora_A.weight", 4, H, "names no LoRA-targetable");
    expect_tensor_err(root, "unk4", ck, 0, "model.", "lm_head.lora_A.weight", 4, H, "names no LoRA-targetable");
    expect_tensor_err(root, "unk5", ck, 0, "", "lm_head.lora_A.weight", 4, H, "names no module of this model");
    expect_tensor_err(root, "unk6", ck, 0, "model.", "layers.0.mlp.up_proj.lora_magnitude_vector", 4, H,
                      "not a lora_A or lora_B weight");
    /* an A without its B */
    expect_tensor_err(root, "lone", ck, 5, NULL, NULL, 0, 0, "module layers.1.mlp.up_proj has lora_A but no lora_B");
    /* the same module through both prefixes */
    expect_tensor_err(root, "twice", ck, 5, "model.language_model.", "layers.0.linear_attn.in_proj_qkv.lora_A.weight",
                      4, H, "a second lora_A");

    /* missing or unsupported weight files */
    char dir[512], p[600];
    snprintf(dir, sizeof dir, "%s/nofile", root);
    CHECK(write_adapter(dir, cfg_r4, NULL) == 0);
    lora_adapter ad;
    CHECK_ERR(adapter_load(&ad, dir, ck), "adapter_model.safetensors: cannot open");
    snprintf(p, sizeof p, "%s/adapter_model.bin", dir);
    CHECK(io_test_write_file(p, "x", 1) == 0);
    CHECK_ERR(adapter_load(&ad, dir, ck), "adapter_model.bin");
    snprintf(dir, sizeof dir, "%s/nodir", root);
    CHECK_ERR(adapter_load(&ad, dir, ck), "nodir/adapter_config.json: cannot open");
    snprintf(dir, sizeof dir, "%s/empty", root);
    adapter_files none = {0};
    CHECK(write_adapter(dir, cfg_r4, &none) == 0);
    CHECK_ERR(adapter_load(&ad, dir, ck), "no LoRA tensors");
}

static void run_adapter(const char *root, int errors) {
    char ckdir[512];
    snprintf(ckdir, sizeof ckdir, "%s/model", root);
    CHECK(mkdir(ckdir, 0700) == 0);
    qwen35_config c;
    CHECK_OK(qwen35_preset("tiny", &c));
    CHECK_OK(io_test_write_checkpoint(ckdir, &c, LAYOUT_TEXT));
    checkpoint ck;
    CHECK_OK(checkpoint_open(&ck, ckdir));
    if (errors) run_adapter_errors(root, &ck);
    else run_adapter_ok(root, &ck);
    checkpoint_close(&ck);
}

TEST(adapter_load_ok) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_adapter(dir, 0);
    io_test_rmdir(dir);
}

TEST(adapter_load_refusals) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_adapter(dir, 1);
    io_test_rmdir(dir);
}
