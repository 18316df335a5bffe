#include "deltatune/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define DT_ERR_CAP 2048
static _Thread_local char err_buf[DT_ERR_CAP];

int dt_err(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return -1;
}

int dt_err_wrap(const char *fmt, ...) {
    char prefix[DT_ERR_CAP], old[DT_ERR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err_buf, sizeof old);
    /* keep as much of both as fits: prefix, ": ", the old message */
    size_t n = strlen(prefix);
    if (n > DT_ERR_CAP - 3) n = DT_ERR_CAP - 3;
    memcpy(err_buf, prefix, n);
    memcpy(err_buf + n, ": ", 2);
    const char *rest = old[0] ? old : "unknown error";
    size_t m = strlen(rest), room = DT_ERR_CAP - n - 3;
    if (m > room) m = room;
    memcpy(err_buf + n + 2, rest, m);
    err_buf[n + 2 + m] = 0;
    return -1;
}

const char *dt_errmsg(void) { return err_buf[0] ? err_buf : "unknown error"; }

void dt_err_clear(void) { err_buf[0] = 0; }
