#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "deltatune/error.h"
#include "deltatune/safetensors.h"
#include "test.h"

/* Shared by the io tests: a fresh directory under /tmp, and its recursive removal. */
int io_test_tmpdir(char *buf, size_t cap) {
    snprintf(buf, cap, "/tmp/deltatune_io_XXXXXX");
    return mkdtemp(buf) ? 0 : -1;
}

static void remove_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char sub[4096];
            snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
            remove_tree(sub);
        }
        if (d) closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* Only ever removes what io_test_tmpdir made. */
void io_test_rmdir(const char *dir) {
    if (strncmp(dir, "/tmp/deltatune_io_", 18) == 0) remove_tree(dir);
}

int io_test_write_file(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    size_t w = fwrite(data, 1, n, fp);
    return fclose(fp) == 0 && w == n ? 0 : -1;
}

/* A safetensors file with a hand-written header and data_len bytes of data; header_len
 * overrides the length field when non-zero (for lying headers). */
static int write_raw(const char *path, const char *header, size_t data_len, uint64_t header_len) {
    size_t h = strlen(header);
    uint64_t n = header_len ? header_len : h;
    unsigned char *buf = calloc(1, 8 + h + data_len + 1);
    if (!buf) return -1;
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(n >> (8 * i));
    memcpy(buf + 8, header, h);
    for (size_t i = 0; i < data_len; i++) buf[8 + h + i] = (unsigned char)i;
    int rc = io_test_write_file(path, buf, 8 + h + data_len);
    free(buf);
    return rc;
}

static int exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0;
}

static void run_round_trip(const char *dir) {
    char path[512], tmp[520];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    float f32[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
    uint16_t bf16[4], f16[4];
    float src[4] = {0.5f, -1.25f, 3.0f, 65504.0f};
    dt_from_f32(bf16, DT_BF16, src, 4);
    dt_from_f32(f16, DT_F16, src, 4);
    float scalar = 42;
    int32_t ints[3] = {1, -1, 7};
    st_entry e[] = {
        {"z.weight", DT_F32, 2, {2, 3}, f32},
        {"b.bf16", DT_BF16, 1, {4}, bf16},
        {"m.f16", DT_F16, 3, {2, 1, 2}, f16},
        {"scalar", DT_F32, 0, {0}, &scalar},
        {"empty", DT_F32, 2, {0, 5}, NULL},
        {"ints", DT_I32, 1, {3}, ints},
    };
    CHECK_OK(st_write(path, e, 6));
    CHECK(!exists(tmp));

    FILE *fp = fopen(path, "rb");
    CHECK(fp);
    unsigned char len8[8];
    char head[512] = {0};
    CHECK(fread(len8, 1, 8, fp) == 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | len8[i];
    CHECK(n % 8 == 0 && n < sizeof head);
    CHECK(fread(head, 1, n, fp) == n);
    fclose(fp);
    CHECK(strstr(head, "\"__metadata__\":{\"format\":\"pt\"}"));
    CHECK(head[n - 1] == ' ' || head[n - 1] == '}');

    st_file f;
    CHECK_OK(st_open(&f, path));
    CHECK(f.n == 6);
    for (int i = 1; i < f.n; i++) CHECK(strcmp(f.tensors[i - 1].name, f.tensors[i].name) < 0);
    const st_tensor *t = st_find(&f, "z.weight");
    CHECK(t && t->dtype == DT_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->numel == 6);
    CHECK(t->nbytes == 24 && memcmp(t->data, f32, 24) == 0);
    t = st_find(&f, "b.bf16");
    CHECK(t && t->dtype == DT_BF16 && t->numel == 4 && memcmp(t->data, bf16, 8) == 0);
    float back[4];
    dt_to_f32(back, t->data, DT_BF16, 4);
    CHECK(back[0] == 0.5f && back[1] == -1.25f && back[2] == 3.0f);
    t = st_find(&f, "m.f16");
    CHECK(t && t->dtype == DT_F16 && t->ndim == 3 && t->shape[1] == 1 && memcmp(t->data, f16, 8) == 0);
    dt_to_f32(back, t->data, DT_F16, 4);
    CHECK(back[3] == 65504.0f);
    t = st_find(&f, "scalar");
    CHECK(t && t->ndim == 0 && t->numel == 1 && *(const float *)t->data == 42);
    t = st_find(&f, "empty");
    CHECK(t && t->numel == 0 && t->nbytes == 0);
    t = st_find(&f, "ints");
    CHECK(t && t->dtype == DT_I32 && memcmp(t->data, ints, 12) == 0);
    CHECK(st_find(&f, "nope") == NULL);
    CHECK(st_find(&f, "") == NULL);
    st_close(&f);
    st_close(&f);  /* idempotent on a closed file */
}

/* A BF16 tensor after a 3-byte U8 one sits at an odd address in the map; the fp32 copy
 * must still see the values written (dt_from_f32 of exactly representable floats). */
static void run_misaligned(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/odd.safetensors", dir);
    unsigned char u8[3] = {1, 2, 3};
    float want[4] = {0.5f, -1.25f, 3.0f, 96.0f};
    uint16_t bf16[4];
    dt_from_f32(bf16, DT_BF16, want, 4);
    st_entry e[] = {{"a", DT_U8, 1, {3}, u8}, {"b", DT_BF16, 1, {4}, bf16}};
    CHECK_OK(st_write(path, e, 2));
    st_file f;
    CHECK_OK(st_open(&f, path));
    const st_tensor *t = st_find(&f, "b");
    CHECK(t && (uintptr_t)t->data % 2 == 1);
    float *got = st_tensor_to_f32(t);
    CHECK(got && memcmp(got, want, sizeof want) == 0);
    free(got);
    CHECK(st_tensor_to_f32(st_find(&f, "a")) == NULL);  /* not a float tensor */
    st_close(&f);
}

TEST(safetensors_misaligned_to_f32) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_misaligned(dir);
    io_test_rmdir(dir);
}

TEST(safetensors_round_trip) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_round_trip(dir);
    io_test_rmdir(dir);
}

static void run_streaming(const char *dir) {
    char path[512], tmp[520];
    snprintf(path, sizeof path, "%s/s.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    float a[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    st_entry e[] = {{"a", DT_F32, 1, {8}, NULL}, {"b", DT_F32, 1, {2}, NULL}};

    st_writer *w;
    CHECK_OK(st_writer_open(&w, path, e, 2));
    CHECK(exists(tmp));
    CHECK_OK(st_writer_write(w, a, 12));
    CHECK_OK(st_writer_write(w, a + 3, 20));
    CHECK_OK(st_writer_write(w, a, 8));
    CHECK_OK(st_writer_close(w));
    CHECK(exists(path) && !exists(tmp));
    st_file f;
    CHECK_OK(st_open(&f, path));
    CHECK(memcmp(st_find(&f, "a")->data, a, 32) == 0 && memcmp(st_find(&f, "b")->data, a, 8) == 0);
    st_close(&f);
    unlink(path);

    /* too many bytes: refused, temp file gone */
    CHECK_OK(st_writer_open(&w, path, e, 2));
    CHECK_OK(st_writer_write(w, a, 32));
    CHECK_ERR(st_writer_write(w, a, 12), "more than");
    CHECK(!exists(tmp));
    CHECK_ERR(st_writer_close(w), "earlier write failed");
    CHECK(!exists(path));

    /* too few bytes: close refuses, nothing left behind */
    CHECK_OK(st_writer_open(&w, path, e, 2));
    CHECK_OK(st_writer_write(w, a, 32));
    CHECK_ERR(st_writer_close(w), "32 of 40");
    CHECK(!exists(path) && !exists(tmp));

    /* abort */
    CHECK_OK(st_writer_open(&w, path, e, 2));
    CHECK_OK(st_writer_write(w, a, 4));
    st_writer_abort(w);
    CHECK(!exists(path) && !exists(tmp));

    /* bad entries never create a file */
    st_entry dup[] = {{"a", DT_F32, 1, {1}, a}, {"a", DT_F32, 1, {1}, a}};
    CHECK_ERR(st_write(path, dup, 2), "duplicate tensor name a");
    st_entry meta[] = {{"__metadata__", DT_F32, 1, {1}, a}};
    CHECK_ERR(st_write(path, meta, 1), "invalid tensor name");
    st_entry nodata[] = {{"x", DT_F32, 1, {1}, NULL}};
    CHECK_ERR(st_write(path, nodata, 1), "no data");
    CHECK(!exists(path) && !exists(tmp));

    char bad[600];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.safetensors", dir);
    CHECK_ERR(st_write(bad, e, 0), "cannot create");
}

TEST(safetensors_streaming_writer) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_streaming(dir);
    io_test_rmdir(dir);
}

/* Each malformed file must be refused with a message naming the file and the problem. */
static void expect_bad(const char *path, const char *header, size_t data_len, uint64_t header_len,
                       const char *needle) {
    CHECKF(write_raw(path, header, data_len, header_len) == 0, "cannot write %s", path);
    st_file f;
    CHECK_ERR(st_open(&f, path), needle);
    CHECKF(strstr(dt_errmsg(), path), "error lacks the path: %s", dt_errmsg());
    CHECK(f.tensors == NULL && f.map == NULL && f.path == NULL);
}

static void run_malformed(const char *dir) {
    char p[512];
    snprintf(p, sizeof p, "%s/bad.safetensors", dir);
    st_file f;

    CHECK(io_test_write_file(p, "", 0) == 0);
    CHECK_ERR(st_open(&f, p), "0 bytes, too short");
    CHECK(io_test_write_file(p, "\x10\0\0", 3) == 0);
    CHECK_ERR(st_open(&f, p), "3 bytes, too short");
    char missing[600];
    snprintf(missing, sizeof missing, "%s/missing.safetensors", dir);
    CHECK_ERR(st_open(&f, missing), "No such file");
    CHECK(strstr(dt_errmsg(), "missing.safetensors"));
    CHECK_ERR(st_open(&f, dir), "not a regular file");

    const char *ok = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    expect_bad(p, ok, 8, 5000, "past the end of the file");
    expect_bad(p, ok, 8, 200000000ull, "exceeds");
    expect_bad(p, ok, 4, 0, "past the end of the data");  /* truncated data */
    expect_bad(p, "{\"a\": garbage}", 0, 0, "not valid JSON");
    expect_bad(p, "[1, 2]  ", 0, 0, "does not start with '{'");
    expect_bad(p, "\x01\x02garbage", 0, 0, "does not start with '{'");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, 0, "past the end of the data");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,4]}}", 8, 0, "bad data_offsets");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, 0, "needs 12");
    expect_bad(p,
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
               12, 0, "overlap");
    expect_bad(p,
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
               20, 0, "unused bytes");
    expect_bad(p, ok, 12, 0, "cover 8");  /* trailing bytes */
    expect_bad(p, "{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, 0,
               "tensor w: unsupported dtype \"F8_E4M3\"");
    expect_bad(p,
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               8, 0, "duplicate");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, 0, "shape[0]");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}", 8, 0, "shape[0]");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, 0,
               "9 dimensions");
    expect_bad(p,
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4611686018427387904],"
               "\"data_offsets\":[0,8]}}",
               8, 0, "too large");
    expect_bad(p, "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 0, "tensor a: missing or non-string \"dtype\"");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, 0, "\"shape\"");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, 0, "data_offsets");
    expect_bad(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, 0, "data_offsets");
    expect_bad(p, "{\"a\":[1,2]}", 0, 0, "tensor a: header entry is not an object");

    /* A valid hand-written file (metadata, trailing-space padding) still opens. */
    CHECK(write_raw(p, "{\"__metadata__\":{\"format\":\"mlx\"},\"a\":{\"dtype\":\"BF16\",\"shape\":[4],"
                       "\"data_offsets\":[0,8]}}      ",
                    8, 0) == 0);
    CHECK_OK(st_open(&f, p));
    CHECK(f.n == 1 && st_find(&f, "a")->numel == 4);
    st_close(&f);
}

TEST(safetensors_malformed) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_malformed(dir);
    io_test_rmdir(dir);
}

/* Every truncation of a valid file is refused, and byte corruption anywhere in the
 * length or header never makes the reader touch memory outside the map (run under
 * ASan to see that). */
static void run_truncations(const char *dir) {
    char path[512], cut[520];
    snprintf(path, sizeof path, "%s/v.safetensors", dir);
    snprintf(cut, sizeof cut, "%s/cut.safetensors", dir);
    float a[5] = {1, 2, 3, 4, 5};
    uint16_t b[3] = {1, 2, 3};
    st_entry e[] = {{"a", DT_F32, 1, {5}, a}, {"b", DT_BF16, 2, {3, 1}, b}};
    CHECK_OK(st_write(path, e, 2));
    FILE *fp = fopen(path, "rb");
    CHECK(fp);
    unsigned char buf[1024];
    size_t n = fread(buf, 1, sizeof buf, fp);
    fclose(fp);
    CHECK(n > 8 && n < sizeof buf);
    st_file f;
    for (size_t len = 0; len < n; len++) {
        CHECK(io_test_write_file(cut, buf, len) == 0);
        CHECKF(st_open(&f, cut) != 0, "truncated to %zu bytes but opened", len);
    }
    const unsigned char vals[] = {0, 0x7f, 0xff, '"', '}', '9', ' ', ','};
    for (size_t pos = 0; pos < n - 26; pos++) {
        for (size_t k = 0; k < sizeof vals; k++) {
            unsigned char saved = buf[pos];
            buf[pos] = vals[k];
            CHECK(io_test_write_file(cut, buf, n) == 0);
            if (st_open(&f, cut) == 0) {
                for (int i = 0; i < f.n; i++) {
                    const unsigned char *d = f.tensors[i].data;
                    CHECK(d >= (const unsigned char *)f.map &&
                          d + f.tensors[i].nbytes <= (const unsigned char *)f.map + f.map_size);
                }
                st_close(&f);
            }
            buf[pos] = saved;
        }
    }
}

TEST(safetensors_truncated_and_corrupted) {
    char dir[64];
    CHECK(io_test_tmpdir(dir, sizeof dir) == 0);
    run_truncations(dir);
    io_test_rmdir(dir);
}
