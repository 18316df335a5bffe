/* Quantize-on-load and the mlx-community writer (quantize_ckpt.h, formats.md §7). */
#include "deltatune/quantize_ckpt.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "deltatune/error.h"
#include "deltatune/files.h"
#include "deltatune/quant.h"

#define PREFIX_MLX "language_model.model."
#define LM_HEAD_MLX "language_model.lm_head"

/* ---------------------------------------------------------------- quantize on load */

/* rows of w quantized into words / bf16 scales and biases, in blocks of rows per thread. */
static int quantize_weight(uint32_t *wq, uint16_t *scales, uint16_t *biases, const dt_weight *w, int bits,
                           int group) {
    int64_t rows = w->rows, cols = w->cols, words = cols * bits / 32, groups = cols / group;
    int64_t block = cols >= 65536 ? 1 : 65536 / cols;
    int64_t n_blocks = (rows + block - 1) / block;
    int failed = 0;
#pragma omp parallel if (n_blocks > 1)
    {
        float *f = malloc((size_t)(block * cols) * sizeof *f);
        float *s = malloc((size_t)(block * groups) * sizeof *s);
        float *b = malloc((size_t)(block * groups) * sizeof *b);
        if (!f || !s || !b) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t k = 0; k < n_blocks; k++) {
            if (!f || !s || !b) continue;
            int64_t r0 = k * block, nr = rows - r0 < block ? rows - r0 : block;
            dt_weight_rows_f32(f, w, r0, nr);
            quant_quantize(wq + r0 * words, s, b, f, nr, cols, bits, group);
            for (int64_t j = 0; j < nr * groups; j++) {
                scales[r0 * groups + j] = dt_f32_to_bf16(s[j]);
                biases[r0 * groups + j] = dt_f32_to_bf16(b[j]);
            }
        }
        free(f);
        free(s);
        free(b);
    }
    return failed ? dt_err("out of memory") : 0;
}

static void add_skipped(ckpt_quant_stats *st, const char *name) {
    size_t n = strlen(st->skipped), cap = sizeof st->skipped;
    if (n + strlen(name) + 8 >= cap) {
        if (n + 5 < cap && !strstr(st->skipped, "...")) snprintf(st->skipped + n, cap - n, ", ...");
    } else {
        snprintf(st->skipped + n, cap - n, "%s%s", n ? ", " : "", name);
    }
    st->n_skipped++;
}

int checkpoint_quantize(checkpoint *ck, int bits, int group, ckpt_quant_stats *st) {
    memset(st, 0, sizeof *st);
    st->bytes_before = ck->weight_bytes;
    if (ck->n_quantized > 0)
        return dt_err("%s is already quantized (%d-bit, group size %d); --quantize needs a bf16/f16/f32 checkpoint",
                      ck->dir, ck->qbits, ck->qgroup);
    if (quant_check(bits, group, group, "--quantize / --group-size") != 0) return -1;
    for (int i = 0; i < ck->n_specs; i++) {
        const qwen35_tensor_spec *s = &ck->specs[i];
        dt_weight *w = &ck->weights[i];
        if (!checkpoint_kind_is_quantizable(s->kind) || w->qbits) continue;
        if (w->cols % group != 0 || w->cols * bits % 32 != 0) {
            add_skipped(st, s->name);
            continue;
        }
        int64_t words = w->rows * (w->cols * bits / 32), groups = w->rows * (w->cols / group);
        uint32_t *wq = checkpoint_own(ck, (size_t)words * sizeof *wq);
        uint16_t *sc = checkpoint_own(ck, (size_t)groups * sizeof *sc);
        uint16_t *bi = checkpoint_own(ck, (size_t)groups * sizeof *bi);
        if (!wq || !sc || !bi) return dt_err("out of memory quantizing %s", s->name);
        if (quantize_weight(wq, sc, bi, w, bits, group) != 0) return dt_err_wrap("quantizing %s", s->name);
        ck->weight_bytes -= dt_weight_bytes(w);
        *w = (dt_weight){.dtype = DT_U32, .data = wq, .rows = w->rows, .cols = w->cols, .qbits = bits,
                         .qgroup = group, .qdtype = DT_BF16, .scales = sc, .biases = bi};
        ck->weight_bytes += dt_weight_bytes(w);
        ck->n_quantized++;
        st->n_quantized++;
    }
    ck->qbits = bits;
    ck->qgroup = group;
    st->bytes_after = ck->weight_bytes;
    return 0;
}

static void human_bytes(char *buf, size_t cap, double b) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int k = 0;
    while (b >= 1024 && k < 4) b /= 1024, k++;
    snprintf(buf, cap, k ? "%.1f %s" : "%.0f %s", b, u[k]);
}

void checkpoint_quant_summary(char *buf, size_t cap, const checkpoint *ck, const ckpt_quant_stats *st) {
    char a[32], b[32];
    human_bytes(a, sizeof a, (double)st->bytes_before);
    human_bytes(b, sizeof b, (double)st->bytes_after);
    int n = snprintf(buf, cap, "%d-bit affine, group size %d: %d weights quantized, %s -> %s", ck->qbits, ck->qgroup,
                     st->n_quantized, a, b);
    if (st->n_skipped && n > 0 && (size_t)n < cap)
        snprintf(buf + n, cap - (size_t)n, "; %d left unquantized (group size does not divide the row): %s",
                 st->n_skipped, st->skipped);
}

/* ---------------------------------------------------------------- writing the MLX layout */

/* The dtype the model's float tensors are kept in: the embedding's (its scales' when quantized). */
static dt_dtype model_dtype(const checkpoint *ck) {
    const dt_weight *e = checkpoint_weight(ck, W_EMBED, -1);
    if (!e) return DT_BF16;
    return e->qbits ? e->qdtype : e->dtype;
}

/* One tensor to write and where its bytes come from. */
typedef struct {
    char name[192];
    const void *data;       /* NULL: a norm to write +1 from `w` */
    const dt_weight *w;
} wsrc;

static void module_name(char *buf, size_t cap, const checkpoint *ck, const qwen35_tensor_spec *s) {
    if (s->kind == W_LM_HEAD) snprintf(buf, cap, "%s", LM_HEAD_MLX);
    else snprintf(buf, cap, PREFIX_MLX "%.*s", (int)(strlen(s->name) - strlen(".weight")), s->name);
}

static int build_entries(const checkpoint *ck, st_entry *e, wsrc *src, int *n_out) {
    int n = 0;
    dt_dtype mdt = model_dtype(ck);
    for (int i = 0; i < ck->n_specs; i++) {
        const qwen35_tensor_spec *s = &ck->specs[i];
        const dt_weight *w = &ck->weights[i];
        if (w->qbits) {
            char mod[160];
            module_name(mod, sizeof mod, ck, s);
            const char *suffix[3] = {"weight", "scales", "biases"};
            const void *data[3] = {w->data, w->scales, w->biases};
            for (int k = 0; k < 3; k++, n++) {
                snprintf(src[n].name, sizeof src[n].name, "%s.%s", mod, suffix[k]);
                src[n].data = data[k];
                src[n].w = w;
                e[n] = (st_entry){.name = src[n].name, .dtype = k ? w->qdtype : DT_U32, .ndim = 2,
                                  .shape = {w->rows, k ? w->cols / w->qgroup : w->cols * w->qbits / 32}};
            }
            continue;
        }
        if (s->kind == W_LM_HEAD) snprintf(src[n].name, sizeof src[n].name, LM_HEAD_MLX ".weight");
        else snprintf(src[n].name, sizeof src[n].name, PREFIX_MLX "%s", s->name);
        src[n].w = w;
        e[n] = (st_entry){.name = src[n].name, .dtype = w->dtype, .ndim = s->ndim};
        memcpy(e[n].shape, s->shape, sizeof s->shape);
        if (s->kind == W_LIN_CONV) {  /* [C,1,K] -> [C,K,1]: the same bytes */
            e[n].shape[1] = s->shape[2];
            e[n].shape[2] = s->shape[1];
        }
        if (checkpoint_norm_is_shifted(s->kind)) {
            src[n].data = NULL;
            /* norms loaded from an MLX file are fp32 copies; write them back in the model's dtype */
            if (ck->mlx) e[n].dtype = mdt;
        } else {
            src[n].data = w->data;
        }
        n++;
    }
    *n_out = n;
    return 0;
}

static int write_norm(st_writer *wr, const st_entry *e, const dt_weight *w) {
    int64_t n = w->rows * w->cols;
    float *f = malloc((size_t)n * sizeof *f);
    void *out = malloc((size_t)n * dt_dtype_size(e->dtype));
    int rc = f && out ? 0 : dt_err("out of memory");
    if (rc == 0 && dt_to_f32(f, w->data, w->dtype, (size_t)n) != 0) rc = dt_err("%s: not a float tensor", e->name);
    for (int64_t j = 0; rc == 0 && j < n; j++) f[j] += 1.0f;
    if (rc == 0) rc = dt_from_f32(out, e->dtype, f, (size_t)n);
    if (rc == 0) rc = st_writer_write(wr, out, (size_t)n * dt_dtype_size(e->dtype));
    free(f);
    free(out);
    return rc;
}

static size_t entry_bytes(const st_entry *e) {
    size_t n = dt_dtype_size(e->dtype);
    for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
    return n;
}

static int write_weights(const checkpoint *ck, const char *path, ckpt_write_stats *st) {
    st_entry *e = calloc((size_t)ck->n_specs * 3, sizeof *e);
    wsrc *src = calloc((size_t)ck->n_specs * 3, sizeof *src);
    int n = 0, rc = e && src ? 0 : dt_err("out of memory");
    if (rc == 0) rc = build_entries(ck, e, src, &n);
    st_writer *wr = NULL;
    if (rc == 0) rc = st_writer_open(&wr, path, e, n);
    for (int i = 0; rc == 0 && i < n; i++) {
        size_t bytes = entry_bytes(&e[i]);
        rc = src[i].data ? st_writer_write(wr, src[i].data, bytes) : write_norm(wr, &e[i], src[i].w);
        st->bytes += (int64_t)bytes;
        st->tensors++;
    }
    if (wr) rc = rc == 0 ? st_writer_close(wr) : (st_writer_abort(wr), -1);
    free(e);
    free(src);
    return rc;
}

static json_t *quant_json(const checkpoint *ck) {
    json_t *q = json_pack("{s:i, s:i, s:s}", "group_size", ck->qgroup, "bits", ck->qbits, "mode", "affine");
    /* modules at other settings than the global ones (mixed recipes) get their own entries */
    for (int i = 0; q && i < ck->n_specs; i++) {
        const dt_weight *w = &ck->weights[i];
        if (!w->qbits || (w->qbits == ck->qbits && w->qgroup == ck->qgroup)) continue;
        char mod[160];
        module_name(mod, sizeof mod, ck, &ck->specs[i]);
        json_object_set_new(q, mod, json_pack("{s:i, s:i}", "group_size", w->qgroup, "bits", w->qbits));
    }
    return q;
}

/* The source config.json when it has a text_config (mlx-vlm's shape, every field kept), else one
 * written from the parsed config in the multimodal layout; plus the quantization record. */
static int write_config(const checkpoint *ck, const char *out_dir) {
    char *src = io_path_join(ck->dir, "config.json"), *dst = io_path_join(out_dir, "config.json");
    int rc = src && dst ? 0 : dt_err("out of memory");
    json_t *root = NULL;
    if (rc == 0) {
        root = io_load_json(src);
        if (root && !json_is_object(json_object_get(root, "text_config"))) {
            json_decref(root);
            root = NULL;
            rc = qwen35_config_save_quant(&ck->cfg, LAYOUT_MULTIMODAL, model_dtype(ck), 0, 0, dst);
            if (rc == 0) root = io_load_json(dst);
        }
        if (rc == 0 && !root) rc = -1;
    }
    if (rc == 0) {
        json_object_del(root, "quantization");
        json_object_del(root, "quantization_config");
        if (ck->qbits > 0) {
            json_t *q = quant_json(ck);
            if (!q) rc = dt_err("out of memory");
            else {
                json_object_set(root, "quantization", q);
                json_object_set_new(root, "quantization_config", q);
            }
        }
        /* an lm_head found in a tied checkpoint is written, so the copy is untied */
        if (!ck->cfg.tie_word_embeddings) {
            json_object_set_new(root, "tie_word_embeddings", json_false());
            json_t *tc = json_object_get(root, "text_config");
            if (json_is_object(tc) && json_object_get(tc, "tie_word_embeddings"))
                json_object_set_new(tc, "tie_word_embeddings", json_false());
        }
    }
    if (rc == 0) rc = io_write_json_atomic(dst, root, JSON_INDENT(4));
    json_decref(root);
    free(src);
    free(dst);
    return rc;
}

int checkpoint_write_mlx(const checkpoint *ck, const char *out_dir, ckpt_write_stats *st) {
    memset(st, 0, sizeof *st);
    struct stat so, sm;
    if (stat(out_dir, &so) == 0 && stat(ck->dir, &sm) == 0 && so.st_ino == sm.st_ino && so.st_dev == sm.st_dev)
        return dt_err("%s: the output folder is the model folder; write the quantized model elsewhere", out_dir);
    if (io_make_dirs(out_dir)) return -1;
    char *index = io_path_join(out_dir, "model.safetensors.index.json");
    char *path = io_path_join(out_dir, "model.safetensors");
    int rc = index && path ? 0 : dt_err("out of memory");
    if (rc == 0 && io_file_exists(index))
        rc = dt_err("%s already holds a sharded checkpoint (model.safetensors.index.json); choose an empty folder",
                    out_dir);
    if (rc == 0) rc = write_weights(ck, path, st);
    int wrote = rc == 0;
    if (rc == 0) rc = io_copy_files(ck->dir, out_dir, checkpoint_side_files);
    if (rc == 0) rc = write_config(ck, out_dir);
    if (rc != 0 && wrote) remove(path);  /* weights without their config would mislead */
    free(index);
    free(path);
    return rc == 0 ? 0 : dt_err_wrap("write %s", out_dir);
}

int64_t qwen35_weight_bytes_quantized(const qwen35_config *c, int bits, int group) {
    int n = qwen35_tensor_count(c);
    qwen35_tensor_spec *specs = calloc((size_t)(n > 0 ? n : 1), sizeof *specs);
    if (!specs) return -1;
    qwen35_tensor_specs(c, specs);
    int64_t bytes = 0;
    for (int i = 0; i < n; i++) {
        const qwen35_tensor_spec *s = &specs[i];
        int64_t numel = qwen35_spec_numel(s), cols = s->shape[s->ndim - 1], rows = numel / (cols > 0 ? cols : 1);
        bool linear = s->kind == W_EMBED || s->kind == W_LM_HEAD || qwen35_lora_module_name(s->kind) != NULL;
        if (bits > 0 && linear && s->ndim == 2 && cols % group == 0 && cols * bits % 32 == 0)
            bytes += rows * cols * bits / 8 + 2 * rows * (cols / group) * 2;  /* words, bf16 scales and biases */
        else
            bytes += 2 * numel;
    }
    free(specs);
    return bytes;
}
