#include "deltatune/files.h"
#include "deltatune/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "deltatune/error.h"

/* The reference implementation's limit: a larger header is a corrupt or hostile file. */
#define ST_MAX_HEADER 100000000ull

static uint64_t read_u64_le(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void write_u64_le(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* numel and byte size of a shape, refusing anything that would overflow int64 or size_t. */
static int shape_bytes(const int64_t *shape, int ndim, dt_dtype dtype, int64_t *numel, uint64_t *nbytes) {
    *numel = 0;
    *nbytes = 0;
    uint64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return dt_err("negative dimension %lld", (long long)shape[d]);
        uint64_t s = (uint64_t)shape[d];
        if (s != 0 && n > (uint64_t)INT64_MAX / s) return dt_err("shape too large");
        n *= s;
    }
    uint64_t size = dt_dtype_size(dtype);
    if (n != 0 && n > (uint64_t)INT64_MAX / size) return dt_err("shape too large");
    if (n * size > (uint64_t)SIZE_MAX) return dt_err("shape too large for this machine");
    *numel = (int64_t)n;
    *nbytes = n * size;
    return 0;
}

/* ---------------------------------------------------------------- reading */

/* One header entry (everything except __metadata__) into t; offsets are returned
 * separately because they are checked against the whole set afterwards. */
static int parse_entry(st_tensor *t, uint64_t *begin, uint64_t *end, const char *name,
                       json_t *v, uint64_t buf_size) {
    if (!json_is_object(v)) return dt_err("tensor %s: header entry is not an object", name);

    json_t *jd = json_object_get(v, "dtype");
    if (!json_is_string(jd)) return dt_err("tensor %s: missing or non-string \"dtype\"", name);
    if (dt_dtype_parse(json_string_value(jd), &t->dtype) != 0)
        return dt_err("tensor %s: unsupported dtype \"%s\"", name, json_string_value(jd));

    json_t *js = json_object_get(v, "shape");
    if (!json_is_array(js)) return dt_err("tensor %s: missing or non-array \"shape\"", name);
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS) return dt_err("tensor %s: %zu dimensions (at most %d supported)", name, nd, ST_MAX_DIMS);
    t->ndim = (int)nd;
    for (size_t d = 0; d < nd; d++) {
        json_t *e = json_array_get(js, d);
        if (!json_is_integer(e) || json_integer_value(e) < 0)
            return dt_err("tensor %s: shape[%zu] is not a non-negative integer", name, d);
        t->shape[d] = (int64_t)json_integer_value(e);
    }
    uint64_t nbytes;
    if (shape_bytes(t->shape, t->ndim, t->dtype, &t->numel, &nbytes) != 0)
        return dt_err_wrap("tensor %s", name);

    json_t *jo = json_object_get(v, "data_offsets");
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)))
        return dt_err("tensor %s: \"data_offsets\" must be [begin, end] integers", name);
    json_int_t b = json_integer_value(json_array_get(jo, 0)), e = json_integer_value(json_array_get(jo, 1));
    if (b < 0 || e < b)
        return dt_err("tensor %s: bad data_offsets [%lld, %lld]", name, (long long)b, (long long)e);
    if ((uint64_t)e > buf_size)
        return dt_err("tensor %s: data_offsets [%lld, %lld] past the end of the data (%llu bytes; file truncated?)",
                      name, (long long)b, (long long)e, (unsigned long long)buf_size);
    if ((uint64_t)(e - b) != nbytes) {
        char sh[160];
        io_format_shape(sh, sizeof sh, t->shape, t->ndim);
        return dt_err("tensor %s: data_offsets span %lld bytes but %s %s needs %llu", name,
                      (long long)(e - b), dt_dtype_name(t->dtype), sh, (unsigned long long)nbytes);
    }
    *begin = (uint64_t)b;
    *end = (uint64_t)e;
    t->nbytes = (size_t)nbytes;
    return 0;
}

typedef struct {
    uint64_t begin, end;
    int idx;
} st_range;

static int by_begin(const void *a, const void *b) {
    const st_range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

/* The data buffer must be covered exactly, as the reference implementation demands:
 * a hole or an overlap means the header does not describe the bytes. */
static int check_coverage(const st_file *f, st_range *r, int n, uint64_t buf_size) {
    qsort(r, (size_t)n, sizeof *r, by_begin);
    uint64_t at = 0;
    for (int i = 0; i < n; i++) {
        const char *name = f->tensors[r[i].idx].name;
        if (r[i].begin < at)
            return dt_err("tensor %s: data_offsets [%llu, %llu] overlap tensor %s", name,
                          (unsigned long long)r[i].begin, (unsigned long long)r[i].end,
                          f->tensors[r[i - 1].idx].name);
        if (r[i].begin > at)
            return dt_err("tensor %s: %llu unused bytes before its data at offset %llu", name,
                          (unsigned long long)(r[i].begin - at), (unsigned long long)r[i].begin);
        at = r[i].end;
    }
    if (at != buf_size)
        return dt_err("data buffer is %llu bytes but the tensors cover %llu", (unsigned long long)buf_size,
                      (unsigned long long)at);
    return 0;
}

static int parse_header(st_file *f, const char *text, size_t len, const unsigned char *data, uint64_t buf_size) {
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (strstr(jerr.text, "duplicate"))
            return dt_err("duplicate tensor name in header (%s)", jerr.text);
        return dt_err("header is not valid JSON (line %d, column %d: %s)", jerr.line, jerr.column, jerr.text);
    }
    int rc = -1;
    st_range *ranges = NULL;
    if (!json_is_object(root)) {
        dt_err("header is not a JSON object");
        goto done;
    }
    size_t cap = json_object_size(root);
    f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
    ranges = calloc(cap ? cap : 1, sizeof *ranges);
    if (!f->tensors || !ranges) {
        dt_err("out of memory");
        goto done;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) continue;
        st_tensor *t = &f->tensors[f->n];
        uint64_t b = 0, e = 0;
        if (parse_entry(t, &b, &e, key, v, buf_size) != 0) goto done;
        t->name = strdup(key);
        if (!t->name) {
            dt_err("out of memory");
            goto done;
        }
        t->data = data + b;
        ranges[f->n] = (st_range){b, e, f->n};
        f->n++;
    }
    if (check_coverage(f, ranges, f->n, buf_size) != 0) goto done;
    qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, by_name);
    /* jansson rejects duplicate keys already; this also catches names equal after its decoding. */
    for (int i = 1; i < f->n; i++)
        if (strcmp(f->tensors[i - 1].name, f->tensors[i].name) == 0) {
            dt_err("duplicate tensor name %s", f->tensors[i].name);
            goto done;
        }
    rc = 0;
done:
    free(ranges);
    json_decref(root);
    return rc;
}

static int map_file(st_file *f, const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return dt_err("cannot open: %s", strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return dt_err("cannot stat: %s", strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return dt_err("not a regular file");
    }
    if (sb.st_size < 8) {
        close(fd);
        return dt_err("file is %lld bytes, too short for a safetensors header (empty or truncated)",
                      (long long)sb.st_size);
    }
    void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (m == MAP_FAILED) return dt_err("cannot map: %s", strerror(e));
    f->map = m;
    f->map_size = (size_t)sb.st_size;
    return 0;
}

static int open_mapped(st_file *f) {
    const unsigned char *base = f->map;
    uint64_t n = read_u64_le(base);
    uint64_t avail = f->map_size - 8;
    if (n > ST_MAX_HEADER)
        return dt_err("header length %llu exceeds the %llu-byte limit (not a safetensors file?)",
                      (unsigned long long)n, ST_MAX_HEADER);
    if (n > avail)
        return dt_err("header length %llu is past the end of the file (%zu bytes; truncated?)",
                      (unsigned long long)n, f->map_size);
    if (n < 2 || base[8] != '{') return dt_err("header does not start with '{' (not a safetensors file?)");
    return parse_header(f, (const char *)base + 8, (size_t)n, base + 8 + n, avail - n);
}

int st_open(st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path) return dt_err("%s: out of memory", path);
    if (map_file(f, path) != 0 || open_mapped(f) != 0) {
        dt_err_wrap("%s", path);
        st_close(f);
        return -1;
    }
    return 0;
}

void st_close(st_file *f) {
    if (!f) return;
    if (f->tensors)
        for (int i = 0; i < f->n; i++) free(f->tensors[i].name);
    free(f->tensors);
    if (f->map) munmap(f->map, f->map_size);
    free(f->path);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(f->tensors[mid].name, name);
        if (c == 0) return &f->tensors[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

/* The file only aligns the data buffer's start: a tensor after an odd-sized one is read
 * through an aligned copy, since the converters load whole uint16_t / float elements. */
float *st_tensor_to_f32(const st_tensor *t) {
    if (!dt_dtype_is_float(t->dtype)) return NULL;
    float *out = malloc((size_t)t->numel * sizeof *out + 1);
    if (!out) return NULL;
    const void *src = t->data;
    void *tmp = NULL;
    if ((uintptr_t)src % dt_dtype_size(t->dtype) != 0) {
        if (!(tmp = malloc(t->nbytes + 1))) {
            free(out);
            return NULL;
        }
        memcpy(tmp, src, t->nbytes);
        src = tmp;
    }
    dt_to_f32(out, src, t->dtype, (size_t)t->numel);
    free(tmp);
    return out;
}

/* ---------------------------------------------------------------- writing */

struct st_writer {
    FILE *fp;
    char *path, *tmp;
    uint64_t expected, written;
    int failed;  /* the temp file is already gone */
};

static void writer_fail(st_writer *w) {
    if (w->fp) fclose(w->fp);
    w->fp = NULL;
    if (!w->failed) unlink(w->tmp);
    w->failed = 1;
}

static void writer_free(st_writer *w) {
    free(w->path);
    free(w->tmp);
    free(w);
}

/* The header JSON for entries written back to back in the given order; the byte
 * count of the data buffer goes to *total. */
static char *build_header(const st_entry *entries, int n, uint64_t *total) {
    json_t *root = json_object(), *meta = json_object();
    char *out = NULL;
    if (!root || !meta) goto fail;
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(root, "__metadata__", meta);
    meta = NULL;
    uint64_t at = 0;
    for (int i = 0; i < n; i++) {
        const st_entry *e = &entries[i];
        if (!e->name || !e->name[0] || strcmp(e->name, "__metadata__") == 0) {
            dt_err("entry %d: invalid tensor name", i);
            goto fail_quiet;
        }
        if (json_object_get(root, e->name)) {
            dt_err("duplicate tensor name %s", e->name);
            goto fail_quiet;
        }
        if ((unsigned)e->dtype >= DT_DTYPE_COUNT || e->ndim < 0 || e->ndim > ST_MAX_DIMS) {
            dt_err("tensor %s: invalid dtype or rank", e->name);
            goto fail_quiet;
        }
        int64_t numel;
        uint64_t nbytes;
        if (shape_bytes(e->shape, e->ndim, e->dtype, &numel, &nbytes) != 0) {
            dt_err_wrap("tensor %s", e->name);
            goto fail_quiet;
        }
        json_t *shape = json_array();
        for (int d = 0; d < e->ndim; d++) json_array_append_new(shape, json_integer(e->shape[d]));
        json_t *t = json_pack("{s:s, s:o, s:[I, I]}", "dtype", dt_dtype_name(e->dtype), "shape", shape,
                              "data_offsets", (json_int_t)at, (json_int_t)(at + nbytes));
        if (!t || json_object_set_new(root, e->name, t) != 0) goto fail;
        at += nbytes;
    }
    out = json_dumps(root, JSON_COMPACT);
    if (!out) goto fail;
    json_decref(root);
    *total = at;
    return out;
fail:
    dt_err("out of memory building the header");
fail_quiet:
    json_decref(meta);
    json_decref(root);
    return NULL;
}

int st_writer_open(st_writer **wp, const char *path, const st_entry *entries, int n) {
    *wp = NULL;
    uint64_t total;
    char *header = build_header(entries, n, &total);
    if (!header) return dt_err_wrap("%s", path);
    /* Spaces pad the header so the data buffer starts 8-byte aligned in the map. */
    size_t hlen = strlen(header), padded = (hlen + 7) & ~(size_t)7;

    st_writer *w = calloc(1, sizeof *w);
    size_t plen = strlen(path);
    if (!w || !(w->path = strdup(path)) || !(w->tmp = malloc(plen + 5))) {
        free(header);
        if (w) writer_free(w);
        return dt_err("%s: out of memory", path);
    }
    memcpy(w->tmp, path, plen);
    memcpy(w->tmp + plen, ".tmp", 5);
    w->expected = total;

    w->fp = fopen(w->tmp, "wb");
    if (!w->fp) {
        int e = errno;
        free(header);
        writer_free(w);
        return dt_err("%s.tmp: cannot create: %s", path, strerror(e));
    }
    unsigned char len8[8];
    write_u64_le(len8, padded);
    int ok = fwrite(len8, 1, 8, w->fp) == 8 && fwrite(header, 1, hlen, w->fp) == hlen;
    for (size_t i = hlen; ok && i < padded; i++) ok = fputc(' ', w->fp) != EOF;
    free(header);
    if (!ok) {
        int e = errno;
        writer_fail(w);
        writer_free(w);
        return dt_err("%s.tmp: write failed: %s", path, strerror(e));
    }
    *wp = w;
    return 0;
}

int st_writer_write(st_writer *w, const void *data, size_t nbytes) {
    if (w->failed) return dt_err("%s: write after an earlier failure", w->path);
    if (nbytes > w->expected - w->written) {
        writer_fail(w);
        return dt_err("%s: %llu bytes written, more than the %llu the header declares", w->path,
                      (unsigned long long)(w->written + nbytes), (unsigned long long)w->expected);
    }
    if (nbytes && fwrite(data, 1, nbytes, w->fp) != nbytes) {
        int e = errno;
        writer_fail(w);
        return dt_err("%s.tmp: write failed: %s", w->path, strerror(e));
    }
    w->written += nbytes;
    return 0;
}

/* Makes the rename itself durable; failure here loses nothing already written. */
static void fsync_parent_dir(const char *path) {
    char *dir = strdup(path);
    if (!dir) return;
    char *slash = strrchr(dir, '/');
    const char *d = slash ? (slash == dir ? "/" : (*slash = 0, dir)) : ".";
    int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dir);
}

int st_writer_close(st_writer *w) {
    int rc = 0;
    if (w->failed) {
        rc = dt_err("%s: not written (an earlier write failed)", w->path);
    } else if (w->written != w->expected) {
        rc = dt_err("%s: %llu of %llu data bytes written", w->path, (unsigned long long)w->written,
                    (unsigned long long)w->expected);
        writer_fail(w);
    } else {
        FILE *fp = w->fp;
        w->fp = NULL;
        int e = 0;
        if (fflush(fp) != 0 || fsync(fileno(fp)) != 0) e = errno;
        if (fclose(fp) != 0 && !e) e = errno;
        if (!e && rename(w->tmp, w->path) != 0) e = errno;
        if (e) {
            rc = dt_err("%s: cannot finish writing: %s", w->path, strerror(e));
            writer_fail(w);
        } else {
            fsync_parent_dir(w->path);
        }
    }
    writer_free(w);
    return rc;
}

void st_writer_abort(st_writer *w) {
    if (!w) return;
    writer_fail(w);
    writer_free(w);
}

int st_write(const char *path, const st_entry *entries, int n) {
    st_writer *w;
    if (st_writer_open(&w, path, entries, n) != 0) return -1;
    for (int i = 0; i < n; i++) {
        int64_t numel;
        uint64_t nbytes;
        shape_bytes(entries[i].shape, entries[i].ndim, entries[i].dtype, &numel, &nbytes);
        if (nbytes && !entries[i].data) {
            st_writer_abort(w);
            return dt_err("%s: tensor %s has no data", path, entries[i].name);
        }
        if (st_writer_write(w, entries[i].data, (size_t)nbytes) != 0) {
            st_writer_abort(w);
            return -1;
        }
    }
    return st_writer_close(w);
}
