/* The Qwen3.5 decoder on the GPU, wired from the CUDA ops as src/model/qwen35.c wires the
 * CPU ones, layer for layer: the CPU model is the reference this is tested against
 * (tests/cuda/test_model.c). Weights live on the device in bf16, or in their quantized bytes
 * (dequantized one matrix, or one slice of the LM head, at a time into a shared buffer); the
 * residual stream and its gradient in fp32; layer activations in bf16 (see cuda_ops.h). */
#include "deltatune/qwen35_cuda.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/cuda_ops.h"
#include "deltatune/dtype.h"
#include "deltatune/error.h"
#include "deltatune/mem.h"
#include "deltatune/quant.h"

/* A layer's groups of linears that read one input (group_linears); all but the last may go into a block */
enum { N_GROUPS = 6, BLOCK_GROUPS = 5 };

typedef struct {
    cuda_linear mlp_gate, mlp_up, mlp_down;
    cuda_linear lin_qkv, lin_z, lin_b, lin_a, lin_out;
    cuda_linear att_q, att_k, att_v, att_o;
    float *input_norm, *post_norm, *conv, *dt_bias, *a_log, *lin_norm, *q_norm, *k_norm;
    void *blocks[BLOCK_GROUPS];  /* the groups' blocks of bases (make_block): their W point into them */
} gpu_layer;

/* One LoRA of the host model. Its device arrays live at off_a (A) and off_b (B) in the contiguous
 * LoRA arrays, so an upload, a download or an optimiser step is one operation for all of them;
 * the A of LoRAs whose linears read one input lie one after another (bind_loras), so that their
 * products run as one (linear_group_forward_cuda). Where the group's bases are bf16 they move into
 * one block (in_block, make_block) that holds the bf16 copies of the group's A and B too: those
 * come after every other LoRA's in the arrays (from bf16_params on), with no room in lora_bf16. */
typedef struct {
    dt_lora *host;
    cuda_linear *lin;
    int64_t off_a, off_b, na, nb;
    int group;  /* (layer, group of linears reading one input) */
    bool in_block;
} gpu_lora;

/* One layer's forward activations (a layer is DeltaNet or attention: the mixer fields of the
 * other kind stay NULL-sized views into the same region). */
typedef struct {
    dt_bf16 *xn1, *xn2;  /* the groups' input, rows ld_xn1 / ld_xn2 long: H, then the group's LoRAs' u */
    dt_bf16 *gate, *up, *m;
    float *h_mid;
    dt_bf16 *mixed, *conv, *qkv, *o_raw, *o_norm;  /* o_norm, att_g: the output projections' input, rows
                                                      ld_onorm / ld_attg long, then its LoRA's u */
    dt_bf16 *z, *b, *a;  /* side by side in rows ld_zba long: one product's (the in-projections' tail) */
    float *beta, *g;
    dt_bf16 *qg, *q, *k_pre, *k, *v, *att, *att_g;
    float *lse;
    void *block;
} gpu_acts;

/* The groups of products that read one input (the mixer's in-projections, the DeltaNet's four or
 * attention's three; the MLP's gate and up) keep their LoRAs' u in that input's rows after its H
 * columns (the group's R = the sum of its ranks, at most GROUP_MAX ranks): the products of the bases
 * in blocks read [x | u] (make_block). The MLP's down projection's u is kept from the forward, every layer's
 * (u_down): the recompute for the backward skips that projection. */
enum { GROUP_MAX = 4 };

/* The backward's buffers; the MLP part and the mixer part are never live together and
 * share one region. The MLP's backward runs mlp_rows tokens at a time, so its part holds
 * that many rows: no larger than the mixer's. */
typedef struct {
    float *dh_mid, *dxn1;               /* [N, H] fp32 */
    dt_bf16 *dy_bf;                     /* [N, H] in rows ld_dy long: a residual gradient as a product's
                                           input, with room after for a LoRA's g (the output projections') */
    int64_t ld_dy;
    /* MLP, [mlp_rows, .] */
    float *dm, *dxn2;       /* dm: room for fp32, bf16 where the down projection's LoRA has no dropout */
    dt_bf16 *dgate, *dup;   /* side by side in rows ld_dgu long, with room after for the LoRAs' g */
    int64_t ld_dgu;
    /* Gated DeltaNet */
    float *do_norm, *do_raw, *dqkv, *dbeta, *dg;
    dt_bf16 *dmixed;
    dt_bf16 *dz, *db, *da;  /* side by side in rows ld_dz long, with room after for the group's g */
    int64_t ld_dz;
    /* attention */
    float *datt_g, *dq, *dk, *dv;
    dt_bf16 *datt, *dqg, *dk_pre, *dv_bf;
    void *shared;        /* the region the MLP's and the mixers' buffers share: free until the layers' backward */
    size_t shared_bytes;
    void *block;
} gpu_grads;

/* What a recorded step depends on besides the contents of the device buffers: the launches'
 * shapes (the sequence lengths), the checkpointing, the gradient's scale (a kernel argument) and
 * the workspace's addresses (ws_gen counts its allocations). */
typedef struct {
    int64_t N, ws_gen;
    int n_seqs;
    bool ckpt;
    float grad_scale;
    int *lens;  /* [n_seqs]; owned where the key is kept */
} step_key;

/* Incremental decoding of one sequence (qwen35_cuda_forward_cached): qwen35_state's caches on the
 * device. */
typedef struct {
    int64_t max_len;
    dt_bf16 **k, **v;       /* per attention layer: [max_len, kvd], the keys after norm and RoPE */
    dt_bf16 **conv_hist;    /* per DeltaNet layer: [K - 1, cd], the last in-projected rows */
    float **state;          /* per DeltaNet layer: [Hv, dk, dv] */
    size_t recurrent_bytes; /* conv_hist and state lie first in block: what a new sequence clears */
    int32_t *conv_pos;      /* [DECODE_PIECE + K - 1]: 0, 1, ..: the conv over the held rows and the new */
    float *logits;          /* [vocab] */
    void *block;
} gpu_decode;

struct qwen35_cuda {
    qwen35_config cfg;
    dt_bf16 *embed, *lm_head;   /* NULL where quantized: */
    cuda_qweight embed_q, lm_head_q;
    dt_bf16 *wbuf;              /* a quantized base's one dequantized matrix */
    int64_t wbuf_elems;
    float *final_norm;
    gpu_layer *layers;
    int64_t weight_bytes;
    gpu_lora *loras;
    int n_loras;
    int64_t lora_params;        /* P: every A and B */
    int64_t bf16_params;        /* those with their bf16 copy in lora_bf16: all but the blocks' LoRAs' */
    dt_bf16 *lora_bf16;         /* [bf16_params] the copies the products read */
    float *lora_grad;           /* [P] fp32 gradients, accumulated */
    float *stage;               /* host [P] for transfers */
    uint16_t *stage16;          /* host [P] bf16 */
    /* with the optimiser on the device (qwen35_cuda_optim_upload): fp32 masters and moments */
    float *lora_master, *lora_m, *lora_v;
    double *norm_acc;
    /* the workspace, sized for cap_tokens tokens and sequences up to cap_seq */
    int64_t cap_tokens, cap_seq, cap_seqs;
    int u_rank;                 /* the largest LoRA rank when the workspace was made */
    int64_t ld_xn1, ld_xn2;     /* the rows of the acts' xn1, xn2: H and room for the group's u */
    int64_t ld_onorm, ld_attg;  /* ... of o_norm and att_g: vd or qd and room for u */
    int64_t ld_zba;             /* ... of z, b and a side by side */
    cuda_wide_copy *wide;       /* device [n_wide]: the blocks' A and B copies from P's tail (bind_loras) */
    int n_wide;
    int64_t wide_rows;          /* the most rows of one */
    dt_bf16 *u_down;            /* training: [n_layers][cap_tokens, u_rank], each layer's down projection's
                                   u from the forward (u_down_of) */
    int n_acts;
    bool training;
    gpu_acts *acts;
    gpu_grads grads;
    float *h32;                 /* [N, H]: the fp32 residual stream, updated in place layer by layer */
    dt_bf16 *hs;                /* training: [n_layers - 1, N, H], the input of each layer but the
                                   first kept in bf16 for the backward (the first's is the embedding,
                                   gathered again; the forward itself carries fp32) */
    float *dh;                  /* [N, H]: the residual stream's gradient, updated in place */
    dt_bf16 *hf, *hf_block;     /* [N, H] final-normed: in the grads' dxn1 when training, else hf_block */
    int64_t mlp_rows;           /* tokens per piece of the MLP's backward (mlp_rows_for) */
    /* Scratch. The linear products use `scratch`. With one set of activations (checkpointing,
     * evaluation) one allocation holds acts[0] then scratch, and the other ops' scratch runs on
     * into `scratch` from activations that are dead while they run (acts_layout): `big` from the
     * MLP part on (the recurrence's forward, attention's core), `big_bwd` from the DeltaNet's
     * output part on (the recurrence's backward, the LM head). Otherwise all three are one
     * allocation of their own (scratch_block). */
    void *scratch, *big, *big_bwd, *scratch_block;
    size_t scratch_bytes, big_bytes, big_bwd_bytes;
    /* The training step's LM head: in the grads' shared region where that holds the LM head's
     * scratch (then the last layer's activations outlive it and that layer needs no recompute),
     * else big_bwd */
    void *lm_scratch;
    size_t lm_scratch_bytes;
    int32_t *ids, *pos, *targets, *seq_starts;   /* device */
    double *loss;               /* device */
    int32_t *pos_host, *targets_host, *starts_host;
    int *lens_host;
    bool profile;
    int64_t calls;              /* training calls so far: the first (warm-up) is not profiled */
    int64_t ws_gen;             /* workspace allocations so far: a recorded step's addresses */
    void *graph;                /* the training step recorded as a CUDA graph (launch_step) */
    int64_t graph_launches;
    step_key graph_key, last_key;
    bool graphs_failed;
    gpu_decode dec;
};

/* Variadic: a braced statement may hold commas (an initialiser list) */
#define PROF(name, ...)       \
    do {                      \
        cuda_prof_push(name); \
        __VA_ARGS__;          \
        cuda_prof_pop();      \
    } while (0)

bool qwen35_cuda_available(void) { return cuda_device_count() > 0; }
const char *qwen35_cuda_device_name(void) { return cuda_device_name(); }

/* ---------------------------------------------------------------- weights */

/* A device bf16 copy of any weight (F32, F16, BF16 or quantized), converted a block of rows at a
 * time. */
static int upload_bf16(dt_bf16 **dst, const dt_weight *w, int64_t *bytes) {
    int64_t n = w->rows * w->cols;
    if (cuda_alloc((void **)dst, sizeof(dt_bf16) * (size_t)n)) return -1;
    *bytes += 2 * n;
    if (w->dtype == DT_BF16 && !w->qbits) return cuda_upload(*dst, w->data, sizeof(dt_bf16) * (size_t)n);
    int64_t br = (1 << 20) / (w->cols > 0 ? w->cols : 1);
    br = br < 1 ? 1 : br;
    float *f = malloc(sizeof(float) * (size_t)(br * w->cols));
    uint16_t *b = malloc(sizeof(uint16_t) * (size_t)(br * w->cols));
    int rc = f && b ? 0 : dt_err("out of memory converting a weight");
    for (int64_t r0 = 0; rc == 0 && r0 < w->rows; r0 += br) {
        int64_t nr = w->rows - r0 < br ? w->rows - r0 : br;
        dt_weight_rows_f32(f, w, r0, nr);
        dt_from_f32(b, DT_BF16, f, (size_t)(nr * w->cols));
        rc = cuda_upload(*dst + r0 * w->cols, b, sizeof(uint16_t) * (size_t)(nr * w->cols));
    }
    free(f);
    free(b);
    return rc;
}

static int upload_f32(float **dst, const float *src, int64_t n, int64_t *bytes) {
    if (!src) {
        *dst = NULL;
        return 0;
    }
    *bytes += 4 * n;
    if (cuda_alloc((void **)dst, sizeof(float) * (size_t)n)) return -1;
    return cuda_upload(*dst, src, sizeof(float) * (size_t)n);
}

/* A quantized weight's packed rows, scales and biases, uploaded as they are. */
static int upload_quantized(cuda_qweight *q, const dt_weight *w, int64_t *bytes) {
    size_t packed = (size_t)(w->rows * w->cols * w->qbits / 8);
    size_t params = (size_t)(w->rows * (w->cols / w->qgroup)) * dt_dtype_size(w->qdtype);
    void *d[3] = {NULL, NULL, NULL};
    int rc = cuda_alloc(&d[0], packed) || cuda_alloc(&d[1], params) || cuda_alloc(&d[2], params) ||
             cuda_upload(d[0], w->data, packed) || cuda_upload(d[1], w->scales, params) ||
             cuda_upload(d[2], w->biases, params);
    *q = (cuda_qweight){d[0], d[1], d[2], w->qbits, w->qgroup,
                        w->qdtype == DT_BF16 ? CUDA_BF16 : w->qdtype == DT_F16 ? CUDA_F16 : CUDA_F32, w->rows, w->cols};
    *bytes += dt_weight_bytes(w);
    return rc ? -1 : 0;
}

static void free_quantized(cuda_qweight *q) {
    cuda_free((void *)q->q);
    cuda_free((void *)q->scales);
    cuda_free((void *)q->biases);
    memset(q, 0, sizeof *q);
}

/* bf16, or quantized as the host holds it; *wbuf_elems grows to the largest quantized matrix. */
static int upload_linear(cuda_linear *g, const dt_linear *l, int64_t *bytes, int64_t *wbuf_elems) {
    memset(g, 0, sizeof *g);
    if (!l->w.data) return 0;
    g->in = l->w.cols;
    g->out = l->w.rows;
    if (!l->w.qbits) return upload_bf16((dt_bf16 **)&g->W, &l->w, bytes);
    if (g->in * g->out > *wbuf_elems) *wbuf_elems = g->in * g->out;
    return upload_quantized(&g->wq, &l->w, bytes);
}

/* The embedding, or the untied LM head: bf16, or quantized as held. */
static int upload_table(dt_bf16 **bf, cuda_qweight *q, const dt_weight *w, int64_t *bytes) {
    *bf = NULL;
    return w->qbits ? upload_quantized(q, w, bytes) : upload_bf16(bf, w, bytes);
}

/* The LM head of a quantized base runs through the shared buffer in slices of up to this many rows. */
#define LM_HEAD_SLICE_ROWS 8192

#define LAYER_LINEARS(X) \
    X(mlp_gate) X(mlp_up) X(mlp_down) X(lin_qkv) X(lin_z) X(lin_b) X(lin_a) X(lin_out) X(att_q) X(att_k) X(att_v) X(att_o)

int qwen35_cuda_create(qwen35_cuda **out, const qwen35_model *m) {
    *out = NULL;
    if (cuda_init()) return -1;
    if (m->cfg.lin_k_head_dim > 256)
        return dt_err("the CUDA Gated DeltaNet supports key heads of up to 256, this model has %d",
                      m->cfg.lin_k_head_dim);
    qwen35_cuda *g = calloc(1, sizeof *g);
    if (!g) return dt_err("out of memory");
    const qwen35_config *c = &m->cfg;
    g->cfg = *c;
    g->profile = getenv("DT_CUDA_PROFILE") && *getenv("DT_CUDA_PROFILE") && strcmp(getenv("DT_CUDA_PROFILE"), "0");
    cuda_prof_enable(g->profile);
    g->layers = calloc(c->n_layers, sizeof *g->layers);
    int rc = g->layers ? 0 : dt_err("out of memory");
    int64_t H = c->hidden_size, *wb = &g->weight_bytes;
    if (rc == 0) rc = upload_table(&g->embed, &g->embed_q, &m->embed, wb);
    if (rc == 0) {
        if (m->lm_head.data == m->embed.data) {
            g->lm_head = g->embed;
            g->lm_head_q = g->embed_q;
        } else {
            rc = upload_table(&g->lm_head, &g->lm_head_q, &m->lm_head, wb);
        }
    }
    if (rc == 0) rc = upload_f32(&g->final_norm, m->final_norm, H, wb);
    int64_t dv = c->lin_v_head_dim, hd = c->head_dim, cd = 2 * (int64_t)c->lin_n_k_heads * c->lin_k_head_dim +
                                                          (int64_t)c->lin_n_v_heads * dv;
    for (int l = 0; rc == 0 && l < c->n_layers; l++) {
        const qwen35_layer *L = &m->layers[l];
        gpu_layer *G = &g->layers[l];
#define UP(name) \
        if (rc == 0) rc = upload_linear(&G->name, &L->name, wb, &g->wbuf_elems);
        LAYER_LINEARS(UP)
#undef UP
        if (rc == 0) rc = upload_f32(&G->input_norm, L->input_norm, H, wb);
        if (rc == 0) rc = upload_f32(&G->post_norm, L->post_norm, H, wb);
        if (rc == 0) rc = upload_f32(&G->conv, L->conv, cd * c->conv_kernel, wb);
        if (rc == 0) rc = upload_f32(&G->dt_bias, L->dt_bias, c->lin_n_v_heads, wb);
        if (rc == 0) rc = upload_f32(&G->a_log, L->a_log, c->lin_n_v_heads, wb);
        if (rc == 0) rc = upload_f32(&G->lin_norm, L->lin_norm, dv, wb);
        if (rc == 0) rc = upload_f32(&G->q_norm, L->q_norm, hd, wb);
        if (rc == 0) rc = upload_f32(&G->k_norm, L->k_norm, hd, wb);
    }
    if (rc == 0 && g->lm_head_q.bits) {
        int64_t rows = c->vocab_size < LM_HEAD_SLICE_ROWS ? c->vocab_size : LM_HEAD_SLICE_ROWS;
        if (rows * H > g->wbuf_elems) g->wbuf_elems = rows * H;
    }
    if (rc == 0 && g->wbuf_elems > 0) {
        rc = cuda_alloc((void **)&g->wbuf, sizeof(dt_bf16) * (size_t)g->wbuf_elems);
        for (int l = 0; rc == 0 && l < c->n_layers; l++) {
            gpu_layer *G = &g->layers[l];
#define WBUF(name) G->name.wbuf = g->wbuf;
            LAYER_LINEARS(WBUF)
#undef WBUF
        }
    }
    if (rc) {
        qwen35_cuda_free(g);
        return dt_err_wrap("uploading the model to %s", cuda_device_name());
    }
    *out = g;
    return 0;
}

static void free_workspace(qwen35_cuda *g) {
    cuda_graph_free(g->graph);  /* it holds the addresses freed here */
    g->graph = NULL;
    for (int i = 0; i < g->n_acts; i++) cuda_free(g->acts[i].block);
    free(g->acts);
    g->acts = NULL;
    g->n_acts = 0;
    cuda_free(g->grads.block);
    memset(&g->grads, 0, sizeof g->grads);
    void *dev[] = {g->h32, g->hs, g->u_down, g->dh, g->hf_block, g->scratch_block, g->ids, g->seq_starts, g->loss};  /* pos, targets: in ids */
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) cuda_free(dev[i]);
    g->h32 = g->dh = NULL;
    g->hs = g->u_down = NULL;
    g->hf = g->hf_block = NULL;
    g->scratch = g->big = g->big_bwd = g->scratch_block = g->lm_scratch = NULL;
    g->scratch_bytes = g->big_bytes = g->big_bwd_bytes = g->lm_scratch_bytes = 0;
    g->ids = g->pos = g->targets = g->seq_starts = NULL;
    g->loss = NULL;
    free(g->pos_host);
    free(g->starts_host);
    free(g->lens_host);
    g->pos_host = g->targets_host = g->starts_host = NULL;
    g->lens_host = NULL;
    g->cap_tokens = g->cap_seq = g->cap_seqs = 0;
}

static void decode_free(gpu_decode *s) {
    cuda_free(s->block);
    free(s->k);
    free(s->v);
    free(s->conv_hist);
    free(s->state);
    memset(s, 0, sizeof *s);
}

void qwen35_cuda_free(qwen35_cuda *g) {
    if (!g) return;
    free_workspace(g);
    decode_free(&g->dec);
    free(g->graph_key.lens);
    free(g->last_key.lens);
    if (g->lm_head != g->embed) cuda_free(g->lm_head);
    cuda_free(g->embed);
    if (g->lm_head_q.q != g->embed_q.q) free_quantized(&g->lm_head_q);
    free_quantized(&g->embed_q);
    cuda_free(g->wbuf);
    cuda_free(g->final_norm);
    for (int l = 0; g->layers && l < g->cfg.n_layers; l++) {
        gpu_layer *G = &g->layers[l];
#define FREE(name) if (!G->name.ldw) cuda_free((void *)G->name.W); free_quantized(&G->name.wq);
        LAYER_LINEARS(FREE)
#undef FREE
        for (int b = 0; b < BLOCK_GROUPS; b++) cuda_free(G->blocks[b]);
        float *v[] = {G->input_norm, G->post_norm, G->conv, G->dt_bias, G->a_log, G->lin_norm, G->q_norm, G->k_norm};
        for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) cuda_free(v[i]);
    }
    void *lora[] = {g->lora_bf16, g->lora_grad, g->lora_master, g->lora_m, g->lora_v, g->norm_acc, g->wide};
    for (size_t i = 0; i < sizeof lora / sizeof lora[0]; i++) cuda_free(lora[i]);
    free(g->loras);
    free(g->stage);
    free(g->stage16);
    free(g->layers);
    free(g);
}

/* ---------------------------------------------------------------- LoRA */

/* The layer's groups of linears that read one input, in the order of their LoRAs' A (and u) and of
 * their rows in a block: the DeltaNet's in-projections, attention's, the MLP's gate and up, the two
 * mixers' output projections, the down projection. The down projection's LoRA stays as it is (its
 * A is read by swiglu_backward_lora_cuda). The backward of the MLP's and of the output projections
 * gets its dy side by side with room for g (layer_backward): their blocks' rows are of one length,
 * for the one product over [dy | g] (cuda_linear_part); the others' as long as each needs. */
static const int group_size[N_GROUPS] = {4, 3, 2, 1, 1, 1};
static const bool group_joined[N_GROUPS] = {false, false, true, true, true, false};

static void group_linears(gpu_layer *G, const qwen35_layer *L, const dt_linear **host, cuda_linear **dev) {
    const dt_linear *h[] = {&L->lin_qkv, &L->lin_z,    &L->lin_b,  &L->lin_a,   &L->att_q, &L->att_k,
                            &L->att_v,   &L->mlp_gate, &L->mlp_up, &L->lin_out, &L->att_o, &L->mlp_down};
    cuda_linear *d[] = {&G->lin_qkv, &G->lin_z,    &G->lin_b,  &G->lin_a,   &G->att_q, &G->att_k,
                        &G->att_v,   &G->mlp_gate, &G->mlp_up, &G->lin_out, &G->att_o, &G->mlp_down};
    memcpy(host, h, sizeof h);
    memcpy(dev, d, sizeof d);
}

/* Whether a group's bases go into a block: all bf16, one input, some LoRA. */
static bool blockable(cuda_linear **lin, const dt_linear **host, int n) {
    bool lora = false;
    for (int i = 0; i < n; i++) {
        if (!lin[i]->W || lin[i]->wq.bits || lin[i]->in != lin[0]->in) return false;
        lora |= host[i]->lora != NULL;
    }
    return lora;
}

/* The group's bases (n linears, their LoRAs s[0 .. n_lora)) moved into one block (cuda_linear):
 * each linear's rows [W | 0 | its B] with B in the columns of its u in the group's input (after
 * in, in the group's order), rounded up to whole 16 bytes, then the LoRAs' A [R, in]; with joined,
 * every row, A's too, as long as the longest (cuda_linear_part). Otherwise a linear without a
 * LoRA takes the row length of the one before it, and A's rows the last one's, so that the
 * group's tail runs as one product (the DeltaNet's z, b and a). Each linear's W, A, B point
 * there; the bf16 copies of A and B come in by the table's entries t (copy_wide). */
static int make_block(void **block, cuda_linear **lin, int n, gpu_lora *s, int n_lora, bool joined,
                      int64_t bf16_params, cuda_wide_copy *t, int *nt, int64_t *max_rows) {
    int64_t in = lin[0]->in, R = 0, elems = 0, ld[4];
    for (int k = 0; k < n_lora; k++) R += s[k].host->rank;
    int64_t ld_all = (in + R + 7) / 8 * 8;
    for (int i = 0, k = 0, c = 0; i < n; i++) {
        bool has = k < n_lora && s[k].lin == lin[i];
        ld[i] = joined ? ld_all : has ? (in + c + s[k].host->rank + 7) / 8 * 8 : i > 0 ? ld[i - 1] : in;
        if (has) c += s[k++].host->rank;
        elems += lin[i]->out * ld[i];
    }
    int64_t ld_a = ld[n - 1];
    size_t bytes = sizeof(dt_bf16) * (size_t)(elems + R * ld_a);
    dt_bf16 *b;
    if (cuda_alloc((void **)&b, bytes) || cuda_zero(b, bytes)) return -1;
    *block = b;
    int64_t off = 0;
    for (int i = 0, k = 0, c = 0; i < n; off += lin[i]->out * ld[i], i++) {
        cuda_linear *l = lin[i];
        if (cuda_copy_rows(b + off, sizeof(dt_bf16) * ld[i], l->W, sizeof(dt_bf16) * in, sizeof(dt_bf16) * in,
                           l->out) ||
            cuda_check("moving a base into its group's block"))
            return -1;
        cuda_free((void *)l->W);
        l->W = b + off;
        l->ldw = ld[i];
        if (k < n_lora && s[k].lin == l) {
            int r = s[k].host->rank;
            l->bcol = in + c;
            l->B = l->W + l->bcol;
            l->A = b + elems + c * ld_a;
            l->ld_a = ld_a;
            t[(*nt)++] = (cuda_wide_copy){s[k].off_b - bf16_params, (dt_bf16 *)l->B, l->out, l->ldw, r};
            t[(*nt)++] = (cuda_wide_copy){s[k].off_a - bf16_params, (dt_bf16 *)l->A, r, ld_a, (int)in};
            *max_rows = l->out > *max_rows ? l->out : *max_rows;
            c += r;
            k++;
        }
    }
    return 0;
}

/* The blocks' copies of A and B, from the fp32 values of the LoRA arrays' tail (element bf16_params on). */
static void copy_wide(qwen35_cuda *g, const float *tail) {
    linear_wide_copy_cuda(g->wide, g->n_wide, g->wide_rows, tail);
}

/* Finds every attached LoRA of m once and lays them out in the contiguous arrays: layer by layer,
 * the linears that read one input as a group, the A of the group's LoRAs then their B; the groups
 * whose bases go into a block last, in the same order. */
static int bind_loras(qwen35_cuda *g, const qwen35_model *m) {
    int n = 0;
    for (int l = 0; l < g->cfg.n_layers; l++) {
        const qwen35_layer *L = &m->layers[l];
#define COUNT(name) n += L->name.lora != NULL;
        LAYER_LINEARS(COUNT)
#undef COUNT
    }
    g->loras = calloc(n > 0 ? n : 1, sizeof *g->loras);
    cuda_wide_copy *t = calloc(2 * (size_t)(n > 0 ? n : 1), sizeof *t);
    if (!g->loras || !t) {
        free(t);
        return dt_err("out of memory");
    }
    const dt_linear *host[12];
    cuda_linear *dev[12];
    for (int l = 0; l < g->cfg.n_layers; l++) {
        group_linears(&g->layers[l], &m->layers[l], host, dev);
        for (int gi = 0, i0 = 0; gi < N_GROUPS; i0 += group_size[gi++]) {
            bool blk = gi < BLOCK_GROUPS && blockable(dev + i0, host + i0, group_size[gi]);
            for (int i = i0; i < i0 + group_size[gi]; i++) {
                if (!host[i]->lora) continue;
                gpu_lora *s = &g->loras[g->n_loras++];
                s->host = (dt_lora *)host[i]->lora;  /* the model holds them const; the gradients are ours to add */
                s->lin = dev[i];
                s->na = (int64_t)s->host->rank * s->host->in;
                s->nb = s->host->out * (int64_t)s->host->rank;
                s->group = l * N_GROUPS + gi;
                s->in_block = blk;
            }
        }
    }
    /* the A of a group, then its B: those outside blocks first */
    int64_t P = 0;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) g->bf16_params = P;
        for (int k0 = 0, k1; k0 < g->n_loras; k0 = k1) {
            for (k1 = k0; k1 < g->n_loras && g->loras[k1].group == g->loras[k0].group; k1++) {}
            if (g->loras[k0].in_block != (pass == 1)) continue;
            for (int k = k0; k < k1; k++) g->loras[k].off_a = P, P += g->loras[k].na;
            for (int k = k0; k < k1; k++) g->loras[k].off_b = P, P += g->loras[k].nb;
        }
    }
    g->lora_params = P;
    g->stage = malloc(sizeof(float) * (size_t)(P > 0 ? P : 1));
    g->stage16 = malloc(sizeof(uint16_t) * (size_t)(P > 0 ? P : 1));
    int rc = !g->stage || !g->stage16 ? dt_err("out of memory") : 0;
    if (rc == 0 &&
        (cuda_alloc((void **)&g->lora_bf16, sizeof(dt_bf16) * (size_t)(g->bf16_params > 0 ? g->bf16_params : 1)) ||
         cuda_alloc((void **)&g->lora_grad, sizeof(float) * (size_t)P) ||
         cuda_alloc((void **)&g->norm_acc, sizeof(double)) || cuda_zero(g->lora_grad, sizeof(float) * (size_t)P)))
        rc = -1;
    int nt = 0;
    for (int k0 = 0, k1; rc == 0 && k0 < g->n_loras; k0 = k1) {
        for (k1 = k0; k1 < g->n_loras && g->loras[k1].group == g->loras[k0].group; k1++) {}
        if (!g->loras[k0].in_block) continue;
        int l = g->loras[k0].group / N_GROUPS, gi = g->loras[k0].group % N_GROUPS, i0 = 0;
        for (int j = 0; j < gi; j++) i0 += group_size[j];
        group_linears(&g->layers[l], &m->layers[l], host, dev);
        rc = make_block(&g->layers[l].blocks[gi], dev + i0, group_size[gi], g->loras + k0, k1 - k0,
                        group_joined[gi], g->bf16_params, t, &nt, &g->wide_rows);
    }
    if (rc == 0 && nt > 0 &&
        (cuda_alloc((void **)&g->wide, sizeof *t * (size_t)nt) || cuda_upload(g->wide, t, sizeof *t * (size_t)nt)))
        rc = -1;
    g->n_wide = rc == 0 ? nt : 0;
    free(t);
    return rc;
}

/* The bf16 copies of every A and B from the host values in stage (gather): lora_bf16's, then the
 * blocks' from the fp32 tail, which tail holds on the device already (the masters) or, NULL, goes
 * up through a buffer of its own. */
static int upload_bf16_copies(qwen35_cuda *g, const float *tail) {
    dt_from_f32(g->stage16, DT_BF16, g->stage, (size_t)g->bf16_params);
    if (cuda_upload(g->lora_bf16, g->stage16, sizeof(dt_bf16) * (size_t)g->bf16_params)) return -1;
    if (!g->n_wide) return 0;
    float *buf = NULL;
    size_t bytes = sizeof(float) * (size_t)(g->lora_params - g->bf16_params);
    if (!tail && (cuda_alloc((void **)&buf, bytes) || cuda_upload(buf, g->stage + g->bf16_params, bytes))) {
        cuda_free(buf);
        return -1;
    }
    copy_wide(g, tail ? tail : buf);
    int rc = cuda_check("copying A and B into the blocks of bases");
    cuda_free(buf);
    return rc;
}

/* Every LoRA's A and B, or their gradients, to or from the host, through the staging buffer. */
static void gather(qwen35_cuda *g, bool grads) {
    for (int i = 0; i < g->n_loras; i++) {
        const gpu_lora *s = &g->loras[i];
        memcpy(g->stage + s->off_a, grads ? s->host->dA : s->host->A, sizeof(float) * (size_t)s->na);
        memcpy(g->stage + s->off_b, grads ? s->host->dB : s->host->B, sizeof(float) * (size_t)s->nb);
    }
}

int qwen35_cuda_sync_lora(qwen35_cuda *g, const qwen35_model *m) {
    double t0 = dt_seconds();
    if (!g->loras && bind_loras(g, m)) return dt_err_wrap("preparing the LoRA on %s", cuda_device_name());
    if (g->lora_master) return 0;  /* the device's masters are the current ones */
    gather(g, false);
    if (upload_bf16_copies(g, NULL)) return -1;
    cuda_prof_add_host("host.lora_upload", 1e3 * (dt_seconds() - t0));
    return 0;
}

/* The per-call LoRA settings (the trainer draws a new dropout seed per micro-batch). */
static void refresh_loras(qwen35_cuda *g, bool want_grads) {
    for (int i = 0; i < g->n_loras; i++) {
        gpu_lora *s = &g->loras[i];
        cuda_linear *l = s->lin;
        l->rank = s->host->rank;
        l->scale = (float)s->host->scale;
        l->dropout = (float)s->host->dropout;
        l->dropout_seed = s->host->dropout_seed;
        if (!s->in_block) {  /* a block's point into it (make_block) */
            l->A = g->lora_bf16 + s->off_a;
            l->B = g->lora_bf16 + s->off_b;
        }
        l->dA = want_grads && s->host->dA ? g->lora_grad + s->off_a : NULL;
        l->dB = want_grads && s->host->dB ? g->lora_grad + s->off_b : NULL;
    }
}

/* Without the device optimiser: adds the device gradients into the host LoRAs' and clears them. */
static int collect_lora_grads(qwen35_cuda *g) {
    size_t bytes = sizeof(float) * (size_t)g->lora_params;
    if (cuda_download(g->stage, g->lora_grad, bytes) || cuda_zero(g->lora_grad, bytes)) return -1;
    for (int i = 0; i < g->n_loras; i++) {
        const gpu_lora *s = &g->loras[i];
        const float *a = g->stage + s->off_a, *b = g->stage + s->off_b;
        if (s->host->dA)
            for (int64_t j = 0; j < s->na; j++) s->host->dA[j] += a[j];
        if (s->host->dB)
            for (int64_t j = 0; j < s->nb; j++) s->host->dB[j] += b[j];
    }
    return 0;
}

/* ---------------------------------------------------------------- the optimiser on the device */

static gpu_lora *lora_of(qwen35_cuda *g, const dt_lora *l) {
    for (int i = 0; i < g->n_loras; i++)
        if (g->loras[i].host == l) return &g->loras[i];
    return NULL;
}

int qwen35_cuda_optim_upload(qwen35_cuda *g, const qwen35_model *m, dt_lora *const *loras, float *const *moments,
                             int n) {
    if (!g->loras && bind_loras(g, m)) return dt_err_wrap("preparing the LoRA on %s", cuda_device_name());
    if (n != g->n_loras) return dt_err("the optimiser has %d LoRAs, the model %d", n, g->n_loras);
    size_t P = (size_t)g->lora_params, bytes = sizeof(float) * P;
    if (!g->lora_master && (cuda_alloc((void **)&g->lora_master, bytes) || cuda_alloc((void **)&g->lora_m, bytes) ||
                            cuda_alloc((void **)&g->lora_v, bytes)))
        return -1;
    float *dev[3] = {g->lora_master, g->lora_m, g->lora_v};
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < n; i++) {
            const gpu_lora *s = lora_of(g, loras[i]);
            if (!s) return dt_err("LoRA %d of the optimiser is not attached to the model", i);
            const float *a = k == 0 ? loras[i]->A : moments[4 * i + (k - 1)];  /* m_A or v_A */
            const float *b = k == 0 ? loras[i]->B : moments[4 * i + 2 + (k - 1)];
            memcpy(g->stage + s->off_a, a, sizeof(float) * (size_t)s->na);
            memcpy(g->stage + s->off_b, b, sizeof(float) * (size_t)s->nb);
        }
        if (cuda_upload(dev[k], g->stage, bytes)) return -1;
    }
    /* the bf16 copies from the masters just uploaded */
    gather(g, false);
    return upload_bf16_copies(g, g->lora_master + g->bf16_params);
}

int qwen35_cuda_optim_download(qwen35_cuda *g, dt_lora *const *loras, float *const *moments, int n) {
    if (!g->lora_master) return 0;
    float *dev[3] = {g->lora_master, g->lora_m, g->lora_v};
    for (int k = 0; k < 3; k++) {
        if (cuda_download(g->stage, dev[k], sizeof(float) * (size_t)g->lora_params)) return -1;
        for (int i = 0; i < n; i++) {
            const gpu_lora *s = lora_of(g, loras[i]);
            if (!s) return dt_err("LoRA %d of the optimiser is not attached to the model", i);
            float *a = k == 0 ? loras[i]->A : moments[4 * i + (k - 1)];
            float *b = k == 0 ? loras[i]->B : moments[4 * i + 2 + (k - 1)];
            memcpy(a, g->stage + s->off_a, sizeof(float) * (size_t)s->na);
            memcpy(b, g->stage + s->off_b, sizeof(float) * (size_t)s->nb);
        }
    }
    return 0;
}

int qwen35_cuda_grad_norm(qwen35_cuda *g, double *norm) {
    double sum = 0;
    if (cuda_zero(g->norm_acc, sizeof(double))) return -1;
    sum_squares_cuda(g->norm_acc, g->lora_grad, g->lora_params);
    if (cuda_download(&sum, g->norm_acc, sizeof(double)) || cuda_check("the gradient norm")) return -1;
    *norm = sqrt(sum);
    return 0;
}

int qwen35_cuda_adamw(qwen35_cuda *g, int64_t step, double lr, const adamw_config *c, double grad_mul) {
    if (!g->lora_master) return dt_err("the optimiser state is not on the device (qwen35_cuda_optim_upload)");
    adamw_update_cuda(g->lora_master, g->lora_grad, g->lora_m, g->lora_v, g->lora_bf16, g->bf16_params,
                      g->lora_params, step, lr, c->beta1, c->beta2, c->eps, c->weight_decay, (float)grad_mul);
    copy_wide(g, g->lora_master + g->bf16_params);
    return cuda_check("the AdamW update");
}

/* ---------------------------------------------------------------- workspace */

typedef struct {
    int64_t H, I, Hv, kd, vd, cd, qd, kvd, nh;
} dims;

static dims dims_of(const qwen35_config *c) {
    dims d;
    d.H = c->hidden_size;
    d.I = c->intermediate_size;
    d.Hv = c->lin_n_v_heads;
    d.kd = (int64_t)c->lin_n_k_heads * c->lin_k_head_dim;
    d.vd = d.Hv * c->lin_v_head_dim;
    d.cd = 2 * d.kd + d.vd;
    d.qd = (int64_t)c->n_heads * c->head_dim;
    d.kvd = (int64_t)c->n_kv_heads * c->head_dim;
    d.nh = c->n_heads;
    return d;
}

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

/* Carves typed arrays out of one allocation, each 256-byte aligned. With base NULL it only
 * counts the bytes. */
typedef struct {
    char *base;
    size_t off;
} carver;

static void *carve(carver *k, size_t bytes) {
    void *p = k->base ? k->base + k->off : NULL;
    k->off += (bytes + 255) & ~(size_t)255;
    return p;
}

/* Where a layer's activations fall dead early: from out_off on (the DeltaNet's z, o_raw and
 * o_norm, read only by the first step of its backward) and from mlp_off on (xn2, h_mid, gate,
 * up, m: not yet written while the mixer's forward runs, read no more once the MLP's backward is
 * done). */
typedef struct {
    size_t out_off, mlp_off, bytes;
} acts_offsets;

/* One layer's activations: xn1, the mixer's, then the MLP part. The DeltaNet's conv output,
 * where the conv and the L2 norm run as separate ops (deltanet_conv_forward_cuda), lives in the
 * MLP part for the moment between them (its backward recomputes it). */
static acts_offsets acts_layout(gpu_acts *a, const dims *d, int64_t N, const qwen35_cuda *g, char *base) {
    carver k = {base, 0};
    size_t B2 = 2 * (size_t)N, B4 = 4 * (size_t)N;
    int64_t ld_xn1 = g->ld_xn1, ld_xn2 = g->ld_xn2;
    acts_offsets o;
    a->xn1 = carve(&k, B2 * ld_xn1);
    carver mix = k;  /* the mixers share what follows */
    a->mixed = carve(&k, B2 * d->cd);
    a->qkv = carve(&k, B2 * d->cd);
    a->beta = carve(&k, B4 * d->Hv);
    a->g = carve(&k, B4 * d->Hv);
    o.out_off = k.off;
    a->z = carve(&k, B2 * g->ld_zba);  /* b and a are read by the gates' forward only */
    a->b = a->z ? a->z + d->vd : NULL;
    a->a = a->b ? a->b + d->Hv : NULL;
    a->o_raw = carve(&k, B2 * d->vd);
    a->o_norm = carve(&k, B2 * g->ld_onorm);
    size_t gdn_end = k.off;
    k = mix;
    a->qg = carve(&k, B2 * 2 * d->qd);
    a->q = carve(&k, B2 * d->qd);
    a->k_pre = carve(&k, B2 * d->kvd);
    a->k = carve(&k, B2 * d->kvd);
    a->v = carve(&k, B2 * d->kvd);
    a->att = carve(&k, B2 * d->qd);
    a->att_g = carve(&k, B2 * g->ld_attg);
    a->lse = carve(&k, B4 * d->nh);
    k.off = k.off > gdn_end ? k.off : gdn_end;
    o.mlp_off = k.off;
    a->xn2 = carve(&k, B2 * ld_xn2);
    a->h_mid = carve(&k, B4 * d->H);
    a->gate = carve(&k, B2 * 2 * d->I);  /* gate and up side by side: rows of 2 I (the MLP's one product) */
    a->up = a->gate ? a->gate + d->I : NULL;
    a->m = carve(&k, B2 * d->I);
    o.bytes = k.off;
    k.off = o.mlp_off;
    a->conv = carve(&k, B2 * d->cd);
    o.bytes = k.off > o.bytes ? k.off : o.bytes;
    return o;
}

static size_t grads_layout(gpu_grads *g, const dims *d, int64_t N, int64_t mlp_rows, int64_t ld_dgu, int64_t ld_dy,
                           int64_t ld_dz, char *base) {
    carver k = {base, 0};
    size_t B2 = 2 * (size_t)N, B4 = 4 * (size_t)N;
    g->dh_mid = carve(&k, B4 * d->H);
    g->dxn1 = carve(&k, B4 * d->H);
    g->ld_dy = ld_dy;
    g->dy_bf = carve(&k, B2 * ld_dy);
    carver shared = k;
    g->dm = carve(&k, 4 * (size_t)mlp_rows * d->I);
    g->ld_dgu = ld_dgu;
    g->dgate = carve(&k, 2 * (size_t)mlp_rows * ld_dgu);
    g->dup = g->dgate ? g->dgate + d->I : NULL;
    g->dxn2 = carve(&k, 4 * (size_t)mlp_rows * d->H);
    size_t end = k.off;
    k = shared;
    /* buffers whose lives do not overlap share memory: do_norm is dead before the recurrence's
     * backward writes dqkv, dmixed is written once do_raw is dead (the conv's backward may
     * overwrite dqkv) */
    char *early = carve(&k, max_sz(B4 * d->vd, B2 * d->cd));
    g->do_raw = (float *)early;
    g->dmixed = (dt_bf16 *)early;
    g->ld_dz = ld_dz;
    g->dz = carve(&k, B2 * ld_dz);
    g->db = g->dz ? g->dz + d->vd : NULL;
    g->da = g->db ? g->db + d->Hv : NULL;
    g->dqkv = carve(&k, B4 * max_sz(d->cd, d->vd));
    g->do_norm = g->dqkv;
    g->dbeta = carve(&k, B4 * d->Hv);
    g->dg = carve(&k, B4 * d->Hv);
    end = k.off > end ? k.off : end;
    k = shared;
    g->datt_g = carve(&k, B4 * d->qd);
    g->datt = carve(&k, B2 * d->qd);
    g->dqg = carve(&k, B2 * 2 * d->qd);
    g->dq = carve(&k, B4 * d->qd);
    g->dk = carve(&k, B4 * d->kvd);
    g->dv = carve(&k, B4 * d->kvd);
    g->dk_pre = carve(&k, B2 * d->kvd);
    g->dv_bf = carve(&k, B2 * d->kvd);
    end = k.off > end ? k.off : end;
    g->shared = base ? base + shared.off : NULL;
    g->shared_bytes = end - shared.off;
    return end;
}

/* The most tokens (all N, or a multiple of 128) whose MLP backward fits in the grads' shared
 * part that the mixers need anyway: the MLP's backward then runs that many at a time.
 * $DT_CUDA_MLP_ROWS sets it (for the tests). */
static int64_t mlp_rows_for(const dims *d, int64_t N, int64_t ld_dgu, int64_t ld_dz) {
    const char *e = getenv("DT_CUDA_MLP_ROWS");  /* tests: pieces of this many tokens */
    if (e && atoll(e) > 0) return atoll(e) < N ? atoll(e) : N;
    gpu_grads tmp;
    size_t mixers = grads_layout(&tmp, d, N, 0, ld_dgu, d->H, ld_dz, NULL);
    if (grads_layout(&tmp, d, N, N, ld_dgu, d->H, ld_dz, NULL) <= mixers) return N;
    int64_t r = N / 128 * 128;
    while (r > 128 && grads_layout(&tmp, d, N, r, ld_dgu, d->H, ld_dz, NULL) > mixers) r -= 128;
    return r > 0 ? r : N;
}

/* The largest LoRA rank (0: none); *dropout: whether any drops out its input. */
static int lora_rank_max(const qwen35_cuda *g, int *dropout) {
    int rank = 0;
    *dropout = 0;
    for (int i = 0; i < g->n_loras; i++) {
        rank = g->loras[i].host->rank > rank ? g->loras[i].host->rank : rank;
        *dropout |= g->loras[i].host->dropout > 0;
    }
    return rank;
}

/* The scratch of the linear products. */
static size_t scratch_linear(const qwen35_cuda *g, int64_t N) {
    dims d = dims_of(&g->cfg);
    int dropout, rank = lora_rank_max(g, &dropout);
    size_t s = 0;
    int64_t ins[] = {d.H, d.I, d.vd, d.qd};
    for (size_t i = 0; i < sizeof ins / sizeof ins[0]; i++)  /* a group's u: the in-projections' the widest */
        s = max_sz(s, linear_scratch_bytes_cuda(N, ins[i], GROUP_MAX * rank, dropout));
    return s;
}

static size_t minus(size_t a, size_t b) { return a > b ? a - b : 0; }

/* The LM head's scratch for N tokens: its chunks of tokens against the whole vocabulary. */
static size_t lm_head_need(const qwen35_cuda *g, const qwen35_model *m, int64_t N) {
    int64_t ce = m->ce_chunk <= 0 || m->ce_chunk >= N ? N : m->ce_chunk;
    return lmhead_ce_scratch_bytes_cuda(ce, g->cfg.vocab_size, g->cfg.hidden_size);
}

/* Bytes of `scratch` for N tokens (sequences up to T), given the dead activations before it that
 * `big` (mlp bytes) and `big_bwd` (out bytes) also cover (both 0: scratch alone). */
static size_t scratch_need(const qwen35_cuda *g, const qwen35_model *m, int64_t N, int64_t T, int64_t n_seqs,
                           size_t mlp, size_t out) {
    const qwen35_config *c = &g->cfg;
    cuda_deltanet_dims dd = {c->lin_n_k_heads, c->lin_n_v_heads, c->lin_k_head_dim, c->lin_v_head_dim};
    size_t fwd = max_sz(deltanet_forward_scratch_bytes_cuda((int)n_seqs, (int)T, dd),
                        attention_scratch_bytes_cuda((int)T, c->n_heads, c->n_kv_heads, c->head_dim));
    size_t bwd = max_sz(deltanet_scratch_bytes_cuda((int)n_seqs, (int)T, dd), lm_head_need(g, m, N));
    return max_sz(scratch_linear(g, N), max_sz(minus(fwd, mlp), minus(bwd, out)));
}

static int reserve(qwen35_cuda *g, const qwen35_model *m, int64_t N, int64_t T, int64_t n_seqs, int n_acts,
                   bool training) {
    int dropout, rank = lora_rank_max(g, &dropout);
    if (g->cap_tokens >= N && g->cap_seq >= T && g->cap_seqs >= n_seqs && g->n_acts >= n_acts &&
        (!training || g->training) && g->u_rank == rank &&
        g->scratch_bytes >= scratch_need(g, m, N, T, n_seqs, g->big_bytes - g->scratch_bytes,
                                         g->big_bwd_bytes - g->scratch_bytes)) {
        return 0;
    }
    N = N > g->cap_tokens ? N : g->cap_tokens;
    T = T > g->cap_seq ? T : g->cap_seq;
    n_seqs = n_seqs > g->cap_seqs ? n_seqs : g->cap_seqs;
    n_acts = n_acts > g->n_acts ? n_acts : g->n_acts;
    training = training || g->training;
    free_workspace(g);
    const qwen35_config *c = &g->cfg;
    dims d = dims_of(c);
    int64_t H = c->hidden_size;
    g->acts = calloc(n_acts, sizeof *g->acts);
    g->pos_host = malloc(sizeof(int32_t) * 2 * N);
    g->starts_host = malloc(sizeof(int32_t) * (n_seqs + 1));
    g->lens_host = malloc(sizeof(int) * n_seqs);
    if (!g->acts || !g->pos_host || !g->starts_host || !g->lens_host) return dt_err("out of memory");
    g->targets_host = g->pos_host + N;
    /* rows of whole 16 bytes: the products' preferred alignment */
    g->ld_xn1 = (H + GROUP_MAX * rank + 7) / 8 * 8;
    g->ld_xn2 = (H + 2 * rank + 7) / 8 * 8;
    g->ld_onorm = (d.vd + rank + 7) / 8 * 8;
    g->ld_attg = (d.qd + rank + 7) / 8 * 8;
    g->ld_zba = (d.vd + 2 * d.Hv + 7) / 8 * 8;
    acts_offsets o = acts_layout(&g->acts[0], &d, N, g, NULL);
    int rc = 0;
    if (n_acts == 1) {  /* acts[0], then scratch */
        size_t mlp = o.bytes - o.mlp_off, out = o.bytes - o.out_off;
        g->scratch_bytes = scratch_need(g, m, N, T, n_seqs, mlp, out);
        g->big_bytes = mlp + g->scratch_bytes;
        g->big_bwd_bytes = out + g->scratch_bytes;
        rc = cuda_alloc(&g->acts[0].block, o.bytes + g->scratch_bytes);
        if (rc == 0) {
            char *base = g->acts[0].block;
            acts_layout(&g->acts[0], &d, N, g, base);
            g->n_acts = 1;
            g->big = base + o.mlp_off;
            g->big_bwd = base + o.out_off;
            g->scratch = base + o.bytes;
        }
    } else {
        g->scratch_bytes = g->big_bytes = g->big_bwd_bytes = scratch_need(g, m, N, T, n_seqs, 0, 0);
        rc = cuda_alloc(&g->scratch_block, g->scratch_bytes);
        g->scratch = g->big = g->big_bwd = g->scratch_block;
        for (int i = 0; rc == 0 && i < n_acts; i++) {
            rc = cuda_alloc(&g->acts[i].block, o.bytes);
            if (rc == 0) acts_layout(&g->acts[i], &d, N, g, g->acts[i].block), g->n_acts++;
        }
    }
    g->lm_scratch = g->big_bwd, g->lm_scratch_bytes = g->big_bwd_bytes;
    if (rc == 0) rc = cuda_alloc((void **)&g->h32, sizeof(float) * (size_t)(N * H));
    if (rc == 0 && training)
        rc = cuda_alloc((void **)&g->hs, sizeof(dt_bf16) * (size_t)((c->n_layers - 1) * N * H + 1));
    if (rc == 0 && training && rank > 0)
        rc = cuda_alloc((void **)&g->u_down, sizeof(dt_bf16) * (size_t)c->n_layers * (size_t)(N * rank));
    if (rc == 0) rc = cuda_alloc((void **)&g->ids, sizeof(int32_t) * 3 * (size_t)N);
    if (rc == 0) rc = cuda_alloc((void **)&g->seq_starts, sizeof(int32_t) * (size_t)(n_seqs + 1));
    if (rc == 0) rc = cuda_alloc((void **)&g->loss, sizeof(double));
    if (rc == 0 && training) {
        rc = cuda_alloc((void **)&g->dh, sizeof(float) * (size_t)(N * H));
        int64_t ld_dgu = (2 * d.I + 2 * rank + 7) / 8 * 8, ld_dy = (H + rank + 7) / 8 * 8;
        int64_t ld_dz = (g->ld_zba + GROUP_MAX * rank + 7) / 8 * 8;
        g->mlp_rows = mlp_rows_for(&d, N, ld_dgu, ld_dz);
        size_t bytes = grads_layout(&g->grads, &d, N, g->mlp_rows, ld_dgu, ld_dy, ld_dz, NULL);
        if (rc == 0) rc = cuda_alloc(&g->grads.block, bytes);
        if (rc == 0) grads_layout(&g->grads, &d, N, g->mlp_rows, ld_dgu, ld_dy, ld_dz, g->grads.block);
        g->hf = (dt_bf16 *)g->grads.dxn1;  /* dead while the LM head runs */
        if (rc == 0 && n_acts == 1 && g->grads.shared_bytes >= lm_head_need(g, m, N))
            g->lm_scratch = g->grads.shared, g->lm_scratch_bytes = g->grads.shared_bytes;
    } else if (rc == 0) {
        rc = cuda_alloc((void **)&g->hf_block, sizeof(dt_bf16) * (size_t)(N * H));
        g->hf = g->hf_block;
    }
    if (rc) {
        free_workspace(g);
        return dt_err_wrap("the GPU workspace for %lld tokens", (long long)N);
    }
    g->pos = g->ids + N;
    g->targets = g->ids + 2 * N;
    g->cap_tokens = N;
    g->ws_gen++;
    g->u_rank = rank;
    g->cap_seq = T;
    g->cap_seqs = n_seqs;
    g->training = training;
    return 0;
}

/* Checks the batch as the CPU model does, then uploads ids, positions, targets and starts. */
static int prepare(qwen35_cuda *g, const qwen35_model *m, const qwen35_batch *b, int n_acts, bool training,
                   int64_t *n_targets) {
    int64_t total = b->n_tokens, longest = 0;
    if (qwen35_batch_check(b, g->cfg.vocab_size, &longest)) return -1;
    const int32_t *labels = b->labels ? b->labels : b->ids;
    if (reserve(g, m, total, longest, b->n_seqs, n_acts, training)) return -1;
    int64_t off = 0, count = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        g->starts_host[s] = (int32_t)off;
        g->lens_host[s] = b->seq_lens[s];
        for (int t = 0; t < b->seq_lens[s]; t++) {
            g->pos_host[off + t] = t;
            int32_t y = t + 1 < b->seq_lens[s] ? labels[off + t + 1] : -1;
            g->targets_host[off + t] = y < 0 ? -1 : y;
            count += y >= 0;
        }
        off += b->seq_lens[s];
    }
    g->starts_host[b->n_seqs] = (int32_t)off;
    *n_targets = count;
    if (cuda_upload(g->ids, b->ids, sizeof(int32_t) * (size_t)total) ||
        cuda_upload(g->pos, g->pos_host, sizeof(int32_t) * (size_t)total) ||
        cuda_upload(g->targets, g->targets_host, sizeof(int32_t) * (size_t)total) ||
        cuda_upload(g->seq_starts, g->starts_host, sizeof(int32_t) * (size_t)(b->n_seqs + 1)) ||
        cuda_zero(g->loss, sizeof(double)))
        return -1;
    return 0;
}

/* ---------------------------------------------------------------- forward */

/* Layer l's down projection's u [N, rank], from its first row (NULL: not kept). */
static dt_bf16 *u_down_of(const qwen35_cuda *g, int l) {
    return g->u_down ? g->u_down + (size_t)l * g->cap_tokens * g->u_rank : NULL;
}

typedef struct {
    int64_t N;
    int n_seqs, max_len;
    bool decode;   /* one sequence going on from the decoding caches (g->dec), from position past */
    int64_t past;
} call;

/* The mixers: their output projection adds onto res, which holds h_in (res may be h_in itself) or
 * gets a copy of it. */
static void deltanet_mixer_forward(qwen35_cuda *g, int l, const call *k, const float *h_in, float *res, gpu_acts *a) {
    const qwen35_config *c = &g->cfg;
    const gpu_layer *L = &g->layers[l];
    dims d = dims_of(c);
    int64_t N = k->N;
    void *s = g->scratch;
    /* decoding: the conv reads the held rows, copied in before this call's (the workspace has
     * room for them), and those it leaves are held for the next call */
    int64_t held = k->decode ? c->conv_kernel - 1 : 0;
    dt_bf16 *mixed = a->mixed + held * d.cd, *qkv = a->qkv + held * d.cd;
    size_t held_bytes = sizeof(dt_bf16) * (size_t)(held * d.cd);
    if (held) cuda_copy_rows(a->mixed, held_bytes, g->dec.conv_hist[l], held_bytes, held_bytes, 1);
    PROF("fwd.gdn.in_proj", {
        cuda_linear_part p[] = {{mixed, CUDA_BF16, 0, NULL, &L->lin_qkv, 0},
                                {a->z, CUDA_BF16, 0, NULL, &L->lin_z, g->ld_zba},
                                {a->b, CUDA_BF16, 0, NULL, &L->lin_b, g->ld_zba},
                                {a->a, CUDA_BF16, 0, NULL, &L->lin_a, g->ld_zba}};
        linear_group_forward_cuda(p, 4, a->xn1, g->ld_xn1, N, s, a->xn1 + d.H, g->ld_xn1);
    });
    PROF("fwd.gdn.conv_norm_gates", {
        deltanet_conv_forward_cuda(a->qkv, a->mixed, L->conv, held ? g->dec.conv_pos : g->pos, N + held,
                                   c->conv_kernel, c->lin_n_k_heads, c->lin_k_head_dim, d.cd,
                                   1.0f / sqrtf((float)c->lin_k_head_dim), 1e-6f, a->conv);
        if (held) cuda_copy_rows(g->dec.conv_hist[l], held_bytes, a->mixed + N * d.cd, held_bytes, held_bytes, 1);
        deltanet_gates_forward_cuda(a->beta, a->g, a->b, a->a, g->ld_zba, L->a_log, L->dt_bias, N, (int)d.Hv);
    });
    cuda_deltanet_dims dd = {c->lin_n_k_heads, c->lin_n_v_heads, c->lin_k_head_dim, c->lin_v_head_dim};
    if (k->decode)
        PROF("fwd.gdn.recurrence",
             deltanet_forward_state_cuda(a->o_raw, qkv, a->beta, a->g, g->seq_starts, g->dec.state[l], dd));
    else
        PROF("fwd.gdn.recurrence",
             deltanet_forward_cuda(a->o_raw, qkv, a->beta, a->g, g->seq_starts, k->n_seqs, k->max_len, dd, g->big));
    PROF("fwd.gdn.out", {
        rmsnorm_gated_forward_cuda(a->o_norm, (int)d.Hv, g->ld_onorm, a->o_raw, a->z, g->ld_zba, L->lin_norm,
                                   N * d.Hv, c->lin_v_head_dim, (float)c->rms_eps);
        /* the output projection adds onto the residual: the add for free (where res is h_mid, in
         * the MLP part, which `big` covered until now, h_in is copied there only now) */
        if (res != h_in) cuda_copy_f32(res, h_in, N * d.H);
        cuda_linear_part p = {res, CUDA_F32, 1, NULL, &L->lin_out, 0};
        linear_group_forward_cuda(&p, 1, a->o_norm, g->ld_onorm, N, s, a->o_norm + d.vd, g->ld_onorm);
    });
}

static void attention_mixer_forward(qwen35_cuda *g, int l, const call *k, const float *h_in, float *res,
                                    gpu_acts *a) {
    const qwen35_config *c = &g->cfg;
    const gpu_layer *L = &g->layers[l];
    dims d = dims_of(c);
    int64_t N = k->N;
    int hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    float eps = (float)c->rms_eps;
    void *s = g->scratch;
    /* decoding: this call's keys and values go straight into the caches, after the held ones */
    dt_bf16 *kk = k->decode ? g->dec.k[l] + k->past * d.kvd : a->k;
    dt_bf16 *vv = k->decode ? g->dec.v[l] + k->past * d.kvd : a->v;
    PROF("fwd.attn.in_proj", {
        cuda_linear_part p[] = {{a->qg, CUDA_BF16, 0, NULL, &L->att_q, 0},
                                {a->k_pre, CUDA_BF16, 0, NULL, &L->att_k, 0},
                                {vv, CUDA_BF16, 0, NULL, &L->att_v, 0}};
        linear_group_forward_cuda(p, 3, a->xn1, g->ld_xn1, N, s, a->xn1 + d.H, g->ld_xn1);
    });
    PROF("fwd.attn.qk_norm_rope", {
        qk_norm_rope_forward_cuda(a->q, a->qg, 2 * d.qd, 2 * hd, L->q_norm, g->pos, N, nh, hd, c->rotary_dim,
                                  c->rope_theta, eps);
        qk_norm_rope_forward_cuda(kk, a->k_pre, d.kvd, hd, L->k_norm, g->pos, N, nkv, hd, c->rotary_dim,
                                  c->rope_theta, eps);
    });
    float scale = 1.0f / sqrtf((float)hd);
    if (k->decode)
        PROF("fwd.attn.core",
             attention_decode_cuda(a->att, a->q, g->dec.k[l], g->dec.v[l], N, k->past, nh, nkv, hd, scale));
    else
        PROF("fwd.attn.core", attention_forward_cuda(a->att, a->lse, a->q, a->k, a->v, g->starts_host, g->lens_host,
                                                     k->n_seqs, nh, nkv, hd, scale, g->big));
    PROF("fwd.attn.out", {
        attn_gate_forward_cuda(a->att_g, g->ld_attg, a->att, a->qg, N, nh, hd);
        if (res != h_in) cuda_copy_f32(res, h_in, N * d.H);  /* as in the DeltaNet mixer */
        cuda_linear_part p = {res, CUDA_F32, 1, NULL, &L->att_o, 0};
        linear_group_forward_cuda(&p, 1, a->att_g, g->ld_attg, N, s, a->att_g + d.qd, g->ld_attg);
    });
}

/* h_out = the decoder layer of h_in (h_out may be h_in); intermediates land in a, h_mid (the
 * residual between mixer and MLP) only when keep_mid (a backward will read a without a
 * recompute). h_out NULL: only the intermediates, h_mid included (a recompute for the backward,
 * which needs no output). */
static void layer_forward(qwen35_cuda *g, int l, const call *k, const float *h_in, float *h_out, gpu_acts *a,
                          bool keep_mid) {
    const qwen35_config *c = &g->cfg;
    const gpu_layer *L = &g->layers[l];
    int64_t N = k->N, H = c->hidden_size, I = c->intermediate_size;
    float eps = (float)c->rms_eps;
    void *s = g->scratch;
    /* the residual stream through the layer: h_out itself, in place, or h_mid */
    float *res = h_out ? h_out : a->h_mid;
    PROF("fwd.norms", rmsnorm1p_forward_cuda(a->xn1, g->ld_xn1, h_in, L->input_norm, N, (int)H, eps));
    if (c->layer_is_full[l]) attention_mixer_forward(g, l, k, h_in, res, a);
    else deltanet_mixer_forward(g, l, k, h_in, res, a);
    if (h_out && keep_mid) cuda_copy_f32(a->h_mid, h_out, N * H);
    PROF("fwd.norms", rmsnorm1p_forward_cuda(a->xn2, g->ld_xn2, res, L->post_norm, N, (int)H, eps));
    PROF("fwd.mlp", {
        cuda_linear_part p[] = {{a->gate, CUDA_BF16, 0, NULL, &L->mlp_gate, 2 * I},
                                {a->up, CUDA_BF16, 0, NULL, &L->mlp_up, 2 * I}};
        linear_group_forward_cuda(p, 2, a->xn2, g->ld_xn2, N, s, a->xn2 + H, g->ld_xn2);
        swiglu_forward_cuda(a->m, a->gate, a->up, 2 * I, N, I);
        if (h_out) linear_forward_cuda(h_out, CUDA_F32, 1, a->m, &L->mlp_down, N, s, u_down_of(g, l));
    });
}

/* ---------------------------------------------------------------- backward */

static void deltanet_mixer_backward(qwen35_cuda *g, const gpu_layer *L, const call *k, const gpu_acts *a,
                                    gpu_grads *G) {
    const qwen35_config *c = &g->cfg;
    dims d = dims_of(c);
    int64_t N = k->N;
    void *s = g->scratch;
    PROF("bwd.gdn.out", {
        cuda_linear_part p = {NULL, CUDA_F32, 0, G->dy_bf, &L->lin_out, G->ld_dy};
        linear_group_backward_cuda(G->do_norm, 0, &p, 1, a->o_norm, g->ld_onorm, N, s, a->o_norm + d.vd, g->ld_onorm);
        rmsnorm_gated_backward_cuda(G->do_raw, G->dz, G->ld_dz, (int)d.Hv, G->do_norm, a->o_raw, a->z, g->ld_zba,
                                    L->lin_norm, N * d.Hv, c->lin_v_head_dim, (float)c->rms_eps);
    });
    cuda_deltanet_dims dd = {c->lin_n_k_heads, c->lin_n_v_heads, c->lin_k_head_dim, c->lin_v_head_dim};
    PROF("bwd.gdn.recurrence", deltanet_backward_cuda(G->dqkv, G->dbeta, G->dg, G->do_raw, a->qkv, a->beta, a->g,
                                                      g->seq_starts, k->n_seqs, k->max_len, dd, g->big_bwd));
    PROF("bwd.gdn.conv_norm_gates", {
        deltanet_gates_backward_cuda(G->db, G->da, G->ld_dz, G->dbeta, G->dg, a->beta, a->g, L->a_log, N, (int)d.Hv);
        /* the conv output, not kept (see acts_layout), is recomputed from mixed; where the three
         * ops run apart, it goes where qkv, now dead, was */
        deltanet_conv_backward_cuda(G->dmixed, G->dqkv, a->mixed, L->conv, g->pos, N, c->conv_kernel,
                                    c->lin_n_k_heads, c->lin_k_head_dim, d.cd, 1.0f / sqrtf((float)c->lin_k_head_dim),
                                    1e-6f, a->qkv);
    });
    PROF("bwd.gdn.in_proj", {
        /* dz, db, da side by side with room for g: the tail's one product (linear_group_backward_cuda) */
        cuda_linear_part p[] = {{NULL, CUDA_F32, 0, G->dmixed, &L->lin_qkv, 0},
                                {NULL, CUDA_F32, 0, G->dz, &L->lin_z, G->ld_dz},
                                {NULL, CUDA_F32, 0, G->db, &L->lin_b, G->ld_dz},
                                {NULL, CUDA_F32, 0, G->da, &L->lin_a, G->ld_dz}};
        linear_group_backward_cuda(G->dxn1, 0, p, 4, a->xn1, g->ld_xn1, N, s, a->xn1 + d.H, g->ld_xn1);
    });
}

static void attention_mixer_backward(qwen35_cuda *g, const gpu_layer *L, const call *k, const gpu_acts *a,
                                     gpu_grads *G) {
    const qwen35_config *c = &g->cfg;
    dims d = dims_of(c);
    int64_t N = k->N;
    int hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    float eps = (float)c->rms_eps;
    void *s = g->scratch;
    PROF("bwd.attn.out", {
        cuda_linear_part p = {NULL, CUDA_F32, 0, G->dy_bf, &L->att_o, G->ld_dy};
        linear_group_backward_cuda(G->datt_g, 0, &p, 1, a->att_g, g->ld_attg, N, s, a->att_g + d.qd, g->ld_attg);
        attn_gate_backward_cuda(G->datt, G->dqg, G->datt_g, a->att, a->qg, N, nh, hd);
    });
    PROF("bwd.attn.core", attention_backward_cuda(G->dq, G->dk, G->dv, G->datt, a->att, a->lse, a->q, a->k, a->v,
                                                  g->starts_host, g->lens_host, k->n_seqs, nh, nkv, hd,
                                                  1.0f / sqrtf((float)hd), g->big));
    PROF("bwd.attn.qk_norm_rope", {
        qk_norm_rope_backward_cuda(G->dqg, 2 * d.qd, 2 * hd, G->dq, a->qg, L->q_norm, g->pos, N, nh, hd,
                                   c->rotary_dim, c->rope_theta, eps);
        qk_norm_rope_backward_cuda(G->dk_pre, d.kvd, hd, G->dk, a->k_pre, L->k_norm, g->pos, N, nkv, hd,
                                   c->rotary_dim, c->rope_theta, eps);
        cuda_f32_to_bf16(G->dv_bf, G->dv, N * d.kvd);
    });
    PROF("bwd.attn.in_proj", {
        cuda_linear_part p[] = {{NULL, CUDA_F32, 0, G->dqg, &L->att_q, 0},
                                {NULL, CUDA_F32, 0, G->dk_pre, &L->att_k, 0},
                                {NULL, CUDA_F32, 0, G->dv_bf, &L->att_v, 0}};
        linear_group_backward_cuda(G->dxn1, 0, p, 3, a->xn1, g->ld_xn1, N, s, a->xn1 + d.H, g->ld_xn1);
    });
}

/* dh: d loss / d h_out on entry, d loss / d h_in on return, from the layer's activations a;
 * LoRA gradients accumulate on the device. G->dy_bf holds dh as bf16 on entry and on return (the
 * norms' backward that wrote dh wrote it too). */
static void layer_backward(qwen35_cuda *g, int l, const call *k, const float *h_in, const gpu_acts *a, float *dh) {
    const qwen35_config *c = &g->cfg;
    const gpu_layer *L = &g->layers[l];
    gpu_grads *G = &g->grads;
    int64_t N = k->N, H = c->hidden_size, I = c->intermediate_size;
    float eps = (float)c->rms_eps;
    void *s = g->scratch;
    /* the MLP and the post-attention norm, mlp_rows tokens at a time (the dropout masks follow
     * the rows: row0); dh_mid = dh + the norm's input gradient, its bf16 over dh's rows of dy_bf
     * once the MLP has read them */
    for (int64_t t0 = 0; t0 < N; t0 += g->mlp_rows) {
        int64_t n = N - t0 < g->mlp_rows ? N - t0 : g->mlp_rows;
        cuda_linear down = L->mlp_down, gate = L->mlp_gate, up = L->mlp_up;
        down.row0 = gate.row0 = up.row0 = t0;
        PROF("bwd.mlp", {
            /* the recompute skipped the down projection: its u is the forward's; its LoRA's part of
             * dm is added by the SwiGLU's backward, and dm is bf16 (as the SwiGLU's inputs are) but
             * where that LoRA drops out its input (its whole backward writes dm, in fp32) */
            dt_bf16 *u_down = u_down_of(g, l);
            cuda_dtype dmt = down.dropout > 0 ? CUDA_F32 : CUDA_BF16;
            const dt_bf16 *g_down =
                linear_backward_defer_lora_cuda(G->dm, dmt, G->dy_bf + t0 * G->ld_dy, G->ld_dy, a->m + t0 * I, &down,
                                                n, s, u_down ? u_down + t0 * down.rank : NULL);
            swiglu_backward_lora_cuda(G->dgate, G->dup, G->ld_dgu, G->dm, dmt, a->gate + t0 * 2 * I,
                                      a->up + t0 * 2 * I, 2 * I, n, I, g_down, down.A, down.rank);
            /* dgate and dup side by side, with room for g: one product for dxn2 (linear_group_backward_cuda) */
            cuda_linear_part p[] = {{NULL, CUDA_F32, 0, G->dgate, &gate, G->ld_dgu},
                                    {NULL, CUDA_F32, 0, G->dup, &up, G->ld_dgu}};
            const dt_bf16 *xn2 = a->xn2 + t0 * g->ld_xn2;
            linear_group_backward_cuda(G->dxn2, 0, p, 2, xn2, g->ld_xn2, n, s, xn2 + H, g->ld_xn2);
        });
        PROF("bwd.norms", {
            rmsnorm1p_backward_cuda(G->dh_mid + t0 * H, G->dy_bf + t0 * G->ld_dy, G->ld_dy, dh + t0 * H, G->dxn2,
                                    a->h_mid + t0 * H, L->post_norm, n, (int)H, eps);
        });
    }
    if (c->layer_is_full[l]) attention_mixer_backward(g, L, k, a, G);
    else deltanet_mixer_backward(g, L, k, a, G);
    PROF("bwd.norms", {
        rmsnorm1p_backward_cuda(dh, G->dy_bf, G->ld_dy, G->dh_mid, G->dxn1, h_in, L->input_norm, N, (int)H, eps);
    });
}

/* ---------------------------------------------------------------- calls */

/* out (fp32 [N, H]) = the embedding rows of the batch's ids. */
static void embed(qwen35_cuda *g, float *out, int64_t N) {
    if (g->embed_q.bits) embedding_forward_q_cuda(out, g->ids, N, &g->embed_q);
    else embedding_forward_cuda(out, g->ids, N, g->embed, g->cfg.hidden_size);
}

/* The loss of the final-normed g->hf into g->loss; dh (when not NULL) += its gradient. */
static int lm_head_loss(qwen35_cuda *g, float *dh, int64_t N, float grad_scale, void *scratch, size_t bytes) {
    const qwen35_config *c = &g->cfg;
    if (g->lm_head_q.bits)
        return lmhead_ce_q_cuda(g->loss, dh, g->hf, g->targets, N, &g->lm_head_q, g->wbuf,
                                g->wbuf_elems / c->hidden_size, grad_scale, scratch, bytes);
    return lmhead_ce_cuda(g->loss, dh, g->hf, g->targets, N, g->lm_head, c->vocab_size, c->hidden_size, grad_scale,
                          scratch, bytes);
}

static int finish(qwen35_cuda *g, double *loss_sum, const char *what) {
    if (cuda_download(loss_sum, g->loss, sizeof(double)) || cuda_check(what))
        return dt_err_wrap("%s on %s", what, cuda_device_name());
    return 0;
}

int qwen35_cuda_eval_loss(qwen35_cuda *g, const qwen35_model *m, const qwen35_batch *b, double *loss_sum,
                          int64_t *n_targets) {
    *loss_sum = 0;
    *n_targets = 0;
    if (!g->loras && qwen35_cuda_sync_lora(g, m)) return -1;
    int64_t count = 0;
    if (prepare(g, m, b, 1, false, &count)) return -1;
    refresh_loras(g, false);
    const qwen35_config *c = &g->cfg;
    call k = {.N = b->n_tokens, .n_seqs = b->n_seqs};
    for (int s = 0; s < b->n_seqs; s++) k.max_len = b->seq_lens[s] > k.max_len ? b->seq_lens[s] : k.max_len;
    int64_t N = k.N, H = c->hidden_size;
    embed(g, g->h32, N);
    for (int l = 0; l < c->n_layers; l++) layer_forward(g, l, &k, g->h32, g->h32, &g->acts[0], false);
    rmsnorm1p_forward_cuda(g->hf, H, g->h32, g->final_norm, N, (int)H, (float)c->rms_eps);
    if (lm_head_loss(g, NULL, N, 1.0f, g->big_bwd, g->big_bwd_bytes) || finish(g, loss_sum, "the evaluation"))
        return -1;
    *n_targets = count;
    return 0;
}

/* ---------------------------------------------------------------- incremental decoding */

enum { DECODE_PIECE = 512 };  /* tokens a pass at most: a long prompt goes in pieces (the workspace's size) */

/* The decoding caches in one allocation (base NULL: only counted), the recurrent parts first. */
static size_t decode_layout(const qwen35_config *c, gpu_decode *s, char *base) {
    dims d = dims_of(c);
    int K = c->conv_kernel;
    carver k = {base, 0};
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_is_full[l]) continue;
        s->conv_hist[l] = carve(&k, sizeof(dt_bf16) * (size_t)((K - 1) * d.cd));
        s->state[l] = carve(&k, sizeof(float) * (size_t)(d.vd * c->lin_k_head_dim));
    }
    s->recurrent_bytes = k.off;
    for (int l = 0; l < c->n_layers; l++) {
        if (!c->layer_is_full[l]) continue;
        s->k[l] = carve(&k, sizeof(dt_bf16) * (size_t)(s->max_len * d.kvd));
        s->v[l] = carve(&k, sizeof(dt_bf16) * (size_t)(s->max_len * d.kvd));
    }
    s->conv_pos = carve(&k, sizeof(int32_t) * (size_t)(DECODE_PIECE + K - 1));
    s->logits = carve(&k, sizeof(float) * (size_t)c->vocab_size);
    return k.off;
}

int qwen35_cuda_decode_init(qwen35_cuda *g, int64_t max_len) {
    const qwen35_config *c = &g->cfg;
    gpu_decode *s = &g->dec;
    decode_free(s);
    if (max_len < 1) return dt_err("a decoding cache needs room for a token, not %lld", (long long)max_len);
    size_t L = (size_t)c->n_layers;
    s->max_len = max_len;
    s->k = calloc(L, sizeof *s->k);
    s->v = calloc(L, sizeof *s->v);
    s->conv_hist = calloc(L, sizeof *s->conv_hist);
    s->state = calloc(L, sizeof *s->state);
    int rc = s->k && s->v && s->conv_hist && s->state ? 0 : dt_err("out of memory");
    size_t bytes = decode_layout(c, s, NULL);
    if (rc == 0) rc = cuda_alloc(&s->block, bytes);
    int n_pos = DECODE_PIECE + c->conv_kernel - 1;
    int32_t *pos = rc == 0 ? malloc(sizeof(int32_t) * (size_t)n_pos) : NULL;
    if (rc == 0 && !pos) rc = dt_err("out of memory");
    if (rc == 0) {
        decode_layout(c, s, s->block);
        for (int i = 0; i < n_pos; i++) pos[i] = i;
        rc = cuda_upload(s->conv_pos, pos, sizeof(int32_t) * (size_t)n_pos);
    }
    free(pos);
    if (rc) {
        decode_free(s);
        return dt_err_wrap("a decoding cache of %lld tokens on %s", (long long)max_len, cuda_device_name());
    }
    return 0;
}

/* logits (device fp32 [V]) of the one final-normed row in g->hf; a quantized head a slice of
 * rows at a time, dequantized into wbuf. */
static void lm_head_logits(qwen35_cuda *g, float *logits) {
    int64_t V = g->cfg.vocab_size, H = g->cfg.hidden_size;
    int64_t rows = g->lm_head_q.bits ? g->wbuf_elems / H : V;
    for (int64_t r0 = 0; r0 < V; r0 += rows) {
        int64_t nr = V - r0 < rows ? V - r0 : rows;
        if (g->lm_head_q.bits) dequantize_rows_cuda(g->wbuf, &g->lm_head_q, r0, nr);
        cuda_linear head = {.W = g->lm_head_q.bits ? g->wbuf : g->lm_head + r0 * H, .in = H, .out = nr};
        linear_forward_cuda(logits + r0, CUDA_F32, 0, g->hf, &head, 1, g->scratch, NULL);
    }
}

int qwen35_cuda_forward_cached(qwen35_cuda *g, const qwen35_model *m, int64_t n_past, const int32_t *ids, int n,
                               float *logits) {
    const qwen35_config *c = &g->cfg;
    gpu_decode *s = &g->dec;
    if (!s->block) return dt_err("no decoding cache on the GPU (qwen35_cuda_decode_init)");
    if (n <= 0) return dt_err("no tokens to run");
    if (n_past < 0 || n_past + n > s->max_len)
        return dt_err("%lld tokens exceed the decoding cache of %lld", (long long)(n_past + n), (long long)s->max_len);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->vocab_size)
            return dt_err("token %d of %d is %d, outside the vocabulary [0, %d)", i, n, ids[i], c->vocab_size);
    if (!g->loras && qwen35_cuda_sync_lora(g, m)) return -1;
    int64_t rows = DECODE_PIECE + c->conv_kernel - 1;  /* a piece and the conv's held rows */
    if (reserve(g, m, rows, rows, 1, 1, false)) return -1;
    refresh_loras(g, false);
    if (n_past == 0) cuda_zero(s->block, s->recurrent_bytes);
    int64_t H = c->hidden_size, last = 0;
    for (int i0 = 0; i0 < n; i0 += DECODE_PIECE) {
        int np = n - i0 < DECODE_PIECE ? n - i0 : DECODE_PIECE;
        int32_t starts[2] = {0, np};
        for (int t = 0; t < np; t++) g->pos_host[t] = (int32_t)(n_past + i0 + t);
        if (cuda_upload(g->ids, ids + i0, sizeof(int32_t) * (size_t)np) ||
            cuda_upload(g->pos, g->pos_host, sizeof(int32_t) * (size_t)np) ||
            cuda_upload(g->seq_starts, starts, sizeof starts))
            return dt_err_wrap("decoding on %s", cuda_device_name());
        call k = {.N = np, .n_seqs = 1, .max_len = np, .decode = true, .past = n_past + i0};
        embed(g, g->h32, np);
        for (int l = 0; l < c->n_layers; l++) layer_forward(g, l, &k, g->h32, g->h32, &g->acts[0], false);
        last = np - 1;
    }
    rmsnorm1p_forward_cuda(g->hf, H, g->h32 + last * H, g->final_norm, 1, (int)H, (float)c->rms_eps);
    lm_head_logits(g, s->logits);
    if (cuda_download(logits, s->logits, sizeof(float) * (size_t)c->vocab_size) || cuda_check("decoding"))
        return dt_err_wrap("decoding on %s", cuda_device_name());
    return 0;
}

/* The forward and backward of one batch (its ids, positions and targets uploaded by prepare): the
 * loss into g->loss, the LoRA gradients added into g->lora_grad. Launches only, nothing waits. */
static int step_launches(qwen35_cuda *g, const call *k, bool grad_checkpoint, float grad_scale) {
    const qwen35_config *c = &g->cfg;
    int n_layers = c->n_layers;
    int64_t N = k->N, H = c->hidden_size, NH = N * H;
    float eps = (float)c->rms_eps;
    int rc = 0;
    cuda_prof_push("step");
    /* with checkpointing, the last layer's activations kept where the LM head leaves them alone */
    bool keep_last = grad_checkpoint && g->lm_scratch != g->big_bwd;
    /* forward: the residual stream in fp32, each layer's input also kept in bf16 */
    float *h = g->h32;
    PROF("fwd.embed", embed(g, h, N));
    for (int l = 0; l < n_layers; l++) {
        if (l > 0) cuda_f32_to_bf16(g->hs + (l - 1) * NH, h, NH);
        layer_forward(g, l, k, h, h, &g->acts[grad_checkpoint ? 0 : l],
                      !grad_checkpoint || (keep_last && l == n_layers - 1));
    }
    PROF("lm_head_ce", {
        rmsnorm1p_forward_cuda(g->hf, H, h, g->final_norm, N, (int)H, eps);
        float *dhf = g->grads.dh_mid;  /* the LM head's gradient; the grads are free until the layers' */
        cuda_zero(dhf, sizeof(float) * NH);
        rc = lm_head_loss(g, dhf, N, grad_scale, g->lm_scratch, g->lm_scratch_bytes);
        rmsnorm1p_backward_cuda(g->dh, g->grads.dy_bf, g->grads.ld_dy, NULL, dhf, h, g->final_norm, N, (int)H, eps);
    });
    /* backward, layer by layer, from each layer's kept input (in the buffer of the last output, no
     * longer needed); with checkpointing the layer is first recomputed from it, but the last where
     * its forward's activations were kept */
    float *h_in = h;
    for (int l = n_layers - 1; l >= 0; l--) {
        gpu_acts *a = &g->acts[grad_checkpoint ? 0 : l];
        if (l > 0) cuda_bf16_to_f32(h_in, g->hs + (l - 1) * NH, NH);
        else embed(g, h_in, N);
        if (grad_checkpoint && !(keep_last && l == n_layers - 1)) {
            cuda_prof_push("recompute");
            layer_forward(g, l, k, h_in, NULL, a, true);
            cuda_prof_pop();
        }
        layer_backward(g, l, k, h_in, a, g->dh);
    }
    cuda_prof_pop();
    return rc;
}

/* ---------------------------------------------------------------- the step as a CUDA graph */

static bool key_equal(const step_key *a, const step_key *b) {
    return a->lens && b->lens && a->N == b->N && a->ws_gen == b->ws_gen && a->n_seqs == b->n_seqs &&
           a->ckpt == b->ckpt && a->grad_scale == b->grad_scale &&
           memcmp(a->lens, b->lens, sizeof(int) * (size_t)a->n_seqs) == 0;
}

static void key_keep(step_key *dst, const step_key *src) {
    free(dst->lens);
    *dst = *src;
    dst->lens = malloc(sizeof(int) * (size_t)(src->n_seqs > 0 ? src->n_seqs : 1));
    if (dst->lens) memcpy(dst->lens, src->lens, sizeof(int) * (size_t)src->n_seqs);
}

/* Graphs are for steps that repeat exactly: not while profiling (the regions' events), not with
 * LoRA dropout (its seed, new each micro-batch, is a kernel argument); DT_CUDA_GRAPH=0 turns them off. */
static bool graphs_allowed(const qwen35_cuda *g) {
    const char *e = getenv("DT_CUDA_GRAPH");
    int dropout = 0;
    lora_rank_max(g, &dropout);
    return !g->profile && !dropout && !(e && strcmp(e, "0") == 0);
}

static int launch_graph(qwen35_cuda *g) {
    g->graph_launches++;
    return cuda_graph_launch(g->graph);
}

int64_t qwen35_cuda_graph_launches(const qwen35_cuda *g) { return g ? g->graph_launches : 0; }

/* The step's launches: replayed from the graph when the key is the recorded one; recorded (then
 * replayed) when the same key comes a second time in a row, so a one-off shape costs no capture;
 * else launched one by one. A capture that fails turns graphs off and launches directly. */
static int launch_step(qwen35_cuda *g, const call *k, bool grad_checkpoint, float grad_scale) {
    step_key key = {k->N, g->ws_gen, k->n_seqs, grad_checkpoint, grad_scale, g->lens_host};
    bool allowed = !g->graphs_failed && graphs_allowed(g);
    if (allowed && g->graph && key_equal(&key, &g->graph_key)) return launch_graph(g);
    if (allowed && key_equal(&key, &g->last_key)) {
        cuda_graph_free(g->graph);
        g->graph = NULL;
        if (cuda_graph_begin() == 0) {
            int rc = step_launches(g, k, grad_checkpoint, grad_scale);
            int ended = cuda_graph_end(&g->graph);
            if (rc) {  /* the step's own error (its launches said it), not the graph's */
                cuda_graph_free(g->graph);
                g->graph = NULL;
                return rc;
            }
            if (ended == 0) {
                key_keep(&g->graph_key, &key);
                return launch_graph(g);
            }
        }
        fprintf(stderr, "deltatune: %s; the step runs without graphs\n", dt_errmsg());
        g->graphs_failed = true;
    }
    if (allowed) key_keep(&g->last_key, &key);
    return step_launches(g, k, grad_checkpoint, grad_scale);
}

int qwen35_cuda_forward_backward(qwen35_cuda *g, const qwen35_model *m, const qwen35_batch *b, double grad_scale,
                                 bool grad_checkpoint, double *loss_sum, int64_t *n_targets) {
    *loss_sum = 0;
    *n_targets = 0;
    double t0 = dt_seconds();
    cuda_prof_enable(g->profile && g->calls++ > 0);
    if (!g->loras && qwen35_cuda_sync_lora(g, m)) return -1;
    int64_t count = 0;
    if (prepare(g, m, b, grad_checkpoint ? 1 : g->cfg.n_layers, true, &count)) return -1;
    refresh_loras(g, true);
    call k = {.N = b->n_tokens, .n_seqs = b->n_seqs};
    for (int s = 0; s < b->n_seqs; s++) k.max_len = b->seq_lens[s] > k.max_len ? b->seq_lens[s] : k.max_len;
    if (launch_step(g, &k, grad_checkpoint, (float)grad_scale) || finish(g, loss_sum, "the training step")) return -1;
    if (!g->lora_master) {  /* the optimiser is on the host: it needs the gradients there */
        double t1 = dt_seconds();
        if (collect_lora_grads(g)) return -1;
        cuda_prof_add_host("host.lora_grads_download", 1e3 * (dt_seconds() - t1));
    }
    cuda_prof_add_host("host.forward_backward_wall", 1e3 * (dt_seconds() - t0));
    *n_targets = count;
    return 0;
}

void qwen35_cuda_memory(const qwen35_cuda *g, int64_t *weight_bytes, int64_t *peak_bytes) {
    *weight_bytes = g ? g->weight_bytes : 0;
    *peak_bytes = (int64_t)cuda_mem_peak();
}

void qwen35_cuda_reset_peak(qwen35_cuda *g) { cuda_mem_reset_peak(); }

void qwen35_cuda_profile(qwen35_cuda *g, FILE *f) {
    if (!g->profile) return;
    cuda_prof_report(f);
    cuda_prof_reset();
}
