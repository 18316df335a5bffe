/* Helpers private to src/io/. */
#ifndef DT_IO_FS_H
#define DT_IO_FS_H

#include <stddef.h>
#include <stdint.h>

/* "dir/name" (one slash), malloc'ed; NULL when out of memory. */
char *io_path_join(const char *dir, const char *name);
int io_file_exists(const char *path);
/* A whole (JSON-sized) file into memory, NUL-terminated; errors carry no path. */
int io_read_file(const char *path, char **out, size_t *len);
/* "[6144, 1, 4]" */
void io_format_shape(char *buf, size_t cap, const int64_t *shape, int ndim);

#endif
