/* Hugging Face tokenizer.json: byte-level BPE.
 *
 * Pipeline of one encode (as HF tokenizers does it):
 *   1. validate UTF-8;
 *   2. split the raw text on added tokens with normalized=false (leftmost-longest);
 *   3. normalize every other segment, then split it on added tokens with normalized=true;
 *   4. pre-tokenize the remaining segments (Split with the file's regex through PCRE2, ByteLevel);
 *   5. BPE each piece by merge rank (heap over adjacent pairs), with a per-thread cache of pieces.
 * The post-processor is not applied: encode never adds BOS/EOS (HF add_special_tokens=False). */
#include "deltatune/tokenizer.h"

#include "deltatune/error.h"
#include "text/utf8.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <limits.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

int dt_ids_push(dt_ids *a, int32_t id) {
    if (a->n == a->cap) {
        if (a->cap > INT_MAX / 2) return dt_err("more than %d token ids", a->cap);
        int cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = realloc(a->v, (size_t)cap * sizeof *v);
        if (!v) return dt_err("out of memory");
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = id;
    return 0;
}

void dt_ids_free(dt_ids *a) {
    free(a->v);
    a->v = NULL;
    a->n = a->cap = 0;
}

/* ---------- hashing ---------- */

static uint64_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, s, 8);
        h = (h ^ v) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        s += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, s, n);
    h = (h ^ v) * 0x94d049bb133111ebull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h;
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

/* ---------- the tokenizer ---------- */

enum norm_type { N_NFC, N_NFD, N_NFKC, N_NFKD, N_LOWER, N_PREPEND, N_REPLACE, N_STRIP };
typedef struct {
    enum norm_type type;
    char *a, *b; /* prepend: a; replace: a -> b */
    bool left, right;
} norm_step;

enum pre_type { P_SPLIT, P_BYTELEVEL };
typedef struct {
    enum pre_type type;
    pcre2_code *re; /* split pattern, or the GPT-2 regex of ByteLevel(use_regex) */
    bool removed;   /* Split behavior Removed (else Isolated) */
    bool add_prefix_space;
} pre_step;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} added_tok;

typedef struct {
    uint64_t key; /* left << 32 | right, +1 so 0 is empty */
    int32_t rank, new_id;
} merge_slot;

struct dt_tokenizer {
    uint64_t serial;
    int n_ids;
    char **str;      /* id -> token string (NUL-terminated), NULL for holes */
    uint32_t *slen;  /* id -> length */
    uint8_t *is_special; /* id -> 1 when a special added token */
    char *arena;     /* the vocab strings */
    /* vocab string -> id (model vocab only) */
    int32_t *vmap;
    size_t vmap_mask;
    merge_slot *mmap;
    size_t mmap_mask;
    int32_t byte_id[256]; /* id of the single byte-level char of each byte, -1 if none */
    int32_t unk_id;
    bool ignore_merges;
    added_tok *added;
    int n_added;
    bool any_normalized_added; /* any added token matched after normalization */
    /* by first byte: indices into added, longest first */
    int *first_idx[256];
    int first_n[256];
    norm_step *norm;
    int n_norm;
    pre_step *pre;
    int n_pre;
};

static atomic_uint_fast64_t serial_counter = 1;

/* The byte-level alphabet (formats.md 4.3). */
static uint32_t byte_to_cp[256];
static int16_t cp_to_byte[0x144];
static char byte_utf8[256][3]; /* UTF-8 of each byte's char, length in byte_utf8_len */
static uint8_t byte_utf8_len[256];

/* Code points NFC leaves alone in any context: combining class 0, not the second of any canonical
 * composition, and NFC of the code point alone is itself. Text made only of them is already NFC. */
static uint8_t nfc_inert[0x110000 / 8];

static bool is_inert(uint32_t cp) { return nfc_inert[cp >> 3] >> (cp & 7) & 1; }

static void init_nfc_inert(void) {
    static uint8_t second[0x110000 / 8];
    utf8proc_int32_t d[32];
    for (uint32_t cp = 0; cp < 0x110000; cp++) {
        int bound = 0;
        utf8proc_ssize_t n = utf8proc_decompose_char((utf8proc_int32_t)cp, d, 32, UTF8PROC_DECOMPOSE, &bound);
        for (utf8proc_ssize_t i = 1; i < n && i < 32; i++) second[d[i] >> 3] |= (uint8_t)(1u << (d[i] & 7));
    }
    for (uint32_t cp = 0x1161; cp <= 0x11C2; cp++) second[cp >> 3] |= (uint8_t)(1u << (cp & 7)); /* Hangul V, T */
    for (uint32_t cp = 0; cp < 0x110000; cp++) {
        if (second[cp >> 3] >> (cp & 7) & 1) continue;
        const utf8proc_property_t *pr = utf8proc_get_property((utf8proc_int32_t)cp);
        if (pr->combining_class != 0 || pr->category == UTF8PROC_CATEGORY_CN || pr->category == UTF8PROC_CATEGORY_CS) continue;
        int bound = 0;
        utf8proc_ssize_t n = utf8proc_decompose_char((utf8proc_int32_t)cp, d, 32, UTF8PROC_DECOMPOSE, &bound);
        bool same = n == 1 && (uint32_t)d[0] == cp;
        if (!same) {
            bool has_second = false;
            for (utf8proc_ssize_t i = 0; i < n && i < 32; i++) has_second |= second[d[i] >> 3] >> (d[i] & 7) & 1;
            if (has_second) continue;
            utf8proc_uint8_t in[4], *o = NULL;
            utf8proc_ssize_t l = utf8proc_encode_char((utf8proc_int32_t)cp, in);
            utf8proc_ssize_t r = utf8proc_map(in, l, &o, (utf8proc_option_t)(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
            same = r == l && !memcmp(o, in, (size_t)l);
            free(o);
        }
        if (same) nfc_inert[cp >> 3] |= (uint8_t)(1u << (cp & 7));
    }
}

static void init_byte_map(void) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        byte_to_cp[b] = keep ? (uint32_t)b : (uint32_t)(0x100 + n++);
    }
    for (int c = 0; c < 0x144; c++) cp_to_byte[c] = -1;
    for (int b = 0; b < 256; b++) {
        uint32_t c = byte_to_cp[b];
        cp_to_byte[c] = (int16_t)b;
        if (c < 0x80) {
            byte_utf8[b][0] = (char)c;
            byte_utf8_len[b] = 1;
        } else {
            byte_utf8[b][0] = (char)(0xC0 | (c >> 6));
            byte_utf8[b][1] = (char)(0x80 | (c & 0x3F));
            byte_utf8_len[b] = 2;
        }
    }
}

static int32_t vocab_find(const dt_tokenizer *t, const char *s, size_t n) {
    size_t i = hash_bytes(s, n) & t->vmap_mask;
    for (;;) {
        int32_t id = t->vmap[i];
        if (id < 0) return -1;
        if (t->slen[id] == n && memcmp(t->str[id], s, n) == 0) return id;
        i = (i + 1) & t->vmap_mask;
    }
}

static const merge_slot *merge_find(const dt_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t i = hash_u64(key) & t->mmap_mask;
    for (;;) {
        const merge_slot *s = &t->mmap[i];
        if (s->key == key) return s;
        if (s->key == 0) return NULL;
        i = (i + 1) & t->mmap_mask;
    }
}

/* ---------- UTF-8 ---------- */

/* Decodes one code point of valid UTF-8; returns its length. */
static int utf8_next(const unsigned char *s, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) return *cp = c, 1;
    if (c < 0xE0) return *cp = ((c & 0x1F) << 6) | (s[1] & 0x3F), 2;
    if (c < 0xF0) return *cp = ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F), 3;
    return *cp = ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F), 4;
}

/* The code point that ends just before s[end] (valid UTF-8). */
static uint32_t utf8_prev(const unsigned char *s, size_t end) {
    size_t i = end - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
    uint32_t cp;
    utf8_next(s + i, &cp);
    return cp;
}

/* Rust char::is_whitespace (Unicode White_Space). */
static bool is_ws(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

static bool is_word_char(uint32_t c) {
    if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) ||
           (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
}

/* ---------- per-thread scratch: regex match data, buffers, the piece cache ---------- */

#define CACHE_MAX_PIECE 256
#define CACHE_SLOTS (1u << 16)
typedef struct {
    uint64_t hash; /* 0: empty */
    uint32_t off;  /* in arena: key bytes, then ids */
    uint16_t klen, nids;
} cache_slot;

typedef struct {
    uint64_t serial;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jstack;
    cache_slot *slots;
    unsigned n_used;
    unsigned char *arena;
    size_t arena_n, arena_cap;
    /* bpe work arrays */
    int32_t *sid, *sprev, *snext;
    struct heap_e { int32_t rank, pos, left, right; } *heap;
    size_t work_cap;
    char *mapped; /* byte-level string of a piece (ignore_merges) */
    size_t mapped_cap;
    char *pref; /* prefix-space copies */
    size_t pref_cap;
} scratch;

static _Thread_local scratch *tls;

static void scratch_free(scratch *s) {
    if (!s) return;
    if (s->md) pcre2_match_data_free(s->md);
    if (s->mctx) pcre2_match_context_free(s->mctx);
    if (s->jstack) pcre2_jit_stack_free(s->jstack);
    free(s->slots);
    free(s->arena);
    free(s->sid);
    free(s->sprev);
    free(s->snext);
    free(s->heap);
    free(s->mapped);
    free(s->pref);
    free(s);
}

/* frees a thread's scratch when the thread exits */
static pthread_key_t tls_key;
static void tls_destructor(void *p) {
    if (p == tls) tls = NULL;
    scratch_free(p);
}

static scratch *get_scratch(const dt_tokenizer *t) {
    if (tls && tls->serial == t->serial) return tls;
    scratch_free(tls);
    tls = NULL;
    pthread_setspecific(tls_key, NULL);
    scratch *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->serial = t->serial;
    s->md = pcre2_match_data_create(16, NULL);
    s->mctx = pcre2_match_context_create(NULL);
    s->jstack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
    s->slots = calloc(CACHE_SLOTS, sizeof *s->slots);
    if (!s->md || !s->mctx || !s->slots) {
        scratch_free(s);
        return NULL;
    }
    if (s->jstack) pcre2_jit_stack_assign(s->mctx, NULL, s->jstack);
    tls = s;
    pthread_setspecific(tls_key, s);
    return s;
}

static void cache_clear(scratch *s) {
    memset(s->slots, 0, CACHE_SLOTS * sizeof *s->slots);
    s->n_used = 0;
    s->arena_n = 0;
}

static cache_slot *cache_find(scratch *s, const char *p, size_t n, uint64_t h, bool *found) {
    size_t i = h & (CACHE_SLOTS - 1);
    for (;;) {
        cache_slot *c = &s->slots[i];
        if (c->hash == 0) return *found = false, c;
        if (c->hash == h && c->klen == n && memcmp(s->arena + c->off, p, n) == 0) return *found = true, c;
        i = (i + 1) & (CACHE_SLOTS - 1);
    }
}

static void cache_put(scratch *s, const char *p, size_t n, uint64_t h, const int32_t *ids, int nids) {
    if (s->n_used >= CACHE_SLOTS / 2 || s->arena_n > (16u << 20)) cache_clear(s);
    size_t need = (n + 3) / 4 * 4 + (size_t)nids * 4;
    if (s->arena_n + need > s->arena_cap) {
        size_t cap = s->arena_cap ? s->arena_cap * 2 : (1u << 20);
        while (cap < s->arena_n + need) cap *= 2;
        unsigned char *a = realloc(s->arena, cap);
        if (!a) return; /* the cache is optional */
        s->arena = a;
        s->arena_cap = cap;
    }
    bool found;
    cache_slot *c = cache_find(s, p, n, h, &found);
    if (found) return;
    c->hash = h;
    c->off = (uint32_t)s->arena_n;
    c->klen = (uint16_t)n;
    c->nids = (uint16_t)nids;
    memcpy(s->arena + s->arena_n, p, n);
    memcpy(s->arena + s->arena_n + (n + 3) / 4 * 4, ids, (size_t)nids * 4);
    s->arena_n += need;
    s->n_used++;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return dt_err("out of memory");
    *p = q;
    *cap = c;
    return 0;
}

static int work_reserve(scratch *s, size_t n) {
    if (n <= s->work_cap) return 0;
    size_t c = s->work_cap ? s->work_cap : 256;
    while (c < n) c *= 2;
    int32_t *a = realloc(s->sid, c * 4), *b = a ? realloc(s->sprev, c * 4) : NULL;
    if (a) s->sid = a;
    if (b) s->sprev = b;
    int32_t *d = b ? realloc(s->snext, c * 4) : NULL;
    if (d) s->snext = d;
    struct heap_e *h = d ? realloc(s->heap, c * sizeof *h) : NULL;
    if (!h) return dt_err("out of memory");
    s->heap = h;
    s->work_cap = c;
    return 0;
}

/* ---------- BPE ---------- */

static void heap_push(struct heap_e *h, size_t *n, struct heap_e e) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p].rank < e.rank || (h[p].rank == e.rank && h[p].pos < e.pos)) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static struct heap_e heap_pop(struct heap_e *h, size_t *n) {
    struct heap_e top = h[0], last = h[--*n];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && (h[c + 1].rank < h[c].rank || (h[c + 1].rank == h[c].rank && h[c + 1].pos < h[c].pos)))
            c++;
        if (last.rank < h[c].rank || (last.rank == h[c].rank && last.pos < h[c].pos)) break;
        h[i] = h[c];
        i = c;
    }
    if (m) h[i] = last;
    return top;
}

static void push_pair(const dt_tokenizer *t, scratch *s, size_t *hn, int32_t pos) {
    int32_t nx = s->snext[pos];
    if (nx < 0) return;
    const merge_slot *m = merge_find(t, s->sid[pos], s->sid[nx]);
    if (m) heap_push(s->heap, hn, (struct heap_e){m->rank, pos, s->sid[pos], s->sid[nx]});
}

/* BPE of one piece (raw bytes); appends ids. */
static int bpe_piece(const dt_tokenizer *t, scratch *s, const unsigned char *p, size_t n, dt_ids *out) {
    if (n == 1) {
        int32_t id = t->byte_id[p[0]];
        if (id < 0) id = t->unk_id;
        return id >= 0 ? dt_ids_push(out, id) : 0;
    }
    uint64_t h = 0;
    if (n <= CACHE_MAX_PIECE) {
        h = hash_bytes(p, n) | 1;
        bool found;
        cache_slot *c = cache_find(s, (const char *)p, n, h, &found);
        if (found) {
            const int32_t *ids = (const int32_t *)(s->arena + c->off + (c->klen + 3) / 4 * 4);
            for (int i = 0; i < c->nids; i++)
                if (dt_ids_push(out, ids[i])) return -1;
            return 0;
        }
    }
    int start = out->n;
    if (t->ignore_merges) {
        if (grow((void **)&s->mapped, &s->mapped_cap, 2 * n, 1)) return -1;
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            memcpy(s->mapped + m, byte_utf8[p[i]], byte_utf8_len[p[i]]);
            m += byte_utf8_len[p[i]];
        }
        int32_t id = vocab_find(t, s->mapped, m);
        if (id >= 0) {
            if (dt_ids_push(out, id)) return -1;
            goto done;
        }
    }
    if (work_reserve(s, n)) return -1;
    int32_t *sid = s->sid, *prev = s->sprev, *next = s->snext;
    int32_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[p[i]];
        if (id < 0) id = t->unk_id;
        if (id < 0) continue; /* HF without unk_token drops the character */
        sid[k] = id;
        prev[k] = k - 1;
        next[k] = k + 1;
        k++;
    }
    if (k == 0) goto done;
    next[k - 1] = -1;
    size_t hn = 0;
    for (int32_t i = 0; i + 1 < k; i++) push_pair(t, s, &hn, i);
    while (hn) {
        struct heap_e e = heap_pop(s->heap, &hn);
        int32_t nx = next[e.pos];
        if (sid[e.pos] != e.left || nx < 0 || sid[nx] != e.right) continue; /* stale */
        const merge_slot *m = merge_find(t, e.left, e.right);
        sid[e.pos] = m->new_id;
        sid[nx] = -1; /* removed */
        next[e.pos] = next[nx];
        if (next[nx] >= 0) prev[next[nx]] = e.pos;
        if (prev[e.pos] >= 0) push_pair(t, s, &hn, prev[e.pos]);
        push_pair(t, s, &hn, e.pos);
    }
    for (int32_t i = 0; i >= 0; i = next[i])
        if (dt_ids_push(out, sid[i])) return -1;
done:
    if (n <= CACHE_MAX_PIECE && out->n - start < 65536) cache_put(s, (const char *)p, n, h, out->v + start, out->n - start);
    return 0;
}

/* ---------- pre-tokenization ---------- */

static int pretok(const dt_tokenizer *t, scratch *s, int step, const char *p, size_t n, dt_ids *out);

static int split_regex(const dt_tokenizer *t, scratch *s, int step, const pcre2_code *re, bool removed,
                       const char *p, size_t n, dt_ids *out) {
    size_t pos = 0, last = 0;
    while (pos <= n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)p, n, pos, PCRE2_NO_UTF_CHECK, s->md, s->mctx);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return dt_err("pre-tokenizer regex failed at byte %zu: %s", pos, (char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(s->md);
        size_t a = ov[0], b = ov[1];
        if (a == b) { /* an empty match makes no piece; step over one character */
            if (a >= n) break;
            uint32_t cp;
            pos = a + (size_t)utf8_next((const unsigned char *)p + a, &cp);
            continue;
        }
        if (a > last && pretok(t, s, step + 1, p + last, a - last, out)) return -1;
        if (!removed && pretok(t, s, step + 1, p + a, b - a, out)) return -1;
        last = pos = b;
    }
    if (n > last && pretok(t, s, step + 1, p + last, n - last, out)) return -1;
    return 0;
}

static int pretok(const dt_tokenizer *t, scratch *s, int step, const char *p, size_t n, dt_ids *out) {
    if (n == 0) return 0;
    if (step == t->n_pre) return bpe_piece(t, s, (const unsigned char *)p, n, out);
    const pre_step *ps = &t->pre[step];
    if (ps->type == P_SPLIT) return split_regex(t, s, step, ps->re, ps->removed, p, n, out);
    /* ByteLevel: the byte mapping itself is done by bpe_piece */
    if (ps->add_prefix_space && p[0] != ' ') {
        char *buf = malloc(n + 1);
        if (!buf) return dt_err("out of memory");
        buf[0] = ' ';
        memcpy(buf + 1, p, n);
        int rc = ps->re ? split_regex(t, s, step, ps->re, false, buf, n + 1, out) : pretok(t, s, step + 1, buf, n + 1, out);
        free(buf);
        return rc;
    }
    return ps->re ? split_regex(t, s, step, ps->re, false, p, n, out) : pretok(t, s, step + 1, p, n, out);
}

/* ---------- normalization ---------- */

static bool all_ascii(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] >= 0x80) return false;
    return true;
}

/* Applies the normalizers; *res is p or a malloc'ed string (*owned). */
static int normalize(const dt_tokenizer *t, const char *p, size_t n, char **res, size_t *rn, bool *owned) {
    char *cur = (char *)p;
    size_t cn = n;
    bool own = false;
    for (int i = 0; i < t->n_norm; i++) {
        const norm_step *ns = &t->norm[i];
        char *next = NULL;
        size_t nn = 0;
        switch (ns->type) {
        case N_NFC: case N_NFD: case N_NFKC: case N_NFKD: {
            if (all_ascii(cur, cn)) continue;
            if (ns->type == N_NFC) {
                size_t j = 0;
                while (j < cn) {
                    uint32_t cp;
                    int l = utf8_next((const unsigned char *)cur + j, &cp);
                    if (!is_inert(cp)) break;
                    j += (size_t)l;
                }
                if (j == cn) continue;
            }
            int opt = UTF8PROC_STABLE | (ns->type == N_NFC || ns->type == N_NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
                      (ns->type == N_NFKC || ns->type == N_NFKD ? UTF8PROC_COMPAT : 0);
            utf8proc_uint8_t *o = NULL;
            utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)cur, (utf8proc_ssize_t)cn, &o, (utf8proc_option_t)opt);
            if (r < 0) {
                if (own) free(cur);
                return dt_err("normalizer: %s", utf8proc_errmsg(r));
            }
            next = (char *)o;
            nn = (size_t)r;
            break;
        }
        case N_LOWER: {
            next = malloc(cn * 2 + 4);
            if (!next) break;
            size_t k = 0;
            for (size_t j = 0; j < cn;) {
                uint32_t cp;
                j += (size_t)utf8_next((const unsigned char *)cur + j, &cp);
                if (k + 8 > cn * 2 + 4) {
                    char *q = realloc(next, k * 2 + 16);
                    if (!q) { free(next); next = NULL; break; }
                    next = q;
                }
                if (cp == 0x130) { /* the one unconditional multi-character lowercase (Rust to_lowercase) */
                    memcpy(next + k, "i\xcc\x87", 3);
                    k += 3;
                    continue;
                }
                k += (size_t)utf8proc_encode_char(utf8proc_tolower((utf8proc_int32_t)cp), (utf8proc_uint8_t *)next + k);
            }
            nn = k;
            break;
        }
        case N_PREPEND: {
            if (cn == 0) continue;
            size_t a = strlen(ns->a);
            next = malloc(a + cn + 1);
            if (!next) break;
            memcpy(next, ns->a, a);
            memcpy(next + a, cur, cn);
            nn = a + cn;
            break;
        }
        case N_REPLACE: {
            size_t a = strlen(ns->a), b = strlen(ns->b), cnt = 0;
            if (a == 0) continue;
            for (size_t j = 0; j + a <= cn;) {
                if (memcmp(cur + j, ns->a, a) == 0) cnt++, j += a;
                else j++;
            }
            if (cnt == 0) continue;
            next = malloc(cn + cnt * b + 1);
            if (!next) break;
            size_t k = 0, j = 0;
            while (j < cn) {
                if (j + a <= cn && memcmp(cur + j, ns->a, a) == 0) {
                    memcpy(next + k, ns->b, b);
                    k += b;
                    j += a;
                } else next[k++] = cur[j++];
            }
            nn = k;
            break;
        }
        case N_STRIP: {
            size_t a = 0, e = cn;
            uint32_t cp;
            if (ns->left)
                while (a < e) {
                    int l = utf8_next((const unsigned char *)cur + a, &cp);
                    if (!is_ws(cp)) break;
                    a += (size_t)l;
                }
            if (ns->right)
                while (e > a) {
                    cp = utf8_prev((const unsigned char *)cur, e);
                    if (!is_ws(cp)) break;
                    e -= cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
                }
            next = malloc(e - a + 1);
            if (!next) break;
            memcpy(next, cur + a, e - a);
            nn = e - a;
            break;
        }
        }
        if (!next) {
            if (own) free(cur);
            return dt_err("out of memory");
        }
        if (own) free(cur);
        cur = next;
        cn = nn;
        own = true;
    }
    *res = cur;
    *rn = cn;
    *owned = own;
    return 0;
}

/* ---------- added tokens ---------- */

/* The leftmost(-longest) added token match in p[from..n) among tokens whose normalized flag is
 * want_norm (literal: special tokens excluded). Returns the index into t->added or -1; [*ms, *me) is
 * the span it takes, including stripped whitespace. */
static int find_added(const dt_tokenizer *t, const char *p, size_t n, size_t from, bool want_norm, bool literal,
                      size_t *ms, size_t *me) {
    for (size_t i = from; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        int best = -1;
        for (int k = 0; k < t->first_n[c]; k++) {
            const added_tok *a = &t->added[t->first_idx[c][k]];
            if (a->normalized != want_norm || (literal && a->special)) continue;
            if (a->len > n - i || memcmp(p + i, a->content, a->len) != 0) continue;
            if (a->single_word) {
                uint32_t cp;
                if (i > 0 && is_word_char(utf8_prev((const unsigned char *)p, i))) continue;
                if (i + a->len < n) {
                    utf8_next((const unsigned char *)p + i + a->len, &cp);
                    if (is_word_char(cp)) continue;
                }
            }
            best = t->first_idx[c][k];
            break; /* longest first */
        }
        if (best < 0) continue;
        const added_tok *a = &t->added[best];
        size_t s0 = i, e0 = i + a->len;
        if (a->lstrip)
            while (s0 > from) {
                uint32_t cp = utf8_prev((const unsigned char *)p, s0);
                if (!is_ws(cp)) break;
                s0 -= cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
            }
        if (a->rstrip)
            while (e0 < n) {
                uint32_t cp;
                int l = utf8_next((const unsigned char *)p + e0, &cp);
                if (!is_ws(cp)) break;
                e0 += (size_t)l;
            }
        *ms = s0;
        *me = e0;
        return best;
    }
    return -1;
}

static int encode_normalized(const dt_tokenizer *t, scratch *s, const char *p, size_t n, bool literal, dt_ids *out) {
    if (!t->any_normalized_added) return pretok(t, s, 0, p, n, out);
    size_t pos = 0, ms, me;
    for (;;) {
        int k = find_added(t, p, n, pos, true, literal, &ms, &me);
        size_t gap_end = k < 0 ? n : ms;
        if (gap_end > pos && pretok(t, s, 0, p + pos, gap_end - pos, out)) return -1;
        if (k < 0) return 0;
        if (dt_ids_push(out, t->added[k].id)) return -1;
        pos = me;
    }
}

int tokenizer_encode(const dt_tokenizer *t, const char *text, size_t len, bool literal, dt_ids *out) {
    size_t bad = utf8_invalid_at((const unsigned char *)text, len);
    if (bad < len) return dt_err("invalid UTF-8 at byte offset %zu (byte 0x%02x)", bad, (unsigned char)text[bad]);
    scratch *s = get_scratch(t);
    if (!s) return dt_err("out of memory");
    size_t pos = 0, ms, me;
    for (;;) {
        int k = find_added(t, text, len, pos, false, literal, &ms, &me);
        size_t gap_end = k < 0 ? len : ms;
        if (gap_end > pos) {
            char *nt = NULL;
            size_t nn = 0;
            bool owned = false;
            if (normalize(t, text + pos, gap_end - pos, &nt, &nn, &owned)) return -1;
            int rc = encode_normalized(t, s, nt, nn, literal, out);
            if (owned) free(nt);
            if (rc) return -1;
        }
        if (k < 0) return 0;
        if (dt_ids_push(out, t->added[k].id)) return -1;
        pos = me;
    }
}

/* ---------- decoding ---------- */

int tokenizer_decode(const dt_tokenizer *t, const int32_t *ids, int n, bool skip_special, char **text, size_t *len) {
    size_t cap = 64, k = 0;
    unsigned char *b = malloc(cap);
    if (!b) return dt_err("out of memory");
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_ids || !t->str[id]) continue; /* HF skips unknown ids */
        if (skip_special && t->is_special[id]) continue;
        const unsigned char *s = (const unsigned char *)t->str[id];
        size_t sl = t->slen[id];
        if (k + sl + 8 > cap) {
            while (k + sl + 8 > cap) cap *= 2;
            unsigned char *q = realloc(b, cap);
            if (!q) { free(b); return dt_err("out of memory"); }
            b = q;
        }
        /* ByteLevel decoder: every char back to its byte; a token with a char outside the
         * alphabet contributes its own UTF-8 bytes (as HF does). */
        size_t k0 = k;
        bool ok = true;
        for (size_t j = 0; j < sl;) {
            uint32_t cp;
            j += (size_t)utf8_next(s + j, &cp);
            if (cp >= 0x144 || cp_to_byte[cp] < 0) { ok = false; break; }
            b[k++] = (unsigned char)cp_to_byte[cp];
        }
        if (!ok) {
            memcpy(b + k0, s, sl);
            k = k0 + sl;
        }
    }
    /* UTF-8 with errors="replace": each maximal invalid subpart becomes U+FFFD. */
    unsigned char *o = malloc(k * 3 + 1);
    if (!o) { free(b); return dt_err("out of memory"); }
    size_t m = 0, i = 0;
    while (i < k) {
        unsigned c = b[i];
        if (c < 0x80) { o[m++] = (unsigned char)c; i++; continue; }
        size_t need = 0;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        size_t j = 1;
        if (need) {
            for (; j <= need; j++) {
                if (i + j >= k) break;
                unsigned d = b[i + j];
                if (d < (j == 1 ? lo : 0x80) || d > (j == 1 ? hi : 0xBF)) break;
            }
            if (j == need + 1) {
                memcpy(o + m, b + i, need + 1);
                m += need + 1;
                i += need + 1;
                continue;
            }
        }
        o[m++] = 0xEF, o[m++] = 0xBF, o[m++] = 0xBD;
        i += need ? j : 1;
    }
    o[m] = 0;
    free(b);
    *text = (char *)o;
    if (len) *len = m;
    return 0;
}

/* ---------- lookups ---------- */

int32_t tokenizer_token_id(const dt_tokenizer *t, const char *token) {
    size_t n = strlen(token);
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && memcmp(t->added[i].content, token, n) == 0) return t->added[i].id;
    return vocab_find(t, token, n);
}

const char *tokenizer_token_str(const dt_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids ? t->str[id] : NULL;
}

int tokenizer_n_ids(const dt_tokenizer *t) { return t->n_ids; }

/* ---------- loading ---------- */

void tokenizer_free(dt_tokenizer *t) {
    if (!t) return;
    if (tls && tls->serial == t->serial) {
        scratch_free(tls);
        tls = NULL;
        pthread_setspecific(tls_key, NULL);
    }
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    for (int c = 0; c < 256; c++) free(t->first_idx[c]);
    for (int i = 0; i < t->n_norm; i++) {
        free(t->norm[i].a);
        free(t->norm[i].b);
    }
    free(t->norm);
    for (int i = 0; i < t->n_pre; i++)
        if (t->pre[i].re) pcre2_code_free(t->pre[i].re);
    free(t->pre);
    free(t->str);
    free(t->slen);
    free(t->is_special);
    free(t->arena);
    free(t->vmap);
    free(t->mmap);
    free(t);
}

static const char *GPT2_REGEX =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int compile_regex(pcre2_code **out, const char *pat, bool literal) {
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return dt_err("regex \"%s\" at offset %zu: %s", pat, (size_t)eo, (char *)msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter when JIT is absent */
    *out = re;
    return 0;
}

static bool jbool(json_t *o, const char *k) { return json_is_true(json_object_get(o, k)); }

static int add_norm(dt_tokenizer *t, json_t *n) {
    if (!n || json_is_null(n)) return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type) return dt_err("normalizer without type");
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(n, "normalizers");
        size_t i;
        json_t *v;
        json_array_foreach(arr, i, v) if (add_norm(t, v)) return -1;
        return 0;
    }
    norm_step s = {0};
    if (!strcmp(type, "NFC")) s.type = N_NFC;
    else if (!strcmp(type, "NFD")) s.type = N_NFD;
    else if (!strcmp(type, "NFKC")) s.type = N_NFKC;
    else if (!strcmp(type, "NFKD")) s.type = N_NFKD;
    else if (!strcmp(type, "Lowercase")) s.type = N_LOWER;
    else if (!strcmp(type, "Prepend")) {
        s.type = N_PREPEND;
        const char *p = json_string_value(json_object_get(n, "prepend"));
        if (!p) return dt_err("normalizer Prepend without \"prepend\"");
        s.a = strdup(p);
    } else if (!strcmp(type, "Replace")) {
        s.type = N_REPLACE;
        const char *p = json_string_value(json_object_get(json_object_get(n, "pattern"), "String"));
        const char *c = json_string_value(json_object_get(n, "content"));
        if (!p || !c) return dt_err("normalizer Replace: only a String pattern is supported");
        s.a = strdup(p);
        s.b = strdup(c);
    } else if (!strcmp(type, "Strip")) {
        s.type = N_STRIP;
        s.left = jbool(n, "strip_left");
        s.right = jbool(n, "strip_right");
    } else
        return dt_err("unsupported normalizer type \"%s\"", type);
    norm_step *q = realloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *q);
    if (!q) return dt_err("out of memory");
    t->norm = q;
    t->norm[t->n_norm++] = s;
    return 0;
}

static int add_pre(dt_tokenizer *t, json_t *n) {
    if (!n || json_is_null(n)) return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type) return dt_err("pre_tokenizer without type");
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(n, "pretokenizers");
        size_t i;
        json_t *v;
        json_array_foreach(arr, i, v) if (add_pre(t, v)) return -1;
        return 0;
    }
    pre_step s = {0};
    if (!strcmp(type, "Split")) {
        s.type = P_SPLIT;
        json_t *pat = json_object_get(n, "pattern");
        const char *rx = json_string_value(json_object_get(pat, "Regex"));
        const char *str = json_string_value(json_object_get(pat, "String"));
        const char *beh = json_string_value(json_object_get(n, "behavior"));
        if (!rx && !str) return dt_err("pre_tokenizer Split without a Regex or String pattern");
        if (jbool(n, "invert")) return dt_err("pre_tokenizer Split with invert true is not supported");
        if (!beh || (strcmp(beh, "Isolated") && strcmp(beh, "Removed")))
            return dt_err("pre_tokenizer Split behavior \"%s\" is not supported (Isolated, Removed are)", beh ? beh : "?");
        s.removed = !strcmp(beh, "Removed");
        if (compile_regex(&s.re, rx ? rx : str, !rx)) return dt_err_wrap("pre_tokenizer Split");
    } else if (!strcmp(type, "ByteLevel")) {
        s.type = P_BYTELEVEL;
        s.add_prefix_space = jbool(n, "add_prefix_space");
        json_t *ur = json_object_get(n, "use_regex");
        if ((!ur || json_is_true(ur)) && compile_regex(&s.re, GPT2_REGEX, false)) return -1;
    } else
        return dt_err("unsupported pre_tokenizer type \"%s\"", type);
    pre_step *q = realloc(t->pre, (size_t)(t->n_pre + 1) * sizeof *q);
    if (!q) {
        if (s.re) pcre2_code_free(s.re);
        return dt_err("out of memory");
    }
    t->pre = q;
    t->pre[t->n_pre++] = s;
    return 0;
}

static int add_added(dt_tokenizer *t, json_t *o, int32_t id) {
    const char *c = json_string_value(json_object_get(o, "content"));
    if (!c || !c[0]) return dt_err("added token %d without content", id);
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].id == id) return 0;
    added_tok *q = realloc(t->added, (size_t)(t->n_added + 1) * sizeof *q);
    if (!q) return dt_err("out of memory");
    t->added = q;
    added_tok a = {.content = strdup(c), .len = strlen(c), .id = id, .special = jbool(o, "special"),
                   .lstrip = jbool(o, "lstrip"), .rstrip = jbool(o, "rstrip"), .single_word = jbool(o, "single_word")};
    json_t *nz = json_object_get(o, "normalized");
    a.normalized = nz ? json_is_true(nz) : !a.special;
    if (!a.content) return dt_err("out of memory");
    t->added[t->n_added++] = a;
    return 0;
}

static int load_json(json_t **out, const char *path) {
    json_error_t e;
    *out = json_load_file(path, 0, &e);
    if (!*out) {
        FILE *f = fopen(path, "rb");
        if (!f) return dt_err("%s: cannot open", path);
        fclose(f);
        return dt_err("%s: line %d: %s", path, e.line, e.text);
    }
    return 0;
}

static int load_model(dt_tokenizer *t, json_t *root) {
    json_t *model = json_object_get(root, "model");
    const char *mtype = json_string_value(json_object_get(model, "type"));
    if (!model || !json_is_object(model)) return dt_err("no \"model\"");
    if (mtype && strcmp(mtype, "BPE")) return dt_err("model type \"%s\" is not supported (BPE is)", mtype);
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab)) return dt_err("model.vocab is not an object");
    if (!json_is_array(merges)) return dt_err("model.merges is not an array");
    const char *cs = json_string_value(json_object_get(model, "continuing_subword_prefix"));
    const char *ew = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if ((cs && cs[0]) || (ew && ew[0])) return dt_err("BPE with a subword prefix/suffix is not supported");
    json_t *dr = json_object_get(model, "dropout");
    if (json_is_number(dr) && json_number_value(dr) > 0) return dt_err("BPE dropout is not supported");
    if (jbool(model, "byte_fallback")) return dt_err("BPE byte_fallback is not supported");
    t->ignore_merges = jbool(model, "ignore_merges");

    /* ids */
    int32_t max_id = -1;
    size_t total = 0;
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 0x7FFFFFF)
            return dt_err("model.vocab[\"%s\"] is not a valid id", key);
        if (json_integer_value(v) > max_id) max_id = (int32_t)json_integer_value(v);
        total += strlen(key) + 1;
    }
    json_t *added = json_object_get(root, "added_tokens");
    size_t i;
    json_array_foreach(added, i, v) {
        json_int_t id = json_integer_value(json_object_get(v, "id"));
        if (id < 0 || id > 0x7FFFFFF) return dt_err("added_tokens[%zu]: bad id", i);
        if (id > max_id) max_id = (int32_t)id;
    }
    t->n_ids = max_id + 1;
    t->str = calloc((size_t)t->n_ids + 1, sizeof *t->str);
    t->slen = calloc((size_t)t->n_ids + 1, sizeof *t->slen);
    t->is_special = calloc((size_t)t->n_ids + 1, 1);
    t->arena = malloc(total + 1);
    size_t nv = json_object_size(vocab);
    t->vmap_mask = pow2_at_least(nv * 2 + 16) - 1;
    t->vmap = malloc((t->vmap_mask + 1) * sizeof *t->vmap);
    if (!t->str || !t->slen || !t->is_special || !t->arena || !t->vmap) return dt_err("out of memory");
    memset(t->vmap, 0xFF, (t->vmap_mask + 1) * sizeof *t->vmap);
    size_t off = 0;
    json_object_foreach(vocab, key, v) {
        int32_t id = (int32_t)json_integer_value(v);
        size_t n = strlen(key);
        if (t->str[id]) return dt_err("model.vocab: id %d appears twice", id);
        memcpy(t->arena + off, key, n + 1);
        t->str[id] = t->arena + off;
        t->slen[id] = (uint32_t)n;
        off += n + 1;
        size_t h = hash_bytes(key, n) & t->vmap_mask;
        while (t->vmap[h] >= 0) h = (h + 1) & t->vmap_mask;
        t->vmap[h] = id;
    }
    for (int b = 0; b < 256; b++) t->byte_id[b] = vocab_find(t, byte_utf8[b], byte_utf8_len[b]);
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    t->unk_id = unk ? vocab_find(t, unk, strlen(unk)) : -1;

    /* merges */
    size_t nm = json_array_size(merges);
    t->mmap_mask = pow2_at_least(nm * 2 + 16) - 1;
    t->mmap = calloc(t->mmap_mask + 1, sizeof *t->mmap);
    if (!t->mmap) return dt_err("out of memory");
    char buf[1024];
    json_array_foreach(merges, i, v) {
        const char *a, *b;
        size_t la, lb;
        if (json_is_string(v)) {
            const char *s = json_string_value(v), *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) return dt_err("model.merges[%zu] \"%s\" is not \"a b\"", i, s);
            a = s, la = (size_t)(sp - s), b = sp + 1, lb = strlen(b);
        } else if (json_is_array(v) && json_array_size(v) == 2 && json_is_string(json_array_get(v, 0)) &&
                   json_is_string(json_array_get(v, 1))) {
            a = json_string_value(json_array_get(v, 0)), la = strlen(a);
            b = json_string_value(json_array_get(v, 1)), lb = strlen(b);
        } else
            return dt_err("model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", i);
        if (la + lb >= sizeof buf) return dt_err("model.merges[%zu] is too long", i);
        int32_t ia = vocab_find(t, a, la), ib = vocab_find(t, b, lb);
        memcpy(buf, a, la);
        memcpy(buf + la, b, lb);
        int32_t im = vocab_find(t, buf, la + lb);
        if (ia < 0 || ib < 0 || im < 0)
            return dt_err("model.merges[%zu] (\"%.*s\", \"%.*s\"): token not in vocab", i, (int)la, a, (int)lb, b);
        uint64_t k = (((uint64_t)(uint32_t)ia << 32) | (uint32_t)ib) + 1;
        size_t h = hash_u64(k) & t->mmap_mask;
        while (t->mmap[h].key && t->mmap[h].key != k) h = (h + 1) & t->mmap_mask;
        if (t->mmap[h].key) continue; /* a repeated merge keeps its first rank */
        t->mmap[h] = (merge_slot){k, (int32_t)i, im};
    }

    /* added tokens */
    json_array_foreach(added, i, v) {
        if (add_added(t, v, (int32_t)json_integer_value(json_object_get(v, "id"))))
            return dt_err_wrap("added_tokens[%zu]", i);
    }
    return 0;
}

static int finish_added(dt_tokenizer *t) {
    /* strings of added ids; by first byte, longest first */
    for (int i = 0; i < t->n_added; i++) {
        added_tok *a = &t->added[i];
        if (a->id >= t->n_ids) continue; /* grown below */
        t->str[a->id] = a->content;
        t->slen[a->id] = (uint32_t)a->len;
        t->is_special[a->id] = a->special;
    }
    for (int i = 0; i < t->n_added; i++) {
        unsigned char c = (unsigned char)t->added[i].content[0];
        t->any_normalized_added |= t->added[i].normalized;
        int *q = realloc(t->first_idx[c], (size_t)(t->first_n[c] + 1) * sizeof *q);
        if (!q) return dt_err("out of memory");
        t->first_idx[c] = q;
        int k = t->first_n[c]++;
        while (k > 0 && t->added[q[k - 1]].len < t->added[i].len) {
            q[k] = q[k - 1];
            k--;
        }
        q[k] = i;
    }
    return 0;
}

static int load_config_added(dt_tokenizer *t, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    json_t *root;
    if (load_json(&root, path)) return -1;
    json_t *dec = json_object_get(root, "added_tokens_decoder");
    const char *key;
    json_t *v;
    int rc = 0;
    json_object_foreach(dec, key, v) {
        char *end;
        long id = strtol(key, &end, 10);
        if (*end || id < 0 || id > 0x7FFFFFF) {
            rc = dt_err("%s: added_tokens_decoder key \"%s\" is not an id", path, key);
            break;
        }
        if (id < t->n_ids && t->str[id]) continue; /* tokenizer.json has it */
        if ((rc = add_added(t, v, (int32_t)id))) {
            dt_err_wrap("%s: added_tokens_decoder[\"%s\"]", path, key);
            break;
        }
        if (id >= t->n_ids) {
            int n = (int)id + 1;
            char **s = realloc(t->str, (size_t)n * sizeof *s);
            if (s) t->str = s;
            uint32_t *l = s ? realloc(t->slen, (size_t)n * sizeof *l) : NULL;
            if (l) t->slen = l;
            uint8_t *sp = l ? realloc(t->is_special, (size_t)n) : NULL;
            if (!sp) {
                rc = dt_err("out of memory");
                break;
            }
            t->is_special = sp;
            for (int j = t->n_ids; j < n; j++) t->str[j] = NULL, t->slen[j] = 0, t->is_special[j] = 0;
            t->n_ids = n;
        }
        added_tok *a = &t->added[t->n_added - 1];
        t->str[id] = a->content;
        t->slen[id] = (uint32_t)a->len;
        t->is_special[id] = a->special;
    }
    json_decref(root);
    return rc;
}

static void init_tables(void) {
    pthread_key_create(&tls_key, tls_destructor);
    init_byte_map();
    init_nfc_inert();
}

int tokenizer_load(dt_tokenizer **out, const char *dir) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_tables);
    *out = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    json_t *root;
    if (load_json(&root, path)) return -1;
    dt_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        json_decref(root);
        return dt_err("out of memory");
    }
    t->serial = atomic_fetch_add(&serial_counter, 1);
    int rc = load_model(t, root);
    if (!rc) rc = add_norm(t, json_object_get(root, "normalizer"));
    if (!rc) rc = add_pre(t, json_object_get(root, "pre_tokenizer"));
    if (!rc) {
        bool has_bl = false;
        for (int i = 0; i < t->n_pre; i++) has_bl |= t->pre[i].type == P_BYTELEVEL;
        if (!has_bl) rc = dt_err("pre_tokenizer has no ByteLevel step (only byte-level BPE is supported)");
    }
    if (!rc) {
        json_t *d = json_object_get(root, "decoder");
        const char *dt = json_string_value(json_object_get(d, "type"));
        if (d && !json_is_null(d) && (!dt || strcmp(dt, "ByteLevel")))
            rc = dt_err("unsupported decoder type \"%s\" (ByteLevel is)", dt ? dt : "?");
    }
    json_decref(root);
    if (rc) {
        dt_err_wrap("%s", path);
        tokenizer_free(t);
        return -1;
    }
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    if (finish_added(t) || load_config_added(t, path)) {
        tokenizer_free(t);
        return -1;
    }
    /* rebuild the first-byte index with the config's tokens */
    for (int c = 0; c < 256; c++) {
        free(t->first_idx[c]);
        t->first_idx[c] = NULL;
        t->first_n[c] = 0;
    }
    if (finish_added(t)) {
        tokenizer_free(t);
        return -1;
    }
    *out = t;
    return 0;
}
