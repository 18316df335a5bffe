/* Jinja evaluator: renders a parsed template (jinja_parse.c) with values from a JSON object,
 * following Python jinja2 / transformers semantics (see jinja.h). All values of one render live
 * in one arena; errors longjmp back to jinja_render. */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "deltatune/error.h"
#include "text/jinja_int.h"

/* ---- filters and tests (ids resolved at parse time) ---- */
enum {
    FL_TRIM, FL_LENGTH, FL_COUNT, FL_TOJSON, FL_ITEMS, FL_STRING, FL_SAFE, FL_LOWER, FL_UPPER, FL_DEFAULT, FL_D,
    FL_JOIN, FL_FIRST, FL_LAST, FL_REVERSE, FL_REPLACE, FL_LIST, FL_INT, FL_FLOAT, FL_ABS, FL_CAPITALIZE, FL_TITLE,
    FL_SELECTATTR, FL_REJECTATTR, FL_MAP, FL_SELECT, FL_REJECT, FL_UNIQUE, FL_DICTSORT, FL_SORT, FL_ROUND, FL_SUM,
    FL_INDENT, FL_N
};
static const char *const FILTERS[] = {"trim", "length", "count", "tojson", "items", "string", "safe", "lower", "upper",
                                      "default", "d", "join", "first", "last", "reverse", "replace", "list", "int",
                                      "float", "abs", "capitalize", "title", "selectattr", "rejectattr", "map",
                                      "select", "reject", "unique", "dictsort", "sort", "round", "sum",
                                      "indent"};
enum {
    TS_DEFINED, TS_UNDEFINED, TS_NONE, TS_STRING, TS_NUMBER, TS_INTEGER, TS_FLOAT, TS_BOOLEAN, TS_TRUE, TS_FALSE,
    TS_MAPPING, TS_ITERABLE, TS_SEQUENCE, TS_CALLABLE, TS_ODD, TS_EVEN, TS_DIVISIBLEBY, TS_EQ, TS_EQUALTO, TS_NE,
    TS_LT, TS_LE, TS_GT, TS_GE, TS_IN, TS_LOWER, TS_UPPER, TS_SAMEAS, TS_N
};
static const char *const TESTS[] = {"defined", "undefined", "none", "string", "number", "integer", "float",
                                    "boolean", "true", "false", "mapping", "iterable", "sequence", "callable",
                                    "odd", "even", "divisibleby", "eq", "equalto", "ne", "lt", "le", "gt", "ge",
                                    "in", "lower", "upper", "sameas"};

int jinja_filter_id(const char *name) {
    for (int i = 0; i < FL_N; i++)
        if (!strcmp(FILTERS[i], name)) return i;
    return -1;
}
int jinja_test_id(const char *name) {
    for (int i = 0; i < TS_N; i++)
        if (!strcmp(TESTS[i], name)) return i;
    if (!strcmp(name, "==")) return TS_EQ;
    if (!strcmp(name, "greaterthan")) return TS_GT;
    if (!strcmp(name, "lessthan")) return TS_LT;
    return -1;
}

/* builtin functions and methods */
enum {
    F_RAISE, F_NAMESPACE, F_RANGE, F_DICT, F_STRFTIME,
    M_STARTSWITH, M_ENDSWITH, M_SPLIT, M_STRIP, M_LSTRIP, M_RSTRIP, M_UPPER, M_LOWER, M_REPLACE, M_TITLE,
    M_CAPITALIZE, M_JOIN, M_FIND, M_COUNT, M_GET, M_ITEMS, M_KEYS, M_VALUES
};
static const char *const STR_METHODS[] = {"startswith", "endswith", "split", "strip", "lstrip", "rstrip", "upper",
                                          "lower", "replace", "title", "capitalize", "join", "find", "count", NULL};
static const int STR_METHOD_IDS[] = {M_STARTSWITH, M_ENDSWITH, M_SPLIT, M_STRIP, M_LSTRIP, M_RSTRIP, M_UPPER,
                                     M_LOWER, M_REPLACE, M_TITLE, M_CAPITALIZE, M_JOIN, M_FIND, M_COUNT};
static const char *const DICT_METHODS[] = {"get", "items", "keys", "values", NULL};
static const int DICT_METHOD_IDS[] = {M_GET, M_ITEMS, M_KEYS, M_VALUES};

/* ---- render state ---- */
typedef struct scope {
    struct scope *parent;
    jdict vars;
} scope;

typedef struct {
    jarena A;
    const jinja_template *t;
    jmp_buf jb;
    scope *globals;
    int line;   /* line of the node being evaluated, for messages */
    int brk;    /* 1 break, 2 continue */
    val blockval;
    int depth;  /* macro calls */
    int nest;   /* eval, exec_body, repr and equal frames on the C stack (nest_in) */
} R;

typedef struct { char *p; size_t n, cap; } sbuf;

static _Noreturn void rerr(R *r, const char *fmt, ...) DT_PRINTF(2, 3);
static _Noreturn void rerr(R *r, const char *fmt, ...) {
    char msg[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    dt_err("%s:%d: %s", r->t->name, r->line, msg);
    longjmp(r->jb, 1);
}

/* The parser bounds bracket and block nesting, but a chain like 1 + 1 + ... or x|f|f|... parses
 * in a loop into a tree as deep as it is long, and a loop can nest a value ([x] around x) as deep
 * as it runs; evaluating or printing those recurses that deep, so the depth of eval, exec_body and
 * repr together (and of tojson) is bounded here. A level takes about 1 KB of stack (2.5 KB under
 * ASan), so this stays within the 8 MB main-thread stack; recursive macros (200 calls, about 3
 * levels each) stay below it. */
enum { MAX_EVAL_NEST = 2000 };
static void nest_in(R *r) {
    if (++r->nest > MAX_EVAL_NEST) rerr(r, "expressions, blocks or values nested more than %d deep", MAX_EVAL_NEST);
}

static void sb_put(R *r, sbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *np = ja_alloc(&r->A, cap);
        if (b->n) memcpy(np, b->p, b->n);
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_puts(R *r, sbuf *b, const char *s) { sb_put(r, b, s, strlen(s)); }
static void sb_printf(R *r, sbuf *b, const char *fmt, ...) DT_PRINTF(3, 4);
static void sb_printf(R *r, sbuf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    sb_put(r, b, tmp, (size_t)n);
}

/* ---- value constructors ---- */
static val v_undef(const char *name) {
    val v = {.t = V_UNDEF};
    v.u.s.p = name;
    return v;
}
static val v_none(void) { return (val){.t = V_NONE}; }
static val v_bool(int b) {
    val v = {.t = V_BOOL};
    v.u.b = !!b;
    return v;
}
static val v_int(long long i) {
    val v = {.t = V_INT};
    v.u.i = i;
    return v;
}
static val v_float(double f) {
    val v = {.t = V_FLOAT};
    v.u.f = f;
    return v;
}
static val v_str(const char *p, size_t n) {
    val v = {.t = V_STR};
    v.u.s.p = p;
    v.u.s.n = n;
    return v;
}
static val v_sb(sbuf *b) { return v_str(b->p ? b->p : "", b->n); }
static val v_list(R *r) {
    val v = {.t = V_LIST};
    v.u.l = ja_alloc(&r->A, sizeof(jlist));
    return v;
}
static val v_dict(R *r, int t) {
    val v = {.t = t};
    v.u.d = ja_alloc(&r->A, sizeof(jdict));
    return v;
}
static void l_push(R *r, jlist *l, val x) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        val *nv = ja_alloc(&r->A, cap * sizeof *nv);
        if (l->n) memcpy(nv, l->v, l->n * sizeof *nv);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = x;
}
static val *d_find(const jdict *d, const char *k, size_t kn) {
    for (size_t i = 0; i < d->n; i++)
        if (d->kn[i] == kn && !memcmp(d->k[i], k, kn)) return &d->v[i];
    return NULL;
}
static void d_set(R *r, jdict *d, const char *k, size_t kn, val x) {
    val *e = d_find(d, k, kn);
    if (e) {
        *e = x;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        const char **nk = ja_alloc(&r->A, cap * sizeof *nk);
        size_t *nkn = ja_alloc(&r->A, cap * sizeof *nkn);
        val *nv = ja_alloc(&r->A, cap * sizeof *nv);
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof *nk);
            memcpy(nkn, d->kn, d->n * sizeof *nkn);
            memcpy(nv, d->v, d->n * sizeof *nv);
        }
        d->k = nk;
        d->kn = nkn;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->kn[d->n] = kn;
    d->v[d->n] = x;
    d->n++;
}
static void d_sets(R *r, jdict *d, const char *k, val x) { d_set(r, d, k, strlen(k), x); }

static val from_json(R *r, const json_t *j) {
    switch (json_typeof(j)) {
    case JSON_NULL: return v_none();
    case JSON_TRUE: return v_bool(1);
    case JSON_FALSE: return v_bool(0);
    case JSON_INTEGER: return v_int(json_integer_value(j));
    case JSON_REAL: return v_float(json_real_value(j));
    case JSON_STRING: return v_str(json_string_value(j), json_string_length(j));
    case JSON_ARRAY: {
        val v = v_list(r);
        size_t i;
        const json_t *x;
        json_array_foreach((json_t *)j, i, x) l_push(r, v.u.l, from_json(r, x));
        return v;
    }
    case JSON_OBJECT: {
        val v = v_dict(r, V_DICT);
        const char *k;
        json_t *x;
        void *tmp;
        json_object_foreach_safe((json_t *)j, tmp, k, x) d_set(r, v.u.d, k, strlen(k), from_json(r, x));
        return v;
    }
    }
    return v_none();
}

/* ---- UTF-8 helpers ---- */
static size_t u8_next(const char *s, size_t n, size_t i) {
    i++;
    while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80) i++;
    return i;
}
static size_t u8_len(const char *s, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}
static uint32_t u8_dec(const char *s, size_t n, size_t i) {
    unsigned char c = (unsigned char)s[i];
    size_t e = u8_next(s, n, i);
    if (c < 0x80 || e - i == 1) return c;
    uint32_t cp = c & (0xFF >> (e - i + 1));
    for (size_t q = i + 1; q < e; q++) cp = (cp << 6) | ((unsigned char)s[q] & 0x3F);
    return cp;
}
/* Python str.isspace */
static int py_space(uint32_t c) {
    return (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* ---- conversions ---- */
static const char *type_name(val v) {
    switch (v.t) {
    case V_UNDEF: return "undefined";
    case V_NONE: return "NoneType";
    case V_BOOL: return "bool";
    case V_INT: return "int";
    case V_FLOAT: return "float";
    case V_STR: return "str";
    case V_LIST: return "list";
    case V_DICT: return "dict";
    case V_NS: return "Namespace";
    case V_MACRO: return "macro";
    default: return "function";
    }
}

/* Python repr of a float: shortest round-trip digits */
static void float_repr(double f, char *out, size_t cap) {
    if (isnan(f)) { snprintf(out, cap, "nan"); return; }
    if (isinf(f)) { snprintf(out, cap, f < 0 ? "-inf" : "inf"); return; }
    char e[40];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec - 1, f);
        if (strtod(e, NULL) == f) break;
    }
    /* e = [-]d[.ddd]e[+-]XX */
    char digits[32];
    int nd = 0, neg = e[0] == '-';
    const char *q = e + neg;
    for (; *q && *q != 'e'; q++)
        if (isdigit((unsigned char)*q)) digits[nd++] = *q;
    digits[nd] = 0;
    int exp = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0') digits[--nd] = 0;
    char *o = out;
    size_t left = cap;
#define EMIT(...) do { int w_ = snprintf(o, left, __VA_ARGS__); if (w_ > 0 && (size_t)w_ < left) { o += w_; left -= (size_t)w_; } } while (0)
    if (neg) EMIT("-");
    if (exp < -4 || exp >= 16) {
        EMIT("%c", digits[0]);
        if (nd > 1) EMIT(".%s", digits + 1);
        EMIT("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    } else if (exp < 0) {
        EMIT("0.");
        for (int i = 0; i < -exp - 1; i++) EMIT("0");
        EMIT("%s", digits);
    } else {
        for (int i = 0; i <= exp; i++) EMIT("%c", i < nd ? digits[i] : '0');
        EMIT(".");
        if (nd > exp + 1) EMIT("%s", digits + exp + 1);
        else EMIT("0");
    }
#undef EMIT
}

static void repr(R *r, sbuf *b, val v);
static void to_str(R *r, sbuf *b, val v) {
    char tmp[64];
    switch (v.t) {
    case V_UNDEF: return;
    case V_NONE: sb_puts(r, b, "None"); return;
    case V_BOOL: sb_puts(r, b, v.u.b ? "True" : "False"); return;
    case V_INT: sb_printf(r, b, "%lld", v.u.i); return;
    case V_FLOAT: float_repr(v.u.f, tmp, sizeof tmp); sb_puts(r, b, tmp); return;
    case V_STR: sb_put(r, b, v.u.s.p, v.u.s.n); return;
    case V_NS: sb_puts(r, b, "<Namespace>"); return;
    case V_MACRO: sb_puts(r, b, "<Macro>"); return;
    case V_FUNC: sb_puts(r, b, "<function>"); return;
    default: repr(r, b, v);
    }
}
static void repr(R *r, sbuf *b, val v) {
    if (v.t == V_STR) {
        int has_sq = memchr(v.u.s.p, '\'', v.u.s.n) != NULL, has_dq = memchr(v.u.s.p, '"', v.u.s.n) != NULL;
        char q = has_sq && !has_dq ? '"' : '\'';
        sb_put(r, b, &q, 1);
        for (size_t i = 0; i < v.u.s.n; i++) {
            unsigned char c = (unsigned char)v.u.s.p[i];
            if (c == '\\') sb_puts(r, b, "\\\\");
            else if (c == (unsigned char)q) { sb_puts(r, b, "\\"); sb_put(r, b, &q, 1); }
            else if (c == '\n') sb_puts(r, b, "\\n");
            else if (c == '\r') sb_puts(r, b, "\\r");
            else if (c == '\t') sb_puts(r, b, "\\t");
            else if (c < 0x20 || c == 0x7f) sb_printf(r, b, "\\x%02x", c);
            else sb_put(r, b, (const char *)&c, 1);
        }
        sb_put(r, b, &q, 1);
    } else if (v.t == V_LIST) {
        nest_in(r);
        sb_puts(r, b, "[");
        for (size_t i = 0; i < v.u.l->n; i++) {
            if (i) sb_puts(r, b, ", ");
            repr(r, b, v.u.l->v[i]);
        }
        sb_puts(r, b, "]");
        r->nest--;
    } else if (v.t == V_DICT) {
        nest_in(r);
        sb_puts(r, b, "{");
        for (size_t i = 0; i < v.u.d->n; i++) {
            if (i) sb_puts(r, b, ", ");
            repr(r, b, v_str(v.u.d->k[i], v.u.d->kn[i]));
            sb_puts(r, b, ": ");
            repr(r, b, v.u.d->v[i]);
        }
        sb_puts(r, b, "}");
        r->nest--;
    } else {
        to_str(r, b, v);
    }
}
static val str_of(R *r, val v) {
    if (v.t == V_STR) return v;
    sbuf b = {0};
    to_str(r, &b, v);
    return v_sb(&b);
}

static int truthy(val v) {
    switch (v.t) {
    case V_UNDEF: case V_NONE: return 0;
    case V_BOOL: return v.u.b;
    case V_INT: return v.u.i != 0;
    case V_FLOAT: return v.u.f != 0;
    case V_STR: return v.u.s.n != 0;
    case V_LIST: return v.u.l->n != 0;
    case V_DICT: return v.u.d->n != 0;
    default: return 1;
    }
}

static int is_num(val v) { return v.t == V_INT || v.t == V_FLOAT || v.t == V_BOOL; }
static double num(val v) { return v.t == V_FLOAT ? v.u.f : v.t == V_INT ? (double)v.u.i : (double)v.u.b; }

static int equal(R *r, val a, val b) {
    int eq = 1;
    if (is_num(a) && is_num(b)) {
        if (a.t != V_FLOAT && b.t != V_FLOAT) return (a.t == V_INT ? a.u.i : a.u.b) == (b.t == V_INT ? b.u.i : b.u.b);
        return num(a) == num(b);
    }
    if (a.t != b.t) return 0;
    switch (a.t) {
    case V_UNDEF: case V_NONE: return 1;
    case V_STR: return a.u.s.n == b.u.s.n && !memcmp(a.u.s.p, b.u.s.p, a.u.s.n);
    case V_LIST:
        if (a.u.l->n != b.u.l->n) return 0;
        nest_in(r);
        for (size_t i = 0; eq && i < a.u.l->n; i++) eq = equal(r, a.u.l->v[i], b.u.l->v[i]);
        r->nest--;
        return eq;
    case V_DICT:
        if (a.u.d->n != b.u.d->n) return 0;
        nest_in(r);
        for (size_t i = 0; eq && i < a.u.d->n; i++) {
            val *o = d_find(b.u.d, a.u.d->k[i], a.u.d->kn[i]);
            eq = o && equal(r, a.u.d->v[i], *o);
        }
        r->nest--;
        return eq;
    case V_NS: return a.u.d == b.u.d;
    case V_MACRO: return a.u.m.node == b.u.m.node && a.u.m.scope == b.u.m.scope;
    default: return a.u.fn.id == b.u.fn.id && a.u.fn.self == b.u.fn.self;
    }
}

/* An undefined value carries the reason it is undefined ("'x' is undefined", "'dict object' has no
 * attribute 'y'"); using it for anything but printing, testing or iterating fails with that reason,
 * as jinja2's default Undefined does. */
static void need_defined(R *r, val v) {
    if (v.t == V_UNDEF) rerr(r, "%s", v.u.s.p ? v.u.s.p : "undefined value");
}
static val undef_msg(R *r, const char *fmt, ...) DT_PRINTF(2, 3);
static val undef_msg(R *r, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return v_undef(ja_strdup(&r->A, msg, strlen(msg)));
}

/* iteration: a list of the items (keys for dicts, characters for strings) */
static jlist *iter_list(R *r, val v) {
    if (v.t == V_LIST) return v.u.l;
    jlist *l = ja_alloc(&r->A, sizeof *l);
    if (v.t == V_UNDEF) return l;
    if (v.t == V_DICT) {
        for (size_t i = 0; i < v.u.d->n; i++) l_push(r, l, v_str(v.u.d->k[i], v.u.d->kn[i]));
        return l;
    }
    if (v.t == V_STR) {
        for (size_t i = 0; i < v.u.s.n;) {
            size_t e = u8_next(v.u.s.p, v.u.s.n, i);
            l_push(r, l, v_str(v.u.s.p + i, e - i));
            i = e;
        }
        return l;
    }
    rerr(r, "'%s' object is not iterable", type_name(v));
    return NULL;
}

static long long slice_fix(long long i, long long n, int is_stop, long long step) {
    (void)is_stop;
    if (i < 0) {
        i += n;
        if (i < 0) i = step < 0 ? -1 : 0;
    } else if (i >= n) {
        i = step < 0 ? n - 1 : n;
    }
    return i;
}

static val do_slice(R *r, val obj, val a, val b, val c) {
    long long step = 1;
    if (c.t == V_INT) step = c.u.i;
    else if (c.t != V_UNDEF && c.t != V_NONE) rerr(r, "slice step must be an integer");
    if (step == 0) rerr(r, "slice step cannot be zero");
    jlist *items;
    int is_str = obj.t == V_STR;
    if (obj.t == V_LIST || is_str) items = iter_list(r, obj);
    else {
        need_defined(r, obj);
        rerr(r, "cannot slice a '%s'", type_name(obj));
    }
    long long n = (long long)items->n;
    long long start, stop;
    if (a.t == V_INT) start = slice_fix(a.u.i, n, 0, step);
    else if (a.t == V_UNDEF || a.t == V_NONE) start = step > 0 ? 0 : n - 1;
    else { rerr(r, "slice indices must be integers"); return obj; }
    if (b.t == V_INT) stop = slice_fix(b.u.i, n, 1, step);
    else if (b.t == V_UNDEF || b.t == V_NONE) stop = step > 0 ? n : -1;
    else { rerr(r, "slice indices must be integers"); return obj; }
    val out = v_list(r);
    sbuf sb = {0};
    for (long long i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (is_str) sb_put(r, &sb, items->v[i].u.s.p, items->v[i].u.s.n);
        else l_push(r, out.u.l, items->v[i]);
    }
    if (is_str) return v_sb(&sb);
    return out;
}

static val get_method(R *r, val obj, const char *name) {
    const char *const *names = obj.t == V_STR ? STR_METHODS : obj.t == V_DICT ? DICT_METHODS : NULL;
    const int *ids = obj.t == V_STR ? STR_METHOD_IDS : DICT_METHOD_IDS;
    if (!names) return v_undef(NULL);
    for (int i = 0; names[i]; i++)
        if (!strcmp(names[i], name)) {
            val f = {.t = V_FUNC};
            f.u.fn.id = ids[i];
            f.u.fn.self = ja_alloc(&r->A, sizeof(val));
            *f.u.fn.self = obj;
            return f;
        }
    return v_undef(NULL);
}

/* obj.name: Python getattr first (methods), then the item */
static val get_attr(R *r, val obj, const char *name, size_t n) {
    need_defined(r, obj);
    if (obj.t == V_DICT) {
        val m = get_method(r, obj, name);
        if (m.t != V_UNDEF) return m;
    }
    if (obj.t == V_DICT || obj.t == V_NS) {
        val *e = d_find(obj.u.d, name, n);
        return e ? *e : undef_msg(r, "'%s object' has no attribute '%s'", obj.t == V_DICT ? "dict" : "Namespace", name);
    }
    if (obj.t == V_STR) {
        val m = get_method(r, obj, name);
        return m.t != V_UNDEF ? m : undef_msg(r, "'str object' has no attribute '%s'", name);
    }
    if (obj.t == V_NONE) return undef_msg(r, "'None' has no attribute '%s'", name);
    return undef_msg(r, "'%s object' has no attribute '%s'", type_name(obj), name);
}

/* obj[key]: the item first, then the attribute */
static val get_item(R *r, val obj, val key) {
    need_defined(r, obj);
    if (obj.t == V_DICT || obj.t == V_NS) {
        if (key.t == V_STR) {
            val *e = d_find(obj.u.d, key.u.s.p, key.u.s.n);
            if (e) return *e;
            if (obj.t == V_DICT) {
                val m = get_method(r, obj, ja_strdup(&r->A, key.u.s.p, key.u.s.n));
                if (m.t != V_UNDEF) return m;
            }
            return undef_msg(r, "'dict object' has no attribute '%.*s'", (int)key.u.s.n, key.u.s.p);
        }
        return undef_msg(r, "dict object has no element");
    }
    if ((obj.t == V_LIST || obj.t == V_STR) && (key.t == V_INT || key.t == V_BOOL)) {
        long long i = key.t == V_INT ? key.u.i : key.u.b;
        if (obj.t == V_LIST) {
            long long n = (long long)obj.u.l->n;
            long long i0 = i;
            if (i < 0) i += n;
            return i >= 0 && i < n ? obj.u.l->v[i] : undef_msg(r, "list object has no element %lld", i0);
        }
        jlist *cs = iter_list(r, obj);
        long long n = (long long)cs->n, i0 = i;
        if (i < 0) i += n;
        return i >= 0 && i < n ? cs->v[i] : undef_msg(r, "str object has no element %lld", i0);
    }
    if (obj.t == V_STR && key.t == V_STR) {
        val m = get_method(r, obj, ja_strdup(&r->A, key.u.s.p, key.u.s.n));
        return m.t != V_UNDEF ? m : undef_msg(r, "'str object' has no attribute '%.*s'", (int)key.u.s.n, key.u.s.p);
    }
    if (obj.t == V_NONE) return undef_msg(r, "'None' has no attribute");
    return undef_msg(r, "'%s object' has no element", type_name(obj));
}

/* ---- JSON output (Python json.dumps, ensure_ascii=False by default) ---- */
typedef struct {
    int indent;          /* -1: none */
    int ensure_ascii, sort_keys;
    const char *item_sep, *key_sep;
} jopts;

static void json_str(R *r, sbuf *b, const char *s, size_t n, int ascii) {
    sb_puts(r, b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': sb_puts(r, b, "\\\""); break;
        case '\\': sb_puts(r, b, "\\\\"); break;
        case '\n': sb_puts(r, b, "\\n"); break;
        case '\r': sb_puts(r, b, "\\r"); break;
        case '\t': sb_puts(r, b, "\\t"); break;
        case '\b': sb_puts(r, b, "\\b"); break;
        case '\f': sb_puts(r, b, "\\f"); break;
        default:
            if (c < 0x20) sb_printf(r, b, "\\u%04x", c);
            else if (c >= 0x80 && ascii) {
                uint32_t cp = u8_dec(s, n, i);
                i = u8_next(s, n, i) - 1;
                if (cp >= 0x10000) {
                    cp -= 0x10000;
                    sb_printf(r, b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
                } else sb_printf(r, b, "\\u%04x", cp);
            } else sb_put(r, b, (const char *)&c, 1);
        }
    }
    sb_puts(r, b, "\"");
}

static const jdict *sort_dict_g;
static int cmp_key_idx(const void *a, const void *b) {
    size_t i = *(const size_t *)a, j = *(const size_t *)b;
    const jdict *d = sort_dict_g;
    size_t n = d->kn[i] < d->kn[j] ? d->kn[i] : d->kn[j];
    int c = memcmp(d->k[i], d->k[j], n);
    if (c) return c;
    return d->kn[i] < d->kn[j] ? -1 : d->kn[i] > d->kn[j];
}

static void to_json(R *r, sbuf *b, val v, const jopts *o, int depth) {
    char tmp[64];
    if (depth > MAX_EVAL_NEST) rerr(r, "tojson: a value nested more than %d deep", MAX_EVAL_NEST);
    switch (v.t) {
    case V_NONE: sb_puts(r, b, "null"); return;
    case V_BOOL: sb_puts(r, b, v.u.b ? "true" : "false"); return;
    case V_INT: sb_printf(r, b, "%lld", v.u.i); return;
    case V_FLOAT:
        if (isnan(v.u.f)) sb_puts(r, b, "NaN");
        else if (isinf(v.u.f)) sb_puts(r, b, v.u.f < 0 ? "-Infinity" : "Infinity");
        else { float_repr(v.u.f, tmp, sizeof tmp); sb_puts(r, b, tmp); }
        return;
    case V_STR: json_str(r, b, v.u.s.p, v.u.s.n, o->ensure_ascii); return;
    case V_LIST: case V_DICT: case V_NS: {
        int is_list = v.t == V_LIST;
        size_t n = is_list ? v.u.l->n : v.u.d->n;
        if (n == 0) { sb_puts(r, b, is_list ? "[]" : "{}"); return; }
        sb_puts(r, b, is_list ? "[" : "{");
        size_t *order = NULL;
        if (!is_list) {
            order = ja_alloc(&r->A, n * sizeof *order);
            for (size_t i = 0; i < n; i++) order[i] = i;
            if (o->sort_keys) {
                sort_dict_g = v.u.d;
                qsort(order, n, sizeof *order, cmp_key_idx);
            }
        }
        for (size_t i = 0; i < n; i++) {
            if (i) sb_puts(r, b, o->item_sep);
            if (o->indent >= 0) {
                sb_puts(r, b, "\n");
                for (int q = 0; q < o->indent * (depth + 1); q++) sb_puts(r, b, " ");
            }
            if (is_list) to_json(r, b, v.u.l->v[i], o, depth + 1);
            else {
                size_t k = order[i];
                json_str(r, b, v.u.d->k[k], v.u.d->kn[k], o->ensure_ascii);
                sb_puts(r, b, o->key_sep);
                to_json(r, b, v.u.d->v[k], o, depth + 1);
            }
        }
        if (o->indent >= 0) {
            sb_puts(r, b, "\n");
            for (int q = 0; q < o->indent * depth; q++) sb_puts(r, b, " ");
        }
        sb_puts(r, b, is_list ? "]" : "}");
        return;
    }
    default: rerr(r, "Object of type %s is not JSON serializable", type_name(v));
    }
}

/* ---- string helpers ---- */
static int in_chars(uint32_t cp, val chars) {
    for (size_t i = 0; i < chars.u.s.n; i = u8_next(chars.u.s.p, chars.u.s.n, i))
        if (u8_dec(chars.u.s.p, chars.u.s.n, i) == cp) return 1;
    return 0;
}
/* Python str.strip / lstrip / rstrip; chars undefined or none: whitespace */
static val do_strip(R *r, val s, val chars, int left, int right) {
    if (s.t != V_STR) s = str_of(r, s);
    int ws = chars.t == V_UNDEF || chars.t == V_NONE;
    if (!ws && chars.t != V_STR) rerr(r, "strip arg must be None or str");
    const char *p = s.u.s.p;
    size_t a = 0, b = s.u.s.n;
    if (left)
        while (a < b) {
            uint32_t cp = u8_dec(p, b, a);
            if (ws ? !py_space(cp) : !in_chars(cp, chars)) break;
            a = u8_next(p, b, a);
        }
    if (right)
        while (b > a) {
            size_t q = b - 1;
            while (q > a && ((unsigned char)p[q] & 0xC0) == 0x80) q--;
            uint32_t cp = u8_dec(p, b, q);
            if (ws ? !py_space(cp) : !in_chars(cp, chars)) break;
            b = q;
        }
    return v_str(p + a, b - a);
}

static const char *memfind(const char *h, size_t hn, const char *n, size_t nn) {
    if (nn == 0) return h;
    if (nn > hn) return NULL;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == n[0] && !memcmp(h + i, n, nn)) return h + i;
    return NULL;
}

static val do_replace(R *r, val s, val old, val new, long long count) {
    s = str_of(r, s);
    old = str_of(r, old);
    new = str_of(r, new);
    sbuf b = {0};
    const char *p = s.u.s.p, *end = p + s.u.s.n;
    if (old.u.s.n == 0) { /* Python inserts between characters */
        long long k = 0;
        for (size_t i = 0;; ) {
            if (count < 0 || k < count) { sb_put(r, &b, new.u.s.p, new.u.s.n); k++; }
            if (i >= s.u.s.n) break;
            size_t e = u8_next(p, s.u.s.n, i);
            sb_put(r, &b, p + i, e - i);
            i = e;
        }
        return v_sb(&b);
    }
    long long k = 0;
    while (p < end) {
        const char *f = (count < 0 || k < count) ? memfind(p, (size_t)(end - p), old.u.s.p, old.u.s.n) : NULL;
        if (!f) break;
        sb_put(r, &b, p, (size_t)(f - p));
        sb_put(r, &b, new.u.s.p, new.u.s.n);
        p = f + old.u.s.n;
        k++;
    }
    sb_put(r, &b, p, (size_t)(end - p));
    return v_sb(&b);
}

static val do_case(R *r, val s, int mode) { /* 0 lower, 1 upper, 2 capitalize, 3 title (ASCII letters only) */
    s = str_of(r, s);
    char *o = ja_strdup(&r->A, s.u.s.p, s.u.s.n);
    int prev_alpha = 0;
    for (size_t i = 0; i < s.u.s.n; i++) {
        unsigned char c = (unsigned char)o[i];
        if (mode == 0) o[i] = (char)tolower(c);
        else if (mode == 1) o[i] = (char)toupper(c);
        else if (mode == 2) o[i] = (char)(i == 0 ? toupper(c) : tolower(c));
        else {
            o[i] = (char)(prev_alpha ? tolower(c) : toupper(c));
            prev_alpha = isalnum(c) || c >= 0x80 || c == '\'';
        }
    }
    return v_str(o, s.u.s.n);
}

static val do_split(R *r, val s, val sep, long long maxsplit) {
    val out = v_list(r);
    const char *p = s.u.s.p;
    size_t n = s.u.s.n;
    if (sep.t == V_UNDEF || sep.t == V_NONE) {
        size_t i = 0;
        long long k = 0;
        for (;;) {
            while (i < n && py_space(u8_dec(p, n, i))) i = u8_next(p, n, i);
            if (i >= n) break;
            if (maxsplit >= 0 && k >= maxsplit) {
                size_t e = n;
                while (e > i) { /* Python keeps the rest, right-stripped */
                    size_t q = e - 1;
                    while (q > i && ((unsigned char)p[q] & 0xC0) == 0x80) q--;
                    if (!py_space(u8_dec(p, n, q))) break;
                    e = q;
                }
                l_push(r, out.u.l, v_str(p + i, e - i));
                break;
            }
            size_t j = i;
            while (j < n && !py_space(u8_dec(p, n, j))) j = u8_next(p, n, j);
            l_push(r, out.u.l, v_str(p + i, j - i));
            k++;
            i = j;
        }
        return out;
    }
    if (sep.t != V_STR) rerr(r, "split separator must be a string");
    if (sep.u.s.n == 0) rerr(r, "empty separator");
    const char *end = p + n;
    long long k = 0;
    for (;;) {
        const char *f = (maxsplit < 0 || k < maxsplit) ? memfind(p, (size_t)(end - p), sep.u.s.p, sep.u.s.n) : NULL;
        if (!f) break;
        l_push(r, out.u.l, v_str(p, (size_t)(f - p)));
        p = f + sep.u.s.n;
        k++;
    }
    l_push(r, out.u.l, v_str(p, (size_t)(end - p)));
    return out;
}

/* ---- evaluation ---- */
static val eval(R *r, const jnode *n, scope *sc);
static void exec_body(R *r, jnode **list, int count, scope *sc, sbuf *out);

static val lookup(R *r, scope *sc, const char *name, size_t n) {
    for (; sc; sc = sc->parent) {
        val *e = d_find(&sc->vars, name, n);
        if (e) return *e;
    }
    return undef_msg(r, "'%.*s' is undefined", (int)n, name);
}

typedef struct {
    val pos[8];
    int npos;
    const char *kn[8];
    val kv[8];
    int nkw;
} args;

static void eval_args(R *r, const jnode *n, scope *sc, args *a) {
    memset(a, 0, sizeof *a);
    if (n->n > 8 || n->n2 > 8) rerr(r, "too many arguments");
    for (int i = 0; i < n->n; i++) a->pos[a->npos++] = eval(r, n->list[i], sc);
    for (int i = 0; i < n->n2; i++) {
        a->kn[a->nkw] = n->names[i];
        a->kv[a->nkw++] = eval(r, n->list2[i], sc);
    }
}

/* argument i (positional) or keyword name; undefined when absent */
static val arg(const args *a, int i, const char *name) {
    if (i >= 0 && i < a->npos) return a->pos[i];
    for (int k = 0; k < a->nkw; k++)
        if (!strcmp(a->kn[k], name)) return a->kv[k];
    return v_undef(NULL);
}

static val call_macro(R *r, const jnode *m, scope *def_scope, const args *a) {
    if (a->npos > m->nn) rerr(r, "macro '%s' takes not more than %d argument(s)", m->s, m->nn);
    scope *sc = ja_alloc(&r->A, sizeof *sc);
    sc->parent = def_scope ? def_scope : r->globals;
    for (int i = 0; i < m->nn; i++) {
        val v = undef_msg(r, "'%s' is undefined", m->names[i]);
        if (i < a->npos) v = a->pos[i];
        else {
            int found = 0;
            for (int k = 0; k < a->nkw; k++)
                if (!strcmp(a->kn[k], m->names[i])) {
                    v = a->kv[k];
                    found = 1;
                }
            if (!found && m->list2[i]) v = eval(r, m->list2[i], sc);
        }
        d_sets(r, &sc->vars, m->names[i], v);
    }
    for (int k = 0; k < a->nkw; k++) {
        int ok = 0;
        for (int i = 0; i < m->nn; i++) ok |= !strcmp(a->kn[k], m->names[i]);
        if (!ok) rerr(r, "macro '%s' was invoked with an unknown keyword argument '%s'", m->s, a->kn[k]);
    }
    if (++r->depth > 200) rerr(r, "maximum recursion depth exceeded");
    sbuf b = {0};
    int line = r->line;
    exec_body(r, m->list, m->n, sc, &b);
    r->line = line;
    r->depth--;
    return v_sb(&b);
}

static long long to_int_arg(R *r, val v, long long dflt, const char *what) {
    if (v.t == V_UNDEF || v.t == V_NONE) return dflt;
    if (v.t == V_INT) return v.u.i;
    if (v.t == V_BOOL) return v.u.b;
    rerr(r, "%s must be an integer", what);
    return 0;
}

static val call(R *r, val f, const args *a) {
    if (f.t == V_MACRO) return call_macro(r, f.u.m.node, f.u.m.scope, a);
    if (f.t != V_FUNC) {
        need_defined(r, f);
        rerr(r, "'%s' object is not callable", type_name(f));
    }
    val self = f.u.fn.self ? *f.u.fn.self : v_none();
    switch (f.u.fn.id) {
    case F_RAISE: {
        val m = str_of(r, arg(a, 0, "message"));
        rerr(r, "%.*s", (int)m.u.s.n, m.u.s.p);
    }
    /* fallthrough */
    case F_NAMESPACE: case F_DICT: {
        val ns = v_dict(r, f.u.fn.id == F_NAMESPACE ? V_NS : V_DICT);
        if (a->npos > 1) rerr(r, "namespace() takes at most one positional argument");
        if (a->npos == 1) {
            val init = a->pos[0];
            if (init.t == V_DICT || init.t == V_NS)
                for (size_t i = 0; i < init.u.d->n; i++) d_set(r, ns.u.d, init.u.d->k[i], init.u.d->kn[i], init.u.d->v[i]);
            else rerr(r, "namespace() positional argument must be a mapping");
        }
        for (int k = 0; k < a->nkw; k++) d_sets(r, ns.u.d, a->kn[k], a->kv[k]);
        return ns;
    }
    case F_RANGE: {
        long long start = 0, stop, step = 1;
        if (a->npos == 1) stop = to_int_arg(r, a->pos[0], 0, "range() argument");
        else if (a->npos >= 2) {
            start = to_int_arg(r, a->pos[0], 0, "range() argument");
            stop = to_int_arg(r, a->pos[1], 0, "range() argument");
            if (a->npos >= 3) step = to_int_arg(r, a->pos[2], 1, "range() argument");
        } else rerr(r, "range expected at least 1 argument");
        if (step == 0) rerr(r, "range() arg 3 must not be zero");
        val l = v_list(r);
        for (long long i = start; step > 0 ? i < stop : i > stop; i += step) {
            if (l.u.l->n > 1000000) rerr(r, "range too big");
            l_push(r, l.u.l, v_int(i));
        }
        return l;
    }
    case F_STRFTIME: { /* transformers' global: datetime.now().strftime(fmt) */
        val fmt = arg(a, 0, "format");
        if (fmt.t != V_STR) rerr(r, "strftime_now needs a format string");
        time_t now = time(NULL);
        struct tm tmv;
        localtime_r(&now, &tmv);
        char buf[256];
        size_t n = strftime(buf, sizeof buf, ja_strdup(&r->A, fmt.u.s.p, fmt.u.s.n), &tmv);
        return v_str(ja_strdup(&r->A, buf, n), n);
    }
    case M_STARTSWITH: case M_ENDSWITH: {
        val x = arg(a, 0, "prefix");
        int n = x.t == V_LIST ? (int)x.u.l->n : 1;
        for (int i = 0; i < n; i++) {
            val p = x.t == V_LIST ? x.u.l->v[i] : x;
            if (p.t != V_STR) rerr(r, "%s arg must be str or a tuple of str", f.u.fn.id == M_STARTSWITH ? "startswith" : "endswith");
            if (p.u.s.n <= self.u.s.n &&
                !memcmp(f.u.fn.id == M_STARTSWITH ? self.u.s.p : self.u.s.p + self.u.s.n - p.u.s.n, p.u.s.p, p.u.s.n))
                return v_bool(1);
        }
        return v_bool(0);
    }
    case M_SPLIT: return do_split(r, self, arg(a, 0, "sep"), to_int_arg(r, arg(a, 1, "maxsplit"), -1, "maxsplit"));
    case M_STRIP: return do_strip(r, self, arg(a, 0, "chars"), 1, 1);
    case M_LSTRIP: return do_strip(r, self, arg(a, 0, "chars"), 1, 0);
    case M_RSTRIP: return do_strip(r, self, arg(a, 0, "chars"), 0, 1);
    case M_UPPER: return do_case(r, self, 1);
    case M_LOWER: return do_case(r, self, 0);
    case M_CAPITALIZE: return do_case(r, self, 2);
    case M_TITLE: return do_case(r, self, 3);
    case M_REPLACE: return do_replace(r, self, arg(a, 0, "old"), arg(a, 1, "new"), to_int_arg(r, arg(a, 2, "count"), -1, "count"));
    case M_JOIN: {
        jlist *l = iter_list(r, arg(a, 0, "iterable"));
        sbuf b = {0};
        for (size_t i = 0; i < l->n; i++) {
            if (i) sb_put(r, &b, self.u.s.p, self.u.s.n);
            if (l->v[i].t != V_STR) rerr(r, "sequence item %zu: expected str instance, %s found", i, type_name(l->v[i]));
            sb_put(r, &b, l->v[i].u.s.p, l->v[i].u.s.n);
        }
        return v_sb(&b);
    }
    case M_FIND: case M_COUNT: {
        val x = arg(a, 0, "sub");
        if (x.t != V_STR) rerr(r, "must be str, not %s", type_name(x));
        if (f.u.fn.id == M_FIND) {
            const char *p = memfind(self.u.s.p, self.u.s.n, x.u.s.p, x.u.s.n);
            return v_int(p ? (long long)u8_len(self.u.s.p, (size_t)(p - self.u.s.p)) : -1);
        }
        if (x.u.s.n == 0) return v_int((long long)u8_len(self.u.s.p, self.u.s.n) + 1);
        long long c = 0;
        const char *p = self.u.s.p, *end = p + self.u.s.n, *q;
        while ((q = memfind(p, (size_t)(end - p), x.u.s.p, x.u.s.n))) { c++; p = q + x.u.s.n; }
        return v_int(c);
    }
    case M_GET: {
        val k = arg(a, 0, "key");
        val *e = k.t == V_STR ? d_find(self.u.d, k.u.s.p, k.u.s.n) : NULL;
        if (e) return *e;
        val d = arg(a, 1, "default");
        return d.t == V_UNDEF ? v_none() : d;
    }
    case M_ITEMS: case M_KEYS: case M_VALUES: {
        val l = v_list(r);
        for (size_t i = 0; i < self.u.d->n; i++) {
            val k = v_str(self.u.d->k[i], self.u.d->kn[i]);
            if (f.u.fn.id == M_KEYS) l_push(r, l.u.l, k);
            else if (f.u.fn.id == M_VALUES) l_push(r, l.u.l, self.u.d->v[i]);
            else {
                val pair = v_list(r);
                l_push(r, pair.u.l, k);
                l_push(r, pair.u.l, self.u.d->v[i]);
                l_push(r, l.u.l, pair);
            }
        }
        return l;
    }
    }
    rerr(r, "unknown function");
    return v_none();
}

static int cmp_vals(R *r, val a, val b) {
    if (is_num(a) && is_num(b)) {
        double x = num(a), y = num(b);
        if (a.t != V_FLOAT && b.t != V_FLOAT) {
            long long i = a.t == V_INT ? a.u.i : a.u.b, j = b.t == V_INT ? b.u.i : b.u.b;
            return i < j ? -1 : i > j;
        }
        return x < y ? -1 : x > y;
    }
    if (a.t == V_STR && b.t == V_STR) {
        size_t n = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
        int c = memcmp(a.u.s.p, b.u.s.p, n);
        if (c) return c < 0 ? -1 : 1;
        return a.u.s.n < b.u.s.n ? -1 : a.u.s.n > b.u.s.n;
    }
    need_defined(r, a);
    need_defined(r, b);
    rerr(r, "'<' not supported between instances of '%s' and '%s'", type_name(a), type_name(b));
    return 0;
}

static int contains(R *r, val hay, val needle) {
    if (hay.t == V_STR) {
        if (needle.t != V_STR) rerr(r, "'in <string>' requires string as left operand, not %s", type_name(needle));
        return memfind(hay.u.s.p, hay.u.s.n, needle.u.s.p, needle.u.s.n) != NULL;
    }
    if (hay.t == V_LIST) {
        for (size_t i = 0; i < hay.u.l->n; i++)
            if (equal(r, hay.u.l->v[i], needle)) return 1;
        return 0;
    }
    if (hay.t == V_DICT || hay.t == V_NS) return needle.t == V_STR && d_find(hay.u.d, needle.u.s.p, needle.u.s.n);
    if (hay.t == V_UNDEF) return 0;
    rerr(r, "argument of type '%s' is not iterable", type_name(hay));
    return 0;
}

/* Python's 'fmt' % args for %s, %r, %d, %i, %f and %% */
static val str_format(R *r, val fmt, val args) {
    jlist one = {&args, 1, 1};
    jlist *l = args.t == V_LIST ? args.u.l : &one;
    size_t k = 0;
    sbuf b = {0};
    for (size_t i = 0; i < fmt.u.s.n; i++) {
        char c = fmt.u.s.p[i];
        if (c != '%') {
            sb_put(r, &b, &c, 1);
            continue;
        }
        if (++i >= fmt.u.s.n) rerr(r, "incomplete format");
        char f = fmt.u.s.p[i];
        if (f == '%') {
            sb_puts(r, &b, "%");
            continue;
        }
        if (k >= l->n) rerr(r, "not enough arguments for format string");
        val x = l->v[k++];
        if (f == 's') to_str(r, &b, x);
        else if (f == 'r') repr(r, &b, x);
        else if ((f == 'd' || f == 'i') && is_num(x)) sb_printf(r, &b, "%lld", x.t == V_FLOAT ? (long long)x.u.f : x.t == V_INT ? x.u.i : x.u.b);
        else if (f == 'f' && is_num(x)) sb_printf(r, &b, "%f", num(x));
        else rerr(r, "unsupported format character '%c'", f);
    }
    if (k < l->n) rerr(r, "not all arguments converted during string formatting");
    return v_sb(&b);
}

static val binop(R *r, int op, val a, val b) {
    if (op == OP_CAT) {
        sbuf s = {0};
        to_str(r, &s, a);
        to_str(r, &s, b);
        return v_sb(&s);
    }
    if (op == OP_EQ) return v_bool(equal(r, a, b));
    if (op == OP_NE) return v_bool(!equal(r, a, b));
    if (op == OP_IN) return v_bool(contains(r, b, a));
    if (op == OP_NOTIN) return v_bool(!contains(r, b, a));
    if (op >= OP_LT && op <= OP_GE) {
        int c = cmp_vals(r, a, b);
        return v_bool(op == OP_LT ? c < 0 : op == OP_LE ? c <= 0 : op == OP_GT ? c > 0 : c >= 0);
    }
    need_defined(r, a);
    need_defined(r, b);
    if (op == OP_MOD && a.t == V_STR) return str_format(r, a, b);
    static const char *const names[] = {"+", "-", "*", "/", "//", "%", "**"};
    if (is_num(a) && is_num(b)) {
        if (a.t != V_FLOAT && b.t != V_FLOAT && op != OP_DIV) {
            long long x = a.t == V_INT ? a.u.i : a.u.b, y = b.t == V_INT ? b.u.i : b.u.b;
            switch (op) {
            case OP_ADD: return v_int(x + y);
            case OP_SUB: return v_int(x - y);
            case OP_MUL: return v_int(x * y);
            case OP_FDIV: case OP_MOD: {
                if (y == 0) rerr(r, "integer division or modulo by zero");
                long long q = x / y, m = x % y;
                if (m != 0 && ((m < 0) != (y < 0))) { q--; m += y; }
                return v_int(op == OP_FDIV ? q : m);
            }
            case OP_POW: {
                if (y < 0) return v_float(pow((double)x, (double)y));
                long long res = 1;
                for (long long i = 0; i < y; i++) res *= x;
                return v_int(res);
            }
            }
        }
        double x = num(a), y = num(b);
        switch (op) {
        case OP_ADD: return v_float(x + y);
        case OP_SUB: return v_float(x - y);
        case OP_MUL: return v_float(x * y);
        case OP_DIV: if (y == 0) rerr(r, "division by zero"); return v_float(x / y);
        case OP_FDIV: if (y == 0) rerr(r, "float floor division by zero"); return v_float(floor(x / y));
        case OP_MOD: {
            if (y == 0) rerr(r, "float modulo");
            double m = fmod(x, y);
            if (m != 0 && ((m < 0) != (y < 0))) m += y;
            return v_float(m);
        }
        case OP_POW: return v_float(pow(x, y));
        }
    }
    if (op == OP_ADD && a.t == V_STR && b.t == V_STR) {
        sbuf s = {0};
        sb_put(r, &s, a.u.s.p, a.u.s.n);
        sb_put(r, &s, b.u.s.p, b.u.s.n);
        return v_sb(&s);
    }
    if (op == OP_ADD && a.t == V_LIST && b.t == V_LIST) {
        val l = v_list(r);
        for (size_t i = 0; i < a.u.l->n; i++) l_push(r, l.u.l, a.u.l->v[i]);
        for (size_t i = 0; i < b.u.l->n; i++) l_push(r, l.u.l, b.u.l->v[i]);
        return l;
    }
    if (op == OP_MUL && (a.t == V_STR || a.t == V_LIST) && b.t == V_INT) {
        val l = v_list(r);
        sbuf s = {0};
        for (long long k = 0; k < b.u.i; k++) {
            if (a.t == V_STR) sb_put(r, &s, a.u.s.p, a.u.s.n);
            else for (size_t i = 0; i < a.u.l->n; i++) l_push(r, l.u.l, a.u.l->v[i]);
        }
        return a.t == V_STR ? v_sb(&s) : l;
    }
    rerr(r, "unsupported operand type(s) for %s: '%s' and '%s'", names[op], type_name(a), type_name(b));
    return v_none();
}

static int run_test(R *r, int id, val v, const args *a) {
    val x = arg(a, 0, "value");
    switch (id) {
    case TS_DEFINED: return v.t != V_UNDEF;
    case TS_UNDEFINED: return v.t == V_UNDEF;
    case TS_NONE: return v.t == V_NONE;
    case TS_STRING: return v.t == V_STR;
    case TS_NUMBER: return is_num(v);
    case TS_INTEGER: return v.t == V_INT;
    case TS_FLOAT: return v.t == V_FLOAT;
    case TS_BOOLEAN: return v.t == V_BOOL;
    case TS_TRUE: return v.t == V_BOOL && v.u.b;
    case TS_FALSE: return v.t == V_BOOL && !v.u.b;
    case TS_MAPPING: return v.t == V_DICT;
    case TS_ITERABLE: return v.t == V_LIST || v.t == V_DICT || v.t == V_STR || v.t == V_UNDEF;
    case TS_SEQUENCE: return v.t == V_LIST || v.t == V_DICT || v.t == V_STR || v.t == V_UNDEF;
    case TS_CALLABLE: return v.t == V_FUNC || v.t == V_MACRO;
    case TS_ODD: case TS_EVEN: case TS_DIVISIBLEBY: {
        if (v.t != V_INT && v.t != V_BOOL) {
            need_defined(r, v);
            rerr(r, "test '%s' needs an integer, got %s", TESTS[id], type_name(v));
        }
        long long i = v.t == V_INT ? v.u.i : v.u.b;
        if (id == TS_DIVISIBLEBY) {
            long long d = to_int_arg(r, x, 0, "divisibleby argument");
            if (d == 0) rerr(r, "integer division or modulo by zero");
            return i % d == 0;
        }
        return (((i % 2) + 2) % 2) == (id == TS_ODD);
    }
    case TS_EQ: case TS_EQUALTO: return equal(r, v, x);
    case TS_NE: return !equal(r, v, x);
    case TS_LT: return cmp_vals(r, v, x) < 0;
    case TS_LE: return cmp_vals(r, v, x) <= 0;
    case TS_GT: return cmp_vals(r, v, x) > 0;
    case TS_GE: return cmp_vals(r, v, x) >= 0;
    case TS_IN: return contains(r, x, v);
    case TS_LOWER: case TS_UPPER: {
        if (v.t != V_STR) return 0;
        val c = do_case(r, v, id == TS_LOWER ? 0 : 1);
        return equal(r, c, v);
    }
    case TS_SAMEAS:
        if (v.t != x.t) return 0;
        if (v.t == V_LIST) return v.u.l == x.u.l;
        if (v.t == V_DICT || v.t == V_NS) return v.u.d == x.u.d;
        return equal(r, v, x);
    }
    return 0;
}

static val apply_filter(R *r, int id, val v, const args *a, scope *sc);

/* the attribute path "a.b" of v (for selectattr, map, join) */
static val attr_path(R *r, val v, val path) {
    if (path.t == V_INT) return get_item(r, v, path);
    if (path.t != V_STR) rerr(r, "attribute must be a string");
    const char *p = path.u.s.p, *end = p + path.u.s.n;
    while (p <= end) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        if (!dot) dot = end;
        val key = v_str(p, (size_t)(dot - p));
        int isnum = key.u.s.n > 0;
        for (size_t i = 0; i < key.u.s.n; i++) isnum &= isdigit((unsigned char)key.u.s.p[i]) != 0;
        v = isnum && v.t == V_LIST ? get_item(r, v, v_int(atoll(ja_strdup(&r->A, key.u.s.p, key.u.s.n)))) : get_item(r, v, key);
        p = dot + 1;
    }
    return v;
}

static val apply_filter(R *r, int id, val v, const args *a, scope *sc) {
    (void)sc;
    switch (id) {
    case FL_TRIM: return do_strip(r, v, arg(a, 0, "chars"), 1, 1);
    case FL_LENGTH: case FL_COUNT:
        switch (v.t) {
        case V_STR: return v_int((long long)u8_len(v.u.s.p, v.u.s.n));
        case V_LIST: return v_int((long long)v.u.l->n);
        case V_DICT: case V_NS: return v_int((long long)v.u.d->n);
        case V_UNDEF: return v_int(0);
        default: rerr(r, "object of type '%s' has no len()", type_name(v));
        }
        break;
    case FL_TOJSON: {
        jopts o = {-1, 0, 0, ", ", ": "};
        val ea = arg(a, 0, "ensure_ascii"), ind = arg(a, 1, "indent"), seps = arg(a, 2, "separators"),
            sk = arg(a, 3, "sort_keys");
        o.ensure_ascii = truthy(ea);
        if (ind.t == V_INT) {
            o.indent = (int)(ind.u.i < 0 ? 0 : ind.u.i);
            o.item_sep = ",";
        } else if (ind.t != V_UNDEF && ind.t != V_NONE) rerr(r, "tojson indent must be an integer");
        if (seps.t == V_LIST && seps.u.l->n == 2 && seps.u.l->v[0].t == V_STR && seps.u.l->v[1].t == V_STR) {
            o.item_sep = ja_strdup(&r->A, seps.u.l->v[0].u.s.p, seps.u.l->v[0].u.s.n);
            o.key_sep = ja_strdup(&r->A, seps.u.l->v[1].u.s.p, seps.u.l->v[1].u.s.n);
        } else if (seps.t != V_UNDEF && seps.t != V_NONE) rerr(r, "tojson separators must be a pair of strings");
        o.sort_keys = truthy(sk);
        sbuf b = {0};
        to_json(r, &b, v, &o, 0);
        return v_sb(&b);
    }
    case FL_ITEMS: {
        if (v.t == V_UNDEF) return v_list(r);
        if (v.t != V_DICT && v.t != V_NS) rerr(r, "items filter: can only get item pairs from a mapping, got %s", type_name(v));
        val self = v;
        self.t = V_DICT;
        val f = get_method(r, self, "items");
        args none = {0};
        return call(r, f, &none);
    }
    case FL_STRING: case FL_SAFE: return str_of(r, v);
    case FL_LOWER: return do_case(r, v, 0);
    case FL_UPPER: return do_case(r, v, 1);
    case FL_CAPITALIZE: return do_case(r, v, 2);
    case FL_TITLE: return do_case(r, v, 3);
    case FL_DEFAULT: case FL_D: {
        val d = arg(a, 0, "default_value");
        if (d.t == V_UNDEF) d = v_str("", 0);
        if (v.t == V_UNDEF || (truthy(arg(a, 1, "boolean")) && !truthy(v))) return d;
        return v;
    }
    case FL_JOIN: {
        jlist *l = iter_list(r, v);
        val sep = arg(a, 0, "d"), at = arg(a, 1, "attribute");
        sbuf b = {0};
        for (size_t i = 0; i < l->n; i++) {
            if (i && sep.t != V_UNDEF) to_str(r, &b, sep);
            to_str(r, &b, at.t != V_UNDEF ? attr_path(r, l->v[i], at) : l->v[i]);
        }
        return v_sb(&b);
    }
    case FL_FIRST: case FL_LAST: {
        jlist *l = iter_list(r, v);
        if (!l->n) return v_undef(NULL);
        return l->v[id == FL_FIRST ? 0 : l->n - 1];
    }
    case FL_REVERSE: {
        if (v.t == V_STR) return do_slice(r, v, v_undef(NULL), v_undef(NULL), v_int(-1));
        jlist *l = iter_list(r, v);
        val o = v_list(r);
        for (size_t i = l->n; i-- > 0;) l_push(r, o.u.l, l->v[i]);
        return o;
    }
    case FL_REPLACE: return do_replace(r, v, arg(a, 0, "old"), arg(a, 1, "new"), to_int_arg(r, arg(a, 2, "count"), -1, "count"));
    case FL_LIST: {
        jlist *l = iter_list(r, v);
        val o = v_list(r);
        for (size_t i = 0; i < l->n; i++) l_push(r, o.u.l, l->v[i]);
        return o;
    }
    case FL_INT: case FL_FLOAT: {
        val d = arg(a, 0, "default");
        if (d.t == V_UNDEF) d = id == FL_INT ? v_int(0) : v_float(0);
        if (v.t == V_INT || v.t == V_BOOL) return id == FL_INT ? v_int(v.t == V_INT ? v.u.i : v.u.b) : v_float(num(v));
        if (v.t == V_FLOAT) return id == FL_INT ? v_int((long long)v.u.f) : v;
        if (v.t == V_STR) {
            char *s = ja_strdup(&r->A, v.u.s.p, v.u.s.n), *e;
            double f = strtod(s, &e);
            while (*e && isspace((unsigned char)*e)) e++;
            if (e == s || *e) return d;
            return id == FL_INT ? v_int((long long)f) : v_float(f);
        }
        return d;
    }
    case FL_ABS:
        if (v.t == V_INT) return v_int(v.u.i < 0 ? -v.u.i : v.u.i);
        if (v.t == V_FLOAT) return v_float(fabs(v.u.f));
        if (v.t == V_BOOL) return v_int(v.u.b);
        rerr(r, "bad operand type for abs(): '%s'", type_name(v));
        break;
    case FL_SELECTATTR: case FL_REJECTATTR: case FL_SELECT: case FL_REJECT: {
        int byattr = id == FL_SELECTATTR || id == FL_REJECTATTR, sel = id == FL_SELECTATTR || id == FL_SELECT;
        jlist *l = iter_list(r, v);
        int k0 = byattr ? 1 : 0;
        val at = byattr ? arg(a, 0, "attribute") : v_undef(NULL);
        val tn = a->npos > k0 ? a->pos[k0] : v_undef(NULL);
        int tid = -1;
        if (tn.t == V_STR) {
            tid = jinja_test_id(ja_strdup(&r->A, tn.u.s.p, tn.u.s.n));
            if (tid < 0) rerr(r, "unknown test '%.*s'", (int)tn.u.s.n, tn.u.s.p);
        }
        args ta = {0};
        for (int i = k0 + 1; i < a->npos; i++) ta.pos[ta.npos++] = a->pos[i];
        val o = v_list(r);
        for (size_t i = 0; i < l->n; i++) {
            val x = byattr ? attr_path(r, l->v[i], at) : l->v[i];
            int ok = tid < 0 ? truthy(x) : run_test(r, tid, x, &ta);
            if (ok == sel) l_push(r, o.u.l, l->v[i]);
        }
        return o;
    }
    case FL_MAP: {
        jlist *l = iter_list(r, v);
        val o = v_list(r);
        val at = arg(a, -1, "attribute");
        if (at.t != V_UNDEF) {
            val dflt = arg(a, -1, "default");
            for (size_t i = 0; i < l->n; i++) {
                val x = attr_path(r, l->v[i], at);
                l_push(r, o.u.l, x.t == V_UNDEF && dflt.t != V_UNDEF ? dflt : x);
            }
            return o;
        }
        if (a->npos < 1 || a->pos[0].t != V_STR) rerr(r, "map needs a filter name or attribute=");
        int fid = jinja_filter_id(ja_strdup(&r->A, a->pos[0].u.s.p, a->pos[0].u.s.n));
        if (fid < 0) rerr(r, "unknown filter '%.*s'", (int)a->pos[0].u.s.n, a->pos[0].u.s.p);
        args fa = *a;
        fa.npos--;
        memmove(fa.pos, fa.pos + 1, (size_t)fa.npos * sizeof(val));
        for (size_t i = 0; i < l->n; i++) l_push(r, o.u.l, apply_filter(r, fid, l->v[i], &fa, sc));
        return o;
    }
    case FL_UNIQUE: {
        jlist *l = iter_list(r, v);
        val o = v_list(r);
        for (size_t i = 0; i < l->n; i++)
            if (!contains(r, o, l->v[i])) l_push(r, o.u.l, l->v[i]);
        return o;
    }
    case FL_SORT: case FL_DICTSORT: {
        val src = v;
        if (id == FL_DICTSORT) {
            if (v.t != V_DICT) rerr(r, "dictsort needs a mapping");
            args none = {0};
            src = call(r, get_method(r, v, "items"), &none);
        }
        jlist *l = iter_list(r, src);
        val o = v_list(r);
        for (size_t i = 0; i < l->n; i++) l_push(r, o.u.l, l->v[i]);
        int rev = truthy(arg(a, id == FL_SORT ? 0 : 2, "reverse"));
        val at = id == FL_SORT ? arg(a, 2, "attribute") : v_undef(NULL);
        /* insertion sort (stable); case-insensitive for strings like jinja2's default */
        for (size_t i = 1; i < o.u.l->n; i++) {
            val x = o.u.l->v[i];
            size_t j = i;
            while (j > 0) {
                val ka = o.u.l->v[j - 1], kb = x;
                if (id == FL_DICTSORT) { ka = ka.u.l->v[0]; kb = kb.u.l->v[0]; }
                if (at.t != V_UNDEF) { ka = attr_path(r, ka, at); kb = attr_path(r, kb, at); }
                if (ka.t == V_STR) ka = do_case(r, ka, 0);
                if (kb.t == V_STR) kb = do_case(r, kb, 0);
                int c = cmp_vals(r, ka, kb);
                if (rev ? c >= 0 : c <= 0) break;
                o.u.l->v[j] = o.u.l->v[j - 1];
                j--;
            }
            o.u.l->v[j] = x;
        }
        return o;
    }
    case FL_ROUND: {
        long long prec = to_int_arg(r, arg(a, 0, "precision"), 0, "precision");
        val mv = arg(a, 1, "method");
        if (!is_num(v)) rerr(r, "round needs a number, got %s", type_name(v));
        double x = num(v), sc = pow(10.0, (double)prec), y = x * sc;
        const char *m = mv.t == V_STR ? mv.u.s.p : "common";
        if (!strncmp(m, "floor", 5)) y = floor(y);
        else if (!strncmp(m, "ceil", 4)) y = ceil(y);
        else { /* Python round(): half to even on the decimal value */
            double fl = floor(y), diff = y - fl;
            y = diff > 0.5 ? fl + 1 : diff < 0.5 ? fl : (fmod(fl, 2) == 0 ? fl : fl + 1);
        }
        return v_float(y / sc);
    }
    case FL_SUM: {
        jlist *l = iter_list(r, v);
        val at = arg(a, 0, "attribute"), acc = arg(a, 1, "start");
        if (acc.t == V_UNDEF) acc = v_int(0);
        for (size_t i = 0; i < l->n; i++) acc = binop(r, OP_ADD, acc, at.t != V_UNDEF ? attr_path(r, l->v[i], at) : l->v[i]);
        return acc;
    }
    case FL_INDENT: {
        val w = arg(a, 0, "width");
        int first = truthy(arg(a, 1, "first")), blank = truthy(arg(a, 2, "blank"));
        sbuf pad = {0};
        if (w.t == V_STR) sb_put(r, &pad, w.u.s.p, w.u.s.n);
        else for (long long k = to_int_arg(r, w, 4, "width"); k > 0; k--) sb_puts(r, &pad, " ");
        v = str_of(r, v);
        sbuf b = {0};
        const char *p = v.u.s.p, *end = p + v.u.s.n;
        int line0 = 1;
        while (p <= end) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            const char *e = nl ? nl : end;
            int empty = e == p;
            if ((line0 ? first : 1) && (blank || !empty) && pad.n) sb_put(r, &b, pad.p, pad.n);
            sb_put(r, &b, p, (size_t)(e - p));
            if (!nl) break;
            sb_puts(r, &b, "\n");
            p = nl + 1;
            line0 = 0;
        }
        return v_sb(&b);
    }
    }
    rerr(r, "filter not implemented");
    return v_none();
}

static val eval_node(R *r, const jnode *n, scope *sc);
static val eval(R *r, const jnode *n, scope *sc) {
    nest_in(r);
    val v = eval_node(r, n, sc);
    r->nest--;
    return v;
}

static val eval_node(R *r, const jnode *n, scope *sc) {
    r->line = n->line ? n->line : r->line;
    switch (n->kind) {
    case E_LIT: return n->lit;
    case E_NAME: return lookup(r, sc, n->s, n->slen);
    case E_BLOCKVAL: return r->blockval;
    case E_ATTR: {
        val o = eval(r, n->a, sc);
        r->line = n->line;
        return get_attr(r, o, n->s, n->slen);
    }
    case E_ITEM: {
        val o = eval(r, n->a, sc);
        val k = eval(r, n->b, sc);
        r->line = n->line;
        return get_item(r, o, k);
    }
    case E_SLICE: {
        val o = eval(r, n->a, sc);
        val p[3];
        for (int i = 0; i < 3; i++) p[i] = n->list[i] ? eval(r, n->list[i], sc) : v_undef(NULL);
        r->line = n->line;
        return do_slice(r, o, p[0], p[1], p[2]);
    }
    case E_CALL: {
        val f = eval(r, n->a, sc);
        args a;
        eval_args(r, n, sc, &a);
        r->line = n->line;
        return call(r, f, &a);
    }
    case E_FILTER: {
        val v = eval(r, n->a, sc);
        args a;
        eval_args(r, n, sc, &a);
        r->line = n->line;
        return apply_filter(r, n->id, v, &a, sc);
    }
    case E_TEST: {
        val v = eval(r, n->a, sc);
        args a;
        eval_args(r, n, sc, &a);
        r->line = n->line;
        return v_bool(run_test(r, n->id, v, &a) != n->neg);
    }
    case E_NEG: case E_POS: {
        val v = eval(r, n->a, sc);
        r->line = n->line;
        if (v.t == V_INT) return v_int(n->kind == E_NEG ? -v.u.i : v.u.i);
        if (v.t == V_FLOAT) return v_float(n->kind == E_NEG ? -v.u.f : v.u.f);
        if (v.t == V_BOOL) return v_int(n->kind == E_NEG ? -v.u.b : v.u.b);
        need_defined(r, v);
        rerr(r, "bad operand type for unary %s: '%s'", n->kind == E_NEG ? "-" : "+", type_name(v));
        break;
    }
    case E_NOT: return v_bool(!truthy(eval(r, n->a, sc)));
    case E_AND: {
        val a = eval(r, n->a, sc);
        return truthy(a) ? eval(r, n->b, sc) : a;
    }
    case E_OR: {
        val a = eval(r, n->a, sc);
        return truthy(a) ? a : eval(r, n->b, sc);
    }
    case E_COND:
        if (truthy(eval(r, n->a, sc))) return eval(r, n->b, sc);
        return n->c ? eval(r, n->c, sc) : v_undef(NULL);
    case E_BIN: {
        val a = eval(r, n->a, sc);
        val b = eval(r, n->b, sc);
        r->line = n->line;
        return binop(r, n->op, a, b);
    }
    case E_LIST: {
        val l = v_list(r);
        for (int i = 0; i < n->n; i++) l_push(r, l.u.l, eval(r, n->list[i], sc));
        return l;
    }
    case E_DICT: {
        val d = v_dict(r, V_DICT);
        for (int i = 0; i < n->n; i++) {
            val k = eval(r, n->list[i], sc);
            if (k.t != V_STR) rerr(r, "dict keys must be strings here");
            d_set(r, d.u.d, k.u.s.p, k.u.s.n, eval(r, n->list2[i], sc));
        }
        return d;
    }
    }
    rerr(r, "bad expression node");
    return v_none();
}

static void assign(R *r, scope *sc, const char *const *names, int nn, val v) {
    if (nn == 1) {
        d_sets(r, &sc->vars, names[0], v);
        return;
    }
    jlist *l = v.t == V_LIST ? v.u.l : iter_list(r, v);
    if ((int)l->n != nn)
        rerr(r, "%s values to unpack (expected %d, got %zu)", (int)l->n > nn ? "too many" : "not enough", nn, l->n);
    for (int i = 0; i < nn; i++) d_sets(r, &sc->vars, names[i], l->v[i]);
}

static void exec_for(R *r, const jnode *n, scope *sc, sbuf *out) {
    val it = eval(r, n->a, sc);
    r->line = n->line;
    if (it.t == V_NONE) rerr(r, "'NoneType' object is not iterable");
    jlist *items = iter_list(r, it);
    if (n->c) { /* {% for x in xs if cond %} */
        jlist *f = ja_alloc(&r->A, sizeof *f);
        for (size_t i = 0; i < items->n; i++) {
            scope *s = ja_alloc(&r->A, sizeof *s);
            s->parent = sc;
            assign(r, s, n->names, n->nn, items->v[i]);
            if (truthy(eval(r, n->c, s))) l_push(r, f, items->v[i]);
        }
        items = f;
    }
    if (items->n == 0) {
        exec_body(r, n->list2, n->n2, sc, out);
        return;
    }
    size_t len = items->n;
    for (size_t i = 0; i < len; i++) {
        scope *s = ja_alloc(&r->A, sizeof *s);
        s->parent = sc;
        val loop = v_dict(r, V_NS);
        jdict *d = loop.u.d;
        d_sets(r, d, "index", v_int((long long)i + 1));
        d_sets(r, d, "index0", v_int((long long)i));
        d_sets(r, d, "revindex", v_int((long long)(len - i)));
        d_sets(r, d, "revindex0", v_int((long long)(len - i - 1)));
        d_sets(r, d, "first", v_bool(i == 0));
        d_sets(r, d, "last", v_bool(i == len - 1));
        d_sets(r, d, "length", v_int((long long)len));
        d_sets(r, d, "depth", v_int(1));
        d_sets(r, d, "depth0", v_int(0));
        if (i > 0) d_sets(r, d, "previtem", items->v[i - 1]);
        if (i + 1 < len) d_sets(r, d, "nextitem", items->v[i + 1]);
        d_sets(r, &s->vars, "loop", loop);
        assign(r, s, n->names, n->nn, items->v[i]);
        exec_body(r, n->list, n->n, s, out);
        if (r->brk == 1) {
            r->brk = 0;
            break;
        }
        r->brk = 0;
    }
}

static void exec_body(R *r, jnode **list, int count, scope *sc, sbuf *out) {
    nest_in(r);
    for (int i = 0; i < count && !r->brk; i++) {
        const jnode *n = list[i];
        r->line = n->line;
        switch (n->kind) {
        case N_TEXT: sb_put(r, out, n->s, n->slen); break;
        case N_OUT: to_str(r, out, eval(r, n->a, sc)); break;
        case N_BODY: exec_body(r, n->list, n->n, sc, out); break;
        case N_IF:
            if (truthy(eval(r, n->a, sc))) exec_body(r, n->list, n->n, sc, out);
            else exec_body(r, n->list2, n->n2, sc, out);
            break;
        case N_FOR: exec_for(r, n, sc, out); break;
        case N_SET: {
            val v = eval(r, n->a, sc);
            r->line = n->line;
            if (n->s) { /* set ns.attr = v */
                val ns = lookup(r, sc, n->names[0], strlen(n->names[0]));
                if (ns.t != V_NS) rerr(r, "cannot assign attribute on non-namespace object '%s'", n->names[0]);
                d_sets(r, ns.u.d, n->s, v);
            } else {
                assign(r, sc, n->names, n->nn, v);
            }
            break;
        }
        case N_SETBLOCK: {
            sbuf b = {0};
            exec_body(r, n->list, n->n, sc, &b);
            d_sets(r, &sc->vars, n->s, v_sb(&b));
            break;
        }
        case N_MACRO: {
            val m = {.t = V_MACRO};
            m.u.m.node = n;
            m.u.m.scope = sc;
            d_sets(r, &sc->vars, n->s, m);
            break;
        }
        case N_BREAK: r->brk = 1; break;
        case N_CONTINUE: r->brk = 2; break;
        case N_FILTERBLOCK: {
            sbuf b = {0};
            exec_body(r, n->list, n->n, sc, &b);
            val saved = r->blockval;
            r->blockval = v_sb(&b);
            to_str(r, out, eval(r, n->a, sc));
            r->blockval = saved;
            break;
        }
        default: rerr(r, "bad statement node");
        }
    }
    r->nest--;
}

int jinja_render(const jinja_template *t, const json_t *ctx, char **out, size_t *len) {
    *out = NULL;
    if (len) *len = 0;
    if (ctx && !json_is_object(ctx)) return dt_err("%s: render context must be a JSON object", t->name);
    R *r = calloc(1, sizeof *r);
    if (!r) return dt_err("out of memory");
    r->t = t;
    r->A.oom = &r->jb;
    if (setjmp(r->jb)) {
        ja_free(&r->A);
        free(r);
        return -1;
    }
    scope *g = ja_alloc(&r->A, sizeof *g);
    r->globals = g;
    static const struct { const char *name; int id; } fns[] = {
        {"raise_exception", F_RAISE}, {"namespace", F_NAMESPACE}, {"range", F_RANGE}, {"dict", F_DICT},
        {"strftime_now", F_STRFTIME}};
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
        val f = {.t = V_FUNC};
        f.u.fn.id = fns[i].id;
        d_sets(r, &g->vars, fns[i].name, f);
    }
    if (ctx) {
        const char *k;
        json_t *x;
        void *tmp;
        json_object_foreach_safe((json_t *)ctx, tmp, k, x) d_sets(r, &g->vars, k, from_json(r, x));
    }
    sbuf b = {0};
    exec_body(r, t->root->list, t->root->n, g, &b);
    char *res = malloc(b.n + 1);
    if (!res) {
        ja_free(&r->A);
        free(r);
        return dt_err("out of memory");
    }
    if (b.n) memcpy(res, b.p, b.n);
    res[b.n] = 0;
    *out = res;
    if (len) *len = b.n;
    ja_free(&r->A);
    free(r);
    return 0;
}
