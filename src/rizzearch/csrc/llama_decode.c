/* Fused CPU decoding step of the Llama family: one token for B rows through every block, the final
   RMSNorm and the head in one call.

   Called from rizzearch/models/llama_decode.py (through ctypes), which documents the design; the
   model's own modules are the reference this kernel is tested against
   (tests/models/test_llama_decode.py). Matrices keep nn.Linear's (out, in) layout and are read in
   one of the formats of wl_dots.h (fp32 / bf16 / int8 with per-row scales); activations,
   accumulation, the norms, rotary embedding and softmax are float32. The KV cache is float32 or
   bfloat16 (rounded to nearest even, as torch rounds). */
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "wl_dots.h"

typedef struct {
    float eps1, eps2;
    const float *n1, *n2;                        /* (C) RMSNorm weights before attention and MLP */
    const void *w_qkv, *w_o, *w_gu, *w_d;        /* ((H+2Hkv)Dh, C), (C, H Dh), (2F, C), (C, F) */
    const float *s_qkv, *s_o, *s_gu, *s_d;       /* int8 per-row scales, else NULL */
    const float *b_qkv;                          /* ((H+2Hkv)Dh) or NULL (Qwen2 has q/k/v biases) */
} LLayer;

typedef struct {
    int L, C, H, Hkv, Dh, F, V;
    float eps_out;
    const float *n_out;                          /* (C) */
    const void *head;                            /* (V, C) */
    const float *s_head;
    const LLayer *layers;                        /* (L) */
    int wtype;                                   /* format of every matrix: 0 fp32, 1 bf16, 2 int8 */
    int cache_bf16;                              /* KV cache dtype: 0 float32, 1 bfloat16 */
} LModel;


static void rms_norm(const float *x, const float *w, float eps, int n, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static inline float cache_get(const void *c, int bf16, size_t i) { return bf16 ? w1_bf16(c, i) : ((const float *)c)[i]; }

static inline void cache_put(void *c, int bf16, size_t i, float f) {
    if (!bf16) { ((float *)c)[i] = f; return; }
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) ((uint16_t *)c)[i] = (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    else ((uint16_t *)c)[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);          /* nearest even */
}

/* Rotate the pairs (x[j], x[j + Dh/2]) by the angles in cos/sin (Dh), in place (RoFormer eq. 34). */
static void rope(float *x, const float *cs, const float *sn, int Dh) {
    const int h = Dh / 2;
    for (int j = 0; j < h; j++) {
        const float a = x[j], b = x[j + h];
        x[j] = a * cs[j] - b * sn[j];
        x[j + h] = b * cs[j + h] + a * sn[j + h];
    }
}

static inline vf cache16(const void *c, int bf16, size_t i) { return bf16 ? w16_bf16(c, i) : w16_f32(c, i); }

/* One query head against the cached keys/values [0, S) of its kv head: out (Dh) = softmax(q k^T /
   sqrt(Dh)) v over the valid keys (valid NULL: all). p: S floats of scratch. */
static void attend(const float *q, const void *k, const void *v, int bf16, int S, int Dh, const uint8_t *valid,
                   float *p, float *out) {
    const float scale = 1.f / sqrtf((float)Dh);
    const int d16 = Dh & ~15;
    float mx = -INFINITY;
    for (int s = 0; s < S; s++) {
        if (valid && !valid[s]) { p[s] = -INFINITY; continue; }
        const size_t at = (size_t)s * Dh;
        vf acc = {0};
        for (int j = 0; j < d16; j += 16) acc += vload(q + j) * cache16(k, bf16, at + j);
        float d = vsum(acc);
        for (int j = d16; j < Dh; j++) d += q[j] * cache_get(k, bf16, at + j);
        p[s] = d * scale;
        if (p[s] > mx) mx = p[s];
    }
    float sum = 0.f;
    for (int s = 0; s < S; s++) { p[s] = p[s] == -INFINITY ? 0.f : expf(p[s] - mx); sum += p[s]; }
    for (int j = 0; j < Dh; j++) out[j] = 0.f;
    for (int s = 0; s < S; s++) {
        if (p[s] == 0.f) continue;
        const float w = p[s] / sum;
        const size_t at = (size_t)s * Dh;
        for (int j = 0; j < d16; j += 16) {
            vf o = vload(out + j) + w * cache16(v, bf16, at + j);
            memcpy(out + j, &o, sizeof o);
        }
        for (int j = d16; j < Dh; j++) out[j] += w * cache_get(v, bf16, at + j);
    }
}

/* x (B, C) += attention of this layer (pre-norm); caches written at position n. See llama_step. */
static void attention_block(const LModel *M, const LLayer *P, int B, int nt, int tid, float *x, float *xn,
                            const float *cs, const float *sn, void *kc, void *vc, int cap, int n,
                            const uint8_t *valid, float *qkv, float *att, float *y, float *p) {
    const int C = M->C, H = M->H, Hkv = M->Hkv, Dh = M->Dh, G = H / Hkv, Q = (H + 2 * Hkv) * Dh;
    int q0, q1, c0, c1;
    share(Q, nt, tid, &q0, &q1);
    share(C, nt, tid, &c0, &c1);
    for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * C, P->n1, P->eps1, C, xn + (size_t)b * C);
    dots(M->wtype, P->w_qkv, P->s_qkv, C, xn, B, q0, q1, qkv, Q);
    if (P->b_qkv)
        for (int b = 0; b < B; b++)
            for (int j = q0; j < q1; j++) qkv[(size_t)b * Q + j] += P->b_qkv[j];
#pragma omp barrier
    for (int t = tid; t < B * Hkv; t += nt) {  /* rotate this step's key, write k and v into the caches */
        const int b = t / Hkv, g = t % Hkv;
        float *kk = qkv + (size_t)b * Q + (size_t)(H + g) * Dh, *vv = kk + (size_t)Hkv * Dh;
        rope(kk, cs + (size_t)b * Dh, sn + (size_t)b * Dh, Dh);
        const size_t at = (((size_t)b * Hkv + g) * cap + n) * Dh;
        for (int j = 0; j < Dh; j++) { cache_put(kc, M->cache_bf16, at + j, kk[j]); cache_put(vc, M->cache_bf16, at + j, vv[j]); }
    }
#pragma omp barrier
    const int es = M->cache_bf16 ? 2 : 4;
    for (int t = tid; t < B * H; t += nt) {
        const int b = t / H, h = t % H, g = h / G;
        float *q = qkv + (size_t)b * Q + (size_t)h * Dh;
        rope(q, cs + (size_t)b * Dh, sn + (size_t)b * Dh, Dh);
        const size_t base = ((size_t)b * Hkv + g) * cap * Dh * es;
        attend(q, (const char *)kc + base, (const char *)vc + base, M->cache_bf16, n + 1, Dh,
               valid ? valid + (size_t)b * cap : NULL, p, att + (size_t)b * H * Dh + (size_t)h * Dh);
    }
#pragma omp barrier
    dots(M->wtype, P->w_o, P->s_o, H * Dh, att, B, c0, c1, y, C);
    for (int b = 0; b < B; b++)
        for (int c = c0; c < c1; c++) x[(size_t)b * C + c] += y[(size_t)b * C + c];
#pragma omp barrier
}

/* x (B, C) += SwiGLU MLP of this layer (pre-norm): down(silu(gate) * up), gate/up the halves of w_gu. */
static void mlp_block(const LModel *M, const LLayer *P, int B, int nt, int tid, float *x, float *xn, float *gu,
                      float *hh, float *y) {
    const int C = M->C, F = M->F;
    int f0, f1, c0, c1;
    share(F, nt, tid, &f0, &f1);
    share(C, nt, tid, &c0, &c1);
    for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * C, P->n2, P->eps2, C, xn + (size_t)b * C);
    dots(M->wtype, P->w_gu, P->s_gu, C, xn, B, f0, f1, gu, 2 * F);
    dots(M->wtype, P->w_gu, P->s_gu, C, xn, B, F + f0, F + f1, gu, 2 * F);
    for (int b = 0; b < B; b++)
        for (int f = f0; f < f1; f++) {
            const float g = gu[(size_t)b * 2 * F + f];
            hh[(size_t)b * F + f] = g / (1.f + expf(-g)) * gu[(size_t)b * 2 * F + F + f];
        }
#pragma omp barrier
    dots(M->wtype, P->w_d, P->s_d, F, hh, B, c0, c1, y, C);
    for (int b = 0; b < B; b++)
        for (int c = c0; c < c1; c++) x[(size_t)b * C + c] += y[(size_t)b * C + c];
#pragma omp barrier
}

/* One token for B rows through the whole model.
   x: (B, C) the embeddings of the tokens, float32; the residual stream (overwritten).
   cs, sn: (B, Dh) cos and sin of this token's position in each row.
   kv: 2L cache pointers (k of every layer, then v), each (B, Hkv, cap, Dh) in the cache dtype; this
   token's key and value are written at position n, attention reads positions [0, n].
   valid: (B, cap) bytes (nonzero = a key to attend to; position n must be set) or NULL (all valid).
   logits: (B, V). scratch: B * (Q + H Dh + C + 3F) + nthreads * (B * C + n + 1) floats, Q = (H + 2Hkv) Dh.
   Returns 0, or 1 if H is not a multiple of Hkv or Dh is odd (nothing is computed). */
int llama_step(const LModel *M, int B, int nthreads, float *x, const float *cs, const float *sn,
               void *const *kv, int cap, int n, const uint8_t *valid, float *logits, float *scratch) {
    const int C = M->C, H = M->H, Hkv = M->Hkv, Dh = M->Dh, F = M->F, L = M->L;
    if (Hkv <= 0 || H % Hkv || Dh % 2) return 1;
    const size_t Q = (size_t)(H + 2 * Hkv) * Dh;
    float *qkv = scratch, *att = qkv + B * Q, *y = att + (size_t)B * H * Dh, *gu = y + (size_t)B * C;
    float *hh = gu + (size_t)B * 2 * F, *priv = hh + (size_t)B * F;
#pragma omp parallel num_threads(nthreads)
    {
        int nt, tid;
        THREAD_IDS(nt, tid);
        float *xn = priv + (size_t)tid * ((size_t)B * C + n + 1), *p = xn + (size_t)B * C;
        for (int l = 0; l < L; l++) {
            const LLayer *P = M->layers + l;
            attention_block(M, P, B, nt, tid, x, xn, cs, sn, kv[l], kv[L + l], cap, n, valid, qkv, att, y, p);
            mlp_block(M, P, B, nt, tid, x, xn, gu, hh, y);
        }
        int v0, v1;
        share(M->V, nt, tid, &v0, &v1);
        for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * C, M->n_out, M->eps_out, C, xn + (size_t)b * C);
        dots(M->wtype, M->head, M->s_head, C, xn, B, v0, v1, logits, M->V);
    }
    return 0;
}
