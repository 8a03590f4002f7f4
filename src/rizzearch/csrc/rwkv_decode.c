/* Fused CPU decoding step of RWKV-4: one token for B rows through the whole model in one call.

   Called from rizzearch/models/rwkv_decode.py (through ctypes), which documents the design and
   holds the eager reference step this kernel is tested against (tests/models/test_rwkv_decode.py).
   Every weight is read in place from the model's float32 parameters (no copies, nothing derived
   and cached), so in-place updates of the parameters are seen by the next call. */
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
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *mix_r, *mix_k, *mix_v;   /* (C) */
    const void *w_r, *w_k, *w_v;          /* (A, C): nn.Linear layout, row j = output j; Model.wtype */
    const void *w_o;                      /* (C, A) */
    const float *u, *decay;               /* (A) time_first, time_decay (the decay rate is exp(time_decay)) */
    const float *fmix_k, *fmix_r;         /* (C) */
    const void *w_fk;                     /* (F, C) */
    const void *w_fr;                     /* (C, C) */
    const void *w_fv;                     /* (C, F) */
    const float *s_r, *s_k, *s_v, *s_o, *s_fk, *s_fr, *s_fv;  /* per-row scales of int8 weights, else NULL */
} Layer;

typedef struct {
    int L, C, A, F, V, n_emb;
    float eps0, eps_out;
    const float *emb;                     /* (n_emb, C) */
    const float *ln0_w, *ln0_b, *lnout_w, *lnout_b;
    const void *head;                     /* (V, C) */
    const Layer *layers;                  /* (L) */
    int wtype;                            /* format of every matrix and the head: 0 fp32, 1 bf16, 2 int8 */
    const float *s_head;                  /* (V) int8 scales, else NULL */
} Model;

static void layer_norm(const float *x, const float *w, const float *b, float eps, int n, float *out) {
    float mean = 0.f, var = 0.f;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) { float d = x[i] - mean; var += d * d; }
    var /= n;
    const float r = 1.f / sqrtf(var + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * r * w[i] + b[i];  /* in place is fine */
}


/* One token for B rows through the whole model.
   st_in: 5 * L pointers (att_x[0..L), num[0..L), den, max, ffn_x), each (B, C) or (B, A), read only.
   out_*: (L, B, C) or (L, B, A), written (must not alias the inputs). logits: (B, V).
   scratch: B * (3C + 4A + F) + nthreads * 4 * B * C floats.
   Returns 0, or 1 + the first row whose token is outside [0, n_emb) (nothing is computed). */
int rwkv_step(const Model *M, int B, int nthreads, const int64_t *tokens, float *const *st_in,
              float *out_att, float *out_num, float *out_den, float *out_max, float *out_ffn,
              float *logits, float *scratch) {
    const int L = M->L, C = M->C, A = M->A, F = M->F, V = M->V;
    for (int b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= M->n_emb) return b + 1;
    const size_t BC = (size_t)B * C, BA = (size_t)B * A;
    /* shared: residual x, its update y, channel-mix gate rr (B, C); r, k, v, gated wkv g (B, A); kf (B, F) */
    float *x = scratch, *y = x + BC, *rr = y + BC, *r = rr + BC, *k = r + BA, *v = k + BA, *g = v + BA;
    float *kf = g + BA, *priv = kf + (size_t)B * F;
#pragma omp parallel num_threads(nthreads)
    {
        int nt, tid;
        THREAD_IDS(nt, tid);
        float *xx = priv + (size_t)tid * 4 * BC, *m0 = xx + BC, *m1 = m0 + BC, *m2 = m1 + BC;
        int c0, c1, a0, a1, f0, f1, v0, v1;
        share(C, nt, tid, &c0, &c1);
        share(A, nt, tid, &a0, &a1);
        share(F, nt, tid, &f0, &f1);
        share(V, nt, tid, &v0, &v1);
        /* x = ln0(emb[token]): every thread computes all of it privately and writes its columns */
        for (int b = 0; b < B; b++) {
            layer_norm(M->emb + (size_t)tokens[b] * C, M->ln0_w, M->ln0_b, M->eps0, C, xx + b * C);
            memcpy(x + b * C + c0, xx + b * C + c0, sizeof(float) * (c1 - c0));
        }
        for (int l = 0; l < L; l++) {
            const Layer *P = M->layers + l;
            const float *sx = st_in[l], *num = st_in[L + l], *den = st_in[2 * L + l], *mx = st_in[3 * L + l];
            const float *sf = st_in[4 * L + l];
            float *num_o = out_num + l * BA, *den_o = out_den + l * BA, *mx_o = out_max + l * BA;
            /* time mix: ln1 and the token-shift lerps (private), r/k/v for this thread's channels */
            for (int b = 0; b < B; b++) {
                layer_norm(l == 0 ? xx + b * C : x + b * C, P->ln1_w, P->ln1_b, P->eps1, C, xx + b * C);
                for (int c = 0; c < C; c++) {
                    const size_t i = (size_t)b * C + c;
                    const float d = xx[i] - sx[i];
                    m0[i] = sx[i] + P->mix_r[c] * d;
                    m1[i] = sx[i] + P->mix_k[c] * d;
                    m2[i] = sx[i] + P->mix_v[c] * d;
                }
            }
            if (tid == 0) memcpy(out_att + l * BC, xx, sizeof(float) * BC);
            dots(M->wtype, P->w_r, P->s_r, C, m0, B, a0, a1, r, A);
            dots(M->wtype, P->w_k, P->s_k, C, m1, B, a0, a1, k, A);
            dots(M->wtype, P->w_v, P->s_v, C, m2, B, a0, a1, v, A);
            for (int b = 0; b < B; b++) {
                for (int a = a0; a < a1; a++) {  /* eq. 14, one step (wkv_step) */
                    const size_t i = (size_t)b * A + a;
                    const float pp = mx[i], kk = k[i], vv = v[i], aa = num[i], bb = den[i];
                    float ww = P->u[a] + kk, q = pp > ww ? pp : ww;
                    float e1 = expf(pp - q), e2 = expf(ww - q);
                    const float out = (e1 * aa + e2 * vv) / (e1 * bb + e2);
                    ww = pp - expf(P->decay[a]);  /* computed here, not cached: in-place edits of time_decay are seen */
                    q = ww > kk ? ww : kk;
                    e1 = expf(ww - q);
                    e2 = expf(kk - q);
                    num_o[i] = e1 * aa + e2 * vv;
                    den_o[i] = e1 * bb + e2;
                    mx_o[i] = q;
                    g[i] = out / (1.f + expf(-r[i]));
                }
            }
#pragma omp barrier
            dots(M->wtype, P->w_o, P->s_o, A, g, B, c0, c1, y, C);
            for (int b = 0; b < B; b++)
                for (int c = c0; c < c1; c++) x[(size_t)b * C + c] += y[(size_t)b * C + c];
#pragma omp barrier
            /* channel mix: ln2 and lerps (private), squared-ReLU keys and receptance for this thread's share */
            for (int b = 0; b < B; b++) {
                layer_norm(x + b * C, P->ln2_w, P->ln2_b, P->eps2, C, xx + b * C);
                for (int c = 0; c < C; c++) {
                    const size_t i = (size_t)b * C + c;
                    const float d = xx[i] - sf[i];
                    m0[i] = sf[i] + P->fmix_k[c] * d;
                    m1[i] = sf[i] + P->fmix_r[c] * d;
                }
            }
            if (tid == 0) memcpy(out_ffn + l * BC, xx, sizeof(float) * BC);
            dots(M->wtype, P->w_fk, P->s_fk, C, m0, B, f0, f1, kf, F);
            for (int b = 0; b < B; b++)
                for (int f = f0; f < f1; f++) { const float t = kf[(size_t)b * F + f] > 0.f ? kf[(size_t)b * F + f] : 0.f; kf[(size_t)b * F + f] = t * t; }
            dots(M->wtype, P->w_fr, P->s_fr, C, m1, B, c0, c1, rr, C);
#pragma omp barrier
            dots(M->wtype, P->w_fv, P->s_fv, F, kf, B, c0, c1, y, C);
            for (int b = 0; b < B; b++)
                for (int c = c0; c < c1; c++) {
                    const size_t i = (size_t)b * C + c;
                    x[i] += y[i] / (1.f + expf(-rr[i]));
                }
#pragma omp barrier
        }
        for (int b = 0; b < B; b++) layer_norm(x + b * C, M->lnout_w, M->lnout_b, M->eps_out, C, xx + b * C);
        dots(M->wtype, M->head, M->s_head, C, xx, B, v0, v1, logits, V);
    }
    return 0;
}
