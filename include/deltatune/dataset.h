/* Training and evaluation rows from JSONL, one object per line. The format is detected per
 * row, and every row of a file must be in the first row's format:
 *   tokenized   {"input_ids": [...], "labels": [...]}   (labels optional: absent = input_ids)
 *   chat        {"messages": [{"role", "content", "tool_calls", "reasoning_content"}...], "tools"?}
 *   sharegpt    {"conversations": [{"from", "value"}...]}  from: system; human/user; gpt/assistant/
 *               model/bot; tool/function/observation/function_response -> system/user/assistant/tool
 *   alpaca      {"instruction", "input"?, "output", "system"?}  -> user = instruction (+ "\n\n" +
 *               input when non-empty), assistant = output (as Unsloth and TRL), system if given
 *   completion  {"prompt", "completion"}: strings (plain text, see chat.h), or both message lists
 *               (TRL's conversational form: rendered as prompt + completion, the last assistant turn
 *               trains)
 *   text        {"text"}
 * Every format but tokenized needs the model's tokenizer (chat.h, which gives the label rule).
 * Hugging Face convention: labels are aligned with input_ids; the shift happens in the loss;
 * -100 is ignored. */
#ifndef DELTATUNE_DATASET_H
#define DELTATUNE_DATASET_H

#include <stdbool.h>
#include <stdint.h>

#include "deltatune/chat.h"

#define DT_IGNORE_INDEX (-100)

typedef struct {
    int32_t *input_ids;
    int32_t *labels;
    int len;
    int line;         /* 1-based line in the source file, for messages */
} dt_row;

typedef enum { DT_FMT_TOKENIZED, DT_FMT_CHAT, DT_FMT_SHAREGPT, DT_FMT_ALPACA, DT_FMT_COMPLETION, DT_FMT_TEXT } dt_format;
/* "tokenized", "chat", ... */
const char *dataset_format_name(dt_format f);

typedef struct {
    char *path;
    dt_format format;
    int n_truncated;       /* rows cut to max_seq_len */
    dt_row *rows;
    int n_rows;
    int64_t n_tokens;      /* sum of lengths */
    int64_t n_targets;     /* labels that count after the shift: labels[1..len-1] != -100 */
} dt_dataset;

/* Errors name the file and line: malformed JSON, missing input_ids, non-integer ids,
 * labels length != input_ids length, ids outside [0, vocab_size), labels outside
 * [0, vocab_size) other than -100, empty rows, an empty file. Blank lines are skipped. */
int dataset_load_tokenized(dt_dataset *d, const char *path, int vocab_size);

typedef struct {
    const dt_chat *chat;       /* the model's tokenizer and template; NULL: only tokenized rows load */
    const char *model_dir;     /* for the message when chat is NULL */
    int vocab_size;            /* ids must be below it; 0: the tokenizer's size */
    int max_seq_len;           /* longer rows are cut and counted in n_truncated; 0: no limit */
    dt_train_on train_on;
    bool enable_thinking;
} dt_data_opts;

/* Any format. Errors name the file and line and the reason (invalid JSON or UTF-8, a row in
 * another format than the first, a missing field, a role the template does not know, a
 * template that raises, ...). A dataset in which no label would count (n_targets == 0) is an
 * error. */
int dataset_load(dt_dataset *d, const char *path, const dt_data_opts *o);
void dataset_free(dt_dataset *d);

#endif
