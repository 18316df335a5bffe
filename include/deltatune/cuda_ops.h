/* The CUDA backend's ops: the families of ops.h on device pointers, for the Qwen3.5
 * decoder's training step. Each is tested against the CPU op on random data
 * (tests/cuda/, `make test-cuda`).
 *
 * Types. Weights and the activations that feed matrix products are bf16 (dt_bf16 holds
 * its bits); arithmetic is fp32. The residual stream and its gradient are fp32, as are the
 * recurrent state, norm statistics, the gates and the loss. Gradients that a matrix product
 * produces are fp32 and accumulate (dx += dy W); gradients that a matrix product consumes
 * are bf16. Each function says whether it overwrites or accumulates.
 *
 * Every launch goes to one stream (see src/cuda/cuda_internal.h); nothing waits for the
 * device except cuda_check, cuda_download and cuda_upload. Errors of launches are sticky
 * until cuda_check(). Frozen weights (norms, conv, gates) get no gradient: LoRA trains only
 * its A and B. */
#ifndef DELTATUNE_CUDA_OPS_H
#define DELTATUNE_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

typedef uint16_t dt_bf16;

/* ---- runtime.cu ---- */
/* Number of CUDA devices (0 without a driver or a GPU). */
int cuda_device_count(void);
/* The device's name, or "" */
const char *cuda_device_name(void);
/* Device 0, the stream and the cuBLAS handle; idempotent. */
int cuda_init(void);
/* Device memory, counted: cuda_mem_peak is the most that was allocated at once through
 * cuda_alloc since the last cuda_mem_reset_peak (cuBLAS's workspace included). */
int cuda_alloc(void **p, size_t bytes);
void cuda_free(void *p);
size_t cuda_mem_live(void);
size_t cuda_mem_peak(void);
void cuda_mem_reset_peak(void);
int cuda_upload(void *dst, const void *src, size_t bytes);
int cuda_download(void *dst, const void *src, size_t bytes);
int cuda_zero(void *p, size_t bytes);   /* on the stream, no wait */
void cuda_copy_f32(float *dst, const float *src, int64_t n);  /* device to device, on the stream */
/* rows of width bytes, device to device, on the stream: row i from src + i src_pitch to dst + i dst_pitch */
int cuda_copy_rows(void *dst, size_t dst_pitch, const void *src, size_t src_pitch, size_t width, size_t rows);
/* Waits for the device and reports any error of the launches since the last check. */
int cuda_check(const char *what);
/* A CUDA graph: between begin and end the launches on the stream are recorded, not run; end
 * instantiates them (*exec NULL and an error when the capture failed); launch replays them. */
int cuda_graph_begin(void);
int cuda_graph_end(void **exec);
int cuda_graph_launch(void *exec);
void cuda_graph_free(void *exec);
/* Time per named region, from events on the stream (enabled by cuda_prof_enable(1)):
 * push/pop nest; the report sums each name's milliseconds since the last reset. */
void cuda_prof_enable(int on);
void cuda_prof_push(const char *name);  /* name must outlive the report (a literal) */
void cuda_prof_pop(void);
void cuda_prof_reset(void);
/* Adds ms of host wall-clock time under name (for work the events cannot see). */
void cuda_prof_add_host(const char *name, double ms);
/* Writes "profile: name ms-per-step share" lines, largest first, to f (a FILE *); a step is a
 * region named "step". */
void cuda_prof_report(void *f);

/* ---- misc.cu ---- */
void cuda_f32_to_bf16(dt_bf16 *y, const float *x, int64_t n);
void cuda_bf16_to_f32(float *y, const dt_bf16 *x, int64_t n);
/* y += x */
void cuda_add_f32(float *y, const float *x, int64_t n);
/* out[t] (fp32 [T, H]) = E[ids[t]] (E bf16 [V, H]); ids on the device, in range. */
void embedding_forward_cuda(float *out, const int32_t *ids, int64_t T, const dt_bf16 *E, int H);

/* ---- norm.cu ---- */
/* y (bf16, rows ldy long) = x / rms(x) * (1 + w) over rows of D; x fp32 (the residual stream), w
 * fp32 [D]. */
void rmsnorm1p_forward_cuda(dt_bf16 *y, int64_t ldy, const float *x, const float *w, int64_t rows, int D, float eps);
/* dx (fp32) = dx_in + the input gradient, given dy (fp32) and the forward's x; dx_in NULL: zero,
 * and it may be dx (dx += the gradient). dx_bf, when not NULL, receives dx as bf16 too, in rows
 * ld_bf long. */
void rmsnorm1p_backward_cuda(float *dx, dt_bf16 *dx_bf, int64_t ld_bf, const float *dx_in, const float *dy,
                             const float *x, const float *w, int64_t rows, int D, float eps);
/* y (bf16) = w * x / rms(x) * silu(z) over rows of D; x, z bf16, w fp32 [D]. y's and z's rows are
 * a token's heads (rows of x: token row / heads, head row % heads), each token's ldy / ldz long. */
void rmsnorm_gated_forward_cuda(dt_bf16 *y, int heads, int64_t ldy, const dt_bf16 *x, const dt_bf16 *z, int64_t ldz,
                                const float *w, int64_t rows, int D, float eps);
/* dx (fp32) and dz (bf16, a token's heads in rows lddz long, as z's ldz) overwritten, given dy (fp32). */
void rmsnorm_gated_backward_cuda(float *dx, dt_bf16 *dz, int64_t lddz, int heads, const float *dy, const dt_bf16 *x,
                                 const dt_bf16 *z, int64_t ldz, const float *w, int64_t rows, int D, float eps);

/* ---- qk_rope.cu: the gated attention's elementwise parts ---- */
/* Per head: y = rope(rmsnorm1p(x, w)) on the first rot_dim dims (half-split), over N tokens
 * of n_heads heads of hd. Head h of token t is read at x + t * row_stride + h * head_stride
 * (q inside q_proj's [query | gate] rows, or k); y is bf16 [N, n_heads * hd]. pos (device)
 * gives each token's position. */
void qk_norm_rope_forward_cuda(dt_bf16 *y, const dt_bf16 *x, int64_t row_stride, int head_stride, const float *w,
                               const int32_t *pos, int64_t N, int n_heads, int hd, int rot_dim, double theta,
                               float eps);
/* dx (bf16, overwritten, laid out like x) given dy (fp32 [N, n_heads * hd]). */
void qk_norm_rope_backward_cuda(dt_bf16 *dx, int64_t row_stride, int head_stride, const float *dy,
                                const dt_bf16 *x, const float *w, const int32_t *pos, int64_t N, int n_heads,
                                int hd, int rot_dim, double theta, float eps);
/* y = x * sigmoid(gate), x and y bf16 [N, nh * hd] (y's rows ldy long); gate head h of token t is
 * at qg + t * 2 * nh * hd + h * 2 * hd + hd (the second half of q_proj's per-head rows). */
void attn_gate_forward_cuda(dt_bf16 *y, int64_t ldy, const dt_bf16 *x, const dt_bf16 *qg, int64_t N, int nh, int hd);
/* dx (bf16 [N, nh * hd]) and the gate slots of dqg (bf16) overwritten, given dy (fp32). */
void attn_gate_backward_cuda(dt_bf16 *dx, dt_bf16 *dqg, const float *dy, const dt_bf16 *x, const dt_bf16 *qg,
                             int64_t N, int nh, int hd);

typedef enum { CUDA_F32, CUDA_BF16, CUDA_F16 } cuda_dtype;

/* ---- activations.cu ---- */
/* m = silu(gate) * up, bf16 [rows, I]; gate and up in rows ldg long (side by side: the MLP's one
 * product's output). */
void swiglu_forward_cuda(dt_bf16 *m, const dt_bf16 *gate, const dt_bf16 *up, int64_t ldg, int64_t rows, int64_t I);
/* dgate, dup (bf16, rows ldd long) overwritten, given dm (of type dmt), all [rows, I]; gate and up
 * as the forward's. */
void swiglu_backward_cuda(dt_bf16 *dgate, dt_bf16 *dup, int64_t ldd, const void *dm, cuda_dtype dmt,
                          const dt_bf16 *gate, const dt_bf16 *up, int64_t ldg, int64_t rows, int64_t I);
/* The same with dm + g A as the gradient (g bf16 [rows, r], A bf16 [r, I]; g NULL: dm alone): the
 * down projection's LoRA part of dm (linear_backward_defer_lora_cuda), added here rather than by a
 * product over all of dm. dm may be overwritten. */
void swiglu_backward_lora_cuda(dt_bf16 *dgate, dt_bf16 *dup, int64_t ldd, void *dm, cuda_dtype dmt,
                               const dt_bf16 *gate, const dt_bf16 *up, int64_t ldg, int64_t rows, int64_t I,
                               const dt_bf16 *g, const dt_bf16 *A, int r);

/* ---- conv1d.cu ---- */
/* Causal depthwise conv over time then SiLU, over packed sequences: y[t][c] =
 * silu(sum_j w[c][j] x[t-K+1+j][c]), where rows before the token's sequence start count as
 * zero (pos[t] is token t's position in its sequence). x, y bf16 [N, C]; w fp32 [C, K]. */
void conv1d_silu_forward_cuda(dt_bf16 *y, const dt_bf16 *x, const float *w, const int32_t *pos, int64_t N, int C,
                              int K);
/* dx (bf16, overwritten) given dy (fp32). */
void conv1d_silu_backward_cuda(dt_bf16 *dx, const float *dy, const dt_bf16 *x, const float *w, const int32_t *pos,
                               int64_t N, int C, int K);
/* The DeltaNet's conv + SiLU then q/k L2 norm (deltanet_qk_l2norm_forward_cuda) in one: qkv (bf16
 * [N, C]) from mixed, in one pass where K = 4 and dk = 128 (C a multiple of 256), otherwise by
 * the two ops with conv (bf16 [N, C]) as scratch. */
void deltanet_conv_forward_cuda(dt_bf16 *qkv, const dt_bf16 *mixed, const float *w, const int32_t *pos, int64_t N,
                                int K, int n_k_heads, int dk, int64_t C, float q_scale, float eps, dt_bf16 *conv);
/* Their backward together: dmixed (bf16 [N, C], overwritten) given dqkv (fp32 [N, C], the normed
 * q, k and the v's gradient) and the conv's input mixed. One pass where the forward's is one;
 * otherwise the three ops, with conv (bf16 [N, C]) as scratch and dqkv overwritten. */
void deltanet_conv_backward_cuda(dt_bf16 *dmixed, float *dqkv, const dt_bf16 *mixed, const float *w,
                                 const int32_t *pos, int64_t N, int K, int n_k_heads, int dk, int64_t C, float q_scale,
                                 float eps, dt_bf16 *conv);

/* ---- deltanet.cu ---- */
typedef struct {
    int n_k_heads, n_v_heads, dk, dv;
} cuda_deltanet_dims;
/* qkv (bf16 [N, conv_dim]) = conv with each of its n_k_heads q heads (columns [0, key_dim))
 * and k heads ([key_dim, 2 key_dim)) L2-normalised, x / sqrt(sum x^2 + eps), q then times
 * q_scale; the v part ([2 key_dim, conv_dim)) copied. key_dim = n_k_heads * dk. */
void deltanet_qk_l2norm_forward_cuda(dt_bf16 *qkv, const dt_bf16 *conv, int64_t N, int n_k_heads, int dk,
                                     int64_t conv_dim, float q_scale, float eps);
/* dconv (fp32 [N, conv_dim], overwritten) given dqkv (fp32, same layout); dconv may be dqkv. */
void deltanet_qk_l2norm_backward_cuda(float *dconv, const float *dqkv, const dt_bf16 *conv, int64_t N,
                                      int n_k_heads, int dk, int64_t conv_dim, float q_scale, float eps);
/* beta = sigmoid(b), g = -exp(a_log) softplus(a + dt_bias): fp32 [N, Hv] from bf16 b, a (rows ld long). */
void deltanet_gates_forward_cuda(float *beta, float *g, const dt_bf16 *b, const dt_bf16 *a, int64_t ld,
                                 const float *a_log, const float *dt_bias, int64_t N, int Hv);
/* db, da (bf16, rows ld long, overwritten) given dbeta, dg (fp32) and the forward's beta, g: the
 * derivatives come from those, so b and a need not be kept. */
void deltanet_gates_backward_cuda(dt_bf16 *db, dt_bf16 *da, int64_t ld, const float *dbeta, const float *dg,
                                  const float *beta, const float *g, const float *a_log, int64_t N, int Hv);
/* The gated delta rule over packed sequences (in chunks of 32 tokens on tensor cores; with
 * DT_DELTANET=recurrent token by token): sequence s holds tokens
 * [seq_starts[s], seq_starts[s + 1]) (seq_starts on the device, n_seqs + 1 entries; no sequence
 * longer than max_len). q, k, v are read from qkv (bf16 [N, conv_dim], q at column 0, k at
 * key_dim, v at 2 key_dim); value head h reads key head h / (n_v_heads / n_k_heads). State fp32,
 * zero at each sequence start. o: bf16 [N, n_v_heads * dv]. */
void deltanet_forward_cuda(dt_bf16 *o, const dt_bf16 *qkv, const float *beta, const float *g,
                           const int32_t *seq_starts, int n_seqs, int max_len, cuda_deltanet_dims d, void *scratch);
/* Scratch of the forward (the chunked form's per-chunk matrices; NULL falls back to the slower
 * token-by-token kernel), and of the backward (which is at least the forward's). */
/* Decoding: the recurrent form over n tokens of one sequence (seq_starts, device: {0, n}),
 * starting from state (fp32 [n_v_heads, dk, dv], as qwen35_state's) and leaving the state after
 * the last token there. */
void deltanet_forward_state_cuda(dt_bf16 *o, const dt_bf16 *qkv, const float *beta, const float *g,
                                 const int32_t *seq_starts, float *state, cuda_deltanet_dims d);
size_t deltanet_forward_scratch_bytes_cuda(int n_seqs, int max_len, cuda_deltanet_dims d);
size_t deltanet_scratch_bytes_cuda(int n_seqs, int max_len, cuda_deltanet_dims d);
/* dqkv (fp32 [N, conv_dim]), dbeta, dg (fp32 [N, Hv]) overwritten, given dout (fp32
 * [N, n_v_heads * dv]). scratch: deltanet_scratch_bytes_cuda bytes. */
void deltanet_backward_cuda(float *dqkv, float *dbeta, float *dg, const float *dout, const dt_bf16 *qkv,
                            const float *beta, const float *g, const int32_t *seq_starts, int n_seqs, int max_len,
                            cuda_deltanet_dims d, void *scratch);

/* ---- attention.cu ---- */
/* Causal softmax attention with GQA over packed sequences (seq_starts, seq_lens on the host,
 * n_seqs of them): q [N, nh * hd], k, v [N, nkv * hd], out [N, nh * hd], all bf16; query
 * head h reads kv head h / (nh / nkv). lse (fp32 [N, nh]) keeps each row's log-sum-exp for
 * the backward. Works a block of queries at a time: the whole score matrix never exists.
 * scratch: attention_scratch_bytes_cuda bytes. */
size_t attention_scratch_bytes_cuda(int max_len, int nh, int nkv, int hd);
void attention_forward_cuda(dt_bf16 *out, float *lse, const dt_bf16 *q, const dt_bf16 *k, const dt_bf16 *v,
                            const int *seq_starts, const int *seq_lens, int n_seqs, int nh, int nkv, int hd,
                            float scale, void *scratch);
/* dq (fp32 [N, nh * hd]), dk, dv (fp32 [N, nkv * hd]) overwritten, given dout (bf16) and the
 * forward's out and lse. */
void attention_backward_cuda(float *dq, float *dk, float *dv, const dt_bf16 *dout, const dt_bf16 *out,
                             const float *lse, const dt_bf16 *q, const dt_bf16 *k, const dt_bf16 *v,
                             const int *seq_starts, const int *seq_lens, int n_seqs, int nh, int nkv, int hd,
                             float scale, void *scratch);
/* Decoding: out (bf16 [n, nh * hd]) of the queries q (bf16 [n, nh * hd]) at positions past ..
 * past + n - 1 of one sequence, each against the cached keys and values (bf16 [., nkv * hd])
 * up to its own position. hd <= 256. */
void attention_decode_cuda(dt_bf16 *out, const dt_bf16 *q, const dt_bf16 *k_cache, const dt_bf16 *v_cache,
                           int64_t n, int64_t past, int nh, int nkv, int hd, float scale);

/* ---- quant.cu: products through MLX affine-quantized weights (quant.h) ---- */
/* A quantized weight on the device, as the checkpoint holds it: rows of cols values, packed LSB
 * first (bits 2, 3, 4, 5, 6 or 8; a row is a little-endian bit stream of cols * bits / 8 bytes),
 * with a scale and a bias per group of `group` values (stype: F32, BF16 or F16). bits 0: none. */
typedef struct {
    const void *q, *scales, *biases;
    int bits, group;
    cuda_dtype stype;
    int64_t rows, cols;
} cuda_qweight;
/* out (bf16 [nr, cols]) = rows [r0, r0 + nr) of w dequantized, scale q + bias rounded once. */
void dequantize_rows_cuda(dt_bf16 *out, const cuda_qweight *w, int64_t r0, int64_t nr);
/* embedding_forward_cuda from a quantized table: each row dequantized (to bf16, as
 * dequantize_rows_cuda would) as it is gathered. */
void embedding_forward_q_cuda(float *out, const int32_t *ids, int64_t T, const cuda_qweight *E);

/* ---- linear.cu ---- */
/* A frozen linear W [out, in] and its optional LoRA (rank 0: none), PEFT's semantics:
 * y = x W^T + scale (drop(x) A^T) B^T, with the CPU's hash dropout (ops/linear.c). */
typedef struct {
    const dt_bf16 *W;
    /* a quantized base instead of W (wq.bits > 0): each product first dequantizes it into wbuf
     * (in * out bf16, shared by every linear: the products run one after another) */
    cuda_qweight wq;
    dt_bf16 *wbuf;
    int64_t in, out;
    int rank;
    float scale, dropout;
    uint64_t dropout_seed;
    int64_t row0;           /* the rows of this call are rows row0.. of the dropout's matrix */
    const dt_bf16 *A, *B;   /* bf16 copies of the fp32 masters: [rank, in] (rows ld_a long, 0: in),
                               [out, rank] (but see bcol) */
    int64_t ld_a;
    float *dA, *dB;         /* fp32 gradients, accumulated; NULL: none wanted */
    /* W's rows are ldw long (0: in). A wide base (bcol > 0, bf16 W only) holds B's bf16 copy in
     * columns [bcol, bcol + rank) of its rows (B is W + bcol), zeros in [in, bcol). Where the
     * caller keeps u in x's rows from column bcol on (a group's x [T, in + R] with each LoRA's u
     * in its columns), the forward is one product, [x | .. | u] [W | 0 | B]^T, with no pass of the
     * LoRA's own over y. */
    int64_t ldw, bcol;
} cuda_linear;
/* One bf16 copy of a LoRA's A or B where a block of bases holds it (cuda_linear_part):
 * dst[i * ld + j] = bf16(src[src_off + i * cols + j]), [rows, cols]. */
typedef struct {
    int64_t src_off;
    dt_bf16 *dst;
    int64_t rows, ld;
    int cols;
} cuda_wide_copy;
/* Every entry of the device array table [n] (rows at most max_rows), from the fp32 values at src. */
void linear_wide_copy_cuda(const cuda_wide_copy *table, int n, int64_t max_rows, const float *src);
/* The scratch of the products below: rank is the sum of the ranks of a group's LoRAs (one
 * LoRA's for linear_forward_cuda); dropout: whether any drops out its input (which then needs a
 * [T, in] copy). */
size_t linear_scratch_bytes_cuda(int64_t T, int64_t in, int rank, int dropout);
/* y [T, out] (of type yt) = x W^T + LoRA, or y += that when accumulate (fp32 y only). u_keep (bf16
 * [T, rank], may be NULL) receives LoRA's u = scale drop(x) A^T for the backward. */
void linear_forward_cuda(void *y, cuda_dtype yt, int accumulate, const dt_bf16 *x, const cuda_linear *l, int64_t T,
                         void *scratch, dt_bf16 *u_keep);
/* dx (fp32, may be NULL) = dy W + the LoRA path, or dx += that when accumulate; dA, dB += their
 * gradients. x is the forward's input, dy bf16 [T, out] with rows ldy long (0: out; see
 * linear_group_backward_cuda for rows with room after out); u_kept the forward's u_keep, or NULL
 * (u is recomputed). */
void linear_backward_cuda(float *dx, int accumulate, const dt_bf16 *dy, int64_t ldy, const dt_bf16 *x,
                          const cuda_linear *l, int64_t T, void *scratch, const dt_bf16 *u_kept);
/* Linears that read one x (a layer's q, k and v; the DeltaNet's in-projections; the MLP's gate
 * and up), each as linear_forward_cuda / linear_backward_cuda with its part's y or dy. Where two
 * or more have a LoRA, all with one scale and no dropout, and each A (and dA) follows the one
 * before it in memory, their A products run as one on the stacked A [R, in] (R the sum of their
 * ranks): u = scale x A^T in the forward, dA and LoRA's part of dx in the backward. x's rows are
 * ldx long; u (forward: written, may be NULL; backward: the forward's, or NULL to recompute it)
 * bf16 [T, R] with rows ldu long, each LoRA's u in its columns, in the parts' order: u = x + in
 * with ldu = ldx keeps it in x's rows, where wide bases find it. The backward's dx is the sum over
 * the parts. Where the last parts' bf16 bases lie in one block (rows of one length ldw, each part's
 * after the one before, then the group's LoRAs' A [R, in]) and their dy in one buffer (each part's
 * columns after the one before) whose rows have room for R more, the backward writes g = scale
 * dy B there and runs dx (+)= [dy | g] [W; A] for them as one product, after the parts before
 * them; where, in such a block, their y lie in one buffer the same way and x's rows hold u, their
 * forward is one product too. */
typedef struct {
    void *y;            /* forward: the output, of type yt; accumulate: y += (fp32 y only) */
    cuda_dtype yt;
    int accumulate;
    const dt_bf16 *dy;  /* backward: bf16 [T, out] */
    const cuda_linear *l;
    int64_t ld;         /* the rows of y or dy (0: out) */
} cuda_linear_part;
void linear_group_forward_cuda(const cuda_linear_part *p, int n, const dt_bf16 *x, int64_t ldx, int64_t T,
                               void *scratch, dt_bf16 *u, int64_t ldu);
void linear_group_backward_cuda(float *dx, int accumulate, const cuda_linear_part *p, int n, const dt_bf16 *x,
                                int64_t ldx, int64_t T, void *scratch, const dt_bf16 *u, int64_t ldu);

/* linear_backward_cuda (dx, of type dxt, overwritten) without LoRA's part of dx, for a consumer of
 * dx that adds it itself (swiglu_backward_lora_cuda): returns g = scale dy B (bf16 [T, rank], in
 * scratch until the next product), so that the whole dx is dx + g A; NULL without a LoRA. A LoRA
 * that drops out its input gets the whole backward instead (dx fp32 only), and NULL. */
const dt_bf16 *linear_backward_defer_lora_cuda(void *dx, cuda_dtype dxt, const dt_bf16 *dy, int64_t ldy,
                                               const dt_bf16 *x, const cuda_linear *l, int64_t T, void *scratch,
                                               const dt_bf16 *u_kept);

/* ---- loss.cu ---- */
/* Cross-entropy of the LM head fused with it: h (bf16 [N, H], final-normed) times E^T
 * (E bf16 [V, H]) in slices of E's rows, so [N, V] logits never exist. targets (device, [N]) < 0
 * are ignored. Adds the loss sum to *loss (a device double). When dh is not NULL, dh (fp32 [N, H])
 * += grad_scale * d(loss sum)/dh. scratch: scratch_bytes of at least
 * lmhead_ce_scratch_bytes_cuda(chunk, V, H) for some chunk >= 1 (the bytes that `chunk` tokens'
 * full rows of logits would take): all tokens go at once where slices of a few thousand rows fit,
 * else fewer. -1 (the error set) for a scratch below that. */
size_t lmhead_ce_scratch_bytes_cuda(int64_t chunk, int64_t V, int H);
int lmhead_ce_cuda(double *loss, float *dh, const dt_bf16 *h, const int32_t *targets, int64_t N, const dt_bf16 *E,
                   int64_t V, int H, float grad_scale, void *scratch, size_t scratch_bytes);
/* The same with a quantized E (V = E->rows, H = E->cols): each slice of its rows is dequantized
 * into ebuf (ebuf_rows * H bf16; at least 8 rows), once per chunk of tokens. */
int lmhead_ce_q_cuda(double *loss, float *dh, const dt_bf16 *h, const int32_t *targets, int64_t N,
                     const cuda_qweight *E, dt_bf16 *ebuf, int64_t ebuf_rows, float grad_scale, void *scratch,
                     size_t scratch_bytes);

/* ---- optim.cu ---- */
/* AdamW over n fp32 parameters (adamw_update's arithmetic, optim.h) with the gradient first
 * scaled by grad_mul (clipping); p16 [n16] receives the bf16 copies of the first n16 new p (the
 * others have theirs elsewhere), and g is zeroed. */
void adamw_update_cuda(float *p, float *g, float *m, float *v, dt_bf16 *p16, int64_t n16, int64_t n, int64_t step,
                       double lr, double beta1, double beta2, double eps, double weight_decay, float grad_mul);
/* *acc (a device double) += sum of x[i]^2. */
void sum_squares_cuda(double *acc, const float *x, int64_t n);

#endif
