/* Shared by csrc/wlinear.c and csrc/rwkv_decode.c (copied beside each source when it is built):
   16-wide float vectors, and the weight-only matrix products dots_{f32,bf16,i8} / dots() of one
   weight format each (0 fp32, 1 bf16, 2 int8 with per-row scales), tested against the reference
   forms in ops/wlinear.py and models/rwkv_decode.py. Needs <stdint.h>, <stddef.h>, <string.h>. */
#ifndef RIZZ_WL_DOTS_H
#define RIZZ_WL_DOTS_H

typedef float vf __attribute__((vector_size(64)));     /* 16 floats; narrower CPUs split it */
typedef uint16_t vh __attribute__((vector_size(32)));  /* 16 bf16 */
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int8_t vb __attribute__((vector_size(16)));    /* 16 int8 */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

static inline float vsum(vf v) {
    float t[16];
    memcpy(t, &v, sizeof t);
    for (int l = 0; l < 8; l++) t[l] += t[l + 8];
    for (int l = 0; l < 4; l++) t[l] += t[l + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}

/* 16 weights from element i of a row, widened to float32; and one weight (the tail). With AVX-512
   the widening is spelled out (GCC scalarises the generic int8 -> float conversion). */
#ifdef __AVX512F__
#include <immintrin.h>
static inline vf w16_f32(const void *w, size_t i) { return (vf)_mm512_loadu_ps((const float *)w + i); }
static inline vf w16_bf16(const void *w, size_t i) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline vf w16_i8(const void *w, size_t i) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
}
#else
typedef int32_t vi __attribute__((vector_size(64)));
static inline vf w16_f32(const void *w, size_t i) { return vload((const float *)w + i); }
static inline vf w16_bf16(const void *w, size_t i) {
    vh h;
    memcpy(&h, (const uint16_t *)w + i, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline vf w16_i8(const void *w, size_t i) {
    vb b;
    memcpy(&b, (const int8_t *)w + i, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
}
#endif
static inline float w1_f32(const void *w, size_t i) { return ((const float *)w)[i]; }
static inline float w1_bf16(const void *w, size_t i) {
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float w1_i8(const void *w, size_t i) { return (float)((const int8_t *)w)[i]; }

/* Y[b, j] = scale[j] * (W[j, :] . X[b, :]) (scale NULL: 1) for j in [j0, j1), b < M; Y rows ldy
   apart. Four weight rows at a time (four independent sums, X loaded once for them): the rows stay
   in L1 while every row of X goes through them, so W is read from memory once for all M rows. */
#define DEFINE_DOTS(T, ESZ)                                                                              \
    static void dots_##T(const void *W, const float *scale, int K, const float *X, int M, int j0, int j1, \
                         float *Y, int ldy) {                                                            \
        const int k16 = K & ~15;                                                                         \
        int j = j0;                                                                                      \
        for (; j + 4 <= j1; j += 4) {                                                                    \
            const char *w0 = (const char *)W + (size_t)j * K * ESZ, *w1 = w0 + (size_t)K * ESZ;          \
            const char *w2 = w1 + (size_t)K * ESZ, *w3 = w2 + (size_t)K * ESZ;                           \
            for (int b = 0; b < M; b++) {                                                                \
                const float *x = X + (size_t)b * K;                                                      \
                vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                               \
                for (int i = 0; i < k16; i += 16) {                                                      \
                    const vf xv = vload(x + i);                                                          \
                    s0 += w16_##T(w0, i) * xv;                                                           \
                    s1 += w16_##T(w1, i) * xv;                                                           \
                    s2 += w16_##T(w2, i) * xv;                                                           \
                    s3 += w16_##T(w3, i) * xv;                                                           \
                }                                                                                        \
                float t0 = vsum(s0), t1 = vsum(s1), t2 = vsum(s2), t3 = vsum(s3);                        \
                for (int i = k16; i < K; i++) {                                                          \
                    t0 += w1_##T(w0, i) * x[i];                                                          \
                    t1 += w1_##T(w1, i) * x[i];                                                          \
                    t2 += w1_##T(w2, i) * x[i];                                                          \
                    t3 += w1_##T(w3, i) * x[i];                                                          \
                }                                                                                        \
                float *y = Y + (size_t)b * ldy + j;                                                      \
                if (scale) {                                                                             \
                    t0 *= scale[j]; t1 *= scale[j + 1]; t2 *= scale[j + 2]; t3 *= scale[j + 3];          \
                }                                                                                        \
                y[0] = t0; y[1] = t1; y[2] = t2; y[3] = t3;                                              \
            }                                                                                            \
        }                                                                                                \
        for (; j < j1; j++) {                                                                            \
            const char *w0 = (const char *)W + (size_t)j * K * ESZ;                                      \
            for (int b = 0; b < M; b++) {                                                                \
                const float *x = X + (size_t)b * K;                                                      \
                vf s0 = {0};                                                                             \
                for (int i = 0; i < k16; i += 16) s0 += w16_##T(w0, i) * vload(x + i);                   \
                float t0 = vsum(s0);                                                                     \
                for (int i = k16; i < K; i++) t0 += w1_##T(w0, i) * x[i];                                \
                Y[(size_t)b * ldy + j] = scale ? t0 * scale[j] : t0;                                     \
            }                                                                                            \
        }                                                                                                \
    }

DEFINE_DOTS(f32, 4)
DEFINE_DOTS(bf16, 2)
DEFINE_DOTS(i8, 1)

static void dots(int wtype, const void *W, const float *scale, int K, const float *X, int M, int j0, int j1,
                 float *Y, int ldy) {
    if (wtype == 1) dots_bf16(W, NULL, K, X, M, j0, j1, Y, ldy);
    else if (wtype == 2) dots_i8(W, scale, K, X, M, j0, j1, Y, ldy);
    else dots_f32(W, NULL, K, X, M, j0, j1, Y, ldy);
}

#endif
