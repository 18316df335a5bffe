/* safetensors files: read through a read-only memory map, written atomically.
 * Format: u64 little-endian header length N, N bytes of JSON header, data buffer. */
#ifndef DELTATUNE_SAFETENSORS_H
#define DELTATUNE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "deltatune/dtype.h"

#define ST_MAX_DIMS 8

typedef struct {
    char *name;
    dt_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const void *data;  /* into the map; valid until st_close */
    size_t nbytes;
} st_tensor;

typedef struct {
    char *path;
    void *map;
    size_t map_size;
    int n;
    st_tensor *tensors;  /* sorted by name */
} st_file;

/* Maps and validates the whole header (sizes, offsets inside the file, no overlap,
 * known dtypes) before returning. Errors name the file and the tensor. */
int st_open(st_file *f, const char *path);
void st_close(st_file *f);
/* NULL when absent (no error recorded). */
const st_tensor *st_find(const st_file *f, const char *name);
/* A malloc'ed fp32 copy of a float tensor (F32/F16/BF16); NULL when out of memory or
 * another dtype. Safe on tensors the file stored misaligned. */
float *st_tensor_to_f32(const st_tensor *t);

/* One tensor to write: data holds numel elements of dtype. */
typedef struct {
    const char *name;
    dt_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
} st_entry;

/* Streaming writer, for files larger than memory: tensors are written in the
 * order given to st_writer_open, into "<path>.tmp", renamed on close. */
typedef struct st_writer st_writer;
int st_writer_open(st_writer **w, const char *path, const st_entry *entries, int n);
/* On failure the temp file is already removed; w must still be released with
 * st_writer_abort (or st_writer_close, which then fails). */
int st_writer_write(st_writer *w, const void *data, size_t nbytes);
int st_writer_close(st_writer *w);  /* checks every byte was written, fsyncs, renames; frees w */
void st_writer_abort(st_writer *w); /* removes the temp file; frees w */

/* Writes all entries at once (entries[i].data must be set). Atomic. */
int st_write(const char *path, const st_entry *entries, int n);

#endif
