/* Shared by csrc/wlinear.c, csrc/rwkv_decode.c, csrc/llama_decode.c and csrc/mlstm_step.c (copied
   beside each source when it is built): 16-wide float vectors, the weight-only matrix products dots_{f32,bf16,i8} /
   dots() of one weight format each (0 fp32, 1 bf16, 2 int8 with per-row scales), tested against the
   reference forms in ops/wlinear.py, models/rwkv_decode.py and the Llama modules, and the threads'
   split of the outputs (share, THREAD_IDS). Needs <stdint.h>, <stddef.h>, <string.h>. */
#ifndef RIZZ_WL_DOTS_H
#define RIZZ_WL_DOTS_H

typedef float vf __attribute__((vector_size(64)));     /* 16 floats; narrower CPUs split it */
typedef uint16_t vh __attribute__((vector_size(32)));  /* 16 bf16 */
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int8_t vb __attribute__((vector_size(16)));    /* 16 int8 */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* The sum of the 16 lanes, folded in halves (t[l] + t[l + 8], then + 4, then (t0 + t2) + (t1 + t3)):
   the same additions in the same order with or without AVX-512, so the results are the same bits. */
#ifdef __AVX512F__
#include <immintrin.h>
static inline float vsum(vf v) {
    const __m512 z = (__m512)v;
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(z), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}
#elif defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
static inline float vsum(vf v) { /* lanes by shuffles, not through memory (an address-taken vector lives on the stack) */
    const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}
#else
static inline float vsum(vf v) {
    float t[16];
    memcpy(t, &v, sizeof t);
    for (int l = 0; l < 8; l++) t[l] += t[l + 8];
    for (int l = 0; l < 4; l++) t[l] += t[l + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}
#endif

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

/* While the first row of X goes through weight rows j..j+3, ask for element i of rows j+4..j+7 (w3:
   row j+3): the hardware prefetchers alone leave a core's stream latency-bound (bf16 decoding of
   SmolLM2 took 1.4x (1 thread) to 1.75x (2 threads) as long without this). Prefetching past the last row is harmless. */
#define PREFETCH_NEXT_ROWS(w3, K, ESZ, i)                                                                \
    do {                                                                                                 \
        for (int q = 1; q <= 4; q++) __builtin_prefetch((w3) + (size_t)q * (K) * (ESZ) + (size_t)(i) * (ESZ)); \
    } while (0)

/* Output (b, j) from its vector sum t: the tail of a row (K not a multiple of 16), then the int8 scale. */
#define DOT_FINISH(T, t, wr, x, j, b)                                                                    \
    do {                                                                                                 \
        for (int i = k16; i < K; i++) t += w1_##T(wr, i) * (x)[i];                                      \
        Y[(size_t)(b) * ldy + (j)] = scale ? t * scale[j] : t;                                           \
    } while (0)

/* Y[b, j] = scale[j] * (W[j, :] . X[b, :]) (scale NULL: 1) for j in [j0, j1), b < M; Y rows ldy
   apart. Four weight rows at a time, against four rows of X at a time (16 independent sums: each
   weight vector is widened once for four rows, each X vector loaded once for four weight rows),
   then the remaining rows of X one by one: the weight rows stay in L1 while every row of X goes
   through them, so W is read from memory once for all M rows. Every output is summed in the same
   order whichever block computes it. */
#define DEFINE_DOTS(T, ESZ)                                                                              \
    static void dots_##T(const void *W, const float *scale, int K, const float *X, int M, int j0, int j1, \
                         float *Y, int ldy) {                                                            \
        const int k16 = K & ~15;                                                                         \
        int j = j0;                                                                                      \
        for (; j + 4 <= j1; j += 4) {                                                                    \
            const char *w0 = (const char *)W + (size_t)j * K * ESZ, *w1 = w0 + (size_t)K * ESZ;          \
            const char *w2 = w1 + (size_t)K * ESZ, *w3 = w2 + (size_t)K * ESZ;                           \
            int b = 0;                                                                                   \
            for (; b + 4 <= M; b += 4) {                                                                 \
                const float *x0 = X + (size_t)b * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;           \
                vf s[4][4] = {{{0}}};                                                                    \
                for (int i = 0; i < k16; i += 16) {                                                      \
                    if (b == 0) PREFETCH_NEXT_ROWS(w3, K, ESZ, i);                                       \
                    const vf a0 = w16_##T(w0, i), a1 = w16_##T(w1, i), a2 = w16_##T(w2, i), a3 = w16_##T(w3, i); \
                    const vf xv[4] = {vload(x0 + i), vload(x1 + i), vload(x2 + i), vload(x3 + i)};       \
                    for (int r = 0; r < 4; r++) {                                                        \
                        s[r][0] += a0 * xv[r]; s[r][1] += a1 * xv[r];                                    \
                        s[r][2] += a2 * xv[r]; s[r][3] += a3 * xv[r];                                    \
                    }                                                                                    \
                }                                                                                        \
                const float *xs[4] = {x0, x1, x2, x3};                                                   \
                const char *ws[4] = {w0, w1, w2, w3};                                                    \
                for (int r = 0; r < 4; r++)                                                              \
                    for (int c = 0; c < 4; c++) {                                                        \
                        float t = vsum(s[r][c]);                                                         \
                        DOT_FINISH(T, t, ws[c], xs[r], j + c, b + r);                                    \
                    }                                                                                    \
            }                                                                                            \
            for (; b < M; b++) {                                                                         \
                const float *x = X + (size_t)b * K;                                                      \
                vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                               \
                for (int i = 0; i < k16; i += 16) {                                                      \
                    if (b == 0) PREFETCH_NEXT_ROWS(w3, K, ESZ, i);                                       \
                    const vf xv = vload(x + i);                                                          \
                    s0 += w16_##T(w0, i) * xv;                                                           \
                    s1 += w16_##T(w1, i) * xv;                                                           \
                    s2 += w16_##T(w2, i) * xv;                                                           \
                    s3 += w16_##T(w3, i) * xv;                                                           \
                }                                                                                        \
                float t0 = vsum(s0), t1 = vsum(s1), t2 = vsum(s2), t3 = vsum(s3);                        \
                DOT_FINISH(T, t0, w0, x, j, b);                                                          \
                DOT_FINISH(T, t1, w1, x, j + 1, b);                                                      \
                DOT_FINISH(T, t2, w2, x, j + 2, b);                                                      \
                DOT_FINISH(T, t3, w3, x, j + 3, b);                                                      \
            }                                                                                            \
        }                                                                                                \
        for (; j < j1; j++) {                                                                            \
            const char *w0 = (const char *)W + (size_t)j * K * ESZ;                                      \
            for (int b = 0; b < M; b++) {                                                                \
                const float *x = X + (size_t)b * K;                                                      \
                vf s0 = {0};                                                                             \
                for (int i = 0; i < k16; i += 16) s0 += w16_##T(w0, i) * vload(x + i);                   \
                float t0 = vsum(s0);                                                                     \
                DOT_FINISH(T, t0, w0, x, j, b);                                                          \
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

/* Thread count and index inside an OpenMP parallel region (1 and 0 without OpenMP). */
#ifdef _OPENMP
#include <omp.h>
#define THREAD_IDS(nt, tid) ((nt) = omp_get_num_threads(), (tid) = omp_get_thread_num())
#else
#define THREAD_IDS(nt, tid) ((nt) = 1, (tid) = 0)
#endif

/* This thread's share [lo, hi) of n outputs: contiguous, cut at multiples of 16 (cache lines). */
static inline void share(int n, int nt, int t, int *lo, int *hi) {
    const int chunk = ((n + nt - 1) / nt + 15) & ~15;
    int a = t * chunk, b = a + chunk;
    *lo = a < n ? a : n;
    *hi = b < n ? b : n;
}

#endif
