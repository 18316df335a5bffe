/* Element types as stored on disk, and conversions to the fp32 we compute in. */
#ifndef DELTATUNE_DTYPE_H
#define DELTATUNE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    DT_F32, DT_F16, DT_BF16, DT_F64,
    DT_I8, DT_U8, DT_I16, DT_U16, DT_I32, DT_U32, DT_I64, DT_U64, DT_BOOL,
    DT_DTYPE_COUNT
} dt_dtype;

size_t dt_dtype_size(dt_dtype t);
/* The safetensors spelling: "F32", "BF16", ... */
const char *dt_dtype_name(dt_dtype t);
/* Parses a safetensors dtype string; returns -1 (with an error) if unknown. */
int dt_dtype_parse(const char *s, dt_dtype *out);
/* True for the types weights may use: F32, F16, BF16. */
int dt_dtype_is_float(dt_dtype t);

static inline float dt_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}
uint16_t dt_f32_to_bf16(float f);  /* round to nearest even, NaN kept quiet */
float dt_f16_to_f32(uint16_t h);
uint16_t dt_f32_to_f16(float f);   /* round to nearest even */

/* dst[i] = (float)src[i] for F32/F16/BF16 sources (other types: no-op, returns -1). */
int dt_to_f32(float *dst, const void *src, dt_dtype t, size_t n);
/* dst (of type t) = src, for F32/F16/BF16. */
int dt_from_f32(void *dst, dt_dtype t, const float *src, size_t n);

#endif
