/* Errors with context.
 *
 * A function that can fail returns int: 0 on success, -1 on failure, after
 * recording a message with dt_err(). Callers add context on the way up with
 * dt_err_wrap() ("config.json: " + "missing field hidden_size"). Only the
 * command layer prints the message and picks the exit code. */
#ifndef DELTATUNE_ERROR_H
#define DELTATUNE_ERROR_H

#if defined(__GNUC__)
#define DT_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define DT_PRINTF(a, b)
#endif

/* Records the message (replacing any earlier one) and returns -1. */
int dt_err(const char *fmt, ...) DT_PRINTF(1, 2);
/* Prefixes "context: " to the current message and returns -1. */
int dt_err_wrap(const char *fmt, ...) DT_PRINTF(1, 2);
const char *dt_errmsg(void);
void dt_err_clear(void);

#endif
