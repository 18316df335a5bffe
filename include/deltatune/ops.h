/* The CPU ops of the Qwen3.5 decoder, in fp32. Each op family lives in one file
 * of src/ops/ with its forward (and, with training, its backward) side by side.
 * Activations are row-major [rows, cols]; rows are tokens of a packed batch.
 * Ops know nothing of models: they see plain arrays and weights. */
#ifndef DELTATUNE_OPS_H
#define DELTATUNE_OPS_H

#include <stdint.h>

#include "deltatune/weights.h"

/* float in the product; double in the gradient-check build (see src/ops/real.h). */
#ifdef DT_OPS_DOUBLE
typedef double real;
#else
typedef float real;
#endif

/* Every op family. A forward without its backward cannot ship: the gradient-check test
 * (tests/gradcheck/gradcheck.c) scans this header, requires X_backward (or X_forward_backward) for
 * every X_forward, requires X here, and a finite-difference check for each entry. */
#define DT_OP_FAMILIES(X)                                                                      \
    X(linear) X(embedding) X(rmsnorm1p) X(rmsnorm_gated) X(l2norm) X(rope) X(conv1d_silu)      \
    X(deltanet_gates) X(deltanet) X(attention) X(swiglu) X(sigmoid_gate) X(lmhead_ce)

/* A LoRA pair on one frozen linear W [out, in]: y += scale * (drop(x) A^T) B^T,
 * PEFT's semantics (dropout on the input of the A branch only). */
typedef struct {
    int rank;
    real scale;       /* alpha / rank, or alpha / sqrt(rank) with rsLoRA */
    int64_t in, out;
    real *A;          /* [rank, in] */
    real *B;          /* [out, rank] */
    real *dA, *dB;    /* gradients, accumulated by the backward; NULL when not training */
    real dropout;     /* probability of dropping an input element; 0 = off */
    uint64_t dropout_seed;  /* the mask is a hash of (seed, row, column): the recompute of
                               gradient checkpointing sees the same mask with nothing stored */
} dt_lora;

/* A frozen linear W [out, in] (any stored float dtype) and its optional LoRA. */
typedef struct {
    dt_weight w;
    const dt_lora *lora;
} dt_linear;

/* ---- linear.c ---- */
/* y[T, out] = x[T, in] W^T (+ scale (x A^T) B^T). W is converted to fp32 a block of
 * rows at a time, so bf16 weights are never expanded in full. */
void linear_forward(real *y, const real *x, const dt_linear *l, int64_t T);
/* dx += dy W (+ the LoRA path); dA, dB += LoRA gradients when the LoRA has them.
 * dx may be NULL. x is the forward's input. */
void linear_backward(real *dx, const real *dy, const real *x, const dt_linear *l, int64_t T);

/* ---- embedding.c ---- */
/* out[t] = E[ids[t]]. ids must be in range (checked by the caller). */
void embedding_forward(real *out, const int32_t *ids, int64_t T, const dt_weight *E);
/* dE[ids[t]] += dout[t]: for trained embeddings (LoRA leaves E frozen and skips it). */
void embedding_backward(real *dE, const real *dout, const int32_t *ids, int64_t T, int64_t H);

/* ---- norm.c ---- */
/* Zero-centred RMSNorm over rows of D: y = x / rms(x) * (1 + w). y may alias x. */
void rmsnorm1p_forward(real *y, const real *x, const real *w, int64_t rows, int D, real eps);
/* dx += ..., dw += ... (dw may be NULL). Every backward in this file accumulates. */
void rmsnorm1p_backward(real *dx, real *dw, const real *dy, const real *x, const real *w, int64_t rows,
                        int D, real eps);
/* Gated RMSNorm per row of D: y = w * (x / rms(x)) * silu(z). y may alias x. */
void rmsnorm_gated_forward(real *y, const real *x, const real *z, const real *w, int64_t rows,
                           int D, real eps);
void rmsnorm_gated_backward(real *dx, real *dz, real *dw, const real *dy, const real *x, const real *z,
                            const real *w, int64_t rows, int D, real eps);
/* L2 normalisation, in place, of n_heads vectors of D per row (rows row_stride apart),
 * times scale: x = scale * x / sqrt(sum x^2 + eps). */
void l2norm_forward(real *x, int64_t rows, int n_heads, int D, int64_t row_stride, real eps,
                    real scale);
/* dx += ... given dy and the forward's input x (before normalisation), same layout. */
void l2norm_backward(real *dx, const real *dy, const real *x, int64_t rows, int n_heads, int D,
                     int64_t row_stride, real eps, real scale);

/* ---- rope.c ---- */
/* Half-split (NeoX) rotary embedding on the first rot_dim dims of each of n_heads heads
 * of head_dim, in place; x is [T, n_heads * head_dim], pos[t] the position of row t. */
void rope_forward(real *x, const int32_t *pos, int64_t T, int n_heads, int head_dim, int rot_dim,
                  double theta);
/* In place: turns the gradient of the rotated values into that of the inputs. */
void rope_backward(real *d, const int32_t *pos, int64_t T, int n_heads, int head_dim, int rot_dim,
                   double theta);

/* ---- conv1d.c ---- */
/* Causal depthwise convolution over time with zero history, then SiLU, for one
 * sequence: y[t][c] = silu(sum_j w[c][j] x[t-K+1+j][c]). x, y are [T, C]. */
void conv1d_silu_forward(real *y, const real *x, const real *w, int64_t T, int C, int K);
/* dx += ..., dw += ... (dw [C, K], may be NULL). */
void conv1d_silu_backward(real *dx, real *dw, const real *dy, const real *x, const real *w, int64_t T, int C,
                          int K);

/* ---- deltanet.c ---- */
typedef struct {
    int n_k_heads, n_v_heads, dk, dv;
} deltanet_dims;
/* beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias); a, b, beta, g are [T, Hv]. */
void deltanet_gates_forward(real *beta, real *g, const real *b, const real *a,
                            const real *a_log, const real *dt_bias, int64_t T, int Hv);
/* db, da += ...; da_log, ddt_bias += ... summed over tokens (either may be NULL). */
void deltanet_gates_backward(real *db, real *da, real *da_log, real *ddt_bias, const real *dbeta,
                             const real *dg, const real *b, const real *a, const real *a_log,
                             const real *dt_bias, int64_t T, int Hv);
/* The gated delta rule over one sequence. q, k: rows of stride qk_stride holding Hk heads
 * of dk (already L2-normalised, q also scaled); v: rows of stride v_stride holding Hv heads
 * of dv; o: [T, Hv * dv]. Value head h reads key head h / (Hv / Hk). state ([Hv, dk, dv])
 * is NULL to start from zero, else the state to start from, overwritten with the final one
 * (incremental decoding). */
void deltanet_forward(real *o, const real *q, const real *k, int64_t qk_stride, const real *v,
                      int64_t v_stride, const real *beta, const real *g, int64_t T,
                      deltanet_dims d, real *state);
/* Gradients (accumulated, laid out like their inputs) of the gated delta rule given dO.
 * Keeps the state only at every 64th token and replays each chunk. */
void deltanet_backward(real *dq, real *dk, real *dv, real *dbeta, real *dg, const real *dO,
                       const real *q, const real *k, int64_t qk_stride, const real *v,
                       int64_t v_stride, const real *beta, const real *g, int64_t T, deltanet_dims d);

/* ---- attention.c ---- */
/* Causal softmax attention over one sequence with GQA. k, v [n_kv, nkv*hd] hold every
 * position so far; q, out [n_q, nh*hd] are the last n_q of them (n_q = n_kv for a whole
 * sequence; fewer when decoding with a cache). Scores scaled by `scale`. scratch holds
 * n_q*n_kv reals. */
void attention_forward(real *out, const real *q, const real *k, const real *v, int64_t n_q, int64_t n_kv,
                       int nh, int nkv, int hd, real scale, real *scratch);
/* dq, dk, dv += ...; scratch holds 2*T*T reals. */
void attention_backward(real *dq, real *dk, real *dv, const real *dout, const real *q, const real *k,
                        const real *v, int64_t T, int nh, int nkv, int hd, real scale, real *scratch);

/* ---- activations.c ---- */
/* m = silu(gate) * up, n values. */
void swiglu_forward(real *m, const real *gate, const real *up, int64_t n);
void swiglu_backward(real *dgate, real *dup, const real *dm, const real *gate, const real *up, int64_t n);
/* x *= sigmoid(gate), n values. */
void sigmoid_gate_forward(real *x, const real *gate, int64_t n);
/* x is the value before gating. */
void sigmoid_gate_backward(real *dx, real *dgate, const real *dy, const real *x, const real *gate, int64_t n);

/* ---- loss.c ---- */
/* Cross-entropy of the LM head fused with it: logits_t = h_t E^T are produced a block
 * of vocabulary rows at a time (never [T, V] in full) with an online log-sum-exp.
 * targets[t] < 0 is ignored. Adds each counted token's loss to *loss_sum.
 * scratch holds T * LMHEAD_VOCAB_BLOCK reals. */
#define LMHEAD_VOCAB_BLOCK 4096
void lmhead_ce_forward(double *loss_sum, int64_t *count, const real *h, const int32_t *targets,
                       int64_t T, const dt_weight *E, real *scratch);
/* Training: the same loss, and dh += grad_scale * d(loss_sum)/dh, `chunk` tokens at a time
 * (their [chunk, V] logits become their gradient in place). scratch holds chunk * V reals. */
#define LMHEAD_TOKEN_CHUNK 64
void lmhead_ce_forward_backward(double *loss_sum, int64_t *count, real *dh, const real *h,
                                const int32_t *targets, int64_t T, const dt_weight *E, real grad_scale,
                                int64_t chunk, real *scratch);

#endif
