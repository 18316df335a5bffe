/* File helpers for the readers and writers of io/ and the trainer's checkpoints. */
#ifndef DELTATUNE_FILES_H
#define DELTATUNE_FILES_H

#include <stddef.h>
#include <stdint.h>

/* "dir/name" (one slash), malloc'ed; NULL when out of memory. */
char *io_path_join(const char *dir, const char *name);
int io_file_exists(const char *path);
/* A whole (JSON-sized) file into memory, NUL-terminated; errors carry no path. */
int io_read_file(const char *path, char **out, size_t *len);
/* "[6144, 1, 4]" */
void io_format_shape(char *buf, size_t cap, const int64_t *shape, int ndim);
/* path.tmp, fsync, rename: a crash leaves the old file or the new one, never half of one. */
int io_write_file_atomic(const char *path, const char *data, size_t len);
/* mkdir -p */
int io_make_dirs(const char *dir);
/* Each file of names (NULL-terminated) that exists in src_dir, copied into dst_dir through
 * io_write_file_atomic; errors name the file. */
int io_copy_files(const char *src_dir, const char *dst_dir, const char *const *names);

/* The JSON side files (config.json, indexes, adapter and trainer state) go through these two,
 * so every reader reports bad JSON the same way and every writer is atomic. */
struct json_t;
/* io_read_file + parse; NULL on error, which names the path (and line and column for bad JSON). */
struct json_t *io_load_json(const char *path);
/* json_dumps(root, flags) plus a final newline, through io_write_file_atomic. */
int io_write_json_atomic(const char *path, const struct json_t *root, size_t flags);

#endif
