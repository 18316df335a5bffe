#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "deltatune/dataset.h"
#include "deltatune/error.h"
#include "test.h"

/* Writes text to a fresh temporary file; the caller unlinks path. */
static int write_tmp(char *path, size_t cap, const char *text) {
    snprintf(path, cap, "/tmp/dt_test_dataset_XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0) return -1;
    size_t n = strlen(text);
    ssize_t w = write(fd, text, n);
    close(fd);
    return w == (ssize_t)n ? 0 : -1;
}

/* Loads text as a dataset with vocab 100; returns the loader's result. */
static int load_text(dt_dataset *d, const char *text, char *path, size_t cap) {
    if (write_tmp(path, cap, text)) return dt_err("cannot write a temporary file");
    return dataset_load_tokenized(d, path, 100);
}

/* Expects loading text to fail with a message containing needle (and the file name). */
static int fails_with(const char *text, const char *needle, char *msg, size_t cap) {
    char path[64];
    dt_dataset d;
    int rc = load_text(&d, text, path, sizeof path);
    snprintf(msg, cap, "%s", dt_errmsg());
    unlink(path);
    if (rc == 0) {
        dataset_free(&d);
        snprintf(msg, cap, "loaded without error");
        return 0;
    }
    return strstr(msg, needle) && strstr(msg, path);
}

TEST(dataset_loads_rows_with_and_without_labels) {
    char path[64];
    dt_dataset d;
    const char *text = "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2, 3]}\n"
                       "\n"
                       "   \n"
                       "{\"input_ids\": [4, 5], \"attention_mask\": [1, 1]}\r\n"
                       "{\"input_ids\": [99], \"labels\": null}";  /* no final newline */
    int rc = load_text(&d, text, path, sizeof path);
    unlink(path);
    CHECK_OK(rc);
    CHECK(d.n_rows == 3);
    CHECK(d.n_tokens == 6);
    /* row 1: labels[1..2] = 2 targets; row 2: labels = ids, 1 target; row 3: none */
    CHECK(d.n_targets == 3);
    CHECK(d.rows[0].len == 3 && d.rows[0].labels[0] == DT_IGNORE_INDEX && d.rows[0].labels[2] == 3);
    CHECK(d.rows[1].line == 4 && d.rows[1].len == 2);
    CHECK(d.rows[1].input_ids[0] == 4 && d.rows[1].labels[0] == 4 && d.rows[1].labels[1] == 5);
    CHECK(d.rows[2].line == 5 && d.rows[2].input_ids[0] == 99);
    CHECK(strcmp(d.path, path) == 0);
    dataset_free(&d);
    CHECK(d.rows == NULL && d.n_rows == 0);
}

TEST(dataset_skips_byte_order_mark) {
    char path[64];
    dt_dataset d;
    int rc = load_text(&d, "\xEF\xBB\xBF{\"input_ids\": [7, 8]}\n", path, sizeof path);
    unlink(path);
    CHECK_OK(rc);
    CHECK(d.n_rows == 1 && d.rows[0].input_ids[1] == 8);
    dataset_free(&d);
}

TEST(dataset_errors_name_file_line_and_cause) {
    char msg[2048];
    static const struct { const char *text, *needle; } cases[] = {
        {"{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2\n", ":2: invalid JSON at column"},
        {"{\"input_ids\": [1]} trailing\n", ":1: invalid JSON"},
        {"\n\n{\"input_ids\": [1, 2, 3, 4, 5, 6], \"labels\": [1, 2, 3, 4, 5]}\n",
         ":3: labels has 5 entries, input_ids has 6"},
        {"{\"input_ids\": [1, 100]}\n", ":1: input_ids[1] = 100 is outside the vocabulary [0, 100)"},
        {"{\"input_ids\": [-1]}\n", "input_ids[0] = -1 is outside"},
        {"{\"input_ids\": [1, 2], \"labels\": [-100, -5]}\n", "labels[1] = -5 is outside"},
        {"{\"input_ids\": [1, 2], \"labels\": [1, 100]}\n", "labels[1] = 100 is outside"},
        {"{\"input_ids\": [1, 2.5]}\n", "input_ids[1] is not an integer"},
        {"{\"input_ids\": [1, \"2\"]}\n", "input_ids[1] is not an integer"},
        {"{\"input_ids\": [1, 99999999999999999999]}\n", "invalid JSON"},
        {"{\"input_ids\": []}\n", ":1: input_ids is empty"},
        {"{\"labels\": [1]}\n", ":1: missing input_ids"},
        {"{\"input_ids\": 5}\n", "input_ids is not an array"},
        {"{\"input_ids\": [1], \"labels\": 3}\n", "labels is not an array"},
        {"[1, 2, 3]\n", ":1: expected a JSON object"},
        {"{\"input_ids\": [1], \"input_ids\": [2]}\n", ":1: invalid JSON"},
        {"", "no rows"},
        {"\n  \n\n", "no rows"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECKF(fails_with(cases[i].text, cases[i].needle, msg, sizeof msg), "case %zu: \"%s\" lacks \"%s\" or the path",
               i, msg, cases[i].needle);
}

TEST(dataset_missing_file_named) {
    dt_dataset d;
    CHECK_ERR(dataset_load_tokenized(&d, "/nonexistent/dir/data.jsonl", 100), "/nonexistent/dir/data.jsonl");
}

TEST(dataset_long_row) {
    /* Longer than any fixed line buffer would be. */
    size_t n = 100000;
    char *text = malloc(n * 4 + 64), path[64];
    CHECK(text);
    size_t off = (size_t)sprintf(text, "{\"input_ids\": [");
    for (size_t i = 0; i < n; i++) off += (size_t)sprintf(text + off, i ? ",%zu" : "%zu", i % 100);
    sprintf(text + off, "]}\n");
    dt_dataset d;
    int rc = load_text(&d, text, path, sizeof path);
    free(text);
    unlink(path);
    CHECK_OK(rc);
    CHECK(d.n_rows == 1 && d.rows[0].len == (int)n && d.n_targets == (int64_t)n - 1);
    CHECK(d.rows[0].input_ids[n - 1] == (int32_t)((n - 1) % 100));
    dataset_free(&d);
}
