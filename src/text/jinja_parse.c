/* Jinja lexer and parser: source -> AST (jinja_int.h). Whitespace handling is that of
 * transformers / @huggingface/jinja: trim_blocks, lstrip_blocks, one trailing newline dropped,
 * '-' modifiers strip all whitespace on their side. Errors longjmp to jinja_parse. */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"
#include "text/jinja_int.h"

/* ---- arena ---- */
void *ja_alloc(jarena *a, size_t n) {
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    if (n == 0) n = sizeof(max_align_t);
    jarena_chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        c = malloc(sizeof *c + cap);
        if (!c) {
            dt_err("out of memory");
            longjmp(*a->oom, 1);
        }
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    memset(p, 0, n);
    return p;
}

char *ja_strdup(jarena *a, const char *s, size_t n) {
    char *p = ja_alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

void ja_free(jarena *a) {
    jarena_chunk *c = a->head;
    while (c) {
        jarena_chunk *nx = c->next;
        free(c);
        c = nx;
    }
    a->head = NULL;
}

/* ---- tokens ---- */
enum { T_TEXT, T_VBEGIN, T_BBEGIN, T_VEND, T_BEND, T_NAME, T_STR, T_INT, T_FLOAT, T_OP, T_EOF };
typedef struct {
    int t, line;
    const char *p; size_t n; /* text, name, op, decoded string */
    long long i;
    double f;
} tok;

typedef struct {
    jarena *A;
    const char *name;
    jmp_buf jb;
    tok *toks; size_t nt, cap, pos;
    char *norm; /* the source with newlines normalised */
    int depth;  /* recursive-descent nesting, bounded by nest_in */
} P;

static _Noreturn void perr(P *p, int line, const char *fmt, ...) DT_PRINTF(3, 4);
static _Noreturn void perr(P *p, int line, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    dt_err("%s:%d: %s", p->name, line, msg);
    longjmp(p->jb, 1);
}

/* The parser recurses on the C stack, so a template nested deeper than this (jinja2 gives up far
 * earlier, at Python's recursion limit) is an error rather than a stack overflow; nest_out undoes
 * it (perr needs no undo: the parse is over). */
enum { MAX_PARSE_NEST = 256 };
static void nest_in(P *p, int line) {
    if (++p->depth > MAX_PARSE_NEST) perr(p, line, "expressions or blocks nested more than %d deep", MAX_PARSE_NEST);
}
static void nest_out(P *p) { p->depth--; }

static tok *push(P *p, int t, int line) {
    if (p->nt == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        tok *nt = realloc(p->toks, cap * sizeof *nt);
        if (!nt) {
            dt_err("out of memory");
            longjmp(p->jb, 1);
        }
        p->toks = nt;
        p->cap = cap;
    }
    tok *k = &p->toks[p->nt++];
    memset(k, 0, sizeof *k);
    k->t = t;
    k->line = line;
    return k;
}

static int count_lines(const char *s, size_t a, size_t b) {
    int n = 0;
    for (size_t i = a; i < b; i++) n += s[i] == '\n';
    return n;
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* Emits text src[a, b) after whitespace control. */
static void emit_text(P *p, const char *src, size_t a, size_t b, int line, int lstrip_all, int rstrip_all,
                      int lstrip_block) {
    if (lstrip_all)
        while (a < b && is_ws(src[a])) a++;
    if (rstrip_all) {
        while (b > a && is_ws(src[b - 1])) b--;
    } else if (lstrip_block) {
        /* lstrip_blocks: drop spaces/tabs before the tag if only they separate it from a line start */
        size_t e = b;
        while (e > a && (src[e - 1] == ' ' || src[e - 1] == '\t')) e--;
        /* the character before the run, in the original source */
        size_t q = e;
        while (q > 0 && (src[q - 1] == ' ' || src[q - 1] == '\t')) q--;
        if (q == 0 || src[q - 1] == '\n' || src[q - 1] == '\r') b = e;
    }
    if (b > a) {
        tok *k = push(p, T_TEXT, line);
        k->p = src + a;
        k->n = b - a;
    }
}

static const char *OPS2[] = {"//", "**", "==", "!=", "<=", ">=", NULL};
static const char OPS1[] = "+-*/%~<>=()[]{},.:|";

static void lex_string(P *p, const char *src, size_t len, size_t *ip, int *line) {
    size_t i = *ip;
    char q = src[i++];
    size_t cap = 16, n = 0;
    char *buf = malloc(cap);
    int start = *line;
    for (;;) {
        if (i >= len) {
            free(buf);
            perr(p, start, "unterminated string literal");
        }
        char c = src[i++];
        if (c == q) break;
        if (c == '\n') (*line)++;
        if (c == '\\' && i < len) {
            char e = src[i++];
            switch (e) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case '\\': c = '\\'; break;
            case '\'': c = '\''; break;
            case '"': c = '"'; break;
            case '0': c = 0; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'v': c = '\v'; break;
            case 'a': c = '\a'; break;
            case '\n': (*line)++; continue;
            case 'x': case 'u': case 'U': {
                int nd = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                unsigned long cp = 0;
                int k = 0;
                for (; k < nd && i < len && isxdigit((unsigned char)src[i]); k++, i++)
                    cp = cp * 16 + (unsigned long)(isdigit((unsigned char)src[i]) ? src[i] - '0' : (tolower((unsigned char)src[i]) - 'a' + 10));
                if (k != nd || cp > 0x10FFFF) {
                    free(buf);
                    perr(p, *line, "bad \\%c escape in string literal", e);
                }
                unsigned char u8[4];
                int m = 0;
                if (cp < 0x80) u8[m++] = (unsigned char)cp;
                else if (cp < 0x800) { u8[m++] = (unsigned char)(0xC0 | (cp >> 6)); u8[m++] = (unsigned char)(0x80 | (cp & 0x3F)); }
                else if (cp < 0x10000) { u8[m++] = (unsigned char)(0xE0 | (cp >> 12)); u8[m++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F)); u8[m++] = (unsigned char)(0x80 | (cp & 0x3F)); }
                else { u8[m++] = (unsigned char)(0xF0 | (cp >> 18)); u8[m++] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F)); u8[m++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F)); u8[m++] = (unsigned char)(0x80 | (cp & 0x3F)); }
                if (n + 5 >= cap) buf = realloc(buf, cap *= 2);
                memcpy(buf + n, u8, (size_t)m);
                n += (size_t)m;
                continue;
            }
            default: /* Python keeps unknown escapes as written */
                if (n + 2 >= cap) buf = realloc(buf, cap *= 2);
                buf[n++] = '\\';
                c = e;
            }
        }
        if (n + 2 >= cap) buf = realloc(buf, cap *= 2);
        buf[n++] = c;
    }
    tok *k = push(p, T_STR, start);
    k->p = ja_strdup(p->A, buf, n);
    k->n = n;
    free(buf);
    *ip = i;
}

/* Lexes one tag body starting at i, up to and including its end marker. Returns the index after it. */
static size_t lex_tag(P *p, const char *src, size_t len, size_t i, int *line, int is_block, int *strip_after) {
    const char *endc = is_block ? "%}" : "}}";
    int depth = 0; /* open brackets: "}}" inside a dict literal closes the dict, as in jinja2 */
    for (;;) {
        while (i < len && is_ws(src[i])) {
            if (src[i] == '\n') (*line)++;
            i++;
        }
        if (i >= len) perr(p, *line, "unterminated %s", is_block ? "block tag '{%'" : "expression '{{'");
        if (depth == 0 && src[i] == '-' && i + 2 < len && src[i + 1] == endc[0] && src[i + 2] == endc[1]) {
            *strip_after = 1;
            push(p, is_block ? T_BEND : T_VEND, *line);
            return i + 3;
        }
        if (depth == 0 && i + 1 < len && src[i] == endc[0] && src[i + 1] == endc[1]) {
            *strip_after = 0;
            push(p, is_block ? T_BEND : T_VEND, *line);
            return i + 2;
        }
        char c = src[i];
        if (c == '\'' || c == '"') {
            lex_string(p, src, len, &i, line);
            continue;
        }
        if (isdigit((unsigned char)c)) {
            size_t j = i;
            int isf = 0;
            while (j < len && (isdigit((unsigned char)src[j]) || src[j] == '_')) j++;
            if (j + 1 < len && src[j] == '.' && isdigit((unsigned char)src[j + 1])) {
                isf = 1;
                j++;
                while (j < len && isdigit((unsigned char)src[j])) j++;
            }
            if (j < len && (src[j] == 'e' || src[j] == 'E')) {
                size_t k2 = j + 1;
                if (k2 < len && (src[k2] == '+' || src[k2] == '-')) k2++;
                if (k2 < len && isdigit((unsigned char)src[k2])) {
                    isf = 1;
                    j = k2;
                    while (j < len && isdigit((unsigned char)src[j])) j++;
                }
            }
            char tmp[64];
            size_t m = 0;
            for (size_t q = i; q < j && m < sizeof tmp - 1; q++)
                if (src[q] != '_') tmp[m++] = src[q];
            tmp[m] = 0;
            tok *k = push(p, isf ? T_FLOAT : T_INT, *line);
            if (isf) k->f = strtod(tmp, NULL);
            else k->i = strtoll(tmp, NULL, 10);
            i = j;
            continue;
        }
        if (isalpha((unsigned char)c) || c == '_') {
            size_t j = i;
            while (j < len && (isalnum((unsigned char)src[j]) || src[j] == '_')) j++;
            tok *k = push(p, T_NAME, *line);
            k->p = src + i;
            k->n = j - i;
            i = j;
            continue;
        }
        int found = 0;
        for (int o = 0; OPS2[o]; o++)
            if (i + 1 < len && src[i] == OPS2[o][0] && src[i + 1] == OPS2[o][1]) {
                tok *k = push(p, T_OP, *line);
                k->p = OPS2[o];
                k->n = 2;
                i += 2;
                found = 1;
                break;
            }
        if (found) continue;
        const char *f = strchr(OPS1, c);
        if (c && f) {
            if (c == '(' || c == '[' || c == '{') depth++;
            if ((c == ')' || c == ']' || c == '}') && depth > 0) depth--;
            tok *k = push(p, T_OP, *line);
            k->p = f;
            k->n = 1;
            i++;
            continue;
        }
        perr(p, *line, "unexpected character '%c'", c);
    }
}

static void lex(P *p, const char *src, size_t len) {
    if (len > 0 && src[len - 1] == '\n') len--; /* keep_trailing_newline=False */
    size_t i = 0, text_start = 0;
    int line = 1, text_line = 1, strip_next = 0;
    while (i < len) {
        if (src[i] != '{' || i + 1 >= len || (src[i + 1] != '{' && src[i + 1] != '%' && src[i + 1] != '#')) {
            if (src[i] == '\n') line++;
            i++;
            continue;
        }
        char kind = src[i + 1];
        int minus = i + 2 < len && src[i + 2] == '-';
        int plus = i + 2 < len && src[i + 2] == '+';
        emit_text(p, src, text_start, i, text_line, strip_next, minus, kind != '{' && !plus);
        strip_next = 0;
        size_t j = i + 2 + (minus || plus);
        if (kind == '#') {
            const char *e = NULL;
            for (size_t q = j; q + 1 < len; q++)
                if (src[q] == '#' && src[q + 1] == '}') {
                    e = src + q;
                    break;
                }
            if (!e) perr(p, line, "unterminated comment");
            size_t q = (size_t)(e - src);
            line += count_lines(src, i, q + 2);
            strip_next = q > j && src[q - 1] == '-';
            i = q + 2;
            if (i < len && src[i] == '\n') { /* trim_blocks */
                i++;
                line++;
            }
        } else {
            /* {% raw %} is not supported; detect it to fail clearly */
            push(p, kind == '%' ? T_BBEGIN : T_VBEGIN, line);
            i = lex_tag(p, src, len, j, &line, kind == '%', &strip_next);
            if (kind == '%' && i < len && src[i] == '\n') {
                i++;
                line++;
            }
        }
        text_start = i;
        text_line = line;
    }
    emit_text(p, src, text_start, len, text_line, strip_next, 0, 0);
    push(p, T_EOF, line);
}

/* ---- parser ---- */
static tok *cur(P *p) { return &p->toks[p->pos]; }
static tok *next(P *p) { return &p->toks[p->pos++]; }
static int is_op(tok *k, const char *op) { return k->t == T_OP && k->n == strlen(op) && !memcmp(k->p, op, k->n); }
static int is_name(tok *k, const char *nm) { return k->t == T_NAME && k->n == strlen(nm) && !memcmp(k->p, nm, k->n); }
static const char *tokdesc(tok *k, char *buf, size_t n) {
    switch (k->t) {
    case T_EOF: return "end of template";
    case T_VEND: return "'}}'";
    case T_BEND: return "'%}'";
    case T_TEXT: return "text";
    case T_STR: return "string";
    case T_INT: case T_FLOAT: return "number";
    default: snprintf(buf, n, "'%.*s'", (int)(k->n > 40 ? 40 : k->n), k->p); return buf;
    }
}
static void expect_op(P *p, const char *op) {
    tok *k = cur(p);
    char b[64];
    if (!is_op(k, op)) perr(p, k->line, "expected '%s', got %s", op, tokdesc(k, b, sizeof b));
    p->pos++;
}
static const char *expect_name(P *p) {
    tok *k = cur(p);
    char b[64];
    if (k->t != T_NAME) perr(p, k->line, "expected a name, got %s", tokdesc(k, b, sizeof b));
    p->pos++;
    return ja_strdup(p->A, k->p, k->n);
}
static void expect_bend(P *p) {
    tok *k = cur(p);
    char b[64];
    if (k->t != T_BEND) perr(p, k->line, "expected '%%}', got %s", tokdesc(k, b, sizeof b));
    p->pos++;
}

static jnode *mk(P *p, int kind, int line) {
    jnode *n = ja_alloc(p->A, sizeof *n);
    n->kind = kind;
    n->line = line;
    return n;
}

typedef struct { jnode **v; int n, cap; } nvec;
static void nv_push(P *p, nvec *v, jnode *x) {
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 8;
        jnode **nv = ja_alloc(p->A, (size_t)cap * sizeof *nv);
        if (v->n) memcpy(nv, v->v, (size_t)v->n * sizeof *nv);
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}
typedef struct { const char **v; int n, cap; } svec;
static void sv_push(P *p, svec *v, const char *x) {
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 8;
        const char **nv = ja_alloc(p->A, (size_t)cap * sizeof *nv);
        if (v->n) memcpy(nv, v->v, (size_t)v->n * sizeof *nv);
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

static jnode *p_expr(P *p);
static jnode *p_or(P *p);
static jnode *p_unary(P *p, int with_filter);

/* (args) after a call, filter or test: positional and keyword arguments */
static void p_args(P *p, jnode *n) {
    nvec a = {0}, kv = {0};
    svec kn = {0};
    expect_op(p, "(");
    while (!is_op(cur(p), ")")) {
        if (a.n + kv.n) expect_op(p, ",");
        if (is_op(cur(p), ")")) break;
        if (is_op(cur(p), "*") || is_op(cur(p), "**")) perr(p, cur(p)->line, "unsupported: *args / **kwargs in calls");
        if (cur(p)->t == T_NAME && is_op(&p->toks[p->pos + 1], "=")) {
            sv_push(p, &kn, expect_name(p));
            p->pos++;
            nv_push(p, &kv, p_expr(p));
        } else {
            if (kv.n) perr(p, cur(p)->line, "positional argument after keyword argument");
            nv_push(p, &a, p_expr(p));
        }
    }
    p->pos++;
    n->list = a.v;
    n->n = a.n;
    n->list2 = kv.v;
    n->n2 = kv.n;
    n->names = kn.v;
    n->nn = kn.n;
}

static jnode *p_primary(P *p) {
    tok *k = next(p);
    jnode *n;
    char b[64];
    switch (k->t) {
    case T_NAME:
        n = mk(p, E_LIT, k->line);
        if (is_name(k, "true") || is_name(k, "True")) { n->lit.t = V_BOOL; n->lit.u.b = 1; return n; }
        if (is_name(k, "false") || is_name(k, "False")) { n->lit.t = V_BOOL; n->lit.u.b = 0; return n; }
        if (is_name(k, "none") || is_name(k, "None")) { n->lit.t = V_NONE; return n; }
        n->kind = E_NAME;
        n->s = ja_strdup(p->A, k->p, k->n);
        n->slen = k->n;
        return n;
    case T_STR: {
        /* adjacent literals concatenate */
        size_t tot = k->n, st = p->pos;
        while (cur(p)->t == T_STR) tot += next(p)->n;
        char *s = ja_alloc(p->A, tot + 1);
        size_t o = 0;
        for (size_t q = st - 1; q < p->pos; q++) {
            memcpy(s + o, p->toks[q].p, p->toks[q].n);
            o += p->toks[q].n;
        }
        n = mk(p, E_LIT, k->line);
        n->lit.t = V_STR;
        n->lit.u.s.p = s;
        n->lit.u.s.n = tot;
        return n;
    }
    case T_INT:
        n = mk(p, E_LIT, k->line);
        n->lit.t = V_INT;
        n->lit.u.i = k->i;
        return n;
    case T_FLOAT:
        n = mk(p, E_LIT, k->line);
        n->lit.t = V_FLOAT;
        n->lit.u.f = k->f;
        return n;
    case T_OP:
        if (is_op(k, "(")) {
            if (is_op(cur(p), ")")) {
                p->pos++;
                return mk(p, E_LIST, k->line); /* empty tuple */
            }
            jnode *e = p_expr(p);
            if (is_op(cur(p), ",")) {
                nvec items = {0};
                nv_push(p, &items, e);
                while (is_op(cur(p), ",")) {
                    p->pos++;
                    if (is_op(cur(p), ")")) break;
                    nv_push(p, &items, p_expr(p));
                }
                e = mk(p, E_LIST, k->line);
                e->list = items.v;
                e->n = items.n;
            }
            expect_op(p, ")");
            return e;
        }
        if (is_op(k, "[")) {
            nvec items = {0};
            while (!is_op(cur(p), "]")) {
                if (items.n) expect_op(p, ",");
                if (is_op(cur(p), "]")) break;
                nv_push(p, &items, p_expr(p));
            }
            p->pos++;
            n = mk(p, E_LIST, k->line);
            n->list = items.v;
            n->n = items.n;
            return n;
        }
        if (is_op(k, "{")) {
            nvec ks = {0}, vs = {0};
            while (!is_op(cur(p), "}")) {
                if (ks.n) expect_op(p, ",");
                if (is_op(cur(p), "}")) break;
                nv_push(p, &ks, p_expr(p));
                expect_op(p, ":");
                nv_push(p, &vs, p_expr(p));
            }
            p->pos++;
            n = mk(p, E_DICT, k->line);
            n->list = ks.v;
            n->n = ks.n;
            n->list2 = vs.v;
            n->n2 = vs.n;
            return n;
        }
        /* fallthrough */
    default: perr(p, k->line, "unexpected %s in expression", tokdesc(k, b, sizeof b));
    }
    return NULL;
}

static jnode *p_postfix(P *p, jnode *n) {
    for (;;) {
        tok *k = cur(p);
        if (is_op(k, ".")) {
            p->pos++;
            tok *a = next(p);
            jnode *m;
            if (a->t == T_INT) { /* x.0 is x[0] */
                m = mk(p, E_ITEM, a->line);
                m->b = mk(p, E_LIT, a->line);
                m->b->lit.t = V_INT;
                m->b->lit.u.i = a->i;
            } else if (a->t == T_NAME) {
                m = mk(p, E_ATTR, a->line);
                m->s = ja_strdup(p->A, a->p, a->n);
                m->slen = a->n;
            } else {
                char b[64];
                perr(p, a->line, "expected an attribute name after '.', got %s", tokdesc(a, b, sizeof b));
            }
            m->a = n;
            n = m;
        } else if (is_op(k, "[")) {
            p->pos++;
            jnode *parts[3] = {NULL, NULL, NULL};
            int nparts = 0, is_slice = 0;
            for (;;) {
                if (is_op(cur(p), ":")) {
                    is_slice = 1;
                    p->pos++;
                    if (++nparts > 2) perr(p, k->line, "too many ':' in slice");
                    continue;
                }
                if (is_op(cur(p), "]")) break;
                if (parts[nparts]) perr(p, cur(p)->line, "expected ']' or ':' in subscript");
                parts[nparts] = p_expr(p);
            }
            p->pos++;
            jnode *m;
            if (is_slice) {
                m = mk(p, E_SLICE, k->line);
                m->list = ja_alloc(p->A, 3 * sizeof(jnode *));
                for (int q = 0; q < 3; q++) m->list[q] = parts[q];
                m->n = 3;
            } else {
                if (!parts[0]) perr(p, k->line, "empty subscript");
                m = mk(p, E_ITEM, k->line);
                m->b = parts[0];
            }
            m->a = n;
            n = m;
        } else if (is_op(k, "(")) {
            jnode *m = mk(p, E_CALL, k->line);
            p_args(p, m);
            m->a = n;
            n = m;
        } else {
            return n;
        }
    }
}

static jnode *p_filters(P *p, jnode *n) {
    for (;;) {
        tok *k = cur(p);
        if (is_op(k, "|")) {
            p->pos++;
            int line = cur(p)->line;
            const char *name = expect_name(p);
            jnode *m = mk(p, E_FILTER, line);
            m->s = name;
            m->id = jinja_filter_id(name);
            if (m->id < 0) perr(p, line, "unknown filter '%s'", name);
            if (is_op(cur(p), "(")) p_args(p, m);
            m->a = n;
            n = m;
        } else if (is_name(k, "is")) {
            p->pos++;
            jnode *m = mk(p, E_TEST, k->line);
            if (is_name(cur(p), "not")) {
                m->neg = 1;
                p->pos++;
            }
            const char *name;
            if (is_name(cur(p), "none") || is_name(cur(p), "true") || is_name(cur(p), "false") ||
                cur(p)->t == T_NAME) {
                name = expect_name(p);
            } else if (is_op(cur(p), "==")) { p->pos++; name = "eq"; }
            else {
                char b[64];
                perr(p, cur(p)->line, "expected a test name after 'is', got %s", tokdesc(cur(p), b, sizeof b));
            }
            m->s = name;
            m->id = jinja_test_id(name);
            if (m->id < 0) perr(p, k->line, "unknown test '%s'", name);
            if (is_op(cur(p), "(")) p_args(p, m);
            else if (cur(p)->t == T_STR || cur(p)->t == T_INT || cur(p)->t == T_FLOAT) {
                /* `is divisibleby 3`, `is sameas 'x'`: one argument without parentheses */
                m->list = ja_alloc(p->A, sizeof(jnode *));
                m->list[0] = p_primary(p);
                m->n = 1;
            }
            m->a = n;
            n = m;
        } else {
            return n;
        }
    }
}

static jnode *p_unary(P *p, int with_filter) {
    tok *k = cur(p);
    jnode *n;
    if (is_op(k, "-") || is_op(k, "+")) {
        p->pos++;
        n = mk(p, is_op(k, "-") ? E_NEG : E_POS, k->line);
        nest_in(p, k->line);
        n->a = p_unary(p, 0);
        nest_out(p);
    } else {
        n = p_postfix(p, p_primary(p));
    }
    if (with_filter) n = p_filters(p, n);
    return n;
}

static jnode *bin(P *p, int op, jnode *a, jnode *b, int line) {
    jnode *n = mk(p, E_BIN, line);
    n->op = op;
    n->a = a;
    n->b = b;
    return n;
}

static jnode *p_pow(P *p) {
    jnode *n = p_unary(p, 1);
    while (is_op(cur(p), "**")) {
        int line = next(p)->line;
        n = bin(p, OP_POW, n, p_unary(p, 1), line);
    }
    return n;
}
static jnode *p_math2(P *p) {
    jnode *n = p_pow(p);
    for (;;) {
        tok *k = cur(p);
        int op = is_op(k, "*") ? OP_MUL : is_op(k, "/") ? OP_DIV : is_op(k, "//") ? OP_FDIV : is_op(k, "%") ? OP_MOD : -1;
        if (op < 0) return n;
        p->pos++;
        n = bin(p, op, n, p_pow(p), k->line);
    }
}
static jnode *p_concat(P *p) {
    jnode *n = p_math2(p);
    while (is_op(cur(p), "~")) {
        int line = next(p)->line;
        n = bin(p, OP_CAT, n, p_math2(p), line);
    }
    return n;
}
static jnode *p_math1(P *p) {
    jnode *n = p_concat(p);
    for (;;) {
        tok *k = cur(p);
        int op = is_op(k, "+") ? OP_ADD : is_op(k, "-") ? OP_SUB : -1;
        if (op < 0) return n;
        p->pos++;
        n = bin(p, op, n, p_concat(p), k->line);
    }
}
static jnode *p_compare(P *p) {
    jnode *n = p_math1(p);
    for (;;) {
        tok *k = cur(p);
        int op = is_op(k, "==") ? OP_EQ : is_op(k, "!=") ? OP_NE : is_op(k, "<") ? OP_LT : is_op(k, "<=") ? OP_LE
               : is_op(k, ">") ? OP_GT : is_op(k, ">=") ? OP_GE : is_name(k, "in") ? OP_IN : -1;
        if (op < 0 && is_name(k, "not") && is_name(&p->toks[p->pos + 1], "in")) {
            op = OP_NOTIN;
            p->pos++;
        }
        if (op < 0) return n;
        p->pos++;
        n = bin(p, op, n, p_math1(p), k->line);
    }
}
static jnode *p_not(P *p) {
    if (is_name(cur(p), "not")) {
        int line = next(p)->line;
        jnode *n = mk(p, E_NOT, line);
        nest_in(p, line);
        n->a = p_not(p);
        nest_out(p);
        return n;
    }
    return p_compare(p);
}
static jnode *p_and(P *p) {
    jnode *n = p_not(p);
    while (is_name(cur(p), "and")) {
        int line = next(p)->line;
        jnode *m = mk(p, E_AND, line);
        m->a = n;
        m->b = p_not(p);
        n = m;
    }
    return n;
}
static jnode *p_or(P *p) {
    jnode *n = p_and(p);
    while (is_name(cur(p), "or")) {
        int line = next(p)->line;
        jnode *m = mk(p, E_OR, line);
        m->a = n;
        m->b = p_and(p);
        n = m;
    }
    return n;
}
static jnode *p_expr(P *p) {
    nest_in(p, cur(p)->line);
    jnode *n = p_or(p);
    while (is_name(cur(p), "if")) {
        int line = next(p)->line;
        jnode *m = mk(p, E_COND, line);
        m->b = n;
        m->a = p_or(p);
        if (is_name(cur(p), "else")) {
            p->pos++;
            m->c = p_expr(p);
        }
        n = m;
    }
    nest_out(p);
    return n;
}

/* ---- statements ---- */
static int at_tag(P *p, const char *const *names) {
    if (cur(p)->t != T_BBEGIN) return 0;
    tok *k = &p->toks[p->pos + 1];
    for (int i = 0; names[i]; i++)
        if (is_name(k, names[i])) return 1;
    return 0;
}

static jnode *p_body(P *p, const char *const *ends, const char *opener, int open_line);

static void p_targets(P *p, svec *t) {
    sv_push(p, t, expect_name(p));
    while (is_op(cur(p), ",")) {
        p->pos++;
        sv_push(p, t, expect_name(p));
    }
}

static const char *const END_IF[] = {"elif", "else", "endif", NULL};
static const char *const END_FOR[] = {"else", "endfor", NULL};
static const char *const END_ENDFOR[] = {"endfor", NULL};
static const char *const END_MACRO[] = {"endmacro", NULL};
static const char *const END_SET[] = {"endset", NULL};
static const char *const END_FILTER[] = {"endfilter", NULL};
static const char *const END_GEN[] = {"endgeneration", NULL};

static jnode *p_if(P *p, int line) {
    nest_in(p, line); /* each elif nests one more if */
    jnode *n = mk(p, N_IF, line);
    n->a = p_expr(p);
    expect_bend(p);
    jnode *body = p_body(p, END_IF, "if", line);
    n->list = body->list;
    n->n = body->n;
    /* at elif / else / endif */
    p->pos++;
    tok *k = next(p);
    if (is_name(k, "elif")) {
        jnode *e = p_if(p, k->line);
        n->list2 = ja_alloc(p->A, sizeof(jnode *));
        n->list2[0] = e;
        n->n2 = 1;
        nest_out(p);
        return n; /* the nested if consumed endif */
    }
    if (is_name(k, "else")) {
        expect_bend(p);
        static const char *const E[] = {"endif", NULL};
        jnode *eb = p_body(p, E, "else", k->line);
        n->list2 = eb->list;
        n->n2 = eb->n;
        p->pos += 2;
    }
    expect_bend(p);
    nest_out(p);
    return n;
}

static jnode *p_stmt(P *p) {
    tok *b = next(p); /* T_BBEGIN */
    tok *k = cur(p);
    char bd[64];
    if (k->t != T_NAME) perr(p, k->line, "expected a tag name, got %s", tokdesc(k, bd, sizeof bd));
    int line = k->line;
    (void)b;
    p->pos++;
    if (is_name(k, "if")) return p_if(p, line);
    if (is_name(k, "for")) {
        jnode *n = mk(p, N_FOR, line);
        svec t = {0};
        if (is_op(cur(p), "(")) perr(p, line, "unsupported: parenthesized for targets");
        p_targets(p, &t);
        n->names = t.v;
        n->nn = t.n;
        if (!is_name(cur(p), "in")) perr(p, cur(p)->line, "expected 'in' in for tag");
        p->pos++;
        n->a = p_or(p); /* 'if' here filters the loop, it is no conditional expression */
        if (is_name(cur(p), "if")) {
            p->pos++;
            n->c = p_expr(p);
        }
        if (is_name(cur(p), "recursive")) perr(p, line, "unsupported: recursive for loops");
        expect_bend(p);
        jnode *body = p_body(p, END_FOR, "for", line);
        n->list = body->list;
        n->n = body->n;
        p->pos++;
        if (is_name(next(p), "else")) {
            expect_bend(p);
            jnode *eb = p_body(p, END_ENDFOR, "for-else", line);
            n->list2 = eb->list;
            n->n2 = eb->n;
            p->pos += 2;
        }
        expect_bend(p);
        return n;
    }
    if (is_name(k, "set")) {
        svec t = {0};
        const char *attr = NULL;
        p_targets(p, &t);
        if (t.n == 1 && is_op(cur(p), ".")) {
            p->pos++;
            attr = expect_name(p);
        }
        if (cur(p)->t == T_BEND) {
            if (t.n != 1 || attr) perr(p, line, "block set takes one plain name");
            p->pos++;
            jnode *n = mk(p, N_SETBLOCK, line);
            n->s = t.v[0];
            jnode *body = p_body(p, END_SET, "set", line);
            n->list = body->list;
            n->n = body->n;
            p->pos += 2;
            expect_bend(p);
            return n;
        }
        expect_op(p, "=");
        jnode *n = mk(p, N_SET, line);
        n->names = t.v;
        n->nn = t.n;
        n->s = attr;
        jnode *e = p_expr(p);
        if (is_op(cur(p), ",")) { /* set a, b = x, y */
            nvec items = {0};
            nv_push(p, &items, e);
            while (is_op(cur(p), ",")) {
                p->pos++;
                nv_push(p, &items, p_expr(p));
            }
            e = mk(p, E_LIST, line);
            e->list = items.v;
            e->n = items.n;
        }
        n->a = e;
        expect_bend(p);
        return n;
    }
    if (is_name(k, "macro")) {
        jnode *n = mk(p, N_MACRO, line);
        n->s = expect_name(p);
        expect_op(p, "(");
        svec params = {0};
        nvec defs = {0};
        while (!is_op(cur(p), ")")) {
            if (params.n) expect_op(p, ",");
            if (is_op(cur(p), ")")) break;
            sv_push(p, &params, expect_name(p));
            jnode *d = NULL;
            if (is_op(cur(p), "=")) {
                p->pos++;
                d = p_expr(p);
            }
            nv_push(p, &defs, d);
        }
        p->pos++;
        expect_bend(p);
        jnode *body = p_body(p, END_MACRO, "macro", line);
        n->list = body->list;
        n->n = body->n;
        n->names = params.v;
        n->nn = params.n;
        n->list2 = defs.v;
        n->n2 = defs.n;
        p->pos += 2;
        if (cur(p)->t == T_NAME) p->pos++; /* {% endmacro name %} */
        expect_bend(p);
        return n;
    }
    if (is_name(k, "break") || is_name(k, "continue")) {
        jnode *n = mk(p, is_name(k, "break") ? N_BREAK : N_CONTINUE, line);
        expect_bend(p);
        return n;
    }
    if (is_name(k, "filter")) {
        jnode *n = mk(p, N_FILTERBLOCK, line);
        jnode *ph = mk(p, E_BLOCKVAL, line);
        /* parse "name(args)|name2..." as filters applied to the block's text */
        p->pos--;
        p->toks[p->pos].t = T_OP; /* reuse the 'filter' token as a '|' */
        p->toks[p->pos].p = "|";
        p->toks[p->pos].n = 1;
        n->a = p_filters(p, ph);
        expect_bend(p);
        jnode *body = p_body(p, END_FILTER, "filter", line);
        n->list = body->list;
        n->n = body->n;
        p->pos += 2;
        expect_bend(p);
        return n;
    }
    if (is_name(k, "generation")) { /* transformers' assistant-mask tag: renders its body */
        expect_bend(p);
        jnode *body = p_body(p, END_GEN, "generation", line);
        p->pos += 2;
        expect_bend(p);
        return body;
    }
    perr(p, line, "unsupported tag '%.*s'", (int)k->n, k->p);
    return NULL;
}

/* Parses statements until one of the tags in ends (left unconsumed: at its T_BBEGIN), or EOF when
 * ends is NULL. */
static jnode *p_body(P *p, const char *const *ends, const char *opener, int open_line) {
    nest_in(p, open_line);
    nvec v = {0};
    for (;;) {
        tok *k = cur(p);
        if (k->t == T_EOF) {
            if (ends) perr(p, open_line, "unclosed '%s' tag (expected '%s')", opener, ends[0] ? ends[0] : "");
            break;
        }
        if (ends && at_tag(p, ends)) break;
        if (k->t == T_TEXT) {
            jnode *n = mk(p, N_TEXT, k->line);
            n->s = ja_strdup(p->A, k->p, k->n);
            n->slen = k->n;
            nv_push(p, &v, n);
            p->pos++;
        } else if (k->t == T_VBEGIN) {
            p->pos++;
            jnode *n = mk(p, N_OUT, k->line);
            n->a = p_expr(p);
            tok *e = cur(p);
            char b[64];
            if (e->t != T_VEND) perr(p, e->line, "expected '}}', got %s", tokdesc(e, b, sizeof b));
            p->pos++;
            nv_push(p, &v, n);
        } else if (k->t == T_BBEGIN) {
            tok *t = &p->toks[p->pos + 1];
            static const char *const stray[] = {"endif", "endfor", "endmacro", "endset", "endfilter", "elif",
                                                "else", "endgeneration", NULL};
            for (int i = 0; stray[i]; i++)
                if (is_name(t, stray[i])) perr(p, t->line, "unexpected '%s' tag", stray[i]);
            jnode *n = p_stmt(p);
            nv_push(p, &v, n);
        } else {
            char b[64];
            perr(p, k->line, "unexpected %s", tokdesc(k, b, sizeof b));
        }
    }
    jnode *body = mk(p, N_BODY, 0);
    body->list = v.v;
    body->n = v.n;
    nest_out(p);
    return body;
}

int jinja_parse(jinja_template **out, const char *src, size_t len, const char *name) {
    *out = NULL;
    jinja_template *t = calloc(1, sizeof *t);
    if (!t) return dt_err("out of memory");
    if (!name) name = "template";
    t->name = strdup(name);
    P p = {0};
    p.A = &t->arena;
    p.name = t->name;
    t->arena.oom = &p.jb;
    if (setjmp(p.jb)) {
        free(p.toks);
        free(p.norm);
        t->arena.oom = NULL;
        jinja_free(t);
        return -1;
    }
    /* jinja2 turns every \r\n and \r of the source into \n */
    char *norm = malloc(len + 1);
    if (!norm) {
        free(t->name);
        free(t);
        return dt_err("out of memory");
    }
    size_t m = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            norm[m++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            norm[m++] = src[i];
        }
    }
    p.norm = norm;
    lex(&p, norm, m);
    t->root = p_body(&p, NULL, NULL, 0);
    free(norm);
    p.norm = NULL;
    free(p.toks);
    t->arena.oom = NULL;
    *out = t;
    return 0;
}

void jinja_free(jinja_template *t) {
    if (!t) return;
    ja_free(&t->arena);
    free(t->name);
    free(t);
}
