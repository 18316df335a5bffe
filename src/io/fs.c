/* Small file-system and formatting helpers shared by the io/ readers. */
#include "deltatune/files.h"

#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* tmp + fsync + rename, so a crash leaves the old file or the new one, never half of one. */
int io_write_file_atomic(const char *path, const char *data, size_t len) {
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) return dt_err("%s: out of memory", path);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        int e = errno;
        free(tmp);
        return dt_err("%s.tmp: cannot create: %s", path, strerror(e));
    }
    int e = 0;
    if (fwrite(data, 1, len, fp) != len || fflush(fp) != 0 || fsync(fileno(fp)) != 0) e = errno ? errno : EIO;
    if (fclose(fp) != 0 && !e) e = errno;
    if (!e && rename(tmp, path) != 0) e = errno;
    if (e) unlink(tmp);
    free(tmp);
    return e ? dt_err("%s: cannot write: %s", path, strerror(e)) : 0;
}

int io_make_dirs(const char *dir) {
    char *path = strdup(dir);
    if (!path) return dt_err("out of memory");
    size_t len = strlen(path);
    int rc = 0;
    for (size_t i = 1; i <= len && rc == 0; i++) {
        if ((path[i] != '/' && path[i] != 0) || path[i - 1] == '/') continue;
        char c = path[i];
        path[i] = 0;
        struct stat st;
        if (stat(path, &st) == 0) {
            if (!S_ISDIR(st.st_mode)) rc = dt_err("%s: not a directory", path);
        } else if (mkdir(path, 0777) != 0 && errno != EEXIST) {
            rc = dt_err("%s: cannot create: %s", path, strerror(errno));
        }
        path[i] = c;
    }
    free(path);
    return rc;
}

json_t *io_load_json(const char *path) {
    char *text;
    size_t len;
    if (io_read_file(path, &text, &len) != 0) {
        dt_err_wrap("%s", path);
        return NULL;
    }
    json_error_t jerr;
    json_t *root = json_loadb(text, len, 0, &jerr);
    free(text);
    if (!root) dt_err("%s: invalid JSON at line %d, column %d: %s", path, jerr.line, jerr.column, jerr.text);
    return root;
}

int io_copy_files(const char *src_dir, const char *dst_dir, const char *const *names) {
    int rc = 0;
    for (int i = 0; rc == 0 && names[i]; i++) {
        char *from = io_path_join(src_dir, names[i]), *to = io_path_join(dst_dir, names[i]), *data = NULL;
        size_t len = 0;
        if (!from || !to) rc = dt_err("out of memory");
        else if (io_file_exists(from))
            rc = io_read_file(from, &data, &len) ? dt_err_wrap("%s", from) : io_write_file_atomic(to, data, len);
        free(data);
        free(from);
        free(to);
    }
    return rc;
}

int io_write_json_atomic(const char *path, const json_t *root, size_t flags) {
    char *text = json_dumps(root, flags);
    size_t n = text ? strlen(text) : 0;
    char *line = text ? realloc(text, n + 2) : NULL;
    if (!line) {
        free(text);
        return dt_err("%s: out of memory", path);
    }
    memcpy(line + n, "\n", 2);
    int rc = io_write_file_atomic(path, line, n + 1);
    free(line);
    return rc;
}
