#include "deltatune/dtype.h"
#include "deltatune/error.h"

#include <string.h>

static const struct { const char *name; size_t size; } dtype_info[DT_DTYPE_COUNT] = {
    [DT_F32] = {"F32", 4},  [DT_F16] = {"F16", 2},  [DT_BF16] = {"BF16", 2}, [DT_F64] = {"F64", 8},
    [DT_I8] = {"I8", 1},    [DT_U8] = {"U8", 1},    [DT_I16] = {"I16", 2},   [DT_U16] = {"U16", 2},
    [DT_I32] = {"I32", 4},  [DT_U32] = {"U32", 4},  [DT_I64] = {"I64", 8},   [DT_U64] = {"U64", 8},
    [DT_BOOL] = {"BOOL", 1},
};

size_t dt_dtype_size(dt_dtype t) { return t < DT_DTYPE_COUNT ? dtype_info[t].size : 0; }

const char *dt_dtype_name(dt_dtype t) { return t < DT_DTYPE_COUNT ? dtype_info[t].name : "?"; }

int dt_dtype_parse(const char *s, dt_dtype *out) {
    for (int i = 0; i < DT_DTYPE_COUNT; i++) {
        if (strcmp(s, dtype_info[i].name) == 0) {
            *out = (dt_dtype)i;
            return 0;
        }
    }
    return dt_err("unsupported dtype \"%s\"", s);
}

int dt_dtype_is_float(dt_dtype t) { return t == DT_F32 || t == DT_F16 || t == DT_BF16; }

uint16_t dt_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float dt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t dt_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00);             /* NaN */
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);            /* overflow -> inf */
    if (absu < 0x38800000u) {                                              /* subnormal or zero */
        if (absu < 0x33000000u) return (uint16_t)sign;
        uint32_t man = (absu & 0x7fffff) | 0x800000, sh = 126 - (absu >> 23);
        uint32_t q = man >> sh, rem = man & ((1u << sh) - 1), halfway = 1u << (sh - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = ((absu - 0x38000000u) >> 13), rem = absu & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

int dt_to_f32(float *dst, const void *src, dt_dtype t, size_t n) {
    switch (t) {
    case DT_F32: memcpy(dst, src, n * 4); return 0;
    case DT_BF16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = dt_bf16_to_f32(s[i]);
        return 0;
    }
    case DT_F16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = dt_f16_to_f32(s[i]);
        return 0;
    }
    default: return dt_err("cannot convert %s to F32", dt_dtype_name(t));
    }
}

int dt_from_f32(void *dst, dt_dtype t, const float *src, size_t n) {
    switch (t) {
    case DT_F32: memcpy(dst, src, n * 4); return 0;
    case DT_BF16: {
        uint16_t *d = dst;
        for (size_t i = 0; i < n; i++) d[i] = dt_f32_to_bf16(src[i]);
        return 0;
    }
    case DT_F16: {
        uint16_t *d = dst;
        for (size_t i = 0; i < n; i++) d[i] = dt_f32_to_f16(src[i]);
        return 0;
    }
    default: return dt_err("cannot convert F32 to %s", dt_dtype_name(t));
    }
}
