/* A Jinja2 interpreter for chat templates, covering what Hugging Face chat templates use,
 * rendered as transformers renders them (trim_blocks and lstrip_blocks on). Variables come
 * from a JSON object. A construct the interpreter does not support fails at parse time,
 * naming the construct and its line. */
#ifndef DELTATUNE_JINJA_H
#define DELTATUNE_JINJA_H

#include <stddef.h>

#include <jansson.h>

typedef struct jinja_template jinja_template;

/* name (a file name) is used in messages: "chat_template.jinja:12: unknown filter 'foo'". */
int jinja_parse(jinja_template **out, const char *src, size_t len, const char *name);
/* Renders with the variables of ctx (an object: messages, tools, add_generation_prompt,
 * enable_thinking, bos_token, eos_token, ...). raise_exception(msg) in the template becomes an
 * error carrying msg. *out is malloc'ed and NUL-terminated. */
int jinja_render(const jinja_template *t, const json_t *ctx, char **out, size_t *len);
void jinja_free(jinja_template *t);

#endif
