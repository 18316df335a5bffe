/* The CUDA entry points of a build without the CUDA backend (no nvcc, or the sanitizer build):
 * each says so, so `--device cuda` fails with a clear message. */
#include "deltatune/qwen35_cuda.h"

#include "deltatune/error.h"

static int no_cuda(void) { return dt_err("this deltatune was built without CUDA (nvcc was not found at build time)"); }

bool qwen35_cuda_available(void) { return false; }
int qwen35_cuda_create(qwen35_cuda **g, const qwen35_model *m) {
    *g = NULL;
    return no_cuda();
}
void qwen35_cuda_free(qwen35_cuda *g) {}
int qwen35_cuda_sync_lora(qwen35_cuda *g, const qwen35_model *m) { return no_cuda(); }
int qwen35_cuda_forward_backward(qwen35_cuda *g, const qwen35_model *m, const qwen35_batch *b, double grad_scale,
                                 bool grad_checkpoint, double *loss_sum, int64_t *n_targets) {
    return no_cuda();
}
int qwen35_cuda_eval_loss(qwen35_cuda *g, const qwen35_model *m, const qwen35_batch *b, double *loss_sum,
                          int64_t *n_targets) {
    return no_cuda();
}
int qwen35_cuda_optim_upload(qwen35_cuda *g, const qwen35_model *m, dt_lora *const *loras, float *const *moments,
                             int n) {
    return no_cuda();
}
int qwen35_cuda_optim_download(qwen35_cuda *g, dt_lora *const *loras, float *const *moments, int n) {
    return no_cuda();
}
int qwen35_cuda_grad_norm(qwen35_cuda *g, double *norm) { return no_cuda(); }
int qwen35_cuda_adamw(qwen35_cuda *g, int64_t step, double lr, const adamw_config *c, double grad_mul) {
    return no_cuda();
}
int qwen35_cuda_decode_init(qwen35_cuda *g, int64_t max_len) { return no_cuda(); }
int qwen35_cuda_forward_cached(qwen35_cuda *g, const qwen35_model *m, int64_t n_past, const int32_t *ids, int n,
                               float *logits) {
    return no_cuda();
}
void qwen35_cuda_memory(const qwen35_cuda *g, int64_t *weight_bytes, int64_t *peak_bytes) {
    *weight_bytes = *peak_bytes = 0;
}
void qwen35_cuda_reset_peak(qwen35_cuda *g) {}
int64_t qwen35_cuda_graph_launches(const qwen35_cuda *g) { return 0; }
void qwen35_cuda_profile(qwen35_cuda *g, FILE *f) {}
const char *qwen35_cuda_device_name(void) { return ""; }
