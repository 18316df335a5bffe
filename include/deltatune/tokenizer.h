/* Hugging Face tokenizers (tokenizer.json): byte-level BPE with its normalizer, its
 * pre-tokenizer (Split with the file's own regex, through PCRE2, then ByteLevel), added
 * and special tokens, and decoding. Must give exactly the ids Hugging Face gives. */
#ifndef DELTATUNE_TOKENIZER_H
#define DELTATUNE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A growing array of token ids. */
typedef struct {
    int32_t *v;
    int n, cap;
} dt_ids;
int dt_ids_push(dt_ids *a, int32_t id);
void dt_ids_free(dt_ids *a);

typedef struct dt_tokenizer dt_tokenizer;

/* Loads dir/tokenizer.json (and dir/tokenizer_config.json when present, for added tokens
 * listed only there). Errors name the file and what is unsupported. */
int tokenizer_load(dt_tokenizer **out, const char *dir);
void tokenizer_free(dt_tokenizer *t);

/* Appends the ids of len bytes of UTF-8 text. Added tokens in the text are matched as tokens
 * (Hugging Face's default); with literal, special-token text is encoded as plain text.
 * Invalid UTF-8 is an error naming the byte offset. */
int tokenizer_encode(const dt_tokenizer *t, const char *text, size_t len, bool literal, dt_ids *out);
/* The text of ids (malloc'ed, NUL-terminated); skip_special drops special added tokens. */
int tokenizer_decode(const dt_tokenizer *t, const int32_t *ids, int n, bool skip_special, char **text,
                     size_t *len);
/* The id of a token string (vocabulary or added token), or -1. */
int32_t tokenizer_token_id(const dt_tokenizer *t, const char *token);
/* The string of an id (in the byte-level alphabet for BPE tokens), or NULL. */
const char *tokenizer_token_str(const dt_tokenizer *t, int32_t id);
/* One more than the largest id. */
int tokenizer_n_ids(const dt_tokenizer *t);

#endif
