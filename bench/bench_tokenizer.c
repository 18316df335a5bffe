/* Tokenizer throughput, single thread: the corpus (one {"text": ...} per line) repeated to about
 * MB megabytes, encoded one line (document) at a time.
 *
 *   deltatune_bench_tokenizer DIR CORPUS.jsonl [MB]
 *   node tests/text/tokenize_ref.mjs DIR CORPUS.jsonl --bench MB     (the reference, same text) */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "deltatune/error.h"
#include "deltatune/tokenizer.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s DIR CORPUS.jsonl [MB]\n", argv[0]);
        return 2;
    }
    double mb = argc > 3 ? atof(argv[3]) : 4;
    double t0 = now();
    dt_tokenizer *t;
    if (tokenizer_load(&t, argv[1])) {
        fprintf(stderr, "%s\n", dt_errmsg());
        return 1;
    }
    double t_load = now() - t0;
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open\n", argv[2]);
        return 1;
    }
    /* the corpus joined with "\n", as the reference does */
    char *one = NULL, *line = NULL;
    size_t n1 = 0, cap = 0;
    ssize_t r;
    while ((r = getline(&line, &cap, f)) > 0) {
        json_error_t e;
        json_t *o = json_loadb(line, (size_t)r, 0, &e);
        const char *s = json_string_value(json_object_get(o, "text"));
        if (s) {
            size_t l = strlen(s);
            one = realloc(one, n1 + l + 1);
            if (n1) one[n1++] = '\n';
            memcpy(one + n1, s, l);
            n1 += l;
        }
        json_decref(o);
    }
    fclose(f);
    free(line);
    size_t reps = (size_t)(mb * 1e6 / (double)(n1 + 1)) + 1;
    size_t n = reps * n1;
    char *big = malloc(n + 1);
    for (size_t i = 0; i < reps; i++) memcpy(big + i * n1, one, n1);
    big[n] = 0;
    /* documents: the text between newlines, like the reference's split("\n") (the reps join without one) */
    dt_ids ids = {0};
    long tokens = 0;
    t0 = now();
    size_t a = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || big[i] == '\n') {
            ids.n = 0;
            if (tokenizer_encode(t, big + a, i - a, false, &ids)) {
                fprintf(stderr, "%s\n", dt_errmsg());
                return 1;
            }
            tokens += ids.n;
            a = i + 1;
        }
    }
    double s = now() - t0;
    printf("C:   %.1f MB, %ld tokens, %.2f s, %.2f MB/s (load %.2f s)\n", (double)n / 1e6, tokens, s, (double)n / 1e6 / s,
           t_load);
    dt_ids_free(&ids);
    free(big);
    free(one);
    tokenizer_free(t);
    return 0;
}
