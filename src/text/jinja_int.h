/* Internals shared by the Jinja lexer/parser (jinja_parse.c) and evaluator (jinja.c). */
#ifndef DT_JINJA_INT_H
#define DT_JINJA_INT_H

#include <setjmp.h>
#include <stddef.h>

#include "deltatune/jinja.h"

/* ---- arena: everything of one parse or one render lives in one, freed at once ---- */
typedef struct jarena_chunk {
    struct jarena_chunk *next;
    size_t used, cap;
    max_align_t data[];
} jarena_chunk;
typedef struct {
    jarena_chunk *head;
    jmp_buf *oom; /* longjmp target on allocation failure */
} jarena;
void *ja_alloc(jarena *a, size_t n);
char *ja_strdup(jarena *a, const char *s, size_t n);
void ja_free(jarena *a);

/* ---- values ---- */
enum { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_NS, V_MACRO, V_FUNC };
typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jnode jnode;
typedef struct val {
    int t;
    union {
        int b;
        long long i;
        double f;
        struct { const char *p; size_t n; } s;
        jlist *l;
        jdict *d;        /* V_DICT and V_NS */
        struct { const jnode *node; void *scope; } m; /* V_MACRO: its definition and defining scope */
        struct { int id; struct val *self; } fn;
    } u;
} val;
struct jlist { val *v; size_t n, cap; };
struct jdict { const char **k; size_t *kn; val *v; size_t n, cap; };

/* ---- AST ---- */
enum {
    /* statements */
    N_TEXT, N_OUT, N_IF, N_FOR, N_SET, N_SETBLOCK, N_MACRO, N_BREAK, N_CONTINUE, N_FILTERBLOCK, N_BODY,
    /* expressions */
    E_LIT, E_NAME, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST, E_NEG, E_POS, E_NOT, E_BIN, E_AND, E_OR,
    E_COND, E_LIST, E_DICT, E_BLOCKVAL
};
enum { OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_FDIV, OP_MOD, OP_POW, OP_CAT, OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE,
       OP_IN, OP_NOTIN };

struct jnode {
    int kind, line, op, neg;
    jnode *a, *b, *c;
    jnode **list; int n;        /* body / args / items / dict keys */
    jnode **list2; int n2;      /* else body / kw values / dict values / macro defaults */
    const char **names; int nn; /* kw names / for targets / macro params */
    const char *s; size_t slen; /* name, attribute, filter or test name */
    int id;                     /* filter / test id */
    val lit;
};

struct jinja_template {
    jarena arena;
    jnode *root;
    char *name;
};

/* filter and test ids; -1 when unknown */
int jinja_filter_id(const char *name);
int jinja_test_id(const char *name);

#endif
