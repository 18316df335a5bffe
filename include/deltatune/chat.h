/* Chat rows to token ids and labels: renders messages with the model's own chat template
 * (chat_template.jinja, else tokenizer_config.json "chat_template"), tokenizes the text
 * (added tokens matched) and marks which tokens train.
 *
 * The label rule (--train-on assistant, the default):
 *  - ChatML templates (the tokenizer has <|im_start|> and <|im_end|>, and the rendering holds
 *    "<|im_start|>assistant"): the rendered conversation is tokenized once, and every token of
 *    each assistant turn after its "<|im_start|>assistant\n" header, through its closing
 *    <|im_end|>, trains; everything else is -100. The "\n" after <|im_end|> does not train. The
 *    think block the Qwen3.5 template writes into the turns after the last user query (the
 *    closed "<think>\n\n</think>\n\n" when there is no reasoning) is inside the span, so it
 *    trains (as in TRL's assistant-only masks).
 *  - Other templates (Llama 3, Gemma, ...): prefix by prefix. For assistant message i, the
 *    text that messages[:i+1] (add_generation_prompt false) adds to messages[:i]
 *    (add_generation_prompt true) is its span; both renderings must be prefixes of the whole
 *    conversation's rendering, else the row is an error naming the message. The rendering is
 *    tokenized segment by segment at the span boundaries.
 * --train-on last keeps only the final assistant span; --train-on all trains every token.
 *
 * Completions ({"prompt","completion"}): plain text, no template; the prompt and the
 * completion are tokenized separately (so the boundary is exact), prompt tokens are -100,
 * completion tokens train, and the eos token (tokenizer_config.json "eos_token") is appended
 * and trains, unless the completion already ends with it. Text rows train on every token and
 * get the same eos. (TRL appends eos the same way.) */
#ifndef DELTATUNE_CHAT_H
#define DELTATUNE_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "deltatune/tokenizer.h"

typedef enum { DT_TRAIN_ON_ASSISTANT, DT_TRAIN_ON_ALL, DT_TRAIN_ON_LAST } dt_train_on;

/* "assistant", "all", "last"; NULL-terminated, for --train-on flags. */
extern const char *const chat_train_on_names[];
/* Parses one of chat_train_on_names. */
int chat_train_on_parse(const char *s, dt_train_on *out);

typedef struct dt_chat dt_chat;

/* Loads dir's tokenizer (tokenizer.json, tokenizer_config.json) and, when present, its chat
 * template and bos/eos tokens. A missing template is an error only when a chat row is rendered. */
int chat_load(dt_chat **out, const char *dir);
/* As chat_load, but *out = NULL (and 0) when dir has no tokenizer.json. */
int chat_load_if_present(dt_chat **out, const char *dir);
void chat_free(dt_chat *c);

const dt_tokenizer *chat_tokenizer(const dt_chat *c);
/* The eos token's id, or -1. */
int32_t chat_eos_id(const dt_chat *c);

/* Renders messages (and tools, may be NULL) with the template. Errors carry the template's
 * raise_exception message. *out is malloc'ed. */
int chat_render(const dt_chat *c, const json_t *messages, const json_t *tools, bool add_generation_prompt,
                bool enable_thinking, char **out, size_t *len);

/* A conversation ({"role", "content", ...} objects, roles system/user/assistant/tool) to ids
 * and labels (same length). Errors name the message ("message 3: ..."). */
int chat_encode_messages(const dt_chat *c, const json_t *messages, const json_t *tools, dt_train_on on,
                         bool enable_thinking, dt_ids *ids, dt_ids *labels);
int chat_encode_completion(const dt_chat *c, const char *prompt, size_t prompt_len, const char *completion,
                           size_t completion_len, dt_train_on on, dt_ids *ids, dt_ids *labels);
int chat_encode_text(const dt_chat *c, const char *text, size_t len, dt_ids *ids, dt_ids *labels);

#endif
