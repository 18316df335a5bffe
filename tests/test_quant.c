/* MLX affine quantization (quant.h): the quantizer against tools/mlx_quant_ref.py bit for bit,
 * hand-checked cases, packing, bad input, and the ops computing through quantized weights equal to
 * the same ops on the dequantized fp32 weights. */
#include <stdlib.h>
#include <string.h>

#include "deltatune/dtype.h"
#include "deltatune/error.h"
#include "deltatune/ops.h"
#include "deltatune/quant.h"
#include "deltatune/safetensors.h"
#include "test.h"


/* Code i of a packed row, read bit by bit from the little-endian words (independent of quant.c). */
static unsigned code_at(const uint32_t *row, int64_t i, int bits) {
    unsigned q = 0;
    for (int k = 0; k < bits; k++) {
        int64_t bit = i * bits + k;
        q |= ((row[bit / 32] >> (bit % 32)) & 1u) << k;
    }
    return q;
}

/* A quantized weight owning its buffers, scales and biases stored as qdtype. */
typedef struct {
    dt_weight w;
    uint32_t *wq;
    void *scales, *biases;
} qweight;

static void qweight_make(qweight *q, const float *w, int64_t rows, int64_t cols, int bits, int group, dt_dtype qdtype) {
    int64_t ng = rows * (cols / group);
    q->wq = malloc(sizeof(uint32_t) * rows * cols * bits / 32);
    float *s = malloc(sizeof(float) * ng), *b = malloc(sizeof(float) * ng);
    quant_quantize(q->wq, s, b, w, rows, cols, bits, group);
    q->scales = malloc(dt_dtype_size(qdtype) * ng);
    q->biases = malloc(dt_dtype_size(qdtype) * ng);
    dt_from_f32(q->scales, qdtype, s, ng);
    dt_from_f32(q->biases, qdtype, b, ng);
    free(s);
    free(b);
    q->w = (dt_weight){.dtype = DT_U32, .data = q->wq, .rows = rows, .cols = cols, .qbits = bits, .qgroup = group,
                       .qdtype = qdtype, .scales = q->scales, .biases = q->biases};
}
static void qweight_free(qweight *q) {
    free(q->wq);
    free(q->scales);
    free(q->biases);
}
static float *dequantized(const dt_weight *w) {
    float *d = malloc(sizeof(float) * w->rows * w->cols);
    dt_weight_rows_f32(d, w, 0, w->rows);
    return d;
}
static float *copy_f32(const st_tensor *t) {
    float *v = malloc(t->nbytes);
    memcpy(v, t->data, t->nbytes);  /* the map may be misaligned */
    return v;
}

static const int all_bits[] = {2, 3, 4, 5, 6, 8};

/* quant_quantize gives the reference script's words, scales and biases exactly, and dequantizing its
 * words gives scale q + bias for the codes read bit by bit. */
TEST(quant_matches_mlx_reference) {
    st_file f;
    CHECK_OK(st_open(&f, FIXTURES "/quant/mlx_quant_ref.safetensors"));
    const char *layouts[] = {"c64_g32", "c128_g64", "c128_g128", "mid2_g32", "mid3_g32", "mid4_g32",
                             "mid5_g32", "mid6_g32", "mid8_g32"};
    const int groups[] = {32, 64, 128, 32, 32, 32, 32, 32, 32};
    int checked = 0;
    for (int li = 0; li < 9; li++) {
        char name[96];
        snprintf(name, sizeof name, "%s.w", layouts[li]);
        const st_tensor *tw = st_find(&f, name);
        CHECKF(tw && tw->dtype == DT_F32 && tw->ndim == 2, "%s missing", name);
        int64_t rows = tw->shape[0], cols = tw->shape[1];
        int group = groups[li];
        float *w = copy_f32(tw);
        for (int bi = 0; bi < 6; bi++) {
            int bits = all_bits[bi];
            if (li >= 3 && bits != layouts[li][3] - '0') continue;
            const st_tensor *tq, *ts, *tb;
            snprintf(name, sizeof name, "%s.b%d.wq", layouts[li], bits);
            tq = st_find(&f, name);
            snprintf(name, sizeof name, "%s.b%d.scales", layouts[li], bits);
            ts = st_find(&f, name);
            snprintf(name, sizeof name, "%s.b%d.biases", layouts[li], bits);
            tb = st_find(&f, name);
            CHECKF(tq && ts && tb, "%s.b%d missing", layouts[li], bits);
            int64_t nw = rows * cols * bits / 32, ng = rows * cols / group;
            CHECK((int64_t)tq->nbytes == nw * 4 && (int64_t)ts->nbytes == ng * 4 && (int64_t)tb->nbytes == ng * 4);
            uint32_t *wq = malloc(4 * nw), *rq = malloc(4 * nw);
            float *s = malloc(4 * ng), *b = malloc(4 * ng), *rs = copy_f32(ts), *rb = copy_f32(tb);
            memcpy(rq, tq->data, 4 * nw);
            quant_quantize(wq, s, b, w, rows, cols, bits, group);
            int64_t bad_w = -1, bad_g = -1;
            for (int64_t i = 0; i < nw && bad_w < 0; i++)
                if (wq[i] != rq[i]) bad_w = i;
            for (int64_t i = 0; i < ng && bad_g < 0; i++)
                if (memcmp(&s[i], &rs[i], 4) || memcmp(&b[i], &rb[i], 4)) bad_g = i;
            /* dequantize the reference's words */
            dt_weight qw = {.dtype = DT_U32, .data = rq, .rows = rows, .cols = cols, .qbits = bits, .qgroup = group,
                            .qdtype = DT_F32, .scales = rs, .biases = rb};
            float *d = dequantized(&qw);
            double worst = 0;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < cols; c++) {
                    int64_t gi = r * (cols / group) + c / group;
                    double ref = (double)rs[gi] * code_at(rq + r * cols * bits / 32, c, bits) + rb[gi];
                    double tol = 1e-6 * (fabs(rs[gi]) * ((1 << bits) - 1) + fabs(rb[gi])) + 1e-37;
                    double e = fabs(d[r * cols + c] - ref) / tol;
                    worst = e > worst ? e : worst;
                }
            free(wq); free(rq); free(s); free(b); free(rs); free(rb); free(d);
            CHECKF(bad_w < 0, "%s %d-bit: word %lld differs", layouts[li], bits, (long long)bad_w);
            CHECKF(bad_g < 0, "%s %d-bit: scale/bias of group %lld differ", layouts[li], bits, (long long)bad_g);
            CHECKF(worst <= 1, "%s %d-bit: dequantized values off (%g of tolerance)", layouts[li], bits, worst);
            checked++;
        }
        free(w);
    }
    st_close(&f);
    CHECKF(checked == 24, "checked %d quantizations", checked);
}

/* Cases worked by hand from the algorithm (formats.md §7.1). */
TEST(quant_hand_cases) {
    float w[128];
    uint32_t wq[32];
    float s[4], b[4];
    /* 2-bit, w_i = i % 4: w_max = 3 is the edge, scale = -(3/3) = -1, q0 = -3, scale = 3 / -3 = -1,
     * bias = 3, q_i = 3 - w_i: codes 3,2,1,0 = 0b00011011 per byte */
    for (int i = 0; i < 32; i++) w[i] = (float)(i % 4);
    quant_quantize(wq, s, b, w, 1, 32, 2, 32);
    CHECKF(wq[0] == 0x1B1B1B1Bu && wq[1] == 0x1B1B1B1Bu, "2-bit words %08x %08x", wq[0], wq[1]);
    CHECK(s[0] == -1.0f && b[0] == 3.0f);
    /* 4-bit, w_i = i % 16: codes 15 - i % 16, element 0 in the low nibble */
    for (int i = 0; i < 32; i++) w[i] = (float)(i % 16);
    quant_quantize(wq, s, b, w, 1, 32, 4, 32);
    CHECKF(wq[0] == 0x89ABCDEFu && wq[1] == 0x01234567u, "4-bit words %08x %08x", wq[0], wq[1]);
    CHECK(s[0] == -1.0f && b[0] == 15.0f);
    /* 8-bit, w_0 = -255, w_1 = 0, w_i = -i: |w_min| > |w_max|, the edge is w_min and scale stays
     * positive: scale = 255/255 = 1, q0 = rint(-255) = -255, scale = -255 / -255 = 1, bias = -255,
     * q_0 = 0, q_1 = 255, q_i = 255 - i */
    w[0] = -255.0f;
    w[1] = 0.0f;
    for (int i = 2; i < 32; i++) w[i] = (float)-i;
    quant_quantize(wq, s, b, w, 1, 32, 8, 32);
    CHECKF(wq[0] == 0xFCFDFF00u && wq[7] == 0xE0E1E2E3u, "8-bit words %08x %08x", wq[0], wq[7]);
    CHECK(s[0] == 1.0f && b[0] == -255.0f);
    /* 8-bit, w_i = -i, i < 32: scale = 31/255, q0 = -255, scale = -31/-255, bias = -31,
     * q_i = rint((31 - i) 255/31): 255, 246.77 -> 247, 238.55 -> 239, 230.32 -> 230 */
    for (int i = 0; i < 32; i++) w[i] = (float)-i;
    quant_quantize(wq, s, b, w, 1, 32, 8, 32);
    CHECKF(wq[0] == 0xE6EFF7FFu, "8-bit word %08x", wq[0]);
    CHECK(s[0] == -31.0f / -255.0f && b[0] == -31.0f);
    /* 3-bit, a bit stream: w_i = i % 8 gives codes 7 - i % 8 (scale -1, bias 7); the 8 codes 7..0 fill
     * the first 3 bytes: sum (7 - k) << 3k = 0x053977 */
    for (int i = 0; i < 32; i++) w[i] = (float)(i % 8);
    quant_quantize(wq, s, b, w, 1, 32, 3, 32);
    for (int i = 0; i < 32; i++) CHECKF(code_at(wq, i, 3) == 7u - (unsigned)(i % 8), "3-bit code %d", i);
    CHECKF((wq[0] & 0xFFFFFFu) == 0x053977u && s[0] == -1.0f && b[0] == 7.0f, "3-bit word %08x", wq[0]);
    /* constant groups: all zeros (q0 = 0: scale = -1e-7, bias = 0), and c (bias = c, exact) */
    for (int i = 0; i < 128; i++) w[i] = i < 64 ? 0.0f : -0.3f;
    for (int bi = 0; bi < 6; bi++) {
        int bits = all_bits[bi];
        quant_quantize(wq, s, b, w, 1, 128, bits, 64);
        CHECKF(s[0] == -1e-7f && b[0] == 0.0f, "%d-bit zero group: scale %g bias %g", bits, s[0], b[0]);
        CHECKF(b[1] == -0.3f, "%d-bit constant group: bias %g", bits, b[1]);
        for (int i = 0; i < 128 * bits / 32; i++) CHECKF(wq[i] == 0, "%d-bit constant groups: word %d = %08x", bits, i, wq[i]);
        dt_weight qw = {.dtype = DT_U32, .data = wq, .rows = 1, .cols = 128, .qbits = bits, .qgroup = 64,
                        .qdtype = DT_F32, .scales = s, .biases = b};
        float d[128];
        dt_weight_rows_f32(d, &qw, 0, 1);
        for (int i = 0; i < 128; i++) CHECKF(d[i] == w[i], "%d-bit constant groups: element %d = %g", bits, i, d[i]);
    }
    /* one huge outlier: it is the edge, so it comes back exactly; the rest collapse near 0 */
    for (int i = 0; i < 32; i++) w[i] = 0.001f * test_frand();
    w[5] = -65504.0f;
    for (int bi = 0; bi < 6; bi++) {
        int bits = all_bits[bi];
        quant_quantize(wq, s, b, w, 1, 32, bits, 32);
        dt_weight qw = {.dtype = DT_U32, .data = wq, .rows = 1, .cols = 32, .qbits = bits, .qgroup = 32,
                        .qdtype = DT_F32, .scales = s, .biases = b};
        float d[32];
        dt_weight_rows_f32(d, &qw, 0, 1);
        CHECKF(d[5] == -65504.0f && b[0] == -65504.0f, "%d-bit outlier: %g bias %g", bits, d[5], b[0]);
        for (int i = 0; i < 32; i++) CHECKF(fabsf(d[i] - w[i]) <= fabsf(s[0]) / 2 * 1.0001f, "%d-bit outlier group: %d", bits, i);
    }
}

/* Every dequantized value is within scale / 2 of the input, except at the far end of a group: the
 * edge is made exact (scale = edge / rint(edge / scale)), which can stretch the far end past n_bins
 * by up to one step; MLX clamps it there, an error of at most one scale (every width, 8-bit too). */
TEST(quant_error_bound) {
    int64_t rows = 64, cols = 256;
    float *w = test_rand_vec(rows * cols, 0.05f);
    for (int64_t i = 0; i < rows * cols; i += 97) w[i] *= 40;  /* some spread between groups */
    for (int bi = 0; bi < 6; bi++) {
        int bits = all_bits[bi];
        unsigned top = (1u << bits) - 1;
        qweight q;
        qweight_make(&q, w, rows, cols, bits, 64, DT_F32);
        float *d = dequantized(&q.w);
        const float *s = q.scales;
        double inner = 0, ends = 0;
        for (int64_t i = 0; i < rows * cols; i++) {
            double e = fabs((double)d[i] - w[i]) / fabs(s[i / 64]);
            unsigned code = code_at(q.wq + (i / cols) * cols * bits / 32, i % cols, bits);
            if (code == 0 || code == top) {
                ends = e > ends ? e : ends;
            } else {
                inner = e > inner ? e : inner;
            }
        }
        free(d);
        qweight_free(&q);
        CHECKF(inner <= 0.5 + 1e-4, "%d-bit: error %g scales", bits, inner);
        CHECKF(ends <= 1 + 1e-4, "%d-bit: error at a group's end %g scales", bits, ends);
    }
    free(w);
}

/* quantize -> dequantize -> quantize. A group whose codes span 0 to n_bins comes back bit for bit
 * (codes, scale and bias): its range is n_bins scales, so the same edge, q0 and scale follow. A
 * group whose far end stopped at n_bins - 1 (rint(edge / scale) rounded down) is re-fitted over the
 * smaller range, as MLX would; its values then stay within the second round's error bound (one of
 * its scales, quant_error_bound) of the first round's. */
TEST(quant_requantize_stable) {
    int64_t rows = 16, cols = 384;
    float *w = test_rand_vec(rows * cols, 0.1f);
    for (int bi = 0; bi < 6; bi++) {
        int bits = all_bits[bi];
        unsigned top = (1u << bits) - 1;
        for (int group = 32; group <= 128; group *= 2) {
            qweight a, b;
            qweight_make(&a, w, rows, cols, bits, group, DT_F32);
            float *da = dequantized(&a.w);
            qweight_make(&b, da, rows, cols, bits, group, DT_F32);
            float *db = dequantized(&b.w);
            const float *sa = a.scales, *sb = b.scales, *ba = a.biases, *bb = b.biases;
            int64_t ng = rows * cols / group, full = 0, bad = -1;
            double moved = 0;
            for (int64_t g = 0; g < ng; g++) {
                int64_t r = g / (cols / group), c0 = g % (cols / group) * group;
                unsigned hi = 0, lo = top, same = 1;
                for (int64_t c = c0; c < c0 + group; c++) {
                    unsigned qa = code_at(a.wq + r * cols * bits / 32, c, bits);
                    unsigned qb = code_at(b.wq + r * cols * bits / 32, c, bits);
                    hi = qa > hi ? qa : hi;
                    lo = qa < lo ? qa : lo;
                    same &= qa == qb;
                    double e = fabs((double)da[r * cols + c] - db[r * cols + c]) / fabs(sb[g]);
                    moved = e > moved ? e : moved;
                }
                if (lo == 0 && hi == top) {
                    full++;
                    if (!same || memcmp(&sa[g], &sb[g], 4) || memcmp(&ba[g], &bb[g], 4)) bad = bad < 0 ? g : bad;
                }
            }
            free(da);
            free(db);
            qweight_free(&a);
            qweight_free(&b);
            CHECKF(bad < 0, "%d-bit g%d: group %lld spanning every code changed on requantizing", bits, group,
                   (long long)bad);
            CHECKF(full * 2 >= ng, "%d-bit g%d: only %lld of %lld groups span every code", bits, group,
                   (long long)full, (long long)ng);
            CHECKF(moved <= 1 + 1e-4, "%d-bit g%d: requantized values moved %g scales", bits, group, moved);
        }
    }
    free(w);
}

/* Every code of every width survives packing and unpacking: random codes packed by hand as a
 * little-endian bit stream, dequantized with scale 1 and bias 0 (in each scale dtype). */
TEST(quant_pack_unpack) {
    int64_t rows = 3, cols = 256;
    const dt_dtype qdts[] = {DT_F32, DT_F16, DT_BF16};
    for (int bi = 0; bi < 6; bi++) {
        int bits = all_bits[bi];
        uint32_t *wq = calloc(rows * cols * bits / 32, 4);
        unsigned *codes = malloc(sizeof(unsigned) * rows * cols);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++) {
                unsigned q = (unsigned)((test_frand() + 1) * 0.5 * (1 << bits)) & ((1u << bits) - 1);
                if (c < (1 << bits)) q = (unsigned)c;  /* every code at least once */
                codes[r * cols + c] = q;
                for (int k = 0; k < bits; k++) {
                    int64_t bit = r * cols * bits + c * bits + k;
                    wq[bit / 32] |= ((q >> k) & 1u) << (bit % 32);
                }
            }
        for (int qi = 0; qi < 3; qi++)
            for (int group = 32; group <= 128; group *= 2) {
                int64_t ng = rows * cols / group;
                float *one = malloc(4 * ng), *zero = calloc(ng, 4);
                for (int64_t i = 0; i < ng; i++) one[i] = 1;
                void *s = malloc(4 * ng), *b = malloc(4 * ng);
                dt_from_f32(s, qdts[qi], one, ng);
                dt_from_f32(b, qdts[qi], zero, ng);
                dt_weight qw = {.dtype = DT_U32, .data = wq, .rows = rows, .cols = cols, .qbits = bits,
                                .qgroup = group, .qdtype = qdts[qi], .scales = s, .biases = b};
                float *d = malloc(sizeof(float) * rows * cols);
                /* a row at a time, from the middle, as the ops ask for them */
                for (int64_t r = rows - 1; r >= 0; r--) quant_dequantize_rows(d + r * cols, &qw, r, 1);
                int64_t bad = -1;
                for (int64_t i = 0; i < rows * cols && bad < 0; i++)
                    if (d[i] != (float)codes[i]) bad = i;
                free(one); free(zero); free(s); free(b); free(d);
                CHECKF(bad < 0, "%d-bit g%d %s: element %lld", bits, group, dt_dtype_name(qdts[qi]), (long long)bad);
            }
        free(wq);
        free(codes);
    }
}

TEST(quant_bad_input) {
    CHECK_OK(quant_check(4, 64, 1024, "x"));
    CHECK_ERR(quant_check(7, 64, 1024, "layers.0.mlp.up_proj"), "layers.0.mlp.up_proj: unsupported quantization bits 7");
    CHECK_ERR(quant_check(1, 64, 1024, "t"), "bits 1");
    CHECK_ERR(quant_check(0, 64, 1024, "t"), "bits 0");
    CHECK_ERR(quant_check(4, 16, 1024, "embed_tokens"), "embed_tokens: unsupported quantization group size 16");
    CHECK_ERR(quant_check(4, 48, 1024, "t"), "group size 48");
    CHECK_ERR(quant_check(4, 64, 1000, "lm_head"), "lm_head: quantization group size 64 does not divide the row of 1000");
    CHECK_ERR(quant_check(4, 64, 0, "t"), "does not divide");
    CHECK_OK(quant_check_mode("affine", "q"));
    CHECK_OK(quant_check_mode(NULL, "q"));
    CHECK_ERR(quant_check_mode("mxfp4", "config.json quantization"), "config.json quantization: unsupported quantization mode \"mxfp4\"");

    uint32_t data[64] = {0};
    uint16_t sb[16] = {0};
    dt_weight w = {.dtype = DT_U32, .data = data, .rows = 4, .cols = 128, .qbits = 4, .qgroup = 64,
                   .qdtype = DT_BF16, .scales = sb, .biases = sb};
    /* [4, 128] 4-bit: [4, 16] words = 256 bytes; [4, 2] bf16 scales and biases = 16 bytes */
    CHECK_OK(quant_check_sizes(&w, 256, 16, 16, "q_proj"));
    CHECK_ERR(quant_check_sizes(&w, 252, 16, 16, "layers.1.self_attn.q_proj"),
              "layers.1.self_attn.q_proj: packed weight has 252 bytes, expected 256");
    CHECK_ERR(quant_check_sizes(&w, 256, 32, 16, "q_proj"), "q_proj: scales have 32 bytes, expected 16");
    CHECK_ERR(quant_check_sizes(&w, 256, 16, 8, "q_proj"), "q_proj: biases have 8 bytes, expected 16");
    w.qgroup = 32;  /* the shapes of group 64 read as group 32 */
    CHECK_ERR(quant_check_sizes(&w, 256, 16, 16, "q_proj"), "q_proj: scales have 16 bytes, expected 32");
    w.qgroup = 64;
    w.qbits = 8;  /* words of 4-bit read as 8-bit */
    CHECK_ERR(quant_check_sizes(&w, 256, 16, 16, "q_proj"), "packed weight has 256 bytes, expected 512");
    w.qbits = 5;
    CHECK_ERR(quant_check_sizes(&w, 256, 16, 16, "q_proj"), "expected 320");
    w.qbits = 9;
    CHECK_ERR(quant_check_sizes(&w, 256, 16, 16, "q_proj"), "q_proj: unsupported quantization bits 9");
    w.qbits = 4;
    w.dtype = DT_F32;
    CHECK_ERR(quant_check_sizes(&w, 256, 16, 16, "q_proj"), "q_proj: quantized weight stored as F32, expected U32");
    w.dtype = DT_U32;
    w.qdtype = DT_I32;
    CHECK_ERR(quant_check_sizes(&w, 256, 32, 32, "q_proj"), "scales/biases stored as I32");
    w.qdtype = DT_BF16;
    w.cols = 96;
    CHECK_ERR(quant_check_sizes(&w, 192, 16, 16, "down_proj"), "down_proj: quantization group size 64 does not divide the row of 96");
}

TEST(quant_weight_bytes) {
    dt_weight w = {.dtype = DT_U32, .rows = 10, .cols = 256, .qbits = 3, .qgroup = 64, .qdtype = DT_BF16};
    CHECK(dt_weight_bytes(&w) == 10 * 256 * 3 / 8 + 2 * 10 * 4 * 2);
    dt_weight d = {.dtype = DT_BF16, .rows = 10, .cols = 256};
    CHECK(dt_weight_bytes(&d) == 10 * 256 * 2);
}

/* linear forward and backward with a quantized W equal the same with its dequantized fp32 W. */
TEST(quant_linear_matches_dequantized) {
    int64_t T = 5, in = 2048, out = 1100;  /* 512 rows per block: three blocks, one partial */
    float *x = test_rand_vec(T * in, 1), *wf = test_rand_vec(out * in, 0.05f), *dy = test_rand_vec(T * out, 1);
    float *yq = malloc(sizeof(float) * T * out), *yf = malloc(sizeof(float) * T * out);
    float *dxq = malloc(sizeof(float) * T * in), *dxf = malloc(sizeof(float) * T * in);
    const int bits[] = {4, 8, 3, 6};
    const dt_dtype qdt[] = {DT_BF16, DT_F32, DT_F16, DT_BF16};
    for (int k = 0; k < 4; k++) {
        qweight q;
        qweight_make(&q, wf, out, in, bits[k], k == 2 ? 128 : 64, qdt[k]);
        float *wd = dequantized(&q.w);
        dt_linear lq = {q.w, NULL}, lf = {{.dtype = DT_F32, .data = wd, .rows = out, .cols = in}, NULL};
        linear_forward(yq, x, &lq, T);
        linear_forward(yf, x, &lf, T);
        for (int64_t i = 0; i < T * in; i++) dxq[i] = dxf[i] = 0.5f;
        linear_backward(dxq, dy, x, &lq, T);
        linear_backward(dxf, dy, x, &lf, T);
        double ey = rel_err(yq, yf, T * out), ex = rel_err(dxq, dxf, T * in);
        free(wd);
        qweight_free(&q);
        CHECKF(ey <= 1e-5 && ex <= 1e-5, "%d-bit: forward rel err %g, backward %g", bits[k], ey, ex);
    }
    free(x); free(wf); free(dy); free(yq); free(yf); free(dxq); free(dxf);
}

TEST(quant_embedding_matches_dequantized) {
    int64_t V = 300, H = 128, T = 7;
    float *ef = test_rand_vec(V * H, 0.1f);
    int32_t ids[7] = {0, 299, 5, 5, 150, 1, 298};
    for (int bi = 0; bi < 6; bi++) {
        qweight q;
        qweight_make(&q, ef, V, H, all_bits[bi], 32, DT_BF16);
        float *ed = dequantized(&q.w);
        dt_weight wd = {.dtype = DT_F32, .data = ed, .rows = V, .cols = H};
        float oq[7 * 128], of[7 * 128];
        embedding_forward(oq, ids, T, &q.w);
        embedding_forward(of, ids, T, &wd);
        int same = memcmp(oq, of, sizeof oq) == 0;
        free(ed);
        qweight_free(&q);
        CHECKF(same, "%d-bit: embedding rows differ", all_bits[bi]);
    }
    free(ef);
}

/* The LM head + cross-entropy over a quantized (tied) embedding: loss and dh as with fp32. */
TEST(quant_lmhead_matches_dequantized) {
    int64_t V = LMHEAD_VOCAB_BLOCK + 300, H = 64, T = 6, chunk = 4;  /* two vocabulary blocks, one partial */
    float *ef = test_rand_vec(V * H, 0.2f), *h = test_rand_vec(T * H, 1);
    int32_t targets[6] = {3, -100, (int32_t)V - 1, LMHEAD_VOCAB_BLOCK, 17, 4000};
    float *scratch = malloc(sizeof(float) * (T > chunk ? T : chunk) * V);
    float *dhq = calloc(T * H, sizeof(float)), *dhf = calloc(T * H, sizeof(float));
    qweight q;
    qweight_make(&q, ef, V, H, 4, 64, DT_BF16);
    float *ed = dequantized(&q.w);
    dt_weight wd = {.dtype = DT_F32, .data = ed, .rows = V, .cols = H};
    double lq = 0, lf = 0, lq2 = 0, lf2 = 0;
    int64_t nq = 0, nf = 0, nq2 = 0, nf2 = 0;
    lmhead_ce_forward(&lq, &nq, h, targets, T, &q.w, scratch);
    lmhead_ce_forward(&lf, &nf, h, targets, T, &wd, scratch);
    lmhead_ce_forward_backward(&lq2, &nq2, dhq, h, targets, T, &q.w, 0.2f, chunk, scratch);
    lmhead_ce_forward_backward(&lf2, &nf2, dhf, h, targets, T, &wd, 0.2f, chunk, scratch);
    double edh = rel_err(dhq, dhf, T * H);
    free(ef); free(h); free(scratch); free(dhq); free(dhf); free(ed);
    qweight_free(&q);
    CHECK(nq == 5 && nf == 5 && nq2 == 5 && nf2 == 5);
    CHECKF(fabs(lq - lf) <= 1e-5 * fabs(lf) && fabs(lq2 - lf2) <= 1e-5 * fabs(lf2), "loss %.9g vs %.9g, %.9g vs %.9g", lq,
           lf, lq2, lf2);
    CHECKF(edh <= 1e-5, "dh rel err %g", edh);
}
