/* What generate and chat share: the model with its adapter, the tokenizer and chat template,
 * the stop tokens, and printing tokens as text while they come. */
#ifndef DELTATUNE_CLI_GEN_SESSION_H
#define DELTATUNE_CLI_GEN_SESSION_H

#include <stdbool.h>
#include <stdio.h>

#include "deltatune/adapter.h"
#include "deltatune/chat.h"
#include "deltatune/checkpoint.h"
#include "deltatune/generate.h"

typedef struct {
    checkpoint ck;
    qwen35_model m;
    lora_adapter ad;
    dt_chat *chat;            /* NULL when the model folder has no tokenizer */
    int32_t stop[16];
    int n_stop;
    bool have_ck, have_m, have_ad;
} gen_session;

/* Opens the model (and adapter, may be NULL) and finds the stop tokens: generation_config.json's
 * and config.json's eos_token_id, <|im_end|> and <|endoftext|> when the tokenizer has them. */
int gen_session_open(gen_session *s, const char *model_dir, const char *adapter_dir);
/* The same, the model quantized on load to qbits (0: as stored) with group size qgroup; what was
 * quantized goes to stderr under the command's name. */
int gen_session_open_quantized(gen_session *s, const char *model_dir, const char *adapter_dir, int qbits, int qgroup,
                               const char *cmd);
void gen_session_close(gen_session *s);

/* Streams the text of the generated ids to a FILE: each call prints what the new token adds
 * to the decoded text, holding back an incomplete UTF-8 character. */
typedef struct {
    const dt_tokenizer *tok;  /* NULL: print ids */
    FILE *f;
    dt_ids ids;
    size_t printed;
    const int32_t *stop;
    int n_stop;
} text_stream;
void text_stream_token(void *ctx, int32_t id);
/* The whole text so far (stop tokens left out), malloc'ed. */
char *text_stream_text(const text_stream *ts);

#endif
