/* Training and evaluation rows. For now: pre-tokenized JSONL,
 * one {"input_ids": [...], "labels": [...]} object per line (labels optional:
 * absent means labels = input_ids). Hugging Face convention: labels are aligned
 * with input_ids; the shift happens in the loss; -100 is ignored. */
#ifndef DELTATUNE_DATASET_H
#define DELTATUNE_DATASET_H

#include <stdint.h>

#define DT_IGNORE_INDEX (-100)

typedef struct {
    int32_t *input_ids;
    int32_t *labels;
    int len;
    int line;         /* 1-based line in the source file, for messages */
} dt_row;

typedef struct {
    char *path;
    dt_row *rows;
    int n_rows;
    int64_t n_tokens;      /* sum of lengths */
    int64_t n_targets;     /* labels that count after the shift: labels[1..len-1] != -100 */
} dt_dataset;

/* Errors name the file and line: malformed JSON, missing input_ids, non-integer ids,
 * labels length != input_ids length, ids outside [0, vocab_size), labels outside
 * [0, vocab_size) other than -100, empty rows, an empty file. Blank lines are skipped. */
int dataset_load_tokenized(dt_dataset *d, const char *path, int vocab_size);
void dataset_free(dt_dataset *d);

#endif
