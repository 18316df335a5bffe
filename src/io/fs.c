/* Small file-system and formatting helpers shared by the io/ readers. */
#include "io/fs.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "deltatune/error.h"

/* JSON side files (config, index, adapter config) are small; refuse anything huge. */
#define MAX_JSON_FILE (64u << 20)

char *io_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    int slash = a > 0 && dir[a - 1] != '/';
    char *p = malloc(a + slash + b + 1);
    if (!p) return NULL;
    memcpy(p, dir, a);
    if (slash) p[a] = '/';
    memcpy(p + a + slash, name, b + 1);
    return p;
}

int io_file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Whole file into memory; errors carry no path (the caller adds it). */
int io_read_file(const char *path, char **out, size_t *len) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return dt_err("cannot open: %s", strerror(errno));
    struct stat sb;
    if (fstat(fileno(fp), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(fp);
        return dt_err("not a regular file");
    }
    if ((uint64_t)sb.st_size > MAX_JSON_FILE) {
        fclose(fp);
        return dt_err("%lld bytes is too large for a JSON file", (long long)sb.st_size);
    }
    size_t n = (size_t)sb.st_size;
    char *buf = malloc(n + 1);
    if (!buf) {
        fclose(fp);
        return dt_err("out of memory");
    }
    size_t got = fread(buf, 1, n, fp);
    int bad = ferror(fp);
    fclose(fp);
    if (bad || got != n) {
        free(buf);
        return dt_err("read failed");
    }
    buf[n] = 0;
    *out = buf;
    *len = n;
    return 0;
}

void io_format_shape(char *buf, size_t cap, const int64_t *shape, int ndim) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && k < cap; d++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
}
