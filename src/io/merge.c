/* deltatune merge: the adapter folded into a standalone checkpoint in the base's layout. */
#include "deltatune/merge.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "deltatune/error.h"
#include "deltatune/files.h"
#include "ops/blas.h"

/* The adapter module whose target is the tensor called name, or NULL. */
static const lora_module *module_for(const checkpoint *ck, const lora_adapter *a, const char *name) {
    for (int i = 0; i < a->n_modules; i++) {
        char path[160], full[256];
        qwen35_module_path(path, sizeof path, a->modules[i].kind, a->modules[i].layer);
        snprintf(full, sizeof full, "%s%s.weight", ck->prefix, path);
        if (!strcmp(full, name)) return &a->modules[i];
    }
    return NULL;
}

/* W (rows x cols, any float dtype) + scale B A, in fp32. */
static float *merged_weight(const st_tensor *t, const lora_module *lm) {
    const dt_lora *l = &lm->lora;
    float *w = st_tensor_to_f32(t);
    if (!w) return NULL;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)l->out, (int)l->in, l->rank, l->scale, l->B,
                l->rank, l->A, (int)l->in, 1.0f, w, (int)l->in);
    return w;
}

int checkpoint_merge(const checkpoint *ck, const lora_adapter *a, const char *out_dir, int out_dtype,
                     merge_stats *stats) {
    memset(stats, 0, sizeof *stats);
    struct stat so, sm;
    if (stat(out_dir, &so) == 0 && stat(ck->dir, &sm) == 0 && so.st_ino == sm.st_ino && so.st_dev == sm.st_dev)
        return dt_err("%s: the output folder is the model folder; write the merged model elsewhere", out_dir);
    if (io_make_dirs(out_dir)) return -1;
    int n = 0;
    for (int f = 0; f < ck->n_files; f++) n += ck->files[f].n;
    st_entry *entries = calloc((size_t)(n > 0 ? n : 1), sizeof *entries);
    const st_tensor **src = calloc((size_t)(n > 0 ? n : 1), sizeof *src);
    if (!entries || !src) {
        free(entries);
        free(src);
        return dt_err("out of memory");
    }
    int k = 0;
    for (int f = 0; f < ck->n_files; f++)
        for (int i = 0; i < ck->files[f].n; i++, k++) {
            const st_tensor *t = &ck->files[f].tensors[i];
            src[k] = t;
            entries[k].name = t->name;
            entries[k].ndim = t->ndim;
            memcpy(entries[k].shape, t->shape, sizeof t->shape);
            bool matrix = t->ndim >= 2 && dt_dtype_is_float(t->dtype);
            entries[k].dtype = matrix && out_dtype >= 0 ? (dt_dtype)out_dtype : t->dtype;
        }
    char *path = io_path_join(out_dir, "model.safetensors");
    st_writer *w = NULL;
    int rc = path ? st_writer_open(&w, path, entries, n) : dt_err("out of memory");
    for (int i = 0; rc == 0 && i < n; i++) {
        const st_tensor *t = src[i];
        const lora_module *lm = module_for(ck, a, t->name);
        size_t out_bytes = (size_t)t->numel * dt_dtype_size(entries[i].dtype);
        if (!lm && entries[i].dtype == t->dtype) {
            rc = st_writer_write(w, t->data, t->nbytes);
        } else {
            float *f32 = lm ? merged_weight(t, lm) : st_tensor_to_f32(t);
            void *out = malloc(out_bytes > 0 ? out_bytes : 1);
            if (!f32 || !out) rc = dt_err("out of memory converting %s", t->name);
            if (rc == 0) rc = dt_from_f32(out, entries[i].dtype, f32, (size_t)t->numel);
            if (rc == 0) rc = st_writer_write(w, out, out_bytes);
            free(f32);
            free(out);
            stats->merged += lm != NULL;
        }
        stats->bytes += out_bytes;
        stats->tensors++;
    }
    if (w) rc = rc == 0 ? st_writer_close(w) : (st_writer_abort(w), -1);
    if (rc == 0 && stats->merged != a->n_modules)
        rc = dt_err("%lld of the adapter's %d modules found no tensor", (long long)(a->n_modules - stats->merged),
                    a->n_modules);
    static const char *const config[] = {"config.json", NULL};
    if (rc == 0) rc = io_copy_files(ck->dir, out_dir, config);
    if (rc == 0) rc = io_copy_files(ck->dir, out_dir, checkpoint_side_files);
    if (rc != 0 && path) remove(path);  /* a config without its weights would mislead */
    free(path);
    free(entries);
    free(src);
    return rc == 0 ? 0 : dt_err_wrap("merge into %s", out_dir);
}
